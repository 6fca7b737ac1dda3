//! Patch libraries, the kernel's livepatch modules: `insmod` (open the library, read its
//! declaration, enable its patch) and `rmmod` (close it once its patch is gone), and the
//! registry of the libraries loaded, which is where a patch's code lives.
//!
//! The core keeps the patches; this registry keeps the libraries they come from, by patch
//! name. A library enters it before its patch is enabled (the patch's callbacks run from it)
//! and leaves it when it is unloaded; the core tells it when a patch is released.

#![forbid(unsafe_code)]

use livepatch_core::{EnableError, Errno, Livepatch, Platform};

use crate::ffi::descriptor::Declaration;
use crate::ffi::dl::{DlError, OpenPatch};

/// A platform that keeps the patch libraries: their patches' callbacks run from them.
pub trait HoldsLibraries: Platform {
    /// The libraries.
    fn libraries(&mut self) -> &mut PatchLibraries;
}

/// A patch library the agent loaded.
#[derive(Debug)]
pub struct PatchLibrary {
    /// The patch's name.
    pub name: String,
    /// Where it was loaded from.
    pub path: String,
    /// Its patch is still active in the core.
    pub active: bool,
    /// Its patch took part in a forced transition: its code may still run.
    pub forced: bool,
    open: OpenPatch,
}

/// The loaded patch libraries, in load order.
#[derive(Debug, Default)]
pub struct PatchLibraries {
    libraries: Vec<PatchLibrary>,
}

impl PatchLibraries {
    /// The library of the patch `name`.
    pub fn find(&self, name: &str) -> Option<&PatchLibrary> {
        self.libraries.iter().find(|l| l.name == name)
    }

    /// The declaration of the patch `name`.
    pub fn declaration(&self, name: &str) -> Option<&Declaration> {
        self.find(name).map(|l| l.open.declaration())
    }

    /// Every library, in load order.
    pub fn iter(&self) -> impl Iterator<Item = &PatchLibrary> {
        self.libraries.iter()
    }

    /// The core released the patch `name` (kernel: `module_put` in `klp_free_patch_finish`).
    pub fn released(&mut self, name: &str, forced: bool) {
        if let Some(lib) = self
            .libraries
            .iter_mut()
            .find(|l| l.name == name && l.active)
        {
            lib.active = false;
            lib.forced = forced;
        }
    }
}

/// Why `insmod` or `rmmod` refused. Nothing changed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    /// The library is loaded already.
    #[error("{path} is already loaded (patch '{patch}')")]
    PathLoaded {
        /// The path.
        path: String,
        /// Its patch.
        patch: String,
    },
    /// Another library declares a patch of that name (module names are unique in the kernel).
    #[error("a patch named '{patch}' is already loaded from {path}; {advice}")]
    NameLoaded {
        /// The patch.
        patch: String,
        /// The other library.
        path: String,
        /// What to do about it.
        advice: &'static str,
    },
    /// The library could not be opened or is no patch library.
    #[error("{path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        source: DlError,
    },
    /// The core refused the patch.
    #[error("patch '{patch}' refused: {source}")]
    Refused {
        /// The patch.
        patch: String,
        /// Why, with the kernel's errno.
        source: EnableError,
    },
    /// No library of that patch.
    #[error("no patch '{0}' in this process")]
    NoSuchPatch(String),
    /// Its patch is still enabled or in transition.
    #[error("patch '{patch}' is {what}; disable it and wait for its transition first")]
    StillActive {
        /// The patch.
        patch: String,
        /// "enabled" or "in transition".
        what: &'static str,
    },
    /// Its patch took part in a forced transition.
    #[error(
        "patch '{0}' took part in a forced transition: threads may still run its code, so its library can never be unloaded"
    )]
    Forced(String),
}

impl LibraryError {
    /// The kernel's error number for the refusal, as `insmod` or `rmmod` would see it.
    pub fn errno(&self) -> Errno {
        match self {
            LibraryError::PathLoaded { .. } | LibraryError::NameLoaded { .. } => Errno::EEXIST,
            LibraryError::Open { .. } => Errno::EINVAL,
            LibraryError::Refused { source, .. } => source.errno,
            LibraryError::NoSuchPatch(_) => Errno::ENOENT,
            LibraryError::StillActive { .. } | LibraryError::Forced(_) => Errno::EBUSY,
        }
    }
}

/// The default name of a patch: the library's file name without a leading "lib" and the
/// ".so" suffix.
pub fn default_patch_name(path: &str) -> String {
    let file = std::path::Path::new(path)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = file.strip_prefix("lib").unwrap_or(&file);
    let file = match file.find(".so") {
        Some(i) => &file[..i],
        None => file,
    };
    file.to_string()
}

/// `insmod`: opens the library, reads its declaration and enables its patch (kernel:
/// `klp_enable_patch` in the module's init). On any failure the library is closed again and
/// nothing stays. Returns the patch's name.
pub fn insmod<P: HoldsLibraries>(
    core: &mut Livepatch,
    platform: &mut P,
    path: &str,
) -> Result<String, LibraryError> {
    if let Some(lib) = platform.libraries().iter().find(|l| l.path == path) {
        return Err(LibraryError::PathLoaded {
            path: path.to_string(),
            patch: lib.name.clone(),
        });
    }
    let (open, desc) = OpenPatch::open(std::path::Path::new(path), &default_patch_name(path))
        .map_err(|source| LibraryError::Open {
            path: path.to_string(),
            source,
        })?;
    if let Some(other) = platform.libraries().find(&desc.name) {
        let advice = if other.forced {
            "it took part in a forced transition and stays loaded: give the new patch another name"
        } else if other.active {
            "disable and unload it first, or make the new patch replace it"
        } else {
            "unload it first"
        };
        return Err(LibraryError::NameLoaded {
            patch: desc.name,
            path: other.path.clone(),
            advice,
        });
    }
    // In the registry before the patch is enabled: its callbacks run from the library.
    platform.libraries().libraries.push(PatchLibrary {
        name: desc.name.clone(),
        path: path.to_string(),
        active: true,
        forced: false,
        open,
    });
    match core.enable_patch(platform, &desc) {
        Ok(_) => Ok(desc.name),
        Err(source) => {
            // Closes the library: nothing of it is in use.
            platform
                .libraries()
                .libraries
                .retain(|l| l.name != desc.name);
            Err(LibraryError::Refused {
                patch: desc.name,
                source,
            })
        }
    }
}

/// `rmmod`: closes the library of a patch that the core released and that was never forced.
pub fn rmmod<P: HoldsLibraries>(
    core: &Livepatch,
    platform: &mut P,
    patch: &str,
) -> Result<(), LibraryError> {
    let libraries = &mut platform.libraries().libraries;
    let Some(i) = libraries.iter().position(|l| l.name == patch) else {
        return Err(LibraryError::NoSuchPatch(patch.to_string()));
    };
    if libraries[i].active {
        let what = if core.transition().is_some_and(|(n, _)| n == patch) {
            "in transition"
        } else {
            "enabled"
        };
        return Err(LibraryError::StillActive {
            patch: patch.to_string(),
            what,
        });
    }
    if libraries[i].forced {
        return Err(LibraryError::Forced(patch.to_string()));
    }
    // Dropping the library closes it.
    libraries.remove(i);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_drop_lib_and_so() {
        assert_eq!(default_patch_name("/x/libfix-parse.so"), "fix-parse");
        assert_eq!(default_patch_name("/x/hotfix.so.1"), "hotfix");
        assert_eq!(default_patch_name("plain"), "plain");
    }
}
