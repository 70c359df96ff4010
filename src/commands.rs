//! The one-shot commands, `plan`, `sync`, `check`, `explain` and `finish`,
//! on top of the tree scan, the index, the plan, a directory backend and
//! (for `finish`) node mode.
//!
//! Each returns the process exit code (the README lists them) or an error that
//! `main` prints on one line and turns into exit code 1. Output goes to the
//! writer given, so tests and the binary share the same path.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tracing::{info, warn};

use crate::audit::{Audit, AuditError};
use crate::cli::{CheckConfig, CheckHost, CliError, Config, DirectoryChoice, ExplainConfig};
use crate::directory::{self, DirError, Directory, OpenError};
use crate::explain::{explain, Facts, Question};
use crate::index::Index;
use crate::model::{escape_controls, Dn, HostName, ModelError};
use crate::node::{self, NodeError};
use crate::output::{NotApplied, Report};
use crate::plan::{guard, plan, Plan, Scope};
use crate::reconcile::{Cause, Pass};
use crate::tree::names::SERVERS;
use crate::tree::scan::{scan, server_of, ScanError};
use crate::tree::{ServerError, Snapshot};

/// Exit code: success (and `plan --exit-code` with no changes, `check` yes).
pub const EXIT_OK: u8 = 0;
/// Exit code: an error, or something not applied.
pub const EXIT_ERROR: u8 = 1;
/// Exit code of `plan --exit-code` when there are changes.
pub const EXIT_CHANGES: u8 = 2;
/// Exit code of `check` when the host is not a member.
pub const EXIT_NOT_MEMBER: u8 = 3;

/// Why a command could not do its work.
#[derive(Debug, Error)]
pub enum CommandError {
    /// A configuration problem.
    #[error(transparent)]
    Config(#[from] CliError),
    /// The tree cannot be trusted; nothing was written.
    #[error("placement tree: {0}; nothing was written")]
    Tree(#[from] ScanError),
    /// The directory failed.
    #[error("directory: {0}")]
    Directory(#[from] DirError),
    /// The directory could not be opened as configured.
    #[error(transparent)]
    Open(OpenError),
    /// The output could not be written.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    /// The daemon stopped on something the operator must fix.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    /// The audit log cannot be opened; nothing was written.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Changes were applied but some of their audit records could not be
    /// written (each is in the log in full).
    #[error(transparent)]
    AuditIncomplete(#[from] crate::audit::WriteFailures),
    /// `finish` was given a directory that is not a container's.
    #[error("{}: not a container directory (<app-root>/apps/<unique name>)", path.display())]
    NotAContainer {
        /// The directory as given.
        path: PathBuf,
    },
    /// `finish` could not read the container's markers or post its event.
    #[error(transparent)]
    Node(#[from] NodeError),
    /// `check`: the proid has no group to be a member of.
    #[error("no group with sAMAccountName {name:?} under {ou}")]
    NoGroup {
        /// The group name the pattern gives for the proid.
        name: String,
        /// Where it was looked for.
        ou: Dn,
    },
    /// `check --self`: this host's server file does not tell what the
    /// check needs.
    #[error("{}: {problem}", path.display())]
    OwnServer {
        /// `<fs-root>/servers/<host>`.
        path: PathBuf,
        /// What it does not tell.
        problem: OwnServerError,
    },
}

/// What this host's server file lacks for `check --self`.
#[derive(Debug, Error)]
pub enum OwnServerError {
    /// The file can't be used at all.
    #[error(transparent)]
    Unusable(#[from] ServerError),
    /// It has no `nt.dn`.
    #[error("no nt.dn: this host's computer DN is unknown")]
    NoDn,
    /// Its `nt.dn` is not a DN.
    #[error("nt.dn: {0}")]
    BadDn(ModelError),
    /// It has no `nt.dc`, and no server to ask was named.
    #[error("no nt.dc: this host's domain controller is unknown (or give --ldap-url)")]
    NoDc,
}

impl From<OpenError> for CommandError {
    fn from(err: OpenError) -> Self {
        match err {
            OpenError::Directory(err) => CommandError::Directory(err),
            other => CommandError::Open(other),
        }
    }
}

/// The tree read and indexed, with the warnings logged.
pub fn load_index(config: &Config) -> Result<Index, CommandError> {
    Ok(index_snapshot(config, read_snapshot(config)?))
}

/// The tree read, with the scan's warnings logged.
fn read_snapshot(config: &Config) -> Result<Snapshot, CommandError> {
    let root = config.require_fs_root()?;
    let snapshot = scan(root)?;
    for warning in &snapshot.warnings {
        warn!("{warning}");
    }
    if let Some(warning) = snapshot.partition_warning(&config.partition) {
        warn!("{warning}");
    }
    Ok(snapshot)
}

/// A scanned tree indexed, with the index's warnings logged.
fn index_snapshot(config: &Config, snapshot: Snapshot) -> Index {
    let (index, warnings) = Index::from_snapshot_with_warnings(config.partition.clone(), snapshot);
    let index = index.with_host_ous(config.host_ous.clone());
    if index.host_ous_suspended() {
        warn!("--host-ou: a server file above can't be used and its host's DN is unknown; members under --host-ou that no server file names are not removed until it can be used");
    }
    for warning in &warnings {
        warn!("{warning}");
    }
    let stats = index.stats();
    info!(
        servers_in_scope = stats.servers_in_scope,
        placements = stats.placements,
        proids = stats.proids,
        "placement tree read"
    );
    index
}

/// Opens the configured directory; `dcs` are the servers' domain controllers
/// (used when no `--ldap-url` is given).
pub fn open_directory(config: &Config, dcs: &[String]) -> Result<Box<dyn Directory>, CommandError> {
    Ok(directory::open(&config.directory, dcs)?)
}

/// `finish`: posts the one event a stopped container's markers call for.
pub fn finish_command(container_dir: &Path, out: &mut dyn Write) -> Result<u8, CommandError> {
    let app_root = node::app_root_of(container_dir).ok_or_else(|| CommandError::NotAContainer {
        path: container_dir.to_path_buf(),
    })?;
    match node::finish(&app_root, container_dir)? {
        Some(event) => writeln!(out, "posted {}", event.file_name())?,
        None => writeln!(out, "no event to post")?,
    }
    Ok(EXIT_OK)
}

struct Prepared {
    directory: Box<dyn Directory>,
    pass: Pass,
}

async fn prepare(config: &Config) -> Result<Prepared, CommandError> {
    let ou = config.require_group_ou()?.clone();
    let (index, directory, groups) = match &config.directory {
        // Servers that come from the tree's nt.dc: the tree first.
        DirectoryChoice::Ldap(choice) if choice.urls.is_empty() => {
            let index = load_index(config)?;
            let directory = open_directory(config, &index.dcs())?;
            let groups = directory.search_groups(&ou).await?;
            (index, directory, groups)
        }
        // A directory that does not depend on the tree (LDAP servers named
        // on the command line, an LDIF file): the tree is read and indexed on
        // a thread of its own while the directory answers the search. At
        // cluster scale each takes about as long as the other, and both come
        // before the first write. The tree's scan is parallel, its indexing
        // is not, and neither is parsing an LDIF file or a server's answer:
        // overlapped, the two cores are busy for most of the way.
        _ => {
            let tree_config = config.clone();
            let tree = tokio::task::spawn_blocking(move || load_index(&tree_config));
            let read = async {
                let directory = open_directory(config, &[])?;
                let groups = directory.search_groups(&ou).await?;
                Ok::<_, CommandError>((directory, groups))
            }
            .await;
            // A tree that can't be read is reported first, as when the reads
            // were one after the other.
            let index = match tree.await {
                Ok(index) => index?,
                Err(join) => panic!("BUG: the tree scan panicked: {join}"),
            };
            let (directory, groups) = read?;
            (index, directory, groups)
        }
    };
    let pass = Pass::prepare(
        Cause::FullSync,
        &index,
        &groups,
        &config.pattern,
        Scope::All,
        &config.guard,
    );
    // Freeing the tree's index and the groups (hundreds of thousands of
    // small allocations at cluster scale) takes a tenth of a second that
    // the first write need not wait for.
    tokio::task::spawn_blocking(move || drop((index, groups)));
    Ok(Prepared { directory, pass })
}

/// The report of a pass as it would be applied: refused deletions set apart.
fn planned_report(verb: &'static str, pass: Pass) -> Report {
    match pass.refused {
        None => Report {
            verb,
            plan: pass.plan,
            ..Report::default()
        },
        Some(refusal) => Report {
            verb,
            refused_changes: refusal.changes,
            plan: pass.plan,
            refused: Some(refusal.reason),
            ..Report::default()
        },
    }
}

/// The audit trail of a command that writes: `--audit-log` opened (named
/// after `hostname`, or this machine) when given.
pub fn open_audit(config: &Config, hostname: Option<&str>) -> Result<Audit, CommandError> {
    let replica = match config.audit_log {
        Some(_) => crate::cli::replica_name(hostname),
        None => String::new(),
    };
    let directory = match &config.directory {
        crate::cli::DirectoryChoice::LdifFile(path) => Some(path.as_path()),
        crate::cli::DirectoryChoice::Ldap(_) => None,
    };
    Ok(Audit::open(
        config.audit_log.as_deref(),
        replica,
        directory,
    )?)
}

/// An error naming the audit log when some of its records could not be
/// written. The report is printed before: the changes are applied, and the
/// operator needs both what was done and that its record is incomplete.
fn audit_written(audit: &Audit) -> Result<(), CommandError> {
    match audit.write_failures() {
        Some(failures) => Err(failures.into()),
        None => Ok(()),
    }
}

/// `plan`: print the changes; with `exit_code`, exit 2 when there are any.
pub async fn plan_command(
    config: &Config,
    exit_code: bool,
    out: &mut dyn Write,
) -> Result<u8, CommandError> {
    let prepared = prepare(config).await?;
    let report = planned_report("plan", prepared.pass);
    out.write_all(report.render(config.format).as_bytes())?;
    Ok(if exit_code && report.has_changes() {
        EXIT_CHANGES
    } else {
        EXIT_OK
    })
}

/// `sync`: apply the plan (or with `dry_run` only print it) and print what
/// was applied. Exit 1 when anything planned was not applied.
pub async fn sync_command(
    config: &Config,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<u8, CommandError> {
    // Opened first: a bad audit log stops the run before anything is written.
    let audit = open_audit(config, None)?;
    let Prepared {
        directory,
        mut pass,
    } = prepare(config).await?;
    let refused = pass.refused.is_some();
    pass.apply(directory.as_ref(), &config.apply, dry_run, &audit)
        .await;
    if dry_run {
        let report = planned_report("sync --dry-run", pass);
        out.write_all(report.render(config.format).as_bytes())?;
        audit_written(&audit)?;
        return Ok(if refused { EXIT_ERROR } else { EXIT_OK });
    }
    let results = std::mem::take(&mut pass.results);
    let planned = planned_report("sync", pass);
    let mut applied = Plan {
        changes: Vec::new(),
        ..planned.plan.clone()
    };
    let mut not_applied = Vec::new();
    for result in results {
        if !result.applied.add.is_empty() || !result.applied.delete.is_empty() {
            applied.changes.push(result.applied);
        }
        if let Some((change, err)) = result.failed {
            not_applied.push(NotApplied {
                change,
                error: err.to_string(),
            });
        }
    }
    let report = Report {
        plan: applied,
        not_applied,
        ..planned
    };
    info!(
        groups = report.plan.changes.len(),
        adds = report.plan.adds(),
        deletes = report.plan.deletes(),
        not_applied = report.not_applied.len(),
        "sync finished"
    );
    out.write_all(report.render(config.format).as_bytes())?;
    audit_written(&audit)?;
    Ok(if refused || !report.not_applied.is_empty() {
        EXIT_ERROR
    } else {
        EXIT_OK
    })
}

/// `check`: exit 0 when the host DN is a member of the proid's group, 3 when not.
///
/// With `--self` the host is this one: its DN and domain controller come
/// from its server file, and without `--ldap-url` the group is read from
/// that controller, because that is where the host asks for the gMSA's
/// password; the writer's controller may know of the membership before
/// replication brings it there.
pub async fn check_command(check: &CheckConfig, out: &mut dyn Write) -> Result<u8, CommandError> {
    let config = &check.config;
    let ou = config.require_group_ou()?;
    let (host_dn, dcs) = match &check.host {
        CheckHost::Dn(dn) => {
            let dcs = match (&config.directory, &config.fs_root) {
                (DirectoryChoice::Ldap(choice), Some(_)) if choice.urls.is_empty() => {
                    load_index(config)?.dcs()
                }
                _ => Vec::new(),
            };
            (dn.clone(), dcs)
        }
        CheckHost::This(host) => {
            let (dn, dc) = own_server(config, host)?;
            (dn, vec![dc])
        }
    };
    let directory = open_directory(config, &dcs)?;
    let name = config.pattern.render(&check.proid);
    let Some(group) = directory.find_group(ou, &name).await? else {
        return Err(CommandError::NoGroup {
            name,
            ou: ou.clone(),
        });
    };
    // The directory's spelling of the group DN is printed escaped: no
    // value from outside adds a line.
    let host = escape_controls(host_dn.as_str());
    let group_dn = escape_controls(group.dn.as_str());
    if group.members.contains(&host_dn) {
        writeln!(out, "{host} is a member of {group_dn}")?;
        Ok(EXIT_OK)
    } else {
        writeln!(out, "{host} is not a member of {group_dn}")?;
        Ok(EXIT_NOT_MEMBER)
    }
}

/// `explain`: why each host that matters to the proid is or is not in its
/// group, judged on the whole tree and directory as `plan` judges them.
pub async fn explain_command(
    explain_config: &ExplainConfig,
    out: &mut dyn Write,
) -> Result<u8, CommandError> {
    let config = &explain_config.config;
    let root = config.require_fs_root()?;
    let ou = config.require_group_ou()?;
    let snapshot = read_snapshot(config)?;
    let index = index_snapshot(config, snapshot.clone());
    let directory = open_directory(config, &index.dcs())?;
    let groups = directory.search_groups(ou).await?;
    let plan = plan(&index, &groups, &config.pattern, Scope::All);
    let refused = guard(&plan, &config.guard);
    let question = Question {
        proid: &explain_config.proid,
        host: explain_config.host.as_ref(),
    };
    let facts = Facts {
        root,
        snapshot: &snapshot,
        index: &index,
        groups: &groups,
        pattern: &config.pattern,
        partition: &config.partition,
        plan: &plan,
        refused: refused.as_deref(),
    };
    let answer = explain(&question, &facts);
    out.write_all(answer.render(config.format).as_bytes())?;
    Ok(EXIT_OK)
}

/// This host's computer DN and domain controller (lower-cased), from
/// `servers/<host>`, read the one way tree files are read. Errors name the
/// file and what is wrong with it.
fn own_server(config: &Config, host: &HostName) -> Result<(Dn, String), CommandError> {
    let root = config.require_fs_root()?;
    let bad = |problem: OwnServerError| CommandError::OwnServer {
        path: root.join(SERVERS).join(host.as_str()),
        problem,
    };
    let info = server_of(root, host).map_err(|why| bad(why.into()))?;
    let dn = match info.dn.as_deref().map(str::trim) {
        Some(dn) if !dn.is_empty() => Dn::parse(dn).map_err(|e| bad(OwnServerError::BadDn(e)))?,
        _ => return Err(bad(OwnServerError::NoDn)),
    };
    let dc = info.dc.as_deref().map(str::trim).unwrap_or_default();
    let named =
        matches!(&config.directory, DirectoryChoice::Ldap(choice) if !choice.urls.is_empty());
    if dc.is_empty() && !named && !matches!(config.directory, DirectoryChoice::LdifFile(_)) {
        return Err(bad(OwnServerError::NoDc));
    }
    Ok((dn, dc.to_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each error says what went wrong and names the file or group it is
    /// about, in the words the commands used before they were typed.
    #[test]
    fn command_errors_name_what_went_wrong() {
        let path = PathBuf::from("/cell/servers/h1");
        let own = |problem| CommandError::OwnServer {
            path: path.clone(),
            problem,
        };
        let cases = [
            (
                own(OwnServerError::NoDn),
                "/cell/servers/h1: no nt.dn: this host's computer DN is unknown",
            ),
            (
                own(OwnServerError::NoDc),
                "/cell/servers/h1: no nt.dc: this host's domain controller is unknown (or give --ldap-url)",
            ),
            (
                own(ServerError::Missing.into()),
                "/cell/servers/h1: does not exist",
            ),
            (
                own(OwnServerError::BadDn(
                    Dn::parse("CN=a,,DC=b").expect_err("not a DN"),
                )),
                "/cell/servers/h1: nt.dn: invalid DN",
            ),
            (
                CommandError::NotAContainer {
                    path: PathBuf::from("/srv/apps"),
                },
                "/srv/apps: not a container directory (<app-root>/apps/<unique name>)",
            ),
            (
                CommandError::NoGroup {
                    name: "proid1-gmsa-hosts".to_owned(),
                    ou: Dn::parse("OU=Groups,DC=ad,DC=com").expect("DN"),
                },
                "no group with sAMAccountName \"proid1-gmsa-hosts\" under OU=Groups,DC=ad,DC=com",
            ),
        ];
        for (err, text) in cases {
            let shown = err.to_string();
            assert!(shown.starts_with(text), "{shown:?} is not {text:?}");
        }
    }
}
