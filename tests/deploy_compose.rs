//! The container files in `deploy/` hold together as shipped. No container
//! engine runs here, so the test does what `docker compose up` would with
//! the same files: every file and folder `compose.yml` mounts or builds
//! from exists in the repository; the image's user, port and health check
//! agree with the compose service and its config; and the compose config,
//! with the containers' paths mapped to the mounted sources, runs three
//! replicas of the built binary against a real ZooKeeper until the leader
//! has brought the demo directory in line with the demo tree.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_yaml::Value;
use support::daemon::http_get;
use support::zookeeper::ZooKeeper;
use support::{free_port, wait_until};

const SERVICE: &str = "gmsa-reconciler";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `deploy/compose.yml`, with its `<<:` merge keys applied.
fn compose() -> Value {
    let mut value: Value =
        serde_yaml::from_str(&read(&deploy().join("compose.yml"))).expect("compose.yml is YAML");
    value.apply_merge().expect("compose.yml merge keys");
    value
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let service = &compose["services"][name];
    assert!(service.is_mapping(), "compose.yml has no service {name}");
    service
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .map(|v| v.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A service's volumes as (source, target): a bind mount's source is a
/// path (relative to `deploy/`), a named volume's is its name.
fn volumes(service: &Value) -> Vec<(String, String)> {
    strings(&service["volumes"])
        .into_iter()
        .map(|spec| {
            let mut parts = spec.split(':');
            let source = parts.next().expect("source").to_owned();
            let target = parts.next().unwrap_or_else(|| panic!("{spec}: no target"));
            (source, target.to_owned())
        })
        .collect()
}

fn is_bind(source: &str) -> bool {
    source.starts_with('.') || source.starts_with('/')
}

/// The `--config` argument of the service's command.
fn config_target(service: &Value) -> String {
    let command = strings(&service["command"]);
    let at = command
        .iter()
        .position(|a| a == "--config")
        .expect("the command names --config");
    command[at + 1].clone()
}

#[test]
fn every_file_the_compose_file_uses_exists_in_the_repository() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let named: Vec<&str> = compose["volumes"]
        .as_mapping()
        .map(|m| m.keys().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (name, service) in services {
        let name = name.as_str().expect("service name");
        if let Some(build) = service.get("build") {
            let context = deploy().join(build["context"].as_str().expect("context"));
            assert!(context.is_dir(), "{name}: no build context {context:?}");
            let file = context.join(build["dockerfile"].as_str().expect("dockerfile"));
            assert!(file.is_file(), "{name}: no {file:?}");
        }
        for (source, target) in volumes(service) {
            if is_bind(&source) {
                let path = deploy().join(&source);
                assert!(
                    path.exists(),
                    "{name}: mounts {source} at {target}: no such path"
                );
            } else {
                assert!(
                    named.contains(&source.as_str()),
                    "{name}: volume {source} is not declared"
                );
            }
        }
    }
    let secrets = compose["secrets"].as_mapping().expect("secrets");
    for (name, secret) in secrets {
        let file = deploy().join(secret["file"].as_str().expect("secret file"));
        assert!(file.is_file(), "secret {name:?}: no {file:?}");
    }
    let reconciler = service(&compose, SERVICE);
    let config = config_target(reconciler);
    assert!(
        volumes(reconciler)
            .iter()
            .any(|(source, target)| *target == config && is_bind(source)),
        "{config} is not mounted from the repository"
    );
    for secret in strings(&reconciler["secrets"]) {
        assert!(secrets.contains_key(secret.as_str()), "{secret} undeclared");
    }
}

#[test]
fn the_image_runs_as_a_fixed_uid_with_the_port_and_health_check_the_compose_config_uses() {
    let containerfile = read(&deploy().join("Containerfile"));
    let directive = |name: &str| -> Vec<String> {
        containerfile
            .lines()
            .filter_map(|l| l.strip_prefix(name))
            .filter_map(|l| l.strip_prefix(' '))
            .map(str::to_owned)
            .collect()
    };
    let users = directive("USER");
    assert_eq!(users.len(), 1, "one USER: {users:?}");
    let (uid, gid) = users[0].split_once(':').expect("USER uid:gid");
    assert!(
        [uid, gid]
            .iter()
            .all(|n| n.parse::<u32>().is_ok_and(|n| n >= 1000)),
        "USER {} is not a numeric unprivileged uid:gid",
        users[0]
    );
    assert_eq!(directive("EXPOSE"), ["9464"]);
    // The HEALTHCHECK instruction with its continuation lines.
    let mut healthcheck = String::new();
    for line in containerfile
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK "))
    {
        healthcheck += line;
        if !line.ends_with('\\') {
            break;
        }
    }
    assert!(
        healthcheck.contains("http://127.0.0.1:9464/healthz"),
        "{healthcheck}"
    );
    // COPY sources from the build context exist and are not ignored.
    let ignored = read(&repo().join(".dockerignore"));
    let ignored: Vec<&str> = ignored
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    for pattern in ["target/", ".git/"] {
        assert!(ignored.contains(&pattern), ".dockerignore lacks {pattern}");
    }
    for copy in directive("COPY") {
        if copy.starts_with("--from") {
            continue;
        }
        let source = copy.split_whitespace().next().expect("COPY source");
        if source != "." {
            assert!(repo().join(source).exists(), "COPY {source}: no such file");
        }
    }

    let compose = compose();
    let reconciler = service(&compose, SERVICE);
    let ports = strings(&reconciler["ports"]);
    assert!(
        ports.iter().all(|p| p.ends_with(":9464")) && !ports.is_empty(),
        "compose publishes {ports:?}, not the image's 9464"
    );
    // The demo volume is handed to the image's user.
    let prepare = strings(&service(&compose, "demo-directory")["command"]).join("\n");
    assert!(
        prepare.contains(&format!("chown {uid}:{gid} ")),
        "{prepare}"
    );

    let config = config_file(reconciler);
    let addr = config["metrics-addr"]
        .as_str()
        .expect("metrics-addr is set");
    assert_eq!(addr, "0.0.0.0:9464", "the health check asks 127.0.0.1:9464");
    assert!(
        config.get("bind-password-file").is_none(),
        "the demo directory is an LDIF file: no bind password applies"
    );
    let placeholder = read(&deploy().join("compose/bind-password"));
    assert!(placeholder.contains("PLACEHOLDER"), "{placeholder}");
}

/// The compose config file, as the service mounts it.
fn config_file(reconciler: &Value) -> serde_yaml::Mapping {
    let target = config_target(reconciler);
    let (source, _) = volumes(reconciler)
        .into_iter()
        .find(|(_, t)| *t == target)
        .expect("the config is mounted");
    serde_yaml::from_str(&read(&deploy().join(source))).expect("the compose config is YAML")
}

/// A replica of the compose service, run from the built binary.
struct Replica {
    child: Child,
    port: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn readyz(&self) -> (u16, String) {
        http_get(self.port, "/readyz")
    }

    fn terminate(&mut self) -> ExitStatus {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for a replica") {
                return status;
            }
            assert!(Instant::now() < deadline, "a replica ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn plan_exit_code(config: &Path) -> i32 {
    let out = support::e2e::bin()
        .arg("plan")
        .arg(format!("--config={}", config.display()))
        .arg("--exit-code")
        .output()
        .expect("run plan");
    let code = out.status.code().expect("plan exits");
    assert!(
        code == 0 || code == 2,
        "plan with the compose config failed ({code}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    code
}

#[test]
fn the_compose_config_runs_three_replicas_that_apply_the_demo() {
    let compose = compose();
    let reconciler = service(&compose, SERVICE);
    let mut config = config_file(reconciler);
    let work = tempfile::tempdir().expect("temp dir");

    // Where each container path comes from on this machine: bind mounts
    // from the repository, named volumes from a fresh folder each.
    let mut mounts: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (source, target) in volumes(reconciler) {
        let host = if is_bind(&source) {
            deploy().join(&source)
        } else {
            let dir = work.path().join(&source);
            fs::create_dir_all(&dir).expect("volume folder");
            dir
        };
        mounts.insert(target, host);
    }
    let to_host = |path: &str| -> PathBuf {
        let (target, host) = mounts
            .iter()
            .filter(|(target, _)| Path::new(path).starts_with(target))
            .max_by_key(|(target, _)| target.len())
            .unwrap_or_else(|| panic!("{path} is in no volume of the service"));
        let rest = Path::new(path).strip_prefix(target).expect("prefix");
        if rest.as_os_str().is_empty() {
            host.clone()
        } else {
            host.join(rest)
        }
    };

    // What the one-shot demo-directory service does: copy the demo LDIF
    // (mounted at /demo/directory.ldif) into the shared volume.
    let demo = service(&compose, "demo-directory");
    let directory = config["directory"].as_str().expect("directory").to_owned();
    let prepare = strings(&demo["command"]).join("\n");
    assert!(
        prepare.contains(&format!("/demo/directory.ldif {directory}")),
        "demo-directory does not copy the demo to {directory}: {prepare}"
    );
    let (demo_source, _) = volumes(demo)
        .into_iter()
        .find(|(_, t)| t == "/demo/directory.ldif")
        .expect("the demo LDIF is mounted");
    let ldif = to_host(&directory);
    fs::copy(deploy().join(demo_source), &ldif).expect("copy the demo directory");

    let fs_root = to_host(config["fs-root"].as_str().expect("fs-root"));
    assert!(
        fs_root.join(".modified").is_file(),
        "{fs_root:?}: not a tree"
    );
    config.insert("fs-root".into(), fs_root.display().to_string().into());
    config.insert("directory".into(), ldif.display().to_string().into());
    let zk = ZooKeeper::start();
    assert_eq!(config["zookeeper"].as_str(), Some("zookeeper:2181"));
    config.insert("zookeeper".into(), zk.servers().into());

    let mut replicas = Vec::new();
    for i in 0..3 {
        let port = free_port();
        config.insert("metrics-addr".into(), format!("127.0.0.1:{port}").into());
        let path = work.path().join(format!("replica-{i}.yml"));
        fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("config");
        if i == 0 {
            assert_eq!(plan_exit_code(&path), 2, "the demo starts with changes");
        }
        let command = strings(&reconciler["command"]);
        let child = support::e2e::bin()
            .args(command.iter().map(|a| {
                if a.starts_with('/') && a.ends_with(".yml") {
                    path.display().to_string()
                } else {
                    a.clone()
                }
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a replica");
        replicas.push(Replica { child, port });
    }

    wait_until(
        "one leader and two followers, all ready",
        Duration::from_secs(60),
        || {
            let answers: Vec<_> = replicas.iter().map(Replica::readyz).collect();
            answers.iter().all(|(status, _)| *status == 200)
                && answers
                    .iter()
                    .filter(|(_, b)| b.contains("(leader)"))
                    .count()
                    == 1
        },
    );
    let config_path = work.path().join("replica-0.yml");
    wait_until(
        "the demo directory to match the tree",
        Duration::from_secs(30),
        || plan_exit_code(&config_path) == 0,
    );
    let applied = read(&ldif);
    assert!(
        applied.contains("member: CN=WIN002,OU=Computers,DC=ad,DC=com")
            || applied
                .to_lowercase()
                .contains("member: cn=win002,ou=computers,dc=ad,dc=com"),
        "win002 runs web and was not added:\n{applied}"
    );
    for replica in &mut replicas {
        let status = replica.terminate();
        assert!(
            status.success(),
            "a replica exited with {status} on SIGTERM"
        );
    }
}
