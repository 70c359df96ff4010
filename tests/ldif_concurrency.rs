//! The LDIF directory file is shared state: what the binary does when
//! others touch the file it keeps the groups in. Two `sync` runs at once,
//! a hand edit while the daemon runs, a full file system, a read-only file
//! or mount, a temp file left by a killed run, and a file that names one
//! entry twice.
//!
//! The tmpfs tests mount file systems, so the tests run as root (as CI
//! does); every mount is unmounted when its test ends, failed or not.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::e2e::{bin, dn, ldif_groups, Groups};
use support::tmpfs::Tmpfs;
use support::tree::{groups_ldif, Tree};

const GROUP_OU: &str = "ou=Groups,dc=ad,dc=com";

fn host_dn(host: &str) -> String {
    format!("cn={host},ou=Computers,dc=ad,dc=com")
}

/// The options every command here shares.
fn common(tree: &Tree, directory: &Path) -> Vec<String> {
    vec![
        format!("--fs-root={}", tree.root().display()),
        format!("--directory={}", directory.display()),
        format!("--group-ou={GROUP_OU}"),
        "--partition=p1".to_owned(),
    ]
}

fn sync(tree: &Tree, directory: &Path) -> Command {
    let mut cmd = bin();
    cmd.arg("sync").args(common(tree, directory));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn groups_in(path: &Path) -> Groups {
    ldif_groups(&fs::read_to_string(path).expect("read the directory file"))
}

/// The members of group `name` in the file, as normalised DNs.
fn members(path: &Path, name: &str) -> Vec<String> {
    let groups = groups_in(path);
    let group = dn(&format!("cn={name},{GROUP_OU}"));
    let members = groups
        .get(&group)
        .unwrap_or_else(|| panic!("no group {name} in {}", path.display()));
    members.iter().map(|m| m.normalised().to_owned()).collect()
}

fn dns(hosts: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = hosts
        .iter()
        .map(|h| {
            if h.contains('=') {
                dn(h).normalised().to_owned()
            } else {
                dn(&host_dn(h)).normalised().to_owned()
            }
        })
        .collect();
    out.sort();
    out
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A tree with host `h` serving partition p1 and running `proid`.
fn place(tree: &Tree, host: &str, proid: &str, n: u32) {
    tree.server(host, "p1", &host_dn(host));
    tree.place(host, &format!("{proid}.app#{n}"));
}

/// `gmsa-reconciler run` as a child process, logging to a file; killed
/// when dropped (a test that failed), stopped with SIGTERM by [`stop`].
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(tree: &Tree, directory: &Path, log: PathBuf) -> Daemon {
        Daemon::start_with(tree, directory, log, &[])
    }

    fn start_with(tree: &Tree, directory: &Path, log: PathBuf, extra: &[&str]) -> Daemon {
        let err = fs::File::create(&log).expect("log file");
        let child = bin()
            .arg("run")
            .args(common(tree, directory))
            .args(["--no-lock", "--batch-window=20ms"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start the daemon");
        Daemon { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the daemon must exit 0.
    fn stop(mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "daemon exit: {status}\n{}", self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon ignores SIGTERM\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `check` for up to 30 s; the daemon's log is shown on failure.
fn eventually(what: &str, daemon: &Daemon, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\ndaemon log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `path` the way an editor that saves in place does: same inode.
fn edit_in_place(path: &Path, edit: impl FnOnce(&str) -> String) {
    let before = fs::read_to_string(path).expect("read");
    let ino = fs::metadata(path).expect("stat").ino();
    fs::write(path, edit(&before)).expect("write in place");
    assert_eq!(fs::metadata(path).expect("stat").ino(), ino);
}

#[test]
fn two_concurrent_syncs_on_one_file_both_land_every_time() {
    // Two trees, each with its own proid and hosts, both reconciled into
    // one file: neither run's hosts are managed by the other, so every
    // round both groups must grow by one host.
    let tree_a = Tree::new();
    let tree_b = Tree::new();
    tree_a.mark_ready();
    tree_b.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    fs::write(
        &directory,
        groups_ldif(&[("alpha-gmsa-hosts", &[]), ("beta-gmsa-hosts", &[])]),
    )
    .expect("write directory");

    let mut expect_a: Vec<String> = Vec::new();
    let mut expect_b: Vec<String> = Vec::new();
    for round in 0..10u32 {
        let (ha, hb) = (format!("a{round}"), format!("b{round}"));
        place(&tree_a, &ha, "alpha", round);
        place(&tree_b, &hb, "beta", round);
        expect_a.push(ha);
        expect_b.push(hb);

        let a = sync(&tree_a, &directory).spawn().expect("start sync a");
        let b = sync(&tree_b, &directory).spawn().expect("start sync b");
        let a = a.wait_with_output().expect("sync a");
        let b = b.wait_with_output().expect("sync b");
        assert_eq!(a.status.code(), Some(0), "round {round}: {}", text(&a));
        assert_eq!(b.status.code(), Some(0), "round {round}: {}", text(&b));

        let want_a: Vec<&str> = expect_a.iter().map(String::as_str).collect();
        let want_b: Vec<&str> = expect_b.iter().map(String::as_str).collect();
        assert_eq!(
            (
                members(&directory, "alpha-gmsa-hosts"),
                members(&directory, "beta-gmsa-hosts")
            ),
            (dns(&want_a), dns(&want_b)),
            "round {round}: both runs' changes are in the file\n{}\n{}",
            text(&a),
            text(&b)
        );
    }
    assert_eq!(
        names_in(dir.path()),
        ["directory.ldif"],
        "no temp file left"
    );
}

#[test]
fn a_hand_edit_made_while_the_daemon_runs_is_kept() {
    let tree = Tree::new();
    place(&tree, "h1", "web", 1);
    tree.server("h2", "p1", &host_dn("h2"));
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &[])])).expect("write directory");
    tree.mark_ready();
    let daemon = Daemon::start(&tree, &directory, dir.path().join("daemon.log"));
    eventually("the first sync", &daemon, || {
        members(&directory, "web-gmsa-hosts") == dns(&["h1"])
    });

    // An operator adds an account the reconciler does not manage, in place.
    let svc = "CN=svc-deploy,OU=Users,DC=ad,DC=com";
    edit_in_place(&directory, |text| format!("{text}member: {svc}\n"));
    // Then the daemon writes the group again.
    tree.place("h2", "web.app#2");
    eventually("the placement change", &daemon, || {
        members(&directory, "web-gmsa-hosts").len() >= 2
    });
    eventually("h2 added and the hand edit kept", &daemon, || {
        members(&directory, "web-gmsa-hosts") == dns(&["h1", "h2", svc])
    });

    // Once more, the way an editor that renames its temp file saves.
    let admin = "CN=admin,OU=Users,DC=ad,DC=com";
    let edited = fs::read_to_string(&directory).expect("read") + &format!("member: {admin}\n");
    support::tree::write_atomically(&directory, &edited);
    tree.unplace("h1", "web.app#1");
    eventually("h1 removed and both hand edits kept", &daemon, || {
        members(&directory, "web-gmsa-hosts") == dns(&["h2", svc, admin])
    });
    daemon.stop();
}

#[test]
fn a_managed_host_added_by_hand_is_removed_by_the_next_resync() {
    // Reads see the file as it is: the periodic resync repairs a hand edit
    // of a managed member without waiting for a write of its own.
    let tree = Tree::new();
    place(&tree, "h1", "web", 1);
    tree.server("h2", "p1", &host_dn("h2"));
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &[])])).expect("write directory");
    tree.mark_ready();
    let daemon = Daemon::start_with(
        &tree,
        &directory,
        dir.path().join("daemon.log"),
        &["--resync-interval=300ms"],
    );
    eventually("the first sync", &daemon, || {
        members(&directory, "web-gmsa-hosts") == dns(&["h1"])
    });
    let svc = "CN=svc-deploy,OU=Users,DC=ad,DC=com";
    edit_in_place(&directory, |text| {
        format!("{text}member: {}\nmember: {svc}\n", host_dn("h2"))
    });
    eventually(
        "h2, in scope but not placed, removed; svc kept",
        &daemon,
        || members(&directory, "web-gmsa-hosts") == dns(&["h1", svc]),
    );
    daemon.stop();
}

#[test]
fn a_full_file_system_fails_the_write_and_the_change_lands_once_there_is_room() {
    let tmpfs = Tmpfs::mount("256k");
    let tree = Tree::new();
    place(&tree, "h1", "web", 1);
    tree.server("h2", "p1", &host_dn("h2"));
    let directory = tmpfs.path().join("directory.ldif");
    fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &[])])).expect("write directory");
    tree.mark_ready();
    let logs = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(&tree, &directory, logs.path().join("daemon.log"));
    eventually("the first sync", &daemon, || {
        members(&directory, "web-gmsa-hosts") == dns(&["h1"])
    });

    // Fill the file system to the last byte.
    let filler = tmpfs.path().join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0u8]).is_ok() {}
    }
    let before = fs::read(&directory).expect("read");
    tree.place("h2", "web.app#2");
    eventually("the write fails for want of space", &daemon, || {
        daemon.log().contains("No space left on device")
    });
    assert_eq!(
        fs::read(&directory).expect("read"),
        before,
        "nothing written"
    );
    assert_eq!(
        names_in(tmpfs.path()),
        ["directory.ldif", "filler"],
        "no temp file left"
    );

    fs::remove_file(&filler).expect("free the space");
    eventually("the change lands", &daemon, || {
        members(&directory, "web-gmsa-hosts") == dns(&["h1", "h2"])
    });
    let log = daemon.log();
    assert!(
        log.contains(&directory.display().to_string()),
        "the error names the file:\n{log}"
    );
    daemon.stop();
    assert_eq!(names_in(tmpfs.path()), ["directory.ldif"]);
}

#[test]
fn a_read_only_file_is_refused_not_replaced() {
    let tree = Tree::new();
    place(&tree, "h1", "web", 1);
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    let content = groups_ldif(&[("web-gmsa-hosts", &[])]);
    fs::write(&directory, &content).expect("write directory");
    fs::set_permissions(&directory, fs::Permissions::from_mode(0o444)).expect("chmod");
    let ino = fs::metadata(&directory).expect("stat").ino();

    let out = sync(&tree, &directory).output().expect("sync");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: is read-only (no write permission); the file is not replaced",
            directory.display()
        )),
        "{}",
        text(&out)
    );
    assert_eq!(fs::read_to_string(&directory).expect("read"), content);
    assert_eq!(fs::metadata(&directory).expect("stat").ino(), ino);
    assert_eq!(names_in(dir.path()), ["directory.ldif"]);

    // Writable again: the same run applies the change.
    fs::set_permissions(&directory, fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = sync(&tree, &directory).output().expect("sync");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(members(&directory, "web-gmsa-hosts"), dns(&["h1"]));
}

#[test]
fn a_file_on_a_read_only_mount_is_refused() {
    let tmpfs = Tmpfs::mount("1m");
    let tree = Tree::new();
    place(&tree, "h1", "web", 1);
    tree.mark_ready();
    let directory = tmpfs.path().join("directory.ldif");
    let content = groups_ldif(&[("web-gmsa-hosts", &[])]);
    fs::write(&directory, &content).expect("write directory");
    tmpfs.remount("ro");

    let out = sync(&tree, &directory).output().expect("sync");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: is on a read-only file system; the file is not replaced",
            directory.display()
        )),
        "{}",
        text(&out)
    );
    tmpfs.remount("rw");
    assert_eq!(fs::read_to_string(&directory).expect("read"), content);
}

#[test]
fn a_temp_file_left_by_a_killed_run_is_removed_by_the_next_commit() {
    let tree = Tree::new();
    place(&tree, "h1", "web", 1);
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &[])])).expect("write directory");
    // What a run killed between writing its temp file and the rename leaves.
    let mut killed = Command::new("true").spawn().expect("spawn");
    killed.wait().expect("wait");
    let stale = dir
        .path()
        .join(format!(".directory.ldif.tmp.{}", killed.id()));
    fs::write(&stale, "dn: cn=half").expect("stale temp");
    let unrelated = dir.path().join(".directory.ldif.bak");
    fs::write(&unrelated, "kept").expect("unrelated");

    let out = sync(&tree, &directory).output().expect("sync");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(members(&directory, "web-gmsa-hosts"), dns(&["h1"]));
    assert_eq!(
        names_in(dir.path()),
        [".directory.ldif.bak", "directory.ldif"],
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("removed a temp file left by an earlier run"),
        "{}",
        text(&out)
    );
}

#[test]
fn duplicate_dns_in_the_file_are_an_error_naming_both_lines() {
    let tree = Tree::new();
    place(&tree, "h1", "web", 1);
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    // The same group twice, spelled differently: line 17 repeats line 13.
    let content = groups_ldif(&[("web-gmsa-hosts", &[])])
        + "\ndn: CN=Web-GMSA-Hosts, OU=groups,DC=ad,DC=com\nobjectClass: group\nsAMAccountName: web-gmsa-hosts\n";
    fs::write(&directory, &content).expect("write directory");
    let line_of = |needle: &str| {
        content
            .lines()
            .position(|l| l.eq_ignore_ascii_case(needle))
            .expect("line")
            + 1
    };
    let first = line_of("dn: cn=web-gmsa-hosts,ou=Groups,dc=ad,dc=com");
    let second = line_of("dn: CN=Web-GMSA-Hosts, OU=groups,DC=ad,DC=com");

    for verb in ["plan", "sync"] {
        let out = bin()
            .arg(verb)
            .args(common(&tree, &directory))
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{verb}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = format!(
            "{}: line {second}: the entry \"CN=Web-GMSA-Hosts, OU=groups,DC=ad,DC=com\" repeats the DN of the entry on line {first}",
            directory.display()
        );
        assert!(
            stderr.contains(&want),
            "{verb}: want {want:?}\n{}",
            text(&out)
        );
    }
    assert_eq!(fs::read_to_string(&directory).expect("read"), content);
}

#[test]
fn a_change_that_met_a_broken_hand_edit_lands_once_the_file_is_valid_again() {
    // An operator's edit leaves the file unparsable just as a placement
    // change is committed: the commit is refused, and the change must stay
    // pending (not be taken as applied by the retry) until the file parses
    // again, then land next to the repaired edit.
    let tree = Tree::new();
    place(&tree, "h1", "web", 1);
    tree.server("h2", "p1", &host_dn("h2"));
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &[])])).expect("write directory");
    tree.mark_ready();
    let daemon = Daemon::start(&tree, &directory, dir.path().join("daemon.log"));
    eventually("the first sync", &daemon, || {
        members(&directory, "web-gmsa-hosts") == dns(&["h1"])
    });

    let svc = "CN=svc-deploy,OU=Users,DC=ad,DC=com";
    edit_in_place(&directory, |text| format!("{text}member {svc}\n"));
    tree.place("h2", "web.app#2");
    eventually("the commit refused", &daemon, || {
        daemon.log().contains("is now invalid")
    });
    // Time for a retry to run while the file is still broken.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        fs::read_to_string(&directory)
            .expect("read")
            .contains(&format!("member {svc}")),
        "a file that does not parse is not replaced"
    );
    edit_in_place(&directory, |text| {
        text.replace(&format!("member {svc}"), &format!("member: {svc}"))
    });
    eventually("h2 added next to the repaired edit", &daemon, || {
        members(&directory, "web-gmsa-hosts") == dns(&["h1", "h2", svc])
    });
    daemon.stop();
}
