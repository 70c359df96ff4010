//! `run` against a real slapd and a real temp tree written the way the
//! mirror writes it: placements, hosts and server files change while the
//! daemon runs, and the groups in slapd must follow; slapd is killed and
//! restarted; a manual edit is repaired by the resync; a burst converges
//! with about one Modify per group; metrics, readiness and SIGTERM.
//! Every assertion polls with a deadline.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use gmsa_reconciler::directory::ldap::{Bind, LdapConfig, LdapDirectory, Password};
use gmsa_reconciler::directory::Directory;
use gmsa_reconciler::model::Dn;
use support::daemon::{computers_and_groups, host_dn, http_get, password_file, Running, GROUP_OU};
use support::tree::{eventually, init_logs, Tree};
use support::{free_port, Slapd};

const OU: &str = GROUP_OU;

/// Reads groups straight from slapd.
struct Reader {
    dir: LdapDirectory,
}

impl Reader {
    fn new(slapd: &Slapd) -> Reader {
        let bind = Bind::Simple {
            dn: slapd.admin_dn().to_owned(),
            password: Password::new(slapd.admin_password()),
        };
        let mut config = LdapConfig::new(vec![slapd.url()], bind);
        config.timeout = Duration::from_secs(5);
        Reader {
            dir: LdapDirectory::new(config).expect("reader config"),
        }
    }

    /// The members of a group as lower-case DNs; empty when unreadable.
    async fn members(&self, group: &str) -> BTreeSet<String> {
        let dn = Dn::parse(&format!("cn={group},{OU}")).expect("dn");
        match self.dir.read_group(&dn).await {
            Ok(Some(g)) => g
                .members
                .iter()
                .map(|m| m.normalised().to_owned())
                .collect(),
            _ => BTreeSet::new(),
        }
    }
}

fn set(hosts: &[&str]) -> BTreeSet<String> {
    hosts
        .iter()
        .map(|h| Dn::parse(&host_dn(h)).expect("dn").normalised().to_owned())
        .collect()
}

/// Polls until the group has exactly these hosts.
async fn converge(reader: &Reader, group: &str, hosts: &[&str], what: &str) {
    let want = set(hosts);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let have = reader.members(group).await;
        if have == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {group} has {have:?}, wants {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn daemon_args(tree: &Tree, slapd: &Slapd, pw: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("--fs-root={}", tree.root().display()),
        format!("--ldap-url={}", slapd.url()),
        format!("--bind-dn={}", Slapd::SVC_DN),
        format!("--bind-password-file={}", pw.display()),
        format!("--group-ou={OU}"),
        "--partition=p1".to_owned(),
        "--batch-window=50ms".to_owned(),
        "--no-lock".to_owned(),
        "--timeout=2s".to_owned(),
    ];
    // An extra option replaces the default of the same name.
    for option in extra {
        let name = option.split('=').next().unwrap_or(option);
        args.retain(|a| a.split('=').next() != Some(name));
        args.push(option.to_string());
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_follow_the_tree() {
    init_logs();
    let hosts = ["h1", "h2", "h3", "h4", "h5"];
    let slapd = Slapd::start_with(&[&computers_and_groups(
        &hosts,
        &["web-gmsa-hosts", "db-gmsa-hosts"],
    )]);
    let reader = Reader::new(&slapd);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    tree.server("h1", "p1", &host_dn("h1"));
    tree.server("h2", "p1", &host_dn("h2"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();

    let daemon = Running::start(&daemon_args(&tree, &slapd, &pw, &[]));
    converge(&reader, "web-gmsa-hosts", &["h1"], "initial sync").await;
    eventually("ready", || daemon.get("/readyz").0 == 200).await;

    // Two instances of one proid on one host: the host stays until both go.
    tree.place("h1", "web.app#2");
    tree.unplace("h1", "web.app#1");
    tree.place("h2", "db.app#1");
    converge(&reader, "db-gmsa-hosts", &["h2"], "db placed on h2").await;
    converge(
        &reader,
        "web-gmsa-hosts",
        &["h1"],
        "one of two instances removed",
    )
    .await;
    tree.unplace("h1", "web.app#2");
    converge(&reader, "web-gmsa-hosts", &[], "last instance removed").await;

    // A new host whose placement directory arrives filled (made aside, then
    // renamed into place), before its server file.
    let aside = tree.root().join("placement").join(".incoming-h3");
    std::fs::create_dir(&aside).expect("aside dir");
    std::fs::write(aside.join("web.app#3"), "{}").expect("placement");
    std::fs::write(aside.join("db.app#3"), "{}").expect("placement");
    std::fs::rename(&aside, tree.host_dir("h3")).expect("rename into place");
    tree.server("h3", "p1", &host_dn("h3"));
    converge(&reader, "web-gmsa-hosts", &["h3"], "pre-filled host").await;
    converge(&reader, "db-gmsa-hosts", &["h2", "h3"], "pre-filled host").await;

    // A placement directory that vanishes and comes back.
    std::fs::remove_dir_all(tree.host_dir("h3")).expect("remove host dir");
    converge(&reader, "web-gmsa-hosts", &[], "placement dir vanished").await;
    tree.place("h3", "web.app#4");
    converge(&reader, "web-gmsa-hosts", &["h3"], "placement dir back").await;

    // The server's DN changes: the old DN goes, the new one comes.
    tree.server("h3", "p1", &host_dn("h4"));
    converge(&reader, "web-gmsa-hosts", &["h4"], "DN change").await;

    // Leaving the partition, and a deleted server file, take the memberships away.
    tree.server("h3", "p2", &host_dn("h4"));
    converge(&reader, "web-gmsa-hosts", &[], "partition change").await;
    tree.remove_server("h2");
    converge(&reader, "db-gmsa-hosts", &[], "server file deleted").await;

    // A broken server file keeps the host's last good definition.
    tree.server("h5", "p1", &host_dn("h5"));
    tree.place("h5", "db.app#5");
    converge(&reader, "db-gmsa-hosts", &["h5"], "h5 placed").await;
    tree.server_raw("h5", "nt.dn: [unclosed\n");
    tree.place("h5", "web.app#5");
    converge(
        &reader,
        "web-gmsa-hosts",
        &["h5"],
        "broken file, last good definition",
    )
    .await;
    eventually("server file error counted", || {
        daemon.metric("gmsa_server_file_errors_total") >= 1.0
    })
    .await;

    let (status, body) = daemon.get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "gmsa_servers_in_scope",
        "gmsa_placements",
        "gmsa_proids",
        "gmsa_dirty_groups",
        "gmsa_modify_requests_total",
        "gmsa_retries_total",
        "gmsa_resyncs_total",
        "gmsa_guard_refusals_total",
        "gmsa_event_to_applied_seconds_bucket",
        "gmsa_last_full_sync_timestamp_seconds",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    assert!(daemon.metric("gmsa_event_to_applied_seconds_count") >= 5.0);
    assert!(daemon.metric("gmsa_last_full_sync_timestamp_seconds") > 1.7e9);
    assert_eq!(daemon.metric("gmsa_servers_in_scope"), 2.0, "h1 and h5");
    assert_eq!(daemon.get("/healthz").0, 200);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_repairs_manual_edits() {
    init_logs();
    let slapd = Slapd::start_with(&[&computers_and_groups(&["h1", "h2"], &["web-gmsa-hosts"])]);
    let reader = Reader::new(&slapd);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    tree.server("h1", "p1", &host_dn("h1"));
    tree.server("h2", "p1", &host_dn("h2"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let daemon = Running::start(&daemon_args(&tree, &slapd, &pw, &["--resync-interval=1s"]));
    converge(&reader, "web-gmsa-hosts", &["h1"], "initial sync").await;

    // Someone removes the desired host and adds a managed one by hand.
    slapd.ldapmodify(&format!(
        "dn: cn=web-gmsa-hosts,{OU}\nchangetype: modify\ndelete: member\nmember: {}\n-\nadd: member\nmember: {}\n-\n",
        host_dn("h1"),
        host_dn("h2")
    ));
    assert_eq!(reader.members("web-gmsa-hosts").await, set(&["h2"]));
    converge(
        &reader,
        "web-gmsa-hosts",
        &["h1"],
        "resync repairs the edit",
    )
    .await;
    assert!(daemon.metric("gmsa_resyncs_total") >= 2.0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_after_slapd_is_killed_and_restarted() {
    init_logs();
    let mut slapd = Slapd::start_with(&[&computers_and_groups(
        &["h1", "h2", "h3"],
        &["web-gmsa-hosts", "db-gmsa-hosts"],
    )]);
    let reader = Reader::new(&slapd);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    for h in ["h1", "h2", "h3"] {
        tree.server(h, "p1", &host_dn(h));
    }
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let daemon = Running::start(&daemon_args(&tree, &slapd, &pw, &[]));
    converge(&reader, "web-gmsa-hosts", &["h1"], "initial sync").await;

    slapd.stop();
    tree.place("h2", "web.app#2");
    tree.place("h3", "db.app#1");
    tree.unplace("h1", "web.app#1");
    // The failed writes are retried and counted while slapd is away,
    // under what failed: no server answered.
    eventually("failed writes", || {
        daemon.metric("gmsa_modify_requests_total") > 0.0
            && daemon.get("/metrics").1.contains("outcome=\"unreachable\"")
    })
    .await;
    slapd.restart();
    converge(&reader, "web-gmsa-hosts", &["h2"], "after restart").await;
    converge(&reader, "db-gmsa-hosts", &["h3"], "after restart").await;
    assert!(daemon.metric("gmsa_retries_total") >= 1.0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_5000_placements_takes_about_one_modify_per_group() {
    init_logs();
    let hosts: Vec<String> = (0..100).map(|i| format!("b{i:03}")).collect();
    let proids: Vec<String> = (0..50).map(|i| format!("p{i:02}")).collect();
    let groups: Vec<String> = proids.iter().map(|p| format!("{p}-gmsa-hosts")).collect();
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    let slapd = Slapd::start_with(&[&computers_and_groups(&host_refs, &group_refs)]);
    let reader = Reader::new(&slapd);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    for h in &hosts {
        tree.server(h, "p1", &host_dn(h));
    }
    tree.mark_ready();
    let daemon = Running::start(&daemon_args(&tree, &slapd, &pw, &["--batch-window=1s"]));
    eventually("ready", || daemon.get("/readyz").0 == 200).await;
    let before = daemon.metric("gmsa_modify_requests_total");

    // 5,000 placements: every proid on 20 hosts, 5 instances each.
    let mut want: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); proids.len()];
    for n in 0..5000 {
        let p = n % proids.len();
        let h = (n / proids.len()) % 20 + (p % 5) * 20;
        tree.place(&hosts[h], &format!("{}.app#{n:07}", proids[p]));
        want[p].insert(hosts[h].as_str());
    }
    for (p, group) in groups.iter().enumerate() {
        let hosts: Vec<&str> = want[p].iter().copied().collect();
        converge(&reader, group, &hosts, "burst").await;
    }
    let modifies = daemon.metric("gmsa_modify_requests_total") - before;
    eprintln!(
        "burst: {modifies} Modify requests for {} groups",
        groups.len()
    );
    assert!(
        modifies >= groups.len() as f64,
        "every group changed: {modifies}"
    );
    assert!(
        modifies <= 3.0 * groups.len() as f64,
        "{modifies} Modify requests for {} groups",
        groups.len()
    );
    daemon.stop().await;
}

/// The binary: `--dry-run` prints and writes nothing; SIGTERM exits 0.
#[test]
fn the_binary_dry_runs_and_exits_zero_on_sigterm() {
    let slapd = Slapd::start_with(&[&computers_and_groups(&["h1"], &["web-gmsa-hosts"])]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    tree.server("h1", "p1", &host_dn("h1"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let port = free_port();
    let mut args = daemon_args(&tree, &slapd, &pw, &["--dry-run"]);
    args.push(format!("--metrics-addr=127.0.0.1:{port}"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_gmsa-reconciler"))
        .arg("run")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the daemon");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http_get(port, "/readyz").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(25));
    }
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "clean shutdown exits 0");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "dn: cn=web-gmsa-hosts,{OU}\nchangetype: modify\nadd: member\nmember: {}",
            host_dn("h1")
        )),
        "dry run prints the change:\n{stdout}"
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let members = rt.block_on(Reader::new(&slapd).members("web-gmsa-hosts"));
    assert!(members.is_empty(), "dry run wrote {members:?}");
}

/// The mass-deletion guard in the daemon: additions go through, the
/// deletions stay pending and visible, and are applied once allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deletions_stay_pending_and_visible() {
    init_logs();
    let hosts = ["g1", "g2", "g3", "g4", "g5", "g6", "g7"];
    let slapd = Slapd::start_with(&[&computers_and_groups(
        &hosts,
        &["web-gmsa-hosts", "db-gmsa-hosts"],
    )]);
    let reader = Reader::new(&slapd);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    for h in hosts {
        tree.server(h, "p1", &host_dn(h));
        tree.place(h, &format!("web.app#{h}"));
    }
    tree.mark_ready();
    let daemon = Running::start(&daemon_args(&tree, &slapd, &pw, &["--max-delete=2"]));
    converge(&reader, "web-gmsa-hosts", &hosts, "initial sync").await;

    // Six deletions and one addition at once. An idle daemon applies the
    // first change at once, so the first batch may carry a deletion or two
    // (within --max-delete); the rest coalesce into a batch whose
    // deletions the guard refuses.
    let leaving = ["g1", "g2", "g3", "g4", "g5", "g6"];
    for h in leaving {
        tree.unplace(h, &format!("web.app#{h}"));
    }
    tree.place("g1", "db.app#1");
    converge(
        &reader,
        "db-gmsa-hosts",
        &["g1"],
        "the addition still goes through",
    )
    .await;
    eventually("refusal visible", || {
        daemon.metric("gmsa_guard_refusals_total") >= 1.0
            && daemon.metric("gmsa_refused_deletions_pending") >= 4.0
    })
    .await;
    let members = reader.members("web-gmsa-hosts").await;
    assert!(
        members.len() >= hosts.len() - 2,
        "no more deletions than --max-delete allows: {members:?}"
    );
    daemon.stop().await;

    // Restarted with the guard lifted, the pending deletions are applied.
    let daemon = Running::start(&daemon_args(&tree, &slapd, &pw, &["--allow-mass-delete"]));
    converge(&reader, "web-gmsa-hosts", &["g7"], "deletions once allowed").await;
    daemon.stop().await;
}

/// A second SIGTERM while writes are still in flight exits at once, with
/// status 1 (a clean stop, even one that abandons writes after its grace
/// period, exits 0).
#[test]
fn a_second_signal_exits_at_once() {
    let slapd = Slapd::start_with(&[&computers_and_groups(&["h1"], &["web-gmsa-hosts"])]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    tree.server("h1", "p1", &host_dn("h1"));
    tree.mark_ready();
    let port = free_port();
    let mut args = daemon_args(&tree, &slapd, &pw, &["--timeout=60s"]);
    args.push(format!("--metrics-addr=127.0.0.1:{port}"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gmsa-reconciler"))
        .arg("run")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the daemon");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http_get(port, "/readyz").0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(25));
    }
    // Freeze slapd: it keeps its socket, so the next Modify is sent and
    // never answered, and the write stays in flight.
    let pid: i32 = std::fs::read_to_string(slapd.dir().join("slapd.pid"))
        .expect("slapd.pid")
        .trim()
        .parse()
        .expect("pid");
    let signal = |pid: i32, sig: i32| {
        // SAFETY: kill(2) on processes this test started.
        unsafe {
            libc::kill(pid, sig);
        }
    };
    signal(pid, libc::SIGSTOP);
    tree.place("h1", "web.app#1");
    // Setup, not proof: let the batch window pass so the write is in flight.
    std::thread::sleep(Duration::from_secs(1));
    let daemon = child.id() as i32;
    signal(daemon, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    signal(daemon, libc::SIGTERM);
    let status = child.wait().expect("wait");
    signal(pid, libc::SIGCONT);
    assert_eq!(status.code(), Some(1), "the second signal exits at once");
}
