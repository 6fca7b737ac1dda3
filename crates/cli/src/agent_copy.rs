//! The agent a process maps: a private copy of the installed agent, named by its content,
//! written once and never again. An upgrade or a rebuild that rewrites the installed file in
//! place then cannot change the code running processes execute, and a new version gets a new
//! name. The copy lives where only the user who made it can write: root's in
//! `<base>/agents/` (mode 0755: every process can read it, whoever attaches to it), another
//! user's in `<base>/<uid>/` (mode 0700), beside their sockets, for their own processes.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use livepatch_protocol::directories::{open_readable_dir, open_user_dir};
use livepatch_protocol::socket::bases;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fstatat};

/// The copy of `installed`, in a base of `socket_dir` (this command's `LIVEPATCH_SOCKET_DIR`:
/// never a directory the target's environment names), made if it is not there yet.
pub fn private_copy(installed: &Path, socket_dir: Option<OsString>) -> anyhow::Result<PathBuf> {
    let data = std::fs::read(installed)
        .with_context(|| format!("cannot read the agent {}", installed.display()))?;
    let name = format!("liblivepatch_agent-{:016x}.so", content_hash(&data));
    let me = nix::unistd::geteuid().as_raw();
    let mut failures = Vec::new();
    for base in bases(socket_dir.as_deref()) {
        let dir = if me == 0 {
            open_readable_dir(&base, "agents")
        } else {
            open_user_dir(&base, me)
        };
        match dir {
            Ok((dir_fd, dir)) => return place(&dir_fd, &dir, &name, &data),
            Err(e) => failures.push(e.to_string()),
        }
    }
    Err(anyhow!(
        "no directory for a copy of the agent: {}",
        failures.join("; ")
    ))
}

fn read_all(mut file: std::fs::File) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut data)?;
    Ok(data)
}

/// FNV-1a: the name tells versions apart; nobody but the directory's user can put a file
/// there, so it needs no resistance to forgery.
fn content_hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn place(dir_fd: &OwnedFd, dir: &Path, name: &str, data: &[u8]) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    // A copy made before is used if it is still exactly the agent (only this user writes here;
    // anything else under the name is replaced).
    if let Ok(stat) = fstatat(dir_fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        && SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
        && stat.st_uid == nix::unistd::geteuid().as_raw()
        && stat.st_size as usize == data.len()
        && let Ok(fd) = openat(
            dir_fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        && let Ok(existing) = read_all(std::fs::File::from(fd))
        && existing == data
    {
        return Ok(path);
    }
    // Written whole under a name of its own, then renamed into place: a process never maps a
    // half-written copy.
    let partial = format!(".{name}.{}", std::process::id());
    let fd = openat(
        dir_fd.as_fd(),
        partial.as_str(),
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o444),
    )
    .with_context(|| format!("cannot create {}", dir.join(&partial).display()))?;
    let written = std::fs::File::from(fd).write_all(data);
    let renamed = written.map_err(anyhow::Error::from).and_then(|()| {
        renameat(dir_fd.as_fd(), partial.as_str(), dir_fd.as_fd(), name).map_err(Into::into)
    });
    if let Err(e) = renamed {
        let _ = nix::unistd::unlinkat(
            dir_fd.as_fd(),
            partial.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn different_contents_get_different_names_and_a_copy_is_made_once() {
        assert_ne!(content_hash(b"agent 1"), content_hash(b"agent 2"));
        let base = std::env::temp_dir().join(format!("livepatch-copy-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let installed = base.join("installed.so");
        std::fs::write(&installed, b"not really an agent").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let copy = private_copy(&installed, Some(base.clone().into())).unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"not really an agent");
        let dir = if me == 0 {
            "agents".to_owned()
        } else {
            me.to_string()
        };
        assert!(copy.starts_with(base.join(dir)));
        // The installed file rewritten in place: a new copy, the old one untouched.
        std::fs::write(&installed, b"the next version").unwrap();
        let next = private_copy(&installed, Some(base.clone().into())).unwrap();
        assert_ne!(next, copy);
        assert_eq!(std::fs::read(&copy).unwrap(), b"not really an agent");
        assert_eq!(
            private_copy(&installed, Some(base.clone().into())).unwrap(),
            next
        );
        // Something else put under the name is replaced, not used.
        std::fs::remove_file(&next).unwrap();
        std::fs::write(&next, b"the next versioN").unwrap();
        assert_eq!(
            private_copy(&installed, Some(base.clone().into())).unwrap(),
            next
        );
        assert_eq!(std::fs::read(&next).unwrap(), b"the next version");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
