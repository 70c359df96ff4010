//! The `run` event loop: wait for the tree, sync everything once, then
//! follow the tree and keep the groups right.
//!
//! One task owns all state; this module only wires the parts. The index
//! turns tree changes into dirty proids; `schedule` says when a batch,
//! a retry or a full sync is due (an isolated change at once, a burst
//! coalesced for the batch window); `groups` caches the groups a batch
//! plans from; every batch and full sync is one pass of
//! [`crate::reconcile`], one Modify per group. Only one batch is in flight
//! at a time, so a group is never written by two reconciles at once, and
//! while a batch waits on the directory the loop keeps taking tree
//! changes. `leadership` follows the election and derives readiness from
//! the daemon's state. Failed groups are retried with backoff and re-read
//! first; a periodic full resync re-reads every group and repairs whatever
//! was edited by hand or missed.
//!
//! The parts: `tree` (waiting for the tree, the watcher, its changes,
//! rescans), `sync` (the directory: full syncs, batches and what they
//! applied), `schedule` (pure timing), `groups` (the group cache),
//! `leadership` (role, term, what a new role does, readiness), `signals`
//! and `node` (node mode, its file work on the blocking pool). Every wait
//! before trying again goes through [`crate::backoff::Backoff`], on
//! tokio's clock, so the tests run the whole loop in paused time.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{info, warn};

use crate::audit::Audit;
use crate::cli::RunConfig;
use crate::directory::Directory;
use crate::election::{self, Election, Role, RoleState};
use crate::index::Index;
use crate::metrics::{self, Metrics};
use crate::model::Proid;
use crate::tree::watch::Change;
use crate::tree::Snapshot;

mod groups;
mod leadership;
mod node;
mod schedule;
mod signals;
mod sync;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod tree;

pub use signals::run_until_signalled;

use groups::GroupCache;
use leadership::{role_changed, Health, Leadership};
use node::Containers;
use schedule::Schedule;
use tree::Watching;

/// How long in-flight writes may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the daemon stopped with an error: each is something the operator
/// must fix before it can run. Everything else is retried.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The audit log cannot be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The metrics address cannot be listened on.
    #[error("--metrics-addr {addr}: {source}")]
    MetricsAddr {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it cannot be bound.
        source: std::io::Error,
    },
    /// The election cannot start.
    #[error(transparent)]
    Election(#[from] election::ElectionError),
    /// The first tree watcher cannot start (a later one is retried).
    #[error(transparent)]
    Watcher(#[from] crate::tree::watch::WatchError),
    /// Node mode's configuration is unusable.
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
}

type Shutdown<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

/// What the daemon runs on in place of what the configuration opens: a
/// test hands it a directory and the tree's changes; the binary gives
/// none, and the daemon opens the configured directory and watches
/// `--fs-root`.
#[derive(Default)]
pub struct Parts {
    /// The directory the groups live in.
    pub directory: Option<Arc<dyn Directory>>,
    /// The tree's changes, in place of the first watcher (a later one,
    /// after this stream ends, watches `--fs-root`).
    pub changes: Option<mpsc::UnboundedReceiver<Change>>,
    /// The role to follow, in place of competing for the lock in
    /// ZooKeeper (ignored when the configuration starts an election).
    pub roles: Option<watch::Receiver<RoleState>>,
    /// Runs on the blocking pool before each node operation (by instance
    /// name), where its file work would; a test makes it block.
    #[cfg(test)]
    pub(crate) before_node_work: Option<NodeHook>,
}

/// A test's stand-in for a node operation's file work.
#[cfg(test)]
pub(crate) type NodeHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Runs the daemon until `shutdown` completes; returns `Ok` on a clean stop.
pub async fn run(
    config: RunConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    run_on(config, metrics, Parts::default(), shutdown).await
}

/// [`run`] on the parts given.
pub async fn run_on(
    config: RunConfig,
    metrics: Arc<Metrics>,
    parts: Parts,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), DaemonError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let shutdown: Shutdown<'_> = shutdown.as_mut();
    if let Some(addr) = config.metrics_addr {
        let listener = metrics::bind(addr)
            .await
            .map_err(|source| DaemonError::MetricsAddr { addr, source })?;
        info!(%addr, "serving metrics");
        tokio::spawn(metrics::serve(listener, metrics.clone()));
    }
    let election = match &config.election {
        Some(election) => {
            info!(zookeeper = %election.servers, lock = %election.lock_path, "competing for the writer's lock");
            Some(election::start(election.clone())?)
        }
        None => None,
    };
    let replica = config
        .node
        .as_ref()
        .map(|node| node.hostname.as_str().to_owned());
    let audit = match &config.config.audit_log {
        Some(path) => Audit::open(
            Some(path),
            crate::cli::replica_name(replica.as_deref()),
            match &config.config.directory {
                crate::cli::DirectoryChoice::LdifFile(directory) => Some(directory.as_path()),
                crate::cli::DirectoryChoice::Ldap(_) => None,
            },
        )?,
        None => Audit::log_only(),
    }
    .counting_failures(metrics.audit_write_failures.clone());
    let mut daemon = Daemon::new(config, metrics);
    daemon.audit = Arc::new(audit);
    daemon.directory = parts.directory;
    daemon.watching.given = parts.changes;
    #[cfg(test)]
    {
        daemon.containers.before_work = parts.before_node_work;
    }
    if let Some(election) = election {
        daemon.leadership = Leadership::new(Some(election.subscribe()));
        daemon.election = Some(election);
    } else if let Some(roles) = parts.roles {
        daemon.leadership = Leadership::new(Some(roles));
    } else {
        daemon.metrics.set_role(Role::Leader.as_str());
    }
    let result = daemon.main(shutdown).await;
    if let Some(election) = daemon.election.take() {
        election.stop().await;
    }
    result
}

struct Daemon {
    config: RunConfig,
    metrics: Arc<Metrics>,
    /// Where applied changes are recorded.
    audit: Arc<Audit>,
    /// The servers and unknown hosts as last seen; the placements are kept
    /// in `index` only (`tree.placements` stays empty).
    tree: Snapshot,
    index: Index,
    /// The watcher, its changes and the rescans due.
    watching: Watching,
    directory: Option<Arc<dyn Directory>>,
    /// The groups as last read or written.
    groups: GroupCache,
    /// The search of every group started while the startup scan runs, for
    /// the first full sync.
    prefetch: Option<sync::GroupSearch>,
    /// What is due when: batches, retries, full syncs, lookups.
    schedule: Schedule,
    /// Proids whose deletions the guard holds back, with how many.
    refused: BTreeMap<Proid, usize>,
    /// Changes whose Modify got no answer, by group: they may have been
    /// applied, which the next read of the group tells.
    unanswered: BTreeMap<crate::model::Dn, crate::plan::GroupChange>,
    /// Proid keys reported without a group.
    missing: BTreeSet<String>,
    /// The facts readiness is derived from.
    health: Health,
    /// Node mode and its container work.
    containers: Containers,
    /// Leader election, when replicas coordinate.
    election: Option<Election>,
    /// The role and term last acted on.
    leadership: Leadership,
    stopping: bool,
}

impl Daemon {
    fn new(config: RunConfig, metrics: Arc<Metrics>) -> Daemon {
        let index = Index::new(config.config.partition.clone())
            .with_host_ous(config.config.host_ous.clone());
        let groups = GroupCache::new(config.config.pattern.clone());
        let schedule = Schedule::new(
            config.batch_window,
            config.resync_interval,
            config.config.apply.backoff,
            Instant::now(),
        );
        Daemon {
            config,
            metrics,
            audit: Arc::new(Audit::log_only()),
            tree: Snapshot::default(),
            index,
            watching: Watching::new(),
            directory: None,
            groups,
            prefetch: None,
            schedule,
            refused: BTreeMap::new(),
            unanswered: BTreeMap::new(),
            missing: BTreeSet::new(),
            health: Health::default(),
            containers: Containers::new(),
            election: None,
            leadership: Leadership::default(),
            stopping: false,
        }
    }

    fn root(&self) -> std::path::PathBuf {
        match &self.config.config.fs_root {
            Some(root) => root.clone(),
            None => panic!("BUG: RunConfig is validated to have --fs-root"),
        }
    }

    async fn main(&mut self, mut shutdown: Shutdown<'_>) -> Result<(), DaemonError> {
        if !self.wait_for_tree(&mut shutdown).await {
            return Ok(());
        }
        self.watching.rescan_needed = Some(tree::STARTUP.into());
        while !self.stopping {
            // Watch before scanning so that nothing that changes during the
            // scan is lost; replaying what the scan already saw is harmless.
            if self.watching.changes.is_none() && !self.start_watcher(&mut shutdown).await? {
                continue;
            }
            if self.watching.rescan_needed.is_some() && Instant::now() >= self.watching.next_rescan
            {
                let why = self.watching.rescan_needed.clone().unwrap_or_default();
                self.rescan(&why, &mut shutdown).await;
                continue;
            }
            self.observe_role();
            if self.directory.is_none()
                && self.needs_directory()
                && !self.open_directory(&mut shutdown).await
            {
                continue;
            }
            if self.containers.node.is_none()
                && self.config.node.is_some()
                && !self.start_node(&mut shutdown).await?
            {
                continue;
            }
            if self.containers.node.is_some() && Instant::now() >= self.containers.next_cleanup {
                self.cleanup_containers();
            }
            if self.config.groups
                && self.is_leader()
                && self.schedule.full_sync_ready(Instant::now())
            {
                // A full sync compares the directory with the tree as it
                // is, not only as the events told it.
                if !self.watching.fresh {
                    self.rescan("full resync", &mut shutdown).await;
                    continue;
                }
                self.full_sync(&mut shutdown).await;
                continue;
            }
            if self.is_leader() {
                self.schedule.promote_due_retries(Instant::now());
            }
            // Nothing is reconciled piecemeal before one full sync has read
            // every group.
            let batch_ready =
                self.health.synced && self.is_leader() && self.schedule.batch_ready(Instant::now());
            if batch_ready {
                self.batch(&mut shutdown).await;
                continue;
            }
            self.wait(&mut shutdown).await;
        }
        self.stop_node_tasks().await;
        info!("stopped");
        Ok(())
    }

    /// Waits for the next thing to do: a change, a due batch, retry or
    /// resync, or shutdown.
    async fn wait(&mut self, shutdown: &mut Shutdown<'_>) {
        let writing = self.config.groups && self.is_leader();
        let groups = self.schedule.next_wake(writing, self.health.synced);
        let cleanup = Some(self.containers.next_cleanup).filter(|_| self.containers.node.is_some());
        let rescan = self
            .watching
            .rescan_needed
            .as_ref()
            .map(|_| self.watching.next_rescan);
        let wake = [groups, cleanup, rescan]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let Some(rx) = self.watching.changes.as_mut() else {
            panic!("BUG: the watcher is set up before the loop waits on it");
        };
        let roles = self.leadership.receiver();
        tokio::select! {
            _ = &mut *shutdown => self.stopping = true,
            change = rx.recv() => match change {
                Some(change) => self.on_change(change),
                None => self.watcher_failed("the watcher stopped".into()),
            },
            _ = role_changed(roles) => {}
            _ = sleep_until(wake) => {}
        }
    }

    /// Runs `fut` (directory I/O that borrows nothing of `self`) while
    /// taking tree changes; on shutdown gives it a grace period, then
    /// abandons it. `None` when abandoned.
    async fn drive<F: Future>(&mut self, fut: F, shutdown: &mut Shutdown<'_>) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        loop {
            let Some(rx) = self.watching.changes.as_mut() else {
                return Some(fut.await);
            };
            let roles = self.leadership.receiver();
            tokio::select! {
                out = &mut fut => return Some(out),
                change = rx.recv(), if !self.stopping => match change {
                    Some(change) => self.on_change(change),
                    None => self.watcher_failed("the watcher stopped".into()),
                },
                _ = role_changed(roles), if !self.stopping => {
                    if !self.still_leading() {
                        // Another replica may take over as soon as the
                        // session is gone: stop writing now.
                        warn!("lost the writer's lock: dropping in-flight work");
                        return None;
                    }
                }
                _ = &mut *shutdown, if !self.stopping => {
                    info!("shutdown: letting in-flight writes finish");
                    self.stopping = true;
                    return match tokio::time::timeout(SHUTDOWN_GRACE, &mut fut).await {
                        Ok(out) => Some(out),
                        Err(_) => {
                            warn!("shutdown: abandoning in-flight writes");
                            None
                        }
                    };
                }
            }
        }
    }
}
