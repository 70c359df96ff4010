//! When the daemon does what: the dirty proids and the batch window, the
//! retries of failed proids with their backoff, when the next full sync is
//! due and when a missing group may be looked up again.
//!
//! Pure timing, no I/O: every decision takes the current [`Instant`] and
//! returns what is due, so the daemon's timing rules are tested in paused
//! time. The loop asks [`Schedule::next_wake`] how long it may sleep.
//!
//! The batch window adapts: when the daemon is idle (no batch in flight,
//! no change within the last window) the first change is due at once, so
//! an isolated change is applied in milliseconds. Changes that come while
//! a batch is in flight, or within a window of the last change, open a
//! batch that is due one window later. When that window ends, the batch
//! waits one more window only while the daemon is behind: the window
//! brought changes, and writing the batch would take longer than it has
//! waited so far, at the quickest write time per group of the last
//! [`WRITE_RATES_KEPT`] passes (the quickest, so that one pass slowed by
//! a busy server does not hold the batches after it back).
//! Then the directory cannot keep up, the changes would queue anyway, and
//! gathering them saves Modifies: a burst costs about one Modify per
//! changed group. A directory that keeps up gets each change one window
//! after it came, however steady the stream. Never more than
//! [`MAX_BATCH_WAITS`] windows after the first change of the batch.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::model::Proid;

/// A coalesced batch waits at most this many batch windows.
pub const MAX_BATCH_WAITS: u32 = 10;
/// How many passes' write times per group the schedule remembers.
pub const WRITE_RATES_KEPT: usize = 8;
/// How often the group of a proid without one is looked up between full syncs.
pub const MISSING_LOOKUP_EVERY: Duration = Duration::from_secs(60);
/// The shortest wait before a failed proid is tried again.
const MIN_RETRY_DELAY: Duration = Duration::from_millis(50);
/// A retry taken into a batch is parked this far ahead until the batch
/// says how it went.
const PARKED: Duration = Duration::from_secs(24 * 3600);

/// Where one proid's latency clock started: when its first unapplied
/// change came.
pub type Dirty = BTreeMap<Proid, Instant>;

/// The daemon's timing state.
#[derive(Debug)]
pub struct Schedule {
    window: Duration,
    resync_interval: Duration,
    backoff: Backoff,
    dirty: Dirty,
    /// When the first change of the pending batch came.
    batch_opened: Option<Instant>,
    /// When the pending batch is due: at once, or when its window ends.
    batch_due: Option<Instant>,
    /// Changes since the batch's window was last looked at.
    window_changes: u64,
    /// Write time per group of the last passes, newest last.
    write_rates: VecDeque<Duration>,
    /// When the last change came, batched or not.
    last_change: Option<Instant>,
    /// A batch or full sync is being written.
    in_flight: bool,
    /// Failed proids: when to try again and how many times each failed.
    retries: BTreeMap<Proid, (Instant, u32)>,
    full_sync_due: Instant,
    /// When a missing group was last looked up, by proid key.
    looked_up: HashMap<String, Instant>,
}

impl Schedule {
    /// A schedule with the first full sync due at `now`.
    pub fn new(
        window: Duration,
        resync_interval: Duration,
        backoff: Backoff,
        now: Instant,
    ) -> Self {
        Schedule {
            window,
            resync_interval,
            backoff,
            dirty: Dirty::new(),
            batch_opened: None,
            batch_due: None,
            window_changes: 0,
            write_rates: VecDeque::with_capacity(WRITE_RATES_KEPT),
            last_change: None,
            in_flight: false,
            retries: BTreeMap::new(),
            full_sync_due: now,
            looked_up: HashMap::new(),
        }
    }

    /// Marks a proid for the next batch; `at` starts its latency clock
    /// (kept from its first unapplied change).
    pub fn mark_dirty(&mut self, proid: Proid, at: Instant, now: Instant) {
        self.dirty.entry(proid).or_insert(at);
        let idle = !self.in_flight
            && self.batch_due.is_none()
            && self
                .last_change
                .is_none_or(|last| now.saturating_duration_since(last) >= self.window);
        // Changes may be marked a little out of the order they came in
        // (a rescan's among those queued): the latest is the last.
        self.last_change = Some(self.last_change.map_or(now, |last| last.max(now)));
        if idle {
            self.batch_opened = Some(now);
            self.batch_due = Some(now);
            return;
        }
        match self.batch_due {
            // Counted for the window's end; a batch already due (the idle
            // fast path, the max wait) stays due: later changes join it
            // rather than delay it.
            Some(_) => self.window_changes += 1,
            None => {
                self.batch_opened = Some(now);
                self.batch_due = Some(now + self.window);
                self.window_changes = 1;
            }
        }
    }

    /// How many proids are dirty.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// When the pending batch is due, if there is one.
    pub fn batch_due(&self) -> Option<Instant> {
        self.batch_due
    }

    /// True when a batch is due at `now`. A batch whose window has ended
    /// waits another window instead when its window's changes say that
    /// waiting pays (see the module's documentation).
    pub fn batch_ready(&mut self, now: Instant) -> bool {
        let (Some(due), Some(opened)) = (self.batch_due, self.batch_opened) else {
            return false;
        };
        if due > now {
            return false;
        }
        let latest = opened + self.window * MAX_BATCH_WAITS;
        let behind = self.write_time(self.dirty.len()) > now.saturating_duration_since(opened);
        if due > opened && self.window_changes > 0 && behind && now < latest {
            self.batch_due = Some((now + self.window).min(latest));
            self.window_changes = 0;
            return false;
        }
        true
    }

    /// A pass wrote `groups` groups in `took`.
    pub fn wrote(&mut self, groups: usize, took: Duration) {
        let Ok(groups) = u32::try_from(groups) else {
            return;
        };
        if groups == 0 {
            return;
        }
        if self.write_rates.len() == WRITE_RATES_KEPT {
            self.write_rates.pop_front();
        }
        self.write_rates.push_back(took / groups);
    }

    /// How long writing `groups` groups is expected to take, at the
    /// quickest rate of the last passes (none yet: no time).
    fn write_time(&self, groups: usize) -> Duration {
        let per_group = self.write_rates.iter().min().copied().unwrap_or_default();
        per_group.saturating_mul(u32::try_from(groups).unwrap_or(u32::MAX))
    }

    /// How many groups the directory writes in one batch window at the
    /// quickest rate of the last passes; `None` before any pass said.
    pub fn groups_per_window(&self) -> Option<usize> {
        let per_group = self.write_rates.iter().min().copied()?;
        if per_group.is_zero() {
            return None;
        }
        let groups = self.window.as_nanos() / per_group.as_nanos();
        Some(usize::try_from(groups).unwrap_or(usize::MAX).max(1))
    }

    /// A full sync is being written again, after a batch written between
    /// two of its parts.
    pub fn writing(&mut self) {
        self.in_flight = true;
    }

    /// Takes the dirty proids for a batch and marks it in flight.
    pub fn take_batch(&mut self) -> Dirty {
        self.batch_due = None;
        self.batch_opened = None;
        self.window_changes = 0;
        self.in_flight = true;
        std::mem::take(&mut self.dirty)
    }

    /// The batch or full sync in flight is done (or abandoned).
    pub fn finished(&mut self) {
        self.in_flight = false;
    }

    /// A proid was not fully applied: try again after the backoff for its
    /// number of failures so far.
    pub fn failed(&mut self, proid: Proid, now: Instant) {
        let attempt = self.retries.get(&proid).map_or(0, |(_, n)| *n);
        let delay = self.backoff.delay(attempt).max(MIN_RETRY_DELAY);
        self.retries.insert(proid, (now + delay, attempt + 1));
    }

    /// A proid is reconciled: no retry pending any more.
    pub fn succeeded(&mut self, proid: &Proid) {
        self.retries.remove(proid);
    }

    /// How many times a proid has failed since it last succeeded.
    pub fn failures(&self, proid: &Proid) -> u32 {
        self.retries.get(proid).map_or(0, |(_, n)| *n)
    }

    /// Marks the proids whose retry is due dirty; their failure count
    /// stays until they succeed.
    pub fn promote_due_retries(&mut self, now: Instant) {
        let due: Vec<Proid> = self
            .retries
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for proid in due {
            if let Some((at, _)) = self.retries.get_mut(&proid) {
                *at = now + PARKED;
            }
            self.mark_dirty(proid, now, now);
        }
    }

    /// When the next retry is due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retries.values().map(|(due, _)| *due).min()
    }

    /// True when a full sync is due at `now`.
    pub fn full_sync_ready(&self, now: Instant) -> bool {
        now >= self.full_sync_due
    }

    /// Asks for a full sync at `now` (a new leadership, a tree readable
    /// again, a change the index cannot follow).
    pub fn full_sync_now(&mut self, now: Instant) {
        self.full_sync_due = now;
    }

    /// The groups could not be read: try the full sync again after
    /// `delay`.
    pub fn full_sync_failed(&mut self, now: Instant, delay: Duration) {
        self.full_sync_due = now + delay;
    }

    /// A full sync starts: it compares every proid, so what was dirty, the
    /// pending batch, retries and lookups are covered by it. Returns the
    /// latency clocks of the proids that were dirty.
    pub fn full_sync_started(&mut self) -> Dirty {
        self.looked_up.clear();
        self.retries.clear();
        // The changes so far are part of this full sync, so they do not
        // make the next one wait for a window.
        self.last_change = None;
        self.take_batch()
    }

    /// A resync starts: it compares every proid, so retries and lookups
    /// are covered by it, but it leaves the dirty proids to the batches
    /// written between its parts. Returns those.
    pub fn resync_started(&mut self) -> std::collections::BTreeSet<Proid> {
        self.looked_up.clear();
        self.retries.clear();
        self.in_flight = true;
        self.dirty.keys().cloned().collect()
    }

    /// A full sync ended; the next is due one resync interval from `now`.
    pub fn full_sync_done(&mut self, now: Instant) {
        self.in_flight = false;
        self.full_sync_due = now + self.resync_interval;
    }

    /// Whether the group of a proid that has none may be looked up at
    /// `now` (at most once per [`MISSING_LOOKUP_EVERY`]); a yes counts as
    /// the lookup.
    pub fn lookup_due(&mut self, key: &str, now: Instant) -> bool {
        let due = self
            .looked_up
            .get(key)
            .is_none_or(|at| now >= *at + MISSING_LOOKUP_EVERY);
        if due {
            self.looked_up.insert(key.to_owned(), now);
        }
        due
    }

    /// The group of a proid was found: no more lookups for it.
    pub fn found(&mut self, key: &str) {
        self.looked_up.remove(key);
    }

    /// This replica stopped writing: nothing pending survives into a later
    /// leadership, which starts with a full sync.
    pub fn stop_writing(&mut self) {
        self.batch_due = None;
        self.batch_opened = None;
        self.retries.clear();
    }

    /// The earliest of the due times the caller asks for: the batch, the
    /// next retry and the full sync (when writing).
    pub fn next_wake(&self, writing: bool, batches: bool) -> Option<Instant> {
        if !writing {
            return None;
        }
        let batch = self.batch_due.filter(|_| batches);
        [Some(self.full_sync_due), batch, self.next_retry()]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const WINDOW: Duration = Duration::from_millis(100);

    fn proid(name: &str) -> Proid {
        Proid::new(name).expect("proid")
    }

    fn schedule() -> Schedule {
        let backoff = Backoff {
            attempts: 5,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
            jitter: crate::backoff::Jitter::Full,
        };
        Schedule::new(WINDOW, Duration::from_secs(600), backoff, Instant::now())
    }

    /// Takes the first full sync so that batches are what is left.
    fn synced() -> Schedule {
        let mut s = schedule();
        s.full_sync_started();
        s.full_sync_done(Instant::now());
        s
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_fast_path_applies_an_isolated_change_at_once() {
        let mut s = synced();
        let now = Instant::now();
        s.mark_dirty(proid("web"), now, now);
        assert!(s.batch_ready(now), "due at once, not after the window");
        let batch = s.take_batch();
        assert_eq!(batch.keys().collect::<Vec<_>>(), vec![&proid("web")]);
        s.finished();

        // A window later the daemon is idle again: the next change too is
        // applied at once.
        advance(WINDOW).await;
        let now = Instant::now();
        s.mark_dirty(proid("db"), now, now);
        assert!(s.batch_ready(now));
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_change_after_a_full_sync_is_applied_at_once() {
        let mut s = schedule();
        let now = Instant::now();
        // The startup scan's changes, then the full sync that covers them.
        s.mark_dirty(proid("web"), now, now);
        s.full_sync_started();
        s.full_sync_done(now);
        s.mark_dirty(proid("db"), now, now);
        assert!(s.batch_ready(now));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_while_a_batch_is_in_flight_coalesce_for_the_window() {
        let mut s = synced();
        let now = Instant::now();
        s.mark_dirty(proid("web"), now, now);
        s.take_batch();
        // In flight: the burst that follows waits for a quiet window.
        advance(Duration::from_millis(2)).await;
        for name in ["a", "b", "c"] {
            let now = Instant::now();
            s.mark_dirty(proid(name), now, now);
        }
        let now = Instant::now();
        assert!(!s.batch_ready(now));
        assert_eq!(s.batch_due(), Some(now + WINDOW));
        s.finished();
        advance(WINDOW).await;
        assert!(s.batch_ready(Instant::now()));
        assert_eq!(s.take_batch().len(), 3, "one batch for the burst");
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_within_the_window_of_the_last_one_coalesces() {
        let mut s = synced();
        let now = Instant::now();
        s.mark_dirty(proid("web"), now, now);
        s.take_batch();
        s.finished();
        advance(WINDOW / 2).await;
        let now = Instant::now();
        s.mark_dirty(proid("db"), now, now);
        assert!(!s.batch_ready(now), "not idle: the last change was recent");
        assert_eq!(s.batch_due(), Some(now + WINDOW));
    }

    #[tokio::test(start_paused = true)]
    async fn changes_joining_a_due_batch_do_not_delay_it() {
        let mut s = synced();
        let now = Instant::now();
        s.mark_dirty(proid("web"), now, now);
        s.mark_dirty(proid("db"), now, now);
        assert!(s.batch_ready(now));
        assert_eq!(s.take_batch().len(), 2);
    }

    /// Opens a coalescing batch of `groups` proids, `p0` and on: a first
    /// change goes at once and is in flight, the next ones open the batch.
    /// Returns when it opened.
    fn open_batch(s: &mut Schedule, groups: usize) -> Instant {
        let now = Instant::now();
        s.mark_dirty(proid("first"), now, now);
        s.take_batch();
        for i in 0..groups {
            s.mark_dirty(proid(&format!("p{i}")), now, now);
        }
        s.finished();
        now
    }

    /// Marks one change every `every`, the `i`th on `name(i)`, until the
    /// batch is ready; returns when.
    async fn stream_until_ready(
        s: &mut Schedule,
        every: Duration,
        name: impl Fn(usize) -> String,
    ) -> Instant {
        for i in 1..1000 {
            advance(every).await;
            let now = Instant::now();
            if s.batch_ready(now) {
                return now;
            }
            s.mark_dirty(proid(&name(i)), now, now);
        }
        panic!("the batch never came due");
    }

    #[tokio::test(start_paused = true)]
    async fn coalescing_waits_at_most_ten_windows() {
        let mut s = synced();
        // A directory far slower than the stream: always behind.
        s.wrote(1, Duration::from_secs(1));
        let opened = open_batch(&mut s, 1);
        let taken = stream_until_ready(&mut s, WINDOW / 10, |i| format!("p{i}")).await;
        assert_eq!(taken - opened, WINDOW * MAX_BATCH_WAITS);
        assert_eq!(s.take_batch().len(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn a_directory_that_keeps_up_gets_a_steady_stream_one_window_after_it_came() {
        let mut s = synced();
        // 0.1 ms a group: ten groups are written long before they waited
        // a window.
        s.wrote(100, Duration::from_millis(10));
        let opened = open_batch(&mut s, 1);
        let taken = stream_until_ready(&mut s, WINDOW / 10, |i| format!("p{}", i % 3)).await;
        assert_eq!(taken - opened, WINDOW);
        assert_eq!(s.take_batch().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn before_any_write_a_batch_goes_when_its_window_ends() {
        let mut s = synced();
        let opened = open_batch(&mut s, 1);
        let taken = stream_until_ready(&mut s, WINDOW / 10, |i| format!("p{i}")).await;
        assert_eq!(taken - opened, WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_takes_longer_to_write_than_it_waited_waits_another_window() {
        let mut s = synced();
        // 30 ms a group, so five groups take 150 ms: more than the window
        // they waited.
        s.wrote(2, Duration::from_millis(60));
        let opened = open_batch(&mut s, 5);
        advance(WINDOW).await;
        assert!(!s.batch_ready(Instant::now()), "behind: gathering more");
        assert_eq!(s.batch_due(), Some(opened + 2 * WINDOW));
        // The next window brings nothing: quiet, the batch goes.
        advance(WINDOW).await;
        assert!(s.batch_ready(Instant::now()));
        assert_eq!(s.take_batch().len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn one_pass_slowed_by_a_busy_server_does_not_hold_the_next_batch_back() {
        let mut s = synced();
        // Quick passes (1 ms a group), then one that a stalled server made
        // take a second a group.
        s.wrote(10, Duration::from_millis(10));
        s.wrote(10, Duration::from_secs(10));
        open_batch(&mut s, 5);
        advance(WINDOW).await;
        assert!(
            s.batch_ready(Instant::now()),
            "the quickest recent rate counts"
        );

        // A server slow for every remembered pass is slow: gathered.
        s.take_batch();
        s.finished();
        for _ in 0..WRITE_RATES_KEPT {
            s.wrote(10, Duration::from_secs(10));
        }
        open_batch(&mut s, 2);
        advance(WINDOW).await;
        assert!(!s.batch_ready(Instant::now()), "behind");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_written_quicker_than_it_waited_goes_when_its_window_ends() {
        let mut s = synced();
        // 30 ms a group: three groups take 90 ms, less than a window.
        s.wrote(2, Duration::from_millis(60));
        open_batch(&mut s, 3);
        advance(WINDOW).await;
        assert!(
            s.batch_ready(Instant::now()),
            "keeping up: no reason to wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_and_keep_their_count_until_success() {
        let mut s = synced();
        let web = proid("web");
        let now = Instant::now();
        s.failed(web.clone(), now);
        let first = s.next_retry().expect("retry");
        assert!(first >= now + MIN_RETRY_DELAY && first <= now + Duration::from_millis(200));
        assert_eq!(s.failures(&web), 1);

        // Not due yet: nothing is dirty.
        s.promote_due_retries(now);
        assert_eq!(s.dirty_len(), 0);
        advance(first - Instant::now()).await;
        let now = Instant::now();
        s.promote_due_retries(now);
        assert_eq!(s.dirty_len(), 1, "the retry is due: the proid is dirty");
        assert!(s.next_retry().is_some_and(|at| at >= now + PARKED));

        s.take_batch();
        s.finished();
        s.failed(web.clone(), now);
        assert_eq!(s.failures(&web), 2, "the count grows");
        let second = s.next_retry().expect("retry");
        assert!(
            second <= now + Duration::from_millis(400),
            "ceiling doubles"
        );
        s.succeeded(&web);
        assert_eq!((s.failures(&web), s.next_retry()), (0, None));
    }

    #[tokio::test(start_paused = true)]
    async fn missing_groups_are_looked_up_later_at_most_once_a_minute() {
        let mut s = synced();
        let now = Instant::now();
        assert!(s.lookup_due("web", now));
        assert!(!s.lookup_due("web", now), "just looked up");
        advance(MISSING_LOOKUP_EVERY - Duration::from_secs(1)).await;
        assert!(!s.lookup_due("web", Instant::now()));
        advance(Duration::from_secs(1)).await;
        assert!(s.lookup_due("web", Instant::now()), "a minute later");
        s.found("web");
        assert!(
            s.lookup_due("web", Instant::now()),
            "found, then gone again"
        );
        // A full sync reads every group: lookups start afresh.
        s.full_sync_started();
        assert!(s.lookup_due("web", Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_resync_is_due_one_interval_after_the_last() {
        let mut s = schedule();
        let start = Instant::now();
        assert!(
            s.full_sync_ready(start),
            "the first full sync is due at once"
        );
        s.full_sync_started();
        s.full_sync_done(start);
        assert!(!s.full_sync_ready(start));
        advance(Duration::from_secs(600)).await;
        assert!(s.full_sync_ready(Instant::now()));
        // A failed read of the groups is tried again after its delay.
        let now = Instant::now();
        s.full_sync_failed(now, Duration::from_secs(10));
        assert!(!s.full_sync_ready(now));
        assert_eq!(s.next_wake(true, true), Some(now + Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_sync_covers_what_was_dirty_and_keeps_the_latency_clocks() {
        let mut s = synced();
        let at = Instant::now();
        s.mark_dirty(proid("web"), at, at);
        s.failed(proid("db"), at);
        advance(Duration::from_millis(5)).await;
        let clocks = s.full_sync_started();
        assert_eq!(clocks.get(&proid("web")), Some(&at));
        assert_eq!(
            (s.dirty_len(), s.batch_due(), s.next_retry()),
            (0, None, None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_lost_mid_batch_drops_the_pending_work() {
        let mut s = synced();
        let now = Instant::now();
        s.mark_dirty(proid("web"), now, now);
        s.take_batch();
        s.mark_dirty(proid("db"), now, now);
        s.failed(proid("web"), now);
        // The lock is lost while the batch is in flight.
        s.stop_writing();
        s.finished();
        assert_eq!(s.batch_due(), None);
        assert_eq!(s.next_retry(), None);
        assert_eq!(
            s.next_wake(false, true),
            None,
            "a follower waits for nothing"
        );
        // A new leadership starts with a full sync.
        s.full_sync_now(Instant::now());
        assert!(s.full_sync_ready(Instant::now()));
    }
}
