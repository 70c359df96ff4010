//! The tree-path classifier on arbitrary paths under a few roots. Whatever
//! it names is a plain name: never empty, never holding `/` or a control
//! character, never starting with `.` (a dot name is the mirror's own file),
//! so a host or an instance can not address anything outside its directory;
//! an instance has a proid; the reason for a rejected name holds no control
//! character; and rebuilding the path from what it names classifies the same.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use gmsa_reconciler::model::{is_control, Proid};
use gmsa_reconciler::tree::event::{classify, PathKind};
use libfuzzer_sys::fuzz_target;

const ROOTS: &[&str] = &["/var/tmp/cell", "/var/tmp/cell/", "tree", "./tree", "/", ""];

fn plain(name: &str) {
    assert!(!name.is_empty(), "an empty name");
    assert!(!name.contains('/'), "{name:?} holds '/'");
    assert!(!name.starts_with('.'), "{name:?} is a dot name");
    assert!(
        !name.chars().any(is_control),
        "{name:?} holds a control character"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let root = Path::new(ROOTS[usize::from(pick) % ROOTS.len()]);
    // The rest is written after the root as raw bytes, so the path may hold
    // `//`, `.`, `..`, non-UTF-8 names and anything else a path can.
    let mut bytes = root.as_os_str().as_bytes().to_vec();
    bytes.extend_from_slice(rest);
    let path = PathBuf::from(OsStr::from_bytes(&bytes));
    let kind = classify(root, &path);
    let rebuilt = match &kind {
        PathKind::Server(host) => {
            plain(host.as_str());
            root.join("servers").join(host.as_str())
        }
        PathKind::HostDir(host) => {
            plain(host.as_str());
            root.join("placement").join(host.as_str())
        }
        PathKind::Placement(host, instance) => {
            plain(host.as_str());
            plain(instance);
            assert!(
                Proid::name_in(instance).is_some(),
                "{instance:?} has no proid"
            );
            root.join("placement").join(host.as_str()).join(instance)
        }
        PathKind::Modified => root.join(".modified"),
        PathKind::ServersDir => root.join("servers"),
        PathKind::PlacementDir => root.join("placement"),
        // The reason is quoted in a warning line of its own.
        PathKind::Rejected(why) => {
            assert!(!why.chars().any(is_control), "{why:?}");
            return;
        }
        PathKind::Ignored => return,
    };
    assert_eq!(
        classify(root, &rebuilt),
        kind,
        "{path:?} rebuilt as {rebuilt:?}"
    );
});
