//! The ELF objects mapped in another process: where each is loaded and the functions it
//! exports, read from its file as the process sees it (`/proc/PID/root`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use livepatch_arch::maps::Mapping;
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

/// An object mapped in the target.
#[derive(Debug)]
pub struct TargetObject {
    /// Its path in the target's view of the file system.
    pub path: String,
    /// Its executable mappings.
    pub code: Vec<(u64, u64)>,
    /// Exported (defined, dynamic) functions: name, address in the target, size.
    pub functions: Vec<(String, u64, u64)>,
    /// Its signal-return trampolines (`mov $15, %rax; syscall`: `rt_sigreturn`), the return
    /// address of every signal handler.
    pub signal_returns: Vec<u64>,
}

impl TargetObject {
    /// The address of the exported function `name`.
    pub fn function(&self, name: &str) -> Option<u64> {
        self.functions
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|&(_, addr, _)| addr)
    }

    /// Whether this is the dynamic loader (`ld-linux-x86-64.so.2`, `ld.so`).
    pub fn is_loader(&self) -> bool {
        let file = self.path.rsplit('/').next().unwrap_or("");
        file.starts_with("ld-linux") || file.starts_with("ld.so") || file.starts_with("ld-2.")
    }
}

/// The file `path` of the target's view, reached through its root.
pub fn in_target_view(pid: u32, path: &str) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'))
}

/// Every ELF file the target maps executable code from, with its exported functions; files
/// that cannot be read or parsed are left out (the caller asks for what it needs by name).
pub fn objects(pid: u32, maps: &[Mapping]) -> Vec<TargetObject> {
    let mut paths: Vec<&str> = maps
        .iter()
        .filter(|m| m.prot & libc::PROT_EXEC != 0 && m.name.starts_with('/'))
        .map(|m| m.name.as_str())
        .collect();
    paths.sort_unstable();
    paths.dedup();
    paths
        .into_iter()
        .filter_map(|path| object_at(pid, maps, path))
        .collect()
}

/// An exported function of a shared library file, found before the library is mapped: its
/// value, and the lowest address of the file's segments.
#[derive(Debug, Clone, Copy)]
pub struct LibraryFunction {
    value: u64,
    first_vaddr: u64,
}

impl LibraryFunction {
    /// The exported function `name` of the shared library at `path` (this process's view).
    pub fn find(path: &std::path::Path, name: &str) -> Option<LibraryFunction> {
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let value = file
            .dynamic_symbols()
            .find(|s| s.is_definition() && s.name() == Ok(name))?
            .address();
        Some(LibraryFunction {
            value,
            first_vaddr: first_vaddr(&file),
        })
    }

    /// Its address in a process that maps the library from `path`.
    pub fn address_in(&self, maps: &[Mapping], path: &str) -> Option<u64> {
        let first = maps.iter().find(|m| m.name == path && m.offset == 0)?;
        Some(load_bias(first, self.first_vaddr).wrapping_add(self.value))
    }
}

fn first_vaddr(file: &object::File<'_>) -> u64 {
    file.segments().map(|s| s.address()).min().unwrap_or(0)
}

/// What is added to the symbol values of a shared object whose first mapping (file offset 0)
/// is `first` and whose lowest segment address is `first_vaddr`.
fn load_bias(first: &Mapping, first_vaddr: u64) -> u64 {
    (first.start as u64).wrapping_sub(first_vaddr & !0xfff)
}

/// The bytes of the file `first` maps: through `/proc/PID/map_files`, which opens the very
/// file mapped even if it was replaced or removed since (an upgrade of the C library while the
/// program runs), but only with CAP_SYS_ADMIN; else at its path in the process's view, if that
/// is still the same file (the same inode).
fn mapped_file(pid: u32, first: &Mapping) -> Option<Vec<u8>> {
    let mapped = format!("/proc/{pid}/map_files/{:x}-{:x}", first.start, first.end);
    if let Ok(data) = std::fs::read(mapped) {
        return Some(data);
    }
    let path = in_target_view(pid, &first.name);
    let file = std::fs::File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    // The inode alone: on some file systems (btrfs) the device maps shows is not the one
    // `stat` gives.
    if meta.ino() != first.inode {
        return None;
    }
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut &file, &mut data).ok()?;
    Some(data)
}

fn object_at(pid: u32, maps: &[Mapping], path: &str) -> Option<TargetObject> {
    let first = maps.iter().find(|m| m.name == path && m.offset == 0)?;
    let data = mapped_file(pid, first)?;
    let file = object::File::parse(&*data).ok()?;
    let bias = if file.kind() == object::ObjectKind::Dynamic {
        load_bias(first, first_vaddr(&file))
    } else {
        0
    };
    let functions = file
        .dynamic_symbols()
        .filter(|s| s.is_definition() && s.kind() == SymbolKind::Text)
        .filter_map(|s| {
            let name = s.name().ok()?.to_owned();
            Some((name, s.address().wrapping_add(bias), s.size()))
        })
        .collect();
    const SIGRETURN: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05];
    // Searched in every loaded segment: a match outside code is an address no stack holds.
    let signal_returns = file
        .segments()
        .filter_map(|s| Some((s.address(), s.data().ok()?)))
        .flat_map(|(address, bytes)| {
            bytes
                .windows(SIGRETURN.len())
                .enumerate()
                .filter(|(_, w)| *w == SIGRETURN)
                .map(move |(i, _)| address + i as u64)
                .collect::<Vec<_>>()
        })
        .map(|address| address.wrapping_add(bias))
        .collect();
    let code = maps
        .iter()
        .filter(|m| m.name == path && m.prot & libc::PROT_EXEC != 0)
        .map(|m| (m.start as u64, m.end as u64))
        .collect();
    Some(TargetObject {
        path: path.to_owned(),
        code,
        functions,
        signal_returns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_replaced_on_disk_is_read_as_it_is_mapped() {
        let dir = std::env::temp_dir().join(format!("livepatch-replaced-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let copy = dir.join("libm-copy.so");
        std::fs::copy("/lib/x86_64-linux-gnu/libm.so.6", &copy).unwrap();
        let name = std::ffi::CString::new(copy.to_str().unwrap()).unwrap();
        // SAFETY: a C string naming a copy of the system's libm, loaded and never closed.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null());
        // SAFETY: a valid handle and symbol name.
        let frexp = unsafe { libc::dlsym(handle, c"frexp".as_ptr()) } as u64;
        // An upgrade: another file renamed over the one mapped.
        let next = dir.join("next");
        std::fs::write(&next, b"not a library").unwrap();
        std::fs::rename(&next, &copy).unwrap();
        let pid = std::process::id();
        let maps = livepatch_arch::maps::read_process(pid).unwrap();
        let object = objects(pid, &maps)
            .into_iter()
            .find(|o| o.path.starts_with(copy.to_str().unwrap()))
            .expect("the replaced library is still read");
        assert!(object.path.ends_with("(deleted)"), "{}", object.path);
        assert_eq!(object.function("frexp"), Some(frexp));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn this_process_libc_exports_malloc_where_it_is_mapped() {
        let pid = std::process::id();
        let maps = livepatch_arch::maps::read_process(pid).unwrap();
        let objects = objects(pid, &maps);
        let libc = objects
            .iter()
            .find(|o| o.function("malloc").is_some())
            .expect("an object exports malloc");
        assert_eq!(
            libc.function("malloc"),
            Some(libc::malloc as *const () as u64)
        );
        assert!(objects.iter().any(TargetObject::is_loader), "{objects:?}");
        let restorer = livepatch_arch::signals::signal_return(libc::SIGRTMIN())
            .or_else(|| {
                // Any handler gets the C library's trampoline: install one to read it.
                extern "C" fn nothing(_: libc::c_int) {}
                // SAFETY: a handler that does nothing, for a signal nobody sends here.
                unsafe {
                    libc::signal(
                        libc::SIGRTMIN() + 3,
                        nothing as *const () as libc::sighandler_t,
                    )
                };
                livepatch_arch::signals::signal_return(libc::SIGRTMIN() + 3)
            })
            .expect("glibc gives handlers a restorer") as u64;
        assert!(
            objects.iter().any(|o| o.signal_returns.contains(&restorer)),
            "the trampoline {restorer:#x} is found in no object"
        );
    }
}
