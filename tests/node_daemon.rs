//! Node mode with the daemon running: `run --app-root` on a real temp tree,
//! alone and together with group reconciliation against a real slapd and a
//! real Samba AD, in one process. Placements are written the way the mirror
//! writes them (the manifest first, then the placement, both atomically) and
//! everything is judged from the files the daemon leaves under the app root
//! and from the directory as `ldapsearch` sees it.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::node::{binary, manifest, schedule, AppRoot, Daemon};
use support::tree::{eventually, Tree};
use support::{tool, SambaDc, Slapd};

/// This node.
const HOST: &str = "node1.ad.test";
/// Another node of the cell.
const OTHER: &str = "node2.ad.test";

const SID: &str = "S-1-5-21-1004336348-1177238915-682003330";
const GUID: &str = "a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e";

/// A test's tree, app root and the options every daemon of it gets.
struct Setup {
    tree: Tree,
    _tmp: tempfile::TempDir,
    app: AppRoot,
}

impl Setup {
    fn new() -> Setup {
        support::tree::init_logs();
        let tree = Tree::new();
        fs::create_dir(tree.root().join("scheduled")).expect("scheduled/");
        let tmp = tempfile::tempdir().expect("temp dir");
        let app = AppRoot::new(&tmp.path().join("node"));
        Setup {
            tree,
            _tmp: tmp,
            app,
        }
    }

    fn root(&self) -> &Path {
        self.tree.root()
    }

    /// What node mode needs: the tree, the app root, this host, and the
    /// real binary as each container's finish command.
    fn node_args(&self, batch_window: &str) -> Vec<String> {
        vec![
            format!("--fs-root={}", self.root().display()),
            format!("--app-root={}", self.app.path().display()),
            format!("--hostname={HOST}"),
            format!(
                "--finish-command='{}' finish {{container_dir}}",
                binary().display()
            ),
            format!("--batch-window={batch_window}"),
        ]
    }

    /// Schedules and then places an instance on a host.
    fn place(&self, host: &str, instance: &str, manifest: &str) {
        schedule(self.root(), instance, manifest);
        self.tree.place(host, instance);
    }

    /// Waits for an instance's `configured` event number `n` (from 1) and
    /// returns the container its `running/` link then leads to.
    async fn configured(&self, instance: &str, n: usize) -> String {
        let app = &self.app;
        eventually(&format!("{instance} configured ({n})"), || {
            app.events_of(instance, "configured").len() >= n && app.running(instance).is_some()
        })
        .await;
        let unique_name = self.app.running(instance).expect("running link");
        let ids = self.app.events_of(instance, "configured");
        assert_eq!(ids.len(), n, "{instance}: {ids:?}");
        assert_eq!(
            Some(unique_name.as_str()),
            ids.last()
                .map(|id| format!("{}{id}", unique_prefix(instance)))
                .as_deref(),
            "the configured event names the running container's unique id"
        );
        unique_name
    }

    /// Waits until the daemon has terminated `unique_name`.
    async fn terminated(&self, instance: &str, unique_name: &str) {
        let app = &self.app;
        let marker = app.container(unique_name).join("data/terminated");
        eventually(&format!("{instance} terminated"), || {
            app.running(instance).is_none()
                && app.in_cleanup(unique_name).as_deref() == Some(unique_name)
                && marker.is_file()
        })
        .await;
    }
}

/// The fixed domain facts of the node tests without a directory.
fn domain_args() -> Vec<String> {
    vec![
        "--domain-dns-name=ad.test".into(),
        "--domain-dns-tree-name=forest.test".into(),
        "--domain-netbios-name=AD".into(),
        format!("--domain-sid={SID}"),
        format!("--domain-guid={GUID}"),
    ]
}

/// `<app>-<task>-`: what a container's unique name starts with.
fn unique_prefix(instance: &str) -> String {
    format!("{}-", instance.replace('#', "-"))
}

/// The 13-character base62 id at the end of a container's unique name.
fn unique_id<'a>(instance: &str, unique_name: &'a str) -> &'a str {
    let id = unique_name
        .strip_prefix(&unique_prefix(instance))
        .unwrap_or_else(|| panic!("{unique_name} is not a container of {instance}"));
    assert_eq!(id.len(), 13, "{unique_name}");
    assert!(
        id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{unique_name}"
    );
    id
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The credential spec a gMSA proid's container must get.
fn expected_spec(
    proid: &str,
    sid: &str,
    guid: &str,
    dns: &str,
    tree: &str,
    netbios: &str,
) -> serde_json::Value {
    serde_json::json!({
        "CmsPlugins": ["ActiveDirectory"],
        "DomainJoinConfig": {
            "Sid": sid,
            "MachineAccountName": proid,
            "Guid": guid,
            "DnsTreeName": tree,
            "DnsName": dns,
            "NetBiosName": netbios
        },
        "ActiveDirectoryConfig": {
            "GroupManagedServiceAccounts": [
                {"Name": proid, "Scope": dns},
                {"Name": proid, "Scope": netbios}
            ]
        }
    })
}

/// Runs `gmsa-reconciler finish <container_dir>`; returns its stdout.
fn finish(container_dir: &Path) -> String {
    let out = support::run(
        Command::new(binary()).arg("finish").arg(container_dir),
        b"",
        "gmsa-reconciler finish",
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Runs a container's own `finish` script as a supervisor would, with the
/// exit code and signal of its end.
fn finish_script(container_dir: &Path, rc: &str, signal: &str) -> Output {
    support::run(
        Command::new(container_dir.join("finish")).args([rc, signal]),
        b"",
        "the container's finish script",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_mode_alone_configures_terminates_and_reports() {
    let s = Setup::new();
    let app = &s.app;
    // On another host, from before the start and while running: never ours.
    let elsewhere = ["plain.elsewhere#0000000091", "gmsa1.elsewhere#0000000092"];
    s.place(OTHER, elsewhere[0], &manifest("plain", "x"));
    s.tree.mark_ready();
    let mut args = s.node_args("20ms");
    args.push("--gmsa-proids=gmsa*".into());
    args.extend(domain_args());
    let daemon = Daemon::start(&args);
    daemon.ready().await;
    s.place(OTHER, elsewhere[1], &manifest("gmsa1", "x"));

    // A gMSA proid's instance: a complete container, linked, announced.
    let gmsa = "gmsa1.web#0000000001";
    s.place(HOST, gmsa, &manifest("gmsa1", "first"));
    let first = s.configured(gmsa, 1).await;
    let first_id = unique_id(gmsa, &first).to_owned();
    let dir = app.container(&first);
    assert_eq!(
        fs::canonicalize(app.path().join("running").join(gmsa)).expect("link resolves"),
        fs::canonicalize(&dir).expect("container dir")
    );
    for script in ["run", "finish", "log/run"] {
        let text = fs::read_to_string(dir.join(script)).expect(script);
        assert!(text.starts_with("#!/bin/sh\n"), "{script}: {text}");
    }
    assert_eq!(
        fs::read_to_string(dir.join("type")).expect("type"),
        "longrun\n"
    );
    let spec_path = app.credential_spec(&first);
    assert_eq!(
        read_json(&spec_path),
        expected_spec("gmsa1", SID, GUID, "ad.test", "forest.test", "AD")
    );
    let app_json = read_json(&dir.join("data/app.json"));
    assert_eq!(app_json["name"], gmsa);
    assert_eq!(app_json["uniqueid"], first_id.as_str());
    assert_eq!(
        app_json["credential_spec"],
        spec_path.to_str().expect("UTF-8")
    );
    let kept: serde_yaml::Value = serde_yaml::from_str(
        &fs::read_to_string(dir.join("data/manifest.yml")).expect("manifest.yml"),
    )
    .expect("YAML");
    assert_eq!(kept["proid"], serde_yaml::Value::from("gmsa1"));
    assert_eq!(
        kept["environ"][0]["value"],
        serde_yaml::Value::from("first")
    );
    assert_eq!(
        kept["expires"],
        serde_yaml::Value::from(1_900_000_000),
        "the placement's data is kept with the manifest"
    );

    // A proid the glob does not name: no credential spec.
    let plain = "plain.web#0000000002";
    s.place(HOST, plain, &manifest("plain", "x"));
    let plain_name = s.configured(plain, 1).await;
    assert!(!app.credential_spec(&plain_name).exists());
    assert_eq!(
        read_json(&app.container(&plain_name).join("data/app.json"))["credential_spec"],
        serde_json::Value::Null
    );

    // The placement goes: the container moves to cleanup, marked terminated.
    s.tree.unplace(HOST, gmsa);
    s.terminated(gmsa, &first).await;
    assert!(
        !spec_path.exists(),
        "the credential spec goes with the placement"
    );

    // Placed again with a rewritten manifest: a new container.
    s.place(HOST, gmsa, &manifest("gmsa1", "second"));
    let second = s.configured(gmsa, 2).await;
    assert_ne!(unique_id(gmsa, &second), first_id);
    let kept: serde_yaml::Value = serde_yaml::from_str(
        &fs::read_to_string(app.container(&second).join("data/manifest.yml")).expect("read"),
    )
    .expect("YAML");
    assert_eq!(
        kept["environ"][0]["value"],
        serde_yaml::Value::from("second")
    );
    assert!(app.credential_spec(&second).is_file());
    assert_eq!(app.in_cleanup(&first).as_deref(), Some(first.as_str()));

    // Invalid and missing manifests of a gMSA proid: aborted, and nothing
    // made, not even a credential spec.
    let bad = "gmsa1.bad#0000000003";
    let missing = "gmsa1.missing#0000000004";
    let invalid = manifest("gmsa1", "x")
        .replace("cpu: 20%\n", "")
        .replace("environment: dev", "environment: staging");
    s.place(HOST, bad, &invalid);
    s.tree.place(HOST, missing);
    let aborted = |instance: &str| {
        app.events()
            .into_iter()
            .filter(|e| e.instance == instance && e.kind == "aborted")
            .collect::<Vec<_>>()
    };
    eventually("both aborted", || {
        aborted(bad).len() == 1 && aborted(missing).len() == 1
    })
    .await;
    for (instance, says) in [(bad, "missing `cpu`"), (missing, "no such manifest")] {
        let event = &aborted(instance)[0];
        assert_eq!(event.data, "invalid-manifest");
        let why: String = serde_yaml::from_str(&event.content).expect("a YAML string");
        assert!(why.contains(&format!("scheduled/{instance}")), "{why}");
        assert!(why.contains(says), "{why}");
        assert!(app.running(instance).is_none());
        let prefix = unique_prefix(instance);
        assert!(
            !app.names("apps").iter().any(|n| n.starts_with(&prefix)),
            "{:?}",
            app.names("apps")
        );
        assert!(app.events_of(instance, "configured").is_empty());
    }
    assert_eq!(app.names("credential_specs"), [format!("{second}.json")]);
    assert!(
        !fs::read_to_string(s.root().join("scheduled").join(bad))
            .expect("manifest")
            .contains("cpu"),
        "the invalid manifest is still the one scheduled"
    );

    // Each finish marker case, through the real binary.
    let cases = [
        "plain.aborted#0000000011",
        "plain.oom#0000000012",
        "plain.terminated#0000000013",
        "plain.exited#0000000014",
        "plain.none#0000000015",
    ];
    for instance in cases {
        s.place(HOST, instance, &manifest("plain", instance));
    }
    let mut dirs = BTreeMap::new();
    for instance in cases {
        dirs.insert(instance, app.container(&s.configured(instance, 1).await));
    }
    let exitinfo = r#"{"service": "web", "return_code": 9, "signal": 0, "timestamp": 1700000000}"#;
    let data = |instance: &str| dirs[instance].join("data");

    // aborted wins over oom and exitinfo.
    fs::write(
        data(cases[0]).join("aborted"),
        r#"{"why": "bad-volume", "payload": {"volume": "/data"}}"#,
    )
    .expect("aborted");
    fs::write(data(cases[0]).join("oom"), "").expect("oom");
    fs::write(data(cases[0]).join("exitinfo"), exitinfo).expect("exitinfo");
    assert!(finish(&dirs[cases[0]]).starts_with("posted "));
    // oom wins over exitinfo.
    fs::write(data(cases[1]).join("oom"), "").expect("oom");
    fs::write(data(cases[1]).join("exitinfo"), exitinfo).expect("exitinfo");
    assert!(finish(&dirs[cases[1]]).starts_with("posted "));
    // terminated: the supervisor stops the container; its finish script
    // records the exit and runs the binary, which reports nothing.
    let terminated_name = app.running(cases[2]).expect("running");
    s.tree.unplace(HOST, cases[2]);
    s.terminated(cases[2], &terminated_name).await;
    finish_script(&dirs[cases[2]], "256", "15");
    assert!(data(cases[2]).join("exitinfo").is_file());
    // exitinfo alone: finished <rc>.<signal>, through the finish script.
    finish_script(&dirs[cases[3]], "3", "0");
    let recorded = read_json(&data(cases[3]).join("exitinfo"));
    assert_eq!(
        (
            recorded["return_code"].as_i64(),
            recorded["signal"].as_i64()
        ),
        (Some(3), Some(0))
    );
    // No marker: nothing.
    assert_eq!(finish(&dirs[cases[4]]), "no event to post\n");

    let reported = |instance: &str| -> Vec<(String, String)> {
        app.events()
            .into_iter()
            .filter(|e| e.instance == instance && e.kind != "configured")
            .map(|e| (e.kind, e.data))
            .collect()
    };
    let want = |kind: &str, data: &str| vec![(kind.to_owned(), data.to_owned())];
    let check = || {
        assert_eq!(reported(cases[0]), want("aborted", "bad-volume"));
        assert_eq!(reported(cases[1]), want("killed", "oom"));
        assert_eq!(reported(cases[2]), []);
        assert_eq!(reported(cases[3]), want("finished", "3.0"));
        assert_eq!(reported(cases[4]), []);
    };
    check();
    let payload = app
        .events()
        .into_iter()
        .find(|e| e.instance == cases[0] && e.kind == "aborted")
        .expect("aborted event")
        .content;
    let payload: serde_yaml::Value = serde_yaml::from_str(&payload).expect("YAML payload");
    assert_eq!(payload["volume"], serde_yaml::Value::from("/data"));

    // Finish again, by the binary and by the scripts: nothing new.
    let before = app.events();
    for instance in cases {
        assert_eq!(finish(&dirs[instance]), "no event to post\n", "{instance}");
    }
    finish_script(&dirs[cases[3]], "256", "15");
    finish_script(&dirs[cases[2]], "1", "0");
    assert_eq!(app.events(), before);
    check();
    let recorded = read_json(&data(cases[3]).join("exitinfo"));
    assert_eq!(
        recorded["return_code"].as_i64(),
        Some(3),
        "the first exit stays"
    );

    // Nothing was ever done for the other host's placements, though the
    // daemon has handled every later change.
    for instance in elsewhere {
        assert!(app.running(instance).is_none(), "{instance}");
        assert!(
            app.events().iter().all(|e| e.instance != instance),
            "{instance}: {:?}",
            app.events()
        );
    }
    assert!(app.temp_files().is_empty(), "{:?}", app.temp_files());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_settles_what_changed_while_it_was_down() {
    let s = Setup::new();
    let app = &s.app;
    let [kept, removed, added, later] = [
        "plain.kept#0000000001",
        "plain.removed#0000000002",
        "plain.added#0000000003",
        "plain.later#0000000004",
    ];
    s.tree.mark_ready();
    let args = s.node_args("20ms");
    let daemon = Daemon::start(&args);
    daemon.ready().await;
    s.place(HOST, kept, &manifest("plain", "x"));
    s.place(HOST, removed, &manifest("plain", "x"));
    let kept_name = s.configured(kept, 1).await;
    let removed_name = s.configured(removed, 1).await;
    daemon.stop().await;

    // While it is down.
    s.tree.unplace(HOST, removed);
    s.place(HOST, added, &manifest("plain", "x"));

    let daemon = Daemon::start(&args);
    daemon.ready().await;
    s.terminated(removed, &removed_name).await;
    s.configured(added, 1).await;
    // And it follows the tree again.
    s.place(HOST, later, &manifest("plain", "x"));
    s.configured(later, 1).await;

    assert_eq!(app.running(kept).as_deref(), Some(kept_name.as_str()));
    let mut configured: BTreeMap<String, usize> = BTreeMap::new();
    for event in app.events() {
        assert_eq!(event.kind, "configured", "{event:?}");
        *configured.entry(event.instance).or_default() += 1;
    }
    let once: BTreeMap<String, usize> = [kept, removed, added, later]
        .into_iter()
        .map(|i| (i.to_owned(), 1))
        .collect();
    assert_eq!(configured, once, "every instance configured exactly once");
    assert_eq!(app.names("running"), {
        let mut v = vec![added.to_owned(), kept.to_owned(), later.to_owned()];
        v.sort();
        v
    });
    daemon.stop().await;
}

/// notify reports a new directory before it watches it: a placement
/// written into a host directory right after the directory appeared was
/// lost when the directory was listed before the watch was in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_placement_written_as_its_host_directory_appears_is_seen() {
    let s = Setup::new();
    s.tree.mark_ready();
    let daemon = Daemon::start(&s.node_args("20ms"));
    daemon.ready().await;
    for n in 1..=30 {
        let instance = format!("plain.race#{n:010}");
        // The host directory is new each time, its placement written at once.
        s.place(HOST, &instance, &manifest("plain", "x"));
        let unique_name = s.configured(&instance, 1).await;
        s.tree.unplace(HOST, &instance);
        fs::remove_dir(s.tree.host_dir(HOST)).expect("remove the host directory");
        s.terminated(&instance, &unique_name).await;
    }
    daemon.stop().await;
}

#[test]
fn regression_finish_runs_through_the_binary() {
    // `finish` has no --config; looking the option up made clap panic
    // (exit 101) before the command ran.
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = Command::new(binary())
        .arg("finish")
        .arg(tmp.path().join("apps/plain.web-0000000001-0000000000000"))
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("gmsa-reconciler: error: "), "{stderr}");
    // The container needs no app.json, but it does need its data/.
    assert!(
        stderr.contains("plain.web-0000000001-0000000000000/data: no data directory"),
        "{stderr}"
    );
}

#[test]
fn run_without_groups_or_containers_is_a_configuration_error() {
    let tree = Tree::new();
    tree.mark_ready();
    let out = Command::new(binary())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("run")
        .arg(format!("--fs-root={}", tree.root().display()))
        .output()
        .expect("run the binary");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--group-ou") && stderr.contains("--app-root"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

// ---------------------------------------------------------------------------
// Both modes in one process, against slapd

/// The members of a group, as `ldapsearch` reads them.
fn ldap_members(url: &str, group_dn: &str) -> Vec<String> {
    let out = support::run(
        Command::new(tool("ldapsearch")).args([
            "-x",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-H",
            url,
            "-b",
            group_dn,
            "-s",
            "base",
            "member",
        ]),
        b"",
        "ldapsearch the group",
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let mut members: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("member: "))
        .map(str::to_owned)
        .collect();
    members.sort();
    members
}

fn computer(cn: &str) -> String {
    format!("cn={cn},ou=Computers,dc=ad,dc=com")
}

fn slapd_group(name: &str) -> String {
    format!("cn={name},ou=Groups,dc=ad,dc=com")
}

/// Computers for both nodes and empty groups, as LDIF content records.
fn slapd_entries(groups: &[&str]) -> String {
    let mut ldif = String::new();
    for cn in ["node1", "node2"] {
        ldif += &format!(
            "dn: {}\nobjectClass: computer\ncn: {cn}\nsAMAccountName: {}$\n\n",
            computer(cn),
            cn.to_uppercase()
        );
    }
    for name in groups {
        ldif += &format!(
            "dn: {}\nobjectClass: group\ncn: {name}\nsAMAccountName: {name}\n\n",
            slapd_group(name)
        );
    }
    ldif
}

/// Both modes against a slapd, waiting up to `wait` for group membership.
fn both_modes_args(s: &Setup, slapd: &Slapd, password_file: &Path, wait: &str) -> Vec<String> {
    // A window wide enough that configuring before the host is in the
    // group could not go unseen.
    let mut args = s.node_args("300ms");
    args.extend(domain_args());
    args.extend([
        "--group-ou=ou=Groups,dc=ad,dc=com".to_owned(),
        "--no-lock".to_owned(),
        format!("--ldap-url={}", slapd.url()),
        format!("--bind-dn={}", Slapd::SVC_DN),
        format!("--bind-password-file={}", password_file.display()),
        "--timeout=10s".to_owned(),
        "--partition=p1".to_owned(),
        format!("--wait-for-group={wait}"),
        // The server file's nt.dc is a name of no server: the wait reads
        // this slapd instead.
        format!("--check-ldap-url={}", slapd.url()),
    ]);
    args
}

fn password_file(dir: &Path) -> PathBuf {
    let path = dir.join("bind.pw");
    fs::write(&path, Slapd::SVC_PASSWORD).expect("password file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_groups_the_host_joins_the_group_before_the_container_is_configured() {
    let slapd = Slapd::start_with(&[&slapd_entries(&["gmsa1-gmsa-hosts"])]);
    let s = Setup::new();
    let app = &s.app;
    let pw_dir = tempfile::tempdir().expect("temp dir");
    s.tree.server(HOST, "p1", &computer("node1"));
    s.tree.mark_ready();
    let daemon = Daemon::start(&both_modes_args(
        &s,
        &slapd,
        &password_file(pw_dir.path()),
        "20s",
    ));
    daemon.ready().await;
    let group = slapd_group("gmsa1-gmsa-hosts");
    assert_eq!(ldap_members(&slapd.url(), &group), Vec::<String>::new());

    let instance = "gmsa1.web#0000000001";
    s.place(HOST, instance, &manifest("gmsa1", "x"));
    // Membership only ever grows here, so reading the events first and the
    // group second can only find the host missing if `configured` was
    // posted while it was not yet a member.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let configured = !app.events_of(instance, "configured").is_empty();
        let members = ldap_members(&slapd.url(), &group);
        if configured {
            assert_eq!(
                members,
                [computer("node1")],
                "configured was posted before the host was in the group"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not configured in time; members {members:?}, events {:?}",
            app.events()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unique_name = s.configured(instance, 1).await;
    // The group's proid has a gMSA: its container has a credential spec.
    assert_eq!(
        read_json(&app.credential_spec(&unique_name)),
        expected_spec("gmsa1", SID, GUID, "ad.test", "forest.test", "AD")
    );

    // The placement goes: the host leaves the group, the container stops.
    s.tree.unplace(HOST, instance);
    s.terminated(instance, &unique_name).await;
    eventually("the host left the group", || {
        ldap_members(&slapd.url(), &group).is_empty()
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_groups_a_host_never_made_a_member_aborts_its_gmsa_instance() {
    let slapd = Slapd::start_with(&[&slapd_entries(&["gmsa2-gmsa-hosts"])]);
    let s = Setup::new();
    let app = &s.app;
    let pw_dir = tempfile::tempdir().expect("temp dir");
    // This host is in another partition: group reconciliation does not
    // manage it, so nothing will ever put it in the group. The other host
    // is managed.
    s.tree.server(HOST, "p2", &computer("node1"));
    s.tree.server(OTHER, "p1", &computer("node2"));
    s.tree.mark_ready();
    let daemon = Daemon::start(&both_modes_args(
        &s,
        &slapd,
        &password_file(pw_dir.path()),
        "1s",
    ));
    daemon.ready().await;
    let group = slapd_group("gmsa2-gmsa-hosts");

    let instance = "gmsa2.web#0000000001";
    s.place(HOST, instance, &manifest("gmsa2", "x"));
    s.place(OTHER, "gmsa2.web#0000000002", &manifest("gmsa2", "x"));
    // A proid without a group has no gMSA: configured without waiting.
    let plain = "plain.web#0000000003";
    s.place(HOST, plain, &manifest("plain", "x"));

    eventually("the gMSA instance aborted", || {
        !app.events_of(instance, "aborted").is_empty()
    })
    .await;
    let event = app
        .events()
        .into_iter()
        .find(|e| e.instance == instance)
        .expect("event");
    assert_eq!(
        (event.kind.as_str(), event.data.as_str()),
        ("aborted", "gmsa")
    );
    let why: String = serde_yaml::from_str(&event.content).expect("a YAML string");
    assert!(why.contains("gmsa2"), "{why}");
    assert!(app.running(instance).is_none());
    let prefix = unique_prefix(instance);
    assert!(!app.names("apps").iter().any(|n| n.starts_with(&prefix)));
    assert!(app.names("credential_specs").is_empty());

    let plain_name = s.configured(plain, 1).await;
    assert!(!app.credential_spec(&plain_name).exists());
    // The same process did reconcile the group, for the host it manages.
    eventually("the other host joined the group", || {
        ldap_members(&slapd.url(), &group) == [computer("node2")]
    })
    .await;
    assert_eq!(app.events_of(instance, "aborted"), ["gmsa"], "aborted once");
    daemon.stop().await;
}

// ---------------------------------------------------------------------------
// Samba: the domain's facts read from the directory

/// `ldapsearch` as Samba's administrator; the output as text.
fn samba_search(dc: &SambaDc, extra: &[&str]) -> String {
    let mut cmd = Command::new(tool("ldapsearch"));
    cmd.args([
        "-x",
        "-LLL",
        "-o",
        "ldif-wrap=no",
        "-H",
        &dc.url(),
        "-D",
        SambaDc::ADMIN,
        "-y",
    ])
    .arg(dc.admin_password_file())
    .args(extra);
    String::from_utf8(support::run(&mut cmd, b"", "ldapsearch samba").stdout).expect("UTF-8")
}

/// The value of `attr: value` (or base64 `attr:: value`) in ldapsearch
/// output.
fn ldif_value(text: &str, attr: &str) -> String {
    use base64::Engine as _;
    let plain = format!("{attr}: ");
    let encoded = format!("{attr}:: ");
    text.lines()
        .find_map(|l| {
            if let Some(value) = l.strip_prefix(&plain) {
                return Some(value.to_owned());
            }
            let value = l.strip_prefix(&encoded)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value)
                .expect("base64");
            Some(String::from_utf8(bytes).expect("UTF-8 value"))
        })
        .unwrap_or_else(|| panic!("no {attr} in:\n{text}"))
}

/// The domain's SID and GUID as the server itself spells them: the
/// extended-DN control (string form) returns the DN as
/// `<GUID=...>;<SID=...>;DC=ad,DC=test`.
fn samba_domain_ids(dc: &SambaDc) -> (String, String) {
    // 1.2.840.113556.1.4.529 with the value SEQUENCE { INTEGER 1 }.
    let text = samba_search(
        dc,
        &[
            "-E",
            "1.2.840.113556.1.4.529=::MAMCAQE=",
            "-b",
            SambaDc::BASE,
            "-s",
            "base",
            "1.1",
        ],
    );
    let dn = ldif_value(&text, "dn");
    let part = |name: &str| -> String {
        dn.split(';')
            .find_map(|p| p.strip_prefix(&format!("<{name}=")))
            .and_then(|p| p.strip_suffix('>'))
            .unwrap_or_else(|| panic!("no {name} in {dn}"))
            .to_owned()
    };
    (part("SID"), part("GUID"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_samba_the_credential_spec_has_the_domains_own_facts() {
    let dc = SambaDc::shared();
    let ou = format!("OU=NodeDaemon,{}", SambaDc::BASE);
    let host_dn = format!("CN=NODE1,{ou}");
    let group_dn = format!("CN=sgmsa-gmsa-hosts,{ou}");
    dc.ldapmodify(&format!(
        "dn: {ou}\nchangetype: add\nobjectClass: organizationalUnit\n\n\
         dn: {host_dn}\nchangetype: add\nobjectClass: computer\nsAMAccountName: NODE1$\n\n\
         dn: {group_dn}\nchangetype: add\nobjectClass: group\nsAMAccountName: sgmsa-gmsa-hosts\n"
    ));

    // What the directory says, read without the project's code.
    let (sid, guid) = samba_domain_ids(dc);
    assert!(sid.starts_with("S-1-5-21-"), "{sid}");
    let cross_ref = samba_search(
        dc,
        &[
            "-b",
            &format!("CN=Partitions,CN=Configuration,{}", SambaDc::BASE),
            &format!("(&(objectClass=crossRef)(nCName={}))", SambaDc::BASE),
            "nETBIOSName",
            "dnsRoot",
        ],
    );
    let netbios = ldif_value(&cross_ref, "nETBIOSName");
    let dns = ldif_value(&cross_ref, "dnsRoot");
    // As provisioned: realm AD.TEST, domain AD, a forest of one domain.
    assert_eq!((dns.as_str(), netbios.as_str()), ("ad.test", "AD"));

    let s = Setup::new();
    let app = &s.app;
    s.tree.server(HOST, "p1", &host_dn);
    s.tree.mark_ready();
    let mut args = s.node_args("20ms");
    args.extend([
        format!("--group-ou={ou}"),
        "--no-lock".to_owned(),
        format!("--ldap-url={}", dc.url()),
        format!("--bind-dn={}", SambaDc::ADMIN),
        format!(
            "--bind-password-file={}",
            dc.admin_password_file().display()
        ),
        "--timeout=30s".to_owned(),
        "--wait-for-group=60s".to_owned(),
        format!("--check-ldap-url={}", dc.url()),
    ]);
    let daemon = Daemon::start(&args);
    daemon.ready().await;

    let instance = "sgmsa.web#0000000001";
    s.place(HOST, instance, &manifest("sgmsa", "x"));
    let unique_name = s.configured(instance, 1).await;
    let members = samba_search(dc, &["-b", &group_dn, "-s", "base", "member"]);
    assert_eq!(
        ldif_value(&members, "member").to_lowercase(),
        host_dn.to_lowercase()
    );
    assert_eq!(
        read_json(&app.credential_spec(&unique_name)),
        expected_spec("sgmsa", &sid, &guid, &dns, &dns, &netbios)
    );
    daemon.stop().await;
}
