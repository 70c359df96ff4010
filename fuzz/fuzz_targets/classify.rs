//! The tree-path classifier on arbitrary paths under a few roots. Whatever
//! it names is a plain name: never empty, never holding `/`, never starting
//! with `.` (a dot name is the mirror's own file), so a host or an instance
//! can not address anything outside its directory; a host name holds no NUL
//! either; and rebuilding the path from what it names classifies the same.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use gmsa_reconciler::tree::event::{classify, PathKind};
use libfuzzer_sys::fuzz_target;

const ROOTS: &[&str] = &["/var/tmp/cell", "/var/tmp/cell/", "tree", "./tree", "/", ""];

fn plain(name: &str) {
    assert!(!name.is_empty(), "an empty name");
    assert!(!name.contains('/'), "{name:?} holds '/'");
    assert!(!name.starts_with('.'), "{name:?} is a dot name");
}

/// No path from the kernel holds a NUL, so the classifier does not look for
/// one in an instance name; a host name is checked for one all the same.
fn host_name(name: &str) {
    plain(name);
    assert!(!name.contains('\0'), "{name:?} holds NUL");
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
            host_name(host.as_str());
            root.join("servers").join(host.as_str())
        }
        PathKind::HostDir(host) => {
            host_name(host.as_str());
            root.join("placement").join(host.as_str())
        }
        PathKind::Placement(host, instance) => {
            host_name(host.as_str());
            plain(instance);
            root.join("placement").join(host.as_str()).join(instance)
        }
        PathKind::Modified => root.join(".modified"),
        PathKind::ServersDir => root.join("servers"),
        PathKind::PlacementDir => root.join("placement"),
        PathKind::Ignored => return,
    };
    assert_eq!(
        classify(root, &rebuilt),
        kind,
        "{path:?} rebuilt as {rebuilt:?}"
    );
});
