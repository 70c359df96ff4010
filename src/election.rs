//! Which replica may write: leader election through a ZooKeeper lock.
//!
//! Several replicas of the daemon watch the same tree, but only one may send
//! Modify requests at a time, or every change would be written once per
//! replica. This module owns that decision. [`start`] spawns a task that
//! holds a ZooKeeper session, competes for the lock under
//! [`ElectionConfig::lock_path`] with the client library's lock recipe (an
//! ephemeral sequential node per contender; the lowest holds the lock; the
//! node's data names the holder for operators), and publishes the outcome as
//! a [`RoleState`] on a `watch` channel. The daemon reads that channel: it
//! writes only while the role is [`Role::Leader`], checks
//! [`Election::is_leader`] right before each write batch, and does a full
//! sync whenever [`RoleState::term`] moves.
//!
//! # Why a disconnected leader steps down at once
//!
//! The lock is only as good as the session that owns its node: the server
//! deletes the node once it has heard nothing from the session for the
//! session timeout (rounded up to its tick), and the next contender then
//! writes. A leader cut off from ZooKeeper cannot know when that happens,
//! so it must stop before it can happen. The client is told to declare the
//! connection lost after two fifths of the session timeout without a reply
//! (it pings every three twentieths),
//! and a closed socket is noticed at once; both happen well inside the
//! server's expiry, which counts from the last request the server saw, and
//! so at the latest from the last ping. Stepping down on that first
//! "disconnected" leaves the remaining three fifths of the timeout for
//! in-flight work to drain before anyone else can hold the lock. Waiting for
//! the "expired" state instead would be too late: the client only learns of
//! expiry when it reconnects, or on its own after 7/5 of the timeout, long
//! after another replica may have started writing.
//!
//! If the connection comes back within the session, the lock node still
//! belongs to this session (nobody else could have taken it); the task
//! checks that the node is still there and ours, and leads again under a new
//! term, so the daemon resyncs before writing. If the session expired, the
//! task drops it, opens a new session, deletes the lock nodes its old
//! sessions may still own (a server that was down expires them only a
//! session timeout after it is back) and competes again. While ZooKeeper
//! is unreachable the role stays follower and connecting is retried with
//! backoff.
//!
//! What this cannot do: stop a write already sent, or one sent by a process
//! that was paused (swapped out, stopped) past its session timeout and
//! resumes before its client notices. LDAP has no fencing token; the
//! daemon's batch checks and the reconcile's idempotent, state-based writes
//! keep such a late write harmless (at worst it is repaired by the next
//! reconcile of the new leader).

use std::fmt;
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use zookeeper_client::{
    Acls, Client, CreateMode, LockOptions, LockPrefix, OwnedLockClient, SessionId, SessionState,
    StateWatcher,
};

use crate::backoff::{Backoff, Jitter};

/// The lock path used unless configured otherwise.
pub const DEFAULT_LOCK_PATH: &str = "/election/gmsa-reconciler";
/// The session timeout asked for unless configured otherwise.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// The lock recipe's node name: `<lock path>/_c_<uuid>-lock-<sequence>`,
/// the layout Apache Curator's lock uses, so its tools read it too.
const LOCK_NAME: &str = "lock-";
/// How long a stop waits for ZooKeeper to take the lock node and session.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How many ended sessions are remembered for [`Runner::delete_stale_nodes`].
const STALE_SESSIONS: usize = 8;
/// Pauses between failed attempts to connect or to compete. Connecting
/// itself already retries for about a session timeout before it fails.
const RETRY: Backoff = Backoff {
    attempts: u32::MAX,
    initial: Duration::from_millis(250),
    max: Duration::from_secs(5),
    jitter: Jitter::Full,
};

/// Why an election could not be started.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElectionError {
    /// The server list is not `HOST:PORT[,HOST:PORT...]`.
    #[error("invalid ZooKeeper server list {servers:?}: {why}")]
    Servers {
        /// The list as given.
        servers: String,
        /// What is wrong with it.
        why: String,
    },
    /// The lock path is not an absolute ZooKeeper path below the root.
    #[error("invalid lock path {path:?}: {why}")]
    LockPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        why: String,
    },
    /// The session timeout is zero.
    #[error("the ZooKeeper session timeout must be more than zero")]
    SessionTimeout,
}

/// What the election needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionConfig {
    /// ZooKeeper servers, `HOST:PORT[,HOST:PORT...]`.
    pub servers: String,
    /// The lock's parent node; created (with its ancestors) if missing.
    pub lock_path: String,
    /// The session timeout asked of the server (it may clamp it to its
    /// own bounds, by default 2 to 20 ticks). A dead leader's lock is
    /// handed over after about this long; a live leader steps down when
    /// it has been cut off for two fifths of it.
    pub session_timeout: Duration,
    /// Stored in the lock node so operators can see who holds it.
    pub identity: String,
}

impl ElectionConfig {
    /// A configuration with the default lock path, session timeout and
    /// identity.
    pub fn new(servers: impl Into<String>) -> ElectionConfig {
        ElectionConfig {
            servers: servers.into(),
            lock_path: DEFAULT_LOCK_PATH.to_owned(),
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            identity: default_identity(),
        }
    }

    /// Checks what can be checked without connecting.
    pub fn validate(&self) -> Result<(), ElectionError> {
        validate_servers(&self.servers)?;
        validate_lock_path(&self.lock_path)?;
        if self.session_timeout.is_zero() {
            return Err(ElectionError::SessionTimeout);
        }
        Ok(())
    }
}

fn validate_servers(servers: &str) -> Result<(), ElectionError> {
    let invalid = |why: String| ElectionError::Servers {
        servers: servers.to_owned(),
        why,
    };
    if servers.trim().is_empty() {
        return Err(invalid("empty".to_owned()));
    }
    for server in servers.split(',') {
        let Some((host, port)) = server.rsplit_once(':') else {
            return Err(invalid(format!("{server:?} is not HOST:PORT")));
        };
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(invalid(format!("{server:?} has no valid host")));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(invalid(format!("{server:?} has no valid port"))),
        }
    }
    Ok(())
}

fn validate_lock_path(path: &str) -> Result<(), ElectionError> {
    let invalid = |why: &str| ElectionError::LockPath {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    if !path.starts_with('/') {
        return Err(invalid("must start with /"));
    }
    if path == "/" {
        return Err(invalid("must be below the root"));
    }
    if path.ends_with('/') {
        return Err(invalid("must not end with /"));
    }
    if path
        .split('/')
        .skip(1)
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(invalid("has an empty, . or .. component"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(invalid("has a control character"));
    }
    Ok(())
}

/// `<hostname> pid <pid>`: enough for an operator to find the holder.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .or_else(|| std::env::var("COMPUTERNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("{host} pid {}", std::process::id())
}

/// This replica's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Keeps its index warm, writes nothing.
    Follower,
    /// Holds the lock: the only replica that writes.
    Leader,
}

impl Role {
    /// `leader` or `follower`, as in metrics labels and `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::Leader => "leader",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The role as last published, with when and why it last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleState {
    /// The current role.
    pub role: Role,
    /// When the role last changed (or the election started).
    pub since: SystemTime,
    /// Why the state is what it is, for logs and `/readyz`; may change
    /// without the role changing (a follower that loses its connection).
    pub why: String,
    /// Counts the times this replica became leader. A leader that sees it
    /// move between two batches lost the lock in between (another replica
    /// may have written) and must resync before writing again.
    pub term: u64,
    /// Whether a ZooKeeper session is connected right now. A replica that
    /// is not connected cannot become leader and reports not ready.
    pub connected: bool,
}

impl RoleState {
    /// Whether this replica may write.
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
}

/// A running election; stops (releasing the lock) on [`Election::stop`]
/// or, without waiting, on drop.
#[derive(Debug)]
pub struct Election {
    state: watch::Receiver<RoleState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Starts competing for the lock in a background task and returns at once,
/// as a follower. Must be called within a tokio runtime.
pub fn start(config: ElectionConfig) -> Result<Election, ElectionError> {
    config.validate()?;
    let initial = RoleState {
        role: Role::Follower,
        since: SystemTime::now(),
        why: "connecting to ZooKeeper".to_owned(),
        term: 0,
        connected: false,
    };
    let (tx, rx) = watch::channel(initial);
    let (stop_tx, stop_rx) = oneshot::channel();
    info!(
        servers = %config.servers,
        lock_path = %config.lock_path,
        session_timeout_ms = config.session_timeout.as_millis() as u64,
        identity = %config.identity,
        "election: starting"
    );
    let runner = Runner {
        config,
        publisher: Publisher { tx },
        stop: stop_rx,
        stale_sessions: Vec::new(),
    };
    let task = tokio::spawn(runner.run());
    Ok(Election {
        state: rx,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

impl Election {
    /// A receiver of every published state (the latest at least).
    pub fn subscribe(&self) -> watch::Receiver<RoleState> {
        self.state.clone()
    }

    /// The state as last published.
    pub fn state(&self) -> RoleState {
        self.state.borrow().clone()
    }

    /// Whether this replica holds the lock right now. The state turns to
    /// follower as soon as the connection is lost, so a `true` here means
    /// the session was connected and owned the lock at most a moment ago.
    pub fn is_leader(&self) -> bool {
        self.state.borrow().is_leader()
    }

    /// Steps down, deletes the lock node and closes the session, so that
    /// another replica takes over at once; returns when that is done (or
    /// ZooKeeper did not answer within a few seconds).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                warn!(error = %e, "election: task ended abnormally");
            }
        }
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        // Dropping the sender tells the task to step down and release;
        // it does so in the background while the runtime lives.
        self.stop.take();
    }
}

/// Sends states, logging each change with its reason.
struct Publisher {
    tx: watch::Sender<RoleState>,
}

impl Publisher {
    fn publish(&self, role: Role, connected: bool, why: impl Into<String>) {
        let why = why.into();
        self.tx.send_if_modified(|state| {
            if state.role == role && state.connected == connected && state.why == why {
                return false;
            }
            if state.role != role {
                let previous = state.role;
                state.since = SystemTime::now();
                if role == Role::Leader {
                    state.term += 1;
                    info!(from = %previous, to = %role, term = state.term, why = %why, "election: role changed");
                } else {
                    warn!(from = %previous, to = %role, why = %why, "election: role changed");
                }
            } else {
                info!(role = %role, connected, why = %why, "election: state");
            }
            state.role = role;
            state.connected = connected;
            state.why = why;
            true
        });
    }
}

/// How one session ended.
enum End {
    /// Asked to stop; the lock is released.
    Stopped,
    /// The session expired or closed: connect again at once.
    Lost(String),
    /// Something failed on a live session: close it, wait, connect again.
    Failed(String),
}

struct Runner {
    config: ElectionConfig,
    publisher: Publisher,
    stop: oneshot::Receiver<()>,
    /// Ids of our sessions that ended on our side; the server may still
    /// hold their lock nodes.
    stale_sessions: Vec<i64>,
}

impl Runner {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            let connecting = Client::connector()
                .with_session_timeout(self.config.session_timeout)
                .with_connection_timeout(self.config.session_timeout * 2 / 5)
                .connect(&self.config.servers);
            let connected = tokio::select! {
                biased;
                _ = &mut self.stop => {
                    self.publisher.publish(Role::Follower, false, "stopped");
                    return;
                }
                connected = connecting => connected,
            };
            let wait = match connected {
                Err(e) => {
                    self.publisher.publish(
                        Role::Follower,
                        false,
                        format!("zookeeper unreachable at {}: {e}", self.config.servers),
                    );
                    failures = failures.saturating_add(1);
                    Some(RETRY.delay(failures))
                }
                Ok(client) => {
                    let session = client.session_id();
                    let negotiated = client.session_timeout();
                    info!(%session, session_timeout_ms = negotiated.as_millis() as u64, "election: connected to ZooKeeper");
                    if negotiated != self.config.session_timeout {
                        warn!(
                            asked_ms = self.config.session_timeout.as_millis() as u64,
                            negotiated_ms = negotiated.as_millis() as u64,
                            "election: the server changed the session timeout (it clamps it to 2-20 ticks)"
                        );
                    }
                    match self.session(client).await {
                        End::Stopped => return,
                        End::Lost(why) => {
                            failures = 0;
                            self.publisher.publish(Role::Follower, false, why);
                            Some(RETRY.delay(0))
                        }
                        End::Failed(why) => {
                            failures = failures.saturating_add(1);
                            self.publisher.publish(Role::Follower, false, why);
                            Some(RETRY.delay(failures))
                        }
                    }
                }
            };
            if let Some(wait) = wait {
                tokio::select! {
                    biased;
                    _ = &mut self.stop => {
                        self.publisher.publish(Role::Follower, false, "stopped");
                        return;
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    /// One session: compete, lead, and end it (closing it unless it is
    /// already gone).
    async fn session(&mut self, client: Client) -> End {
        let mut states = client.state_watcher();
        self.delete_stale_nodes(&client).await;
        let end = match self.compete(&client, &mut states).await {
            Ok(lock) => self.lead(&client, &mut states, lock).await,
            Err(end) => (end, None),
        };
        match end {
            (End::Stopped, lock) => {
                self.publisher
                    .publish(Role::Follower, false, "stopped: releasing the lock");
                close(client, lock, states).await;
                self.publisher.publish(Role::Follower, false, "stopped");
                End::Stopped
            }
            (end, lock) => {
                if self.stale_sessions.len() == STALE_SESSIONS {
                    self.stale_sessions.remove(0);
                }
                self.stale_sessions.push(client.session_id().0);
                if matches!(end, End::Failed(_)) {
                    // Closing the session deletes its lock node too.
                    tokio::spawn(close(client, lock, states));
                }
                end
            }
        }
    }

    /// Deletes lock nodes still owned by our earlier sessions. A server
    /// that was down while a session ended on our side brings the session
    /// back when it restarts and expires it only a session timeout later;
    /// until then its node, leader's or follower's, holds up everyone
    /// queued behind it. Those sessions are abandoned, so deleting their
    /// nodes cannot make a second leader.
    async fn delete_stale_nodes(&mut self, client: &Client) {
        if self.stale_sessions.is_empty() {
            return;
        }
        let dir = &self.config.lock_path;
        let children = match client.list_children(dir).await {
            Ok(children) => children,
            Err(zookeeper_client::Error::NoNode) => Vec::new(),
            Err(e) => {
                debug!(error = %e, "election: could not look for old lock nodes");
                return;
            }
        };
        for child in children {
            let path = format!("{dir}/{child}");
            let owner = match client.check_stat(&path).await {
                Ok(Some(stat)) => stat.ephemeral_owner,
                Ok(None) => continue,
                Err(e) => {
                    debug!(path = %path, error = %e, "election: could not read an old lock node");
                    return;
                }
            };
            if !self.stale_sessions.contains(&owner) {
                continue;
            }
            match client.delete(&path, None).await {
                Ok(()) | Err(zookeeper_client::Error::NoNode) => {
                    info!(path = %path, session = %SessionId(owner), "election: deleted a lock node of an earlier session");
                }
                Err(e) => {
                    debug!(path = %path, error = %e, "election: could not delete an old lock node");
                    return;
                }
            }
        }
        self.stale_sessions.clear();
    }

    /// Waits for the lock; publishes follower states meanwhile.
    async fn compete(
        &mut self,
        client: &Client,
        states: &mut StateWatcher,
    ) -> Result<OwnedLockClient, End> {
        let Runner {
            config,
            publisher,
            stop,
            ..
        } = self;
        let prefix = LockPrefix::new_curator(&config.lock_path, LOCK_NAME)
            .map_err(|e| End::Failed(format!("lock path {}: {e}", config.lock_path)))?;
        let options = LockOptions::new(Acls::anyone_all())
            .with_ancestor_options(CreateMode::Persistent.with_acls(Acls::anyone_all()))
            .map_err(|e| End::Failed(format!("lock options: {e}")))?;
        let waiting = format!("waiting for the lock {}", config.lock_path);
        let mut state = states.state();
        let locking = client.lock(prefix, config.identity.as_bytes(), options);
        tokio::pin!(locking);
        loop {
            match state {
                SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                    publisher.publish(Role::Follower, true, waiting.as_str());
                }
                SessionState::Disconnected => publisher.publish(
                    Role::Follower,
                    false,
                    "zookeeper connection lost while waiting for the lock",
                ),
                terminal => {
                    return Err(End::Lost(format!(
                        "zookeeper session {} while waiting for the lock",
                        describe(terminal)
                    )))
                }
            }
            tokio::select! {
                biased;
                _ = &mut *stop => return Err(End::Stopped),
                changed = states.changed() => state = changed,
                locked = &mut locking => {
                    return match locked {
                        Ok(lock) => Ok(lock.into_owned()),
                        Err(e @ (zookeeper_client::Error::SessionExpired | zookeeper_client::Error::ClientClosed)) => {
                            Err(End::Lost(format!("competing for the lock: {e}")))
                        }
                        Err(e) => Err(End::Failed(format!("competing for the lock: {e}"))),
                    };
                }
            }
        }
    }

    /// Leads while the session is connected; steps down the moment it is
    /// not, and leads again if it reconnects still owning the lock.
    async fn lead(
        &mut self,
        client: &Client,
        states: &mut StateWatcher,
        lock: OwnedLockClient,
    ) -> (End, Option<OwnedLockClient>) {
        let path = lock.lock_path().to_owned();
        let mut state = states.state();
        let mut why = format!("acquired the lock {path}");
        loop {
            match state {
                SessionState::SyncConnected => {
                    match owns(client, &path).await {
                        Ok(true) => self.publisher.publish(Role::Leader, true, why.as_str()),
                        Ok(false) => {
                            return (
                                End::Failed(format!(
                                    "the lock node {path} is gone or not ours: competing again"
                                )),
                                Some(lock),
                            )
                        }
                        // Lost again before the answer: the next state
                        // change says what to do.
                        Err(e @ zookeeper_client::Error::ConnectionLoss) => {
                            debug!(error = %e, "election: could not check the lock node")
                        }
                        Err(
                            e @ (zookeeper_client::Error::SessionExpired
                            | zookeeper_client::Error::ClientClosed),
                        ) => {
                            return (
                                End::Lost(format!("checking the lock node: {e}")),
                                Some(lock),
                            )
                        }
                        Err(e) => {
                            return (
                                End::Failed(format!("checking the lock node: {e}")),
                                Some(lock),
                            )
                        }
                    }
                }
                // A read-only server cannot vouch for the lock.
                SessionState::Disconnected | SessionState::ConnectedReadOnly => {
                    self.publisher.publish(
                        Role::Follower,
                        false,
                        "zookeeper connection lost: stepped down before the session can expire",
                    )
                }
                terminal => {
                    return (
                        End::Lost(format!("zookeeper session {}", describe(terminal))),
                        Some(lock),
                    )
                }
            }
            tokio::select! {
                biased;
                _ = &mut self.stop => return (End::Stopped, Some(lock)),
                changed = states.changed() => state = changed,
            }
            why = format!("reconnected within the session, still holding the lock {path}");
        }
    }
}

/// Whether the lock node exists and belongs to this session.
async fn owns(client: &Client, path: &str) -> Result<bool, zookeeper_client::Error> {
    let stat = client.check_stat(path).await?;
    Ok(stat.is_some_and(|s| s.ephemeral_owner == client.session_id().0))
}

fn describe(state: SessionState) -> &'static str {
    match state {
        SessionState::Expired => "expired",
        SessionState::Closed => "closed",
        SessionState::AuthFailed => "failed authentication",
        SessionState::Disconnected => "disconnected",
        SessionState::SyncConnected => "connected",
        SessionState::ConnectedReadOnly => "connected read-only",
    }
}

/// Deletes the lock node (if any) and closes the session, waiting at most
/// [`CLOSE_TIMEOUT`] for ZooKeeper: a closed session takes its ephemeral
/// nodes with it, so the next contender is told at once.
async fn close(client: Client, lock: Option<OwnedLockClient>, mut states: StateWatcher) {
    let session = client.session_id();
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    if let Some(lock) = &lock {
        match tokio::time::timeout_at(deadline, client.delete(lock.lock_path(), None)).await {
            Ok(Ok(())) | Ok(Err(zookeeper_client::Error::NoNode)) => {
                info!(path = %lock.lock_path(), "election: released the lock");
            }
            Ok(Err(e)) => {
                warn!(path = %lock.lock_path(), error = %e, "election: could not delete the lock node; it goes with the session");
            }
            Err(_) => {
                warn!(path = %lock.lock_path(), "election: ZooKeeper did not answer; the lock goes when the session expires");
            }
        }
    }
    // The session is closed once the last client handle is gone.
    drop(lock);
    drop(client);
    let closed = tokio::time::timeout_at(deadline, async {
        while !states.peek_state().is_terminated() {
            states.changed().await;
        }
    })
    .await;
    match closed {
        Ok(()) => debug!(%session, "election: session closed"),
        Err(_) => debug!(%session, "election: session not closed in time; it will expire"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_are_host_port_pairs() {
        assert_eq!(validate_servers("zk1:2181"), Ok(()));
        assert_eq!(
            validate_servers("zk1:2181,10.0.0.2:2182,[::1]:2181"),
            Ok(())
        );
        for bad in [
            "",
            "zk1",
            "zk1:",
            ":2181",
            "zk1:0",
            "zk1:99999",
            "zk1:2181,",
            "zk1:2181/chroot",
            "zk1:2181,,zk2:2181",
        ] {
            assert!(
                matches!(validate_servers(bad), Err(ElectionError::Servers { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn lock_paths_are_absolute_and_below_the_root() {
        assert_eq!(validate_lock_path(DEFAULT_LOCK_PATH), Ok(()));
        assert_eq!(validate_lock_path("/a"), Ok(()));
        for bad in [
            "", "election", "/", "/a/", "//a", "/a//b", "/a/./b", "/a/..", "/a\nb",
        ] {
            assert!(
                matches!(validate_lock_path(bad), Err(ElectionError::LockPath { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn config_defaults_validate_and_a_zero_timeout_does_not() {
        let config = ElectionConfig::new("127.0.0.1:2181");
        assert_eq!(config.lock_path, DEFAULT_LOCK_PATH);
        assert_eq!(config.session_timeout, DEFAULT_SESSION_TIMEOUT);
        assert_eq!(config.validate(), Ok(()));
        let zero = ElectionConfig {
            session_timeout: Duration::ZERO,
            ..config
        };
        assert_eq!(zero.validate(), Err(ElectionError::SessionTimeout));
    }

    #[test]
    fn identity_names_the_process() {
        let identity = default_identity();
        assert!(
            identity.ends_with(&format!(" pid {}", std::process::id())),
            "{identity}"
        );
        assert!(!identity.starts_with(' '), "{identity}");
    }

    #[test]
    fn roles_render_as_metric_labels() {
        assert_eq!(Role::Leader.to_string(), "leader");
        assert_eq!(Role::Follower.as_str(), "follower");
    }

    #[test]
    fn publishing_counts_terms_and_keeps_since_while_the_role_stays() {
        let (tx, rx) = watch::channel(RoleState {
            role: Role::Follower,
            since: SystemTime::UNIX_EPOCH,
            why: "start".to_owned(),
            term: 0,
            connected: false,
        });
        let publisher = Publisher { tx };
        publisher.publish(Role::Follower, true, "waiting");
        let waiting = rx.borrow().clone();
        assert_eq!(waiting.since, SystemTime::UNIX_EPOCH);
        assert_eq!((waiting.term, waiting.connected), (0, true));
        publisher.publish(Role::Leader, true, "acquired");
        let leading = rx.borrow().clone();
        assert!(leading.since > SystemTime::UNIX_EPOCH);
        assert_eq!((leading.role, leading.term), (Role::Leader, 1));
        publisher.publish(Role::Follower, false, "lost");
        publisher.publish(Role::Leader, true, "back");
        let again = rx.borrow().clone();
        assert_eq!(
            (again.role, again.term, again.why.as_str()),
            (Role::Leader, 2, "back")
        );
    }

    #[test]
    fn an_invalid_config_is_refused_before_anything_starts() {
        let config = ElectionConfig {
            lock_path: "relative".to_owned(),
            ..ElectionConfig::new("127.0.0.1:2181")
        };
        assert!(matches!(start(config), Err(ElectionError::LockPath { .. })));
    }
}
