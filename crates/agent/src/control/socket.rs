//! The agent's control socket, `<base>/<uid>/<pid>.sock` (see `livepatch_protocol::socket`),
//! made so that no other user can make the agent serve, or clients talk to, a socket that is
//! not this process's: its directory is opened and checked through a descriptor
//! (`livepatch_protocol::directories`), and the socket is bound through that descriptor, so
//! that nothing can be swapped in between the check and the use.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use livepatch_protocol::directories::{DirError, open_user_dir, system};
use livepatch_protocol::socket::{SOCKET_DIR_ENV, bases, socket_name};
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// Why the socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A directory on the way could not be used.
    #[error(transparent)]
    Directory(#[from] DirError),
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

/// Makes (or checks) `base/<euid>`, mode 0700, and binds `<pid>.sock` in it.
fn bind_in(base: &Path, euid: u32, pid: u32) -> Result<ControlSocket, SocketError> {
    let (user_fd, user_path) = open_user_dir(base, euid)?;

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
        Err(errno) => return Err(system("examine", &path)(errno).into()),
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
