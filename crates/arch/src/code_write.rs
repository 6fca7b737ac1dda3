//! Writing live code, the user-space `text_poke`: bytes of loaded code are changed through
//! `/proc/self/mem`, so that no page is ever writable and executable, and a batch of changes
//! to code that threads run is committed while every other thread is parked outside it.
//!
//! Safety model of this module:
//! 1. A write targets bytes that no thread executes while they change: code no thread can
//!    reach yet (a fresh stub block), or code that every other thread is parked away from (a
//!    commit: [`crate::stop_world`] parked them, and none has its PC inside the bytes).
//! 2. Writes go through `/proc/self/mem`, the kernel's `FOLL_FORCE` path: the mapping keeps its
//!    protection, so the target's text is never mapped writable and executable, which also
//!    works under the kernel's memory-deny-write-execute. Only where that path fails (no
//!    `/proc`, or a kernel that refuses forced writes) are the written pages' protections
//!    lifted with `mprotect` to read-write-execute and put back after, every result checked.
//! 3. Before the world stops, every write is tried once with the bytes already there: the path
//!    is known to work, pages are already copied-on-write, and nothing is left to fail while
//!    threads are parked but the write itself; a write that still fails is undone, with the
//!    writes before it, so a commit is all or nothing.
//! 4. After a commit's writes, every core is serialized (`membarrier` SYNC_CORE) before the
//!    threads go on, so none runs a stale decoded copy of the old bytes.
//! 5. Every system call is made with the `syscall` instruction ([`signals::syscall`]), never
//!    through libc, whose functions a patch may be replacing.

use std::sync::OnceLock;
use std::time::Duration;

use crate::maps::{self, Mapping};
use crate::signals;
use crate::stop_world::{self, StopError};

/// How often a commit retries when a thread is parked inside bytes to be rewritten.
const PC_CONFLICT_RETRIES: u32 = 500;

/// Bytes to put at an address of loaded code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeWrite {
    /// Where the bytes go.
    pub address: usize,
    /// What they become.
    pub bytes: Vec<u8>,
}

impl CodeWrite {
    /// One past the last byte written.
    pub fn end(&self) -> usize {
        self.address + self.bytes.len()
    }
}

/// Why code could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Neither way of writing worked.
    #[error(
        "cannot write {len} bytes of code at {address:#x}: through /proc/self/mem: {proc_mem}; with mprotect: {protect}"
    )]
    Refused {
        /// The first byte.
        address: usize,
        /// How many bytes.
        len: usize,
        /// Why `/proc/self/mem` did not take them.
        proc_mem: ProcMemFailure,
        /// Why lifting (or putting back) the protection did not work.
        protect: std::io::Error,
    },
    /// The bytes were written, but the protection of their pages could not be put back: a page
    /// stays writable and executable.
    #[error(
        "wrote {len} bytes of code at {address:#x}, but could not protect their page again: {protect}"
    )]
    LeftWritable {
        /// The first byte.
        address: usize,
        /// How many bytes.
        len: usize,
        /// Why `mprotect` failed.
        protect: std::io::Error,
    },
    /// The bytes lie outside every mapping.
    #[error("{address:#x}..{end:#x} is not mapped")]
    NotMapped {
        /// The first byte.
        address: usize,
        /// One past the last.
        end: usize,
    },
}

/// Why a write through `/proc/self/mem` did not happen. Made without allocating: writes fail,
/// if ever, while threads are parked.
#[derive(Debug, thiserror::Error)]
pub enum ProcMemFailure {
    /// The file could not be opened (errno).
    #[error("cannot open it: {}", std::io::Error::from_raw_os_error(*.0))]
    Unavailable(i32),
    /// The kernel took only part of the bytes.
    #[error("it took {written} of {len} bytes")]
    Short {
        /// Bytes written.
        written: usize,
        /// Bytes asked.
        len: usize,
    },
    /// The kernel refused the write (errno).
    #[error("{}", std::io::Error::from_raw_os_error(*.0))]
    Failed(i32),
}

/// Why a commit changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Threads could not be parked.
    #[error(transparent)]
    Stop(#[from] StopError),
    /// A thread stayed inside the bytes to rewrite through every retry.
    #[error(
        "thread {tid} kept executing at {pc:#x}, inside code to be rewritten; code was not changed"
    )]
    ThreadInsideRewrite {
        /// The thread.
        tid: i32,
        /// Its PC.
        pc: usize,
    },
    /// Writing failed; what was written was undone.
    #[error("{0}; code was not changed")]
    Write(#[source] WriteError),
    /// Writing failed and undoing the writes before it failed too: the code is half changed.
    #[error("{write}; undoing the writes before it failed too: {undo}")]
    HalfWritten {
        /// The write that failed.
        write: WriteError,
        /// The undo that failed.
        undo: WriteError,
    },
}

/// The system's page size, from `sysconf`.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf takes a constant and has no other effect.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        // x86-64 Linux pages are 4 KiB; sysconf does not fail for _SC_PAGESIZE.
        usize::try_from(size)
            .ok()
            .filter(|s| *s > 0)
            .unwrap_or(4096)
    })
}

/// Writes code, through `/proc/self/mem` or, failing that, `mprotect` (rule 2). One writer
/// serves one request: it keeps `/proc/self/mem` open, so that nothing is opened while threads
/// are parked.
#[derive(Debug)]
pub struct CodeWriter {
    /// The open descriptor, or the errno of the failed open.
    mem: Result<i32, i32>,
}

impl CodeWriter {
    /// A writer; `/proc/self/mem` is opened now.
    pub fn new() -> Self {
        let path = b"/proc/self/mem\0";
        // SAFETY: a NUL-terminated path; the descriptor is closed by Drop.
        let mem = unsafe {
            signals::syscall(
                libc::SYS_openat,
                [
                    libc::AT_FDCWD as usize,
                    path.as_ptr() as usize,
                    (libc::O_RDWR | libc::O_CLOEXEC) as usize,
                    0,
                    0,
                    0,
                ],
            )
        }
        .map(|fd| fd as i32);
        CodeWriter { mem }
    }

    /// Writes `bytes` at `address`, whose pages `maps` describes (their protection is put
    /// back after an `mprotect` write).
    ///
    /// # Safety
    /// No thread executes `[address, address + bytes.len())` while it is written (rule 1), and
    /// the range lies in mappings of code or of stub blocks this process may change.
    pub unsafe fn write(
        &self,
        address: usize,
        bytes: &[u8],
        maps: &[Mapping],
    ) -> Result<(), WriteError> {
        let proc_mem = match self.mem {
            // SAFETY: writes `bytes` (valid for reads) at offset `address` of our own memory,
            // which the caller promises is code no thread executes now.
            Ok(fd) => match unsafe {
                signals::syscall(
                    libc::SYS_pwrite64,
                    [
                        fd as usize,
                        bytes.as_ptr() as usize,
                        bytes.len(),
                        address,
                        0,
                        0,
                    ],
                )
            } {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(written) => ProcMemFailure::Short {
                    written,
                    len: bytes.len(),
                },
                Err(errno) => ProcMemFailure::Failed(errno),
            },
            Err(errno) => ProcMemFailure::Unavailable(errno),
        };
        // SAFETY: the caller's promise, passed on.
        match unsafe { write_with_mprotect(address, bytes, maps) } {
            Ok(()) => Ok(()),
            Err(ProtectError::NotMapped) => Err(WriteError::NotMapped {
                address,
                end: address + bytes.len(),
            }),
            Err(ProtectError::Lift(errno)) => Err(WriteError::Refused {
                address,
                len: bytes.len(),
                proc_mem,
                protect: std::io::Error::from_raw_os_error(errno),
            }),
            Err(ProtectError::PutBack(errno)) => Err(WriteError::LeftWritable {
                address,
                len: bytes.len(),
                protect: std::io::Error::from_raw_os_error(errno),
            }),
        }
    }
}

impl Drop for CodeWriter {
    fn drop(&mut self) {
        if let Ok(fd) = self.mem {
            signals::close(fd);
        }
    }
}

fn mprotect(page: usize, len: usize, prot: i32) -> Result<(), i32> {
    // SAFETY: changes the protection of whole pages of this process's own mappings; the caller
    // keeps them readable and executable for every thread (see `write_with_mprotect`).
    unsafe { signals::syscall(libc::SYS_mprotect, [page, len, prot as usize, 0, 0, 0]) }.map(|_| ())
}

impl Default for CodeWriter {
    fn default() -> Self {
        Self::new()
    }
}

enum ProtectError {
    NotMapped,
    /// Lifting the protection failed (errno); nothing was written.
    Lift(i32),
    /// The bytes were written, but the protection could not be put back (errno).
    PutBack(i32),
}

/// The fallback of rule 2: lifts the protection of the pages written, copies, puts it back.
/// Allocates nothing (it may run while threads are parked).
///
/// # Safety
/// As [`CodeWriter::write`].
unsafe fn write_with_mprotect(
    address: usize,
    bytes: &[u8],
    maps: &[Mapping],
) -> Result<(), ProtectError> {
    let page = page_size();
    let first = address & !(page - 1);
    let end = address + bytes.len();
    let pages = || (first..end).step_by(page);
    if pages().any(|at| maps::find(maps, at).is_none()) {
        return Err(ProtectError::NotMapped);
    }
    let mut lifted = 0;
    let mut failure = None;
    for at in pages() {
        // Adds write permission to a page of loaded code while keeping read and execute, so
        // every thread's view of it stays executable.
        if let Err(errno) = mprotect(
            at,
            page,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
        ) {
            failure = Some(ProtectError::Lift(errno));
            break;
        }
        lifted += 1;
    }
    if failure.is_none() {
        // SAFETY: the destination is writable now and nobody executes it (the caller's promise).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), address as *mut u8, bytes.len()) };
    }
    for at in pages().take(lifted) {
        let prot = maps::find(maps, at).map_or(libc::PROT_READ | libc::PROT_EXEC, |m| m.prot);
        if let Err(errno) = mprotect(at, page, prot)
            && failure.is_none()
        {
            failure = Some(ProtectError::PutBack(errno));
        }
    }
    failure.map_or(Ok(()), Err)
}

/// The bytes now at `[address, address + len)`.
///
/// # Safety
/// The range lies in a readable mapping that stays mapped during the call.
pub unsafe fn read_code(address: usize, len: usize) -> Vec<u8> {
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(address as *const u8, len) }.to_vec()
}

/// Writes every change of `writes` while all other threads are parked with their PCs outside
/// `forbidden` (ranges exclusive at both ends), all or nothing (rules 1, 3 and 4). `maps` is the
/// memory map, read by the caller after the code to write was mapped.
///
/// # Safety
/// Every write targets mapped code of this process whose new bytes are correct for any thread
/// that runs them after the commit; threads only need to be kept out of the bytes while they
/// change, which the commit does.
pub unsafe fn commit(
    writes: &[CodeWrite],
    forbidden: &[(usize, usize)],
    maps: &[Mapping],
) -> Result<(), CommitError> {
    if writes.is_empty() {
        return Ok(());
    }
    let writer = CodeWriter::new();
    let mut previous = Vec::with_capacity(writes.len());
    let page = page_size();
    let mut tried_pages = std::collections::BTreeSet::new();
    for write in writes {
        if !maps::is_readable(maps, write.address, write.bytes.len()) {
            return Err(CommitError::Write(WriteError::NotMapped {
                address: write.address,
                end: write.end(),
            }));
        }
        // SAFETY: readable (checked above) code of a loaded object.
        let before = unsafe { read_code(write.address, write.bytes.len()) };
        // Rule 3: the same bytes again, while threads run; they change nothing a thread sees.
        // Once per page: whether a write works, and the copy-on-write, are the page's.
        let first_page = write.address & !(page - 1);
        let last_page = (write.end() - 1) & !(page - 1);
        if !tried_pages.contains(&first_page) || !tried_pages.contains(&last_page) {
            // SAFETY: rewriting the bytes that are there keeps every thread's view of them.
            unsafe { writer.write(write.address, &before, maps) }.map_err(CommitError::Write)?;
            tried_pages.extend([first_page, last_page]);
        }
        previous.push(before);
    }
    let mut sorted = forbidden.to_vec();
    sorted.sort_unstable();
    for attempt in 0.. {
        let world = stop_world::stop()?;
        let conflict = world.parked_pcs().find(|&(_, pc)| {
            let after = sorted.partition_point(|&(start, _)| start < pc);
            sorted[..after]
                .iter()
                .rev()
                .take(4)
                .any(|&(start, end)| start < pc && pc < end)
        });
        match conflict {
            None => {
                let written = apply(&writer, writes, &previous, maps);
                serialize_cores();
                drop(world);
                return written;
            }
            Some((tid, pc)) if attempt >= PC_CONFLICT_RETRIES => {
                drop(world);
                return Err(CommitError::ThreadInsideRewrite { tid, pc });
            }
            Some(_) => {
                drop(world);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    unreachable!("the loop returns")
}

/// The writes of a commit, with the world stopped: system calls and copies only, nothing
/// allocated. On a failure the writes before it are undone (rule 3).
fn apply(
    writer: &CodeWriter,
    writes: &[CodeWrite],
    previous: &[Vec<u8>],
    maps: &[Mapping],
) -> Result<(), CommitError> {
    for (i, write) in writes.iter().enumerate() {
        // SAFETY: every other thread is parked with its PC outside these bytes (rule 1).
        if let Err(failed) = unsafe { writer.write(write.address, &write.bytes, maps) } {
            // The failed write may have changed some of its bytes (a short write): undo it too.
            for (undo, before) in writes[..=i].iter().zip(previous).rev() {
                // SAFETY: as above; these bytes were written a moment ago in this stop.
                if let Err(undo_failed) = unsafe { writer.write(undo.address, before, maps) } {
                    return Err(CommitError::HalfWritten {
                        write: failed,
                        undo: undo_failed,
                    });
                }
            }
            return Err(CommitError::Write(failed));
        }
    }
    Ok(())
}

/// Rule 4. Without `membarrier` SYNC_CORE (kernels before 4.16) the parked threads still
/// serialize: they leave the stop through `rt_sigreturn`, which returns to user space with the
/// serializing `iret`; the writing thread serializes itself with `cpuid`.
fn serialize_cores() {
    if !signals::sync_core() {
        // `cpuid` is serializing on every x86-64 processor; its result is not needed.
        std::hint::black_box(core::arch::x86_64::__cpuid(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_size_is_the_systems() {
        let size = page_size();
        assert!(size.is_power_of_two() && size >= 4096, "{size}");
    }

    #[test]
    fn a_write_to_read_only_memory_goes_through_proc_self_mem_and_keeps_the_protection() {
        let page = page_size();
        // SAFETY: a fresh private anonymous page, read-only.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let address = p as usize;
        let maps = maps::read().unwrap();
        let writer = CodeWriter::new();
        // SAFETY: nobody executes or reads this page but this test.
        unsafe { writer.write(address + 8, &[1, 2, 3], &maps) }.unwrap();
        // SAFETY: the page is readable.
        assert_eq!(unsafe { read_code(address + 8, 3) }, [1, 2, 3]);
        let after = maps::read().unwrap();
        assert_eq!(maps::find(&after, address).unwrap().prot, libc::PROT_READ);
        // SAFETY: unmapping the page mapped above.
        assert_eq!(unsafe { libc::munmap(p, page) }, 0);
    }
}
