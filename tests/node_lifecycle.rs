//! Node mode on real temporary trees: configure, re-placement, terminate,
//! finish, credential specs, waiting for group membership, start-up after
//! time down, and cleanup, through the library's public API.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use gmsa_reconciler::model::{HostName, Proid};
use gmsa_reconciler::node::events::parse_file_name;
use gmsa_reconciler::node::{
    Added, CheckError, DomainInfo, EventKind, GmsaProids, MembershipCheck, Node, NodeConfig,
    Removed,
};

const HOST: &str = "host1.ad.test";

const MANIFEST: &str = "\
proid: proid1
environment: dev
cpu: 20%
memory: 256M
disk: 1G
services:
  - name: web
    command: exec sleep 1000
environ:
  - {name: GREETING, value: \"it's here\"}
";

struct Env {
    _tmp: tempfile::TempDir,
    fs_root: PathBuf,
    app_root: PathBuf,
    config: NodeConfig,
}

/// One posted event: (type, instance, data, content), in posting order.
type Posted = (EventKind, String, String, String);

impl Env {
    fn new(tune: impl FnOnce(&mut NodeConfig)) -> Env {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fs_root = tmp.path().join("cell");
        let app_root = tmp.path().join("node");
        fs::create_dir_all(fs_root.join("scheduled")).expect("mkdir");
        fs::create_dir_all(fs_root.join("placement").join(HOST)).expect("mkdir");
        let host = HostName::new(HOST).expect("host name");
        let mut config = NodeConfig::new(&fs_root, host, &app_root);
        config.gmsa_proids = GmsaProids::None;
        config.finish_command = "true {container_dir}".into();
        tune(&mut config);
        Env {
            _tmp: tmp,
            fs_root,
            app_root,
            config,
        }
    }

    fn node(&self) -> Node {
        Node::new(self.config.clone(), None).expect("node")
    }

    fn node_with(&self, check: Arc<dyn MembershipCheck>) -> Node {
        Node::new(self.config.clone(), Some(check)).expect("node")
    }

    /// Writes a manifest as the mirror does: a temp file renamed over the target.
    fn schedule(&self, instance: &str, manifest: &str) {
        let tmp = self.fs_root.join("scheduled").join(".tmp-manifest");
        fs::write(&tmp, manifest).expect("write manifest");
        fs::rename(&tmp, self.fs_root.join("scheduled").join(instance)).expect("rename");
    }

    fn place(&self, instance: &str) {
        let path = self.fs_root.join("placement").join(HOST).join(instance);
        fs::write(path, r#"{"expires": 1900000000, "identity": 3}"#).expect("write placement");
    }

    fn unplace(&self, instance: &str) {
        let path = self.fs_root.join("placement").join(HOST).join(instance);
        fs::remove_file(path).expect("remove placement");
    }

    fn dir(&self, sub: &str) -> PathBuf {
        self.app_root.join(sub)
    }

    fn names(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = match fs::read_dir(self.dir(sub)) {
            Ok(entries) => entries
                .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    fn events(&self) -> Vec<Posted> {
        let dir = self.dir("appevents");
        let mut events: Vec<(SystemTime, Posted)> = self
            .names("appevents")
            .into_iter()
            .map(|name| {
                let (time, instance, kind, data) = parse_file_name(&name)
                    .unwrap_or_else(|| panic!("{name:?} is not an event file name"));
                let content = fs::read_to_string(dir.join(&name)).expect("read event");
                (time, (kind, instance, data, content))
            })
            .collect();
        events.sort_by_key(|e| e.0);
        events.into_iter().map(|(_, e)| e).collect()
    }

    fn events_of(&self, instance: &str, kind: EventKind) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e.1 == instance && e.0 == kind)
            .map(|e| e.2)
            .collect()
    }

    /// The container directory `running/<instance>` leads to.
    fn running(&self, instance: &str) -> Option<PathBuf> {
        let link = self.dir("running").join(instance);
        fs::read_link(&link).ok()?;
        Some(fs::canonicalize(link).expect("running link resolves"))
    }
}

fn configured(added: Added) -> (String, PathBuf) {
    match added {
        Added::Configured {
            unique_name,
            container_dir,
            ..
        } => (unique_name, container_dir),
        other => panic!("expected Configured, got {other:?}"),
    }
}

fn domain() -> DomainInfo {
    DomainInfo {
        dns_name: "ad.test".into(),
        netbios_name: "AD".into(),
        sid: "S-1-5-21-1004336348-1177238915-682003330".into(),
        guid: "a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e".into(),
        dns_tree_name: "ad.test".into(),
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// Files anywhere below `dir` whose name starts with `.` and ends `.tmp`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let entry = entry.expect("entry");
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            found.push(path.clone());
        }
        if entry.file_type().expect("type").is_dir() {
            found.extend(temp_files(&path));
        }
    }
    found
}

#[tokio::test]
async fn configure_makes_a_complete_container_once() {
    let env = Env::new(|_| {});
    let node = env.node();
    let instance = "proid1.web#0000000042";
    env.schedule(instance, MANIFEST);
    env.place(instance);

    let (unique_name, dir) = configured(node.placement_added(instance).await.expect("configure"));
    let unique_id = unique_name
        .strip_prefix("proid1.web-0000000042-")
        .expect("unique name is the instance with # as - and the id");
    assert_eq!(unique_id.len(), 13);
    assert!(
        unique_id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{unique_id}"
    );
    assert_eq!(dir, env.dir("apps").join(&unique_name));
    assert_eq!(
        env.running(instance),
        Some(fs::canonicalize(&dir).expect("dir"))
    );

    assert_eq!(
        fs::read_to_string(dir.join("type")).expect("type"),
        "longrun\n"
    );
    for script in ["run", "finish", "log/run"] {
        let path = dir.join(script);
        assert_eq!(mode(&path), 0o755, "{script}");
        assert!(fs::read_to_string(&path)
            .expect("script")
            .starts_with("#!/bin/sh\n"));
    }

    let manifest: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(dir.join("data/manifest.yml")).expect("read"))
            .expect("yaml");
    assert_eq!(manifest["proid"], serde_yaml::Value::from("proid1"));
    assert_eq!(manifest["expires"], serde_yaml::Value::from(1_900_000_000));
    assert_eq!(manifest["identity"], serde_yaml::Value::from(3));

    let app: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("data/app.json")).expect("read"))
            .expect("json");
    assert_eq!(app["name"], instance);
    assert_eq!(app["app"], "proid1.web");
    assert_eq!(app["task"], "0000000042");
    assert_eq!(app["uniqueid"], unique_id);
    assert_eq!(app["environment"], "dev");
    assert_eq!(
        app["services"],
        serde_json::json!([{"name": "web", "command": "exec sleep 1000"}])
    );
    assert_eq!(app["endpoints"], serde_json::json!([]));
    assert_eq!(
        app["ephemeral_ports"],
        serde_json::json!({"tcp": 0, "udp": 0})
    );
    assert_eq!(app["credential_spec"], serde_json::Value::Null);

    assert_eq!(
        env.events(),
        [(
            EventKind::Configured,
            instance.to_owned(),
            unique_id.to_owned(),
            String::new()
        )]
    );

    // Again, from the same node and from a fresh one: nothing new.
    for node in [node.clone(), env.node()] {
        assert_eq!(
            node.placement_added(instance).await.expect("again"),
            Added::AlreadyConfigured {
                unique_name: unique_name.clone()
            }
        );
    }
    assert_eq!(env.names("apps"), [unique_name]);
    assert_eq!(env.events().len(), 1);
    assert!(
        temp_files(&env.app_root).is_empty(),
        "{:?}",
        temp_files(&env.app_root)
    );
}

#[tokio::test]
async fn a_re_placed_instance_gets_a_new_unique_id() {
    let env = Env::new(|_| {});
    let node = env.node();
    let instance = "proid1.web#0000000007";
    env.schedule(instance, MANIFEST);
    env.place(instance);
    let (first, _) = configured(node.placement_added(instance).await.expect("configure"));
    node.placement_removed(instance).await.expect("terminate");

    // The mirror rewrites the manifest for the new placement.
    env.schedule(instance, MANIFEST);
    let (second, _) = configured(node.placement_added(instance).await.expect("configure"));
    assert_ne!(first, second);
    node.placement_removed(instance).await.expect("terminate");

    // Even with the very same manifest file, a new placement is a new container.
    let (third, _) = configured(node.placement_added(instance).await.expect("configure"));
    assert!(
        third != first && third != second,
        "{first} {second} {third}"
    );

    let ids = env.events_of(instance, EventKind::Configured);
    assert_eq!(ids.len(), 3);
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3, "{ids:?}");
    assert_eq!(env.names("cleanup"), {
        let mut v = vec![first, second];
        v.sort();
        v
    });
}

#[tokio::test]
async fn terminate_moves_the_container_to_cleanup() {
    let env = Env::new(|c| {
        c.gmsa_proids = GmsaProids::Glob(glob::Pattern::new("proid1").expect("glob"));
        c.domain = Some(domain());
    });
    let node = env.node();
    let instance = "proid1.web#0000000001";
    env.schedule(instance, MANIFEST);
    env.place(instance);
    let (unique_name, dir) = configured(node.placement_added(instance).await.expect("configure"));
    let spec = env
        .config
        .credential_spec_dir
        .join(format!("{unique_name}.json"));
    assert!(spec.is_file());

    env.unplace(instance);
    assert_eq!(
        node.placement_removed(instance).await.expect("terminate"),
        Removed::Terminated {
            unique_name: unique_name.clone()
        }
    );
    assert!(env.names("running").is_empty());
    assert_eq!(env.names("cleanup"), std::slice::from_ref(&unique_name));
    assert_eq!(
        fs::canonicalize(env.dir("cleanup").join(&unique_name)).expect("cleanup link"),
        fs::canonicalize(&dir).expect("dir")
    );
    assert!(dir.join("data/terminated").is_file());
    assert!(
        !spec.exists(),
        "the credential spec goes with the placement"
    );

    assert_eq!(
        node.placement_removed(instance).await.expect("again"),
        Removed::NotRunning
    );
    assert_eq!(
        env.node()
            .placement_removed("proid1.other#0000000001")
            .await
            .expect("never placed"),
        Removed::NotRunning
    );
}

#[tokio::test]
async fn an_invalid_or_missing_manifest_aborts_and_makes_nothing() {
    let env = Env::new(|c| {
        c.gmsa_proids = GmsaProids::Glob(glob::Pattern::new("*").expect("glob"));
        c.domain = Some(domain());
    });
    let node = env.node();
    let bad = "proid1.web#0000000001";
    env.schedule(
        bad,
        &MANIFEST.replace("cpu: 20%\n", "").replace("dev", "staging"),
    );
    env.place(bad);
    assert_eq!(
        node.placement_added(bad).await.expect("abort"),
        Added::Aborted {
            why: "invalid-manifest".into()
        }
    );
    let missing = "proid1.web#0000000002";
    env.place(missing);
    assert_eq!(
        node.placement_added(missing).await.expect("abort"),
        Added::Aborted {
            why: "invalid-manifest".into()
        }
    );

    let events = env.events();
    assert_eq!(events.len(), 2, "{events:?}");
    for (kind, _, data, _) in &events {
        assert_eq!(
            (kind, data.as_str()),
            (&EventKind::Aborted, "invalid-manifest")
        );
    }
    let content = |instance: &str| -> String {
        let event = events.iter().find(|e| e.1 == instance).expect("event");
        serde_yaml::from_str(&event.3).expect("payload is a YAML string")
    };
    let why = content(bad);
    assert!(why.contains("scheduled/proid1.web#0000000001"), "{why}");
    assert!(
        why.contains("missing `cpu`") && why.contains("\"staging\""),
        "{why}"
    );
    assert!(
        content(missing).contains("no such manifest"),
        "{}",
        content(missing)
    );

    for sub in ["apps", "running", "cleanup", "credential_specs"] {
        assert!(env.names(sub).is_empty(), "{sub}: {:?}", env.names(sub));
    }
    assert!(temp_files(&env.app_root).is_empty());

    // Told again during the same placement: nothing new.
    assert_eq!(
        node.placement_added(bad).await.expect("again"),
        Added::AlreadyDone
    );
    assert_eq!(env.events().len(), 2);

    // A new placement with a fixed manifest runs.
    node.placement_removed(bad).await.expect("remove");
    env.schedule(bad, MANIFEST);
    configured(node.placement_added(bad).await.expect("configure"));
}

#[tokio::test]
async fn bad_instance_names_are_refused() {
    let env = Env::new(|_| {});
    let node = env.node();
    for bad in ["noproid#1", "proid1.web", "proid1.a,b#1", ".proid1.web#1"] {
        assert!(node.placement_added(bad).await.is_err(), "{bad}");
    }
    assert!(env.events().is_empty());
}

#[tokio::test]
async fn credential_spec_for_gmsa_proids_only() {
    let env = Env::new(|c| {
        c.gmsa_proids = GmsaProids::Glob(glob::Pattern::new("proid1").expect("glob"));
        c.domain = Some(domain());
        c.run_command =
            Some("exec runtime --credentialspec file://{credential_spec} --name {instance} {container_dir}".into());
    });
    let node = env.node();
    let gmsa = "proid1.web#0000000001";
    let plain = "proid2.web#0000000001";
    env.schedule(gmsa, MANIFEST);
    env.schedule(plain, &MANIFEST.replace("proid1", "proid2"));
    env.place(gmsa);
    env.place(plain);
    let (unique_name, dir) = configured(node.placement_added(gmsa).await.expect("configure"));
    let (plain_name, plain_dir) = configured(node.placement_added(plain).await.expect("configure"));

    let spec_path = env
        .config
        .credential_spec_dir
        .join(format!("{unique_name}.json"));
    let spec: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&spec_path).expect("spec")).expect("json");
    assert_eq!(
        spec,
        serde_json::json!({
            "CmsPlugins": ["ActiveDirectory"],
            "DomainJoinConfig": {
                "Sid": "S-1-5-21-1004336348-1177238915-682003330",
                "MachineAccountName": "proid1",
                "Guid": "a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e",
                "DnsTreeName": "ad.test",
                "DnsName": "ad.test",
                "NetBiosName": "AD"
            },
            "ActiveDirectoryConfig": {
                "GroupManagedServiceAccounts": [
                    {"Name": "proid1", "Scope": "ad.test"},
                    {"Name": "proid1", "Scope": "AD"}
                ]
            }
        })
    );
    let app: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("data/app.json")).expect("read"))
            .expect("json");
    assert_eq!(app["credential_spec"], spec_path.to_str().expect("utf-8"));
    let run = fs::read_to_string(dir.join("run")).expect("run");
    let want = format!(
        "exec runtime --credentialspec file://'{}' --name 'proid1.web#0000000001' '{}'\n",
        spec_path.display(),
        dir.display()
    );
    assert!(run.ends_with(&want), "{run}");

    assert!(!env
        .config
        .credential_spec_dir
        .join(format!("{plain_name}.json"))
        .exists());
    let run = fs::read_to_string(plain_dir.join("run")).expect("run");
    assert!(run.contains("--credentialspec file://'' "), "{run}");
    assert_eq!(
        env.names("credential_specs"),
        [format!("{unique_name}.json")]
    );
}

/// A directory double: answers per proid, counts the questions, and turns
/// "yes" after a given number of "no"s.
struct FakeDirectory {
    groups: BTreeSet<String>,
    noes_before_member: usize,
    asked: AtomicUsize,
}

#[async_trait]
impl MembershipCheck for FakeDirectory {
    async fn group_exists(&self, proid: &Proid) -> Result<bool, CheckError> {
        Ok(self.groups.contains(proid.as_str()))
    }
    async fn is_member(&self, proid: &Proid) -> Result<bool, CheckError> {
        assert!(
            self.groups.contains(proid.as_str()),
            "asked about {proid}, which has no group"
        );
        let n = self.asked.fetch_add(1, Ordering::SeqCst);
        Ok(n >= self.noes_before_member)
    }
}

fn fake(noes: usize) -> Arc<FakeDirectory> {
    Arc::new(FakeDirectory {
        groups: BTreeSet::from(["proid1".to_owned()]),
        noes_before_member: noes,
        asked: AtomicUsize::new(0),
    })
}

fn waiting_env() -> Env {
    Env::new(|c| {
        c.gmsa_proids = GmsaProids::GroupExists;
        c.domain = Some(domain());
        c.wait_for_group = Some(Duration::from_secs(300));
    })
}

#[tokio::test(start_paused = true)]
async fn wait_for_group_then_configure() {
    let env = waiting_env();
    let check = fake(3);
    let node = env.node_with(check.clone());
    let instance = "proid1.web#0000000001";
    env.schedule(instance, MANIFEST);
    env.place(instance);
    let (unique_name, _) = configured(node.placement_added(instance).await.expect("configure"));
    assert_eq!(check.asked.load(Ordering::SeqCst), 4);
    assert!(env
        .config
        .credential_spec_dir
        .join(format!("{unique_name}.json"))
        .is_file());

    // A proid without a group has no gMSA: no waiting, no spec.
    let other = "proid2.web#0000000001";
    env.schedule(other, &MANIFEST.replace("proid1", "proid2"));
    configured(node.placement_added(other).await.expect("configure"));
    assert_eq!(check.asked.load(Ordering::SeqCst), 4);
    assert_eq!(env.names("credential_specs").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn wait_for_group_times_out_with_an_aborted_event() {
    let env = waiting_env();
    let check = fake(usize::MAX);
    let node = env.node_with(check.clone());
    let instance = "proid1.web#0000000001";
    env.schedule(instance, MANIFEST);
    env.place(instance);
    let start = tokio::time::Instant::now();
    assert_eq!(
        node.placement_added(instance).await.expect("abort"),
        Added::Aborted { why: "gmsa".into() }
    );
    assert!(tokio::time::Instant::now() - start >= Duration::from_secs(300));
    assert!(check.asked.load(Ordering::SeqCst) > 1);
    let events = env.events();
    assert_eq!(events.len(), 1);
    let (kind, _, data, content) = &events[0];
    assert_eq!((kind, data.as_str()), (&EventKind::Aborted, "gmsa"));
    assert!(content.contains("proid1"), "{content}");
    for sub in ["apps", "running", "credential_specs"] {
        assert!(env.names(sub).is_empty(), "{sub}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_placement_removed_while_waiting_is_not_configured() {
    let env = waiting_env();
    let node = env.node_with(fake(usize::MAX));
    let instance = "proid1.web#0000000001";
    env.schedule(instance, MANIFEST);
    env.place(instance);
    let waiting = tokio::spawn({
        let node = node.clone();
        async move { node.placement_added(instance).await }
    });
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        node.placement_removed(instance).await.expect("remove"),
        Removed::NotRunning
    );
    assert_eq!(
        waiting.await.expect("task").expect("add"),
        Added::NoLongerPlaced
    );
    assert!(env.events().is_empty());
    assert!(env.names("apps").is_empty());
}

fn wait_for_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the script did not end in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn the_finish_script_records_the_first_exit_and_reports_it() {
    let env = Env::new(|c| {
        c.finish_command = "printf '%s\\n' {container_dir} >> {app_root}/finish-calls".into();
    });
    let node = env.node();
    let instance = "proid1.web#0000000001";
    env.schedule(instance, MANIFEST);
    env.place(instance);
    let (_, dir) = configured(node.placement_added(instance).await.expect("configure"));

    let finish = dir.join("finish");
    let status = Command::new(&finish)
        .args(["3", "0"])
        .status()
        .expect("run finish");
    assert!(status.success());
    let exitinfo = fs::read_to_string(dir.join("data/exitinfo")).expect("exitinfo");
    let info: serde_json::Value = serde_json::from_str(&exitinfo).expect("json");
    assert_eq!(info["service"], "web");
    assert_eq!(info["return_code"], 3);
    assert_eq!(info["signal"], 0);
    assert!(info["timestamp"].as_f64().expect("timestamp") > 1_600_000_000.0);

    // The supervisor restarts and the container dies again: the first exit stays.
    let status = Command::new(&finish)
        .args(["256", "15"])
        .status()
        .expect("run finish");
    assert!(status.success());
    assert_eq!(
        fs::read_to_string(dir.join("data/exitinfo")).expect("exitinfo"),
        exitinfo
    );
    let calls = fs::read_to_string(env.app_root.join("finish-calls")).expect("calls");
    assert_eq!(calls, format!("{0}\n{0}\n", dir.display()));

    let event = gmsa_reconciler::node::finish(&env.app_root, &dir)
        .expect("finish")
        .expect("an event");
    assert_eq!(
        (event.kind, event.data.as_str()),
        (EventKind::Finished, "3.0")
    );
    assert_eq!(
        gmsa_reconciler::node::finish(&env.app_root, &dir).expect("again"),
        None
    );
    assert_eq!(env.events_of(instance, EventKind::Finished), ["3.0"]);
}

#[tokio::test]
async fn a_terminated_container_reports_nothing_even_with_exitinfo() {
    let env = Env::new(|_| {});
    let node = env.node();
    let instance = "proid1.web#0000000001";
    env.schedule(instance, MANIFEST);
    env.place(instance);
    let (_, dir) = configured(node.placement_added(instance).await.expect("configure"));
    node.placement_removed(instance).await.expect("terminate");
    // The supervisor stops the container and runs its finish.
    let status = Command::new(dir.join("finish"))
        .args(["256", "15"])
        .status()
        .expect("finish");
    assert!(status.success());
    assert!(dir.join("data/exitinfo").is_file());
    assert_eq!(
        gmsa_reconciler::node::finish(&env.app_root, &dir).expect("finish"),
        None
    );
    assert!(env.events_of(instance, EventKind::Finished).is_empty());
}

#[tokio::test]
async fn several_services_end_together_with_the_first() {
    let env = Env::new(|_| {});
    let node = env.node();
    let instance = "proid1.multi#0000000001";
    let manifest = MANIFEST.replace(
        "services:\n  - name: web\n    command: exec sleep 1000\n",
        "services:\n  - name: quick\n    command: 'while [ ! -e long.pid ]; do sleep 0.05; done; exit 3'\n  - name: long\n    command: 'echo $$ > long.pid; exec sleep 1000'\n",
    );
    env.schedule(instance, &manifest);
    env.place(instance);
    let (_, dir) = configured(node.placement_added(instance).await.expect("configure"));

    let mut run = Command::new(dir.join("run")).spawn().expect("start run");
    let status = wait_for_exit(&mut run);
    assert_eq!(status.code(), Some(3));
    let status_line = fs::read_to_string(dir.join("data/.exited/status")).expect("status");
    assert_eq!(status_line, "quick 3\n");
    let pid = fs::read_to_string(dir.join("data/long.pid")).expect("pid");
    assert!(
        !Path::new("/proc").join(pid.trim()).exists(),
        "the long service {} outlived the container",
        pid.trim()
    );

    let finish = Command::new(dir.join("finish"))
        .args(["3", "0"])
        .status()
        .expect("finish");
    assert!(finish.success());
    let info: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("data/exitinfo")).expect("read"))
            .expect("json");
    assert_eq!(
        (info["service"].as_str(), info["return_code"].as_i64()),
        (Some("quick"), Some(3))
    );
}

#[tokio::test]
async fn startup_reconciles_what_changed_while_down() {
    let env = Env::new(|_| {});
    let [kept, removed, broken, finished, resumed, added] = [
        "proid1.kept#0000000001",
        "proid1.removed#0000000002",
        "proid1.broken#0000000003",
        "proid1.finished#0000000004",
        "proid1.resumed#0000000005",
        "proid1.added#0000000006",
    ];
    let mut dirs = std::collections::BTreeMap::new();
    {
        let node = env.node();
        for instance in [kept, removed, broken, finished, resumed] {
            env.schedule(instance, MANIFEST);
            env.place(instance);
            let (_, dir) = configured(node.placement_added(instance).await.expect("configure"));
            dirs.insert(instance, dir);
        }
    }
    // While down: one placement removed, one added; one container directory
    // lost, so its running link leads nowhere;
    // one container finished and lost its link; one configuration interrupted
    // before its link was made (its run script never written); and a
    // container made for an instance that is no longer placed, never linked.
    env.unplace(removed);
    env.schedule(added, MANIFEST);
    env.place(added);
    fs::remove_dir_all(&dirs[broken]).expect("rm -r");
    fs::write(
        dirs[finished].join("data/exitinfo"),
        r#"{"service": "web", "return_code": 0, "signal": 0, "timestamp": 1700000000}"#,
    )
    .expect("exitinfo");
    fs::remove_file(env.dir("running").join(finished)).expect("rm");
    fs::remove_file(env.dir("running").join(resumed)).expect("rm");
    fs::remove_file(dirs[resumed].join("run")).expect("rm");
    let stray = env.dir("apps").join("proid1.gone-0000000009-0000000000000");
    fs::create_dir_all(stray.join("data")).expect("mkdir");
    let events_before = env.events().len();

    let node = env.node();
    let placed: BTreeSet<String> = [kept, broken, finished, resumed, added]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let report = node.startup(&placed).await.expect("startup");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.kept, [kept]);
    assert_eq!(report.terminated, [removed]);
    assert_eq!(report.repaired, [broken]);
    assert_eq!(report.finished, [finished]);
    assert_eq!(report.orphaned, ["proid1.gone-0000000009-0000000000000"]);
    assert_eq!(
        report
            .configured
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        [added, broken, resumed]
    );
    match &report.configured[resumed] {
        Ok(Added::Configured {
            container_dir,
            resumed: true,
            ..
        }) => assert_eq!(container_dir, &dirs[resumed]),
        other => panic!("the interrupted configuration was not resumed: {other:?}"),
    }
    assert!(dirs[resumed].join("run").is_file());
    assert!(
        matches!(
            &report.configured[broken],
            Ok(Added::Configured { resumed: false, .. })
        ),
        "{:?}",
        report.configured[broken]
    );

    // Running now: exactly the placed instances that have not finished.
    assert_eq!(env.names("running"), {
        let mut v = vec![added, broken, kept, resumed];
        v.sort();
        v
    });
    assert_eq!(
        env.running(kept),
        Some(fs::canonicalize(&dirs[kept]).expect("dir"))
    );
    assert!(env.running(broken).is_some());
    let cleanup = env.names("cleanup");
    // Those whose placement is gone are marked terminated; the one that
    // ended on its own is not (it is still placed, and not to be re-run).
    for (dir, terminated) in [
        (&dirs[removed], true),
        (&stray, true),
        (&dirs[finished], false),
    ] {
        let name = dir
            .file_name()
            .expect("name")
            .to_str()
            .expect("utf-8")
            .to_owned();
        assert!(cleanup.contains(&name), "{name} not in {cleanup:?}");
        assert_eq!(
            dir.join("data/terminated").is_file(),
            terminated,
            "{}",
            dir.display()
        );
    }

    // Events: one finished for the container that ended while down, one
    // configured for each instance configured afresh; none for the kept or
    // the resumed (it had already been announced).
    let new: Vec<Posted> = env.events().split_off(events_before);
    let mut summary: Vec<(EventKind, String)> = new.into_iter().map(|e| (e.0, e.1)).collect();
    summary.sort();
    assert_eq!(
        summary,
        [
            (EventKind::Configured, added.to_owned()),
            (EventKind::Configured, broken.to_owned()),
            (EventKind::Finished, finished.to_owned()),
        ]
    );
    assert_eq!(env.events_of(finished, EventKind::Finished), ["0.0"]);
    for instance in [kept, resumed] {
        assert_eq!(
            env.events_of(instance, EventKind::Configured).len(),
            1,
            "{instance}"
        );
    }

    // The finished instance is not configured again while still placed;
    // a second start-up changes nothing.
    assert_eq!(
        node.placement_added(finished).await.expect("add"),
        Added::AlreadyDone
    );
    let apps_before = env.names("apps");
    let events_before = env.events().len();
    let again = env.node().startup(&placed).await.expect("startup again");
    assert!(again.terminated.is_empty() && again.repaired.is_empty() && again.orphaned.is_empty());
    assert_eq!(
        again.finished,
        [finished],
        "still placed and finished: reported as such"
    );
    assert_eq!(env.names("apps"), apps_before);
    assert_eq!(
        env.events().len(),
        events_before,
        "nothing is announced twice"
    );
}

#[tokio::test]
async fn cleanup_deletes_containers_after_the_retention_time() {
    let env = Env::new(|c| {
        c.gmsa_proids = GmsaProids::Glob(glob::Pattern::new("*").expect("glob"));
        c.domain = Some(domain());
        c.retain = Duration::from_secs(3600);
    });
    let node = env.node();
    let instance = "proid1.web#0000000001";
    env.schedule(instance, MANIFEST);
    env.place(instance);
    let (unique_name, dir) = configured(node.placement_added(instance).await.expect("configure"));
    let other = "proid1.web#0000000002";
    env.schedule(other, MANIFEST);
    let (running_name, _) = configured(node.placement_added(other).await.expect("configure"));
    node.placement_removed(instance).await.expect("terminate");

    let now = SystemTime::now();
    assert!(node.cleanup_expired(now).is_empty());
    assert!(dir.is_dir());
    let later = now + Duration::from_secs(3600 + 60);
    assert_eq!(
        node.cleanup_expired(later),
        std::slice::from_ref(&unique_name)
    );
    assert!(!dir.exists());
    assert!(env.names("cleanup").is_empty());
    assert_eq!(env.names("apps"), std::slice::from_ref(&running_name));
    assert_eq!(
        env.names("credential_specs"),
        [format!("{running_name}.json")]
    );
    assert!(node.cleanup_expired(later).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_same_placement_told_twice_at_once_aborts_once() {
    let env = waiting_env();
    let node = env.node_with(fake(usize::MAX));
    let instance = "proid1.web#0000000001";
    env.schedule(instance, MANIFEST);
    env.place(instance);
    let (a, b) = tokio::join!(
        node.placement_added(instance),
        node.placement_added(instance)
    );
    let mut outcomes = [a.expect("first"), b.expect("second")];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes,
        [Added::Aborted { why: "gmsa".into() }, Added::AlreadyDone]
    );
    assert_eq!(env.events_of(instance, EventKind::Aborted), ["gmsa"]);
}

#[tokio::test]
async fn stopping_a_container_of_several_services_stops_them_all() {
    let env = Env::new(|_| {});
    let node = env.node();
    let instance = "proid1.multi#0000000002";
    let manifest = MANIFEST.replace(
        "services:\n  - name: web\n    command: exec sleep 1000\n",
        "services:\n  - name: one\n    command: 'echo $$ > one.pid; exec sleep 1000'\n  - name: two\n    command: 'echo $$ > two.pid; exec sleep 1000'\n",
    );
    env.schedule(instance, &manifest);
    env.place(instance);
    let (_, dir) = configured(node.placement_added(instance).await.expect("configure"));
    let mut run = Command::new(dir.join("run")).spawn().expect("start run");

    let pid_file = |name: &str| dir.join("data").join(format!("{name}.pid"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(pid_file("one").is_file() && pid_file("two").is_file()) {
        assert!(Instant::now() < deadline, "the services did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // What a supervisor does when the running link goes away.
    let status = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_for_exit(&mut run);
    for name in ["one", "two"] {
        let pid = fs::read_to_string(pid_file(name)).expect("pid");
        assert!(
            !Path::new("/proc").join(pid.trim()).exists(),
            "service {name} ({}) outlived its container",
            pid.trim()
        );
    }
}
