//! Hostile input class: credentials where they do not belong. A password
//! pasted into an LDAP URL (from a flag, the environment or a config file)
//! is a configuration error that never echoes it; a bind password file
//! others may read is used with a warning naming it and the fix.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use support::e2e::bin;
use support::Slapd;

const SECRET: &str = "Pa55-w0rd-in-the-url";

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A ready, empty tree under `dir`.
fn empty_tree(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("tree");
    fs::create_dir_all(root.join("servers")).expect("servers/");
    fs::create_dir_all(root.join("placement")).expect("placement/");
    fs::write(root.join(".modified"), "").expect(".modified");
    root
}

#[test]
fn credentials_in_an_ldap_url_are_refused_and_never_echoed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = empty_tree(dir.path());
    let urls = [
        format!("ldap://cn=admin:{SECRET}@127.0.0.1:1/"),
        format!("ldaps://{SECRET}@dc1.ad.com"),
        // Not even a valid scheme: the scheme error must not quote it either.
        format!("http://svc:{SECRET}@dc1.ad.com"),
    ];
    let common = [
        format!("--fs-root={}", tree.display()),
        "--group-ou=ou=Groups,dc=ad,dc=com".to_owned(),
    ];
    for url in &urls {
        for command in ["plan", "sync", "run", "check"] {
            for log_format in ["text", "json"] {
                let mut cmd = bin();
                cmd.arg(command)
                    .args(&common)
                    .arg(format!("--log-format={log_format}"));
                match command {
                    "run" => cmd.arg("--no-lock"),
                    "check" => cmd.args(["--proid=p", "--host-dn=cn=h,dc=ad,dc=com"]),
                    _ => &mut cmd,
                };
                let out = cmd.arg(format!("--ldap-url={url}")).output().expect("run");
                check_refused(&out, &format!("{command} flag {url}"));
            }
        }
        let out = bin()
            .arg("plan")
            .args(&common)
            .env("GMSA_LDAP_URL", url)
            .output()
            .expect("run");
        check_refused(&out, &format!("environment {url}"));

        let config = dir.path().join("gmsa.yml");
        fs::write(&config, format!("ldap-url: {url:?}\n")).expect("config");
        let out = bin()
            .arg("sync")
            .args(&common)
            .arg("--config")
            .arg(&config)
            .output()
            .expect("run");
        check_refused(&out, &format!("config file {url}"));
    }
}

#[test]
fn a_password_in_an_ldap_urls_extensions_query_or_fragment_is_refused_and_never_echoed() {
    // RFC 4516 URLs carry a bind DN and password as extensions
    // (`!bindname=...,x-bindpw=...`), after the authority; a comma also
    // splits the value into two URLs. None of it is ever quoted.
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = empty_tree(dir.path());
    let urls = [
        format!("ldap://127.0.0.1:1/????x-bindpw={SECRET}"),
        format!("ldap://127.0.0.1:1/??base?(x)?!bindname=cn=a,!x-bindpw={SECRET}"),
        format!("LDAPS://127.0.0.1:1/dc=ad,dc=com?member?sub?(cn={SECRET})"),
        format!("ldap://127.0.0.1:1#{SECRET}"),
        format!("ldap:///?u:{SECRET}@127.0.0.1"),
        format!("ldapi://%2Frun%2F{SECRET}"),
        format!("x-bindpw={SECRET}"),
    ];
    for url in &urls {
        for log_format in ["text", "json"] {
            let out = bin()
                .arg("plan")
                .arg(format!("--fs-root={}", tree.display()))
                .arg("--group-ou=ou=Groups,dc=ad,dc=com")
                .arg("--timeout=2s")
                .arg(format!("--log-format={log_format}"))
                .arg(format!("--ldap-url={url}"))
                .output()
                .expect("run");
            let (stdout, stderr) = text(&out);
            assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
            assert!(
                !stdout.contains(SECRET) && !stderr.contains(SECRET),
                "{url}: the secret was echoed:\n{stdout}\n{stderr}"
            );
            assert!(stderr.contains("--ldap-url"), "{url}: {stderr}");
            assert!(
                !stderr.contains("connect"),
                "{url}: refused before any connection: {stderr}"
            );
        }
    }
}

fn check_refused(out: &Output, what: &str) {
    let (stdout, stderr) = text(out);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "{what}: the secret was echoed:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("--ldap-url") && stderr.contains("credentials in an LDAP URL are refused"),
        "{what}: {stderr}"
    );
}

/// `plan` against a live slapd with the password file at `mode`.
fn plan_with_password_mode(mode: u32) -> (i32, String, String, std::path::PathBuf) {
    let slapd = Slapd::shared();
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = empty_tree(dir.path());
    let password = dir.path().join("bind.pw");
    fs::write(&password, Slapd::SVC_PASSWORD).expect("password file");
    fs::set_permissions(&password, fs::Permissions::from_mode(mode)).expect("chmod");
    let out = bin()
        .arg("plan")
        .arg(format!("--fs-root={}", tree.display()))
        .arg("--group-ou=ou=Groups,dc=ad,dc=com")
        .arg(format!("--ldap-url={}", slapd.url()))
        .arg(format!("--bind-dn={}", Slapd::SVC_DN))
        .arg("--bind-password-file")
        .arg(&password)
        .output()
        .expect("plan");
    let (stdout, stderr) = text(&out);
    assert!(
        !stdout.contains(Slapd::SVC_PASSWORD) && !stderr.contains(Slapd::SVC_PASSWORD),
        "the password was echoed:\n{stdout}\n{stderr}"
    );
    // Kept alive until the binary is done with the file.
    let path = password.clone();
    drop(dir);
    (out.status.code().unwrap_or(-1), stdout, stderr, path)
}

#[test]
fn a_password_file_others_can_read_is_used_with_a_warning_naming_the_fix() {
    for mode in [0o644, 0o640, 0o604] {
        let (code, _, stderr, path) = plan_with_password_mode(mode);
        assert_eq!(code, 0, "mode {mode:o}: {stderr}");
        let shown = path.display();
        assert!(
            stderr.contains(&format!(
                "{shown}: the bind password file is readable by group or others (mode {mode:03o})"
            )),
            "mode {mode:o}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("chmod 600 {shown}")),
            "mode {mode:o}: {stderr}"
        );
    }
    let (code, _, stderr, _) = plan_with_password_mode(0o600);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stderr.contains("chmod"),
        "a private file is not warned about: {stderr}"
    );
}

/// A server file's `nt.dc` becomes the host of `ldap://<nt.dc>` when no
/// `--ldap-url` is given: one that smuggles credentials (or a path) into
/// that URL makes the server file unusable, and the warning does not quote
/// it. Without the check the reconciler would connect to `dc1` as `svc`.
#[test]
fn credentials_in_a_server_files_nt_dc_make_it_unusable_and_are_never_echoed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let tree = empty_tree(dir.path());
    for (host, dc) in [
        ("h1", format!("svc:{SECRET}@dc1.ad.com")),
        ("h2", format!("dc1.ad.com/{SECRET}")),
    ] {
        fs::write(
            tree.join("servers").join(host),
            format!("partition: p1\nnt.dc: '{dc}'\nnt.dn: CN={host},DC=ad,DC=com\n"),
        )
        .expect("server file");
        fs::create_dir_all(tree.join("placement").join(host)).expect("placement dir");
        fs::write(tree.join("placement").join(host).join("proid1.app#1"), "").expect("placement");
    }
    let directory = dir.path().join("directory.ldif");
    fs::write(
        &directory,
        "dn: cn=proid1-gmsa-hosts,ou=Groups,dc=ad,dc=com\nobjectClass: group\nsAMAccountName: proid1-gmsa-hosts\n",
    )
    .expect("directory");
    let out = bin()
        .arg("plan")
        .arg(format!("--fs-root={}", tree.display()))
        .arg(format!("--directory={}", directory.display()))
        .arg("--group-ou=ou=Groups,dc=ad,dc=com")
        .output()
        .expect("run plan");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "{stdout}\n{stderr}"
    );
    for host in ["h1", "h2"] {
        assert!(
            stderr.contains(&format!(
                "servers/{host}: unusable server file: nt.dc: not a host name"
            )),
            "{host}: {stderr}"
        );
    }
    assert!(
        stdout.starts_with("# gmsa-reconciler plan: 0 groups"),
        "{stdout}"
    );
}

/// `plan` binding with Kerberos to `ldaps://127.0.0.1:1` (nothing listens)
/// with the Kerberos variables `env`, stopped after a minute if it hangs.
#[cfg(feature = "kerberos")]
fn plan_with_kerberos(dir: &Path, env: &[(&str, String)]) -> (Option<i32>, String) {
    let tree = empty_tree(dir);
    let stderr_path = dir.join("stderr");
    let mut cmd = bin();
    cmd.arg("plan")
        .arg(format!("--fs-root={}", tree.display()))
        .arg("--group-ou=ou=Groups,dc=ad,dc=com")
        .arg("--ldap-url=ldaps://127.0.0.1:1")
        .arg("--sasl=gssapi")
        .arg("--timeout=2s")
        .env_remove("KRB5_CLIENT_KTNAME")
        .env_remove("KRB5CCNAME")
        .env("KRB5_CONFIG", dir.join("no-krb5.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&stderr_path).expect("stderr file"));
    for (key, value) in env {
        cmd.env(key, value);
    }
    let mut child = cmd.spawn().expect("run plan");
    let mut code = None;
    for _ in 0..600 {
        if let Some(status) = child.try_wait().expect("wait") {
            code = status.code();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if code.is_none() {
        child.kill().expect("stop plan");
        child.wait().expect("reap plan");
    }
    (code, fs::read_to_string(&stderr_path).unwrap_or_default())
}

#[cfg(feature = "kerberos")]
#[test]
fn a_keytab_or_ticket_cache_that_is_a_fifo_missing_or_a_directory_is_named_before_any_connection() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success(), "mkfifo");
    let folder = dir.path().join("folder");
    fs::create_dir(&folder).expect("folder");
    let missing = dir.path().join("missing.keytab");
    let fifo_s = fifo.display().to_string();
    let cases = [
        (
            "KRB5_CLIENT_KTNAME",
            fifo_s.clone(),
            fifo_s.clone(),
            "a FIFO, not a regular file",
        ),
        (
            "KRB5_CLIENT_KTNAME",
            format!("FILE:{fifo_s}"),
            fifo_s.clone(),
            "a FIFO, not a regular file",
        ),
        (
            "KRB5_CLIENT_KTNAME",
            missing.display().to_string(),
            missing.display().to_string(),
            "does not exist",
        ),
        (
            "KRB5_CLIENT_KTNAME",
            folder.display().to_string(),
            folder.display().to_string(),
            "a directory, not a regular file",
        ),
        (
            "KRB5CCNAME",
            format!("FILE:{fifo_s}"),
            fifo_s.clone(),
            "a FIFO, not a regular file",
        ),
        (
            "KRB5CCNAME",
            fifo_s.clone(),
            fifo_s.clone(),
            "a FIFO, not a regular file",
        ),
    ];
    for (variable, value, file, problem) in cases {
        let run = tempfile::tempdir().expect("temp dir");
        let (code, stderr) = plan_with_kerberos(run.path(), &[(variable, value.clone())]);
        let what = format!("{variable}={value}");
        assert_eq!(code, Some(1), "{what}: hung or did not fail: {stderr}");
        assert!(
            stderr.contains(variable) && stderr.contains(&file) && stderr.contains(problem),
            "{what}: {stderr}"
        );
        assert!(
            !stderr.contains("Connection refused"),
            "{what}: checked before any connection: {stderr}"
        );
    }
}
