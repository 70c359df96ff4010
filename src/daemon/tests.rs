//! The loop's own decisions, on the in-memory directory in paused time:
//! what a lost leadership and a shutdown do to a write in flight.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::sleep;

use super::testing::*;
use crate::election::Role;
use crate::model::Dn;

fn h1() -> std::collections::BTreeSet<Dn> {
    [Dn::parse(H1).expect("dn")].into()
}

/// A daemon whose directory holds its modifies at a gate, with one
/// modify of `db` waiting there.
async fn a_write_in_flight(
    root: &std::path::Path,
    roles: Option<watch::Receiver<crate::election::RoleState>>,
) -> (Harness, std::sync::Arc<Gated>) {
    let gated = Gated::new(memory_directory());
    let setup = Setup {
        front: Some(gated.clone()),
        dir: Some(gated.inner.clone()),
        roles,
        ..Setup::default()
    };
    let h = Harness::start_with(root, run_config(root, &[]), setup);
    h.ready().await;
    assert_eq!(h.members(WEB).await, h1(), "the initial sync went through");
    gated.close();
    h.place("h1", "db.app#1");
    until("the write is in flight", || async { gated.held() == 1 }).await;
    (h, gated)
}

#[tokio::test(start_paused = true)]
async fn leadership_lost_mid_batch_drops_the_write_and_the_next_leadership_resyncs() {
    let (_guard, root) = tree();
    fill(&root);
    let (roles, rx) = watch::channel(role(Role::Leader, 1));
    let (h, gated) = a_write_in_flight(&root, Some(rx)).await;

    roles.send_replace(role(Role::Follower, 1));
    until("the write dropped", || async { gated.held() == 0 }).await;
    gated.open();
    sleep(Duration::from_secs(5)).await;
    assert!(
        h.members(DB).await.is_empty(),
        "a follower's write never reaches the directory"
    );
    assert_eq!(h.modifies(DB), 0);

    // Leader again, in a new term: a full sync first, which applies it.
    roles.send_replace(role(Role::Leader, 2));
    until("applied by the new leadership", || async {
        h.members(DB).await == h1()
    })
    .await;
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
