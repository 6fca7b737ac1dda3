//! `/proc/PID/maps`: what is mapped where, with which protection, from which file.

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// `PROT_*` bits.
    pub prot: i32,
    /// The offset in the mapped file of the first address.
    pub offset: u64,
    /// The mapped file's inode; 0 for anonymous memory.
    pub inode: u64,
    /// The mapped file or pseudo-name (`[stack]`), empty for anonymous memory.
    pub name: String,
}

/// The current mappings, sorted by address.
pub fn read() -> std::io::Result<Vec<Mapping>> {
    read_file("/proc/self/maps")
}

/// The mappings of process `pid`, sorted by address.
pub fn read_process(pid: u32) -> std::io::Result<Vec<Mapping>> {
    read_file(&format!("/proc/{pid}/maps"))
}

fn read_file(path: &str) -> std::io::Result<Vec<Mapping>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().filter_map(parse_line).collect())
}

fn parse_line(line: &str) -> Option<Mapping> {
    // Five fields, then the name, which may hold spaces.
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.as_bytes();
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let _device = fields.next()?;
    let inode = fields.next()?.parse().ok()?;
    let name = fields.next().unwrap_or("").trim_start().to_owned();
    let mut prot = 0;
    if perms.first() == Some(&b'r') {
        prot |= libc::PROT_READ;
    }
    if perms.get(1) == Some(&b'w') {
        prot |= libc::PROT_WRITE;
    }
    if perms.get(2) == Some(&b'x') {
        prot |= libc::PROT_EXEC;
    }
    Some(Mapping {
        start: usize::from_str_radix(start, 16).ok()?,
        end: usize::from_str_radix(end, 16).ok()?,
        prot,
        offset,
        inode,
        name,
    })
}

/// The mapping holding `address`.
pub fn find(maps: &[Mapping], address: usize) -> Option<&Mapping> {
    let after = maps.partition_point(|m| m.start <= address);
    maps[..after].last().filter(|m| address < m.end)
}

/// Whether every byte of `[start, start + len)` lies in mappings with all of `prot`.
pub fn has_protection(maps: &[Mapping], start: usize, len: usize, prot: i32) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    let mut at = start;
    while at < end {
        match find(maps, at) {
            Some(m) if m.prot & prot == prot => at = m.end,
            _ => return false,
        }
    }
    true
}

/// Whether every byte of `[start, start + len)` is mapped readable.
pub fn is_readable(maps: &[Mapping], start: usize, len: usize) -> bool {
    has_protection(maps, start, len, libc::PROT_READ)
}

/// Whether every byte of `[start, start + len)` is mapped readable and executable.
pub fn is_readable_code(maps: &[Mapping], start: usize, len: usize) -> bool {
    has_protection(maps, start, len, libc::PROT_READ | libc::PROT_EXEC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_and_without_names() {
        let m = parse_line("7f00-7f80 r-xp 00001000 08:01 1234   /usr/lib/libc.so.6").unwrap();
        assert_eq!((m.start, m.end), (0x7f00, 0x7f80));
        assert_eq!(m.prot, libc::PROT_READ | libc::PROT_EXEC);
        assert_eq!(m.name, "/usr/lib/libc.so.6");
        assert_eq!(m.offset, 0x1000);
        assert_eq!(m.inode, 1234);
        let spaced = parse_line("7f00-7f80 r--p 00000000 08:01 99 /tmp/a b/lib.so").unwrap();
        assert_eq!(spaced.name, "/tmp/a b/lib.so");
        let anon = parse_line("1000-2000 rw-p 00000000 00:00 0").unwrap();
        assert_eq!(anon.prot, libc::PROT_READ | libc::PROT_WRITE);
        assert!(anon.name.is_empty());
    }

    #[test]
    fn our_own_code_is_found_executable() {
        let maps = read().unwrap();
        let here = our_own_code_is_found_executable as *const () as usize;
        let m = find(&maps, here).expect("mapped");
        assert_ne!(m.prot & libc::PROT_EXEC, 0);
        assert!(find(&maps, 8).is_none());
    }
}
