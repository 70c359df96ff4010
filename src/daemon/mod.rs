//! The `run` event loop: wait for the tree, sync everything once, then
//! follow the tree and keep the groups right.
//!
//! One task owns all state; this module holds the loop and wires the
//! parts. The index turns tree changes into dirty proids; `schedule` says
//! when a batch, a retry or a full sync is due (an isolated change at
//! once, a burst coalesced for the batch window); `groups` caches the
//! groups a batch plans from; every batch and full sync is one pass of
//! [`crate::reconcile`], one Modify per group. Only one batch is in flight
//! at a time, so a group is never written by two reconciles at once, and
//! while a batch waits on the directory the loop keeps taking tree
//! changes; in the moment before a batch is due it leaves them queued for
//! it, to be woken once rather than for each. `leadership` follows the
//! election and derives readiness from the daemon's state. Failed groups
//! are retried with backoff and re-read first; a periodic full resync
//! re-reads every group and repairs whatever was edited by hand or missed.
//!
//! The parts: `start` (what the daemon runs on, why it stops with an
//! error, the setup before the loop), `tree` (waiting for the tree, the
//! watcher, its changes, rescans), `sync` (the directory: full syncs,
//! batches and what they applied, directory work driven while the loop
//! keeps taking changes), `schedule` (pure timing), `groups` (the group
//! cache), `leadership` (role, term, what a new role does, readiness),
//! `signals` and `node` (node mode, its file work on the blocking pool).
//! Every wait before trying again goes through
//! [`crate::backoff::Backoff`], on tokio's clock, so the tests run the
//! whole loop in paused time.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, Instant};
use tracing::info;

use crate::audit::Audit;
use crate::cli::RunConfig;
use crate::directory::Directory;
use crate::election::Election;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::model::Proid;
use crate::tree::Snapshot;

mod groups;
mod leadership;
mod node;
mod schedule;
mod signals;
mod start;
mod sync;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod tree;

pub use leadership::{DomainFactsError, NotReady, Waiting};
pub use signals::run_until_signalled;
pub use start::{DaemonError, Parts};

#[cfg(test)]
pub(crate) use start::NodeHook;

use groups::GroupCache;
use leadership::{role_changed, Health, Leadership};
use node::Containers;
use schedule::Schedule;
use tree::Watching;

/// How long before a batch is due the loop stops taking changes one by one
/// and leaves them queued for it (see [`Daemon::wait`]).
const GATHER: Duration = Duration::from_millis(100);
/// How long in-flight writes may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

type Shutdown<'a> = Pin<&'a mut (dyn Future<Output = ()> + Send)>;

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
    let mut daemon = Daemon::start(config, metrics, parts).await?;
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
    unanswered: BTreeMap<crate::model::Dn, sync::Unanswered>,
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
            // What came while the loop was busy or let the queue wait
            // (see `wait`), before deciding what is due.
            self.drain_changes(tree::DRAIN_PER_TURN);
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
    ///
    /// In the last [`GATHER`] before a batch is due, new changes wait in
    /// the queue for it, and the next turn of the loop takes them all at
    /// once: at a thousand changes a second, waking the loop for each was
    /// a large part of the daemon's CPU. Each is late from when the
    /// watcher read it and is scheduled as of then, so latency and
    /// batching are as if they had been taken one by one. Nothing waits
    /// longer than that: a watcher that failed or a rescan asked for is
    /// seen at most [`GATHER`] late, whatever the batch window. Not in
    /// node mode, whose containers are served at once, nor with changes
    /// already queued (taking them wakes nothing).
    async fn wait(&mut self, shutdown: &mut Shutdown<'_>) {
        let writing = self.config.groups && self.is_leader();
        let now = Instant::now();
        let batch = self
            .schedule
            .batch_due()
            .filter(|due| *due > now)
            .filter(|_| writing && self.health.synced && self.config.node.is_none());
        let queued = self
            .watching
            .changes
            .as_ref()
            .is_some_and(|rx| !rx.is_empty());
        let gathering = !queued && batch.is_some_and(|due| due <= now + GATHER);
        // Woken when the gathering begins.
        let gather = batch.map(|due| due - GATHER).filter(|at| *at > now);
        let groups = self.schedule.next_wake(writing, self.health.synced);
        let cleanup = Some(self.containers.next_cleanup).filter(|_| self.containers.node.is_some());
        let rescan = self
            .watching
            .rescan_needed
            .as_ref()
            .map(|_| self.watching.next_rescan);
        let wake = [groups, cleanup, rescan, gather]
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
            change = rx.recv(), if !gathering => match change {
                Some(change) => self.on_change(change),
                None => self.watcher_failed("the watcher stopped".into()),
            },
            _ = role_changed(roles) => {}
            _ = sleep_until(wake) => {}
        }
    }
}
