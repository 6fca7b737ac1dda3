//! Which addresses a walk may go through: the rows of the unwind tables classified by the rule
//! framehop will take there.
//!
//! framehop, asked to unwind an address it has no usable rule for (no module, no FDE, a row it
//! cannot translate, an evaluation error), silently falls back to frame pointers. A frame
//! pointer walk misses the caller of a function interrupted before its prologue or in a
//! frameless leaf, and a missed caller could be a function being patched: a false "clean".
//! So the tables are read here with the same gimli beforehand, and every address range gets the
//! rule framehop will take there ([`RowKind`]); a walk goes on only through addresses whose rule
//! is one of those plain shapes.

use gimli::{
    CfaRule, EhFrame, EhFrameHdr, LittleEndian, Pointer, RegisterRule, UnwindContext,
    UnwindSection, UnwindTableRow, X86_64,
};

use super::ContextStorage;
use super::sections::Sections;

/// What framehop does for the addresses of one unwind row, as far as a walk relies on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RowKind {
    /// The return address is undefined: the outermost frame (`_start`, the start of a thread).
    Outermost,
    /// The caller's frame is at a constant offset from the stack pointer.
    StackPointer(FramePointerEffect),
    /// The frame is based on `rbp` (`CFA = rbp + 16`, the saved `rbp` just below the return
    /// address): needs the real `rbp` value.
    FramePointer,
}

/// What a stack-pointer-based row says about the caller's `rbp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FramePointerEffect {
    /// Unchanged: the caller's `rbp` is the one this frame has.
    Kept,
    /// Saved in this frame, and read back from the stack.
    Restored,
    /// Not recoverable.
    Lost,
}

/// One address range of one object's unwind table with the kind of its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Row {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) kind: RowKind,
}

/// The kind of a row, if it is one whose framehop rule the walk can rely on: framehop's
/// `translate_into_unwind_rule` turns exactly these into its cached rules, without rounding
/// (offsets are multiples of 8) and without the fallbacks it takes for the others.
pub(super) fn row_kind<S: gimli::UnwindContextStorage<usize>>(
    row: &UnwindTableRow<usize, S>,
) -> Option<RowKind> {
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => return Some(RowKind::Outermost),
        Some(RegisterRule::Offset(-8)) => {}
        // No rule at all also ends framehop's walk, but unlike an explicit "undefined" it is
        // not a statement that the frame is the outermost.
        _ => return None,
    }
    let bp = row.register(X86_64::RBP);
    match *row.cfa() {
        CfaRule::RegisterAndOffset { register, offset }
            if register == X86_64::RSP
                && offset > 0
                && offset % 8 == 0
                && u16::try_from(offset / 8).is_ok() =>
        {
            let effect = match bp {
                None | Some(RegisterRule::SameValue) => FramePointerEffect::Kept,
                Some(RegisterRule::Undefined) => FramePointerEffect::Lost,
                Some(RegisterRule::Offset(saved)) => {
                    let from_sp = offset + saved;
                    if from_sp % 8 != 0 || i16::try_from(from_sp / 8).is_err() {
                        return None;
                    }
                    FramePointerEffect::Restored
                }
                Some(_) => return None,
            };
            Some(RowKind::StackPointer(effect))
        }
        CfaRule::RegisterAndOffset {
            register,
            offset: 16,
        } if register == X86_64::RBP && bp == Some(RegisterRule::Offset(-16)) => {
            Some(RowKind::FramePointer)
        }
        _ => None,
    }
}

/// The rows of one object that a walk may go through, at run-time addresses. framehop finds
/// an address's FDE through the `.eh_frame_hdr` table (the last entry at or below it), so an
/// entry's rows count only below the next entry's start.
pub(super) fn classify(sections: &Sections) -> Vec<Row> {
    let bases = sections.bases();
    let Ok(header) = EhFrameHdr::new(&sections.eh_frame_hdr, LittleEndian).parse(&bases, 8) else {
        return Vec::new();
    };
    let Some(table) = header.table() else {
        return Vec::new();
    };
    let mut entries: Vec<(u64, Pointer)> = Vec::new();
    let mut iter = table.iter(&bases);
    loop {
        match iter.next() {
            Ok(Some((Pointer::Direct(initial), fde @ Pointer::Direct(_)))) => {
                entries.push((initial, fde));
            }
            Ok(None) => break,
            // Indirect pointers or a damaged table: framehop's lookups would fail here.
            _ => return Vec::new(),
        }
    }
    // framehop binary-searches the table: an unsorted one sends lookups astray.
    if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
        return Vec::new();
    }
    let mut eh_frame = EhFrame::new(&sections.eh_frame, LittleEndian);
    eh_frame.set_address_size(8);
    let mut context = Box::new(UnwindContext::<usize, ContextStorage>::new_in());
    let mut rows: Vec<Row> = Vec::new();
    for (i, &(initial, fde_pointer)) in entries.iter().enumerate() {
        let limit = entries.get(i + 1).map_or(u64::MAX, |next| next.0);
        let Ok(offset) = table.pointer_to_offset(fde_pointer) else {
            continue;
        };
        let Ok(fde) = eh_frame.fde_from_offset(&bases, offset, EhFrame::cie_from_offset) else {
            continue;
        };
        let in_code = sections.code.iter().any(|&(start, end)| {
            start <= fde.initial_address()
                && fde.initial_address() < fde.end_address()
                && fde.end_address() <= end
        });
        // framehop reads the return address from its fixed column and ignores signal frames'
        // special meaning.
        if !in_code
            || fde.cie().return_address_register() != X86_64::RA
            || fde.is_signal_trampoline()
        {
            continue;
        }
        let Ok(mut fde_rows) = fde.rows(&eh_frame, &bases, &mut context) else {
            continue;
        };
        // Rows before an evaluation error are exactly what framehop computes for their
        // addresses (it evaluates up to the address looked up); none after it are.
        while let Ok(Some(row)) = fde_rows.next_row() {
            let start = row.start_address().max(initial);
            let end = row.end_address().min(limit);
            let Some(kind) = row_kind(row) else { continue };
            if start >= end || end - 1 > u64::from(u32::MAX) {
                // framehop looks addresses up 32-bit relative to the object's bias.
                continue;
            }
            let (start, end) = (start + sections.bias, end + sections.bias);
            match rows.last_mut() {
                Some(last) if last.end == start && last.kind == kind => last.end = end,
                _ => rows.push(Row { start, end, kind }),
            }
        }
    }
    rows
}
