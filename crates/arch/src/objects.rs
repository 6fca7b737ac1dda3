//! The objects mapped into this process: the main executable and every shared library of the
//! dynamic linker's list, with their load bias, file, build id and unwind sections.
//!
//! One scanner, [`scan`], walks the link map with `dl_iterate_phdr` and shows each object as an
//! [`ObjectView`] whose memory may be read while the scan holds the dynamic linker's lock (no
//! object can be unmapped meanwhile); [`loaded_objects`] and the unwinder are built on it.
//!
//! Safety model of this module:
//! 1. An [`ObjectView`] exists only inside the `dl_iterate_phdr` callback that made it, so its
//!    record and program headers are valid while it lives.
//! 2. Object memory is read only through [`ObjectView::loaded_bytes`], which hands out a range
//!    only when it lies inside the file-backed part of one readable `PT_LOAD` segment.

use std::ffi::CStr;
use std::path::PathBuf;

/// One object of the link map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedObject {
    /// The name the dynamic linker knows the object by (`l_name`); empty for the main program.
    pub link_name: String,
    /// The file to read symbols from; `None` for objects without a file (the vDSO).
    pub path: Option<PathBuf>,
    /// Difference between run-time addresses and the addresses in the file.
    pub bias: usize,
    /// True for the main executable.
    pub is_main: bool,
    /// The GNU build id note, when the object has one.
    pub build_id: Option<Vec<u8>>,
    /// Executable segments, as run-time `[start, end)` ranges.
    pub code_ranges: Vec<(usize, usize)>,
}

impl LoadedObject {
    /// The base name of the object's file (`libfoo.so.1`), or of the executable.
    pub fn file_name(&self) -> Option<String> {
        let path = self.path.as_ref()?;
        Some(path.file_name()?.to_string_lossy().into_owned())
    }

    /// The build id in lower-case hex, as `readelf -n` prints it.
    pub fn build_id_hex(&self) -> Option<String> {
        self.build_id.as_ref().map(|id| hex(id))
    }

    /// Whether `address` lies in one of the object's executable segments.
    pub fn contains_code(&self, address: usize) -> bool {
        self.code_ranges
            .iter()
            .any(|&(start, end)| (start..end).contains(&address))
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One object of the link map during a [`scan`] (rule 1).
pub struct ObjectView<'a> {
    info: &'a libc::dl_phdr_info,
    headers: &'a [libc::Elf64_Phdr],
    is_main: bool,
}

impl std::fmt::Debug for ObjectView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectView")
            .field("name", &self.link_name())
            .field("bias", &self.bias())
            .finish()
    }
}

impl ObjectView<'_> {
    /// The name the dynamic linker knows the object by; empty for the main program.
    pub fn link_name(&self) -> String {
        if self.info.dlpi_name.is_null() {
            return String::new();
        }
        // SAFETY: a non-null dlpi_name is a NUL-terminated string owned by the linker (rule 1).
        unsafe { CStr::from_ptr(self.info.dlpi_name) }
            .to_string_lossy()
            .into_owned()
    }

    /// The load bias.
    pub fn bias(&self) -> u64 {
        self.info.dlpi_addr
    }

    /// Whether this is the main executable (the link map's first object).
    pub fn is_main(&self) -> bool {
        self.is_main
    }

    /// The program headers.
    pub fn headers(&self) -> &[libc::Elf64_Phdr] {
        self.headers
    }

    /// Executable segments, as file-address `[start, end)` ranges.
    pub fn code_segments(&self) -> Vec<(u64, u64)> {
        self.headers
            .iter()
            .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_X != 0)
            .map(|h| (h.p_vaddr, h.p_vaddr + h.p_memsz))
            .collect()
    }

    /// The bytes at file address `vaddr`, `len` long, when they lie in the file-backed part of
    /// one readable loaded segment (rule 2).
    pub fn loaded_bytes(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let end = vaddr.checked_add(len)?;
        self.headers.iter().find(|h| {
            h.p_type == libc::PT_LOAD
                && h.p_flags & libc::PF_R != 0
                && h.p_vaddr <= vaddr
                && end <= h.p_vaddr + h.p_filesz
        })?;
        let start = self.bias().checked_add(vaddr)?;
        // SAFETY: the range lies inside a readable segment of an object the dynamic linker
        // keeps mapped while the scan runs (rules 1 and 2).
        Some(unsafe { std::slice::from_raw_parts(start as *const u8, usize::try_from(len).ok()?) })
    }

    /// The rest of the readable loaded segment that holds file address `vaddr`.
    pub fn segment_from(&self, vaddr: u64) -> Option<&[u8]> {
        let header = self.headers.iter().find(|h| {
            h.p_type == libc::PT_LOAD
                && h.p_flags & libc::PF_R != 0
                && h.p_vaddr <= vaddr
                && vaddr < h.p_vaddr + h.p_filesz
        })?;
        self.loaded_bytes(vaddr, header.p_vaddr + header.p_filesz - vaddr)
    }

    /// The GNU build id, from the object's note segments.
    pub fn build_id(&self) -> Option<Vec<u8>> {
        self.headers
            .iter()
            .filter(|h| h.p_type == libc::PT_NOTE)
            .find_map(|h| {
                let notes = self.loaded_bytes(h.p_vaddr, h.p_filesz)?;
                find_build_id(notes, h.p_align as usize)
            })
    }
}

struct ScanState<'f> {
    each: &'f mut dyn FnMut(&ObjectView<'_>),
    first: bool,
}

unsafe extern "C" fn scan_one(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `&mut ScanState` that `scan` passes, and `info` a record the
    // dynamic linker keeps valid for the duration of this call.
    let (state, info) = unsafe { (&mut *data.cast::<ScanState<'_>>(), &*info) };
    let headers = if info.dlpi_phdr.is_null() {
        &[][..]
    } else {
        // SAFETY: the linker guarantees dlpi_phnum program headers at dlpi_phdr.
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
    };
    let view = ObjectView {
        info,
        headers,
        is_main: state.first,
    };
    state.first = false;
    (state.each)(&view);
    0
}

/// Calls `each` with every object of the link map, in link-map order (the main executable
/// first), while the dynamic linker's lock is held.
///
/// Never call it from a signal handler; `each` must not load or unload libraries.
pub fn scan(mut each: impl FnMut(&ObjectView<'_>)) {
    let mut state = ScanState {
        each: &mut each,
        first: true,
    };
    // SAFETY: dl_iterate_phdr calls `scan_one` synchronously with valid records and passes our
    // `&mut ScanState` back unchanged as `data`.
    unsafe {
        libc::dl_iterate_phdr(Some(scan_one), (&raw mut state).cast());
    }
}

/// Every object in the link map, in link-map order (the main executable first).
///
/// Takes the dynamic linker's lock: never call it from a signal handler.
pub fn loaded_objects() -> Vec<LoadedObject> {
    let mut objects = Vec::new();
    scan(|view| {
        let link_name = view.link_name();
        let bias = view.bias() as usize;
        let path = if view.is_main() {
            std::fs::read_link("/proc/self/exe").ok()
        } else if link_name.is_empty() || !link_name.starts_with('/') && !link_name.contains('/') {
            // The vDSO (and any object without a file on disk) has a bare name.
            None
        } else {
            Some(PathBuf::from(&link_name))
        };
        objects.push(LoadedObject {
            code_ranges: view
                .code_segments()
                .into_iter()
                .map(|(start, end)| (bias + start as usize, bias + end as usize))
                .collect(),
            build_id: view.build_id(),
            is_main: view.is_main(),
            link_name,
            path,
            bias,
        });
    });
    objects
}

/// The descriptor of an `NT_GNU_BUILD_ID` note in a note segment.
fn find_build_id(mut notes: &[u8], align: usize) -> Option<Vec<u8>> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let align = align.max(4);
    let round = |n: usize| n.div_ceil(align) * align;
    while notes.len() >= 12 {
        let word = |i: usize| u32::from_ne_bytes(notes[i..i + 4].try_into().expect("4 bytes"));
        let (name_size, desc_size, kind) = (word(0) as usize, word(4) as usize, word(8));
        let desc_start = 12 + round(name_size);
        let next = desc_start + round(desc_size);
        if desc_start + desc_size > notes.len() || 12 + name_size > notes.len() {
            return None;
        }
        if kind == NT_GNU_BUILD_ID && notes[12..12 + name_size] == *b"GNU\0" {
            return Some(notes[desc_start..desc_start + desc_size].to_vec());
        }
        notes = notes.get(next..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_executable_comes_first_with_its_file_and_code() {
        let objects = loaded_objects();
        let main = &objects[0];
        assert!(main.is_main);
        assert_eq!(
            main.path.as_deref(),
            Some(std::fs::read_link("/proc/self/exe").unwrap().as_path())
        );
        let here = the_main_executable_comes_first_with_its_file_and_code as *const () as usize;
        assert!(main.contains_code(here), "{main:?} does not hold {here:#x}");
        assert!(objects[1..].iter().all(|o| !o.is_main));
    }

    #[test]
    fn libc_is_found_with_a_build_id() {
        let objects = loaded_objects();
        let libc = objects
            .iter()
            .find(|o| o.file_name().is_some_and(|n| n.starts_with("libc.so")))
            .expect("libc in the link map");
        assert!(libc.contains_code(libc::getpid as *const () as usize));
        let id = libc.build_id_hex().expect("Debian's libc has a build id");
        assert!(id.len() >= 16 && id.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn loaded_bytes_stay_inside_a_readable_segment() {
        let mut checked = false;
        scan(|view| {
            if !view.is_main() {
                return;
            }
            let (start, end) = view.code_segments()[0];
            assert!(view.loaded_bytes(start, 16).is_some());
            assert!(view.loaded_bytes(u64::MAX - 4, 8).is_none());
            assert!(view.loaded_bytes(end + (1 << 40), 1).is_none());
            checked = true;
        });
        assert!(checked);
    }

    #[test]
    fn build_id_notes_are_parsed_and_other_notes_skipped() {
        let mut notes = Vec::new();
        // An ABI tag note first, then the build id.
        notes.extend_from_slice(&4u32.to_ne_bytes());
        notes.extend_from_slice(&16u32.to_ne_bytes());
        notes.extend_from_slice(&1u32.to_ne_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[0; 16]);
        notes.extend_from_slice(&4u32.to_ne_bytes());
        notes.extend_from_slice(&3u32.to_ne_bytes());
        notes.extend_from_slice(&3u32.to_ne_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[0xab, 0xcd, 0xef, 0, 0, 0, 0, 0]);
        assert_eq!(find_build_id(&notes, 4), Some(vec![0xab, 0xcd, 0xef]));
        assert_eq!(find_build_id(&notes[..40], 4), None);
    }
}
