//! Start-up reconciliation: the app root against the placements found when
//! the node starts, after any amount of time down and any crash.
//!
//! The app root is the only record of what was done, so every step reads it
//! afresh: which `running/` links lead somewhere, which containers
//! `cleanup/` holds, which container directories nothing refers to (a
//! configuration interrupted before its link was made, or a container whose
//! link was lost). The node makes only links in `running/`; anything else
//! there (a plain file, a directory) belongs to someone else and is left
//! alone, with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;

use tokio::task::JoinSet;

use crate::tree::names::SCHEDULED;

use super::finish;
use super::manifest::AppJson;
use super::unique::{self, Instance, Stamp};
use super::{files, running_target, Added, Inner, Node, NodeError};

/// What [`Node::startup`] found and did.
#[derive(Debug, Default)]
pub struct StartupReport {
    /// Placed instances found running: left alone.
    pub kept: Vec<String>,
    /// `running/` entries that are not links (the node makes only links
    /// there, so these are someone else's): left alone, not deleted.
    pub left_alone: Vec<String>,
    /// Instances running but no longer placed: terminated.
    pub terminated: Vec<String>,
    /// `running/` entries that led to no container: removed (the instance
    /// is configured afresh if placed).
    pub repaired: Vec<String>,
    /// Placed instances whose container had already ended on its own: not
    /// configured again; an unlinked container has its event posted if it
    /// had not been, and is moved to cleanup.
    pub finished: Vec<String>,
    /// Containers nothing referred to: moved to cleanup (unique names).
    pub orphaned: Vec<String>,
    /// What configuring each placed instance that was not running did
    /// (a failure is retried by the next start-up or event).
    pub configured: BTreeMap<String, Result<Added, NodeError>>,
    /// Steps that failed (they are retried by the next start-up or event).
    pub errors: Vec<String>,
}

pub(super) async fn startup(
    node: &Node,
    placed: &BTreeSet<String>,
) -> Result<StartupReport, NodeError> {
    let inner = &node.inner;
    // Before anything is configured: which groups the host is in already.
    node.note_startup_membership(placed).await;
    {
        let mut state = inner.state();
        state.placed = placed.clone();
        state.done.retain(|instance| placed.contains(instance));
    }
    let mut report = StartupReport::default();
    let to_configure = {
        let _guard = inner.fs_lock.lock().await;
        inner.settle_running(&mut report)?;
        inner.settle_cleanup(&mut report)?;
        inner.settle_finished(&mut report)?;
        let state = inner.state();
        state
            .placed
            .iter()
            .filter(|i| !state.done.contains(*i) && !files::exists(&inner.layout.running.join(i)))
            .cloned()
            .collect::<Vec<_>>()
    };

    // Instances may wait for group membership: configure them side by side.
    let mut tasks = JoinSet::new();
    for instance in to_configure {
        let node = node.clone();
        tasks.spawn(async move {
            let result = node.placement_added(&instance).await;
            (instance, result)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((instance, result)) => {
                report.configured.insert(instance, result);
            }
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    let _guard = inner.fs_lock.lock().await;
    for unique_name in inner.unreferenced()? {
        match inner.move_to_cleanup(&unique_name, true) {
            Ok(()) => report.orphaned.push(unique_name),
            Err(err) => report.errors.push(err.to_string()),
        }
    }
    tracing::info!(
        kept = report.kept.len(),
        left_alone = report.left_alone.len(),
        terminated = report.terminated.len(),
        repaired = report.repaired.len(),
        finished = report.finished.len(),
        orphaned = report.orphaned.len(),
        configured = report.configured.len(),
        errors = report.errors.len(),
        "node start-up reconciled"
    );
    Ok(report)
}

impl Inner {
    /// `running/`: terminate what is no longer placed, drop links to
    /// nothing, make sure what is kept has had its `configured` event.
    fn settle_running(&self, report: &mut StartupReport) -> Result<(), NodeError> {
        let running = &self.layout.running;
        for name in files::data_names(running).map_err(NodeError::io(running))? {
            let path = running.join(&name);
            if running_target(&path)?.is_some_and(|target| target.is_empty()) {
                tracing::warn!(
                    path = %path.display(),
                    "not a link to a container: left alone (the node only makes links in running/)"
                );
                report.left_alone.push(name);
                continue;
            }
            let inst = Instance::parse(&name)
                .ok()
                .filter(|i| self.is_placed(i.name()));
            let Some(inst) = inst else {
                match self.terminate(&name) {
                    Ok(_) => report.terminated.push(name),
                    Err(err) => report.errors.push(err.to_string()),
                }
                continue;
            };
            match self.already_configured(&inst) {
                Ok(None) => report.repaired.push(name),
                Ok(Some(_)) => report.kept.push(name),
                Err(err) => report.errors.push(err.to_string()),
            }
        }
        Ok(())
    }

    /// `cleanup/`: finish marking containers whose move was interrupted;
    /// those of instances no longer placed count as terminated.
    fn settle_cleanup(&self, report: &mut StartupReport) -> Result<(), NodeError> {
        let cleanup = &self.layout.cleanup;
        for name in files::data_names(cleanup).map_err(NodeError::io(cleanup))? {
            let placed =
                read_instance(&self.container_dir(&name)).is_some_and(|i| self.is_placed(i.name()));
            if let Err(err) = self.mark_cleanup(&name, !placed) {
                report.errors.push(err.to_string());
            }
        }
        Ok(())
    }

    /// Placed instances whose container (of the manifest now scheduled)
    /// ended on its own: not configured again in this placement. If nothing
    /// links to that container yet, its one event is posted (in case its
    /// finish never ran) and it goes to cleanup.
    fn settle_finished(&self, report: &mut StartupReport) -> Result<(), NodeError> {
        let unreferenced: BTreeSet<String> = self.unreferenced()?.into_iter().collect();
        let cleanup = &self.layout.cleanup;
        let mut candidates = files::data_names(cleanup).map_err(NodeError::io(cleanup))?;
        candidates.extend(unreferenced.iter().cloned());
        let mut finished = BTreeSet::new();
        for unique_name in candidates {
            let dir = self.container_dir(&unique_name);
            if !finish::is_finished(&dir)
                || files::marker(&dir.join("data").join(finish::TERMINATED))
            {
                continue;
            }
            let Some(inst) = read_instance(&dir).filter(|i| self.is_placed(i.name())) else {
                continue;
            };
            if !self.of_current_manifest(&inst, &unique_name) {
                continue;
            }
            if unreferenced.contains(&unique_name) {
                if let Err(err) = finish::finish(&self.config.app_root, &dir) {
                    report.errors.push(err.to_string());
                }
                if let Err(err) = self.move_to_cleanup(&unique_name, false) {
                    report.errors.push(err.to_string());
                    continue;
                }
            }
            self.state().done.insert(inst.name().to_owned());
            finished.insert(inst.name().to_owned());
        }
        report.finished.extend(finished);
        Ok(())
    }

    /// Container directories that neither `running/` nor `cleanup/` links to.
    fn unreferenced(&self) -> Result<Vec<String>, NodeError> {
        let mut referenced = BTreeSet::new();
        for dir in [&self.layout.running, &self.layout.cleanup] {
            for name in files::data_names(dir).map_err(NodeError::io(dir))? {
                if let Some(target) = running_target(&dir.join(&name))? {
                    referenced.insert(target);
                }
            }
        }
        let apps = &self.layout.apps;
        let names = files::data_names(apps).map_err(NodeError::io(apps))?;
        Ok(names
            .into_iter()
            .filter(|name| !referenced.contains(name) && apps.join(name).is_dir())
            .collect())
    }

    /// True when a container was made from the manifest now in
    /// `scheduled/` (its id is one of that file's ids), or when that cannot
    /// be told because the manifest is gone. A container of an older
    /// manifest means the instance was placed again while the node was down.
    fn of_current_manifest(&self, inst: &Instance, unique_name: &str) -> bool {
        let path = self.config.fs_root.join(SCHEDULED).join(inst.name());
        let Ok(meta) = fs::symlink_metadata(&path) else {
            return true;
        };
        let stamp = Stamp::of(&meta);
        for generation in 0.. {
            let name = inst.unique_name(&unique::unique_id(&stamp, inst.number(), generation));
            if name == unique_name {
                return true;
            }
            if !files::exists(&self.container_dir(&name)) {
                return false;
            }
        }
        false
    }
}

/// The instance a container directory was made for, from its `app.json`
/// (read as a marker: a regular file only), else from its name.
fn read_instance(dir: &std::path::Path) -> Option<Instance> {
    if let files::MarkerText::Text(text) = files::read_marker(&dir.join("data/app.json")) {
        if let Ok(app) = serde_json::from_str::<AppJson>(&text) {
            if let Ok(instance) = Instance::parse(&app.name) {
                return Some(instance);
            }
        }
    }
    let name = dir.file_name()?.to_str()?;
    Instance::from_unique_name(name)
        .ok()
        .map(|(instance, _)| instance)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{TestNode, MANIFEST};
    use super::*;

    /// A container whose link was lost and which then ended on its own.
    async fn finished_and_unlinked(t: &TestNode, instance: &str) -> String {
        t.schedule(instance, MANIFEST);
        let Added::Configured {
            unique_name,
            container_dir,
            ..
        } = t.node.placement_added(instance).await.expect("configure")
        else {
            panic!("not configured");
        };
        fs::write(container_dir.join("data/oom"), "").expect("oom");
        fs::remove_file(t.inner().layout.running.join(instance)).expect("rm");
        unique_name
    }

    #[tokio::test]
    async fn a_finished_container_of_the_current_manifest_is_not_run_again() {
        let t = TestNode::new();
        let name = finished_and_unlinked(&t, "proid1.web#1").await;
        let placed = BTreeSet::from(["proid1.web#1".to_owned()]);
        let report = t.node.startup(&placed).await.expect("startup");
        assert_eq!(report.finished, ["proid1.web#1"]);
        assert!(report.configured.is_empty(), "{:?}", report.configured);
        assert_eq!(
            files::data_names(&t.inner().layout.cleanup).expect("list"),
            [name]
        );
        let events = files::data_names(&t.inner().layout.appevents).expect("list");
        assert!(
            events.last().is_some_and(|e| e.ends_with(",killed,oom")),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn a_finished_container_of_an_older_manifest_does_not_stop_a_new_placement() {
        let t = TestNode::new();
        let old = finished_and_unlinked(&t, "proid1.web#1").await;
        // Placed again while the node was down: the mirror wrote a new file.
        t.schedule("proid1.web#1", MANIFEST);
        let placed = BTreeSet::from(["proid1.web#1".to_owned()]);
        let report = t.node.startup(&placed).await.expect("startup");
        assert!(report.finished.is_empty(), "{:?}", report.finished);
        assert_eq!(report.orphaned, std::slice::from_ref(&old));
        let Some(Ok(Added::Configured { unique_name, .. })) = report.configured.get("proid1.web#1")
        else {
            panic!("not configured: {:?}", report.configured);
        };
        assert_ne!(unique_name, &old);
    }
}
