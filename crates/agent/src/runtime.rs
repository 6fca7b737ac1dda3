//! The agent: its one instance per process, its start, and the requests of
//! the control socket, each run under the agent's lock (the kernel's
//! `klp_mutex`).

use std::ffi::{CString, c_void};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use std::collections::HashMap;

use livepatch_core::{BlockReason, Errno, Livepatch, PatchState, ShadowVars, ThreadState, Tid};
use livepatch_protocol::{
    Command, FuncStatus, LibraryStatus, ObjectStatus, Outcome, PatchStatus, Progress, Response,
    Status, ThreadStatus, TransitionStatus,
};

use crate::abi::{self, KlpPatch};
use crate::log::AgentLog;
use crate::platform::ProcessPlatform;
use crate::{loader, threads};

/// A patch library the agent loaded.
#[derive(Debug)]
pub struct PatchLibrary {
    /// The patch's name.
    pub name: String,
    /// Where it was loaded from.
    pub path: String,
    /// The `dlopen` handle.
    pub handle: usize,
    /// Its `struct klp_patch`.
    pub decl: usize,
    /// Still active in the core.
    pub active: bool,
    /// Took part in a forced transition.
    pub forced: bool,
}

/// Everything the lock protects.
#[derive(Debug)]
pub struct Inner {
    /// The livepatch core.
    pub core: Livepatch,
    /// The platform the core acts through.
    pub platform: ProcessPlatform,
    /// Loaded patch libraries, in load order.
    pub libraries: Vec<PatchLibrary>,
}

/// The agent of this process.
#[derive(Debug)]
pub struct Agent {
    /// The log.
    pub log: &'static AgentLog,
    /// Shadow variables of patch code.
    pub shadow: ShadowVars,
    inner: Mutex<Inner>,
    pid: u32,
}

static AGENT: OnceLock<Agent> = OnceLock::new();
static LOG: OnceLock<AgentLog> = OnceLock::new();

/// The agent, if it started.
pub fn agent() -> Option<&'static Agent> {
    AGENT.get()
}

/// The log (available even before the agent started).
pub fn log() -> &'static AgentLog {
    LOG.get_or_init(AgentLog::from_env)
}

/// Why the agent did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The check signal cannot be used.
    #[error("{0}")]
    Signal(String),
    /// The control socket could not be created.
    #[error("cannot create the control socket: {0}")]
    Socket(std::io::Error),
    /// The control thread could not be started.
    #[error("cannot start the control thread: {0}")]
    Thread(std::io::Error),
}

/// Starts the agent once per process: installs the check signal, creates
/// the control socket and starts the control thread. Later calls return
/// at once.
pub fn start() -> Result<(), StartError> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    let r = STARTED.get_or_init(|| start_once().map_err(|e| e.to_string()));
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(StartError::Signal(e.clone())),
    }
}

fn start_once() -> Result<(), StartError> {
    loader::resolve_next_definitions();
    let log = log();
    let platform = ProcessPlatform::new(log).map_err(StartError::Signal)?;
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    let (listener, path) = crate::server::bind(pid).map_err(StartError::Socket)?;
    let shadow_log = log;
    let agent = Agent {
        log,
        shadow: ShadowVars::with_log(move |r| shadow_log.core(&r)),
        inner: Mutex::new(Inner {
            core: Livepatch::new(),
            platform,
            libraries: Vec::new(),
        }),
        pid,
    };
    if AGENT.set(agent).is_err() {
        return Ok(());
    }
    let agent = AGENT.get().expect("just set");
    remove_socket_at_exit(path);
    std::thread::Builder::new()
        .name("livepatch".into())
        .spawn(move || crate::server::serve(agent, listener))
        .map_err(StartError::Thread)?;
    Ok(())
}

/// The socket file goes when the process exits normally.
fn remove_socket_at_exit(path: std::path::PathBuf) {
    static PATH: OnceLock<CString> = OnceLock::new();
    let Ok(c) = CString::new(path.into_os_string().into_encoded_bytes()) else {
        return;
    };
    if PATH.set(c).is_err() {
        return;
    }
    extern "C" fn unlink_socket() {
        if let Some(p) = PATH.get() {
            // SAFETY: a valid C string; unlink has no other effect.
            unsafe { libc::unlink(p.as_ptr()) };
        }
    }
    // SAFETY: registers a function without arguments, valid forever.
    unsafe { libc::atexit(unlink_socket) };
}

fn error(errno: Errno, message: impl Into<String>) -> Response {
    Response::error(errno.0, message)
}

impl Agent {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Takes the lock.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long until the transition work is due; `None` when no transition
    /// runs.
    pub fn until_next_work(&self) -> Option<Duration> {
        let mut inner = self.lock();
        let at = inner.core.next_work_at()?;
        let now = livepatch_core::Platform::now(&mut inner.platform);
        Some(at.saturating_sub(now))
    }

    /// Runs the transition work if it is due.
    pub fn run_work(&self) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.platform.refresh();
        inner.core.transition_work(&mut inner.platform);
        inner.sync_libraries();
    }

    /// Whether `patch` is in transition now.
    pub fn in_transition(&self, patch: &str) -> bool {
        self.lock()
            .core
            .transition()
            .is_some_and(|(name, _)| name == patch)
    }

    /// Answers one request of the control socket.
    pub fn handle(&self, command: Command) -> Response {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.platform.refresh();
        let response = match command {
            Command::Load { path } => inner.load(&path),
            Command::Disable { patch } => inner.set_enabled(&patch, false),
            Command::Enable { patch } => inner.set_enabled(&patch, true),
            Command::Force { patch } => inner.force(&patch),
            Command::Unload { patch } => inner.unload(&patch),
            Command::Status => Response::new(Outcome::Status(inner.status(self.pid))),
            // The server holds a wait back until it can be answered.
            Command::Wait { patch, .. } => Response::new(Outcome::Progress(inner.progress(&patch))),
            Command::Log { after } => Response::new(Outcome::Log {
                lines: self.log.since(after),
            }),
        };
        inner.sync_libraries();
        response
    }
}

/// The default name of a patch: the library's file name without a leading
/// "lib" and the ".so" suffix.
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

impl Inner {
    /// Tells the core about libraries that appeared in or left the link map
    /// since the last look: going ones first (their addresses may be reused
    /// by coming ones). Returns why a coming library was refused, if one was;
    /// the caller must unload it again.
    pub fn sync_objects(&mut self) -> Option<String> {
        let (gone, new) = self.platform.object_changes();
        for name in gone {
            self.core.object_going(&mut self.platform, &name);
            self.platform.object_gone(&name);
        }
        let mut refused = None;
        let active = self.active_patch_names();
        for name in new {
            if name == livepatch_core::MAIN_OBJECT_NAME {
                continue;
            }
            if let Err(e) = self.platform.check_coming_build_id(&name, &active) {
                refused = Some(e);
                continue;
            }
            match self.core.object_coming(&mut self.platform, &name) {
                Ok(()) => self.platform.object_known(&name),
                Err(e) => refused = Some(e.to_string()),
            }
        }
        self.sync_libraries();
        refused
    }

    fn active_patch_names(&self) -> std::collections::BTreeSet<String> {
        self.libraries
            .iter()
            .filter(|l| l.active)
            .map(|l| l.name.clone())
            .collect()
    }

    /// Marks the libraries whose patch the core released.
    fn sync_libraries(&mut self) {
        for (name, forced) in self.platform.take_released() {
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

    /// `insmod`: load, validate, enable; on any failure nothing stays.
    fn load(&mut self, path: &str) -> Response {
        let r = self.load_library(path);
        // The library and its dependencies are new objects too.
        self.sync_objects();
        r
    }

    fn load_library(&mut self, path: &str) -> Response {
        if let Some(lib) = self.libraries.iter().find(|l| l.path == path) {
            return error(
                Errno::EEXIST,
                format!("{path} is already loaded (patch '{}')", lib.name),
            );
        }
        let handle = match loader::open_patch_library(path) {
            Ok(h) => h,
            Err(e) => return error(Errno::EINVAL, e),
        };
        // SAFETY: `handle` was just opened and each failure path below closes it once.
        let close = |h: *mut c_void| unsafe { loader::close_library(h) };
        // SAFETY: `handle` was just opened.
        let decl = match unsafe { loader::patch_declaration(handle) } {
            Ok(d) => d,
            Err(e) => {
                close(handle);
                return error(Errno::EINVAL, format!("{path}: {e}"));
            }
        };
        // SAFETY: `decl` is the KLP_PATCH declaration of a library we keep
        // loaded while we read it.
        let desc = match unsafe { abi::read_patch(decl, &default_patch_name(path)) } {
            Ok(d) => d,
            Err(e) => {
                close(handle);
                return error(Errno::EINVAL, format!("{path}: malformed patch: {e}"));
            }
        };
        // SAFETY: as for read_patch, which accepted the declaration.
        let build_ids = match unsafe { abi::read_build_ids(decl) } {
            Ok(ids) => ids,
            Err(e) => {
                close(handle);
                return error(Errno::EINVAL, format!("{path}: malformed patch: {e}"));
            }
        };
        if let Err(e) = self.platform.check_build_ids(&build_ids) {
            close(handle);
            return error(Errno::EINVAL, format!("patch '{}' refused: {e}", desc.name));
        }
        self.platform.declare_patch(&desc.name, decl, build_ids);
        match self.core.enable_patch(&mut self.platform, &desc) {
            Ok(_) => {
                self.libraries.push(PatchLibrary {
                    name: desc.name.clone(),
                    path: path.to_string(),
                    handle: handle as usize,
                    decl: decl as usize,
                    active: true,
                    forced: false,
                });
                Response::new(Outcome::Done {
                    patch: Some(desc.name),
                })
            }
            Err(e) => {
                self.platform.forget_patch(&desc.name);
                close(handle);
                error(
                    e.errno,
                    format!("patch '{}' refused: {}", desc.name, e.reason),
                )
            }
        }
    }

    fn set_enabled(&mut self, patch: &str, enabled: bool) -> Response {
        if !self.core.has_patch(patch) {
            return self.no_such_active_patch(patch);
        }
        match self.core.set_enabled(&mut self.platform, patch, enabled) {
            Ok(()) => Response::new(Outcome::Done {
                patch: Some(patch.to_string()),
            }),
            Err(errno) => {
                let transition = self.core.transition().map(|(n, t)| (n.to_string(), t));
                let msg = match (errno, transition) {
                    (Errno::EBUSY, Some((other, _))) => format!(
                        "patch '{other}' is in transition; wait for it to complete, or reverse or force it first"
                    ),
                    (Errno::EINVAL, Some((name, target))) if name == patch => format!(
                        "patch '{patch}' is already in transition to {}",
                        if target == PatchState::Patched {
                            "patched"
                        } else {
                            "unpatched"
                        }
                    ),
                    (Errno::EINVAL, _) if enabled => format!(
                        "patch '{patch}' is enabled; `enable` only reverses an unpatching transition"
                    ),
                    (Errno::EINVAL, _) => format!("patch '{patch}' is not enabled"),
                    (e, _) => format!("patch '{patch}': {e}"),
                };
                error(errno, msg)
            }
        }
    }

    fn force(&mut self, patch: &str) -> Response {
        if !self.core.has_patch(patch) {
            return self.no_such_active_patch(patch);
        }
        match self.core.force(&mut self.platform, patch) {
            Ok(()) => Response::new(Outcome::Done {
                patch: Some(patch.to_string()),
            }),
            Err(errno) => error(errno, format!("patch '{patch}' is not in transition")),
        }
    }

    fn no_such_active_patch(&self, patch: &str) -> Response {
        match self.libraries.iter().find(|l| l.name == patch) {
            Some(_) => error(
                Errno::EINVAL,
                format!(
                    "patch '{patch}' is disabled; a disabled patch cannot be enabled again, load its library anew"
                ),
            ),
            None => error(Errno::ENOENT, format!("no patch '{patch}' in this process")),
        }
    }

    /// `rmmod`: only a disabled patch that was never forced.
    fn unload(&mut self, patch: &str) -> Response {
        let Some(i) = self.libraries.iter().position(|l| l.name == patch) else {
            return error(Errno::ENOENT, format!("no patch '{patch}' in this process"));
        };
        let lib = &self.libraries[i];
        if lib.active {
            let what = if self.core.transition().is_some_and(|(n, _)| n == patch) {
                "in transition"
            } else {
                "enabled"
            };
            return error(
                Errno::EBUSY,
                format!("patch '{patch}' is {what}; disable it and wait for its transition first"),
            );
        }
        if lib.forced {
            return error(
                Errno::EBUSY,
                format!(
                    "patch '{patch}' took part in a forced transition: threads may still run its code, \
                     so its library can never be unloaded"
                ),
            );
        }
        let lib = self.libraries.remove(i);
        self.platform.forget_patch(&lib.name);
        // SAFETY: the library's handle, opened by `load_library` and closed only here.
        unsafe { loader::close_library(lib.handle as *mut c_void) };
        Response::new(Outcome::Done {
            patch: Some(lib.name),
        })
    }

    /// What `livepatch status` shows.
    fn status(&mut self, pid: u32) -> Status {
        let transition = self.transition_status();
        let patches = self
            .core
            .patch_statuses()
            .into_iter()
            .map(|p| PatchStatus {
                library: self
                    .libraries
                    .iter()
                    .find(|l| l.name == p.name && l.active)
                    .map(|l| l.path.clone())
                    .unwrap_or_default(),
                name: p.name,
                enabled: p.enabled,
                transition: p.transition,
                forced: p.forced,
                replace: p.replace,
                stack_order: p.stack_order,
                objects: p
                    .objects
                    .into_iter()
                    .map(|o| ObjectStatus {
                        name: o.name,
                        patched: o.patched,
                        funcs: o
                            .funcs
                            .into_iter()
                            .map(|f| FuncStatus {
                                name: f.old_name,
                                sympos: f.old_sympos,
                                nop: f.nop,
                                old_addr: f.old_addr,
                                new_addr: f.new_addr,
                                patched: f.patched,
                                transition: f.transition,
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        let unloadable = self
            .libraries
            .iter()
            .filter(|l| !l.active)
            .map(|l| LibraryStatus {
                patch: l.name.clone(),
                library: l.path.clone(),
                forced: l.forced,
            })
            .collect();
        let blocked: HashMap<Tid, BlockReason> = self.core.blocked_threads().into_iter().collect();
        let threads = livepatch_core::Platform::threads(&mut self.platform)
            .into_iter()
            .map(|tid| {
                let state = threads::state_of(tid).unwrap_or(ThreadState::IDLE);
                self.thread_status(tid, state, blocked.get(&tid))
            })
            .collect();
        Status {
            pid,
            transition,
            patches,
            unloadable,
            threads,
        }
    }

    /// Where the transition stands, for a client waiting for `patch`.
    fn progress(&mut self, patch: &str) -> Progress {
        let transition = self.transition_status();
        let tids = livepatch_core::Platform::threads(&mut self.platform);
        let mut pending = Vec::new();
        if transition.as_ref().is_some_and(|t| t.patch == patch) {
            let blocked: HashMap<Tid, BlockReason> =
                self.core.blocked_threads().into_iter().collect();
            for &tid in &tids {
                let state = threads::state_of(tid).unwrap_or(ThreadState::IDLE);
                if state.pending {
                    pending.push(self.thread_status(tid, state, blocked.get(&tid)));
                }
            }
        }
        Progress {
            transition,
            enabled: self.core.is_enabled(patch),
            threads: tids.len(),
            pending,
        }
    }

    fn transition_status(&self) -> Option<TransitionStatus> {
        self.core
            .transition()
            .map(|(name, target)| TransitionStatus {
                patch: name.to_string(),
                target: if target == PatchState::Patched {
                    "patched"
                } else {
                    "unpatched"
                }
                .into(),
            })
    }

    fn thread_status(
        &mut self,
        tid: Tid,
        state: ThreadState,
        blocked: Option<&BlockReason>,
    ) -> ThreadStatus {
        ThreadStatus {
            tid,
            name: livepatch_core::Platform::thread_name(&mut self.platform, tid),
            patch_state: state.state.as_i8(),
            pending: state.pending,
            blocking: blocked.map(|r| self.platform.describe_block(tid, r)),
        }
    }

    /// The declaration of the loaded patch `name`.
    pub fn declaration(&self, name: &str) -> Option<*mut KlpPatch> {
        self.libraries
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.decl as *mut KlpPatch)
    }
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
