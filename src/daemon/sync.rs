//! The directory side of the daemon: opening the directory, full syncs,
//! batches of dirty proids (with the groups they need read first),
//! recording what each pass applied, and driving directory work while the
//! loop keeps taking tree changes (what a lost leadership or a shutdown
//! does to it).
//!
//! Every batch and full sync is one [`Pass`]: plan, guard, missing
//! groups, apply, record, as `sync` does. A resync goes on writing batches
//! while it reads every group, and writes its own changes in parts with
//! the batches due between them, so a stream of changes is not held up
//! for the whole resync. Deletions the guard refuses stay
//! pending: the proid keeps its retiring hosts until a later pass of it
//! (a batch or a full sync) applies them. Groups that failed are read
//! again before they are planned; the group of a proid that has none is
//! looked up again at most once a minute. A change whose Modify got no
//! answer may have been applied: the next read of its group says which of
//! its values were, and those are recorded (cause `retry`) before the
//! group is planned again.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, Instant};
use tracing::{debug, error, info, warn};

use super::leadership::{role_changed, Waiting};
use super::schedule::Dirty;
use super::{Daemon, Shutdown, SHUTDOWN_GRACE};
use crate::backoff::Backoff;
use crate::directory;
use crate::directory::{DirError, Directory};
use crate::metrics;
use crate::model::{Dn, Proid};
use crate::node::GmsaProids;
use crate::output::Report;
use crate::plan::Scope;
use crate::reconcile::{Cause, GroupResult, Pass};

/// After a failure to read every group that will not go away by itself
/// (credentials, the base), the read is tried again this often, or once
/// per resync interval when that is shorter.
const GROUPS_READ_RETRY: Duration = Duration::from_secs(60);
/// How long to wait before trying again to open the directory, read the
/// domain's facts or read every group after a transient failure.
const RETRY_LATER: Backoff = Backoff::fixed(Duration::from_secs(10));

/// A change whose Modify got no answer: it may have been applied.
#[derive(Debug)]
pub(super) struct Unanswered {
    /// The leadership term it was sent in.
    term: Option<u64>,
    /// What was sent and not confirmed.
    change: crate::plan::GroupChange,
}

/// What a lost leadership does to directory work in flight.
#[derive(Debug, Clone, Copy)]
enum OnLost {
    /// Drop it (reads: nothing of theirs needs recording).
    Drop,
    /// Let it finish (writes: the pass sends nothing more, and what was
    /// sent is answered and recorded).
    Finish,
}

/// A search of every group running on its own task.
pub(super) type GroupSearch = tokio::task::JoinHandle<Result<Vec<directory::Group>, DirError>>;

impl Daemon {
    /// Starts reading every group while the startup scan reads the tree,
    /// for the first full sync to plan from once the tree is complete: when
    /// that full sync follows the scan at once (a leader from the start,
    /// with no election to wait for and no node mode to start first) and
    /// the directory can be opened before the tree is read (its servers
    /// are configured, not taken from the tree's).
    pub(super) fn prefetch_groups(&mut self) {
        if !self.config.groups
            || self.config.node.is_some()
            || self.election.is_some()
            || !self.is_leader()
        {
            return;
        }
        if self.directory.is_none() {
            // Otherwise it is opened after the scan, which says why not.
            let Ok(dir) = directory::open(&self.config.config.directory, &[]) else {
                return;
            };
            self.directory = Some(Arc::from(dir));
        }
        let dir = self.directory();
        let ou = self.group_ou();
        self.prefetch = Some(tokio::spawn(async move { dir.search_groups(&ou).await }));
    }

    /// Drops a search started for a full sync that is not coming soon.
    pub(super) fn drop_prefetch(&mut self) {
        if let Some(search) = self.prefetch.take() {
            search.abort();
        }
    }

    /// The directory is needed for groups, and in node mode for membership
    /// checks and domain facts.
    pub(super) fn needs_directory(&self) -> bool {
        self.config.groups
            || self.config.node.as_ref().is_some_and(|n| {
                n.gmsa_proids == GmsaProids::GroupExists
                    || n.wait_for_group.is_some()
                    || (n.domain.is_none() && n.gmsa_proids != GmsaProids::None)
            })
    }

    pub(super) async fn open_directory(&mut self, shutdown: &mut Shutdown<'_>) -> bool {
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
                self.not_ready_for_a_while(Waiting::Directory(err.to_string()), shutdown)
                    .await;
                false
            }
        }
    }

    /// Reports not ready and waits before the caller tries again.
    pub(super) async fn not_ready_for_a_while(
        &mut self,
        reason: Waiting,
        shutdown: &mut Shutdown<'_>,
    ) {
        self.health.waiting = Some(reason);
        self.publish_ready();
        tokio::select! {
            _ = &mut *shutdown => self.stopping = true,
            _ = sleep(RETRY_LATER.delay(0)) => {}
        }
    }

    pub(super) fn directory(&self) -> Arc<dyn Directory> {
        match &self.directory {
            Some(dir) => dir.clone(),
            None => panic!("BUG: the directory is opened before any batch"),
        }
    }

    /// Re-reads every group and reconciles every proid. While the groups
    /// are read the loop goes on taking changes and writing the batches
    /// they make; the groups those batches write or read again are taken
    /// from the cache, not from the read, which may be older.
    pub(super) async fn full_sync(&mut self, shutdown: &mut Shutdown<'_>) {
        let started = Instant::now();
        self.metrics.resyncs.inc();
        self.watching.fresh = false;
        let mut search = match self.prefetch.take() {
            Some(search) => search,
            None => {
                let dir = self.directory();
                let ou = self.group_ou();
                tokio::spawn(async move { dir.search_groups(&ou).await })
            }
        };
        self.groups.begin_read();
        let found = match self.await_taking_changes(&mut search, shutdown).await {
            Some(Ok(found)) => found,
            Some(Err(join)) => panic!("BUG: the search of every group panicked: {join}"),
            None => {
                search.abort();
                self.groups.abandon_read();
                return;
            }
        };
        if !self.still_leading() {
            // Another replica may take over: this one writes nothing more.
            warn!("lost the writer's lock: dropping in-flight work");
            self.groups.abandon_read();
            return;
        }
        let groups = match found {
            Ok(groups) => {
                self.health.groups_read = None;
                groups
            }
            Err(err) => {
                self.groups.abandon_read();
                warn!(error = %err, "reading the groups failed; retrying");
                let delay = if err.is_transient() {
                    RETRY_LATER.delay(0)
                } else {
                    let every = self.config.resync_interval.min(GROUPS_READ_RETRY);
                    Backoff::fixed(every).delay(0)
                };
                self.schedule.full_sync_failed(Instant::now(), delay);
                self.health.groups_read = Some(err);
                self.publish_ready();
                return;
            }
        };
        let read = groups.len();
        let read_at = Instant::now();
        // The read settles the changes that got no answer, but not those
        // of groups written since it began: the cache knows those better
        // (re-read before they are planned when in doubt).
        let settled: Vec<&crate::directory::Group> = groups
            .iter()
            .filter(|g| !self.groups.newer_than_read(&g.dn))
            .collect();
        self.settle_unanswered(settled);
        // What is left was of groups that are gone, or written since.
        let groups_cache = &self.groups;
        self.unanswered
            .retain(|dn, _| groups_cache.newer_than_read(dn));
        let before = self.groups.reset(groups);
        self.health.synced = true;
        let reset_at = Instant::now();
        // Planned from the cache, which holds the groups as read (one copy:
        // they moved in) and as written since.
        let mut pass = Pass::prepare(
            Cause::FullSync,
            &self.index,
            self.groups.all(),
            &self.config.config.pattern,
            Scope::All,
            &self.config.config.guard,
        );
        // A group whose members moved since the daemon last wrote or read
        // it was edited by someone else: its repair is drift.
        for change in &pass.plan.changes {
            let now = self.groups.get(&change.group_dn);
            if now.is_some_and(|group| before.drifted(group)) {
                pass.causes.insert(change.proid.clone(), Cause::Drift);
            }
        }
        drop(before);
        // Groups in doubt (a write since the read began failed) are read
        // again before they are planned: a batch does that, after this.
        let doubtful = self.groups.stale_proids();
        pass.plan
            .changes
            .retain(|change| !self.groups.is_stale(&change.group_dn));
        // A resync leaves the changes from the tree to the batches, which
        // plan them from the cache just refreshed and write them oldest
        // first, between its parts: written by the resync they would wait
        // behind its repairs. The first full sync writes them itself:
        // ready means they are applied. Every other proid is compared now.
        let (clocks, mut left) = if self.health.applied {
            let left = self.schedule.resync_started();
            pass.plan
                .changes
                .retain(|change| !left.contains(&change.proid));
            (Dirty::new(), left)
        } else {
            // What was dirty is covered, but keep the latency clocks of
            // those that change, written first, the oldest first (the sort
            // is stable: DN order among equals).
            let clocks = self.schedule.full_sync_started();
            pass.plan.changes.sort_by_key(|change| {
                let at = clocks.get(&change.proid).copied();
                (at.is_none(), at)
            });
            (clocks, BTreeSet::new())
        };
        // The groups in doubt are the batches' too, retiring hosts and all.
        let now = Instant::now();
        for proid in doubtful {
            let at = clocks.get(&proid).copied().unwrap_or(now);
            self.schedule.mark_dirty(proid.clone(), at, now);
            left.insert(proid);
        }
        self.missing = pass
            .plan
            .missing_groups
            .iter()
            .map(|m| m.proid.key())
            .collect();
        self.refused.clear();
        let planned = pass.plan.changes.len();
        let retiring = self
            .index
            .retiring_proids()
            .into_iter()
            .map(|p| {
                let dns = self.index.retiring(&p);
                (p, dns)
            })
            .collect();
        let planned_at = Instant::now();
        let complete = self
            .apply_full(pass, &clocks, retiring, left, shutdown)
            .await;
        if complete.is_some() {
            self.metrics.last_full_sync.set(metrics::unix_now());
            if !self.health.applied {
                info!("initial sync applied; ready");
            }
            self.health.applied = true;
            self.publish_ready();
        }
        self.schedule.full_sync_done(Instant::now());
        self.update_gauges();
        // With the scan that precedes a resync ("scanning the placement
        // tree", why "full resync"), this brackets it in the log.
        info!(
            groups = read,
            changes = planned,
            complete = complete == Some(true),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            // Where it went: reading every group, planning, writing (with
            // the batches written meanwhile).
            read_ms = (read_at - started).as_secs_f64() * 1000.0,
            plan_ms = (planned_at - read_at).as_secs_f64() * 1000.0,
            // Of which settling unanswered writes and refreshing the cache.
            reset_ms = (reset_at - read_at).as_secs_f64() * 1000.0,
            write_ms = planned_at.elapsed().as_secs_f64() * 1000.0,
            "full sync done"
        );
        give_back_freed_memory();
    }

    /// Before planning these proids: re-reads their groups that failed
    /// before (the cache may be wrong about them), and looks up the group of
    /// a proid that has none yet (it may have been created since the last
    /// full sync; looked up at most once a minute per proid). False when
    /// abandoned at shutdown.
    pub(super) async fn refresh_groups(
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
                [] if self.index.has_desired(proid) => {
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

    pub(super) fn group_ou(&self) -> Dn {
        match self.config.config.require_group_ou() {
            Ok(ou) => ou.clone(),
            Err(err) => panic!("BUG: RunConfig is validated to have --group-ou: {err}"),
        }
    }

    /// Writes a full sync's pass. A resync (the first full sync applied)
    /// writes it a part at a time, each about one batch window of writes
    /// at the directory's quickest recent pace, and writes a batch that
    /// falls due between two parts: a change that comes while a resync
    /// writes waits for one part, not for the whole resync. The batch
    /// plans its proids from the cache, which the full sync's read
    /// refreshed and its parts so far updated; what the resync still had
    /// to write for them was planned before their changes, so the batch
    /// takes it over and the resync drops it (written as planned, it
    /// could undo them). The guard judged the whole plan before the first
    /// part. A directory that saves on commit (the LDIF file) is written
    /// in one part, as each part would save it whole; so is a dry run's
    /// plan, which is printed whole. The proids `left` to the batches are
    /// theirs, as are those taken over. `None` when abandoned at shutdown,
    /// otherwise whether everything the resync wrote was applied.
    async fn apply_full(
        &mut self,
        mut pass: Pass,
        clocks: &Dirty,
        retiring: BTreeMap<Proid, BTreeSet<Dn>>,
        left: BTreeSet<Proid>,
        shutdown: &mut Shutdown<'_>,
    ) -> Option<bool> {
        let part = self.schedule.groups_per_window().filter(|_| {
            self.health.applied && !self.config.dry_run && !self.directory().saves_on_commit()
        });
        let Some(part) = part.map(|groups| groups.max(self.config.config.apply.concurrency.max(1)))
        else {
            let unfinished = self.apply_pass(pass, clocks, shutdown).await?;
            return Some(self.retire(retiring, &unfinished, &left));
        };
        let mut taken_over = left;
        let mut unfinished = BTreeSet::new();
        let mut rest = std::mem::take(&mut pass.plan.changes);
        let mut refused = pass.refused.take();
        loop {
            let changes: Vec<_> = rest.drain(..part.min(rest.len())).collect();
            let piece = Pass {
                cause: pass.cause,
                causes: pass.causes.clone(),
                plan: crate::plan::Plan {
                    changes,
                    ..crate::plan::Plan::default()
                },
                refused: refused.take(),
                results: Vec::new(),
            };
            unfinished.extend(self.apply_pass(piece, clocks, shutdown).await?);
            if rest.is_empty() {
                break;
            }
            if self.stopping {
                return None;
            }
            if self.is_leader() && self.schedule.batch_ready(Instant::now()) {
                // Why the resync was to write the groups it has not yet
                // written, where that is not `full-sync` (drift).
                let unwritten: BTreeMap<Proid, Cause> = rest
                    .iter()
                    .filter_map(|c| pass.causes.get(&c.proid).map(|k| (c.proid.clone(), *k)))
                    .collect();
                let took = self.batch_taking_over(&unwritten, shutdown).await;
                // The resync is in flight again.
                self.schedule.writing();
                if self.stopping {
                    return None;
                }
                rest.retain(|change| !took.contains(&change.proid));
                taken_over.extend(took);
            }
        }
        Some(self.retire(retiring, &unfinished, &taken_over))
    }

    /// After a pass: forgets the retiring DNs of the proids in `retiring`
    /// it reconciled, except those `unfinished` and, after a full sync,
    /// those it left to the batches (they record how those went). Whether
    /// the pass was complete.
    fn retire(
        &mut self,
        retiring: BTreeMap<Proid, BTreeSet<Dn>>,
        unfinished: &BTreeSet<Proid>,
        batches: &BTreeSet<Proid>,
    ) -> bool {
        for (proid, dns) in retiring {
            if unfinished.contains(&proid) || batches.contains(&proid) {
                continue;
            }
            // Reconciled (or nothing to do): no retry pending any more.
            self.schedule.succeeded(&proid);
            if !self.refused.contains_key(&proid) {
                self.index.clear_retiring(&proid, &dns);
            }
        }
        unfinished.is_empty()
    }

    /// Reconciles the dirty proids.
    pub(super) async fn batch(&mut self, shutdown: &mut Shutdown<'_>) {
        self.batch_taking_over(&BTreeMap::new(), shutdown).await;
    }

    /// Reconciles the dirty proids, taking over what a resync has not yet
    /// written for them, with its cause where `unwritten` gives one that
    /// says more than `event` (drift). Returns the proids planned.
    async fn batch_taking_over(
        &mut self,
        unwritten: &BTreeMap<Proid, Cause>,
        shutdown: &mut Shutdown<'_>,
    ) -> BTreeSet<Proid> {
        let clocks = self.schedule.take_batch();
        let proids: BTreeSet<Proid> = clocks.keys().cloned().collect();
        let keys: BTreeSet<String> = proids.iter().map(Proid::key).collect();

        if !self.refresh_groups(&proids, shutdown).await {
            self.schedule.finished();
            return proids;
        }

        // Changes that got no answer are settled by the groups read since
        // (those not stale): copied, as settling them records through `self`.
        if !self.unanswered.is_empty() {
            let stale: BTreeSet<Dn> = keys.iter().flat_map(|k| self.groups.stale_of(k)).collect();
            let read: Vec<_> = self
                .groups
                .groups_of(&keys)
                .into_iter()
                .filter(|g| !stale.contains(&g.dn))
                .cloned()
                .collect();
            self.settle_unanswered(&read);
        }
        // Planned from the cache itself, not from copies of its groups.
        let mut pass = Pass::prepare(
            Cause::Event,
            &self.index,
            self.groups.groups_of(&keys),
            &self.config.config.pattern,
            Scope::Only(&proids),
            &self.config.config.guard,
        );
        for proid in &proids {
            if self.schedule.failures(proid) > 0 {
                pass.causes.insert(proid.clone(), Cause::Retry);
            } else if let Some(cause) = unwritten.get(proid) {
                pass.causes.insert(proid.clone(), *cause);
            }
        }
        // The oldest change first: a batch's groups are written in the
        // order their changes came (the sort is stable: DN order among
        // equals), so no change waits behind the ones that came after it.
        pass.plan
            .changes
            .sort_by_key(|change| clocks.get(&change.proid).copied());
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
        proids
    }

    /// Applies a plan (deletions held back when the guard refuses them),
    /// records the results, and forgets the retiring DNs of the proids in
    /// `retiring` that are now fully reconciled. `None` when abandoned at
    /// shutdown, otherwise whether everything was applied.
    pub(super) async fn apply(
        &mut self,
        pass: Pass,
        clocks: &Dirty,
        retiring: BTreeMap<Proid, BTreeSet<Dn>>,
        shutdown: &mut Shutdown<'_>,
    ) -> Option<bool> {
        let unfinished = self.apply_pass(pass, clocks, shutdown).await?;
        Some(self.retire(retiring, &unfinished, &BTreeSet::new()))
    }

    /// Applies a pass; `None` when abandoned, otherwise the proids not fully applied.
    pub(super) async fn apply_pass(
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
        let groups = pass.plan.changes.len();
        let started = Instant::now();
        let dir = self.directory();
        let options = self.config.config.apply;
        let metrics = self.metrics.clone();
        let audit = self.audit.clone();
        let term = self.leadership.term();
        // Asked right before each Modify leaves: a replica that lost the
        // leadership the pass began in sends nothing more, however long
        // the pass took to prepare.
        let check = self.leadership.write_check();
        let io = async move {
            let audit = audit.in_term(term);
            let recorder = (metrics.as_ref(), &audit);
            let may_write = || check.may_write();
            pass.apply_while(dir.as_ref(), &options, dry_run, &recorder, &may_write)
                .await;
            pass
        };
        // The requests already sent are answered and recorded, the
        // leadership lost or not: the directory may have applied them.
        let mut pass = self.drive_writes(io, shutdown).await?;
        // Only a pass that wrote every group says how fast the directory
        // writes: one that failed fast (a server left alone, a replica
        // that may no longer write) wrote nothing in no time, and would
        // pass for the quickest for the next passes.
        let wrote_all = pass
            .results
            .iter()
            .all(|r| r.failed.is_none() && !r.vanished);
        if !dry_run && wrote_all {
            self.schedule.wrote(groups, started.elapsed());
        }
        let results = std::mem::take(&mut pass.results);
        Some(self.record(results, clocks, term, &|proid| pass.cause_of(proid)))
    }

    /// Waits for `task` (work on its own task or the blocking pool, which
    /// borrows nothing of `self`) while the loop goes on taking changes and
    /// writing the batches they make, as it does between passes. `None`
    /// when shut down meanwhile; the task is then left to itself.
    pub(super) async fn await_taking_changes<T>(
        &mut self,
        task: &mut tokio::task::JoinHandle<T>,
        shutdown: &mut Shutdown<'_>,
    ) -> Option<Result<T, tokio::task::JoinError>> {
        loop {
            // Not while the tree is unusable: nothing is written then.
            let writing = self.config.groups
                && self.health.synced
                && self.health.tree.is_none()
                && self.is_leader();
            let due = self.schedule.batch_due().filter(|_| writing);
            let wake = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let changes = self.watching.changes.as_mut();
            tokio::select! {
                done = &mut *task => return Some(done),
                _ = &mut *shutdown => {
                    self.stopping = true;
                    return None;
                }
                change = async {
                    match changes {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match change {
                    Some(change) => self.on_change(change),
                    None => self.watcher_failed("the watcher stopped".into()),
                },
                _ = tokio::time::sleep_until(wake) => {
                    if writing && self.schedule.batch_ready(Instant::now()) {
                        self.batch(shutdown).await;
                        if self.stopping {
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// Runs `fut` (directory I/O that borrows nothing of `self`) while
    /// taking tree changes. A lost leadership drops it: another replica
    /// may take over as soon as the session is gone. On shutdown it gets
    /// the grace period, then is abandoned. `None` when dropped or
    /// abandoned.
    pub(super) async fn drive<F: Future>(
        &mut self,
        fut: F,
        shutdown: &mut Shutdown<'_>,
    ) -> Option<F::Output> {
        self.drive_while(fut, OnLost::Drop, shutdown).await
    }

    /// Runs a pass's writes (`fut`, which asks the leadership before each
    /// Modify leaves) as [`Daemon::drive`] runs reads, with one difference:
    /// a lost leadership does not drop it. The pass sends nothing more on
    /// its own, and the requests already sent are waited for, so that what
    /// the directory applied is recorded. On shutdown the same grace
    /// period; `None` when abandoned.
    pub(super) async fn drive_writes<F: Future>(
        &mut self,
        fut: F,
        shutdown: &mut Shutdown<'_>,
    ) -> Option<F::Output> {
        self.drive_while(fut, OnLost::Finish, shutdown).await
    }

    /// The loop under [`Daemon::drive`] and [`Daemon::drive_writes`].
    async fn drive_while<F: Future>(
        &mut self,
        fut: F,
        on_lost: OnLost,
        shutdown: &mut Shutdown<'_>,
    ) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let mut lost = false;
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
                _ = role_changed(roles), if !self.stopping && !lost => {
                    if !self.still_leading() {
                        match on_lost {
                            OnLost::Drop => {
                                warn!("lost the writer's lock: dropping in-flight work");
                                return None;
                            }
                            OnLost::Finish => {
                                warn!("lost the writer's lock: sending nothing more; recording the requests already sent");
                                lost = true;
                            }
                        }
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

    /// Forgets the changes still unanswered (each was recorded as such when
    /// it failed): the term is over (or the daemon stops), so another
    /// replica may write these groups before this one reads them again,
    /// and no read could tell whose write it saw.
    pub(super) fn give_up_unanswered(&mut self) {
        self.unanswered.clear();
    }

    /// Records, as applied by a retry, the values of a change whose Modify
    /// got no answer that `read` (groups just read) shows in the desired
    /// state: a server that stopped answering may still have applied them,
    /// and the re-planned pass finds nothing left to do for them. Only
    /// within the term the change was sent in: after it, another replica
    /// may have written the same values ([`Daemon::give_up_unanswered`]);
    /// the record written when the Modify failed says what was sent.
    fn settle_unanswered<'g>(
        &mut self,
        read: impl IntoIterator<Item = &'g crate::directory::Group>,
    ) {
        if self.unanswered.is_empty() {
            return;
        }
        let term = self.leadership.term();
        for group in read {
            let Some(unanswered) = self.unanswered.remove(&group.dn) else {
                continue;
            };
            if unanswered.term != term {
                // Another replica may have written it since: recorded as
                // unanswered when it failed, and left at that.
                continue;
            }
            let audit = self.audit.in_term(term);
            let recorder = (self.metrics.as_ref(), &audit);
            let change = unanswered.change;
            let mut result = GroupResult {
                planned: change.clone(),
                applied: change.clone(),
                failed: None,
                vanished: false,
                requests: 0,
                retries: 0,
                unanswered: false,
                settled: None,
            };
            result.applied.add.retain(|dn| group.members.contains(dn));
            result
                .applied
                .delete
                .retain(|dn| !group.members.contains(dn));
            if result.applied.add.is_empty() && result.applied.delete.is_empty() {
                continue;
            }
            info!(group = %group.dn, "a change that got no answer was applied; recording it");
            crate::reconcile::Recorder::record(
                &recorder,
                crate::reconcile::Record {
                    cause: Cause::Retry,
                    dry_run: false,
                    result: &result,
                },
            );
        }
    }

    /// Updates the cache and retries from a batch's results (the pass
    /// recorded them in the metrics);
    /// returns the proids not fully applied.
    pub(super) fn record(
        &mut self,
        results: Vec<GroupResult>,
        clocks: &Dirty,
        term: Option<u64>,
        cause_of: &dyn Fn(&Proid) -> Cause,
    ) -> BTreeSet<Proid> {
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
            if let Some((left, _)) = &result.failed {
                // No answer is no news: what was sent may have been applied.
                if result.unanswered {
                    // Recorded now, while this process can: killed before
                    // its next read of the group, it could not say later.
                    self.audit.in_term(term).unanswered(left, cause_of(&proid));
                    self.unanswered.insert(
                        dn.clone(),
                        Unanswered {
                            term,
                            change: left.clone(),
                        },
                    );
                }
                unfinished.insert(proid.clone());
                self.groups.mark_stale(dn);
                self.schedule.failed(proid, now);
            } else {
                self.schedule.succeeded(&proid);
                if let Some(started) = clocks.get(&proid) {
                    // Applied when the directory held it, not when the
                    // whole pass was done.
                    let settled = result.settled.unwrap_or(now);
                    let latency = settled.saturating_duration_since(*started);
                    self.metrics.event_to_applied.observe(latency.as_secs_f64());
                    // This line is written after the whole pass: how long
                    // ago the change came dates it.
                    let since_event = now.saturating_duration_since(*started);
                    debug!(
                        proid = %proid,
                        group = %dn,
                        latency_ms = latency.as_secs_f64() * 1000.0,
                        since_event_ms = since_event.as_secs_f64() * 1000.0,
                        "change applied"
                    );
                }
            }
        }
        unfinished
    }

    pub(super) fn update_gauges(&self) {
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
}

/// Hands the memory a full sync or a rescan freed back to the system.
/// Their transient copies (every group as read, a whole scan of the tree:
/// tens of MB at cluster scale) are dropped when they end, but glibc keeps
/// freed memory mapped wherever a live allocation sits above it, so the
/// resident size would stay at each resync's peak. `malloc_trim` releases
/// the free pages inside the heap too; it takes about a millisecond.
pub(super) fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of malloc's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use crate::directory::memory::{parse_dns, Call};
    use crate::directory::{rc, DirError, Directory, MemberChange, Op};
    use crate::ldif::Record;
    use crate::model::Dn;
    use crate::tree::watch::{Change, Noticed};
    use crate::tree::{ServerInfo, TreeEvent};
    use std::time::Duration;
    use tokio::time::{sleep, Instant};

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("dn")
    }

    fn dns(hosts: &[&str]) -> std::collections::BTreeSet<Dn> {
        hosts.iter().map(|h| dn(&host_dn(h))).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_isolated_change_is_applied_at_once() {
        let (_guard, root) = tree();
        fill(&root);
        // A window far longer than the test may take: only the idle fast
        // path can apply the change in time.
        let h = Harness::start(&root, &["--batch-window=1h"]);
        h.ready().await;
        assert_eq!(h.members(WEB).await, dns(&["h1"]));

        h.place("h1", "db.app#1");
        until("the isolated change applied", || async {
            h.members(DB).await == dns(&["h1"])
        })
        .await;
        h.stop().await;
    }

    /// The sum and count of the event-to-applied histogram.
    fn latencies(h: &Harness) -> (f64, f64) {
        let text = h.metrics.encode();
        (
            crate::metrics::sample(&text, "gmsa_event_to_applied_seconds_sum"),
            crate::metrics::sample(&text, "gmsa_event_to_applied_seconds_count"),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_is_late_from_when_the_watcher_noticed_it() {
        let (_guard, root) = tree();
        fill(&root);
        let h = Harness::start(&root, &[]);
        h.ready().await;
        let (sum, count) = latencies(&h);
        // Noticed a minute ago and taken only now: the minute counts.
        std::fs::write(root.join("placement/h1/db.app#1"), "{}").expect("placement");
        let change = Change::Tree(TreeEvent::PlacementAdded {
            host: crate::model::HostName::new("h1").expect("host"),
            instance: "db.app#1".to_owned(),
        });
        let at = Instant::now();
        tokio::time::advance(Duration::from_secs(60)).await;
        h.changes
            .send(Noticed { change, at })
            .expect("the daemon takes changes");
        until("the change applied", || async {
            h.members(DB).await == dns(&["h1"])
        })
        .await;
        let (sum_after, count_after) = latencies(&h);
        assert_eq!(count_after - count, 1.0);
        assert!(
            sum_after - sum >= 60.0,
            "{} s from event to applied",
            sum_after - sum
        );
        h.stop().await;
    }

    /// A daemon with a window of ten seconds that has just applied an
    /// isolated change (db on h1) and taken the next (its removal), which
    /// opened a batch due a window later: when it opened.
    async fn a_batch_open(root: &std::path::Path) -> (Harness, Instant) {
        let h = Harness::start(root, &["--batch-window=10s"]);
        h.ready().await;
        h.place("h1", "db.app#1");
        until("the isolated change applied", || async {
            h.members(DB).await == dns(&["h1"])
        })
        .await;
        let opened = Instant::now();
        h.unplace("h1", "db.app#1");
        sleep(Duration::from_millis(10)).await;
        assert_eq!(h.metrics.dirty_groups.get(), 1, "db's batch is open");
        (h, opened)
    }

    #[tokio::test(start_paused = true)]
    async fn changes_that_come_just_before_a_batch_is_due_wait_for_it_in_the_queue() {
        let (_guard, root) = tree();
        fill(&root);
        let (h, opened) = a_batch_open(&root).await;
        let before = h.modifies(DB) + h.modifies(WEB);

        // Just before the batch is due, the loop leaves the queue alone.
        tokio::time::sleep_until(opened + Duration::from_millis(9_950)).await;
        h.unplace("h1", "web.app#1");
        sleep(Duration::from_millis(20)).await;
        assert_eq!(h.modifies(DB) + h.modifies(WEB), before, "not due yet");
        assert_eq!(
            h.metrics.dirty_groups.get(),
            1,
            "the loop took a change while the batch gathered"
        );
        // When the batch is due, it takes the change, which joins it.
        until("the batch applied", || async {
            h.members(DB).await.is_empty() && h.members(WEB).await.is_empty()
        })
        .await;
        assert_eq!(h.modifies(DB) + h.modifies(WEB) - before, 2);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_daemon_is_idle_a_window_after_the_last_change_a_batch_gathered() {
        let (_guard, root) = tree();
        fill(&root);
        let (h, opened) = a_batch_open(&root).await;
        // Gathered in the queue: it came 9.95 s into the window.
        tokio::time::sleep_until(opened + Duration::from_millis(9_950)).await;
        h.unplace("h1", "web.app#1");
        until("the batch applied", || async {
            h.members(DB).await.is_empty() && h.members(WEB).await.is_empty()
        })
        .await;
        // A window after that change, and less than one after the batch:
        // the daemon is idle, and the next change goes at once.
        tokio::time::sleep_until(opened + Duration::from_millis(19_960)).await;
        h.place("h1", "db.app#2");
        sleep(Duration::from_millis(20)).await;
        assert_eq!(h.members(DB).await, dns(&["h1"]), "applied at once");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_that_fails_while_a_batch_waits_is_seen_at_once() {
        let (_guard, root) = tree();
        fill(&root);
        let (h, _) = a_batch_open(&root).await;
        h.send(Change::Failed("the notifier failed: boom".into()));
        sleep(Duration::from_millis(10)).await;
        assert_eq!(
            h.metrics.watcher_restarts.get(),
            1,
            "a failed watcher waited for the batch"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_costs_one_modify_per_changed_group() {
        let (_guard, root) = tree();
        fill(&root);
        let hosts = ["h2", "h3", "h4", "h5", "h6"];
        for host in hosts {
            write_server(&root, host);
        }
        let h = Harness::start(&root, &["--batch-window=1s"]);
        h.ready().await;
        let before = h.modifies(WEB);

        for host in hosts {
            h.place(host, "db.app#1");
            h.place(host, "web.app#2");
        }
        until("the burst applied", || async {
            h.members(DB).await == dns(&hosts) && h.members(WEB).await.len() == 6
        })
        .await;
        // The first change may go alone (the daemon was idle); the other
        // nine are coalesced into one Modify per group.
        let modifies = h.modifies(DB) + h.modifies(WEB) - before;
        assert!(
            (2..=3).contains(&modifies),
            "{modifies} Modify requests for 10 changes in 2 groups"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_writes_its_oldest_change_first() {
        let (_guard, root) = tree();
        fill(&root);
        for host in ["h2", "h3"] {
            write_server(&root, host);
        }
        let h = Harness::start(&root, &["--batch-window=1s"]);
        h.ready().await;
        // The first change goes at once; the two behind it share a batch,
        // web's change before db's, though db comes first in DN order.
        h.place("h2", "web.app#2");
        sleep(Duration::from_millis(10)).await;
        h.place("h3", "web.app#3");
        sleep(Duration::from_millis(10)).await;
        h.place("h3", "db.app#4");
        until("the batch applied", || async {
            h.members(DB).await == dns(&["h3"])
        })
        .await;
        let order: Vec<Dn> = h
            .dir
            .calls()
            .iter()
            .filter_map(|c| match c {
                Call::Modify { group, .. } => Some(group.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(order[order.len() - 2..], [dn(WEB), dn(DB)]);
        assert_eq!(h.members(WEB).await, dns(&["h1", "h2", "h3"]));
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_is_applied_one_window_after_it_came() {
        let (_guard, root) = tree();
        fill(&root);
        let hosts: Vec<String> = (2..42).map(|i| format!("h{i}")).collect();
        for host in &hosts {
            write_server(&root, host);
        }
        let h = Harness::start(&root, &["--batch-window=100ms"]);
        h.ready().await;

        // The first change goes at once; the stream right behind it never
        // leaves a quiet window, but the directory keeps up, so nothing is
        // gained by holding a change back for more than a window.
        h.place("h1", "db.app#1");
        for (i, host) in hosts.iter().enumerate() {
            h.place(host, "web.app#2");
            sleep(Duration::from_millis(50)).await;
            if i >= 2 {
                let two_windows_ago = dn(&host_dn(&hosts[i - 2]));
                assert!(
                    h.members(WEB).await.contains(&two_windows_ago),
                    "change {} applied, 150 ms after it came",
                    i - 2
                );
            }
        }
        assert_eq!(h.members(DB).await, dns(&["h1"]));
        h.stop().await;
    }

    /// The daemon with a 100 ms window on a directory whose every Modify
    /// takes 400 ms, past its initial sync.
    async fn slow_directory(root: &std::path::Path) -> (Harness, std::sync::Arc<Gated>) {
        let (gated, setup) = gated(None);
        gated.answer_after(Duration::from_millis(400));
        let h = Harness::start_with(root, run_config(root, &["--batch-window=100ms"]), setup);
        h.ready().await;
        (h, gated)
    }

    #[tokio::test(start_paused = true)]
    async fn a_directory_slower_than_the_changes_gets_them_gathered() {
        let (_guard, root) = tree();
        fill(&root);
        for host in ["h2", "h3", "h4"] {
            write_server(&root, host);
        }
        let (h, _gated) = slow_directory(&root).await;
        let before = h.passes();

        // Idle: the first change is written at once, and takes 400 ms: a
        // group costs the directory more than a window.
        h.place("h2", "web.app#2");
        sleep(Duration::from_millis(10)).await;
        h.place("h3", "db.app#3");
        // When that pass ends, the batch behind it would take longer to
        // write than it has waited: it waits, and takes this change too.
        sleep(Duration::from_millis(440)).await;
        h.place("h4", "web.app#4");
        until("every change applied", || async {
            h.members(DB).await == dns(&["h3"]) && h.members(WEB).await.len() == 3
        })
        .await;
        assert_eq!(
            h.passes() - before,
            2,
            "the first change alone, then one pass for the two behind it"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_that_failed_fast_does_not_make_a_slow_directory_look_quick() {
        let (_guard, root) = tree();
        fill(&root);
        for host in ["h2", "h3", "h4", "h5", "h6"] {
            write_server(&root, host);
        }
        let (h, gated) = slow_directory(&root).await;

        // A group costs the directory 400 ms.
        h.place("h2", "web.app#2");
        until("web applied", || async { h.members(WEB).await.len() == 2 }).await;
        // Then a Modify fails at once, as one to a server left alone
        // after a timeout does: a pass that wrote nothing, in no time.
        gated.refuse_next(DirError::Stalled {
            op: Op::Modify,
            message: "the server stopped answering".into(),
        });
        sleep(Duration::from_millis(200)).await;
        h.place("h3", "db.app#3");
        until("db applied by its retries", || async {
            h.members(DB).await == dns(&["h3"])
        })
        .await;
        sleep(Duration::from_millis(200)).await;
        let before = h.passes();

        // The directory is as slow as ever: the batch behind the first
        // change is still gathered.
        h.place("h4", "web.app#4");
        sleep(Duration::from_millis(10)).await;
        h.place("h5", "db.app#5");
        sleep(Duration::from_millis(440)).await;
        h.place("h6", "web.app#6");
        until("every change applied", || async {
            h.members(DB).await == dns(&["h3", "h5"]) && h.members(WEB).await.len() == 4
        })
        .await;
        assert_eq!(
            h.passes() - before,
            2,
            "the first change alone, then one pass for the two behind it"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_retried_with_backoff_until_it_succeeds() {
        let (_guard, root) = tree();
        fill(&root);
        let h = Harness::start(&root, &[]);
        h.ready().await;
        // More failures than one pass tries (5): the daemon's own retry
        // with backoff has to come back for it.
        let busy = DirError::Result {
            op: Op::Modify,
            dn: DB.into(),
            code: rc::BUSY,
            message: "busy".into(),
        };
        h.dir.fail_next_modify(Some(dn(DB)), busy, 7);
        h.place("h1", "db.app#1");
        until("applied after the retries", || async {
            h.members(DB).await == dns(&["h1"])
        })
        .await;
        assert_eq!(h.modifies(DB), 8, "7 refused, then applied");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_write_is_retried_until_the_desired_state_changes() {
        let (_guard, root) = tree();
        fill(&root);
        let h = Harness::start(&root, &[]);
        h.ready().await;
        let busy = DirError::Result {
            op: Op::Modify,
            dn: DB.into(),
            code: rc::BUSY,
            message: "busy".into(),
        };
        h.dir.fail_next_modify(Some(dn(DB)), busy, usize::MAX);
        h.place("h1", "db.app#1");
        until("retried pass after pass", || async { h.modifies(DB) >= 12 }).await;

        // Nothing to write for db any more: the retries stop.
        h.unplace("h1", "db.app#1");
        sleep(Duration::from_secs(60)).await;
        let tried = h.modifies(DB);
        sleep(Duration::from_secs(300)).await;
        assert_eq!(h.modifies(DB), tried, "no retry once nothing is to do");
        assert!(h.members(DB).await.is_empty());
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn deletions_the_guard_refuses_stay_pending_until_a_pass_allows_them() {
        let (_guard, root) = tree();
        fill(&root);
        std::fs::write(root.join("placement/h1/db.app#1"), "{}").expect("placement");
        write_server(&root, "h2");
        let h = Harness::start(&root, &["--max-delete=1", "--resync-interval=1m"]);
        h.ready().await;
        assert_eq!(h.members(DB).await, dns(&["h1"]));

        // One event, two deletions (h1 leaves web and db): more than
        // --max-delete allows in one batch.
        h.remove_server("h1");
        until("the deletions refused", || async {
            h.metrics.refused_deletions_pending.get() == 2
        })
        .await;
        assert!(h.metrics.guard_refusals.get() >= 1);
        assert_eq!(h.members(WEB).await, dns(&["h1"]), "kept, not forgotten");
        assert_eq!(h.members(DB).await, dns(&["h1"]));

        // A batch of web alone deletes one value: within the guard, so
        // web's pending deletion goes with it.
        h.place("h2", "web.app#2");
        until("web's deletion applied", || async {
            h.members(WEB).await == dns(&["h2"])
        })
        .await;
        assert_eq!(h.metrics.refused_deletions_pending.get(), 1);
        assert_eq!(h.members(DB).await, dns(&["h1"]), "db's still pending");

        // The next full sync plans one deletion: allowed, applied.
        until("db's deletion applied by the resync", || async {
            h.members(DB).await.is_empty()
        })
        .await;
        assert_eq!(h.metrics.refused_deletions_pending.get(), 0);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_group_is_looked_up_later_at_most_once_a_minute() {
        let (_guard, root) = tree();
        fill(&root);
        std::fs::write(root.join("placement/h1/api.app#1"), "{}").expect("placement");
        for host in ["h2", "h3", "h4"] {
            write_server(&root, host);
        }
        let h = Harness::start(&root, &[]);
        h.ready().await;
        assert_eq!(h.metrics.missing_groups.get(), 1, "api has no group");
        let lookups = || {
            h.dir
                .calls()
                .iter()
                .filter(|c| matches!(c, Call::FindGroup { name, .. } if name == "api-gmsa-hosts"))
                .count()
        };

        // A change of api looks its group up: still missing.
        h.place("h2", "api.app#2");
        until("looked up", || async { lookups() == 1 }).await;

        // The group is created; a change within the minute does not look
        // again.
        let api = "CN=api-gmsa-hosts,OU=Groups,DC=ad,DC=com";
        let mut records = h.dir.records();
        records.push(Record {
            dn: api.into(),
            attrs: vec![
                ("objectClass".to_owned(), "group".to_owned()),
                ("sAMAccountName".to_owned(), "api-gmsa-hosts".to_owned()),
            ],
        });
        h.dir.reset(parse_dns(records));
        h.place("h3", "api.app#3");
        sleep(Duration::from_secs(5)).await;
        assert_eq!(lookups(), 1, "not again within the minute");
        assert!(h.members(api).await.is_empty());

        // A minute later the next change finds it, and the group gets
        // every host api runs on.
        sleep(Duration::from_secs(60)).await;
        h.place("h4", "api.app#4");
        until("found and applied", || async {
            h.members(api).await == dns(&["h1", "h2", "h3", "h4"])
        })
        .await;
        assert_eq!(lookups(), 2);
        assert_eq!(h.metrics.missing_groups.get(), 0);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_leaving_scope_removes_every_contribution() {
        let (_guard, root) = tree();
        fill(&root);
        for instance in ["web.app#2", "db.app#1"] {
            std::fs::write(root.join("placement/h1").join(instance), "{}").expect("placement");
        }
        let h = Harness::start(&root, &[]);
        h.ready().await;
        assert_eq!(h.members(DB).await, dns(&["h1"]));

        // Its partition changes: out of scope, whatever its counts.
        h.send(Change::Tree(TreeEvent::ServerUpserted {
            host: crate::model::HostName::new("h1").expect("host"),
            info: Ok(ServerInfo {
                partition: Some("p2".into()),
                dc: Some("dc".into()),
                dn: Some(host_dn("h1")),
            }),
        }));
        until("removed from both groups", || async {
            h.members(WEB).await.is_empty() && h.members(DB).await.is_empty()
        })
        .await;
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_read_of_every_group_is_tried_again_and_not_ready_meanwhile() {
        let (_guard, root) = tree();
        fill(&root);
        let dir = memory_directory();
        let unavailable = DirError::Result {
            op: Op::Search,
            dn: "OU=Groups,DC=ad,DC=com".into(),
            code: rc::UNAVAILABLE,
            message: "unavailable".into(),
        };
        dir.fail_next_read(unavailable, 1);
        let setup = Setup {
            dir: Some(dir),
            ..Setup::default()
        };
        let h = Harness::start_with(&root, run_config(&root, &[]), setup);
        until("the failed read shown", || async {
            let (_, body) = h.metrics.readiness();
            body.contains("reading the groups:")
        })
        .await;
        assert!(h.members(WEB).await.is_empty());
        h.ready().await;
        assert_eq!(h.members(WEB).await, dns(&["h1"]), "applied once read");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_finds_drift_and_repairs_it() {
        let (_guard, root) = tree();
        fill(&root);
        let h = Harness::start(&root, &["--resync-interval=1s"]);
        h.ready().await;
        let h1 = dn(H1);
        // Someone removes the host by hand; no tree change says so.
        h.dir
            .modify_members(
                &dn(WEB),
                &MemberChange {
                    add: vec![],
                    delete: vec![h1.clone()],
                },
            )
            .await
            .expect("manual edit");
        assert!(h.members(WEB).await.is_empty());
        until("the resync repaired the drift", || async {
            h.members(WEB).await.contains(&h1)
        })
        .await;
        assert!(h.metrics.resyncs.get() >= 2);
        h.stop().await;
    }
}
