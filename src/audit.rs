//! The audit trail: who changed which group's members, when and why.
//!
//! Every group change a pass applied (or, in a dry run, would have
//! applied) is logged at INFO as one line naming the group, the added and
//! removed member DNs (the first [`LOG_LIMIT`] of each, then a count) and
//! the cause. With `--audit-log FILE` the same record, with every member,
//! is appended to FILE as one JSON line and synced to disk before the
//! pass returns, so a batch only counts as done once its record is on
//! disk. The file is opened once, append-only, created 0600 and never
//! through a symlink. A refused deletion is not in the plan a pass
//! applies, so it is never recorded as applied.
//!
//! Each file record names the replica that wrote (and its process id, as
//! replicas on one machine share a name), the time to the microsecond and,
//! when replicas elect a writer, the leadership term the write was made in
//! ([`InTerm`]): enough to tell from the files of all replicas that no two
//! wrote at once.
//!
//! Before a pass sends its first Modify, every change it is about to send
//! is appended with `"intent": true`, all of them in one write and one
//! `fsync` ([`Recorder::intend`]): a process killed while its requests are in
//! flight, before their answers or their timeout, leaves that much in the
//! trail. An intent claims nothing; the record that follows it (applied,
//! or unanswered) says what became of it. An intent with no record after
//! it from the same process, and no later intent for the same group, is a
//! change that process was killed in the middle of, or that failed: the
//! group may or may not hold its values.
//!
//! A Modify that got no answer (a timeout, a server gone) may still have
//! been applied. It is recorded at once with `"unanswered": true` and the
//! values that were sent ([`InTerm::unanswered`]): a process killed before
//! it learns more leaves that much in the trail. Within the term it was
//! sent in, the next read of its group says which of its values are there,
//! and those are recorded as applied (cause `retry`). After the term
//! another writer may have changed the group, so a read proves nothing and
//! the unanswered record stands; the next leader's full sync repairs
//! whatever is wrong.
//!
//! Replicas and runs on one machine may share one file. Each record is
//! written under an exclusive `flock` on the file, held for the write, its
//! `fsync` and, when the write fails, the cut-back of its own partial
//! bytes: no other appender (of this program) writes in between, so a
//! cut-back only ever removes bytes this writer wrote. Under the same lock
//! a file that does not end in a newline (a partial line left by another
//! program, or a crash) gets one before the record, so a record always
//! starts a line. A file renamed or removed under the open log (log
//! rotation) is reopened by its path before the next record, with a
//! warning; the log is never the `--directory` LDIF file, whose commits
//! replace it by a rename ([`Audit::open`] refuses that).
//!
//! The lines are JSON with every control character (C0, DEL, C1) and the
//! Unicode line and paragraph separators (U+2028, U+2029) written as
//! `\uXXXX` escapes, so a reader splitting on any line break still sees
//! one record a line.
//!
//! A record that cannot be written (a full disk, an I/O error) describes a
//! change that is already in the directory and cannot be taken back, so it
//! is neither dropped nor allowed to pass unnoticed: the whole record is
//! logged at ERROR, a partial line is cut off again so the file stays
//! whole lines, the failure is counted (`gmsa_audit_write_failures_total`
//! in the daemon) and kept for the caller: `sync` exits non-zero naming
//! the file ([`Audit::write_failures`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tracing::{debug, error, info, warn};

use crate::model::Dn;
use crate::plan::GroupChange;
use crate::reconcile::{Cause, Record, Recorder};
use crate::safe_fs::Kind;

/// Member DNs shown per list in the log line; the file has all of them.
pub const LOG_LIMIT: usize = 20;

/// The audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("--audit-log {}: {source}", path.display())]
pub struct AuditError {
    /// The file named.
    pub path: PathBuf,
    /// What is wrong with it.
    pub source: OpenError,
}

/// Why the audit log cannot be opened for appending.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The folder it is to be created in is not there.
    #[error("its folder {} does not exist", .0.display())]
    NoFolder(PathBuf),
    /// A folder on its path is something else.
    #[error("{} is not a folder but {found}", folder.display())]
    NotAFolder {
        /// The part of the path that is not a folder.
        folder: PathBuf,
        /// What is there.
        found: Kind,
    },
    /// Something other than a regular file is at the path (a link is
    /// never followed).
    #[error("{0}, not a regular file")]
    WrongType(Kind),
    /// The open itself failed (permissions, a read-only mount, an
    /// immutable file).
    #[error("cannot be opened for appending: {0}")]
    Open(io::Error),
    /// It is the `--directory` LDIF file, which every commit replaces.
    #[error(
        "is the same file as --directory {}: the audit log must be a file of its own",
        .0.display()
    )]
    SameAsDirectory(PathBuf),
}

/// Opens `path` for appending (and reading its last byte), creating it
/// with mode 0600 when absent, never through a final symlink and only as
/// a regular file.
fn open_log(path: &Path) -> Result<File, OpenError> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|err| open_error(err, path))?;
    let meta = file.metadata().map_err(OpenError::Open)?;
    match Kind::of(meta.file_type()) {
        Kind::File => Ok(file),
        found => Err(OpenError::WrongType(found)),
    }
}

/// Whether [`Audit::open`] would accept `path`, found the same way but
/// without creating or writing anything: `config`'s check of the option.
pub fn check_log(path: &Path) -> Result<(), OpenError> {
    let opened = OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path);
    match opened {
        Ok(file) => match Kind::of(file.metadata().map_err(OpenError::Open)?.file_type()) {
            Kind::File => Ok(()),
            found => Err(OpenError::WrongType(found)),
        },
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
            let folder = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            if !fs::metadata(folder).is_ok_and(|meta| meta.is_dir()) {
                return Err(open_error(err, path));
            }
            // The file would be created there: the folder must be writable.
            let folder = std::ffi::CString::new(folder.as_os_str().as_bytes())
                .map_err(|e| OpenError::Open(io::Error::other(e)))?;
            // SAFETY: a NUL-terminated path; access(2) only reads it.
            if unsafe { libc::access(folder.as_ptr(), libc::W_OK) } == 0 {
                Ok(())
            } else {
                Err(OpenError::Open(io::Error::last_os_error()))
            }
        }
        Err(err) => Err(open_error(err, path)),
    }
}

/// What a failed open of `path` means, in the words of [`OpenError`].
fn open_error(err: io::Error, path: &Path) -> OpenError {
    let at_path = || match fs::symlink_metadata(path) {
        Ok(meta) => Some(Kind::of(meta.file_type())),
        Err(_) => None,
    };
    match err.raw_os_error() {
        Some(libc::ELOOP) => OpenError::WrongType(Kind::Symlink),
        Some(libc::EISDIR) => OpenError::WrongType(Kind::Directory),
        Some(libc::ENXIO) | Some(libc::EOPNOTSUPP) => match at_path() {
            Some(found) => OpenError::WrongType(found),
            None => OpenError::Open(err),
        },
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => {
            let folder = path.parent().unwrap_or(Path::new("/"));
            // The nearest part of the path that exists says which it is.
            for part in folder.ancestors() {
                match fs::metadata(part) {
                    Ok(meta) if meta.is_dir() => return OpenError::NoFolder(folder.to_owned()),
                    Ok(meta) => {
                        return OpenError::NotAFolder {
                            folder: part.to_owned(),
                            found: Kind::of(meta.file_type()),
                        }
                    }
                    Err(_) => continue,
                }
            }
            OpenError::NoFolder(folder.to_owned())
        }
        _ => OpenError::Open(err),
    }
}

/// An exclusive `flock` on a file, released when dropped.
struct Flock<'a>(&'a File);

impl<'a> Flock<'a> {
    fn exclusive(file: &'a File) -> io::Result<Flock<'a>> {
        loop {
            // SAFETY: flock on a descriptor this File owns.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Flock(file));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Appends `line` to `file` under an exclusive lock, after a newline when
/// the file does not end in one, and syncs it. On failure the bytes this
/// write added are cut off again (under the same lock, so they are ours).
fn write_locked(file: &File, line: &str) -> io::Result<()> {
    let _lock = Flock::exclusive(file)?;
    let before = file.metadata()?.len();
    let mut last = [b'\n'];
    if before > 0 {
        file.read_exact_at(&mut last, before - 1)?;
    }
    let text = if last[0] == b'\n' {
        line.to_owned()
    } else {
        format!("\n{line}")
    };
    // One write: with O_APPEND the lines land whole at the end.
    let result = (&*file)
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_data());
    if result.is_err() && file.metadata().is_ok_and(|meta| meta.len() > before) {
        let _ = file.set_len(before).and_then(|()| file.sync_data());
    }
    result
}

/// Whether `path` still names the file `file` is open on.
fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// Records that could not be written to the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--audit-log {}: {count} record(s) could not be written ({last_error}); \
     each is logged in full at ERROR",
    path.display()
)]
pub struct WriteFailures {
    /// The file.
    pub path: PathBuf,
    /// How many records were not written.
    pub count: u64,
    /// The last error.
    pub last_error: String,
}

/// Records applied membership changes in the log and, when asked, a file.
#[derive(Debug)]
pub struct Audit {
    /// This replica's name, in every file record.
    replica: String,
    /// The open `--audit-log`, with its path for error messages.
    file: Option<(PathBuf, Mutex<File>)>,
    /// Records not written so far, with the last error.
    failed: Mutex<Option<(u64, String)>>,
    /// Counts the records not written (the daemon's metric).
    failure_counter: Option<Counter>,
}

/// One line of the audit file.
#[derive(Debug, Serialize)]
struct Line<'a> {
    time: String,
    replica: &'a str,
    pid: u32,
    term: Option<u64>,
    group: &'a str,
    added: Vec<&'a str>,
    removed: Vec<&'a str>,
    cause: &'static str,
    dry_run: bool,
    /// Present (true) only on a record of a request that never got an
    /// answer: its values may or may not be in the directory.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    unanswered: bool,
    /// Present (true) only on a record of a change about to be sent.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    intent: bool,
}

/// What a file record says of its change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Said {
    /// Applied (in a dry run, would have been).
    Applied {
        /// Nothing was written.
        dry_run: bool,
    },
    /// Sent and never answered: it may or may not be in the directory.
    Unanswered,
    /// About to be sent.
    Intent,
}

impl Audit {
    /// An audit trail in the log only.
    pub fn log_only() -> Audit {
        Audit {
            replica: String::new(),
            file: None,
            failed: Mutex::new(None),
            failure_counter: None,
        }
    }

    /// An audit trail for `replica`, appending to `path` when given.
    /// `directory` is the `--directory` LDIF file, if one is used: an audit
    /// log that is the same file (same path, or same device and inode) is
    /// refused, as the directory's commits replace that file by a rename.
    pub fn open(
        path: Option<&Path>,
        replica: String,
        directory: Option<&Path>,
    ) -> Result<Audit, AuditError> {
        let file = match path {
            None => None,
            Some(path) => {
                let error = |source| AuditError {
                    path: path.to_owned(),
                    source,
                };
                if let Some(directory) = directory {
                    if same_path(path, directory) {
                        return Err(error(OpenError::SameAsDirectory(directory.to_owned())));
                    }
                }
                let file = open_log(path).map_err(error)?;
                if let Some(directory) = directory {
                    if let (Ok(log), Ok(dir)) = (file.metadata(), fs::metadata(directory)) {
                        if log.dev() == dir.dev() && log.ino() == dir.ino() {
                            return Err(error(OpenError::SameAsDirectory(directory.to_owned())));
                        }
                    }
                }
                Some((path.to_owned(), Mutex::new(file)))
            }
        };
        Ok(Audit {
            file,
            replica,
            ..Audit::log_only()
        })
    }

    /// Counts every record that could not be written in `counter` too.
    pub fn counting_failures(mut self, counter: Counter) -> Audit {
        self.failure_counter = Some(counter);
        self
    }

    /// This trail as the recorder of writes made in leadership `term`
    /// (`None` when no election runs).
    pub fn in_term(&self, term: Option<u64>) -> InTerm<'_> {
        InTerm { audit: self, term }
    }

    /// The records that could not be written so far, if any.
    pub fn write_failures(&self) -> Option<WriteFailures> {
        let (path, _) = self.file.as_ref()?;
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.as_ref().map(|(count, last_error)| WriteFailures {
            path: path.clone(),
            count: *count,
            last_error: last_error.clone(),
        })
    }

    /// Appends lines, in one write; on failure each line is logged in
    /// full at ERROR and counted.
    fn append(&self, lines: &[String]) {
        let Some((path, file)) = &self.file else {
            return;
        };
        let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Renamed away or removed (rotated): the records go to the path.
        if !still_at(&file, path) {
            match open_log(path) {
                Ok(reopened) => {
                    warn!(file = %path.display(), "the audit log was renamed or removed; reopened by its path");
                    *file = reopened;
                }
                Err(err) => {
                    warn!(file = %path.display(), error = %err, "the audit log was renamed or removed and cannot be reopened; appending to the open file");
                }
            }
        }
        let result = write_locked(&file, &lines.concat());
        drop(file);
        let Err(err) = result else {
            return;
        };
        for line in lines {
            error!(
                file = %path.display(),
                error = %err,
                record = line.trim_end(),
                "cannot write the audit log: this record is missing from it"
            );
        }
        let lost = lines.len() as u64;
        if let Some(counter) = &self.failure_counter {
            counter.inc_by(lost);
        }
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let count = failed.as_ref().map_or(0, |(count, _)| *count);
        *failed = Some((count + lost, err.to_string()));
    }

    /// Appends the changes a pass is about to send, one line each, in one
    /// write and one sync; the log has them at DEBUG.
    fn intend_in(&self, changes: &[(Cause, &GroupChange)], term: Option<u64>) {
        let changes = changes
            .iter()
            .filter(|(_, change)| !change.add.is_empty() || !change.delete.is_empty());
        for (cause, change) in changes.clone() {
            debug!(
                group = %change.group_dn,
                adds = change.add.len(),
                deletes = change.delete.len(),
                cause = cause.as_str(),
                term,
                "audit: members about to change"
            );
        }
        if self.file.is_none() {
            return;
        }
        let time = now_rfc3339();
        let lines: Vec<String> = changes
            .map(|(cause, change)| {
                line_json(
                    &self.replica,
                    term,
                    change,
                    *cause,
                    Said::Intent,
                    time.clone(),
                )
            })
            .collect();
        if !lines.is_empty() {
            self.append(&lines);
        }
    }

    fn record_in(&self, record: Record<'_>, term: Option<u64>) {
        let change = &record.result.applied;
        if change.add.is_empty() && change.delete.is_empty() {
            return;
        }
        info!(
            group = %change.group_dn,
            added = %listed(&change.add),
            removed = %listed(&change.delete),
            cause = record.cause.as_str(),
            dry_run = record.dry_run,
            term,
            "audit: members changed"
        );
        if self.file.is_some() {
            self.append(&[json_line(&self.replica, term, &record, now_rfc3339())]);
        }
    }
}

impl Recorder for Audit {
    fn record(&self, record: Record<'_>) {
        self.record_in(record, None);
    }

    fn intend(&self, changes: &[(Cause, &GroupChange)]) {
        self.intend_in(changes, None);
    }
}

/// An [`Audit`] recording writes made in one leadership term.
#[derive(Debug, Clone, Copy)]
pub struct InTerm<'a> {
    audit: &'a Audit,
    term: Option<u64>,
}

impl Recorder for InTerm<'_> {
    fn record(&self, record: Record<'_>) {
        self.audit.record_in(record, self.term);
    }

    fn intend(&self, changes: &[(Cause, &GroupChange)]) {
        self.audit.intend_in(changes, self.term);
    }
}

impl InTerm<'_> {
    /// Records a change whose Modify was sent in this term and got no
    /// answer: its values may or may not be in the directory. The record
    /// lists the values sent and says `unanswered`, so that the trail
    /// accounts for them either way.
    pub fn unanswered(&self, change: &GroupChange, cause: Cause) {
        if change.add.is_empty() && change.delete.is_empty() {
            return;
        }
        warn!(
            group = %change.group_dn,
            added = %listed(&change.add),
            removed = %listed(&change.delete),
            cause = cause.as_str(),
            term = self.term,
            "audit: a change that got no answer may have been applied"
        );
        if self.audit.file.is_some() {
            let line = line_json(
                &self.audit.replica,
                self.term,
                change,
                cause,
                Said::Unanswered,
                now_rfc3339(),
            );
            self.audit.append(&[line]);
        }
    }
}

/// The first [`LOG_LIMIT`] DNs, `; `-separated, then "and N more".
pub fn listed<'a>(dns: impl IntoIterator<Item = &'a Dn>) -> String {
    let dns: Vec<&Dn> = dns.into_iter().collect();
    let mut out = dns
        .iter()
        .take(LOG_LIMIT)
        .map(|dn| dn.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    if dns.len() > LOG_LIMIT {
        out.push_str(&format!(" and {} more", dns.len() - LOG_LIMIT));
    }
    out
}

/// The audit file's line for one record, newline included.
pub fn json_line(replica: &str, term: Option<u64>, record: &Record<'_>, time: String) -> String {
    let said = Said::Applied {
        dry_run: record.dry_run,
    };
    line_json(
        replica,
        term,
        &record.result.applied,
        record.cause,
        said,
        time,
    )
}

/// The audit file's line for `change`, as `said`, newline included.
fn line_json(
    replica: &str,
    term: Option<u64>,
    change: &GroupChange,
    cause: Cause,
    said: Said,
    time: String,
) -> String {
    let line = Line {
        time,
        replica,
        pid: std::process::id(),
        term,
        group: change.group_dn.as_str(),
        added: change.add.iter().map(Dn::as_str).collect(),
        removed: change.delete.iter().map(Dn::as_str).collect(),
        cause: cause.as_str(),
        dry_run: said == Said::Applied { dry_run: true },
        unanswered: said == Said::Unanswered,
        intent: said == Said::Intent,
    };
    let mut bytes = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, LineSafe);
    line.serialize(&mut serializer)
        .expect("BUG: an audit line always serialises");
    let mut text = String::from_utf8(bytes).expect("BUG: JSON is UTF-8");
    text.push('\n');
    text
}

/// Whether a character is escaped in the file beyond what JSON requires:
/// control characters (C0, DEL, C1, U+0085 among them) and the Unicode
/// line and paragraph separators, all of which some line readers split on.
fn breaks_lines(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Compact JSON with [`breaks_lines`] characters as `\uXXXX` escapes.
struct LineSafe;

impl serde_json::ser::Formatter for LineSafe {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut rest = fragment;
        while let Some((at, c)) = rest.char_indices().find(|&(_, c)| breaks_lines(c)) {
            writer.write_all(&rest.as_bytes()[..at])?;
            // All of them are in the Basic Multilingual Plane.
            write!(writer, "\\u{:04x}", u32::from(c))?;
            rest = &rest[at + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }
}

/// Whether two paths name one file by their text: the same path once `.`
/// parts and the folder's symlinks are resolved (the file itself need not
/// exist yet).
fn same_path(a: &Path, b: &Path) -> bool {
    let resolved = |p: &Path| -> PathBuf {
        match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) => fs::canonicalize(parent)
                .unwrap_or_else(|_| parent.to_owned())
                .join(name),
            _ => p.to_owned(),
        }
    };
    a == b || resolved(a) == resolved(b)
}

/// Now as RFC 3339 in UTC with microseconds.
pub fn now_rfc3339() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(since.as_secs() as i64, since.subsec_micros())
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn rfc3339(secs: i64, micros: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    // Days to a civil date in the proleptic Gregorian calendar, counted in
    // 400-year eras starting on 1 March so leap days fall at an era's end.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proid;
    use crate::plan::GroupChange;
    use crate::reconcile::{Cause, GroupResult};
    use std::collections::BTreeSet;

    fn hosts(n: usize) -> BTreeSet<Dn> {
        (0..n)
            .map(|i| Dn::parse(&format!("CN=h{i:02},OU=Servers,DC=ad,DC=com")).expect("dn"))
            .collect()
    }

    fn result(add: usize, delete: usize) -> GroupResult {
        let change = GroupChange {
            group_dn: Dn::parse("CN=web-gmsa-hosts,OU=Groups,DC=ad,DC=com").expect("dn"),
            proid: Proid::new("web").expect("proid"),
            add: hosts(add),
            delete: hosts(delete + 50).into_iter().skip(50).collect(),
        };
        GroupResult {
            planned: change.clone(),
            applied: change,
            failed: None,
            vanished: false,
            requests: 1,
            retries: 0,
            unanswered: false,
            settled: None,
        }
    }

    #[test]
    fn the_log_line_lists_twenty_then_a_count() {
        assert_eq!(listed(&hosts(0)), "");
        let two = listed(&hosts(2));
        assert_eq!(
            two,
            "CN=h00,OU=Servers,DC=ad,DC=com; CN=h01,OU=Servers,DC=ad,DC=com"
        );
        let twenty = listed(&hosts(20));
        assert_eq!(twenty.matches("CN=").count(), 20);
        assert!(!twenty.contains("more"));
        let many = listed(&hosts(23));
        assert_eq!(many.matches("CN=").count(), 20);
        assert!(
            many.ends_with("CN=h19,OU=Servers,DC=ad,DC=com and 3 more"),
            "{many}"
        );
    }

    #[test]
    fn the_file_line_is_one_json_object_with_every_member() {
        let result = result(23, 1);
        let record = Record {
            cause: Cause::Drift,
            dry_run: true,
            result: &result,
        };
        let line = json_line(
            "r1.ad.com",
            Some(3),
            &record,
            "2026-01-02T03:04:05.006007Z".into(),
        );
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let value: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(value["time"], "2026-01-02T03:04:05.006007Z");
        assert_eq!(value["replica"], "r1.ad.com");
        assert_eq!(value["pid"], std::process::id());
        assert_eq!(value["term"], 3);
        assert_eq!(value["group"], "CN=web-gmsa-hosts,OU=Groups,DC=ad,DC=com");
        assert_eq!(value["added"].as_array().expect("added").len(), 23);
        assert_eq!(value["removed"][0], "CN=h50,OU=Servers,DC=ad,DC=com");
        assert_eq!(value["cause"], "drift");
        assert_eq!(value["dry_run"], true);
    }

    #[test]
    fn a_quoted_control_character_cannot_break_the_line() {
        let json = serde_json::to_string(&Line {
            time: String::new(),
            replica: "a\nb",
            pid: 1,
            term: None,
            group: "g",
            added: vec![],
            removed: vec![],
            cause: "event",
            dry_run: false,
            unanswered: false,
            intent: false,
        })
        .expect("json");
        assert!(!json.contains('\n'), "{json}");
    }

    #[test]
    fn intents_are_one_line_per_change_marked_intent_and_claim_nothing_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(Some(&path), "r1".into(), None).expect("open");
        let one = result(2, 1).planned;
        let mut other = result(0, 3).planned;
        other.group_dn = Dn::parse("CN=db-gmsa-hosts,OU=Groups,DC=ad,DC=com").expect("dn");
        let empty = GroupChange {
            add: BTreeSet::new(),
            delete: BTreeSet::new(),
            ..one.clone()
        };
        audit.in_term(Some(4)).intend(&[
            (Cause::Event, &one),
            (Cause::Drift, &other),
            (Cause::Event, &empty),
        ]);
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        for (line, (cause, change)) in lines.iter().zip([("event", &one), ("drift", &other)]) {
            assert_eq!(line["intent"], true, "{line}");
            assert_eq!(line["term"], 4);
            assert_eq!(line["cause"], cause);
            assert_eq!(line["group"], change.group_dn.as_str());
            assert_eq!(
                line["added"].as_array().map(Vec::len),
                Some(change.add.len())
            );
            assert_eq!(
                line["removed"].as_array().map(Vec::len),
                Some(change.delete.len())
            );
            assert_eq!(line["dry_run"], false);
            assert_eq!(line.get("unanswered"), None);
        }
        // An applied record says nothing of intent.
        let applied = result(1, 0);
        audit.record(Record {
            cause: Cause::Event,
            dry_run: false,
            result: &applied,
        });
        let text = std::fs::read_to_string(&path).expect("read");
        let last: serde_json::Value =
            serde_json::from_str(text.lines().last().expect("a line")).expect("json");
        assert_eq!(last.get("intent"), None, "{last}");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(
            rfc3339(1_798_761_599, 999_999),
            "2026-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn the_file_is_created_0600_appended_and_never_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(Some(&path), "r1".into(), None).expect("open");
        let result = result(1, 0);
        let record = Record {
            cause: Cause::Event,
            dry_run: false,
            result: &result,
        };
        audit.record(record);
        audit.record(record);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);

        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        let err = Audit::open(Some(&link), "r1".into(), None).expect_err("a link is refused");
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn a_log_moved_away_is_reopened_by_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let moved = dir.path().join("audit.jsonl.1");
        let audit = Audit::open(Some(&path), "r1".into(), None).expect("open");
        let result = result(1, 0);
        let record = Record {
            cause: Cause::Event,
            dry_run: false,
            result: &result,
        };
        audit.record(record);
        std::fs::rename(&path, &moved).expect("rotate");
        audit.record(record);
        audit.record(record);
        let lines = |p: &Path| std::fs::read_to_string(p).expect("read").lines().count();
        assert_eq!((lines(&moved), lines(&path)), (1, 2));
        assert_eq!(audit.write_failures(), None);
    }

    #[test]
    fn a_record_carries_the_term_it_was_written_in_and_null_without_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(Some(&path), "r1".into(), None).expect("open");
        let result = result(1, 1);
        let record = Record {
            cause: Cause::FullSync,
            dry_run: false,
            result: &result,
        };
        audit.in_term(Some(7)).record(record);
        audit.record(record);
        let text = std::fs::read_to_string(&path).expect("read");
        let terms: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["term"].clone())
            .collect();
        assert_eq!(terms, [serde_json::json!(7), serde_json::Value::Null]);
        assert_eq!(audit.write_failures(), None);
    }
}
