//! What `plan` and `sync` say is what they did or would do: deletions the
//! guard refused are data in the JSON, the summary counts agree with
//! `plan --exit-code`, LDAP errors name the result code by number
//! and name with the server's own text, and a `--partition` that matches no
//! server file is a warning at the default log level.

mod support;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::daemon_bin::DaemonProcess;
use support::e2e::{bin, password_file};
use support::scenario::{run_bin, Output};
use support::tree::{groups_ldif, Tree};
use support::Slapd;

const OU: &str = "--group-ou=ou=Groups,dc=ad,dc=com";

fn host_dn(i: usize) -> String {
    format!("CN=h{i:02},OU=Computers,DC=ad,DC=com")
}

/// A ready tree of `hosts` in-scope hosts, the first `placed` of them
/// running `web`, and an LDIF directory whose `web` group holds `members`.
fn setup(dir: &Path, hosts: usize, placed: usize, members: &[String]) -> (Tree, PathBuf) {
    let tree = Tree::new();
    for i in 0..hosts {
        tree.server(&format!("h{i:02}"), "east", &host_dn(i));
        if i < placed {
            tree.place(&format!("h{i:02}"), &format!("web.app#{i:010}"));
        }
    }
    tree.mark_ready();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let directory = dir.join("directory.ldif");
    fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &members)])).expect("directory");
    (tree, directory)
}

fn args(tree: &Tree, directory: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("--fs-root={}", tree.root().display()),
        format!("--directory={}", directory.display()),
        OU.to_owned(),
        "--partition=east".to_owned(),
        "--format=json".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}{}", out.stdout, out.stderr))
}

/// `plan --exit-code` exits 2 exactly when `changes` or `refused` is non-empty.
fn assert_exit_agrees(out: &Output, v: &Value) {
    let pending = !v["changes"].as_array().expect("changes").is_empty() || !v["refused"].is_null();
    assert_eq!(out.code, if pending { 2 } else { 0 }, "{}", out.stdout);
}

#[test]
fn refused_deletions_are_data_in_the_json_and_the_exit_code_agrees() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Twelve members, none placed: twelve deletions, all of the managed
    // members, beyond the guard's 20%.
    let members: Vec<String> = (0..12).map(host_dn).collect();
    let (tree, directory) = setup(dir.path(), 12, 0, &members);

    let out = run_bin("plan", &args(&tree, &directory, &["--exit-code"]));
    let v = json(&out);
    assert_exit_agrees(&out, &v);
    assert_eq!(out.code, 2, "refused deletions are pending changes");
    assert_eq!(v["changes"], serde_json::json!([]), "{}", out.stdout);
    let refused = &v["refused"];
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--max-delete-percent")),
        "{refused}"
    );
    let deletions = refused["deletions"].as_array().expect("deletions");
    assert_eq!(deletions.len(), 1, "{refused}");
    let deletion = deletions[0].as_object().expect("object");
    let keys: Vec<&str> = deletion.keys().map(String::as_str).collect();
    assert_eq!(keys, ["delete", "group_dn", "proid"], "{refused}");
    assert_eq!(
        deletion["group_dn"],
        "cn=web-gmsa-hosts,ou=Groups,dc=ad,dc=com"
    );
    assert_eq!(deletion["proid"], "web");
    let deleted: Vec<&str> = deletion["delete"]
        .as_array()
        .expect("delete")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        deleted,
        members.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(
        v["summary"],
        serde_json::json!({"groups": 0, "adds": 0, "deletes": 0, "refused_deletes": 12})
    );

    // The same deletions allowed: changes, not refusals.
    let allowed = run_bin(
        "plan",
        &args(&tree, &directory, &["--exit-code", "--allow-mass-delete"]),
    );
    let v = json(&allowed);
    assert_exit_agrees(&allowed, &v);
    assert!(v["refused"].is_null(), "{}", allowed.stdout);
    assert_eq!(
        v["summary"],
        serde_json::json!({"groups": 1, "adds": 0, "deletes": 12, "refused_deletes": 0})
    );

    // `sync` reports the refusal the same way, and exits 1: not applied.
    let sync = run_bin("sync", &args(&tree, &directory, &[]));
    assert_eq!(sync.code, 1, "{}{}", sync.stdout, sync.stderr);
    let v = json(&sync);
    assert_eq!(
        v["refused"]["deletions"][0]["delete"]
            .as_array()
            .map(Vec::len),
        Some(12)
    );
    assert_eq!(v["summary"]["refused_deletes"], 12);
    // Nothing was deleted.
    let after = fs::read_to_string(&directory).expect("directory");
    assert_eq!(after.matches("member: ").count(), 12, "{after}");
}

#[test]
fn summary_counts_and_exit_code_agree_with_and_without_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    // h00 and h01 placed, h01 and h02 members: one addition, one deletion.
    let (tree, directory) = setup(dir.path(), 3, 2, &[host_dn(1), host_dn(2)]);
    let out = run_bin("plan", &args(&tree, &directory, &["--exit-code"]));
    let v = json(&out);
    assert_exit_agrees(&out, &v);
    assert_eq!(
        v["summary"],
        serde_json::json!({"groups": 1, "adds": 1, "deletes": 1, "refused_deletes": 0})
    );
    let sync = run_bin("sync", &args(&tree, &directory, &[]));
    assert_eq!(sync.code, 0, "{}{}", sync.stdout, sync.stderr);
    let after = run_bin("plan", &args(&tree, &directory, &["--exit-code"]));
    let v = json(&after);
    assert_exit_agrees(&after, &v);
    assert_eq!(after.code, 0);
    assert_eq!(
        v["summary"],
        serde_json::json!({"groups": 0, "adds": 0, "deletes": 0, "refused_deletes": 0})
    );
}

#[test]
fn a_partition_glob_matching_no_server_file_is_a_warning_at_the_default_level() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (tree, directory) = setup(dir.path(), 2, 2, &[]);
    let mut typo = args(&tree, &directory, &[]);
    typo.retain(|a| !a.starts_with("--partition"));
    typo.push("--partition=eats".to_owned());
    let out = run_bin("plan", &typo);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("--partition"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", out.stderr);
    assert!(
        warnings[0].contains(
            "--partition \"eats\" matches no server file: the 2 usable server files have partition \"east\";"
        ),
        "{}",
        warnings[0]
    );
    // Quiet when it matches.
    let out = run_bin("plan", &args(&tree, &directory, &[]));
    assert!(
        !out.stderr.contains("matches no server file"),
        "{}",
        out.stderr
    );
}

#[test]
fn the_daemon_warns_of_a_partition_glob_matching_no_server_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (tree, directory) = setup(dir.path(), 1, 1, &[]);
    let mut daemon = DaemonProcess::start(&[
        format!("--fs-root={}", tree.root().display()),
        format!("--directory={}", directory.display()),
        OU.to_owned(),
        "--partition=eats".to_owned(),
        "--no-lock".to_owned(),
    ]);
    daemon.wait_ready();
    let log = daemon.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("matches no server file"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("--partition \"eats\" matches no server file: the 1 usable server file has partition \"east\""),
        "{}",
        warnings[0]
    );
    assert_eq!(daemon.stop(), Some(0));
}

/// A plan against slapd whose bind fails, and the one error line it prints.
fn failed_bind(bind_dn: &str, password: &str) -> String {
    let slapd = Slapd::shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let (tree, _) = setup(dir.path(), 1, 1, &[]);
    let pw = password_file(dir.path(), password);
    let out = bin()
        .arg("plan")
        .arg(format!("--fs-root={}", tree.root().display()))
        .arg(OU)
        .arg(format!("--ldap-url={}", slapd.url()))
        .arg(format!("--bind-dn={bind_dn}"))
        .arg(format!("--bind-password-file={}", pw.display()))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains(password), "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("gmsa-reconciler: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_owned()
}

#[test]
fn ldap_errors_name_the_result_code_by_number_and_name_with_the_servers_text() {
    // slapd answers a wrong password with 49 and no text of its own.
    let wrong = failed_bind(Slapd::SVC_DN, "not-the-password");
    assert!(
        wrong.contains(&format!(
            "{}: LDAP 49 invalidCredentials (the server gave no diagnostic text)",
            Slapd::SVC_DN
        )),
        "{wrong}"
    );
    assert!(!wrong.contains("LDAP result"), "{wrong}");
    // A bind DN that is no DN: 34, with slapd's diagnostic text.
    let bad_dn = failed_bind("not a dn", "whatever-it-is");
    assert!(
        bad_dn.contains("LDAP 34 invalidDNSyntax: invalid DN"),
        "{bad_dn}"
    );
}
