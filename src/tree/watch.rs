//! Follows the placement tree with the file system notifier: the only
//! module that talks to `notify`.
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
//! notify hands over a new directory's notification before it watches that
//! directory, so a listing made right then can miss a file written a moment
//! later, for good. Notifications are therefore looked at on a thread of our
//! own, which first makes sure a new directory is watched (asking notify,
//! which answers only once its own watch is set) and only then lists it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use thiserror::Error;
use tokio::sync::mpsc;
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

/// The watcher could not be set up.
#[derive(Debug, Error)]
#[error("cannot watch {path}: {source}")]
pub struct WatchError {
    path: PathBuf,
    source: notify::Error,
}

/// A running watch; dropping it stops the notifications.
pub struct TreeWatcher {
    // The thread that turns notifications into changes holds it weakly, so
    // dropping this drops the notifier, which ends the thread.
    _watcher: Arc<Mutex<RecommendedWatcher>>,
}

/// Starts watching `root` recursively. Changes arrive on the receiver in
/// the order they were seen.
pub fn watch(root: &Path) -> Result<(TreeWatcher, mpsc::UnboundedReceiver<Change>), WatchError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let error = |source| WatchError {
        path: root.to_path_buf(),
        source,
    };
    // notify's callback must not wait on notify (it runs on notify's own
    // thread): it only passes notifications on.
    let (raw_tx, raw_rx) = std::sync::mpsc::channel::<notify::Result<notify::Event>>();
    let mut watcher = notify::recommended_watcher(move |res| {
        let _ = raw_tx.send(res);
    })
    .map_err(error)?;
    watch_tree(&mut watcher, root).map_err(error)?;
    let watcher = Arc::new(Mutex::new(watcher));
    let weak = Arc::downgrade(&watcher);
    let base = root.to_path_buf();
    std::thread::Builder::new()
        .name("tree-watch".into())
        .spawn(move || {
            for res in raw_rx {
                for change in changes_of(&base, &weak, res) {
                    // The receiver is gone only when the daemon is shutting down.
                    if tx.send(change).is_err() {
                        return;
                    }
                }
            }
        })
        .map_err(|e| error(notify::Error::io(e)))?;
    Ok((TreeWatcher { _watcher: watcher }, rx))
}

/// Watches the tree's directories each on its own: the root, `servers/`,
/// `placement/` and every host directory in it. A recursive watch of the
/// root would find those by walking the whole tree, looking at every file
/// (notify reads each entry's metadata), where the tree's layout says
/// which directories there are. Only directories are watched, never a
/// symlink. A directory that appears later is watched when it is reported
/// ([`ensure_watched`]); one that goes away before its watch is set is
/// reported by its parent's watch.
fn watch_tree(watcher: &mut RecommendedWatcher, root: &Path) -> notify::Result<()> {
    watcher.watch(root, RecursiveMode::NonRecursive)?;
    let mut dirs = Vec::new();
    for name in [SERVERS, PLACEMENT] {
        let path = root.join(name);
        if matches!(safe_fs::probe(&path), Ok(Some(Kind::Directory))) {
            dirs.push(path);
        }
    }
    let placement = root.join(PLACEMENT);
    if let Ok(entries) = safe_fs::list_dir(&placement) {
        for (name, file_type) in entries {
            let path = placement.join(name);
            let kind = match file_type {
                Some(file_type) => Some(Kind::of(file_type)),
                None => safe_fs::probe(&path).ok().flatten(),
            };
            if kind == Some(Kind::Directory) {
                dirs.push(path);
            }
        }
    }
    for dir in dirs {
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            // Gone since the listing: its parent's watch reports it.
            Err(err) if matches!(err.kind, notify::ErrorKind::PathNotFound) => {
                debug!(path = %dir.display(), "gone before it could be watched");
            }
            other => other?,
        }
    }
    Ok(())
}

/// The changes one notification stands for.
fn changes_of(
    base: &Path,
    watcher: &Weak<Mutex<RecommendedWatcher>>,
    res: notify::Result<notify::Event>,
) -> Vec<Change> {
    match res {
        Ok(event) if event.need_rescan() => {
            vec![Change::Rescan("the notifier lost events".into())]
        }
        Ok(event) if matches!(event.kind, EventKind::Access(_)) => Vec::new(),
        // The watches follow the directory, not its path: once the root
        // has been moved or removed nothing under the path is seen.
        Ok(event)
            if matches!(
                event.kind,
                EventKind::Remove(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
            ) && event.paths.iter().any(|p| p == base) =>
        {
            vec![Change::Failed(format!(
                "{} was moved or removed",
                base.display()
            ))]
        }
        Ok(event) => {
            let appeared = matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(notify::event::ModifyKind::Name(_))
            );
            event
                .paths
                .iter()
                .flat_map(|p| {
                    // Never a symlink: a link to a directory outside the
                    // tree must not get that directory watched.
                    let is_dir = matches!(safe_fs::probe(p), Ok(Some(Kind::Directory)));
                    let unwatched = if appeared && p != base && is_dir {
                        ensure_watched(watcher, p)
                    } else {
                        None
                    };
                    unwatched.into_iter().chain(changes_at(base, p))
                })
                .collect()
        }
        Err(err) => vec![Change::Failed(format!("the notifier failed: {err}"))],
    }
}

/// Returns once `dir` is watched: notify answers a request only after it
/// has finished with the notifications it was handing over, new
/// directories' watches included. Watching a watched directory again
/// changes nothing. A directory that cannot be watched for lack of watches
/// leaves the watcher blind to it: that is a failure of the watcher.
fn ensure_watched(watcher: &Weak<Mutex<RecommendedWatcher>>, dir: &Path) -> Option<Change> {
    let watcher = watcher.upgrade()?;
    // The lock guards nothing but the notifier's own calls.
    let mut watcher = watcher.lock().unwrap_or_else(|p| p.into_inner());
    match watcher.watch(dir, RecursiveMode::Recursive) {
        Ok(()) => None,
        Err(err) if matches!(err.kind, notify::ErrorKind::MaxFilesWatch) => Some(Change::Failed(
            format!("cannot watch {}: {err}", dir.display()),
        )),
        Err(err) => {
            // Gone again: its removal is reported next.
            debug!(path = %dir.display(), error = %err, "cannot watch a new directory");
            None
        }
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
        // A directory where a server file should be is not a server.
        ServerFile::NotAFile(_) => return None,
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
    use notify::event::{ModifyKind, RemoveKind, RenameMode};

    fn changes(base: &Path, res: notify::Result<notify::Event>) -> Vec<Change> {
        changes_of(base, &Weak::new(), res)
    }

    #[test]
    fn a_notifier_error_fails_the_watcher() {
        let got = changes(Path::new("/t"), Err(notify::Error::generic("inotify read")));
        assert!(matches!(got.as_slice(), [Change::Failed(why)] if why.contains("inotify read")));
    }

    #[test]
    fn the_root_moved_or_removed_fails_the_watcher() {
        let base = Path::new("/t");
        for kind in [
            EventKind::Remove(RemoveKind::Folder),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
        ] {
            let event = notify::Event::new(kind).add_path(base.to_path_buf());
            let got = changes(base, Ok(event));
            assert!(
                matches!(got.as_slice(), [Change::Failed(_)]),
                "{kind:?}: {got:?}"
            );
        }
    }

    #[test]
    fn an_overflow_asks_for_a_rescan_only() {
        let event = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        let got = changes(Path::new("/t"), Ok(event));
        assert!(matches!(got.as_slice(), [Change::Rescan(_)]), "{got:?}");
    }
}
