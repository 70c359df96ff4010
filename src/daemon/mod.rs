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
//! The tree watcher is trusted only while it works. Requests for a rescan
//! (queue overflows, doubts) are coalesced: one rescan at a time, the next
//! not before [`RESCAN_SPACING`] has passed, each covering every request
//! made before it started; a rescan re-reads only the groups of the proids
//! it changed. Every full resync starts with a rescan, so an event the
//! watcher never reported is repaired within one resync interval. A
//! watcher that fails or stops makes the daemon not ready, with the
//! reason, until a new one runs and its rescan is done.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, sleep_until, Instant};
use tracing::{debug, error, info, warn};

use crate::audit::Audit;
use crate::backoff::Backoff;
use crate::cli::RunConfig;
use crate::commands::{CommandError, EXIT_OK};
use crate::directory;
use crate::directory::Directory;
use crate::election::{self, Election, Role, RoleState};
use crate::index::Index;
use crate::metrics::{self, Metrics};
use crate::model::{Dn, Proid};
use crate::node::{GmsaProids, Node};
use crate::output::Report;
use crate::plan::Scope;
use crate::reconcile::{Cause, GroupResult, Pass};
use crate::tree::scan::{check_ready, scan, ScanError};
use crate::tree::watch::{watch, Change, TreeWatcher};
use crate::tree::{Snapshot, TreeEvent};

mod groups;
mod leadership;
mod node;
mod schedule;

use groups::GroupCache;
use leadership::{readiness, Health, Leadership, RoleChange};
use schedule::{Dirty, Schedule};

/// How long in-flight writes may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often the wait for `.modified` is logged.
const READY_LOG_EVERY: Duration = Duration::from_secs(30);
/// How often containers kept past `--retain` are looked for.
const CLEANUP_EVERY: Duration = Duration::from_secs(60);
/// How often the tree is polled while it is not usable.
const TREE_POLL: Backoff = Backoff::fixed(Duration::from_millis(500));
/// A rescan starts at least this long after the last one finished, so a
/// storm of overflows costs a rescan a second at most while the events
/// that were not lost keep flowing.
const RESCAN_SPACING: Duration = Duration::from_secs(1);
/// How long to wait before trying again to start a watcher that failed.
const WATCHER_RETRY: Backoff = Backoff::fixed(Duration::from_secs(2));
/// How long to wait before trying again to open the directory, read the
/// domain's facts or read every group after a transient failure.
const RETRY_LATER: Backoff = Backoff::fixed(Duration::from_secs(10));
/// At most this many queued changes are taken before a rescan starts; the
/// rest wait for the rescan, which sees them anyway.
const DRAIN_BEFORE_RESCAN: usize = 100_000;

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

/// Runs until SIGINT or SIGTERM; a second signal exits at once.
pub async fn run_until_signalled(config: RunConfig) -> Result<u8, CommandError> {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let mut signals = 0;
        loop {
            wait_for_signal().await;
            signals += 1;
            if signals == 1 {
                info!("signal received: shutting down");
                let _ = tx.send(()).await;
            } else {
                warn!("second signal: exiting at once");
                std::process::exit(1);
            }
        }
    });
    let shutdown = async move {
        let _ = rx.recv().await;
    };
    run(config, Arc::new(Metrics::new()), shutdown).await?;
    Ok(EXIT_OK)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

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
}

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
        Some(path) => Audit::open(Some(path), crate::cli::replica_name(replica.as_deref()))?,
        None => Audit::log_only(),
    };
    let mut daemon = Daemon::new(config, metrics);
    daemon.audit = Arc::new(audit);
    daemon.directory = parts.directory;
    daemon.given_changes = parts.changes;
    if let Some(election) = election {
        daemon.leadership = Leadership::new(Some(election.subscribe()));
        daemon.election = Some(election);
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
    tree: Snapshot,
    index: Index,
    changes: Option<mpsc::UnboundedReceiver<Change>>,
    /// Changes handed in to follow in place of the first watcher.
    given_changes: Option<mpsc::UnboundedReceiver<Change>>,
    watcher: Option<TreeWatcher>,
    directory: Option<Arc<dyn Directory>>,
    /// The groups as last read or written.
    groups: GroupCache,
    /// What is due when: batches, retries, full syncs, lookups.
    schedule: Schedule,
    /// Proids whose deletions the guard holds back, with how many.
    refused: BTreeMap<Proid, usize>,
    /// Proid keys reported without a group.
    missing: BTreeSet<String>,
    rescan_needed: Option<String>,
    /// No rescan starts before this.
    next_rescan: Instant,
    /// The tree was rescanned since the last full sync started.
    tree_fresh: bool,
    /// A watcher ran once already (so a failure to start one is retried).
    watcher_started: bool,
    /// The facts readiness is derived from.
    health: Health,
    /// Node mode, once started.
    node: Option<Node>,
    /// Node start-up and other untracked container work.
    node_tasks: JoinSet<()>,
    /// The last operation queued per instance, so the next one waits for it.
    node_chains: HashMap<String, JoinHandle<()>>,
    next_cleanup: Instant,
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
            changes: None,
            given_changes: None,
            watcher: None,
            directory: None,
            groups,
            schedule,
            refused: BTreeMap::new(),
            missing: BTreeSet::new(),
            rescan_needed: None,
            next_rescan: Instant::now(),
            tree_fresh: false,
            watcher_started: false,
            health: Health::default(),
            node: None,
            node_tasks: JoinSet::new(),
            node_chains: HashMap::new(),
            next_cleanup: Instant::now(),
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
        self.rescan_needed = Some("startup".into());
        while !self.stopping {
            // Watch before scanning so that nothing that changes during the
            // scan is lost; replaying what the scan already saw is harmless.
            if self.changes.is_none() && !self.start_watcher(&mut shutdown).await? {
                continue;
            }
            if self.rescan_needed.is_some() && Instant::now() >= self.next_rescan {
                let why = self.rescan_needed.clone().unwrap_or_default();
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
            if self.node.is_none()
                && self.config.node.is_some()
                && !self.start_node(&mut shutdown).await?
            {
                continue;
            }
            if self.node.is_some() && Instant::now() >= self.next_cleanup {
                self.cleanup_containers();
            }
            if self.config.groups
                && self.is_leader()
                && self.schedule.full_sync_ready(Instant::now())
            {
                // A full sync compares the directory with the tree as it
                // is, not only as the events told it.
                if !self.tree_fresh {
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

    /// True when this replica may write.
    fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    /// True while the leadership this replica last acted on lasts.
    fn still_leading(&self) -> bool {
        self.leadership.still_leading()
    }

    /// Acts on a change of role or of the ZooKeeper connection: a new
    /// leadership starts with a full sync; a follower keeps its index warm
    /// and writes nothing; a replica cut off from ZooKeeper is not ready.
    fn observe_role(&mut self) {
        let Some(change) = self.leadership.observe() else {
            return;
        };
        match change {
            RoleChange::Leader { term, why, first } => {
                self.metrics.set_role(Role::Leader.as_str());
                info!(term, why = %why, "leader: writing from now on, starting with a full sync");
                self.schedule.full_sync_now(Instant::now());
                // A follower followed events only; the startup scan is
                // fresh enough for a replica that leads from the start.
                if !first {
                    self.tree_fresh = false;
                }
                self.health.synced = false;
                self.health.applied = false;
            }
            RoleChange::Follower { why } => {
                self.metrics.set_role(Role::Follower.as_str());
                info!(why = %why, "follower: following the tree, writing nothing");
                self.schedule.stop_writing();
                self.health.synced = false;
                self.health.applied = false;
            }
            RoleChange::Connection => {}
        }
        self.publish_ready();
    }

    /// Starts the tree watcher. The first start failing is a startup
    /// error; a restart failing is retried, not ready meanwhile. False when
    /// the caller should loop (no watcher yet, or shut down).
    async fn start_watcher(&mut self, shutdown: &mut Shutdown<'_>) -> Result<bool, DaemonError> {
        if let Some(rx) = self.given_changes.take() {
            self.watcher_started = true;
            self.changes = Some(rx);
            return Ok(true);
        }
        match watch(&self.root()) {
            Ok((watcher, rx)) => {
                if self.watcher_started {
                    info!("tree watcher restarted; rescanning");
                    self.metrics.watcher_restarts.inc();
                    self.rescan_needed
                        .get_or_insert_with(|| "the watcher restarted".into());
                    self.next_rescan = Instant::now();
                }
                self.watcher_started = true;
                self.watcher = Some(watcher);
                self.changes = Some(rx);
                Ok(true)
            }
            Err(err) if !self.watcher_started => Err(DaemonError::Watcher(err)),
            Err(err) => {
                let fault = format!("cannot restart it: {err}");
                if self.health.watcher.as_deref() != Some(fault.as_str()) {
                    warn!(error = %err, "cannot restart the tree watcher; retrying");
                    self.health.watcher = Some(fault);
                    self.publish_ready();
                }
                tokio::select! {
                    _ = &mut *shutdown => self.stopping = true,
                    _ = sleep(WATCHER_RETRY.delay(0)) => {}
                }
                Ok(false)
            }
        }
    }

    /// The watcher failed or stopped: not ready (with why) until a new one
    /// runs and has rescanned.
    fn watcher_failed(&mut self, why: String) {
        warn!(why = %why, "the tree watcher failed; restarting it with a rescan");
        self.changes = None;
        self.watcher = None;
        self.rescan_needed = Some(format!("the watcher failed: {why}"));
        self.next_rescan = Instant::now();
        self.health.watcher = Some(why);
        self.publish_ready();
    }

    /// Shows on `/readyz` the readiness the daemon's state makes.
    fn publish_ready(&self) {
        let ready = readiness(&self.health, &self.leadership, self.config.groups);
        self.metrics.set_ready(ready);
    }

    /// Takes the changes already queued (at most [`DRAIN_BEFORE_RESCAN`]).
    fn drain_changes(&mut self) {
        for _ in 0..DRAIN_BEFORE_RESCAN {
            let Some(rx) = self.changes.as_mut() else {
                return;
            };
            match rx.try_recv() {
                Ok(change) => self.on_change(change),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.watcher_failed("the watcher stopped".into());
                    return;
                }
            }
        }
    }

    /// The directory is needed for groups, and in node mode for membership
    /// checks and domain facts.
    fn needs_directory(&self) -> bool {
        self.config.groups
            || self.config.node.as_ref().is_some_and(|n| {
                n.gmsa_proids == GmsaProids::GroupExists
                    || n.wait_for_group.is_some()
                    || (n.domain.is_none() && n.gmsa_proids != GmsaProids::None)
            })
    }

    /// Waits for `.modified`; false when shut down meanwhile.
    async fn wait_for_tree(&mut self, shutdown: &mut Shutdown<'_>) -> bool {
        let root = self.root();
        let mut next_log = Instant::now();
        let mut last_reason = String::new();
        loop {
            // A root that is not there is named as such: a wrong path must
            // not pass for a mirror that has yet to finish.
            let reason = match check_ready(&root) {
                Ok(()) => {
                    self.health.tree = None;
                    self.publish_ready();
                    return true;
                }
                Err(ScanError::NotReady { .. }) => {
                    "waiting for the placement tree (.modified)".to_owned()
                }
                Err(err) => format!("placement tree: {err}"),
            };
            if Instant::now() >= next_log || reason != last_reason {
                info!(path = %root.display(), "{reason}; waiting for the placement tree to be ready");
                next_log = Instant::now() + READY_LOG_EVERY;
            }
            self.health.tree = Some(reason.clone());
            self.publish_ready();
            last_reason = reason;
            tokio::select! {
                _ = &mut *shutdown => return false,
                _ = sleep(TREE_POLL.delay(0)) => {}
            }
        }
    }

    /// Waits for the next thing to do: a change, a due batch, retry or
    /// resync, or shutdown.
    async fn wait(&mut self, shutdown: &mut Shutdown<'_>) {
        let writing = self.config.groups && self.is_leader();
        let groups = self.schedule.next_wake(writing, self.health.synced);
        let cleanup = Some(self.next_cleanup).filter(|_| self.node.is_some());
        let rescan = self.rescan_needed.as_ref().map(|_| self.next_rescan);
        let wake = [groups, cleanup, rescan]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let Some(rx) = self.changes.as_mut() else {
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
            let Some(rx) = self.changes.as_mut() else {
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

    fn on_change(&mut self, change: Change) {
        match change {
            Change::Rescan(why) => {
                // Coalesced: one pending rescan covers every request.
                self.metrics.rescan_requests.inc();
                if self.rescan_needed.is_none() {
                    debug!(why, "rescan requested");
                    self.rescan_needed = Some(why);
                }
            }
            Change::Failed(why) => self.watcher_failed(why),
            Change::Tree(event) => {
                debug!(?event, "tree change");
                self.on_event(&event, Instant::now());
            }
        }
    }

    fn on_event(&mut self, event: &TreeEvent, at: Instant) {
        self.on_tree_event(event, at);
        self.tree.apply(event);
    }

    /// What a change in the tree means for node mode, the index and the
    /// next batch; the proids it dirtied. Keeping `self.tree` up to date is
    /// the caller's.
    fn on_tree_event(&mut self, event: &TreeEvent, at: Instant) -> Vec<Proid> {
        self.node_event(event);
        if let TreeEvent::ServerUpserted {
            info: Err(why),
            host,
        } = event
        {
            self.metrics.server_file_errors.inc();
            debug!(%host, why, "server file not usable");
        }
        let applied = self.index.apply(event);
        if let Some(warning) = applied.warning {
            warn!("{warning}");
        }
        if applied.resync {
            self.schedule.full_sync_now(Instant::now());
        }
        let dirty: Vec<Proid> = applied.dirty.into_iter().collect();
        for proid in &dirty {
            self.mark_dirty(proid.clone(), at);
        }
        dirty
    }

    /// Marks a proid for the next batch (the schedule says when).
    fn mark_dirty(&mut self, proid: Proid, at: Instant) {
        self.schedule.mark_dirty(proid, at, Instant::now());
        self.metrics
            .dirty_groups
            .set(self.schedule.dirty_len() as i64);
    }

    fn update_gauges(&self) {
        let stats = self.index.stats();
        self.metrics
            .servers_in_scope
            .set(stats.servers_in_scope as i64);
        self.metrics.placements.set(stats.placements as i64);
        self.metrics.proids.set(stats.proids as i64);
        self.metrics
            .dirty_groups
            .set(self.schedule.dirty_len() as i64);
        self.metrics.missing_groups.set(self.missing.len() as i64);
        self.metrics
            .refused_deletions_pending
            .set(self.refused.values().sum::<usize>() as i64);
    }

    /// Reads the whole tree and applies what differs from what the events
    /// said; the groups of the proids that changed are re-read before they
    /// are planned, and only those. A tree that can't be read stops all
    /// writing until it can, and is then compared in full. False when shut
    /// down meanwhile.
    async fn rescan(&mut self, why: &str, shutdown: &mut Shutdown<'_>) -> bool {
        // What is queued was noticed before this scan starts, so the scan
        // covers it, rescan requests included: they need no rescan of their own.
        self.drain_changes();
        if self.changes.is_none() {
            // The watcher failed meanwhile: a new one first, then the scan.
            return true;
        }
        self.rescan_needed = None;
        info!(why, "scanning the placement tree");
        let root = self.root();
        let mut logged = false;
        loop {
            let scanned = tokio::task::spawn_blocking({
                let root = root.clone();
                move || scan(&root)
            })
            .await;
            match scanned {
                Ok(Ok(snapshot)) => {
                    for warning in &snapshot.warnings {
                        warn!("{warning}");
                    }
                    if let Some(warning) = snapshot.partition_warning(&self.config.config.partition)
                    {
                        warn!("{warning}");
                    }
                    // The events are the difference from `self.tree`, each
                    // about a different file, so none depends on another:
                    // the tree is replaced at the end rather than updated
                    // for each (at startup, that is every placement).
                    let now = Instant::now();
                    let mut changed = BTreeSet::new();
                    for event in self.tree.diff(&snapshot) {
                        changed.extend(self.on_tree_event(&event, now));
                    }
                    self.tree.replace_with(snapshot);
                    // What the events missed the cached groups may be
                    // wrong about too: those groups are read again, the
                    // others are not.
                    for proid in &changed {
                        self.groups.mark_proid_stale(&proid.key());
                    }
                    self.update_gauges();
                    if why != "startup" {
                        self.metrics.rescans.inc();
                    }
                    self.tree_fresh = true;
                    self.next_rescan = Instant::now() + RESCAN_SPACING;
                    if logged {
                        info!("placement tree readable again");
                        // Nothing was compared while it was not: compare everything.
                        self.schedule.full_sync_now(Instant::now());
                    }
                    if self.health.watcher.take().is_some() {
                        info!("tree watcher running again");
                    }
                    self.publish_ready();
                    return true;
                }
                Ok(Err(err)) => {
                    if !logged {
                        error!(error = %err, "placement tree unusable; not writing until it is");
                        logged = true;
                    }
                    self.health.tree = Some(format!("placement tree unusable: {err}"));
                    self.publish_ready();
                }
                Err(join) => panic!("BUG: the tree scan panicked: {join}"),
            }
            tokio::select! {
                _ = &mut *shutdown => { self.stopping = true; return false; }
                _ = sleep(TREE_POLL.delay(0)) => {}
            }
        }
    }

    async fn open_directory(&mut self, shutdown: &mut Shutdown<'_>) -> bool {
        let dcs = self.index.dcs();
        match directory::open(&self.config.config.directory, &dcs) {
            Ok(dir) => {
                self.directory = Some(Arc::from(dir));
                self.health.waiting = None;
                self.publish_ready();
                true
            }
            Err(err) => {
                error!(error = %err, "cannot open the directory; retrying");
                self.not_ready_for_a_while(format!("directory: {err}"), shutdown)
                    .await;
                false
            }
        }
    }

    /// Reports not ready and waits before the caller tries again.
    async fn not_ready_for_a_while(&mut self, reason: String, shutdown: &mut Shutdown<'_>) {
        self.health.waiting = Some(reason);
        self.publish_ready();
        tokio::select! {
            _ = &mut *shutdown => self.stopping = true,
            _ = sleep(RETRY_LATER.delay(0)) => {}
        }
    }

    fn directory(&self) -> Arc<dyn Directory> {
        match &self.directory {
            Some(dir) => dir.clone(),
            None => panic!("BUG: the directory is opened before any batch"),
        }
    }

    /// Re-reads every group and reconciles every proid.
    async fn full_sync(&mut self, shutdown: &mut Shutdown<'_>) {
        self.metrics.resyncs.inc();
        self.tree_fresh = false;
        let ou = self.group_ou();
        let dir = self.directory();
        let search = async move { dir.search_groups(&ou).await };
        let Some(found) = self.drive(search, shutdown).await else {
            return;
        };
        let groups = match found {
            Ok(groups) => {
                self.health.groups_read = None;
                groups
            }
            Err(err) => {
                warn!(error = %err, "reading the groups failed; retrying");
                let delay = if err.is_transient() {
                    RETRY_LATER.delay(0)
                } else {
                    self.config.resync_interval.min(Duration::from_secs(60))
                };
                self.schedule.full_sync_failed(Instant::now(), delay);
                self.health.groups_read = Some(err.to_string());
                self.publish_ready();
                return;
            }
        };
        // Planned from the groups as read, before they move into the cache,
        // rather than from a copy of the whole cache (MBs at cluster scale).
        let mut pass = Pass::prepare(
            Cause::FullSync,
            &self.index,
            &groups,
            &self.config.config.pattern,
            Scope::All,
            &self.config.config.guard,
        );
        // A group whose members moved since the daemon last wrote or read
        // it was edited by someone else: its repair is drift.
        for change in &pass.plan.changes {
            let read = groups.iter().find(|g| g.dn == change.group_dn);
            if read.is_some_and(|group| self.groups.drifted(group)) {
                pass.causes.insert(change.proid.clone(), Cause::Drift);
            }
        }
        self.groups.reset(groups);
        self.health.synced = true;
        // Every proid is compared now; what was dirty is covered, but keep
        // the latency clocks of those that change.
        let clocks = self.schedule.full_sync_started();
        self.missing = pass
            .plan
            .missing_groups
            .iter()
            .map(|m| m.proid.key())
            .collect();
        self.refused.clear();
        let retiring = self
            .index
            .retiring_proids()
            .into_iter()
            .map(|p| {
                let dns = self.index.retiring(&p);
                (p, dns)
            })
            .collect();
        let complete = self.apply(pass, &clocks, retiring, shutdown).await;
        if complete.is_some() {
            self.metrics.last_full_sync.set(metrics::unix_now());
            if !self.health.applied || self.health.tree.is_some() {
                info!("initial sync applied; ready");
            }
            self.health.applied = true;
            // A tree that was unusable is trusted again once compared in full.
            self.health.tree = None;
            self.publish_ready();
        }
        self.schedule.full_sync_done(Instant::now());
        self.update_gauges();
    }

    /// Before planning these proids: re-reads their groups that failed
    /// before (the cache may be wrong about them), and looks up the group of
    /// a proid that has none yet (it may have been created since the last
    /// full sync; looked up at most once a minute per proid). False when
    /// abandoned at shutdown.
    async fn refresh_groups(
        &mut self,
        proids: &BTreeSet<Proid>,
        shutdown: &mut Shutdown<'_>,
    ) -> bool {
        let now = Instant::now();
        let mut reads: Vec<Dn> = Vec::new();
        let mut lookups: Vec<(String, String)> = Vec::new();
        for proid in proids {
            let key = proid.key();
            match self.groups.dns_of(&key) {
                [] if !self.index.desired(proid).is_empty() => {
                    if self.schedule.lookup_due(&key, now) {
                        lookups.push((key, self.config.config.pattern.render(proid)));
                    }
                }
                [] => {}
                _ => reads.extend(self.groups.stale_of(&key)),
            }
        }
        if reads.is_empty() && lookups.is_empty() {
            return true;
        }
        self.metrics.group_reads.inc_by(reads.len() as u64);
        let dir = self.directory();
        let ou = self.group_ou();
        let io = async move {
            let mut read = Vec::new();
            for dn in reads {
                let result = dir.read_group(&dn).await;
                read.push((dn, result));
            }
            let mut found = Vec::new();
            for (key, name) in lookups {
                let result = dir.find_group(&ou, &name).await;
                found.push((key, result));
            }
            (read, found)
        };
        let Some((read, found)) = self.drive(io, shutdown).await else {
            return false;
        };
        for (dn, result) in read {
            match result {
                Ok(Some(group)) => self.groups.insert(group),
                Ok(None) => {
                    warn!(group = %dn, "group vanished");
                    self.groups.forget(&dn);
                }
                Err(err) => warn!(group = %dn, error = %err, "re-reading the group failed"),
            }
        }
        for (key, result) in found {
            match result {
                Ok(Some(group)) => {
                    info!(group = %group.dn, "found a group created since the last full sync");
                    self.schedule.found(&key);
                    self.groups.insert(group);
                }
                Ok(None) => {}
                Err(err) => warn!(error = %err, "looking up a missing group failed"),
            }
        }
        true
    }

    fn group_ou(&self) -> Dn {
        match self.config.config.require_group_ou() {
            Ok(ou) => ou.clone(),
            Err(err) => panic!("BUG: RunConfig is validated to have --group-ou: {err}"),
        }
    }

    /// Reconciles the dirty proids.
    async fn batch(&mut self, shutdown: &mut Shutdown<'_>) {
        let clocks = self.schedule.take_batch();
        let proids: BTreeSet<Proid> = clocks.keys().cloned().collect();
        let keys: BTreeSet<String> = proids.iter().map(Proid::key).collect();

        if !self.refresh_groups(&proids, shutdown).await {
            self.schedule.finished();
            return;
        }

        let groups = self.groups.groups_of(&keys);
        let mut pass = Pass::prepare(
            Cause::Event,
            &self.index,
            &groups,
            &self.config.config.pattern,
            Scope::Only(&proids),
            &self.config.config.guard,
        );
        for proid in &proids {
            if self.schedule.failures(proid) > 0 {
                pass.causes.insert(proid.clone(), Cause::Retry);
            }
        }
        for key in &keys {
            self.missing.remove(key);
        }
        self.missing
            .extend(pass.plan.missing_groups.iter().map(|m| m.proid.key()));
        for proid in &proids {
            self.refused.remove(proid);
        }
        let retiring = proids
            .iter()
            .map(|p| (p.clone(), self.index.retiring(p)))
            .collect();
        self.apply(pass, &clocks, retiring, shutdown).await;
        self.schedule.finished();
        self.update_gauges();
    }

    /// Applies a plan (deletions held back when the guard refuses them),
    /// records the results, and forgets the retiring DNs of the proids in
    /// `retiring` that are now fully reconciled. `None` when abandoned at
    /// shutdown, otherwise whether everything was applied.
    async fn apply(
        &mut self,
        pass: Pass,
        clocks: &Dirty,
        retiring: BTreeMap<Proid, BTreeSet<Dn>>,
        shutdown: &mut Shutdown<'_>,
    ) -> Option<bool> {
        let unfinished = self.apply_pass(pass, clocks, shutdown).await?;
        for (proid, dns) in retiring {
            if unfinished.contains(&proid) {
                continue;
            }
            // Reconciled (or nothing to do): no retry pending any more.
            self.schedule.succeeded(&proid);
            if !self.refused.contains_key(&proid) {
                self.index.clear_retiring(&proid, &dns);
            }
        }
        Some(unfinished.is_empty())
    }

    /// Applies a pass; `None` when abandoned, otherwise the proids not fully applied.
    async fn apply_pass(
        &mut self,
        mut pass: Pass,
        clocks: &Dirty,
        shutdown: &mut Shutdown<'_>,
    ) -> Option<BTreeSet<Proid>> {
        if let Some(refusal) = &pass.refused {
            self.metrics.guard_refusals.inc();
            info!("additions are applied; the refused deletions stay pending");
            for change in &refusal.changes {
                self.refused
                    .insert(change.proid.clone(), change.delete.len());
            }
        }
        if pass.plan.changes.is_empty() {
            return Some(BTreeSet::new());
        }
        let dry_run = self.config.dry_run;
        if dry_run {
            let report = Report {
                verb: "run --dry-run",
                plan: pass.plan.clone(),
                ..Report::default()
            };
            print!("{}", report.render(self.config.config.format));
        }
        let dir = self.directory();
        let options = self.config.config.apply;
        let metrics = self.metrics.clone();
        let audit = self.audit.clone();
        let io = async move {
            let recorder = (metrics.as_ref(), audit.as_ref());
            pass.apply(dir.as_ref(), &options, dry_run, &recorder).await;
            pass
        };
        let pass = self.drive(io, shutdown).await?;
        Some(self.record(pass.results, clocks))
    }

    /// Updates the cache and retries from a batch's results (the pass
    /// recorded them in the metrics);
    /// returns the proids not fully applied.
    fn record(&mut self, results: Vec<GroupResult>, clocks: &Dirty) -> BTreeSet<Proid> {
        let now = Instant::now();
        let mut unfinished = BTreeSet::new();
        for result in results {
            let dn = result.planned.group_dn.clone();
            let proid = result.planned.proid.clone();
            if result.vanished {
                self.groups.forget(&dn);
                continue;
            }
            self.groups.applied(&result.applied);
            if result.failed.is_some() {
                unfinished.insert(proid.clone());
                self.groups.mark_stale(dn);
                self.schedule.failed(proid, now);
            } else {
                self.schedule.succeeded(&proid);
                if let Some(started) = clocks.get(&proid) {
                    let latency = now.saturating_duration_since(*started);
                    self.metrics.event_to_applied.observe(latency.as_secs_f64());
                    debug!(
                        proid = %proid,
                        group = %dn,
                        latency_ms = latency.as_secs_f64() * 1000.0,
                        "change applied"
                    );
                }
            }
        }
        unfinished
    }
}

/// Completes when the role changes; never when there is no election.
async fn role_changed(roles: Option<&mut watch::Receiver<RoleState>>) {
    match roles {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{self, Command};
    use crate::directory::memory::{Flavour, MemoryDirectory};
    use crate::directory::Group;
    use crate::ldif::Record;
    use crate::model::HostName;

    /// The configuration of a daemon on `root`, with `extra` options; the
    /// directory file beside the tree is never opened.
    fn run_config(root: &std::path::Path, extra: &[&str]) -> RunConfig {
        let directory = root.with_extension("ldif");
        let mut argv = vec![
            "gmsa-reconciler".to_owned(),
            "run".to_owned(),
            format!("--fs-root={}", root.display()),
            format!("--directory={}", directory.display()),
            "--group-ou=OU=Groups,DC=ad,DC=com".to_owned(),
            "--partition=p1".to_owned(),
            "--no-lock".to_owned(),
        ];
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        match cli::parse(argv).expect("parse").command {
            Command::Run(args) => RunConfig::from_args(&args).expect("valid"),
            other => panic!("expected run, got {other:?}"),
        }
    }

    fn daemon(root: &std::path::Path) -> Daemon {
        Daemon::new(run_config(root, &[]), Arc::new(Metrics::new()))
    }

    const WEB: &str = "CN=web-gmsa-hosts,OU=Groups,DC=ad,DC=com";
    const DB: &str = "CN=db-gmsa-hosts,OU=Groups,DC=ad,DC=com";
    const H1: &str = "CN=h1,DC=ad,DC=com";

    /// An in-memory directory holding the `web` and `db` groups, empty.
    fn memory_directory() -> Arc<MemoryDirectory> {
        let record = |dn: &str, name: &str| Record {
            dn: dn.into(),
            attrs: vec![
                ("objectClass".to_owned(), "group".to_owned()),
                ("sAMAccountName".to_owned(), name.to_owned()),
            ],
        };
        Arc::new(MemoryDirectory::new(
            vec![record(WEB, "web-gmsa-hosts"), record(DB, "db-gmsa-hosts")],
            Flavour::Permissive,
        ))
    }

    async fn members(dir: &MemoryDirectory, group: &str) -> BTreeSet<Dn> {
        dir.read_group(&Dn::parse(group).expect("dn"))
            .await
            .expect("read")
            .expect("group")
            .members
    }

    /// Waits (in real time, at most a minute) until `done` holds.
    async fn until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
        for _ in 0..600 {
            if done().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    /// A daemon running on the in-memory directory and a channel standing
    /// for the watcher.
    struct Harness {
        dir: Arc<MemoryDirectory>,
        metrics: Arc<Metrics>,
        changes: mpsc::UnboundedSender<Change>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: JoinHandle<Result<(), DaemonError>>,
    }

    impl Harness {
        fn start(root: &std::path::Path, extra: &[&str]) -> Harness {
            let dir = memory_directory();
            let metrics = Arc::new(Metrics::new());
            let (changes, rx) = mpsc::unbounded_channel();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let parts = Parts {
                directory: Some(dir.clone()),
                changes: Some(rx),
            };
            let task = tokio::spawn(run_on(
                run_config(root, extra),
                metrics.clone(),
                parts,
                async move {
                    let _ = stopped.await;
                },
            ));
            Harness {
                dir,
                metrics,
                changes,
                stop: Some(stop),
                task,
            }
        }

        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            self.task.await.expect("joined").expect("clean stop");
        }
    }

    #[tokio::test]
    async fn an_isolated_change_is_applied_at_once_not_after_the_window() {
        let (_guard, root) = tree();
        fill(&root);
        // A window far longer than the test may take: only the idle fast
        // path can apply the change in time.
        let h = Harness::start(&root, &["--batch-window=1h"]);
        until("the initial sync", || async { h.metrics.is_ready() }).await;
        assert_eq!(
            members(&h.dir, WEB).await,
            [Dn::parse(H1).expect("dn")].into()
        );

        h.changes
            .send(Change::Tree(TreeEvent::PlacementAdded {
                host: HostName::new("h1").expect("host"),
                instance: "db.app#1".into(),
            }))
            .expect("send");
        until("the isolated change applied", || async {
            !members(&h.dir, DB).await.is_empty()
        })
        .await;
        h.stop().await;
    }

    #[tokio::test]
    async fn a_resync_finds_drift_and_repairs_it() {
        let (_guard, root) = tree();
        fill(&root);
        let h = Harness::start(&root, &["--resync-interval=1s"]);
        until("the initial sync", || async { h.metrics.is_ready() }).await;
        let h1 = Dn::parse(H1).expect("dn");
        // Someone removes the host by hand; no tree change says so.
        h.dir
            .modify_members(
                &Dn::parse(WEB).expect("dn"),
                &crate::directory::MemberChange {
                    add: vec![],
                    delete: vec![h1.clone()],
                },
            )
            .await
            .expect("manual edit");
        assert!(members(&h.dir, WEB).await.is_empty());
        until("the resync repaired the drift", || async {
            members(&h.dir, WEB).await.contains(&h1)
        })
        .await;
        assert!(h.metrics.resyncs.get() >= 2);
        h.stop().await;
    }

    #[tokio::test]
    async fn modified_going_away_stops_writes_until_it_is_back() {
        let (_guard, root) = tree();
        fill(&root);
        let h = Harness::start(&root, &[]);
        until("the initial sync", || async { h.metrics.is_ready() }).await;

        std::fs::remove_file(root.join(".modified")).expect("rm .modified");
        std::fs::write(root.join("placement/h1/db.app#1"), "{}").expect("placement");
        h.changes
            .send(Change::Rescan("doubt".into()))
            .expect("send");
        until("not ready", || async { !h.metrics.is_ready() }).await;
        let (_, body) = h.metrics.readiness();
        assert!(body.contains("placement tree unusable"), "{body}");
        assert!(
            members(&h.dir, DB).await.is_empty(),
            "nothing written from a tree that is not ready"
        );

        std::fs::write(root.join(".modified"), "").expect(".modified");
        until("the change applied once the tree is back", || async {
            !members(&h.dir, DB).await.is_empty()
        })
        .await;
        until("ready again", || async { h.metrics.is_ready() }).await;
        h.stop().await;
    }

    /// A tree with one host in scope running `web`, and an empty directory
    /// file at `<tree>.ldif`; both go with the returned guard.
    fn tree() -> (tempfile::TempDir, std::path::PathBuf) {
        let parent = tempfile::tempdir().expect("tmp");
        let root = parent.path().join("tree");
        std::fs::write(root.with_extension("ldif"), "version: 1\n").expect("directory");
        (parent, root)
    }

    fn fill(root: &std::path::Path) {
        for sub in ["servers", "placement/h1"] {
            std::fs::create_dir_all(root.join(sub)).expect("mkdir");
        }
        std::fs::write(root.join(".modified"), "").expect(".modified");
        std::fs::write(
            root.join("servers/h1"),
            "partition: p1\nnt.dc: dc\nnt.dn: CN=h1,DC=ad,DC=com\n",
        )
        .expect("server");
        std::fs::write(root.join("placement/h1/web.app#1"), "{}").expect("placement");
    }

    fn group(name: &str) -> Group {
        Group {
            dn: Dn::parse(&format!("CN={name},OU=Groups,DC=ad,DC=com")).expect("dn"),
            sam_account_name: name.to_owned(),
            members: BTreeSet::new(),
        }
    }

    #[test]
    fn rescan_requests_are_coalesced() {
        let (_guard, root) = tree();
        let mut d = daemon(&root);
        d.on_change(Change::Rescan("overflow 1".into()));
        d.on_change(Change::Rescan("overflow 2".into()));
        assert_eq!(d.rescan_needed.as_deref(), Some("overflow 1"));
        assert_eq!(d.metrics.rescan_requests.get(), 2);
        assert_eq!(d.metrics.rescans.get(), 0, "requests are not rescans");
    }

    #[test]
    fn a_watcher_whose_thread_ended_is_a_failed_watcher() {
        let (_guard, root) = tree();
        let mut d = daemon(&root);
        d.health.synced = true;
        d.health.applied = true;
        d.publish_ready();
        let (tx, rx) = mpsc::unbounded_channel();
        d.changes = Some(rx);
        tx.send(Change::Rescan("overflow".into())).expect("send");
        drop(tx);
        d.drain_changes();
        assert!(d.changes.is_none(), "the watcher is to be replaced");
        let (_, body) = d.metrics.readiness();
        assert!(body.contains("tree watcher: the watcher stopped"), "{body}");
        assert_eq!(
            d.metrics.rescan_requests.get(),
            1,
            "what it sent first is kept"
        );
    }

    #[tokio::test]
    async fn a_failed_watcher_is_not_ready_until_its_rescan_and_the_rescan_reads_only_what_changed()
    {
        let (_guard, root) = tree();
        fill(&root);
        let mut d = daemon(&root);
        d.groups.insert(group("web-gmsa-hosts"));
        d.groups.insert(group("db-gmsa-hosts"));
        d.health.synced = true;
        d.health.applied = true;
        d.publish_ready();
        assert!(d.metrics.is_ready());

        d.on_change(Change::Failed("the notifier failed: boom".into()));
        assert!(d.changes.is_none(), "the failed watcher is dropped");
        assert!(d.rescan_needed.is_some(), "a rescan follows the restart");
        // Whatever else says ready, the watcher fault holds.
        d.publish_ready();
        assert!(!d.metrics.is_ready());
        let (_, body) = d.metrics.readiness();
        assert!(
            body.contains("tree watcher: the notifier failed: boom"),
            "{body}"
        );

        // A new watcher (here a channel standing for one), then the rescan.
        let (_tx, rx) = mpsc::unbounded_channel();
        d.changes = Some(rx);
        let mut never = std::pin::pin!(std::future::pending::<()>());
        let mut shutdown: Shutdown<'_> = never.as_mut();
        assert!(d.rescan("the watcher restarted", &mut shutdown).await);
        assert!(d.metrics.is_ready(), "ready again after the rescan");
        assert_eq!(d.metrics.rescans.get(), 1);
        let web = group("web-gmsa-hosts").dn;
        assert_eq!(
            d.groups.stale(),
            vec![&web],
            "only the group of the proid the rescan changed is re-read"
        );
        assert!(
            d.tree_fresh,
            "the next full sync needs no rescan of its own"
        );
    }
}
