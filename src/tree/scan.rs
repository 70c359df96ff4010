//! Reads a whole placement tree into a [`Snapshot`]: every server file
//! parsed, every placement directory listed.
//!
//! The scan is where a source that can't be read is kept from looking
//! empty (which would remove every member): a tree without `.modified`, or a missing or unlistable
//! `servers/` or `placement/` directory, is a [`ScanError`] and never an
//! empty snapshot. Problems with single entries (a broken server file, a
//! name that is not a host name or not a placement) only affect that entry
//! and are reported as warnings naming the path; a host directory that
//! can't be listed makes that host's placements unknown
//! ([`Snapshot::unknown`]), not empty.
//!
//! Every file here is read the one way tree files are read, through
//! [`crate::safe_fs`], because whoever can write into the tree may put
//! anything there: regular files only, opened without
//! blocking and without following a link, capped in size. The watcher
//! reads single entries through the same functions ([`load_server`],
//! [`scan_host_dir`], [`placement_at`]), so an event and a scan never
//! disagree about what a file is.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::names::{MODIFIED, PLACEMENT, SERVERS};
use super::{ServerError, ServerInfo, Snapshot};
use crate::model::{HostName, Proid};
use crate::parallel::in_parallel;
use crate::safe_fs::{self, Kind, ReadError};

/// Why a tree cannot be acted on at all.
#[derive(Debug, Error)]
pub enum ScanError {
    /// The mirror has not completed its first sync: the tree is incomplete.
    #[error("{}: missing: the tree is not ready (the mirror has not completed its first sync)", path.display())]
    NotReady {
        /// The path of the missing marker.
        path: PathBuf,
    },
    /// The root itself is missing or is not a directory: a wrong path, not a
    /// tree the mirror has yet to finish.
    #[error("{}: no such directory", path.display())]
    NoSuchDirectory {
        /// The root as configured.
        path: PathBuf,
    },
    /// A directory the tree must have is missing or is not a directory.
    #[error("{}: missing or not a directory", path.display())]
    Missing {
        /// The directory that was expected.
        path: PathBuf,
    },
    /// A directory (or the marker) could not be read.
    #[error("{}: cannot be read: {source}", path.display())]
    Io {
        /// What could not be read.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Reads the tree under `root`.
///
/// Names starting with `.` are ignored everywhere, without a warning: they
/// are the mirror's temp files and markers, never data.
pub fn scan(root: &Path) -> Result<Snapshot, ScanError> {
    check_ready(root)?;
    let servers_dir = required_dir(root, SERVERS)?;
    let placement_dir = required_dir(root, PLACEMENT)?;
    let mut snapshot = Snapshot::default();

    let servers = list(&servers_dir)?;
    for (warnings, server) in in_parallel(&servers, |(name, _)| {
        read_server_entry(&servers_dir.join(name), name)
    }) {
        snapshot.warnings.extend(warnings);
        if let Some((host, info)) = server {
            snapshot.servers.insert(host, info);
        }
    }

    let hosts = list(&placement_dir)?;
    for (warnings, read) in in_parallel(&hosts, |(name, _)| {
        read_placement_entry(&placement_dir.join(name), name)
    }) {
        snapshot.warnings.extend(warnings);
        if let Some((host, listing)) = read {
            take_listing(&mut snapshot, host, listing);
        }
    }
    Ok(snapshot)
}

/// Puts what a host's placement directory holds into `snapshot`.
fn take_listing(snapshot: &mut Snapshot, host: HostName, listing: HostListing) {
    match listing {
        HostListing::Absent => {}
        HostListing::NotADirectory(warning) => snapshot.warnings.push(warning),
        HostListing::Unknown(warning) => {
            snapshot.warnings.push(warning);
            snapshot.unknown.insert(host);
        }
        HostListing::Listed(dir) => {
            snapshot.warnings.extend(dir.warnings);
            snapshot.placements.insert(host, dir.instances);
        }
    }
}

/// Reads `hosts` again, server file and placement directory, in place of
/// what `snapshot` (a scan of `root`) says of them: for hosts whose events
/// came while the scan ran, a reading newer than those events.
pub fn reread_hosts(
    root: &Path,
    snapshot: &mut Snapshot,
    hosts: &BTreeSet<HostName>,
) -> Result<(), ScanError> {
    check_ready(root)?;
    let servers_dir = required_dir(root, SERVERS)?;
    required_dir(root, PLACEMENT)?;
    for host in hosts {
        snapshot.servers.remove(host);
        snapshot.placements.remove(host);
        snapshot.unknown.remove(host);
        let path = servers_dir.join(host.as_str());
        if let Some(info) = judge_server(&path, load_server(&path), &mut snapshot.warnings) {
            snapshot.servers.insert(host.clone(), info);
        }
        take_listing(snapshot, host.clone(), scan_host_dir(root, host));
    }
    Ok(())
}

/// A host read from one directory entry: what to warn about, and what was
/// found, if anything.
type EntryRead<T> = (Vec<String>, Option<(HostName, T)>);

/// Reads the server file `servers/<name>`.
fn read_server_entry(path: &Path, name: &OsStr) -> EntryRead<Result<ServerInfo, ServerError>> {
    let mut warnings = Vec::new();
    let Some(host) = host_name(name, path, &mut warnings) else {
        return (warnings, None);
    };
    let file = load_server(path);
    if matches!(file, ServerFile::Absent) {
        warnings.push(format!(
            "{}: vanished during the scan; skipped",
            path.display()
        ));
        return (warnings, None);
    }
    let info = judge_server(path, file, &mut warnings);
    (warnings, info.map(|info| (host, info)))
}

/// What a server file read means, as the scan judges it: warned of when
/// unusable or when something else is in its place; `None` when there is
/// no server file.
fn judge_server(
    path: &Path,
    file: ServerFile,
    warnings: &mut Vec<String>,
) -> Option<Result<ServerInfo, ServerError>> {
    match file {
        ServerFile::Present(info) => {
            if let Err(reason) = &info {
                warnings.push(format!(
                    "{}: unusable server file: {reason}",
                    path.display()
                ));
            }
            Some(info)
        }
        ServerFile::Absent => None,
        ServerFile::NotAFile(what) => {
            warnings.push(format!(
                "{}: {what}, not a server file; skipped",
                path.display()
            ));
            None
        }
    }
}

/// What reading one host's entry in `placement/` gave.
type PlacementRead = (Vec<String>, Option<(HostName, HostListing)>);

/// Reads the placement directory `placement/<name>`.
fn read_placement_entry(path: &Path, name: &OsStr) -> PlacementRead {
    let mut warnings = Vec::new();
    let Some(host) = host_name(name, path, &mut warnings) else {
        return (warnings, None);
    };
    (warnings, Some((host, list_host_dir(path))))
}

/// Fails unless the root is a directory holding the readiness marker.
pub fn check_ready(root: &Path) -> Result<(), ScanError> {
    // Followed if a link: an operator may point the root at one.
    let is_dir = match fs::metadata(root) {
        Ok(meta) => meta.is_dir(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => false,
        Err(source) => {
            let path = root.to_path_buf();
            return Err(ScanError::Io { path, source });
        }
    };
    if !is_dir {
        let path = root.to_path_buf();
        return Err(ScanError::NoSuchDirectory { path });
    }
    let path = root.join(MODIFIED);
    match fs::symlink_metadata(&path) {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(ScanError::NotReady { path }),
        Err(source) => Err(ScanError::Io { path, source }),
    }
}

/// The path of `root/<name>`, which must be a directory and not a link:
/// the mirror never makes one, and following it would read server files and
/// placements from outside the tree.
fn required_dir(root: &Path, name: &str) -> Result<PathBuf, ScanError> {
    let path = root.join(name);
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => Ok(path),
        Ok(meta) if meta.file_type().is_symlink() => Err(ScanError::Io {
            path,
            source: io::Error::other("a symbolic link, not a directory (never followed)"),
        }),
        Ok(_) => Err(ScanError::Missing { path }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(ScanError::Missing { path }),
        Err(source) => Err(ScanError::Io { path, source }),
    }
}

/// The non-dot entries of a directory, sorted by name so that warnings come
/// out in the same order on every run, each with its type as the listing
/// gave it (not following symlinks), `None` when it could not be had.
/// Reading the type from the listing saves a `stat` per placement, and not
/// making a path per entry saves an allocation: paths are made only for the
/// entries that need one.
fn list(dir: &Path) -> Result<Vec<(OsString, Option<fs::FileType>)>, ScanError> {
    let io_err = |source| ScanError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name();
        if is_dot_name(&name) {
            continue;
        }
        entries.push((name, entry.file_type().ok()));
    }
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// True for names the mirror uses for temp files and markers.
pub fn is_dot_name(name: &OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// The host named by a directory entry, or `None` with a warning.
fn host_name(name: &OsStr, path: &Path, warnings: &mut Vec<String>) -> Option<HostName> {
    let Some(text) = name.to_str() else {
        warnings.push(format!("{}: name is not UTF-8; skipped", path.display()));
        return None;
    };
    match HostName::new(text) {
        Ok(host) => Some(host),
        Err(err) => {
            warnings.push(format!("{}: {err}; skipped", path.display()));
            None
        }
    }
}

/// What was found at a server file's path.
pub enum ServerFile {
    /// A file: its content, or why it can't be used (a FIFO, a socket, a
    /// device or a symlink in its place, a file above
    /// [`safe_fs::MAX_FILE`], an unreadable one). Such a file is unusable
    /// like a broken one: a host already in scope keeps its last good
    /// definition until the file is valid again or deleted, and one that
    /// never was stays out of scope.
    Present(Result<ServerInfo, ServerError>),
    /// Nothing (it was removed).
    Absent,
    /// A directory, which is no server file at all.
    NotAFile(&'static str),
}

/// Reads a server file the one way tree files are read, by the scan and the
/// watcher alike: through [`safe_fs::read_regular`], so that a FIFO cannot
/// stall the reader, a link is never followed out of the tree, and a file
/// above the cap is not read into memory.
pub fn load_server(path: &Path) -> ServerFile {
    match safe_fs::read_regular(path, safe_fs::MAX_FILE) {
        Ok(content) => ServerFile::Present(ServerInfo::parse(&content)),
        Err(ReadError::NotFound) => ServerFile::Absent,
        Err(ReadError::WrongType {
            found: Kind::Directory,
            ..
        }) => ServerFile::NotAFile("a directory"),
        Err(err) => ServerFile::Present(Err(ServerError::Unreadable(err.to_string()))),
    }
}

/// Reads `servers/<host>` on its own, as `check --self` and node mode do.
/// The error says why the file can't be used (including that it does not
/// exist), without the path.
pub fn server_of(root: &Path, host: &HostName) -> Result<ServerInfo, ServerError> {
    match load_server(&root.join(SERVERS).join(host.as_str())) {
        ServerFile::Present(info) => info,
        ServerFile::Absent => Err(ServerError::Missing),
        ServerFile::NotAFile(what) => Err(ServerError::NotAFile(what)),
    }
}

/// The instances found in one host's placement directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostDir {
    /// Instance names whose proid could be read.
    pub instances: BTreeSet<String>,
    /// Entries that were skipped, each naming the path and why.
    pub warnings: Vec<String>,
}

/// What is at `placement/<host>`, as the scan and the watcher both read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostListing {
    /// Nothing: the host has no placement directory.
    Absent,
    /// A regular file, FIFO, socket or device: not a placement directory,
    /// so the host has none. The warning names the path and what is there.
    NotADirectory(String),
    /// A directory that exists but whose entries can't be had: a symlink
    /// (never followed, wherever it points, a loop included) or a
    /// directory that can't be listed. Its placements are unknown, which is
    /// not the same as none: the host's memberships are
    /// left as they are. The warning names the path and the problem.
    Unknown(String),
    /// The directory was listed.
    Listed(HostDir),
}

/// Lists `placement/<host>/` on its own, as the daemon does when such a
/// directory is created (files may have been written into it before a watch
/// was set).
pub fn scan_host_dir(root: &Path, host: &HostName) -> HostListing {
    list_host_dir(&root.join(PLACEMENT).join(host.as_str()))
}

/// Lists a host's placement directory without following a link to it
/// ([`safe_fs::list_dir`]). Only regular files are placements: the mirror
/// writes nothing else, and a FIFO, socket, device or symlink in their
/// place is skipped with a warning naming what it is.
fn list_host_dir(path: &Path) -> HostListing {
    let entries = match safe_fs::list_dir(path) {
        Ok(entries) => entries,
        Err(ReadError::NotFound) => return HostListing::Absent,
        Err(err @ ReadError::WrongType { found, .. }) if found != Kind::Symlink => {
            return HostListing::NotADirectory(format!(
                "{}: {err}, not a placement directory; skipped",
                path.display()
            ))
        }
        Err(err) => {
            return HostListing::Unknown(format!(
                "{}: {err}; its placements are unknown, so its memberships are left as they are",
                path.display()
            ))
        }
    };
    let mut entries: Vec<_> = entries
        .into_iter()
        .filter(|(name, _)| !is_dot_name(name))
        .collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut warnings = Vec::new();
    let mut skip = |name: &OsStr, why: &dyn std::fmt::Display| {
        warnings.push(format!("{}: {why}; skipped", path.join(name).display()));
    };
    // Sorted above, so the set is built in one pass.
    let mut instances = Vec::with_capacity(entries.len());
    for (name, file_type) in entries {
        let instance = match name.into_string() {
            Ok(instance) => instance,
            Err(name) => {
                skip(&name, &"name is not UTF-8");
                continue;
            }
        };
        if let Err(why) = Proid::of_instance(&instance) {
            skip(instance.as_ref(), &why.to_string());
            continue;
        }
        // The listing's type, or a look without following a link when the
        // file system did not say.
        let kind = match file_type {
            Some(file_type) => Ok(Some(Kind::of(file_type))),
            None => safe_fs::probe(&path.join(&instance)),
        };
        match kind {
            Ok(Some(Kind::File)) => instances.push(instance),
            // Removed since the listing.
            Ok(None) => {}
            Ok(Some(kind)) => skip(instance.as_ref(), &format_args!("{kind}, not a placement")),
            Err(err) => skip(instance.as_ref(), &format_args!("cannot be read: {err}")),
        }
    }
    HostListing::Listed(HostDir {
        instances: instances.into_iter().collect(),
        warnings,
    })
}

/// What is at a placement file's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementEntry {
    /// A regular file: a placement.
    Placed,
    /// Nothing.
    Absent,
    /// Something else (a FIFO, socket, device, symlink or directory), which
    /// is no placement; what it is, for the warning.
    NotAFile(Kind),
    /// What is there cannot be told: the host's directory can't be searched.
    Unreadable(String),
}

/// What is at `path` in a host's placement directory, judged as [`scan`]
/// judges a listed entry: only regular files are placements.
pub fn placement_at(path: &Path) -> PlacementEntry {
    match safe_fs::probe(path) {
        Ok(Some(Kind::File)) => PlacementEntry::Placed,
        Ok(None) => PlacementEntry::Absent,
        Ok(Some(kind)) => PlacementEntry::NotAFile(kind),
        Err(err) => PlacementEntry::Unreadable(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    /// A tree in a temp directory with `.modified`, `servers/` and `placement/`.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Tree {
            let tree = Tree::bare();
            tree.write(MODIFIED, "");
            tree.mkdir(SERVERS);
            tree.mkdir(PLACEMENT);
            tree
        }

        fn bare() -> Tree {
            Tree {
                dir: tempfile::tempdir().expect("temp dir"),
            }
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn write(&self, rel: &str, content: &str) {
            let path = self.root().join(rel);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, content).expect("write");
        }

        fn mkdir(&self, rel: &str) {
            fs::create_dir_all(self.root().join(rel)).expect("mkdir");
        }

        fn server(&self, host: &str, partition: &str) {
            self.write(
                &format!("servers/{host}"),
                &format!("partition: {partition}\nnt.dc: dc1.ad.com\nnt.dn: CN={host},OU=Hosts,DC=ad,DC=com\n"),
            );
        }
    }

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("host")
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn warned(snapshot: &Snapshot, path_part: &str, reason: &str) -> bool {
        snapshot
            .warnings
            .iter()
            .any(|w| w.contains(path_part) && w.contains(reason))
    }

    #[test]
    fn reread_hosts_replaces_what_the_scan_said_of_them_and_only_of_them() {
        let tree = Tree::new();
        tree.server("h1", "p1");
        tree.server("h2", "p1");
        tree.write("placement/h1/proid1.web#0000000001", "{}");
        tree.write("placement/h2/proid1.web#0000000002", "{}");
        let mut snap = scan(tree.root()).expect("scan");
        // After the scan: h1 gains a placement and loses its server file;
        // h2 changes too, but is not read again.
        tree.write("placement/h1/proid2.db#0000000003", "{}");
        fs::remove_file(tree.root().join("servers/h1")).expect("rm");
        tree.write("placement/h2/proid2.db#0000000004", "{}");
        reread_hosts(tree.root(), &mut snap, &[host("h1")].into()).expect("reread");
        assert_eq!(
            snap.placements.get(&host("h1")),
            Some(&set(&["proid1.web#0000000001", "proid2.db#0000000003"]))
        );
        assert!(
            !snap.servers.contains_key(&host("h1")),
            "its server file is gone"
        );
        assert_eq!(
            snap.placements.get(&host("h2")),
            Some(&set(&["proid1.web#0000000002"])),
            "not asked for: as scanned"
        );
        assert!(snap.servers.contains_key(&host("h2")));
    }

    #[test]
    fn servers_and_placements_are_read() {
        let tree = Tree::new();
        tree.server("h1", "p1");
        tree.server("h2", "p2");
        tree.write("placement/h1/proid1.web#0000000001", "{}");
        tree.write("placement/h1/proid2.db#0000000002", "{}");
        tree.mkdir("placement/h2");
        let snap = scan(tree.root()).expect("scan");
        assert_eq!(snap.servers.len(), 2);
        let info = snap.servers[&host("h1")].as_ref().expect("parsed");
        assert_eq!(info.partition.as_deref(), Some("p1"));
        assert_eq!(info.dn.as_deref(), Some("CN=h1,OU=Hosts,DC=ad,DC=com"));
        assert_eq!(
            snap.placements[&host("h1")],
            set(&["proid1.web#0000000001", "proid2.db#0000000002"])
        );
        assert_eq!(
            snap.placements[&host("h2")],
            BTreeSet::new(),
            "empty dir still appears"
        );
        assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
    }

    #[test]
    fn dot_names_are_ignored_silently_everywhere() {
        let tree = Tree::new();
        tree.server("h1", "p1");
        tree.write(
            "servers/.tmpAbC123",
            "partition: p1\nnt.dc: x\nnt.dn: CN=tmp\n",
        );
        tree.write("servers/.done", "");
        tree.mkdir("servers/.data");
        tree.write("placement/.tmp999", "");
        tree.mkdir("placement/.hidden/proid9.x#1");
        tree.write("placement/h1/.tmpXYZ", "{}");
        tree.write("placement/h1/.done", "");
        tree.write("placement/h1/proid1.web#1", "{}");
        let snap = scan(tree.root()).expect("scan");
        assert_eq!(snap.servers.keys().collect::<Vec<_>>(), [&host("h1")]);
        assert_eq!(snap.placements.keys().collect::<Vec<_>>(), [&host("h1")]);
        assert_eq!(snap.placements[&host("h1")], set(&["proid1.web#1"]));
        assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
    }

    #[test]
    fn a_broken_server_file_is_isolated() {
        let tree = Tree::new();
        tree.server("good", "p1");
        tree.write("servers/broken", "{unclosed: [");
        tree.write("servers/list", "- a\n- b\n");
        let snap = scan(tree.root()).expect("a broken file is not a run failure");
        assert!(snap.servers[&host("good")].is_ok());
        let broken = snap.servers[&host("broken")].as_ref().expect_err("broken");
        assert!(matches!(broken, ServerError::NotYaml(_)), "{broken:?}");
        assert!(broken.to_string().contains("YAML"), "{broken}");
        assert_eq!(snap.servers[&host("list")], Err(ServerError::NotAMapping));
        assert!(warned(&snap, "servers/broken", "unusable server file"));
        assert!(warned(&snap, "servers/list", "not a mapping"));
    }

    #[test]
    fn server_without_placement_dir_and_placement_dir_without_server() {
        let tree = Tree::new();
        tree.server("lonely-server", "p1");
        tree.write("placement/lonely-dir/proid1.web#1", "{}");
        let snap = scan(tree.root()).expect("scan");
        assert!(snap.servers.contains_key(&host("lonely-server")));
        assert!(!snap.placements.contains_key(&host("lonely-server")));
        assert!(!snap.servers.contains_key(&host("lonely-dir")));
        assert_eq!(snap.placements[&host("lonely-dir")], set(&["proid1.web#1"]));
        assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
    }

    #[test]
    fn non_utf8_names_are_rejected_with_a_warning() {
        let tree = Tree::new();
        let bad = OsStr::from_bytes(b"h\xff1");
        fs::write(tree.root().join(SERVERS).join(bad), "partition: p1\n").expect("write");
        fs::create_dir(tree.root().join(PLACEMENT).join(bad)).expect("mkdir");
        tree.mkdir("placement/h1");
        fs::write(
            tree.root()
                .join("placement/h1")
                .join(OsStr::from_bytes(b"proid1.w\xfe#1")),
            "{}",
        )
        .expect("write");
        let snap = scan(tree.root()).expect("scan");
        assert!(snap.servers.is_empty());
        assert_eq!(snap.placements.keys().collect::<Vec<_>>(), [&host("h1")]);
        assert!(snap.placements[&host("h1")].is_empty());
        let not_utf8 = snap
            .warnings
            .iter()
            .filter(|w| w.contains("not UTF-8"))
            .count();
        assert_eq!(not_utf8, 3, "{:?}", snap.warnings);
        assert!(warned(&snap, "servers/h", "not UTF-8"));
        assert!(warned(&snap, "placement/h1/proid1.w", "not UTF-8"));
    }

    #[test]
    fn instances_without_a_proid_are_not_placements() {
        let tree = Tree::new();
        tree.write("placement/h1/noproid#1", "{}");
        tree.write("placement/h1/.web#2", "{}");
        tree.write("placement/h1/proid1.web#3", "{}");
        let snap = scan(tree.root()).expect("scan");
        assert_eq!(snap.placements[&host("h1")], set(&["proid1.web#3"]));
        assert!(warned(
            &snap,
            "placement/h1/noproid#1",
            "not a placement: no proid"
        ));
        assert_eq!(
            snap.warnings.len(),
            1,
            "dot names stay silent: {:?}",
            snap.warnings
        );
    }

    #[test]
    fn wrong_entry_kinds_are_skipped_with_warnings() {
        let tree = Tree::new();
        tree.mkdir("servers/subdir");
        tree.write("placement/stray-file", "");
        tree.mkdir("placement/h1/proid1.web#1");
        tree.write("placement/h1/proid1.web#2", "{}");
        let snap = scan(tree.root()).expect("scan");
        assert!(snap.servers.is_empty());
        assert!(warned(&snap, "servers/subdir", "a directory"));
        assert!(warned(&snap, "placement/stray-file", "not a directory"));
        assert!(warned(&snap, "placement/h1/proid1.web#1", "a directory"));
        assert!(!snap.placements.contains_key(&host("stray-file")));
        assert_eq!(snap.placements[&host("h1")], set(&["proid1.web#2"]));
    }

    #[test]
    fn missing_marker_is_not_ready() {
        let tree = Tree::bare();
        tree.mkdir(SERVERS);
        tree.mkdir(PLACEMENT);
        let err = scan(tree.root()).expect_err("not ready");
        assert!(matches!(&err, ScanError::NotReady { path } if path.ends_with(MODIFIED)));
        let text = err.to_string();
        assert!(
            text.contains(".modified") && text.contains("not ready"),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }

    #[test]
    fn a_missing_root_is_no_such_directory_not_not_ready() {
        let tree = Tree::bare();
        let gone = tree.root().join("no-tree-here");
        let err = scan(&gone).expect_err("no root");
        assert!(matches!(&err, ScanError::NoSuchDirectory { path } if path == &gone));
        let text = err.to_string();
        assert_eq!(text, format!("{}: no such directory", gone.display()));
        tree.write("a-file", "");
        let err = check_ready(&tree.root().join("a-file")).expect_err("a file");
        assert!(matches!(err, ScanError::NoSuchDirectory { .. }), "{err}");
    }

    #[test]
    fn missing_directories_are_errors_not_empty_trees() {
        for (missing, file_instead) in [
            (SERVERS, false),
            (PLACEMENT, false),
            (SERVERS, true),
            (PLACEMENT, true),
        ] {
            let tree = Tree::bare();
            tree.write(MODIFIED, "");
            for dir in [SERVERS, PLACEMENT] {
                if dir != missing {
                    tree.mkdir(dir);
                } else if file_instead {
                    tree.write(dir, "");
                }
            }
            let err = scan(tree.root()).expect_err("missing directory");
            assert!(
                matches!(&err, ScanError::Missing { path } if path.ends_with(missing)),
                "{err:?}"
            );
            assert!(
                err.to_string().contains("missing or not a directory"),
                "{err}"
            );
        }
    }

    #[test]
    fn an_unlistable_host_dir_makes_only_that_host_unknown() {
        use std::os::unix::fs::PermissionsExt;
        let tree = Tree::new();
        tree.write("placement/h1/proid1.web#1", "{}");
        tree.write("placement/h2/proid1.web#2", "{}");
        let dir = tree.root().join("placement/h1");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o000)).expect("chmod");
        // Root ignores permissions (the binary's tests cover root with an
        // unprivileged run): there is nothing to test then.
        let listable = fs::read_dir(&dir).is_ok();
        let result = scan(tree.root());
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod back");
        if listable {
            return;
        }
        let snap = result.expect("one unlistable host dir is not a run failure");
        assert_eq!(snap.unknown, BTreeSet::from([host("h1")]));
        assert!(!snap.placements.contains_key(&host("h1")));
        assert_eq!(snap.placements[&host("h2")], set(&["proid1.web#2"]));
        assert!(warned(&snap, "placement/h1", "placements are unknown"));
    }

    #[test]
    fn symlinked_host_dirs_are_unknown_not_followed() {
        // A loop can't be followed even by root; a link out of the tree is
        // never followed. Either way only that host is affected.
        let tree = Tree::new();
        std::os::unix::fs::symlink("h1", tree.root().join("placement/h1")).expect("symlink");
        let outside = tempfile::tempdir().expect("tmp");
        fs::write(outside.path().join("proid9.evil#1"), "{}").expect("write");
        std::os::unix::fs::symlink(outside.path(), tree.root().join("placement/h2"))
            .expect("symlink");
        tree.write("placement/h3/proid1.web#3", "{}");
        let snap = scan(tree.root()).expect("a symlinked host dir is not a run failure");
        assert_eq!(snap.unknown, BTreeSet::from([host("h1"), host("h2")]));
        assert_eq!(snap.placements.keys().collect::<Vec<_>>(), [&host("h3")]);
        for h in ["placement/h1", "placement/h2"] {
            assert!(warned(&snap, h, "a symbolic link"), "{:?}", snap.warnings);
            assert!(warned(&snap, h, "placements are unknown"));
        }
        assert!(matches!(
            scan_host_dir(tree.root(), &host("h1")),
            HostListing::Unknown(_)
        ));

        let tree = Tree::bare();
        tree.write(MODIFIED, "");
        tree.mkdir(PLACEMENT);
        std::os::unix::fs::symlink(SERVERS, tree.root().join(SERVERS)).expect("symlink");
        let err = scan(tree.root()).expect_err("an unreadable servers/ must fail the scan");
        assert!(
            matches!(&err, ScanError::Io { path, .. } if path.ends_with(SERVERS)),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("servers: cannot be read"), "{text}");
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    }

    fn mksock(path: &Path) -> std::os::unix::net::UnixListener {
        std::os::unix::net::UnixListener::bind(path).expect("socket")
    }

    #[test]
    fn only_regular_files_are_placements() {
        let tree = Tree::new();
        tree.write("placement/h1/proid1.web#1", "{}");
        let dir = tree.root().join("placement/h1");
        mkfifo(&dir.join("proid1.web#2"));
        let _socket = mksock(&dir.join("proid1.web#3"));
        std::os::unix::fs::symlink("proid1.web#1", dir.join("proid1.web#4")).expect("symlink");
        std::os::unix::fs::symlink("/dev/null", dir.join("proid1.web#5")).expect("symlink");
        let snap = scan(tree.root()).expect("scan");
        assert_eq!(snap.placements[&host("h1")], set(&["proid1.web#1"]));
        assert!(warned(
            &snap,
            "placement/h1/proid1.web#2",
            "a FIFO, not a placement"
        ));
        assert!(warned(
            &snap,
            "placement/h1/proid1.web#3",
            "a socket, not a placement"
        ));
        for link in ["proid1.web#4", "proid1.web#5"] {
            assert!(warned(&snap, link, "a symbolic link, not a placement"));
        }
        assert_eq!(snap.warnings.len(), 4, "{:?}", snap.warnings);
        assert_eq!(
            placement_at(&dir.join("proid1.web#2")),
            PlacementEntry::NotAFile(Kind::Fifo)
        );
        assert_eq!(
            placement_at(&dir.join("proid1.web#1")),
            PlacementEntry::Placed
        );
        assert_eq!(
            placement_at(&dir.join("proid1.web#9")),
            PlacementEntry::Absent
        );
    }

    #[test]
    fn special_and_large_server_files_are_unusable() {
        let tree = Tree::new();
        tree.server("good", "p1");
        let servers = tree.root().join(SERVERS);
        mkfifo(&servers.join("fifo"));
        let _socket = mksock(&servers.join("sock"));
        std::os::unix::fs::symlink("good", servers.join("link")).expect("symlink");
        std::os::unix::fs::symlink("loop", servers.join("loop")).expect("symlink");
        let mut big = b"partition: p1\nnt.dc: dc1\nnt.dn: CN=big\n#".to_vec();
        big.resize(safe_fs::MAX_FILE as usize + 1, b'x');
        fs::write(servers.join("big"), &big).expect("write");
        big.truncate(safe_fs::MAX_FILE as usize);
        fs::write(servers.join("just-fits"), &big).expect("write");
        let snap = scan(tree.root()).expect("scan");
        assert!(snap.servers[&host("good")].is_ok());
        assert!(snap.servers[&host("just-fits")].is_ok());
        for (name, what) in [
            ("fifo", "a FIFO, not a regular file"),
            ("sock", "a socket, not a regular file"),
            ("link", "a symbolic link, not a regular file"),
            ("loop", "a symbolic link, not a regular file"),
            ("big", "too large (1048577 bytes"),
        ] {
            let err = snap.servers[&host(name)].as_ref().expect_err(name);
            assert!(matches!(err, ServerError::Unreadable(_)), "{name}: {err:?}");
            assert!(err.to_string().contains(what), "{name}: {err}");
            assert!(warned(&snap, &format!("servers/{name}"), what));
        }
    }

    #[test]
    fn a_large_tree_reads_in_order() {
        let tree = Tree::new();
        let n = crate::parallel::CHUNK * 5 + 3;
        for i in 0..n {
            tree.server(&format!("h{i:04}"), "p1");
            tree.write(&format!("placement/h{i:04}/proid{}.web#1", i % 7), "");
            tree.write(&format!("placement/h{i:04}/junk{i}"), "");
        }
        tree.write("servers/h0100", "- a list");
        let snap = scan(tree.root()).expect("scan");
        assert_eq!(snap.servers.len(), n);
        assert_eq!(snap.placements.len(), n);
        assert_eq!(snap.placements[&host("h0200")], set(&["proid4.web#1"]));
        let mut want: Vec<String> = (0..n)
            .map(|i| format!("placement/h{i:04}/junk{i}: not a placement"))
            .collect();
        want.insert(0, "servers/h0100: unusable server file".into());
        assert_eq!(snap.warnings.len(), want.len());
        for (warning, want) in snap.warnings.iter().zip(&want) {
            assert!(warning.contains(want.as_str()), "{warning} is not {want}");
        }
    }

    #[test]
    fn single_host_helpers() {
        let tree = Tree::new();
        tree.server("h1", "p1");
        tree.write("servers/bad", "[");
        tree.write("placement/h1/proid1.web#1", "{}");
        tree.write("placement/h1/.tmp1", "{}");
        tree.write("placement/h1/junk", "{}");
        let info = server_of(tree.root(), &host("h1")).expect("readable");
        assert_eq!(info.dc.as_deref(), Some("dc1.ad.com"));
        assert!(matches!(
            server_of(tree.root(), &host("bad")),
            Err(ServerError::NotYaml(_))
        ));
        assert_eq!(
            server_of(tree.root(), &host("nope")),
            Err(ServerError::Missing)
        );
        tree.mkdir("servers/adir");
        let adir = server_of(tree.root(), &host("adir"));
        assert_eq!(adir, Err(ServerError::NotAFile("a directory")));
        assert_eq!(
            adir.map_err(|err| err.to_string()),
            Err("a directory, not a server file".to_owned())
        );

        let HostListing::Listed(dir) = scan_host_dir(tree.root(), &host("h1")) else {
            panic!("h1 is listable");
        };
        assert_eq!(dir.instances, set(&["proid1.web#1"]));
        assert_eq!(dir.warnings.len(), 1, "{:?}", dir.warnings);
        assert!(dir.warnings[0].contains("junk"));
        assert_eq!(scan_host_dir(tree.root(), &host("h2")), HostListing::Absent);
        tree.write("placement/h3", "");
        assert!(matches!(
            scan_host_dir(tree.root(), &host("h3")),
            HostListing::NotADirectory(w) if w.contains("a regular file, not a directory")
        ));
    }

    #[test]
    fn numeric_partitions_and_extra_keys() {
        let tree = Tree::new();
        tree.write(
            "servers/h1",
            r#"{"partition": 7, "nt.dc": "dc", "nt.dn": "CN=h1", "cpu": "100%", "traits": ["a"]}"#,
        );
        let snap = scan(tree.root()).expect("scan");
        let info = snap.servers[&host("h1")].as_ref().expect("parsed");
        assert_eq!(info.partition.as_deref(), Some("7"));
    }
}
