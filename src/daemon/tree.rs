//! The tree side of the daemon: waiting for the tree, the watcher and its
//! restarts, the changes it reports, and rescans.
//!
//! The tree watcher is trusted only while it works. Requests for a rescan
//! (queue overflows, doubts) are coalesced: one rescan at a time, the next
//! not before [`RESCAN_SPACING`] has passed, each covering every request
//! made before it started; a rescan re-reads only the groups of the proids
//! it changed. Every full resync starts with a rescan, so an event the
//! watcher never reported is repaired within one resync interval. A
//! watcher that fails or stops makes the daemon not ready, with the
//! reason, until a new one runs and its rescan is done.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::{sleep, Instant};
use tracing::{debug, error, info, warn};

use super::{Daemon, DaemonError, Shutdown};
use crate::backoff::Backoff;
use crate::model::{HostName, Proid};
use crate::tree::scan::{check_ready, reread_hosts, scan, ScanError};
use crate::tree::watch::{watch, Change, Noticed, TreeWatcher};
use crate::tree::{names, Snapshot, TreeEvent};

/// How often the wait for `.modified` is logged.
const READY_LOG_EVERY: Duration = Duration::from_secs(30);
/// How often the tree is polled while it is not usable.
const TREE_POLL: Backoff = Backoff::fixed(Duration::from_millis(500));
/// A rescan starts at least this long after the last one finished, so a
/// storm of overflows costs a rescan a second at most while the events
/// that were not lost keep flowing.
const RESCAN_SPACING: Duration = Duration::from_secs(1);
/// How long to wait before trying again to start a watcher that failed.
const WATCHER_RETRY: Backoff = Backoff::fixed(Duration::from_secs(2));
/// At most this many queued changes are taken before a rescan starts; the
/// rest wait for the rescan, which sees them anyway.
const DRAIN_BEFORE_RESCAN: usize = 100_000;
/// At most this many queued changes are taken at the start of a turn of
/// the loop, without yielding: the rest are taken as the loop waits.
pub(super) const DRAIN_PER_TURN: usize = 1024;
/// Why the first rescan is due: the tree is read once at startup.
pub(super) const STARTUP: &str = "startup";

/// The tree side of the daemon's state.
pub(super) struct Watching {
    /// The changes of the watcher running now.
    pub(super) changes: Option<mpsc::UnboundedReceiver<Noticed>>,
    /// Changes handed in to follow in place of the first watcher.
    pub(super) given: Option<mpsc::UnboundedReceiver<Noticed>>,
    watcher: Option<TreeWatcher>,
    /// Why a rescan is due, if one is.
    pub(super) rescan_needed: Option<String>,
    /// No rescan starts before this.
    pub(super) next_rescan: Instant,
    /// The tree was rescanned since the last full sync started.
    pub(super) fresh: bool,
    /// A watcher ran once already (so a failure to start one is retried).
    started: bool,
    /// While a rescan's scan runs: the hosts the changes taken meanwhile
    /// were about, to be read again when it is done.
    pub(super) touched: Option<BTreeSet<HostName>>,
    /// Runs after a rescan's scan has read the tree (tests only).
    #[cfg(test)]
    pub(super) after_scan: Option<super::start::ScanHook>,
}

impl Watching {
    /// No watcher yet, nothing due.
    pub(super) fn new() -> Self {
        Watching {
            changes: None,
            given: None,
            watcher: None,
            rescan_needed: None,
            next_rescan: Instant::now(),
            fresh: false,
            started: false,
            touched: None,
            #[cfg(test)]
            after_scan: None,
        }
    }
}

impl Daemon {
    /// Starts the tree watcher. The first start failing is a startup
    /// error; a restart failing is retried, not ready meanwhile. False when
    /// the caller should loop (no watcher yet, or shut down).
    pub(super) async fn start_watcher(
        &mut self,
        shutdown: &mut Shutdown<'_>,
    ) -> Result<bool, DaemonError> {
        if let Some(rx) = self.watching.given.take() {
            self.watching.started = true;
            self.watching.changes = Some(rx);
            return Ok(true);
        }
        match watch(&self.root()) {
            Ok((watcher, rx)) => {
                if self.watching.started {
                    info!("tree watcher restarted; rescanning");
                    self.metrics.watcher_restarts.inc();
                    self.watching
                        .rescan_needed
                        .get_or_insert_with(|| "the watcher restarted".into());
                    self.watching.next_rescan = Instant::now();
                }
                self.watching.started = true;
                self.watching.watcher = Some(watcher);
                self.watching.changes = Some(rx);
                Ok(true)
            }
            Err(err) if !self.watching.started => Err(DaemonError::Watcher(err)),
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
    pub(super) fn watcher_failed(&mut self, why: String) {
        warn!(why = %why, "the tree watcher failed; restarting it with a rescan");
        self.watching.changes = None;
        self.watching.watcher = None;
        self.watching.rescan_needed = Some(format!("the watcher failed: {why}"));
        self.watching.next_rescan = Instant::now();
        self.health.watcher = Some(why);
        self.publish_ready();
    }

    /// Takes the changes already queued, at most `limit`.
    pub(super) fn drain_changes(&mut self, limit: usize) {
        for _ in 0..limit {
            let Some(rx) = self.watching.changes.as_mut() else {
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

    /// Waits for `.modified`; false when shut down meanwhile.
    pub(super) async fn wait_for_tree(&mut self, shutdown: &mut Shutdown<'_>) -> bool {
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
                    format!("waiting for the placement tree ({})", names::MODIFIED)
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

    /// A change from the watcher; what it dirties is late from `at`, when
    /// the watcher read it, however long it waited in the queue.
    pub(super) fn on_change(&mut self, Noticed { change, at }: Noticed) {
        match change {
            Change::Rescan(why) => {
                // Coalesced: one pending rescan covers every request.
                self.metrics.rescan_requests.inc();
                if self.watching.rescan_needed.is_none() {
                    debug!(why, "rescan requested");
                    self.watching.rescan_needed = Some(why);
                }
            }
            Change::Failed(why) => self.watcher_failed(why),
            // The startup scan, still to come, reads the tree as it is
            // after this change: loaded in one go, it needs no events.
            Change::Tree(event) if self.watching.rescan_needed.as_deref() == Some(STARTUP) => {
                debug!(?event, "tree change before the startup scan");
            }
            Change::Tree(event) => {
                debug!(?event, "tree change");
                self.on_event(&event, at);
            }
        }
    }

    pub(super) fn on_event(&mut self, event: &TreeEvent, at: Instant) {
        if let Some(touched) = &mut self.watching.touched {
            touched.insert(event.host().clone());
        }
        self.on_tree_event(event, at);
        // The placements are the index's alone: `self.tree` keeps the rest.
        match event {
            TreeEvent::PlacementAdded { .. } | TreeEvent::PlacementRemoved { .. } => {}
            TreeEvent::PlacementDirListed { host, .. } => {
                self.tree.unknown.remove(host);
            }
            _ => self.tree.apply(event),
        }
    }

    /// What a change in the tree means for node mode, the index and the
    /// next batch; the proids it dirtied. Keeping `self.tree` up to date is
    /// the caller's.
    pub(super) fn on_tree_event(&mut self, event: &TreeEvent, at: Instant) -> Vec<Proid> {
        self.node_event(event);
        if let TreeEvent::ServerUpserted {
            info: Err(why),
            host,
        } = event
        {
            self.metrics.server_file_errors.inc();
            debug!(%host, why = why.to_string(), "server file not usable");
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

    /// Marks a proid for the next batch (the schedule says when), for a
    /// change that came at `at`: the schedule sees it then, not when the
    /// loop took it from the queue (see [`Daemon::wait`]), so that a batch
    /// gathered in the queue leaves the daemon idle a window after its
    /// last change came, as a batch whose changes were taken one by one
    /// does.
    pub(super) fn mark_dirty(&mut self, proid: Proid, at: Instant) {
        self.schedule.mark_dirty(proid, at, at);
        self.metrics
            .dirty_groups
            .set(self.schedule.dirty_len() as i64);
    }

    /// The startup scan, into an index that holds nothing yet: loaded in
    /// one go rather than as an event for each placement (nothing is dirty
    /// after it: the full sync that follows compares every proid). The
    /// placements move into the index; the rest of `snapshot` stays.
    fn load(&mut self, snapshot: &mut Snapshot) {
        for warning in self.index.load(snapshot) {
            warn!("{warning}");
        }
        let unusable = snapshot.servers.values().filter(|info| info.is_err());
        self.metrics
            .server_file_errors
            .inc_by(unusable.count() as u64);
    }

    /// Reads the whole tree and applies what differs from what the events
    /// said; the groups of the proids that changed are re-read before they
    /// are planned, and only those. A tree that can't be read stops all
    /// writing until it can, and is then compared in full. False when shut
    /// down meanwhile.
    pub(super) async fn rescan(&mut self, why: &str, shutdown: &mut Shutdown<'_>) -> bool {
        // What is queued was noticed before this scan starts, so the scan
        // covers it, rescan requests included: they need no rescan of their own.
        self.drain_changes(DRAIN_BEFORE_RESCAN);
        if self.watching.changes.is_none() {
            // The watcher failed meanwhile: a new one first, then the scan.
            return true;
        }
        self.watching.rescan_needed = None;
        info!(why, "scanning the placement tree");
        if why == STARTUP {
            self.prefetch_groups();
        }
        let root = self.root();
        let mut logged = false;
        loop {
            let scanned = if why == STARTUP {
                // Nothing to follow yet: the changes wait for the scan.
                tokio::task::spawn_blocking({
                    let root = root.clone();
                    move || scan(&root)
                })
                .await
            } else {
                match self.scan_taking_changes(&root, shutdown).await {
                    Some(scanned) => scanned,
                    None => return false,
                }
            };
            let scanned = match scanned {
                Ok(Ok(snapshot)) => self.reread_touched(&root, snapshot).await,
                other => {
                    self.watching.touched = None;
                    other
                }
            };
            match scanned {
                Ok(Ok(mut snapshot)) => {
                    for warning in &snapshot.warnings {
                        warn!("{warning}");
                    }
                    if let Some(warning) = snapshot.partition_warning(&self.config.config.partition)
                    {
                        warn!("{warning}");
                    }
                    let mut changed = BTreeSet::new();
                    if why == STARTUP && self.index.is_empty() && self.tree == Snapshot::default() {
                        self.load(&mut snapshot);
                    } else {
                        // The events are the difference from what the
                        // daemon knew (the placements in the index), each
                        // about a different file, so none depends on
                        // another: the tree is replaced at the end rather
                        // than updated for each.
                        let now = Instant::now();
                        for event in self.tree.diff_placed(&self.index, &snapshot) {
                            changed.extend(self.on_tree_event(&event, now));
                        }
                        snapshot.placements.clear();
                    }
                    self.tree.replace_with(snapshot);
                    // What the events missed the cached groups may be
                    // wrong about too: those groups are read again, the
                    // others are not.
                    for proid in &changed {
                        self.groups.mark_proid_stale(&proid.key());
                    }
                    // The scan's placements are gone.
                    super::sync::give_back_freed_memory();
                    self.update_gauges();
                    if why != STARTUP {
                        self.metrics.rescans.inc();
                    }
                    self.watching.fresh = true;
                    self.watching.next_rescan = Instant::now() + RESCAN_SPACING;
                    if logged {
                        info!("placement tree readable again");
                        // Nothing was compared while it was not: compare everything.
                        self.schedule.full_sync_now(Instant::now());
                    }
                    // Unless the watcher failed while the scan ran: a new
                    // one and another rescan come first.
                    if self.watching.changes.is_some() && self.health.watcher.take().is_some() {
                        info!("tree watcher running again");
                    }
                    // The tree is usable again, whatever the role: a
                    // leader compares it in full next, a follower has
                    // nothing more to wait for.
                    self.health.tree = None;
                    self.publish_ready();
                    return true;
                }
                Ok(Err(err)) => {
                    // The full sync waits for the tree: its groups are read
                    // when it starts.
                    self.drop_prefetch();
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
}

impl Daemon {
    /// A rescan's scan, on the blocking pool, while the loop goes on taking
    /// changes and writing the batches they make: the hosts they were about
    /// are noted in `touched`. `None` when shut down meanwhile.
    async fn scan_taking_changes(
        &mut self,
        root: &std::path::Path,
        shutdown: &mut Shutdown<'_>,
    ) -> Option<Scanned> {
        let mut scanning = tokio::task::spawn_blocking({
            let root = root.to_owned();
            #[cfg(test)]
            let hook = self.watching.after_scan.clone();
            move || {
                let scanned = scan(&root);
                #[cfg(test)]
                if let Some(hook) = hook {
                    hook();
                }
                scanned
            }
        });
        self.watching.touched = Some(BTreeSet::new());
        let scanned = self.await_taking_changes(&mut scanning, shutdown).await;
        if scanned.is_none() {
            self.watching.touched = None;
        }
        scanned
    }

    /// Reads the hosts touched while the scan ran again, after every
    /// change taken so far: what the scan read of them may be older than
    /// those changes, which the diff would otherwise undo. What the
    /// changes still queued say of them is newer again.
    async fn reread_touched(&mut self, root: &std::path::Path, snapshot: Snapshot) -> Scanned {
        let touched = self.watching.touched.take().unwrap_or_default();
        if touched.is_empty() {
            return Ok(Ok(snapshot));
        }
        debug!(
            hosts = touched.len(),
            "reading the hosts changed during the scan again"
        );
        let root = root.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut snapshot = snapshot;
            reread_hosts(&root, &mut snapshot, &touched).map(|()| snapshot)
        })
        .await
    }
}

/// A scan's outcome on the blocking pool.
type Scanned = Result<Result<Snapshot, ScanError>, tokio::task::JoinError>;

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::model::Dn;
    use tokio::sync::mpsc;

    // In real time: paused time does not move while a blocking task runs.
    #[tokio::test]
    async fn a_rescan_takes_and_writes_changes_while_it_scans_and_keeps_them() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};

        let (_guard, root) = tree();
        fill(&root);
        // The scan has read the tree, then waits until the test lets it go.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let read = Arc::new(AtomicBool::new(false));
        let hook: super::super::start::ScanHook = {
            let read = read.clone();
            Arc::new(move || {
                read.store(true, Ordering::SeqCst);
                let _ = wait.lock().expect("hook").recv();
            })
        };
        let setup = Setup {
            after_scan: Some(hook),
            ..Setup::default()
        };
        let h = Harness::start_with(&root, run_config(&root, &[]), setup);
        h.ready().await;
        h.send(Change::Rescan("overflow".into()));
        until("the scan read the tree", || async {
            read.load(Ordering::SeqCst)
        })
        .await;

        // While the scan is held, a change is taken and written.
        h.place("h1", "db.app#2");
        until("the change written during the scan", || async {
            h.members(DB).await.len() == 1
        })
        .await;
        go.send(()).expect("release the scan");
        until("the rescan done", || async { h.metrics.rescans.get() == 1 }).await;

        // The scan read h1 before the change; read again, the change
        // stands rather than being undone by the scan's older reading.
        sleep(Duration::from_secs(1)).await;
        let h1 = Dn::parse(&host_dn("h1")).expect("dn");
        assert_eq!(h.members(DB).await, [h1].into());
        h.stop().await;
    }

    #[test]
    fn rescan_requests_are_coalesced() {
        let (_guard, root) = tree();
        let mut d = daemon(&root);
        d.on_change(Noticed::now(Change::Rescan("overflow 1".into())));
        d.on_change(Noticed::now(Change::Rescan("overflow 2".into())));
        assert_eq!(d.watching.rescan_needed.as_deref(), Some("overflow 1"));
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
        d.watching.changes = Some(rx);
        tx.send(Noticed::now(Change::Rescan("overflow".into())))
            .expect("send");
        drop(tx);
        d.drain_changes(DRAIN_PER_TURN);
        assert!(
            d.watching.changes.is_none(),
            "the watcher is to be replaced"
        );
        let (_, body) = d.metrics.readiness();
        assert!(body.contains("tree watcher: the watcher stopped"), "{body}");
        assert_eq!(
            d.metrics.rescan_requests.get(),
            1,
            "what it sent first is kept"
        );
    }

    #[tokio::test(start_paused = true)]
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

        d.on_change(Noticed::now(Change::Failed(
            "the notifier failed: boom".into(),
        )));
        assert!(
            d.watching.changes.is_none(),
            "the failed watcher is dropped"
        );
        assert!(
            d.watching.rescan_needed.is_some(),
            "a rescan follows the restart"
        );
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
        d.watching.changes = Some(rx);
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
            d.watching.fresh,
            "the next full sync needs no rescan of its own"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_startup_scan_is_loaded_whole_and_a_later_rescan_finds_only_what_changed() {
        let (_guard, root) = tree();
        fill(&root);
        let h1 = crate::model::HostName::new("h1").expect("host");
        let mut d = daemon(&root);
        let (tx, rx) = mpsc::unbounded_channel();
        d.watching.changes = Some(rx);
        d.watching.rescan_needed = Some(STARTUP.into());
        // Queued before the startup scan, which reads the tree as it is
        // after it: the scan, not the event, says what h1 runs.
        tx.send(Noticed::now(Change::Tree(TreeEvent::PlacementAdded {
            host: h1.clone(),
            instance: "db.app#9".into(),
        })))
        .expect("send");
        let mut never = std::pin::pin!(std::future::pending::<()>());
        let mut shutdown: Shutdown<'_> = never.as_mut();
        assert!(d.rescan(STARTUP, &mut shutdown).await);
        let placed = |d: &Daemon| d.index.placements_of(&h1).cloned().unwrap_or_default();
        assert_eq!(placed(&d), ["web.app#1".to_owned()].into());
        assert!(
            d.tree.placements.is_empty(),
            "the placements are the index's"
        );
        assert!(d.tree.servers.contains_key(&h1));
        assert_eq!(d.schedule.dirty_len(), 0, "nothing replayed as events");
        assert_eq!(d.metrics.rescans.get(), 0, "the startup scan is no rescan");
        assert_eq!(d.metrics.placements.get(), 1);

        // Changes the watcher never reported, found by the next rescan.
        d.groups.insert(group("web-gmsa-hosts"));
        d.groups.insert(group("db-gmsa-hosts"));
        std::fs::write(root.join("placement/h1/db.app#1"), "{}").expect("placement");
        assert!(d.rescan("overflow", &mut shutdown).await);
        assert_eq!(
            placed(&d),
            ["db.app#1".to_owned(), "web.app#1".to_owned()].into()
        );
        let db = group("db-gmsa-hosts").dn;
        assert_eq!(d.groups.stale(), vec![&db], "only db changed");
        assert_eq!(d.schedule.dirty_len(), 1);
        assert!(d.tree.placements.is_empty());

        // And an event the watcher did report is followed one by one.
        std::fs::remove_file(root.join("placement/h1/web.app#1")).expect("rm");
        d.on_change(Noticed::now(Change::Tree(TreeEvent::PlacementRemoved {
            host: h1.clone(),
            instance: "web.app#1".into(),
        })));
        assert_eq!(placed(&d), ["db.app#1".to_owned()].into());
        assert!(d.tree.placements.is_empty());

        // Nothing missed: a rescan changes nothing and reads nothing again.
        d.groups.insert(group("db-gmsa-hosts"));
        assert!(d.rescan("overflow", &mut shutdown).await);
        assert!(d.groups.stale().is_empty(), "{:?}", d.groups.stale());
        assert_eq!(d.metrics.rescans.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn every_group_is_read_while_the_startup_scan_runs_and_planned_from_the_whole_tree() {
        use crate::directory::memory::Call;
        let (_guard, root) = tree();
        fill(&root);
        let dir = memory_directory();
        let mut d = daemon(&root);
        d.directory = Some(dir.clone());
        let (_tx, rx) = mpsc::unbounded_channel();
        d.watching.changes = Some(rx);
        let mut never = std::pin::pin!(std::future::pending::<()>());
        let mut shutdown: Shutdown<'_> = never.as_mut();
        assert!(d.rescan(STARTUP, &mut shutdown).await);
        assert!(d.prefetch.is_some(), "started with the scan");
        d.full_sync(&mut shutdown).await;
        assert!(d.prefetch.is_none(), "taken by the full sync");
        let searches = || {
            dir.calls()
                .iter()
                .filter(|c| matches!(c, Call::SearchGroups { .. }))
                .count()
        };
        assert_eq!(searches(), 1, "no search of its own");
        assert_eq!(
            members(&dir, WEB).await,
            [Dn::parse(H1).expect("dn")].into()
        );
        assert!(d.health.applied);
        d.full_sync(&mut shutdown).await;
        assert_eq!(searches(), 2, "a later full sync reads the groups again");

        // A startup scan that finds the tree unusable reads nothing for a
        // full sync that must wait for it.
        std::fs::remove_file(root.join(".modified")).expect("rm .modified");
        let mut d = daemon(&root);
        d.directory = Some(memory_directory());
        let (_tx, rx) = mpsc::unbounded_channel();
        d.watching.changes = Some(rx);
        let mut stop = std::pin::pin!(async { sleep(Duration::from_secs(1)).await });
        let mut shutdown: Shutdown<'_> = stop.as_mut();
        assert!(!d.rescan(STARTUP, &mut shutdown).await, "shut down");
        assert!(d.prefetch.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_daemon_waits_for_modified_before_it_writes() {
        let (_guard, root) = tree();
        fill(&root);
        std::fs::remove_file(root.join(".modified")).expect("rm .modified");
        let h = Harness::start(&root, &[]);
        until("waiting, and saying so", || async {
            let (_, body) = h.metrics.readiness();
            body.contains("waiting for the placement tree (.modified)")
        })
        .await;
        sleep(Duration::from_secs(30)).await;
        assert!(!h.metrics.is_ready());
        assert!(
            h.members(WEB).await.is_empty(),
            "nothing written before the tree is ready"
        );

        std::fs::write(root.join(".modified"), "").expect(".modified");
        h.ready().await;
        assert!(h.members(WEB).await.contains(&Dn::parse(H1).expect("dn")));
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn modified_going_away_stops_writes_until_it_is_back() {
        let (_guard, root) = tree();
        fill(&root);
        let h = Harness::start(&root, &[]);
        h.ready().await;

        std::fs::remove_file(root.join(".modified")).expect("rm .modified");
        std::fs::write(root.join("placement/h1/db.app#1"), "{}").expect("placement");
        h.send(Change::Rescan("doubt".into()));
        until("not ready", || async { !h.metrics.is_ready() }).await;
        let (_, body) = h.metrics.readiness();
        assert!(body.contains("placement tree unusable"), "{body}");
        // A change taken while the rescan tries the tree again is not
        // written either.
        h.place("h1", "db.app#2");
        sleep(Duration::from_secs(5)).await;
        assert!(
            h.members(DB).await.is_empty(),
            "nothing written from a tree that is not ready"
        );

        std::fs::write(root.join(".modified"), "").expect(".modified");
        until("the change applied once the tree is back", || async {
            !h.members(DB).await.is_empty()
        })
        .await;
        h.ready().await;
        h.stop().await;
    }

    /// Soak failure 3 (`follower-unready`): only a full sync cleared the
    /// tree's fault, and a follower never runs one.
    #[tokio::test(start_paused = true)]
    async fn follower_unready_a_follower_is_ready_again_once_modified_is_back() {
        let (_guard, root) = tree();
        fill(&root);
        let (_roles, rx) = tokio::sync::watch::channel(role(crate::election::Role::Follower, 1));
        let setup = Setup {
            roles: Some(rx),
            ..Setup::default()
        };
        let h = Harness::start_with(&root, run_config(&root, &[]), setup);
        h.ready().await;

        std::fs::remove_file(root.join(".modified")).expect("rm .modified");
        h.send(Change::Rescan("doubt".into()));
        until("not ready", || async { !h.metrics.is_ready() }).await;
        let (_, body) = h.metrics.readiness();
        assert!(body.contains("placement tree unusable"), "{body}");

        std::fs::write(root.join(".modified"), "").expect(".modified");
        until("the follower ready again after the rescan", || async {
            h.metrics.is_ready()
        })
        .await;
        assert_eq!(h.modifies(WEB), 0, "a follower writes nothing");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_event_is_repaired_by_the_next_resync() {
        let (_guard, root) = tree();
        fill(&root);
        let h = Harness::start(&root, &["--resync-interval=30s"]);
        h.ready().await;
        // The watcher never reports this placement.
        std::fs::write(root.join("placement/h1/db.app#1"), "{}").expect("placement");
        sleep(Duration::from_secs(5)).await;
        assert!(h.members(DB).await.is_empty(), "no event, no change yet");
        until("the resync's rescan found it", || async {
            h.members(DB).await.contains(&Dn::parse(H1).expect("dn"))
        })
        .await;
        assert!(h.metrics.rescans.get() >= 1);
        h.stop().await;
    }
}
