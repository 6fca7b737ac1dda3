//! The directories of the control channel, `<base>` and `<base>/<uid>` (see [`crate::socket`]),
//! made and checked through descriptors, so that nothing can be swapped in between the check and
//! the use: every directory is opened without following symbolic links, its owner and mode are
//! read from the descriptor, and what goes into it is made relative to that descriptor.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};

use crate::socket::{FALLBACK_BASE, SYSTEM_BASE};

/// Why a directory is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Distrust {
    /// A symbolic link where a directory must be.
    #[error("is a symbolic link")]
    SymbolicLink,
    /// Something else where a directory must be.
    #[error("is not a directory")]
    NotADirectory,
    /// Owned by another user.
    #[error("is owned by uid {owner}, not by uid {expected}{or_root}")]
    Owner {
        /// Its owner.
        owner: u32,
        /// Who must own it.
        expected: u32,
        /// ", or root" where root may own it too.
        or_root: &'static str,
    },
    /// Others may write in it.
    #[error("has mode {mode:04o}: {what}")]
    Mode {
        /// Its mode.
        mode: u32,
        /// What is wrong with it.
        what: &'static str,
    },
}

/// Why a directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// A directory on the way is not one this user may use.
    #[error("{path} {why}; refusing to use it")]
    Untrusted {
        /// The directory.
        path: PathBuf,
        /// Why.
        why: Distrust,
    },
    /// A system call failed.
    #[error("cannot {what} {path}: {errno}")]
    System {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        errno: Errno,
    },
}

/// A failed system call on `path`, as a [`DirError`].
pub fn system<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> DirError + 'a {
    move |errno| DirError::System {
        what,
        path: path.to_owned(),
        errno,
    }
}

/// Opens the directory `name` in `at` without following a symbolic link; `shown` names it in
/// errors. A link or a non-directory there is [`Distrust`]ed.
pub fn open_directory(at: impl AsFd, name: &Path, shown: &Path) -> Result<OwnedFd, DirError> {
    let at = at.as_fd();
    match openat(
        at,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(fd),
        // O_NOFOLLOW on a symbolic link fails (ELOOP, or ENOTDIR with O_DIRECTORY), and
        // O_DIRECTORY on anything else with ENOTDIR: look at what is there to say which.
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let link = fstatat(at, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|stat| {
                SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFLNK
            });
            Err(DirError::Untrusted {
                path: shown.to_owned(),
                why: if link {
                    Distrust::SymbolicLink
                } else {
                    Distrust::NotADirectory
                },
            })
        }
        Err(errno) => Err(system("open", shown)(errno)),
    }
}

fn mode_bits(stat: &FileStat) -> u32 {
    stat.st_mode & 0o7777
}

fn check_base(stat: &FileStat, euid: u32) -> Result<(), Distrust> {
    trust_base(stat.st_uid, mode_bits(stat), euid)
}

fn check_user_dir(stat: &FileStat, euid: u32) -> Result<(), Distrust> {
    trust_user_dir(stat.st_uid, mode_bits(stat), euid)
}

/// A base directory (its owner, its mode bits) is trusted for user `uid` when root or `uid`
/// owns it, and when others may write in it only with the sticky bit (so none can remove
/// another's entries). The agent checks the directories it makes with it, and `livepatch` the
/// way to a socket it is about to believe.
pub fn trust_base(owner: u32, mode: u32, uid: u32) -> Result<(), Distrust> {
    if owner != 0 && owner != uid {
        return Err(Distrust::Owner {
            owner,
            expected: uid,
            or_root: ", or root",
        });
    }
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(Distrust::Mode {
            mode,
            what: "others may write in it and it is not sticky",
        });
    }
    Ok(())
}

/// A user's directory (its owner, its mode bits) is trusted for user `uid` when `uid` owns it
/// and nobody else may enter or write it.
pub fn trust_user_dir(owner: u32, mode: u32, uid: u32) -> Result<(), Distrust> {
    if owner != uid {
        return Err(Distrust::Owner {
            owner,
            expected: uid,
            or_root: "",
        });
    }
    if mode & 0o077 != 0 {
        return Err(Distrust::Mode {
            mode,
            what: "others may enter it",
        });
    }
    Ok(())
}

/// Opens `base`, making it when it is one of the default bases and missing.
pub fn open_base(base: &Path, euid: u32) -> Result<OwnedFd, DirError> {
    let shared = base == Path::new(SYSTEM_BASE) || base == Path::new(FALLBACK_BASE);
    match mkdirat(AT_FDCWD, base, Mode::from_bits_truncate(0o700)) {
        Ok(()) if shared => {
            // Made now: every user's agents make their directories in it, and the sticky bit
            // keeps each user's entry theirs. The mode is set on the descriptor, past the umask.
            let fd = open_directory(AT_FDCWD, base, base)?;
            fchmod(fd.as_fd(), Mode::from_bits_truncate(0o1777))
                .map_err(system("set the mode of", base))?;
        }
        Ok(()) | Err(Errno::EEXIST) => {}
        // LIVEPATCH_SOCKET_DIR may name a directory below others not made yet.
        Err(Errno::ENOENT) if !shared => std::fs::create_dir_all(base).map_err(|e| {
            system("make", base)(Errno::from_raw(
                e.raw_os_error().unwrap_or(Errno::EIO as i32),
            ))
        })?,
        Err(errno) => return Err(system("make", base)(errno)),
    }
    let fd = open_directory(AT_FDCWD, base, base)?;
    let stat = fstat(fd.as_fd()).map_err(system("examine", base))?;
    check_base(&stat, euid).map_err(|why| DirError::Untrusted {
        path: base.to_owned(),
        why,
    })?;
    Ok(fd)
}

/// Opens `base/<name>` (made, mode 0755, when missing), a directory of this user's that every
/// user may read and none other write: for files this user makes for processes of others.
pub fn open_readable_dir(base: &Path, name: &str) -> Result<(OwnedFd, PathBuf), DirError> {
    let euid = nix::unistd::geteuid().as_raw();
    let base_fd = open_base(base, euid)?;
    let path = base.join(name);
    match mkdirat(base_fd.as_fd(), name, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(errno) => return Err(system("make", &path)(errno)),
    }
    let fd = open_directory(base_fd.as_fd(), Path::new(name), &path)?;
    let stat = fstat(fd.as_fd()).map_err(system("examine", &path))?;
    if stat.st_uid != euid {
        return Err(DirError::Untrusted {
            path,
            why: Distrust::Owner {
                owner: stat.st_uid,
                expected: euid,
                or_root: "",
            },
        });
    }
    let mode = mode_bits(&stat);
    if mode & 0o022 != 0 {
        return Err(DirError::Untrusted {
            path,
            why: Distrust::Mode {
                mode,
                what: "others may write in it",
            },
        });
    }
    Ok((fd, path))
}

/// Opens `base/<uid>` (made, mode 0700, when missing), checked to be `uid`'s and closed to
/// others. Root makes another user's directory for that user (its owner set on the
/// descriptor), as `livepatch` does to place the agent for a process of that user.
pub fn open_user_dir(base: &Path, uid: u32) -> Result<(OwnedFd, PathBuf), DirError> {
    let euid = nix::unistd::geteuid().as_raw();
    let base_fd = open_base(base, uid)?;
    let name = uid.to_string();
    let path = base.join(&name);
    let made = match mkdirat(
        base_fd.as_fd(),
        name.as_str(),
        Mode::from_bits_truncate(0o700),
    ) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(errno) => return Err(system("make", &path)(errno)),
    };
    let fd = open_directory(base_fd.as_fd(), Path::new(&name), &path)?;
    if made && euid != uid {
        nix::unistd::fchown(fd.as_fd(), Some(nix::unistd::Uid::from_raw(uid)), None)
            .map_err(system("give to its user", &path))?;
    }
    let stat = fstat(fd.as_fd()).map_err(system("examine", &path))?;
    check_user_dir(&stat, uid).map_err(|why| DirError::Untrusted {
        path: path.clone(),
        why,
    })?;
    Ok((fd, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_base_must_be_sticky_and_a_user_directory_private() {
        let stat = |uid: u32, mode: u32| {
            // A real FileStat with the two fields the checks read changed.
            let mut stat = fstat(std::fs::File::open("/").unwrap().as_fd()).unwrap();
            stat.st_uid = uid;
            stat.st_mode = (stat.st_mode & !0o7777) | mode;
            stat
        };
        assert!(check_base(&stat(0, 0o1777), 1000).is_ok());
        assert!(check_base(&stat(1000, 0o700), 1000).is_ok());
        assert!(matches!(
            check_base(&stat(0, 0o777), 1000),
            Err(Distrust::Mode { .. })
        ));
        assert!(matches!(
            check_base(&stat(65534, 0o1777), 1000),
            Err(Distrust::Owner { owner: 65534, .. })
        ));
        assert!(check_user_dir(&stat(1000, 0o700), 1000).is_ok());
        assert!(check_user_dir(&stat(1000, 0o755), 1000).is_err());
        assert!(check_user_dir(&stat(0, 0o700), 1000).is_err());
    }
}
