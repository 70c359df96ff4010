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
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

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
    /// It could not be started or waited for.
    Error(String),
    /// The node is stopping; it was killed.
    Stopped,
}

impl HookOutcome {
    /// The `outcome` label of `gmsa_join_hook_runs_total`.
    pub fn label(&self) -> &'static str {
        match self {
            HookOutcome::Success => "success",
            HookOutcome::Failure(_) => "failure",
            HookOutcome::Timeout => "timeout",
            HookOutcome::Error(_) => "error",
            HookOutcome::Stopped => "stopped",
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
                format!("the join command for {proid} could not be run: {why}")
            }
            HookOutcome::Stopped => {
                format!("the join command for {proid} was killed: the node is stopping")
            }
        }
    }
}

/// Runs the join command for one proid: `/bin/sh -c <command> gmsa-join-hook
/// <proid> <group> <hostname>`, with `GMSA_PROID`, `GMSA_GROUP` and
/// `GMSA_HOSTNAME` set and the bind password's variable removed from its
/// environment. Its output is logged (the first [`OUTPUT_KEPT`] bytes of
/// each stream), never put in events or metrics.
///
/// The command runs in its own process group, and the whole run is
/// bounded by `timeout`: when `sh` exits, the group is killed (a command
/// must leave nothing running) and its output is read only as far as it
/// was written; at the deadline, or when `stopping` turns true (the node
/// is shutting down), the group is killed and reading stops. A process
/// that left the group (`setsid`) is not waited for, even if it holds
/// the output open.
pub(super) async fn run(
    template: &Template,
    proid: &Proid,
    group: &str,
    hostname: &str,
    timeout: Duration,
    mut stopping: watch::Receiver<bool>,
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
    // Its own process group, so that what it started can be killed with it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => return HookOutcome::Error(err.to_string()),
    };
    let streams = (
        child.stdout.take().map(OwnedFd::from).map(Output::new),
        child.stderr.take().map(OwnedFd::from).map(Output::new),
    );
    let (mut out, mut err) = match streams {
        (Some(Ok(out)), Some(Ok(err))) => (out, err),
        (Some(Err(e)), _) | (_, Some(Err(e))) => {
            let _ = end_group(&mut child);
            return HookOutcome::Error(format!("reading its output: {e}"));
        }
        _ => {
            let _ = end_group(&mut child);
            return HookOutcome::Error("its output could not be read".to_owned());
        }
    };
    let pid = child.id();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut poll = tokio::time::interval(EXIT_POLL);
    let end = loop {
        tokio::select! {
            () = out.read_some(), if out.open => {}
            () = err.read_some(), if err.open => {}
            _ = poll.tick() => match has_exited(pid) {
                Ok(true) => break End::Exited,
                Ok(false) => {}
                Err(e) => break End::Error(e.to_string()),
            },
            () = tokio::time::sleep_until(deadline) => break End::Timeout,
            Ok(_) = stopping.wait_for(|stopping| *stopping) => break End::Stopped,
        }
    };
    // `sh` is still unreaped here (exited or not), so its pid is still the
    // group's id: killing the group cannot reach anyone else's processes.
    let status = end_group(&mut child);
    out.drain_written();
    err.drain_written();
    let outcome = match (end, status) {
        (End::Exited, Ok(status)) if status.success() => HookOutcome::Success,
        (End::Exited, Ok(status)) => HookOutcome::Failure(status.to_string()),
        (End::Exited, Err(e)) => HookOutcome::Error(e.to_string()),
        (End::Error(e), _) => HookOutcome::Error(e),
        (End::Timeout, _) => HookOutcome::Timeout,
        (End::Stopped, _) => HookOutcome::Stopped,
    };
    let (out, err) = (out.text(), err.text());
    let out = crate::model::escape_controls(out.trim_end());
    let err = crate::model::escape_controls(err.trim_end());
    if outcome == HookOutcome::Success {
        tracing::info!(%proid, group, stdout = %out, stderr = %err, "join command succeeded");
    } else {
        tracing::warn!(%proid, group, outcome = outcome.label(), stdout = %out, stderr = %err, "{}", outcome.describe(proid));
    }
    outcome
}

/// How often the command is looked at to see whether `sh` has exited.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// Why the wait for the command ended.
enum End {
    /// `sh` exited.
    Exited,
    /// The deadline passed.
    Timeout,
    /// The node is stopping.
    Stopped,
    /// `sh` could not be waited for.
    Error(String),
}

/// Whether the child has exited, without reaping it (so that its pid, the
/// id of its process group, stays taken until the group is killed).
fn has_exited(pid: u32) -> std::io::Result<bool> {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid(2).
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(2) on our own child, writing only into `info`.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (si_pid is 0 when nothing has exited).
    Ok(unsafe { info.si_pid() } != 0)
}

/// Kills the child's process group (the child leads it) and reaps the child.
fn end_group(child: &mut Child) -> std::io::Result<std::process::ExitStatus> {
    // SAFETY: kill(2) of the process group this child leads; the child is
    // not reaped yet, so the group id is still its own.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
    }
    child.wait()
}

/// One output stream of the command, read without blocking: keeps its
/// start, discards the rest (so the command never blocks on a full pipe).
struct Output {
    fd: AsyncFd<std::fs::File>,
    kept: Vec<u8>,
    open: bool,
}

impl Output {
    fn new(fd: OwnedFd) -> std::io::Result<Output> {
        // SAFETY: fcntl(2) on a descriptor this value owns.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Output {
            // SAFETY: the File owns its descriptor and is only ever
            // reached through the AsyncFd, which owns the File.
            fd: unsafe { AsyncFd::register(std::fs::File::from(fd))? },
            kept: Vec::new(),
            open: true,
        })
    }

    /// Waits for output and takes it (or notes the end of the stream).
    async fn read_some(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            let mut ready = match self.fd.readable().await {
                Ok(ready) => ready,
                Err(_) => {
                    self.open = false;
                    return;
                }
            };
            match ready.try_io(|fd| fd.get_ref().read(&mut buf)) {
                Ok(read) => return self.took(read, &buf),
                Err(_would_block) => continue,
            }
        }
    }

    /// Takes what has already been written, without waiting for more.
    fn drain_written(&mut self) {
        let mut buf = [0u8; 4096];
        // Bounded: a process outside the group may still be writing.
        for _ in 0..32 {
            if !self.open {
                return;
            }
            match self.fd.get_ref().read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                read => self.took(read, &buf),
            }
        }
    }

    fn took(&mut self, read: std::io::Result<usize>, buf: &[u8]) {
        match read {
            Ok(0) | Err(_) => self.open = false,
            Ok(n) => {
                let room = (OUTPUT_KEPT as usize).saturating_sub(self.kept.len());
                self.kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> Template {
        Template::parse(text, JOIN_PLACEHOLDERS).expect("valid")
    }

    /// A node that never stops.
    fn never() -> watch::Receiver<bool> {
        watch::channel(false).1
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
        let outcome = run(
            &template(&text),
            &proid(),
            group,
            "h1",
            JOIN_HOOK_TIMEOUT,
            never(),
        )
        .await;
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
            never(),
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
            never(),
        )
        .await;
        assert_eq!(outcome, HookOutcome::Timeout);
    }

    #[tokio::test]
    async fn a_child_left_behind_is_not_waited_for() {
        // It would hold the output open for 1000 s.
        let outcome = run(
            &template("sleep 1000 & echo started"),
            &proid(),
            "g",
            "h",
            JOIN_HOOK_TIMEOUT,
            never(),
        )
        .await;
        assert_eq!(outcome, HookOutcome::Success);
    }

    #[tokio::test]
    async fn a_command_running_when_the_node_stops_is_killed() {
        let (stop, stopping) = watch::channel(false);
        let (command, proid) = (template("sleep 1000"), proid());
        let (outcome, ()) = tokio::join!(
            run(&command, &proid, "g", "h", JOIN_HOOK_TIMEOUT, stopping),
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                stop.send_replace(true);
            }
        );
        assert_eq!(outcome, HookOutcome::Stopped);
    }
}
