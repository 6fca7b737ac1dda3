//! `include/livepatch.h` and the agent's `#[repr(C)]` mirrors of its structures agree: the
//! size of every structure and the offset of every field, as a C compiler lays them out.

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use livepatch_agent::ffi::descriptor::{
    KlpCallbacks, KlpFunc, KlpObject, KlpPatch, KlpState, KlpStateCallbacks,
};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// Every structure of the header and its fields, as `sizeof`/`offsetof` name them.
const LAYOUT: &[(&str, &[&str])] = &[
    ("klp_func", &["old_name", "new_func", "old_sympos"]),
    (
        "klp_callbacks",
        &[
            "pre_patch",
            "post_patch",
            "pre_unpatch",
            "post_unpatch",
            "post_unpatch_enabled",
        ],
    ),
    ("klp_object", &["name", "funcs", "callbacks", "build_id"]),
    (
        "klp_state_callbacks",
        &["setup", "enable", "disable", "release", "setup_succeeded"],
    ),
    ("klp_state", &["id", "version", "callbacks", "data"]),
    ("klp_patch", &["name", "objs", "states", "replace"]),
];

/// What the Rust mirrors say, in the same terms: `sizeof NAME = N` and `offsetof NAME.FIELD = N`.
fn rust_layout() -> Vec<String> {
    macro_rules! lines {
        ($($c:literal => $t:ty { $($f:ident),* }),* $(,)?) => {{
            let mut out = Vec::new();
            $(
                out.push(format!("sizeof {} = {}", $c, size_of::<$t>()));
                $(out.push(format!(
                    "offsetof {}.{} = {}",
                    $c,
                    stringify!($f),
                    offset_of!($t, $f)
                ));)*
            )*
            out
        }};
    }
    lines![
        "klp_func" => KlpFunc { old_name, new_func, old_sympos },
        "klp_callbacks" => KlpCallbacks {
            pre_patch, post_patch, pre_unpatch, post_unpatch, post_unpatch_enabled
        },
        "klp_object" => KlpObject { name, funcs, callbacks, build_id },
        "klp_state_callbacks" => KlpStateCallbacks {
            setup, enable, disable, release, setup_succeeded
        },
        "klp_state" => KlpState { id, version, callbacks, data },
        "klp_patch" => KlpPatch { name, objs, states, replace },
    ]
}

/// What the C compiler says, from a program that prints the same lines.
fn c_layout() -> Vec<String> {
    let mut program =
        String::from("#include <livepatch.h>\n#include <stddef.h>\nint main(void) {\n");
    for (name, fields) in LAYOUT {
        program.push_str(&format!(
            "    printf(\"sizeof {name} = %zu\\n\", sizeof(struct {name}));\n"
        ));
        for field in *fields {
            program.push_str(&format!(
                "    printf(\"offsetof {name}.{field} = %zu\\n\", offsetof(struct {name}, {field}));\n"
            ));
        }
    }
    program.push_str("    return 0;\n}\n");
    let dir = std::env::temp_dir().join(format!("livepatch-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("layout.c");
    let binary = dir.join("layout");
    std::fs::write(&source, program).unwrap();
    let status = Command::new("cc")
        .arg(format!(
            "-I{}",
            Path::new(WORKSPACE).join("include").display()
        ))
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .status()
        .expect("cc runs");
    assert!(status.success(), "compiling the layout program failed");
    let out = Command::new(&binary)
        .output()
        .expect("the layout program runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_structure_of_the_header_has_the_size_and_field_offsets_of_its_mirror() {
    let c = c_layout();
    let expected_lines: usize = LAYOUT.iter().map(|(_, fields)| 1 + fields.len()).sum();
    assert_eq!(c.len(), expected_lines, "{c:#?}");
    assert_eq!(rust_layout(), c);
}
