//! Memory for stubs and trampolines, within reach of a `jmp rel32` from the functions they
//! serve, and never writable and executable at once: an arena is a code region mapped read and
//! execute (filled through [`crate::code_write`]) followed by a data region mapped read and
//! write (the words stubs read, written with atomics). Blocks are never freed: a thread may
//! still be executing one.
//!
//! Safety model of this module: arenas are mapped with `MAP_FIXED_NOREPLACE`, which fails
//! rather than replace a mapping; a block is handed out once and its code written before any
//! code jumps to it.

use std::sync::Mutex;

use crate::code_write::page_size;
use crate::maps;
use crate::stub::{Block, CODE_BLOCK_SIZE, DATA_BLOCK_SIZE};

/// Blocks of one arena.
const ARENA_BLOCKS: usize = 4096;
const CODE_REGION: usize = ARENA_BLOCKS * CODE_BLOCK_SIZE;
const DATA_REGION: usize = ARENA_BLOCKS * DATA_BLOCK_SIZE;
const ARENA_SIZE: usize = CODE_REGION + DATA_REGION;
/// Blocks must be reachable with a signed 32-bit displacement from anywhere in the function;
/// keep a margin for the function's own size and the arena's.
const REACH: usize = (1 << 31) - (16 << 20);

/// Why no block could be had.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Every gap near the function is taken.
    #[error("no free address range within 2 GiB of {near:#x} for stubs")]
    NoRoomNear {
        /// The function.
        near: usize,
    },
    /// The memory map could not be read.
    #[error("cannot read /proc/self/maps: {0}")]
    Maps(std::io::Error),
}

#[derive(Debug)]
struct Arena {
    start: usize,
    used: usize,
}

static ARENAS: Mutex<Vec<Arena>> = Mutex::new(Vec::new());

/// Every arena's code region as a `[start, end)` range: the code of all stubs, slow entries and
/// trampolines.
pub fn arena_ranges() -> Vec<(usize, usize)> {
    ARENAS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|a| (a.start, a.start + CODE_REGION))
        .collect()
}

/// Whether `target` can be reached from `from` with a 32-bit displacement margin.
pub fn within_reach(from: usize, target: usize) -> bool {
    from.abs_diff(target) < REACH
}

fn block_at(arena_start: usize, index: usize) -> Block {
    Block {
        code: arena_start + index * CODE_BLOCK_SIZE,
        data: arena_start + CODE_REGION + index * DATA_BLOCK_SIZE,
    }
}

/// A fresh block within reach of `near`: its code region executable and not writable, its
/// data region writable and not executable.
pub fn allocate_block(near: usize) -> Result<Block, MemoryError> {
    let mut arenas = ARENAS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(arena) = arenas
        .iter_mut()
        .find(|a| a.used < ARENA_BLOCKS && within_reach(near, a.start + a.used * CODE_BLOCK_SIZE))
    {
        let block = block_at(arena.start, arena.used);
        arena.used += 1;
        return Ok(block);
    }
    let start = map_arena_near(near)?;
    arenas.push(Arena { start, used: 1 });
    Ok(block_at(start, 0))
}

/// Maps `len` bytes at exactly `at` with `prot`, or nothing.
fn map_fixed(at: usize, len: usize, prot: i32) -> bool {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; it fails instead.
    let address = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return false;
    }
    if address as usize != at {
        // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and treat it as a hint.
        // SAFETY: unmapping what this call just mapped elsewhere.
        unsafe { libc::munmap(address, len) };
        return false;
    }
    true
}

fn map_arena_near(near: usize) -> Result<usize, MemoryError> {
    let maps = maps::read().map_err(MemoryError::Maps)?;
    let page = page_size();
    let low = near
        .saturating_sub(REACH)
        .max(1 << 20)
        .next_multiple_of(page);
    let high = near.saturating_add(REACH).min(0x7fff_ffff_0000);
    // Free gaps between mappings, nearest first.
    let mut candidates = Vec::new();
    let mut previous_end = low;
    for m in maps.iter().chain(std::iter::once(&maps::Mapping {
        start: high,
        end: high,
        prot: 0,
        offset: 0,
        inode: 0,
        name: String::new(),
    })) {
        let gap_start = previous_end.max(low).next_multiple_of(page);
        let gap_end = m.start.min(high);
        if gap_end > gap_start && gap_end - gap_start >= ARENA_SIZE {
            // Either end of the gap, whichever is nearer to `near`.
            let below = (gap_end - ARENA_SIZE) & !(page - 1);
            let candidate = if below < near { below } else { gap_start };
            candidates.push(candidate);
        }
        previous_end = previous_end.max(m.end);
    }
    candidates.sort_by_key(|&c| c.abs_diff(near));
    for candidate in candidates {
        // Two mappings, so that no page is ever writable and executable: code first.
        if !map_fixed(candidate, CODE_REGION, libc::PROT_READ | libc::PROT_EXEC) {
            continue;
        }
        if map_fixed(
            candidate + CODE_REGION,
            DATA_REGION,
            libc::PROT_READ | libc::PROT_WRITE,
        ) {
            return Ok(candidate);
        }
        // SAFETY: unmapping the code region mapped just above, which nothing uses yet.
        unsafe { libc::munmap(candidate as *mut libc::c_void, CODE_REGION) };
    }
    Err(MemoryError::NoRoomNear { near })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_near_the_code_they_serve_never_shared_and_never_writable_and_executable() {
        let near =
            blocks_are_near_the_code_they_serve_never_shared_and_never_writable_and_executable
                as *const () as usize;
        let a = allocate_block(near).unwrap();
        let b = allocate_block(near).unwrap();
        assert_ne!(a, b);
        assert!(within_reach(near, a.code) && within_reach(near, b.code));
        let maps = maps::read().unwrap();
        let code = maps::find(&maps, a.code).unwrap();
        assert_eq!(code.prot, libc::PROT_READ | libc::PROT_EXEC);
        let data = maps::find(&maps, a.data).unwrap();
        assert_eq!(data.prot, libc::PROT_READ | libc::PROT_WRITE);
        assert!(
            maps.iter()
                .all(|m| m.prot & (libc::PROT_WRITE | libc::PROT_EXEC)
                    != libc::PROT_WRITE | libc::PROT_EXEC
                    || !(m.start..m.end).contains(&a.code))
        );
    }
}
