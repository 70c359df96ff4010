//! The `process_*` metrics of the daemon under the unit's `/proc` limits
//! (`ProtectProc=invisible`, `ProcSubset=pid`), reproduced with a private
//! mount of `/proc` in a new PID namespace: only the process's own entries
//! are there, not `/proc/stat` with the kernel's boot time. Memory, file
//! descriptors and CPU still show, and the start time is still the start.
//! Needs root, as the unit's sandbox does (`unshare` from util-linux).

mod support;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::daemon::{http_get, metric_sum};
use support::tree::{groups_ldif, Tree};
use support::{free_port, tool, wait_until};

/// The sandboxed daemon; `unshare --kill-child` takes the daemon with it.
struct Sandboxed(Child);

impl Drop for Sandboxed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

#[test]
fn process_metrics_hold_under_proc_subset_pid() {
    let tree = Tree::new();
    tree.server("h1", "p1", "cn=h1,ou=Computers,dc=ad,dc=com");
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("temp dir");
    let directory = dir.path().join("directory.ldif");
    fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &[])])).expect("directory");
    let port = free_port();
    // The shell fails unless /proc is the restricted one, then becomes
    // the daemon.
    let script = "mount -t proc -o subset=pid,hidepid=invisible proc /proc || exit 90
                  [ -e /proc/stat ] && exit 91
                  exec \"$0\" \"$@\"";
    let started = unix_now();
    let child = Command::new(tool("unshare"))
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            script,
        ])
        .arg(env!("CARGO_BIN_EXE_gmsa-reconciler"))
        .arg("run")
        .arg(format!("--fs-root={}", tree.root().display()))
        .arg(format!("--directory={}", directory.display()))
        .arg("--group-ou=OU=Groups,DC=ad,DC=com")
        .arg("--partition=p1")
        .arg("--no-lock")
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the daemon under unshare");
    let mut daemon = Sandboxed(child);
    wait_until("the metrics endpoint", Duration::from_secs(20), || {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!(
                "the sandbox ended with {status} (90: cannot mount /proc, 91: /proc/stat visible)"
            );
        }
        http_get(port, "/metrics").0 == 200
    });
    let (_, body) = http_get(port, "/metrics");
    let scraped = unix_now();

    let start = metric_sum(&body, "process_start_time_seconds");
    assert!(
        start >= started.floor() - 1.0 && start <= scraped,
        "started between {started} and {scraped}, says {start}\n{body}"
    );
    assert!(
        metric_sum(&body, "process_resident_memory_bytes") > 1e6,
        "{body}"
    );
    assert!(metric_sum(&body, "process_open_fds") >= 3.0, "{body}");
    assert!(metric_sum(&body, "process_max_fds") >= 3.0, "{body}");
    assert!(metric_sum(&body, "process_threads") >= 1.0, "{body}");
    assert!(body.contains("\nprocess_cpu_seconds_total "), "{body}");
}
