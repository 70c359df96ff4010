//! Hostile names and values: file names and server-file values carrying
//! control characters (newline, CR, NUL, escape sequences), `nt.dn`s that
//! are not DNs, and names full of what LDIF treats specially (leading space,
//! `:`, `<`, non-ASCII). Each is refused with a warning naming the file, and
//! nothing from the tree can add a line, a record or a log line of its own.
//!
//! The binary is driven as an operator would (`plan`, `run`, and `plan`'s
//! output applied to a real slapd with `ldapmodify`); the property tests
//! build random trees and read `plan`'s output with a small LDIF reader of
//! their own, not the crate's.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proptest::prelude::*;

use support::e2e;
use support::scenario::run_bin;
use support::tree::write_atomically;

const GROUP_OU: &str = "OU=Groups,DC=ad,DC=com";

// ---------------------------------------------------------------------------
// A tree and a directory file, written with any names

/// A placement tree and an LDIF directory file in one temp directory.
struct Cell {
    dir: tempfile::TempDir,
}

impl Cell {
    fn new() -> Cell {
        let dir = tempfile::tempdir().expect("temp dir");
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("servers")).expect("servers/");
        fs::create_dir_all(tree.join("placement")).expect("placement/");
        fs::write(tree.join(".modified"), "").expect(".modified");
        let cell = Cell { dir };
        cell.groups(&[]);
        cell
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("tree")
    }

    fn directory(&self) -> PathBuf {
        self.dir.path().join("directory.ldif")
    }

    /// A server file with these values, written as YAML double-quoted
    /// strings so that any character at all reaches the parser.
    fn server(&self, host: &str, partition: &str, dc: &str, dn: &str) {
        let content = format!(
            "partition: {}\nnt.dc: {}\nnt.dn: {}\ncpu: 100%\n",
            yaml_string(partition),
            yaml_string(dc),
            yaml_string(dn)
        );
        write_atomically(&self.root().join("servers").join(host), &content);
    }

    /// An in-scope server file for `host` with `nt.dn` = `dn`.
    fn good_server(&self, host: &str, dn: &str) {
        self.server(host, "p1", "dc1.ad.com", dn);
    }

    fn place(&self, host: &str, instance: &str) {
        let dir = self.root().join("placement").join(host);
        fs::create_dir_all(&dir).expect("host dir");
        write_atomically(&dir.join(instance), "{}\n");
    }

    /// Writes the directory: the base entries and one empty group per
    /// account name, every value base64 so that any name can be written.
    fn groups(&self, names: &[&str]) {
        fs::write(self.directory(), directory_ldif(names)).expect("directory");
    }

    fn args(&self) -> Vec<String> {
        vec![
            format!("--fs-root={}", self.root().display()),
            format!("--directory={}", self.directory().display()),
            format!("--group-ou={GROUP_OU}"),
        ]
    }

    fn plan(&self) -> Planned {
        let out = run_bin("plan", &self.args());
        assert_eq!(out.code, 0, "plan failed: {}{}", out.stdout, out.stderr);
        assert_log_lines_are_ours(&out.stderr);
        Planned {
            ldif: read_plan(&out.stdout),
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }
}

/// The DN of the `i`th group written by [`directory_ldif`].
fn group_dn(i: usize) -> String {
    format!("CN=g{i},{GROUP_OU}")
}

fn directory_ldif(names: &[&str]) -> String {
    let mut out = String::from(
        "version: 1\n\ndn: DC=ad,DC=com\nobjectClass: domain\n\ndn: OU=Groups,DC=ad,DC=com\nobjectClass: organizationalUnit\n",
    );
    for (i, name) in names.iter().enumerate() {
        out += &format!(
            "\ndn:: {}\nobjectClass: group\ncn:: {}\nsAMAccountName:: {}\n",
            STANDARD.encode(group_dn(i)),
            STANDARD.encode(name),
            STANDARD.encode(name)
        );
    }
    out
}

/// A YAML double-quoted scalar holding exactly `text`: printable ASCII as
/// it is, everything else as a `\U` escape.
fn yaml_string(text: &str) -> String {
    let mut out = String::from('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c => out.push_str(&format!("\\U{:08X}", u32::from(c))),
        }
    }
    out.push('"');
    out
}

/// What a `plan` run printed.
struct Planned {
    stdout: String,
    stderr: String,
    ldif: PlanText,
}

impl Planned {
    /// The one change record's added members, by group DN.
    fn adds(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.ldif
            .records
            .iter()
            .map(|r| (r.dn.clone(), r.add.clone()))
            .collect()
    }

    /// The warning lines that mention `text`.
    fn warned(&self, text: &str) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.contains(" WARN ") && l.contains(text))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// An LDIF reader of the tests' own

/// One `changetype: modify` record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    dn: String,
    add: BTreeSet<String>,
    delete: BTreeSet<String>,
}

/// `plan`'s output: its change records and its comment lines.
#[derive(Debug)]
struct PlanText {
    records: Vec<Change>,
    comments: Vec<String>,
}

/// Reads `plan` output strictly: comment lines, blank lines, and change
/// records of exactly the shape `plan` writes (`dn`, `changetype: modify`,
/// `add: member`/`delete: member` blocks of `member` values, each ended by
/// `-`). Any other line, and any control character but the line feed,
/// fails the test: that would be a line some input added.
fn read_plan(text: &str) -> PlanText {
    if let Some(c) = text.chars().find(|&c| c != '\n' && is_control(c)) {
        panic!("plan output holds the control character {c:?}: {text:?}");
    }
    let value = |line: &str, attr: &str| -> Option<String> {
        if let Some(b64) = line.strip_prefix(&format!("{attr}:: ")) {
            let bytes = STANDARD
                .decode(b64)
                .unwrap_or_else(|e| panic!("bad base64 in {line:?}: {e}"));
            return Some(String::from_utf8(bytes).expect("UTF-8 value"));
        }
        let plain = line.strip_prefix(&format!("{attr}: "))?;
        assert!(
            !plain.starts_with([' ', ':', '<']) && !plain.ends_with(' ') && plain.is_ascii(),
            "{line:?} should have been base64"
        );
        Some(plain.to_owned())
    };
    let mut records = Vec::new();
    let mut comments = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            comments.push(line.to_owned());
            continue;
        }
        let dn = value(line, "dn").unwrap_or_else(|| panic!("a line of its own: {line:?}"));
        assert_eq!(lines.next(), Some("changetype: modify"), "after {line:?}");
        let mut change = Change {
            dn,
            add: BTreeSet::new(),
            delete: BTreeSet::new(),
        };
        while let Some(op) = lines.next_if(|l| !l.is_empty()) {
            let values = match op {
                "add: member" => &mut change.add,
                "delete: member" => &mut change.delete,
                other => panic!("a line of its own in a record: {other:?}"),
            };
            loop {
                let line = lines.next().expect("a record ends with `-`");
                if line == "-" {
                    break;
                }
                let member =
                    value(line, "member").unwrap_or_else(|| panic!("not a member: {line:?}"));
                assert!(values.insert(member), "a value twice: {line:?}");
            }
        }
        records.push(change);
    }
    PlanText { records, comments }
}

/// A control character as names and server values are refused for it
/// (below U+0020, and U+007F), plus C1 and the Unicode line separators,
/// which no output line should carry either.
fn is_control(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Every line of a text log on standard error starts with its timestamp
/// (or is the binary's one error line): no input wrote a line of its own.
fn assert_log_lines_are_ours(stderr: &str) {
    for line in stderr.lines() {
        let timestamp = line.len() > 20
            && line.as_bytes()[..4].iter().all(u8::is_ascii_digit)
            && line[4..].starts_with('-')
            && line[10..].starts_with('T');
        assert!(
            timestamp || line.starts_with("gmsa-reconciler: "),
            "a log line not written by the logger: {line:?}\n{stderr}"
        );
        assert!(
            !line.chars().any(is_control),
            "a raw control character: {line:?}"
        );
    }
}

/// The changes an attacker would like to sneak into the plan.
const INJECTED: &str = "\n\ndn: cn=Domain Admins,ou=Groups,dc=ad,dc=com\nchangetype: modify\nadd: member\nmember: cn=attacker,ou=Computers,dc=ad,dc=com\n-\n\n#";

// ---------------------------------------------------------------------------
// Through the binary

#[test]
fn a_newline_in_a_placement_name_adds_no_record() {
    let cell = Cell::new();
    cell.groups(&["proid1-gmsa-hosts"]);
    cell.good_server("h1", "CN=h1,OU=Computers,DC=ad,DC=com");
    cell.place("h1", "proid1.web#1");
    // In the proid: it would be quoted in a missing-group comment.
    let in_proid = format!("evil{INJECTED}.web#2");
    cell.place("h1", &in_proid);
    // In the app part, of a proid that has a group.
    let in_app = format!("proid1.web{INJECTED}#3");
    cell.place("h1", &in_app);
    let planned = cell.plan();
    assert_eq!(
        planned.adds(),
        BTreeMap::from([(
            group_dn(0),
            BTreeSet::from(["CN=h1,OU=Computers,DC=ad,DC=com".to_owned()])
        )]),
        "{}",
        planned.stdout
    );
    assert!(
        !planned.stdout.contains("Domain Admins"),
        "{}",
        planned.stdout
    );
    assert!(!planned.stdout.contains("missing"), "{}", planned.stdout);
    for name in [&in_proid, &in_app] {
        let escaped = format!("placement/h1/{}", name.replace('\n', "\\n"));
        let warned = planned.warned(&escaped);
        assert_eq!(
            warned.len(),
            1,
            "one warning for {escaped:?}:\n{}",
            planned.stderr
        );
        assert!(
            warned[0].contains("instance name") && warned[0].contains("control character (U+000A)"),
            "{}",
            warned[0]
        );
    }

    // JSON logs: one JSON object a line, the name inside it as it is.
    let mut args = cell.args();
    args.push("--log-format=json".into());
    let out = run_bin("plan", &args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let messages: Vec<String> = out
        .stderr
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    for name in [&in_proid, &in_app] {
        let path = format!("placement/h1/{name}: instance name");
        assert_eq!(
            messages.iter().filter(|m| m.contains(&path)).count(),
            1,
            "{messages:#?}"
        );
    }
}

#[test]
fn a_newline_or_cr_in_nt_dn_makes_the_server_file_unusable() {
    let cell = Cell::new();
    cell.groups(&["proid1-gmsa-hosts"]);
    let with_lf = format!("CN=h1,OU=Computers,DC=ad,DC=com{INJECTED}");
    let with_cr = "CN=h2,OU=Computers,DC=ad,DC=com\r\ndn: cn=x\r\n".to_owned();
    cell.good_server("h1", &with_lf);
    cell.good_server("h2", &with_cr);
    cell.good_server("h3", "CN=h3,OU=Computers,DC=ad,DC=com");
    for host in ["h1", "h2", "h3"] {
        cell.place(host, "proid1.web#1");
        // A proid without a group: its hosts' DNs are quoted in a comment.
        cell.place(host, "nogroup.web#1");
    }
    let planned = cell.plan();
    let h3 = BTreeSet::from(["CN=h3,OU=Computers,DC=ad,DC=com".to_owned()]);
    assert_eq!(
        planned.adds(),
        BTreeMap::from([(group_dn(0), h3)]),
        "{}",
        planned.stdout
    );
    let missing: Vec<&String> = planned
        .ldif
        .comments
        .iter()
        .filter(|c| c.starts_with("#   "))
        .collect();
    assert_eq!(
        missing,
        ["#   CN=h3,OU=Computers,DC=ad,DC=com"],
        "{}",
        planned.stdout
    );
    assert!(
        !planned.stdout.contains("Domain Admins"),
        "{}",
        planned.stdout
    );
    for (host, code) in [("h1", "U+000A"), ("h2", "U+000D")] {
        let warned = planned.warned(&format!("servers/{host}: unusable server file: nt.dn"));
        assert_eq!(warned.len(), 1, "{host}:\n{}", planned.stderr);
        assert!(warned[0].contains(code), "{}", warned[0]);
    }
}

#[test]
fn an_nt_dn_that_is_not_a_dn_makes_the_server_file_unusable() {
    let cell = Cell::new();
    cell.groups(&["proid1-gmsa-hosts"]);
    cell.good_server("h1", "not a dn");
    cell.good_server("h2", "CN=h2,,DC=ad");
    cell.good_server("h3", "CN=h3,DC=ad");
    for host in ["h1", "h2", "h3"] {
        cell.place(host, "proid1.web#1");
    }
    let planned = cell.plan();
    let h3 = BTreeSet::from(["CN=h3,DC=ad".to_owned()]);
    assert_eq!(
        planned.adds(),
        BTreeMap::from([(group_dn(0), h3)]),
        "{}",
        planned.stdout
    );
    for host in ["h1", "h2"] {
        let warned = planned.warned(&format!(
            "servers/{host}: unusable server file: nt.dn: invalid DN"
        ));
        assert_eq!(warned.len(), 1, "{host}:\n{}", planned.stderr);
    }
}

#[test]
fn control_characters_in_nt_dc_and_partition_make_the_server_file_unusable() {
    let cell = Cell::new();
    cell.groups(&["proid1-gmsa-hosts"]);
    cell.server("h1", "p1", "dc1\u{1b}[2J", "CN=h1,DC=ad");
    cell.server("h2", "p1\u{0}", "dc1", "CN=h2,DC=ad");
    cell.server("h3", "p1", "dc1", "CN=h3\u{7f},DC=ad");
    cell.server("h4", "p1", "dc1", "CN=h4,DC=ad");
    for host in ["h1", "h2", "h3", "h4"] {
        cell.place(host, "proid1.web#1");
    }
    let planned = cell.plan();
    let h4 = BTreeSet::from(["CN=h4,DC=ad".to_owned()]);
    assert_eq!(
        planned.adds(),
        BTreeMap::from([(group_dn(0), h4)]),
        "{}",
        planned.stdout
    );
    for (host, key, code) in [
        ("h1", "nt.dc", "U+001B"),
        ("h2", "partition", "U+0000"),
        ("h3", "nt.dn", "U+007F"),
    ] {
        let warned = planned.warned(&format!("servers/{host}: unusable server file: {key}"));
        assert_eq!(warned.len(), 1, "{host}:\n{}", planned.stderr);
        assert!(warned[0].contains(code), "{}", warned[0]);
    }
}

#[test]
fn control_characters_in_host_names_are_refused() {
    let cell = Cell::new();
    cell.groups(&["proid1-gmsa-hosts"]);
    let hosts = ["h\u{1b}[2J", "h\u{1}", "h\u{7f}", "h\tx", "h\rx", "h\nx"];
    for (i, host) in hosts.iter().enumerate() {
        cell.good_server(host, &format!("CN=bad{i},DC=ad"));
        cell.place(host, "proid1.web#1");
    }
    // Not control characters: any of these is a host name like another.
    let fine = " h:<\u{e9}\u{85}";
    cell.good_server(fine, "CN=fine,DC=ad");
    cell.place(fine, "proid1.web#1");
    let planned = cell.plan();
    let want = BTreeSet::from(["CN=fine,DC=ad".to_owned()]);
    assert_eq!(
        planned.adds(),
        BTreeMap::from([(group_dn(0), want)]),
        "{}",
        planned.stdout
    );
    for host in hosts {
        for dir in ["servers", "placement"] {
            let path = format!("{dir}/{}", escape_like_the_log(host));
            let warned = planned.warned(&path);
            assert_eq!(warned.len(), 1, "{path}:\n{}", planned.stderr);
            assert!(
                warned[0].contains("host name") && warned[0].contains("control character"),
                "{}",
                warned[0]
            );
        }
    }
}

/// How the text log writes a name: control characters escaped as `\n`,
/// `\r`, `\t` or `\u{..}`.
fn escape_like_the_log(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' => "\\n".to_owned(),
            '\r' => "\\r".to_owned(),
            '\t' => "\\t".to_owned(),
            c if is_control(c) => format!("\\u{{{:x}}}", u32::from(c)),
            c => c.to_string(),
        })
        .collect()
}

#[test]
fn a_proid_with_a_nul_like_character_is_refused_even_with_a_group() {
    let cell = Cell::new();
    let proids = ["p\u{1}x", "p\u{7f}", "p\u{1b}"];
    let groups: Vec<String> = proids.iter().map(|p| format!("{p}-gmsa-hosts")).collect();
    let mut names: Vec<&str> = groups.iter().map(String::as_str).collect();
    names.push("proid1-gmsa-hosts");
    cell.groups(&names);
    cell.good_server("h1", "CN=h1,DC=ad");
    for proid in proids {
        cell.place("h1", &format!("{proid}.web#1"));
    }
    cell.place("h1", "proid1.web#1");
    let planned = cell.plan();
    let want = BTreeSet::from(["CN=h1,DC=ad".to_owned()]);
    assert_eq!(
        planned.adds(),
        BTreeMap::from([(group_dn(proids.len()), want)]),
        "{}",
        planned.stdout
    );
    assert!(!planned.stdout.contains("missing"), "{}", planned.stdout);
    for proid in proids {
        let path = format!("placement/h1/{}.web#1", escape_like_the_log(proid));
        assert_eq!(
            planned.warned(&path).len(),
            1,
            "{path}:\n{}",
            planned.stderr
        );
    }
}

#[test]
fn names_that_are_special_only_to_ldif_are_placed_and_written_in_base64() {
    let cell = Cell::new();
    let proids = [
        " lead", ":colon", "<angle", "trail ", "Zo\u{eb}", "#hash", "dn: x",
    ];
    let groups: Vec<String> = proids.iter().map(|p| format!("{p}-gmsa-hosts")).collect();
    let names: Vec<&str> = groups.iter().map(String::as_str).collect();
    cell.groups(&names);
    let dn = "CN=\\ h\u{f6}st: <1>,DC=ad";
    cell.good_server("h1", dn);
    for proid in proids {
        cell.place("h1", &format!("{proid}.web#1"));
    }
    let planned = cell.plan();
    let want: BTreeMap<String, BTreeSet<String>> = (0..proids.len())
        .map(|i| (group_dn(i), BTreeSet::from([dn.to_owned()])))
        .collect();
    assert_eq!(planned.adds(), want, "{}", planned.stdout);
    assert!(planned.warned("").is_empty(), "{}", planned.stderr);
}

// ---------------------------------------------------------------------------
// The daemon: the watcher refuses what the scan refuses

/// `gmsa-reconciler run` as a child process, its standard error collected.
struct Daemon {
    child: Child,
    stderr: std::thread::JoinHandle<String>,
}

impl Daemon {
    fn start(cell: &Cell) -> Daemon {
        let mut args = vec!["run".to_owned()];
        args.extend(cell.args());
        args.extend(["--no-lock", "--batch-window=20ms", "--partition=p1"].map(String::from));
        let mut child = e2e::bin()
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gmsa-reconciler run");
        let mut err = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        });
        Daemon { child, stderr }
    }

    /// SIGTERM, then the exit code and everything it logged.
    fn stop(mut self) -> (i32, String) {
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let status = self.child.wait().expect("wait for the daemon");
        let stderr = self.stderr.join().expect("stderr reader");
        (status.code().unwrap_or(-1), stderr)
    }
}

/// The members of the `i`th group, read back from the directory file.
fn members(directory: &Path, i: usize) -> BTreeSet<String> {
    let text = fs::read_to_string(directory).unwrap_or_default();
    let Ok(records) = gmsa_reconciler::ldif::parse(&text) else {
        return BTreeSet::new();
    };
    records
        .iter()
        .filter(|r| r.dn.eq_ignore_ascii_case(&group_dn(i)))
        .flat_map(|r| r.attrs.iter())
        .filter(|(a, _)| a.eq_ignore_ascii_case("member"))
        .map(|(_, v)| v.clone())
        .collect()
}

fn wait_for(what: &str, check: impl FnMut() -> bool) {
    support::wait_until(what, Duration::from_secs(30), check);
}

#[test]
fn the_daemon_refuses_hostile_names_as_they_arrive_and_keeps_a_hosts_last_good_definition() {
    let cell = Cell::new();
    cell.groups(&["proid1-gmsa-hosts"]);
    let h1 = "CN=h1,OU=Computers,DC=ad,DC=com";
    cell.good_server("h1", h1);
    cell.place("h1", "proid1.web#1");
    let daemon = Daemon::start(&cell);
    let directory = cell.directory();
    wait_for("the initial sync", || members(&directory, 0).contains(h1));

    // While it runs: a server file turning hostile, a hostile placement,
    // a hostile host, then one good change that must still be applied.
    cell.good_server("h1", &format!("CN=other,DC=ad{INJECTED}"));
    cell.place("h1", &format!("evil{INJECTED}.web#2"));
    let bad_host = "h\u{1b}]0;pwned\u{7}";
    cell.good_server(bad_host, "CN=bad,DC=ad");
    cell.place(bad_host, "proid1.web#1");
    let h2 = "CN=h2,OU=Computers,DC=ad,DC=com";
    cell.good_server("h2", h2);
    cell.place("h2", "proid1.web#1");
    wait_for("the good change", || members(&directory, 0).contains(h2));

    let (code, stderr) = daemon.stop();
    assert_eq!(code, 0, "{stderr}");
    assert_log_lines_are_ours(&stderr);
    assert_eq!(
        members(&directory, 0),
        BTreeSet::from([h1.to_owned(), h2.to_owned()]),
        "h1 keeps its last good DN; nothing else was added:\n{stderr}"
    );
    let warned = |text: &str| {
        stderr
            .lines()
            .filter(|l| l.contains(" WARN ") && l.contains(text))
            .count()
    };
    assert!(
        warned("servers/h1: nt.dn \"CN=other,DC=ad\\n") >= 1
            && warned("keeping its last good definition") >= 1,
        "{stderr}"
    );
    assert!(
        warned("placement/h1/evil\\n\\ndn: cn=Domain Admins") >= 1,
        "{stderr}"
    );
    assert!(
        warned(&format!("servers/{}", escape_like_the_log(bad_host))) >= 1,
        "{stderr}"
    );
    assert!(
        warned(&format!("placement/{}", escape_like_the_log(bad_host))) >= 1,
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------
// The attack of the issue, against a real server

#[tokio::test(flavor = "multi_thread")]
async fn the_plan_applied_with_ldapmodify_changes_only_what_it_should() {
    use support::Slapd;
    let admins = "cn=Domain Admins,ou=Groups,dc=ad,dc=com";
    let slapd = Slapd::start_with(&[&format!(
        "dn: {admins}\nobjectClass: group\ncn: Domain Admins\nsAMAccountName: Domain Admins\n"
    )]);
    let cell = Cell::new();
    let h1 = "cn=host1,ou=Computers,dc=ad,dc=com";
    cell.good_server("host1", h1);
    cell.place("host1", "proid1.web#1");
    // A proid without a group (quoted in a comment), and a DN that would be.
    cell.place("host1", &format!("evil{INJECTED}.web#2"));
    cell.good_server(
        "host2",
        &format!("cn=host2,ou=Computers,dc=ad,dc=com{INJECTED}"),
    );
    cell.place("host2", "nogroup.web#1");

    let password = e2e::password_file(cell.dir.path(), Slapd::SVC_PASSWORD);
    let mut args = vec![
        format!("--fs-root={}", cell.root().display()),
        "--group-ou=ou=Groups,dc=ad,dc=com".to_owned(),
    ];
    args.extend(e2e::ldap_args(&slapd.url(), Slapd::SVC_DN, &password));
    let out = run_bin("plan", &args);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);

    // Applied as the README says, before anything else is looked at: what
    // the server then holds is the point.
    slapd.ldapmodify(&out.stdout);
    let groups = e2e::read_groups(
        &slapd.url(),
        Slapd::SVC_DN,
        Slapd::SVC_PASSWORD,
        Slapd::BASE,
    )
    .await;
    assert_eq!(
        groups[&e2e::dn(admins)],
        BTreeSet::new(),
        "{}",
        e2e::show(&groups)
    );
    assert_eq!(
        groups[&e2e::dn("cn=proid1-gmsa-hosts,ou=Groups,dc=ad,dc=com")],
        BTreeSet::from([e2e::dn(h1)]),
        "{}",
        e2e::show(&groups)
    );
    assert_eq!(read_plan(&out.stdout).records.len(), 1, "{}", out.stdout);
    assert_log_lines_are_ours(&out.stderr);
}

// ---------------------------------------------------------------------------
// Property tests: random names and values, read back independently

/// Characters of every class that matters: line ends, NUL and other
/// controls, what LDIF and DNs treat specially, non-ASCII, and any char.
fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        4 => proptest::sample::select(vec![
            '\n', '\r', '\0', '\t', '\u{1}', '\u{1b}', '\u{7f}', ' ', ':', '<', '#', '=', ',',
            '+', ';', '"', '\\', '>', '-', '.', '/', '*', '\u{e9}', '\u{3a9}', '\u{85}',
            '\u{2028}', '\u{feff}', '\u{1f600}',
        ]),
        1 => any::<char>(),
    ]
}

/// Text of [`hostile_char`]s, control characters excluded out of `clean`
/// cases in ten: a placement counts only when every one of the six texts
/// it depends on is clean, and most cases should have some that count.
fn hostile_text(clean: u32) -> impl Strategy<Value = String> {
    let dirty = proptest::collection::vec(hostile_char(), 0..8);
    let clean_chars = proptest::collection::vec(
        hostile_char().prop_filter("no control character", |&c| !(c < ' ' || c == '\u{7f}')),
        0..8,
    );
    prop_oneof![clean => clean_chars, 10 - clean => dirty].prop_map(|cs| cs.into_iter().collect())
}

/// Text usable as (part of) a file name: no `/` and no NUL, which no file
/// name can hold.
fn file_name_text() -> impl Strategy<Value = String> {
    hostile_text(8).prop_map(|t| t.replace(['/', '\0'], ""))
}

#[derive(Debug, Clone)]
enum NtDn {
    /// `CN=<value escaped per RFC 4514>,OU=H<i>,DC=ad`, control characters
    /// left raw: a DN exactly when the value has none.
    Built(String),
    /// Not a DN at all.
    Broken(&'static str),
}

#[derive(Debug, Clone)]
struct Server {
    partition: String,
    dc: String,
    dn: NtDn,
}

#[derive(Debug, Clone)]
struct Host {
    name: String,
    server: Option<Server>,
    /// (proid index, app part) of each instance placed on the host.
    instances: Vec<(usize, String)>,
}

#[derive(Debug, Clone)]
struct Case {
    proids: Vec<String>,
    /// Which proids have a group.
    grouped: Vec<bool>,
    hosts: Vec<Host>,
}

fn nt_dn() -> impl Strategy<Value = NtDn> {
    prop_oneof![
        6 => hostile_text(7).prop_map(NtDn::Built),
        1 => proptest::sample::select(vec!["not a dn", "CN=a,,DC=b", "CN=a\\", "=x", "CN=x,DC"])
            .prop_map(NtDn::Broken),
    ]
}

/// Mostly a plain DC name, sometimes anything: `nt.dc` becomes the host of
/// an LDAP URL, so only a host name (and port) is usable.
fn nt_dc() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9][a-z0-9_-]{0,6}(\\.[a-z0-9-]{1,5}){0,2}(:[0-9]{1,5})?",
        1 => hostile_text(9).prop_map(|dc| format!("dc{dc}")),
    ]
}

fn server() -> impl Strategy<Value = Server> {
    (hostile_text(9), nt_dc(), nt_dn()).prop_map(|(partition, dc, dn)| Server { partition, dc, dn })
}

fn case() -> impl Strategy<Value = Case> {
    let proids = proptest::collection::vec(file_name_text(), 1..5).prop_map(|names| {
        let mut seen = BTreeSet::new();
        names
            .into_iter()
            .map(|p| {
                let p = p.replace('.', "");
                if p.is_empty() {
                    "p".to_owned()
                } else {
                    p
                }
            })
            // Groups match proids without regard to case: one proid per group.
            .filter(|p| seen.insert(p.to_lowercase()))
            .collect::<Vec<_>>()
    });
    proids.prop_flat_map(|proids| {
        let n = proids.len();
        let host = (
            file_name_text(),
            proptest::option::weighted(0.85, server()),
            proptest::collection::vec((0..n, file_name_text()), 0..4),
        )
            .prop_map(|(name, server, instances)| Host {
                name: if name.is_empty() || name.starts_with('.') {
                    format!("h{name}")
                } else {
                    name
                },
                server,
                instances,
            });
        (
            Just(proids),
            proptest::collection::vec(any::<bool>(), n),
            proptest::collection::vec(host, 1..6),
        )
            .prop_map(|(proids, grouped, hosts)| {
                let mut seen = BTreeSet::new();
                let hosts = hosts
                    .into_iter()
                    .filter(|h| seen.insert(h.name.clone()))
                    .collect();
                Case {
                    proids,
                    grouped,
                    hosts,
                }
            })
    })
}

/// Escapes a DN value per RFC 4514 but leaves control characters raw.
fn dn_value(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let edge_space = c == ' ' && (i == 0 || i + 1 == chars.len());
        if edge_space || (c == '#' && i == 0) || "\"+,;<>\\=".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn has_control(text: &str) -> bool {
    text.chars().any(|c| c < ' ' || c == '\u{7f}')
}

/// A host name with an optional port, as a DC's name must be, by this
/// test's own reading: dot-separated labels of ASCII letters, digits, `-`
/// and `_`, each at most 63 long, then `:` and a port from 1 to 65535.
fn is_dc_name(text: &str) -> bool {
    let (host, port) = match text.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (text, None),
    };
    let labels_ok = host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    let port_ok = port.is_none_or(|p| {
        (1..=5).contains(&p.len())
            && p.chars().all(|c| c.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
    });
    labels_ok && port_ok
}

impl Case {
    fn dn_text(&self, host: usize) -> Option<String> {
        let server = self.hosts[host].server.as_ref()?;
        Some(match &server.dn {
            NtDn::Built(value) => format!("CN={},OU=H{host},DC=ad", dn_value(value)),
            NtDn::Broken(text) => (*text).to_owned(),
        })
    }

    fn instance(&self, proid: usize, app: &str, n: usize) -> String {
        format!("{}.{app}#{n:010}", self.proids[proid])
    }

    fn write(&self, cell: &Cell) {
        let names: Vec<String> = self
            .proids
            .iter()
            .map(|p| format!("{p}-gmsa-hosts"))
            .collect();
        let grouped: Vec<&str> = names
            .iter()
            .zip(&self.grouped)
            .filter(|(_, g)| **g)
            .map(|(n, _)| n.as_str())
            .collect();
        cell.groups(&grouped);
        for (i, host) in self.hosts.iter().enumerate() {
            if let (Some(server), Some(dn)) = (&host.server, self.dn_text(i)) {
                cell.server(&host.name, &server.partition, &server.dc, &dn);
            }
            for (n, (proid, app)) in host.instances.iter().enumerate() {
                cell.place(&host.name, &self.instance(*proid, app, n));
            }
        }
    }

    /// What `plan` must print: the records by group DN, and the number of
    /// proids reported as having no group.
    fn expected(&self) -> (BTreeMap<String, BTreeSet<String>>, usize) {
        let mut desired: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        for (i, host) in self.hosts.iter().enumerate() {
            let Some(server) = &host.server else { continue };
            let dn = self.dn_text(i).expect("a server has a DN");
            let usable = matches!(server.dn, NtDn::Built(_))
                && !has_control(&server.partition)
                && is_dc_name(&server.dc)
                && !has_control(&dn)
                && !has_control(&host.name);
            if !usable {
                continue;
            }
            for (n, (proid, app)) in host.instances.iter().enumerate() {
                if !has_control(&self.instance(*proid, app, n)) {
                    desired.entry(*proid).or_default().insert(dn.clone());
                }
            }
        }
        let mut records = BTreeMap::new();
        let mut missing = 0;
        let mut group = 0;
        for (proid, grouped) in self.grouped.iter().enumerate() {
            let dns = desired.remove(&proid);
            if *grouped {
                if let Some(dns) = dns {
                    records.insert(group_dn(group), dns);
                }
                group += 1;
            } else if dns.is_some() {
                missing += 1;
            }
        }
        (records, missing)
    }
}

/// Checks one `plan` output against the case.
fn check(case: &Case, stdout: &str) -> Result<(), TestCaseError> {
    let planned = read_plan(stdout);
    let (want, missing) = case.expected();
    let got: BTreeMap<String, BTreeSet<String>> = planned
        .records
        .iter()
        .map(|r| (r.dn.clone(), r.add.clone()))
        .collect();
    prop_assert_eq!(got.len(), planned.records.len(), "one record per group");
    prop_assert!(planned.records.iter().all(|r| r.delete.is_empty()));
    prop_assert_eq!(&got, &want, "\n{}", stdout);
    let adds: usize = want.values().map(BTreeSet::len).sum();
    let summary = format!(
        "# gmsa-reconciler plan: {} group{}, {adds} addition{}, 0 deletions",
        want.len(),
        if want.len() == 1 { "" } else { "s" },
        if adds == 1 { "" } else { "s" },
    );
    prop_assert!(planned.comments[0].starts_with(&summary), "{}", stdout);
    let reported = planned
        .comments
        .iter()
        .filter(|c| c.starts_with("# missing group: proid "))
        .count();
    prop_assert_eq!(reported, missing, "\n{}", stdout);
    Ok(())
}

/// `plan` through the library, as `main` runs it.
fn plan_in_process(cell: &Cell) -> String {
    use gmsa_reconciler::cli::{self, Command, Config};
    let mut argv = vec!["gmsa-reconciler".to_owned(), "plan".to_owned()];
    argv.extend(cell.args());
    let Command::Plan(args) = cli::parse(argv).expect("options parse").command else {
        panic!("not plan");
    };
    let config = Config::from_args(&args.common, Some(&args.write)).expect("valid options");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut out = Vec::new();
    runtime
        .block_on(gmsa_reconciler::commands::plan_command(
            &config, false, &mut out,
        ))
        .expect("plan");
    String::from_utf8(out).expect("UTF-8 output")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn plan_emits_exactly_the_expected_records_for_any_names(case in case()) {
        let cell = Cell::new();
        case.write(&cell);
        check(&case, &plan_in_process(&cell))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_binary_emits_exactly_the_expected_records_and_log_lines_for_any_names(case in case()) {
        let cell = Cell::new();
        case.write(&cell);
        let planned = cell.plan();
        check(&case, &planned.stdout)?;
    }
}

/// `check` prints the group DN as the directory spells it: a DN holding a
/// newline (legal in a DN value) is printed escaped, on the one line.
#[test]
fn check_prints_a_directory_dn_with_a_newline_on_one_line() {
    let cell = Cell::new();
    let hostile = format!("CN=g\nmember: x,{GROUP_OU}");
    fs::write(
        cell.directory(),
        format!(
            "{}\ndn:: {}\nobjectClass: group\nsAMAccountName: proid1-gmsa-hosts\nmember: CN=h1,DC=ad,DC=com\n",
            directory_ldif(&[]),
            STANDARD.encode(&hostile)
        ),
    )
    .expect("directory");
    let out = run_bin(
        "check",
        &[
            format!("--directory={}", cell.directory().display()),
            format!("--group-ou={GROUP_OU}"),
            "--proid=proid1".to_owned(),
            "--host-dn=CN=h1,DC=ad,DC=com".to_owned(),
        ],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout,
        format!("CN=h1,DC=ad,DC=com is a member of CN=g\\nmember: x,{GROUP_OU}\n")
    );
}

#[test]
fn the_fatal_error_is_one_json_line_with_json_logs() {
    // A root whose name holds a newline and an escape does not exist: the
    // error quoting it is, like every other line, one JSON object, whether
    // JSON logs were asked for by flag, environment or config file.
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("no\nsuch\u{1b}[2Jtree");
    let directory = dir.path().join("directory.ldif");
    fs::write(&directory, directory_ldif(&[])).expect("directory");
    let config = dir.path().join("gmsa.yml");
    fs::write(&config, "log-format: json\n").expect("config");
    let common = [
        format!("--fs-root={}", root.display()),
        format!("--directory={}", directory.display()),
        format!("--group-ou={GROUP_OU}"),
    ];
    let ways: [(&[&str], Option<&str>); 3] = [
        (&["--log-format=json"], None),
        (&[], Some("json")),
        (&["--config", config.to_str().expect("path")], None),
    ];
    for (extra, env) in ways {
        for command in ["plan", "sync"] {
            let mut cmd = e2e::bin();
            cmd.arg(command).args(&common).args(extra);
            if let Some(format) = env {
                cmd.env("GMSA_LOG_FORMAT", format);
            }
            let out = cmd.output().expect("run");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command} {extra:?}: {stderr}");
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(lines.len(), 1, "{command} {extra:?}: {stderr}");
            let v: serde_json::Value = serde_json::from_str(lines[0])
                .unwrap_or_else(|e| panic!("{command} {extra:?}: not JSON: {:?}: {e}", lines[0]));
            assert_eq!(v["level"], "ERROR", "{}", lines[0]);
            let message = v["fields"]["message"].as_str().expect("message");
            assert!(
                message.contains("no such directory")
                    && message.contains(root.to_str().expect("path")),
                "{message}"
            );
        }
    }
}
