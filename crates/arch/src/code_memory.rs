//! Executable memory for stubs and trampolines, within reach of a `jmp rel32` from the functions
//! they serve. Blocks are never freed: a thread may still be executing one.

use std::sync::Mutex;

use crate::RedirectError;
use crate::maps;

/// Bytes of one site block (stub, slow entry, data words, trampoline).
pub const BLOCK_SIZE: usize = 256;
const ARENA_SIZE: usize = 1 << 20;
/// Blocks must be reachable with a signed 32-bit displacement from anywhere in the function;
/// keep a margin for the function's own size and the arena's.
const REACH: usize = (1 << 31) - (16 << 20);

#[derive(Debug)]
struct Arena {
    start: usize,
    used: usize,
}

static ARENAS: Mutex<Vec<Arena>> = Mutex::new(Vec::new());

/// Every arena as a `[start, end)` range: the code of all stubs, slow entries and trampolines.
pub fn arena_ranges() -> Vec<(usize, usize)> {
    ARENAS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|a| (a.start, a.start + ARENA_SIZE))
        .collect()
}

/// Whether `target` can be reached from `from` with a 32-bit displacement margin.
pub fn within_reach(from: usize, target: usize) -> bool {
    from.abs_diff(target) < REACH
}

/// A fresh block of `BLOCK_SIZE` bytes, readable, writable and executable, within reach of `near`.
pub fn allocate_block(near: usize) -> Result<usize, RedirectError> {
    let mut arenas = ARENAS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(arena) = arenas
        .iter_mut()
        .find(|a| a.used + BLOCK_SIZE <= ARENA_SIZE && within_reach(near, a.start + a.used))
    {
        let block = arena.start + arena.used;
        arena.used += BLOCK_SIZE;
        return Ok(block);
    }
    let start = map_arena_near(near)?;
    arenas.push(Arena {
        start,
        used: BLOCK_SIZE,
    });
    Ok(start)
}

fn map_arena_near(near: usize) -> Result<usize, RedirectError> {
    let maps = maps::read().map_err(|e| RedirectError::Memory(e.to_string()))?;
    let page = 4096;
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
        name: String::new(),
    })) {
        let gap_start = previous_end.max(low).next_multiple_of(page);
        let gap_end = m.start.min(high);
        if gap_end > gap_start && gap_end - gap_start >= ARENA_SIZE {
            // Either end of the gap, whichever is nearer to `near`.
            let below = gap_end - ARENA_SIZE;
            let candidate = if below < near { below } else { gap_start };
            candidates.push(candidate);
        }
        previous_end = previous_end.max(m.end);
    }
    candidates.sort_by_key(|&c| c.abs_diff(near));
    for candidate in candidates {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; it fails instead.
        let address = unsafe {
            libc::mmap(
                candidate as *mut libc::c_void,
                ARENA_SIZE,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if address != libc::MAP_FAILED {
            return Ok(address as usize);
        }
    }
    Err(RedirectError::Memory(format!(
        "no free address range within 2 GiB of {near:#x} for stubs"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_near_the_code_they_serve_and_never_shared() {
        let near = blocks_are_near_the_code_they_serve_and_never_shared as *const () as usize;
        let a = allocate_block(near).unwrap();
        let b = allocate_block(near).unwrap();
        assert_ne!(a, b);
        assert!(within_reach(near, a) && within_reach(near, b));
        // SAFETY: the block was just mapped writable and is ours alone.
        unsafe { std::ptr::write_bytes(a as *mut u8, 0xcc, BLOCK_SIZE) };
    }
}
