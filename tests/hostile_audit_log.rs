//! The `--audit-log` file under hostile conditions, through the built
//! binary: two `sync` runs appending to one file while one of them cannot
//! write, a file left without its final newline, an audit log that is the
//! `--directory` LDIF file, paths that cannot be opened for appending (a
//! read-only mount among them, so these tests run as root), and
//! member DNs holding characters that line readers split on.

mod support;

use std::fs;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;
use support::e2e::bin;
use support::tree::{groups_ldif, Tree};

const GROUP_OU: &str = "ou=Groups,dc=ad,dc=com";

fn host_dn(host: &str) -> String {
    format!("cn={host},ou=Computers,dc=ad,dc=com")
}

/// A tree and an LDIF file in `dir` with `groups` groups, each to get host
/// h0 as its one new member.
fn estate(dir: &Path, groups: usize) -> Tree {
    let tree = Tree::new();
    tree.server("h0", "p1", &host_dn("h0"));
    let names: Vec<String> = (0..groups).map(|g| format!("p{g}-gmsa-hosts")).collect();
    for g in 0..groups {
        tree.place("h0", &format!("p{g}.app#{g}"));
    }
    tree.mark_ready();
    let none: &[&str] = &[];
    let spec: Vec<(&str, &[&str])> = names.iter().map(|n| (n.as_str(), none)).collect();
    fs::write(dir.join("dir.ldif"), groups_ldif(&spec)).expect("ldif");
    tree
}

fn sync(tree: &Tree, directory: &Path, audit: &Path) -> Command {
    let mut cmd = bin();
    cmd.arg("sync")
        .arg(format!("--fs-root={}", tree.root().display()))
        .arg(format!("--directory={}", directory.display()))
        .arg(format!("--group-ou={GROUP_OU}"))
        .arg("--partition=p1")
        .arg(format!("--audit-log={}", audit.display()))
        .arg("--max-delete=100000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The records of changes in the file (lines with a `pid`, intents left
/// out); other lines are returned as they are.
fn records(path: &Path) -> (Vec<Value>, Vec<String>) {
    let text = fs::read_to_string(path).expect("read the audit log");
    let mut records = Vec::new();
    let mut others = Vec::new();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(value) if value.get("intent").is_some() => {}
            Ok(value) if value.get("pid").is_some() => records.push(value),
            _ => others.push(line.to_owned()),
        }
    }
    (records, others)
}

#[test]
fn a_writer_that_cannot_append_never_cuts_off_another_writers_records() {
    const GROUPS: usize = 1500;
    let dir = tempfile::tempdir().expect("tmp");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    fs::create_dir(&a).expect("a");
    fs::create_dir(&b).expect("b");
    let tree_a = estate(&a, GROUPS);
    let tree_b = estate(&b, GROUPS);
    // A file (2.4 MB) already past the size limit A runs under (2 MB,
    // room for A's own log of every record it could not write): each of
    // A's appends fails with EFBIG, while B's go through.
    let audit = dir.path().join("audit.jsonl");
    fs::write(&audit, "{\"x\":1}\n".repeat(300_000)).expect("audit");
    let mut run_a = sync(&tree_a, &a.join("dir.ldif"), &audit);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        run_a.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 2_000_000,
                rlim_max: 2_000_000,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    // A's log (every record in full) to a file: a pipe nobody reads
    // until B is done would stop A and so the race.
    let log_a = dir.path().join("a.log");
    run_a
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log_a).expect("log"));
    let mut child_a = run_a.spawn().expect("start A");
    // A third appender taking the same lock, as fast as it can, so that
    // A's failing writes overlap appends of another writer many times.
    let stop = Arc::new(AtomicBool::new(false));
    let appender = {
        let (audit, stop) = (audit.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut file = fs::OpenOptions::new()
                .append(true)
                .open(&audit)
                .expect("open");
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: flock on a descriptor this thread owns.
                assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0);
                file.write_all(b"{\"y\":1}\n").expect("append");
                // SAFETY: as above.
                unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
                n += 1;
            }
            n
        })
    };
    let out_b = sync(&tree_b, &b.join("dir.ldif"), &audit)
        .output()
        .expect("run B");
    let status_a = child_a.wait().expect("wait A");
    stop.store(true, Ordering::Relaxed);
    let appended = appender.join().expect("appender");
    let log_a = fs::read_to_string(&log_a).expect("A's log");
    assert_eq!(out_b.status.code(), Some(0), "B\n{}", text(&out_b));
    assert_ne!(status_a.code(), Some(0), "A\n{log_a}");
    assert!(log_a.contains("could not be written"), "A\n{log_a}");
    let (records, others) = records(&audit);
    let pid_b = u64::from(child_pid(&out_b, &records));
    let of_b = records.iter().filter(|r| r["pid"] == pid_b).count();
    assert_eq!(of_b, GROUPS, "B's records in the file");
    assert_eq!(records.len(), GROUPS, "only B's records");
    let old = others.iter().filter(|l| *l == "{\"x\":1}").count();
    let new = others.iter().filter(|l| *l == "{\"y\":1}").count();
    assert_eq!(old, 300_000, "the old lines, whole");
    assert_eq!(new as u64, appended, "the other appender's lines, whole");
    assert_eq!(others.len(), old + new, "no partial lines");
}

/// B's pid: the one pid in the file's records (A wrote none).
fn child_pid(out_b: &Output, records: &[Value]) -> u32 {
    let pids: std::collections::BTreeSet<u64> =
        records.iter().filter_map(|r| r["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 1, "records of one writer\n{}", text(out_b));
    u32::try_from(*pids.iter().next().expect("a pid")).expect("pid")
}

#[test]
fn a_file_without_its_final_newline_gets_one_before_the_first_record() {
    let dir = tempfile::tempdir().expect("tmp");
    let tree = estate(dir.path(), 2);
    let audit = dir.path().join("audit.jsonl");
    fs::write(&audit, "{\"partial\":").expect("audit");
    let out = sync(&tree, &dir.path().join("dir.ldif"), &audit)
        .output()
        .expect("sync");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let (records, others) = records(&audit);
    assert_eq!(records.len(), 2, "both records parse");
    assert_eq!(others, ["{\"partial\":"]);
    assert!(fs::read_to_string(&audit)
        .expect("read")
        .starts_with("{\"partial\":\n{"));
}

#[test]
fn an_audit_log_that_is_the_directory_file_is_refused_naming_both() {
    let dir = tempfile::tempdir().expect("tmp");
    let tree = estate(dir.path(), 1);
    let ldif = dir.path().join("dir.ldif");
    let original = fs::read_to_string(&ldif).expect("ldif");
    let link = dir.path().join("hard-link.jsonl");
    fs::hard_link(&ldif, &link).expect("hard link");
    // The same name through a folder link: caught by the inode.
    let folder_link = dir.path().join("here");
    std::os::unix::fs::symlink(dir.path(), &folder_link).expect("symlink");
    let through_link = folder_link.join("dir.ldif");
    for audit in [&ldif, &link, &through_link] {
        let out = sync(&tree, &ldif, audit).output().expect("sync");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{}", text(&out));
        assert!(
            stderr.contains(&format!("--audit-log {}", audit.display()))
                && stderr.contains(&format!("--directory {}", ldif.display())),
            "{}",
            text(&out)
        );
        assert_eq!(
            fs::read_to_string(&ldif).expect("ldif"),
            original,
            "nothing written"
        );
    }
}

#[test]
fn an_audit_log_that_cannot_be_opened_for_appending_says_why() {
    let dir = tempfile::tempdir().expect("tmp");
    let tree = estate(dir.path(), 1);
    let ldif = dir.path().join("dir.ldif");
    let file = dir.path().join("a-file");
    fs::write(&file, "").expect("file");
    let folder = dir.path().join("a-folder");
    fs::create_dir(&folder).expect("folder");
    let missing = dir.path().join("missing");
    let cases = [
        (
            missing.join("audit.jsonl"),
            format!("its folder {} does not exist", missing.display()),
        ),
        (
            file.join("audit.jsonl"),
            format!("{} is not a folder but a regular file", file.display()),
        ),
        (folder.clone(), "a directory, not a regular file".to_owned()),
    ];
    for (audit, want) in cases {
        let out = sync(&tree, &ldif, &audit).output().expect("sync");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{}", text(&out));
        assert!(
            stderr.contains(&format!("--audit-log {}: {want}", audit.display())),
            "want {want:?}\n{}",
            text(&out)
        );
        assert!(!stderr.contains("cannot be read"), "{}", text(&out));
    }
}

#[test]
fn member_dns_with_line_separators_stay_on_one_line_of_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let tree = Tree::new();
    // Quoted with escapes: the server file's own reader accepts them.
    tree.server_raw(
        "h0",
        "partition: p1\nnt.dc: dc1.ad.com\n\
         nt.dn: \"cn=a\\u2028b\\u2029c\\u0085d\\u009be,ou=Computers,dc=ad,dc=com\"\n",
    );
    tree.place("h0", "p0.app#0");
    tree.mark_ready();
    let ldif = dir.path().join("dir.ldif");
    fs::write(&ldif, groups_ldif(&[("p0-gmsa-hosts", &[])])).expect("ldif");
    let audit = dir.path().join("audit.jsonl");
    let out = sync(&tree, &ldif, &audit).output().expect("sync");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let content = fs::read_to_string(&audit).expect("audit");
    // Every line break a line reader may split on, Python's included.
    let breaks = [
        '\n', '\r', '\u{b}', '\u{c}', '\u{1c}', '\u{1d}', '\u{1e}', '\u{85}', '\u{2028}',
        '\u{2029}',
    ];
    let pieces: Vec<&str> = content
        .split(&breaks[..])
        .filter(|l| !l.is_empty())
        .collect();
    // The intent and the record of the change.
    assert_eq!(pieces.len(), 2, "{content:?}");
    assert!(!content.contains('\u{9b}'), "{content:?}");
    for escape in ["\\u2028", "\\u2029", "\\u0085", "\\u009b"] {
        assert!(content.contains(escape), "{escape} in {content:?}");
    }
    for piece in pieces {
        let record: Value = serde_json::from_str(piece).expect("json");
        assert_eq!(
            record["added"][0].as_str().map(|s| s.contains('\u{2028}')),
            Some(true),
            "{record}"
        );
    }
}

#[test]
fn an_audit_log_on_a_read_only_mount_cannot_be_opened_for_appending() {
    let dir = tempfile::tempdir().expect("tmp");
    let tree = estate(dir.path(), 1);
    let ldif = dir.path().join("dir.ldif");
    let mount = tempfile::tempdir().expect("mount point");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(mount.path())
        .status()
        .expect("run mount");
    assert!(
        status.success(),
        "mount -t tmpfs -o ro failed ({status}): these tests run as root"
    );
    let audit = mount.path().join("audit.jsonl");
    let out = sync(&tree, &ldif, &audit).output();
    let _ = Command::new("umount").arg(mount.path()).status();
    let out = out.expect("sync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stderr.contains(&format!(
            "--audit-log {}: cannot be opened for appending: Read-only file system",
            audit.display()
        )),
        "{}",
        text(&out)
    );
}
