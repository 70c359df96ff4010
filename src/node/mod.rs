//! Node mode: the life of the containers placed on this host, driven by the
//! same placement events that drive group reconciliation.
//!
//! A [`Node`] owns `<app-root>`: `apps/<unique name>/` holds one container
//! directory per placement, `running/<instance>` links to the containers that
//! should run (the supervisor watches it), `cleanup/<unique name>` links to
//! the ones that stopped, and `appevents/` receives the events that tell the
//! cluster what happened. Every step is a file written atomically or a rename,
//! and every step can be repeated, so a crash at any point is repaired by
//! running the same operation again or by [`Node::startup`].
//!
//! The pieces: [`manifest`] checks manifests, [`unique`] names containers,
//! [`script`] writes the supervisor scripts, [`credspec`] the gMSA credential
//! specs, [`events`] posts events, [`mod@finish`] turns a stopped container into
//! its one event, [`wait`] waits for gMSA group membership, [`join`] runs
//! the operator's command when this host joins a group, [`own_dc`] says
//! which domain controller the wait reads. This file holds
//! the configuration and the per-host state machine; `configure.rs`,
//! `terminate.rs` and `startup.rs` hold its steps.

pub mod credspec;
pub mod events;
pub mod finish;
pub mod join;
pub mod manifest;
pub mod own_dc;
pub mod script;
pub mod unique;
pub mod wait;

mod configure;
mod files;
mod startup;
mod terminate;

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use thiserror::Error;

use crate::metrics::Metrics;
use crate::model::{GroupPattern, HostName, Proid};

pub use credspec::{guid_to_string, sid_to_string, DomainInfo};
pub use events::{Event, EventKind};
pub use finish::{app_root_of, finish};
pub use join::{HookOutcome, JoinHook, JOIN_PLACEHOLDERS};
pub use own_dc::OwnDc;
pub use startup::StartupReport;
pub use unique::Instance;
pub use wait::{CheckError, HostProblem, MembershipCheck, WaitOutcome};

use script::Template;

/// Container directories, under the app root.
pub const APPS_DIR: &str = "apps";
/// Links to the containers that should run, by instance name.
pub const RUNNING_DIR: &str = "running";
/// Links to stopped containers, by unique name, until they are deleted.
pub const CLEANUP_DIR: &str = "cleanup";
/// Posted events.
pub const APPEVENTS_DIR: &str = "appevents";

/// The finish command when none is configured.
pub const DEFAULT_FINISH_COMMAND: &str = "gmsa-reconciler finish {container_dir}";
/// How long stopped containers are kept when nothing else is configured.
pub const DEFAULT_RETAIN: Duration = Duration::from_secs(3600);
/// The placeholders a run command may use.
pub const RUN_PLACEHOLDERS: &[&str] = &["container_dir", "instance", "proid", "credential_spec"];
/// The placeholders a finish command may use.
pub const FINISH_PLACEHOLDERS: &[&str] = &["container_dir", "app_root"];

/// Which proids run under a gMSA (and so get a credential spec and, if
/// configured, wait for group membership).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GmsaProids {
    /// None do.
    None,
    /// Those whose name matches the shell glob.
    Glob(glob::Pattern),
    /// Those whose group exists, as the [`MembershipCheck`] says.
    GroupExists,
}

/// Everything a node needs to know.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Root of the placement tree (`placement/`, `scheduled/`).
    pub fs_root: PathBuf,
    /// This host: its placements are `placement/<hostname>/`.
    pub hostname: HostName,
    /// Root of the container directories.
    pub app_root: PathBuf,
    /// Template run by each container's `run` (placeholders:
    /// [`RUN_PLACEHOLDERS`]); `None` runs the manifest's services under
    /// `/bin/sh` in `data/`.
    pub run_command: Option<String>,
    /// Template run by each container's `finish` after recording
    /// `data/exitinfo` (placeholders: [`FINISH_PLACEHOLDERS`]).
    pub finish_command: String,
    /// Which proids have a gMSA.
    pub gmsa_proids: GmsaProids,
    /// Domain facts for credential specs; needed unless `gmsa_proids` is
    /// [`GmsaProids::None`].
    pub domain: Option<DomainInfo>,
    /// Where credential specs are written, as `<unique name>.json`.
    pub credential_spec_dir: PathBuf,
    /// Wait this long for this host to join a gMSA proid's group before
    /// configuring its instances; `None` does not wait.
    pub wait_for_group: Option<Duration>,
    /// How long stopped containers stay in `cleanup/`.
    pub retain: Duration,
    /// The sAMAccountName pattern of the proids' groups (for the join
    /// command's `{group}`).
    pub group_pattern: GroupPattern,
    /// Run when this host is seen to join a gMSA proid's group, before its
    /// instances are configured; needs `wait_for_group`.
    pub join_hook: Option<JoinHook>,
    /// Where the membership wait reads from instead of this host's own
    /// domain controller (`nt.dc`); see [`own_dc`].
    pub check_ldap_url: Option<String>,
}

impl NodeConfig {
    /// A configuration with the defaults: the manifest's services, the
    /// `gmsa-reconciler finish` command, gMSA for every proid whose group
    /// exists, credential specs in `<app_root>/credential_specs`, no
    /// waiting, one hour of retention.
    pub fn new(
        fs_root: impl Into<PathBuf>,
        hostname: HostName,
        app_root: impl Into<PathBuf>,
    ) -> Self {
        let app_root = app_root.into();
        NodeConfig {
            fs_root: fs_root.into(),
            hostname,
            credential_spec_dir: app_root.join("credential_specs"),
            app_root,
            run_command: None,
            finish_command: DEFAULT_FINISH_COMMAND.to_owned(),
            gmsa_proids: GmsaProids::GroupExists,
            domain: None,
            wait_for_group: None,
            retain: DEFAULT_RETAIN,
            group_pattern: GroupPattern::parse("{}-gmsa-hosts")
                .unwrap_or_else(|e| panic!("BUG: the default group pattern: {e}")),
            join_hook: None,
            check_ldap_url: None,
        }
    }
}

/// A node failure, by what the caller can do about it.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The configuration cannot work; fix it and restart.
    #[error("invalid node configuration: {0}")]
    Config(#[from] ConfigProblem),
    /// An instance name that cannot be a container's.
    #[error("{0}")]
    Instance(String),
    /// A file-system step failed; the operation can be retried as a whole.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path the step was about.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// A file the node wrote itself is not as it should be.
    #[error("{}: {why}", path.display())]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The directory could not say whether a proid has a gMSA; retry later.
    #[error("directory: {0}")]
    Directory(CheckError),
}

/// What makes a node configuration unusable.
#[derive(Debug, Error)]
pub enum ConfigProblem {
    /// A path that is written into scripts is relative or not UTF-8.
    #[error("the {what} {} must be an absolute UTF-8 path (it is written into scripts)", .path.display())]
    Path {
        /// Which path.
        what: &'static str,
        /// The path as configured.
        path: PathBuf,
    },
    /// A command template is refused.
    #[error(transparent)]
    Template(#[from] script::TemplateError),
    /// A join command without the membership wait, which is what sees joins.
    #[error("the join command needs the wait for group membership (and gMSA proids): joins are seen by that wait")]
    JoinWithoutWait,
    /// gMSA proids without the domain's facts.
    #[error("gMSA proids need the domain facts for their credential specs")]
    NoDomain,
    /// The domain's facts are invalid.
    #[error(transparent)]
    Domain(#[from] credspec::CredSpecError),
    /// No directory for what needs one.
    #[error(
        "finding gMSA proids by their groups, or waiting for group membership, needs a directory"
    )]
    NoDirectory,
    /// A container directory whose path is not UTF-8 (it is written into
    /// scripts).
    #[error("{} is not UTF-8", .path.display())]
    NotUtf8 {
        /// The container directory.
        path: PathBuf,
    },
}

impl NodeError {
    /// Wraps an I/O error with its path (for `map_err`).
    pub(crate) fn io(path: &Path) -> impl FnOnce(io::Error) -> NodeError + '_ {
        move |source| NodeError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What [`Node::placement_added`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    /// The container directory was made (or a half-made one completed), the
    /// instance linked into `running/` and `configured` posted.
    Configured {
        /// The container's unique name.
        unique_name: String,
        /// The container directory.
        container_dir: PathBuf,
        /// An earlier, interrupted attempt was completed.
        resumed: bool,
    },
    /// The instance was already running; nothing was made again.
    AlreadyConfigured {
        /// The container's unique name.
        unique_name: String,
    },
    /// The instance cannot run; an `aborted` event says why.
    Aborted {
        /// The event's data: `invalid-manifest`, `gmsa` or `join-hook`.
        why: String,
    },
    /// The instance was aborted or has finished earlier in this placement;
    /// it is not tried again until its placement is removed.
    AlreadyDone,
    /// The placement went away before the container was configured.
    NoLongerPlaced,
    /// The node is stopping ([`Node::shut_down`]): nothing was made.
    Stopped,
}

/// What [`Node::placement_removed`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// `running/<instance>` moved to `cleanup/<unique name>` and
    /// `data/terminated` touched.
    Terminated {
        /// The container's unique name.
        unique_name: String,
    },
    /// Nothing was running for the instance.
    NotRunning,
}

/// The directories under the app root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `<app_root>/apps`.
    pub apps: PathBuf,
    /// `<app_root>/running`.
    pub running: PathBuf,
    /// `<app_root>/cleanup`.
    pub cleanup: PathBuf,
    /// `<app_root>/appevents`.
    pub appevents: PathBuf,
}

impl Layout {
    /// The layout under an app root.
    pub fn new(app_root: &Path) -> Layout {
        Layout {
            apps: app_root.join(APPS_DIR),
            running: app_root.join(RUNNING_DIR),
            cleanup: app_root.join(CLEANUP_DIR),
            appevents: app_root.join(APPEVENTS_DIR),
        }
    }
}

/// The container life cycle on one host. Cheap to clone: clones share state,
/// so the caller can hand one to each task. Operations on different
/// instances may run at once; file-system changes are serialised inside.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    config: NodeConfig,
    layout: Layout,
    run_template: Option<Template>,
    finish_template: Template,
    join_template: Option<Template>,
    check: Option<Arc<dyn MembershipCheck>>,
    metrics: Option<Arc<Metrics>>,
    state: Mutex<State>,
    /// Held for every change under the app root, never across a wait.
    fs_lock: tokio::sync::Mutex<()>,
    /// One per proid, held while its join is decided and its command runs,
    /// so that instances placed together run the command once.
    join_locks: Mutex<std::collections::BTreeMap<Proid, Arc<tokio::sync::Mutex<()>>>>,
    /// True once the node is stopping: a join command running is killed,
    /// and nothing more is configured or aborted.
    stopping: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// Instances currently placed on this host, as fed by the caller.
    placed: BTreeSet<String>,
    /// Placed instances that aborted or finished: not configured again
    /// until their placement is removed.
    done: BTreeSet<String>,
    /// What has been seen of this host's membership, for the join hook.
    joins: join::Joins,
}

impl Node {
    /// Checks the configuration and makes the directories under the app root.
    /// `check` is needed for [`GmsaProids::GroupExists`] and for
    /// `wait_for_group`.
    pub fn new(
        config: NodeConfig,
        check: Option<Arc<dyn MembershipCheck>>,
    ) -> Result<Node, NodeError> {
        Node::with_metrics(config, check, None)
    }

    /// [`Node::new`], counting the join command's runs in `metrics`.
    pub fn with_metrics(
        config: NodeConfig,
        check: Option<Arc<dyn MembershipCheck>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Node, NodeError> {
        for (what, path) in [
            ("fs root", &config.fs_root),
            ("app root", &config.app_root),
            ("credential spec dir", &config.credential_spec_dir),
        ] {
            if path.to_str().is_none() || !path.is_absolute() {
                return Err(ConfigProblem::Path {
                    what,
                    path: path.clone(),
                }
                .into());
            }
        }
        let run_template = match &config.run_command {
            Some(text) => {
                Some(Template::parse(text, RUN_PLACEHOLDERS).map_err(ConfigProblem::from)?)
            }
            None => None,
        };
        let finish_template = Template::parse(&config.finish_command, FINISH_PLACEHOLDERS)
            .map_err(ConfigProblem::from)?;
        let join_template = match &config.join_hook {
            Some(hook) => {
                if config.wait_for_group.is_none() || config.gmsa_proids == GmsaProids::None {
                    return Err(ConfigProblem::JoinWithoutWait.into());
                }
                Some(
                    Template::parse(&hook.command, JOIN_PLACEHOLDERS)
                        .map_err(ConfigProblem::from)?,
                )
            }
            None => None,
        };
        if config.gmsa_proids != GmsaProids::None {
            let Some(domain) = &config.domain else {
                return Err(ConfigProblem::NoDomain.into());
            };
            domain.validate().map_err(ConfigProblem::from)?;
        }
        let needs_check = config.gmsa_proids == GmsaProids::GroupExists
            || (config.wait_for_group.is_some() && config.gmsa_proids != GmsaProids::None);
        if needs_check && check.is_none() {
            return Err(ConfigProblem::NoDirectory.into());
        }
        let layout = Layout::new(&config.app_root);
        for dir in [
            &layout.apps,
            &layout.running,
            &layout.cleanup,
            &layout.appevents,
            &config.credential_spec_dir,
        ] {
            std::fs::create_dir_all(dir).map_err(NodeError::io(dir))?;
        }
        Ok(Node {
            inner: Arc::new(Inner {
                config,
                layout,
                run_template,
                finish_template,
                join_template,
                check,
                metrics,
                state: Mutex::new(State::default()),
                fs_lock: tokio::sync::Mutex::new(()),
                join_locks: Mutex::new(std::collections::BTreeMap::new()),
                stopping: tokio::sync::watch::channel(false).0,
            }),
        })
    }

    /// The node is stopping: a join command running now is killed (with
    /// its process group), and from now on no container is configured and
    /// no event posted for one; the operations in flight end soon after
    /// with [`Added::Stopped`]. For the caller's shutdown, before it waits
    /// for them.
    pub fn shut_down(&self) {
        self.inner.stopping.send_replace(true);
    }

    /// An instance left this host, told as soon as the caller knows, before
    /// its [`Node::placement_removed`] (which the caller may queue behind
    /// the instance's earlier operations) runs: a configuration of it in
    /// progress (waiting for the group, or for the join command) then ends
    /// without configuring it.
    pub fn unplaced(&self, instance: &str) {
        self.inner.state().placed.remove(instance);
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The directories under the app root.
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// An instance was placed on this host: configure its container.
    ///
    /// Reads and validates `scheduled/<instance>` (an invalid or missing
    /// manifest posts `aborted`/`invalid-manifest` and makes nothing), waits
    /// for group membership if configured (a timeout posts `aborted`/`gmsa`),
    /// then makes the container directory, links it into `running/` and posts
    /// `configured`. Repeating the call is harmless: a running instance is
    /// left alone, an interrupted configuration is completed.
    pub async fn placement_added(&self, instance: &str) -> Result<Added, NodeError> {
        let inst = Instance::parse(instance).map_err(|e| NodeError::Instance(e.to_string()))?;
        {
            let mut state = self.inner.state();
            state.placed.insert(inst.name().to_owned());
            if state.done.contains(inst.name()) {
                return Ok(Added::AlreadyDone);
            }
        }
        {
            let _guard = self.inner.fs_lock.lock().await;
            if let Some(added) = self.inner.already_configured(&inst)? {
                return Ok(added);
            }
        }
        let gmsa = self.inner.is_gmsa(inst.proid()).await?;
        if let (true, Some(wait), Some(check)) =
            (gmsa, self.inner.config.wait_for_group, &self.inner.check)
        {
            // Report a bad manifest at once rather than after the wait.
            if let Err(problem) = self.inner.load_manifest(&inst)? {
                return self.inner.abort(&inst, "invalid-manifest", problem);
            }
            let inner = &self.inner;
            // Instances that wait for the same join share its command's run.
            let runs_before = inner.join_runs(inst.proid());
            let observed = Observed {
                inner,
                check: check.as_ref(),
            };
            match wait::wait_until_member(&observed, inst.proid(), wait, || {
                inner.is_placed(inst.name()) && !inner.is_stopping()
            })
            .await
            {
                WaitOutcome::Member => {}
                WaitOutcome::Cancelled if inner.is_stopping() => return Ok(Added::Stopped),
                WaitOutcome::Cancelled => return Ok(Added::NoLongerPlaced),
                WaitOutcome::TimedOut(why) | WaitOutcome::Failed(why) => {
                    return self.inner.abort(&inst, "gmsa", why)
                }
            }
            if let Some(problem) = self.inner.after_join(&inst, runs_before).await {
                return self.inner.abort(&inst, "join-hook", problem);
            }
        }
        let _guard = self.inner.fs_lock.lock().await;
        // Both asked again after the wait and the join command: a removal
        // or a shutdown that came meanwhile wins.
        if self.inner.is_stopping() {
            return Ok(Added::Stopped);
        }
        if !self.inner.is_placed(inst.name()) {
            return Ok(Added::NoLongerPlaced);
        }
        if let Some(added) = self.inner.already_configured(&inst)? {
            return Ok(added);
        }
        match self.inner.load_manifest(&inst)? {
            Err(problem) => self.inner.abort(&inst, "invalid-manifest", problem),
            Ok(loaded) => self.inner.configure(&inst, &loaded, gmsa),
        }
    }

    /// An instance left this host: move `running/<instance>` to
    /// `cleanup/<unique name>` and touch `data/terminated`, so the supervisor
    /// stops it and its finish reports nothing.
    pub async fn placement_removed(&self, instance: &str) -> Result<Removed, NodeError> {
        // The name becomes a path: only names a container can have.
        Instance::parse(instance).map_err(|e| NodeError::Instance(e.to_string()))?;
        {
            let mut state = self.inner.state();
            state.placed.remove(instance);
            state.done.remove(instance);
            if let Ok(inst) = Instance::parse(instance) {
                let proid = inst.proid();
                let prefix = format!("{proid}.");
                if !state.placed.iter().any(|i| i.starts_with(&prefix)) {
                    state.joins.left(proid);
                }
            }
        }
        let _guard = self.inner.fs_lock.lock().await;
        self.inner.terminate(instance)
    }

    /// Brings the app root in line with the placements found at start-up:
    /// instances running but no longer placed are terminated, placed ones
    /// not running are configured (unless their container already finished:
    /// that one is reported and goes to cleanup), broken `running/` links are
    /// repaired, leftovers of interrupted steps are completed. Placement
    /// events may be fed while it runs.
    pub async fn startup(&self, placed: &BTreeSet<String>) -> Result<StartupReport, NodeError> {
        startup::startup(self, placed).await
    }

    /// Notes which proids placed at start-up already have this host in their
    /// group, before anything else runs: for those, membership is not a
    /// join and the join command does not run (unless asked to, with
    /// [`JoinHook::at_startup`]). A proid whose membership cannot be read
    /// in time is decided by its first check instead. Done once; a no-op
    /// without a join command. [`Node::startup`] calls it; a caller that
    /// may write memberships itself calls it first.
    pub async fn note_startup_membership(&self, placed: &BTreeSet<String>) {
        let inner = &self.inner;
        let (Some(hook), Some(check)) = (&inner.config.join_hook, &inner.check) else {
            return;
        };
        if hook.at_startup || std::mem::replace(&mut inner.state().joins.startup_noted, true) {
            return;
        }
        let proids: BTreeSet<Proid> = placed
            .iter()
            .filter_map(|instance| Instance::parse(instance).ok())
            .map(|inst| inst.proid().clone())
            .collect();
        let deadline = tokio::time::Instant::now() + join::STARTUP_CHECK_LIMIT;
        for proid in proids {
            let answer = tokio::time::timeout_at(deadline, async {
                match inner.is_gmsa(&proid).await {
                    Ok(false) => Ok(None),
                    Ok(true) => check
                        .is_member(&proid)
                        .await
                        .map(Some)
                        .map_err(|e| e.to_string()),
                    Err(err) => Err(err.to_string()),
                }
            })
            .await
            .unwrap_or_else(|_| Err("no answer in time".to_owned()));
            let mut state = inner.state();
            match answer {
                Ok(None) | Ok(Some(false)) => {}
                Ok(Some(true)) => {
                    state
                        .joins
                        .groups
                        .entry(proid.clone())
                        .or_default()
                        .in_group = true;
                    tracing::info!(%proid, "this host was in the group when the node started; no join command for it");
                }
                Err(why) => {
                    tracing::warn!(%proid, %why, "membership at start-up unknown: the first check decides whether it is a join");
                    state.joins.at_startup.insert(proid);
                }
            }
        }
    }

    /// Deletes the containers that have been in `cleanup/` longer than the
    /// retention time, with their credential specs. Returns their unique
    /// names. A container that cannot be deleted is logged and tried again
    /// next time.
    pub fn cleanup_expired(&self, now: SystemTime) -> Vec<String> {
        self.inner.cleanup_expired(now)
    }
}

/// The node's check as the membership wait uses it: every "not a member"
/// is noted, so that the next "member" counts as a join.
struct Observed<'a> {
    inner: &'a Inner,
    check: &'a dyn MembershipCheck,
}

#[async_trait::async_trait]
impl MembershipCheck for Observed<'_> {
    async fn group_exists(&self, proid: &Proid) -> Result<bool, CheckError> {
        self.check.group_exists(proid).await
    }

    async fn is_member(&self, proid: &Proid) -> Result<bool, CheckError> {
        let answer = self.check.is_member(proid).await;
        if let Ok(false) = answer {
            self.inner.state().joins.saw_not_member(proid);
        }
        answer
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a pair of sets: a panic elsewhere cannot leave it torn.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_placed(&self, instance: &str) -> bool {
        self.state().placed.contains(instance)
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    fn container_dir(&self, unique_name: &str) -> PathBuf {
        self.layout.apps.join(unique_name)
    }

    fn credential_spec_path(&self, unique_name: &str) -> PathBuf {
        self.config
            .credential_spec_dir
            .join(format!("{unique_name}.json"))
    }

    /// This host is in the proid's group (the wait said so): runs the join
    /// command if this is a join and it has not run for it yet. `Some(why)`
    /// when the command failed for this join: the instance is aborted.
    /// Instances that were already waiting when the command ran (`runs_before`
    /// is [`Inner::join_runs`] when they began) share its result.
    async fn after_join(&self, inst: &Instance, runs_before: u64) -> Option<String> {
        let (Some(template), Some(hook)) = (&self.join_template, &self.config.join_hook) else {
            return None;
        };
        let proid = inst.proid();
        let lock = self
            .join_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(proid.clone())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        {
            let mut state = self.state();
            let first_at_startup = state.joins.at_startup.remove(proid);
            let join = state.joins.groups.entry(proid.clone()).or_default();
            if join.in_group {
                return None;
            }
            if join.runs > runs_before {
                // The command ran for this join while this instance waited.
                return join.failure.clone();
            }
            if first_at_startup && !hook.at_startup {
                join.in_group = true;
                tracing::info!(%proid, "this host was in the group when the node started (as first checked); no join command for it");
                return None;
            }
        }
        let group = self.config.group_pattern.render(proid);
        tracing::info!(%proid, %group, instance = %inst, "this host joined the group; running the join command");
        let outcome = join::run(
            template,
            proid,
            &group,
            self.config.hostname.as_str(),
            join::JOIN_HOOK_TIMEOUT,
            self.stopping.subscribe(),
        )
        .await;
        if outcome == HookOutcome::Stopped {
            // Not a run: the join is decided again by the next start.
            return Some(outcome.describe(proid));
        }
        if let Some(metrics) = &self.metrics {
            metrics
                .join_hook_runs
                .get_or_create(&crate::metrics::OutcomeLabels {
                    outcome: outcome.label(),
                })
                .inc();
        }
        let mut state = self.state();
        let join = state.joins.groups.entry(proid.clone()).or_default();
        join.runs += 1;
        if outcome == HookOutcome::Success {
            join.in_group = true;
            join.failure = None;
            None
        } else {
            let why = outcome.describe(proid);
            join.failure = Some(why.clone());
            Some(why)
        }
    }

    /// How many times the join command has run for the proid.
    fn join_runs(&self, proid: &Proid) -> u64 {
        self.state().joins.groups.get(proid).map_or(0, |j| j.runs)
    }

    /// Whether the proid runs under a gMSA.
    async fn is_gmsa(&self, proid: &Proid) -> Result<bool, NodeError> {
        match (&self.config.gmsa_proids, &self.check) {
            (GmsaProids::None, _) => Ok(false),
            (GmsaProids::Glob(glob), _) => Ok(glob.matches(proid.as_str())),
            (GmsaProids::GroupExists, Some(check)) => check
                .group_exists(proid)
                .await
                .map_err(NodeError::Directory),
            (GmsaProids::GroupExists, None) => {
                panic!("BUG: Node::new accepts GroupExists only with a check")
            }
        }
    }

    /// Posts `aborted` for an instance and remembers it until it is removed;
    /// posts nothing for one no longer placed, or already aborted.
    fn abort(
        &self,
        inst: &Instance,
        why: &str,
        problem: impl std::fmt::Display,
    ) -> Result<Added, NodeError> {
        if self.is_stopping() {
            return Ok(Added::Stopped);
        }
        {
            let mut state = self.state();
            if !state.placed.contains(inst.name()) {
                return Ok(Added::NoLongerPlaced);
            }
            if !state.done.insert(inst.name().to_owned()) {
                return Ok(Added::AlreadyDone);
            }
        }
        tracing::warn!(instance = %inst, why, %problem, "instance aborted");
        let event = Event::now(inst.name(), EventKind::Aborted, why)
            .with_payload(serde_yaml::Value::String(problem.to_string()));
        if let Err(err) = events::post(&self.layout.appevents, &event) {
            self.state().done.remove(inst.name());
            return Err(NodeError::io(&self.layout.appevents)(err));
        }
        Ok(Added::Aborted {
            why: why.to_owned(),
        })
    }

    /// `AlreadyConfigured` when `running/<instance>` leads to a container,
    /// after making sure its `configured` event went out.
    fn already_configured(&self, inst: &Instance) -> Result<Option<Added>, NodeError> {
        let Some(unique_name) = self.live_running(inst)? else {
            return Ok(None);
        };
        self.ensure_configured_event(inst, &unique_name)?;
        Ok(Some(Added::AlreadyConfigured { unique_name }))
    }

    /// The unique name `running/<instance>` points to when that container
    /// directory exists; a link to nothing is removed (it would make the
    /// supervisor fail) and counts as not running. An entry that is not a
    /// link is not the node's: it is left alone, and the instance cannot be
    /// configured while it is there.
    fn live_running(&self, inst: &Instance) -> Result<Option<String>, NodeError> {
        let link = self.layout.running.join(inst.name());
        match running_target(&link)? {
            None => Ok(None),
            Some(unique_name) if unique_name.is_empty() => Err(NodeError::Data {
                path: link,
                why: "not a link to a container; left alone (the node only makes links there)"
                    .to_owned(),
            }),
            Some(unique_name) if self.container_dir(&unique_name).join("data").is_dir() => {
                Ok(Some(unique_name))
            }
            Some(_) => {
                tracing::warn!(instance = %inst, "removing a broken running link");
                files::remove_file_if_exists(&link).map_err(NodeError::io(&link))?;
                Ok(None)
            }
        }
    }
}

/// The container a `running/` or `cleanup/` entry points to: the last
/// component of the link's target. `Some("")` for an entry that is not a
/// link; `None` when there is no entry.
fn running_target(link: &Path) -> Result<Option<String>, NodeError> {
    match std::fs::read_link(link) {
        Ok(target) => Ok(Some(
            target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned(),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Ok(Some(String::new())),
        Err(e) => Err(NodeError::io(link)(e)),
    }
}

#[cfg(test)]
pub(super) mod testing {
    //! A node on a temporary tree, for the unit tests of the node's steps.

    use super::*;

    pub(super) const MANIFEST: &str = "proid: proid1\nenvironment: dev\ncpu: 10%\nmemory: 1M\ndisk: 1M\ncommand: exec sleep 100\n";

    pub(super) struct TestNode {
        pub tmp: tempfile::TempDir,
        pub node: Node,
    }

    impl TestNode {
        pub(super) fn new() -> TestNode {
            let tmp = tempfile::tempdir().expect("tempdir");
            let host = HostName::new("h1").expect("host");
            let mut config =
                NodeConfig::new(tmp.path().join("cell"), host, tmp.path().join("node"));
            config.gmsa_proids = GmsaProids::None;
            std::fs::create_dir_all(tmp.path().join("cell/scheduled")).expect("mkdir");
            std::fs::create_dir_all(tmp.path().join("cell/placement/h1")).expect("mkdir");
            let node = Node::new(config, None).expect("node");
            TestNode { tmp, node }
        }

        pub(super) fn inner(&self) -> &Inner {
            &self.node.inner
        }

        /// Writes a manifest as the mirror does: a new file renamed over the
        /// old one, so it always has a new inode.
        pub(super) fn schedule(&self, instance: &str, manifest: &str) {
            let dir = self.tmp.path().join("cell/scheduled");
            std::fs::write(dir.join(".tmp"), manifest).expect("write manifest");
            std::fs::rename(dir.join(".tmp"), dir.join(instance)).expect("rename manifest");
        }

        pub(super) fn place(&self, instance: &str, data: &str) {
            let path = self.tmp.path().join("cell/placement/h1").join(instance);
            std::fs::write(path, data).expect("write placement");
        }

        /// The unique name the first container of a scheduled manifest gets.
        pub(super) fn first_unique_name(&self, instance: &str) -> String {
            let inst = Instance::parse(instance).expect("instance");
            let path = self.tmp.path().join("cell/scheduled").join(instance);
            let stamp = unique::Stamp::of(&std::fs::metadata(path).expect("stat"));
            inst.unique_name(&unique::unique_id(&stamp, inst.number(), 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoDirectory;

    #[async_trait::async_trait]
    impl MembershipCheck for NoDirectory {
        async fn group_exists(&self, _: &Proid) -> Result<bool, CheckError> {
            Err(CheckError::Directory(crate::directory::DirError::Fatal(
                "no directory".into(),
            )))
        }
        async fn is_member(&self, _: &Proid) -> Result<bool, CheckError> {
            Err(CheckError::Directory(crate::directory::DirError::Fatal(
                "no directory".into(),
            )))
        }
    }

    fn config(dir: &Path) -> NodeConfig {
        let mut config = NodeConfig::new(
            dir.join("cell"),
            HostName::new("h1").expect("host"),
            dir.join("node"),
        );
        config.gmsa_proids = GmsaProids::None;
        config
    }

    fn domain() -> DomainInfo {
        DomainInfo {
            dns_name: "ad.test".into(),
            netbios_name: "AD".into(),
            sid: "S-1-5-21-1-2-3".into(),
            guid: "a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e".into(),
            dns_tree_name: "ad.test".into(),
        }
    }

    fn refused(config: NodeConfig, check: Option<Arc<dyn MembershipCheck>>) -> ConfigProblem {
        match Node::new(config, check) {
            Err(NodeError::Config(why)) => why,
            Err(other) => panic!("expected a configuration error, got {other}"),
            Ok(_) => panic!("expected a configuration error"),
        }
    }

    #[test]
    fn configurations_that_cannot_work_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let check: Arc<dyn MembershipCheck> = Arc::new(NoDirectory);

        let mut c = config(dir);
        c.gmsa_proids = GmsaProids::GroupExists;
        let no_domain = refused(c.clone(), Some(check.clone()));
        assert!(matches!(no_domain, ConfigProblem::NoDomain), "{no_domain}");
        assert!(no_domain.to_string().contains("domain facts"));
        c.domain = Some(domain());
        let no_dir = refused(c.clone(), None);
        assert!(matches!(no_dir, ConfigProblem::NoDirectory), "{no_dir}");
        assert!(no_dir.to_string().contains("needs a directory"));
        assert!(Node::new(c.clone(), Some(check.clone())).is_ok());

        let mut c = config(dir);
        c.gmsa_proids = GmsaProids::Glob(glob::Pattern::new("p*").expect("glob"));
        c.domain = Some(DomainInfo {
            sid: "bogus".into(),
            ..domain()
        });
        let sid = refused(c.clone(), None);
        assert!(matches!(sid, ConfigProblem::Domain(_)), "{sid}");
        assert!(sid.to_string().contains("sid"));
        c.domain = Some(domain());
        assert!(
            Node::new(c.clone(), None).is_ok(),
            "a glob needs no directory"
        );
        c.wait_for_group = Some(Duration::from_secs(5));
        assert!(refused(c, None).to_string().contains("needs a directory"));

        let mut c = config(dir);
        c.run_command = Some("run {nope}".into());
        let run = refused(c, None);
        assert!(matches!(run, ConfigProblem::Template(_)), "{run}");
        assert!(run.to_string().contains("{nope}"));
        let mut c = config(dir);
        c.finish_command = "finish {instance}".into();
        assert!(refused(c, None).to_string().contains("{instance}"));
        let mut c = config(dir);
        c.app_root = PathBuf::from("relative/root");
        let relative = refused(c, None);
        assert!(
            matches!(
                relative,
                ConfigProblem::Path {
                    what: "app root",
                    ..
                }
            ),
            "{relative}"
        );
        assert!(relative.to_string().contains("absolute"));
    }

    #[test]
    fn new_makes_the_app_root_layout() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let node = Node::new(config(tmp.path()), None).expect("node");
        let layout = node.layout();
        for dir in [
            &layout.apps,
            &layout.running,
            &layout.cleanup,
            &layout.appevents,
        ] {
            assert!(dir.is_dir(), "{}", dir.display());
        }
        assert!(node.config().credential_spec_dir.is_dir());
    }

    #[tokio::test]
    async fn a_directory_that_cannot_answer_is_an_error_and_makes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut c = config(tmp.path());
        c.gmsa_proids = GmsaProids::GroupExists;
        c.domain = Some(domain());
        std::fs::create_dir_all(tmp.path().join("cell/scheduled")).expect("mkdir");
        std::fs::write(
            tmp.path().join("cell/scheduled/proid1.web#1"),
            testing::MANIFEST,
        )
        .expect("write");
        let node = Node::new(c, Some(Arc::new(NoDirectory))).expect("node");
        let err = node
            .placement_added("proid1.web#1")
            .await
            .expect_err("no directory");
        assert!(matches!(err, NodeError::Directory(_)), "{err}");
        assert!(files::data_names(&node.layout().apps)
            .expect("list")
            .is_empty());
        assert!(files::data_names(&node.layout().appevents)
            .expect("list")
            .is_empty());
    }
}
