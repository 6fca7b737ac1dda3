//! The registry of redirected functions, the user-space ftrace: a function is planned (its
//! entry analyzed, its stub block allocated and written, every refusal found), then redirected
//! (the entry's bytes written, in one stop of the world for a whole batch), its dispatch set any
//! number of times without stopping anything, and restored.
//!
//! A site's block outlives its redirection: a thread may still run its stub or trampoline, and a
//! function redirected again reuses it while its code is what the plan was made from, or what
//! the restore left.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::code_memory::{self, MemoryError};
use crate::code_write::{self, CodeWrite, CodeWriter, CommitError, WriteError};
use crate::entry::{self, EntryKind, JMP_REL32_LEN, PAD_LEN, Unpatchable};
use crate::maps::{self, Mapping};
use crate::stub::{self, Block, TRAMPOLINE_ROOM};

pub use crate::stub::{Decider, set_decider};

/// Why a redirection or a restore did not happen. Nothing was changed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// The function's code cannot be redirected safely.
    #[error("cannot redirect function '{function}': {reason}")]
    Unpatchable {
        /// The function.
        function: String,
        /// Why.
        reason: Unpatchable,
    },
    /// No stub memory could be had near the function.
    #[error("cannot redirect function '{function}': {source}")]
    Memory {
        /// The function.
        function: String,
        /// Why.
        source: MemoryError,
    },
    /// The stub's code could not be written.
    #[error("cannot write the stub of function '{function}': {source}")]
    StubWrite {
        /// The function.
        function: String,
        /// Why.
        source: WriteError,
    },
    /// The entries could not be written.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// No redirection exists (or is planned) at the address.
    #[error("no redirected function at {0:#x}")]
    NotRedirected(usize),
    /// The memory map could not be read.
    #[error("cannot read /proc/self/maps: {0}")]
    Maps(std::io::Error),
}

/// A function to redirect.
#[derive(Debug, Clone, Copy)]
pub struct SiteSpec<'a> {
    /// Its name, for errors.
    pub name: &'a str,
    /// Run-time address of its entry.
    pub address: usize,
    /// Its size in bytes (0 if unknown).
    pub size: usize,
    /// Passed to the decider on the slow path.
    pub cookie: u64,
}

/// Where a redirected function's stub sends callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// The original code.
    Original,
    /// A replacement function, directly (the fast path).
    Jump(usize),
    /// Ask the decider on every call (the slow path).
    Decide,
}

/// A redirected (or planned) function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteInfo {
    /// The function's entry.
    pub function: usize,
    /// The stub its entry jumps to.
    pub stub: usize,
    /// Where the original code runs from.
    pub original_entry: usize,
    /// "patchable entry" or "plain entry".
    pub kind: &'static str,
}

#[derive(Debug)]
struct SiteRecord {
    /// The function's name, for errors.
    name: String,
    info: SiteInfo,
    block: Block,
    /// The function's bytes the plan was made from (the pad before a patchable entry, and the
    /// whole body, which the branch check read), and where they start.
    analyzed_at: usize,
    analyzed: Vec<u8>,
    /// The same bytes after a redirection and its restore: a patchable entry's pad keeps the
    /// jump to the stub, its entry becomes one 2-byte nop.
    restored: Vec<u8>,
    /// Writes that redirect the function, and the ones that undo them.
    redirect: Vec<CodeWrite>,
    restore: Vec<CodeWrite>,
    /// PC ranges (exclusive at both ends) no thread may be in while the writes happen.
    forbidden: Vec<(usize, usize)>,
    active: bool,
}

impl SiteRecord {
    /// Whether the function's code is still what the plan was made from, or what restoring
    /// this site's redirection left.
    fn is_current(&self, maps: &[Mapping]) -> bool {
        if !maps::is_readable_code(maps, self.analyzed_at, self.analyzed.len()) {
            return false;
        }
        // SAFETY: readable code (checked just before).
        let now = unsafe { code_write::read_code(self.analyzed_at, self.analyzed.len()) };
        now == self.analyzed || now == self.restored
    }

    /// Whether the function's entry still holds this site's redirection.
    fn is_redirecting(&self, maps: &[Mapping]) -> bool {
        self.redirect.iter().all(|w| {
            maps::is_readable_code(maps, w.address, w.bytes.len())
                // SAFETY: readable code (checked just before).
                && unsafe { code_write::read_code(w.address, w.bytes.len()) } == w.bytes
        })
    }
}

static SITES: Mutex<BTreeMap<usize, SiteRecord>> = Mutex::new(BTreeMap::new());

fn sites() -> std::sync::MutexGuard<'static, BTreeMap<usize, SiteRecord>> {
    SITES.lock().unwrap_or_else(|e| e.into_inner())
}

fn unpatchable(spec: &SiteSpec<'_>, reason: Unpatchable) -> RedirectError {
    RedirectError::Unpatchable {
        function: spec.name.to_owned(),
        reason,
    }
}

/// Plans redirections: analyzes each function's entry, allocates its stub block within reach,
/// relocates its first instructions and writes the stub, all without touching the function.
/// Every reason to refuse a function is found here; [`redirect_planned`] then only writes. A
/// function planned before whose code did not change keeps its plan.
///
/// One planner serves one batch (one request): it reads the memory map once and keeps
/// `/proc/self/mem` open for the stubs it writes.
#[derive(Debug)]
pub struct Planner {
    maps: Vec<Mapping>,
    writer: CodeWriter,
}

impl Planner {
    /// A planner for the memory map as it is now.
    pub fn new() -> Result<Self, RedirectError> {
        Ok(Planner {
            maps: maps::read().map_err(RedirectError::Maps)?,
            writer: CodeWriter::new(),
        })
    }

    /// The memory map the planner works with.
    pub fn maps(&self) -> &[Mapping] {
        &self.maps
    }

    /// Plans the redirection of one function.
    pub fn plan(&mut self, spec: &SiteSpec<'_>) -> Result<SiteInfo, RedirectError> {
        let mut sites = sites();
        if let Some(record) = sites.get_mut(&spec.address) {
            if record.active {
                return Err(unpatchable(spec, Unpatchable::AlreadyRedirected));
            }
            if record.is_current(&self.maps) {
                record.name = spec.name.to_owned();
                record.block.set_cookie(spec.cookie);
                record.block.set_slot(record.info.original_entry);
                return Ok(record.info.clone());
            }
        }
        let record = self.prepare(spec)?;
        let info = record.info.clone();
        // A stale record's block is left as it is: a thread may still run its trampoline.
        sites.insert(spec.address, record);
        Ok(info)
    }

    fn prepare(&mut self, spec: &SiteSpec<'_>) -> Result<SiteRecord, RedirectError> {
        let maps = &self.maps;
        let len = spec.size.max(JMP_REL32_LEN + 1);
        if !maps::is_readable_code(maps, spec.address, len) {
            return Err(unpatchable(
                spec,
                Unpatchable::NotMapped {
                    start: spec.address,
                    end: spec.address + len,
                },
            ));
        }
        // SAFETY: readable code (checked above) of a loaded object.
        let code = unsafe { code_write::read_code(spec.address, len) };
        let pad = spec
            .address
            .checked_sub(PAD_LEN)
            .filter(|&pad| maps::is_readable_code(maps, pad, PAD_LEN))
            // SAFETY: the pad lies in readable executable mappings (checked just above).
            .map(|pad| unsafe { code_write::read_code(pad, PAD_LEN) });
        let kind = entry::analyze(spec.address, spec.size, pad.as_deref(), &code)
            .map_err(|reason| unpatchable(spec, reason))?;
        let block =
            code_memory::allocate_block(spec.address).map_err(|source| RedirectError::Memory {
                function: spec.name.to_owned(),
                source,
            })?;
        let plan = entry::plan(
            &kind,
            spec.address,
            &code,
            block.stub(),
            block.trampoline(),
            TRAMPOLINE_ROOM,
        )
        .map_err(|reason| unpatchable(spec, reason))?;
        let mut block_code =
            stub::encode_stub(block).map_err(|reason| unpatchable(spec, reason))?;
        block_code.extend_from_slice(&plan.trampoline);
        // The block may be in an arena mapped just now.
        if maps::find(&self.maps, block.code).is_none() {
            self.maps = maps::read().map_err(RedirectError::Maps)?;
        }
        // SAFETY: the block is fresh: no code jumps to it yet, so no thread executes it.
        unsafe { self.writer.write(block.code, &block_code, &self.maps) }.map_err(|source| {
            RedirectError::StubWrite {
                function: spec.name.to_owned(),
                source,
            }
        })?;
        block.init_data(spec.cookie, plan.original_entry);
        let analyzed_at = match kind {
            EntryKind::Patchable { .. } => spec.address - PAD_LEN,
            EntryKind::Plain { .. } => spec.address,
        };
        let mut analyzed = pad
            .filter(|_| analyzed_at < spec.address)
            .unwrap_or_default();
        analyzed.extend_from_slice(&code);
        let mut restored = analyzed.clone();
        for write in plan.redirect.iter().chain(&plan.restore) {
            let at = write.address - analyzed_at;
            restored[at..at + write.bytes.len()].copy_from_slice(&write.bytes);
        }
        Ok(SiteRecord {
            name: spec.name.to_owned(),
            info: SiteInfo {
                function: spec.address,
                stub: block.stub(),
                original_entry: plan.original_entry,
                kind: kind.name(),
            },
            block,
            analyzed_at,
            analyzed,
            restored,
            redirect: plan.redirect,
            restore: plan.restore,
            forbidden: plan.forbidden,
            active: false,
        })
    }
}

/// Redirects every function of `specs` to its stub, in one stop of the world: plans each, then
/// commits them. The stubs start by running the original code: set each site's dispatch with
/// [`set_dispatch`]. All or nothing.
pub fn redirect(specs: &[SiteSpec<'_>]) -> Result<Vec<SiteInfo>, RedirectError> {
    let mut seen = BTreeSet::new();
    for spec in specs {
        if !seen.insert(spec.address) {
            return Err(unpatchable(spec, Unpatchable::TwiceInBatch));
        }
    }
    let mut planner = Planner::new()?;
    for spec in specs {
        planner.plan(spec)?;
    }
    let addresses: Vec<usize> = specs.iter().map(|s| s.address).collect();
    commit_planned(&addresses, planner.maps())
}

/// Redirects every function of `addresses`, each planned with [`plan`] and not redirected since,
/// in one stop of the world. All or nothing: fails only when the world cannot be stopped or the
/// code cannot be written, or when a function's code changed since its plan.
pub fn redirect_planned(addresses: &[usize]) -> Result<Vec<SiteInfo>, RedirectError> {
    let maps = maps::read().map_err(RedirectError::Maps)?;
    commit_planned(addresses, &maps)
}

fn commit_planned(addresses: &[usize], maps: &[Mapping]) -> Result<Vec<SiteInfo>, RedirectError> {
    let mut sites = sites();
    let mut seen = BTreeSet::new();
    let mut writes: Vec<CodeWrite> = Vec::new();
    let mut forbidden = Vec::new();
    for &address in addresses {
        let Some(record) = sites.get(&address) else {
            return Err(RedirectError::NotRedirected(address));
        };
        let refuse = |reason| RedirectError::Unpatchable {
            function: record.name.clone(),
            reason,
        };
        if !seen.insert(address) {
            return Err(refuse(Unpatchable::TwiceInBatch));
        }
        if record.active {
            return Err(refuse(Unpatchable::AlreadyRedirected));
        }
        if !record.is_current(maps) {
            return Err(refuse(Unpatchable::Changed));
        }
        writes.extend(record.redirect.iter().cloned());
        forbidden.extend(record.forbidden.iter().copied());
    }
    // SAFETY: each write sends the function's entry to its stub, whose block is written and
    // whose slot runs the original code: correct for any thread from the moment it lands.
    unsafe { code_write::commit(&writes, &forbidden, maps) }?;
    let mut infos = Vec::with_capacity(addresses.len());
    for address in addresses {
        let record = sites.get_mut(address).expect("checked above");
        record.active = true;
        infos.push(record.info.clone());
    }
    Ok(infos)
}

/// Puts the original bytes back for every function of `addresses`, in one stop of the world.
/// Functions whose code was unmapped or replaced (their library unloaded) are forgotten
/// without writing.
pub fn restore(addresses: &[usize]) -> Result<(), RedirectError> {
    let maps = maps::read().map_err(RedirectError::Maps)?;
    let mut sites = sites();
    let mut writes: Vec<CodeWrite> = Vec::new();
    let mut forbidden = Vec::new();
    for &address in addresses {
        let Some(record) = sites.get(&address).filter(|r| r.active) else {
            return Err(RedirectError::NotRedirected(address));
        };
        if record.is_redirecting(&maps) {
            writes.extend(record.restore.iter().cloned());
            forbidden.extend(record.forbidden.iter().copied());
        }
    }
    // SAFETY: each write puts the function's own first bytes back; a thread still in the stub
    // or trampoline finishes there, as their blocks stay mapped.
    unsafe { code_write::commit(&writes, &forbidden, &maps) }?;
    for &address in addresses {
        let record = sites.get_mut(&address).expect("checked above");
        record.active = false;
        record.block.set_slot(record.info.original_entry);
    }
    Ok(())
}

/// Sets where a redirected function's callers go. Takes effect for every later call, on every
/// thread, without stopping anything.
pub fn set_dispatch(function: usize, dispatch: Dispatch) -> Result<(), RedirectError> {
    let sites = sites();
    let record = sites
        .get(&function)
        .filter(|r| r.active)
        .ok_or(RedirectError::NotRedirected(function))?;
    let target = match dispatch {
        Dispatch::Original => record.info.original_entry,
        Dispatch::Jump(address) => address,
        Dispatch::Decide => record.block.slow_entry(),
    };
    record.block.set_slot(target);
    Ok(())
}

/// The redirected function's site, if it is redirected.
pub fn site(function: usize) -> Option<SiteInfo> {
    sites()
        .get(&function)
        .filter(|r| r.active)
        .map(|r| r.info.clone())
}
