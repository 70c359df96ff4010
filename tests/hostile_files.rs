//! Hostile input class "files": what is in the placement tree is not what a
//! name promises. FIFOs, sockets and symlinks where placements, server
//! files or host directories should be, symlink loops, a host directory
//! linked out of the tree, one that can't be listed, and a server file one
//! byte over the cap. Each is driven through the binary (`plan` and `sync`
//! against an LDIF directory, `run` for the live cases) and must be
//! refused with a warning naming the path and what is there, without
//! blocking, without reading outside the tree, and without costing any
//! other host its changes. A host whose directory can't be read keeps its
//! memberships as they are: its placements are unknown, not none.

mod support;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::e2e::{bin, dn, ldif_groups, Groups};
use support::tree::{groups_ldif, Tree};

const OU: &str = "ou=Groups,dc=ad,dc=com";

fn host_dn(host: &str) -> String {
    format!("cn={host},ou=Computers,dc=ad,dc=com")
}

fn group_dn(group: &str) -> String {
    format!("cn={group},{OU}")
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o644) },
        0,
        "mkfifo {path:?}"
    );
}

/// Swaps two paths atomically (`renameat2(RENAME_EXCHANGE)`), so that a
/// directory becomes a symlink without ever being absent in between.
fn exchange(a: &Path, b: &Path) {
    let a = std::ffi::CString::new(a.as_os_str().as_encoded_bytes()).expect("path");
    let b = std::ffi::CString::new(b.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: valid NUL-terminated paths, relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(rc, 0, "renameat2: {}", std::io::Error::last_os_error());
}

/// A tree and an LDIF directory beside it, in one temp directory.
struct Setup {
    tree: Tree,
    dir: tempfile::TempDir,
}

impl Setup {
    /// Servers `hosts` in partition p1, a ready tree, and the groups.
    fn new(hosts: &[&str], groups: &[(&str, &[&str])]) -> Setup {
        let tree = Tree::new();
        for h in hosts {
            tree.server(h, "p1", &host_dn(h));
        }
        tree.mark_ready();
        let dir = tempfile::tempdir().expect("tmp");
        let members: Vec<(String, Vec<String>)> = groups
            .iter()
            .map(|(g, hs)| (g.to_string(), hs.iter().map(|h| host_dn(h)).collect()))
            .collect();
        let borrowed: Vec<Vec<&str>> = members
            .iter()
            .map(|(_, m)| m.iter().map(String::as_str).collect())
            .collect();
        let groups: Vec<(&str, &[&str])> = members
            .iter()
            .zip(&borrowed)
            .map(|((g, _), m)| (g.as_str(), m.as_slice()))
            .collect();
        fs::write(dir.path().join("directory.ldif"), groups_ldif(&groups)).expect("directory");
        Setup { tree, dir }
    }

    fn directory(&self) -> PathBuf {
        self.dir.path().join("directory.ldif")
    }

    fn placement(&self, host: &str) -> PathBuf {
        self.tree.host_dir(host)
    }

    fn server_path(&self, host: &str) -> PathBuf {
        self.tree.root().join("servers").join(host)
    }

    fn args(&self) -> Vec<String> {
        vec![
            format!("--fs-root={}", self.tree.root().display()),
            format!("--directory={}", self.directory().display()),
            format!("--group-ou={OU}"),
            "--partition=p1".to_owned(),
        ]
    }

    fn groups(&self) -> Groups {
        ldif_groups(&fs::read_to_string(self.directory()).expect("directory"))
    }

    fn is_member(&self, group: &str, host: &str) -> bool {
        self.groups()
            .get(&dn(&group_dn(group)))
            .is_some_and(|members| members.contains(&dn(&host_dn(host))))
    }
}

/// A plan's changes: per group DN (normalised), the DNs added and deleted.
type Changes = Vec<(String, Vec<String>, Vec<String>)>;

/// What a finished run of the binary said.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary to its end. A run that blocks (on a FIFO, say) is
/// killed after a minute and fails the test: it must never block at all.
fn run(mut cmd: Command) -> Ran {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gmsa-reconciler");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("wait");
            panic!(
                "gmsa-reconciler blocked; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn binary(command: &str, args: &[String]) -> Command {
    let mut cmd = bin();
    cmd.arg(command).args(args);
    cmd
}

/// `plan --format=json`, and its standard error.
fn plan(setup: &Setup) -> (Changes, String) {
    let mut args = setup.args();
    args.push("--format=json".into());
    let ran = run(binary("plan", &args));
    assert_eq!(ran.code, Some(0), "plan failed: {}", ran.stderr);
    (changes(&ran.stdout), ran.stderr)
}

fn changes(json: &str) -> Changes {
    let v: serde_json::Value = serde_json::from_str(json).expect("plan JSON");
    let norm = |v: &serde_json::Value| -> Vec<String> {
        let mut dns: Vec<String> = v
            .as_array()
            .expect("array")
            .iter()
            .map(|d| dn(d.as_str().expect("DN")).normalised().to_owned())
            .collect();
        dns.sort();
        dns
    };
    v["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|c| {
            let group = dn(c["group_dn"].as_str().expect("group"))
                .normalised()
                .to_owned();
            (group, norm(&c["add"]), norm(&c["delete"]))
        })
        .collect()
}

fn n(dn_text: &str) -> String {
    dn(dn_text).normalised().to_owned()
}

fn warned(stderr: &str, path: &Path, what: &str) -> bool {
    let path = path.display().to_string();
    stderr
        .lines()
        .any(|line| line.contains(&path) && line.contains(what))
}

/// A character device like `/dev/null` (the tests run as root, as CI does:
/// only root may make one).
fn mknod_null(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) };
    assert_eq!(rc, 0, "mknod {path:?}: {}", std::io::Error::last_os_error());
}

#[test]
fn a_fifo_socket_device_or_symlink_is_not_a_placement() {
    let s = Setup::new(&["h1", "h2", "h3", "h4", "h5"], &[("web-gmsa-hosts", &[])]);
    s.tree.place("h1", "web.app#1");
    let outside = tempfile::tempdir().expect("tmp");
    let real = outside.path().join("web.app#9");
    fs::write(&real, "{}").expect("outside file");
    let fifo = s.placement("h2").join("web.app#2");
    let socket = s.placement("h3").join("web.app#3");
    let link = s.placement("h4").join("web.app#4");
    let device = s.placement("h5").join("web.app#5");
    for h in ["h2", "h3", "h4", "h5"] {
        fs::create_dir(s.placement(h)).expect("host dir");
    }
    mkfifo(&fifo);
    mknod_null(&device);
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("socket");
    symlink(&real, &link).expect("symlink");

    let (changes, stderr) = plan(&s);
    assert_eq!(
        changes,
        [(
            n(&group_dn("web-gmsa-hosts")),
            vec![n(&host_dn("h1"))],
            vec![]
        )],
        "only the regular file is a placement; stderr:\n{stderr}"
    );
    assert!(
        warned(&stderr, &fifo, "a FIFO, not a placement"),
        "{stderr}"
    );
    assert!(
        warned(&stderr, &socket, "a socket, not a placement"),
        "{stderr}"
    );
    assert!(
        warned(&stderr, &link, "a symbolic link, not a placement"),
        "{stderr}"
    );
    assert!(
        warned(&stderr, &device, "a device, not a placement"),
        "{stderr}"
    );
}

#[test]
fn a_host_directory_symlinked_outside_the_tree_is_not_followed() {
    // h2 is in both groups; its directory is a link to one outside the
    // tree that holds a db placement. The link is not followed, and h2's
    // memberships are left as they are: neither the db one added from
    // outside nor the web one deleted for want of a placement.
    let s = Setup::new(
        &["h1", "h2"],
        &[("web-gmsa-hosts", &["h2"]), ("db-gmsa-hosts", &[])],
    );
    s.tree.place("h1", "web.app#1");
    s.tree.place("h1", "db.app#1");
    let outside = tempfile::tempdir().expect("tmp");
    fs::write(outside.path().join("db.app#2"), "{}").expect("outside placement");
    symlink(outside.path(), s.placement("h2")).expect("symlink");

    let (changes, stderr) = plan(&s);
    assert_eq!(
        changes,
        [
            (
                n(&group_dn("db-gmsa-hosts")),
                vec![n(&host_dn("h1"))],
                vec![]
            ),
            (
                n(&group_dn("web-gmsa-hosts")),
                vec![n(&host_dn("h1"))],
                vec![]
            ),
        ],
        "stderr:\n{stderr}"
    );
    assert!(
        warned(&stderr, &s.placement("h2"), "a symbolic link"),
        "{stderr}"
    );
    assert!(warned(&stderr, &s.placement("h2"), "left as they are"));

    let sync = run(binary("sync", &s.args()));
    assert_eq!(sync.code, Some(0), "{}", sync.stderr);
    assert!(s.is_member("web-gmsa-hosts", "h1") && s.is_member("db-gmsa-hosts", "h1"));
    assert!(s.is_member("web-gmsa-hosts", "h2"), "kept");
    assert!(
        !s.is_member("db-gmsa-hosts", "h2"),
        "nothing read from outside"
    );
}

#[test]
fn a_symlink_loop_as_a_server_file_or_a_host_directory() {
    // servers/h3 and placement/h2 are links to themselves: h3 never was in
    // scope, so its placement counts for nothing; h2 keeps its membership.
    let s = Setup::new(&["h1", "h2"], &[("web-gmsa-hosts", &["h2"])]);
    s.tree.place("h1", "web.app#1");
    s.tree.place("h3", "web.app#3");
    symlink("h3", s.server_path("h3")).expect("symlink");
    symlink("h2", s.placement("h2")).expect("symlink");

    let (changes, stderr) = plan(&s);
    assert_eq!(
        changes,
        [(
            n(&group_dn("web-gmsa-hosts")),
            vec![n(&host_dn("h1"))],
            vec![]
        )],
        "stderr:\n{stderr}"
    );
    assert!(
        warned(
            &stderr,
            &s.server_path("h3"),
            "unusable server file: a symbolic link, not a regular file"
        ),
        "{stderr}"
    );
    assert!(
        warned(&stderr, &s.placement("h2"), "placements are unknown"),
        "{stderr}"
    );
}

#[test]
fn a_server_file_of_one_mib_and_one_byte_is_invalid() {
    let s = Setup::new(&["h1"], &[("web-gmsa-hosts", &[])]);
    const MIB: usize = 1 << 20;
    for (host, size) in [("fits", MIB), ("over", MIB + 1)] {
        let mut content = format!(
            "partition: p1\nnt.dc: dc1.ad.com\nnt.dn: {}\n#",
            host_dn(host)
        )
        .into_bytes();
        content.resize(size, b'x');
        content[size - 1] = b'\n';
        fs::write(s.server_path(host), &content).expect("server file");
        s.tree.place(host, "web.app#1");
    }
    let (changes, stderr) = plan(&s);
    assert_eq!(
        changes,
        [(
            n(&group_dn("web-gmsa-hosts")),
            vec![n(&host_dn("fits"))],
            vec![]
        )],
        "a file of exactly 1 MiB is read, one byte more is not; stderr:\n{stderr}"
    );
    assert!(
        warned(
            &stderr,
            &s.server_path("over"),
            "unusable server file: too large (1048577 bytes"
        ),
        "{stderr}"
    );
}

#[test]
fn an_unreadable_host_directory_affects_that_host_only() {
    // Permissions do not stop root, and the tests run as root: then the
    // binary runs as nobody, for whom a directory of mode 000 can't be
    // listed, as it can't be for a daemon running as a service account.
    let s = Setup::new(
        &["h1", "h2"],
        &[("web-gmsa-hosts", &["h2"]), ("db-gmsa-hosts", &["h2"])],
    );
    s.tree.place("h1", "web.app#1");
    s.tree.place("h2", "web.app#2");
    for dir in [s.tree.root(), s.dir.path()] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    fs::set_permissions(s.placement("h2"), fs::Permissions::from_mode(0o000)).expect("chmod");

    let mut args = s.args();
    args.push("--format=json".into());
    // SAFETY: geteuid has no preconditions.
    let cmd = if unsafe { libc::geteuid() } == 0 {
        let mut cmd = Command::new(support::tool("setpriv"));
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_gmsa-reconciler"))
            .arg("plan")
            .args(&args);
        cmd
    } else {
        binary("plan", &args)
    };
    let ran = run(cmd);
    fs::set_permissions(s.placement("h2"), fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_eq!(ran.code, Some(0), "one host is not the run: {}", ran.stderr);
    assert_eq!(
        changes(&ran.stdout),
        [(
            n(&group_dn("web-gmsa-hosts")),
            vec![n(&host_dn("h1"))],
            vec![]
        )],
        "h2 is neither deleted from db nor touched in web; stderr:\n{}",
        ran.stderr
    );
    assert!(
        warned(&ran.stderr, &s.placement("h2"), "Permission denied"),
        "{}",
        ran.stderr
    );
    assert!(warned(&ran.stderr, &s.placement("h2"), "left as they are"));

    // Readable again, the same plan deletes h2 from db as it should.
    let (readable, _) = plan(&s);
    assert_eq!(
        readable,
        [
            (
                n(&group_dn("db-gmsa-hosts")),
                vec![],
                vec![n(&host_dn("h2"))]
            ),
            (
                n(&group_dn("web-gmsa-hosts")),
                vec![n(&host_dn("h1"))],
                vec![]
            ),
        ]
    );
}

/// `run` as a child process, its log in a file (a pipe nobody reads could
/// fill and stall it).
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(s: &Setup) -> Daemon {
        let log = s.dir.path().join("daemon.log");
        let mut args = s.args();
        args.extend(["--no-lock".to_owned(), "--batch-window=20ms".to_owned()]);
        let child = binary("run", &args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start the daemon");
        Daemon { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls until `check` holds; fails with the log after 30 s.
    fn until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit code and the whole log.
    fn stop(mut self) -> (Option<i32>, String) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status.code(), self.log());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("no exit 30 s after SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_fifo_created_in_servers_while_run_is_live() {
    let s = Setup::new(&["h1", "h2"], &[("web-gmsa-hosts", &[])]);
    s.tree.place("h1", "web.app#1");
    s.tree.place("h2", "web.app#2");
    let daemon = Daemon::start(&s);
    daemon.until("the initial sync", || {
        s.is_member("web-gmsa-hosts", "h1") && s.is_member("web-gmsa-hosts", "h2")
    });

    // A new name, and h2's file replaced by one (renamed over it, the
    // mirror's way): read without blocking, refused, h2 keeps its last good
    // definition.
    mkfifo(&s.server_path("h3"));
    let tmp = s.tree.root().join("servers/.tmpfifo");
    mkfifo(&tmp);
    fs::rename(&tmp, s.server_path("h2")).expect("rename");
    s.tree.server("h4", "p1", &host_dn("h4"));
    s.tree.place("h4", "web.app#4");
    daemon.until("the placement after the FIFOs", || {
        s.is_member("web-gmsa-hosts", "h4")
    });
    assert!(
        s.is_member("web-gmsa-hosts", "h2"),
        "last good definition kept"
    );
    s.tree.unplace("h1", "web.app#1");
    daemon.until("a removal after the FIFOs", || {
        !s.is_member("web-gmsa-hosts", "h1")
    });

    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "clean exit on SIGTERM; log:\n{log}");
    for (host, then) in [
        ("h2", "keeping its last good definition"),
        ("h3", "the host stays out of scope"),
    ] {
        let named = format!("servers/{host}: a FIFO, not a regular file; {then}");
        assert!(log.contains(&named), "{named}:\n{log}");
    }
}

/// A live host directory swapped for a symlink (`target`) in one step:
/// its last known placements are kept, nothing behind the link is read,
/// other hosts' changes go on, and once it is a directory again its
/// listing counts.
fn swap_host_dir_for_a_link_while_live(target: impl Fn(&Setup) -> PathBuf) {
    let s = Setup::new(
        &["h1", "h2"],
        &[("web-gmsa-hosts", &[]), ("db-gmsa-hosts", &[])],
    );
    s.tree.place("h1", "web.app#1");
    let link = s.tree.root().join("placement/.tmplink");
    symlink(target(&s), &link).expect("symlink");
    let daemon = Daemon::start(&s);
    daemon.until("the initial sync", || s.is_member("web-gmsa-hosts", "h1"));

    exchange(&link, &s.placement("h1"));
    s.tree.place("h2", "db.app#2");
    daemon.until("another host's change", || {
        s.is_member("db-gmsa-hosts", "h2")
    });
    assert!(
        s.is_member("web-gmsa-hosts", "h1"),
        "last known placements kept"
    );
    assert!(
        !s.is_member("db-gmsa-hosts", "h1"),
        "nothing read behind the link"
    );

    // A directory again, without h1's web placement (removed while it was
    // out of sight): its listing counts, and h1 leaves web.
    fs::remove_file(link.join("web.app#1")).expect("remove placement");
    exchange(&link, &s.placement("h1"));
    daemon.until("h1 leaving web once listed", || {
        !s.is_member("web-gmsa-hosts", "h1")
    });
    assert!(!s.is_member("db-gmsa-hosts", "h1"));

    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "clean exit on SIGTERM; log:\n{log}");
    assert!(
        warned(&log, &s.placement("h1"), "placements are unknown"),
        "{log}"
    );
}

#[test]
fn a_live_host_directory_swapped_for_a_link_outside_the_tree() {
    let outside = tempfile::tempdir().expect("tmp");
    fs::write(outside.path().join("db.app#9"), "{}").expect("outside placement");
    let path = outside.path().to_path_buf();
    swap_host_dir_for_a_link_while_live(move |_| path.clone());
}

#[test]
fn a_live_host_directory_swapped_for_a_symlink_loop() {
    swap_host_dir_for_a_link_while_live(|s| s.placement("h1"));
}

#[test]
fn a_fifo_as_a_placement_while_run_is_live() {
    // Created in place, and renamed over a real placement: neither counts,
    // and the daemon goes on.
    let s = Setup::new(&["h1", "h2"], &[("web-gmsa-hosts", &[])]);
    s.tree.place("h1", "web.app#1");
    let daemon = Daemon::start(&s);
    daemon.until("the initial sync", || s.is_member("web-gmsa-hosts", "h1"));

    fs::create_dir(s.placement("h2")).expect("host dir");
    mkfifo(&s.placement("h2").join("web.app#2"));
    let tmp = s.placement("h1").join(".tmpfifo");
    mkfifo(&tmp);
    fs::rename(&tmp, s.placement("h1").join("web.app#1")).expect("rename");
    daemon.until("h1 out of web, its placement a FIFO now", || {
        !s.is_member("web-gmsa-hosts", "h1")
    });
    assert!(
        !s.is_member("web-gmsa-hosts", "h2"),
        "a FIFO is no placement"
    );

    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "clean exit on SIGTERM; log:\n{log}");
    assert!(
        warned(
            &log,
            &s.placement("h1").join("web.app#1"),
            "a FIFO, not a placement"
        ),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_mode_leaves_containers_alone_while_its_host_directory_is_a_link() {
    use support::node::{binary, manifest, schedule, AppRoot, Daemon};
    const HOST: &str = "node1.ad.test";
    support::tree::init_logs();
    let tree = Tree::new();
    let tmp = tempfile::tempdir().expect("tmp");
    let app = AppRoot::new(&tmp.path().join("node"));
    let instance = "plain.web#0000000001";
    schedule(tree.root(), instance, &manifest("plain", "x"));
    tree.place(HOST, instance);
    tree.mark_ready();
    let mut args = vec![
        format!("--fs-root={}", tree.root().display()),
        format!("--app-root={}", app.path().display()),
        format!("--hostname={HOST}"),
        format!(
            "--finish-command='{}' finish {{container_dir}}",
            binary().display()
        ),
        "--batch-window=20ms".to_owned(),
    ];
    let daemon = Daemon::start(&args);
    daemon.ready().await;
    support::tree::eventually("configured", || app.running(instance).is_some()).await;
    let container = app.running(instance).expect("running");
    daemon.stop().await;

    // Started again with its own directory a symlink loop: its placements
    // are unknown, so nothing may be terminated as "no longer placed".
    let link = tree.root().join("placement/.tmplink");
    symlink(tree.host_dir(HOST), &link).expect("symlink");
    exchange(&link, &tree.host_dir(HOST));
    let port = support::free_port();
    args.push(format!("--metrics-addr=127.0.0.1:{port}"));
    let daemon = Daemon::start(&args);
    support::tree::eventually("not ready, saying why", || {
        let (status, body) = support::daemon::http_get(port, "/readyz");
        status == 503 && body.contains("placements are unknown")
    })
    .await;
    assert_eq!(app.running(instance).as_deref(), Some(container.as_str()));
    assert!(!app.container(&container).join("data/terminated").exists());

    // Readable again: the node starts and keeps the container.
    exchange(&link, &tree.host_dir(HOST));
    daemon.ready().await;
    assert_eq!(app.running(instance).as_deref(), Some(container.as_str()));
    assert!(!app.container(&container).join("data/terminated").exists());
    daemon.stop().await;
}

#[test]
fn a_servers_or_placement_directory_linked_out_of_the_tree_is_not_followed() {
    // The mirror never makes servers/ or placement/ a link. One that points
    // outside the tree must not make the hosts defined there managed (an
    // outside servers/h1 says h1 is CN=evil), nor the placements found
    // there count: the tree cannot be read, so nothing is written.
    for linked in ["servers", "placement"] {
        let s = Setup::new(&["h1"], &[("web-gmsa-hosts", &[])]);
        s.tree.place("h1", "web.app#1");
        let outside = tempfile::tempdir().expect("tmp");
        let elsewhere = outside.path().join(linked);
        fs::rename(s.tree.root().join(linked), &elsewhere).expect("move out");
        if linked == "servers" {
            fs::write(
                elsewhere.join("h1"),
                "partition: p1\nnt.dc: dc1.ad.com\nnt.dn: cn=evil,ou=Computers,dc=ad,dc=com\n",
            )
            .expect("outside server file");
        }
        symlink(&elsewhere, s.tree.root().join(linked)).expect("symlink");

        let mut args = s.args();
        args.push("--format=json".into());
        let ran = run(binary("plan", &args));
        assert_eq!(
            ran.code,
            Some(1),
            "{linked}: {}\n{}",
            ran.stdout,
            ran.stderr
        );
        let path = s.tree.root().join(linked);
        assert!(
            warned(&ran.stderr, &path, "a symbolic link"),
            "{linked}: {}",
            ran.stderr
        );
        let sync = run(binary("sync", &s.args()));
        assert_eq!(sync.code, Some(1), "{linked}: {}", sync.stderr);
        assert!(
            !s.is_member("web-gmsa-hosts", "h1"),
            "{linked}: nothing from outside the tree is written"
        );
    }
}
