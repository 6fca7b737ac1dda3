//! The attribute tree of `/sys/kernel/livepatch` (kernel: the sysfs part of
//! core.c and Documentation/ABI/testing/sysfs-kernel-livepatch).
//!
//! Paths are relative to the livepatch root: `<patch>/enabled`,
//! `<patch>/<object>/patched`, `<patch>/<object>/<func,sympos>`. Reads print
//! `"%d\n"`; writes take what `kstrtobool` takes and fail with the kernel's
//! error numbers.

use crate::Addr;
use crate::errno::Errno;
use crate::lifecycle::Livepatch;
use crate::platform::Platform;

/// One entry of the attribute tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysfsEntry {
    /// Path relative to the livepatch root.
    pub path: String,
    /// Permission bits (`0o755` for directories).
    pub mode: u32,
    /// Whether the entry is a directory.
    pub is_dir: bool,
}

/// The state of one patch, as its attributes show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchStatus {
    /// The patch name (its directory).
    pub name: String,
    /// `enabled`: 1 while enabled or patching, 0 while unpatching.
    pub enabled: bool,
    /// `transition`: this patch is the one in transition.
    pub transition: bool,
    /// Took part in a forced transition (not an attribute in the kernel).
    pub forced: bool,
    /// `replace`.
    pub replace: bool,
    /// `stack_order`: 1-based position in enable order.
    pub stack_order: usize,
    /// The objects, in the patch's order (dynamic ones last).
    pub objects: Vec<ObjectStatus>,
}

/// The state of one object of a patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStatus {
    /// The directory name: the object's name, or `vmlinux` for the main
    /// executable.
    pub name: String,
    /// `patched`.
    pub patched: bool,
    /// Whether the object is loaded now.
    pub loaded: bool,
    /// Allocated only for nops of a replacing patch.
    pub dynamic: bool,
    /// The funcs.
    pub funcs: Vec<FuncStatus>,
}

/// The state of one func.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuncStatus {
    /// The directory name, `"%s,%lu"`.
    pub dir: String,
    /// `old_name`.
    pub old_name: String,
    /// `old_sympos`.
    pub old_sympos: u64,
    /// A nop of atomic replace.
    pub nop: bool,
    /// Address of the original, while resolved.
    pub old_addr: Option<Addr>,
    /// Address of the replacement (the original for a nop).
    pub new_addr: Addr,
    /// On its func stack.
    pub patched: bool,
    /// In transition.
    pub transition: bool,
}

/// kernel: `kstrtobool`: `1/y/Y/t/T`, `0/n/N/f/F`, `on`, `off`; only the
/// first characters count.
pub fn kstrtobool(s: &str) -> Result<bool, Errno> {
    let b = s.as_bytes();
    match b.first() {
        Some(b'y' | b'Y' | b't' | b'T' | b'1') => Ok(true),
        Some(b'n' | b'N' | b'f' | b'F' | b'0') => Ok(false),
        Some(b'o' | b'O') => match b.get(1) {
            Some(b'n' | b'N') => Ok(true),
            Some(b'f' | b'F') => Ok(false),
            _ => Err(Errno::EINVAL),
        },
        _ => Err(Errno::EINVAL),
    }
}

fn flag(b: bool) -> String {
    format!("{}\n", u8::from(b))
}

impl Livepatch {
    /// `/sys/kernel/livepatch/<patch>/enabled` alone; `None` when the patch is not active.
    pub fn is_enabled(&self, name: &str) -> Option<bool> {
        self.patches
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.enabled)
    }

    /// The state of every active patch, in enable order.
    pub fn patch_statuses(&self) -> Vec<PatchStatus> {
        let tp = self.transition_patch_index();
        self.patches
            .iter()
            .enumerate()
            .map(|(i, patch)| PatchStatus {
                name: patch.name.clone(),
                enabled: patch.enabled,
                transition: tp == Some(i),
                forced: patch.forced,
                replace: patch.replace,
                stack_order: i + 1,
                objects: patch
                    .objects
                    .iter()
                    .map(|o| ObjectStatus {
                        name: o.display_name().to_string(),
                        patched: o.patched,
                        loaded: o.loaded,
                        dynamic: o.dynamic,
                        funcs: o
                            .funcs
                            .iter()
                            .map(|f| FuncStatus {
                                dir: f.sysfs_name(),
                                old_name: f.old_name.clone(),
                                old_sympos: f.old_sympos,
                                nop: f.nop,
                                old_addr: f.old_func,
                                new_addr: f.new_func,
                                patched: f.patched,
                                transition: f.transition,
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Every entry of the tree, directories before their contents.
    pub fn sysfs_entries(&self) -> Vec<SysfsEntry> {
        let mut out = Vec::new();
        let mut push =
            |path: String, mode: u32, is_dir: bool| out.push(SysfsEntry { path, mode, is_dir });
        for patch in self.patch_statuses() {
            let base = patch.name.clone();
            push(base.clone(), 0o755, true);
            push(format!("{base}/enabled"), 0o644, false);
            push(format!("{base}/transition"), 0o444, false);
            push(format!("{base}/force"), 0o200, false);
            push(format!("{base}/replace"), 0o444, false);
            push(format!("{base}/stack_order"), 0o444, false);
            for obj in &patch.objects {
                push(format!("{base}/{}", obj.name), 0o755, true);
                push(format!("{base}/{}/patched", obj.name), 0o444, false);
                for func in &obj.funcs {
                    push(format!("{base}/{}/{}", obj.name, func.dir), 0o755, true);
                }
            }
        }
        out
    }

    /// Reads an attribute. `ENOENT` for a path that does not exist, `EISDIR`
    /// (21) for a directory, `EACCES` for the write-only `force`.
    pub fn sysfs_read(&self, path: &str) -> Result<String, Errno> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let statuses = self.patch_statuses();
        let patch = statuses
            .iter()
            .find(|s| s.name == parts[0])
            .ok_or(Errno::ENOENT)?;
        match parts.as_slice() {
            [_] => Err(Errno(21)),
            [_, "enabled"] => Ok(flag(patch.enabled)),
            [_, "transition"] => Ok(flag(patch.transition)),
            [_, "replace"] => Ok(flag(patch.replace)),
            [_, "stack_order"] => Ok(format!("{}\n", patch.stack_order)),
            [_, "force"] => Err(Errno::EACCES),
            [_, obj] => match patch.objects.iter().any(|o| o.name == *obj) {
                true => Err(Errno(21)),
                false => Err(Errno::ENOENT),
            },
            [_, obj, "patched"] => {
                let o = patch
                    .objects
                    .iter()
                    .find(|o| o.name == *obj)
                    .ok_or(Errno::ENOENT)?;
                Ok(flag(o.patched))
            }
            [_, obj, func] => {
                let o = patch
                    .objects
                    .iter()
                    .find(|o| o.name == *obj)
                    .ok_or(Errno::ENOENT)?;
                match o.funcs.iter().any(|f| f.dir == *func) {
                    true => Err(Errno(21)),
                    false => Err(Errno::ENOENT),
                }
            }
            _ => Err(Errno::ENOENT),
        }
    }

    /// Writes an attribute: `enabled` or `force`; every other existing entry
    /// is read-only (`EACCES`).
    pub fn sysfs_write<P: Platform>(
        &mut self,
        p: &mut P,
        path: &str,
        value: &str,
    ) -> Result<(), Errno> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        if !self.has_patch(parts[0]) {
            return Err(Errno::ENOENT);
        }
        match parts.as_slice() {
            [patch, "enabled"] => {
                let enabled = kstrtobool(value)?;
                self.set_enabled(p, patch, enabled)
            }
            [patch, "force"] => {
                if kstrtobool(value)? {
                    self.force(p, patch)
                } else {
                    Ok(())
                }
            }
            _ => match self.sysfs_read(path) {
                Err(Errno::ENOENT) => Err(Errno::ENOENT),
                _ => Err(Errno::EACCES),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kstrtobool_takes_what_the_kernel_takes() {
        for t in ["1", "y", "Y", "t", "on", "ON", "1\n", "yes"] {
            assert_eq!(kstrtobool(t), Ok(true), "{t}");
        }
        for f in ["0", "n", "N", "f", "off", "0\n", "no"] {
            assert_eq!(kstrtobool(f), Ok(false), "{f}");
        }
        for bad in ["", "2", "o", "ox", "-1", "x"] {
            assert_eq!(kstrtobool(bad), Err(Errno::EINVAL), "{bad:?}");
        }
    }
}
