//! `check --self` through the built binary against real slapd servers: this
//! host's DN and domain controller come from `servers/<--hostname>`, and the
//! group is read from that controller (not from the one the reconciler
//! writes to), unless `--ldap-url` names one. Exit codes as `check`: 0 a
//! member, 3 not, 1 an error naming the file and what is wrong.

mod support;

use std::path::Path;

use support::daemon::{computers_and_groups, host_dn, GROUP_OU};
use support::e2e::{bin, password_file};
use support::tree::Tree;
use support::Slapd;

/// slapd with `web-gmsa-hosts` holding `members`.
fn slapd_with(members: &[&str]) -> Slapd {
    let mut ldif = computers_and_groups(&["h1"], &["web-gmsa-hosts"])
        .trim_end()
        .to_owned();
    for m in members {
        ldif += &format!("\nmember: {m}");
    }
    ldif.push('\n');
    Slapd::start_with(&[&ldif])
}

/// `nt.dc` naming a test server: the reconciler connects to `ldap://<nt.dc>`.
fn dc_of(slapd: &Slapd) -> String {
    slapd
        .url()
        .trim_start_matches("ldap://")
        .trim_end_matches('/')
        .to_owned()
}

fn check(tree: &Tree, pw: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = bin()
        .arg("check")
        .arg(format!("--fs-root={}", tree.root().display()))
        .arg(format!("--group-ou={GROUP_OU}"))
        .arg(format!("--bind-dn={}", Slapd::SVC_DN))
        .arg(format!("--bind-password-file={}", pw.display()))
        .args(["--proid=web", "--self", "--timeout=5s"])
        .args(extra)
        .output()
        .expect("run check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn server_file(tree: &Tree, host: &str, dn: &str, dc: &str) {
    tree.server_raw(
        host,
        &format!("partition: p1\nnt.dc: {dc}\nnt.dn: \"{dn}\"\ncpu: 100%\n"),
    );
}

#[test]
fn this_host_is_checked_on_its_own_domain_controller() {
    // The writer's DC already has h1; the host's own DC does not yet.
    let writer = slapd_with(&[&host_dn("h1")]);
    let own = slapd_with(&[]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    // The server file spells the DN differently from the directory.
    server_file(
        &tree,
        "h1.ad.com",
        "CN=H1, OU=Computers,DC=ad,DC=com",
        &dc_of(&own),
    );
    tree.mark_ready();

    let (code, out, err) = check(&tree, &pw, &["--hostname=h1.ad.com"]);
    assert_eq!(code, 3, "not a member on its own DC:\n{out}\n{err}");
    assert!(out.contains("is not a member of"), "{out}");

    let writer_url = format!("--ldap-url={}", writer.url());
    let (code, out, err) = check(&tree, &pw, &["--hostname=h1.ad.com", &writer_url]);
    assert_eq!(code, 0, "--ldap-url names the server to ask:\n{out}\n{err}");
    assert!(
        out.contains("CN=H1, OU=Computers,DC=ad,DC=com is a member of"),
        "{out}"
    );

    // Replication reaches the host's DC: now it is a member there too.
    own.ldapmodify(&format!(
        "dn: cn=web-gmsa-hosts,{GROUP_OU}\nchangetype: modify\nadd: member\nmember: {}\n",
        host_dn("h1")
    ));
    let (code, out, err) = check(&tree, &pw, &["--hostname=h1.ad.com"]);
    assert_eq!(code, 0, "{out}\n{err}");
}

#[test]
fn a_missing_or_unusable_server_file_is_an_error_naming_it() {
    let slapd = slapd_with(&[&host_dn("h1")]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    tree.mark_ready();
    let file = tree.root().join("servers/h1.ad.com");
    let file = file.display().to_string();

    let (code, _, err) = check(&tree, &pw, &["--hostname=h1.ad.com"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&file) && err.contains("does not exist"),
        "{err}"
    );

    tree.server_raw(
        "h1.ad.com",
        &format!("partition: p1\nnt.dn: {}\n", host_dn("h1")),
    );
    let (code, _, err) = check(&tree, &pw, &["--hostname=h1.ad.com"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&file) && err.contains("no nt.dc"), "{err}");
    // With --ldap-url the DC is not needed.
    let url = format!("--ldap-url={}", slapd.url());
    let (code, out, err) = check(&tree, &pw, &["--hostname=h1.ad.com", &url]);
    assert_eq!(code, 0, "{out}\n{err}");

    tree.server_raw(
        "h1.ad.com",
        &format!("partition: p1\nnt.dc: {}\n", dc_of(&slapd)),
    );
    let (code, _, err) = check(&tree, &pw, &["--hostname=h1.ad.com"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&file) && err.contains("no nt.dn"), "{err}");

    // A control character in nt.dn: refused where it is read, shown escaped.
    tree.server_raw(
        "h1.ad.com",
        &format!(
            "partition: p1\nnt.dc: {}\nnt.dn: \"cn=h1\\nmember: cn=evil,ou=Computers,dc=ad,dc=com\"\n",
            dc_of(&slapd)
        ),
    );
    let (code, out, err) = check(&tree, &pw, &["--hostname=h1.ad.com"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains(&file) && err.contains("nt.dn"), "{err}");
    assert_eq!(
        err.lines().count(),
        1,
        "one line, nothing of its own:\n{err}"
    );

    // A FIFO is not read (the read would block): an error, at once.
    std::fs::remove_file(tree.root().join("servers/h1.ad.com")).expect("remove");
    let status = std::process::Command::new("mkfifo")
        .arg(tree.root().join("servers/h1.ad.com"))
        .status()
        .expect("mkfifo");
    assert!(status.success());
    let (code, _, err) = check(&tree, &pw, &["--hostname=h1.ad.com"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&file), "{err}");
}
