//! The join hook (`--on-join-command`) through the binary: `run` in node
//! mode and group reconciliation in one process against a real slapd, which
//! holds the group membership (the reconciler writes it, the node's wait
//! reads it from this host's `nt.dc`, here the same slapd). Each hook
//! appends a line with its arguments and what it saw to a marker file, so
//! the test can count the runs and tell whether they came before the
//! containers were configured.

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::daemon::{http_get, metric_sum};
use support::node::{binary, manifest, schedule, AppRoot, NodeProcess};
use support::tree::Tree;
use support::{free_port, tool, wait_until, Slapd};

/// This node.
const HOST: &str = "node1.ad.test";
const SID: &str = "S-1-5-21-1004336348-1177238915-682003330";
const GUID: &str = "a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e";
const LIMIT: Duration = Duration::from_secs(40);

fn computer(cn: &str) -> String {
    format!("cn={cn},ou=Computers,dc=ad,dc=com")
}

fn group_dn(name: &str) -> String {
    format!("cn={name},ou=Groups,dc=ad,dc=com")
}

/// This host's computer and one group, with the given members.
fn entries(group: &str, members: &[String]) -> String {
    let mut ldif = format!(
        "dn: {}\nobjectClass: computer\ncn: node1\nsAMAccountName: NODE1$\n\n\
         dn: {}\nobjectClass: group\ncn: {group}\nsAMAccountName: {group}\n",
        computer("node1"),
        group_dn(group)
    );
    for member in members {
        ldif += &format!("member: {member}\n");
    }
    ldif
}

/// The members of a group, as `ldapsearch` reads them.
fn members(slapd: &Slapd, group: &str) -> Vec<String> {
    let out = support::run(
        Command::new(tool("ldapsearch")).args([
            "-x",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-H",
            &slapd.url(),
            "-b",
            &group_dn(group),
            "-s",
            "base",
            "member",
        ]),
        b"",
        "ldapsearch the group",
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    text.lines()
        .filter_map(|l| l.strip_prefix("member: "))
        .map(str::to_owned)
        .collect()
}

/// A tree, an app root, a marker file and the daemon's options.
struct Setup {
    tree: Tree,
    tmp: tempfile::TempDir,
    app: AppRoot,
    metrics_port: u16,
}

impl Setup {
    /// This host's server file names the slapd as its domain controller.
    fn new(slapd: &Slapd) -> Setup {
        support::tree::init_logs();
        let tree = Tree::new();
        fs::create_dir(tree.root().join("scheduled")).expect("scheduled/");
        let dc = slapd
            .url()
            .strip_prefix("ldap://")
            .expect("an ldap:// URL")
            .to_owned();
        tree.server_raw(
            HOST,
            &format!("partition: p1\nnt.dc: {dc}\nnt.dn: {}\n", computer("node1")),
        );
        let tmp = tempfile::tempdir().expect("temp dir");
        let app = AppRoot::new(&tmp.path().join("node"));
        fs::write(tmp.path().join("bind.pw"), Slapd::SVC_PASSWORD).expect("password file");
        Setup {
            tree,
            tmp,
            app,
            metrics_port: free_port(),
        }
    }

    fn marker(&self) -> PathBuf {
        self.tmp.path().join("joins")
    }

    /// The lines the hook wrote, one per run.
    fn runs(&self) -> Vec<String> {
        match fs::read_to_string(self.marker()) {
            Ok(text) => text.lines().map(str::to_owned).collect(),
            Err(_) => Vec::new(),
        }
    }

    fn place(&self, instance: &str, proid: &str) {
        schedule(self.tree.root(), instance, &manifest(proid, "x"));
        self.tree.place(HOST, instance);
    }

    /// A hook that appends its three arguments, its environment's group
    /// and how many containers were running when it ran; then `tail`.
    fn hook(&self, tail: &str) -> String {
        format!(
            "printf '%s %s %s %s running=%s\\n' {{proid}} {{group}} {{hostname}} \"$GMSA_GROUP\" \
             \"$(ls '{}' | wc -l | tr -d ' ')\" >> '{}'; {tail}",
            self.app.path().join("running").display(),
            self.marker().display()
        )
    }

    fn start(&self, slapd: &Slapd, extra: &[String]) -> NodeProcess {
        NodeProcess::start(
            self.tree.root(),
            self.app.path(),
            HOST,
            &self.args(slapd, extra),
        )
    }

    /// `run`'s options after `--fs-root`, `--app-root` and `--hostname`.
    fn args(&self, slapd: &Slapd, extra: &[String]) -> Vec<String> {
        self.tree.mark_ready();
        let mut args = vec![
            format!(
                "--finish-command='{}' finish {{container_dir}}",
                binary().display()
            ),
            "--batch-window=50ms".to_owned(),
            "--domain-dns-name=ad.test".to_owned(),
            "--domain-netbios-name=AD".to_owned(),
            format!("--domain-sid={SID}"),
            format!("--domain-guid={GUID}"),
            "--group-ou=ou=Groups,dc=ad,dc=com".to_owned(),
            "--no-lock".to_owned(),
            format!("--ldap-url={}", slapd.url()),
            format!("--bind-dn={}", Slapd::SVC_DN),
            format!(
                "--bind-password-file={}",
                self.tmp.path().join("bind.pw").display()
            ),
            "--timeout=10s".to_owned(),
            "--partition=p1".to_owned(),
            "--wait-for-group=30s".to_owned(),
            format!("--metrics-addr=127.0.0.1:{}", self.metrics_port),
        ];
        args.extend(extra.iter().cloned());
        args
    }

    /// `gmsa_join_hook_runs_total{outcome="<outcome>"}` as served.
    fn hook_runs(&self, outcome: &str) -> f64 {
        let (status, text) = http_get(self.metrics_port, "/metrics");
        assert_eq!(status, 200, "{text}");
        let line = format!("gmsa_join_hook_runs_total{{outcome=\"{outcome}\"}}");
        metric_sum(&text, &line)
    }

    fn wait_configured(&self, instance: &str) {
        wait_until(&format!("{instance} configured"), LIMIT, || {
            !self.app.events_of(instance, "configured").is_empty()
                && self.app.running(instance).is_some()
        });
    }
}

fn expected_line(proid: &str, running: usize) -> String {
    let group = format!("{proid}-gmsa-hosts");
    format!("{proid} {group} {HOST} {group} running={running}")
}

#[test]
fn the_hook_runs_once_per_join_with_its_arguments_before_the_containers() {
    let slapd = Slapd::start_with(&[&entries("gmsa1-gmsa-hosts", &[])]);
    let s = Setup::new(&slapd);
    let node = s.start(&slapd, &[format!("--on-join-command={}", s.hook("true"))]);
    node.wait_for_log("node mode: reconciling containers with placements");

    // Two instances of one proid placed together: one join, one run.
    let (a, b) = ("gmsa1.web#0000000001", "gmsa1.web#0000000002");
    s.place(a, "gmsa1");
    s.place(b, "gmsa1");
    s.wait_configured(a);
    s.wait_configured(b);
    // The hook ran before either container was configured.
    assert_eq!(s.runs(), [expected_line("gmsa1", 0)], "{}", node.stderr());
    assert_eq!(members(&slapd, "gmsa1-gmsa-hosts"), [computer("node1")]);
    assert_eq!(s.hook_runs("success"), 1.0);

    // Both leave: the host leaves the group. A new instance is a new join.
    s.tree.unplace(HOST, a);
    s.tree.unplace(HOST, b);
    wait_until("the host left the group", LIMIT, || {
        members(&slapd, "gmsa1-gmsa-hosts").is_empty() && s.app.names("running").is_empty()
    });
    let c = "gmsa1.web#0000000003";
    s.place(c, "gmsa1");
    s.wait_configured(c);
    assert_eq!(
        s.runs(),
        [expected_line("gmsa1", 0), expected_line("gmsa1", 0)],
        "{}",
        node.stderr()
    );
    assert_eq!(s.hook_runs("success"), 2.0);
    // A proid without a group has no gMSA: no wait, no hook.
    let plain = "plain.web#0000000004";
    s.place(plain, "plain");
    s.wait_configured(plain);
    assert_eq!(s.runs().len(), 2);
    let stderr = node.stop();
    assert!(
        stderr.contains("running the join command"),
        "the run is logged: {stderr}"
    );
}

#[test]
fn a_failing_hook_aborts_the_instances_of_that_join() {
    let slapd = Slapd::start_with(&[&entries("gmsa2-gmsa-hosts", &[])]);
    let s = Setup::new(&slapd);
    let node = s.start(
        &slapd,
        &[format!(
            "--on-join-command={}",
            s.hook("echo 'kinit: no keytab' >&2; exit 7")
        )],
    );
    node.wait_for_log("node mode: reconciling containers with placements");
    let (a, b) = ("gmsa2.web#0000000001", "gmsa2.web#0000000002");
    s.place(a, "gmsa2");
    s.place(b, "gmsa2");
    for instance in [a, b] {
        wait_until(&format!("{instance} aborted"), LIMIT, || {
            !s.app.events_of(instance, "aborted").is_empty()
        });
        assert_eq!(s.app.events_of(instance, "aborted"), ["join-hook"]);
        assert!(s.app.running(instance).is_none());
        assert!(s.app.events_of(instance, "configured").is_empty());
    }
    let event = s
        .app
        .events()
        .into_iter()
        .find(|e| e.instance == a && e.kind == "aborted")
        .expect("the aborted event");
    let why: String = serde_yaml::from_str(&event.content).expect("a YAML string");
    assert!(why.contains("gmsa2") && why.contains('7'), "{why}");
    // One run for the one join, though two instances waited for it.
    assert_eq!(s.runs(), [expected_line("gmsa2", 0)]);
    assert_eq!(s.hook_runs("failure"), 1.0);
    assert_eq!(s.hook_runs("success"), 0.0);
    assert!(s.app.names("apps").is_empty(), "{:?}", s.app.names("apps"));
    let stderr = node.stop();
    assert!(
        stderr.contains("kinit: no keytab"),
        "the hook's output is logged: {stderr}"
    );
}

/// The host is in the group, with an instance placed, before the daemon
/// starts; `extra` are more options.
fn already_in_the_group(extra: &[String]) -> (Setup, Vec<String>, String) {
    let slapd = Slapd::start_with(&[&entries("gmsa3-gmsa-hosts", &[computer("node1")])]);
    let s = Setup::new(&slapd);
    let instance = "gmsa3.web#0000000001";
    s.place(instance, "gmsa3");
    let mut args = vec![format!("--on-join-command={}", s.hook("true"))];
    args.extend(extra.iter().cloned());
    let node = s.start(&slapd, &args);
    s.wait_configured(instance);
    // A second instance of the same proid, later: still no join.
    let later = "gmsa3.web#0000000002";
    s.place(later, "gmsa3");
    s.wait_configured(later);
    let runs = s.runs();
    let stderr = node.stop();
    assert_eq!(members(&slapd, "gmsa3-gmsa-hosts"), [computer("node1")]);
    (s, runs, stderr)
}

#[test]
fn a_host_already_in_the_group_at_startup_runs_no_hook() {
    let (s, runs, stderr) = already_in_the_group(&[]);
    assert_eq!(runs, Vec::<String>::new(), "{stderr}");
    assert!(!s.marker().exists());
    assert!(
        stderr.contains("in the group when the node started"),
        "{stderr}"
    );
}

#[test]
fn on_join_at_startup_runs_the_hook_for_groups_held_at_startup() {
    let (_s, runs, stderr) = already_in_the_group(&["--on-join-at-startup".to_owned()]);
    assert_eq!(runs, [expected_line("gmsa3", 0)], "{stderr}");
}

#[test]
fn the_join_options_are_checked() {
    let tree = Tree::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let run = |extra: &[&str]| {
        let out = Command::new(binary())
            .arg("run")
            .arg(format!("--fs-root={}", tree.root().display()))
            .arg(format!("--app-root={}", tmp.path().join("node").display()))
            .arg(format!("--hostname={HOST}"))
            .args([
                "--directory=/nonexistent.ldif",
                "--group-ou=ou=Groups,dc=ad,dc=com",
            ])
            .arg("--no-lock")
            .args(extra)
            .output()
            .expect("run the binary");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--on-join-command=true"]);
    assert!(
        err.contains("--on-join-command") && err.contains("--wait-for-group"),
        "{err}"
    );
    let err = run(&["--on-join-at-startup"]);
    assert!(err.contains("--on-join-at-startup"), "{err}");
    let err = run(&["--wait-for-group=1s", "--on-join-command=kinit {nope}"]);
    assert!(err.contains("{nope}") && err.contains("{proid}"), "{err}");
}

#[test]
fn join_commands_that_cannot_work_as_written_are_refused() {
    let tree = Tree::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let run = |command: &str| {
        let out = Command::new(binary())
            .arg("run")
            .arg(format!("--fs-root={}", tree.root().display()))
            .arg(format!("--app-root={}", tmp.path().join("node").display()))
            .arg(format!("--hostname={HOST}"))
            .args([
                "--directory=/nonexistent.ldif",
                "--group-ou=ou=Groups,dc=ad,dc=com",
                "--no-lock",
                "--wait-for-group=1s",
            ])
            .arg(format!("--on-join-command={command}"))
            .output()
            .expect("run the binary");
        assert_eq!(out.status.code(), Some(1), "{command:?}: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A placeholder in single quotes would reach the shell as the literal
    // "$1" in quotes: refused, saying why.
    let err = run("kinit -k 'host/{hostname}'");
    assert!(
        err.contains("single quotes") && err.contains("{hostname}"),
        "{err}"
    );
    // Nothing to run.
    let err = run(" \t ");
    assert!(err.contains("empty command"), "{err}");
    // The shell's own braces: the hint says how to write them.
    let err = run("echo ${HOME}");
    assert!(err.contains("${{HOME}}"), "{err}");
}

#[test]
fn a_placeholder_in_double_quotes_stays_one_word() {
    // The command splits words at "m", as a hostile IFS would: the proid
    // in quotes must still be one word.
    let slapd = Slapd::start_with(&[&entries("gmsa9-gmsa-hosts", &[])]);
    let s = Setup::new(&slapd);
    let hook = format!(
        "IFS=m; printf '<%s>' \"[{{proid}}]\" {{group}} >> '{}'",
        s.marker().display()
    );
    let node = s.start(&slapd, &[format!("--on-join-command={hook}")]);
    node.wait_for_log("node mode: reconciling containers with placements");
    let instance = "gmsa9.web#0000000001";
    s.place(instance, "gmsa9");
    s.wait_configured(instance);
    let stderr = node.stop();
    assert_eq!(s.runs(), ["<[gmsa9]><gmsa9-gmsa-hosts>"], "{stderr}");
}

#[test]
fn the_hook_never_sees_the_bind_password() {
    let slapd = Slapd::start_with(&[&entries("gmsa4-gmsa-hosts", &[])]);
    let s = Setup::new(&slapd);
    let hook = format!(
        "printf 'password=%s\\n' \"${{{{GMSA_BIND_PASSWORD-unset}}}}\" >> '{}'",
        s.marker().display()
    );
    // The daemon binds with the password from its environment, not a file.
    let args: Vec<String> = s
        .args(&slapd, &[format!("--on-join-command={hook}")])
        .into_iter()
        .filter(|a| !a.starts_with("--bind-password-file="))
        .collect();
    let logs = tempfile::tempdir().expect("temp dir");
    let mut child = support::e2e::bin()
        .arg("run")
        .arg(format!("--fs-root={}", s.tree.root().display()))
        .arg(format!("--app-root={}", s.app.path().display()))
        .arg(format!("--hostname={HOST}"))
        .args(&args)
        .env("GMSA_BIND_PASSWORD", Slapd::SVC_PASSWORD)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(logs.path().join("stderr")).expect("stderr"))
        .spawn()
        .expect("start the daemon");
    let instance = "gmsa4.web#0000000001";
    s.place(instance, "gmsa4");
    let configured =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.wait_configured(instance)));
    let _ = child.kill();
    let _ = child.wait();
    let stderr = fs::read_to_string(logs.path().join("stderr")).unwrap_or_default();
    assert!(configured.is_ok(), "not configured: {stderr}");
    // The bind worked (the reconciler wrote the membership with it) ...
    assert_eq!(members(&slapd, "gmsa4-gmsa-hosts"), [computer("node1")]);
    // ... and the hook ran without it.
    assert_eq!(s.runs(), ["password=unset"], "{stderr}");
    assert!(!stderr.contains(Slapd::SVC_PASSWORD), "{stderr}");
}

#[test]
fn a_host_added_by_the_reconcilers_startup_sync_has_joined() {
    // Placed while the daemon was down, not yet a member: the full sync of
    // the same process adds the host as it starts. That is a join, even
    // if the node's first check comes after the write.
    let slapd = Slapd::start_with(&[&entries("gmsa5-gmsa-hosts", &[])]);
    let s = Setup::new(&slapd);
    let instance = "gmsa5.web#0000000001";
    s.place(instance, "gmsa5");
    let node = s.start(&slapd, &[format!("--on-join-command={}", s.hook("true"))]);
    s.wait_configured(instance);
    assert_eq!(s.runs(), [expected_line("gmsa5", 0)], "{}", node.stderr());
    assert_eq!(members(&slapd, "gmsa5-gmsa-hosts"), [computer("node1")]);
    node.stop();
}

/// Whether a process is still running (a zombie is not: it has ended and
/// only waits to be reaped).
fn alive(pid: &str) -> bool {
    match fs::read_to_string(format!("/proc/{}/stat", pid.trim())) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The pid a hook wrote into `path`, once it is there.
fn pid_in(path: &std::path::Path) -> String {
    wait_until(&format!("a pid in {}", path.display()), LIMIT, || {
        fs::read_to_string(path).is_ok_and(|t| t.ends_with('\n'))
    });
    fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .to_owned()
}

/// Kills a process the test made, if it is still there.
fn kill(pid: &str) {
    if let Ok(pid) = pid.parse::<libc::pid_t>() {
        // SAFETY: kill(2) of a process this test started (through the hook).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

#[test]
fn a_hook_that_leaves_processes_behind_holds_nothing() {
    // One child stays in the hook's process group, one leaves it with
    // setsid; both hold the hook's output open and would run for long.
    let slapd = Slapd::start_with(&[&entries("gmsa6-gmsa-hosts", &[])]);
    let s = Setup::new(&slapd);
    let (in_group, escaped) = (s.tmp.path().join("in-group"), s.tmp.path().join("escaped"));
    let tail = format!(
        "sleep 1000 & echo $! > '{}'; setsid sh -c 'echo $$ > \"$0\"; exec sleep 1000' '{}' & echo done",
        in_group.display(),
        escaped.display()
    );
    let node = s.start(&slapd, &[format!("--on-join-command={}", s.hook(&tail))]);
    node.wait_for_log("node mode: reconciling containers with placements");
    let instance = "gmsa6.web#0000000001";
    s.place(instance, "gmsa6");
    let (in_group, escaped) = (pid_in(&in_group), pid_in(&escaped));
    let configured =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.wait_configured(instance)));
    let left = alive(&in_group);
    kill(&in_group);
    kill(&escaped);
    let successes = s.hook_runs("success");
    let stderr = node.stop();
    assert!(configured.is_ok(), "held by the hook's children: {stderr}");
    assert!(!left, "the hook's process group outlived its sh: {stderr}");
    assert_eq!(s.runs(), [expected_line("gmsa6", 0)], "{stderr}");
    assert_eq!(successes, 1.0, "{stderr}");
}

#[test]
fn a_shutdown_during_the_hook_kills_it_and_configures_nothing() {
    let slapd = Slapd::start_with(&[&entries("gmsa7-gmsa-hosts", &[])]);
    let s = Setup::new(&slapd);
    let (sh, child) = (s.tmp.path().join("sh"), s.tmp.path().join("child"));
    let tail = format!(
        "echo $$ > '{}'; sleep 1000 & echo $! > '{}'; wait",
        sh.display(),
        child.display()
    );
    let node = s.start(&slapd, &[format!("--on-join-command={}", s.hook(&tail))]);
    node.wait_for_log("node mode: reconciling containers with placements");
    let instance = "gmsa7.web#0000000001";
    s.place(instance, "gmsa7");
    let (sh, child) = (pid_in(&sh), pid_in(&child));
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.stop()));
    let left = [alive(&sh), alive(&child)];
    kill(&sh);
    kill(&child);
    let stderr = stopped.expect("SIGTERM during the hook exits 0, soon");
    assert_eq!(
        left,
        [false, false],
        "the hook outlived the daemon: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        s.app.events_of(instance, "configured").is_empty() && s.app.running(instance).is_none(),
        "configured while stopping: {stderr}"
    );
    assert!(s.app.events_of(instance, "aborted").is_empty(), "{stderr}");
}

#[test]
fn a_placement_removed_during_the_hook_is_not_configured() {
    let slapd = Slapd::start_with(&[&entries("gmsa8-gmsa-hosts", &[])]);
    let s = Setup::new(&slapd);
    let (started, release) = (s.tmp.path().join("started"), s.tmp.path().join("release"));
    let tail = format!(
        "touch '{}'; while [ ! -e '{}' ]; do sleep 0.05; done",
        started.display(),
        release.display()
    );
    let node = s.start(&slapd, &[format!("--on-join-command={}", s.hook(&tail))]);
    node.wait_for_log("node mode: reconciling containers with placements");
    let instance = "gmsa8.web#0000000001";
    s.place(instance, "gmsa8");
    wait_until("the hook started", LIMIT, || started.exists());
    s.tree.unplace(HOST, instance);
    // The reconciler has seen the removal (the daemon hands it to the node
    // as it does): the host left the group.
    wait_until("the host left the group", LIMIT, || {
        members(&slapd, "gmsa8-gmsa-hosts").is_empty()
    });
    fs::write(&release, "").expect("release the hook");
    node.wait_for_log("done=NoLongerPlaced");
    let stderr = node.stop();
    assert!(
        s.app.events_of(instance, "configured").is_empty() && s.app.names("running").is_empty(),
        "configured though no longer placed: {stderr}"
    );
    assert!(s.app.names("apps").is_empty(), "{:?}", s.app.names("apps"));
}
