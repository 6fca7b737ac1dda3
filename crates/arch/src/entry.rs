//! How a function's entry is redirected, decided before anything is written: through a
//! patchable-entry pad, or by relocating its first instructions into a trampoline and writing a
//! 5-byte jump. Every reason to refuse a function is found here, from its bytes and the address
//! of the stub block it would get: [`analyze`] reads the entry, [`plan`] relocates and encodes.

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, Encoder, FlowControl,
    Instruction, InstructionBlock,
};

use crate::code_write::CodeWrite;

/// Bytes of the pad before a patchable entry (`-fpatchable-function-entry=16,14`).
pub const PAD_LEN: usize = 14;
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// Length of `jmp rel32`.
pub const JMP_REL32_LEN: usize = 5;

/// Why a function cannot be redirected: the part of the message after the function's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unpatchable {
    /// The agent redirects it to its own wrapper.
    #[error(
        "the agent itself redirects it (in a process it was attached to, the C library's \
         dlopen, dlclose, dlerror and pthread_create lead to the agent's wrappers)"
    )]
    HeldByAgent,
    /// The symbol has no size.
    #[error(
        "its size is unknown (the symbol table gives 0), so the bytes to relocate cannot be checked"
    )]
    UnknownSize,
    /// Shorter than the jump.
    #[error("it is {size} bytes long, too short for a {JMP_REL32_LEN}-byte jump")]
    TooShort {
        /// The function's size.
        size: usize,
    },
    /// It returns (or traps) within the bytes the jump would take.
    #[error("it ends after {len} bytes, too short for a {JMP_REL32_LEN}-byte jump")]
    EndsEarly {
        /// Bytes up to and including the last instruction.
        len: usize,
    },
    /// Its whole instructions do not cover the jump.
    #[error("only {len} bytes of whole instructions, too short for a {JMP_REL32_LEN}-byte jump")]
    NotEnoughInstructions {
        /// Bytes of whole instructions.
        len: usize,
    },
    /// A call among the bytes the jump would replace (its return address would point into the
    /// trampoline).
    #[error(
        "it calls at offset {offset:#x}, inside the {JMP_REL32_LEN} bytes a jump would replace"
    )]
    CallsInEntry {
        /// Offset of the call.
        offset: usize,
    },
    /// A transactional instruction among them.
    #[error("the transactional instruction at offset {offset:#x} cannot be moved")]
    Transactional {
        /// Offset of the instruction.
        offset: usize,
    },
    /// Bytes that are not an instruction.
    #[error("the instruction at offset {offset:#x} cannot be decoded")]
    Undecodable {
        /// Offset of the bytes.
        offset: usize,
    },
    /// A branch of the function lands inside the bytes the jump would replace.
    #[error(
        "the branch at offset {from:#x} lands at offset {to:#x}, inside the {len} bytes a jump would replace"
    )]
    BranchIntoEntry {
        /// Offset of the branch.
        from: usize,
        /// Offset of its target.
        to: usize,
        /// Bytes the jump replaces.
        len: usize,
    },
    /// Its code is not mapped readable and executable.
    #[error("{start:#x}..{end:#x} is not mapped as readable code")]
    NotMapped {
        /// First byte.
        start: usize,
        /// One past the last.
        end: usize,
    },
    /// The relocated instructions do not fit the trampoline.
    #[error("its first instructions need {need} bytes once moved, more than the {room} available")]
    RelocationTooLarge {
        /// Bytes the relocated instructions take.
        need: usize,
        /// Bytes of the trampoline.
        room: usize,
    },
    /// The relocation failed (a RIP-relative operand out of reach of the trampoline, ...).
    #[error("its first instructions cannot be moved: {0}")]
    Unmovable(String),
    /// The stub is too far for the entry's jump.
    #[error("its stub at {stub:#x} is out of reach of a 32-bit jump")]
    OutOfReach {
        /// Where the stub is.
        stub: usize,
    },
    /// Redirected already.
    #[error("it is already redirected")]
    AlreadyRedirected,
    /// Listed twice in one batch.
    #[error("it appears twice in one batch")]
    TwiceInBatch,
    /// Its bytes changed between the plan and the commit.
    #[error("its code changed since it was planned")]
    Changed,
}

/// The way a function is redirected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// Built with a patchable entry: the pad holds the jump to the stub; a 2-byte entry nop
    /// becomes a short jump into the pad.
    Patchable {
        /// Offset of the 2-byte entry nop from the symbol (4 after an `endbr64`, else 0).
        nop_offset: usize,
        /// GCC's two one-byte nops, to be merged into one 2-byte nop first.
        two_nops: bool,
    },
    /// Any other function: `relocated_len` bytes of whole instructions move to a trampoline.
    Plain {
        /// Bytes of the first instructions, at least 5.
        relocated_len: usize,
        /// Those instructions, decoded at the function's address.
        instructions: Vec<Instruction>,
    },
}

impl EntryKind {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            EntryKind::Patchable { .. } => "patchable entry",
            EntryKind::Plain { .. } => "plain entry",
        }
    }
}

/// Decides how to redirect the function at `address` of `size` bytes. `pad` holds the
/// `PAD_LEN` bytes before the function when they are mapped code; `code` the function's bytes.
pub fn analyze(
    address: usize,
    size: usize,
    pad: Option<&[u8]>,
    code: &[u8],
) -> Result<EntryKind, Unpatchable> {
    let nop_offset = if code.starts_with(&ENDBR64) { 4 } else { 0 };
    if let Some(pad) = pad
        && pad.len() == PAD_LEN
        && pad.iter().all(|&b| b == 0x90)
        && let Some(entry) = code.get(nop_offset..nop_offset + 2)
        && (entry == [0x90, 0x90] || entry == [0x66, 0x90])
    {
        return Ok(EntryKind::Patchable {
            nop_offset,
            two_nops: entry == [0x90, 0x90],
        });
    }
    if size == 0 {
        return Err(Unpatchable::UnknownSize);
    }
    if size < JMP_REL32_LEN {
        return Err(Unpatchable::TooShort { size });
    }
    let body = &code[..size.min(code.len())];
    let mut decoder = Decoder::with_ip(64, body, address as u64, DecoderOptions::NONE);
    let mut relocated = Vec::new();
    let mut relocated_len = 0usize;
    let mut all = Vec::new();
    while decoder.can_decode() {
        let instruction = decoder.decode();
        let offset = instruction.ip() as usize - address;
        if instruction.is_invalid() {
            return Err(Unpatchable::Undecodable { offset });
        }
        if relocated_len < JMP_REL32_LEN {
            match instruction.flow_control() {
                FlowControl::Call | FlowControl::IndirectCall => {
                    return Err(Unpatchable::CallsInEntry { offset });
                }
                FlowControl::Return | FlowControl::Interrupt | FlowControl::Exception
                    if relocated_len + instruction.len() < JMP_REL32_LEN =>
                {
                    return Err(Unpatchable::EndsEarly {
                        len: relocated_len + instruction.len(),
                    });
                }
                FlowControl::XbeginXabortXend => {
                    return Err(Unpatchable::Transactional { offset });
                }
                _ => {}
            }
            relocated_len += instruction.len();
            relocated.push(instruction);
        }
        all.push(instruction);
    }
    if relocated_len < JMP_REL32_LEN {
        return Err(Unpatchable::NotEnoughInstructions { len: relocated_len });
    }
    let overwritten = (address + 1) as u64..(address + relocated_len) as u64;
    for instruction in &all {
        let branches = matches!(
            instruction.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
        );
        if branches && overwritten.contains(&instruction.near_branch_target()) {
            return Err(Unpatchable::BranchIntoEntry {
                from: instruction.ip() as usize - address,
                to: instruction.near_branch_target() as usize - address,
                len: relocated_len,
            });
        }
    }
    Ok(EntryKind::Plain {
        relocated_len,
        instructions: relocated,
    })
}

/// Everything a redirection writes, encoded for the addresses it will have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryPlan {
    /// Writes that send the function's callers to the stub.
    pub redirect: Vec<CodeWrite>,
    /// Writes that undo them.
    pub restore: Vec<CodeWrite>,
    /// PC ranges (exclusive at both ends) no thread may be in while the writes happen.
    pub forbidden: Vec<(usize, usize)>,
    /// Where the original code runs from: the trampoline, or the instruction after the
    /// patchable nop.
    pub original_entry: usize,
    /// The trampoline's bytes (empty for a patchable entry), to put at the trampoline address.
    pub trampoline: Vec<u8>,
}

/// Relocates `instructions` to `at`, fixing up every branch and RIP-relative operand (a short
/// branch that no longer reaches becomes a longer form).
fn relocate(instructions: &[Instruction], at: usize) -> Result<Vec<u8>, Unpatchable> {
    BlockEncoder::encode(
        64,
        InstructionBlock::new(instructions, at as u64),
        BlockEncoderOptions::NONE,
    )
    .map(|encoded| encoded.code_buffer)
    .map_err(|e| Unpatchable::Unmovable(e.to_string()))
}

/// Encodes `instructions` one after the other from `at`, each exactly as given: a branch out of
/// its form's reach is an error, never a longer form.
pub(crate) fn encode(instructions: &[Instruction], at: usize) -> Result<Vec<u8>, Unpatchable> {
    let mut encoder = Encoder::new(64);
    let mut ip = at as u64;
    for instruction in instructions {
        ip += encoder
            .encode(instruction, ip)
            .map_err(|e| Unpatchable::Unmovable(e.to_string()))? as u64;
    }
    Ok(encoder.take_buffer())
}

/// Encodes the redirection of the function at `function`, analyzed as `kind`, to the stub at
/// `stub`, with its trampoline (for a plain entry) at `trampoline` holding up to
/// `trampoline_room` bytes. `original` is the function's current first bytes (at least the
/// relocated ones), which the restore puts back.
pub fn plan(
    kind: &EntryKind,
    function: usize,
    original: &[u8],
    stub: usize,
    trampoline: usize,
    trampoline_room: usize,
) -> Result<EntryPlan, Unpatchable> {
    match kind {
        EntryKind::Patchable { nop_offset, .. } => {
            let pad = function - PAD_LEN;
            let nop = function + nop_offset;
            // jmp [rip + 0]; the stub's address right after it: fills the pad exactly.
            let jump_to_stub = encode(
                &[
                    Instruction::with1(
                        Code::Jmp_rm64,
                        iced_x86::MemoryOperand::with_base_displ(
                            iced_x86::Register::RIP,
                            (pad + 6) as i64,
                        ),
                    )
                    .map_err(|e| Unpatchable::Unmovable(e.to_string()))?,
                    Instruction::with_declare_qword_1(stub as u64),
                ],
                pad,
            )?;
            debug_assert_eq!(jump_to_stub.len(), PAD_LEN);
            let jump_to_pad = encode(
                &[Instruction::with_branch(Code::Jmp_rel8_64, pad as u64)
                    .map_err(|e| Unpatchable::Unmovable(e.to_string()))?],
                nop,
            )?;
            if jump_to_pad.len() != 2 {
                return Err(Unpatchable::Unmovable(format!(
                    "the jump back into the pad takes {} bytes, not 2",
                    jump_to_pad.len()
                )));
            }
            let two_byte_nop = encode(&[Instruction::with(Code::Nopw)], nop)?;
            Ok(EntryPlan {
                redirect: vec![
                    CodeWrite {
                        address: pad,
                        bytes: jump_to_stub,
                    },
                    CodeWrite {
                        address: nop,
                        bytes: jump_to_pad,
                    },
                ],
                restore: vec![CodeWrite {
                    address: nop,
                    bytes: two_byte_nop,
                }],
                forbidden: vec![(pad, function), (nop, nop + 2)],
                original_entry: nop + 2,
                trampoline: Vec::new(),
            })
        }
        EntryKind::Plain {
            relocated_len,
            instructions,
        } => {
            let mut moved = instructions.clone();
            moved.push(
                Instruction::with_branch(Code::Jmp_rel32_64, (function + relocated_len) as u64)
                    .map_err(|e| Unpatchable::Unmovable(e.to_string()))?,
            );
            let bytes = relocate(&moved, trampoline)?;
            if bytes.len() > trampoline_room {
                return Err(Unpatchable::RelocationTooLarge {
                    need: bytes.len(),
                    room: trampoline_room,
                });
            }
            let jump = encode(
                &[Instruction::with_branch(Code::Jmp_rel32_64, stub as u64)
                    .map_err(|e| Unpatchable::Unmovable(e.to_string()))?],
                function,
            )
            .map_err(|_| Unpatchable::OutOfReach { stub })?;
            if jump.len() != JMP_REL32_LEN {
                return Err(Unpatchable::OutOfReach { stub });
            }
            Ok(EntryPlan {
                redirect: vec![CodeWrite {
                    address: function,
                    bytes: jump,
                }],
                restore: vec![CodeWrite {
                    address: function,
                    bytes: original[..JMP_REL32_LEN].to_vec(),
                }],
                forbidden: vec![(function, function + relocated_len)],
                original_entry: trampoline,
                trampoline: bytes,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: [u8; PAD_LEN] = [0x90; PAD_LEN];

    fn plain(code: &[u8]) -> Result<EntryKind, Unpatchable> {
        analyze(0x1000, code.len(), None, code)
    }

    #[test]
    fn gcc_and_llvm_patchable_entries_are_recognised() {
        let gcc = [0x90, 0x90, 0x8d, 0x04, 0x37, 0xc3];
        assert_eq!(
            analyze(0x1000, gcc.len(), Some(&PAD), &gcc).unwrap(),
            EntryKind::Patchable {
                nop_offset: 0,
                two_nops: true
            }
        );
        let endbr = [0xf3, 0x0f, 0x1e, 0xfa, 0x66, 0x90, 0xc3];
        assert_eq!(
            analyze(0x1000, endbr.len(), Some(&PAD), &endbr).unwrap(),
            EntryKind::Patchable {
                nop_offset: 4,
                two_nops: false
            }
        );
    }

    #[test]
    fn a_plain_prologue_relocates_whole_instructions() {
        // push rbp; mov rbp,rsp; mov eax,edi; pop rbp; ret
        let code = [0x55, 0x48, 0x89, 0xe5, 0x89, 0xf8, 0x5d, 0xc3];
        match plain(&code).unwrap() {
            EntryKind::Plain {
                relocated_len,
                instructions,
            } => {
                assert_eq!(relocated_len, 6);
                assert_eq!(instructions.len(), 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let short = plain(&[0x8d, 0x04, 0x37, 0xc3]).unwrap_err().to_string();
        assert!(short.contains("too short"), "{short}");
        let ends = plain(&[0x31, 0xc0, 0xc3, 0xcc, 0xcc, 0xcc])
            .unwrap_err()
            .to_string();
        assert!(ends.contains("ends after 3 bytes"), "{ends}");
        // call rel32 at the entry
        let call = plain(&[0xe8, 0, 0, 0, 0, 0xc3]).unwrap_err().to_string();
        assert!(call.contains("calls at offset 0x0"), "{call}");
        // xor eax,eax; inc eax; jmp back to offset 2 (inside the first 5 bytes); ret
        let loops = plain(&[0x31, 0xc0, 0xff, 0xc0, 0x90, 0xeb, 0xfb, 0xc3]);
        let loops = loops.unwrap_err().to_string();
        assert!(loops.contains("lands at offset 0x2"), "{loops}");
        let unknown = analyze(0x1000, 0, None, &[]).unwrap_err().to_string();
        assert!(unknown.contains("size is unknown"), "{unknown}");
        let bad = plain(&[0x06, 0x06, 0x06, 0x06, 0x06, 0xc3])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("cannot"), "{bad}");
    }

    #[test]
    fn a_patchable_entry_plan_fills_the_pad_and_jumps_back_into_it() {
        let function = 0x40_0010;
        let kind = EntryKind::Patchable {
            nop_offset: 0,
            two_nops: true,
        };
        let plan = plan(&kind, function, &[0x90, 0x90], 0x1234_5678, 0, 0).unwrap();
        let pad = function - PAD_LEN;
        assert_eq!(plan.redirect[0].address, pad);
        assert_eq!(&plan.redirect[0].bytes[..6], &[0xff, 0x25, 0, 0, 0, 0]);
        assert_eq!(&plan.redirect[0].bytes[6..], &0x1234_5678u64.to_le_bytes());
        // jmp -16: from the end of the 2-byte jump back to the pad's start.
        assert_eq!(plan.redirect[1].bytes, [0xeb, (-16i8) as u8]);
        assert_eq!(plan.restore[0].bytes, [0x66, 0x90]);
        assert_eq!(plan.original_entry, function + 2);
    }

    #[test]
    fn a_plain_entry_plan_relocates_into_the_trampoline_and_refuses_what_does_not_fit() {
        // push rbp; mov rbp,rsp; mov eax,edi; pop rbp; ret
        let code = [0x55, 0x48, 0x89, 0xe5, 0x89, 0xf8, 0x5d, 0xc3];
        let function = 0x40_0000;
        let kind = analyze(function, code.len(), None, &code).unwrap();
        let stub = 0x40_1000;
        let plan = plan(&kind, function, &code, stub, stub + 32, 96).unwrap();
        assert_eq!(plan.redirect[0].bytes[0], 0xe9);
        assert_eq!(plan.restore[0].bytes, code[..5]);
        assert_eq!(&plan.trampoline[..6], &code[..6]);
        assert_eq!(plan.trampoline[6], 0xe9, "then a jump back");
        assert_eq!(plan.forbidden, [(function, function + 6)]);
        let too_small = super::plan(&kind, function, &code, stub, stub + 32, 8).unwrap_err();
        assert_eq!(
            too_small,
            Unpatchable::RelocationTooLarge { need: 11, room: 8 }
        );
        let far = super::plan(&kind, function, &code, 0x7000_0000_0000, stub + 32, 96);
        assert!(
            matches!(far, Err(Unpatchable::OutOfReach { .. })),
            "{far:?}"
        );
    }
}
