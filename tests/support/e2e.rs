//! End-to-end helpers: the binary run as a child process against a real
//! server, and the groups read back from that server with plain `ldap3`
//! (not through the reconciler's own directory code), so that what the
//! binary says it did can be checked against what the server holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use gmsa_reconciler::model::Dn;

/// The binary, with no `GMSA_*`, `RUST_LOG` or `NOTIFY_SOCKET` (a test run
/// under systemd must not tell it of a daemon's readiness) inherited from
/// the environment the tests run in.
pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gmsa-reconciler"));
    cmd.env_remove("NOTIFY_SOCKET");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GMSA_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Starts `gmsa-reconciler <args>` with its output piped.
pub fn spawn_bin(args: &[String]) -> Child {
    bin()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gmsa-reconciler")
}

/// Writes a bind password file (mode 0600, no newline) into `dir`.
pub fn password_file(dir: &Path, secret: &str) -> PathBuf {
    let path = dir.join("bind.pw");
    super::write_secret(&path, secret);
    path
}

/// The `--ldap-url`/`--bind-dn`/`--bind-password-file` arguments.
pub fn ldap_args(url: &str, bind_dn: &str, password_file: &Path) -> Vec<String> {
    vec![
        format!("--ldap-url={url}"),
        format!("--bind-dn={bind_dn}"),
        format!("--bind-password-file={}", password_file.display()),
    ]
}

/// Groups and their members, by DN (compared in normalised form).
pub type Groups = BTreeMap<Dn, BTreeSet<Dn>>;

/// Every `(objectClass=group)` entry at or below `base` with its members,
/// read with a plain search (the servers the tests use return every value
/// of `member` to a plain read, and hold fewer than 1000 groups per base).
pub async fn read_groups(url: &str, bind_dn: &str, password: &str, base: &str) -> Groups {
    let (conn, mut ldap) = ldap3::LdapConnAsync::new(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    ldap3::drive!(conn);
    ldap.simple_bind(bind_dn, password)
        .await
        .and_then(|r| r.success())
        .unwrap_or_else(|e| panic!("bind to {url} as {bind_dn}: {e}"));
    let ldap3::SearchResult(entries, result) = ldap
        .search(
            base,
            ldap3::Scope::Subtree,
            "(objectClass=group)",
            vec!["member"],
        )
        .await
        .unwrap_or_else(|e| panic!("search {base}: {e}"));
    assert_eq!(result.rc, 0, "search {base}: {result:?}");
    let mut groups = Groups::new();
    for entry in entries {
        let entry = ldap3::SearchEntry::construct(entry);
        let members = entry
            .attrs
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("member"))
            .flat_map(|(_, values)| values.iter())
            .map(|v| dn(v))
            .collect();
        groups.insert(dn(&entry.dn), members);
    }
    let _ = ldap.unbind().await;
    groups
}

/// Parses a DN the test trusts to be valid.
pub fn dn(s: &str) -> Dn {
    Dn::parse(s).unwrap_or_else(|e| panic!("not a DN: {s:?}: {e}"))
}

/// The groups of an LDIF content file (entries with `objectClass: group`).
pub fn ldif_groups(text: &str) -> Groups {
    let records = gmsa_reconciler::ldif::parse(text).expect("valid LDIF");
    records
        .iter()
        .filter(|r| {
            r.attrs.iter().any(|(a, v)| {
                a.eq_ignore_ascii_case("objectClass") && v.eq_ignore_ascii_case("group")
            })
        })
        .map(|r| {
            let members = r
                .attrs
                .iter()
                .filter(|(a, _)| a.eq_ignore_ascii_case("member"))
                .map(|(_, v)| dn(v))
                .collect();
            (dn(&r.dn), members)
        })
        .collect()
}

/// Groups as sorted lines of normalised DNs, for readable assertion diffs.
pub fn show(groups: &Groups) -> String {
    let mut out = String::new();
    for (group, members) in groups {
        out.push_str(group.normalised());
        out.push('\n');
        for m in members {
            out.push_str("  ");
            out.push_str(m.normalised());
            out.push('\n');
        }
    }
    out
}

impl super::Slapd {
    /// Kills the server at once (SIGKILL: no goodbye to its clients, no
    /// clean shutdown); the data stays for [`super::Slapd::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::kill_and_reap(&mut child);
        }
    }
}
