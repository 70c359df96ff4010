//! Hostile files in node mode, through the binary: what stands in a
//! manifest's place in `scheduled/` (a FIFO, a symlink to a manifest
//! outside the tree, a file above 1 MiB) and what stands in a marker's
//! place in a container's `data/` (`terminated` and `aborted` as symlinks
//! to files outside the app root). The daemon must refuse each with a
//! warning naming the file, go on configuring the other instances, never
//! create, read or touch anything outside the app root through a link,
//! and exit 0 on SIGTERM.

mod support;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use support::node::{manifest, schedule, AppRoot, NodeProcess};
use support::tree::Tree;
use support::wait_until;

const HOST: &str = "node1.ad.test";
const WAIT: Duration = Duration::from_secs(20);

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// A tree ready for node mode and an app root, both in temp directories,
/// and a third directory standing for "outside".
struct Setup {
    tree: Tree,
    _tmp: tempfile::TempDir,
    app: AppRoot,
    outside: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tree = Tree::new();
        fs::create_dir(tree.root().join("scheduled")).expect("scheduled/");
        fs::create_dir_all(tree.host_dir(HOST)).expect("placement dir");
        tree.mark_ready();
        let tmp = tempfile::tempdir().expect("temp dir");
        let app = AppRoot::new(&tmp.path().join("node"));
        Setup {
            tree,
            _tmp: tmp,
            app,
            outside: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn start(&self) -> NodeProcess {
        NodeProcess::start(self.tree.root(), self.app.path(), HOST, &[])
    }

    fn place(&self, instance: &str) {
        schedule(self.tree.root(), instance, &manifest("proid1", instance));
        self.tree.place(HOST, instance);
    }

    /// Waits for the instance's container and returns its directory.
    fn configured(&self, instance: &str) -> std::path::PathBuf {
        wait_until(&format!("{instance} configured"), WAIT, || {
            self.app.running(instance).is_some()
                && !self.app.events_of(instance, "configured").is_empty()
        });
        self.app
            .container(&self.app.running(instance).expect("running link"))
    }

    /// The one `aborted` event of an instance: its data and its content.
    fn aborted(&self, instance: &str) -> (String, String) {
        wait_until(&format!("{instance} aborted"), WAIT, || {
            !self.app.events_of(instance, "aborted").is_empty()
        });
        let events: Vec<_> = self
            .app
            .events()
            .into_iter()
            .filter(|e| e.instance == instance && e.kind == "aborted")
            .collect();
        assert_eq!(events.len(), 1, "{events:?}");
        let why: String = serde_yaml::from_str(&events[0].content).expect("a YAML string");
        (events[0].data.clone(), why)
    }

    /// Nothing was made for an instance: no link, no container, no
    /// `configured` event.
    fn nothing_made(&self, instance: &str) {
        assert!(self.app.running(instance).is_none(), "{instance} running");
        let prefix = format!("{}-", instance.replace('#', "-"));
        assert!(
            !self
                .app
                .names("apps")
                .iter()
                .any(|n| n.starts_with(&prefix)),
            "{instance}: {:?}",
            self.app.names("apps")
        );
        assert!(self.app.events_of(instance, "configured").is_empty());
    }
}

/// A file's content and modification time, to prove it untouched.
fn fingerprint(path: &Path) -> (Vec<u8>, SystemTime) {
    let meta = fs::metadata(path).expect("stat");
    (
        fs::read(path).expect("read"),
        meta.modified().expect("mtime"),
    )
}

/// Runs a container's generated `finish` script with sh, as the supervisor
/// would after the container's process exited with `rc` and `signal`.
fn run_finish_script(container_dir: &Path, rc: &str, signal: &str) -> String {
    let out = support::run(
        Command::new("sh")
            .arg(container_dir.join("finish"))
            .args([rc, signal]),
        b"",
        "the container's finish script",
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_fifo_link_or_huge_file_as_a_manifest_is_refused_while_the_daemon_goes_on() {
    let s = Setup::new();
    let first = "proid1.first#0000000001";
    s.place(first);
    let daemon = s.start();
    s.configured(first);

    let scheduled = s.tree.root().join("scheduled");
    // A FIFO: opening it for reading would wait for a writer forever.
    let fifo = "proid1.fifo#0000000002";
    mkfifo(&scheduled.join(fifo));
    s.tree.place(HOST, fifo);
    // A symlink to a valid manifest outside the tree.
    let linked = "proid1.linked#0000000003";
    let elsewhere = s.outside.path().join("manifest");
    fs::write(&elsewhere, manifest("proid1", "outside")).expect("write");
    symlink(&elsewhere, scheduled.join(linked)).expect("symlink");
    s.tree.place(HOST, linked);
    // A valid manifest padded past 1 MiB with a YAML comment.
    let huge = "proid1.huge#0000000004";
    let padded = manifest("proid1", "huge") + "#" + &"x".repeat(1 << 20) + "\n";
    schedule(s.tree.root(), huge, &padded);
    s.tree.place(HOST, huge);
    // Placed after all of them: still configured.
    let after = "proid1.after#0000000005";
    s.place(after);
    s.configured(after);

    for (instance, says) in [
        (fifo, "a FIFO, not a regular file"),
        (linked, "a symbolic link, not a regular file"),
        (huge, "too large"),
    ] {
        let (data, why) = s.aborted(instance);
        assert_eq!(data, "invalid-manifest", "{instance}");
        assert!(why.contains(&format!("scheduled/{instance}")), "{why}");
        assert!(why.contains(says), "{instance}: {why}");
        s.nothing_made(instance);
    }
    assert_eq!(
        fs::read_to_string(&elsewhere).expect("read"),
        manifest("proid1", "outside")
    );

    let stderr = daemon.stop();
    for instance in [fifo, linked, huge] {
        let line = stderr
            .lines()
            .find(|l| l.contains("WARN") && l.contains(&format!("scheduled/{instance}")))
            .unwrap_or_else(|| panic!("no warning names scheduled/{instance}:\n{stderr}"));
        assert!(line.contains("manifest refused"), "{line}");
    }
    assert!(stderr.contains("a FIFO, not a regular file"), "{stderr}");
}

#[test]
fn marker_links_to_files_outside_the_app_root_are_never_followed() {
    let s = Setup::new();
    let daemon = s.start();
    let [linked, dangling, aborted] = [
        "proid1.linked#0000000001",
        "proid1.dangling#0000000002",
        "proid1.aborted#0000000003",
    ];
    let dirs: Vec<_> = [linked, dangling, aborted]
        .into_iter()
        .map(|instance| {
            s.place(instance);
            s.configured(instance)
        })
        .collect();

    // A file outside whose content would make an event of its own, with an
    // old modification time so that a touch through a link would show.
    let secret = s.outside.path().join("secret");
    fs::write(
        &secret,
        r#"{"why": "planted", "payload": {"from": "outside"}}"#,
    )
    .expect("write");
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    fs::File::options()
        .write(true)
        .open(&secret)
        .and_then(|f| f.set_modified(old))
        .expect("set mtime");
    let before = fingerprint(&secret);
    let never = s.outside.path().join("never-created");

    // `data/terminated` planted as links, then the placements go: the node
    // marks them terminated without writing through the links.
    symlink(&secret, dirs[0].join("data/terminated")).expect("symlink");
    symlink(&never, dirs[1].join("data/terminated")).expect("symlink");
    s.tree.unplace(HOST, linked);
    s.tree.unplace(HOST, dangling);
    for (instance, dir) in [(linked, &dirs[0]), (dangling, &dirs[1])] {
        let unique_name = dir.file_name().expect("name").to_str().expect("UTF-8");
        let marker = dir.join("data/terminated");
        wait_until(&format!("{instance} terminated"), WAIT, || {
            s.app.in_cleanup(unique_name).is_some()
                && fs::symlink_metadata(&marker).is_ok_and(|m| m.is_file())
        });
        // The marker now counts: the container's end reports nothing.
        run_finish_script(dir, "0", "0");
        assert!(
            s.app.events_of(instance, "finished").is_empty(),
            "{instance}"
        );
    }
    assert_eq!(
        fingerprint(&secret),
        before,
        "the outside file is untouched"
    );
    assert!(!never.exists(), "nothing is created outside the app root");

    // `data/aborted` (and `terminated`) planted as links by the container
    // itself, which then exits 3: the links count as absent and are not
    // read; the one event is the exit's.
    symlink(&secret, dirs[2].join("data/aborted")).expect("symlink");
    symlink(&secret, dirs[2].join("data/terminated")).expect("symlink");
    let finish_stderr = run_finish_script(&dirs[2], "3", "0");
    assert_eq!(s.app.events_of(aborted, "finished"), ["3.0"]);
    assert!(s.app.events_of(aborted, "aborted").is_empty());
    let all: Vec<_> = s.app.events().into_iter().map(|e| e.kind).collect();
    assert!(!all.contains(&"aborted".to_owned()), "{all:?}");
    for event in s.app.events() {
        assert!(!event.content.contains("planted"), "{event:?}");
    }
    assert!(
        finish_stderr.contains("data/aborted") && finish_stderr.contains("a symbolic link"),
        "finish warns about the link: {finish_stderr}"
    );
    assert_eq!(
        fingerprint(&secret),
        before,
        "the outside file is untouched"
    );

    let stderr = daemon.stop();
    assert!(
        stderr.contains("data/terminated") && stderr.contains("replaced, not followed"),
        "{stderr}"
    );
}
