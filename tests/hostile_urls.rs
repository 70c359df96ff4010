//! Hostile input class: malformed and secret-bearing server URLs. Every
//! option whose value is a server URL (`--ldap-url`, `--check-ldap-url`)
//! and every `nt.dc` goes through one check of `scheme://HOST[:PORT]`
//! (port 1 to 65535, labels of at most 63 characters), at startup and in
//! `config`, and is only ever shown as its scheme and address: `config`
//! never prints a password from a URL, whatever the source or format.

mod support;

use std::fs;
use std::path::Path;
use std::process::Output;

use support::e2e::bin;

const SECRET: &str = "Sup3rS3cret";

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A ready, empty tree and an app root under `dir`.
fn node_dirs(dir: &Path) -> (String, String) {
    let root = dir.join("tree");
    fs::create_dir_all(root.join("servers")).expect("servers/");
    fs::create_dir_all(root.join("placement")).expect("placement/");
    fs::write(root.join(".modified"), "").expect(".modified");
    fs::create_dir_all(dir.join("app")).expect("app/");
    (
        format!("--fs-root={}", root.display()),
        format!("--app-root={}", dir.join("app").display()),
    )
}

/// `command` of a node whose wait reads `--check-ldap-url` (given by
/// `how`: a flag, the environment or a config file) with `url`.
fn node_command(dir: &Path, command: &str, how: &str, url: &str, extra: &[&str]) -> Output {
    let (fs_root, app_root) = node_dirs(dir);
    let mut cmd = bin();
    cmd.arg(command)
        .args([
            fs_root.as_str(),
            app_root.as_str(),
            "--group-ou=OU=Groups,DC=ad,DC=com",
            "--no-lock",
            "--ldap-url=ldap://127.0.0.1:1",
            "--hostname=win001.ad.com",
            "--wait-for-group=5s",
            "--timeout=2s",
        ])
        .args(extra);
    match how {
        "flag" => {
            cmd.arg(format!("--check-ldap-url={url}"));
        }
        "environment" => {
            cmd.env("GMSA_CHECK_LDAP_URL", url);
        }
        "file" => {
            let file = dir.join("gmsa.yml");
            fs::write(
                &file,
                format!("check-ldap-url: {}\n", serde_json::json!(url)),
            )
            .expect("config file");
            cmd.arg(format!("--config={}", file.display()));
        }
        other => panic!("no source {other}"),
    }
    cmd.output().expect("run gmsa-reconciler")
}

#[test]
fn config_shows_a_url_with_a_secret_only_as_its_scheme_and_address() {
    let urls = [
        format!("ldap://admin:{SECRET}@dc1.ad.com"),
        format!("ldap://dc1/dc=x????x-bindpw={SECRET}"),
        format!("ldap://dc1:389:{SECRET}"),
        format!("ldap://dc1.ad.com#{SECRET}"),
    ];
    for url in &urls {
        for how in ["flag", "environment", "file"] {
            for format in ["text", "json"] {
                let dir = tempfile::tempdir().expect("temp dir");
                let out = node_command(
                    dir.path(),
                    "config",
                    how,
                    url,
                    &[&format!("--format={format}")],
                );
                let (stdout, stderr) = text(&out);
                assert!(
                    stdout.contains("check-ldap-url"),
                    "{url} ({how}, {format}): {stdout}"
                );
                assert!(
                    !stdout.contains(SECRET) && !stderr.contains(SECRET),
                    "{url} ({how}, {format}): the secret was shown:\n{stdout}\n{stderr}"
                );
            }
        }
        // The same for --ldap-url, which takes its value from its own
        // variable too.
        for format in ["text", "json"] {
            let dir = tempfile::tempdir().expect("temp dir");
            let (fs_root, _) = node_dirs(dir.path());
            let out = bin()
                .args([
                    "config",
                    "plan",
                    &fs_root,
                    "--group-ou=OU=Groups,DC=ad,DC=com",
                    &format!("--format={format}"),
                ])
                .env("GMSA_LDAP_URL", url)
                .output()
                .expect("run config");
            let (stdout, stderr) = text(&out);
            assert!(stdout.contains("ldap-url"), "{url} ({format}): {stdout}");
            assert!(
                !stdout.contains(SECRET) && !stderr.contains(SECRET),
                "{url} ({format}): the secret was shown:\n{stdout}\n{stderr}"
            );
        }
    }
}

#[test]
fn a_malformed_check_ldap_url_is_refused_at_startup_and_in_config_and_never_echoed() {
    let long_label = format!("ldap://{}.ad.com", "a".repeat(64));
    let urls = [
        "ldap://dc1:abc".to_owned(),
        "ldap://dc1:99999".to_owned(),
        "ldap://dc 1".to_owned(),
        "ldap://:389".to_owned(),
        "ldap://[::1".to_owned(),
        format!("ldap://dc1:389:{SECRET}"),
        long_label,
    ];
    for url in &urls {
        for command in ["config", "run"] {
            for how in ["flag", "environment"] {
                let dir = tempfile::tempdir().expect("temp dir");
                let out = node_command(dir.path(), command, how, url, &[]);
                let (stdout, stderr) = text(&out);
                let what = format!("{command} {url:?} ({how})");
                assert_eq!(out.status.code(), Some(1), "{what}: {stdout}\n{stderr}");
                assert!(stderr.contains("--check-ldap-url"), "{what}: {stderr}");
                assert!(
                    !stderr.contains(url.as_str()) && !stdout.contains(url.as_str()),
                    "{what}: the value was echoed:\n{stdout}\n{stderr}"
                );
                assert!(
                    !stderr.contains(SECRET) && !stdout.contains(SECRET),
                    "{what}: the secret was echoed:\n{stdout}\n{stderr}"
                );
                assert!(
                    !stderr.contains("INFO") && !stderr.contains("aborted"),
                    "{what}: refused before the node starts: {stderr}"
                );
            }
        }
        // --ldap-url goes through the same check.
        let ldap_url = url.replace("ldap://", "ldaps://");
        let dir = tempfile::tempdir().expect("temp dir");
        let (fs_root, _) = node_dirs(dir.path());
        let out = bin()
            .args(["plan", &fs_root, "--group-ou=OU=Groups,DC=ad,DC=com"])
            .arg(format!("--ldap-url={ldap_url}"))
            .output()
            .expect("run plan");
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{ldap_url}: {stderr}");
        assert!(stderr.contains("--ldap-url"), "{ldap_url}: {stderr}");
        assert!(
            !stderr.contains(ldap_url.as_str()) && !stderr.contains(SECRET),
            "{ldap_url}: echoed: {stdout}\n{stderr}"
        );
    }
}

#[test]
fn an_nt_dc_with_a_port_out_of_range_or_a_label_too_long_makes_its_server_file_unusable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (fs_root, _) = node_dirs(dir.path());
    let tree = dir.path().join("tree");
    let long = format!("{}.ad.com", "a".repeat(64));
    for (host, dc) in [
        ("h1", "dc1.ad.com:99999".to_owned()),
        ("h2", long),
        ("h3", format!("dc1:389:{SECRET}")),
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
        .args(["plan", &fs_root, "--group-ou=ou=Groups,dc=ad,dc=com"])
        .arg(format!("--directory={}", directory.display()))
        .output()
        .expect("run plan");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "{stderr}"
    );
    for host in ["h1", "h2", "h3"] {
        assert!(
            stderr.contains(&format!("servers/{host}: unusable server file: nt.dc: ")),
            "{host}: {stderr}"
        );
    }
    assert!(
        stdout.starts_with("# gmsa-reconciler plan: 0 groups"),
        "{stdout}"
    );
}

/// The membership wait of a node whose DC refuses every connection, with
/// `dc` as its server file's `nt.dc`: the aborted instance's reason (in the
/// log) names the connection error, not only that a check did not answer.
fn wait_against_unreachable_dc(dc: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let (fs_root, app_root) = node_dirs(dir.path());
    let tree = dir.path().join("tree");
    fs::write(
        tree.join("servers/win001.ad.com"),
        format!("partition: east\nnt.dc: '{dc}'\nnt.dn: CN=WIN001,OU=Computers,DC=ad,DC=com\n"),
    )
    .expect("server file");
    fs::create_dir_all(tree.join("scheduled")).expect("scheduled/");
    fs::write(
        tree.join("scheduled/web.app#0000000001"),
        "proid: web\nenvironment: dev\ncpu: 20%\nmemory: 256M\ndisk: 1G\nservices:\n  - name: web\n    command: exec sleep 1000\n",
    )
    .expect("manifest");
    fs::create_dir_all(tree.join("placement/win001.ad.com")).expect("placement/");
    fs::write(tree.join("placement/win001.ad.com/web.app#0000000001"), "").expect("placement");
    let stderr_path = dir.path().join("stderr");
    let mut child = bin()
        .args([
            "run",
            &fs_root,
            &app_root,
            "--hostname=win001.ad.com",
            "--partition=east",
            "--group-ou=OU=Groups,DC=ad,DC=com",
            "--no-lock",
            "--gmsa-proids=*",
            "--timeout=2s",
            "--wait-for-group=2s",
            "--ldap-url=ldap://127.0.0.1:1",
            "--domain-dns-name=ad.test",
            "--domain-netbios-name=AD",
            "--domain-sid=S-1-5-21-1004336348-1177238915-682003330",
            "--domain-guid=a4d38f1d-39aa-4db3-9fbb-3d1c6a1f3b4e",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start run");
    let mut log = String::new();
    for _ in 0..600 {
        log = fs::read_to_string(&stderr_path).unwrap_or_default();
        if log.contains("instance aborted") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().expect("stop run");
    child.wait().expect("reap run");
    log.lines()
        .find(|l| l.contains("instance aborted"))
        .unwrap_or_else(|| panic!("no instance aborted:\n{log}"))
        .to_owned()
}

#[test]
fn a_wait_against_an_unreachable_dc_names_the_connection_error() {
    let line = wait_against_unreachable_dc("127.0.0.1:1");
    assert!(
        line.contains("Connection refused") && line.contains("ldap://127.0.0.1:1"),
        "{line}"
    );
}
