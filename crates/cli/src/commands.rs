//! One function per verb: the entry points of `livepatch <verb>`.

use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use livepatch_protocol::{Command, Outcome, Progress};

use crate::Failure;
use crate::client::Client;
use crate::paths;
use crate::render;

type Result = std::result::Result<(), Failure>;

/// Whether and how long to wait for a transition.
#[derive(Clone, Copy, Debug)]
pub struct Wait {
    enabled: bool,
    timeout: Duration,
}

impl Wait {
    /// From the `--no-wait` and `--timeout` options.
    pub fn new(no_wait: bool, timeout: Duration) -> Wait {
        Wait {
            enabled: !no_wait,
            timeout,
        }
    }

    /// When the whole command must be done: the timeout, and time for the last wait request
    /// (the agent answers one within a quarter of a second).
    fn deadline(&self, start: Instant) -> Instant {
        start + self.timeout + Duration::from_millis(500)
    }
}

/// The deadline of a command that may take `timeout`.
fn deadline(timeout: Duration) -> Instant {
    Instant::now() + timeout
}

/// Entry point for `livepatch run`: exec the program with the agent
/// preloaded, keeping the PID.
pub fn run(program: &str, args: &[String]) -> Result {
    let agent = paths::agent()?;
    let preload = match std::env::var("LD_PRELOAD") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", agent.display()),
        _ => agent.display().to_string(),
    };
    let err = std::process::Command::new(program)
        .args(args)
        .env("LD_PRELOAD", preload)
        .exec();
    Err(anyhow!("cannot run {program}: {err}").into())
}

/// Entry point for `livepatch agent-path`.
pub fn agent_path() -> Result {
    println!("{}", paths::agent()?.display());
    Ok(())
}

/// Entry point for `livepatch include-path`.
pub fn include_path() -> Result {
    println!("{}", paths::include()?.display());
    Ok(())
}

/// Entry point for `livepatch load`.
pub fn load(pid: u32, patch: &Path, wait: Wait) -> Result {
    let start = Instant::now();
    let path = patch
        .canonicalize()
        .with_context(|| format!("cannot use patch library {}", patch.display()))?;
    let mut client = Client::connect(pid, wait.deadline(start))?;
    let outcome = client.call(Command::Load {
        path: path.display().to_string(),
    })?;
    let Outcome::Done { patch: Some(name) } = outcome else {
        return Err(anyhow!("unexpected answer to load: {outcome:?}").into());
    };
    if !wait.enabled {
        println!("livepatch: patch '{name}' loaded into process {pid}; its transition runs on");
        return Ok(());
    }
    let progress = wait_for_transition(&mut client, pid, &name, true, wait)?;
    match progress.enabled {
        Some(true) => {
            println!("livepatch: patch '{name}' enabled in process {pid}");
            Ok(())
        }
        _ => Err(anyhow!(
            "patch '{name}' was disabled in process {pid} before its transition completed"
        )
        .into()),
    }
}

/// Entry point for `livepatch disable`.
pub fn disable(pid: u32, patch: &str, wait: Wait) -> Result {
    let mut client = Client::connect(pid, wait.deadline(Instant::now()))?;
    client.call(Command::Disable {
        patch: patch.into(),
    })?;
    if !wait.enabled {
        println!("livepatch: disabling patch '{patch}' in process {pid}; its transition runs on");
        return Ok(());
    }
    let progress = wait_for_transition(&mut client, pid, patch, false, wait)?;
    match progress.enabled {
        None => {
            println!("livepatch: patch '{patch}' disabled in process {pid}");
            Ok(())
        }
        Some(_) => Err(anyhow!(
            "patch '{patch}' was enabled again in process {pid} before its transition completed"
        )
        .into()),
    }
}

/// Entry point for `livepatch enable`.
pub fn enable(pid: u32, patch: &str, timeout: Duration) -> Result {
    Client::connect(pid, deadline(timeout))?.call(Command::Enable {
        patch: patch.into(),
    })?;
    println!("livepatch: transition of patch '{patch}' reversed to patching in process {pid}");
    Ok(())
}

/// Entry point for `livepatch force`.
pub fn force(pid: u32, patch: &str, timeout: Duration) -> Result {
    Client::connect(pid, deadline(timeout))?.call(Command::Force {
        patch: patch.into(),
    })?;
    println!(
        "livepatch: transition of patch '{patch}' forced in process {pid}; \
         threads still in old code keep running it"
    );
    Ok(())
}

/// Entry point for `livepatch unload`.
pub fn unload(pid: u32, patch: &str, timeout: Duration) -> Result {
    Client::connect(pid, deadline(timeout))?.call(Command::Unload {
        patch: patch.into(),
    })?;
    println!("livepatch: patch library of '{patch}' unloaded from process {pid}");
    Ok(())
}

/// Entry point for `livepatch list`.
pub fn list(pid: Option<u32>, timeout: Duration) -> Result {
    let rows = match pid {
        // One process asked for by name: any failure is an error.
        Some(pid) => vec![(
            pid,
            Some(Client::connect(pid, deadline(timeout))?.status()?),
        )],
        // Sockets of processes that died or whose agent does not answer are
        // listed without patches rather than failing the listing.
        None => agent_pids()
            .into_iter()
            .map(|pid| {
                let status = Client::connect(pid, deadline(timeout)).and_then(|mut c| c.status());
                (pid, status.ok())
            })
            .collect(),
    };
    print!("{}", render::list(&rows));
    Ok(())
}

/// The processes that have an agent's socket (in any base directory, under any user's
/// directory this command may read) and that are alive.
fn agent_pids() -> Vec<u32> {
    let mut bases = livepatch_protocol::socket::bases(
        std::env::var_os(livepatch_protocol::socket::SOCKET_DIR_ENV).as_deref(),
    );
    bases.extend(livepatch_protocol::socket::bases(None));
    let mut pids: Vec<u32> = bases
        .iter()
        .filter_map(|base| std::fs::read_dir(base).ok())
        .flatten()
        .filter_map(|user| std::fs::read_dir(user.ok()?.path()).ok())
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".sock")?.parse().ok()
        })
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Entry point for `livepatch status`.
pub fn status(pid: u32, patch: Option<&str>, json: bool, timeout: Duration) -> Result {
    let mut status = Client::connect(pid, deadline(timeout))?.status()?;
    if let Some(name) = patch {
        if !status.patches.iter().any(|p| p.name == name)
            && !status.unloadable.iter().any(|l| l.patch == name)
        {
            return Err(anyhow!("process {pid} has no patch '{name}'").into());
        }
        status.patches.retain(|p| p.name == name);
        status.unloadable.retain(|l| l.patch == name);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).map_err(anyhow::Error::from)?
        );
    } else {
        print!("{}", render::status(&status));
    }
    Ok(())
}

/// Entry point for `livepatch log`.
pub fn log(pid: u32, follow: bool, timeout: Duration) -> Result {
    let mut client = Client::connect(pid, deadline(timeout))?;
    let mut after = 0;
    loop {
        // Following has no end: the timeout bounds each request.
        client.extend_deadline(deadline(timeout));
        let Outcome::Log { lines } = client.call(Command::Log { after })? else {
            return Err(anyhow!("unexpected answer to a log request").into());
        };
        for line in &lines {
            println!("{}", line.text);
            after = line.seq;
        }
        if !follow {
            return Ok(());
        }
        if lines.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits until `patch` is no longer in transition, showing which threads are pending. Times
/// out with [`Failure::Timeout`].
fn wait_for_transition(
    client: &mut Client,
    pid: u32,
    patch: &str,
    patching: bool,
    wait: Wait,
) -> std::result::Result<Progress, Failure> {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = String::new();
    // The agent answers a wait as soon as the transition ends; between answers the progress
    // line is refreshed.
    let progress_period = Duration::from_millis(250);
    let mut progress = client.wait(patch, Duration::ZERO)?;
    loop {
        let running = progress
            .transition
            .as_ref()
            .is_some_and(|t| t.patch == patch);
        if !running {
            if tty && !last_line.is_empty() {
                eprint!("\r\x1b[K");
            }
            return Ok(progress);
        }
        let line = render::progress(&progress, patch);
        if tty {
            eprint!("\r\x1b[K{line}");
        } else if line != last_line {
            eprintln!("{line}");
        }
        last_line = line;
        if start.elapsed() >= wait.timeout {
            if tty {
                eprintln!();
            }
            return Err(Failure::Timeout(render::timeout_advice(
                &progress,
                pid,
                patch,
                patching,
                wait.timeout,
            )));
        }
        let left = wait.timeout.saturating_sub(start.elapsed());
        progress = client.wait(patch, left.min(progress_period))?;
    }
}
