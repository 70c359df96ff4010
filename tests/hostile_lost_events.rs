//! Hostile to the watcher: changes it never reports, and a watch that
//! stops seeing the tree. The daemon runs as its own process against an
//! LDIF directory file.
//!
//! A tmpfs mounted over a host's placement directory (the tests run as
//! root) changes what a scan of the tree sees without any notification:
//! the watch stays on the directory underneath. Moving the tree's root
//! away and putting a new directory in its place leaves the watcher
//! watching the old one.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::daemon_bin::DaemonProcess;
use support::e2e::{dn, ldif_groups};
use support::tree::{groups_ldif, write_atomically, Tree};

fn host_dn(host: &str) -> String {
    format!("cn={host},ou=Computers,dc=ad,dc=com")
}

/// The normalised member DNs of a group in the directory file.
fn members(directory: &Path, group: &str) -> Vec<String> {
    let text = std::fs::read_to_string(directory).unwrap_or_default();
    // A file caught between writes is read again on the next poll.
    if gmsa_reconciler::ldif::parse(&text).is_err() {
        return vec!["<unreadable>".to_owned()];
    }
    ldif_groups(&text)
        .get(&dn(&format!("cn={group},ou=Groups,dc=ad,dc=com")))
        .map(|m| m.iter().map(|d| d.normalised().to_owned()).collect())
        .unwrap_or_default()
}

fn hosts(names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|h| dn(&host_dn(h)).normalised().to_owned())
        .collect()
}

fn args(tree: &Path, directory: &Path, resync: &str) -> Vec<String> {
    vec![
        format!("--fs-root={}", tree.display()),
        format!("--directory={}", directory.display()),
        "--group-ou=OU=Groups,DC=ad,DC=com".to_owned(),
        "--partition=p1".to_owned(),
        "--batch-window=20ms".to_owned(),
        format!("--resync-interval={resync}"),
        "--no-lock".to_owned(),
    ]
}

/// A tmpfs mounted for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "none"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount a tmpfs on {} (needs root)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A placement the watcher never reports is applied by the next periodic
/// resync, which rescans the tree; so is a removal. The tmpfs is mounted
/// once the daemon watches (a watch set later would be on the tmpfs).
#[test]
fn a_change_the_watcher_never_saw_is_repaired_by_the_periodic_resync() {
    let tree = Tree::new();
    tree.server("h1", "p1", &host_dn("h1"));
    tree.server("h2", "p1", &host_dn("h2"));
    tree.place("h1", "web.app#1");
    std::fs::create_dir(tree.host_dir("h2")).expect("placement/h2");
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    std::fs::write(
        &directory,
        groups_ldif(&[("web-gmsa-hosts", &[]), ("db-gmsa-hosts", &[])]),
    )
    .expect("directory");

    // First, with no resync in sight: the watcher really misses it. The
    // visible change is made after the hidden one, so had the watcher seen
    // the hidden one it would have been applied first.
    let mut daemon = DaemonProcess::start(&args(tree.root(), &directory, "1h"));
    daemon.wait_for("the initial sync", |_| {
        members(&directory, "web-gmsa-hosts") == hosts(&["h1"])
    });
    daemon.wait_ready();
    let first = Tmpfs::mount(&tree.host_dir("h2"));
    write_atomically(&tree.host_dir("h2").join("web.app#2"), "{}\n");
    tree.place("h1", "db.app#1");
    daemon.wait_for("the visible change", |_| {
        members(&directory, "db-gmsa-hosts") == hosts(&["h1"])
    });
    assert_eq!(
        members(&directory, "web-gmsa-hosts"),
        hosts(&["h1"]),
        "the watcher saw a change made on the mount"
    );
    assert_eq!(daemon.stop(), Some(0));

    // With a short resync interval the next resync finds what the watcher
    // cannot see: the placement on the mount at startup, then its
    // disappearance under a second, empty tmpfs mounted over the first.
    let mut daemon = DaemonProcess::start(&args(tree.root(), &directory, "2s"));
    daemon.wait_for("the startup scan", |_| {
        members(&directory, "web-gmsa-hosts") == hosts(&["h1", "h2"])
    });
    daemon.wait_ready();
    let second = Tmpfs::mount(&tree.host_dir("h2"));
    daemon.wait_for("the removal the watcher missed", |_| {
        members(&directory, "web-gmsa-hosts") == hosts(&["h1"])
    });
    assert!(
        daemon.metric("gmsa_rescans_total") >= 1.0,
        "repaired by a rescan"
    );
    assert_eq!(daemon.stop(), Some(0));
    drop(second);
    drop(first);
}

/// The tree's root moved away and a new one put in its place: the watcher
/// sees nothing any more, so the daemon says so on `/readyz`, restarts the
/// watcher on the new root with a rescan, and follows it from then on.
#[test]
fn a_watcher_that_loses_the_tree_is_restarted_and_readiness_says_why() {
    let tree = Tree::new();
    tree.server("h1", "p1", &host_dn("h1"));
    tree.server("h2", "p1", &host_dn("h2"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    std::fs::write(
        &directory,
        groups_ldif(&[("web-gmsa-hosts", &[]), ("db-gmsa-hosts", &[])]),
    )
    .expect("directory");
    let mut daemon = DaemonProcess::start(&args(tree.root(), &directory, "1h"));
    daemon.wait_for("the initial sync", |_| {
        members(&directory, "web-gmsa-hosts") == hosts(&["h1"])
    });
    daemon.wait_ready();

    let away = tree.root().with_extension("away");
    std::fs::rename(tree.root(), &away).expect("move the root away");
    daemon.wait_for("not ready, naming the watcher", |d| {
        let (status, body) = d.get("/readyz");
        status == 503 && body.contains("tree watcher")
    });

    // A new tree in the old place, with a placement the old one lacked.
    std::fs::create_dir(tree.root()).expect("new root");
    std::fs::create_dir(tree.root().join("servers")).expect("servers/");
    std::fs::create_dir(tree.root().join("placement")).expect("placement/");
    tree.server("h1", "p1", &host_dn("h1"));
    tree.server("h2", "p1", &host_dn("h2"));
    tree.place("h1", "web.app#1");
    tree.place("h2", "web.app#2");
    tree.mark_ready();
    daemon.wait_for("the new tree rescanned", |_| {
        members(&directory, "web-gmsa-hosts") == hosts(&["h1", "h2"])
    });
    daemon.wait_ready();
    assert!(daemon.metric("gmsa_watcher_restarts_total") >= 1.0);

    // Events from the new tree are followed (no resync for an hour).
    tree.place("h2", "db.app#1");
    daemon.wait_for("an event from the new tree", |_| {
        members(&directory, "db-gmsa-hosts") == hosts(&["h2"])
    });
    assert_eq!(daemon.stop(), Some(0));
    let _ = std::fs::remove_dir_all(&away);
}
