//! One function per verb: the entry points of `livepatch <verb>`.

use std::io::IsTerminal;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use livepatch_protocol::{Command, Outcome, Progress};

use crate::Failure;
use crate::agent_copy;
use crate::client::Client;
use crate::paths;
use crate::render;
use crate::targets;

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
    // A program the loader does not load gets no agent, and would run unpatchable without a
    // word: say so instead.
    if let Some(file) = find_program(program)
        && let Ok(data) = std::fs::read(&file)
        && let Err(why) = livepatch_attach::preflight::loadable_program(&data)
    {
        return Err(anyhow!(
            "cannot run {} with the agent: {}, {why}",
            program.escape_debug(),
            file.display().to_string().escape_debug()
        )
        .into());
    }
    let agent = private_agent(&agent);
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

/// Entry point for `livepatch attach`.
pub fn attach(pid: u32, timeout: Duration) -> Result {
    let deadline = deadline(timeout);
    match Client::connect(pid, deadline) {
        Ok(_) => {
            println!("livepatch: process {pid} has an agent already");
            return Ok(());
        }
        Err(e) if e.downcast_ref::<crate::socket::NoAgent>().is_none() => return Err(e.into()),
        Err(_) => {}
    }
    attach_agent(pid, deadline)?;
    Ok(())
}

/// The private copy of the agent (see [`agent_copy`]); the installed file, with a warning,
/// where no copy can be made.
/// Made once per command: `load --children` attaches to every worker with the same copy.
fn private_agent(installed: &Path) -> std::path::PathBuf {
    static COPY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let socket_dir = std::env::var_os(livepatch_protocol::socket::SOCKET_DIR_ENV);
        match agent_copy::private_copy(installed, socket_dir) {
            Ok(copy) => copy,
            Err(e) => {
                eprintln!(
                    "livepatch: warning: {e:#}; the process maps the installed agent {}, which \
                     an upgrade that rewrites it in place would change under it",
                    installed.display()
                );
                installed.to_owned()
            }
        }
    })
    .clone()
}

/// Loads the agent into process `pid`, which has none, and says so.
pub fn attach_agent(pid: u32, deadline: Instant) -> anyhow::Result<()> {
    let installed = paths::agent()?;
    let attached = livepatch_attach::attach(pid, || private_agent(&installed), deadline)
        .map_err(|e| anyhow!("cannot attach to process {pid}: {e}"))?;
    println!(
        "livepatch: agent attached to process {pid} (its thread {} was stopped for {:.1} ms)",
        attached.tid,
        attached.stopped.as_secs_f64() * 1000.0
    );
    Ok(())
}

/// The file `exec` would run for `program`: a path as given, a name searched in `$PATH`.
fn find_program(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Some(program.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
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

/// Entry point for `livepatch load`: loads into every target before waiting for any; a refusal
/// in one undoes the load in those done before it, so that no process is left patched alone.
pub fn load(pid: u32, patch: &Path, children: bool, wait: Wait) -> Result {
    let start = Instant::now();
    let path = patch
        .canonicalize()
        .with_context(|| format!("cannot use patch library {}", patch.display()))?;
    let mut targets = targets::reach(
        pid,
        children,
        targets::Attach::Missing,
        wait.deadline(start),
    )?;
    let mut name = None;
    for i in 0..targets.len() {
        let target = &mut targets[i];
        let loaded = target.client.call(Command::Load {
            path: path.display().to_string(),
        });
        match loaded {
            Ok(Outcome::Done {
                patch: Some(loaded),
            }) => name = Some(loaded),
            Ok(other) => {
                return Err(anyhow!("unexpected answer to load: {other:?}").into());
            }
            Err(e) if i == 0 => return Err(e.into()),
            Err(e) => {
                let refused = target.pid;
                let name = name.unwrap_or_default();
                let undone = undo_loads(&mut targets[..i], &name, wait);
                return Err(e
                    .context(format!("process {refused} refused the patch; {undone}"))
                    .into());
            }
        }
    }
    let Some(name) = name else {
        return Err(anyhow!("no process to load into").into());
    };
    if !wait.enabled {
        for target in &targets {
            println!(
                "livepatch: patch '{name}' loaded into process {}; its transition runs on",
                target.pid
            );
        }
        return Ok(());
    }
    wait_for_all(&mut targets, &name, true, wait, start)
}

/// Disables and unloads the patch the first targets took before another refused it: what
/// happened, said in one sentence.
fn undo_loads(done: &mut [targets::Target], patch: &str, wait: Wait) -> String {
    let mut undone = Vec::new();
    let mut kept = Vec::new();
    for target in done.iter_mut() {
        let pid = target.pid;
        let client = &mut target.client;
        client.extend_deadline(wait.deadline(Instant::now()));
        let result = client
            .call(Command::Disable {
                patch: patch.into(),
            })
            .map_err(Failure::from)
            .and_then(|_| wait_for_transition(client, pid, patch, false, wait))
            .and_then(|_| {
                client
                    .call(Command::Unload {
                        patch: patch.into(),
                    })
                    .map_err(Failure::from)
            });
        match result {
            Ok(_) => undone.push(pid.to_string()),
            Err(Failure::Error(e)) => kept.push(format!("{pid} ({e:#})")),
            Err(Failure::Timeout(_)) => {
                kept.push(format!("{pid} (its unpatching transition runs on)"))
            }
        }
    }
    match (undone.is_empty(), kept.is_empty()) {
        (true, true) => "it was loaded nowhere else".to_owned(),
        (false, true) => format!(
            "disabled and unloaded again in process {}",
            undone.join(", ")
        ),
        (_, false) if undone.is_empty() => format!("NOT undone in process {}", kept.join(", ")),
        _ => format!(
            "disabled and unloaded again in process {}, NOT undone in process {}",
            undone.join(", "),
            kept.join(", ")
        ),
    }
}

/// Waits for the transition of `patch` in every target, all within one timeout, and says how
/// each ended; the timeouts and failures of all are reported together.
fn wait_for_all(
    targets: &mut [targets::Target],
    patch: &str,
    patching: bool,
    wait: Wait,
    start: Instant,
) -> Result {
    let several = targets.len() > 1;
    let mut timeouts = Vec::new();
    let mut errors = Vec::new();
    for target in targets.iter_mut() {
        let pid = target.pid;
        let left = Wait {
            enabled: true,
            timeout: wait
                .timeout
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1)),
        };
        let progress = match wait_for_transition(&mut target.client, pid, patch, patching, left) {
            Ok(progress) => progress,
            Err(Failure::Timeout(advice)) if several => {
                timeouts.push(format!("process {pid}: {advice}"));
                continue;
            }
            Err(Failure::Error(e)) if several => {
                errors.push(format!("process {pid}: {e:#}"));
                continue;
            }
            Err(failure) => return Err(failure),
        };
        match (patching, progress.enabled) {
            (true, Some(true)) => println!("livepatch: patch '{patch}' enabled in process {pid}"),
            (false, None) => println!("livepatch: patch '{patch}' disabled in process {pid}"),
            (true, _) => errors.push(format!(
                "patch '{patch}' was disabled in process {pid} before its transition completed"
            )),
            (false, Some(_)) => errors.push(format!(
                "patch '{patch}' was enabled again in process {pid} before its transition \
                 completed"
            )),
        }
    }
    if !errors.is_empty() {
        return Err(anyhow!("{}", errors.join("\n")).into());
    }
    if !timeouts.is_empty() {
        return Err(Failure::Timeout(timeouts.join("\n")));
    }
    Ok(())
}

/// The targets that have `patch` (with `need_enabled`: enabled, else loaded at all); with
/// several targets those without it are named on standard error and passed over, a single one
/// is kept so that its agent says why.
fn having_patch(
    targets: Vec<targets::Target>,
    patch: &str,
    need_enabled: bool,
) -> std::result::Result<Vec<targets::Target>, Failure> {
    if targets.len() == 1 {
        return Ok(targets);
    }
    let mut having = Vec::new();
    for mut target in targets {
        let status = target.client.status()?;
        let enabled = status.patches.iter().any(|p| p.name == patch);
        let loaded = enabled || status.unloadable.iter().any(|l| l.patch == patch);
        if (need_enabled && enabled) || (!need_enabled && loaded) {
            having.push(target);
        } else {
            eprintln!(
                "livepatch: process {} has no patch '{patch}': passed over",
                target.pid
            );
        }
    }
    if having.is_empty() {
        return Err(anyhow!("no process of the tree has a patch '{patch}'").into());
    }
    Ok(having)
}

/// With several targets, an error names the process it came from.
fn in_process(e: anyhow::Error, pid: u32, several: bool) -> anyhow::Error {
    if several {
        e.context(format!("process {pid}"))
    } else {
        e
    }
}

/// Entry point for `livepatch disable`.
pub fn disable(pid: u32, patch: &str, children: bool, wait: Wait) -> Result {
    let start = Instant::now();
    let targets = targets::reach(pid, children, targets::Attach::Never, wait.deadline(start))?;
    let mut targets = having_patch(targets, patch, true)?;
    let several = targets.len() > 1;
    for target in &mut targets {
        let pid = target.pid;
        target
            .client
            .call(Command::Disable {
                patch: patch.into(),
            })
            .map_err(|e| in_process(e, pid, several))?;
    }
    if !wait.enabled {
        for target in &targets {
            println!(
                "livepatch: disabling patch '{patch}' in process {}; its transition runs on",
                target.pid
            );
        }
        return Ok(());
    }
    wait_for_all(&mut targets, patch, false, wait, start)
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
pub fn unload(pid: u32, patch: &str, children: bool, timeout: Duration) -> Result {
    let targets = targets::reach(pid, children, targets::Attach::Never, deadline(timeout))?;
    let targets = having_patch(targets, patch, false)?;
    let several = targets.len() > 1;
    for mut target in targets {
        let pid = target.pid;
        target
            .client
            .call(Command::Unload {
                patch: patch.into(),
            })
            .map_err(|e| in_process(e, pid, several))?;
        println!(
            "livepatch: patch library of '{patch}' unloaded from process {}",
            target.pid
        );
    }
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
/// directory this command may read) and that are alive. The socket of a process that is gone
/// is removed where this user may (a worker that dropped root's privileges cannot remove its
/// own at exit).
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
            let e = e.ok()?;
            let pid: u32 = e
                .file_name()
                .to_str()?
                .strip_suffix(".sock")?
                .parse()
                .ok()?;
            if Path::new(&format!("/proc/{pid}")).exists() {
                return Some(pid);
            }
            if e.file_type().is_ok_and(|t| t.is_socket()) {
                let _ = std::fs::remove_file(e.path());
            }
            None
        })
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
