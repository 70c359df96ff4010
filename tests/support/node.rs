//! Node mode seen from outside, for tests that run the daemon: manifests
//! scheduled the way the mirror writes them, an app root read back as plain
//! files (events, `running/` and `cleanup/` links, container directories),
//! and `daemon::run` started in-process with a shutdown the test controls,
//! or the binary's `run` as a child process stopped with SIGTERM.
//!
//! Everything here reads the file system independently of the node library,
//! so a test cannot pass because both sides share a mistake.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gmsa_reconciler::cli::{self, Command, RunConfig};
use gmsa_reconciler::daemon::{self, DaemonError};
use gmsa_reconciler::metrics::Metrics;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::tree::{eventually, write_atomically};

/// The project's binary, built by cargo for integration tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gmsa-reconciler"))
}

/// A valid manifest for an instance of `proid`; `tag` lands in an
/// environment variable, so two manifests can differ in content.
pub fn manifest(proid: &str, tag: &str) -> String {
    format!(
        "proid: {proid}\nenvironment: dev\ncpu: 20%\nmemory: 256M\ndisk: 1G\n\
         services:\n  - name: web\n    command: exec sleep 1000\n\
         environ:\n  - {{name: TAG, value: \"{tag}\"}}\n"
    )
}

/// Writes `scheduled/<instance>` atomically, as the mirror does.
pub fn schedule(fs_root: &Path, instance: &str, manifest: &str) {
    let dir = fs_root.join("scheduled");
    fs::create_dir_all(&dir).expect("scheduled/");
    write_atomically(&dir.join(instance), manifest);
}

/// One posted event, from its file name and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posted {
    /// The file name's time field, as written.
    pub time: String,
    /// The instance.
    pub instance: String,
    /// `configured`, `aborted`, `killed` or `finished`.
    pub kind: String,
    /// The data field.
    pub data: String,
    /// The file's content.
    pub content: String,
}

/// An app root as files.
#[derive(Debug, Clone)]
pub struct AppRoot {
    root: PathBuf,
}

impl AppRoot {
    pub fn new(root: &Path) -> AppRoot {
        AppRoot {
            root: root.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The sorted names in `<app_root>/<sub>`, dot files included (a stray
    /// temp file is something to see); empty when the directory is missing.
    pub fn names(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = match fs::read_dir(self.root.join(sub)) {
            Ok(entries) => entries
                .map(|e| {
                    e.expect("dir entry")
                        .file_name()
                        .into_string()
                        .expect("UTF-8 name")
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    /// Every event in `appevents/`, oldest first. A file whose name does not
    /// have the four comma-separated fields fails the test.
    pub fn events(&self) -> Vec<Posted> {
        let dir = self.root.join("appevents");
        let mut events: Vec<Posted> = self
            .names("appevents")
            .into_iter()
            .filter(|name| !name.starts_with('.'))
            .map(|name| {
                let fields: Vec<&str> = name.splitn(4, ',').collect();
                let [time, instance, kind, data] = fields[..] else {
                    panic!("{name:?} is not <time>,<instance>,<type>,<data>");
                };
                let seconds: f64 = time
                    .parse()
                    .unwrap_or_else(|_| panic!("{name:?}: the time is not a number"));
                assert!(seconds > 1_600_000_000.0, "{name:?}: implausible time");
                Posted {
                    time: time.to_owned(),
                    instance: instance.to_owned(),
                    kind: kind.to_owned(),
                    data: data.to_owned(),
                    content: fs::read_to_string(dir.join(&name)).expect("read event"),
                }
            })
            .collect();
        events.sort_by(|a, b| {
            let t = |p: &Posted| p.time.parse::<f64>().unwrap_or_default();
            t(a).total_cmp(&t(b))
        });
        events
    }

    /// The data fields of one instance's events of one type, oldest first.
    pub fn events_of(&self, instance: &str, kind: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e.instance == instance && e.kind == kind)
            .map(|e| e.data)
            .collect()
    }

    /// The container `running/<instance>` links to (its unique name), when
    /// the link exists.
    pub fn running(&self, instance: &str) -> Option<String> {
        link_target(&self.root.join("running").join(instance))
    }

    /// The container `cleanup/<unique name>` links to, when the link exists.
    pub fn in_cleanup(&self, unique_name: &str) -> Option<String> {
        link_target(&self.root.join("cleanup").join(unique_name))
    }

    pub fn container(&self, unique_name: &str) -> PathBuf {
        self.root.join("apps").join(unique_name)
    }

    /// Where the daemon writes a container's credential spec by default.
    pub fn credential_spec(&self, unique_name: &str) -> PathBuf {
        self.root
            .join("credential_specs")
            .join(format!("{unique_name}.json"))
    }

    /// Files whose name starts with `.tmp` anywhere below the app root:
    /// what an atomic write leaves when it is interrupted.
    pub fn temp_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_name().to_string_lossy().starts_with(".tmp") {
                    found.push(path.clone());
                }
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&path, found);
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.root, &mut found);
        found
    }
}

/// The last component of a symlink's target, when `link` is a symlink.
fn link_target(link: &Path) -> Option<String> {
    let target = fs::read_link(link).ok()?;
    Some(
        target
            .file_name()
            .expect("a link target names a container")
            .to_str()
            .expect("UTF-8 target")
            .to_owned(),
    )
}

/// `run`'s options validated from an argument list (without the program
/// name and `run`).
pub fn run_config(args: &[String]) -> RunConfig {
    let mut argv = vec!["gmsa-reconciler".to_owned(), "run".to_owned()];
    argv.extend(args.iter().cloned());
    match cli::parse(&argv).expect("the options parse").command {
        Command::Run(args) => RunConfig::from_args(&args).expect("the options are valid"),
        other => panic!("expected run, got {other:?}"),
    }
}

/// `daemon::run` on the test's runtime, stopped by [`Daemon::stop`].
pub struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), DaemonError>>>,
    pub metrics: Arc<Metrics>,
}

impl Daemon {
    pub fn start(args: &[String]) -> Daemon {
        let config = run_config(args);
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(daemon::run(config, metrics.clone(), async {
            let _ = stopped.await;
        }));
        Daemon {
            stop: Some(stop),
            handle: Some(handle),
            metrics,
        }
    }

    /// Waits until the daemon says it is ready (for node mode alone: the
    /// node has started; with groups: the first full sync is applied).
    pub async fn ready(&self) {
        let metrics = self.metrics.clone();
        eventually("the daemon to be ready", move || metrics.is_ready()).await;
    }

    /// Asks the daemon to stop and waits until it has, cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).expect("the daemon is still running");
        }
        let handle = self.handle.take().expect("not stopped twice");
        handle
            .await
            .expect("the daemon task did not panic")
            .expect("a clean stop");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave the daemon writing into the next one.
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// `gmsa-reconciler run` in node mode as a child process (the binary, not
/// the library), its standard error kept in a file.
pub struct NodeProcess {
    child: Option<std::process::Child>,
    stderr: PathBuf,
    _logs: tempfile::TempDir,
}

impl NodeProcess {
    /// Starts `run --fs-root --app-root --hostname <extra>`.
    pub fn start(fs_root: &Path, app_root: &Path, hostname: &str, extra: &[String]) -> NodeProcess {
        let logs = tempfile::tempdir().expect("temp dir");
        let stderr = logs.path().join("stderr");
        let child = super::e2e::bin()
            .arg("run")
            .arg(format!("--fs-root={}", fs_root.display()))
            .arg(format!("--app-root={}", app_root.display()))
            .arg(format!("--hostname={hostname}"))
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start gmsa-reconciler run");
        NodeProcess {
            child: Some(child),
            stderr,
            _logs: logs,
        }
    }

    /// What the daemon has written to standard error so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until standard error holds `text`.
    pub fn wait_for_log(&self, text: &str) {
        super::wait_until(
            &format!("{text:?} on the daemon's standard error"),
            Duration::from_secs(20),
            || self.stderr().contains(text),
        );
    }

    /// Sends SIGTERM; the daemon must exit 0 within 30 s. Returns its
    /// standard error.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child by its pid.
        assert_eq!(
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
            0,
            "SIGTERM"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not exit within 30 s of SIGTERM:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr();
        assert!(status.success(), "SIGTERM exits 0, got {status}:\n{stderr}");
        stderr
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
