//! Each request of the control protocol carried out under the agent's lock, and its answer:
//! `insmod`, writes to `enabled` and `force`, `rmmod`, and the reads.

use livepatch_core::{Errno, PatchState};
use livepatch_protocol::{Command, Outcome, Response};

use crate::agent::{Agent, AgentState};
use crate::library::{self, LibraryError};

fn error(errno: Errno, message: impl Into<String>) -> Response {
    Response::error(errno.0, message)
}

fn done(patch: &str) -> Response {
    Response::new(Outcome::Done {
        patch: Some(patch.to_string()),
    })
}

fn refused(e: &LibraryError) -> Response {
    error(e.errno(), e.to_string())
}

/// Answers one request of the control socket.
pub fn handle(agent: &Agent, command: Command) -> Response {
    if let Command::Log { after } = command {
        return Response::new(Outcome::Log {
            lines: agent.log().since(after),
        });
    }
    let mut guard = agent.lock();
    let state = &mut *guard;
    state.platform.objects.refresh();
    state.platform.retry_restores();
    match command {
        Command::Load { path } => load(state, &path),
        Command::Disable { patch } => set_enabled(state, &patch, false),
        Command::Enable { patch } => set_enabled(state, &patch, true),
        Command::Force { patch } => force(state, &patch),
        Command::Unload { patch } => {
            match library::rmmod(&state.core, &mut state.platform, &patch) {
                Ok(()) => done(&patch),
                Err(e) => refused(&e),
            }
        }
        Command::Status => {
            Response::new(Outcome::Status(super::status::status(state, agent.pid())))
        }
        // The server holds a wait back until it can be answered.
        Command::Wait { patch, .. } => {
            Response::new(Outcome::Progress(super::status::progress(state, &patch)))
        }
        Command::Log { .. } => unreachable!("answered above"),
    }
}

/// `insmod`: load, validate, enable; on any failure nothing stays.
fn load(state: &mut AgentState, path: &str) -> Response {
    if crate::looks_for_libraries()
        && let Err(why) = crate::ffi::interpose::interpose_by_redirect()
    {
        state.platform.log.agent(
            livepatch_core::Level::Warn,
            format_args!(
                "dlopen, dlclose and pthread_create are not interposed ({why}): libraries \
                 coming and going are looked for every {} ms, threads as they are found",
                crate::ATTACHED_LIBRARY_POLL.as_millis()
            ),
        );
    }
    let result = library::insmod(&mut state.core, &mut state.platform, path);
    // The library and its dependencies are new objects too (or went away again).
    crate::notifier::sync_objects(
        &mut state.core,
        &mut state.platform,
        crate::notifier::Refusals::Logged,
    );
    match result {
        Ok(name) => done(&name),
        Err(e) => refused(&e),
    }
}

fn no_such_active_patch(state: &AgentState, patch: &str) -> Response {
    match state.platform.libraries.find(patch) {
        Some(_) => error(
            Errno::EINVAL,
            format!(
                "patch '{patch}' is disabled; a disabled patch cannot be enabled again, load its library anew"
            ),
        ),
        None => error(Errno::ENOENT, format!("no patch '{patch}' in this process")),
    }
}

/// A write to `enabled`.
fn set_enabled(state: &mut AgentState, patch: &str, enabled: bool) -> Response {
    if !state.core.has_patch(patch) {
        return no_such_active_patch(state, patch);
    }
    match state.core.set_enabled(&mut state.platform, patch, enabled) {
        Ok(()) => done(patch),
        Err(errno) => {
            let transition = state.core.transition().map(|(n, t)| (n.to_string(), t));
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

/// A write to `force`.
fn force(state: &mut AgentState, patch: &str) -> Response {
    if !state.core.has_patch(patch) {
        return no_such_active_patch(state, patch);
    }
    match state.core.force(&mut state.platform, patch) {
        Ok(()) => done(patch),
        Err(errno) => error(errno, format!("patch '{patch}' is not in transition")),
    }
}
