//! Where an agent's socket lives, as both ends compute it: `<base>/<uid>/<pid>.sock`.
//!
//! The base is a directory every user may create a directory in (mode 1777 when it is shared):
//! `$LIVEPATCH_SOCKET_DIR` when set, else [`SYSTEM_BASE`] where it exists or can be made (it is
//! under `/run`, so root makes it), else [`FALLBACK_BASE`]. In it, each user's agents put their
//! sockets in a directory of their own, mode 0700, named after the user id: no other user can
//! create, replace or remove a socket there. The agent makes its directories and refuses ones it
//! did not make (another owner, a symbolic link, a mode that lets others write); the client
//! refuses to trust them, and then checks that the process it asked for is the one answering.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The environment variable that chooses the base directory.
pub const SOCKET_DIR_ENV: &str = "LIVEPATCH_SOCKET_DIR";
/// The base directory of a machine, where root (or a package) has made it.
pub const SYSTEM_BASE: &str = "/run/livepatch";
/// The base directory when [`SYSTEM_BASE`] cannot be used.
pub const FALLBACK_BASE: &str = "/tmp/livepatch";

/// The base directories to use, in order of preference, for an environment whose
/// `LIVEPATCH_SOCKET_DIR` is `chosen`: that alone when it is set, else the system base and the
/// fallback.
pub fn bases(chosen: Option<&OsStr>) -> Vec<PathBuf> {
    match chosen.filter(|v| !v.is_empty()) {
        Some(dir) => vec![PathBuf::from(dir)],
        None => vec![PathBuf::from(SYSTEM_BASE), PathBuf::from(FALLBACK_BASE)],
    }
}

/// The directory of user `uid`'s sockets in `base`.
pub fn user_dir(base: &Path, uid: u32) -> PathBuf {
    base.join(uid.to_string())
}

/// The file name of process `pid`'s socket.
pub fn socket_name(pid: u32) -> String {
    format!("{pid}.sock")
}

/// The socket of process `pid` of user `uid` in `base`.
pub fn socket_path(base: &Path, uid: u32, pid: u32) -> PathBuf {
    user_dir(base, uid).join(socket_name(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_is_per_user_and_per_process() {
        assert_eq!(
            socket_path(Path::new("/run/livepatch"), 1000, 42),
            Path::new("/run/livepatch/1000/42.sock")
        );
        assert_eq!(bases(Some(OsStr::new("/x"))), [PathBuf::from("/x")]);
        assert_eq!(
            bases(Some(OsStr::new(""))),
            [PathBuf::from(SYSTEM_BASE), PathBuf::from(FALLBACK_BASE)]
        );
    }
}
