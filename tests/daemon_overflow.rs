//! A lost notification: the kernel's inotify queue overflows and the daemon
//! must notice, rescan the tree and miss nothing. In a test binary of its
//! own, because it lowers a machine-wide inotify limit for a moment.

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

/// A lost notification (the kernel's event queue overflowing) makes the
/// daemon rescan the tree, and nothing is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_queue_overflow_triggers_a_rescan() {
    init_logs();
    const QUEUE: &str = "/proc/sys/fs/inotify/max_queued_events";
    let hosts: Vec<String> = (0..20).map(|i| format!("o{i:02}")).collect();
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let slapd = Slapd::start_with(&[&computers_and_groups(&host_refs, &["web-gmsa-hosts"])]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    for h in &hosts {
        tree.server(h, "p1", &host_dn(h));
    }
    tree.mark_ready();

    // A queue of one event, for the daemon's inotify instance only: the
    // limit is read when an instance is created, so it is put back as soon
    // as the daemon watches. Creating a file queues two events in one
    // system call (created, opened), so the first placement overflows the
    // queue however quickly the daemon reads it.
    let saved = std::fs::read_to_string(QUEUE).expect("inotify limit readable (Linux)");
    std::fs::write(QUEUE, "1")
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
    // Start-up may have overflowed the queue already (the scan opens every
    // server file): what counts is a rescan after the placements.
    let before = daemon.metric("gmsa_rescans_total");

    for h in &hosts {
        for i in 0..10 {
            tree.place(h, &format!("web.app#{h}-{i}"));
        }
    }
    let want: BTreeSet<String> = host_refs
        .iter()
        .map(|h| Dn::parse(&host_dn(h)).expect("dn").normalised().to_owned())
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while members(&slapd, "web-gmsa-hosts").await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not converged after the overflow"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
