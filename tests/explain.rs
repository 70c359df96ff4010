//! `explain` through the binary, for what the scenario goldens cannot hold:
//! the groups read from a real slapd, a host whose placements can't be read
//! (its memberships are held), values from the directory that try to start
//! lines of their own, and the errors that end it with exit code 1.

mod support;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::Value;
use support::e2e::{bin, password_file};
use support::scenario::{run_bin, Output};
use support::tree::{groups_ldif, Tree};
use support::Slapd;

const OU: &str = "--group-ou=ou=Groups,dc=ad,dc=com";

fn args(tree: &Tree, directory: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        format!("--fs-root={}", tree.root().display()),
        format!("--directory={}", directory.display()),
        OU.to_owned(),
        "--partition=east".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn directory(dir: &Path, members: &[&str]) -> PathBuf {
    let path = dir.join("directory.ldif");
    fs::write(&path, groups_ldif(&[("web-gmsa-hosts", members)])).expect("directory");
    path
}

fn json(out: &Output) -> Value {
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", out.stdout))
}

#[test]
fn explains_the_groups_a_real_server_holds() {
    let slapd = Slapd::shared();
    slapd.add_entries(
        "dn: ou=Explain,dc=ad,dc=com\nobjectClass: organizationalUnit\nou: Explain\n\n\
         dn: cn=web-gmsa-hosts,ou=Explain,dc=ad,dc=com\nobjectClass: group\ncn: web-gmsa-hosts\n\
         sAMAccountName: web-gmsa-hosts\nmember: cn=h2,ou=Computers,dc=ad,dc=com\n\
         member: cn=h3,ou=Computers,dc=ad,dc=com\n",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = Tree::new();
    for h in ["h1", "h2", "h3"] {
        tree.server(h, "east", &format!("CN={h},OU=Computers,DC=ad,DC=com"));
    }
    tree.place("h1", "web.app#0000000001");
    tree.place("h3", "web.app#0000000003");
    tree.mark_ready();
    let pw = password_file(dir.path(), Slapd::SVC_PASSWORD);
    let out = bin()
        .arg("explain")
        .arg(format!("--fs-root={}", tree.root().display()))
        .arg("--group-ou=ou=Explain,dc=ad,dc=com")
        .arg("--partition=east")
        .arg(format!("--ldap-url={}", slapd.url()))
        .arg(format!("--bind-dn={}", Slapd::SVC_DN))
        .arg(format!("--bind-password-file={}", pw.display()))
        .args(["--proid=web", "--format=json"])
        .output()
        .expect("run");
    let out = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let v = json(&out);
    assert_eq!(
        v["groups"],
        serde_json::json!(["cn=web-gmsa-hosts,ou=Explain,dc=ad,dc=com"])
    );
    let actions: Vec<(String, bool, String)> = v["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| {
            (
                h["host"].as_str().unwrap_or_default().to_owned(),
                h["groups"][0]["member"].as_bool().unwrap_or_default(),
                h["groups"][0]["action"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("h1".to_owned(), false, "add".to_owned()),
            ("h2".to_owned(), true, "delete".to_owned()),
            ("h3".to_owned(), true, "in-place".to_owned()),
        ]
    );
    // Nothing was written: h2 is still a member.
    let plan = bin()
        .arg("plan")
        .arg(format!("--fs-root={}", tree.root().display()))
        .arg("--group-ou=ou=Explain,dc=ad,dc=com")
        .arg("--partition=east")
        .arg(format!("--ldap-url={}", slapd.url()))
        .arg(format!("--bind-dn={}", Slapd::SVC_DN))
        .arg(format!("--bind-password-file={}", pw.display()))
        .output()
        .expect("run");
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.starts_with("# gmsa-reconciler plan: 1 group, 1 addition, 1 deletion"),
        "{plan}"
    );
}

#[test]
fn a_host_whose_placements_cannot_be_read_is_held() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = Tree::new();
    tree.server("h1", "east", "CN=h1,OU=Computers,DC=ad,DC=com");
    tree.server("h2", "east", "CN=h2,OU=Computers,DC=ad,DC=com");
    // h1's placement directory is a symlink: never followed, so its
    // placements are unknown, and its membership stays as it is.
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("elsewhere");
    symlink(&elsewhere, tree.host_dir("h1")).expect("symlink");
    tree.place("h2", "web.app#0000000002");
    tree.mark_ready();
    let directory = directory(dir.path(), &["CN=h1,OU=Computers,DC=ad,DC=com"]);

    let text = run_bin("explain", &args(&tree, &directory, &["--proid=web"]));
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(
        text.stdout.contains(
            "# host h1\n#   server file: partition \"east\", nt.dc \"dc1.ad.com\", nt.dn \"CN=h1,OU=Computers,DC=ad,DC=com\"\n#   in scope: yes\n#   placement directory: unreadable: its placements are unknown\n"
        ),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("#   member of cn=web-gmsa-hosts,ou=Groups,dc=ad,dc=com: yes; left as it is: the host's placements are unknown\n"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("#   note: placement/h1: "),
        "the scan's warning, relative to the root: {}",
        text.stdout
    );

    let v = json(&run_bin(
        "explain",
        &args(&tree, &directory, &["--proid=web", "--format=json"]),
    ));
    let hosts = v["hosts"].as_array().expect("hosts");
    let names: Vec<&str> = hosts.iter().filter_map(|h| h["host"].as_str()).collect();
    assert_eq!(names, ["h1", "h2"]);
    assert_eq!(hosts[0]["placements"], "unreadable");
    assert_eq!(hosts[0]["groups"][0]["action"], "held");
    assert_eq!(hosts[0]["groups"][0]["member"], true);
    assert_eq!(hosts[1]["groups"][0]["action"], "add");
    assert_eq!(hosts[1]["desired"], true);
    assert_eq!(v["summary"]["add"], 1);
    assert_eq!(v["summary"]["delete"], 0);

    // The same answer for the one host asked about.
    let one = json(&run_bin(
        "explain",
        &args(
            &tree,
            &directory,
            &["--proid=web", "--host=h1", "--format=json"],
        ),
    ));
    assert_eq!(one["hosts"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["hosts"][0], hosts[0]);
    assert_eq!(one["other_members"], serde_json::json!([]));
}

#[test]
fn values_from_the_directory_cannot_add_a_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = Tree::new();
    tree.server("h1", "east", "CN=h1,OU=Computers,DC=ad,DC=com");
    tree.place("h1", "web.app#0000000001");
    tree.mark_ready();
    // A member whose DN holds a line break and a terminal escape, written
    // base64 in the LDIF file as RFC 2849 requires.
    let evil = "CN=x\ndn: CN=Domain Admins\u{1b}[2J,OU=Users,DC=ad,DC=com";
    let encoded = base64::engine::general_purpose::STANDARD.encode(evil);
    let path = dir.path().join("directory.ldif");
    let ldif = groups_ldif(&[("web-gmsa-hosts", &[])]) + &format!("member:: {encoded}\n");
    fs::write(&path, ldif).expect("directory");

    let out = run_bin("explain", &args(&tree, &path, &["--proid=web"]));
    assert_eq!(out.code, 0, "{}", out.stderr);
    for line in out.stdout.lines() {
        assert!(
            line.starts_with('#'),
            "a line that is not a comment: {line:?}"
        );
        assert!(!line.contains('\u{1b}'), "{line:?}");
    }
    assert!(
        out.stdout.contains(
            "#   CN=x\\ndn: CN=Domain Admins\\u{1b}[2J,OU=Users,DC=ad,DC=com in cn=web-gmsa-hosts,ou=Groups,dc=ad,dc=com: left as it is: not managed by the reconciler\n"
        ),
        "{}",
        out.stdout
    );
    let v = json(&run_bin(
        "explain",
        &args(&tree, &path, &["--proid=web", "--format=json"]),
    ));
    assert_eq!(v["other_members"][0]["member"], evil);
}

#[test]
fn errors_exit_1_with_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = Tree::new();
    let directory = directory(dir.path(), &[]);
    // The tree is not ready: nothing to explain from.
    let not_ready = run_bin("explain", &args(&tree, &directory, &["--proid=web"]));
    assert_eq!(not_ready.code, 1);
    assert!(
        not_ready
            .stderr
            .contains(".modified: missing: the tree is not ready"),
        "{}",
        not_ready.stderr
    );
    assert!(not_ready.stdout.is_empty(), "{}", not_ready.stdout);
    tree.mark_ready();
    for (extra, says) in [
        (&[][..], "--proid: is required"),
        (&["--proid=a.b"][..], "--proid: \"a.b\" is not a proid name"),
        (&["--proid=web", "--host=../h"][..], "--host:"),
    ] {
        let out = run_bin("explain", &args(&tree, &directory, extra));
        assert_eq!(out.code, 1, "{extra:?}: {}", out.stdout);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{extra:?}: {}", out.stderr);
        assert!(lines[0].contains(says), "{extra:?}: {}", lines[0]);
    }
    let missing = run_bin(
        "explain",
        &args(
            &tree,
            &dir.path().join("nonexistent.ldif"),
            &["--proid=web"],
        ),
    );
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("nonexistent.ldif"),
        "{}",
        missing.stderr
    );
}
