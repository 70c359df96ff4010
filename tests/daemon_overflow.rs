//! The kernel's inotify queue: when it overflows the daemon must notice,
//! rescan the tree and miss nothing; and the daemon's own reading of the
//! tree must never fill it. In a test binary of its own, because it lowers
//! a machine-wide inotify limit for a moment (one test at a time).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use gmsa_reconciler::directory::ldap::{Bind, LdapConfig, LdapDirectory, Password};
use gmsa_reconciler::directory::Directory;
use gmsa_reconciler::model::Dn;
use support::daemon::{computers_and_groups, host_dn, password_file, Running, GROUP_OU};
use support::tree::{eventually, init_logs, Tree};
use support::Slapd;

const OU: &str = GROUP_OU;

async fn members(slapd: &Slapd, group: &str) -> BTreeSet<String> {
    let bind = Bind::Simple {
        dn: slapd.admin_dn().to_owned(),
        password: Password::new(slapd.admin_password()),
    };
    let reader = LdapDirectory::new(LdapConfig::new(vec![slapd.url()], bind)).expect("reader");
    let dn = Dn::parse(&format!("cn={group},{OU}")).expect("dn");
    match reader.read_group(&dn).await {
        Ok(Some(g)) => g
            .members
            .iter()
            .map(|m| m.normalised().to_owned())
            .collect(),
        _ => BTreeSet::new(),
    }
}

const QUEUE: &str = "/proc/sys/fs/inotify/max_queued_events";

/// One test at a time lowers the machine's queue limit.
static QUEUE_LIMIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A daemon on `tree` whose inotify queue holds `events` notifications:
/// the limit is read when an instance is created, so it is put back as
/// soon as the daemon is ready.
async fn start_with_queue(slapd: &Slapd, tree: &Tree, events: u32) -> Running {
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    let _one_at_a_time = QUEUE_LIMIT.lock().await;
    let saved = std::fs::read_to_string(QUEUE).expect("inotify limit readable (Linux)");
    std::fs::write(QUEUE, events.to_string())
        .expect("set the inotify queue limit (needs root, as tests run here)");
    let daemon = Running::start(&[
        format!("--fs-root={}", tree.root().display()),
        format!("--ldap-url={}", slapd.url()),
        format!("--bind-dn={}", Slapd::SVC_DN),
        format!("--bind-password-file={}", pw.display()),
        format!("--group-ou={OU}"),
        "--partition=p1".to_owned(),
        "--batch-window=500ms".to_owned(),
        "--no-lock".to_owned(),
    ]);
    let ready = tokio::time::timeout(
        Duration::from_secs(30),
        eventually("ready", || daemon.get("/readyz").0 == 200),
    )
    .await;
    std::fs::write(QUEUE, saved.trim()).expect("restore the inotify queue limit");
    ready.expect("ready");
    daemon
}

/// `n` hosts named `prefix` and a number, their computer accounts and
/// the web group in a fresh slapd, and a tree with their server files.
fn estate(prefix: &str, n: usize) -> (Vec<String>, Slapd, Tree) {
    let hosts: Vec<String> = (0..n).map(|i| format!("{prefix}{i:02}")).collect();
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let slapd = Slapd::start_with(&[&computers_and_groups(&host_refs, &["web-gmsa-hosts"])]);
    let tree = Tree::new();
    for h in &hosts {
        tree.server(h, "p1", &host_dn(h));
    }
    (hosts, slapd, tree)
}

/// Waits until `group` holds exactly the computer accounts of `hosts`.
async fn converged(slapd: &Slapd, group: &str, hosts: &[&str]) {
    let want: BTreeSet<String> = hosts
        .iter()
        .map(|h| Dn::parse(&host_dn(h)).expect("dn").normalised().to_owned())
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while members(slapd, group).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{group} not converged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A lost notification (the kernel's event queue overflowing) makes the
/// daemon rescan the tree, and nothing is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_queue_overflow_triggers_a_rescan() {
    init_logs();
    let (hosts, slapd, tree) = estate("o", 20);
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    tree.mark_ready();
    // A queue of one event: creating a file queues two in one go (created,
    // closed after writing), so the first placement overflows the queue
    // however quickly the daemon reads it.
    let daemon = start_with_queue(&slapd, &tree, 1).await;
    let before = daemon.metric("gmsa_rescans_total");

    for h in &hosts {
        for i in 0..10 {
            tree.place(h, &format!("web.app#{h}-{i}"));
        }
    }
    converged(&slapd, "web-gmsa-hosts", &host_refs).await;
    // The overflow is noticed and rescanned, whether or not the events
    // that got through converged the group first.
    tokio::time::timeout(
        Duration::from_secs(30),
        eventually("the overflow was noticed", || {
            daemon.metric("gmsa_rescans_total") > before
        }),
    )
    .await
    .expect("the overflow was noticed");
    daemon.stop().await;
}

/// The daemon's start-up scan opens every server file and lists every host
/// directory. None of that may queue a notification: watching for files
/// opened, the daemon overflowed its own queue at every start of a large
/// tree (50,000 hosts against the default 16,384 events), and rescanned
/// the whole tree for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_own_reading_does_not_fill_its_queue() {
    init_logs();
    let (hosts, slapd, tree) = estate("r", 40);
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    for h in &hosts {
        tree.place(h, &format!("web.app#{h}"));
    }
    tree.mark_ready();
    // Room for a few changes, far less than the scan's 80 files and
    // directories.
    let daemon = start_with_queue(&slapd, &tree, 8).await;
    converged(&slapd, "web-gmsa-hosts", &host_refs).await;
    assert_eq!(
        daemon.metric("gmsa_rescan_requests_total"),
        0.0,
        "the start-up scan overflowed the daemon's own queue"
    );
    assert_eq!(daemon.metric("gmsa_rescans_total"), 0.0);

    // And the small queue still carries a change.
    let (left, stay) = host_refs.split_first().expect("hosts");
    std::fs::remove_file(tree.root().join(format!("placement/{left}/web.app#{left}"))).expect("rm");
    converged(&slapd, "web-gmsa-hosts", stay).await;
    assert_eq!(daemon.metric("gmsa_rescan_requests_total"), 0.0);
    daemon.stop().await;
}
