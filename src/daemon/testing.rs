//! What the daemon's unit tests share: a configuration on a temporary
//! tree, the in-memory directory with the `web` and `db` groups, and a
//! daemon running on them with a channel standing for the watcher.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{run_on, Daemon, DaemonError, NodeHook, Parts};
use crate::cli::{self, Command, RunConfig};
use crate::directory::memory::{Call, Flavour, MemoryDirectory};
use crate::directory::{Capabilities, DirError, Directory, Group, MemberChange};
use crate::election::{Role, RoleState};
use crate::ldif::Record;
use crate::metrics::Metrics;
use crate::model::{Dn, HostName};
use crate::tree::watch::{Change, Noticed};
use crate::tree::TreeEvent;

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

/// Waits until `done` holds, asking every 100ms for at most a minute (of
/// tokio's clock: in paused time the clock moves on whenever every task
/// waits).
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
    pub(crate) root: PathBuf,
    pub(crate) dir: Arc<MemoryDirectory>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) changes: mpsc::UnboundedSender<Noticed>,
    pub(crate) stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task: JoinHandle<Result<(), DaemonError>>,
}

/// What a harness runs on besides the configuration.
#[derive(Default)]
pub(crate) struct Setup {
    /// The directory the daemon talks to, in front of the in-memory one
    /// (the in-memory one itself when `None`).
    pub(crate) front: Option<Arc<dyn Directory>>,
    /// The in-memory directory (the `web` and `db` groups when `None`).
    pub(crate) dir: Option<Arc<MemoryDirectory>>,
    /// The role to follow (always leader when `None`).
    pub(crate) roles: Option<watch::Receiver<RoleState>>,
    /// Runs on the blocking pool before each node operation.
    pub(crate) before_node_work: Option<NodeHook>,
    /// Runs on the blocking pool after each rescan's scan.
    pub(crate) after_scan: Option<super::start::ScanHook>,
}

impl Harness {
    pub(crate) fn start(root: &Path, extra: &[&str]) -> Harness {
        Harness::start_with(root, run_config(root, extra), Setup::default())
    }

    pub(crate) fn start_with(root: &Path, config: RunConfig, setup: Setup) -> Harness {
        let dir = setup.dir.unwrap_or_else(memory_directory);
        let front: Arc<dyn Directory> = match setup.front {
            Some(front) => front,
            None => dir.clone(),
        };
        let metrics = Arc::new(Metrics::new());
        let (changes, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let parts = Parts {
            directory: Some(front),
            changes: Some(rx),
            roles: setup.roles,
            before_node_work: setup.before_node_work,
            after_scan: setup.after_scan,
        };
        let task = tokio::spawn(run_on(config, metrics.clone(), parts, async move {
            let _ = stopped.await;
        }));
        Harness {
            root: root.to_owned(),
            dir,
            metrics,
            changes,
            stop: Some(stop),
            task,
        }
    }

    /// Hands the daemon a change, as the watcher would, noticed now.
    pub(crate) fn send(&self, change: Change) {
        self.changes
            .send(Noticed::now(change))
            .expect("the daemon takes changes");
    }

    /// Places `instance` on `host`: the file, then its event.
    pub(crate) fn place(&self, host: &str, instance: &str) {
        let dir = self.root.join("placement").join(host);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(instance), "{}").expect("placement");
        self.send(Change::Tree(TreeEvent::PlacementAdded {
            host: HostName::new(host).expect("host"),
            instance: instance.to_owned(),
        }));
    }

    /// Takes `instance` off `host`: the file, then its event.
    pub(crate) fn unplace(&self, host: &str, instance: &str) {
        let path = self.root.join("placement").join(host).join(instance);
        std::fs::remove_file(path).expect("rm placement");
        self.send(Change::Tree(TreeEvent::PlacementRemoved {
            host: HostName::new(host).expect("host"),
            instance: instance.to_owned(),
        }));
    }

    /// Removes host `host`'s server file, then says so.
    pub(crate) fn remove_server(&self, host: &str) {
        std::fs::remove_file(self.root.join("servers").join(host)).expect("rm server");
        self.send(Change::Tree(TreeEvent::ServerRemoved {
            host: HostName::new(host).expect("host"),
        }));
    }

    /// The members of `group` now.
    pub(crate) async fn members(&self, group: &str) -> BTreeSet<Dn> {
        members(&self.dir, group).await
    }

    /// How many Modify requests `group` has had.
    pub(crate) fn modifies(&self, group: &str) -> usize {
        let group = Dn::parse(group).expect("dn");
        self.dir
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Modify { group: g, .. } if *g == group))
            .count()
    }

    /// How many passes have written to the directory (each reads its
    /// capabilities first).
    pub(crate) fn passes(&self) -> usize {
        self.dir
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Capabilities))
            .count()
    }

    /// Waits for the initial sync.
    pub(crate) async fn ready(&self) {
        until("ready", || async { self.metrics.is_ready() }).await;
    }

    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("joined").expect("clean stop");
    }
}

/// The DN of a test host.
pub(crate) fn host_dn(host: &str) -> String {
    format!("CN={host},DC=ad,DC=com")
}

/// Writes host `host`'s server file (in scope) and its placement directory.
pub(crate) fn write_server(root: &Path, host: &str) {
    std::fs::create_dir_all(root.join("servers")).expect("mkdir");
    std::fs::create_dir_all(root.join("placement").join(host)).expect("mkdir");
    std::fs::write(
        root.join("servers").join(host),
        format!("partition: p1\nnt.dc: dc\nnt.dn: {}\n", host_dn(host)),
    )
    .expect("server");
}

/// A gated in-memory directory, and the setup that runs the daemon on it
/// under `roles` (no election when `None`).
pub(crate) fn gated(roles: Option<watch::Receiver<RoleState>>) -> (Arc<Gated>, Setup) {
    let gated = Gated::new(memory_directory());
    let setup = Setup {
        front: Some(gated.clone()),
        dir: Some(gated.inner.clone()),
        roles,
        ..Setup::default()
    };
    (gated, setup)
}

/// What a test runs once, from inside the daemon's next pass.
type Hook = Box<dyn FnOnce() + Send>;

/// A directory whose modifies wait at a gate the test opens and closes;
/// everything else goes straight to the in-memory directory behind it.
pub(crate) struct Gated {
    pub(crate) inner: Arc<MemoryDirectory>,
    open: watch::Sender<bool>,
    held: AtomicUsize,
    /// Modifies are applied at once and only their answers wait, as a
    /// server's answers do on a slow network.
    late: AtomicBool,
    /// Runs at the next capabilities read (a pass's first call before
    /// its Modifies).
    on_capabilities: Mutex<Option<Hook>>,
    /// The next modify is applied and then gets no answer.
    time_out: AtomicBool,
    /// The modify after one without answer is not sent.
    stalled: AtomicBool,
    /// How long each modify takes before it goes on.
    delay: Mutex<Duration>,
    /// The next modify is refused with this at once, however slow the
    /// others are.
    refuse: Mutex<Option<DirError>>,
    /// How long a search of every group takes to answer, after it read.
    search_delay: Mutex<Duration>,
    /// Searches of every group read and not yet answered.
    searching: AtomicUsize,
}

impl Gated {
    /// Open at first.
    pub(crate) fn new(inner: Arc<MemoryDirectory>) -> Arc<Gated> {
        Arc::new(Gated {
            inner,
            open: watch::channel(true).0,
            held: AtomicUsize::new(0),
            late: AtomicBool::new(false),
            on_capabilities: Mutex::new(None),
            time_out: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            refuse: Mutex::new(None),
            search_delay: Mutex::new(Duration::ZERO),
            searching: AtomicUsize::new(0),
        })
    }

    /// From now on a search of every group reads at once and answers
    /// `delay` later (in the test's time), as a slow paged search does:
    /// what it returns is older than its answer.
    pub(crate) fn answer_searches_after(&self, delay: Duration) {
        *self.search_delay.lock().expect("delay") = delay;
    }

    /// How many searches of every group have read and not yet answered.
    pub(crate) fn searching(&self) -> usize {
        self.searching.load(Ordering::SeqCst)
    }

    /// From now on every modify takes `delay` (in the test's time).
    pub(crate) fn answer_after(&self, delay: Duration) {
        *self.delay.lock().expect("delay") = delay;
    }

    /// The next modify is refused with `err` at once, without the delay.
    pub(crate) fn refuse_next(&self, err: DirError) {
        *self.refuse.lock().expect("refuse") = Some(err);
    }

    /// From now on a modify is applied when it arrives; its answer waits
    /// at the gate.
    pub(crate) fn answer_late(&self) {
        self.late.store(true, Ordering::SeqCst);
    }

    /// The next modify is applied, then answered as a server that stopped
    /// answering is: not at all; the one after it is not sent.
    pub(crate) fn time_out_next(&self) {
        self.time_out.store(true, Ordering::SeqCst);
    }

    /// Runs `hook` at the next capabilities read, inside the pass.
    pub(crate) fn on_next_capabilities(&self, hook: impl FnOnce() + Send + 'static) {
        *self.on_capabilities.lock().expect("hook") = Some(Box::new(hook));
    }

    /// Modifies from now on wait.
    pub(crate) fn close(&self) {
        self.open.send_replace(false);
    }

    /// Waiting modifies go on, and later ones do not wait.
    pub(crate) fn open(&self) {
        self.open.send_replace(true);
    }

    /// How many modifies wait at the gate now.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

/// Counts a modify waiting at the gate while it waits, however it ends.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl Directory for Gated {
    async fn capabilities(&self) -> Result<Capabilities, DirError> {
        let hook = self.on_capabilities.lock().expect("hook").take();
        if let Some(hook) = hook {
            hook();
        }
        self.inner.capabilities().await
    }

    async fn search_groups(&self, base: &Dn) -> Result<Vec<Group>, DirError> {
        let read = self.inner.search_groups(base).await;
        let delay = *self.search_delay.lock().expect("delay");
        if !delay.is_zero() {
            self.searching.fetch_add(1, Ordering::SeqCst);
            let _searching = Held(&self.searching);
            tokio::time::sleep(delay).await;
        }
        read
    }

    async fn find_group(&self, base: &Dn, name: &str) -> Result<Option<Group>, DirError> {
        self.inner.find_group(base, name).await
    }

    async fn read_group(&self, dn: &Dn) -> Result<Option<Group>, DirError> {
        self.inner.read_group(dn).await
    }

    async fn modify_members(&self, group: &Dn, change: &MemberChange) -> Result<(), DirError> {
        if let Some(err) = self.refuse.lock().expect("refuse").take() {
            return Err(err);
        }
        if self.time_out.swap(false, Ordering::SeqCst) {
            self.inner.modify_members(group, change).await?;
            self.stalled.store(true, Ordering::SeqCst);
            return Err(DirError::Unreachable {
                op: crate::directory::Op::Modify,
                message: format!("{group}: gave no answer within 3s"),
            });
        }
        // As the LDAP client does, the server that gave no answer is left
        // alone: the next request is not sent.
        if self.stalled.swap(false, Ordering::SeqCst) {
            return Err(DirError::Stalled {
                op: crate::directory::Op::Modify,
                message: "the server stopped answering".into(),
            });
        }
        let delay = *self.delay.lock().expect("delay");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let late = self.late.load(Ordering::SeqCst);
        let applied = if late {
            Some(self.inner.modify_members(group, change).await)
        } else {
            None
        };
        let mut open = self.open.subscribe();
        if !*open.borrow_and_update() {
            self.held.fetch_add(1, Ordering::SeqCst);
            let _held = Held(&self.held);
            let _ = open.wait_for(|open| *open).await;
        }
        match applied {
            Some(answer) => answer,
            None => self.inner.modify_members(group, change).await,
        }
    }

    async fn commit(&self) -> Result<(), DirError> {
        self.inner.commit().await
    }

    fn saves_on_commit(&self) -> bool {
        self.inner.saves_on_commit()
    }
}

/// The election's state for a test that plays the election.
pub(crate) fn role(role: Role, term: u64) -> RoleState {
    RoleState {
        role,
        since: std::time::SystemTime::now(),
        term,
        connected: true,
        why: "test".into(),
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

/// Fills the tree: `.modified`, host `h1` in scope running `web.app#1`.
pub(crate) fn fill(root: &Path) {
    write_server(root, "h1");
    std::fs::write(root.join(".modified"), "").expect(".modified");
    std::fs::write(root.join("placement/h1/web.app#1"), "{}").expect("placement");
}

pub(crate) fn group(name: &str) -> Group {
    Group {
        dn: Dn::parse(&format!("CN={name},OU=Groups,DC=ad,DC=com")).expect("dn"),
        sam_account_name: name.to_owned(),
        members: BTreeSet::new(),
    }
}
