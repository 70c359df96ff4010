//! The audit trail through the built binary against a real slapd: a `run`
//! session whose placements come and go, whose group is edited by hand and
//! repaired by the resync, and whose mass deletion is refused, gives
//! exactly the expected records in `--audit-log` and in its INFO log, and
//! leaves the file whole after SIGTERM; `sync` and `sync --dry-run` record
//! the same changes marked apart, and `run --dry-run` marks its records
//! too; `--audit-log` belongs to `sync` and `run` only; a record that
//! cannot be written (a full tmpfs) is logged in full, counted and, for
//! `sync`, an error naming the file; a change applied after a failure is
//! recorded once, as a retry; an elected leader's records carry its term.
//!
//! The tmpfs tests mount file systems, so these tests run as root (as CI
//! does); every mount is unmounted when its test ends, failed or not.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::{Output, Stdio};

use serde_json::Value;
use support::daemon::{computers_and_groups, host_dn, password_file, GROUP_OU};
use support::daemon_bin::DaemonProcess;
use support::e2e::{bin, dn, read_groups};
use support::tmpfs::Tmpfs;
use support::tree::Tree;
use support::zookeeper::ZooKeeper;
use support::Slapd;

/// The keys of every line of the audit file, no more, no fewer.
const KEYS: [&str; 9] = [
    "added", "cause", "dry_run", "group", "pid", "removed", "replica", "term", "time",
];

/// One audit record as compared: DNs normalised, lists in their order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rec {
    group: String,
    added: Vec<String>,
    removed: Vec<String>,
    cause: String,
    dry_run: bool,
}

fn norm(text: &str) -> String {
    dn(text).normalised().to_owned()
}

fn group_dn(group: &str) -> String {
    format!("cn={group},{GROUP_OU}")
}

/// The record of `group` adding and removing these hosts.
fn rec(group: &str, added: &[&str], removed: &[&str], cause: &str, dry_run: bool) -> Rec {
    let dns = |hosts: &[&str]| {
        let mut dns: Vec<String> = hosts.iter().map(|h| norm(&host_dn(h))).collect();
        dns.sort();
        dns
    };
    Rec {
        group: norm(&group_dn(group)),
        added: dns(added),
        removed: dns(removed),
        cause: cause.to_owned(),
        dry_run,
    }
}

/// Records by group, each group's in the order they were written.
fn by_group(records: &[Rec]) -> BTreeMap<String, Vec<Rec>> {
    let mut out: BTreeMap<String, Vec<Rec>> = BTreeMap::new();
    for r in records {
        out.entry(r.group.clone()).or_default().push(r.clone());
    }
    out
}

/// The records of the audit file (without the intents), checked whole:
/// see [`all_lines`]. Every record of a change made is preceded by an
/// intent of the same process for the same group that lists its values.
fn file_lines(path: &Path) -> Vec<Value> {
    let all = all_lines(path);
    let (intents, records): (Vec<&Value>, Vec<&Value>) =
        all.iter().partition(|line| line.get("intent").is_some());
    for (at, record) in all.iter().enumerate() {
        if record.get("intent").is_some() || record["dry_run"] == true {
            continue;
        }
        let covers = |intent: &&Value, key: &str| {
            let listed: BTreeSet<&str> = dn_strings(&intent[key]).collect();
            dn_strings(&record[key]).all(|dn| listed.contains(dn))
        };
        assert!(
            all[..at]
                .iter()
                .filter(|l| l.get("intent").is_some())
                .any(|intent| {
                    intent["pid"] == record["pid"]
                        && intent["group"] == record["group"]
                        && covers(&intent, "added")
                        && covers(&intent, "removed")
                }),
            "no intent before {record}; intents: {intents:?}"
        );
    }
    records.into_iter().cloned().collect()
}

/// The DNs of a record's `added` or `removed` list.
fn dn_strings(list: &Value) -> impl Iterator<Item = &str> {
    list.as_array()
        .expect("a list")
        .iter()
        .map(|dn| dn.as_str().expect("a DN string"))
}

/// Every line of the audit file, checked whole: the file ends with a
/// newline, each line is one JSON object with exactly [`KEYS`] (and
/// `"unanswered": true` on a record of a Modify without answer,
/// `"intent": true` on a change about to be sent), a time in RFC 3339 UTC
/// with microseconds.
fn all_lines(path: &Path) -> Vec<Value> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the audit file ends in a partial line:\n{text}"
    );
    text.lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line:?}"));
            let keys: BTreeSet<&str> = value
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {line}"))
                .keys()
                .map(String::as_str)
                .collect();
            // `unanswered` only on the record of a Modify without answer.
            let mut expected = BTreeSet::from(KEYS);
            for flag in ["unanswered", "intent"] {
                if value.get(flag).is_some() {
                    assert_eq!(value[flag], Value::Bool(true), "{line}");
                    expected.insert(flag);
                }
            }
            assert_eq!(keys, expected, "{line}");
            let time = value["time"].as_str().expect("time is a string");
            assert!(is_rfc3339_micros(time), "time {time:?} in {line}");
            value
        })
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn is_rfc3339_micros(time: &str) -> bool {
    let b = time.as_bytes();
    b.len() == 27
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            26 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

fn file_rec(line: &Value) -> Rec {
    let dns = |key: &str| {
        line[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is a list: {line}"))
            .iter()
            .map(|v| norm(v.as_str().expect("a DN string")))
            .collect()
    };
    Rec {
        group: norm(line["group"].as_str().expect("group")),
        added: dns("added"),
        removed: dns("removed"),
        cause: line["cause"].as_str().expect("cause").to_owned(),
        dry_run: line["dry_run"].as_bool().expect("dry_run"),
    }
}

fn file_records(path: &Path) -> Vec<Rec> {
    file_lines(path).iter().map(file_rec).collect()
}

/// The INFO audit lines of a `--log-format json` log, in order.
fn log_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["fields"]["message"] == "audit: members changed")
        .inspect(|v| assert_eq!(v["level"], "INFO", "{v}"))
        .collect()
}

/// A log line's DN list: `; `-separated (short lists only).
fn log_dns(text: &str) -> Vec<String> {
    assert!(!text.contains(" more"), "a short list: {text}");
    text.split("; ")
        .filter(|s| !s.is_empty())
        .map(norm)
        .collect()
}

fn log_records(log: &str) -> Vec<Rec> {
    log_lines(log)
        .iter()
        .map(|v| {
            let f = &v["fields"];
            Rec {
                group: norm(f["group"].as_str().expect("group")),
                added: log_dns(f["added"].as_str().expect("added")),
                removed: log_dns(f["removed"].as_str().expect("removed")),
                cause: f["cause"].as_str().expect("cause").to_owned(),
                dry_run: f["dry_run"].as_bool().expect("dry_run"),
            }
        })
        .collect()
}

/// The members of `group` in slapd, normalised, read with plain ldap3.
fn members(slapd: &Slapd, group: &str) -> BTreeSet<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let groups = rt.block_on(read_groups(
        &slapd.url(),
        slapd.admin_dn(),
        slapd.admin_password(),
        GROUP_OU,
    ));
    groups
        .get(&dn(&group_dn(group)))
        .map(|m| m.iter().map(|d| d.normalised().to_owned()).collect())
        .unwrap_or_default()
}

fn hosts_set(hosts: &[&str]) -> BTreeSet<String> {
    hosts.iter().map(|h| norm(&host_dn(h))).collect()
}

/// Options shared by `sync` and `run` here.
fn common(tree: &Tree, slapd: &Slapd, pw: &Path) -> Vec<String> {
    vec![
        format!("--fs-root={}", tree.root().display()),
        format!("--ldap-url={}", slapd.url()),
        format!("--bind-dn={}", Slapd::SVC_DN),
        format!("--bind-password-file={}", pw.display()),
        format!("--group-ou={GROUP_OU}"),
        "--partition=p1".to_owned(),
        "--timeout=5s".to_owned(),
        "--log-format=json".to_owned(),
    ]
}

fn run_bin(args: &[String]) -> Output {
    bin()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run gmsa-reconciler")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What `/metrics` says of the full syncs: (started, last completed).
fn full_syncs(daemon: &DaemonProcess) -> (f64, f64) {
    let (status, body) = daemon.get("/metrics");
    assert_eq!(status, 200, "{body}");
    (
        support::daemon::metric_sum(&body, "gmsa_resyncs_total"),
        support::daemon::metric_sum(&body, "gmsa_last_full_sync_timestamp_seconds"),
    )
}

/// Waits until the audit file holds `n` records. Counted by their
/// newlines, not parsed: a read while the daemon appends may see part of a
/// line (the file is checked whole once the records are there).
fn wait_records(daemon: &mut DaemonProcess, path: &Path, n: usize, what: &str) {
    let records = || {
        let text = fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line.get("intent").is_none())
            .count()
    };
    daemon.wait_for(what, |_| records() >= n);
}

/// A tree change made by the daemon session below: made just after a full
/// sync completed, so that the periodic resync does not overlap it. Should
/// one overlap anyway (a stalled machine), the resync may be the pass that
/// applies the change: the same change with cause `full-sync`. Returns the
/// records the change must have given, causes settled.
fn event_step(
    daemon: &mut DaemonProcess,
    audit: &Path,
    change: impl FnOnce(),
    expected: Vec<Rec>,
    what: &str,
) -> Vec<Rec> {
    let before = file_lines(audit).len();
    let (_, last) = full_syncs(daemon);
    daemon.wait_for("a full sync to complete", |d| full_syncs(d).1 > last);
    let start = full_syncs(daemon);
    change();
    wait_records(daemon, audit, before + expected.len(), what);
    let end = full_syncs(daemon);
    let overlapped = end != start;
    let got: Vec<Rec> = file_records(audit)[before..].to_vec();
    assert_eq!(got.len(), expected.len(), "{what}: {got:#?}");
    expected
        .into_iter()
        .zip(got)
        .map(|(want, got)| {
            if overlapped && got.cause == "full-sync" {
                Rec {
                    cause: got.cause.clone(),
                    ..want
                }
            } else {
                want
            }
        })
        .collect()
}

#[test]
fn a_daemon_session_records_exactly_what_it_applied_and_the_file_survives_sigterm() {
    let hosts = ["h1", "h2", "h3", "h4", "h5"];
    let groups = [
        "web-gmsa-hosts",
        "db-gmsa-hosts",
        "app-gmsa-hosts",
        "cache-gmsa-hosts",
    ];
    let slapd = Slapd::start_with(&[&computers_and_groups(&hosts, &groups)]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    for h in hosts {
        tree.server(h, "p1", &host_dn(h));
    }
    tree.place("h1", "web.app#1");
    tree.place("h1", "db.app#1");
    for proid in ["web", "db", "app"] {
        tree.place("h3", &format!("{proid}.app#3"));
    }
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let audit = dir.path().join("audit.jsonl");
    let mut args = common(&tree, &slapd, &pw);
    args.extend([
        format!("--audit-log={}", audit.display()),
        "--batch-window=50ms".to_owned(),
        "--resync-interval=2s".to_owned(),
        "--max-delete=2".to_owned(),
        "--no-lock".to_owned(),
    ]);
    let mut daemon = DaemonProcess::start(&args);

    // The initial full sync.
    let mut expected = vec![
        rec("app-gmsa-hosts", &["h3"], &[], "full-sync", false),
        rec("db-gmsa-hosts", &["h1", "h3"], &[], "full-sync", false),
        rec("web-gmsa-hosts", &["h1", "h3"], &[], "full-sync", false),
    ];
    wait_records(&mut daemon, &audit, 3, "the initial sync's records");
    daemon.wait_ready();

    // A placement appears; then one goes.
    expected.extend(event_step(
        &mut daemon,
        &audit,
        || tree.place("h2", "web.app#2"),
        vec![rec("web-gmsa-hosts", &["h2"], &[], "event", false)],
        "h2 placed",
    ));
    expected.extend(event_step(
        &mut daemon,
        &audit,
        || tree.unplace("h1", "web.app#1"),
        vec![rec("web-gmsa-hosts", &[], &["h1"], "event", false)],
        "h1's web instance gone",
    ));
    assert_eq!(members(&slapd, "web-gmsa-hosts"), hosts_set(&["h2", "h3"]));

    // By hand: a host that should be a member is removed, a managed host
    // that should not be is added. The resync repairs both, as drift.
    let before = file_lines(&audit).len();
    slapd.ldapmodify(&format!(
        "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n-\nadd: member\nmember: {}\n-\n",
        group_dn("web-gmsa-hosts"),
        host_dn("h2"),
        host_dn("h4"),
    ));
    wait_records(&mut daemon, &audit, before + 1, "the resync's repair");
    expected.push(rec("web-gmsa-hosts", &["h2"], &["h4"], "drift", false));
    assert_eq!(members(&slapd, "web-gmsa-hosts"), hosts_set(&["h2", "h3"]));

    // h3 leaves: three deletions in one batch, more than --max-delete.
    // Refused, they stay pending and are never recorded as applied.
    let refusals = daemon.metric("gmsa_guard_refusals_total");
    tree.remove_server("h3");
    daemon.wait_for("the refusal", |d| {
        d.metric("gmsa_guard_refusals_total") > refusals
            && d.metric("gmsa_refused_deletions_pending") == 3.0
    });
    // Then an unrelated placement: applied and recorded, after the refusal.
    expected.extend(event_step(
        &mut daemon,
        &audit,
        || tree.place("h5", "cache.app#5"),
        vec![rec("cache-gmsa-hosts", &["h5"], &[], "event", false)],
        "h5 placed after the refusal",
    ));
    for group in ["web-gmsa-hosts", "db-gmsa-hosts", "app-gmsa-hosts"] {
        assert!(
            members(&slapd, group).contains(&norm(&host_dn("h3"))),
            "{group}: the refused deletion was not applied"
        );
    }

    let pid = daemon.pid();
    // Read before it stops: the log goes with the process.
    let log = daemon.log();
    assert_eq!(daemon.stop(), Some(0), "SIGTERM exits 0");

    // The file is whole and holds exactly these records, in order per group.
    let lines = file_lines(&audit);
    let records: Vec<Rec> = lines.iter().map(file_rec).collect();
    assert_eq!(
        by_group(&records),
        by_group(&expected),
        "the audit file's records, per group"
    );
    assert_eq!(records.len(), expected.len());
    assert!(
        records
            .iter()
            .all(|r| !r.removed.contains(&norm(&host_dn("h3")))),
        "a refused deletion recorded as applied: {records:#?}"
    );
    let mut last_time = String::new();
    for line in &lines {
        assert_eq!(line["term"], Value::Null, "no election, no term: {line}");
        assert_eq!(line["pid"], pid, "{line}");
        assert!(
            line["replica"].as_str().is_some_and(|r| !r.is_empty()),
            "{line}"
        );
        let time = line["time"].as_str().expect("time").to_owned();
        assert!(
            time >= last_time,
            "times in order: {time} after {last_time}"
        );
        last_time = time;
    }

    // The INFO log has the same records, in the same order (each is
    // logged before it is appended to the file).
    assert_eq!(log_records(&log), records, "the INFO audit lines\n{log}");
}

#[test]
fn sync_and_its_dry_run_record_the_same_changes_marked_apart() {
    // 23 hosts join web: the log line shows 20 and a count, the file all.
    let hosts: Vec<String> = (0..23).map(|i| format!("s{i:02}")).collect();
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let slapd = Slapd::start_with(&[&computers_and_groups(
        &host_refs,
        &["web-gmsa-hosts", "db-gmsa-hosts"],
    )]);
    slapd.ldapmodify(&format!(
        "dn: {}\nchangetype: modify\nadd: member\nmember: {}\n-\n",
        group_dn("db-gmsa-hosts"),
        host_dn("s05")
    ));
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    for h in &hosts {
        tree.server(h, "p1", &host_dn(h));
        tree.place(h, &format!("web.app#{h}"));
    }
    tree.place("s00", "db.app#1");
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let audit = dir.path().join("audit.jsonl");
    let changes = |dry_run: bool| {
        vec![
            rec("db-gmsa-hosts", &["s00"], &["s05"], "full-sync", dry_run),
            rec("web-gmsa-hosts", &host_refs, &[], "full-sync", dry_run),
        ]
    };

    // The dry run: the flag, INFO shown with -v.
    let mut args = vec!["sync".to_owned(), "--dry-run".to_owned(), "-v".to_owned()];
    args.extend(common(&tree, &slapd, &pw));
    args.push(format!("--audit-log={}", audit.display()));
    let out = run_bin(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut want = changes(true);
    assert_eq!(by_group(&file_records(&audit)), by_group(&want));
    assert!(
        members(&slapd, "web-gmsa-hosts").is_empty(),
        "a dry run writes nothing"
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines = log_lines(&log);
    assert_eq!(lines.len(), 2, "{log}");
    let web = lines
        .iter()
        .find(|l| {
            l["fields"]["group"].as_str().map(norm) == Some(norm(&group_dn("web-gmsa-hosts")))
        })
        .expect("web's line");
    let added = web["fields"]["added"].as_str().expect("added");
    assert!(added.ends_with(" and 3 more"), "{added}");
    assert_eq!(added.matches("; ").count(), 19, "twenty DNs: {added}");
    assert_eq!(web["fields"]["dry_run"], true);
    assert_eq!(web["fields"]["cause"], "full-sync");

    // The real run, with the file named by the config file's key (relative
    // to the file's folder).
    let config = dir.path().join("gmsa.yml");
    fs::write(&config, "audit-log: audit.jsonl\n").expect("config");
    let mut args = vec![
        "sync".to_owned(),
        "-v".to_owned(),
        format!("--config={}", config.display()),
    ];
    args.extend(common(&tree, &slapd, &pw));
    let out = run_bin(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    want.extend(changes(false));
    let records = file_records(&audit);
    assert_eq!(by_group(&records), by_group(&want));
    assert!(records[..2].iter().all(|r| r.dry_run) && records[2..].iter().all(|r| !r.dry_run));
    assert_eq!(members(&slapd, "web-gmsa-hosts"), hosts_set(&host_refs));
    assert_eq!(members(&slapd, "db-gmsa-hosts"), hosts_set(&["s00"]));
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(log_lines(&log).len(), 2, "{log}");
    assert!(log_lines(&log)
        .iter()
        .all(|l| l["fields"]["dry_run"] == false));

    // Nothing to do: nothing recorded.
    let out = run_bin(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(file_lines(&audit).len(), 4);

    // `plan` reads the same config file and ignores the key (it is
    // another command's); it takes no --audit-log, and neither does explain.
    let mut plan = vec!["plan".to_owned(), format!("--config={}", config.display())];
    plan.extend(common(&tree, &slapd, &pw));
    let out = run_bin(&plan);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(file_lines(&audit).len(), 4, "plan records nothing");
    for command in ["plan", "explain"] {
        let mut args = vec![
            command.to_owned(),
            format!("--audit-log={}", audit.display()),
        ];
        args.extend(common(&tree, &slapd, &pw));
        if command == "explain" {
            args.push("--proid=web".to_owned());
        }
        let out = run_bin(&args);
        assert_eq!(out.status.code(), Some(1), "{command}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("unexpected argument '--audit-log"),
            "{command}: {stderr}"
        );
    }
}

/// The ERROR lines of a JSON log that carry a record the file lost.
fn lost_records(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["level"] == "ERROR" && v["fields"]["record"].is_string())
        .map(|v| {
            let record = v["fields"]["record"].as_str().expect("record");
            serde_json::from_str(record)
                .unwrap_or_else(|e| panic!("the logged record is not JSON ({e}): {record}"))
        })
        .collect()
}

#[test]
fn a_record_that_cannot_be_written_is_logged_in_full_and_sync_fails_naming_the_file() {
    // 200 members: a record of about 7 KiB, more than the one page the
    // full file system leaves, so the write is cut short and then fails.
    let hosts: Vec<String> = (0..200).map(|i| format!("f{i:03}")).collect();
    let host_refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let slapd = Slapd::start_with(&[&computers_and_groups(&host_refs, &["web-gmsa-hosts"])]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    for h in &hosts {
        tree.server(h, "p1", &host_dn(h));
        tree.place(h, &format!("web.app#{h}"));
    }
    tree.mark_ready();
    let tmpfs = Tmpfs::mount("256k");
    let filler = tmpfs.fill_leaving(1);
    let audit = tmpfs.path().join("audit.jsonl");
    let mut args = vec!["sync".to_owned()];
    args.extend(common(&tree, &slapd, &pw));
    args.push(format!("--audit-log={}", audit.display()));

    let out = run_bin(&args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // The change is in the directory, and the report says it was applied.
    assert_eq!(members(&slapd, "web-gmsa-hosts"), hosts_set(&host_refs));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("member: {}", host_dn("f199"))),
        "{stdout}"
    );
    // The error names the file and says what happened.
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stderr.lines().last().expect("an error line");
    let message = serde_json::from_str::<Value>(last).expect("a JSON line")["fields"]["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert!(
        message.contains(&format!("--audit-log {}", audit.display()))
            && message.contains("2 record(s)")
            && message.contains("could not be written"),
        "{message}"
    );
    // The records are not lost: the intent and the change applied are
    // logged in full at ERROR.
    let lost = lost_records(&stderr);
    assert_eq!(lost.len(), 2, "{stderr}");
    assert_eq!(lost[0]["intent"], true, "{}", lost[0]);
    assert_eq!(lost[1].get("intent"), None, "{}", lost[1]);
    for record in &lost {
        assert_eq!(
            file_rec(record),
            rec("web-gmsa-hosts", &host_refs, &[], "full-sync", false)
        );
    }
    // The part of the line that fit was cut off again: the file is whole.
    assert_eq!(fs::metadata(&audit).expect("audit file").len(), 0);

    // With room again, the next record lands whole.
    fs::remove_file(&filler).expect("free the tmpfs");
    tree.unplace("f007", "web.app#f007");
    let out = run_bin(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        file_records(&audit),
        [rec("web-gmsa-hosts", &[], &["f007"], "full-sync", false)]
    );
}

#[test]
fn the_daemon_counts_a_record_it_cannot_write_logs_it_in_full_and_keeps_going() {
    let slapd = Slapd::start_with(&[&computers_and_groups(&["h1", "h2"], &["web-gmsa-hosts"])]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    tree.server("h1", "p1", &host_dn("h1"));
    tree.server("h2", "p1", &host_dn("h2"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let tmpfs = Tmpfs::mount("256k");
    let filler = tmpfs.fill_leaving(0);
    let audit = tmpfs.path().join("audit.jsonl");
    let mut args = common(&tree, &slapd, &pw);
    args.extend([
        format!("--audit-log={}", audit.display()),
        "--batch-window=50ms".to_owned(),
        "--no-lock".to_owned(),
    ]);
    let mut daemon = DaemonProcess::start(&args);
    // The intent and the record of the change.
    daemon.wait_for("the failures counted", |d| {
        d.metric("gmsa_audit_write_failures_total") == 2.0
    });
    daemon.wait_ready();
    let lost = lost_records(&daemon.log());
    assert_eq!(lost.len(), 2, "{}", daemon.log());
    assert_eq!(lost[0]["intent"], true, "{}", lost[0]);
    for record in &lost {
        assert_eq!(
            file_rec(record),
            rec("web-gmsa-hosts", &["h1"], &[], "full-sync", false)
        );
    }
    assert_eq!(members(&slapd, "web-gmsa-hosts"), hosts_set(&["h1"]));
    assert!(file_lines(&audit).is_empty());

    // Room again: the next change is recorded in the file.
    fs::remove_file(&filler).expect("free the tmpfs");
    tree.place("h2", "web.app#2");
    wait_records(&mut daemon, &audit, 1, "h2's record");
    assert_eq!(daemon.metric("gmsa_audit_write_failures_total"), 2.0);
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        file_records(&audit),
        [rec("web-gmsa-hosts", &["h2"], &[], "event", false)]
    );
}

#[test]
fn an_elected_leaders_records_carry_its_term() {
    let zk = ZooKeeper::start();
    let slapd = Slapd::start_with(&[&computers_and_groups(&["h1"], &["web-gmsa-hosts"])]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    tree.server("h1", "p1", &host_dn("h1"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let audit = dir.path().join("audit.jsonl");
    let mut args = common(&tree, &slapd, &pw);
    args.extend([
        format!("--audit-log={}", audit.display()),
        format!("--zookeeper={}", zk.servers()),
        "--zookeeper-session-timeout=4s".to_owned(),
        format!("--lock-path=/audit-{}", std::process::id()),
    ]);
    let mut daemon = DaemonProcess::start(&args);
    wait_records(&mut daemon, &audit, 1, "the leader's first record");
    let lines = file_lines(&audit);
    assert_eq!(lines[0]["term"], 1, "{}", lines[0]);
    assert_eq!(
        file_rec(&lines[0]),
        rec("web-gmsa-hosts", &["h1"], &[], "full-sync", false)
    );
    let logged = log_lines(&daemon.log());
    assert_eq!(logged.len(), 1, "{}", daemon.log());
    assert_eq!(logged[0]["fields"]["term"], 1, "{}", logged[0]);
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn a_dry_run_daemon_records_what_it_would_do_marked_so() {
    let slapd = Slapd::start_with(&[&computers_and_groups(&["h1"], &["web-gmsa-hosts"])]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    tree.server("h1", "p1", &host_dn("h1"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let audit = dir.path().join("audit.jsonl");
    let mut args = common(&tree, &slapd, &pw);
    args.extend([
        format!("--audit-log={}", audit.display()),
        "--dry-run".to_owned(),
        "--no-lock".to_owned(),
    ]);
    let mut daemon = DaemonProcess::start(&args);
    wait_records(&mut daemon, &audit, 1, "the dry run's record");
    daemon.wait_ready();
    let log = daemon.log();
    assert_eq!(daemon.stop(), Some(0));
    let want = [rec("web-gmsa-hosts", &["h1"], &[], "full-sync", true)];
    assert_eq!(file_records(&audit), want);
    assert_eq!(log_records(&log), want, "{log}");
    assert!(
        members(&slapd, "web-gmsa-hosts").is_empty(),
        "a dry run writes nothing"
    );
}

#[test]
fn a_change_that_failed_is_recorded_once_applied_as_a_retry() {
    let mut slapd = Slapd::start_with(&[&computers_and_groups(&["h1", "h2"], &["web-gmsa-hosts"])]);
    let tree = Tree::new();
    let pw = password_file(tree.root(), Slapd::SVC_PASSWORD);
    tree.server("h1", "p1", &host_dn("h1"));
    tree.server("h2", "p1", &host_dn("h2"));
    tree.place("h1", "web.app#1");
    tree.mark_ready();
    let dir = tempfile::tempdir().expect("tmp");
    let audit = dir.path().join("audit.jsonl");
    let mut args = common(&tree, &slapd, &pw);
    args.extend([
        format!("--audit-log={}", audit.display()),
        "--batch-window=50ms".to_owned(),
        "--no-lock".to_owned(),
    ]);
    let mut daemon = DaemonProcess::start(&args);
    wait_records(&mut daemon, &audit, 1, "the initial sync's record");
    daemon.wait_ready();

    // The change's pass fails: no server answers. Its requests are counted
    // when the pass records its results, so once they are, the pass is
    // over and nothing it tried is in the file.
    slapd.stop();
    tree.place("h2", "web.app#2");
    daemon.wait_for("the failed pass", |d| {
        d.get("/metrics").1.contains("outcome=\"unreachable\"")
    });
    assert_eq!(
        file_lines(&audit).len(),
        1,
        "a failed change is not recorded"
    );
    slapd.restart();
    wait_records(&mut daemon, &audit, 2, "the retry's record");
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(
        file_records(&audit),
        [
            rec("web-gmsa-hosts", &["h1"], &[], "full-sync", false),
            rec("web-gmsa-hosts", &["h2"], &[], "retry", false),
        ]
    );
    assert_eq!(members(&slapd, "web-gmsa-hosts"), hosts_set(&["h1", "h2"]));
}
