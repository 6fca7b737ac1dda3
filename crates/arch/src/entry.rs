//! How a function's entry can be redirected: through a patchable-entry pad, or by relocating its
//! first instructions into a trampoline and writing a 5-byte jump.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction};

use crate::RedirectError;

/// Bytes of the pad before a patchable entry (`-fpatchable-function-entry=16,14`).
pub const PAD_LEN: usize = 14;
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// Length of `jmp rel32`.
pub const JMP_REL32_LEN: usize = 5;

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

/// Decides how to redirect the function at `address` of `size` bytes. `code` holds the `PAD_LEN`
/// bytes before the function (or fewer when they are not mapped) followed by the function's bytes.
pub fn analyze(
    name: &str,
    address: usize,
    size: usize,
    pad: Option<&[u8]>,
    code: &[u8],
) -> Result<EntryKind, RedirectError> {
    let refuse = |reason: String| RedirectError::Unpatchable {
        function: name.to_owned(),
        reason,
    };
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
        return Err(refuse(
            "its size is unknown (the symbol table gives 0), so the bytes to relocate cannot be checked".into(),
        ));
    }
    if size < JMP_REL32_LEN {
        return Err(refuse(format!(
            "it is {size} bytes long, too short for a {JMP_REL32_LEN}-byte jump"
        )));
    }
    let body = &code[..size.min(code.len())];
    let mut decoder = Decoder::with_ip(64, body, address as u64, DecoderOptions::NONE);
    let mut relocated = Vec::new();
    let mut relocated_len = 0usize;
    let mut all = Vec::new();
    while decoder.can_decode() {
        let instruction = decoder.decode();
        if instruction.is_invalid() {
            let offset = instruction.ip() as usize - address;
            return Err(refuse(format!(
                "the instruction at offset {offset:#x} cannot be decoded"
            )));
        }
        if relocated_len < JMP_REL32_LEN {
            let offset = instruction.ip() as usize - address;
            match instruction.flow_control() {
                FlowControl::Call | FlowControl::IndirectCall => {
                    return Err(refuse(format!(
                        "it calls at offset {offset:#x}, inside the {JMP_REL32_LEN} bytes a jump would replace"
                    )));
                }
                FlowControl::Return | FlowControl::Interrupt | FlowControl::Exception
                    if relocated_len + instruction.len() < JMP_REL32_LEN =>
                {
                    return Err(refuse(format!(
                        "it ends after {} bytes, too short for a {JMP_REL32_LEN}-byte jump",
                        relocated_len + instruction.len()
                    )));
                }
                FlowControl::XbeginXabortXend => {
                    return Err(refuse(format!(
                        "the transactional instruction at offset {offset:#x} cannot be moved"
                    )));
                }
                _ => {}
            }
            relocated_len += instruction.len();
            relocated.push(instruction);
        }
        all.push(instruction);
    }
    if relocated_len < JMP_REL32_LEN {
        return Err(refuse(format!(
            "only {relocated_len} bytes of whole instructions, too short for a {JMP_REL32_LEN}-byte jump"
        )));
    }
    let overwritten = (address + 1) as u64..(address + relocated_len) as u64;
    for instruction in &all {
        let branches = matches!(
            instruction.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
        );
        if branches && overwritten.contains(&instruction.near_branch_target()) {
            return Err(refuse(format!(
                "the branch at offset {:#x} lands at offset {:#x}, inside the {relocated_len} bytes a jump would replace",
                instruction.ip() as usize - address,
                instruction.near_branch_target() as usize - address
            )));
        }
    }
    Ok(EntryKind::Plain {
        relocated_len,
        instructions: relocated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: [u8; PAD_LEN] = [0x90; PAD_LEN];

    fn plain(code: &[u8]) -> Result<EntryKind, RedirectError> {
        analyze("f", 0x1000, code.len(), None, code)
    }

    #[test]
    fn gcc_and_llvm_patchable_entries_are_recognised() {
        let gcc = [0x90, 0x90, 0x8d, 0x04, 0x37, 0xc3];
        assert_eq!(
            analyze("f", 0x1000, gcc.len(), Some(&PAD), &gcc).unwrap(),
            EntryKind::Patchable {
                nop_offset: 0,
                two_nops: true
            }
        );
        let endbr = [0xf3, 0x0f, 0x1e, 0xfa, 0x66, 0x90, 0xc3];
        assert_eq!(
            analyze("f", 0x1000, endbr.len(), Some(&PAD), &endbr).unwrap(),
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
    fn refusals_name_the_function_and_the_problem() {
        let short = plain(&[0x8d, 0x04, 0x37, 0xc3]).unwrap_err().to_string();
        assert!(
            short.contains("'f'") && short.contains("too short"),
            "{short}"
        );
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
        let unknown = analyze("f", 0x1000, 0, None, &[]).unwrap_err().to_string();
        assert!(unknown.contains("size is unknown"), "{unknown}");
        let bad = plain(&[0x06, 0x06, 0x06, 0x06, 0x06, 0xc3])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("cannot"), "{bad}");
    }
}
