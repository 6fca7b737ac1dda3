//! The objects mapped into this process: the main executable and every shared library of the
//! dynamic linker's list, with their load bias, file and build id.

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

/// Every object in the link map, in link-map order (the main executable first).
///
/// Takes the dynamic linker's lock: never call it from a signal handler.
pub fn loaded_objects() -> Vec<LoadedObject> {
    let mut objects: Vec<LoadedObject> = Vec::new();
    // SAFETY: dl_iterate_phdr calls `collect` synchronously with valid `dl_phdr_info` pointers
    // and passes our `&mut Vec` back unchanged as `data`.
    unsafe {
        libc::dl_iterate_phdr(Some(collect), (&raw mut objects).cast());
    }
    objects
}

/// The program headers of a `dl_iterate_phdr` record.
///
/// # Safety
/// `info` is a record the dynamic linker passed to a `dl_iterate_phdr` callback that is still
/// running; the headers are valid as long as the record.
pub unsafe fn program_headers(info: &libc::dl_phdr_info) -> &[libc::Elf64_Phdr] {
    if info.dlpi_phdr.is_null() {
        return &[];
    }
    // SAFETY: the linker guarantees dlpi_phnum program headers at dlpi_phdr.
    unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
}

unsafe extern "C" fn collect(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: `data` is the `&mut Vec<LoadedObject>` passed by `loaded_objects`, and `info`
    // points to a record the dynamic linker keeps valid for the duration of this call.
    let (objects, info) = unsafe { (&mut *data.cast::<Vec<LoadedObject>>(), &*info) };
    let link_name = if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null dlpi_name is a NUL-terminated string owned by the linker.
        unsafe { CStr::from_ptr(info.dlpi_name) }
            .to_string_lossy()
            .into_owned()
    };
    let is_main = objects.is_empty();
    let bias = info.dlpi_addr as usize;
    // SAFETY: `info` is the linker's record for this call.
    let headers = unsafe { program_headers(info) };
    let mut build_id = None;
    let mut code_ranges = Vec::new();
    for header in headers {
        let start = bias + header.p_vaddr as usize;
        match header.p_type {
            libc::PT_LOAD if header.p_flags & libc::PF_X != 0 => {
                code_ranges.push((start, start + header.p_memsz as usize));
            }
            libc::PT_NOTE if build_id.is_none() => {
                // SAFETY: a PT_NOTE segment of a loaded object is mapped readable for p_memsz
                // bytes at its run-time address.
                let notes = unsafe {
                    std::slice::from_raw_parts(start as *const u8, header.p_memsz as usize)
                };
                build_id = find_build_id(notes, header.p_align as usize);
            }
            _ => {}
        }
    }
    let path = if is_main {
        std::fs::read_link("/proc/self/exe").ok()
    } else if link_name.is_empty() || !link_name.starts_with('/') && !link_name.contains('/') {
        // The vDSO (and any object without a file on disk) has a bare name.
        None
    } else {
        Some(PathBuf::from(&link_name))
    };
    objects.push(LoadedObject {
        link_name,
        path,
        bias,
        is_main,
        build_id,
        code_ranges,
    });
    0
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
        if desc_start + desc_size > notes.len() {
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
