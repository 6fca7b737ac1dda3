//! What a refusal test checks: the refusal itself (exit status 1, a `livepatch: error: ` line
//! naming the thing and the reason) and a process left exactly as it was.

use std::path::Path;
use std::process::Output;

use super::{Target, cli, path_str, status_json, stderr, stdout};

pub fn load(pid: &str, patch: &Path) -> Output {
    cli(&["load", pid, path_str(patch)])
}

pub fn assert_loads(pid: &str, patch: &Path) {
    let out = load(pid, patch);
    assert!(
        out.status.success(),
        "loading {} failed: {}",
        patch.display(),
        stderr(&out)
    );
}

pub fn assert_succeeds(args: &[&str]) {
    let out = cli(args);
    assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
}

/// Exit status 1 and one error that names every one of `names`; returns the message.
pub fn assert_refused(output: &Output, names: &[&str]) -> String {
    let message = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}\nstderr: {message}",
        stdout(output)
    );
    assert!(message.starts_with("livepatch: error: "), "{message}");
    for name in names {
        assert!(message.contains(name), "{message:?} does not name {name:?}");
    }
    message
}

/// `call NAME = RESULT` from the program.
pub fn call(target: &mut Target, function: &str) -> String {
    target.send(&format!("call {function}"));
    target.expect(&format!("call {function} = "))
}

/// `bytes NAME HEX`: the first 16 bytes of the function's code.
pub fn code(target: &mut Target, function: &str) -> String {
    target.send(&format!("bytes {function}"));
    target.expect(&format!("bytes {function} "))
}

/// Everything a refusal must leave as it was.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub status: serde_json::Value,
    pub answers: Vec<String>,
    pub code: Vec<String>,
}

pub fn snapshot(target: &mut Target, calls: &[&str], code_of: &[&str]) -> Snapshot {
    Snapshot {
        status: status_json(&target.pid()),
        answers: calls.iter().map(|f| call(target, f)).collect(),
        code: code_of.iter().map(|f| code(target, f)).collect(),
    }
}
