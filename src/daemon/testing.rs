//! What the daemon's unit tests share: a configuration on a temporary
//! tree, the in-memory directory with the `web` and `db` groups, and a
//! daemon running on them with a channel standing for the watcher.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{run_on, Daemon, DaemonError, Parts};
use crate::cli::{self, Command, RunConfig};
use crate::directory::memory::{Flavour, MemoryDirectory};
use crate::directory::{Directory, Group};
use crate::ldif::Record;
use crate::metrics::Metrics;
use crate::model::Dn;
use crate::tree::watch::Change;

/// The configuration of a daemon on `root`, with `extra` options; the
/// directory file beside the tree is never opened.
pub(crate) fn run_config(root: &std::path::Path, extra: &[&str]) -> RunConfig {
    let directory = root.with_extension("ldif");
    let mut argv = vec![
        "gmsa-reconciler".to_owned(),
        "run".to_owned(),
        format!("--fs-root={}", root.display()),
        format!("--directory={}", directory.display()),
        "--group-ou=OU=Groups,DC=ad,DC=com".to_owned(),
        "--partition=p1".to_owned(),
        "--no-lock".to_owned(),
    ];
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    match cli::parse(argv).expect("parse").command {
        Command::Run(args) => RunConfig::from_args(&args).expect("valid"),
        other => panic!("expected run, got {other:?}"),
    }
}

pub(crate) fn daemon(root: &std::path::Path) -> Daemon {
    Daemon::new(run_config(root, &[]), Arc::new(Metrics::new()))
}

pub(crate) const WEB: &str = "CN=web-gmsa-hosts,OU=Groups,DC=ad,DC=com";

pub(crate) const DB: &str = "CN=db-gmsa-hosts,OU=Groups,DC=ad,DC=com";

pub(crate) const H1: &str = "CN=h1,DC=ad,DC=com";

/// An in-memory directory holding the `web` and `db` groups, empty.
pub(crate) fn memory_directory() -> Arc<MemoryDirectory> {
    let record = |dn: &str, name: &str| Record {
        dn: dn.into(),
        attrs: vec![
            ("objectClass".to_owned(), "group".to_owned()),
            ("sAMAccountName".to_owned(), name.to_owned()),
        ],
    };
    Arc::new(MemoryDirectory::new(
        vec![record(WEB, "web-gmsa-hosts"), record(DB, "db-gmsa-hosts")],
        Flavour::Permissive,
    ))
}

pub(crate) async fn members(dir: &MemoryDirectory, group: &str) -> BTreeSet<Dn> {
    dir.read_group(&Dn::parse(group).expect("dn"))
        .await
        .expect("read")
        .expect("group")
        .members
}

/// Waits (in real time, at most a minute) until `done` holds.
pub(crate) async fn until<F: std::future::Future<Output = bool>>(
    what: &str,
    mut done: impl FnMut() -> F,
) {
    for _ in 0..600 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A daemon running on the in-memory directory and a channel standing
/// for the watcher.
pub(crate) struct Harness {
    pub(crate) dir: Arc<MemoryDirectory>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) changes: mpsc::UnboundedSender<Change>,
    pub(crate) stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task: JoinHandle<Result<(), DaemonError>>,
}

impl Harness {
    pub(crate) fn start(root: &std::path::Path, extra: &[&str]) -> Harness {
        let dir = memory_directory();
        let metrics = Arc::new(Metrics::new());
        let (changes, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let parts = Parts {
            directory: Some(dir.clone()),
            changes: Some(rx),
        };
        let task = tokio::spawn(run_on(
            run_config(root, extra),
            metrics.clone(),
            parts,
            async move {
                let _ = stopped.await;
            },
        ));
        Harness {
            dir,
            metrics,
            changes,
            stop: Some(stop),
            task,
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("joined").expect("clean stop");
    }
}

/// A tree with one host in scope running `web`, and an empty directory
/// file at `<tree>.ldif`; both go with the returned guard.
pub(crate) fn tree() -> (tempfile::TempDir, std::path::PathBuf) {
    let parent = tempfile::tempdir().expect("tmp");
    let root = parent.path().join("tree");
    std::fs::write(root.with_extension("ldif"), "version: 1\n").expect("directory");
    (parent, root)
}

pub(crate) fn fill(root: &std::path::Path) {
    for sub in ["servers", "placement/h1"] {
        std::fs::create_dir_all(root.join(sub)).expect("mkdir");
    }
    std::fs::write(root.join(".modified"), "").expect(".modified");
    std::fs::write(
        root.join("servers/h1"),
        "partition: p1\nnt.dc: dc\nnt.dn: CN=h1,DC=ad,DC=com\n",
    )
    .expect("server");
    std::fs::write(root.join("placement/h1/web.app#1"), "{}").expect("placement");
}

pub(crate) fn group(name: &str) -> Group {
    Group {
        dn: Dn::parse(&format!("CN={name},OU=Groups,DC=ad,DC=com")).expect("dn"),
        sam_account_name: name.to_owned(),
        members: BTreeSet::new(),
    }
}
