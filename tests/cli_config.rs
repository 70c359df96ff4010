//! `config` and config-file problems through the binary: every source
//! checked, every problem listed, each effective option shown with where
//! it came from, secrets never shown, and a mistyped key answered with the
//! nearest known key by every command.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use support::scenario::run_bin;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `gmsa-reconciler config <args>` in `dir` with exactly the `GMSA_*`
/// variables given.
fn config(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gmsa-reconciler"));
    cmd.arg("config").args(args).current_dir(dir);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GMSA_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run gmsa-reconciler config");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The line of option `name` in the text report.
fn line<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{name}: ")) || l.starts_with(&format!("# {name}: ")))
        .unwrap_or_else(|| panic!("{name} not in:\n{report}"))
}

#[test]
fn config_shows_each_option_with_where_it_came_from() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::create_dir(dir.path().join("etc")).expect("mkdir");
    fs::write(
        dir.path().join("etc/gmsa.yml"),
        "fs-root: ../tree\npartition: east\ngroup-ou: OU=Groups,DC=ad,DC=com\nmax-delete: 40\nexit-code: true\nno-lock: true\n",
    )
    .expect("config");
    let out = config(
        dir.path(),
        &[
            "plan",
            "--config=etc/gmsa.yml",
            "--directory",
            "d.ldif",
            "--partition=west",
        ],
        &[("GMSA_MAX_DELETE_PERCENT", "5")],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stderr, "");
    let root = dir.path().display().to_string();
    let file = format!("{root}/etc/gmsa.yml");
    let r = &out.stdout;
    assert_eq!(line(r, "partition"), "partition: \"west\"  # flag");
    assert_eq!(
        line(r, "directory"),
        format!("directory: \"{root}/d.ldif\"  # flag"),
        "a relative flag is relative to the working directory"
    );
    assert_eq!(
        line(r, "fs-root"),
        format!("fs-root: \"{root}/tree\"  # file {file}"),
        "a relative path in the file is relative to its folder"
    );
    assert_eq!(
        line(r, "max-delete"),
        format!("max-delete: \"40\"  # file {file}")
    );
    assert_eq!(
        line(r, "max-delete-percent"),
        "max-delete-percent: \"5\"  # environment GMSA_MAX_DELETE_PERCENT"
    );
    assert_eq!(
        line(r, "exit-code"),
        format!("exit-code: true  # file {file}")
    );
    assert_eq!(
        line(r, "group-pattern"),
        "# group-pattern: {}-gmsa-hosts  (default)"
    );
    assert_eq!(
        line(r, "max-values-per-modify"),
        "# max-values-per-modify: 1000  (default)"
    );
    assert_eq!(line(r, "bind-dn"), "# bind-dn: not set");
    assert!(
        !r.contains("no-lock"),
        "a key of run is not shown for plan:\n{r}"
    );
    assert!(r.ends_with("# valid\n"), "{r}");

    // The same as JSON, for tools.
    let json = config(
        dir.path(),
        &[
            "plan",
            "--config=etc/gmsa.yml",
            "--directory=d.ldif",
            "--format=json",
        ],
        &[],
    );
    assert_eq!(json.code, 0, "{}", json.stderr);
    let value: serde_json::Value = serde_json::from_str(&json.stdout).expect("one JSON object");
    assert_eq!(value["command"], "plan");
    assert_eq!(value["valid"], true);
    let option = |name: &str| {
        value["options"]
            .as_array()
            .expect("options")
            .iter()
            .find(|o| o["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .clone()
    };
    assert_eq!(option("partition")["source"], "file");
    assert_eq!(option("partition")["from"], file.as_str());
    assert_eq!(option("format")["source"], "flag");
    assert_eq!(option("timeout")["source"], "default");
    assert_eq!(option("timeout")["value"], "30s");
    assert_eq!(option("tls-ca-file")["source"], serde_json::Value::Null);
}

/// The text report's set options are a config file: fed back, they give
/// the same options, now from that file.
#[test]
fn the_report_reads_back_as_a_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = config(
        dir.path(),
        &[
            "run",
            "--fs-root=tree",
            "--group-ou=OU=Groups,DC=ad,DC=com",
            "--ldap-url=ldap://dc1,ldap://dc2",
            "--no-lock",
            "-vv",
            "--resync-interval=5m",
        ],
        &[],
    );
    assert_eq!(first.code, 0, "{}", first.stderr);
    fs::write(dir.path().join("again.yml"), &first.stdout).expect("write");
    let second = config(dir.path(), &["run", "--config=again.yml"], &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    for name in [
        "fs-root",
        "group-ou",
        "ldap-url",
        "no-lock",
        "verbose",
        "resync-interval",
    ] {
        let before = line(&first.stdout, name).replace("  # flag", "");
        let after = line(&second.stdout, name);
        assert!(
            after.starts_with(&before) && after.contains("# file "),
            "{before} / {after}"
        );
    }
    assert!(line(&second.stdout, "ldap-url").contains("[\"ldap://dc1\", \"ldap://dc2\"]"));
}

#[test]
fn an_invalid_configuration_lists_every_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::write(
        dir.path().join("gmsa.yml"),
        "partiton: east\nmax-delete: lots\nbatch_window: 1s\nresync-interval: 0s\nzookeper: zk:2181\nstarttls: maybe\nexit-code: sometimes\nproid: [a, b]\n",
    )
    .expect("config");
    let out = config(
        dir.path(),
        &[
            "run",
            "--config=gmsa.yml",
            "--group-ou=not a dn",
            "--max-delete-percent=150",
            "--ldap-url=ldap://admin:hunter2@dc1",
        ],
        &[("GMSA_TIMEOUT", "5 parsecs")],
    );
    assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
    let file = dir.path().join("gmsa.yml").display().to_string();
    let problems: Vec<&str> = out.stderr.lines().collect();
    let expect = [
        "--group-ou".to_owned(),
        "--max-delete-percent: invalid value '150'".to_owned(),
        "--ldap-url: ldap://<credentials removed>@dc1: credentials in an LDAP URL are refused"
            .to_owned(),
        "GMSA_TIMEOUT: invalid value '5 parsecs'".to_owned(),
        format!("{file}: unknown key \"partiton\"; did you mean \"partition\"?"),
        format!("{file}: key \"max-delete\": invalid value 'lots'"),
        format!("{file}: unknown key \"batch_window\"; did you mean \"batch-window\"?"),
        format!("{file}: unknown key \"zookeper\"; did you mean \"zookeeper\"?"),
        format!("{file}: key \"starttls\": must be true or false"),
        // Keys of plan and check, checked for run all the same: the file
        // serves them too.
        format!("{file}: key \"exit-code\": must be true or false"),
        format!("{file}: key \"proid\": takes one value, not a list"),
        "--resync-interval: must be more than zero".to_owned(),
        "--fs-root: is required".to_owned(),
    ];
    for wanted in &expect {
        assert!(
            problems.iter().any(|p| p.contains(wanted.as_str())),
            "{wanted:?} not among:\n{}",
            out.stderr
        );
    }
    assert!(
        problems
            .iter()
            .all(|p| p.starts_with("gmsa-reconciler: error: ")),
        "{}",
        out.stderr
    );
    // One line per problem, no repeats.
    let mut unique = problems.clone();
    unique.dedup();
    assert_eq!(unique.len(), problems.len(), "{}", out.stderr);
    assert!(!out.stderr.contains("hunter2") && !out.stdout.contains("hunter2"));
    assert!(
        out.stdout.ends_with(&format!(
            "# invalid: {} problems (listed on standard error)\n",
            problems.len()
        )),
        "{}",
        out.stdout
    );
}

#[test]
fn the_bind_password_is_never_read_or_shown() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = "pw-f7c1e2-do-not-print";
    let pw = support::e2e::password_file(dir.path(), secret);
    let args = [
        "check",
        "--ldap-url=ldap://dc1",
        "--bind-dn=CN=svc,DC=ad,DC=com",
        "--group-ou=OU=Groups,DC=ad,DC=com",
        "--proid=web",
        "--host-dn=CN=WIN001,DC=ad,DC=com",
    ];
    let mut with_file: Vec<&str> = args.to_vec();
    with_file.push("--bind-password-file=bind.pw");
    let out = config(dir.path(), &with_file, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        line(&out.stdout, "bind-password-file"),
        format!("bind-password-file: \"{}\"  # flag", pw.display())
    );
    let from_env = config(dir.path(), &args, &[("GMSA_BIND_PASSWORD", secret)]);
    assert_eq!(from_env.code, 0, "{}", from_env.stderr);
    assert!(from_env
        .stdout
        .contains("# bind password: from GMSA_BIND_PASSWORD (not shown)"));
    for out in [&out, &from_env] {
        assert!(!out.stdout.contains(secret) && !out.stderr.contains(secret));
    }
}

#[test]
fn values_with_control_characters_cannot_write_lines_of_their_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = config(
        dir.path(),
        &[
            "plan",
            "--fs-root=t",
            "--directory=d",
            "--group-ou=OU=G\n# valid\nfs-root: /evil",
        ],
        &[("GMSA_PARTITION", "east\u{1b}[2J")],
    );
    assert_eq!(out.code, 1, "the partition is not a glob: {}", out.stdout);
    assert!(
        out.stderr
            .contains("--partition: invalid partition glob \"east\\u{1b}[2J\""),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains('\u{1b}') && !out.stderr.contains('\u{1b}'));
    assert!(
        !out.stdout
            .lines()
            .any(|l| l == "fs-root: /evil" || l == "# valid"),
        "{}",
        out.stdout
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

#[test]
fn config_refuses_what_its_command_would() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unknown_flag = config(dir.path(), &["plan", "--no-lock"], &[]);
    assert_eq!(unknown_flag.code, 1);
    assert!(
        unknown_flag
            .stderr
            .contains("plan: unexpected argument '--no-lock'"),
        "{}",
        unknown_flag.stderr
    );
    let help = config(dir.path(), &["plan", "-h"], &[]);
    assert_eq!(help.code, 0, "{}", help.stderr);
    assert!(
        help.stdout.contains("Usage: gmsa-reconciler plan"),
        "{}",
        help.stdout
    );
    let unknown_command = config(dir.path(), &["deploy"], &[]);
    assert_eq!(unknown_command.code, 1);
    assert!(
        unknown_command
            .stderr
            .contains("deploy: config checks the options of run, plan, sync, check"),
        "{}",
        unknown_command.stderr
    );
}

/// Every command answers a mistyped key with the nearest one, naming the
/// file; a key far from every option gets no guess.
#[test]
fn a_mistyped_key_is_answered_with_the_nearest_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("gmsa.yml");
    fs::write(
        &file,
        "fs-root: /t\ngroup-ou: OU=G,DC=x\ndirectory: /d.ldif\nmax-delet: 3\n",
    )
    .expect("config");
    let out = run_bin("plan", &[format!("--config={}", file.display())]);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr,
        format!(
            "gmsa-reconciler: error: {}: unknown key \"max-delet\"; did you mean \"max-delete\"?\n",
            file.display()
        )
    );
    fs::write(&file, "fs-root: /t\ncolour-scheme: dark\n").expect("config");
    let out = run_bin("sync", &[format!("--config={}", file.display())]);
    assert_eq!(out.code, 1);
    assert_eq!(
        out.stderr,
        format!(
            "gmsa-reconciler: error: {}: unknown key \"colour-scheme\"\n",
            file.display()
        )
    );
}

#[test]
fn config_refuses_an_audit_log_that_sync_and_run_would_refuse_and_creates_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::create_dir_all(dir.path().join("tree")).expect("tree");
    fs::write(dir.path().join("dir.ldif"), "").expect("ldif");
    fs::create_dir(dir.path().join("a-folder")).expect("folder");
    fs::write(dir.path().join("elsewhere"), "").expect("target");
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("a-link"))
        .expect("symlink");
    let check = |audit: &str, command: &str| {
        let mut args = vec![
            command,
            "--fs-root=tree",
            "--directory=dir.ldif",
            "--group-ou=OU=Groups,DC=ad,DC=com",
        ];
        if command == "run" {
            args.push("--no-lock");
        }
        let flag = format!("--audit-log={audit}");
        args.push(&flag);
        config(dir.path(), &args, &[])
    };
    for command in ["sync", "run"] {
        for (audit, problem) in [
            ("a-folder", "directory"),
            ("a-link", "symbolic link"),
            ("no-such-folder/audit.jsonl", "audit.jsonl"),
        ] {
            let out = check(audit, command);
            assert_eq!(
                out.code, 1,
                "{command} {audit}: {}{}",
                out.stdout, out.stderr
            );
            let line = out
                .stderr
                .lines()
                .find(|l| l.contains("--audit-log"))
                .unwrap_or_else(|| panic!("{command} {audit}: {}", out.stderr));
            assert!(
                line.contains(audit) && line.to_lowercase().contains(problem),
                "{command} {audit}: {line}"
            );
        }
        let out = check("audit.jsonl", command);
        assert_eq!(out.code, 0, "{command}: {}{}", out.stdout, out.stderr);
        assert!(
            !dir.path().join("audit.jsonl").exists(),
            "config creates no audit log"
        );
    }
}
