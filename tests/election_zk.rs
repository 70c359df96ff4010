//! The election against a real ZooKeeper 3.8 started by the tests: one
//! leader of two, fast handover on a clean stop, handover within the
//! session timeout when the leader dies, a leader that steps down before
//! its session can expire when ZooKeeper goes away or hangs, and recovery
//! without restarting anything when ZooKeeper comes back.
//!
//! A monitor samples both replicas' published roles every couple of
//! milliseconds throughout; any moment with two leaders fails the test.
//! Handover times are printed (`--nocapture`) as `measured: ...`.

mod support;

use std::time::Duration;

use gmsa_reconciler::election::{self, Election, ElectionConfig, Role, RoleState};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

use support::zookeeper::ZooKeeper;

/// Short, so the suite stays fast; the server allows 2 to 20 ticks of 1 s.
const SESSION: Duration = Duration::from_secs(4);
/// Generous bounds for things that have no contract beyond "eventually".
const SETTLE: Duration = Duration::from_secs(30);

/// The tests start JVMs and measure handovers against session timeouts:
/// one at a time, so they do not starve each other on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(servers: &str, identity: &str, session_timeout: Duration) -> ElectionConfig {
    ElectionConfig {
        session_timeout,
        identity: identity.to_owned(),
        ..ElectionConfig::new(servers)
    }
}

/// One election and the identity it stores in its lock node.
struct Replica {
    name: &'static str,
    election: Election,
}

impl Replica {
    fn start(servers: &str, name: &'static str) -> Replica {
        Replica::start_with(servers, name, SESSION)
    }

    fn start_with(servers: &str, name: &'static str, session_timeout: Duration) -> Replica {
        Replica {
            name,
            election: election::start(config(servers, name, session_timeout))
                .expect("start election"),
        }
    }

    fn state(&self) -> RoleState {
        self.election.state()
    }

    fn is_leader(&self) -> bool {
        self.election.is_leader()
    }

    fn subscribe(&self) -> watch::Receiver<RoleState> {
        self.election.subscribe()
    }
}

/// Polls `check` until it holds; fails if that takes longer than `limit`
/// after `since`. Returns how long it took from `since`.
async fn within(
    since: Instant,
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) -> Duration {
    loop {
        if check() {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit, "not within {limit:?}: {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

/// Exactly one leader, and the other a connected follower.
fn settled(a: &Replica, b: &Replica) -> bool {
    let (a, b) = (a.state(), b.state());
    a.is_leader() != b.is_leader() && a.connected && b.connected
}

/// Splits a pair into (leader, follower).
fn by_role(a: Replica, b: Replica) -> (Replica, Replica) {
    if a.is_leader() {
        (a, b)
    } else {
        (b, a)
    }
}

/// Samples published roles until finished.
struct Monitor {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Observed>,
}

#[derive(Debug, Default)]
struct Observed {
    samples: u64,
    /// Moments with more than one leader.
    overlaps: Vec<String>,
    /// Every change of the sampled roles, for the failure message.
    changes: Vec<String>,
}

impl Monitor {
    fn new(receivers: Vec<watch::Receiver<RoleState>>) -> Monitor {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut observed = Observed::default();
            let mut last: Vec<Role> = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let roles: Vec<Role> = receivers.iter().map(|r| r.borrow().role).collect();
                observed.samples += 1;
                if roles.iter().filter(|r| **r == Role::Leader).count() > 1 {
                    observed
                        .overlaps
                        .push(format!("{:?}: {roles:?}", started.elapsed()));
                }
                if roles != last {
                    observed
                        .changes
                        .push(format!("{:?}: {roles:?}", started.elapsed()));
                    last = roles;
                }
            }
            observed
        });
        Monitor { stop, task }
    }

    /// Stops sampling and fails if two leaders were ever seen.
    async fn assert_never_two_leaders(self) {
        let _ = self.stop.send(());
        let observed = self.task.await.expect("monitor");
        assert!(observed.samples > 0, "the monitor never sampled");
        assert!(
            observed.overlaps.is_empty(),
            "two leaders at once: {:?}\nchanges: {:#?}",
            observed.overlaps,
            observed.changes
        );
    }
}

/// The identities in the lock nodes, in lock order (the holder first).
async fn lock_holders(servers: &str) -> Vec<String> {
    let client = zookeeper_client::Client::connector()
        .with_session_timeout(SESSION)
        .connect(servers)
        .await
        .expect("inspecting client connects");
    let path = election::DEFAULT_LOCK_PATH;
    let mut children = match client.list_children(path).await {
        Ok(children) => children,
        Err(zookeeper_client::Error::NoNode) => Vec::new(),
        Err(e) => panic!("list {path}: {e}"),
    };
    children.sort_by_key(|c| c.rsplit('-').next().and_then(|s| s.parse::<u64>().ok()));
    let mut holders = Vec::new();
    for child in children {
        match client.get_data(&format!("{path}/{child}")).await {
            Ok((data, _)) => holders.push(String::from_utf8(data).expect("utf-8 identity")),
            Err(zookeeper_client::Error::NoNode) => {}
            Err(e) => panic!("read {path}/{child}: {e}"),
        }
    }
    holders
}

async fn wait_for_holders(servers: &str, expected: &[&str]) {
    let since = Instant::now();
    loop {
        let holders = lock_holders(servers).await;
        if holders == expected {
            return;
        }
        assert!(
            since.elapsed() < SETTLE,
            "lock nodes {holders:?}, expected {expected:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// Starts two replicas and waits until one leads and the other follows.
async fn settled_pair(zk: &ZooKeeper, session_timeout: Duration) -> (Replica, Replica) {
    let a = Replica::start_with(&zk.servers(), "replica-a", session_timeout);
    let b = Replica::start_with(&zk.servers(), "replica-b", session_timeout);
    within(
        Instant::now(),
        SETTLE,
        "one leader and a connected follower",
        || settled(&a, &b),
    )
    .await;
    by_role(a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_replicas_leads_and_its_lock_node_names_it() {
    let _serial = SERIAL.lock().await;
    support::tree::init_logs();
    let zk = ZooKeeper::start();
    let a = Replica::start(&zk.servers(), "replica-a");
    let b = Replica::start(&zk.servers(), "replica-b");
    let monitor = Monitor::new(vec![a.subscribe(), b.subscribe()]);

    within(
        Instant::now(),
        SETTLE,
        "one leader and a connected follower",
        || settled(&a, &b),
    )
    .await;
    let (leader, follower) = by_role(a, b);
    let (leading, following) = (leader.state(), follower.state());
    assert_eq!(leading.term, 1, "{leading:?}");
    assert_eq!(following.term, 0, "{following:?}");
    assert!(leading.why.contains("acquired the lock"), "{leading:?}");
    assert!(
        following.why.contains("waiting for the lock"),
        "{following:?}"
    );
    // The holder's node comes first (parents created on the way) and
    // names it.
    wait_for_holders(&zk.servers(), &[leader.name, follower.name]).await;
    assert!(leader.is_leader() && !follower.is_leader());

    // Dropping an election (no stop) releases the lock in the background.
    let since = Instant::now();
    drop(leader);
    let took = within(since, SESSION / 2, "the follower takes over", || {
        follower.is_leader()
    })
    .await;
    eprintln!("measured: handover after dropping the leader's election: {took:?}");

    monitor.assert_never_two_leaders().await;
    follower.election.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_hands_over_long_before_its_session_could_expire() {
    let _serial = SERIAL.lock().await;
    support::tree::init_logs();
    let zk = ZooKeeper::start();
    let (leader, follower) = settled_pair(&zk, SESSION).await;
    let watch_leader = leader.subscribe();
    let monitor = Monitor::new(vec![leader.subscribe(), follower.subscribe()]);
    wait_for_holders(&zk.servers(), &[leader.name, follower.name]).await;

    let since = Instant::now();
    leader.election.stop().await;
    let stopped = watch_leader.borrow().clone();
    assert_eq!(stopped.role, Role::Follower, "{stopped:?}");
    assert_eq!(stopped.why, "stopped");
    // Half the session timeout: only a released lock can be this fast.
    let took = within(since, SESSION / 2, "the follower takes over", || {
        follower.is_leader()
    })
    .await;
    eprintln!("measured: handover after a clean stop: {took:?}");
    wait_for_holders(&zk.servers(), &[follower.name]).await;

    monitor.assert_never_two_leaders().await;
    follower.election.stop().await;
}

// A leader killed with SIGKILL (its session left to expire) is tested with
// real replica processes in `tests/replicas.rs`.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_zookeeper_outage_steps_the_leader_down_and_the_pair_recovers() {
    let _serial = SERIAL.lock().await;
    support::tree::init_logs();
    let mut zk = ZooKeeper::start();
    // Longer than elsewhere: the server must be back before the clients
    // give their sessions up (7/5 of this), however slowly the JVM starts.
    let session = SESSION * 2;
    let (leader, follower) = settled_pair(&zk, session).await;
    let monitor = Monitor::new(vec![leader.subscribe(), follower.subscribe()]);

    let since = Instant::now();
    zk.stop();
    let took = within(since, session, "the leader steps down", || {
        !leader.is_leader()
    })
    .await;
    eprintln!("measured: step-down after ZooKeeper was killed: {took:?}");
    within(
        since,
        session,
        "both replicas see the connection lost",
        || !leader.state().connected && !follower.state().connected,
    )
    .await;

    // Back within the session timeout: the sessions survive.
    zk.boot();
    let since = Instant::now();
    let took = within(since, SETTLE, "one leader again", || {
        settled(&leader, &follower)
    })
    .await;
    eprintln!("measured: one leader again after ZooKeeper came back: {took:?}");
    // The sessions survived, so the lock node did: the same replica leads
    // again, under a new term (it must resync before writing).
    let leader_name = leader.name;
    let (now_leading, now_following) = by_role(leader, follower);
    let state = now_leading.state();
    assert_eq!(now_leading.name, leader_name, "{state:?}");
    assert_eq!(state.term, 2, "{state:?}");
    assert!(
        state.why.starts_with("reconnected within the session"),
        "{state:?}"
    );
    wait_for_holders(&zk.servers(), &[now_leading.name, now_following.name]).await;

    monitor.assert_never_two_leaders().await;
    now_leading.election.stop().await;
    now_following.election.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zookeeper_outage_past_the_session_timeout_recovers_without_restarts() {
    let _serial = SERIAL.lock().await;
    support::tree::init_logs();
    let mut zk = ZooKeeper::start();
    let (leader, follower) = settled_pair(&zk, SESSION).await;
    let monitor = Monitor::new(vec![leader.subscribe(), follower.subscribe()]);

    let since = Instant::now();
    zk.stop();
    within(since, SESSION, "the leader steps down", || {
        !leader.is_leader()
    })
    .await;
    // Both sessions end on the clients' side and they try new ones.
    within(
        since,
        SETTLE,
        "both replicas give up their sessions",
        || {
            [&leader, &follower]
                .iter()
                .all(|r| r.state().why.starts_with("zookeeper unreachable"))
        },
    )
    .await;

    zk.boot();
    let since = Instant::now();
    let took = within(since, SETTLE, "one leader again", || {
        settled(&leader, &follower)
    })
    .await;
    eprintln!("measured: one leader again after a long ZooKeeper outage: {took:?}");
    // New sessions: whoever leads acquired the lock afresh.
    let (now_leading, now_following) = by_role(leader, follower);
    let state = now_leading.state();
    assert!(state.why.starts_with("acquired the lock"), "{state:?}");
    wait_for_holders(&zk.servers(), &[now_leading.name, now_following.name]).await;

    monitor.assert_never_two_leaders().await;
    now_leading.election.stop().await;
    now_following.election.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_zookeeper_makes_the_leader_step_down_before_its_session_can_expire() {
    let _serial = SERIAL.lock().await;
    support::tree::init_logs();
    let zk = ZooKeeper::start();
    let (leader, follower) = settled_pair(&zk, SESSION).await;
    let monitor = Monitor::new(vec![leader.subscribe(), follower.subscribe()]);

    // Nothing answers, nothing closes: only the client's own timeouts can
    // tell. The server last heard from the leader at most a ping interval
    // (3/20 of the session timeout) ago, so it could expire the session
    // from SESSION - 0.6 s on; stepping down must come well before.
    let since = Instant::now();
    zk.freeze();
    let took = within(
        since,
        SESSION - Duration::from_secs(1),
        "the leader steps down",
        || !leader.is_leader(),
    )
    .await;
    eprintln!("measured: step-down after ZooKeeper hung: {took:?} (session timeout {SESSION:?})");

    zk.thaw();
    let since = Instant::now();
    let took = within(since, SETTLE, "one leader again", || {
        settled(&leader, &follower)
    })
    .await;
    eprintln!("measured: one leader again after ZooKeeper resumed: {took:?}");
    let (now_leading, now_following) = by_role(leader, follower);
    wait_for_holders(&zk.servers(), &[now_leading.name, now_following.name]).await;

    monitor.assert_never_two_leaders().await;
    now_leading.election.stop().await;
    now_following.election.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_zookeeper_keeps_a_replica_following_until_it_appears() {
    let _serial = SERIAL.lock().await;
    support::tree::init_logs();
    let mut zk = ZooKeeper::stopped();
    let replica = Replica::start(&zk.servers(), "alone");
    within(
        Instant::now(),
        SETTLE,
        "the replica reports ZooKeeper unreachable",
        || replica.state().why.starts_with("zookeeper unreachable"),
    )
    .await;
    let waiting = replica.state();
    assert_eq!(waiting.role, Role::Follower, "{waiting:?}");
    assert!(!waiting.connected, "{waiting:?}");
    assert_eq!(waiting.term, 0, "{waiting:?}");

    zk.boot();
    let took = within(Instant::now(), SETTLE, "the replica leads", || {
        replica.is_leader()
    })
    .await;
    eprintln!("measured: leading after ZooKeeper appeared: {took:?}");
    wait_for_holders(&zk.servers(), &["alone"]).await;
    replica.election.stop().await;
}
