//! `--log-format json` through the binary: every line on standard error is
//! a JSON object, whatever ends the run: warnings and the fatal error of a
//! command, clap's usage errors, a broken config file, `config`'s
//! problems; and the format is honoured from the flag, the environment
//! and the config file.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use support::scenario::copy_dir;

/// Runs the binary with `args` and exactly the `GMSA_*` variables given;
/// returns the exit code and standard error.
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gmsa-reconciler"));
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GMSA_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run gmsa-reconciler");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every line of `stderr` parsed as a JSON object; at least one.
fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    assert!(!stderr.is_empty(), "nothing on standard error");
    stderr
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{stderr}"));
            assert!(value.is_object(), "{line}");
            value
        })
        .collect()
}

fn message(line: &serde_json::Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or_default()
}

/// The quick-start tree with one broken server file (a warning) and a
/// config file naming a directory file that is missing (the fatal error).
fn broken_tree(dir: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/quickstart/tree");
    copy_dir(&root, &dir.join("tree"));
    fs::write(dir.join("tree/.modified"), "").expect("marker");
    fs::write(dir.join("tree/servers/broken.ad.com"), "partition: [east\n").expect("server");
    fs::create_dir(dir.join("tree/placement/broken.ad.com")).expect("placement");
    let config = dir.join("gmsa.yml");
    fs::write(
        &config,
        "fs-root: tree\npartition: east\ngroup-ou: OU=Groups,DC=ad,DC=com\ndirectory: missing.ldif\n",
    )
    .expect("config");
    format!("--config={}", config.display())
}

#[test]
fn warnings_and_the_fatal_error_are_json_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = broken_tree(dir.path());
    let (code, stderr) = run(&["plan", &config, "--log-format=json"], &[]);
    assert_eq!(code, 1, "{stderr}");
    let lines = json_lines(&stderr);
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN" && message(l).contains("broken.ad.com")),
        "the broken server file is a warning: {stderr}"
    );
    let last = lines.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{stderr}");
    assert!(message(last).contains("missing.ldif"), "{stderr}");
    assert!(
        last["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{last}"
    );
    // The same run in text prints the error as a plain line.
    let (code, text) = run(&["plan", &config], &[]);
    assert_eq!(code, 1);
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("gmsa-reconciler: error: ")),
        "{text}"
    );
}

#[test]
fn usage_errors_are_json_from_the_flag_or_the_environment() {
    let (code, stderr) = run(&["plan", "--log-format", "json", "--no-such-option"], &[]);
    assert_eq!(code, 1);
    let lines = json_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert_eq!(lines[0]["level"], "ERROR");
    assert!(
        message(&lines[0]).contains("unexpected argument '--no-such-option'"),
        "{stderr}"
    );

    let (code, stderr) = run(
        &["sync", "--max-delete=many"],
        &[("GMSA_LOG_FORMAT", "json")],
    );
    assert_eq!(code, 1);
    let lines = json_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(message(&lines[0]).contains("'many'"), "{stderr}");
}

#[test]
fn a_config_file_that_asks_for_json_gets_its_own_errors_in_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("gmsa.yml");
    fs::write(
        &file,
        "log-format: json\nfs-root: /t\ngroup-ou: OU=G,DC=x\npartiton: east\n",
    )
    .expect("config");
    let config = format!("--config={}", file.display());
    let (code, stderr) = run(&["plan", &config], &[]);
    assert_eq!(code, 1);
    let lines = json_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        message(&lines[0]).contains("did you mean \"partition\"?"),
        "{stderr}"
    );
    // A flag beats the file, as for every option.
    let (_, text) = run(&["plan", &config, "--log-format=text"], &[]);
    assert!(text.starts_with("gmsa-reconciler: error: "), "{text}");

    let (code, stderr) = run(&["config", "plan", &config], &[]);
    assert_eq!(code, 1);
    let lines = json_lines(&stderr);
    assert!(lines.iter().all(|l| l["level"] == "ERROR"), "{stderr}");
    assert!(
        lines.iter().any(|l| message(l).contains("partiton")),
        "{stderr}"
    );
}
