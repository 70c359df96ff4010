//! Follows the placement tree with inotify: the only module that talks to
//! the kernel's notifier.
//!
//! Notifications are turned into [`Change`]s at once, and from the state of
//! the file system rather than from the kind of notification: a path that
//! was touched is looked at, and what is there now is reported. That makes
//! the stream indifferent to how the mirror writes (a `.tmp*` file renamed
//! over the target arrives as a create, a rename or both) and safe to
//! replay: reporting the same state twice changes nothing. A directory that
//! appears is listed at once, because files written into it before its watch
//! was set produce no notification. A lost notification (queue overflow) or
//! a change of `servers/` or `placement/` themselves asks for a full rescan.
//! A watcher that can no longer see the tree (the notifier failed, a
//! directory could not be watched, the root itself was moved or removed)
//! says so with [`Change::Failed`]: rescanning is not enough, it must be
//! replaced.
//!
//! What is at a path is read exactly as the scan reads it, through the
//! scan's own functions for one entry (and so through [`crate::safe_fs`]):
//! a FIFO, socket, device or symlink is never data, and reading never
//! blocks or leaves the tree.
//!
//! One thread of the watcher's own reads the notifications, keeps the
//! watches and reads what they point at, so the event loop never waits on
//! the file system. Each change is handed on as [`Noticed`], with the
//! moment its notifications were read: the latency of what it changes
//! starts there, however long it then waits in the queue for the loop.
//! Only the tree's own directories are watched (the root,
//! `servers/`, `placement/` and each host directory in it), never a
//! symlink, and only for what can change the data: entries created,
//! removed or renamed, a file closed after writing (its contents are read
//! then, never half-written), attributes. Not for a file opened or read:
//! the daemon's own scan opens every server file and lists every host
//! directory, and would otherwise fill its own queue with its reading.
//! The notifications of one read are handled in two steps: first every
//! directory that appeared is watched, then each path they name is looked
//! at once, so a new directory is always watched before it is listed.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::event::{classify, PathKind};
use super::names::{PLACEMENT, SERVERS};
use super::scan::{
    load_server, placement_at, scan_host_dir, HostListing, PlacementEntry, ServerFile,
};
use super::TreeEvent;
use crate::model::{HostName, Proid};
use crate::safe_fs::{self, Kind};

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The tree changed in this way.
    Tree(TreeEvent),
    /// Events may have been lost or the tree's layout changed: rescan it all.
    Rescan(String),
    /// This watcher no longer reports every change (why): start a new one
    /// and rescan.
    Failed(String),
}

/// A change, and when the watcher read the notifications it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Noticed {
    /// What changed.
    pub change: Change,
    /// When the notifications it comes from were read.
    pub at: Instant,
}

impl Noticed {
    /// A change noticed now.
    pub fn now(change: Change) -> Self {
        Noticed {
            change,
            at: Instant::now(),
        }
    }
}

/// The watcher could not be set up.
#[derive(Debug, Error)]
#[error("cannot watch {path}: {}", explain(.source))]
pub struct WatchError {
    path: PathBuf,
    source: io::Error,
}

/// A running watch; dropping it stops the notifications and ends the
/// watcher's thread.
pub struct TreeWatcher {
    // The write end of a pipe the thread waits on beside the notifier:
    // closing it wakes the thread, which then ends.
    _stop: OwnedFd,
}

/// What a directory is watched for. `ONLYDIR` and `DONT_FOLLOW`: a watch
/// is never set through a symlink, or on anything but a directory (the
/// root excepted: the operator named it, and it may be a link to the
/// tree; the link itself is then watched in its directory, and turned
/// elsewhere it fails the watcher, whose successor follows the new one).
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::DONT_FOLLOW)
    .union(WatchMask::EXCL_UNLINK);

/// Room for a thousand notifications or so in one read.
const READ_BUFFER: usize = 64 * 1024;

/// Starts watching `root`: its layout's directories, each on its own.
/// Changes arrive on the receiver in the order they were seen. Called
/// within a tokio runtime, the watcher's thread reads that runtime's
/// clock (the same as the system's, but in tests whose time is paused).
pub fn watch(root: &Path) -> Result<(TreeWatcher, mpsc::UnboundedReceiver<Noticed>), WatchError> {
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WatchError { path, source }
    };
    let inotify = Inotify::init().map_err(error(root))?;
    let mut watched = Watched::new(root, inotify.watches());
    watched
        .watch_tree()
        .map_err(|(path, err)| error(&path)(err))?;
    let (wake, stop) = pipe().map_err(error(root))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let runtime = tokio::runtime::Handle::try_current().ok();
    std::thread::Builder::new()
        .name("tree-watch".into())
        .spawn(move || {
            let _clock = runtime.as_ref().map(tokio::runtime::Handle::enter);
            follow(inotify, watched, &wake, &tx);
        })
        .map_err(error(root))?;
    Ok((TreeWatcher { _stop: stop }, rx))
}

/// The watcher's thread: waits for notifications (or for the watch to be
/// dropped), and hands on what they mean until the receiver is gone or
/// the watcher has failed.
fn follow(
    mut inotify: Inotify,
    mut watched: Watched,
    wake: &OwnedFd,
    tx: &mpsc::UnboundedSender<Noticed>,
) {
    let mut buffer = vec![0; READ_BUFFER];
    loop {
        match wait(inotify.as_raw_fd(), wake.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => return,
            Err(err) => {
                let _ = tx.send(Noticed::now(Change::Failed(format!(
                    "the notifier failed: {err}"
                ))));
                return;
            }
        }
        let at = Instant::now();
        let raw = match inotify.read_events(&mut buffer) {
            Ok(events) => detached(events),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(err) => {
                let _ = tx.send(Noticed::now(Change::Failed(format!(
                    "the notifier failed: {err}"
                ))));
                return;
            }
        };
        for change in watched.changes_of(raw) {
            let failed = matches!(change, Change::Failed(_));
            // The receiver is gone only when the watcher was dropped.
            if tx.send(Noticed { change, at }).is_err() || failed {
                return;
            }
        }
    }
}

/// Waits until the notifier has something to read (true) or the watch was
/// dropped (false).
fn wait(notifier: RawFd, stop: RawFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: notifier,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is an array of two initialised pollfds that lives
        // across the call, and its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    if fds[1].revents != 0 {
        return Ok(false);
    }
    Ok(fds[0].revents != 0)
}

/// A pipe: its read end for the watcher's thread, its write end for the
/// handle whose drop closes it.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The notifications of one read, detached from the read buffer.
fn detached(events: inotify::Events<'_>) -> Vec<Raw> {
    events
        .map(|e| Raw {
            wd: Some(e.wd),
            mask: e.mask,
            name: e.name.map(OsStr::to_owned),
        })
        .collect()
}

/// A notification as read, detached from the read buffer.
#[derive(Debug, Clone)]
struct Raw {
    /// `None` only in tests, for a directory no longer known.
    wd: Option<WatchDescriptor>,
    mask: EventMask,
    name: Option<std::ffi::OsString>,
}

/// The watches set, and which directory of the tree each one is.
struct Watched {
    root: PathBuf,
    watches: Watches,
    root_wd: Option<WatchDescriptor>,
    /// When the root is a symlink: the watch on the directory holding it,
    /// and its name there. The root's watch follows the directory it
    /// pointed to at the start; the link turned elsewhere is seen here.
    link: Option<(WatchDescriptor, std::ffi::OsString)>,
    paths: HashMap<WatchDescriptor, PathBuf>,
    wds: HashMap<PathBuf, WatchDescriptor>,
}

/// A watch that could not be set, and why.
enum Unwatched {
    /// The directory is gone or is not one (a symlink, a file): whatever
    /// is there now is reported by its parent's watch.
    Gone,
    /// The watcher can't see this directory (the watch limit, say).
    Blind(PathBuf, io::Error),
}

impl Watched {
    fn new(root: &Path, watches: Watches) -> Self {
        Watched {
            root: root.to_path_buf(),
            watches,
            root_wd: None,
            link: None,
            paths: HashMap::new(),
            wds: HashMap::new(),
        }
    }

    /// Watches the root, `servers/`, `placement/` and every host directory
    /// in it. A recursive walk would look at every file, where the tree's
    /// layout says which directories there are.
    fn watch_tree(&mut self) -> Result<(), (PathBuf, io::Error)> {
        let root = self.root.clone();
        match self.add(&root) {
            Ok(wd) => self.root_wd = Some(wd),
            Err(Unwatched::Gone) => {
                let err = io::Error::new(io::ErrorKind::NotFound, "not a directory");
                return Err((root, err));
            }
            Err(Unwatched::Blind(path, err)) => return Err((path, err)),
        }
        if root
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            let parent = match root.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = root.file_name().map(OsStr::to_owned).unwrap_or_default();
            let mask = WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM
                | WatchMask::MOVED_TO
                | WatchMask::DELETE_SELF
                | WatchMask::MOVE_SELF
                | WatchMask::ONLYDIR
                | WatchMask::DONT_FOLLOW;
            let wd = self.watches.add(&parent, mask).map_err(|e| (parent, e))?;
            self.link = Some((wd, name));
        }
        self.rewatch()
    }

    /// Watches the layout's directories again, after notifications were
    /// lost: `servers/`, `placement/` and every host directory in it.
    fn rewatch(&mut self) -> Result<(), (PathBuf, io::Error)> {
        for name in [SERVERS, PLACEMENT] {
            if let Err(Unwatched::Blind(path, err)) = self.add_layout_dir(&self.root.join(name)) {
                return Err((path, err));
            }
        }
        Ok(())
    }

    /// Watches `dir`, one of the tree's own directories; for `placement/`,
    /// then every host directory it holds.
    fn add_layout_dir(&mut self, dir: &Path) -> Result<(), Unwatched> {
        self.add(dir)?;
        if classify(&self.root, dir) != PathKind::PlacementDir {
            return Ok(());
        }
        let Ok(entries) = safe_fs::list_dir(dir) else {
            // Unreadable: the rescan that follows says so.
            return Ok(());
        };
        for (name, file_type) in entries {
            let path = dir.join(name);
            let kind = match file_type {
                Some(file_type) => Some(Kind::of(file_type)),
                None => safe_fs::probe(&path).ok().flatten(),
            };
            if kind != Some(Kind::Directory) {
                continue;
            }
            match self.add(&path) {
                Ok(_) | Err(Unwatched::Gone) => {}
                Err(blind) => return Err(blind),
            }
        }
        Ok(())
    }

    fn add(&mut self, dir: &Path) -> Result<WatchDescriptor, Unwatched> {
        let mask = if dir == self.root {
            MASK.difference(WatchMask::DONT_FOLLOW)
        } else {
            MASK
        };
        match self.watches.add(dir, mask) {
            Ok(wd) => {
                if let Some(old) = self.paths.insert(wd.clone(), dir.to_path_buf()) {
                    // The same directory under a new name: the old is gone.
                    if old != dir {
                        self.wds.remove(&old);
                    }
                }
                self.wds.insert(dir.to_path_buf(), wd.clone());
                Ok(wd)
            }
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
                ) =>
            {
                debug!(path = %dir.display(), "gone before it could be watched");
                Err(Unwatched::Gone)
            }
            Err(err) => Err(Unwatched::Blind(dir.to_path_buf(), err)),
        }
    }

    /// Forgets `dir` and every watched directory under it, and removes
    /// their watches: a directory moved away is no longer part of the tree
    /// (a moved directory keeps its watch, and would report under its old
    /// name).
    fn forget(&mut self, dir: &Path, remove: bool) {
        let under: Vec<PathBuf> = match classify(&self.root, dir) {
            // Nothing under a host directory is watched.
            PathKind::HostDir(_) => vec![dir.to_path_buf()],
            _ => self
                .wds
                .keys()
                .filter(|p| p.starts_with(dir) && p.as_path() != self.root)
                .cloned()
                .collect(),
        };
        for path in under {
            if let Some(wd) = self.wds.remove(&path) {
                self.paths.remove(&wd);
                if remove {
                    // Already gone if it was removed meanwhile.
                    let _ = self.watches.remove(wd);
                }
            }
        }
    }

    /// The changes one read's notifications stand for.
    fn changes_of(&mut self, raw: Vec<Raw>) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut paths = Vec::new();
        let mut seen = HashSet::new();
        for event in raw {
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                // What was lost may be a new host directory's creation:
                // every directory is watched again (a watched one keeps
                // its watch) before the rescan lists them.
                if let Err((path, source)) = self.rewatch() {
                    changes.push(Change::Failed(WatchError { path, source }.to_string()));
                    return changes;
                }
                changes.push(Change::Rescan("the notifier lost events".into()));
                continue;
            }
            let Some(wd) = event.wd else { continue };
            let is_root = self.root_wd.as_ref() == Some(&wd);
            if let Some((link_wd, name)) = &self.link {
                if *link_wd == wd {
                    let about_link = event.name.as_deref() == Some(name.as_os_str());
                    if about_link || event.name.is_none() {
                        changes.push(Change::Failed(format!(
                            "{} was turned to another directory or removed",
                            self.root.display()
                        )));
                        return changes;
                    }
                    continue;
                }
            }
            if event.mask.contains(EventMask::IGNORED) {
                // The directory went away (its parent reports it) or its
                // watch was removed here.
                if let Some(path) = self.paths.remove(&wd) {
                    // The path may be another directory's by now (one
                    // renamed over it): only its own entry goes.
                    if self.wds.get(&path) == Some(&wd) {
                        self.wds.remove(&path);
                    }
                }
                if !is_root {
                    continue;
                }
            }
            // The watches follow the directory, not its path: once the
            // root has been moved or removed nothing under the path is seen.
            if is_root
                && event.mask.intersects(
                    EventMask::DELETE_SELF
                        | EventMask::MOVE_SELF
                        | EventMask::IGNORED
                        | EventMask::UNMOUNT,
                )
            {
                changes.push(Change::Failed(format!(
                    "{} was moved or removed",
                    self.root.display()
                )));
                return changes;
            }
            if event
                .mask
                .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::UNMOUNT)
            {
                // Its parent's watch reports what became of it.
                continue;
            }
            let Some(dir) = self.paths.get(&wd) else {
                // A directory forgotten since: its parent reported it.
                continue;
            };
            let path = match &event.name {
                Some(name) => dir.join(name),
                None => dir.clone(),
            };
            if event.mask.contains(EventMask::ISDIR) {
                if event
                    .mask
                    .intersects(EventMask::DELETE | EventMask::MOVED_FROM)
                {
                    self.forget(&path, event.mask.contains(EventMask::MOVED_FROM));
                }
                if event
                    .mask
                    .intersects(EventMask::CREATE | EventMask::MOVED_TO)
                    && is_layout_dir(&self.root, &path)
                {
                    if let Err(Unwatched::Blind(path, source)) = self.add_layout_dir(&path) {
                        changes.push(Change::Failed(WatchError { path, source }.to_string()));
                        return changes;
                    }
                }
            }
            if seen.insert(path.clone()) {
                paths.push(path);
            }
        }
        for path in paths {
            changes.extend(changes_at(&self.root, &path));
        }
        changes
    }
}

/// A directory of the tree's layout, which is watched when it appears.
fn is_layout_dir(root: &Path, path: &Path) -> bool {
    matches!(
        classify(root, path),
        PathKind::ServersDir | PathKind::PlacementDir | PathKind::HostDir(_)
    )
}

/// What a failure to watch means to an operator.
fn explain(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ENOSPC) => {
            "the inotify watch limit is reached (raise fs.inotify.max_user_watches)".into()
        }
        Some(libc::EMFILE) => {
            "the inotify instance limit is reached (raise fs.inotify.max_user_instances)".into()
        }
        _ => err.to_string(),
    }
}

/// What is now at `path`, as changes.
pub fn changes_at(root: &Path, path: &Path) -> Vec<Change> {
    if path == root {
        return vec![Change::Rescan(format!("{} itself changed", root.display()))];
    }
    match classify(root, path) {
        PathKind::Server(host) => server_at(path, host).into_iter().collect(),
        PathKind::Placement(host, instance) => placement_changes(root, path, host, instance),
        PathKind::HostDir(host) => host_dir_at(root, host),
        PathKind::ServersDir | PathKind::PlacementDir => {
            vec![Change::Rescan(format!("{} changed", path.display()))]
        }
        // The readiness marker going away means the mirror no longer
        // vouches for the tree: a rescan finds out, and stops writes until
        // it is back.
        PathKind::Modified if path.symlink_metadata().is_err() => {
            vec![Change::Rescan(format!("{} went away", path.display()))]
        }
        // Warned about as the scan warns, while there is something to warn
        // about (a refused name's removal is no news).
        PathKind::Rejected(why) => {
            if path.symlink_metadata().is_ok() {
                warn!("{}: {why}; skipped", path.display());
            }
            Vec::new()
        }
        PathKind::Modified | PathKind::Ignored => Vec::new(),
    }
}

/// A server file, read as the scan reads it. Why an unusable one can't be
/// used is the index's to say, together with what that means for the host.
fn server_at(path: &Path, host: HostName) -> Option<Change> {
    let event = match load_server(path) {
        ServerFile::Present(info) => TreeEvent::ServerUpserted { host, info },
        ServerFile::Absent => TreeEvent::ServerRemoved { host },
        // A directory where a server file should be is not a server: the
        // scan skips it, so whatever was there before is gone.
        ServerFile::NotAFile(what) => {
            warn!("{}: {what}, not a server file; skipped", path.display());
            TreeEvent::ServerRemoved { host }
        }
    };
    Some(Change::Tree(event))
}

/// A placement file, judged as the scan judges a listed one: only a regular
/// file is a placement, so anything else in its place removes it.
fn placement_changes(root: &Path, path: &Path, host: HostName, instance: String) -> Vec<Change> {
    let event = match placement_at(path) {
        PlacementEntry::Placed => TreeEvent::PlacementAdded { host, instance },
        PlacementEntry::Absent => TreeEvent::PlacementRemoved { host, instance },
        PlacementEntry::NotAFile(kind) => {
            if Proid::name_in(&instance).is_some() {
                warn!("{}: {kind}, not a placement; skipped", path.display());
            }
            TreeEvent::PlacementRemoved { host, instance }
        }
        // The host's directory can't be searched: what the listing says.
        PlacementEntry::Unreadable(_) => return host_dir_at(root, host),
    };
    vec![Change::Tree(event)]
}

/// A host directory that appeared is listed at once; one that went away
/// takes its placements with it; one that can't be listed keeps them.
fn host_dir_at(root: &Path, host: HostName) -> Vec<Change> {
    let event = match scan_host_dir(root, &host) {
        HostListing::Absent => TreeEvent::PlacementDirRemoved { host },
        HostListing::NotADirectory(warning) => {
            warn!("{warning}");
            TreeEvent::PlacementDirRemoved { host }
        }
        HostListing::Unknown(warning) => {
            warn!("{warning}");
            TreeEvent::PlacementsUnknown { host }
        }
        HostListing::Listed(dir) => {
            for warning in dir.warnings {
                warn!("{warning}");
            }
            TreeEvent::PlacementDirListed {
                host,
                instances: dir.instances,
            }
        }
    };
    vec![Change::Tree(event)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Duration;

    use crate::tree::scan::scan;

    fn raw(mask: EventMask, name: Option<&str>) -> Raw {
        Raw {
            wd: None,
            mask,
            name: name.map(Into::into),
        }
    }

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("host")
    }

    /// A ready tree: hosts h1 and h2, each with a server file and a host
    /// directory, one placement on h1.
    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for h in ["h1", "h2"] {
            fs::create_dir_all(root.join("placement").join(h)).expect("mkdir");
            fs::create_dir_all(root.join("servers")).expect("mkdir");
            let server = format!("partition: p1\nnt.dn: CN={h},OU=Hosts,DC=ad,DC=com\n");
            fs::write(root.join("servers").join(h), server).expect("server");
        }
        fs::write(root.join("placement/h1/web.app#1"), "").expect("placement");
        fs::write(root.join(".modified"), "").expect(".modified");
        dir
    }

    /// The next change, or a failure after a long while: the watcher is
    /// asynchronous, and a missing change must not hang the tests.
    async fn next(rx: &mut mpsc::UnboundedReceiver<Noticed>) -> Change {
        tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("a change within 20 s")
            .expect("the watcher is running")
            .change
    }

    /// Waits on the system's clock, without yielding to the runtime (whose
    /// clock may be paused), until the watcher has queued a change.
    fn until_queued(rx: &mpsc::UnboundedReceiver<Noticed>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while rx.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no change within 20 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Changes until one that reports `host`'s placement `instance` (which
    /// the test made last, as a marker), that one included.
    async fn until_placement(
        rx: &mut mpsc::UnboundedReceiver<Noticed>,
        host: &str,
        instance: &str,
    ) -> Vec<Change> {
        let mut got = Vec::new();
        loop {
            let change = next(rx).await;
            let done = match &change {
                Change::Tree(TreeEvent::PlacementAdded {
                    host: h,
                    instance: i,
                }) => h.as_str() == host && i == instance,
                // A new directory's listing may have found it first.
                Change::Tree(TreeEvent::PlacementDirListed { host: h, instances }) => {
                    h.as_str() == host && instances.contains(instance)
                }
                _ => false,
            };
            got.push(change);
            if done {
                return got;
            }
        }
    }

    /// Whether `instance` was reported placed, on any host.
    fn added(got: &[Change], instance: &str) -> bool {
        got.iter().any(|c| {
            matches!(c, Change::Tree(TreeEvent::PlacementAdded { instance: i, .. }) if i == instance)
        })
    }

    #[test]
    fn an_overflow_asks_for_a_rescan_only() {
        let inotify = Inotify::init().expect("inotify");
        let mut watched = Watched::new(Path::new("/t"), inotify.watches());
        let got = watched.changes_of(vec![raw(EventMask::Q_OVERFLOW, None)]);
        assert!(matches!(got.as_slice(), [Change::Rescan(_)]), "{got:?}");
    }

    /// An overflow may have lost a new host directory's creation: the
    /// directory is watched before the rescan is asked for, so what is
    /// written into it later is seen.
    #[test]
    fn a_host_directory_whose_creation_was_lost_is_watched_after_the_overflow() {
        let dir = tree();
        let mut inotify = Inotify::init().expect("inotify");
        let mut watched = Watched::new(dir.path(), inotify.watches());
        assert!(watched.watch_tree().is_ok());
        let mut buffer = vec![0; READ_BUFFER];
        fs::create_dir(dir.path().join("placement/h8")).expect("mkdir");
        // Its notification lost, as in an overflow.
        let lost = detached(inotify.read_events(&mut buffer).expect("created"));
        assert!(!lost.is_empty());
        let got = watched.changes_of(vec![raw(EventMask::Q_OVERFLOW, None)]);
        assert!(matches!(got.as_slice(), [Change::Rescan(_)]), "{got:?}");
        fs::write(dir.path().join("placement/h8/web.app#1"), "").expect("placement");
        let events = detached(inotify.read_events(&mut buffer).expect("seen"));
        let got = watched.changes_of(events);
        let added = Change::Tree(TreeEvent::PlacementAdded {
            host: host("h8"),
            instance: "web.app#1".into(),
        });
        assert!(got.contains(&added), "{got:?}");
    }

    /// The daemon's own scan opens every server file and lists every host
    /// directory: none of that may queue a notification, or at 50,000
    /// hosts the daemon overflows its own queue at every start.
    #[test]
    fn the_scans_own_reading_queues_no_notification() {
        let dir = tree();
        let mut inotify = Inotify::init().expect("inotify");
        let mut watched = Watched::new(dir.path(), inotify.watches());
        assert!(watched.watch_tree().is_ok());
        assert_eq!(watched.paths.len(), 5, "root, servers, placement, h1, h2");
        let snapshot = scan(dir.path()).expect("scan");
        assert_eq!(snapshot.servers.len(), 2, "the scan read both servers");
        let mut buffer = vec![0; READ_BUFFER];
        match inotify.read_events(&mut buffer) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Ok(events) => panic!("reading queued {:?}", events.collect::<Vec<_>>()),
            Err(err) => panic!("{err}"),
        }
        // While a change is one.
        fs::write(dir.path().join("placement/h2/db.app#1"), "").expect("placement");
        let events = inotify.read_events(&mut buffer).expect("a notification");
        assert!(events.count() > 0);
    }

    #[tokio::test]
    async fn a_new_host_directory_is_watched_before_it_is_listed() {
        let dir = tree();
        let root = dir.path();
        let (_watcher, mut rx) = watch(root).expect("watch");
        // Files written at once into a new directory are seen, by its
        // listing or its watch, and so is every later one.
        fs::create_dir(root.join("placement/h3")).expect("mkdir");
        fs::write(root.join("placement/h3/web.app#2"), "").expect("placement");
        fs::write(root.join("placement/h3/web.app#3"), "").expect("placement");
        let got = until_placement(&mut rx, "h3", "web.app#3").await;
        let listed_or_added = got.iter().any(|c| match c {
            Change::Tree(TreeEvent::PlacementDirListed { host, instances }) => {
                host.as_str() == "h3" && instances.contains("web.app#2")
            }
            Change::Tree(TreeEvent::PlacementAdded { host, instance }) => {
                host.as_str() == "h3" && instance == "web.app#2"
            }
            _ => false,
        });
        assert!(listed_or_added, "{got:?}");
    }

    /// A server file is read once its writer has closed it: never half
    /// written. The placement made after the first half is a marker: the
    /// queue is ordered, so nothing about the server came before it.
    #[tokio::test]
    async fn a_server_file_is_read_once_its_writer_closes_it() {
        use std::io::Write;
        let dir = tree();
        let root = dir.path();
        let (_watcher, mut rx) = watch(root).expect("watch");
        let mut file = fs::File::create(root.join("servers/h3")).expect("create");
        file.write_all(b"partition: p1\n").expect("write");
        fs::write(root.join("placement/h1/web.app#9"), "").expect("placement");
        let got = until_placement(&mut rx, "h1", "web.app#9").await;
        let servers: Vec<_> = got
            .iter()
            .filter(|c| matches!(c, Change::Tree(TreeEvent::ServerUpserted { .. })))
            .collect();
        // Its creation is seen (an empty file, not usable yet) but not
        // the half-written contents.
        assert!(servers.len() <= 1, "{got:?}");
        file.write_all(b"nt.dn: CN=h3,OU=Hosts,DC=ad,DC=com\n")
            .expect("write");
        drop(file);
        loop {
            if let Change::Tree(TreeEvent::ServerUpserted { host: h, info }) = next(&mut rx).await {
                assert_eq!(h, host("h3"));
                assert!(info.is_ok(), "read whole: {info:?}");
                break;
            }
        }
    }

    #[tokio::test]
    async fn a_host_directory_renamed_is_followed_under_its_new_name() {
        let dir = tree();
        let root = dir.path();
        let (_watcher, mut rx) = watch(root).expect("watch");
        fs::rename(root.join("placement/h1"), root.join("placement/h4")).expect("mv");
        fs::write(root.join("placement/h4/web.app#5"), "").expect("placement");
        let got = until_placement(&mut rx, "h4", "web.app#5").await;
        assert!(
            got.contains(&Change::Tree(TreeEvent::PlacementDirRemoved {
                host: host("h1")
            })),
            "{got:?}"
        );
        let about_h1_later = got
            .iter()
            .skip_while(|c| !matches!(c, Change::Tree(TreeEvent::PlacementDirRemoved { .. })))
            .any(|c| matches!(c, Change::Tree(TreeEvent::PlacementAdded { host, .. }) if host.as_str() == "h1"));
        assert!(
            !about_h1_later,
            "nothing reported under the old name: {got:?}"
        );
    }

    /// Soak-style hostile input: a host directory that is a symlink to a
    /// directory outside the tree. It is never watched, so what happens
    /// out there is never reported as the tree's.
    #[tokio::test]
    async fn a_symlinked_host_directory_is_never_watched() {
        let dir = tree();
        let root = dir.path();
        let outside = tempfile::tempdir().expect("outside");
        std::os::unix::fs::symlink(outside.path(), root.join("placement/h5")).expect("symlink");
        let (_watcher, mut rx) = watch(root).expect("watch");
        std::os::unix::fs::symlink(outside.path(), root.join("placement/h6")).expect("symlink");
        fs::write(outside.path().join("web.app#7"), "").expect("outside");
        fs::write(root.join("placement/h2/web.app#8"), "").expect("marker");
        let got = until_placement(&mut rx, "h2", "web.app#8").await;
        assert!(!added(&got, "web.app#7"), "{got:?}");
    }

    #[tokio::test]
    async fn placement_replaced_asks_for_a_rescan_and_its_host_directories_are_watched() {
        let dir = tree();
        let root = dir.path();
        let (_watcher, mut rx) = watch(root).expect("watch");
        let staged = root.join("staged");
        fs::create_dir_all(staged.join("h7")).expect("mkdir");
        fs::rename(root.join("placement"), root.join("old")).expect("mv away");
        fs::rename(&staged, root.join("placement")).expect("mv in");
        let mut got = Vec::new();
        while !matches!(got.last(), Some(Change::Rescan(_))) {
            got.push(next(&mut rx).await);
        }
        // The new directory's host directory is watched, the old one's are not.
        fs::write(root.join("old/h1/web.app#4"), "").expect("old");
        fs::write(root.join("placement/h7/web.app#6"), "").expect("placement");
        let got = until_placement(&mut rx, "h7", "web.app#6").await;
        assert!(!added(&got, "web.app#4"), "{got:?}");
    }

    #[tokio::test]
    async fn the_root_moved_fails_the_watcher() {
        let dir = tree();
        let root = dir.path().join("cell");
        fs::create_dir(&root).expect("mkdir");
        let (_watcher, mut rx) = watch(&root).expect("watch");
        fs::rename(&root, dir.path().join("moved")).expect("mv");
        match next(&mut rx).await {
            Change::Failed(why) => assert!(why.contains("was moved or removed"), "{why}"),
            other => panic!("before the failure: {other:?}"),
        }
        assert!(
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("the thread ends")
                .is_none(),
            "a failed watcher reports nothing more"
        );
    }

    #[tokio::test]
    async fn dropping_the_watcher_ends_its_thread() {
        let dir = tree();
        let (watcher, mut rx) = watch(dir.path()).expect("watch");
        drop(watcher);
        let end = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("the thread ends");
        assert!(end.is_none(), "{end:?}");
    }

    #[test]
    fn a_root_that_is_not_a_directory_is_a_clear_error() {
        let dir = tree();
        let file = dir.path().join(".modified");
        let err = watch(&file).err().expect("an error");
        let text = err.to_string();
        assert!(text.contains(".modified"), "{text}");
    }

    #[test]
    fn the_watch_limit_is_named_with_the_setting_that_raises_it() {
        let text = explain(&io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(text.contains("fs.inotify.max_user_watches"), "{text}");
    }

    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Debug, Default, PartialEq)]
    struct Model {
        servers: BTreeMap<HostName, Result<crate::tree::ServerInfo, crate::tree::ServerError>>,
        placements: BTreeMap<HostName, BTreeSet<String>>,
    }

    fn model_of(root: &Path) -> Model {
        let s = scan(root).expect("scan");
        let mut m = Model {
            servers: s.servers,
            placements: s.placements,
        };
        m.placements.retain(|_, v| !v.is_empty());
        m
    }

    /// Applies the changes; true when a rescan or failure was asked for.
    fn apply(m: &mut Model, got: &[Change]) -> bool {
        let mut doubt = false;
        for c in got {
            match c {
                Change::Rescan(_) | Change::Failed(_) => doubt = true,
                Change::Tree(TreeEvent::ServerUpserted { host, info }) => {
                    m.servers.insert(host.clone(), info.clone());
                }
                Change::Tree(TreeEvent::ServerRemoved { host }) => {
                    m.servers.remove(host);
                }
                Change::Tree(TreeEvent::PlacementAdded { host, instance }) => {
                    m.placements
                        .entry(host.clone())
                        .or_default()
                        .insert(instance.clone());
                }
                Change::Tree(TreeEvent::PlacementRemoved { host, instance }) => {
                    m.placements
                        .entry(host.clone())
                        .or_default()
                        .remove(instance);
                }
                Change::Tree(TreeEvent::PlacementDirRemoved { host }) => {
                    m.placements.remove(host);
                }
                Change::Tree(TreeEvent::PlacementDirListed { host, instances }) => {
                    m.placements.insert(host.clone(), instances.clone());
                }
                Change::Tree(TreeEvent::PlacementsUnknown { .. }) => {}
            }
        }
        m.placements.retain(|_, v| !v.is_empty());
        doubt
    }

    /// Runs `ops` against a watched tree, then makes a marker placement;
    /// checks that what was reported up to the marker (the queue is
    /// ordered) adds up to what the scan reads, or that a rescan was asked.
    async fn check(ops: impl FnOnce(&Path)) -> (Vec<Change>, bool) {
        let dir = tree();
        let root = dir.path().to_path_buf();
        let mut m = model_of(&root);
        let (_w, mut rx) = watch(&root).expect("watch");
        ops(&root);
        fs::create_dir_all(root.join("placement/hmark")).expect("mkdir");
        fs::write(root.join("placement/hmark/mark.er#1"), "").expect("marker");
        let got = until_placement(&mut rx, "hmark", "mark.er#1").await;
        let doubt = apply(&mut m, &got);
        let truth = model_of(&root);
        let ok = doubt || m == truth;
        assert!(ok, "model {m:?}\n != disk {truth:?}\n changes {got:?}");
        (got, doubt)
    }

    #[tokio::test]
    async fn a_change_is_stamped_after_its_write_and_before_it_is_queued() {
        let dir = tree();
        let root = dir.path().to_path_buf();
        let (_w, mut rx) = watch(&root).expect("watch");
        let before = Instant::now();
        fs::write(root.join("placement/h1/db.app#2"), "").expect("placement");
        until_queued(&rx);
        let queued = Instant::now();
        let noticed = rx.try_recv().expect("a change");
        assert!(
            before <= noticed.at && noticed.at <= queued,
            "stamped {:?} after the write, queued by {:?}",
            noticed.at - before,
            queued - before
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_runtime_whose_time_is_paused_stamps_on_its_own_clock() {
        let dir = tree();
        let root = dir.path().to_path_buf();
        // An hour ahead of the system's clock: a stamp from that clock
        // would come before this.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let before = Instant::now();
        let (_w, mut rx) = watch(&root).expect("watch");
        fs::write(root.join("placement/h1/db.app#2"), "").expect("placement");
        until_queued(&rx);
        let noticed = rx.try_recv().expect("a change");
        assert!(noticed.at >= before, "stamped on another clock");
    }

    #[tokio::test]
    async fn a_server_file_replaced_by_a_directory_is_a_server_gone() {
        check(|root| {
            fs::remove_file(root.join("servers/h1")).expect("file system");
            fs::create_dir(root.join("servers/h1")).expect("file system");
        })
        .await;
    }

    #[tokio::test]
    async fn a_host_directory_made_and_removed_again_and_again_ends_as_on_disk() {
        check(|root| {
            for i in 0..50 {
                let d = root.join("placement/h3");
                fs::create_dir(&d).expect("file system");
                fs::write(d.join(format!("web.app#{i}")), "").expect("file system");
                if i % 2 == 0 {
                    fs::remove_dir_all(&d).expect("file system");
                } else {
                    fs::rename(&d, root.join(format!("gone{i}"))).expect("file system");
                }
            }
            fs::create_dir(root.join("placement/h3")).expect("file system");
            fs::write(root.join("placement/h3/web.app#x"), "").expect("file system");
        })
        .await;
    }

    #[tokio::test]
    async fn a_host_directory_moved_out_and_back_ends_as_on_disk() {
        let out = tempfile::tempdir().expect("outside");
        let o = out.path().to_path_buf();
        check(move |root| {
            for i in 0..20 {
                fs::rename(root.join("placement/h1"), o.join("h1")).expect("file system");
                fs::write(o.join("h1").join(format!("web.app#o{i}")), "").expect("file system");
                fs::rename(o.join("h1"), root.join("placement/h1")).expect("file system");
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_host_directory_replaced_by_a_file_and_back_ends_as_on_disk() {
        check(|root| {
            fs::remove_dir_all(root.join("placement/h1")).expect("file system");
            fs::write(root.join("placement/h1"), "").expect("file system");
            fs::remove_file(root.join("placement/h1")).expect("file system");
            fs::create_dir(root.join("placement/h1")).expect("file system");
            fs::write(root.join("placement/h1/web.app#2"), "").expect("file system");
        })
        .await;
    }

    #[tokio::test]
    async fn placements_and_host_directories_renamed_over_others_end_as_on_disk() {
        check(|root| {
            fs::write(root.join("placement/h2/web.app#1"), "").expect("file system");
            fs::rename(
                root.join("placement/h1/web.app#1"),
                root.join("placement/h2/web.app#1"),
            )
            .expect("file system");
            fs::write(root.join("placement/h1/db.app#1"), "").expect("file system");
            fs::rename(
                root.join("placement/h1/db.app#1"),
                root.join("placement/h2/db.app#2"),
            )
            .expect("file system");
            // A host directory renamed over an empty one.
            fs::create_dir(root.join("placement/h9")).expect("file system");
            fs::rename(root.join("placement/h1"), root.join("placement/h9")).expect("file system");
            fs::write(root.join("placement/h9/web.app#9"), "").expect("file system");
        })
        .await;
    }

    #[tokio::test]
    async fn deep_directories_and_refused_names_end_as_on_disk() {
        use std::os::unix::ffi::OsStrExt;
        check(|root| {
            fs::create_dir_all(root.join("placement/h1/web.app#5/deeper/still"))
                .expect("file system");
            fs::write(
                root.join("placement/h1/web.app#5/deeper/still/web.app#6"),
                "",
            )
            .expect("file system");
            fs::create_dir(root.join("placement/h\nx")).expect("file system");
            fs::write(root.join("placement/h\nx/web.app#1"), "").expect("file system");
            let bad = root.join("placement").join(OsStr::from_bytes(b"h\xff"));
            fs::create_dir(&bad).expect("file system");
            fs::write(bad.join("web.app#1"), "").expect("file system");
            fs::rename(&bad, root.join("placement/h8")).expect("file system");
            fs::write(
                root.join("placement/h1")
                    .join(OsStr::from_bytes(b"web.app#\xff")),
                "",
            )
            .expect("file system");
        })
        .await;
    }

    #[tokio::test]
    async fn servers_replaced_by_a_symlink_reports_nothing_from_outside() {
        let dir = tree();
        let root = dir.path();
        let out = tempfile::tempdir().expect("file system");
        let (_w, mut rx) = watch(root).expect("watch");
        fs::rename(root.join("servers"), out.path().join("servers")).expect("file system");
        std::os::unix::fs::symlink(out.path().join("servers"), root.join("servers"))
            .expect("file system");
        // Nothing outside may be reported as the tree's.
        fs::write(out.path().join("servers/h7"), "partition: p1\n").expect("file system");
        fs::write(root.join("placement/h2/web.app#8"), "").expect("marker");
        let got = until_placement(&mut rx, "h2", "web.app#8").await;
        assert!(
            got.iter().any(|c| matches!(c, Change::Rescan(_))),
            "{got:?}"
        );
        let out_seen = got.iter().any(|c| matches!(c, Change::Tree(TreeEvent::ServerUpserted { host, .. }) if host.as_str() == "h7"));
        assert!(!out_seen, "{got:?}");
    }

    /// The root is a symlink to a tree; the link is turned to another tree.
    #[tokio::test]
    async fn a_symlinked_root_turned_to_another_tree_fails_the_watcher() {
        let a = tree();
        let b = tree();
        let base = tempfile::tempdir().expect("file system");
        let link = base.path().join("cell");
        std::os::unix::fs::symlink(a.path(), &link).expect("file system");
        let (_w, mut rx) = watch(&link).expect("watch");
        let tmp = base.path().join("cell.new");
        std::os::unix::fs::symlink(b.path(), &tmp).expect("file system");
        fs::rename(&tmp, &link).expect("file system");
        // A change in the tree the root now names.
        fs::write(b.path().join("placement/h2/web.app#42"), "").expect("file system");
        match next(&mut rx).await {
            Change::Failed(why) => assert!(why.contains("turned to another directory"), "{why}"),
            other => panic!("before the failure: {other:?}"),
        }
    }

    /// A host directory renamed over another, then moved out of the tree:
    /// its watch must go with it.
    #[test]
    fn a_host_directory_moved_away_after_a_rename_over_takes_its_watch_with_it() {
        let dir = tree();
        let root = dir.path();
        let out = tempfile::tempdir().expect("file system");
        let mut inotify = Inotify::init().expect("inotify");
        let mut watched = Watched::new(root, inotify.watches());
        assert!(watched.watch_tree().is_ok());
        let mut buffer = vec![0; READ_BUFFER];
        fs::remove_file(root.join("placement/h1/web.app#1")).expect("file system");
        let mut read = |w: &mut Watched| {
            let e = detached(inotify.read_events(&mut buffer).expect("events"));
            w.changes_of(e)
        };
        read(&mut watched);
        fs::rename(root.join("placement/h1"), root.join("placement/h2")).expect("file system");
        read(&mut watched);
        fs::rename(root.join("placement/h2"), out.path().join("x")).expect("file system");
        read(&mut watched);
        let left: Vec<_> = watched
            .paths
            .values()
            .filter(|p| p.ends_with("h2"))
            .collect();
        assert!(left.is_empty(), "still watched as in the tree: {left:?}");
    }

    #[tokio::test]
    async fn dropping_the_watcher_while_changes_pour_in_ends_its_thread() {
        let dir = tree();
        let root = dir.path().to_path_buf();
        let (w, mut rx) = watch(&root).expect("watch");
        let r = root.clone();
        let writer = std::thread::spawn(move || {
            for i in 0..5000 {
                let _ = fs::write(r.join(format!("placement/h1/web.app#{i}")), "");
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(w);
        let mut n = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
                Ok(Some(_)) => n += 1,
                Ok(None) => break,
                Err(_) => panic!("thread did not end after {n}"),
            }
        }
        writer.join().expect("file system");
    }
}
