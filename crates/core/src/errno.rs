//! Error numbers, as the kernel's livepatch code returns them.
//!
//! The kernel reports failures as negative errno values; the module loader and
//! sysfs turn them into the messages users see (`insmod: ERROR: ... No such
//! device`). We keep the numbers so that the agent can hand them to C code and
//! the CLI can print the same words.

use std::fmt;

/// A positive Linux errno value (`EINVAL` is 22).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Errno(pub i32);

impl Errno {
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(1);
    /// No such file or directory (kallsyms size lookups).
    pub const ENOENT: Errno = Errno(2);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(12);
    /// Permission denied (reading a write-only attribute).
    pub const EACCES: Errno = Errno(13);
    /// Device or resource busy (another transition is running).
    pub const EBUSY: Errno = Errno(16);
    /// File exists (a patch of that name is already loaded).
    pub const EEXIST: Errno = Errno(17);
    /// No such device.
    pub const ENODEV: Errno = Errno(19);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(22);
    /// Address already in use: a thread is sleeping on a patched function.
    pub const EADDRINUSE: Errno = Errno(98);

    /// Converts a C-style callback result (0 for success, a negative errno on
    /// failure) into `Ok` or the positive errno.
    pub fn from_callback_result(ret: i32) -> Result<(), Errno> {
        match ret {
            0 => Ok(()),
            r if r < 0 => Err(Errno(r.saturating_neg())),
            r => Err(Errno(r)),
        }
    }

    /// The value as the kernel prints it in `(%d)` positions: negative.
    pub fn negative(self) -> i32 {
        -self.0
    }

    /// The symbolic name, such as `EINVAL`, or `E<number>` for others.
    pub fn name(self) -> String {
        let known = match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            12 => "ENOMEM",
            13 => "EACCES",
            16 => "EBUSY",
            17 => "EEXIST",
            19 => "ENODEV",
            22 => "EINVAL",
            98 => "EADDRINUSE",
            _ => return format!("E{}", self.0),
        };
        known.to_string()
    }

    /// The words the module loader prints for this error when `insmod` fails
    /// (`init_module` errors), e.g. "Invalid parameters" for `EINVAL`.
    pub fn load_error_text(self) -> &'static str {
        match self.0 {
            1 => "Operation not permitted",
            2 => "Unknown symbol in module",
            12 => "Cannot allocate memory",
            16 => "Device or resource busy",
            17 => "Module already in kernel",
            19 => "No such device",
            22 => "Invalid parameters",
            _ => "Unknown error",
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_results_map_to_positive_errno() {
        assert_eq!(Errno::from_callback_result(0), Ok(()));
        assert_eq!(Errno::from_callback_result(-19), Err(Errno::ENODEV));
        assert_eq!(Errno::from_callback_result(5), Err(Errno(5)));
        assert_eq!(Errno::ENODEV.negative(), -19);
        assert_eq!(Errno::ENODEV.load_error_text(), "No such device");
        assert_eq!(Errno(77).name(), "E77");
    }
}
