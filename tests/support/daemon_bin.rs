//! The daemon as a child process: the built binary running `run`, for tests
//! that need what only a process has (its own file descriptor limit,
//! signals, an exit status). Its log goes to a temp file that a failing
//! test can show.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::{http_get, metric_sum};

/// A `gmsa-reconciler run` process with its metrics endpoint on a free port.
pub struct DaemonProcess {
    child: Option<Child>,
    /// The metrics endpoint's port on 127.0.0.1.
    pub port: u16,
    log: tempfile::NamedTempFile,
}

impl DaemonProcess {
    /// Starts `run <args> --metrics-addr=...`.
    pub fn start(args: &[String]) -> DaemonProcess {
        DaemonProcess::start_with(args, |_| {})
    }

    /// Starts `run <args> --metrics-addr=...` after `configure` has had its
    /// say on the command (limits, environment).
    pub fn start_with(args: &[String], configure: impl FnOnce(&mut Command)) -> DaemonProcess {
        let port = super::free_port();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let mut cmd = super::e2e::bin();
        cmd.arg("run")
            .args(args)
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log.reopen().expect("log file")));
        // SAFETY: prctl(2) only, between fork and exec: the daemon dies
        // with the test rather than outliving it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        configure(&mut cmd);
        let child = cmd.spawn().expect("start gmsa-reconciler run");
        DaemonProcess {
            child: Some(child),
            port,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// GET `path` on the metrics endpoint: (status, body); (0, "") when
    /// nothing answers.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path)
    }

    /// The sum of a metric's samples in `/metrics` (NaN when it does not answer).
    pub fn metric(&self, name: &str) -> f64 {
        match self.get("/metrics") {
            (200, body) => metric_sum(&body, name),
            _ => f64::NAN,
        }
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        let _ = self
            .log
            .reopen()
            .and_then(|mut f| f.read_to_string(&mut text));
        text
    }

    /// Waits until `/readyz` answers 200; panics with the log after 30 s.
    pub fn wait_ready(&mut self) {
        self.wait_for("ready", |d| d.get("/readyz").0 == 200);
    }

    /// Polls `check` until it holds; panics with the log after 30 s or if
    /// the daemon exits meanwhile.
    pub fn wait_for(&mut self, what: &str, mut check: impl FnMut(&DaemonProcess) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check(self) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "the daemon exited ({status}) before {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; daemon log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits (at most 30 s); the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no exit 30 s after SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
