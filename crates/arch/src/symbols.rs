//! Function symbols of an object's file on disk, with the kernel's `old_sympos` rule.

use std::path::{Path, PathBuf};

use object::{Object, ObjectSymbol, SymbolKind};

/// A function symbol, as recorded in the file (addresses are file addresses, before the bias).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSymbol {
    /// The symbol's name.
    pub name: String,
    /// The file address of the function's entry.
    pub address: u64,
    /// The function's size in bytes; 0 when the symbol table does not say.
    pub size: u64,
}

/// The function symbols of one file, in symbol-table order.
#[derive(Debug, Clone)]
pub struct SymbolTable {
    path: PathBuf,
    /// True when read from `.symtab`, false when only `.dynsym` was there.
    pub full: bool,
    functions: Vec<FunctionSymbol>,
    /// Indices into `functions` sorted by address, for reverse lookups.
    by_address: Vec<usize>,
    /// Indices into `functions` sorted by name, in table order within a name.
    by_name: Vec<usize>,
}

/// Why a function could not be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SymbolError {
    /// The file could not be read or parsed.
    #[error("cannot read symbols of {path}: {reason}")]
    Unreadable {
        /// The file.
        path: String,
        /// The underlying error.
        reason: String,
    },
    /// No function of that name.
    #[error("symbol '{name}' not found in {path}")]
    NotFound {
        /// The symbol.
        name: String,
        /// The file.
        path: String,
    },
    /// `old_sympos` 0 with several functions of that name.
    #[error(
        "unresolvable ambiguity for symbol '{name}' in {path}: {count} matches, set old_sympos"
    )]
    Ambiguous {
        /// The symbol.
        name: String,
        /// The file.
        path: String,
        /// How many functions have the name.
        count: usize,
    },
    /// `old_sympos` N beyond the number of functions with that name.
    #[error("symbol '{name}' position {sympos} not found in {path} ({count} matches)")]
    PositionNotFound {
        /// The symbol.
        name: String,
        /// The file.
        path: String,
        /// The requested position.
        sympos: u64,
        /// How many functions have the name.
        count: usize,
    },
}

impl SymbolTable {
    /// Reads the function symbols of `path`: `.symtab` when the file has one, else `.dynsym`.
    pub fn read(path: &Path) -> Result<Self, SymbolError> {
        let unreadable = |reason: String| SymbolError::Unreadable {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
        // SAFETY: the mapping is private and read-only; a file replaced on disk while we read it
        // could change under us, which `object` tolerates as malformed input at worst.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| unreadable(e.to_string()))?;
        let elf = object::File::parse(&*map).map_err(|e| unreadable(e.to_string()))?;
        let full = elf.symbols().next().is_some();
        let symbols: Vec<_> = if full {
            elf.symbols().collect()
        } else {
            elf.dynamic_symbols().collect()
        };
        let functions: Vec<FunctionSymbol> = symbols
            .into_iter()
            .filter(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.address() != 0)
            .filter_map(|s| {
                Some(FunctionSymbol {
                    name: s.name().ok()?.to_owned(),
                    address: s.address(),
                    size: s.size(),
                })
            })
            .collect();
        let mut by_address: Vec<usize> = (0..functions.len()).collect();
        by_address.sort_by_key(|&i| (functions[i].address, std::cmp::Reverse(functions[i].size)));
        let mut by_name: Vec<usize> = (0..functions.len()).collect();
        // Stable: symbols of one name stay in table order, which `old_sympos` counts in.
        by_name.sort_by(|&a, &b| functions[a].name.cmp(&functions[b].name));
        Ok(Self {
            path: path.to_owned(),
            full,
            functions,
            by_address,
            by_name,
        })
    }

    /// The file the table was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every function, in symbol-table order.
    pub fn functions(&self) -> &[FunctionSymbol] {
        &self.functions
    }

    /// The function `name` by the kernel's rule: `sympos` 0 requires a unique name; N picks the
    /// Nth function of that name in symbol-table order (1-based).
    pub fn lookup(&self, name: &str, sympos: u64) -> Result<&FunctionSymbol, SymbolError> {
        let path = self.path.display().to_string();
        // Aliases (several names, or the same name twice, at one address) count once.
        let mut matches: Vec<&FunctionSymbol> = Vec::new();
        let first = self
            .by_name
            .partition_point(|&i| self.functions[i].name.as_str() < name);
        let named = self.by_name[first..]
            .iter()
            .map(|&i| &self.functions[i])
            .take_while(|f| f.name == name);
        for f in named {
            if !matches.iter().any(|m| m.address == f.address) {
                matches.push(f);
            }
        }
        match (matches.len(), sympos) {
            (0, _) => Err(SymbolError::NotFound {
                name: name.to_owned(),
                path,
            }),
            (1, 0) => Ok(matches[0]),
            (count, 0) => Err(SymbolError::Ambiguous {
                name: name.to_owned(),
                path,
                count,
            }),
            (count, n) => {
                matches
                    .get(n as usize - 1)
                    .copied()
                    .ok_or(SymbolError::PositionNotFound {
                        name: name.to_owned(),
                        path,
                        sympos: n,
                        count,
                    })
            }
        }
    }

    /// The function containing file address `address`, with the offset into it.
    pub fn containing(&self, address: u64) -> Option<(&FunctionSymbol, u64)> {
        let after = self
            .by_address
            .partition_point(|&i| self.functions[i].address <= address);
        self.by_address[..after].iter().rev().find_map(|&i| {
            let f = &self.functions[i];
            let offset = address - f.address;
            (offset < f.size.max(1)).then_some((f, offset))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_has_a_full_symbol_table_with_sizes() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let table = SymbolTable::read(&exe).unwrap();
        assert!(table.full);
        let main = table.lookup("main", 0).expect("main is unique");
        assert!(main.size > 0);
        let (found, offset) = table.containing(main.address + 1).unwrap();
        assert_eq!((found.name.as_str(), offset), ("main", 1));
    }

    #[test]
    fn a_missing_file_and_a_missing_symbol_are_named() {
        let err = SymbolTable::read(Path::new("/nonexistent/libx.so")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/libx.so"), "{err}");
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let table = SymbolTable::read(&exe).unwrap();
        let err = table.lookup("no_such_function_here", 0).unwrap_err();
        assert!(matches!(err, SymbolError::NotFound { .. }));
        assert!(err.to_string().contains("no_such_function_here"));
    }
}
