//! Classifies a path inside the placement tree: what a file system
//! notification about that path is about.
//!
//! Pure and free of the notifier's types, so that the watcher can stay a thin
//! edge: it asks [`classify`] what a path is, then reads the file or lists the
//! directory and emits [`TreeEvent`](super::TreeEvent)s. Dot names are never
//! data (the mirror's `.tmp*` files, `.done` and `.data` markers), so they and
//! everything under them classify as [`PathKind::Ignored`]; the one exception
//! is the readiness marker `.modified` at the root.

use std::path::{Component, Path};

use crate::model::HostName;

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
    /// Anything else: dot names, other directories (`scheduled/`), paths
    /// outside the root or deeper than a placement, names that are not UTF-8.
    Ignored,
}

/// Classifies `path`, which should lie under `root` (both spelled the same
/// way: the watcher reports paths under the root it was given).
pub fn classify(root: &Path, path: &Path) -> PathKind {
    let Ok(rel) = path.strip_prefix(root) else {
        return PathKind::Ignored;
    };
    let mut names: Vec<&str> = Vec::with_capacity(3);
    for component in rel.components() {
        let Component::Normal(name) = component else {
            return PathKind::Ignored;
        };
        let Some(name) = name.to_str() else {
            return PathKind::Ignored;
        };
        names.push(name);
        if names.len() > 3 {
            return PathKind::Ignored;
        }
    }
    if names == [".modified"] {
        return PathKind::Modified;
    }
    if names.iter().any(|name| name.starts_with('.')) {
        return PathKind::Ignored;
    }
    let host = |name: &str| HostName::new(name).ok();
    match names.as_slice() {
        ["servers"] => PathKind::ServersDir,
        ["placement"] => PathKind::PlacementDir,
        ["servers", name] => host(name).map_or(PathKind::Ignored, PathKind::Server),
        ["placement", name] => host(name).map_or(PathKind::Ignored, PathKind::HostDir),
        ["placement", name, instance] => host(name).map_or(PathKind::Ignored, |h| {
            PathKind::Placement(h, (*instance).to_owned())
        }),
        _ => PathKind::Ignored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

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
    fn non_utf8_names_are_ignored() {
        let mut path = PathBuf::from(ROOT);
        path.push("servers");
        path.push(OsStr::from_bytes(b"h\xff"));
        assert_eq!(classify(Path::new(ROOT), &path), PathKind::Ignored);
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
