//! Classifies a path inside the placement tree: what a file system
//! notification about that path is about.
//!
//! Pure and free of the notifier's types, so that the watcher can stay a thin
//! edge: it asks [`classify`] what a path is, then reads the file or lists the
//! directory and emits [`TreeEvent`](super::TreeEvent)s. Dot names are never
//! data (the mirror's `.tmp*` files, `.done` and `.data` markers), so they and
//! everything under them classify as [`PathKind::Ignored`]; the one exception
//! is the readiness marker `.modified` at the root. A host or instance name
//! the scan would refuse (not UTF-8, not a plain file name, a control
//! character) is [`PathKind::Rejected`] with the same reason, so that the
//! watcher warns about it as the scan does.

use std::ffi::OsStr;
use std::path::{Component, Path};

use super::names::{MODIFIED, PLACEMENT, SERVERS};
use crate::model::{HostName, Proid};

/// What a path inside the tree stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathKind {
    /// `<root>/.modified`, the mirror's readiness marker.
    Modified,
    /// `<root>/servers` itself.
    ServersDir,
    /// `<root>/placement` itself.
    PlacementDir,
    /// `<root>/servers/<host>`: a server file.
    Server(HostName),
    /// `<root>/placement/<host>`: a host's placement directory.
    HostDir(HostName),
    /// `<root>/placement/<host>/<instance>`: an instance placed on a host.
    Placement(HostName, String),
    /// A server, host directory or placement whose name is refused, and why.
    Rejected(String),
    /// Anything else: dot names, other directories (`scheduled/`), paths
    /// outside the root or deeper than a placement.
    Ignored,
}

/// Classifies `path`, which should lie under `root` (both spelled the same
/// way: the watcher reports paths under the root it was given).
pub fn classify(root: &Path, path: &Path) -> PathKind {
    let Ok(rel) = path.strip_prefix(root) else {
        return PathKind::Ignored;
    };
    let mut names: Vec<&OsStr> = Vec::with_capacity(3);
    for component in rel.components() {
        let Component::Normal(name) = component else {
            return PathKind::Ignored;
        };
        names.push(name);
        if names.len() > 3 {
            return PathKind::Ignored;
        }
    }
    if names == [OsStr::new(MODIFIED)] {
        return PathKind::Modified;
    }
    if names
        .iter()
        .any(|name| name.as_encoded_bytes().starts_with(b"."))
    {
        return PathKind::Ignored;
    }
    let Some((top, names)) = names.split_first() else {
        return PathKind::Ignored;
    };
    let dir = match top.to_str() {
        Some(SERVERS) => Dir::Servers,
        Some(PLACEMENT) => Dir::Placement,
        _ => return PathKind::Ignored,
    };
    let host = |name: &OsStr| {
        let name = utf8(name)?;
        HostName::new(name).map_err(|e| PathKind::Rejected(e.to_string()))
    };
    let kind = match (dir, names) {
        (Dir::Servers, []) => Ok(PathKind::ServersDir),
        (Dir::Placement, []) => Ok(PathKind::PlacementDir),
        (Dir::Servers, [name]) => host(name).map(PathKind::Server),
        (Dir::Placement, [name]) => host(name).map(PathKind::HostDir),
        (Dir::Placement, [name, instance]) => host(name).and_then(|h| {
            let instance = utf8(instance)?;
            match Proid::of_instance(instance) {
                Ok(_) => Ok(PathKind::Placement(h, instance.to_owned())),
                Err(why) => Err(PathKind::Rejected(why.to_string())),
            }
        }),
        _ => Ok(PathKind::Ignored),
    };
    kind.unwrap_or_else(|rejected| rejected)
}

/// A name as text, or refused as the scan refuses it.
fn utf8(name: &OsStr) -> Result<&str, PathKind> {
    name.to_str()
        .ok_or_else(|| PathKind::Rejected("name is not UTF-8".into()))
}

/// The two directories of the tree whose entries are data.
#[derive(Clone, Copy)]
enum Dir {
    Servers,
    Placement,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    const ROOT: &str = "/var/tmp/cell";

    fn kind(rel: &str) -> PathKind {
        classify(Path::new(ROOT), &Path::new(ROOT).join(rel))
    }

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("host")
    }

    #[test]
    fn the_tree_layout() {
        assert_eq!(kind(".modified"), PathKind::Modified);
        assert_eq!(kind("servers"), PathKind::ServersDir);
        assert_eq!(kind("placement"), PathKind::PlacementDir);
        assert_eq!(
            kind("servers/h1.ad.com"),
            PathKind::Server(host("h1.ad.com"))
        );
        assert_eq!(kind("placement/h1"), PathKind::HostDir(host("h1")));
        assert_eq!(
            kind("placement/h1/proid1.web#0000000042"),
            PathKind::Placement(host("h1"), "proid1.web#0000000042".into())
        );
    }

    #[test]
    fn dot_names_are_ignored_at_every_level() {
        for rel in [
            ".tmp123",
            ".done",
            "servers/.tmpXYZ",
            "servers/.modified",
            "placement/.tmp1",
            "placement/h1/.tmp1",
            "placement/h1/.done",
            "placement/.data/proid1.web#1",
            ".modified/x",
        ] {
            assert_eq!(kind(rel), PathKind::Ignored, "{rel}");
        }
    }

    #[test]
    fn other_paths_are_ignored() {
        for rel in [
            "",
            "scheduled",
            "scheduled/proid1.web#1",
            "servers/h1/extra",
            "placement/h1/proid1.web#1/deeper",
            "placement/h1/proid1.web#1/deeper/still",
            "modified",
        ] {
            assert_eq!(kind(rel), PathKind::Ignored, "{rel:?}");
        }
        assert_eq!(
            classify(Path::new(ROOT), Path::new("/elsewhere/servers/h1")),
            PathKind::Ignored
        );
        assert_eq!(
            classify(Path::new(ROOT), Path::new("/var/tmp/cellar/servers/h1")),
            PathKind::Ignored,
            "a sibling sharing the root's prefix is not inside it"
        );
        assert_eq!(
            classify(
                Path::new(ROOT),
                Path::new("/var/tmp/cell/placement/../servers/h1")
            ),
            PathKind::Ignored
        );
    }

    #[test]
    fn non_utf8_names_are_rejected_as_the_scan_rejects_them() {
        for rel in [
            &b"servers/h\xff"[..],
            b"placement/h\xff",
            b"placement/h1/p.w\xfe#1",
        ] {
            let path = Path::new(ROOT).join(OsStr::from_bytes(rel));
            assert_eq!(
                classify(Path::new(ROOT), &path),
                PathKind::Rejected("name is not UTF-8".into()),
                "{path:?}"
            );
        }
        // Where no data can be, a name is not looked at.
        for rel in [&b"scheduled/h\xff"[..], b"servers/h\xff/deeper"] {
            let path = Path::new(ROOT).join(OsStr::from_bytes(rel));
            assert_eq!(
                classify(Path::new(ROOT), &path),
                PathKind::Ignored,
                "{path:?}"
            );
        }
    }

    #[test]
    fn names_with_control_characters_are_rejected_with_the_reason() {
        let rejected = |rel: &str| match kind(rel) {
            PathKind::Rejected(why) => why,
            other => panic!("{rel:?}: {other:?}"),
        };
        for (rel, what) in [
            ("servers/h1\nx", "host name"),
            ("placement/h1\r", "host name"),
            ("placement/h\u{1b}[2J/proid1.web#1", "host name"),
            ("placement/h1/proid1.web\n#1", "instance name"),
            ("placement/h1/pro\u{7f}id.web#1", "instance name"),
            ("placement/h1/proid1\tx.web#1", "instance name"),
        ] {
            let why = rejected(rel);
            assert!(
                why.starts_with(what) && why.contains("control character"),
                "{rel:?}: {why}"
            );
            assert!(!why.chars().any(crate::model::is_control), "{why:?}");
        }
        assert_eq!(
            rejected("placement/h1/noproid#1"),
            "not a placement: no proid"
        );
        // Not control characters: these are names like any other.
        assert_eq!(
            kind("placement/h :1/<p\u{e9}.web#1"),
            PathKind::Placement(host("h :1"), "<p\u{e9}.web#1".into())
        );
    }

    #[test]
    fn relative_roots_work_too() {
        assert_eq!(
            classify(Path::new("tree"), Path::new("tree/servers/h1")),
            PathKind::Server(host("h1"))
        );
        assert_eq!(
            classify(Path::new("./tree"), Path::new("./tree/placement/h2")),
            PathKind::HostDir(host("h2"))
        );
    }
}

/// Property tests of the classifier, at the cases CI can afford; the fuzz
/// target `classify` (fuzz/) checks the same on any path.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    const ROOT: &str = "/var/tmp/cell";

    /// Path pieces with the names that matter: dot names, `..`, empty
    /// pieces (a `//`), the tree's own directory names, any text.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just(".modified".to_owned()),
            Just("servers".to_owned()),
            Just("placement".to_owned()),
            "\\.?[a-z0-9#.]{1,6}",
            any::<String>(),
        ]
    }

    fn plain(name: &str) -> bool {
        !name.is_empty()
            && !name.contains('/')
            && !name.starts_with('.')
            && !name.chars().any(crate::model::is_control)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn what_a_path_names_is_a_plain_name(pieces in proptest::collection::vec(piece(), 0..5)) {
            let path = PathBuf::from(format!("{ROOT}/{}", pieces.join("/")));
            let root = Path::new(ROOT);
            let kind = classify(root, &path);
            let rebuilt = match &kind {
                PathKind::Server(host) => {
                    prop_assert!(plain(host.as_str()), "{:?}", kind);
                    root.join("servers").join(host.as_str())
                }
                PathKind::HostDir(host) => {
                    prop_assert!(plain(host.as_str()), "{:?}", kind);
                    root.join("placement").join(host.as_str())
                }
                PathKind::Placement(host, instance) => {
                    prop_assert!(plain(host.as_str()) && plain(instance), "{:?}", kind);
                    prop_assert!(Proid::name_in(instance).is_some(), "{:?}", kind);
                    root.join("placement").join(host.as_str()).join(instance)
                }
                PathKind::Modified => root.join(".modified"),
                PathKind::ServersDir => root.join("servers"),
                PathKind::PlacementDir => root.join("placement"),
                // The reason goes into a warning line of its own.
                PathKind::Rejected(why) => {
                    prop_assert!(!why.chars().any(crate::model::is_control), "{:?}", why);
                    return Ok(());
                }
                PathKind::Ignored => return Ok(()),
            };
            prop_assert_eq!(classify(root, &rebuilt), kind);
        }

        #[test]
        fn every_placement_path_is_classified_as_one(
            // Plain names without control characters; an instance with a
            // proid before its first `.`.
            host in "[^./\\x00-\\x1f\\x7f][^/\\x00-\\x1f\\x7f]{0,12}",
            instance in "[^./\\x00-\\x1f\\x7f]{1,6}\\.[^/\\x00-\\x1f\\x7f]{0,8}",
        ) {
            let path = Path::new(ROOT).join("placement").join(&host).join(&instance);
            prop_assert_eq!(
                classify(Path::new(ROOT), &path),
                PathKind::Placement(HostName::new(&host).expect("a plain name"), instance)
            );
        }
    }
}
