//! The code a thread must not have on its stack to switch, and how a stack address is looked up
//! in it (kernel: `klp_check_stack_func` in transition.c).
//!
//! The core lists one [`BlockingRange`] per func of the transition patch, in the kernel's
//! order; a thread is blocked by the first of them that holds its PC or a return address. The
//! ranges may overlap (two funcs whose previous code is the same function), so checkers look
//! addresses up in [`DisjointRanges`]: the same answer as trying each range in order, in one
//! binary search. The agent and the simulator both use it.

use std::collections::BTreeMap;

use crate::Addr;

/// Which code a [`BlockingRange`] covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeKind {
    /// The original function. The platform must count every copy of its
    /// instructions too (a relocated prologue in a trampoline is the original
    /// function's code).
    Original,
    /// A replacement function of some patch.
    Replacement,
}

/// A code range that a thread must not have on its stack to switch: the
/// result of `klp_check_stack_func` for one func of the transition patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockingRange {
    /// `old_name` of the func, reported as the function a thread sleeps on.
    pub func_name: String,
    /// Start of the range.
    pub start: Addr,
    /// Length of the range in bytes.
    pub size: u64,
    /// Whether the range is original code or a replacement.
    pub kind: CodeKind,
}

impl BlockingRange {
    /// Whether `pc` lies in `[start, start + size)`.
    pub fn contains(&self, pc: Addr) -> bool {
        pc >= self.start && pc - self.start < self.size
    }

    /// One past the last byte.
    pub fn end(&self) -> Addr {
        self.start.saturating_add(self.size)
    }
}

/// A piece of the address space and the index of the first blocking range (in the core's
/// order) that covers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DisjointRange {
    /// First byte.
    pub start: Addr,
    /// One past the last byte.
    pub end: Addr,
    /// Index of the blocking range in the order the core gave them.
    pub index: u32,
}

/// Blocking ranges made disjoint and sorted, for lookups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DisjointRanges {
    pieces: Vec<DisjointRange>,
}

impl DisjointRanges {
    /// Splits `ranges`, which may overlap, into disjoint pieces sorted by address, each
    /// carrying the lowest index of the ranges that cover it.
    pub fn new(ranges: &[BlockingRange]) -> Self {
        let indexed: Vec<(Addr, Addr, u32)> = ranges
            .iter()
            .enumerate()
            .map(|(i, r)| (r.start, r.end(), u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        Self::from_indexed(&indexed)
    }

    /// As [`DisjointRanges::new`] from `(start, end, index)` triples.
    pub fn from_indexed(ranges: &[(Addr, Addr, u32)]) -> Self {
        // A sweep over the range ends, keeping the indices of the ranges open at each point: a
        // patch of 10,000 functions gives 10,000 ranges, too many to test each against each.
        let mut events: Vec<(Addr, bool, u32)> = ranges
            .iter()
            .filter(|r| r.0 < r.1)
            .flat_map(|&(start, end, index)| [(start, true, index), (end, false, index)])
            .collect();
        events.sort_unstable();
        let mut open: BTreeMap<u32, usize> = BTreeMap::new();
        let mut pieces: Vec<DisjointRange> = Vec::new();
        let mut i = 0;
        while i < events.len() {
            let at = events[i].0;
            while i < events.len() && events[i].0 == at {
                let (_, starts, index) = events[i];
                if starts {
                    *open.entry(index).or_default() += 1;
                } else if let Some(count) = open.get_mut(&index) {
                    *count -= 1;
                    if *count == 0 {
                        open.remove(&index);
                    }
                }
                i += 1;
            }
            let (Some(&(next, _, _)), Some((&index, _))) = (events.get(i), open.first_key_value())
            else {
                continue;
            };
            match pieces.last_mut() {
                Some(last) if last.end == at && last.index == index => last.end = next,
                _ => pieces.push(DisjointRange {
                    start: at,
                    end: next,
                    index,
                }),
            }
        }
        DisjointRanges { pieces }
    }

    /// The index of the first blocking range that holds `addr`.
    pub fn find(&self, addr: Addr) -> Option<u32> {
        let i = self.pieces.partition_point(|r| r.start <= addr);
        let r = self.pieces.get(i.checked_sub(1)?)?;
        (addr < r.end).then_some(r.index)
    }

    /// `[lowest start, highest end)` of all pieces: an address outside it is in none. Empty
    /// ranges give `(0, 0)`.
    pub fn span(&self) -> (Addr, Addr) {
        match (self.pieces.first(), self.pieces.last()) {
            (Some(first), Some(last)) => (first.start, last.end),
            _ => (0, 0),
        }
    }

    /// The pieces, sorted and disjoint.
    pub fn pieces(&self) -> &[DisjointRange] {
        &self.pieces
    }

    /// The lowest index of the ranges holding any of `addrs`: the range that blocks a thread
    /// whose PC and return addresses these are.
    pub fn first_hit(&self, addrs: impl IntoIterator<Item = Addr>) -> Option<u32> {
        addrs.into_iter().filter_map(|a| self.find(a)).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_become_disjoint_with_the_lowest_index() {
        let d = DisjointRanges::from_indexed(&[(10, 20, 1), (15, 30, 0), (40, 50, 2)]);
        assert_eq!(
            d.pieces(),
            [
                DisjointRange {
                    start: 10,
                    end: 15,
                    index: 1
                },
                DisjointRange {
                    start: 15,
                    end: 30,
                    index: 0
                },
                DisjointRange {
                    start: 40,
                    end: 50,
                    index: 2
                },
            ]
        );
        assert_eq!(d.find(14), Some(1));
        assert_eq!(d.find(15), Some(0));
        assert_eq!(d.find(30), None);
        assert_eq!(d.find(9), None);
        assert_eq!(d.find(49), Some(2));
        assert_eq!(d.span(), (10, 50));
        assert_eq!(d.first_hit([49, 12, 100]), Some(1));
    }

    #[test]
    fn every_address_finds_the_lowest_index_covering_it() {
        // Many small overlapping ranges, nested ones and repeated ones, from a fixed LCG.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |bound: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) % bound
        };
        let ranges: Vec<(u64, u64, u32)> = (0..300)
            .map(|i| {
                let start = next(1000);
                (start, start + next(40), next(50) as u32 + i % 3)
            })
            .collect();
        let d = DisjointRanges::from_indexed(&ranges);
        assert!(
            d.pieces().windows(2).all(|w| w[0].end <= w[1].start),
            "sorted and disjoint"
        );
        for addr in 0..1100 {
            let expected = ranges
                .iter()
                .filter(|r| r.0 <= addr && addr < r.1)
                .map(|r| r.2)
                .min();
            assert_eq!(d.find(addr), expected, "address {addr}");
        }
    }
}
