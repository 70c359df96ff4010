//! One reconcile pass, shared by `sync` and the daemon: plan, guard,
//! report missing groups, apply, record.
//!
//! [`Pass::prepare`] compares the desired state with the groups, holds
//! back deletions the mass-deletion guard refuses and reports the proids
//! without a group; [`Pass::apply`] writes what is left through a
//! [`Directory`] and hands every group's result to a [`Recorder`], the one
//! place where a change counts as applied. The two halves are separate
//! because the daemon keeps taking tree changes while the directory works.
//!
//! Applying one group: one Modify per changed group, result codes read for
//! what they mean, transient failures retried with backoff, and an honest
//! account of what was and was not applied. The ladder for one request:
//! send it; a transient failure (busy, unavailable,
//! other, no answer) is retried with exponential backoff and jitter; any
//! other failure re-reads the group and re-plans the request against what
//! is really there (a vanished group is dropped with a warning); if the
//! re-planned request fails too, values are sent one by one, where
//! "already there" and "already gone" answers count as success. A value is
//! only reported as applied when the directory said so or a re-read shows
//! it in the desired state.
//!
//! Before the first Modify of a pass leaves, the recorder is told every
//! change the pass is about to send ([`Recorder::intend`]): the audit
//! trail writes them down, so a writer killed with requests in flight
//! still leaves a record of what the directory may have applied.
//!
//! A writer that may lose the right to write (the daemon's leadership)
//! applies through [`Pass::apply_while`]: its check is asked right before
//! every Modify leaves, and once it says no nothing more is sent, while
//! the requests already sent are answered and recorded as usual.

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::directory::{rc, Capabilities, DirError, Directory, Group, MemberChange, Op};
use crate::index::Index;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::model::{Dn, GroupPattern, Proid};
use crate::plan::{guard, plan, GroupChange, GuardOptions, Plan, Scope};

pub use crate::backoff::Backoff;

/// How plans are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Values per Modify request at most; larger changes are split.
    pub max_values_per_modify: usize,
    /// Retries of transient failures.
    pub backoff: Backoff,
    /// Groups written at the same time (each group is only ever written by
    /// one request at a time).
    pub concurrency: usize,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            max_values_per_modify: 1000,
            backoff: Backoff::default(),
            concurrency: 8,
        }
    }
}

/// What happened to one group's change.
#[derive(Debug, Clone)]
pub struct GroupResult {
    /// The change as planned.
    pub planned: GroupChange,
    /// The values now in the desired state: applied, or found already so.
    pub applied: GroupChange,
    /// What is still to do and the last error, if anything failed.
    pub failed: Option<(GroupChange, DirError)>,
    /// The group no longer exists; nothing more to do for it.
    pub vanished: bool,
    /// Modify requests sent.
    pub requests: usize,
    /// Retries after transient failures.
    pub retries: usize,
    /// A Modify of this group got no answer: what failed may have been
    /// applied all the same.
    pub unanswered: bool,
    /// When the directory held this result: the last answer for the
    /// group, or the save of a directory that saves at commit. `None`
    /// when nothing was sent (a dry run).
    pub settled: Option<Instant>,
}

impl GroupResult {
    fn new(planned: &GroupChange) -> Self {
        GroupResult {
            planned: planned.clone(),
            applied: GroupChange {
                add: BTreeSet::new(),
                delete: BTreeSet::new(),
                ..planned.clone()
            },
            failed: None,
            vanished: false,
            requests: 0,
            retries: 0,
            unanswered: false,
            settled: None,
        }
    }

    /// True when everything planned is now in the desired state (a vanished
    /// group counts as done: there is nothing left to write).
    pub fn is_complete(&self) -> bool {
        self.failed.is_none()
    }

    fn done(&mut self, change: &MemberChange) {
        self.applied.add.extend(change.add.iter().cloned());
        self.applied.delete.extend(change.delete.iter().cloned());
    }

    fn fail(&mut self, change: &MemberChange, err: DirError) {
        let (mut add, mut delete) = match self.failed.take() {
            Some((c, _)) => (c.add, c.delete),
            None => (BTreeSet::new(), BTreeSet::new()),
        };
        add.extend(change.add.iter().cloned());
        delete.extend(change.delete.iter().cloned());
        let change = GroupChange {
            add,
            delete,
            ..self.planned.clone()
        };
        self.failed = Some((change, err));
    }
}

/// Why a pass runs; every record carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Tree changes (a batch of dirty proids).
    Event,
    /// A full sync: every group read and compared.
    FullSync,
    /// A batch re-applying changes that failed before.
    Retry,
    /// A full sync that found a group differing from what the daemon last
    /// knew it held: an edit made by hand.
    Drift,
}

impl Cause {
    /// The name records and logs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Event => "event",
            Cause::FullSync => "full-sync",
            Cause::Retry => "retry",
            Cause::Drift => "drift",
        }
    }
}

/// One group's outcome as the pass records it.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Why the pass ran.
    pub cause: Cause,
    /// Nothing was written: the result is what would have been done.
    pub dry_run: bool,
    /// What happened to the group.
    pub result: &'a GroupResult,
}

/// Takes the records of a pass: the one place where an applied (or
/// failed) change is accounted for, whoever ran the pass.
pub trait Recorder: Send + Sync {
    /// Called once per group the pass wrote or tried to write.
    fn record(&self, record: Record<'_>);

    /// Called once per pass that writes, right before its first Modify
    /// leaves, with every change it is about to send and why: what a
    /// writer killed before the answers come leaves behind. Most
    /// recorders keep nothing of it.
    fn intend(&self, _changes: &[(Cause, &GroupChange)]) {}
}

/// A recorder that keeps nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRecorder;

impl Recorder for NoRecorder {
    fn record(&self, _: Record<'_>) {}
}

/// Two recorders in turn (the daemon's metrics and its audit trail).
impl<A: Recorder + ?Sized, B: Recorder + ?Sized> Recorder for (&A, &B) {
    fn record(&self, record: Record<'_>) {
        self.0.record(record);
        self.1.record(record);
    }

    fn intend(&self, changes: &[(Cause, &GroupChange)]) {
        self.0.intend(changes);
        self.1.intend(changes);
    }
}

/// The daemon's metrics count every Modify request by the outcome of its
/// group (a failure by its LDAP result code's name), and the retries.
impl Recorder for Metrics {
    fn record(&self, record: Record<'_>) {
        let result = record.result;
        let outcome = match &result.failed {
            _ if result.vanished => "vanished",
            Some((_, err)) => err.kind(),
            None => "success",
        };
        self.modify_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc_by(result.requests as u64);
        self.retries.inc_by(result.retries as u64);
    }
}

/// Deletions the mass-deletion guard held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why, as shown to the operator.
    pub reason: String,
    /// The held-back deletions, one entry per group (no additions).
    pub changes: Vec<GroupChange>,
}

/// One reconcile pass: what it will write, what the guard held back, and
/// once applied what happened.
#[derive(Debug, Clone)]
pub struct Pass {
    /// Why the pass runs.
    pub cause: Cause,
    /// Proids whose groups are written for another reason than `cause`
    /// (a retry within an event batch, drift found by a full sync).
    pub causes: BTreeMap<Proid, Cause>,
    /// What is to be written: the plan without refused deletions. Its
    /// `missing_groups` are the proids with placements and no group.
    pub plan: Plan,
    /// Deletions refused by the guard, if it refused any.
    pub refused: Option<Refusal>,
    /// One result per change of `plan`, in plan order, once applied.
    pub results: Vec<GroupResult>,
}

impl Pass {
    /// Plans `scope` from the index and `groups`, lets the guard hold back
    /// deletions, and reports the proids that have placements but no group.
    pub fn prepare<'g>(
        cause: Cause,
        index: &Index,
        groups: impl IntoIterator<Item = &'g Group>,
        pattern: &GroupPattern,
        scope: Scope<'_>,
        limits: &GuardOptions,
    ) -> Pass {
        Pass::from_plan(cause, plan(index, groups, pattern, scope), pattern, limits)
    }

    /// [`Pass::prepare`] for a plan already made.
    pub fn from_plan(
        cause: Cause,
        plan: Plan,
        pattern: &GroupPattern,
        limits: &GuardOptions,
    ) -> Pass {
        for missing in &plan.missing_groups {
            warn!(
                proid = %missing.proid,
                group = %pattern.render(&missing.proid),
                hosts = missing.desired.len(),
                "proid has placements but no group"
            );
        }
        let (plan, refused) = match guard(&plan, limits) {
            None => (plan, None),
            Some(reason) => {
                warn!("mass-deletion guard: {reason}");
                let changes = plan
                    .changes
                    .iter()
                    .filter(|c| !c.delete.is_empty())
                    .map(|c| GroupChange {
                        add: BTreeSet::new(),
                        ..c.clone()
                    })
                    .collect();
                (plan.without_deletions(), Some(Refusal { reason, changes }))
            }
        };
        Pass {
            cause,
            causes: BTreeMap::new(),
            plan,
            refused,
            results: Vec::new(),
        }
    }

    /// Writes the plan (with `dry_run`, pretends to) and records every
    /// group's result.
    pub async fn apply(
        &mut self,
        dir: &dyn Directory,
        options: &ApplyOptions,
        dry_run: bool,
        recorder: &dyn Recorder,
    ) {
        self.apply_while(dir, options, dry_run, recorder, &|| true)
            .await;
    }

    /// [`Pass::apply`], asking `may_write` right before each Modify is
    /// sent: once it says no, what is left is not sent (it fails as
    /// [`not_writing`]), and what was already sent is recorded as answered.
    pub async fn apply_while(
        &mut self,
        dir: &dyn Directory,
        options: &ApplyOptions,
        dry_run: bool,
        recorder: &dyn Recorder,
        may_write: MayWrite<'_>,
    ) {
        self.results = if dry_run {
            self.plan.changes.iter().map(simulated).collect()
        } else if self.plan.changes.is_empty() {
            Vec::new()
        } else {
            // Only a writer that may still write will send anything.
            if may_write() {
                let intents: Vec<(Cause, &GroupChange)> = self
                    .plan
                    .changes
                    .iter()
                    .map(|change| (self.cause_of(&change.proid), change))
                    .collect();
                recorder.intend(&intents);
            }
            apply_plan_while(dir, &self.plan, options, may_write).await
        };
        for result in &self.results {
            recorder.record(Record {
                cause: self.cause_of(&result.planned.proid),
                dry_run,
                result,
            });
        }
    }

    /// Why `proid`'s group is written in this pass.
    pub fn cause_of(&self, proid: &Proid) -> Cause {
        self.causes.get(proid).copied().unwrap_or(self.cause)
    }
}

/// The result a dry run pretends to have had.
fn simulated(change: &GroupChange) -> GroupResult {
    GroupResult {
        planned: change.clone(),
        applied: change.clone(),
        failed: None,
        vanished: false,
        requests: 0,
        retries: 0,
        unanswered: false,
        settled: None,
    }
}

/// Splits a change into requests of at most `max` values, additions first.
pub fn chunks(change: &GroupChange, max: usize) -> Vec<MemberChange> {
    let max = max.max(1);
    let mut out: Vec<MemberChange> = Vec::new();
    let mut current = MemberChange::default();
    let values = change
        .add
        .iter()
        .map(|d| (true, d))
        .chain(change.delete.iter().map(|d| (false, d)));
    for (is_add, dn) in values {
        if current.add.len() + current.delete.len() == max {
            out.push(std::mem::take(&mut current));
        }
        if is_add {
            current.add.push(dn.clone());
        } else {
            current.delete.push(dn.clone());
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Asked right before each Modify is sent: may this writer still write?
pub type MayWrite<'a> = &'a (dyn Fn() -> bool + Sync);

/// Why a Modify was not sent: the writer may no longer write.
pub fn not_writing() -> DirError {
    DirError::Stalled {
        op: Op::Modify,
        message: "this replica may no longer write".into(),
    }
}

/// Applies every change of a plan, `concurrency` groups at a time, then
/// commits. Results come back in plan order.
pub async fn apply_plan(
    dir: &dyn Directory,
    plan: &Plan,
    options: &ApplyOptions,
) -> Vec<GroupResult> {
    apply_plan_while(dir, plan, options, &|| true).await
}

/// [`apply_plan`], asking `may_write` before each Modify.
pub async fn apply_plan_while(
    dir: &dyn Directory,
    plan: &Plan,
    options: &ApplyOptions,
    may_write: MayWrite<'_>,
) -> Vec<GroupResult> {
    let caps = match dir.capabilities().await {
        Ok(caps) => caps,
        Err(err) => {
            warn!(error = %err, "cannot read the directory's capabilities; assuming none");
            Capabilities::default()
        }
    };
    let mut pending = Vec::with_capacity(plan.changes.len());
    for change in &plan.changes {
        pending.push(apply_group_while(dir, caps, change, options, may_write));
    }
    let mut results: Vec<GroupResult> = stream::iter(pending)
        .buffered(options.concurrency.max(1))
        .collect()
        .await;
    if let Err(err) = dir.commit().await {
        warn!(error = %err, "saving the directory failed; nothing was applied");
        for result in &mut results {
            let applied = std::mem::replace(
                &mut result.applied,
                GroupChange {
                    add: BTreeSet::new(),
                    delete: BTreeSet::new(),
                    ..result.planned.clone()
                },
            );
            let all = MemberChange {
                add: applied.add.into_iter().collect(),
                delete: applied.delete.into_iter().collect(),
            };
            result.fail(&all, err.clone());
        }
    } else if dir.saves_on_commit() {
        let saved = Instant::now();
        for result in &mut results {
            result.settled = Some(saved);
        }
    }
    results
}

/// Applies one group's change (see the module documentation for the ladder).
pub async fn apply_group(
    dir: &dyn Directory,
    caps: Capabilities,
    change: &GroupChange,
    options: &ApplyOptions,
) -> GroupResult {
    apply_group_while(dir, caps, change, options, &|| true).await
}

/// [`apply_group`], asking `may_write` before each Modify. What it logs
/// names the group (and the proid, once it is done) in the line itself,
/// not through a span: a span per group, made, entered at every poll and
/// closed, cost the daemon a twentieth of its CPU at a thousand changes a
/// second, and only a line that says something went wrong needs the group.
async fn apply_group_while(
    dir: &dyn Directory,
    caps: Capabilities,
    change: &GroupChange,
    options: &ApplyOptions,
    may_write: MayWrite<'_>,
) -> GroupResult {
    let mut result = GroupResult::new(change);
    let requests = chunks(change, options.max_values_per_modify);
    for (i, request) in requests.iter().enumerate() {
        let sent = apply_request(
            dir,
            caps,
            &change.group_dn,
            request,
            options,
            may_write,
            &mut result,
        );
        match sent.await {
            // The server is away: what is left waits for the next attempt.
            Err(err) if err.is_transient() => {
                for rest in &requests[i + 1..] {
                    result.fail(rest, err.clone());
                }
                break;
            }
            // Values the server refuses (recorded as failed) must not
            // hold back the rest of a large change.
            Err(_) | Ok(()) => {}
        }
        if result.vanished {
            break;
        }
    }
    match &result.failed {
        None if result.vanished => {}
        None => debug!(
            proid = %change.proid,
            group = %change.group_dn,
            adds = change.add.len(),
            deletes = change.delete.len(),
            "applied"
        ),
        Some((left, err)) => warn!(
            proid = %change.proid,
            group = %change.group_dn,
            error = %err,
            not_added = left.add.len(),
            not_deleted = left.delete.len(),
            "not fully applied"
        ),
    }
    result.settled = Some(Instant::now());
    result
}

/// Sends one request through the ladder. `Err` means the request is not
/// complete and has been recorded as failed in `result`.
async fn apply_request(
    dir: &dyn Directory,
    caps: Capabilities,
    group: &Dn,
    request: &MemberChange,
    options: &ApplyOptions,
    may_write: MayWrite<'_>,
    result: &mut GroupResult,
) -> Result<(), DirError> {
    let first = send(dir, group, request, options, may_write, result).await;
    let err = match first {
        Ok(()) => {
            result.done(request);
            return Ok(());
        }
        Err(err) if err.is_transient() => {
            result.fail(request, err.clone());
            return Err(err);
        }
        Err(err) => err,
    };
    // Samba lists the permissive-modify control but ignores it for
    // `member`, so this path is routine there.
    debug!(group = %group, error = %err, permissive = caps.permissive_modify, "modify refused; re-reading the group");
    // Re-read and re-plan: the group may have vanished, or part of the
    // request may already be in place (a server without permissive modify
    // refuses the whole request for one present value).
    let Some(current) = read_group(dir, group, options, result, request).await? else {
        vanished(group, result);
        return Ok(());
    };
    let (already, remaining) = replan(request, &current.members);
    result.done(&already);
    if remaining.is_empty() {
        return Ok(());
    }
    match send(dir, group, &remaining, options, may_write, result).await {
        Ok(()) => {
            result.done(&remaining);
            Ok(())
        }
        Err(err) if err.is_transient() => {
            result.fail(&remaining, err.clone());
            Err(err)
        }
        Err(_) => value_by_value(dir, group, &remaining, options, may_write, result).await,
    }
}

/// Splits a request into the part already in the desired state and the rest.
fn replan(request: &MemberChange, members: &BTreeSet<Dn>) -> (MemberChange, MemberChange) {
    let (present, add): (Vec<Dn>, Vec<Dn>) = request
        .add
        .iter()
        .cloned()
        .partition(|d| members.contains(d));
    let (delete, absent): (Vec<Dn>, Vec<Dn>) = request
        .delete
        .iter()
        .cloned()
        .partition(|d| members.contains(d));
    (
        MemberChange {
            add: present,
            delete: absent,
        },
        MemberChange { add, delete },
    )
}

/// The last resort: one value per request.
async fn value_by_value(
    dir: &dyn Directory,
    group: &Dn,
    request: &MemberChange,
    options: &ApplyOptions,
    may_write: MayWrite<'_>,
    result: &mut GroupResult,
) -> Result<(), DirError> {
    let singles = request
        .add
        .iter()
        .map(|d| MemberChange {
            add: vec![d.clone()],
            delete: vec![],
        })
        .chain(request.delete.iter().map(|d| MemberChange {
            add: vec![],
            delete: vec![d.clone()],
        }));
    let mut failed = MemberChange::default();
    let mut last_err = None;
    for single in singles {
        match send(dir, group, &single, options, may_write, result).await {
            Ok(()) => result.done(&single),
            Err(err) if already_done(&single, &err) => result.done(&single),
            Err(err) => {
                failed.add.extend(single.add);
                failed.delete.extend(single.delete);
                last_err = Some(err);
            }
        }
    }
    let Some(err) = last_err else {
        return Ok(());
    };
    // Some answers are ambiguous (AD's 53 on delete, 32 for a member whose
    // object does not exist): believe only what the group now holds.
    let Some(current) = read_group(dir, group, options, result, &failed).await? else {
        vanished(group, result);
        return Ok(());
    };
    let (already, remaining) = replan(&failed, &current.members);
    result.done(&already);
    if remaining.is_empty() {
        Ok(())
    } else {
        result.fail(&remaining, err.clone());
        Err(err)
    }
}

/// Result codes that say a single value is already in the desired state.
fn already_done(single: &MemberChange, err: &DirError) -> bool {
    match err.code() {
        Some(rc::ATTRIBUTE_OR_VALUE_EXISTS | rc::ENTRY_ALREADY_EXISTS) => !single.add.is_empty(),
        Some(rc::NO_SUCH_ATTRIBUTE) => !single.delete.is_empty(),
        _ => false,
    }
}

fn vanished(group: &Dn, result: &mut GroupResult) {
    warn!(group = %group, "the group no longer exists; dropping its changes");
    result.vanished = true;
}

/// Sends one Modify, retrying transient failures; asks `may_write` right
/// before each attempt leaves.
async fn send(
    dir: &dyn Directory,
    group: &Dn,
    request: &MemberChange,
    options: &ApplyOptions,
    may_write: MayWrite<'_>,
    result: &mut GroupResult,
) -> Result<(), DirError> {
    let mut retry = 0;
    loop {
        if !may_write() {
            return Err(not_writing());
        }
        result.requests += 1;
        let answer = dir.modify_members(group, request).await;
        // Sent and not answered (a timeout, a connection lost after the
        // request left), as opposed to never sent (no connection).
        if matches!(&answer, Err(DirError::Unreachable { op, .. }) if *op != Op::Connect) {
            result.unanswered = true;
        }
        match answer {
            Err(err) if err.retry_soon() && retry + 1 < options.backoff.attempts => {
                warn!(group = %group, error = %err, retry, "transient failure; retrying");
                tokio::time::sleep(options.backoff.delay(retry)).await;
                retry += 1;
                result.retries += 1;
            }
            other => return other,
        }
    }
}

/// Reads a group, retrying transient failures; a failure marks `pending` as
/// not applied.
async fn read_group(
    dir: &dyn Directory,
    group: &Dn,
    options: &ApplyOptions,
    result: &mut GroupResult,
    pending: &MemberChange,
) -> Result<Option<crate::directory::Group>, DirError> {
    let mut retry = 0;
    loop {
        match dir.read_group(group).await {
            Err(err) if err.retry_soon() && retry + 1 < options.backoff.attempts => {
                tokio::time::sleep(options.backoff.delay(retry)).await;
                retry += 1;
                result.retries += 1;
            }
            Err(err) => {
                result.fail(pending, err.clone());
                return Err(err);
            }
            Ok(group) => return Ok(group),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proid;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("dn")
    }

    fn change(adds: usize, deletes: usize) -> GroupChange {
        GroupChange {
            group_dn: dn("CN=g,DC=x"),
            proid: Proid::new("g").expect("proid"),
            add: (0..adds).map(|i| dn(&format!("CN=a{i:04},DC=x"))).collect(),
            delete: (0..deletes)
                .map(|i| dn(&format!("CN=d{i:04},DC=x")))
                .collect(),
        }
    }

    #[test]
    fn chunking_fills_requests_in_order() {
        assert_eq!(chunks(&change(0, 0), 1000), vec![]);
        let one = chunks(&change(3, 2), 1000);
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].add.len(), one[0].delete.len()), (3, 2));
        let many = chunks(&change(1500, 700), 1000);
        let sizes: Vec<(usize, usize)> =
            many.iter().map(|c| (c.add.len(), c.delete.len())).collect();
        assert_eq!(sizes, [(1000, 0), (500, 500), (0, 200)]);
    }

    use crate::directory::memory::{Call, Flavour, MemoryDirectory};
    use crate::directory::Op;
    use crate::ldif::Record;

    const GROUP: &str = "CN=g,OU=Groups,DC=x";

    fn directory(flavour: Flavour, members: &[&str]) -> MemoryDirectory {
        let mut attrs = vec![
            ("objectClass".to_owned(), "group".to_owned()),
            ("sAMAccountName".to_owned(), "g".to_owned()),
        ];
        attrs.extend(
            members
                .iter()
                .map(|m| ("member".to_owned(), (*m).to_owned())),
        );
        MemoryDirectory::new(
            vec![Record {
                dn: GROUP.into(),
                attrs,
            }],
            flavour,
        )
    }

    fn group_change(add: &[&str], delete: &[&str]) -> GroupChange {
        GroupChange {
            group_dn: dn(GROUP),
            proid: Proid::new("g").expect("proid"),
            add: add.iter().map(|d| dn(d)).collect(),
            delete: delete.iter().map(|d| dn(d)).collect(),
        }
    }

    async fn members(dir: &MemoryDirectory) -> BTreeSet<Dn> {
        dir.read_group(&dn(GROUP))
            .await
            .expect("read")
            .expect("group")
            .members
    }

    fn modifies(dir: &MemoryDirectory) -> usize {
        dir.calls()
            .iter()
            .filter(|c| matches!(c, Call::Modify { .. }))
            .count()
    }

    fn busy() -> DirError {
        DirError::Result {
            op: Op::Modify,
            dn: GROUP.into(),
            code: rc::BUSY,
            message: "busy".into(),
        }
    }

    #[tokio::test]
    async fn one_modify_carries_adds_and_deletes() {
        let dir = directory(Flavour::Permissive, &["CN=old,DC=x"]);
        let change = group_change(&["CN=a,DC=x", "CN=b,DC=x"], &["CN=old,DC=x"]);
        let r = apply_group(
            &dir,
            dir.capabilities().await.expect("caps"),
            &change,
            &ApplyOptions::default(),
        )
        .await;
        assert!(r.is_complete() && !r.vanished);
        assert_eq!(r.applied, change);
        assert_eq!((modifies(&dir), r.requests), (1, 1));
        assert_eq!(members(&dir).await, change.add);
    }

    #[tokio::test]
    async fn present_and_absent_values_are_replanned_without_permissive_modify() {
        for flavour in [Flavour::OpenLdap, Flavour::ActiveDirectory] {
            let dir = directory(flavour, &["CN=a,DC=x", "CN=old,DC=x"]);
            // "a" is already there and "gone" is already gone: the server
            // refuses the whole request; a re-read finds what is left to do.
            let change = group_change(
                &["CN=a,DC=x", "CN=b,DC=x"],
                &["CN=old,DC=x", "CN=gone,DC=x"],
            );
            let caps = dir.capabilities().await.expect("caps");
            assert!(!caps.permissive_modify);
            let r = apply_group(&dir, caps, &change, &ApplyOptions::default()).await;
            assert!(r.is_complete(), "{flavour:?}: {:?}", r.failed);
            assert_eq!(r.applied, change, "{flavour:?}");
            assert_eq!(
                modifies(&dir),
                2,
                "{flavour:?}: the failed batch and the re-planned one"
            );
            assert!(dir
                .calls()
                .iter()
                .any(|c| matches!(c, Call::ReadGroup { .. })));
            assert_eq!(
                members(&dir).await,
                BTreeSet::from([dn("CN=a,DC=x"), dn("CN=b,DC=x")])
            );
        }
    }

    #[tokio::test]
    async fn a_vanished_group_is_dropped() {
        let dir = directory(Flavour::OpenLdap, &[]);
        let mut change = group_change(&["CN=a,DC=x"], &[]);
        change.group_dn = dn("CN=nope,OU=Groups,DC=x");
        let r = apply_group(
            &dir,
            Capabilities::default(),
            &change,
            &ApplyOptions::default(),
        )
        .await;
        assert!(r.vanished);
        assert!(r.is_complete());
        assert!(r.applied.add.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_backoff() {
        let dir = directory(Flavour::Permissive, &[]);
        dir.fail_next_modify(None, busy(), 2);
        let change = group_change(&["CN=a,DC=x"], &[]);
        let r = apply_group(
            &dir,
            Capabilities::default(),
            &change,
            &ApplyOptions::default(),
        )
        .await;
        assert!(r.is_complete());
        assert_eq!((r.retries, r.requests), (2, 3));
        assert_eq!(members(&dir).await, change.add);
    }

    #[tokio::test(start_paused = true)]
    async fn what_was_not_applied_is_reported_as_such() {
        let dir = directory(Flavour::Permissive, &[]);
        let unreachable = DirError::Unreachable {
            op: Op::Modify,
            message: "connection refused".into(),
        };
        dir.fail_next_modify(None, unreachable, 100);
        let change = group_change(&["CN=a,DC=x"], &["CN=b,DC=x"]);
        let options = ApplyOptions::default();
        let r = apply_group(&dir, Capabilities::default(), &change, &options).await;
        let (left, err) = r.failed.clone().expect("failed");
        assert_eq!(left, change);
        assert!(err.is_transient());
        assert!(r.applied.add.is_empty() && r.applied.delete.is_empty());
        assert_eq!(r.requests, options.backoff.attempts as usize);
        assert!(members(&dir).await.is_empty());
    }

    /// A request not sent because the server stopped answering is not
    /// retried within the pass: each retry would be another timeout.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_server_is_not_retried_within_the_pass() {
        let dir = directory(Flavour::Permissive, &[]);
        let stalled = DirError::Stalled {
            op: Op::Connect,
            message: "ldap://dc1: stopped answering".into(),
        };
        assert!(stalled.is_transient() && !stalled.retry_soon());
        dir.fail_next_modify(None, stalled, 100);
        let change = group_change(&["CN=a,DC=x"], &[]);
        let r = apply_group(
            &dir,
            Capabilities::default(),
            &change,
            &ApplyOptions::default(),
        )
        .await;
        let (left, err) = r.failed.clone().expect("failed");
        assert_eq!(left, change);
        assert!(matches!(err, DirError::Stalled { .. }), "{err}");
        assert_eq!((r.requests, r.retries), (1, 0));
    }

    #[tokio::test]
    async fn large_changes_are_split_and_a_failed_chunk_stops_the_rest() {
        let adds: Vec<String> = (0..25).map(|i| format!("CN=h{i:02},DC=x")).collect();
        let refs: Vec<&str> = adds.iter().map(String::as_str).collect();
        let dir = directory(Flavour::Permissive, &[]);
        let change = group_change(&refs, &[]);
        let options = ApplyOptions {
            max_values_per_modify: 10,
            ..ApplyOptions::default()
        };
        let r = apply_group(&dir, Capabilities::default(), &change, &options).await;
        assert!(r.is_complete());
        assert_eq!(modifies(&dir), 3);

        let dir = directory(Flavour::Permissive, &[]);
        let fatal = DirError::Result {
            op: Op::Modify,
            dn: GROUP.into(),
            code: 50,
            message: "insufficient access".into(),
        };
        dir.fail_next_modify(None, fatal, 1000);
        let r = apply_group(&dir, Capabilities::default(), &change, &options).await;
        let (left, _) = r.failed.expect("failed");
        assert_eq!(left.add.len() + r.applied.add.len(), 25);
        assert!(members(&dir).await.is_empty());
        assert!(
            r.applied.add.is_empty(),
            "nothing is reported applied that was not"
        );
    }

    #[tokio::test]
    async fn a_failed_commit_means_nothing_was_applied() {
        let dir = directory(Flavour::Permissive, &[]);
        dir.fail_next_commit(DirError::Fatal("disk full".into()), 1);
        let plan = Plan {
            changes: vec![group_change(&["CN=a,DC=x"], &[])],
            ..Plan::default()
        };
        let results = apply_plan(&dir, &plan, &ApplyOptions::default()).await;
        assert_eq!(results.len(), 1);
        assert!(results[0].applied.add.is_empty());
        assert_eq!(
            results[0].failed.as_ref().map(|(c, _)| c.add.len()),
            Some(1)
        );
    }

    /// Keeps what the pass recorded.
    #[derive(Default)]
    struct Kept(std::sync::Mutex<Vec<(Cause, bool, GroupChange)>>);

    impl Recorder for Kept {
        fn record(&self, record: super::Record<'_>) {
            if let Ok(mut kept) = self.0.lock() {
                kept.push((record.cause, record.dry_run, record.result.applied.clone()));
            }
        }
    }

    fn pattern() -> GroupPattern {
        GroupPattern::parse("{}").expect("pattern")
    }

    /// The changes of one intent, with the number of Modifies the
    /// directory had seen when it came.
    type Declared = (usize, Vec<(Cause, GroupChange)>);

    /// Keeps the intents of a pass.
    struct Intents<'a> {
        dir: &'a MemoryDirectory,
        kept: std::sync::Mutex<Vec<Declared>>,
    }

    impl Recorder for Intents<'_> {
        fn record(&self, _: super::Record<'_>) {}

        fn intend(&self, changes: &[(Cause, &GroupChange)]) {
            let modifies = self
                .dir
                .calls()
                .iter()
                .filter(|call| matches!(call, Call::Modify { .. }))
                .count();
            let changes = changes.iter().map(|(c, g)| (*c, (*g).clone())).collect();
            self.kept.lock().expect("lock").push((modifies, changes));
        }
    }

    #[tokio::test]
    async fn a_pass_declares_every_change_before_its_first_modify_leaves() {
        let dir = directory(Flavour::Permissive, &[]);
        let a = group_change(&["CN=a,DC=x"], &[]);
        let mut b = group_change(&[], &["CN=b,DC=x"]);
        b.group_dn = Dn::parse("CN=other,DC=x").expect("dn");
        b.proid = Proid::new("other").expect("proid");
        let plan = Plan {
            changes: vec![a.clone(), b.clone()],
            ..Plan::default()
        };
        let mut pass = Pass::from_plan(Cause::Event, plan, &pattern(), &GuardOptions::default());
        pass.causes.insert(b.proid.clone(), Cause::Drift);
        let intents = Intents {
            dir: &dir,
            kept: Default::default(),
        };
        pass.apply(&dir, &ApplyOptions::default(), false, &intents)
            .await;
        let kept = intents.kept.into_inner().expect("lock");
        assert_eq!(kept, vec![(0, vec![(Cause::Event, a), (Cause::Drift, b)])]);

        // Nothing to send, nothing declared: a dry run, a writer that may
        // no longer write, an empty plan.
        for (dry_run, may) in [(true, true), (false, false)] {
            let plan = Plan {
                changes: vec![group_change(&["CN=c,DC=x"], &[])],
                ..Plan::default()
            };
            let mut pass =
                Pass::from_plan(Cause::Event, plan, &pattern(), &GuardOptions::default());
            let intents = Intents {
                dir: &dir,
                kept: Default::default(),
            };
            let options = ApplyOptions::default();
            pass.apply_while(&dir, &options, dry_run, &intents, &|| may)
                .await;
            assert!(intents.kept.into_inner().expect("lock").is_empty());
        }
    }

    #[tokio::test]
    async fn a_pass_records_every_applied_group() {
        let dir = directory(Flavour::Permissive, &[]);
        let change = group_change(&["CN=a,DC=x"], &[]);
        let plan = Plan {
            changes: vec![change.clone()],
            ..Plan::default()
        };
        let mut pass = Pass::from_plan(Cause::Event, plan, &pattern(), &GuardOptions::default());
        let kept = Kept::default();
        pass.apply(&dir, &ApplyOptions::default(), false, &kept)
            .await;
        let kept = kept.0.into_inner().expect("lock");
        assert_eq!(kept, vec![(Cause::Event, false, change.clone())]);
        assert_eq!(members(&dir).await, change.add);
    }

    #[tokio::test]
    async fn a_dry_pass_records_without_writing() {
        let dir = directory(Flavour::Permissive, &[]);
        let change = group_change(&["CN=a,DC=x"], &[]);
        let plan = Plan {
            changes: vec![change.clone()],
            ..Plan::default()
        };
        let mut pass = Pass::from_plan(Cause::FullSync, plan, &pattern(), &GuardOptions::default());
        let kept = Kept::default();
        pass.apply(&dir, &ApplyOptions::default(), true, &kept)
            .await;
        assert_eq!(
            kept.0.into_inner().expect("lock"),
            vec![(Cause::FullSync, true, change)]
        );
        assert_eq!(modifies(&dir), 0);
        assert!(members(&dir).await.is_empty());
    }

    #[tokio::test]
    async fn a_pass_holds_back_the_deletions_the_guard_refuses() {
        let old: Vec<String> = (0..12).map(|i| format!("CN=o{i:02},DC=x")).collect();
        let refs: Vec<&str> = old.iter().map(String::as_str).collect();
        let dir = directory(Flavour::Permissive, &refs);
        let plan = Plan {
            changes: vec![group_change(&["CN=new,DC=x"], &refs)],
            groups_compared: 1,
            managed_members: 12,
            ..Plan::default()
        };
        let mut pass = Pass::from_plan(Cause::Event, plan, &pattern(), &GuardOptions::default());
        let refusal = pass.refused.clone().expect("refused");
        assert_eq!(refusal.changes.len(), 1);
        assert_eq!(refusal.changes[0].delete.len(), 12);
        assert!(refusal.changes[0].add.is_empty());
        assert!(pass.plan.changes.iter().all(|c| c.delete.is_empty()));
        pass.apply(&dir, &ApplyOptions::default(), false, &NoRecorder)
            .await;
        let now = members(&dir).await;
        assert!(now.contains(&dn("CN=new,DC=x")));
        assert_eq!(now.len(), 13, "nothing deleted");
    }

    #[tokio::test]
    async fn a_refused_modify_is_counted_under_its_result_code_name() {
        let dir = directory(Flavour::Permissive, &[]);
        let refused = DirError::Result {
            op: Op::Modify,
            dn: GROUP.into(),
            code: 50,
            message: "no write access".into(),
        };
        dir.fail_next_modify(None, refused, 1000);
        let plan = Plan {
            changes: vec![group_change(&["CN=a,DC=x"], &[])],
            ..Plan::default()
        };
        let mut pass = Pass::from_plan(Cause::Event, plan, &pattern(), &GuardOptions::default());
        let metrics = Metrics::new();
        pass.apply(&dir, &ApplyOptions::default(), false, &metrics)
            .await;
        let (_, err) = pass.results[0].failed.clone().expect("not applied");
        assert_eq!(err.code(), Some(50), "the code is kept");
        assert!(
            err.to_string().contains("LDAP 50 insufficientAccessRights"),
            "{err}"
        );
        let text = metrics.encode();
        assert!(
            text.contains("gmsa_modify_requests_total{outcome=\"insufficientAccessRights\"}"),
            "{text}"
        );
    }

    /// The in-memory directory, answering each group's Modify after its
    /// own delay, and saving at commit when `saves` says so.
    struct Slow {
        inner: MemoryDirectory,
        delays: BTreeMap<Dn, std::time::Duration>,
        saves: bool,
    }

    #[async_trait::async_trait]
    impl Directory for Slow {
        async fn capabilities(&self) -> Result<Capabilities, DirError> {
            self.inner.capabilities().await
        }
        async fn search_groups(&self, base: &Dn) -> Result<Vec<Group>, DirError> {
            self.inner.search_groups(base).await
        }
        async fn find_group(&self, base: &Dn, name: &str) -> Result<Option<Group>, DirError> {
            self.inner.find_group(base, name).await
        }
        async fn read_group(&self, dn: &Dn) -> Result<Option<Group>, DirError> {
            self.inner.read_group(dn).await
        }
        async fn modify_members(&self, group: &Dn, change: &MemberChange) -> Result<(), DirError> {
            if let Some(delay) = self.delays.get(group) {
                tokio::time::sleep(*delay).await;
            }
            self.inner.modify_members(group, change).await
        }
        async fn commit(&self) -> Result<(), DirError> {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            self.inner.commit().await
        }
        fn saves_on_commit(&self) -> bool {
            self.saves
        }
    }

    /// Groups `a` and `b`, `a` answered after 10 ms and `b` after 50 ms.
    fn slow(saves: bool) -> (Slow, Plan) {
        let records = ["a", "b"]
            .iter()
            .map(|name| Record {
                dn: format!("CN={name},OU=Groups,DC=x"),
                attrs: vec![
                    ("objectClass".to_owned(), "group".to_owned()),
                    ("sAMAccountName".to_owned(), (*name).to_owned()),
                ],
            })
            .collect();
        let ms = std::time::Duration::from_millis;
        let delays = [("a", ms(10)), ("b", ms(50))]
            .into_iter()
            .map(|(name, delay)| (dn(&format!("CN={name},OU=Groups,DC=x")), delay))
            .collect();
        let changes = ["a", "b"]
            .iter()
            .map(|name| GroupChange {
                group_dn: dn(&format!("CN={name},OU=Groups,DC=x")),
                proid: Proid::new(name).expect("proid"),
                add: [dn("CN=h1,DC=x")].into(),
                delete: BTreeSet::new(),
            })
            .collect();
        let dir = Slow {
            inner: MemoryDirectory::new(records, Flavour::OpenLdap),
            delays,
            saves,
        };
        let plan = Plan {
            changes,
            ..Plan::default()
        };
        (dir, plan)
    }

    /// When each group of [`slow`]'s plan was settled, in milliseconds
    /// from the start of the pass.
    async fn settled_ms(saves: bool) -> Vec<Option<u128>> {
        let (dir, plan) = slow(saves);
        let start = Instant::now();
        apply_plan(&dir, &plan, &ApplyOptions::default())
            .await
            .iter()
            .map(|r| r.settled.map(|at| (at - start).as_millis()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_group_is_settled_when_its_own_modify_is_answered() {
        // Not when the pass ended (after the 500 ms commit).
        assert_eq!(settled_ms(false).await, [Some(10), Some(50)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_directory_that_saves_at_commit_settles_every_group_then() {
        assert_eq!(settled_ms(true).await, [Some(550), Some(550)]);
    }
}
