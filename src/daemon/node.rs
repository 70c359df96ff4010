//! Node mode's part of the daemon: starting it (the domain's facts, the
//! containers reconciled with the placements), handing it this host's
//! placement changes in order, and stopping it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::leadership::{DomainFactsError, Waiting};
use super::{Daemon, DaemonError, Shutdown, SHUTDOWN_GRACE};
use crate::directory::{Directory, DomainFacts, Group};
use crate::model::{Dn, GroupPattern, Proid};
use crate::node::CheckError;
use crate::node::{
    guid_to_string, sid_to_string, DomainInfo, GmsaProids, MembershipCheck, Node, OwnDc,
};
use crate::tree::TreeEvent;

/// What the test hook is called with for start-up (never an instance's
/// name: those have a `.`).
#[cfg(test)]
pub(crate) const STARTUP: &str = "startup";

/// How often containers kept past `--retain` are looked for.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);

/// Node mode's part of the daemon's state: the node once started and the
/// container work in flight.
pub(super) struct Containers {
    /// Node mode, once started.
    pub(super) node: Option<Node>,
    /// Node start-up and other untracked container work.
    tasks: JoinSet<()>,
    /// The last operation queued per instance, so the next one waits for it.
    chains: HashMap<String, JoinHandle<()>>,
    /// Whether start-up has reconciled the containers with the placements:
    /// every operation and clean-up waits for it, so that start-up, which works from
    /// the placements as they were when it began, never undoes an
    /// operation of a later change.
    started: watch::Receiver<bool>,
    /// When containers kept past `--retain` are next looked for.
    pub(super) next_cleanup: Instant,
    /// Runs before each operation's file work (see [`super::Parts`]).
    #[cfg(test)]
    pub(super) before_work: Option<super::NodeHook>,
}

impl Containers {
    /// Not started, nothing in flight.
    pub(super) fn new() -> Self {
        Containers {
            node: None,
            tasks: JoinSet::new(),
            chains: HashMap::new(),
            started: watch::channel(true).1,
            next_cleanup: Instant::now(),
            #[cfg(test)]
            before_work: None,
        }
    }
}

impl Daemon {
    /// Starts node mode: domain facts read if they were not configured,
    /// then the containers reconciled with the placements. `Ok(false)` to
    /// try again later.
    pub(super) async fn start_node(
        &mut self,
        shutdown: &mut Shutdown<'_>,
    ) -> Result<bool, DaemonError> {
        let Some(mut config) = self.config.node.clone() else {
            return Ok(true);
        };
        if self.tree.unknown.contains(&config.hostname) {
            // Unknown is not none: starting now would terminate every
            // container as no longer placed. A rescan finds out when the
            // directory can be read.
            let why = Waiting::Placements {
                host: config.hostname.clone(),
            };
            warn!("{why}; containers are left alone until it can be read");
            self.watching.rescan_needed = Some(why.to_string());
            self.not_ready_for_a_while(why, shutdown).await;
            return Ok(false);
        }
        if config.domain.is_none() && config.gmsa_proids != GmsaProids::None {
            let dir = self.directory();
            let Some(facts) = self
                .drive(async move { dir.domain_facts().await }, shutdown)
                .await
            else {
                return Ok(false);
            };
            match facts
                .map_err(DomainFactsError::from)
                .and_then(|f| domain_info(&f).map_err(DomainFactsError::from))
            {
                Ok(domain) => {
                    info!(domain = %domain.dns_name, netbios = %domain.netbios_name, "read the domain's facts");
                    config.domain = Some(domain);
                }
                Err(err) => {
                    error!(error = %err, "cannot read the domain's facts for credential specs; retrying");
                    self.not_ready_for_a_while(Waiting::DomainFacts(err), shutdown)
                        .await;
                    return Ok(false);
                }
            }
        }
        let check: Option<Arc<dyn MembershipCheck>> =
            match (&self.directory, &self.config.config.group_ou) {
                (Some(dir), Some(ou)) => Some(Arc::new(DirectoryCheck {
                    dir: dir.clone(),
                    ou: ou.clone(),
                    pattern: self.config.config.pattern.clone(),
                    own_dc: OwnDc::new(
                        &self.config.config.directory,
                        config.check_ldap_url.clone(),
                        config.fs_root.clone(),
                        config.hostname.clone(),
                    ),
                })),
                _ => None,
            };
        let hostname = config.hostname.clone();
        let node = Node::with_metrics(config, check, Some(self.metrics.clone()))?;
        // Which groups this host is in before this process writes any.
        let noting = node.clone();
        let before = self.index.placements_of(&hostname).cloned();
        let noted = async move {
            noting
                .note_startup_membership(&before.unwrap_or_default())
                .await
        };
        if self.drive(noted, shutdown).await.is_none() {
            return Ok(false);
        }
        let placed = self
            .index
            .placements_of(&hostname)
            .cloned()
            .unwrap_or_default();
        info!(host = %hostname, placed = placed.len(), "node mode: reconciling containers with placements");
        let starting = node.clone();
        #[cfg(test)]
        let hook = self.containers.before_work.clone();
        let (done_tx, started) = watch::channel(false);
        self.containers.started = started;
        self.containers.tasks.spawn(async move {
            // Start-up reads and writes every container's files: on the
            // blocking pool too, like each operation.
            let runtime = tokio::runtime::Handle::current();
            let done = tokio::task::spawn_blocking(move || {
                #[cfg(test)]
                if let Some(hook) = hook {
                    hook(STARTUP);
                }
                runtime.block_on(starting.startup(&placed))
            })
            .await;
            match done {
                Ok(Ok(report)) => info!(?report, "containers reconciled with placements"),
                Ok(Err(err)) => {
                    error!(error = %err, "reconciling containers with placements failed")
                }
                Err(err) => error!(error = %err, "reconciling containers with placements panicked"),
            }
            // Failed or not, the operations of later changes go ahead.
            let _ = done_tx.send(true);
        });
        self.containers.node = Some(node);
        self.health.node_started = true;
        self.health.waiting = None;
        self.publish_ready();
        Ok(true)
    }

    /// Hands a placement change on this host to node mode. Operations on
    /// one instance run in the order the changes came.
    pub(super) fn node_event(&mut self, event: &TreeEvent) {
        let Some(node) = self.containers.node.clone() else {
            return;
        };
        let host = node.config().hostname.clone();
        let placed = self.index.placements_of(&host);
        let (added, removed): (Vec<String>, Vec<String>) = match event {
            TreeEvent::PlacementAdded { host: h, instance } if *h == host => {
                if placed.is_some_and(|p| p.contains(instance)) {
                    return;
                }
                (vec![instance.clone()], vec![])
            }
            TreeEvent::PlacementRemoved { host: h, instance } if *h == host => {
                if !placed.is_some_and(|p| p.contains(instance)) {
                    return;
                }
                (vec![], vec![instance.clone()])
            }
            TreeEvent::PlacementDirRemoved { host: h } if *h == host => (
                vec![],
                placed
                    .map(|p| p.iter().cloned().collect())
                    .unwrap_or_default(),
            ),
            TreeEvent::PlacementDirListed { host: h, instances } if *h == host => {
                let empty = std::collections::BTreeSet::new();
                let placed = placed.unwrap_or(&empty);
                (
                    instances.difference(placed).cloned().collect(),
                    placed.difference(instances).cloned().collect(),
                )
            }
            _ => return,
        };
        self.containers
            .chains
            .retain(|_, handle| !handle.is_finished());
        // A removal is told at once, not only in its turn: an addition of
        // the instance still in progress (waiting for the group or for the
        // join command) must not configure it.
        for instance in &removed {
            node.unplaced(instance);
        }
        for (instance, add) in added
            .into_iter()
            .map(|i| (i, true))
            .chain(removed.into_iter().map(|i| (i, false)))
        {
            let node = node.clone();
            let previous = self.containers.chains.remove(&instance);
            let name = instance.clone();
            let mut started = self.containers.started.clone();
            #[cfg(test)]
            let hook = self.containers.before_work.clone();
            let handle = tokio::spawn(async move {
                if let Some(previous) = previous {
                    let _ = previous.await;
                }
                // A start-up that is gone (stopped) no longer needs waiting for.
                let _ = started.wait_for(|done| *done).await;
                // The operation reads and writes files (manifests, fsyncs,
                // renames): it runs on the blocking pool, so that a slow
                // disk holds up this instance only, never the event loop.
                let runtime = tokio::runtime::Handle::current();
                let work = tokio::task::spawn_blocking(move || {
                    #[cfg(test)]
                    if let Some(hook) = hook {
                        hook(&name);
                    }
                    runtime.block_on(async {
                        if add {
                            match node.placement_added(&name).await {
                                Ok(done) => info!(instance = %name, ?done, "placement added"),
                                Err(err) => {
                                    error!(instance = %name, error = %err, "configuring the container failed")
                                }
                            }
                        } else {
                            match node.placement_removed(&name).await {
                                Ok(done) => info!(instance = %name, ?done, "placement removed"),
                                Err(err) => {
                                    error!(instance = %name, error = %err, "terminating the container failed")
                                }
                            }
                        }
                    })
                });
                if let Err(err) = work.await {
                    error!(error = %err, "a container operation panicked");
                }
            });
            self.containers.chains.insert(instance, handle);
        }
    }

    pub(super) fn cleanup_containers(&mut self) {
        if let Some(node) = self.containers.node.clone() {
            // Removing container directories is disk work: the blocking
            // pool does it while the loop goes on, after start-up as every
            // other container operation.
            let mut started = self.containers.started.clone();
            self.containers.tasks.spawn(async move {
                let _ = started.wait_for(|done| *done).await;
                let removed = tokio::task::spawn_blocking(move || {
                    node.cleanup_expired(std::time::SystemTime::now())
                })
                .await;
                match removed {
                    Ok(removed) if !removed.is_empty() => info!(
                        containers = removed.len(),
                        "removed containers kept past --retain"
                    ),
                    Ok(_) => {}
                    Err(err) => error!(error = %err, "removing old containers panicked"),
                }
            });
        }
        self.containers.next_cleanup = Instant::now() + CLEANUP_EVERY;
    }

    /// Tells node mode to stop (a join command running is killed, nothing
    /// more is configured), lets its operations finish (bounded), then
    /// abandons them.
    pub(super) async fn stop_node_tasks(&mut self) {
        if let Some(node) = &self.containers.node {
            node.shut_down();
        }
        let mut chains: Vec<_> = self.containers.chains.drain().map(|(_, h)| h).collect();
        let all = async {
            while let Some(task) = self.containers.tasks.join_next().await {
                let _ = task;
            }
            for handle in &mut chains {
                let _ = handle.await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
            warn!("shutdown: abandoning container operations still running");
            self.containers.tasks.abort_all();
            for handle in &chains {
                handle.abort();
            }
        }
    }
}

/// Domain facts as a credential spec names them.
fn domain_info(facts: &DomainFacts) -> Result<DomainInfo, crate::node::credspec::CredSpecError> {
    Ok(DomainInfo {
        dns_name: facts.dns_name.clone(),
        dns_tree_name: facts.dns_tree_name.clone(),
        netbios_name: facts.netbios_name.clone(),
        sid: sid_to_string(&facts.sid)?,
        guid: guid_to_string(&facts.guid)?,
    })
}

/// Node mode's view of the groups: the `check` logic, whether a group
/// exists read from the daemon's directory, membership from this host's
/// own domain controller, with its DN taken from its own server file.
struct DirectoryCheck {
    dir: Arc<dyn Directory>,
    ou: Dn,
    pattern: GroupPattern,
    own_dc: OwnDc,
}

impl DirectoryCheck {
    /// The proid's group in `dir`, if it exists.
    async fn group(&self, dir: &dyn Directory, proid: &Proid) -> Result<Option<Group>, CheckError> {
        let name = self.pattern.render(proid);
        Ok(dir.find_group(&self.ou, &name).await?)
    }
}

#[async_trait::async_trait]
impl MembershipCheck for DirectoryCheck {
    async fn group_exists(&self, proid: &Proid) -> Result<bool, CheckError> {
        Ok(self.group(self.dir.as_ref(), proid).await?.is_some())
    }

    async fn is_member(&self, proid: &Proid) -> Result<bool, CheckError> {
        let (dn, dir) = self.own_dc.host(&self.dir)?;
        let group = self.group(dir.as_ref(), proid).await?;
        Ok(group.is_some_and(|g| g.members.contains(&dn)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::{Condvar, Mutex};

    use super::super::testing::*;
    use super::super::NodeHook;
    use super::*;

    /// Holds the blocking-pool thread of one operation, as a manifest read
    /// on a disk that does not answer would, until released, or for a
    /// minute at most: a loop held up by it then goes on, and the test
    /// fails instead of hanging.
    #[derive(Default)]
    struct Stuck {
        /// (entered, released, gave up waiting)
        state: Mutex<(bool, bool, bool)>,
        changed: Condvar,
    }

    impl Stuck {
        fn hold(&self) {
            let mut state = self.state.lock().expect("lock");
            state.0 = true;
            let (mut state, waited) = self
                .changed
                .wait_timeout_while(state, std::time::Duration::from_secs(60), |s| !s.1)
                .expect("lock");
            state.2 = waited.timed_out();
        }

        fn gave_up(&self) -> bool {
            self.state.lock().expect("lock").2
        }

        fn entered(&self) -> bool {
            self.state.lock().expect("lock").0
        }

        fn release(&self) {
            self.state.lock().expect("lock").1 = true;
            self.changed.notify_all();
        }
    }

    /// A node-mode daemon on `h1` whose operation named `stuck` blocks.
    fn start(root: &std::path::Path, stuck: &str) -> (Harness, Arc<Stuck>) {
        let apps = root.with_extension("apps");
        std::fs::create_dir_all(&apps).expect("mkdir");
        let app_root = format!("--app-root={}", apps.display());
        let mut config = run_config(root, &[&app_root, "--hostname=h1"]);
        config.node.as_mut().expect("node mode").gmsa_proids = GmsaProids::None;
        let gate = Arc::new(Stuck::default());
        let hook: NodeHook = {
            let gate = gate.clone();
            let stuck = stuck.to_owned();
            Arc::new(move |name: &str| {
                if name == stuck {
                    gate.hold();
                }
            })
        };
        let setup = Setup {
            before_node_work: Some(hook),
            ..Setup::default()
        };
        (Harness::start_with(root, config, setup), gate)
    }

    fn dns(hosts: &[&str]) -> BTreeSet<Dn> {
        hosts
            .iter()
            .map(|h| Dn::parse(&host_dn(h)).expect("dn"))
            .collect()
    }

    // Real time, on one thread: were the stuck work on the loop's thread,
    // nothing else would run and the waits below would never end.
    #[tokio::test]
    async fn a_stuck_node_startup_does_not_hold_up_the_groups() {
        let (_guard, root) = tree();
        fill(&root);
        let (h, gate) = start(&root, STARTUP);
        h.ready().await;
        until("start-up is stuck", || async { gate.entered() }).await;
        h.place("h1", "db.app#1");
        until("db's group applied", || async {
            h.members(DB).await == dns(&["h1"])
        })
        .await;
        gate.release();
        assert!(
            !gate.gave_up(),
            "the loop waited for the stuck start-up (released after a minute)"
        );
        h.stop().await;
    }

    /// Start-up reconciles the containers with the placements as they
    /// were when it began: an operation of a later change that ran beside
    /// it was undone (a container configured, then terminated by start-up
    /// as not placed). Operations wait for start-up to finish.
    #[tokio::test]
    async fn regression_operations_wait_for_the_node_startup() {
        let (_guard, root) = tree();
        fill(&root);
        let calls = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
        let gate = Arc::new(Stuck::default());
        let hook: NodeHook = {
            let (calls, gate) = (calls.clone(), gate.clone());
            Arc::new(move |name: &str| {
                let held = gate.entered() && !gate.state.lock().expect("lock").1;
                calls.lock().expect("lock").push((name.to_owned(), held));
                if name == STARTUP {
                    gate.hold();
                }
            })
        };
        let apps = root.with_extension("apps");
        std::fs::create_dir_all(&apps).expect("mkdir");
        let app_root = format!("--app-root={}", apps.display());
        let mut config = run_config(&root, &[&app_root, "--hostname=h1"]);
        config.node.as_mut().expect("node mode").gmsa_proids = GmsaProids::None;
        let setup = Setup {
            before_node_work: Some(hook),
            ..Setup::default()
        };
        let h = Harness::start_with(&root, config, setup);
        h.ready().await;
        until("start-up is held", || async { gate.entered() }).await;
        h.place("h1", "db.app#1");
        // The change went through the loop (its group is applied) while
        // start-up was still held.
        until("db's group applied", || async {
            h.members(DB).await == dns(&["h1"])
        })
        .await;
        gate.release();
        until("the placement's operation ran", || async {
            calls
                .lock()
                .expect("lock")
                .iter()
                .any(|(n, _)| n == "db.app#1")
        })
        .await;
        let calls = calls.lock().expect("lock").clone();
        assert!(
            calls.iter().all(|(name, held)| name == STARTUP || !held),
            "an operation ran while start-up was held: {calls:?}"
        );
        assert!(!gate.gave_up(), "start-up was held for a minute");
        h.stop().await;
    }

    // Real time, on one thread: were the stuck work on the loop's thread,
    // nothing else would run and the waits below would never end.
    #[tokio::test]
    async fn a_stuck_node_operation_does_not_hold_up_the_groups() {
        let (_guard, root) = tree();
        fill(&root);
        write_server(&root, "h2");
        let (h, gate) = start(&root, "db.app#1");
        h.ready().await;

        // Placed on this host: a container to configure (stuck), and a
        // group to change.
        h.place("h1", "db.app#1");
        until("the node operation is stuck", || async { gate.entered() }).await;
        until("db's group applied", || async {
            h.members(DB).await == dns(&["h1"])
        })
        .await;
        // Another change, on another host, still goes through.
        h.place("h2", "web.app#2");
        until("web's group applied", || async {
            h.members(WEB).await == dns(&["h1", "h2"])
        })
        .await;
        gate.release();
        assert!(
            !gate.gave_up(),
            "the loop waited for the stuck operation (released after a minute)"
        );
        h.stop().await;
    }
}
