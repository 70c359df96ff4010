//! Starting the daemon: what it runs on ([`Parts`]), why it stops with an
//! error ([`DaemonError`]), and the setup before the loop: the metrics
//! listener, the election, the audit log, and the daemon built from the
//! parts given.

use std::sync::Arc;

use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::info;

use super::leadership::Leadership;
use super::Daemon;
use crate::audit::Audit;
use crate::cli::{DirectoryChoice, RunConfig};
use crate::directory::Directory;
use crate::election::{self, Role, RoleState};
use crate::metrics::{self, Metrics};
use crate::tree::watch::Noticed;

/// Why the daemon stopped with an error: each is something the operator
/// must fix before it can run. Everything else is retried.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The audit log cannot be opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The metrics address cannot be listened on.
    #[error("--metrics-addr {addr}: {source}")]
    MetricsAddr {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it cannot be bound.
        source: std::io::Error,
    },
    /// The election cannot start.
    #[error(transparent)]
    Election(#[from] election::ElectionError),
    /// The first tree watcher cannot start (a later one is retried).
    #[error(transparent)]
    Watcher(#[from] crate::tree::watch::WatchError),
    /// Node mode's configuration is unusable.
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
}

/// What the daemon runs on in place of what the configuration opens: a
/// test hands it a directory and the tree's changes; the binary gives
/// none, and the daemon opens the configured directory and watches
/// `--fs-root`.
#[derive(Default)]
pub struct Parts {
    /// The directory the groups live in.
    pub directory: Option<Arc<dyn Directory>>,
    /// The tree's changes, in place of the first watcher (a later one,
    /// after this stream ends, watches `--fs-root`).
    pub changes: Option<mpsc::UnboundedReceiver<Noticed>>,
    /// The role to follow, in place of competing for the lock in
    /// ZooKeeper (ignored when the configuration starts an election).
    pub roles: Option<watch::Receiver<RoleState>>,
    /// Runs on the blocking pool before each node operation (by instance
    /// name), where its file work would; a test makes it block.
    #[cfg(test)]
    pub(crate) before_node_work: Option<NodeHook>,
    /// Runs on the blocking pool after each rescan's scan has read the
    /// tree, before its result is taken; a test makes it block.
    #[cfg(test)]
    pub(crate) after_scan: Option<ScanHook>,
}

/// A test's stand-in for a slow scan.
#[cfg(test)]
pub(crate) type ScanHook = Arc<dyn Fn() + Send + Sync>;

/// A test's stand-in for a node operation's file work.
#[cfg(test)]
pub(crate) type NodeHook = Arc<dyn Fn(&str) + Send + Sync>;

impl Daemon {
    /// Serves the metrics, starts the election and opens the audit log
    /// as configured, and builds the daemon on `parts`.
    pub(super) async fn start(
        config: RunConfig,
        metrics: Arc<Metrics>,
        parts: Parts,
    ) -> Result<Daemon, DaemonError> {
        if let Some(addr) = config.metrics_addr {
            let listener = metrics::bind(addr)
                .await
                .map_err(|source| DaemonError::MetricsAddr { addr, source })?;
            info!(%addr, "serving metrics");
            tokio::spawn(metrics::serve(listener, metrics.clone()));
        }
        let election = match &config.election {
            Some(election) => {
                info!(zookeeper = %election.servers, lock = %election.lock_path, "competing for the writer's lock");
                Some(election::start(election.clone())?)
            }
            None => None,
        };
        let replica = config
            .node
            .as_ref()
            .map(|node| node.hostname.as_str().to_owned());
        let audit = match &config.config.audit_log {
            Some(path) => Audit::open(
                Some(path),
                crate::cli::replica_name(replica.as_deref()),
                match &config.config.directory {
                    DirectoryChoice::LdifFile(directory) => Some(directory.as_path()),
                    DirectoryChoice::Ldap(_) => None,
                },
            )?,
            None => Audit::log_only(),
        }
        .counting_failures(metrics.audit_write_failures.clone());
        let mut daemon = Daemon::new(config, metrics);
        daemon.audit = Arc::new(audit);
        daemon.directory = parts.directory;
        daemon.watching.given = parts.changes;
        #[cfg(test)]
        {
            daemon.containers.before_work = parts.before_node_work;
            daemon.watching.after_scan = parts.after_scan;
        }
        if let Some(election) = election {
            daemon.leadership = Leadership::new(Some(election.subscribe()));
            daemon.election = Some(election);
        } else if let Some(roles) = parts.roles {
            daemon.leadership = Leadership::new(Some(roles));
        } else {
            daemon.metrics.set_role(Role::Leader.as_str());
        }
        Ok(daemon)
    }
}
