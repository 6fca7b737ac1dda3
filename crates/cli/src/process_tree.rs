//! A process and its descendants, read from `/proc` (for `--children`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The parent of every process, from `/proc/N/stat`.
fn parents() -> BTreeMap<u32, u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            Some((pid, parent_of(pid)?))
        })
        .collect()
}

/// Field `index` of `/proc/PID/stat` counted from the state (0), which follows the command
/// name: that may hold any byte (a space, a parenthesis), hence the last ')'.
pub fn stat_field(pid: u32, index: usize) -> Option<String> {
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_ascii_whitespace().nth(index).map(str::to_owned)
}

/// The parent of `pid`.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_field(pid, 1)?.parse().ok()
}

/// `pid` and its descendants alive now, each parent before its children.
pub fn with_descendants(pid: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (child, parent) in parents() {
        children.entry(parent).or_default().push(child);
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([pid]);
    while let Some(next) = queue.pop_front() {
        // A pid seen twice would mean a cycle, which a snapshot taken while processes come and
        // go can show (a pid reused in between).
        if !seen.insert(next) {
            continue;
        }
        order.push(next);
        queue.extend(children.get(&next).into_iter().flatten().copied());
    }
    order
}

pub use livepatch_attach::preflight::command_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_its_childs_parent_and_comes_first() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep runs");
        let me = std::process::id();
        assert_eq!(parent_of(child.id()), Some(me));
        let tree = with_descendants(me);
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child.id()), "{tree:?}");
        assert_eq!(command_name(child.id()), "sleep");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
