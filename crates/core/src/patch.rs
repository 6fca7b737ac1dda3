//! Patches, objects and funcs: the descriptors a patch library declares, the
//! core's runtime records of them, and their validation (kernel:
//! `struct klp_patch`, `klp_object`, `klp_func`, and `klp_init_*` in core.c).

use crate::callbacks::ObjectCallbacks;
use crate::errno::Errno;
use crate::platform::{Platform, ResolveError};
use crate::{Addr, CallbackId, log};

/// `MODULE_NAME_LEN`: object names must be shorter.
pub const MODULE_NAME_LEN: usize = 56;
/// `KSYM_NAME_LEN`: function names must be shorter.
pub const KSYM_NAME_LEN: usize = 512;
/// How the main executable is named in log lines and in the attribute tree,
/// as the kernel names its core image.
pub const MAIN_OBJECT_NAME: &str = "vmlinux";

/// A patch identity, unique for the life of a [`crate::Livepatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PatchId(pub u64);

/// One function to replace (`struct klp_func`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuncDesc {
    /// Name of the function being replaced.
    pub old_name: String,
    /// Address of the replacement; must not be 0.
    pub new_func: Addr,
    /// Which of several symbols named `old_name`: 0 requires a unique name,
    /// N is the Nth in symbol-table order.
    pub old_sympos: u64,
}

/// An object to patch (`struct klp_object`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectDesc {
    /// The shared object's name; `None` is the main executable.
    pub name: Option<String>,
    /// The functions to replace; may be empty for callback-only objects.
    pub funcs: Vec<FuncDesc>,
    /// The per-object callbacks.
    pub callbacks: ObjectCallbacks,
    /// The GNU build id of the object the patch was written for, in hex as `readelf -n`
    /// prints it; `None` accepts any build.
    pub build_id: Option<String>,
}

/// The per-state callbacks of seed 004 (`struct klp_state_callbacks`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCallbacks {
    /// Before patching, only when the state is new. May fail.
    pub setup: Option<CallbackId>,
    /// After the patching transition, only when the state is new.
    pub enable: Option<CallbackId>,
    /// Before unpatching, or before an obsolete state is replaced away.
    pub disable: Option<CallbackId>,
    /// After unpatching or replacement, only when setup succeeded.
    pub release: Option<CallbackId>,
}

impl StateCallbacks {
    /// Whether the patch knows how to take the state away again.
    pub fn can_remove(&self) -> bool {
        self.disable.is_some() || self.release.is_some()
    }
}

/// A system state the patch modifies (`struct klp_state`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDesc {
    /// Non-zero identifier of the state.
    pub id: u64,
    /// Version of the modification.
    pub version: u32,
    /// Per-state callbacks.
    pub callbacks: StateCallbacks,
}

/// A patch as its library declares it (`struct klp_patch`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatchDesc {
    /// The patch name, unique among loaded patches.
    pub name: String,
    /// The objects it patches.
    pub objs: Vec<ObjectDesc>,
    /// The system states it modifies.
    pub states: Vec<StateDesc>,
    /// Atomic replace: a cumulative patch that replaces all others.
    pub replace: bool,
}

/// Why a patch could not be enabled: the error number the kernel returns and
/// a sentence that names the thing and the reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct EnableError {
    /// The kernel's error number for this failure.
    pub errno: Errno,
    /// What failed and why, for people.
    pub reason: String,
}

impl EnableError {
    pub(crate) fn new(errno: Errno, reason: impl Into<String>) -> Self {
        EnableError {
            errno,
            reason: reason.into(),
        }
    }
}

/// The runtime record of a func.
#[derive(Clone, Debug)]
pub(crate) struct Func {
    pub(crate) old_name: String,
    pub(crate) old_sympos: u64,
    /// The replacement; for a nop, equal to `old_func` once resolved.
    pub(crate) new_func: Addr,
    pub(crate) nop: bool,
    /// Resolved address of the original, while the object is loaded.
    pub(crate) old_func: Option<Addr>,
    pub(crate) old_size: u64,
    pub(crate) new_size: u64,
    /// On its func stack.
    pub(crate) patched: bool,
    /// Being applied or reverted.
    pub(crate) transition: bool,
}

impl Func {
    pub(crate) fn from_desc(desc: &FuncDesc) -> Self {
        Func {
            old_name: desc.old_name.clone(),
            old_sympos: desc.old_sympos,
            new_func: desc.new_func,
            nop: false,
            old_func: None,
            old_size: 0,
            new_size: 0,
            patched: false,
            transition: false,
        }
    }

    pub(crate) fn new_nop(old_name: &str, old_sympos: u64) -> Self {
        Func {
            old_name: old_name.to_string(),
            old_sympos,
            new_func: 0,
            nop: true,
            old_func: None,
            old_size: 0,
            new_size: 0,
            patched: false,
            transition: false,
        }
    }

    /// The name of the attribute directory: `"%s,%lu"` with sympos 0 shown
    /// as 1.
    pub(crate) fn sysfs_name(&self) -> String {
        format!("{},{}", self.old_name, self.old_sympos.max(1))
    }

    /// The func's target when on top of its stack.
    pub(crate) fn target(&self) -> crate::func_stack::Target {
        if self.nop {
            crate::func_stack::Target::Original
        } else {
            crate::func_stack::Target::Code(self.new_func)
        }
    }
}

/// The runtime record of an object.
#[derive(Clone, Debug)]
pub(crate) struct Object {
    pub(crate) name: Option<String>,
    pub(crate) funcs: Vec<Func>,
    pub(crate) callbacks: ObjectCallbacks,
    /// The build the object must be, from the descriptor (dynamic objects accept any).
    pub(crate) build_id: Option<Vec<u8>>,
    /// Index in the descriptor's `objs`; `None` for dynamic objects.
    pub(crate) desc_index: Option<usize>,
    /// Allocated only to hold nops for atomic replace.
    pub(crate) dynamic: bool,
    /// The object is loaded and alive (`obj->mod` set, or the main image).
    pub(crate) loaded: bool,
    /// Every func of the object is on its func stack.
    pub(crate) patched: bool,
    /// Gates `post_unpatch`: the result of `pre_patch`.
    pub(crate) post_unpatch_enabled: bool,
}

impl Object {
    /// The name used in log lines and attribute paths.
    pub(crate) fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(MAIN_OBJECT_NAME)
    }

    /// Whether this object is the one named `name` (`None`: main).
    pub(crate) fn matches(&self, name: Option<&str>) -> bool {
        self.name.as_deref() == name
    }
}

/// The runtime record of a state.
#[derive(Clone, Debug)]
pub(crate) struct State {
    pub(crate) id: u64,
    pub(crate) version: u32,
    pub(crate) callbacks: StateCallbacks,
    pub(crate) setup_succeeded: bool,
}

/// The runtime record of a patch.
#[derive(Clone, Debug)]
pub(crate) struct Patch {
    pub(crate) id: PatchId,
    pub(crate) name: String,
    pub(crate) replace: bool,
    /// Enabled, or in a patching transition.
    pub(crate) enabled: bool,
    /// Took part in a forced transition: its code may still run.
    pub(crate) forced: bool,
    pub(crate) objects: Vec<Object>,
    pub(crate) states: Vec<State>,
}

impl Patch {
    /// Builds the record from a descriptor after checking the descriptor's
    /// shape (kernel: `klp_init_patch_early`, `klp_init_func` name checks).
    pub(crate) fn from_desc(id: PatchId, desc: &PatchDesc) -> Result<Self, EnableError> {
        validate_desc(desc)?;
        let objects = desc
            .objs
            .iter()
            .enumerate()
            .map(|(i, o)| Object {
                name: o.name.clone(),
                funcs: o.funcs.iter().map(Func::from_desc).collect(),
                callbacks: o.callbacks,
                build_id: o.build_id.as_deref().and_then(parse_build_id),
                desc_index: Some(i),
                dynamic: false,
                loaded: false,
                patched: false,
                post_unpatch_enabled: false,
            })
            .collect();
        let states = desc
            .states
            .iter()
            .map(|s| State {
                id: s.id,
                version: s.version,
                callbacks: s.callbacks,
                setup_succeeded: false,
            })
            .collect();
        Ok(Patch {
            id,
            name: desc.name.clone(),
            replace: desc.replace,
            enabled: false,
            forced: false,
            objects,
            states,
        })
    }

    pub(crate) fn state(&self, id: u64) -> Option<&State> {
        self.states.iter().find(|s| s.id == id)
    }
}

fn invalid(reason: String) -> EnableError {
    EnableError::new(Errno::EINVAL, reason)
}

/// The checks of `klp_enable_patch`, `klp_init_object` and `klp_init_func`
/// that need no symbol lookup.
fn validate_desc(desc: &PatchDesc) -> Result<(), EnableError> {
    if desc.name.is_empty() {
        return Err(invalid("the patch has no name".into()));
    }
    if desc.name.contains('/') || desc.name.contains(char::is_whitespace) {
        return Err(invalid(format!(
            "patch name '{}' contains '/' or white space",
            desc.name
        )));
    }
    if desc.objs.is_empty() {
        return Err(invalid(format!("patch '{}' has no objects", desc.name)));
    }
    for (i, obj) in desc.objs.iter().enumerate() {
        if let Some(name) = &obj.name
            && (name.is_empty() || name.len() >= MODULE_NAME_LEN)
        {
            return Err(invalid(format!(
                "object #{i} of patch '{}': name '{name}' must have 1 to {} bytes",
                desc.name,
                MODULE_NAME_LEN - 1
            )));
        }
        let obj_name = obj.name.as_deref().unwrap_or(MAIN_OBJECT_NAME);
        if let Some(text) = &obj.build_id
            && parse_build_id(text).is_none()
        {
            return Err(invalid(format!(
                "build_id of object '{obj_name}' in patch '{}' is {text:?}, not a build id in hex",
                desc.name
            )));
        }
        if desc.objs[..i].iter().any(|o| o.name == obj.name) {
            return Err(invalid(format!(
                "patch '{}' lists object '{obj_name}' twice",
                desc.name
            )));
        }
        for func in &obj.funcs {
            if func.old_name.is_empty() {
                return Err(invalid(format!(
                    "a func of object '{obj_name}' in patch '{}' has no old_name",
                    desc.name
                )));
            }
            if func.old_name.len() >= KSYM_NAME_LEN {
                return Err(invalid(format!(
                    "old_name of a func of object '{obj_name}' is {} bytes long, the limit is {}",
                    func.old_name.len(),
                    KSYM_NAME_LEN - 1
                )));
            }
            if func.new_func == 0 {
                return Err(invalid(format!(
                    "func '{}' of object '{obj_name}' has no new_func",
                    func.old_name
                )));
            }
        }
    }
    for (i, state) in desc.states.iter().enumerate() {
        if state.id == 0 {
            return Err(invalid(format!(
                "state #{i} of patch '{}' has id 0",
                desc.name
            )));
        }
        if desc.states[..i].iter().any(|s| s.id == state.id) {
            return Err(invalid(format!(
                "patch '{}' lists state {} twice",
                desc.name, state.id
            )));
        }
    }
    Ok(())
}

/// Resolves every func of a loaded object (kernel: `klp_init_object_loaded`):
/// the object's build id, addresses and sizes of originals and replacements,
/// nops pointed at their original, and the plan of each redirection. Logs the
/// kernel's line on failure. Touches nothing but `obj`'s funcs and the
/// platform's plans.
pub(crate) fn init_object_loaded<P: Platform>(
    p: &mut P,
    obj: &mut Object,
) -> Result<(), EnableError> {
    let obj_name = obj.display_name().to_string();
    if let Some(wanted) = &obj.build_id {
        let actual = p.object_build_id(obj.name.as_deref());
        if actual.as_ref() != Some(wanted) {
            let has = match actual {
                Some(id) => format!("has build id {}", hex(&id)),
                None => "has no build id".to_string(),
            };
            return Err(invalid(format!(
                "object '{obj_name}' {has}, but the patch was written for build id {}",
                hex(wanted)
            )));
        }
    }
    for func in &mut obj.funcs {
        let location = match p.resolve_func(obj.name.as_deref(), &func.old_name, func.old_sympos) {
            Ok(location) => location,
            Err(err) => return Err(resolve_failed(p, err, func, &obj_name)),
        };
        if location.size == 0 {
            return Err(resolve_failed(p, ResolveError::NoSize, func, &obj_name));
        }
        if let Err(reason) = p.plan_site(&func.old_name, location) {
            p.log(log::failed_to_find_location(&func.old_name));
            return Err(invalid(format!(
                "function '{}' in object '{obj_name}' cannot be redirected: {reason}",
                func.old_name
            )));
        }
        func.old_func = Some(location.addr);
        func.old_size = location.size;
        if func.nop {
            func.new_func = location.addr;
            func.new_size = location.size;
        } else {
            match p.func_size(func.new_func).filter(|s| *s > 0) {
                Some(size) => func.new_size = size,
                None => {
                    p.log(log::replacement_size_lookup_failed(&func.old_name));
                    return Err(EnableError::new(
                        Errno::ENOENT,
                        format!(
                            "no function symbol covers the replacement of '{}' at {:#x}",
                            func.old_name, func.new_func
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn resolve_failed<P: Platform>(
    p: &mut P,
    err: ResolveError,
    func: &Func,
    obj_name: &str,
) -> EnableError {
    let name = &func.old_name;
    match err {
        ResolveError::NotFound => {
            p.log(log::symbol_not_found(name));
            invalid(format!(
                "symbol '{name}' not found in the symbol table of object '{obj_name}'"
            ))
        }
        ResolveError::Ambiguous { count } => {
            p.log(log::symbol_ambiguous(name, obj_name));
            invalid(format!(
                "symbol '{name}' occurs {count} times in object '{obj_name}'; set old_sympos to choose one"
            ))
        }
        ResolveError::PositionNotFound => {
            p.log(log::symbol_position_not_found(
                func.old_sympos,
                name,
                obj_name,
            ));
            invalid(format!(
                "symbol position {} for symbol '{name}' in object '{obj_name}' not found",
                func.old_sympos
            ))
        }
        ResolveError::NoSize => {
            p.log(log::size_lookup_failed(name));
            EnableError::new(
                Errno::ENOENT,
                format!("symbol '{name}' in object '{obj_name}' has no size"),
            )
        }
    }
}

/// A build id from its hex text, as `readelf -n` prints it (case does not matter); `None`
/// when it is not an even number of hex digits.
fn parse_build_id(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.is_empty() || !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Lower-case hex of a build id.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Forgets what was resolved for an object that went away (kernel:
/// `klp_free_object_loaded`).
pub(crate) fn free_object_loaded(obj: &mut Object) {
    obj.loaded = false;
    for func in &mut obj.funcs {
        func.old_func = None;
        if func.nop {
            func.new_func = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> PatchDesc {
        PatchDesc {
            name: "p".into(),
            objs: vec![ObjectDesc {
                name: None,
                funcs: vec![FuncDesc {
                    old_name: "f".into(),
                    new_func: 0x10,
                    old_sympos: 0,
                }],
                callbacks: ObjectCallbacks::default(),
                build_id: None,
            }],
            states: vec![],
            replace: false,
        }
    }

    #[test]
    fn descriptor_shape_is_checked() {
        assert!(validate_desc(&desc()).is_ok());
        let mut d = desc();
        d.objs[0].funcs[0].new_func = 0;
        let e = validate_desc(&d).unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.reason.contains("'f'"), "{}", e.reason);
        let mut d = desc();
        d.objs[0].name = Some("x".repeat(MODULE_NAME_LEN));
        assert_eq!(validate_desc(&d).unwrap_err().errno, Errno::EINVAL);
        let mut d = desc();
        d.states.push(StateDesc {
            id: 0,
            version: 1,
            callbacks: StateCallbacks::default(),
        });
        assert!(validate_desc(&d).unwrap_err().reason.contains("id 0"));
        let mut d = desc();
        d.objs.clear();
        assert!(validate_desc(&d).is_err());
        let mut d = desc();
        d.objs[0].build_id = Some("abc".into());
        assert!(
            validate_desc(&d)
                .unwrap_err()
                .reason
                .contains("not a build id")
        );
    }

    #[test]
    fn build_ids_are_read_in_either_case() {
        assert_eq!(parse_build_id("0aFf"), Some(vec![0x0a, 0xff]));
        assert_eq!(parse_build_id("0g"), None);
        assert_eq!(parse_build_id(""), None);
        assert_eq!(hex(&[0x0a, 0xff]), "0aff");
    }

    #[test]
    fn sysfs_name_shows_sympos_zero_as_one() {
        let f = Func::new_nop("g", 0);
        assert_eq!(f.sysfs_name(), "g,1");
        let f = Func::new_nop("g", 3);
        assert_eq!(f.sysfs_name(), "g,3");
    }
}
