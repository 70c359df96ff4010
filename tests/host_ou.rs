//! `--host-ou`: ownership of the hosts' OU outlives what memory knows. The
//! built binary (`run` and `sync`) against a real slapd: a host whose server
//! file is deleted while no daemon runs, or just before the leader of two
//! replicas (real ZooKeeper) is SIGKILLed, is removed from its groups by
//! the next full sync; members outside every `--host-ou` are never touched;
//! the mass-deletion guard still holds; a server file that can't be used
//! (its host's DN unknown) suspends the removals until it can. Each case also shows what happens
//! without the option where that differs, so the option is what is tested.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use support::daemon::{computers_and_groups, host_dn, GROUP_OU};
use support::daemon_bin::DaemonProcess;
use support::e2e::{bin, ldap_args, password_file, read_groups};
use support::tree::Tree;
use support::zookeeper::ZooKeeper;
use support::{wait_until, Slapd};

const HOST_OU: &str = "ou=Computers,dc=ad,dc=com";
/// A member the reconciler does not own: a server outside the hosts' OU.
const OUTSIDE: &str = "cn=file-server,ou=Servers,dc=ad,dc=com";

/// The members of `group` as slapd holds them, normalised.
fn members(slapd: &Slapd, group: &str) -> BTreeSet<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let groups = runtime.block_on(read_groups(
        &slapd.url(),
        slapd.admin_dn(),
        slapd.admin_password(),
        GROUP_OU,
    ));
    let wanted = support::e2e::dn(&format!("cn={group},{GROUP_OU}"));
    groups
        .get(&wanted)
        .map(|m| m.iter().map(|d| d.normalised().to_owned()).collect())
        .unwrap_or_default()
}

fn norm(dns: &[&str]) -> BTreeSet<String> {
    dns.iter()
        .map(|d| support::e2e::dn(d).normalised().to_owned())
        .collect()
}

fn hosts(names: &[&str]) -> Vec<String> {
    names.iter().map(|h| host_dn(h)).collect()
}

/// A slapd whose `web-gmsa-hosts` group holds `members` from the start.
fn slapd_with_members(computers: &[&str], members: &[String]) -> Slapd {
    let mut ldif = computers_and_groups(computers, &["web-gmsa-hosts"]);
    ldif = ldif.trim_end().to_owned();
    for m in members {
        ldif += &format!("\nmember: {m}");
    }
    ldif.push('\n');
    Slapd::start_with(&[&ldif])
}

fn common(tree: &Tree, slapd: &Slapd, pw: &Path) -> Vec<String> {
    let mut args = vec![
        format!("--fs-root={}", tree.root().display()),
        format!("--group-ou={GROUP_OU}"),
        "--partition=p1".to_owned(),
        "--timeout=5s".to_owned(),
    ];
    args.extend(ldap_args(&slapd.url(), Slapd::SVC_DN, pw));
    args
}

fn sync(tree: &Tree, slapd: &Slapd, pw: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = bin()
        .arg("sync")
        .args(common(tree, slapd, pw))
        .args(extra)
        .output()
        .expect("run sync");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_args(tree: &Tree, slapd: &Slapd, pw: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = common(tree, slapd, pw);
    args.push("--batch-window=20ms".to_owned());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// h1 and h2 run `web`; both in the group, with a member outside the OU.
fn two_hosts() -> (Tree, Slapd, std::path::PathBuf) {
    let mut initial = hosts(&["h1", "h2"]);
    initial.push(OUTSIDE.to_owned());
    let slapd = slapd_with_members(&["h1", "h2"], &initial);
    let tree = Tree::new();
    for h in ["h1", "h2"] {
        tree.server(h, "p1", &host_dn(h));
        tree.place(h, "web.app#1");
    }
    tree.mark_ready();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    (tree, slapd, pw)
}

#[test]
fn a_server_file_deleted_while_the_daemon_is_stopped_is_removed_after_the_restart() {
    let (tree, slapd, pw) = two_hosts();
    let host_ou = format!("--host-ou={HOST_OU}");

    let mut daemon = DaemonProcess::start(&run_args(&tree, &slapd, &pw, &["--no-lock", &host_ou]));
    daemon.wait_ready();
    assert_eq!(
        members(&slapd, "web-gmsa-hosts"),
        norm(&[&host_dn("h1"), &host_dn("h2"), OUTSIDE])
    );
    assert_eq!(daemon.stop(), Some(0));

    // h2 is decommissioned while nothing runs: its file and placements go.
    tree.remove_server("h2");
    std::fs::remove_dir_all(tree.host_dir("h2")).expect("remove h2's placements");
    tree.mark_ready();

    // Without --host-ou nothing names h2 any more: it keeps its membership.
    let mut daemon = DaemonProcess::start(&run_args(&tree, &slapd, &pw, &["--no-lock"]));
    daemon.wait_ready();
    assert_eq!(
        members(&slapd, "web-gmsa-hosts"),
        norm(&[&host_dn("h1"), &host_dn("h2"), OUTSIDE]),
        "without --host-ou the stale member stays (what the option fixes)"
    );
    assert_eq!(daemon.stop(), Some(0));

    // With it, the restart's full sync removes h2 and leaves the outside member.
    let mut daemon = DaemonProcess::start(&run_args(&tree, &slapd, &pw, &["--no-lock", &host_ou]));
    daemon.wait_ready();
    let want = norm(&[&host_dn("h1"), OUTSIDE]);
    wait_until(
        "h2 removed after the restart",
        Duration::from_secs(20),
        || members(&slapd, "web-gmsa-hosts") == want,
    );
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn sync_alone_removes_a_stale_member_under_the_host_ou_and_nothing_outside() {
    // The group holds h1 (placed), stale h2 and h3 (no server file), a
    // member outside the OU, and a look-alike OU that is not under it.
    let look_alike = "cn=h9,ou=OtherComputers,dc=ad,dc=com";
    let mut initial = hosts(&["h1", "h2", "h3"]);
    initial.push(OUTSIDE.to_owned());
    initial.push(look_alike.to_owned());
    let slapd = slapd_with_members(&["h1", "h2", "h3"], &initial);
    let tree = Tree::new();
    tree.server("h1", "p1", &host_dn("h1"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);

    let (code, out, err) = sync(&tree, &slapd, &pw, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        members(&slapd, "web-gmsa-hosts").len(),
        5,
        "nothing is managed without --host-ou"
    );

    let host_ou = format!("--host-ou={HOST_OU}");
    let (code, out, err) = sync(&tree, &slapd, &pw, &[&host_ou]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("delete: member"), "{out}");
    assert_eq!(
        members(&slapd, "web-gmsa-hosts"),
        norm(&[&host_dn("h1"), OUTSIDE, look_alike])
    );
    let (code, out, err) = sync(&tree, &slapd, &pw, &[&host_ou]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("changetype"),
        "a second sync changes nothing:\n{out}"
    );
}

#[test]
fn the_guard_still_refuses_a_mass_removal_under_the_host_ou() {
    // 12 stale hosts of 13 managed members: more than 10 and 20%.
    let names: Vec<String> = (0..13).map(|i| format!("h{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut initial = hosts(&refs);
    initial.push(OUTSIDE.to_owned());
    let slapd = slapd_with_members(&refs, &initial);
    let tree = Tree::new();
    tree.server("h0", "p1", &host_dn("h0"));
    tree.place("h0", "web.app#1");
    tree.mark_ready();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    let host_ou = format!("--host-ou={HOST_OU}");

    let (code, out, err) = sync(&tree, &slapd, &pw, &[&host_ou]);
    assert_eq!(code, 1, "a refused plan exits 1:\n{out}\n{err}");
    assert!(err.contains("mass-deletion guard"), "{err}");
    assert_eq!(
        members(&slapd, "web-gmsa-hosts").len(),
        14,
        "nothing removed"
    );

    let mut daemon = DaemonProcess::start(&run_args(&tree, &slapd, &pw, &["--no-lock", &host_ou]));
    daemon.wait_for("the refusal counted", |d| {
        d.metric("gmsa_guard_refusals_total") >= 1.0
    });
    assert_eq!(
        members(&slapd, "web-gmsa-hosts").len(),
        14,
        "the daemon refuses too"
    );
    assert_eq!(daemon.stop(), Some(0));

    let (code, out, err) = sync(&tree, &slapd, &pw, &[&host_ou, "--allow-mass-delete"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        members(&slapd, "web-gmsa-hosts"),
        norm(&[&host_dn("h0"), OUTSIDE])
    );
}

/// `/readyz`: `Some(true)` leader, `Some(false)` follower, `None` not ready.
fn role(d: &DaemonProcess) -> Option<bool> {
    let (status, body) = d.get("/readyz");
    (status == 200).then(|| body.contains("(leader)"))
}

fn signal(d: &DaemonProcess, signal: libc::c_int) {
    // SAFETY: kill(2) on a child of this test.
    unsafe {
        libc::kill(d.pid() as libc::pid_t, signal);
    }
}

#[test]
fn replicas_that_never_saw_the_server_file_remove_the_host_after_the_leader_is_killed() {
    let (tree, slapd, pw) = two_hosts();
    let zk = ZooKeeper::start();
    let host_ou = format!("--host-ou={HOST_OU}");
    let zookeeper = format!("--zookeeper={}", zk.servers());
    let args = run_args(
        &tree,
        &slapd,
        &pw,
        &[&zookeeper, "--zookeeper-session-timeout=4s", &host_ou],
    );
    let a = DaemonProcess::start(&args);
    let b = DaemonProcess::start(&args);
    wait_until("a leader and a follower", Duration::from_secs(30), || {
        matches!(
            (role(&a), role(&b)),
            (Some(true), Some(false)) | (Some(false), Some(true))
        )
    });
    let (leader, mut follower) = if role(&a) == Some(true) {
        (a, b)
    } else {
        (b, a)
    };

    // The follower is being restarted (a rolling upgrade) when h2 is
    // deleted, and the leader dies right after the deletion, before it
    // could act: it is stopped first, so it surely never sees the change.
    assert_eq!(follower.stop(), Some(0));
    signal(&leader, libc::SIGSTOP);
    tree.remove_server("h2");
    std::fs::remove_dir_all(tree.host_dir("h2")).expect("remove h2's placements");
    tree.mark_ready();
    signal(&leader, libc::SIGKILL);
    drop(leader);

    // Neither replica that runs now has ever seen h2's server file.
    follower = DaemonProcess::start(&args);
    let mut other = DaemonProcess::start(&args);
    let want = norm(&[&host_dn("h1"), OUTSIDE]);
    follower.wait_for("a new leader removes h2", |d| {
        (role(d) == Some(true) || role(&other) == Some(true))
            && members(&slapd, "web-gmsa-hosts") == want
    });
    other.wait_for("the other replica is ready", |d| role(d).is_some());
    assert_eq!(members(&slapd, "web-gmsa-hosts"), want);
}

#[test]
fn an_unusable_server_file_suspends_the_host_ou_until_it_can_be_used() {
    let mut initial = hosts(&["h1", "h2"]);
    initial.push(OUTSIDE.to_owned());
    let slapd = slapd_with_members(&["h1", "h2"], &initial);
    let tree = Tree::new();
    tree.server("h1", "p1", &host_dn("h1"));
    tree.place("h1", "web.app#1");
    // h2's file can't be read: its DN may well be the member cn=h2.
    tree.server_raw("h2", "partition: p1\nnt.dn: [unclosed\n");
    tree.place("h2", "web.app#2");
    tree.mark_ready();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    let host_ou = format!("--host-ou={HOST_OU}");

    let (code, out, err) = sync(&tree, &slapd, &pw, &[&host_ou]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("servers/h2") && err.contains("--host-ou"),
        "{err}"
    );
    assert_eq!(
        members(&slapd, "web-gmsa-hosts"),
        norm(&[&host_dn("h1"), &host_dn("h2"), OUTSIDE]),
        "nothing removed while a host's DN is unknown"
    );

    // The file is fixed (out of the partition now): h2 goes.
    tree.server("h2", "p2", &host_dn("h2"));
    let (code, out, err) = sync(&tree, &slapd, &pw, &[&host_ou]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        members(&slapd, "web-gmsa-hosts"),
        norm(&[&host_dn("h1"), OUTSIDE])
    );
}

#[test]
fn a_warm_follower_removes_a_host_deleted_just_before_the_leader_is_killed() {
    let (tree, slapd, pw) = two_hosts();
    let zk = ZooKeeper::start();
    let host_ou = format!("--host-ou={HOST_OU}");
    let zookeeper = format!("--zookeeper={}", zk.servers());
    let args = run_args(
        &tree,
        &slapd,
        &pw,
        &[&zookeeper, "--zookeeper-session-timeout=4s", &host_ou],
    );
    let a = DaemonProcess::start(&args);
    let b = DaemonProcess::start(&args);
    wait_until("a leader and a follower", Duration::from_secs(30), || {
        matches!(
            (role(&a), role(&b)),
            (Some(true), Some(false)) | (Some(false), Some(true))
        )
    });
    let (leader, mut follower) = if role(&a) == Some(true) {
        (a, b)
    } else {
        (b, a)
    };

    // The leader is stopped before the deletion and killed after it: it
    // never acts on it. The follower sees the deletion itself.
    signal(&leader, libc::SIGSTOP);
    tree.remove_server("h2");
    tree.mark_ready();
    signal(&leader, libc::SIGKILL);
    drop(leader);
    let want = norm(&[&host_dn("h1"), OUTSIDE]);
    follower.wait_for("the follower leads and removes h2", |d| {
        role(d) == Some(true) && members(&slapd, "web-gmsa-hosts") == want
    });
}
