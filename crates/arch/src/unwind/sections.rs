//! The unwind sections of the loaded objects, copied out of their memory during a link-map
//! scan, and the framehop module made of each.

use std::sync::Arc;

use framehop::{ExplicitModuleSectionInfo, Module};
use gimli::{BaseAddresses, EhFrameHdr, LittleEndian};

use super::SectionData;
use super::rules::{Row, classify};
use crate::objects::ObjectView;

/// An object's unwind sections as copied from memory (file addresses, before the bias).
pub(super) struct Sections {
    pub(super) name: String,
    pub(super) bias: u64,
    pub(super) eh_frame_hdr_address: u64,
    pub(super) eh_frame_hdr: SectionData,
    pub(super) eh_frame_address: u64,
    pub(super) eh_frame: SectionData,
    /// Executable segments.
    pub(super) code: Vec<(u64, u64)>,
}

impl Sections {
    /// The base addresses framehop decodes this object's pointers with (its
    /// `base_addresses_for_sections` for an object given only these two sections).
    pub(super) fn bases(&self) -> BaseAddresses {
        BaseAddresses::default()
            .set_eh_frame(self.eh_frame_address)
            .set_eh_frame_hdr(self.eh_frame_hdr_address)
            .set_text(0)
            .set_got(0)
    }

    /// Run-time addresses spanned by the object's code.
    pub(super) fn code_span(&self) -> (u64, u64) {
        let start = self.code.iter().map(|c| c.0).min().unwrap_or(0);
        let end = self.code.iter().map(|c| c.1).max().unwrap_or(0);
        (start + self.bias, end + self.bias)
    }
}

/// One object, ready for walks: its framehop module and its classified rows.
pub(super) struct ObjectUnwind {
    pub(super) sections: Sections,
    pub(super) module: Module<SectionData>,
    /// Run-time addresses, sorted and disjoint.
    pub(super) rows: Vec<Row>,
}

impl std::fmt::Debug for ObjectUnwind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectUnwind")
            .field("name", &self.sections.name)
            .field("bias", &self.sections.bias)
            .field("rows", &self.rows.len())
            .finish()
    }
}

impl ObjectUnwind {
    pub(super) fn new(sections: Sections) -> Self {
        let rows = classify(&sections);
        let (start, end) = sections.code_span();
        let module = Module::new(
            sections.name.clone(),
            start..end,
            sections.bias,
            ExplicitModuleSectionInfo {
                base_svma: 0,
                eh_frame_svma: Some(
                    sections.eh_frame_address
                        ..sections.eh_frame_address + sections.eh_frame.len() as u64,
                ),
                eh_frame: Some(sections.eh_frame.clone()),
                eh_frame_hdr_svma: Some(
                    sections.eh_frame_hdr_address
                        ..sections.eh_frame_hdr_address + sections.eh_frame_hdr.len() as u64,
                ),
                eh_frame_hdr: Some(sections.eh_frame_hdr.clone()),
                ..Default::default()
            },
        );
        ObjectUnwind {
            sections,
            module,
            rows,
        }
    }
}

/// What one object of the link map gave.
pub(super) enum Found {
    /// The same unwind sections as an object already classified.
    Known(Arc<ObjectUnwind>),
    /// New sections to classify.
    Fresh(Sections),
}

/// The length of the `.eh_frame` records at the start of `memory`: up to and including the
/// zero terminator, or the last whole record.
pub(super) fn eh_frame_length(memory: &[u8]) -> usize {
    let word = |at: usize, len: usize| -> Option<u64> {
        let bytes = memory.get(at..at + len)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0u64, |acc, &b| acc << 8 | u64::from(b)),
        )
    };
    let mut at = 0usize;
    while let Some(length) = word(at, 4) {
        if length == 0 {
            return at + 4;
        }
        let next = if length == 0xffff_ffff {
            let Some(length) = word(at + 4, 8) else { break };
            usize::try_from(length)
                .ok()
                .and_then(|l| (at + 12).checked_add(l))
        } else {
            (at + 4).checked_add(length as usize)
        };
        match next {
            Some(next) if next <= memory.len() => at = next,
            _ => break,
        }
    }
    at
}

/// What the object shows of its unwind sections, compared with the objects already classified.
pub(super) fn find(view: &ObjectView<'_>, known: &[Arc<ObjectUnwind>]) -> Option<Found> {
    let code = view.code_segments();
    let hdr = view
        .headers()
        .iter()
        .find(|h| h.p_type == libc::PT_GNU_EH_FRAME)?;
    if code.is_empty() {
        return None;
    }
    let hdr_memory = view.loaded_bytes(hdr.p_vaddr, hdr.p_memsz)?;
    let bases = BaseAddresses::default().set_eh_frame_hdr(hdr.p_vaddr);
    let eh_frame_address = EhFrameHdr::new(hdr_memory, LittleEndian)
        .parse(&bases, 8)
        .and_then(|parsed| parsed.eh_frame_ptr().direct())
        .ok()?;
    let rest = view.segment_from(eh_frame_address)?;
    let eh_frame_memory = &rest[..eh_frame_length(rest)];
    let bias = view.bias();
    let same = known.iter().find(|o| {
        let s = &o.sections;
        s.bias == bias
            && s.eh_frame_hdr_address == hdr.p_vaddr
            && s.eh_frame_address == eh_frame_address
            && s.code == code
            && *s.eh_frame_hdr == *hdr_memory
            && *s.eh_frame == *eh_frame_memory
    });
    Some(match same {
        Some(object) => Found::Known(object.clone()),
        None => Found::Fresh(Sections {
            name: view.link_name(),
            bias,
            eh_frame_hdr_address: hdr.p_vaddr,
            eh_frame_hdr: hdr_memory.into(),
            eh_frame_address,
            eh_frame: eh_frame_memory.into(),
            code,
        }),
    })
}
