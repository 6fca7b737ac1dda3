//! `livepatch`: patch running processes live.
//!
//! The command only asks; the agent inside the target process owns all
//! state. Exit status: 0 done; 1 refused or failed; 2 usage; 3 a wait timed
//! out and the transition is still running.

#![forbid(unsafe_code)]

mod client;
mod commands;
mod paths;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Print the absolute path of the agent library.
    AgentPath,
    /// Print the directory that holds livepatch.h.
    IncludePath,
    /// Load a patch library into a process and enable its patch.
    Load {
        /// The target process.
        pid: u32,
        /// The patch library (.so).
        patch: PathBuf,
        /// Return once the transition started; do not wait for it.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the transition, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
        timeout: f64,
    },
    /// Disable a patch (or reverse its patching transition).
    Disable {
        /// The target process.
        pid: u32,
        /// The patch name.
        patch: String,
        /// Return once the transition started; do not wait for it.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the transition, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
        timeout: f64,
    },
    /// Reverse an unpatching transition (write 1 to `enabled`).
    Enable {
        /// The target process.
        pid: u32,
        /// The patch name.
        patch: String,
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
    },
    /// Unload the library of a disabled patch.
    Unload {
        /// The target process.
        pid: u32,
        /// The patch name.
        patch: String,
    },
    /// List processes that run the agent, and their patches.
    List {
        /// Only this process.
        pid: Option<u32>,
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
    },
    /// Print the agent's log.
    Log {
        /// The target process.
        pid: u32,
        /// Keep printing new lines as they come.
        #[arg(long, short)]
        follow: bool,
    },
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
        Verb::AgentPath => commands::agent_path(),
        Verb::IncludePath => commands::include_path(),
        Verb::Load {
            pid,
            patch,
            no_wait,
            timeout,
        } => commands::load(pid, &patch, commands::Wait::new(no_wait, timeout)),
        Verb::Disable {
            pid,
            patch,
            no_wait,
            timeout,
        } => commands::disable(pid, &patch, commands::Wait::new(no_wait, timeout)),
        Verb::Enable { pid, patch } => commands::enable(pid, &patch),
        Verb::Force { pid, patch } => commands::force(pid, &patch),
        Verb::Unload { pid, patch } => commands::unload(pid, &patch),
        Verb::List { pid } => commands::list(pid),
        Verb::Status { pid, patch, json } => commands::status(pid, patch.as_deref(), json),
        Verb::Log { pid, follow } => commands::log(pid, follow),
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
