//! Terminate and clean up: a container leaves `running/` for `cleanup/`
//! with one rename, is marked `terminated` (so its finish reports nothing),
//! loses its credential spec, and is deleted once the retention time has
//! passed since it entered `cleanup/`.
//!
//! Deleting first renames the directory to a dot name, so a half-deleted
//! container is never taken for a live one; a crash mid-way leaves only a
//! dot directory, removed on the next pass.

use std::fs;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use super::finish::TERMINATED;
use super::{files, running_target, Inner, NodeError, Removed, APPS_DIR};

/// Prefix of a container directory being deleted.
const DELETING: &str = ".deleting-";
/// Marker in `data/`: when the container entered `cleanup/`; the retention
/// time counts from its modification time.
const CLEANUP_SINCE: &str = ".cleanup-since";

impl Inner {
    /// Moves `running/<instance>` to `cleanup/<unique name>` and marks the
    /// container terminated. Called with the fs lock held.
    pub(super) fn terminate(&self, instance: &str) -> Result<Removed, NodeError> {
        let link = self.layout.running.join(instance);
        let unique_name = match running_target(&link)? {
            None => return Ok(Removed::NotRunning),
            Some(name) if name.is_empty() => {
                // Not a link, so not the node's: whoever put it there owns it.
                tracing::warn!(path = %link.display(), "a running entry that is not a link: left alone");
                return Ok(Removed::NotRunning);
            }
            Some(name) if name.starts_with('.') => {
                // A link we did not make: it cannot lead to a container.
                tracing::warn!(path = %link.display(), "removing a running link that leads to no container");
                files::remove_file_if_exists(&link).map_err(NodeError::io(&link))?;
                return Ok(Removed::NotRunning);
            }
            Some(name) => name,
        };
        let dest = self.layout.cleanup.join(&unique_name);
        match fs::rename(&link, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::NotRunning),
            Err(e) => return Err(NodeError::io(&link)(e)),
        }
        self.mark_cleanup(&unique_name, true)?;
        tracing::info!(instance, %unique_name, "terminated");
        Ok(Removed::Terminated { unique_name })
    }

    /// Puts a container that no `running/` link refers to into `cleanup/`;
    /// `terminated`: its placement is gone, so its finish must not report.
    pub(super) fn move_to_cleanup(
        &self,
        unique_name: &str,
        terminated: bool,
    ) -> Result<(), NodeError> {
        let link = self.layout.cleanup.join(unique_name);
        let target = Path::new("..").join(APPS_DIR).join(unique_name);
        files::symlink_atomic(&target, &link).map_err(NodeError::io(&link))?;
        self.mark_cleanup(unique_name, terminated)
    }

    /// What entering `cleanup/` implies for a container: its credential spec
    /// goes, the retention clock starts (unless it already runs), and with
    /// `terminated`, `data/terminated` is touched. A container whose
    /// directory is gone needs none of it.
    pub(super) fn mark_cleanup(
        &self,
        unique_name: &str,
        terminated: bool,
    ) -> Result<(), NodeError> {
        let spec = self.credential_spec_path(unique_name);
        files::remove_file_if_exists(&spec).map_err(NodeError::io(&spec))?;
        let dir = self.container_dir(unique_name);
        if !dir.is_dir() {
            return Ok(());
        }
        let data = dir.join("data");
        match fs::create_dir(&data) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(NodeError::io(&data)(e));
            }
            _ => {}
        }
        // Markers are set inside data/ only, never through a link to elsewhere.
        let data = files::data_dir(&dir).map_err(NodeError::io(&data))?;
        let since = data.join(CLEANUP_SINCE);
        if !files::marker(&since) {
            files::touch(&since).map_err(NodeError::io(&since))?;
        }
        if terminated {
            let marker = data.join(TERMINATED);
            files::touch(&marker).map_err(NodeError::io(&marker))?;
        }
        Ok(())
    }

    /// See [`super::Node::cleanup_expired`].
    pub(super) fn cleanup_expired(&self, now: SystemTime) -> Vec<String> {
        let mut removed = Vec::new();
        if let Ok(entries) = fs::read_dir(&self.layout.apps) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(DELETING) {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let names = match files::data_names(&self.layout.cleanup) {
            Ok(names) => names,
            Err(error) => {
                tracing::warn!(%error, "cannot list the cleanup directory");
                return removed;
            }
        };
        for name in names {
            match self.expire(&name, now) {
                Ok(true) => removed.push(name),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(unique_name = %name, %error, "cleanup failed; will retry")
                }
            }
        }
        removed
    }

    /// Deletes one container of `cleanup/` if its time has come.
    fn expire(&self, unique_name: &str, now: SystemTime) -> Result<bool, NodeError> {
        let link = self.layout.cleanup.join(unique_name);
        let dir = self.container_dir(unique_name);
        let spec = self.credential_spec_path(unique_name);
        if !dir.is_dir() {
            files::remove_file_if_exists(&spec).map_err(NodeError::io(&spec))?;
            files::remove_file_if_exists(&link).map_err(NodeError::io(&link))?;
            return Ok(true);
        }
        let marker = dir.join("data").join(CLEANUP_SINCE);
        let since = match fs::symlink_metadata(&marker).and_then(|m| m.modified()) {
            Ok(since) => since,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Interrupted between the move and the mark: start the clock now.
                self.mark_cleanup(unique_name, false)?;
                return Ok(false);
            }
            Err(e) => return Err(NodeError::io(&marker)(e)),
        };
        if now
            .duration_since(since)
            .map_or(true, |age| age < self.config.retain)
        {
            return Ok(false);
        }
        files::remove_file_if_exists(&spec).map_err(NodeError::io(&spec))?;
        let doomed = self.layout.apps.join(format!("{DELETING}{unique_name}"));
        fs::rename(&dir, &doomed).map_err(NodeError::io(&dir))?;
        files::remove_file_if_exists(&link).map_err(NodeError::io(&link))?;
        fs::remove_dir_all(&doomed).map_err(NodeError::io(&doomed))?;
        tracing::info!(%unique_name, "container deleted");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{TestNode, MANIFEST};
    use super::super::Added;
    use super::*;
    use std::time::Duration;

    async fn terminated(t: &TestNode, instance: &str) -> String {
        t.schedule(instance, MANIFEST);
        let Added::Configured { unique_name, .. } =
            t.node.placement_added(instance).await.expect("configure")
        else {
            panic!("not configured");
        };
        t.node.placement_removed(instance).await.expect("terminate");
        unique_name
    }

    #[tokio::test]
    async fn retention_counts_from_entering_cleanup() {
        let t = TestNode::new();
        let name = terminated(&t, "proid1.web#1").await;
        let retain = t.node.config().retain;
        let entered = fs::metadata(
            t.inner()
                .container_dir(&name)
                .join("data")
                .join(CLEANUP_SINCE),
        )
        .and_then(|m| m.modified())
        .expect("clock started");
        assert!(t
            .node
            .cleanup_expired(entered + retain - Duration::from_secs(1))
            .is_empty());
        assert_eq!(t.node.cleanup_expired(entered + retain), [name]);
    }

    #[tokio::test]
    async fn an_interrupted_move_starts_the_clock_instead_of_deleting() {
        let t = TestNode::new();
        let name = terminated(&t, "proid1.web#1").await;
        let since = t
            .inner()
            .container_dir(&name)
            .join("data")
            .join(CLEANUP_SINCE);
        fs::remove_file(&since).expect("rm");
        let far = SystemTime::now() + Duration::from_secs(10 * 86400);
        assert!(t.node.cleanup_expired(far).is_empty());
        assert!(since.is_file());
        assert_eq!(t.node.cleanup_expired(far), [name]);
    }

    #[tokio::test]
    async fn leftovers_are_removed() {
        let t = TestNode::new();
        let layout = &t.inner().layout;
        // An interrupted deletion, and a cleanup link to nothing.
        let doomed = layout.apps.join(format!("{DELETING}p.a-1-x"));
        fs::create_dir_all(doomed.join("data")).expect("mkdir");
        std::os::unix::fs::symlink("../apps/p.a-1-gone", layout.cleanup.join("p.a-1-gone"))
            .expect("symlink");
        assert_eq!(t.node.cleanup_expired(SystemTime::now()), ["p.a-1-gone"]);
        assert!(!doomed.exists());
        assert!(files::data_names(&layout.cleanup).expect("list").is_empty());
    }

    #[tokio::test]
    async fn names_that_are_not_instances_are_refused() {
        let t = TestNode::new();
        for bad in ["../../etc", "proid1.web", ".hidden.x#1"] {
            assert!(t.node.placement_removed(bad).await.is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_running_entry_that_is_not_a_link_is_left_alone() {
        let t = TestNode::new();
        let entry = t.inner().layout.running.join("proid1.web#1");
        fs::write(&entry, "not ours").expect("write");
        assert_eq!(
            t.node
                .placement_removed("proid1.web#1")
                .await
                .expect("remove"),
            Removed::NotRunning
        );
        assert_eq!(fs::read(&entry).expect("kept"), b"not ours");
    }

    #[tokio::test]
    async fn a_marker_planted_as_a_link_is_replaced_not_followed() {
        let t = TestNode::new();
        t.schedule("proid1.web#1", MANIFEST);
        let Added::Configured { container_dir, .. } = t
            .node
            .placement_added("proid1.web#1")
            .await
            .expect("configure")
        else {
            panic!("not configured");
        };
        let outside = t.tmp.path().join("outside");
        fs::write(&outside, "keep").expect("write");
        let marker = container_dir.join("data").join(TERMINATED);
        std::os::unix::fs::symlink(&outside, &marker).expect("symlink");
        t.node
            .placement_removed("proid1.web#1")
            .await
            .expect("terminate");
        assert_eq!(fs::read(&outside).expect("read"), b"keep");
        assert!(fs::symlink_metadata(&marker).expect("lstat").is_file());
    }
}
