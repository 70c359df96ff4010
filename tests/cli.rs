//! The command-line contract through the binary: exit codes of `plan
//! --exit-code` and `check`, one-line errors, options from the environment
//! and a config file, and the quick start of README.md.

mod support;

use std::fs;

use support::scenario::{copy_dir, run_bin};

/// The quick-start fixture copied to a temp dir, with a config file that
/// points at the copy.
struct QuickStart {
    dir: tempfile::TempDir,
}

impl QuickStart {
    fn new() -> QuickStart {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/quickstart");
        copy_dir(&root.join("tree"), &dir.path().join("tree"));
        fs::copy(
            root.join("directory.ldif"),
            dir.path().join("directory.ldif"),
        )
        .expect("copy directory");
        let config = format!(
            "fs-root: {}\npartition: east\ngroup-ou: OU=Groups,DC=ad,DC=com\ndirectory: {}\n",
            dir.path().join("tree").display(),
            dir.path().join("directory.ldif").display()
        );
        fs::write(dir.path().join("config.yml"), config).expect("config");
        QuickStart { dir }
    }

    fn config(&self) -> String {
        format!("--config={}", self.dir.path().join("config.yml").display())
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn plan_exit_code_says_whether_there_are_changes() {
    let q = QuickStart::new();
    let before = run_bin("plan", &args(&[&q.config(), "--exit-code"]));
    assert_eq!(before.code, 2, "changes pending: {}", before.stdout);
    assert_eq!(
        run_bin("plan", &args(&[&q.config()])).code,
        0,
        "without --exit-code"
    );
    let sync = run_bin("sync", &args(&[&q.config()]));
    assert_eq!(sync.code, 0, "{}{}", sync.stdout, sync.stderr);
    let after = run_bin("plan", &args(&[&q.config(), "--exit-code"]));
    assert_eq!(after.code, 0, "nothing left: {}", after.stdout);
    assert!(
        after.stdout.starts_with("# gmsa-reconciler plan: 0 groups"),
        "{}",
        after.stdout
    );
}

#[test]
fn json_output_has_the_specified_shape() {
    let q = QuickStart::new();
    let out = run_bin("plan", &args(&[&q.config(), "--format=json"]));
    assert_eq!(out.code, 0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    assert_eq!(v["summary"]["groups"], 3);
    assert_eq!(v["summary"]["adds"], 2);
    assert_eq!(v["summary"]["deletes"], 2);
    assert!(v["refused"].is_null());
    assert_eq!(v["missing_groups"][0]["proid"], "batch");
    let first = &v["changes"][0];
    assert_eq!(first["group_dn"], "cn=db-gmsa-hosts,ou=Groups,dc=ad,dc=com");
    assert_eq!(first["proid"], "db");
    assert_eq!(first["add"][0], "CN=WIN001,OU=Computers,DC=ad,DC=com");
}

#[test]
fn check_answers_with_its_exit_code() {
    let q = QuickStart::new();
    let member = run_bin(
        "check",
        &args(&[
            &q.config(),
            "--proid=web",
            "--host-dn=cn=win001,ou=computers,dc=ad,dc=com",
        ]),
    );
    assert_eq!(member.code, 0, "{}", member.stdout);
    let not_member = run_bin(
        "check",
        &args(&[
            &q.config(),
            "--proid=web",
            "--host-dn=CN=WIN002,OU=Computers,DC=ad,DC=com",
        ]),
    );
    assert_eq!(not_member.code, 3, "{}", not_member.stdout);
    let no_group = run_bin(
        "check",
        &args(&[
            &q.config(),
            "--proid=batch",
            "--host-dn=CN=WIN003,OU=Computers,DC=ad,DC=com",
        ]),
    );
    assert_eq!(no_group.code, 1);
    assert!(
        no_group.stderr.contains("batch-gmsa-hosts"),
        "{}",
        no_group.stderr
    );
}

#[test]
fn errors_are_one_line_and_usage_errors_exit_1() {
    let q = QuickStart::new();
    let usage = run_bin("plan", &args(&["--no-such-option"]));
    assert_eq!(
        usage.code, 1,
        "not clap's 2, which means 'changes' for plan"
    );
    let bad_pattern = run_bin("plan", &args(&[&q.config(), "--group-pattern=gmsa-hosts"]));
    assert_eq!(bad_pattern.code, 1);
    let lines: Vec<&str> = bad_pattern.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", bad_pattern.stderr);
    assert!(
        lines[0].contains("--group-pattern") && lines[0].contains("gmsa-hosts"),
        "{}",
        lines[0]
    );
    let missing = run_bin(
        "plan",
        &args(&[&q.config(), "--directory=/nonexistent/directory.ldif"]),
    );
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("/nonexistent/directory.ldif"),
        "{}",
        missing.stderr
    );
    assert!(!missing.stderr.contains("backtrace"), "{}", missing.stderr);
}

#[test]
fn options_come_from_the_environment_and_a_flag_beats_it() {
    let q = QuickStart::new();
    let tree = q.dir.path().join("tree");
    let directory = q.dir.path().join("directory.ldif");
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gmsa-reconciler"));
        cmd.arg("plan").args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env_remove("GMSA_CONFIG");
        let out = cmd.output().expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let env = [
        ("GMSA_FS_ROOT", tree.to_str().expect("utf-8")),
        ("GMSA_DIRECTORY", directory.to_str().expect("utf-8")),
        ("GMSA_GROUP_OU", "OU=Groups,DC=ad,DC=com"),
        ("GMSA_PARTITION", "east"),
    ];
    let (code, east) = run(&[], &env);
    assert_eq!(code, Some(0));
    assert!(east.contains("3 groups"), "{east}");
    // The flag wins: the west partition has only win101, already in its
    // group, and the east hosts are not managed there.
    let (code, west) = run(&["--partition=west"], &env);
    assert_eq!(code, Some(0));
    assert!(
        west.starts_with("# gmsa-reconciler plan: 0 groups"),
        "{west}"
    );
}

#[test]
fn an_unknown_config_key_is_an_error_that_suggests_the_nearest_key() {
    let q = QuickStart::new();
    let config = q.dir.path().join("typo.yml");
    fs::write(&config, "fs-rot: tree\ngroup-ou: OU=Groups,DC=ad,DC=com\n").expect("config");
    let out = run_bin("plan", &args(&[&format!("--config={}", config.display())]));
    assert_eq!(out.code, 1, "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    assert!(
        lines[0].contains("unknown key \"fs-rot\"")
            && lines[0].contains("did you mean \"fs-root\""),
        "{}",
        lines[0]
    );
    // Nothing near: no suggestion at all.
    fs::write(&config, "zzzzzzzz: 1\n").expect("config");
    let out = run_bin("plan", &args(&[&format!("--config={}", config.display())]));
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("unknown key \"zzzzzzzz\"") && !out.stderr.contains("did you mean"),
        "{}",
        out.stderr
    );
}
