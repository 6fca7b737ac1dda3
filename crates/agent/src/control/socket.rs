//! The agent's control socket, `<base>/<uid>/<pid>.sock` (see `livepatch_protocol::socket`),
//! made so that no other user can make the agent serve, or clients talk to, a socket that is
//! not this process's: every directory is opened without following symbolic links and checked
//! on the descriptor (owner, mode), and the socket is bound through that descriptor, so that
//! nothing can be swapped in between the check and the use.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use livepatch_protocol::socket::{FALLBACK_BASE, SOCKET_DIR_ENV, SYSTEM_BASE, bases, socket_name};
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, fchmod, fchmodat, fstat, fstatat, mkdirat,
};
use nix::unistd::{UnlinkatFlags, unlinkat};

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

/// Why the socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A directory on the way is not one this agent may use.
    #[error("{path} {why}; refusing to put a control socket there")]
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
    /// Binding or listening failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No base directory could be used.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    NoBase(Vec<SocketError>),
}

/// The listening socket of this process.
#[derive(Debug)]
pub struct ControlSocket {
    /// Ready for `accept`, non-blocking.
    pub listener: UnixListener,
    /// Its path, for people and for the removal at exit.
    pub path: PathBuf,
}

fn system<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> SocketError + 'a {
    move |errno| SocketError::System {
        what,
        path: path.to_owned(),
        errno,
    }
}

fn open_directory(at: impl AsFd, name: &Path, shown: &Path) -> Result<OwnedFd, SocketError> {
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
            Err(SocketError::Untrusted {
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

/// A base directory is trusted when root or `euid` owns it, and when others may write in it
/// only with the sticky bit (so none can remove another's entries).
fn check_base(stat: &FileStat, euid: u32) -> Result<(), Distrust> {
    if stat.st_uid != 0 && stat.st_uid != euid {
        return Err(Distrust::Owner {
            owner: stat.st_uid,
            expected: euid,
            or_root: ", or root",
        });
    }
    let mode = mode_bits(stat);
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(Distrust::Mode {
            mode,
            what: "others may write in it and it is not sticky",
        });
    }
    Ok(())
}

/// A user's directory is trusted when `euid` owns it and nobody else may enter or write it.
fn check_user_dir(stat: &FileStat, euid: u32) -> Result<(), Distrust> {
    if stat.st_uid != euid {
        return Err(Distrust::Owner {
            owner: stat.st_uid,
            expected: euid,
            or_root: "",
        });
    }
    let mode = mode_bits(stat);
    if mode & 0o077 != 0 {
        return Err(Distrust::Mode {
            mode,
            what: "others may enter it",
        });
    }
    Ok(())
}

/// Opens `base`, making it when it is one of the default bases and missing.
fn open_base(base: &Path, euid: u32) -> Result<OwnedFd, SocketError> {
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
            system("make", base)(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        })?,
        Err(errno) => return Err(system("make", base)(errno)),
    }
    let fd = open_directory(AT_FDCWD, base, base)?;
    let stat = fstat(fd.as_fd()).map_err(system("examine", base))?;
    check_base(&stat, euid).map_err(|why| SocketError::Untrusted {
        path: base.to_owned(),
        why,
    })?;
    Ok(fd)
}

/// Makes (or checks) `base/<euid>`, mode 0700, and binds `<pid>.sock` in it.
fn bind_in(base: &Path, euid: u32, pid: u32) -> Result<ControlSocket, SocketError> {
    let base_fd = open_base(base, euid)?;
    let user = euid.to_string();
    let user_path = base.join(&user);
    match mkdirat(
        base_fd.as_fd(),
        user.as_str(),
        Mode::from_bits_truncate(0o700),
    ) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(errno) => return Err(system("make", &user_path)(errno)),
    }
    let user_fd = open_directory(base_fd.as_fd(), Path::new(&user), &user_path)?;
    let stat = fstat(user_fd.as_fd()).map_err(system("examine", &user_path))?;
    check_user_dir(&stat, euid).map_err(|why| SocketError::Untrusted {
        path: user_path.clone(),
        why,
    })?;

    let name = socket_name(pid);
    let path = user_path.join(&name);
    // Only this user can make entries here: whatever has this name is a leftover of an earlier
    // process with this pid (or of this user's own doing).
    match fstatat(user_fd.as_fd(), name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(old) => {
            let flag = if SFlag::from_bits_truncate(old.st_mode & SFlag::S_IFMT.bits())
                == SFlag::S_IFDIR
            {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            unlinkat(user_fd.as_fd(), name.as_str(), flag)
                .map_err(system("remove the leftover", &path))?;
        }
        Err(Errno::ENOENT) => {}
        Err(errno) => return Err(system("examine", &path)(errno)),
    }
    // Bound through the directory's descriptor where /proc allows it: the directory checked
    // above is the one the socket goes into, whatever happens to its path meanwhile.
    let through_fd = PathBuf::from(format!("/proc/self/fd/{}/{name}", user_fd.as_raw_fd()));
    let listener = match UnixListener::bind(&through_fd) {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            UnixListener::bind(&path).map_err(|source| SocketError::Listen {
                path: path.clone(),
                source,
            })?
        }
        Err(source) => {
            return Err(SocketError::Listen {
                path: path.clone(),
                source,
            });
        }
    };
    // The socket is this process's alone; a client still checks its peer's credentials.
    fchmodat(
        user_fd.as_fd(),
        name.as_str(),
        Mode::from_bits_truncate(0o600),
        FchmodatFlags::FollowSymlink,
    )
    .map_err(system("set the mode of", &path))?;
    listener
        .set_nonblocking(true)
        .map_err(|source| SocketError::Listen {
            path: path.clone(),
            source,
        })?;
    Ok(ControlSocket { listener, path })
}

/// Makes the control socket of process `pid`, in the first base directory that can be used.
pub fn bind(pid: u32) -> Result<ControlSocket, SocketError> {
    let chosen = std::env::var_os(SOCKET_DIR_ENV);
    let euid = nix::unistd::geteuid().as_raw();
    let mut failures = Vec::new();
    for base in bases(chosen.as_deref().map(OsStr::new)) {
        match bind_in(&base, euid, pid) {
            Ok(socket) => return Ok(socket),
            Err(e) => failures.push(e),
        }
    }
    Err(match failures.len() {
        1 => failures.remove(0),
        _ => SocketError::NoBase(failures),
    })
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
