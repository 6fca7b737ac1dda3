//! The kernel's module notifiers for the program's libraries: objects that entered or left the
//! link map since the core last heard are handed to `klp_module_coming` and
//! `klp_module_going`, going ones first (their addresses may be reused by coming ones).

#![forbid(unsafe_code)]

use livepatch_core::{ComingError, Livepatch, MAIN_OBJECT_NAME};

use crate::platform::ProcessPlatform;

/// A library a patch refused as it came: the program's `dlopen` of it must fail.
pub type ComingRefusal = ComingError;

/// Who learns of a refusal of a coming library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusals {
    /// The program's `dlopen` of it, which waits for the answer: it unloads the library and
    /// fails.
    ToTheLoader,
    /// Nobody waits (a library found by the agent's thread, or one that came with a patch's
    /// dependencies): it stays, unpatched, and is logged.
    Logged,
}

/// Tells the core about the libraries that came and went. With [`Refusals::ToTheLoader`],
/// returns why a coming library was refused, if one was; the caller must unload it again (and
/// call this once more).
pub fn sync_objects(
    core: &mut Livepatch,
    platform: &mut ProcessPlatform,
    refusals: Refusals,
) -> Option<ComingRefusal> {
    let (gone, new) = platform.objects.changes();
    for name in gone {
        core.object_going(platform, &name);
        platform.objects.gone(&name);
    }
    let mut refused = None;
    for name in new {
        if name == MAIN_OBJECT_NAME {
            continue;
        }
        match core.object_coming(platform, &name) {
            Ok(()) => platform.objects.known(&name),
            // Nobody can fail the `dlopen` of it any more: the library stays, unpatched, and is
            // not offered again (a later `dlopen` of another library must not fail for it).
            Err(e) if refusals == Refusals::Logged => {
                platform.log.agent(
                    livepatch_core::Level::Err,
                    format_args!(
                        "library {} was loaded by the program but refused by a patch, and runs \
                         unpatched: {e}",
                        name.escape_debug()
                    ),
                );
                platform.objects.known(&name);
            }
            Err(e) => refused = Some(e),
        }
    }
    refused
}
