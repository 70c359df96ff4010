//! Hostile connections to the metrics endpoint: a flood of idle TCP
//! connections must not take the file descriptors that reconciliation
//! needs. The daemon runs as its own process with `RLIMIT_NOFILE` at 256
//! while the test keeps 300 connections open to its metrics port (opening
//! a new one whenever the daemon closes one), and a placement change must
//! still reach the LDIF directory file.

mod support;

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use support::daemon_bin::DaemonProcess;
use support::e2e::{dn, ldif_groups};
use support::tree::{groups_ldif, Tree};

const FD_LIMIT: libc::rlim_t = 256;
const FLOOD: usize = 300;

fn host_dn(host: &str) -> String {
    format!("cn={host},ou=Computers,dc=ad,dc=com")
}

fn members(directory: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(directory).unwrap_or_default();
    // A file caught between writes is read again on the next poll.
    if gmsa_reconciler::ldif::parse(&text).is_err() {
        return Vec::new();
    }
    ldif_groups(&text)
        .get(&dn("cn=web-gmsa-hosts,ou=Groups,dc=ad,dc=com"))
        .map(|m| m.iter().map(|d| d.normalised().to_owned()).collect())
        .unwrap_or_default()
}

/// True when the peer has closed `stream` (or it failed).
fn closed_by_peer(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match (&*stream).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

fn connect(port: u16) -> Option<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_nonblocking(true).ok()?;
    Some(stream)
}

/// Keeps `FLOOD` idle connections open until `stop`; says when the first
/// `FLOOD` are open; counts the connections the daemon closed.
fn flood(port: u16, stop: Arc<AtomicBool>, closed: Arc<AtomicUsize>, opened: mpsc::Sender<()>) {
    let mut streams: Vec<Option<TcpStream>> = (0..FLOOD).map(|_| connect(port)).collect();
    let _ = opened.send(());
    while !stop.load(Ordering::SeqCst) {
        for slot in &mut streams {
            let gone = slot.as_ref().is_none_or(closed_by_peer);
            if gone {
                if slot.is_some() {
                    closed.fetch_add(1, Ordering::SeqCst);
                }
                *slot = connect(port);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// 300 idle connections against a daemon allowed 256 file descriptors: a
/// placement change still lands in the directory file, the excess
/// connections are closed at once, and `/metrics` answers after the flood.
#[test]
fn a_connection_flood_does_not_stop_reconciliation() {
    let tree = Tree::new();
    tree.server("h1", "p1", &host_dn("h1"));
    tree.server("h2", "p1", &host_dn("h2"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let directory = dir.path().join("directory.ldif");
    std::fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &[])])).expect("directory");

    let args = vec![
        format!("--fs-root={}", tree.root().display()),
        format!("--directory={}", directory.display()),
        "--group-ou=OU=Groups,DC=ad,DC=com".to_owned(),
        "--partition=p1".to_owned(),
        "--batch-window=20ms".to_owned(),
        "--no-lock".to_owned(),
    ];
    let mut daemon = DaemonProcess::start_with(&args, |cmd| {
        // SAFETY: setrlimit(2) only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: FD_LIMIT,
                    rlim_max: FD_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    daemon.wait_for("the initial sync", |_| {
        members(&directory) == vec![dn(&host_dn("h1")).normalised().to_owned()]
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("256")),
        "the daemon runs with 256 file descriptors:\n{limits}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicUsize::new(0));
    let (opened_tx, opened) = mpsc::channel();
    let flooder = std::thread::spawn({
        let (port, stop, closed) = (daemon.port, stop.clone(), closed.clone());
        move || flood(port, stop, closed, opened_tx)
    });
    opened.recv().expect("the flood is open");

    tree.place("h2", "web.app#2");
    let want: Vec<String> = ["h1", "h2"]
        .iter()
        .map(|h| dn(&host_dn(h)).normalised().to_owned())
        .collect();
    daemon.wait_for("the change applied during the flood", |_| {
        members(&directory) == want
    });
    // The daemon turned connections away rather than holding them.
    daemon.wait_for("connections over the cap closed", |_| {
        closed.load(Ordering::SeqCst) > 0
    });
    assert!(
        !stop.load(Ordering::SeqCst) && !flooder.is_finished(),
        "the flood lasted until the change was applied"
    );
    stop.store(true, Ordering::SeqCst);
    flooder.join().expect("flood thread");

    daemon.wait_for("/metrics answers after the flood", |d| {
        d.get("/metrics").0 == 200
    });
    assert!(
        daemon.metric("gmsa_http_connections_refused_total") > 0.0,
        "refusals are counted"
    );
    assert_eq!(daemon.stop(), Some(0), "clean exit on SIGTERM");
}
