//! Where the agent library and the C header are.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// The file name of the agent library.
pub const AGENT_FILE: &str = "liblivepatch_agent.so";

fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()
        .map(Path::to_path_buf)
}

fn first_existing(candidates: Vec<PathBuf>) -> Option<PathBuf> {
    candidates
        .into_iter()
        .find(|p| p.exists())
        .map(|p| p.canonicalize().unwrap_or(p))
}

/// The agent library: `$LIVEPATCH_AGENT`, else next to this executable (as
/// cargo builds them), else in `../lib` of it (as installed).
pub fn agent() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("LIVEPATCH_AGENT").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if !p.exists() {
            bail!(
                "LIVEPATCH_AGENT names {}, which does not exist",
                p.display()
            );
        }
        return Ok(p.canonicalize()?);
    }
    let mut candidates = Vec::new();
    if let Some(dir) = exe_dir() {
        candidates.push(dir.join(AGENT_FILE));
        candidates.push(dir.join("..").join(AGENT_FILE));
        candidates.push(dir.join("../lib").join(AGENT_FILE));
    }
    match first_existing(candidates) {
        Some(p) => Ok(p),
        None => bail!(
            "cannot find {AGENT_FILE} next to the livepatch executable; build it with \
             `cargo build --release` or set LIVEPATCH_AGENT"
        ),
    }
}

/// The directory of `livepatch.h`: `$LIVEPATCH_INCLUDE`, else the source
/// tree's `include/` seen from the build directory, else `../include` of
/// the executable, else the source tree this binary was built from.
pub fn include() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("LIVEPATCH_INCLUDE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = Vec::new();
    if let Some(dir) = exe_dir() {
        candidates.push(dir.join("../../include"));
        candidates.push(dir.join("../include"));
        candidates.push(dir.join("../share/livepatch/include"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../include"));
    let found = first_existing(
        candidates
            .into_iter()
            .map(|d| d.join("livepatch.h"))
            .collect(),
    );
    match found.and_then(|h| h.parent().map(Path::to_path_buf)) {
        Some(dir) => Ok(dir),
        None => bail!("cannot find livepatch.h; set LIVEPATCH_INCLUDE"),
    }
}
