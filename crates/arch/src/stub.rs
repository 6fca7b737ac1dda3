//! A redirected function's stub: its code, its data words, and the slow path every stub shares.
//!
//! Each site owns a code block (read and execute only) and a data block (read and write only),
//! in the same arena so that RIP-relative operands reach across:
//!
//! ```text
//! code block                                        data block
//! +0   stub:        jmp [rip -> slot]               +0   decision glue (called by the slow path)
//! +8   slow entry:  lea r11, [rip -> data block]    +8   original entry (trampoline, or after
//!                   jmp [rip -> common]                  the patchable nop)
//! +32  trampoline:  the relocated first             +16  cookie passed to the decider
//!                   instructions, then a jump back  +24  address of the common slow path
//!                                                   +32  slot: where the stub jumps (a new
//!                                                        function, the original entry, or the
//!                                                        slow entry)
//! ```
//!
//! Nothing on either path pushes a return address: the stub and the slow path end in a jump, so
//! the redirected function's frame looks exactly like a direct call to it to unwinders.
//!
//! Safety model of this module:
//! 1. Data blocks are never unmapped and their words are 8-byte aligned; every access to them
//!    goes through atomics, as the stubs of running threads read them concurrently.
//! 2. The decider is only ever a [`Decider`] stored by [`set_decider`], called with the ABI the
//!    slow path sets up.
//! 3. The slow path preserves every register an argument may be in (rdi, rsi, rdx, rcx, r8, r9,
//!    rax for variadic calls, r10 for static chains, xmm0–xmm7) and the flags, and calls the
//!    decider on a 16-byte aligned stack.

use std::sync::atomic::{AtomicUsize, Ordering};

use iced_x86::{Code, Instruction, MemoryOperand, Register};

use crate::entry::{Unpatchable, encode};

/// Bytes of a site's code block.
pub const CODE_BLOCK_SIZE: usize = 128;
/// Bytes of a site's data block.
pub const DATA_BLOCK_SIZE: usize = 64;
/// Where the slow entry starts in the code block.
pub const SLOW_ENTRY_OFFSET: usize = 8;
/// Where the trampoline starts in the code block.
pub const TRAMPOLINE_OFFSET: usize = 32;
/// Bytes the trampoline may take.
pub const TRAMPOLINE_ROOM: usize = CODE_BLOCK_SIZE - TRAMPOLINE_OFFSET;

const DECIDE_OFFSET: usize = 0;
const ORIGINAL_OFFSET: usize = 8;
const COOKIE_OFFSET: usize = 16;
const COMMON_OFFSET: usize = 24;
const SLOT_OFFSET: usize = 32;

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

/// The two blocks of one site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// The code block (stub, slow entry, trampoline).
    pub code: usize,
    /// The data block (the words the code reads).
    pub data: usize,
}

impl Block {
    /// The stub: where a redirected entry jumps.
    pub fn stub(&self) -> usize {
        self.code
    }

    /// The slow entry: where the slot points while the site asks the decider.
    pub fn slow_entry(&self) -> usize {
        self.code + SLOW_ENTRY_OFFSET
    }

    /// Where the trampoline goes.
    pub fn trampoline(&self) -> usize {
        self.code + TRAMPOLINE_OFFSET
    }

    fn word(&self, offset: usize) -> &'static AtomicUsize {
        // SAFETY: rule 1: data blocks are never unmapped, the offset is 8-aligned inside the
        // block, and every access to these words goes through atomics.
        unsafe { &*((self.data + offset) as *const AtomicUsize) }
    }

    /// Fills the data block of a fresh site.
    pub fn init_data(&self, cookie: u64, original_entry: usize) {
        self.word(DECIDE_OFFSET)
            .store(decide_target as *const () as usize, Ordering::Relaxed);
        self.word(COMMON_OFFSET)
            .store(slow_path_common as *const () as usize, Ordering::Relaxed);
        self.word(ORIGINAL_OFFSET)
            .store(original_entry, Ordering::Relaxed);
        self.set_cookie(cookie);
        self.set_slot(original_entry);
    }

    /// Where the stub sends callers from now on. The Release store pairs with the plain load of
    /// the stub's `jmp [slot]` (x86 loads see stores in order): what was written before this
    /// call is visible to a thread that jumps to the new target.
    pub fn set_slot(&self, target: usize) {
        self.word(SLOT_OFFSET).store(target, Ordering::Release);
    }

    /// Sets what the slow path passes to the decider.
    pub fn set_cookie(&self, cookie: u64) {
        self.word(COOKIE_OFFSET)
            .store(cookie as usize, Ordering::Release);
    }
}

/// The stub and the slow entry of `block`, to put at the start of its code block.
pub fn encode_stub(block: Block) -> Result<Vec<u8>, Unpatchable> {
    let rip = |target: usize| MemoryOperand::with_base_displ(Register::RIP, target as i64);
    let unmovable = |e: iced_x86::IcedError| Unpatchable::Unmovable(e.to_string());
    let stub =
        [Instruction::with1(Code::Jmp_rm64, rip(block.data + SLOT_OFFSET)).map_err(unmovable)?];
    let slow_entry = [
        Instruction::with2(Code::Lea_r64_m, Register::R11, rip(block.data)).map_err(unmovable)?,
        Instruction::with1(Code::Jmp_rm64, rip(block.data + COMMON_OFFSET)).map_err(unmovable)?,
    ];
    // int3 fills the gaps: nothing jumps there.
    let mut code = vec![0xcc; TRAMPOLINE_OFFSET];
    let stub = encode(&stub, block.code)?;
    let slow_entry = encode(&slow_entry, block.slow_entry())?;
    if stub.len() > SLOW_ENTRY_OFFSET || SLOW_ENTRY_OFFSET + slow_entry.len() > TRAMPOLINE_OFFSET {
        return Err(Unpatchable::Unmovable(
            "the stub does not fit its block".into(),
        ));
    }
    code[..stub.len()].copy_from_slice(&stub);
    code[SLOW_ENTRY_OFFSET..SLOW_ENTRY_OFFSET + slow_entry.len()].copy_from_slice(&slow_entry);
    Ok(code)
}

extern "C" fn decide_target(cookie: u64, original: usize, entry_sp: usize) -> usize {
    let decider = DECIDER.load(Ordering::Acquire);
    if decider == 0 {
        return original;
    }
    // SAFETY: rule 2: DECIDER only ever holds a `Decider` stored by `set_decider`.
    let decider: Decider = unsafe { std::mem::transmute::<usize, Decider>(decider) };
    match decider(cookie, entry_sp) {
        0 => original,
        target => target,
    }
}

/// The slow path shared by every stub: entered by a jump with r11 = the site's data block and
/// the stack exactly as at the function's entry. Saves every register an argument may be in,
/// asks `decide_target`, restores them and jumps to the answer (rule 3).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_and_slow_entry_reach_their_data_words() {
        let block = Block {
            code: 0x10_0000,
            data: 0x18_0000,
        };
        let code = encode_stub(block).unwrap();
        // jmp [rip + disp32] with rip at the end of the 6-byte instruction.
        assert_eq!(&code[..2], &[0xff, 0x25]);
        let disp = i32::from_le_bytes(code[2..6].try_into().unwrap());
        assert_eq!(
            block.code as i64 + 6 + i64::from(disp),
            (block.data + SLOT_OFFSET) as i64
        );
        // lea r11, [rip + disp32]
        assert_eq!(&code[8..11], &[0x4c, 0x8d, 0x1d]);
        let disp = i32::from_le_bytes(code[11..15].try_into().unwrap());
        assert_eq!(
            block.slow_entry() as i64 + 7 + i64::from(disp),
            block.data as i64
        );
        assert!(code[21..].iter().all(|&b| b == 0xcc));
    }
}
