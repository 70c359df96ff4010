//! Running the daemon in-process for tests: `daemon::run` with an injected
//! shutdown, the metrics endpoint on a free port, and a small HTTP reader
//! for its answers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gmsa_reconciler::cli::{self, Command, RunConfig};
use gmsa_reconciler::daemon::{self, DaemonError};
use gmsa_reconciler::metrics::Metrics;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A daemon running in a task of the test's runtime.
pub struct Running {
    pub metrics: Arc<Metrics>,
    pub metrics_port: u16,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), DaemonError>>>,
}

impl Running {
    /// Parses `run <args>` like the binary does and starts it, with the
    /// metrics endpoint on a free port.
    pub fn start(args: &[String]) -> Running {
        let metrics_port = super::free_port();
        let mut argv = vec!["gmsa-reconciler".to_owned(), "run".to_owned()];
        argv.extend(args.iter().cloned());
        argv.push(format!("--metrics-addr=127.0.0.1:{metrics_port}"));
        let config = match cli::parse(argv).expect("run options parse").command {
            Command::Run(args) => RunConfig::from_args(&args).expect("run options are valid"),
            other => panic!("expected run, got {other:?}"),
        };
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(daemon::run(config, metrics.clone(), async {
            let _ = stopped.await;
        }));
        Running {
            metrics,
            metrics_port,
            stop: Some(stop),
            handle: Some(handle),
        }
    }

    /// Asks the daemon to stop and waits for it; panics unless it stops cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let handle = self.handle.take().expect("running");
        let result = tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("the daemon stops within 30 s")
            .expect("the daemon task does not panic");
        result.expect("the daemon stops cleanly");
    }

    /// GET `path` on the metrics endpoint: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics_port, path)
    }

    /// The sum of a metric's samples (all label sets) in `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        metric_sum(&body, name)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// A blocking HTTP/1.1 GET on 127.0.0.1; (0, "") when nothing answers.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sums the samples of `name` (with any labels) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes a password file readable by the daemon.
pub fn password_file(dir: &Path, password: &str) -> std::path::PathBuf {
    let path = dir.join("bind.pw");
    std::fs::write(&path, password).expect("password file");
    path
}

/// The OU of the groups in the daemon tests' slapd.
pub const GROUP_OU: &str = "ou=Groups,dc=ad,dc=com";

/// The computer DN of a test host.
pub fn host_dn(host: &str) -> String {
    format!("cn={host},ou=Computers,dc=ad,dc=com")
}

/// LDIF content: a computer per host and an empty group per name.
pub fn computers_and_groups(hosts: &[&str], groups: &[&str]) -> String {
    let mut out = String::new();
    for h in hosts {
        out += &format!("dn: {}\nobjectClass: computer\ncn: {h}\n\n", host_dn(h));
    }
    for g in groups {
        out +=
            &format!("dn: cn={g},{GROUP_OU}\nobjectClass: group\ncn: {g}\nsAMAccountName: {g}\n\n");
    }
    out
}
