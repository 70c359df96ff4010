//! Two replicas of `gmsa-reconciler run` (real processes) coordinating
//! through a real ZooKeeper and writing to a real slapd: one writer at a
//! time, one Modify per change whatever the number of replicas, failover
//! after a SIGKILL within the session timeout + 2 s, and recovery from a
//! ZooKeeper restart without restarting the replicas. Roles are read from
//! each replica's `/readyz`; assertions poll with deadlines.

mod support;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gmsa_reconciler::directory::ldap::{Bind, LdapConfig, LdapDirectory, Password};
use gmsa_reconciler::directory::Directory;
use gmsa_reconciler::model::Dn;
use support::daemon::{
    computers_and_groups, host_dn, http_get, metric_sum, password_file, GROUP_OU,
};
use support::tree::Tree;
use support::zookeeper::ZooKeeper;
use support::{free_port, Slapd};

const OU: &str = GROUP_OU;
const SESSION: Duration = Duration::from_secs(4);

struct Replica {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Replica {
    fn start(tree: &Tree, slapd: &Slapd, zk: &ZooKeeper, pw: &std::path::Path) -> Replica {
        let port = free_port();
        let log = tree.root().join(format!(".replica-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_gmsa-reconciler"))
            .arg("run")
            .arg(format!("--fs-root={}", tree.root().display()))
            .arg(format!("--ldap-url={}", slapd.url()))
            .arg(format!("--bind-dn={}", Slapd::SVC_DN))
            .arg(format!("--bind-password-file={}", pw.display()))
            .arg(format!("--group-ou={OU}"))
            .arg("--partition=p1")
            .arg("--batch-window=50ms")
            .arg("--timeout=2s")
            .arg(format!("--zookeeper={}", zk.servers()))
            .arg(format!(
                "--zookeeper-session-timeout={}s",
                SESSION.as_secs()
            ))
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start a replica");
        Replica { child, port, log }
    }

    /// `leader`, `follower`, or `None` when not answering or not ready.
    fn role(&self) -> Option<&'static str> {
        let (status, body) = http_get(self.port, "/readyz");
        if status != 200 {
            return None;
        }
        ["leader", "follower"]
            .into_iter()
            .find(|r| body.contains(&format!("({r})")))
    }

    /// The role as the metrics say, ready or not.
    fn metric_role(&self) -> Option<&'static str> {
        let (status, body) = http_get(self.port, "/metrics");
        if status != 200 {
            return None;
        }
        ["leader", "follower"].into_iter().find(|r| {
            body.lines()
                .any(|l| l == format!("gmsa_role{{role=\"{r}\"}} 1"))
        })
    }

    fn modifies(&self) -> f64 {
        metric_sum(
            &http_get(self.port, "/metrics").1,
            "gmsa_modify_requests_total",
        )
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// (leader index, follower index) once the two are settled.
fn settled(replicas: &[Replica]) -> (usize, usize) {
    let start = Instant::now();
    let roles = loop {
        let roles = (replicas[0].role(), replicas[1].role());
        if matches!(
            roles,
            (Some("leader"), Some("follower")) | (Some("follower"), Some("leader"))
        ) {
            break roles;
        }
        if start.elapsed() > Duration::from_secs(30) {
            for r in replicas {
                eprintln!(
                    "--- {}:\n{}",
                    r.log.display(),
                    std::fs::read_to_string(&r.log).unwrap_or_default()
                );
                eprintln!("readyz: {:?}", http_get(r.port, "/readyz"));
            }
            panic!("no leader and follower after 30 s: {roles:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if roles.0 == Some("leader") {
        (0, 1)
    } else {
        (1, 0)
    }
}

fn members(rt: &tokio::runtime::Runtime, reader: &LdapDirectory, group: &str) -> BTreeSet<String> {
    let dn = Dn::parse(&format!("cn={group},{OU}")).expect("dn");
    match rt.block_on(reader.read_group(&dn)) {
        Ok(Some(g)) => g
            .members
            .iter()
            .map(|m| m.normalised().to_owned())
            .collect(),
        _ => BTreeSet::new(),
    }
}

fn want(hosts: &[&str]) -> BTreeSet<String> {
    hosts
        .iter()
        .map(|h| Dn::parse(&host_dn(h)).expect("dn").normalised().to_owned())
        .collect()
}

fn reader(slapd: &Slapd) -> LdapDirectory {
    let bind = Bind::Simple {
        dn: slapd.admin_dn().to_owned(),
        password: Password::new(slapd.admin_password()),
    };
    LdapDirectory::new(LdapConfig::new(vec![slapd.url()], bind)).expect("reader")
}

#[test]
fn one_writer_one_modify_per_change_and_failover_after_sigkill() {
    let hosts = ["h1", "h2", "h3", "h4", "h5", "h6"];
    let slapd = Slapd::start_with(&[&computers_and_groups(&hosts, &["web-gmsa-hosts"])]);
    let zk = ZooKeeper::start();
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    for h in hosts {
        tree.server(h, "p1", &host_dn(h));
    }
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let reader = reader(&slapd);

    let mut replicas = vec![
        Replica::start(&tree, &slapd, &zk, &pw),
        Replica::start(&tree, &slapd, &zk, &pw),
    ];
    let (leader, follower) = settled(&replicas);
    for r in &replicas {
        let changed = metric_sum(
            &http_get(r.port, "/metrics").1,
            "gmsa_last_role_change_timestamp_seconds",
        );
        assert!(
            changed > 1.7e9,
            "the time of the last role change is exported: {changed}"
        );
    }
    wait_for("initial sync", Duration::from_secs(30), || {
        members(&rt, &reader, "web-gmsa-hosts") == want(&["h1"])
    });

    // Each change: exactly one Modify, from the leader only.
    let total = |r: &[Replica]| r.iter().map(Replica::modifies).sum::<f64>();
    let mut placed = vec!["h1"];
    for host in ["h2", "h3", "h4"] {
        let before = total(&replicas);
        tree.place(host, &format!("web.app#{host}"));
        placed.push(host);
        wait_for("change applied", Duration::from_secs(30), || {
            members(&rt, &reader, "web-gmsa-hosts") == want(&placed)
        });
        // The counter is updated right after the write completes.
        wait_for("Modify counted", Duration::from_secs(5), || {
            total(&replicas) > before
        });
        assert_eq!(total(&replicas) - before, 1.0, "one Modify for one change");
        assert_eq!(
            replicas[follower].modifies(),
            0.0,
            "the follower never writes"
        );
    }

    // SIGKILL the leader and change the tree at once: the follower takes
    // over within the session timeout + 2 s and applies the change.
    replicas[leader].kill();
    let killed = Instant::now();
    tree.place("h5", "web.app#h5");
    placed.push("h5");
    wait_for(
        "the follower takes over",
        SESSION + Duration::from_secs(2),
        || replicas[follower].metric_role() == Some("leader"),
    );
    let took_over = killed.elapsed();
    wait_for(
        "the change made meanwhile is applied",
        Duration::from_secs(30),
        || members(&rt, &reader, "web-gmsa-hosts") == want(&placed),
    );
    eprintln!("failover: the follower led {took_over:?} after the SIGKILL");
}

#[test]
fn a_zookeeper_restart_never_makes_two_writers_and_both_recover() {
    let hosts = ["h1", "h2", "h3"];
    let slapd = Slapd::start_with(&[&computers_and_groups(&hosts, &["web-gmsa-hosts"])]);
    let mut zk = ZooKeeper::start();
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    for h in hosts {
        tree.server(h, "p1", &host_dn(h));
    }
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let reader = reader(&slapd);
    let replicas = vec![
        Replica::start(&tree, &slapd, &zk, &pw),
        Replica::start(&tree, &slapd, &zk, &pw),
    ];
    settled(&replicas);
    wait_for("initial sync", Duration::from_secs(30), || {
        members(&rt, &reader, "web-gmsa-hosts") == want(&["h1"])
    });

    zk.stop();
    // While ZooKeeper is away, and past the session timeout, nobody writes:
    // never two leaders, and soon no leader at all.
    let until = Instant::now() + SESSION + Duration::from_secs(2);
    let mut leaderless = false;
    while Instant::now() < until {
        let roles = [replicas[0].metric_role(), replicas[1].metric_role()];
        assert!(
            roles != [Some("leader"), Some("leader")],
            "two writers at once"
        );
        leaderless |= !roles.contains(&Some("leader"));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(leaderless, "a leader kept writing with ZooKeeper gone");
    assert!(
        replicas.iter().all(|r| r.role().is_none()),
        "replicas cut off from ZooKeeper must not report ready"
    );
    tree.place("h2", "web.app#2");

    zk.restart();
    let (_, _) = settled(&replicas);
    wait_for(
        "the change made meanwhile is applied",
        Duration::from_secs(30),
        || members(&rt, &reader, "web-gmsa-hosts") == want(&["h1", "h2"]),
    );
}
