//! Hostile input class: paths. Relative, symlinked and missing path options
//! given to the binary, from flags and from a config file in another folder
//! than the working directory. Path options are made absolute once at
//! startup: relative to the working directory from flags and the
//! environment, relative to the file's folder from a `--config` file; a
//! path that does not exist is reported as such, not as a tree that is
//! not ready.
//!
//! The watcher reports absolute paths; a root left relative matched none of
//! them and `run` ignored every change after its first scan. These tests run
//! the binary with a working directory of their choosing, so that the paths
//! they give really are relative.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use support::e2e::bin;
use support::tree::{groups_ldif, write_atomically};
use support::{free_port, wait_until};

const GROUP_OU: &str = "OU=Groups,DC=ad,DC=com";

fn host_dn(host: &str) -> String {
    format!("CN={host},OU=Computers,DC=ad,DC=com")
}

/// `<work>/cell`: a ready tree with servers h1 and h2 (partition p1) and
/// `web.app#1` placed on h1; `<work>/directory.ldif` with an empty
/// `web-gmsa-hosts` group.
fn workspace() -> tempfile::TempDir {
    let work = tempfile::tempdir().expect("temp dir");
    let cell = work.path().join("cell");
    fs::create_dir_all(cell.join("servers")).expect("servers/");
    fs::create_dir_all(cell.join("placement/h1")).expect("placement/");
    for host in ["h1", "h2"] {
        let server = format!(
            "partition: p1\nnt.dc: dc1.ad.com\nnt.dn: {}\n",
            host_dn(host)
        );
        write_atomically(&cell.join("servers").join(host), &server);
    }
    write_atomically(&cell.join("placement/h1/web.app#1"), "{}");
    write_atomically(&cell.join(".modified"), "");
    fs::write(
        work.path().join("directory.ldif"),
        groups_ldif(&[("web-gmsa-hosts", &[])]),
    )
    .expect("directory");
    work
}

/// The members of `web-gmsa-hosts` in the LDIF file, lower case, sorted.
fn web_members(directory: &Path) -> Vec<String> {
    let text = fs::read_to_string(directory).unwrap_or_default();
    let Ok(records) = gmsa_reconciler::ldif::parse(&text) else {
        return Vec::new();
    };
    let mut members: Vec<String> = records
        .iter()
        .filter(|r| r.dn.to_lowercase().starts_with("cn=web-gmsa-hosts,"))
        .flat_map(|r| r.attrs.iter())
        .filter(|(k, _)| k.eq_ignore_ascii_case("member"))
        .map(|(_, v)| v.to_lowercase())
        .collect();
    members.sort();
    members
}

fn lower(hosts: &[&str]) -> Vec<String> {
    hosts.iter().map(|h| host_dn(h).to_lowercase()).collect()
}

/// `run` started in `cwd` with `args` (metrics on a free port).
fn start_run(cwd: &Path, args: &[&str]) -> (Child, u16) {
    let port = free_port();
    let child = bin()
        .current_dir(cwd)
        .arg("run")
        .args(args)
        .args([
            &format!("--group-ou={GROUP_OU}"),
            "--partition=p1",
            "--no-lock",
            "--batch-window=20ms",
            &format!("--metrics-addr=127.0.0.1:{port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start run");
    (child, port)
}

/// SIGTERM, then the exit status and standard error.
fn stop(child: Child) -> (i32, String) {
    // SAFETY: kill(2) of our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let out = child.wait_with_output().expect("wait");
    (out.status.code().unwrap_or(-1), stderr_of(&out))
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The daemon's /readyz body.
fn readyz(port: u16) -> String {
    support::daemon::http_get(port, "/readyz").1
}

/// The regression: `run --fs-root cell` (relative) follows the tree after its
/// first scan.
#[test]
fn run_with_a_relative_fs_root_applies_a_live_placement_change() {
    let work = workspace();
    let directory = work.path().join("directory.ldif");
    let (child, _) = start_run(
        work.path(),
        &["--fs-root=cell", "--directory=./directory.ldif"],
    );
    wait_until("the initial sync", Duration::from_secs(30), || {
        web_members(&directory) == lower(&["h1"])
    });
    // A change after the first scan: seen only through the watcher.
    let cell = work.path().join("cell");
    fs::create_dir_all(cell.join("placement/h2")).expect("host dir");
    write_atomically(&cell.join("placement/h2/web.app#2"), "{}");
    wait_until("the live placement", Duration::from_secs(30), || {
        web_members(&directory) == lower(&["h1", "h2"])
    });
    let (code, stderr) = stop(child);
    assert_eq!(code, 0, "{stderr}");
}

/// A root reached through a symlink, given relatively, is followed as
/// given: neither canonicalised away nor refused.
#[test]
fn run_with_a_relative_symlinked_fs_root_applies_a_live_placement_change() {
    let work = workspace();
    std::os::unix::fs::symlink("cell", work.path().join("current")).expect("symlink");
    let directory = work.path().join("directory.ldif");
    let (child, _) = start_run(
        work.path(),
        &["--fs-root=current/", "--directory=directory.ldif"],
    );
    wait_until("the initial sync", Duration::from_secs(30), || {
        web_members(&directory) == lower(&["h1"])
    });
    let cell = work.path().join("cell");
    fs::create_dir_all(cell.join("placement/h2")).expect("host dir");
    write_atomically(&cell.join("placement/h2/web.app#2"), "{}");
    wait_until("the live placement", Duration::from_secs(30), || {
        web_members(&directory) == lower(&["h1", "h2"])
    });
    let (code, stderr) = stop(child);
    assert_eq!(code, 0, "{stderr}");
}

/// Paths in a config file are relative to its folder, not to where the
/// binary was started; flags stay relative to the working directory.
#[test]
fn config_file_paths_resolve_against_the_files_folder() {
    let work = workspace();
    let etc = work.path().join("etc");
    fs::create_dir(&etc).expect("etc/");
    fs::write(
        etc.join("gmsa.yml"),
        format!("fs-root: ../cell\ndirectory: ./../directory.ldif\ngroup-ou: {GROUP_OU}\npartition: p1\nformat: json\n"),
    )
    .expect("config");
    let elsewhere = tempfile::tempdir().expect("another cwd");
    let config = etc.join("gmsa.yml");
    let out = bin()
        .current_dir(elsewhere.path())
        .args(["plan", "--config"])
        .arg(&config)
        .output()
        .expect("plan");
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let adds = &plan["changes"][0]["add"];
    assert_eq!(adds, &serde_json::json!([host_dn("h1")]), "{plan}");

    // The same file named relatively from its own folder's parent.
    let out = bin()
        .current_dir(work.path())
        .args(["plan", "--config=etc/gmsa.yml"])
        .output()
        .expect("plan");
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));

    // A flag wins over the file and is relative to the working directory:
    // `cell` does not exist under `elsewhere`.
    let out = bin()
        .current_dir(elsewhere.path())
        .args(["plan", "--fs-root=cell", "--config"])
        .arg(&config)
        .output()
        .expect("plan");
    assert_eq!(out.status.code(), Some(1));
    let missing = elsewhere.path().join("cell");
    assert!(
        stderr_of(&out).contains(&format!("{}: no such directory", missing.display())),
        "{}",
        stderr_of(&out)
    );
}

/// A root that does not exist is "no such directory", an error for `plan`
/// and `sync`, never "not ready".
#[test]
fn a_missing_fs_root_is_no_such_directory_for_plan_and_sync() {
    let work = workspace();
    for command in ["plan", "sync"] {
        let out = bin()
            .current_dir(work.path())
            .args([
                command,
                "--fs-root=no/such/tree",
                "--directory=directory.ldif",
            ])
            .arg(format!("--group-ou={GROUP_OU}"))
            .output()
            .expect("run");
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        let missing = work.path().join("no/such/tree");
        assert!(
            stderr.contains(&format!("{}: no such directory", missing.display())),
            "{command}: {stderr}"
        );
        assert!(!stderr.contains("not ready"), "{command}: {stderr}");
        assert!(out.stdout.is_empty(), "{command} printed a plan");
    }
    // A root without `.modified` is still "not ready".
    fs::remove_file(work.path().join("cell/.modified")).expect("unready");
    let out = bin()
        .current_dir(work.path())
        .args(["plan", "--fs-root=cell", "--directory=directory.ldif"])
        .arg(format!("--group-ou={GROUP_OU}"))
        .output()
        .expect("plan");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("not ready"), "{}", stderr_of(&out));
}

/// `run` keeps waiting for a root that does not exist yet, saying "no such
/// directory" in its log and on /readyz; once the tree appears it works.
#[test]
fn run_waits_for_a_missing_fs_root_and_says_no_such_directory() {
    let work = workspace();
    let directory = work.path().join("directory.ldif");
    let (child, port) = start_run(
        work.path(),
        &["--fs-root=later", "--directory=directory.ldif"],
    );
    let later = work.path().join("later");
    let expected = format!("{}: no such directory", later.display());
    wait_until(
        "/readyz naming the missing root",
        Duration::from_secs(30),
        || readyz(port).contains(&expected),
    );
    assert!(!readyz(port).contains(".modified"), "{}", readyz(port));
    // The tree arrives (as a mirror would create it): the daemon proceeds.
    fs::rename(work.path().join("cell"), &later).expect("move the tree in");
    wait_until("the initial sync", Duration::from_secs(30), || {
        web_members(&directory) == lower(&["h1"])
    });
    let (code, stderr) = stop(child);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
}
