//! The daemon under systemd's `Type=notify`, driving the binary with a
//! notification socket of the test's own: `READY=1` exactly once, when
//! `/readyz` first answers 200, and `STATUS=` with the reason while it
//! does not.

mod support;

use std::fs;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::daemon::http_get;
use support::notify::NotifySocket;
use support::tree::{groups_ldif, Tree};
use support::{free_port, wait_until};

/// `run` as a child process; killed if the test fails before it stops it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// SIGTERM, then the exit status (within 20 s).
    fn stop(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.0.try_wait().expect("wait for the daemon") {
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn systemd_hears_ready_once_when_the_daemon_becomes_ready() {
    let tree = Tree::new();
    tree.server("h1", "p1", "cn=h1,ou=Computers,dc=ad,dc=com");
    tree.place("h1", "web.app#1");
    let dir = tempfile::tempdir().expect("temp dir");
    let directory = dir.path().join("directory.ldif");
    fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &[])])).expect("directory");
    let mut socket = NotifySocket::new();
    let port = free_port();
    let child = support::e2e::bin()
        .arg("run")
        .arg(format!("--fs-root={}", tree.root().display()))
        .arg(format!("--directory={}", directory.display()))
        .arg("--group-ou=OU=Groups,DC=ad,DC=com")
        .arg("--partition=p1")
        .arg("--no-lock")
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", socket.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gmsa-reconciler run");
    let mut daemon = Daemon(child);

    // Without `.modified` the daemon waits, and says so.
    let waiting = socket.wait_for("of the wait for the tree", |m| m.contains("STATUS="));
    assert_eq!(
        waiting,
        "STATUS=not ready: waiting for the placement tree (.modified)\n"
    );
    wait_until("the metrics endpoint", Duration::from_secs(20), || {
        http_get(port, "/readyz").0 != 0
    });
    let (status, body) = http_get(port, "/readyz");
    assert_eq!(status, 503, "{body}");

    tree.mark_ready();
    let ready = socket.wait_for("READY=1", |m| m.lines().any(|l| l == "READY=1"));
    assert_eq!(ready, "READY=1\nSTATUS=ready\n");
    // systemd counts the unit started now; /readyz agrees already.
    let (status, body) = http_get(port, "/readyz");
    assert_eq!(status, 200, "{body}");
    let member = || fs::read_to_string(&directory).unwrap_or_default();
    wait_until("the initial sync", Duration::from_secs(20), || {
        member().contains("cn=h1,ou=Computers,dc=ad,dc=com")
    });

    let exit = daemon.stop();
    assert!(exit.success(), "run exited with {exit} on SIGTERM");
    let all = socket.drain().to_vec();
    let readies = all
        .iter()
        .flat_map(|m| m.lines())
        .filter(|l| *l == "READY=1")
        .count();
    assert_eq!(readies, 1, "READY=1 once in {all:?}");
    for message in &all {
        for line in message.lines() {
            assert!(
                line == "READY=1" || line.starts_with("STATUS="),
                "unexpected line {line:?} in {all:?}"
            );
        }
    }
}
