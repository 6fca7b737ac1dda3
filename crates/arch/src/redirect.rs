//! Redirecting functions to their dispatch stubs and back.
//!
//! Every redirected function owns one block of executable memory, laid out as:
//!
//! ```text
//! +0   stub:        jmp [rip -> slot]              the fast path: one load, one jump
//! +8   slow entry:  lea r11, [block]; jmp [rip -> common]
//! +24  word: address of the Rust decision glue (called by the common slow path)
//! +32  word: original entry (trampoline, or the instruction after the patchable nop)
//! +40  word: cookie passed to the decider
//! +48  word: address of the common slow path
//! +56  word: slot, where the stub jumps: a new function, the original entry or the slow entry
//! +64  trampoline (plain entries): the relocated first instructions, then a jump back
//! ```
//!
//! Nothing on either path pushes a return address: the stub and the slow path end in a jump, so
//! the redirected function's frame looks exactly like a direct call to it to unwinders.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use iced_x86::{BlockEncoder, BlockEncoderOptions, Code, Instruction, InstructionBlock};

use crate::code_memory::{self, BLOCK_SIZE};
use crate::entry::{self, EntryKind, JMP_REL32_LEN, PAD_LEN};
use crate::{RedirectError, maps, stop_world};

const SLOW_ENTRY_OFFSET: usize = 8;
const DECIDE_OFFSET: usize = 24;
const ORIGINAL_OFFSET: usize = 32;
const COOKIE_OFFSET: usize = 40;
const COMMON_OFFSET: usize = 48;
const SLOT_OFFSET: usize = 56;
const TRAMPOLINE_OFFSET: usize = 64;

/// How often a commit retries when a thread is parked inside bytes to be rewritten.
const PC_CONFLICT_RETRIES: u32 = 500;

/// The caller's choice for a site in transition: given the site's cookie and the stack pointer at
/// the function's entry (it points at the return address into the caller), the address to run,
/// or 0 for the original function. Runs on the calling thread at the function's entry: it must
/// not block, allocate, or take locks the program may hold.
pub type Decider = extern "C" fn(cookie: u64, entry_sp: usize) -> usize;

static DECIDER: AtomicUsize = AtomicUsize::new(0);

/// Sets the function the slow path asks. Until one is set the slow path runs the original.
pub fn set_decider(decider: Decider) {
    DECIDER.store(decider as usize, Ordering::Release);
}

/// A function to redirect.
#[derive(Debug, Clone, Copy)]
pub struct SiteSpec<'a> {
    /// Its name, for errors.
    pub name: &'a str,
    /// Run-time address of its entry.
    pub address: usize,
    /// Its size in bytes (0 if unknown).
    pub size: usize,
    /// Passed to the decider on the slow path.
    pub cookie: u64,
}

/// Where a redirected function's stub sends callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// The original code.
    Original,
    /// A replacement function, directly (the fast path).
    Jump(usize),
    /// Ask the decider on every call (the slow path).
    Decide,
}

/// A redirected function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteInfo {
    /// The function's entry.
    pub function: usize,
    /// The stub its entry jumps to.
    pub stub: usize,
    /// Where the original code runs from.
    pub original_entry: usize,
    /// "patchable entry" or "plain entry".
    pub kind: &'static str,
}

#[derive(Debug, Clone)]
struct CodeWrite {
    address: usize,
    bytes: Vec<u8>,
    /// Pages touched, with the protection to restore after the write.
    pages: Vec<(usize, i32)>,
}

#[derive(Debug)]
struct SiteRecord {
    info: SiteInfo,
    block: usize,
    /// Writes that redirect the function, and the ones that undo them.
    redirect: Vec<CodeWrite>,
    restore: Vec<CodeWrite>,
    /// PC ranges (exclusive at both ends) no thread may be in while the writes happen.
    forbidden: Vec<(usize, usize)>,
    active: bool,
}

static SITES: Mutex<BTreeMap<usize, SiteRecord>> = Mutex::new(BTreeMap::new());

fn sites() -> std::sync::MutexGuard<'static, BTreeMap<usize, SiteRecord>> {
    SITES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks, without changing anything, that the function can be redirected, and how, against a
/// memory map the caller read (`maps::read`), so that many functions share one read.
pub fn check(spec: &SiteSpec<'_>, maps: &[maps::Mapping]) -> Result<&'static str, RedirectError> {
    if let Some(record) = sites().get(&spec.address) {
        if record.active {
            return Err(already(spec));
        }
        return Ok(record.info.kind);
    }
    Ok(analyze(spec, maps)?.name())
}

fn already(spec: &SiteSpec<'_>) -> RedirectError {
    RedirectError::Unpatchable {
        function: spec.name.to_owned(),
        reason: "it is already redirected".into(),
    }
}

fn analyze(spec: &SiteSpec<'_>, maps: &[maps::Mapping]) -> Result<EntryKind, RedirectError> {
    let code = read_code(spec, maps)?;
    let pad = spec
        .address
        .checked_sub(PAD_LEN)
        .filter(|&pad| readable_code(maps, pad, PAD_LEN))
        // SAFETY: the pad lies in a readable executable mapping (checked just above).
        .map(|pad| unsafe { std::slice::from_raw_parts(pad as *const u8, PAD_LEN) });
    entry::analyze(spec.name, spec.address, spec.size, pad, code)
}

fn readable_code(maps: &[maps::Mapping], start: usize, len: usize) -> bool {
    let mut at = start;
    while at < start + len {
        match maps::find(maps, at) {
            Some(m) if m.prot & libc::PROT_READ != 0 && m.prot & libc::PROT_EXEC != 0 => at = m.end,
            _ => return false,
        }
    }
    true
}

fn read_code<'a>(spec: &SiteSpec<'_>, maps: &[maps::Mapping]) -> Result<&'a [u8], RedirectError> {
    let len = spec.size.max(JMP_REL32_LEN + 1);
    if !readable_code(maps, spec.address, len) {
        return Err(RedirectError::Unpatchable {
            function: spec.name.to_owned(),
            reason: format!(
                "{:#x}..{:#x} is not mapped as readable code",
                spec.address,
                spec.address + len
            ),
        });
    }
    // SAFETY: the whole range lies in readable executable mappings (checked above), and code
    // of loaded objects stays mapped while we hold no reference beyond this call's caller.
    Ok(unsafe { std::slice::from_raw_parts(spec.address as *const u8, len) })
}

fn write_for(maps: &[maps::Mapping], address: usize, bytes: Vec<u8>) -> CodeWrite {
    let first = address & !4095;
    let last = (address + bytes.len() - 1) & !4095;
    let pages = (first..=last)
        .step_by(4096)
        .map(|page| {
            let prot = maps::find(maps, page).map_or(libc::PROT_READ | libc::PROT_EXEC, |m| m.prot);
            (page, prot)
        })
        .collect();
    CodeWrite {
        address,
        bytes,
        pages,
    }
}

fn current_bytes(write: &CodeWrite) -> &[u8] {
    // SAFETY: callers only pass writes of sites whose code is still mapped readable.
    unsafe { std::slice::from_raw_parts(write.address as *const u8, write.bytes.len()) }
}

/// Builds the block and the writes for one function, allocating everything the commit needs.
fn prepare(spec: &SiteSpec<'_>, maps: &[maps::Mapping]) -> Result<SiteRecord, RedirectError> {
    let kind = analyze(spec, maps)?;
    let refuse = |reason: String| RedirectError::Unpatchable {
        function: spec.name.to_owned(),
        reason,
    };
    let block = code_memory::allocate_block(spec.address)?;
    let mut words = [0usize; 8];
    words[DECIDE_OFFSET / 8] = decide_target as *const () as usize;
    words[COOKIE_OFFSET / 8] = spec.cookie as usize;
    words[COMMON_OFFSET / 8] = slow_path_common as *const () as usize;
    let mut code = vec![0xccu8; BLOCK_SIZE];
    // jmp [rip + slot]
    code[0..2].copy_from_slice(&[0xff, 0x25]);
    code[2..6].copy_from_slice(&((SLOT_OFFSET - 6) as i32).to_le_bytes());
    // lea r11, [rip - 15] (the block); jmp [rip + common]
    let lea_end = SLOW_ENTRY_OFFSET + 7;
    code[SLOW_ENTRY_OFFSET..SLOW_ENTRY_OFFSET + 3].copy_from_slice(&[0x4c, 0x8d, 0x1d]);
    code[SLOW_ENTRY_OFFSET + 3..lea_end].copy_from_slice(&(-(lea_end as i32)).to_le_bytes());
    code[lea_end..lea_end + 2].copy_from_slice(&[0xff, 0x25]);
    code[lea_end + 2..lea_end + 6]
        .copy_from_slice(&((COMMON_OFFSET - (lea_end + 6)) as i32).to_le_bytes());

    let mut redirect = Vec::new();
    let mut restore = Vec::new();
    let mut forbidden = Vec::new();
    let original_entry = match &kind {
        EntryKind::Patchable { nop_offset, .. } => {
            let pad = spec.address - PAD_LEN;
            let mut jump = vec![0xff, 0x25, 0, 0, 0, 0];
            jump.extend_from_slice(&(block as u64).to_le_bytes());
            let nop = spec.address + nop_offset;
            let short = -((PAD_LEN + nop_offset + 2) as i8);
            redirect.push(write_for(maps, pad, jump));
            redirect.push(write_for(maps, nop, vec![0xeb, short as u8]));
            restore.push(write_for(maps, nop, vec![0x66, 0x90]));
            forbidden.push((pad, spec.address));
            forbidden.push((nop, nop + 2));
            nop + 2
        }
        EntryKind::Plain {
            relocated_len,
            instructions,
        } => {
            let trampoline = block + TRAMPOLINE_OFFSET;
            let mut moved = instructions.clone();
            let back =
                Instruction::with_branch(Code::Jmp_rel32_64, (spec.address + relocated_len) as u64)
                    .map_err(|e| refuse(e.to_string()))?;
            moved.push(back);
            let encoded = BlockEncoder::encode(
                64,
                InstructionBlock::new(&moved, trampoline as u64),
                BlockEncoderOptions::NONE,
            )
            .map_err(|e| refuse(format!("its first instructions cannot be moved: {e}")))?;
            let bytes = encoded.code_buffer;
            if bytes.len() > BLOCK_SIZE - TRAMPOLINE_OFFSET {
                return Err(refuse(format!(
                    "its first instructions need {} bytes once moved, more than the {} available",
                    bytes.len(),
                    BLOCK_SIZE - TRAMPOLINE_OFFSET
                )));
            }
            code[TRAMPOLINE_OFFSET..TRAMPOLINE_OFFSET + bytes.len()].copy_from_slice(&bytes);
            let displacement = block as i64 - (spec.address + JMP_REL32_LEN) as i64;
            let displacement = i32::try_from(displacement)
                .map_err(|_| refuse("its stub is out of reach of a 32-bit jump".into()))?;
            let mut jump = vec![0xe9];
            jump.extend_from_slice(&displacement.to_le_bytes());
            let original = read_code(spec, maps)?[..JMP_REL32_LEN].to_vec();
            redirect.push(write_for(maps, spec.address, jump));
            restore.push(write_for(maps, spec.address, original));
            forbidden.push((spec.address, spec.address + relocated_len));
            trampoline
        }
    };
    words[ORIGINAL_OFFSET / 8] = original_entry;
    words[SLOT_OFFSET / 8] = original_entry;
    for (i, word) in words.iter().enumerate().skip(DECIDE_OFFSET / 8) {
        code[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
    }
    // SAFETY: the block is fresh, writable, BLOCK_SIZE bytes long and not yet reachable from
    // any code, so no thread executes it while we fill it.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), block as *mut u8, BLOCK_SIZE) };
    Ok(SiteRecord {
        info: SiteInfo {
            function: spec.address,
            stub: block,
            original_entry,
            kind: kind.name(),
        },
        block,
        redirect,
        restore,
        forbidden,
        active: false,
    })
}

/// Redirects every function of `specs` to its stub, in one stop of the world. The stubs start by
/// running the original code: set each site's dispatch with [`set_dispatch`]. All or nothing.
pub fn redirect(specs: &[SiteSpec<'_>]) -> Result<Vec<SiteInfo>, RedirectError> {
    let maps = maps::read().map_err(|e| RedirectError::Memory(e.to_string()))?;
    let mut sites = sites();
    let mut seen = std::collections::BTreeSet::new();
    for spec in specs {
        if !seen.insert(spec.address) {
            return Err(RedirectError::Unpatchable {
                function: spec.name.to_owned(),
                reason: "it appears twice in one batch".into(),
            });
        }
    }
    let mut prepared: Vec<(usize, Option<SiteRecord>)> = Vec::with_capacity(specs.len());
    for spec in specs {
        match sites.get(&spec.address) {
            Some(record) if record.active => return Err(already(spec)),
            Some(record)
                if readable_code(&maps, spec.address, JMP_REL32_LEN)
                    && record
                        .restore
                        .iter()
                        .all(|w| current_bytes(w) == w.bytes.as_slice()) =>
            {
                // Redirected before and restored since: the block and its trampoline still fit.
                set_cookie(record.block, spec.cookie);
                set_slot(record.block, record.info.original_entry);
                prepared.push((spec.address, None));
            }
            _ => prepared.push((spec.address, Some(prepare(spec, &maps)?))),
        }
    }
    for (address, record) in &mut prepared {
        if let Some(record) = record.take() {
            sites.insert(*address, record);
        }
    }
    let batch: Vec<&SiteRecord> = prepared.iter().map(|(a, _)| &sites[a]).collect();
    let writes: Vec<&CodeWrite> = batch.iter().flat_map(|r| &r.redirect).collect();
    let forbidden: Vec<(usize, usize)> = batch
        .iter()
        .flat_map(|r| r.forbidden.iter().copied())
        .collect();
    commit(&writes, &forbidden)?;
    let mut infos = Vec::with_capacity(prepared.len());
    for (address, _) in &prepared {
        let record = sites.get_mut(address).expect("prepared above");
        record.active = true;
        infos.push(record.info.clone());
    }
    Ok(infos)
}

/// Puts the original bytes back for every function of `addresses`, in one stop of the world.
/// Functions whose code was unmapped (their library unloaded) are forgotten without writing.
pub fn restore(addresses: &[usize]) -> Result<(), RedirectError> {
    let maps = maps::read().map_err(|e| RedirectError::Memory(e.to_string()))?;
    let mut sites = sites();
    let mut writes: Vec<&CodeWrite> = Vec::new();
    let mut forbidden = Vec::new();
    for &address in addresses {
        let Some(record) = sites.get(&address).filter(|r| r.active) else {
            return Err(RedirectError::NotRedirected(address));
        };
        let still_ours = record.redirect.iter().all(|w| {
            readable_code(&maps, w.address, w.bytes.len()) && current_bytes(w) == w.bytes.as_slice()
        });
        if still_ours {
            writes.extend(record.restore.iter());
            forbidden.extend(record.forbidden.iter().copied());
        }
    }
    commit(&writes, &forbidden)?;
    for &address in addresses {
        let record = sites.get_mut(&address).expect("checked above");
        record.active = false;
        set_slot(record.block, record.info.original_entry);
    }
    Ok(())
}

/// Sets where a redirected function's callers go. Takes effect for every later call, on every
/// thread, without stopping anything.
pub fn set_dispatch(function: usize, dispatch: Dispatch) -> Result<(), RedirectError> {
    let sites = sites();
    let record = sites
        .get(&function)
        .filter(|r| r.active)
        .ok_or(RedirectError::NotRedirected(function))?;
    let target = match dispatch {
        Dispatch::Original => record.info.original_entry,
        Dispatch::Jump(address) => address,
        Dispatch::Decide => record.block + SLOW_ENTRY_OFFSET,
    };
    set_slot(record.block, target);
    Ok(())
}

/// The redirected function's site, if it is redirected.
pub fn site(function: usize) -> Option<SiteInfo> {
    sites()
        .get(&function)
        .filter(|r| r.active)
        .map(|r| r.info.clone())
}

fn word(block: usize, offset: usize) -> &'static AtomicUsize {
    // SAFETY: blocks are never unmapped, the offset is 8-aligned inside the block, and every
    // access to these words goes through atomics.
    unsafe { &*((block + offset) as *const AtomicUsize) }
}

fn set_slot(block: usize, target: usize) {
    word(block, SLOT_OFFSET).store(target, Ordering::Release);
}

fn set_cookie(block: usize, cookie: u64) {
    word(block, COOKIE_OFFSET).store(cookie as usize, Ordering::Release);
}

/// Writes every change while all other threads are parked outside the changed bytes.
fn commit(writes: &[&CodeWrite], forbidden: &[(usize, usize)]) -> Result<(), RedirectError> {
    if writes.is_empty() {
        return Ok(());
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
                for write in writes {
                    apply(write);
                }
                crate::signals::sync_core();
                drop(world);
                return Ok(());
            }
            Some((tid, pc)) if attempt >= PC_CONFLICT_RETRIES => {
                drop(world);
                return Err(RedirectError::ThreadInsideRewrite { tid, pc });
            }
            Some(_) => {
                drop(world);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    unreachable!("the loop returns")
}

/// Copies one write into the code, lifting write protection around it. Runs while the world is
/// stopped: system calls and copies only.
fn apply(write: &CodeWrite) {
    for &(page, _) in &write.pages {
        // SAFETY: the page belongs to a mapping of loaded code; adding write permission while
        // keeping read and execute leaves every thread's view of it executable.
        unsafe {
            libc::mprotect(
                page as *mut libc::c_void,
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            )
        };
    }
    // SAFETY: the destination is writable now (above) and no thread executes these bytes: every
    // other thread is parked with its PC outside them.
    unsafe {
        std::ptr::copy_nonoverlapping(
            write.bytes.as_ptr(),
            write.address as *mut u8,
            write.bytes.len(),
        )
    };
    for &(page, prot) in &write.pages {
        // SAFETY: restores the protection the page had before `apply`.
        unsafe { libc::mprotect(page as *mut libc::c_void, 4096, prot) };
    }
}

extern "C" fn decide_target(cookie: u64, original: usize, entry_sp: usize) -> usize {
    let decider = DECIDER.load(Ordering::Acquire);
    if decider == 0 {
        return original;
    }
    // SAFETY: DECIDER only ever holds a `Decider` stored by `set_decider`.
    let decider: Decider = unsafe { std::mem::transmute::<usize, Decider>(decider) };
    match decider(cookie, entry_sp) {
        0 => original,
        target => target,
    }
}

/// The slow path shared by every stub: entered by a jump with r11 = the site's block and the
/// stack exactly as at the function's entry. Saves every register an argument may be in, asks
/// `decide_target`, restores them and jumps to the answer.
#[unsafe(naked)]
unsafe extern "C" fn slow_path_common() {
    core::arch::naked_asm!(
        "pushfq",
        "push rax",
        "push rdi",
        "push rsi",
        "push rdx",
        "push rcx",
        "push r8",
        "push r9",
        "push r10",
        "push rbp",
        "mov rbp, rsp",
        "and rsp, -16",
        "sub rsp, 128",
        "movdqu [rsp], xmm0",
        "movdqu [rsp + 16], xmm1",
        "movdqu [rsp + 32], xmm2",
        "movdqu [rsp + 48], xmm3",
        "movdqu [rsp + 64], xmm4",
        "movdqu [rsp + 80], xmm5",
        "movdqu [rsp + 96], xmm6",
        "movdqu [rsp + 112], xmm7",
        "mov rdi, [r11 + {cookie}]",
        "mov rsi, [r11 + {original}]",
        // The stack pointer at the function's entry, above the ten words pushed here.
        "lea rdx, [rbp + 80]",
        "call [r11 + {decide}]",
        "mov r11, rax",
        "movdqu xmm0, [rsp]",
        "movdqu xmm1, [rsp + 16]",
        "movdqu xmm2, [rsp + 32]",
        "movdqu xmm3, [rsp + 48]",
        "movdqu xmm4, [rsp + 64]",
        "movdqu xmm5, [rsp + 80]",
        "movdqu xmm6, [rsp + 96]",
        "movdqu xmm7, [rsp + 112]",
        "mov rsp, rbp",
        "pop rbp",
        "pop r10",
        "pop r9",
        "pop r8",
        "pop rcx",
        "pop rdx",
        "pop rsi",
        "pop rdi",
        "pop rax",
        "popfq",
        "jmp r11",
        cookie = const COOKIE_OFFSET,
        original = const ORIGINAL_OFFSET,
        decide = const DECIDE_OFFSET,
    )
}
