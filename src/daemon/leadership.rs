//! Who may write, and whether the daemon is ready.
//!
//! [`Leadership`] follows the election: the role and term this replica
//! last acted on, whether that leadership still lasts, and what changed.
//! [`Health`] holds the facts readiness depends on; [`readiness`] derives
//! from them and the role what `/readyz` says, with the reason, in one
//! place, so no part of the daemon sets or reads back a ready flag.
//! [`Daemon::observe_role`] is what a new role does to the daemon: a new
//! leadership starts with a full sync, a follower drops what was pending.

use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use super::Daemon;
use crate::directory::DirError;
use crate::election::{Role, RoleState};
use crate::model::HostName;
use crate::node::credspec::CredSpecError;
use crate::tree::names;

/// The replica's role as last acted on.
#[derive(Debug, Default)]
pub struct Leadership {
    /// The election's state; `None` when this replica runs alone.
    roles: Option<watch::Receiver<RoleState>>,
    /// The role, term and connection last acted on.
    seen: Option<(Role, u64, bool)>,
}

/// Whether one leadership still lasts, asked from inside a pass: the
/// election's state now against the term the pass began in.
#[derive(Debug, Clone)]
pub struct WriteCheck {
    roles: Option<watch::Receiver<RoleState>>,
    /// The term the pass began in; `None` when it did not begin as leader.
    term: Option<u64>,
}

impl WriteCheck {
    /// True while this replica may still write for the pass: no election,
    /// or the lock held in the same term.
    pub fn may_write(&self) -> bool {
        match (&self.roles, self.term) {
            (None, _) => true,
            (Some(roles), Some(term)) => {
                let now = roles.borrow();
                now.is_leader() && now.term == term
            }
            (Some(_), None) => false,
        }
    }
}

/// What changed since the state was last observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleChange {
    /// Leader from now on, for this term; `first` when it is the first role
    /// this replica takes.
    Leader {
        /// The leadership term.
        term: u64,
        /// Why, as the election says.
        why: String,
        /// No role was held before.
        first: bool,
    },
    /// Follower from now on.
    Follower {
        /// Why, as the election says.
        why: String,
    },
    /// Only the connection to ZooKeeper changed.
    Connection,
}

impl Leadership {
    /// Follows `roles`, or without an election always leads.
    pub fn new(roles: Option<watch::Receiver<RoleState>>) -> Self {
        Leadership { roles, seen: None }
    }

    /// True when this replica may write: the lock is held (or there is no
    /// election).
    pub fn is_leader(&self) -> bool {
        self.roles.as_ref().is_none_or(|r| r.borrow().is_leader())
    }

    /// True while the leadership this replica last acted on lasts: a lost
    /// and regained lock is a new leadership, which starts afresh.
    pub fn still_leading(&self) -> bool {
        self.write_check().may_write()
    }

    /// What a pass asks right before each Modify leaves: whether the
    /// leadership last acted on (the one the pass began in) still lasts.
    pub fn write_check(&self) -> WriteCheck {
        WriteCheck {
            roles: self.roles.clone(),
            term: match self.seen {
                Some((Role::Leader, term, _)) => Some(term),
                _ => None,
            },
        }
    }

    /// The term of the leadership last acted on, for the audit trail;
    /// `None` when this replica runs alone.
    pub fn term(&self) -> Option<u64> {
        self.roles.as_ref().and(self.seen).map(|(_, term, _)| term)
    }

    /// Takes the election's state, marking it seen; `None` when nothing
    /// changed since the last call (or there is no election).
    pub fn observe(&mut self) -> Option<RoleChange> {
        let roles = self.roles.as_mut()?;
        let state = roles.borrow_and_update().clone();
        let seen = (state.role, state.term, state.connected);
        if self.seen == Some(seen) {
            return None;
        }
        let first = self.seen.is_none();
        let role_changed = self
            .seen
            .is_none_or(|(role, term, _)| (role, term) != (state.role, state.term));
        self.seen = Some(seen);
        if !role_changed {
            return Some(RoleChange::Connection);
        }
        Some(match state.role {
            Role::Leader => RoleChange::Leader {
                term: state.term,
                why: state.why,
                first,
            },
            Role::Follower => RoleChange::Follower { why: state.why },
        })
    }

    /// Why ZooKeeper cannot be trusted right now, if it cannot.
    fn disconnected(&self) -> Option<NotReady> {
        let roles = self.roles.as_ref()?;
        let state = roles.borrow();
        (!state.connected).then(|| NotReady::Zookeeper(state.why.clone()))
    }

    /// Whether an election runs.
    fn elected(&self) -> bool {
        self.roles.is_some()
    }

    /// The election's receiver, for waiting on its next change.
    pub fn receiver(&mut self) -> Option<&mut watch::Receiver<RoleState>> {
        self.roles.as_mut()
    }
}

/// The facts readiness is derived from, each set where it is learned.
#[derive(Debug, Default)]
pub struct Health {
    /// Why the placement tree cannot be used (not ready, unreadable).
    pub tree: Option<String>,
    /// Why the tree watcher cannot be trusted.
    pub watcher: Option<String>,
    /// What the daemon waits for before it can work (the directory, the
    /// domain's facts, node mode's tree).
    pub waiting: Option<Waiting>,
    /// Why the last read of every group failed, until one works.
    pub groups_read: Option<DirError>,
    /// A full sync has read every group in this leadership: batches may
    /// plan from the cache.
    pub synced: bool,
    /// That full sync's plan was applied: ready.
    pub applied: bool,
    /// Node mode has started.
    pub node_started: bool,
}

/// Why the daemon is not ready, as `/readyz` and systemd's `STATUS=`
/// show it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NotReady {
    /// The tree watcher cannot be trusted: changes may be missed.
    #[error("tree watcher: {0}")]
    Watcher(String),
    /// The placement tree cannot be used (not ready yet, unreadable).
    #[error("{0}")]
    Tree(String),
    /// Something the daemon needs before it can work is not there yet.
    #[error(transparent)]
    Waiting(#[from] Waiting),
    /// The connection to ZooKeeper is lost: the role may be stale.
    #[error("zookeeper: {0}")]
    Zookeeper(String),
    /// Node mode (without groups) has not started yet.
    #[error("node mode not started yet")]
    NodeNotStarted,
    /// The last read of every group failed; it is tried again.
    #[error("reading the groups: {0}")]
    GroupsRead(DirError),
    /// This replica leads, and its first full sync is not applied yet.
    #[error("leader: initial sync not applied yet")]
    LeaderNotSynced,
    /// The first full sync is not applied yet.
    #[error("initial sync not done")]
    NotSynced,
}

/// What the daemon waits for before it can work; it tries again a little
/// later.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Waiting {
    /// The directory cannot be opened.
    #[error("directory: {0}")]
    Directory(String),
    /// The domain's facts, for credential specs, cannot be had.
    #[error("domain facts: {0}")]
    DomainFacts(DomainFactsError),
    /// This host's placement directory cannot be read, so node mode does
    /// not start (it would terminate every container as no longer
    /// placed).
    #[error(
        "{}/{host}: this host's placements are unknown (its directory can't be read)",
        names::PLACEMENT
    )]
    Placements {
        /// This host.
        host: HostName,
    },
}

/// Why node mode has no domain facts for its credential specs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainFactsError {
    /// The directory could not be read.
    #[error(transparent)]
    Read(#[from] DirError),
    /// What it holds is not a usable SID or GUID.
    #[error(transparent)]
    Invalid(#[from] CredSpecError),
}

/// What `/readyz` says: `Ok` when ready, otherwise the most basic reason
/// first (the watcher, the tree, what the daemon waits for, ZooKeeper,
/// then the first full sync).
pub fn readiness(health: &Health, leadership: &Leadership, groups: bool) -> Result<(), NotReady> {
    if let Some(fault) = &health.watcher {
        return Err(NotReady::Watcher(fault.clone()));
    }
    if let Some(why) = &health.tree {
        return Err(NotReady::Tree(why.clone()));
    }
    if let Some(why) = &health.waiting {
        return Err(NotReady::Waiting(why.clone()));
    }
    if let Some(why) = leadership.disconnected() {
        return Err(why);
    }
    if !groups {
        return if health.node_started {
            Ok(())
        } else {
            Err(NotReady::NodeNotStarted)
        };
    }
    if leadership.elected() && !leadership.is_leader() {
        return Ok(());
    }
    if health.applied {
        return Ok(());
    }
    Err(match (&health.groups_read, leadership.elected()) {
        (Some(err), _) => NotReady::GroupsRead(err.clone()),
        (None, true) => NotReady::LeaderNotSynced,
        (None, false) => NotReady::NotSynced,
    })
}

/// What a change of role does to the daemon.
impl Daemon {
    /// True when this replica may write.
    pub(super) fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    /// True while the leadership this replica last acted on lasts.
    pub(super) fn still_leading(&self) -> bool {
        self.leadership.still_leading()
    }

    /// Acts on a change of role or of the ZooKeeper connection: a new
    /// leadership starts with a full sync; a follower keeps its index warm
    /// and writes nothing; a replica cut off from ZooKeeper is not ready.
    pub(super) fn observe_role(&mut self) {
        let Some(change) = self.leadership.observe() else {
            return;
        };
        if !matches!(change, RoleChange::Connection) {
            // The term the unanswered changes were sent in is over.
            self.give_up_unanswered();
        }
        match change {
            RoleChange::Leader { term, why, first } => {
                self.metrics.set_role(Role::Leader.as_str());
                info!(term, why = %why, "leader: writing from now on, starting with a full sync");
                self.schedule.full_sync_now(Instant::now());
                // A follower followed events only; the startup scan is
                // fresh enough for a replica that leads from the start.
                if !first {
                    self.watching.fresh = false;
                }
                self.health.synced = false;
                self.health.applied = false;
            }
            RoleChange::Follower { why } => {
                self.metrics.set_role(Role::Follower.as_str());
                info!(why = %why, "follower: following the tree, writing nothing");
                self.schedule.stop_writing();
                self.health.synced = false;
                self.health.applied = false;
            }
            RoleChange::Connection => {}
        }
        self.publish_ready();
    }

    /// Shows on `/readyz` the readiness the daemon's state makes.
    pub(super) fn publish_ready(&self) {
        let ready = readiness(&self.health, &self.leadership, self.config.groups);
        self.metrics.set_ready(ready);
    }
}

/// Completes when the role changes; never when there is no election.
pub async fn role_changed(roles: Option<&mut watch::Receiver<RoleState>>) {
    match roles {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(role: Role, term: u64, connected: bool) -> RoleState {
        RoleState {
            role,
            since: std::time::SystemTime::now(),
            term,
            connected,
            why: "test".into(),
        }
    }

    /// The reason `/readyz` would show, as text.
    fn shown(ready: Result<(), NotReady>) -> Result<(), String> {
        ready.map_err(|why| why.to_string())
    }

    #[test]
    fn alone_the_daemon_is_ready_once_the_first_full_sync_applied() {
        let alone = Leadership::new(None);
        let mut health = Health::default();
        assert_eq!(readiness(&health, &alone, true), Err(NotReady::NotSynced));
        assert_eq!(
            shown(readiness(&health, &alone, true)),
            Err("initial sync not done".into())
        );
        health.groups_read = Some(DirError::Result {
            op: crate::directory::Op::Search,
            dn: "OU=Groups,DC=ad,DC=com".into(),
            code: crate::directory::rc::UNAVAILABLE,
            message: "unavailable".into(),
        });
        assert_eq!(
            shown(readiness(&health, &alone, true)),
            Err("reading the groups: search OU=Groups,DC=ad,DC=com: LDAP 52 unavailable: unavailable".into())
        );
        health.synced = true;
        assert!(
            readiness(&health, &alone, true).is_err(),
            "read, not applied"
        );
        health.applied = true;
        assert_eq!(readiness(&health, &alone, true), Ok(()));
        health.waiting = Some(Waiting::Placements {
            host: HostName::new("h1").expect("host"),
        });
        assert_eq!(
            shown(readiness(&health, &alone, true)),
            Err(
                "placement/h1: this host's placements are unknown (its directory can't be read)"
                    .into()
            )
        );
        health.tree = Some("placement tree unusable: gone".into());
        assert_eq!(
            shown(readiness(&health, &alone, true)),
            Err("placement tree unusable: gone".into()),
            "the tree comes before what the daemon waits for"
        );
        health.watcher = Some("the watcher stopped".into());
        assert_eq!(
            shown(readiness(&health, &alone, true)),
            Err("tree watcher: the watcher stopped".into()),
            "a watcher fault comes first"
        );
    }

    #[test]
    fn a_follower_is_ready_and_a_new_leader_is_not_until_it_synced() {
        let (tx, rx) = watch::channel(state(Role::Follower, 0, true));
        let mut l = Leadership::new(Some(rx));
        let health = Health::default();
        assert_eq!(
            l.observe(),
            Some(RoleChange::Follower { why: "test".into() })
        );
        assert_eq!(l.observe(), None, "seen");
        assert_eq!(readiness(&health, &l, true), Ok(()));

        tx.send_replace(state(Role::Leader, 1, true));
        assert!(matches!(
            l.observe(),
            Some(RoleChange::Leader {
                term: 1,
                first: false,
                ..
            })
        ));
        assert!(l.still_leading());
        assert_eq!(
            shown(readiness(&health, &l, true)),
            Err("leader: initial sync not applied yet".into())
        );

        // The session is lost mid-batch: the leadership the batch started
        // in is over, whatever comes next.
        tx.send_replace(state(Role::Leader, 1, false));
        assert!(l.still_leading(), "still the same term until it changes");
        assert_eq!(l.observe(), Some(RoleChange::Connection));
        assert_eq!(
            shown(readiness(&health, &l, true)),
            Err("zookeeper: test".into())
        );
        tx.send_replace(state(Role::Leader, 2, true));
        assert!(!l.still_leading(), "a new term is a new leadership");
    }

    #[test]
    fn what_the_daemon_waits_for_is_shown_with_its_cause() {
        let alone = Leadership::new(None);
        let mut health = Health {
            applied: true,
            ..Health::default()
        };
        health.waiting = Some(Waiting::DomainFacts(DomainFactsError::Invalid(
            CredSpecError::Guid(3),
        )));
        assert_eq!(
            shown(readiness(&health, &alone, true)),
            Err("domain facts: invalid binary GUID: 3 bytes, want 16".into())
        );
        let unreachable = DirError::Unreachable {
            op: crate::directory::Op::Search,
            message: "ldap://dc1: connection refused".into(),
        };
        health.waiting = Some(Waiting::DomainFacts(unreachable.into()));
        assert_eq!(
            shown(readiness(&health, &alone, true)),
            Err("domain facts: search: ldap://dc1: connection refused".into())
        );
        health.waiting = None;
        assert_eq!(readiness(&health, &alone, true), Ok(()));
    }

    #[test]
    fn node_mode_alone_is_ready_once_started() {
        let alone = Leadership::new(None);
        let mut health = Health::default();
        assert_eq!(
            shown(readiness(&health, &alone, false)),
            Err("node mode not started yet".into())
        );
        health.node_started = true;
        assert_eq!(readiness(&health, &alone, false), Ok(()));
    }
}
