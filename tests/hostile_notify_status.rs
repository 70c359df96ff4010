//! Hostile input class: text from outside in systemd's notification
//! protocol. A not-ready reason quotes paths, and the protocol is one
//! `KEY=value` per line: a placement tree whose path holds a line break and
//! `READY=1` must not tell systemd the daemon is ready (nor anything else
//! but its status).

mod support;

use std::fs;
use std::process::{Child, Stdio};
use std::time::Duration;

use support::daemon::http_get;
use support::notify::NotifySocket;
use support::{free_port, wait_until};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_tree_path_with_a_line_break_cannot_add_a_notify_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("tree\nREADY=1\nMAINPID=1");
    fs::create_dir(&root).expect("tree root");
    let directory = dir.path().join("directory.ldif");
    fs::write(&directory, "").expect("directory");
    let mut socket = NotifySocket::new();
    let port = free_port();
    let child = support::e2e::bin()
        .arg("run")
        .arg(format!("--fs-root={}", root.display()))
        .arg(format!("--directory={}", directory.display()))
        .arg("--group-ou=OU=Groups,DC=ad,DC=com")
        .arg("--no-lock")
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", socket.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gmsa-reconciler run");
    let _daemon = Daemon(child);
    socket.wait_for("of the wait for the tree", |m| m.contains(".modified"));

    // The root goes away: the reason now names its path.
    fs::rename(&root, dir.path().join("moved")).expect("move the tree away");
    let named = socket.wait_for("naming the missing tree", |m| {
        m.contains("no such directory")
    });
    assert_eq!(named.lines().count(), 1, "one line: {named:?}");
    assert!(
        named.starts_with("STATUS=not ready: placement tree: ")
            && named.contains("tree\\nREADY=1\\nMAINPID=1"),
        "the path quoted with its line breaks escaped: {named:?}"
    );
    wait_until("the metrics endpoint", Duration::from_secs(20), || {
        http_get(port, "/readyz").0 != 0
    });
    assert_eq!(http_get(port, "/readyz").0, 503);
    let all = socket.drain().to_vec();
    for message in &all {
        assert_eq!(message.lines().count(), 1, "one line each: {all:?}");
        assert!(message.starts_with("STATUS="), "{all:?}");
    }
}
