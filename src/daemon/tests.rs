//! The loop's own decisions, on the in-memory directory in paused time:
//! what a lost leadership and a shutdown do to a write in flight.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::sleep;

use super::testing::*;
use crate::election::Role;
use crate::model::Dn;
use crate::tree::watch::{Change, Noticed};

fn h1() -> std::collections::BTreeSet<Dn> {
    [Dn::parse(H1).expect("dn")].into()
}

/// The records of the audit trail at `path` for the `db` group, in order.
fn db_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("the audit trail")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|r| r["group"] == DB)
        .collect()
}

/// A daemon whose directory holds its modifies at a gate, with one
/// modify of `db` waiting there.
async fn a_write_in_flight(
    root: &std::path::Path,
    roles: Option<watch::Receiver<crate::election::RoleState>>,
) -> (Harness, std::sync::Arc<Gated>) {
    let (gated, setup) = gated(roles);
    let h = Harness::start_with(root, run_config(root, &[]), setup);
    h.ready().await;
    assert_eq!(h.members(WEB).await, h1(), "the initial sync went through");
    gated.close();
    h.place("h1", "db.app#1");
    until("the write is in flight", || async { gated.held() == 1 }).await;
    (h, gated)
}

/// Soak failure 2 (`step-down-mid-batch`), its first half: the role was
/// looked at when a pass started, not when its Modifies left.
#[tokio::test(start_paused = true)]
async fn step_down_mid_batch_no_modify_leaves_after_the_loss() {
    let (_guard, root) = tree();
    fill(&root);
    let (roles, rx) = watch::channel(role(Role::Leader, 1));
    let roles = std::sync::Arc::new(roles);
    let (gated, setup) = gated(Some(rx));
    let h = Harness::start_with(&root, run_config(&root, &[]), setup);
    h.ready().await;
    // The leadership is lost inside the batch's pass, after it was
    // planned and before its first Modify.
    gated.on_next_capabilities({
        let roles = roles.clone();
        move || {
            roles.send_replace(role(Role::Follower, 1));
        }
    });
    h.place("h1", "db.app#1");
    until("a follower", || async {
        h.metrics.readiness().1.contains("follower")
    })
    .await;
    sleep(Duration::from_secs(5)).await;
    assert_eq!(h.modifies(DB), 0, "nothing sent after the loss");
    assert!(h.members(DB).await.is_empty());

    // Leader again, in a new term: a full sync first, which applies it.
    roles.send_replace(role(Role::Leader, 2));
    until("applied by the new leadership", || async {
        h.members(DB).await == h1()
    })
    .await;
    h.stop().await;
}

/// Soak failure 2 (`step-down-mid-batch`), its second half: a Modify
/// already sent when the leadership was lost was applied by the directory
/// and its answer dropped, so the audit trail missed it.
#[tokio::test(start_paused = true)]
async fn step_down_mid_batch_records_the_modify_already_sent_and_sends_no_more() {
    let (_guard, root) = tree();
    fill(&root);
    write_server(&root, "h2");
    let audit = root.with_extension("audit");
    let audit_arg = format!("--audit-log={}", audit.display());
    let config = run_config(&root, &["--max-values-per-modify=1", &audit_arg]);
    let (roles, rx) = watch::channel(role(Role::Leader, 1));
    let (gated, setup) = gated(Some(rx));
    let h = Harness::start_with(&root, config, setup);
    h.ready().await;
    gated.answer_late();
    gated.close();
    // One batch adding two hosts to `db`: two Modifies of one value each.
    std::fs::write(root.join("placement/h1/db.app#1"), "{}").expect("placement");
    std::fs::write(root.join("placement/h2/db.app#1"), "{}").expect("placement");
    h.send(crate::tree::watch::Change::Rescan("doubt".into()));
    until("the first Modify sent and applied", || async {
        gated.held() == 1
    })
    .await;
    assert_eq!(h.members(DB).await, h1(), "applied, not yet answered");

    roles.send_replace(role(Role::Follower, 1));
    gated.open();
    until("a follower", || async {
        h.metrics.readiness().1.contains("follower")
    })
    .await;
    sleep(Duration::from_secs(5)).await;
    assert_eq!(h.modifies(DB), 1, "the second Modify is never sent");
    assert_eq!(h.members(DB).await, h1());
    let db = db_records(&audit);
    // The pass's intent names both values; only the one sent is recorded.
    assert_eq!(db.len(), 2, "{db:?}");
    assert_eq!(db[0]["intent"], serde_json::json!(true), "{db:?}");
    assert_eq!(db[0]["added"].as_array().map(Vec::len), Some(2), "{db:?}");
    assert_eq!(db[1].get("intent"), None, "{db:?}");
    assert_eq!(db[1]["added"], serde_json::json!([H1]), "{db:?}");
    for record in &db {
        assert_eq!(record["term"], serde_json::json!(1), "{db:?}");
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_a_write_in_flight_finish() {
    let (_guard, root) = tree();
    fill(&root);
    let (h, gated) = a_write_in_flight(&root, None).await;
    let dir = h.dir.clone();
    let stopping = tokio::spawn(h.stop());
    sleep(Duration::from_secs(1)).await;
    gated.open();
    stopping.await.expect("a clean stop");
    assert_eq!(members(&dir, DB).await, h1(), "finished within the grace");
}

#[tokio::test(start_paused = true)]
async fn shutdown_abandons_a_write_stuck_past_the_grace_period() {
    let (_guard, root) = tree();
    fill(&root);
    let (h, gated) = a_write_in_flight(&root, None).await;
    let dir = h.dir.clone();
    // Never opened: the grace period runs out, the stop is still clean.
    h.stop().await;
    assert_eq!(gated.held(), 0, "the write was abandoned");
    assert!(members(&dir, DB).await.is_empty());
}

/// Soak failure 1 (`frozen-write`): a Modify that got no answer was
/// applied all the same, and the retry's re-read found nothing to do, so
/// no audit record said it was.
#[tokio::test(start_paused = true)]
async fn frozen_write_a_modify_without_answer_that_was_applied_is_recorded_by_the_retry() {
    let (_guard, root) = tree();
    fill(&root);
    let audit = root.with_extension("audit");
    let audit_arg = format!("--audit-log={}", audit.display());
    let (gated, setup) = gated(None);
    let h = Harness::start_with(&root, run_config(&root, &[&audit_arg]), setup);
    h.ready().await;
    gated.time_out_next();
    h.place("h1", "db.app#1");
    let records = || db_records(&audit);
    until("the change recorded", || async { records().len() > 1 }).await;
    sleep(Duration::from_secs(5)).await;
    let db = records();
    // What was about to be sent; what was sent, unanswered, when the
    // Modify failed; then what the re-read showed applied.
    assert_eq!(db.len(), 3, "{db:?}");
    assert_eq!(db[0]["intent"], serde_json::json!(true), "{db:?}");
    assert_eq!(db[0]["added"], serde_json::json!([H1]));
    assert_eq!(db[1]["added"], serde_json::json!([H1]));
    assert_eq!(db[1]["unanswered"], serde_json::json!(true), "{db:?}");
    assert_eq!(db[2]["added"], serde_json::json!([H1]));
    assert_eq!(db[2]["cause"], "retry");
    assert_eq!(db[2].get("unanswered"), None, "{db:?}");
    assert_eq!(db[2].get("intent"), None, "{db:?}");
    assert_eq!(h.modifies(DB), 1, "the retry sent nothing more");
    h.stop().await;
}

/// Soak failure 4 (`unanswered-across-terms`): a change whose Modify got
/// no answer was settled by a read in a later term of the same replica
/// and recorded as its own retry, though another replica may have made
/// the change in between (the soak at L saw exactly that: two records
/// of one change, one of them false). And a replica killed before its
/// next read left no record of it at all. Such a change is recorded as
/// unanswered when it fails, in its term, and settled only in that term.
#[tokio::test(start_paused = true)]
async fn unanswered_across_terms_a_change_without_answer_is_not_claimed_in_a_later_term() {
    let (_guard, root) = tree();
    fill(&root);
    let audit = root.with_extension("audit");
    let audit_arg = format!("--audit-log={}", audit.display());
    let (roles, rx) = watch::channel(role(Role::Leader, 1));
    let (gated, setup) = gated(Some(rx));
    let h = Harness::start_with(&root, run_config(&root, &[&audit_arg]), setup);
    h.ready().await;
    // Applied by the directory, its answer lost: in term 1.
    gated.time_out_next();
    h.place("h1", "db.app#1");
    until("the Modify sent", || async { h.modifies(DB) == 1 }).await;
    roles.send_replace(role(Role::Follower, 1));
    until("a follower", || async {
        h.metrics.readiness().1.contains("follower")
    })
    .await;
    // Leading again, in term 2: the full sync reads the group with the
    // member in it, which proves nothing about who put it there.
    roles.send_replace(role(Role::Leader, 2));
    until("ready as the leader again", || async {
        h.metrics.is_ready()
    })
    .await;
    sleep(Duration::from_secs(5)).await;
    let db = db_records(&audit);
    // The intent and the unanswered record, both of term 1.
    assert_eq!(db.len(), 2, "{db:?}");
    assert_eq!(db[0]["intent"], serde_json::json!(true), "{db:?}");
    assert_eq!(db[1]["unanswered"], serde_json::json!(true), "{db:?}");
    for record in &db {
        assert_eq!(record["term"], serde_json::json!(1), "{db:?}");
        assert_eq!(record["added"], serde_json::json!([H1]), "{db:?}");
        assert_eq!(record["cause"], "event", "{db:?}");
    }
    assert_eq!(h.modifies(DB), 1, "nothing more to send");
    h.stop().await;
}

/// Soak failure 6 (`killed-in-flight`): a leader SIGKILLed while its
/// Modifies waited at a frozen server left no record of them, and the
/// server applied them when it resumed. A pass now writes down what it
/// is about to send, on disk, before the first request leaves.
#[tokio::test(start_paused = true)]
async fn killed_in_flight_a_change_is_on_disk_before_its_modify_leaves() {
    let (_guard, root) = tree();
    fill(&root);
    let audit = root.with_extension("audit");
    let audit_arg = format!("--audit-log={}", audit.display());
    let (_roles, rx) = watch::channel(role(Role::Leader, 3));
    let (gated, setup) = gated(Some(rx));
    let h = Harness::start_with(&root, run_config(&root, &[&audit_arg]), setup);
    h.ready().await;
    gated.close();
    h.place("h1", "db.app#1");
    until("the write is in flight", || async { gated.held() == 1 }).await;
    // No answer yet, and none will come before the kill: the trail holds
    // the intent, in the term the request was sent in.
    let records = || db_records(&audit);
    let db = records();
    assert_eq!(db.len(), 1, "{db:?}");
    assert_eq!(db[0]["intent"], serde_json::json!(true), "{db:?}");
    assert_eq!(db[0]["term"], serde_json::json!(3), "{db:?}");
    assert_eq!(db[0]["added"], serde_json::json!([H1]), "{db:?}");
    assert_eq!(db[0]["removed"], serde_json::json!([]), "{db:?}");
    // Answered after all: the applied record follows the intent.
    gated.open();
    until("the change applied", || async { records().len() == 2 }).await;
    let db = records();
    assert_eq!(db[1].get("intent"), None, "{db:?}");
    assert_eq!(db[1]["added"], serde_json::json!([H1]), "{db:?}");
    assert_eq!(db[1]["cause"], "event", "{db:?}");
    h.stop().await;
}

/// The group of proid `proid` in the tests of a resync's parts.
fn group_of(proid: &str) -> String {
    format!("CN={proid}-gmsa-hosts,OU=Groups,DC=ad,DC=com")
}

/// The proids of the tests of a resync's parts: forty that the resync
/// repairs, `new` (placed during the resync) and `zz` (whose group the
/// resync writes last).
fn resync_proids() -> Vec<String> {
    let mut proids: Vec<String> = (0..40).map(|i| format!("g{i:02}")).collect();
    proids.extend(["new".to_owned(), "zz".to_owned()]);
    proids
}

/// A daemon whose every Modify takes 100 ms, past its initial sync of a
/// tree where h1 runs every proid but `new`, with h1 then taken out of
/// every group behind its back: its next resync, 30 s on, repairs
/// 41 groups, in parts of 8 (the initial sync wrote 8 groups per 100 ms
/// window). `during` runs inside the resync's first part. Returns the
/// number of the directory's calls before the resync.
async fn a_resync_with_parts(
    root: &std::path::Path,
    during: impl FnOnce(&std::path::Path, &tokio::sync::mpsc::UnboundedSender<Noticed>) + Send + 'static,
) -> (Harness, usize) {
    let records = resync_proids()
        .iter()
        .map(|proid| crate::ldif::Record {
            dn: group_of(proid),
            attrs: vec![
                ("objectClass".to_owned(), "group".to_owned()),
                ("sAMAccountName".to_owned(), format!("{proid}-gmsa-hosts")),
            ],
        })
        .collect();
    let inner = std::sync::Arc::new(crate::directory::memory::MemoryDirectory::new(
        records,
        crate::directory::memory::Flavour::Permissive,
    ));
    write_server(root, "h1");
    std::fs::write(root.join(".modified"), "").expect(".modified");
    for proid in resync_proids().iter().filter(|p| *p != "new") {
        std::fs::write(root.join(format!("placement/h1/{proid}.app#1")), "{}").expect("placement");
    }
    let gated = Gated::new(inner.clone());
    gated.answer_after(Duration::from_millis(100));
    let setup = Setup {
        front: Some(gated.clone()),
        dir: Some(inner),
        ..Setup::default()
    };
    let h = Harness::start_with(root, run_config(root, &["--resync-interval=30s"]), setup);
    h.ready().await;
    for proid in resync_proids().iter().filter(|p| *p != "new") {
        assert_eq!(h.members(&group_of(proid)).await, h1(), "{proid}");
        let dn = Dn::parse(&group_of(proid)).expect("dn");
        let out = crate::directory::MemberChange {
            add: Vec::new(),
            delete: h1().into_iter().collect(),
        };
        use crate::directory::Directory;
        h.dir
            .modify_members(&dn, &out)
            .await
            .expect("edited by hand");
    }
    let before = h.dir.calls().len();
    let changes = h.changes.clone();
    let root = root.to_owned();
    gated.on_next_capabilities(move || during(&root, &changes));
    until("the resync done", || async { h.metrics.resyncs.get() == 2 }).await;
    (h, before)
}

/// The position of the last Modify of `group` among the directory's calls.
fn last_modify(h: &Harness, group: &str) -> Option<usize> {
    let group = Dn::parse(group).expect("dn");
    h.dir.calls().iter().rposition(
        |c| matches!(c, crate::directory::memory::Call::Modify { group: g, .. } if *g == group),
    )
}

#[tokio::test(start_paused = true)]
async fn a_resync_writes_a_change_that_comes_while_it_writes_between_its_parts() {
    let (_guard, root) = tree();
    let (h, _) = a_resync_with_parts(&root, |root, changes| {
        std::fs::write(root.join("placement/h1/new.app#1"), "{}").expect("placement");
        let added = crate::tree::TreeEvent::PlacementAdded {
            host: crate::model::HostName::new("h1").expect("host"),
            instance: "new.app#1".to_owned(),
        };
        changes
            .send(Noticed::now(Change::Tree(added)))
            .expect("send");
    })
    .await;
    until("every group repaired", || async {
        for proid in resync_proids() {
            if h.members(&group_of(&proid)).await != h1() {
                return false;
            }
        }
        true
    })
    .await;
    let new = last_modify(&h, &group_of("new")).expect("new written");
    let last = last_modify(&h, &group_of("zz")).expect("zz repaired");
    assert!(
        new < last,
        "the change waited for the whole resync: Modify {new} after {last}"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_change_a_batch_takes_over_from_a_resync_is_not_undone_by_it() {
    let (_guard, root) = tree();
    // zz leaves h1 while the resync, planned before, is to add h1 back
    // to its group in its last part.
    let (h, before) = a_resync_with_parts(&root, |root, changes| {
        std::fs::remove_file(root.join("placement/h1/zz.app#1")).expect("rm placement");
        let removed = crate::tree::TreeEvent::PlacementRemoved {
            host: crate::model::HostName::new("h1").expect("host"),
            instance: "zz.app#1".to_owned(),
        };
        changes
            .send(Noticed::now(Change::Tree(removed)))
            .expect("send");
    })
    .await;
    until("the forty repaired", || async {
        h.members(&group_of("g39")).await == h1()
    })
    .await;
    sleep(Duration::from_secs(5)).await;
    assert!(h.members(&group_of("zz")).await.is_empty());
    let zz = Dn::parse(&group_of("zz")).expect("dn");
    let written = h.dir.calls()[before..]
        .iter()
        .filter(
            |c| matches!(c, crate::directory::memory::Call::Modify { group, .. } if *group == zz),
        )
        .count();
    assert_eq!(
        written, 0,
        "h1 is never given back the right it lost, not even for a while"
    );
    h.stop().await;
}

/// A daemon on a gated directory whose searches of every group answer a
/// second after they read, with `extra` options and a resync every 30 s;
/// returned once its first resync is reading the groups.
async fn a_resync_reading_slowly(
    root: &std::path::Path,
    extra: &[&str],
) -> (Harness, std::sync::Arc<Gated>) {
    fill(root);
    let (gated, setup) = gated(None);
    let mut args = vec!["--resync-interval=30s"];
    args.extend_from_slice(extra);
    let h = Harness::start_with(root, run_config(root, &args), setup);
    h.ready().await;
    gated.answer_searches_after(Duration::from_secs(1));
    until("the resync reading", || async { gated.searching() == 1 }).await;
    (h, gated)
}

/// [`a_resync_reading_slowly`], then `db.app#1` placed on h1 and its
/// group written while the resync reads.
async fn db_written_while_a_resync_reads(
    root: &std::path::Path,
    extra: &[&str],
) -> (Harness, std::sync::Arc<Gated>) {
    let (h, gated) = a_resync_reading_slowly(root, extra).await;
    h.place("h1", "db.app#1");
    until("db written", || async { h.members(DB).await == h1() }).await;
    assert_eq!(
        gated.searching(),
        1,
        "written during the read, not after it"
    );
    (h, gated)
}

#[tokio::test(start_paused = true)]
async fn a_resync_writes_a_batch_while_it_reads_the_groups() {
    let (_guard, root) = tree();
    let (h, gated) = db_written_while_a_resync_reads(&root, &[]).await;
    until("the resync done", || async { gated.searching() == 0 }).await;
    sleep(Duration::from_secs(5)).await;
    assert_eq!(h.members(DB).await, h1());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_group_written_while_a_resync_reads_is_planned_from_the_write_not_the_older_read() {
    let (_guard, root) = tree();
    // A window longer than the read: the second change waits for it.
    // The read saw db empty; h1 is added to it while the read goes on,
    // then taken off before it answers. The read is older than both.
    let (h, gated) = db_written_while_a_resync_reads(&root, &["--batch-window=10s"]).await;
    h.unplace("h1", "db.app#1");
    assert_eq!(gated.searching(), 1, "taken off while the read goes on");
    until("the resync done", || async { gated.searching() == 0 }).await;
    // Past the window and before the next resync: the batch takes h1
    // off, as db was kept in the cache as written, not as read.
    sleep(Duration::from_secs(12)).await;
    assert!(h.members(DB).await.is_empty(), "h1 keeps a right it lost");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_group_whose_write_failed_while_a_resync_reads_is_read_again_and_written() {
    let (_guard, root) = tree();
    let (h, gated) = a_resync_reading_slowly(&root, &[]).await;
    // The server stopped answering a moment ago: not sent, in doubt.
    gated.refuse_next(crate::directory::DirError::Stalled {
        op: crate::directory::Op::Modify,
        message: "the server stopped answering".into(),
    });
    h.place("h1", "db.app#1");
    sleep(Duration::from_millis(300)).await;
    assert!(h.members(DB).await.is_empty(), "the write failed");
    assert_eq!(gated.searching(), 1, "failed while the read goes on");
    until("the resync done", || async { gated.searching() == 0 }).await;
    // Before the next resync: a batch right after this one reads db again
    // and writes it.
    sleep(Duration::from_secs(5)).await;
    assert_eq!(h.members(DB).await, h1());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_host_leaving_scope_during_a_resync_loses_its_groups_by_the_batch_it_is_left_to() {
    let (_guard, root) = tree();
    // A window longer than the read: the host's departure waits for it.
    let (h, gated) = db_written_while_a_resync_reads(&root, &["--batch-window=10s"]).await;
    h.remove_server("h1");
    assert_eq!(gated.searching(), 1, "gone while the read goes on");
    until("the resync done", || async { gated.searching() == 0 }).await;
    // The resync leaves web and db to the batch; it must not forget that
    // h1 is leaving before that batch takes it out.
    sleep(Duration::from_secs(12)).await;
    assert!(h.members(WEB).await.is_empty(), "h1 keeps web");
    assert!(h.members(DB).await.is_empty(), "h1 keeps db");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_host_whose_removal_failed_while_a_resync_reads_loses_its_group_all_the_same() {
    let (_guard, root) = tree();
    let (h, gated) = a_resync_reading_slowly(&root, &[]).await;
    // h1 leaves scope; taking it out of web fails while the read goes on,
    // so web is in doubt when the resync plans.
    gated.refuse_next(crate::directory::DirError::Stalled {
        op: crate::directory::Op::Modify,
        message: "the server stopped answering".into(),
    });
    h.remove_server("h1");
    sleep(Duration::from_millis(300)).await;
    assert_eq!(h.members(WEB).await, h1(), "the removal failed");
    assert_eq!(gated.searching(), 1, "failed while the read goes on");
    until("the resync done", || async { gated.searching() == 0 }).await;
    // The batch that reads web again must still know that h1 is leaving.
    sleep(Duration::from_secs(5)).await;
    assert!(h.members(WEB).await.is_empty(), "h1 keeps web");
    h.stop().await;
}
