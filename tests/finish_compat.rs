//! `finish` as the original system's containers use it, through the binary:
//! `exitinfo` as that system writes it (`{"service", "return_code",
//! "signal"}`, no timestamp), with fields missing or unparseable; container
//! directories without `data/app.json`; an app name with a quote and a
//! backslash through the real generated `run` and `finish` scripts, run
//! with sh; and plain files in `running/` found at start-up, which are not
//! the node's and are left alone.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::node::{manifest, schedule, AppRoot, NodeProcess};
use support::tree::Tree;
use support::wait_until;

const HOST: &str = "node1.ad.test";
const WAIT: Duration = Duration::from_secs(20);

/// Runs `gmsa-reconciler finish <container_dir>`.
fn finish(container_dir: &Path) -> Output {
    support::run_unchecked(support::e2e::bin().arg("finish").arg(container_dir), b"")
}

/// An app root as the original node agent leaves it: `apps/` and
/// `appevents/`, containers with a `data/` and no `app.json`.
fn bare_app_root() -> (tempfile::TempDir, AppRoot) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let app = AppRoot::new(&tmp.path().join("node"));
    fs::create_dir_all(app.path().join("apps")).expect("apps/");
    fs::create_dir_all(app.path().join("appevents")).expect("appevents/");
    (tmp, app)
}

fn container(app: &AppRoot, unique_name: &str, markers: &[(&str, &str)]) -> PathBuf {
    let dir = app.container(unique_name);
    fs::create_dir_all(dir.join("data")).expect("data/");
    for (name, content) in markers {
        fs::write(dir.join("data").join(name), content).expect("marker");
    }
    dir
}

#[test]
fn exitinfo_in_every_shape_gives_exactly_one_finished_event() {
    let (_tmp, app) = bare_app_root();
    let shapes = [
        // As the original system writes it.
        (
            r#"{"service": "web_server", "return_code": 0, "signal": 0}"#,
            "0.0",
        ),
        (
            r#"{"service": "web_server", "return_code": 1, "signal": 15}"#,
            "1.15",
        ),
        // Fields missing count as 256.
        (r#"{"service": "web_server", "return_code": 3}"#, "3.256"),
        (r#"{"service": "web_server", "signal": 9}"#, "256.9"),
        (r#"{"service": "web_server"}"#, "256.256"),
        (r#"{"return_code": "7", "signal": null}"#, "256.256"),
        // Unparseable reads as {}.
        (
            "{\"service\": \"web_server\", \"return_code\": 0,",
            "256.256",
        ),
        ("[0, 0]", "256.256"),
        ("", "256.256"),
        ("\u{0}\u{1}binary\u{ff}", "256.256"),
        // With the timestamp this product's own scripts add.
        (
            r#"{"service": "web", "return_code": 2, "signal": 0, "timestamp": 1700000000}"#,
            "2.0",
        ),
    ];
    for (i, (exitinfo, data)) in shapes.iter().enumerate() {
        let task = format!("{:03}", i + 1);
        let instance = format!("proid.myapp#{task}");
        let dir = container(
            &app,
            &format!("proid.myapp-{task}-0000000ID1234"),
            &[("exitinfo", exitinfo)],
        );
        for round in 0..2 {
            let out = finish(&dir);
            assert!(
                out.status.success(),
                "{exitinfo:?} (round {round}): {out:?}"
            );
        }
        let events: Vec<_> = app
            .events()
            .into_iter()
            .filter(|e| e.instance == instance)
            .collect();
        assert_eq!(events.len(), 1, "{exitinfo:?}: {events:?}");
        assert_eq!(
            (events[0].kind.as_str(), events[0].data.as_str()),
            ("finished", *data)
        );
        let held: serde_json::Value =
            serde_yaml::from_str(&events[0].content).expect("the event file is YAML");
        let as_read = match serde_json::from_str::<serde_json::Value>(exitinfo) {
            Ok(value @ serde_json::Value::Object(_)) => value,
            _ => serde_json::json!({}),
        };
        assert_eq!(
            held, as_read,
            "the event file holds the exitinfo as read: {exitinfo:?}"
        );
    }
    assert_eq!(app.events().len(), shapes.len());
}

#[test]
fn finish_without_app_json_takes_the_instance_from_the_directory_name() {
    let (_tmp, app) = bare_app_root();
    let exit = r#"{"service": "web_server", "return_code": 0, "signal": 0}"#;
    // The original system's own cases: oom, and terminated over an exitinfo.
    let oom = container(&app, "proid.myapp-001-0000000ID1234", &[("oom", "")]);
    let terminated = container(
        &app,
        "proid.myapp-002-0000000ID1234",
        &[("terminated", ""), ("exitinfo", exit)],
    );
    let exited = container(
        &app,
        "proid.my-app.x-003-0000000000abc",
        &[("exitinfo", exit)],
    );
    for dir in [&oom, &terminated, &exited] {
        let out = finish(dir);
        assert!(out.status.success(), "{}: {out:?}", dir.display());
    }
    let mut events: Vec<_> = app
        .events()
        .into_iter()
        .map(|e| (e.instance, e.kind, e.data))
        .collect();
    events.sort();
    assert_eq!(
        events,
        [
            ("proid.my-app.x#003".into(), "finished".into(), "0.0".into()),
            ("proid.myapp#001".into(), "killed".into(), "oom".into()),
        ]
    );
    assert_eq!(
        String::from_utf8_lossy(&finish(&terminated).stdout),
        "no event to post\n"
    );

    // A directory whose name is no container's, and no app.json: an error
    // that names the directory, and no event.
    let odd = container(&app, "not-a-container", &[("exitinfo", exit)]);
    let out = finish(&odd);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not-a-container") && stderr.contains("app.json"),
        "{stderr}"
    );
    assert_eq!(app.events().len(), 2);
}

#[test]
fn a_name_with_a_quote_and_a_backslash_keeps_its_finished_event() {
    let tree = Tree::new();
    tree.mark_ready();
    let tmp = tempfile::tempdir().expect("temp dir");
    let app = AppRoot::new(&tmp.path().join("node"));
    let daemon = NodeProcess::start(tree.root(), app.path(), HOST, &[]);
    // `command:` makes one service named after the app: `we"b\x`.
    let instance = r#"proid1.we"b\x#0000000001"#;
    let text =
        "proid: proid1\nenvironment: dev\ncpu: 10%\nmemory: 64M\ndisk: 1G\ncommand: exit 3\n";
    schedule(tree.root(), instance, text);
    tree.place(HOST, instance);
    wait_until("the container configured", WAIT, || {
        app.running(instance).is_some() && !app.events_of(instance, "configured").is_empty()
    });
    let dir = app.container(&app.running(instance).expect("running"));

    // The supervisor's part, with the real scripts: run, then finish with
    // the exit code run ended with.
    let run = Command::new("sh")
        .arg(dir.join("run"))
        .output()
        .expect("sh run");
    assert_eq!(run.status.code(), Some(3), "{run:?}");
    let out = support::run(
        Command::new("sh").arg(dir.join("finish")).args(["3", "0"]),
        b"",
        "sh finish",
    );
    let exitinfo: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("data/exitinfo")).expect("exitinfo"))
            .unwrap_or_else(|e| panic!("exitinfo is JSON: {e}; {out:?}"));
    assert_eq!(exitinfo["service"], r#"we"b\x"#);
    assert_eq!(app.events_of(instance, "finished"), ["3.0"]);
    let event = app
        .events()
        .into_iter()
        .find(|e| e.kind == "finished")
        .expect("finished");
    let held: serde_json::Value = serde_yaml::from_str(&event.content).expect("YAML");
    assert_eq!(held, exitinfo);
    daemon.stop();
}

#[test]
fn plain_files_in_running_are_left_alone_at_startup() {
    let tree = Tree::new();
    tree.mark_ready();
    let tmp = tempfile::tempdir().expect("temp dir");
    let app = AppRoot::new(&tmp.path().join("node"));
    let running = app.path().join("running");
    fs::create_dir_all(&running).expect("running/");
    // One not placed, one whose instance is placed: neither is a link the
    // node made, so neither is the node's to delete.
    let stray = "proid1.stray#0000000001";
    let placed = "proid1.placed#0000000002";
    for name in [stray, placed] {
        fs::write(
            running.join(name),
            format!("{name} belongs to someone else\n"),
        )
        .expect("write");
    }
    let good = "proid1.good#0000000003";
    for instance in [placed, good] {
        schedule(tree.root(), instance, &manifest("proid1", instance));
        tree.place(HOST, instance);
    }
    let daemon = NodeProcess::start(tree.root(), app.path(), HOST, &[]);
    daemon.wait_for_log("node start-up reconciled");
    wait_until("the other instance configured", WAIT, || {
        app.running(good).is_some()
    });
    let stderr = daemon.stop();

    for name in [stray, placed] {
        assert_eq!(
            fs::read_to_string(running.join(name)).expect("still there"),
            format!("{name} belongs to someone else\n")
        );
        let line = stderr
            .lines()
            .find(|l| l.contains("WARN") && l.contains(&format!("running/{name}")))
            .unwrap_or_else(|| panic!("no warning names running/{name}:\n{stderr}"));
        assert!(line.contains("left alone"), "{line}");
    }
    assert!(app.events_of(placed, "configured").is_empty());
    assert_eq!(app.events_of(good, "configured").len(), 1);
}
