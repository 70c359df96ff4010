//! Hostile input class: an LDAP server that stops answering. A frozen DC
//! (SIGSTOP: its socket still accepts and takes requests, nothing comes
//! back) must cost `sync` one `--timeout`, not one per group: the
//! connection is dropped, and the remaining work goes to the next
//! `--ldap-url` or fails at once, so that `sync` against a frozen DC ends
//! within about two timeouts.
//!
//! The moment of the freeze decides what the test proves, so it is not left
//! to a race: the binary talks to slapd through a relay that stops slapd
//! with SIGSTOP just before it forwards the first Modify request. Every
//! group has been read by then and no write has reached the server.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::daemon::{computers_and_groups, host_dn, GROUP_OU};
use support::e2e::{bin, password_file, read_groups};
use support::Slapd;

/// Groups changed by the plan.
const GROUPS: usize = 400;
/// `--timeout` of the runs: short, so that a test costs seconds.
const TIMEOUT: &str = "2s";
/// 30 timeouts: far beyond the one or two a frozen server may cost.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn group_name(i: usize) -> String {
    format!("p{i:03}-gmsa-hosts")
}

/// A slapd holding host h1 and the [`GROUPS`] empty groups.
fn slapd() -> Slapd {
    let groups: Vec<String> = (0..GROUPS).map(group_name).collect();
    let names: Vec<&str> = groups.iter().map(String::as_str).collect();
    Slapd::start_with(&[&computers_and_groups(&["h1"], &names)])
}

/// A ready tree placing one instance of each proid on h1, so that every
/// group is to gain h1.
fn tree(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("tree");
    std::fs::create_dir_all(root.join("servers")).expect("servers/");
    std::fs::create_dir_all(root.join("placement/h1")).expect("placement/");
    std::fs::write(
        root.join("servers/h1"),
        format!(
            "partition: p1\nnt.dc: dc1.ad.com\nnt.dn: {}\n",
            host_dn("h1")
        ),
    )
    .expect("server");
    for i in 0..GROUPS {
        std::fs::write(root.join(format!("placement/h1/p{i:03}.app#1")), "{}").expect("placement");
    }
    std::fs::write(root.join(".modified"), "").expect(".modified");
    root
}

fn slapd_pid(slapd: &Slapd) -> i32 {
    std::fs::read_to_string(slapd.dir().join("slapd.pid"))
        .expect("slapd.pid")
        .trim()
        .parse()
        .expect("pid")
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a process this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Sends SIGCONT to a frozen slapd when the test ends, however it ends.
struct Thaw(i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

/// Returns once the process is stopped (`T` in /proc/<pid>/stat), so that
/// nothing forwarded after it can be served. Bounded: a process that does
/// not stop within 10 s fails the test.
fn wait_stopped(pid: i32) {
    let stat = format!("/proc/{pid}/stat");
    for _ in 0..10_000 {
        let text = std::fs::read_to_string(&stat).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        let state = text
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if matches!(state, Some('T' | 't')) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("slapd (pid {pid}) did not stop after SIGSTOP");
}

/// A TCP relay in front of slapd that sends slapd SIGSTOP just before it
/// forwards the first LDAP Modify request (protocolOp tag [APPLICATION 6],
/// 0x66), then forwards everything as before.
struct FreezingRelay {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    modifies: Arc<AtomicUsize>,
}

impl FreezingRelay {
    fn start(upstream: &str, pid: i32) -> FreezingRelay {
        let upstream: SocketAddr = upstream
            .trim_start_matches("ldap://")
            .parse()
            .expect("slapd address");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let frozen = Arc::new(AtomicBool::new(false));
        let modifies = Arc::new(AtomicUsize::new(0));
        let flag = frozen.clone();
        let count = modifies.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (mut c_in, mut s_out) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_in, &mut c_out);
                    let _ = c_out.shutdown(Shutdown::Write);
                });
                let (flag, count) = (flag.clone(), count.clone());
                std::thread::spawn(move || {
                    while let Some(message) = read_message(&mut c_in) {
                        if op_tag(&message) == Some(0x66) {
                            count.fetch_add(1, Ordering::SeqCst);
                            if !flag.swap(true, Ordering::SeqCst) {
                                signal(pid, libc::SIGSTOP);
                            }
                            // Every Modify, on every connection, waits until
                            // the stop has taken effect: a signal is only
                            // queued when kill returns, and another
                            // connection's Modify may come first.
                            wait_stopped(pid);
                        }
                        if s_out.write_all(&message).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(Shutdown::Write);
                });
            }
        });
        FreezingRelay {
            addr,
            frozen,
            modifies,
        }
    }

    fn url(&self) -> String {
        format!("ldap://{}", self.addr)
    }

    fn froze(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Modify requests that reached the frozen server.
    fn modifies(&self) -> usize {
        self.modifies.load(Ordering::SeqCst)
    }
}

/// One BER-framed LDAP message (tag, length, content), as sent.
fn read_message(from: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = [0u8; 2];
    from.read_exact(&mut head).ok()?;
    let mut message = head.to_vec();
    let len = if head[1] & 0x80 == 0 {
        usize::from(head[1])
    } else {
        let mut bytes = vec![0u8; usize::from(head[1] & 0x7f)];
        from.read_exact(&mut bytes).ok()?;
        message.extend_from_slice(&bytes);
        bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b))
    };
    let start = message.len();
    message.resize(start + len, 0);
    from.read_exact(&mut message[start..]).ok()?;
    Some(message)
}

/// The protocolOp tag of an LDAP message: what follows its messageID.
fn op_tag(message: &[u8]) -> Option<u8> {
    let content = if message[1] & 0x80 == 0 {
        &message[2..]
    } else {
        &message[2 + usize::from(message[1] & 0x7f)..]
    };
    // messageID: INTEGER (0x02), short length.
    if content.first() != Some(&0x02) {
        return None;
    }
    let id_len = usize::from(*content.get(1)?);
    content.get(2 + id_len).copied()
}

fn sync(tree: &Path, urls: &[String], password: &Path) -> Output {
    let mut cmd = bin();
    cmd.arg("sync")
        .arg(format!("--fs-root={}", tree.display()))
        .arg(format!("--group-ou={GROUP_OU}"))
        .arg("--partition=p1")
        .arg(format!("--timeout={TIMEOUT}"))
        .arg("--format=json")
        .arg(format!("--bind-dn={}", Slapd::SVC_DN))
        .arg("--bind-password-file")
        .arg(password);
    for url in urls {
        cmd.arg(format!("--ldap-url={url}"));
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sync");
    let pid = child.id() as i32;
    let (done, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output().expect("sync output"));
    });
    // A guard against hanging the suite, not a measurement: a `sync` that
    // waits out a timeout per group would take many minutes here.
    match output.recv_timeout(HANG_GUARD) {
        Ok(out) => out,
        Err(_) => {
            signal(pid, libc::SIGKILL);
            let out = output.recv().expect("sync output");
            panic!(
                "sync was still running after {HANG_GUARD:?}:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Lines of standard error saying a server stopped answering.
fn stall_reports(stderr: &str) -> usize {
    stderr
        .lines()
        .filter(|l| l.contains("LDAP server stopped answering;"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_against_a_frozen_server_fails_fast_naming_every_group_not_applied() {
    let slapd = slapd();
    let pid = slapd_pid(&slapd);
    let _thaw = Thaw(pid);
    let relay = FreezingRelay::start(&slapd.url(), pid);
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = tree(dir.path());
    let password = password_file(dir.path(), Slapd::SVC_PASSWORD);

    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking({
        let (tree, url) = (tree.clone(), relay.url());
        move || sync(&tree, &[url], &password)
    })
    .await
    .expect("sync ran");
    // Shown, not asserted (BENCHMARKS.md has the measurement).
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(relay.froze(), "the relay never saw a Modify: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");

    // Every group is named as not applied, nothing as applied.
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["changes"], serde_json::json!([]), "{report}");
    let not_applied = report["not_applied"].as_array().expect("not_applied");
    let named: std::collections::BTreeSet<String> = not_applied
        .iter()
        .map(|n| n["group_dn"].as_str().expect("group_dn").to_lowercase())
        .collect();
    let expected: std::collections::BTreeSet<String> = (0..GROUPS)
        .map(|i| format!("cn={},{GROUP_OU}", group_name(i)).to_lowercase())
        .collect();
    assert_eq!(named, expected);
    for n in not_applied {
        assert_eq!(n["add"], serde_json::json!([host_dn("h1")]), "{n}");
    }

    // One timeout: the server is reported as stopped once, and the groups
    // behind the requests in flight were not sent to it at all.
    assert_eq!(stall_reports(&stderr), 1, "{stderr}");
    let not_sent = not_applied
        .iter()
        .filter(|n| n["error"].as_str().is_some_and(|e| e.contains("not sent")))
        .count();
    assert!(
        not_sent >= GROUPS - 8,
        "only {not_sent} of {GROUPS} groups were failed without a wait of their own: {not_applied:?}"
    );
    // Only the requests already in flight when it froze (one per group
    // written at a time, 8) reached the server; the rest never left.
    assert!(
        relay.modifies() <= 8,
        "{} Modify requests were sent to the frozen server",
        relay.modifies()
    );
    eprintln!(
        "sync against the frozen server: exit 1 after {elapsed:?} with --timeout {TIMEOUT}, {} Modify requests sent to it",
        relay.modifies()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_moves_to_the_next_url_when_the_first_server_freezes() {
    let frozen = slapd();
    let live = slapd();
    let pid = slapd_pid(&frozen);
    let _thaw = Thaw(pid);
    let relay = FreezingRelay::start(&frozen.url(), pid);
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = tree(dir.path());
    let password = password_file(dir.path(), Slapd::SVC_PASSWORD);

    let out = tokio::task::spawn_blocking({
        let (tree, urls) = (tree.clone(), vec![relay.url(), live.url()]);
        move || sync(&tree, &urls, &password)
    })
    .await
    .expect("sync ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(relay.froze(), "the relay never saw a Modify: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stall_reports(&stderr), 1, "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["changes"].as_array().map(Vec::len), Some(GROUPS));

    // The live server holds every change.
    let groups = read_groups(&live.url(), Slapd::SVC_DN, Slapd::SVC_PASSWORD, GROUP_OU).await;
    let h1 = gmsa_reconciler::model::Dn::parse(&host_dn("h1")).expect("dn");
    for i in 0..GROUPS {
        let dn = gmsa_reconciler::model::Dn::parse(&format!("cn={},{GROUP_OU}", group_name(i)))
            .expect("dn");
        assert!(
            groups.get(&dn).is_some_and(|m| m.contains(&h1)),
            "{dn} lacks h1 on the live server"
        );
    }
}
