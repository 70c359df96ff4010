//! The join hook (`--on-join-command`): a command run once each time this
//! host is seen to join a proid's group, before that proid's instances are
//! configured.
//!
//! Why it exists: a Kerberos ticket-granting ticket carries, in its PAC,
//! the groups the host had when the ticket was issued. A host that has
//! just joined a gMSA's group gets nothing from the group until it renews
//! its tickets (`klist -li 0x3e7 purge` on Windows, `kinit -k` with the
//! host keytab on Linux); the hook is where the operator does that.
//!
//! What counts as a join is decided here, from what the node has seen of
//! the membership (the `Joins` record): a proid whose group the host was
//! seen outside of (a check said "not a member", or the host has had no
//! instance of it since the node started or since its last one left)
//! joins when a check says "member". Membership found for the proids
//! placed on the host when the node starts, read before anything else
//! runs (so before this process's own reconciler can add the host), is
//! taken as already there, unless the operator asks otherwise
//! (`--on-join-at-startup`).
//!
//! The command is the operator's text; the proid, the group and the host
//! name reach it only as positional parameters (`{proid}` is written as
//! `"$1"`) and in the environment, never pasted into the shell text.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::model::Proid;

use super::script::Template;

/// The placeholders a join command may use, in the order of the shell's
/// positional parameters.
pub const JOIN_PLACEHOLDERS: &[&str] = &["proid", "group", "hostname"];

/// How long a join command may run before it is killed (and counts as
/// failed): a hung `kinit` must not hold a proid's instances for ever.
pub const JOIN_HOOK_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the start-up look at this host's groups may take in all.
pub const STARTUP_CHECK_LIMIT: Duration = Duration::from_secs(30);

/// How much of a command's output is kept for the log, per stream.
const OUTPUT_KEPT: u64 = 2048;

/// The join hook as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinHook {
    /// The command template (placeholders: [`JOIN_PLACEHOLDERS`]), run by
    /// `/bin/sh -c`.
    pub command: String,
    /// Also run it for groups the host is found in when the node starts.
    pub at_startup: bool,
}

/// What the node has seen of this host's membership in one proid's group.
#[derive(Debug, Clone, Default)]
pub(super) struct Join {
    /// The join was handled (hook run successfully, or membership found
    /// at start-up): more instances of the proid need nothing.
    pub in_group: bool,
    /// Runs of the hook for this proid so far.
    pub runs: u64,
    /// Why the last run failed, if it did.
    pub failure: Option<String>,
}

/// The membership record of every proid, kept in the node's state.
#[derive(Debug, Default)]
pub(super) struct Joins {
    /// Per proid.
    pub groups: BTreeMap<Proid, Join>,
    /// Proids placed on the host when the node started whose membership
    /// could not be read then: a first "member" for them is not a join.
    pub at_startup: std::collections::BTreeSet<Proid>,
    /// The start-up look at the groups was taken.
    pub startup_noted: bool,
}

impl Joins {
    /// A check said the host is not in the proid's group: the next
    /// "member" is a join.
    pub fn saw_not_member(&mut self, proid: &Proid) {
        self.at_startup.remove(proid);
        if let Some(join) = self.groups.get_mut(proid) {
            join.in_group = false;
        }
    }

    /// The host's last instance of the proid left: it is expected to leave
    /// the group, so coming back is a join.
    pub fn left(&mut self, proid: &Proid) {
        self.at_startup.remove(proid);
        if let Some(join) = self.groups.get_mut(proid) {
            join.in_group = false;
            join.failure = None;
        }
    }
}

/// How one run of the join command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    /// Exit status 0.
    Success,
    /// Another exit status, or killed by a signal: its description.
    Failure(String),
    /// Still running after [`JOIN_HOOK_TIMEOUT`]; it was killed.
    Timeout,
    /// It could not be started.
    Error(String),
}

impl HookOutcome {
    /// The `outcome` label of `gmsa_join_hook_runs_total`.
    pub fn label(&self) -> &'static str {
        match self {
            HookOutcome::Success => "success",
            HookOutcome::Failure(_) => "failure",
            HookOutcome::Timeout => "timeout",
            HookOutcome::Error(_) => "error",
        }
    }

    /// For the log and the `aborted` event.
    pub fn describe(&self, proid: &Proid) -> String {
        match self {
            HookOutcome::Success => format!("the join command for {proid} succeeded"),
            HookOutcome::Failure(status) => {
                format!("the join command for {proid} failed: {status}")
            }
            HookOutcome::Timeout => format!(
                "the join command for {proid} did not finish within {}s and was killed",
                JOIN_HOOK_TIMEOUT.as_secs()
            ),
            HookOutcome::Error(why) => {
                format!("the join command for {proid} could not be started: {why}")
            }
        }
    }
}

/// Runs the join command for one proid: `/bin/sh -c <command> gmsa-join-hook
/// <proid> <group> <hostname>`, with `GMSA_PROID`, `GMSA_GROUP` and
/// `GMSA_HOSTNAME` set and the bind password's variable removed from its
/// environment. Its output is logged (the first [`OUTPUT_KEPT`] bytes of
/// each stream), never put in events or metrics.
pub(super) async fn run(
    template: &Template,
    proid: &Proid,
    group: &str,
    hostname: &str,
    timeout: Duration,
) -> HookOutcome {
    let command = template.render_positional(JOIN_PLACEHOLDERS);
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&command)
        .arg("gmsa-join-hook")
        .args([proid.as_str(), group, hostname])
        .env("GMSA_PROID", proid.as_str())
        .env("GMSA_GROUP", group)
        .env("GMSA_HOSTNAME", hostname)
        .env_remove(crate::cli::PASSWORD_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group, so that a timeout kills what it started too.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => return HookOutcome::Error(err.to_string()),
    };
    let stdout = child.stdout.take().map(keep_start);
    let stderr = child.stderr.take().map(keep_start);
    let deadline = tokio::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if tokio::time::Instant::now() >= deadline => break None,
            Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(err) => return HookOutcome::Error(err.to_string()),
        }
    };
    if status.is_none() {
        // SAFETY: kill(2) of the process group this child leads.
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = child.wait();
    }
    let out = stdout
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let err = stderr
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let outcome = match status {
        None => HookOutcome::Timeout,
        Some(status) if status.success() => HookOutcome::Success,
        Some(status) => HookOutcome::Failure(status.to_string()),
    };
    let out = crate::model::escape_controls(out.trim_end());
    let err = crate::model::escape_controls(err.trim_end());
    if outcome == HookOutcome::Success {
        tracing::info!(%proid, group, stdout = %out, stderr = %err, "join command succeeded");
    } else {
        tracing::warn!(%proid, group, outcome = outcome.label(), stdout = %out, stderr = %err, "{}", outcome.describe(proid));
    }
    outcome
}

/// Reads a child's stream on a thread: keeps its start, drains the rest
/// (so the child never blocks on a full pipe).
fn keep_start(mut stream: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let _ = (&mut stream).take(OUTPUT_KEPT).read_to_end(&mut kept);
        let _ = std::io::copy(&mut stream, &mut std::io::sink());
        String::from_utf8_lossy(&kept).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> Template {
        Template::parse(text, JOIN_PLACEHOLDERS).expect("valid")
    }

    fn proid() -> Proid {
        Proid::new("proid1").expect("valid")
    }

    #[tokio::test]
    async fn values_reach_the_command_as_arguments_and_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out");
        let text = format!(
            "printf '%s|%s|%s|%s' {{proid}} {{group}} {{hostname}} \"$GMSA_GROUP\" > '{}'",
            out.display()
        );
        let group = "it's $(a) `group`";
        let outcome = run(&template(&text), &proid(), group, "h1", JOIN_HOOK_TIMEOUT).await;
        assert_eq!(outcome, HookOutcome::Success);
        assert_eq!(
            std::fs::read_to_string(&out).expect("read"),
            format!("proid1|{group}|h1|{group}")
        );
    }

    #[tokio::test]
    async fn a_failing_command_is_a_failure_with_its_status() {
        let outcome = run(
            &template("echo no >&2; exit 3"),
            &proid(),
            "g",
            "h",
            JOIN_HOOK_TIMEOUT,
        )
        .await;
        assert!(
            matches!(&outcome, HookOutcome::Failure(status) if status.contains('3')),
            "{outcome:?}"
        );
        assert_eq!(outcome.label(), "failure");
    }

    #[tokio::test]
    async fn a_command_that_hangs_is_killed_at_the_timeout() {
        let outcome = run(
            &template("sleep 1000"),
            &proid(),
            "g",
            "h",
            Duration::from_millis(200),
        )
        .await;
        assert_eq!(outcome, HookOutcome::Timeout);
    }
}
