//! The process's objects as patches name them (`vmlinux` for the main program, else the file
//! name), what the core has been told about them, their symbol tables, and the snapshot of the
//! link map and memory map one request works with.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use livepatch_arch::objects::{self, LoadedObject};
use livepatch_arch::redirect::{Planner, RedirectError};
use livepatch_arch::symbols::{SymbolError, SymbolTable};
use livepatch_core::{Addr, FuncLocation, MAIN_OBJECT_NAME, ResolveError};

/// The name patches use for an object: `vmlinux` for the main program, else the file name.
pub fn object_name(object: &LoadedObject) -> Option<String> {
    if object.is_main {
        return Some(MAIN_OBJECT_NAME.to_string());
    }
    object.file_name()
}

/// The link map and the memory map, read at most once per request: the core resolves and
/// plans every function of a patch, and re-reading both per function made a 10,000-function
/// patch spend most of its time in `dl_iterate_phdr` and `/proc/self/maps`.
#[derive(Debug, Default)]
struct Snapshot {
    objects: Option<Vec<LoadedObject>>,
    planner: Option<Planner>,
}

/// The objects of the process.
#[derive(Debug)]
pub struct ProcessObjects {
    /// Objects the core knows about, by the name patches use.
    known: BTreeSet<String>,
    symbol_tables: HashMap<PathBuf, Arc<SymbolTable>>,
    snapshot: Snapshot,
}

impl ProcessObjects {
    /// The objects loaded now, all known to the core (a process starts with nothing patched).
    pub fn new() -> Self {
        ProcessObjects {
            known: objects::loaded_objects()
                .iter()
                .filter_map(object_name)
                .collect(),
            symbol_tables: HashMap::new(),
            snapshot: Snapshot::default(),
        }
    }

    /// Forgets the link map and memory map read for the previous request; call it whenever
    /// either may have changed (a new request, a library loaded or closed).
    pub fn refresh(&mut self) {
        self.snapshot = Snapshot::default();
    }

    /// The objects of the link map, as read for this request.
    pub fn loaded(&mut self) -> &[LoadedObject] {
        self.snapshot
            .objects
            .get_or_insert_with(objects::loaded_objects)
    }

    /// The planner of this request's redirections.
    pub fn planner(&mut self) -> Result<&mut Planner, RedirectError> {
        if self.snapshot.planner.is_none() {
            self.snapshot.planner = Some(Planner::new()?);
        }
        Ok(self.snapshot.planner.as_mut().expect("set just above"))
    }

    /// The object patches call `name`.
    pub fn find(&mut self, name: &str) -> Option<LoadedObject> {
        self.loaded()
            .iter()
            .find(|o| object_name(o).as_deref() == Some(name))
            .cloned()
    }

    fn table(&mut self, object: &LoadedObject) -> Result<Arc<SymbolTable>, SymbolError> {
        let path = object.path.clone().ok_or_else(|| SymbolError::Unreadable {
            path: object.link_name.clone(),
            reason: "the object has no file".into(),
        })?;
        if let Some(table) = self.symbol_tables.get(&path) {
            return Ok(table.clone());
        }
        let table = Arc::new(SymbolTable::read(&path)?);
        self.symbol_tables.insert(path, table.clone());
        Ok(table)
    }

    /// Resolves `name` in the object `object` by the kernel's `old_sympos` rule. An object
    /// whose symbols cannot be read is reported through `unreadable` and resolves nothing.
    pub fn resolve(
        &mut self,
        object: &str,
        name: &str,
        sympos: u64,
        unreadable: impl FnOnce(&SymbolError),
    ) -> Result<FuncLocation, ResolveError> {
        let found = self.find(object).ok_or(ResolveError::NotFound)?;
        let table = self.table(&found).map_err(|e| {
            unreadable(&e);
            ResolveError::NotFound
        })?;
        let symbol = table.lookup(name, sympos).map_err(|e| match e {
            SymbolError::Ambiguous { count, .. } => ResolveError::Ambiguous { count },
            SymbolError::PositionNotFound { .. } => ResolveError::PositionNotFound,
            _ => ResolveError::NotFound,
        })?;
        if symbol.size == 0 {
            return Err(ResolveError::NoSize);
        }
        Ok(FuncLocation {
            addr: (found.bias as u64).wrapping_add(symbol.address),
            size: symbol.size,
        })
    }

    /// The symbol size of the function starting at `addr`.
    pub fn func_size(&mut self, addr: Addr) -> Option<u64> {
        let object = self
            .loaded()
            .iter()
            .find(|o| o.contains_code(addr as usize))?
            .clone();
        let table = self.table(&object).ok()?;
        let (symbol, offset) = table.containing(addr.wrapping_sub(object.bias as u64))?;
        (offset == 0 && symbol.size > 0).then_some(symbol.size)
    }

    /// Libraries that left the link map and ones that entered it since the core last heard.
    pub fn changes(&mut self) -> (Vec<String>, Vec<String>) {
        self.refresh();
        let now: BTreeSet<String> = self.loaded().iter().filter_map(object_name).collect();
        let gone = self.known.difference(&now).cloned().collect();
        let new = now.difference(&self.known).cloned().collect();
        (gone, new)
    }

    /// The core handled the object's going path.
    pub fn gone(&mut self, name: &str) {
        self.known.remove(name);
        self.symbol_tables
            .retain(|path, _| path.file_name().is_none_or(|f| f.to_string_lossy() != name));
    }

    /// The core handled the object's coming path.
    pub fn known(&mut self, name: &str) {
        self.known.insert(name.to_string());
    }

    /// The executable segments of the object that holds `address`.
    pub fn code_of_object_holding(&mut self, address: usize) -> Vec<(usize, usize)> {
        self.loaded()
            .iter()
            .find(|o| o.contains_code(address))
            .map(|o| o.code_ranges.clone())
            .unwrap_or_default()
    }
}

impl Default for ProcessObjects {
    fn default() -> Self {
        Self::new()
    }
}
