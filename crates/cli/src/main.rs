//! `livepatch`: patch running processes live.
//!
//! The command only asks; the agent inside the target process owns all
//! state. Exit status: 0 done; 1 refused or failed; 2 usage; 3 a wait timed
//! out and the transition is still running.

#![forbid(unsafe_code)]

mod agent_copy;
mod client;
mod commands;
mod paths;
mod process_tree;
mod render;
mod socket;
mod targets;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Kernel-grade live patching for Linux processes.
///
/// Start a program with the agent (`livepatch run`), write a patch library in
/// C against `livepatch.h`, and load it into the running program. Patches
/// switch thread by thread, each when none of the code being replaced is on
/// its stack, with the semantics of the Linux kernel's livepatch.
#[derive(Debug, Parser)]
#[command(name = "livepatch", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Debug, Subcommand)]
enum Verb {
    /// Execute PROGRAM with the agent preloaded (same PID).
    Run {
        /// The program to run.
        program: String,
        /// Its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Load the agent into a running process that was started without it.
    ///
    /// One thread is stopped with ptrace at a point where it holds neither the dynamic
    /// loader's nor the allocator's locks, loads the agent, and is given back exactly as it
    /// was; the other threads keep running. `load` does this by itself for a process without
    /// an agent. Needs the right to trace the process (same user and
    /// /proc/sys/kernel/yama/ptrace_scope 0, or CAP_SYS_PTRACE).
    Attach {
        /// The target process.
        pid: u32,
        /// How long the command may take, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Print the absolute path of the agent library.
    AgentPath,
    /// Print the directory that holds livepatch.h.
    IncludePath,
    /// Load a patch library into a process and enable its patch.
    ///
    /// A process started without the agent gets it first, as `livepatch attach` does.
    Load {
        /// The target process.
        pid: u32,
        /// The patch library (.so).
        patch: PathBuf,
        /// Also every descendant of the process (a pre-forking server's workers); one without
        /// an agent gets one if it runs the same program, others are named and passed over.
        #[arg(long)]
        children: bool,
        /// Return once the transition started; do not wait for it.
        #[arg(long)]
        no_wait: bool,
        /// How long the command may take, waiting for the transition included, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Disable a patch (or reverse its patching transition).
    Disable {
        /// The target process.
        pid: u32,
        /// The patch name.
        patch: String,
        /// Also every descendant of the process that has an agent (a pre-forking server's
        /// workers); descendants without one are named and passed over.
        #[arg(long)]
        children: bool,
        /// Return once the transition started; do not wait for it.
        #[arg(long)]
        no_wait: bool,
        /// How long the command may take, waiting for the transition included, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Reverse an unpatching transition (write 1 to `enabled`).
    Enable {
        /// The target process.
        pid: u32,
        /// The patch name.
        patch: String,
        /// How long the command may take, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Force the transition of a patch: switch every remaining thread now.
    ///
    /// Threads still running the old code keep running it. A patch that
    /// took part in a forced transition can never be unloaded.
    Force {
        /// The target process.
        pid: u32,
        /// The patch name.
        patch: String,
        /// How long the command may take, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Unload the library of a disabled patch.
    Unload {
        /// The target process.
        pid: u32,
        /// The patch name.
        patch: String,
        /// Also every descendant of the process that has an agent (a pre-forking server's
        /// workers); descendants without one are named and passed over.
        #[arg(long)]
        children: bool,
        /// How long the command may take, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// List processes that run the agent, and their patches.
    List {
        /// Only this process.
        pid: Option<u32>,
        /// How long each process may take to answer, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Show patches and threads, as /sys/kernel/livepatch and
    /// /proc/*/patch_state do.
    Status {
        /// The target process.
        pid: u32,
        /// Only this patch.
        patch: Option<String>,
        /// Print the documented JSON document instead.
        #[arg(long)]
        json: bool,
        /// How long the command may take, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
        timeout: Duration,
    },
    /// Print the agent's log.
    Log {
        /// The target process.
        pid: u32,
        /// Keep printing new lines as they come.
        #[arg(long, short)]
        follow: bool,
        /// How long each request may take, in seconds.
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
        timeout: Duration,
    },
}

/// The longest `--timeout` taken: a day.
const LONGEST_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Parses `--timeout`: a positive number of seconds, at most a day.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!(
            "{text:?}: a timeout is a positive number of seconds"
        ));
    }
    if seconds > LONGEST_TIMEOUT.as_secs_f64() {
        return Err(format!(
            "{text:?}: a timeout is at most {} seconds (a day)",
            LONGEST_TIMEOUT.as_secs()
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// How a command failed, and the exit status that says so.
#[derive(Debug)]
pub enum Failure {
    /// Refused or failed (status 1).
    Error(anyhow::Error),
    /// A wait timed out with the transition still running (status 3).
    Timeout(String),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Error(e)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Verb::Run { program, args } => commands::run(&program, &args),
        Verb::Attach { pid, timeout } => commands::attach(pid, timeout),
        Verb::AgentPath => commands::agent_path(),
        Verb::IncludePath => commands::include_path(),
        Verb::Load {
            pid,
            patch,
            children,
            no_wait,
            timeout,
        } => commands::load(pid, &patch, children, commands::Wait::new(no_wait, timeout)),
        Verb::Disable {
            pid,
            patch,
            children,
            no_wait,
            timeout,
        } => commands::disable(pid, &patch, children, commands::Wait::new(no_wait, timeout)),
        Verb::Enable {
            pid,
            patch,
            timeout,
        } => commands::enable(pid, &patch, timeout),
        Verb::Force {
            pid,
            patch,
            timeout,
        } => commands::force(pid, &patch, timeout),
        Verb::Unload {
            pid,
            patch,
            children,
            timeout,
        } => commands::unload(pid, &patch, children, timeout),
        Verb::List { pid, timeout } => commands::list(pid, timeout),
        Verb::Status {
            pid,
            patch,
            json,
            timeout,
        } => commands::status(pid, patch.as_deref(), json, timeout),
        Verb::Log {
            pid,
            follow,
            timeout,
        } => commands::log(pid, follow, timeout),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(e)) => {
            eprintln!("livepatch: error: {e:#}");
            ExitCode::from(1)
        }
        Err(Failure::Timeout(msg)) => {
            eprintln!("livepatch: {msg}");
            ExitCode::from(3)
        }
    }
}
