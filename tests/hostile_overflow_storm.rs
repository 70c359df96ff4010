//! A storm of event-queue overflows: with the kernel's inotify queue at
//! one event, a 20,000-file churn of the placement tree overflows it again
//! and again (each rename queues two notifications in one system call, so
//! it overflows however quickly the daemon reads). The daemon must converge, and coalesce: a few rescans and
//! full directory reads, not one per overflow. Against a real slapd, so
//! the directory reads are real. In a test binary of its own, because it
//! lowers a machine-wide inotify limit for a moment (read when an inotify
//! instance is created, so it is put back once the daemon watches).

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::daemon::{computers_and_groups, host_dn, GROUP_OU};
use support::daemon_bin::DaemonProcess;
use support::e2e::{dn, ldap_args, password_file, read_groups};
use support::tree::{write_atomically, Tree};
use support::Slapd;

const QUEUE: &str = "/proc/sys/fs/inotify/max_queued_events";
const HOSTS: usize = 40;
const PROIDS: usize = 5;
const FILES: usize = 20_000;

/// The inotify queue limit, lowered for as long as the value lives.
struct QueueLimit {
    saved: Option<String>,
}

impl QueueLimit {
    fn lower(to: u32) -> QueueLimit {
        let saved = std::fs::read_to_string(QUEUE).expect("inotify limit readable (Linux)");
        std::fs::write(QUEUE, to.to_string())
            .expect("set the inotify queue limit (needs root, as tests run here)");
        QueueLimit {
            saved: Some(saved.trim().to_owned()),
        }
    }

    fn restore(&mut self) {
        if let Some(saved) = self.saved.take() {
            std::fs::write(QUEUE, saved).expect("restore the inotify queue limit");
        }
    }
}

impl Drop for QueueLimit {
    fn drop(&mut self) {
        self.restore();
    }
}

fn host(i: usize) -> String {
    format!("s{i:02}")
}

fn group(p: usize) -> String {
    format!("svc{p}-gmsa-hosts")
}

/// A 20,000-file churn under a one-event queue converges with a few
/// rescans and full directory reads.
#[test]
fn an_overflow_storm_costs_a_few_rescans() {
    let hosts: Vec<String> = (0..HOSTS).map(host).collect();
    let groups: Vec<String> = (0..PROIDS).map(group).collect();
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    let slapd = Slapd::start_with(&[&computers_and_groups(&host_refs, &group_refs)]);
    let tree = Tree::new();
    let secrets = tempfile::tempdir().expect("tmp");
    let pw = password_file(secrets.path(), Slapd::SVC_PASSWORD);
    for h in &hosts {
        tree.server(h, "p1", &host_dn(h));
        std::fs::create_dir(tree.host_dir(h)).expect("host dir");
    }
    tree.mark_ready();

    let mut args = vec![
        format!("--fs-root={}", tree.root().display()),
        format!("--group-ou={GROUP_OU}"),
        "--partition=p1".to_owned(),
        "--no-lock".to_owned(),
        // The churn removes whole groups' worth of members on purpose.
        "--allow-mass-delete".to_owned(),
    ];
    args.extend(ldap_args(&slapd.url(), Slapd::SVC_DN, &pw));
    let mut limit = QueueLimit::lower(1);
    let mut daemon = DaemonProcess::start(&args);
    daemon.wait_ready();
    limit.restore();
    let before = |name: &str| daemon.metric(name);
    let (rescans0, resyncs0) = (before("gmsa_rescans_total"), before("gmsa_resyncs_total"));

    // The churn: every file written the mirror's way, then a third of
    // them removed again (one proid entirely, and every proid on the last
    // quarter of the hosts).
    let started = Instant::now();
    let instance = |i: usize| format!("svc{}.app#{i:010}", (i / HOSTS) % PROIDS);
    for i in 0..FILES {
        write_atomically(&tree.host_dir(&hosts[i % HOSTS]).join(instance(i)), "{}\n");
    }
    let kept_hosts = HOSTS * 3 / 4;
    for i in 0..FILES {
        let (h, p) = (i % HOSTS, (i / HOSTS) % PROIDS);
        if p == PROIDS - 1 || h >= kept_hosts {
            tree.unplace(&hosts[h], &instance(i));
        }
    }
    let churn = started.elapsed();

    let want_members: BTreeSet<_> = hosts[..kept_hosts]
        .iter()
        .map(|h| dn(&host_dn(h)))
        .collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let found = rt.block_on(read_groups(
            &slapd.url(),
            slapd.admin_dn(),
            slapd.admin_password(),
            GROUP_OU,
        ));
        let converged = (0..PROIDS).all(|p| {
            let want = if p == PROIDS - 1 {
                BTreeSet::new()
            } else {
                want_members.clone()
            };
            found.get(&dn(&format!("cn={},{GROUP_OU}", group(p)))) == Some(&want)
        });
        if converged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not converged 90 s after the churn; daemon log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let converged = started.elapsed();

    let requests = daemon.metric("gmsa_rescan_requests_total");
    let rescans = daemon.metric("gmsa_rescans_total") - rescans0;
    let resyncs = daemon.metric("gmsa_resyncs_total") - resyncs0;
    let group_reads = daemon.metric("gmsa_group_reads_total");
    eprintln!(
        "churn of {} file operations in {churn:.1?}, converged after {converged:.1?}: \
         {requests} rescan requests, {rescans} rescans, {resyncs} full directory reads, \
         {group_reads} single group reads",
        FILES + FILES * 2 / 5
    );
    assert!(requests >= 1.0, "the queue really overflowed");
    assert!(rescans >= 1.0, "the overflow was repaired by a rescan");
    assert!(rescans <= 24.0, "{rescans} rescans for one storm");
    assert!(
        resyncs <= 24.0,
        "{resyncs} full directory reads for one storm"
    );
    assert_eq!(daemon.stop(), Some(0), "clean exit on SIGTERM");
}
