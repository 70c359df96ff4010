//! The membership wait reads this host's own domain controller, not the
//! writer's: a real replica pair of slapd servers on 127.0.0.1, a provider
//! (with `syncprov`) that the reconciler writes to and a consumer that
//! replicates from it with `syncrepl` in refreshOnly mode every three
//! seconds, named as this host's `nt.dc`. The daemon runs in node mode and
//! group reconciliation through the binary; the test records a timeline
//! (provider has the member at t1, consumer at t2, the container directory
//! appears at t3) and proves from it that the container came only after
//! the consumer had the membership, never while only the provider had it.

mod support;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::node::{binary, manifest, schedule, AppRoot, NodeProcess};
use support::tree::Tree;
use support::{fixtures, free_port, tool, wait_until, Slapd};

const HOST: &str = "node1.ad.test";
const GROUP: &str = "cn=rgmsa-gmsa-hosts,ou=Groups,dc=ad,dc=com";
const NODE_DN: &str = "cn=node1,ou=Computers,dc=ad,dc=com";
const SID: &str = "S-1-5-21-1004336348-1177238915-682003330";
const GUID: &str = "a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e";

/// One slapd of the pair, killed when dropped (and, through the parent
/// death signal, when the test binary dies).
struct Server {
    dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Server {
    fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What both servers share: schema, pid files, the database and its ACL.
fn common_conf(dir: &Path, modules: &str, database_extra: &str) -> String {
    format!(
        "include /etc/ldap/schema/core.schema\n\
         include /etc/ldap/schema/cosine.schema\n\
         include /etc/ldap/schema/inetorgperson.schema\n\
         include {schema}\n\
         pidfile {dir}/slapd.pid\n\
         argsfile {dir}/slapd.args\n\
         modulepath /usr/lib/ldap\n\
         moduleload back_mdb\n\
         {modules}\
         loglevel sync\n\
         database mdb\n\
         suffix \"dc=ad,dc=com\"\n\
         rootdn \"cn=admin,dc=ad,dc=com\"\n\
         rootpw secret\n\
         directory {dir}/data\n\
         maxsize 268435456\n\
         index entryCSN,entryUUID eq\n\
         access to attrs=userPassword by anonymous auth by * none\n\
         access to * by dn.exact=\"cn=svc,dc=ad,dc=com\" write by * read\n\
         {database_extra}",
        schema = fixtures().join("ad-mini.schema").display(),
        dir = dir.display(),
    )
}

/// Writes the configuration, optionally loads `ldif`, starts slapd and
/// waits until it answers.
fn start_server(conf: impl Fn(&Path) -> String, ldif: Option<&str>) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    fs::create_dir(d.join("data")).expect("data dir");
    fs::write(d.join("slapd.conf"), conf(d)).expect("slapd.conf");
    if let Some(ldif) = ldif {
        fs::write(d.join("load.ldif"), ldif).expect("load.ldif");
        // -w: write the contextCSN the provider's syncprov serves from.
        support::run(
            Command::new(tool("slapadd"))
                .args(["-q", "-w", "-f"])
                .arg(d.join("slapd.conf"))
                .arg("-l")
                .arg(d.join("load.ldif")),
            b"",
            "slapadd",
        );
    }
    let port = free_port();
    let log = fs::File::create(d.join("slapd.log")).expect("log");
    let mut cmd = Command::new(tool("slapd"));
    cmd.arg("-f")
        .arg(d.join("slapd.conf"))
        .arg("-h")
        .arg(format!("ldap://127.0.0.1:{port}/"))
        .args(["-d", "0"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    // SAFETY: prctl in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start slapd");
    let mut server = Server { dir, port, child };
    wait_until("slapd to answer", Duration::from_secs(30), || {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!(
                "slapd exited with {status}: {}",
                fs::read_to_string(server.dir.path().join("slapd.log")).unwrap_or_default()
            );
        }
        search(&server.url(), "", "base", "namingContexts").is_some()
    });
    server
}

/// `ldapsearch` as the rootdn; the output, or `None` when it fails.
fn search(url: &str, base: &str, scope: &str, attr: &str) -> Option<String> {
    let out = Command::new(tool("ldapsearch"))
        .args([
            "-x",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-o",
            "nettimeout=5",
            "-H",
            url,
            "-D",
            "cn=admin,dc=ad,dc=com",
            "-w",
            "secret",
            "-b",
            base,
            "-s",
            scope,
            "(objectClass=*)",
            attr,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run ldapsearch");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the server lists this host as a member of the group.
fn has_member(url: &str) -> bool {
    search(url, GROUP, "base", "member").is_some_and(|text| {
        text.lines()
            .filter_map(|l| l.strip_prefix("member: "))
            .any(|m| m.eq_ignore_ascii_case(NODE_DN))
    })
}

/// Writes a marker on the provider and waits until the consumer has it,
/// which it has right after one of its refreshes.
fn just_after_a_refresh(provider: &Server, consumer: &Server) {
    let marker = format!("refresh-{}", std::process::id());
    let mut child = Command::new(tool("ldapmodify"))
        .args([
            "-x",
            "-H",
            &provider.url(),
            "-D",
            "cn=admin,dc=ad,dc=com",
            "-w",
            "secret",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run ldapmodify");
    let change = format!(
        "dn: dc=ad,dc=com\nchangetype: modify\nreplace: description\ndescription: {marker}\n"
    );
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), change.as_bytes())
        .expect("write the marker");
    drop(child.stdin.take());
    assert!(
        child.wait().expect("ldapmodify").success(),
        "the marker was not written"
    );
    wait_until(
        "the consumer's refresh with the marker",
        Duration::from_secs(30),
        || {
            search(&consumer.url(), "dc=ad,dc=com", "base", "description")
                .is_some_and(|text| text.contains(&marker))
        },
    );
}

fn entries() -> String {
    let mut ldif = fs::read_to_string(fixtures().join("base.ldif")).expect("base.ldif");
    ldif += &format!(
        "\ndn: {NODE_DN}\nobjectClass: computer\ncn: node1\nsAMAccountName: NODE1$\n\n\
         dn: {GROUP}\nobjectClass: group\ncn: rgmsa-gmsa-hosts\nsAMAccountName: rgmsa-gmsa-hosts\n"
    );
    ldif
}

/// One look at the three places, in an order that makes each conclusion
/// sound (membership and the container only ever appear here, never go).
struct Look {
    at: Duration,
    provider: bool,
    consumer: bool,
    container: bool,
    /// The consumer again, after the container was looked at.
    consumer_after: bool,
}

#[test]
fn the_container_waits_for_the_replica_this_host_reads() {
    let provider = start_server(
        |d| {
            common_conf(
                d,
                "moduleload syncprov\n",
                "overlay syncprov\nsyncprov-checkpoint 100 10\n",
            )
        },
        Some(&entries()),
    );
    let provider_url = provider.url();
    let consumer = start_server(
        |d| {
            common_conf(
                d,
                "",
                &format!(
                    "syncrepl rid=001\n  provider={provider_url}\n  type=refreshOnly\n  \
                     interval=00:00:00:03\n  searchbase=\"dc=ad,dc=com\"\n  bindmethod=simple\n  \
                     binddn=\"cn=admin,dc=ad,dc=com\"\n  credentials=secret\n  retry=\"1 +\"\n"
                ),
            )
        },
        None,
    );
    wait_until(
        "the consumer's first replication",
        Duration::from_secs(30),
        || search(&consumer.url(), GROUP, "base", "cn").is_some(),
    );
    assert!(!has_member(&provider.url()) && !has_member(&consumer.url()));

    let tree = Tree::new();
    fs::create_dir(tree.root().join("scheduled")).expect("scheduled/");
    let dc = format!("127.0.0.1:{}", consumer.port);
    tree.server_raw(
        HOST,
        &format!("partition: p1\nnt.dc: {dc}\nnt.dn: {NODE_DN}\n"),
    );
    tree.mark_ready();
    let tmp = tempfile::tempdir().expect("temp dir");
    let app = AppRoot::new(&tmp.path().join("node"));
    let pw: PathBuf = tmp.path().join("bind.pw");
    fs::write(&pw, Slapd::SVC_PASSWORD).expect("password file");
    let node = NodeProcess::start(
        tree.root(),
        app.path(),
        HOST,
        &[
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
            format!("--ldap-url={}", provider.url()),
            format!("--bind-dn={}", Slapd::SVC_DN),
            format!("--bind-password-file={}", pw.display()),
            "--timeout=10s".to_owned(),
            "--partition=p1".to_owned(),
            "--wait-for-group=60s".to_owned(),
        ],
    );
    node.wait_for_log("node mode: reconciling containers with placements");

    let instance = "rgmsa.web#0000000001";
    let prefix = "rgmsa.web-0000000001-";
    schedule(tree.root(), instance, &manifest("rgmsa", "x"));
    // Place the instance just after the consumer has refreshed: its next
    // refresh is then a whole interval away, long after the reconciler's
    // write, so the moment when only the provider has the member is seconds
    // long rather than a matter of chance.
    just_after_a_refresh(&provider, &consumer);
    let start = Instant::now();
    tree.place(HOST, instance);
    let container = || app.names("apps").iter().any(|n| n.starts_with(prefix));

    let mut looks: Vec<Look> = Vec::new();
    let deadline = start + Duration::from_secs(60);
    loop {
        let at = start.elapsed();
        let provider_has = has_member(&provider.url());
        let consumer_has = has_member(&consumer.url());
        let container_there = container();
        let consumer_after = has_member(&consumer.url());
        looks.push(Look {
            at,
            provider: provider_has,
            consumer: consumer_has,
            container: container_there,
            consumer_after,
        });
        if container_there && !app.events_of(instance, "configured").is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no container within 60 s; the daemon said:\n{}",
            node.stderr()
        );
    }
    let first = |f: &dyn Fn(&Look) -> bool| looks.iter().find(|l| f(l)).map(|l| l.at);
    let t1 = first(&|l| l.provider);
    let t2 = first(&|l| l.consumer || l.consumer_after);
    let t3 = first(&|l| l.container);
    let ms = |t: Option<Duration>| t.map_or("never".to_owned(), |t| t.as_millis().to_string());
    eprintln!(
        "timeline from the placement ({} looks):\n  t1 {:>6} ms  the provider (written by the reconciler) has the member\n  \
         t2 {:>6} ms  the consumer (this host's nt.dc) has it\n  t3 {:>6} ms  the container directory appears",
        looks.len(),
        ms(t1),
        ms(t2),
        ms(t3)
    );
    let (Some(t1), Some(t2), Some(t3)) = (t1, t2, t3) else {
        panic!(
            "the container appeared before the consumer had the membership (or the provider never had it); the daemon said:\n{}",
            node.stderr()
        );
    };

    // The container was never seen while the consumer lacked the member:
    // the consumer was read again after the container was seen, and
    // membership never goes away here, so it had it when the container
    // was seen.
    for look in &looks {
        assert!(
            !look.container || look.consumer_after,
            "at {:?} the container existed before this host's DC had the membership",
            look.at
        );
    }
    assert!(t3 >= t2, "t3 {t3:?} before t2 {t2:?}");
    // There was a moment when only the provider had it: read in the order
    // provider, consumer, container, so at the provider's read the
    // consumer did not have it yet and there was no container.
    let window = looks
        .iter()
        .find(|l| l.provider && !l.consumer)
        .unwrap_or_else(|| {
            panic!("the consumer was never seen behind the provider: nothing was proved")
        });
    assert!(
        !window.container,
        "a container while only the provider had the member"
    );
    assert!(t1 < t2, "t1 {t1:?}, t2 {t2:?}");

    let stderr = node.stop();
    assert!(
        stderr.contains("membership wait reads this host's domain controller")
            && stderr.contains(&format!("ldap://{dc}")),
        "the log names the DC the wait reads: {stderr}"
    );
    drop(consumer);
    drop(provider);
}

/// The options of node mode that name the directory, as in the test above.
fn node_options(provider: &Server, pw: &Path) -> Vec<String> {
    vec![
        "--batch-window=50ms".to_owned(),
        "--domain-dns-name=ad.test".to_owned(),
        "--domain-netbios-name=AD".to_owned(),
        format!("--domain-sid={SID}"),
        format!("--domain-guid={GUID}"),
        "--group-ou=ou=Groups,dc=ad,dc=com".to_owned(),
        "--no-lock".to_owned(),
        format!("--ldap-url={}", provider.url()),
        format!("--bind-dn={}", Slapd::SVC_DN),
        format!("--bind-password-file={}", pw.display()),
        "--timeout=10s".to_owned(),
        "--wait-for-group=2s".to_owned(),
    ]
}

#[test]
fn without_nt_dc_the_wait_does_not_fall_back_to_the_writer() {
    // The writer has the member already: falling back to it would
    // configure the container.
    let mut ldif = entries();
    ldif += &format!("member: {NODE_DN}\n");
    let provider = start_server(
        |d| common_conf(d, "moduleload syncprov\n", "overlay syncprov\n"),
        Some(&ldif),
    );
    assert!(has_member(&provider.url()));
    let tree = Tree::new();
    fs::create_dir(tree.root().join("scheduled")).expect("scheduled/");
    tree.server_raw(HOST, &format!("partition: p1\nnt.dn: {NODE_DN}\n"));
    tree.mark_ready();
    let tmp = tempfile::tempdir().expect("temp dir");
    let app = AppRoot::new(&tmp.path().join("node"));
    let pw = tmp.path().join("bind.pw");
    fs::write(&pw, Slapd::SVC_PASSWORD).expect("password file");
    let node = NodeProcess::start(tree.root(), app.path(), HOST, &node_options(&provider, &pw));
    node.wait_for_log("node mode: reconciling containers with placements");
    let instance = "rgmsa.web#0000000002";
    schedule(tree.root(), instance, &manifest("rgmsa", "x"));
    tree.place(HOST, instance);
    wait_until("the instance aborted", Duration::from_secs(30), || {
        !app.events_of(instance, "aborted").is_empty()
    });
    assert_eq!(app.events_of(instance, "aborted"), ["gmsa"]);
    let event = app
        .events()
        .into_iter()
        .find(|e| e.instance == instance)
        .expect("the event");
    let why: String = serde_yaml::from_str(&event.content).expect("a YAML string");
    assert!(
        why.contains(&format!("servers/{HOST}")) && why.contains("no nt.dc"),
        "{why}"
    );
    assert!(app.names("apps").is_empty());
    node.stop();
}

#[test]
fn check_ldap_url_is_checked() {
    let tree = Tree::new();
    let tmp = tempfile::tempdir().expect("temp dir");
    let run = |extra: &[&str]| {
        let out = Command::new(binary())
            .arg("run")
            .arg(format!("--fs-root={}", tree.root().display()))
            .arg(format!("--app-root={}", tmp.path().join("node").display()))
            .arg(format!("--hostname={HOST}"))
            .args(["--group-ou=ou=Groups,dc=ad,dc=com", "--no-lock"])
            .args(extra)
            .output()
            .expect("run the binary");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let ldap = "--ldap-url=ldap://127.0.0.1:1";
    let err = run(&[
        ldap,
        "--wait-for-group=1s",
        "--check-ldap-url=ldap://svc:hunter2@dc2.ad.com",
    ]);
    assert!(
        err.contains("--check-ldap-url") && err.contains("credentials") && !err.contains("hunter2"),
        "{err}"
    );
    let err = run(&[ldap, "--wait-for-group=1s", "--check-ldap-url=http://dc2"]);
    assert!(
        err.contains("--check-ldap-url") && err.contains("scheme"),
        "{err}"
    );
    let err = run(&[ldap, "--check-ldap-url=ldap://dc2"]);
    assert!(err.contains("needs --wait-for-group"), "{err}");
    let err = run(&[
        "--directory=/nonexistent.ldif",
        "--wait-for-group=1s",
        "--check-ldap-url=ldap://dc2",
    ]);
    assert!(
        err.contains("--check-ldap-url") && err.contains("--directory"),
        "{err}"
    );
    let out = Command::new(binary())
        .args(["run", "--check-ldap-url=ldap://dc2"])
        .arg(format!("--fs-root={}", tree.root().display()))
        .args(["--group-ou=ou=Groups,dc=ad,dc=com", "--no-lock", ldap])
        .output()
        .expect("run the binary");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--app-root"),
        "{out:?}"
    );
}
