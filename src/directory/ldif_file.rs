//! The embedded backend: a directory kept in one LDIF content file.
//!
//! The file is read at [`LdifFileDirectory::open`]; reads and modifies then
//! go to an in-memory copy that behaves like a server with permissive
//! modify, and each modify that changed something is also kept as a
//! pending member change. [`Directory::commit`] saves them. A search of
//! all groups (the start of a pass, the daemon's periodic resync) first
//! takes the file's content again when it changed and nothing is
//! pending, so hand edits are seen without waiting for a write.
//!
//! The file is shared state: an operator may edit it by hand, and two
//! `sync` runs may work on it at once. So a commit never writes back the
//! snapshot it read. Under an exclusive advisory lock it reads the file
//! again; when the content differs from what this process last read or
//! wrote, it parses the fresh content and applies the pending member
//! changes (the adds and deletes, not whole groups) to it. Content is
//! compared rather than inode, size and mtime, because a same-size edit
//! within one timestamp tick, or a reused inode number, would pass an
//! identity check; what is kept of the last content is its length and a
//! hash keyed per process (not the bytes: at ten megabytes they would
//! weigh on the daemon's memory for nothing). The write is atomic and
//! durable (a temp file `.<name>.tmp.<pid>` in the same folder, fsync,
//! rename over the target, fsync of the folder), so a crash leaves the
//! old file or the new one. Temp files of that name found under the lock
//! can only be left by a killed run (a live one holds the lock while its
//! temp file exists) and are removed, unless a process with that id still
//! exists.
//!
//! The lock is `flock` on the data file itself, taken on a descriptor
//! opened before locking; after the lock is granted the path is checked
//! to still name that inode, and the lock is taken again on the new file
//! if not. A rename replaces the inode, so a lock on the old one protects
//! nothing; re-checking makes the lock follow the file without leaving a
//! lock file beside it, and anyone who runs `flock directory.ldif ...`
//! around a hand edit is serialised with us. An editor that takes no lock
//! is still noticed: just before the rename the path must name the locked
//! inode with the size and times it had when read, or the commit starts
//! again from the new content. A path that is a symlink is resolved first,
//! so the file it names is locked and replaced.
//!
//! A failed commit (disk full, an I/O error, a file that no longer parses)
//! leaves nothing half-applied in memory: the copy goes back to the file's
//! content, so the next pass plans the change again and its commit writes
//! it. When the file could not even be read, the copy is marked unknown
//! and every read takes the file again first (or fails while it cannot).
//! A file without write permission (checked from its permission bits too,
//! since root may rename over any file) or on a read-only mount is
//! refused, not replaced. Entries with the same DN (compared normalised)
//! make the file invalid.
//!
//! Every entry and attribute is written back unchanged and in order, but
//! the layout is ours: comments are dropped, folded lines are unfolded,
//! and a value is base64-encoded exactly when RFC 2849 requires it. The
//! file keeps its permission bits and, when we may, its owner.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use thiserror::Error;
use tracing::{info, warn};

use super::memory::{parse_dns, Flavour, MemoryDirectory, Parsed};
use super::{Capabilities, DirError, Directory, Group, MemberChange, Op};
use crate::ldif::{self, Record};
use crate::model::Dn;
use crate::safe_fs;

/// The largest directory file read. The file is configured by the
/// operator, not dropped into the tree, and a large estate's is ~10 MB,
/// so the cap is far above [`safe_fs::MAX_FILE`].
pub const MAX_DIRECTORY_FILE: u64 = 256 << 20;

/// How long a commit waits for another holder of the lock before giving
/// up (the pass is then retried like one that met a busy server).
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// How many times a commit starts again when the file is changed by
/// someone without the lock while the new content is written.
const RACES: usize = 5;

/// A member change waiting for the next commit.
type Pending = (Dn, MemberChange);

/// What is kept of the content last read or written: enough to tell
/// whether the file still holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: usize,
    hash: u64,
}

impl Fingerprint {
    fn of(keys: &RandomState, bytes: &[u8]) -> Fingerprint {
        let mut hasher = keys.build_hasher();
        hasher.write(bytes);
        Fingerprint {
            len: bytes.len(),
            hash: hasher.finish(),
        }
    }
}

/// A directory read from, and saved to, an LDIF content file.
#[derive(Debug)]
pub struct LdifFileDirectory {
    path: PathBuf,
    memory: Arc<MemoryDirectory>,
    /// The keys of the content hash, chosen at random per process so that
    /// no content can be made to look like another.
    keys: RandomState,
    /// The content the memory holds, as last read or written; `None` when
    /// unknown (a commit failed before the file could be read), and reads
    /// must take the file again. Held across a commit or a re-read so that
    /// two never overlap.
    base: tokio::sync::Mutex<Option<Fingerprint>>,
    /// The member changes applied to `memory` since the last commit, in
    /// order.
    pending: Mutex<Vec<Pending>>,
}

impl LdifFileDirectory {
    /// Reads and parses the file. Errors name the file as given and, for
    /// bad content, the line.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DirError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let bytes = read_file(&path).map_err(|what| fatal(&shown, what))?;
        let entries = parse(&bytes).map_err(|what| fatal(&shown, what))?;
        let keys = RandomState::new();
        let base = Fingerprint::of(&keys, &bytes);
        drop(bytes);
        Ok(LdifFileDirectory {
            path,
            memory: Arc::new(MemoryDirectory::engine(entries, Flavour::Permissive)),
            keys,
            base: tokio::sync::Mutex::new(Some(base)),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// The file as given to [`open`](Self::open).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entries as they are now, committed or not.
    pub fn records(&self) -> Vec<ldif::Record> {
        self.memory.records()
    }

    /// Data skipped while reading (unparsable DNs).
    pub fn warnings(&self) -> Vec<String> {
        self.memory.warnings()
    }

    /// Takes the file's content when it changed since it was last read or
    /// written (`always`), or only when the memory is unknown. Never while
    /// changes are pending: they would be lost, and their commit re-reads
    /// the file anyway.
    async fn refresh(&self, always: bool) -> Result<(), DirError> {
        let mut base = self.base.lock().await;
        if (!always && base.is_some()) || !self.pending().is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let keys = self.keys.clone();
        let old = *base;
        let work = tokio::task::spawn_blocking(move || -> Result<_, LoadProblem> {
            let current = read_file(&path)?;
            let now = Fingerprint::of(&keys, &current);
            if Some(now) == old {
                return Ok(None);
            }
            Ok(Some((now, parse(&current)?)))
        });
        let shown = self.path.display().to_string();
        let read = work.await.map_err(|err| fatal(&shown, err))?;
        if let Some((now, entries)) = read.map_err(|what| fatal(&shown, what))? {
            *base = Some(now);
            self.rebase(entries);
        }
        Ok(())
    }

    fn pending(&self) -> MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the in-memory copy with `entries` plus the changes made
    /// since the commit began (none, unless passes overlap).
    fn rebase(&self, entries: Vec<Parsed>) {
        let pending = self.pending();
        self.memory.reset(entries);
        for (group, change) in pending.iter() {
            // A change that no longer applies is dropped here and planned
            // again from the directory's real state.
            let _ = self.memory.change_members(group, change);
        }
    }
}

fn fatal(shown: &str, what: impl std::fmt::Display) -> DirError {
    DirError::Fatal(format!("{shown}: {what}"))
}

/// The file a path names: a symlink is followed (renaming over it would
/// replace the link, not the file it names).
fn resolve(path: &Path) -> io::Result<PathBuf> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(path),
        _ => Ok(path.to_path_buf()),
    }
}

/// Why the directory file cannot be read. The path is named by the
/// caller.
#[derive(Debug, Error)]
enum ReadProblem {
    /// A symlink in its place cannot be resolved.
    #[error("{0}")]
    Resolve(io::Error),
    /// Nothing is there.
    #[error("no such file")]
    NotFound,
    /// Something other than a regular file is there, it is above the cap,
    /// or it cannot be opened.
    #[error(transparent)]
    Open(safe_fs::ReadError),
    /// Opened, but reading it failed.
    #[error("cannot be read: {0}")]
    Read(io::Error),
    /// It grew above the cap while being read.
    #[error("too large (more than {MAX_DIRECTORY_FILE} bytes are not read)")]
    TooLarge,
}

/// Why the directory file's content is not a directory.
#[derive(Debug, Error)]
enum ContentProblem {
    /// A byte that is not UTF-8, on this line.
    #[error("line {line}: not UTF-8 text")]
    NotUtf8 {
        /// The line it is on.
        line: usize,
    },
    /// Not LDIF content.
    #[error(transparent)]
    Ldif(#[from] ldif::LdifError),
    /// Two entries with the same DN (compared normalised).
    #[error("line {line}: the entry {dn:?} repeats the DN of the entry on line {first}")]
    RepeatedDn {
        /// The line of the second entry.
        line: usize,
        /// Its DN as spelled.
        dn: String,
        /// The line of the first.
        first: usize,
    },
}

/// Why the directory file may not be replaced.
#[derive(Debug, Error)]
enum NotWritable {
    /// No write bit at all.
    #[error("is read-only (no write permission)")]
    NoWriteBits,
    /// It is on a read-only mount.
    #[error("is on a read-only file system")]
    ReadOnlyMount,
    /// This user may not write it.
    #[error("is not writable: {0}")]
    Denied(io::Error),
    /// No temp file can be made beside it.
    #[error("its folder {} is not writable ({source}), so it cannot be replaced atomically", dir.display())]
    Folder {
        /// Its folder.
        dir: PathBuf,
        /// Why it cannot be written.
        source: io::Error,
    },
}

/// Why a read of the directory file gave no entries.
#[derive(Debug, Error)]
enum LoadProblem {
    /// The file cannot be read.
    #[error(transparent)]
    Read(#[from] ReadProblem),
    /// Its content is not a directory.
    #[error(transparent)]
    Content(#[from] ContentProblem),
}

fn open_regular(target: &Path) -> Result<(File, fs::Metadata), ReadProblem> {
    let (file, _) = safe_fs::open_regular(target, MAX_DIRECTORY_FILE).map_err(|err| match err {
        safe_fs::ReadError::NotFound => ReadProblem::NotFound,
        other => ReadProblem::Open(other),
    })?;
    let meta = file.metadata().map_err(ReadProblem::Read)?;
    Ok((file, meta))
}

fn read_all(file: &File) -> Result<Vec<u8>, ReadProblem> {
    let mut bytes = Vec::new();
    file.take(MAX_DIRECTORY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadProblem::Read)?;
    if bytes.len() as u64 > MAX_DIRECTORY_FILE {
        return Err(ReadProblem::TooLarge);
    }
    Ok(bytes)
}

/// Reads the file a path names, without the lock (the file is only ever
/// replaced whole, so a reader sees one version).
fn read_file(path: &Path) -> Result<Vec<u8>, ReadProblem> {
    let target = resolve(path).map_err(ReadProblem::Resolve)?;
    let (file, _) = open_regular(&target)?;
    read_all(&file)
}

/// Parses a directory file: UTF-8, LDIF content, and every DN once.
fn parse(bytes: &[u8]) -> Result<Vec<Parsed>, ContentProblem> {
    let text = std::str::from_utf8(bytes).map_err(|err| {
        let good = &bytes[..err.valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        ContentProblem::NotUtf8 { line }
    })?;
    let (lines, records): (Vec<usize>, Vec<Record>) =
        ldif::parse_numbered(text)?.into_iter().unzip();
    let entries = parse_dns(records);
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
    // An entry whose DN does not parse is kept (and skipped by reads); its
    // spelling, lowercased, is the best key there is.
    let mut unparsed: HashMap<String, usize> = HashMap::new();
    for (line, (record, dn)) in lines.iter().zip(&entries) {
        let first = match dn {
            Some(dn) => seen.insert(dn.normalised(), *line),
            None => unparsed.insert(record.dn.to_lowercase(), *line),
        };
        if let Some(first) = first {
            return Err(ContentProblem::RepeatedDn {
                line: *line,
                dn: record.dn.clone(),
                first,
            });
        }
    }
    drop(seen);
    Ok(entries)
}

/// What a commit did to the file.
enum Saved {
    /// Written: the new content, and the entries the memory must take
    /// when the file had changed since it was read.
    Written {
        base: Fingerprint,
        fresh: Option<Vec<Parsed>>,
    },
    /// Nothing written. The content the memory must now hold: the file's
    /// as read under the lock, or unknown when it could not be read.
    Failed {
        err: DirError,
        now: Option<(Fingerprint, Vec<Parsed>)>,
    },
}

/// A commit's work on the file (blocking): lock, re-read, apply
/// `changes` (to the fresh content if it changed), write, unlock.
fn save(
    path: &Path,
    keys: &RandomState,
    base: Option<Fingerprint>,
    changes: &[Pending],
    memory: &MemoryDirectory,
) -> Saved {
    for _ in 0..RACES {
        if let Some(saved) = attempt(path, keys, base, changes, memory) {
            return saved;
        }
    }
    let err = DirError::Unreachable {
        op: Op::Save,
        message: format!(
            "{}: replaced or edited during each of {RACES} attempts to save it; nothing saved",
            path.display()
        ),
    };
    Saved::Failed { err, now: None }
}

/// One try of [`save`]; `None` when someone who does not take the lock
/// changed the file while the new content was being written.
fn attempt(
    path: &Path,
    keys: &RandomState,
    base: Option<Fingerprint>,
    changes: &[Pending],
    memory: &MemoryDirectory,
) -> Option<Saved> {
    let shown = path.display().to_string();
    let unknown = |err: DirError| Some(Saved::Failed { err, now: None });
    let cannot =
        |what: &dyn std::fmt::Display| DirError::Fatal(format!("{shown}: cannot save: {what}"));

    let target = match resolve(path) {
        Ok(target) => target,
        Err(err) => return unknown(cannot(&err)),
    };
    let (lock, meta) = match lock(&target, &shown) {
        Ok(locked) => locked,
        Err(err) => return unknown(err),
    };
    let current = match read_all(&lock) {
        Ok(current) => current,
        Err(what) => return unknown(cannot(&what)),
    };
    let now = Fingerprint::of(keys, &current);
    let fresh = if Some(now) == base {
        None
    } else {
        match parse(&current) {
            Ok(entries) => Some(entries),
            Err(what) => {
                let err = DirError::Fatal(format!(
                    "{shown}: changed since it was read and is now invalid: {what}; nothing saved"
                ));
                return unknown(err);
            }
        }
    };
    // From here on a failure leaves the memory as the file is now.
    let failed = |err: DirError, fresh: Option<Vec<Parsed>>| {
        let entries = match fresh {
            Some(entries) => entries,
            None => parse(&current).unwrap_or_default(),
        };
        Some(Saved::Failed {
            err,
            now: Some((now, entries)),
        })
    };
    if let Err(what) = writable(&target, &meta) {
        let err = DirError::Fatal(format!("{shown}: {what}; the file is not replaced"));
        return failed(err, fresh);
    }
    let (text, written) = match fresh {
        None => (memory.to_ldif(), None),
        Some(fresh) => {
            let engine = MemoryDirectory::engine(fresh, Flavour::Permissive);
            for (group, change) in changes {
                if let Err(err) = engine.change_members(group, change) {
                    let err = DirError::Fatal(format!(
                        "{shown}: changed since it was read: group {group}: {err}; nothing saved"
                    ));
                    return failed(err, None);
                }
            }
            info!(
                file = %shown,
                changes = changes.len(),
                "the directory file changed since it was read; this commit's member changes are applied to its current content"
            );
            (engine.to_ldif(), Some(engine))
        }
    };
    match replace(&target, &lock, &meta, text.as_bytes()) {
        Ok(true) => {}
        Ok(false) => return None,
        Err(err) => return failed(cannot(&err), None),
    }
    drop(lock);
    Some(Saved::Written {
        base: Fingerprint::of(keys, text.as_bytes()),
        fresh: written.map(|engine| engine.entries()),
    })
}

/// Takes the exclusive lock on the file `target` names now.
fn lock(target: &Path, shown: &str) -> Result<(File, fs::Metadata), DirError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let (file, meta) = open_regular(target).map_err(|what| fatal(shown, what))?;
        loop {
            // SAFETY: a valid open descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(fatal(shown, format!("cannot lock: {err}")));
            }
            if Instant::now() >= deadline {
                return Err(DirError::Unreachable {
                    op: Op::Save,
                    message: format!(
                        "{shown}: locked by another process for {} s; nothing saved",
                        LOCK_WAIT.as_secs()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Locked; but a writer may have renamed a new file over the one we
        // opened while we waited.
        match fs::metadata(target) {
            Ok(now) if now.dev() == meta.dev() && now.ino() == meta.ino() => {
                let meta = file.metadata().map_err(|err| fatal(shown, err))?;
                return Ok((file, meta));
            }
            _ => continue,
        }
    }
}

/// Refuses a file we may not write: no write bit at all (root could
/// rename over it regardless), no write access for this user, or a
/// read-only mount; and a folder where no temp file can be made.
fn writable(target: &Path, meta: &fs::Metadata) -> Result<(), NotWritable> {
    if meta.mode() & 0o222 == 0 {
        return Err(NotWritable::NoWriteBits);
    }
    access_w(target).map_err(|err| match err.raw_os_error() {
        Some(libc::EROFS) => NotWritable::ReadOnlyMount,
        _ => NotWritable::Denied(err),
    })?;
    let dir = folder(target);
    access_w(&dir).map_err(|source| NotWritable::Folder { dir, source })
}

fn access_w(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn folder(target: &Path) -> PathBuf {
    match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The prefix of our temp files for `target`: `.<name>.tmp.`.
fn temp_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map_or_else(|| "directory".into(), |n| n.to_string_lossy().into_owned());
    format!(".{name}.tmp.")
}

/// Removes temp files of `target` left by killed runs. Called with the
/// lock held: a live run's temp file exists only while it holds the lock.
/// The file of a process that is still alive is left alone all the same:
/// two holders can overlap when an editor without the lock renamed a new
/// file in, and the other's commit then starts again by itself.
fn remove_stale_temps(dir: &Path, prefix: &str, ours: &Path) {
    let Ok(entries) = safe_fs::list_dir(dir) else {
        return;
    };
    for (name, kind) in entries {
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name.strip_prefix(prefix) else {
            continue;
        };
        let path = dir.join(name);
        let Ok(pid) = pid.parse::<libc::pid_t>() else {
            continue;
        };
        if path == ours || kind.is_some_and(|k| k.is_dir()) || alive(pid) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => warn!(file = %path.display(), "removed a temp file left by an earlier run"),
            Err(err) => {
                warn!(file = %path.display(), error = %err, "cannot remove a temp file left by an earlier run")
            }
        }
    }
}

/// Whether a process with this id exists (it may be another's, in a PID
/// namespace of its own: then its file is kept, the safe side).
fn alive(pid: libc::pid_t) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Replaces `target` with `text` atomically and durably, keeping its
/// permission bits and owner. `Ok(false)`, with nothing replaced, when the
/// file was edited in place or replaced after `meta` was taken (an editor
/// that does not take the lock): the commit then starts again.
fn replace(target: &Path, locked: &File, meta: &fs::Metadata, text: &[u8]) -> io::Result<bool> {
    let dir = folder(target);
    let prefix = temp_prefix(target);
    let temp = dir.join(format!("{prefix}{}", std::process::id()));
    remove_stale_temps(&dir, &prefix, &temp);
    // Ours from an earlier failed attempt: the lock is held, so it is stale.
    match fs::remove_file(&temp) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let result = write_temp(&temp, meta, text).and_then(|()| {
        #[cfg(test)]
        tests::before_rename(target);
        if !unchanged(target, locked, meta)? {
            return Ok(false);
        }
        fs::rename(&temp, target).map(|()| true)
    });
    match result {
        Ok(true) => {}
        Ok(false) => {
            let _ = fs::remove_file(&temp);
            return Ok(false);
        }
        Err(err) => {
            let _ = fs::remove_file(&temp);
            return Err(err);
        }
    }
    File::open(&dir)?.sync_all()?;
    Ok(true)
}

/// Whether `target` is still the locked file, as it was when read.
fn unchanged(target: &Path, locked: &File, meta: &fs::Metadata) -> io::Result<bool> {
    let now = locked.metadata()?;
    let same_content = now.len() == meta.len()
        && (now.mtime(), now.mtime_nsec()) == (meta.mtime(), meta.mtime_nsec())
        && (now.ctime(), now.ctime_nsec()) == (meta.ctime(), meta.ctime_nsec());
    Ok(same_content
        && match fs::metadata(target) {
            Ok(path) => (path.dev(), path.ino()) == (meta.dev(), meta.ino()),
            Err(_) => false,
        })
}

fn write_temp(temp: &Path, meta: &fs::Metadata, text: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(temp)?;
    // Best effort: only root may give a file away, and a group change may
    // be refused; the permission bits then still hold.
    // SAFETY: a valid open descriptor.
    let _ = unsafe { libc::fchown(file.as_raw_fd(), meta.uid(), meta.gid()) };
    file.set_permissions(meta.permissions())?;
    file.write_all(text)?;
    file.sync_all()
}

#[async_trait]
impl Directory for LdifFileDirectory {
    async fn capabilities(&self) -> Result<Capabilities, DirError> {
        self.memory.capabilities().await
    }

    async fn search_groups(&self, base: &Dn) -> Result<Vec<Group>, DirError> {
        self.refresh(true).await?;
        self.memory.search_groups(base).await
    }

    async fn find_group(&self, base: &Dn, name: &str) -> Result<Option<Group>, DirError> {
        self.refresh(false).await?;
        self.memory.find_group(base, name).await
    }

    async fn read_group(&self, dn: &Dn) -> Result<Option<Group>, DirError> {
        self.refresh(false).await?;
        self.memory.read_group(dn).await
    }

    async fn modify_members(&self, group: &Dn, change: &MemberChange) -> Result<(), DirError> {
        // When a commit failed before it could read the file and the file
        // could not be read since, the memory may still hold that commit's
        // changes: one it calls a no-op may be missing from the file, so it
        // is kept all the same and the commit applies it to the fresh
        // content (where a no-op costs nothing).
        let known = self.base.lock().await.is_some();
        // Held across the change so that pending changes keep the order in
        // which they were applied.
        let mut pending = self.pending();
        if self.memory.change_members(group, change)? || !known {
            pending.push((group.clone(), change.clone()));
        }
        Ok(())
    }

    fn saves_on_commit(&self) -> bool {
        true
    }

    async fn commit(&self) -> Result<(), DirError> {
        let mut base = self.base.lock().await;
        let changes = std::mem::take(&mut *self.pending());
        if changes.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let keys = self.keys.clone();
        let memory = Arc::clone(&self.memory);
        let old = *base;
        let work = tokio::task::spawn_blocking(move || save(&path, &keys, old, &changes, &memory));
        match work.await {
            Ok(Saved::Written { base: now, fresh }) => {
                *base = Some(now);
                if let Some(entries) = fresh {
                    self.rebase(entries);
                }
                Ok(())
            }
            Ok(Saved::Failed { err, now }) => {
                match now {
                    Some((now, entries)) => {
                        *base = Some(now);
                        self.rebase(entries);
                    }
                    // Reads take the file again before answering.
                    None => *base = None,
                }
                Err(err)
            }
            Err(err) => {
                *base = None;
                let shown = self.path.display();
                Err(DirError::Fatal(format!("{shown}: cannot save: {err}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    type Hook = Box<dyn FnMut() + Send>;

    /// Work to do between writing the temp file and the rename, per target.
    static BEFORE_RENAME: Mutex<Vec<(PathBuf, Hook)>> = Mutex::new(Vec::new());

    pub(super) fn before_rename(target: &Path) {
        let mut hooks = BEFORE_RENAME.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = hooks.iter().position(|(p, _)| p == target) {
            let (_, mut hook) = hooks.remove(at);
            hook();
        }
    }

    fn on_next_rename(target: &Path, hook: impl FnMut() + Send + 'static) {
        let target = fs::canonicalize(target).expect("canonical");
        BEFORE_RENAME
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((target, Box::new(hook)));
    }

    const CONTENT: &str = "\
# An export of the groups OU.
version: 1

dn: OU=Groups,DC=ad,DC=com
objectClass: organizationalUnit
description:: SMO0dGVzIGRlcyBncm91cGVz

dn: CN=proid1-gmsa-hosts,OU=Groups,DC=ad,DC=com
objectClass: top
objectClass: group
sAMAccountName: proid1-gmsa-hosts
member: CN=host1,OU=Hosts,
 DC=ad,DC=com
member: CN=host2,OU=Hosts,DC=ad,DC=com
whenChanged: 20240101000000.0Z

dn: CN=proid2-gmsa-hosts,OU=Groups,DC=ad,DC=com
objectClass: group
sAMAccountName: proid2-gmsa-hosts
member: CN=host1,OU=Hosts,DC=ad,DC=com
info: keep me
";

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("valid DN")
    }

    fn g1() -> Dn {
        dn("CN=proid1-gmsa-hosts,OU=Groups,DC=ad,DC=com")
    }

    fn host(n: u32) -> Dn {
        dn(&format!("CN=host{n},OU=Hosts,DC=ad,DC=com"))
    }

    fn write_file(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("directory.ldif");
        fs::write(&path, text).expect("write fixture");
        path
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn identity(path: &Path) -> (u64, i64, i64) {
        let meta = fs::metadata(path).expect("metadata");
        (meta.ino(), meta.mtime(), meta.mtime_nsec())
    }

    #[tokio::test]
    async fn commit_saves_the_change_and_keeps_everything_else() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        let change = MemberChange {
            add: vec![host(3)],
            delete: vec![dn("cn=HOST1,ou=hosts,dc=ad,dc=com")],
        };
        dir.modify_members(&g1(), &change).await.expect("modify");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            CONTENT,
            "not saved before commit"
        );
        dir.commit().await.expect("commit");

        let mut expected = ldif::parse(CONTENT).expect("fixture parses");
        expected[1].attrs = [
            ("objectClass", "top"),
            ("objectClass", "group"),
            ("sAMAccountName", "proid1-gmsa-hosts"),
            ("member", "CN=host2,OU=Hosts,DC=ad,DC=com"),
            ("member", "CN=host3,OU=Hosts,DC=ad,DC=com"),
            ("whenChanged", "20240101000000.0Z"),
        ]
        .iter()
        .map(|(a, v)| ((*a).to_owned(), (*v).to_owned()))
        .collect();

        let reopened = LdifFileDirectory::open(&path).expect("reopen");
        assert_eq!(reopened.records(), expected);
        assert_eq!(
            reopened.records()[0].attrs[1].1,
            "Hôtes des groupes",
            "base64 value kept"
        );
        assert_eq!(
            reopened.records()[2].attrs.last(),
            Some(&("info".to_owned(), "keep me".to_owned())),
            "other entry kept"
        );
        let group = reopened
            .read_group(&g1())
            .await
            .expect("read")
            .expect("group");
        let members: Vec<_> = group
            .members
            .iter()
            .map(|m| m.as_str().to_owned())
            .collect();
        assert_eq!(members, [host(2).as_str(), host(3).as_str()]);
        assert_eq!(
            names_in(tmp.path()),
            ["directory.ldif"],
            "no temp file left"
        );
    }

    #[tokio::test]
    async fn commit_without_a_change_does_not_rewrite_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        let before = identity(&path);
        dir.commit().await.expect("commit");
        // A permissive no-op changes nothing either.
        let noop = MemberChange {
            add: vec![host(1)],
            delete: vec![host(9)],
        };
        dir.modify_members(&g1(), &noop).await.expect("no-op");
        dir.commit().await.expect("commit");
        assert_eq!(identity(&path), before);
        assert_eq!(fs::read_to_string(&path).expect("read"), CONTENT);

        let real = MemberChange {
            add: vec![host(4)],
            delete: vec![],
        };
        dir.modify_members(&g1(), &real).await.expect("modify");
        dir.commit().await.expect("commit");
        let saved = identity(&path);
        assert_ne!(saved, before, "a change is written");
        dir.commit().await.expect("commit again");
        assert_eq!(identity(&path), saved, "and written once");
    }

    #[tokio::test]
    async fn commit_keeps_the_permission_bits_and_follows_a_symlink() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = write_file(tmp.path(), CONTENT);
        fs::set_permissions(&real, fs::Permissions::from_mode(0o640)).expect("chmod");
        let link = tmp.path().join("link.ldif");
        std::os::unix::fs::symlink("directory.ldif", &link).expect("symlink");
        let dir = LdifFileDirectory::open(&link).expect("open");
        let change = MemberChange {
            add: vec![host(5)],
            delete: vec![],
        };
        dir.modify_members(&g1(), &change).await.expect("modify");
        dir.commit().await.expect("commit");
        assert!(fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink());
        let meta = fs::metadata(&real).expect("metadata");
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        let text = fs::read_to_string(&real).expect("read");
        assert!(text.contains(host(5).as_str()), "{text}");
    }

    async fn members_of(dir: &LdifFileDirectory, group: &Dn) -> Vec<String> {
        let group = dir.read_group(group).await.expect("read").expect("group");
        group
            .members
            .iter()
            .map(|m| m.normalised().to_owned())
            .collect()
    }

    fn file_members(path: &Path, group: &Dn) -> Vec<String> {
        let text = fs::read_to_string(path).expect("read");
        let record = ldif::parse(&text)
            .expect("parses")
            .into_iter()
            .find(|r| dn(&r.dn) == *group)
            .expect("group in the file");
        let mut members: Vec<String> = record
            .attrs
            .iter()
            .filter(|(a, _)| a.eq_ignore_ascii_case("member"))
            .map(|(_, v)| dn(v).normalised().to_owned())
            .collect();
        members.sort();
        members
    }

    fn norm(dns: &[Dn]) -> Vec<String> {
        let mut out: Vec<String> = dns.iter().map(|d| d.normalised().to_owned()).collect();
        out.sort();
        out
    }

    fn add(n: u32) -> MemberChange {
        MemberChange {
            add: vec![host(n)],
            delete: vec![],
        }
    }

    #[tokio::test]
    async fn a_failed_commit_leaves_nothing_half_applied_and_the_retry_writes_the_change() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        dir.modify_members(&g1(), &add(6)).await.expect("modify");
        assert_eq!(members_of(&dir, &g1()).await.len(), 3, "applied in memory");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).expect("chmod");
        let err = dir.commit().await.expect_err("read-only");
        assert!(matches!(err, DirError::Fatal(_)), "{err:?}");
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}: ", path.display())),
            "{shown}"
        );
        assert!(shown.contains("read-only"), "{shown}");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            CONTENT,
            "not replaced"
        );
        assert_eq!(
            members_of(&dir, &g1()).await,
            norm(&[host(1), host(2)]),
            "the failed change is rolled back in memory"
        );

        // The retry sees the group as it is in the file, plans the change
        // again, and this time it is written.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        dir.commit().await.expect("nothing pending");
        assert_eq!(fs::read_to_string(&path).expect("read"), CONTENT);
        dir.modify_members(&g1(), &add(6)).await.expect("modify");
        dir.commit().await.expect("commit");
        assert_eq!(
            file_members(&path, &g1()),
            norm(&[host(1), host(2), host(6)])
        );
        assert_eq!(names_in(tmp.path()), ["directory.ldif"]);
    }

    #[tokio::test]
    async fn after_a_commit_that_could_not_read_the_file_reads_take_it_again() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let away = tmp.path().join("away.ldif");
        let dir = LdifFileDirectory::open(&path).expect("open");
        dir.modify_members(&g1(), &add(6)).await.expect("modify");
        fs::rename(&path, &away).expect("move the file away");
        let err = dir.commit().await.expect_err("no file");
        assert_eq!(err.to_string(), format!("{}: no such file", path.display()));
        let err = dir.read_group(&g1()).await.expect_err("nothing to read");
        assert_eq!(err.to_string(), format!("{}: no such file", path.display()));

        // The same content back: the memory is the file's, not half-applied.
        fs::rename(&away, &path).expect("move it back");
        assert_eq!(members_of(&dir, &g1()).await, norm(&[host(1), host(2)]));
        dir.modify_members(&g1(), &add(6)).await.expect("modify");
        dir.commit().await.expect("commit");
        assert_eq!(
            file_members(&path, &g1()),
            norm(&[host(1), host(2), host(6)])
        );
    }

    #[tokio::test]
    async fn a_change_retried_while_the_file_is_unparsable_is_saved_once_it_parses() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        dir.modify_members(&g1(), &add(6)).await.expect("modify");
        fs::write(&path, format!("{CONTENT}garbage\n")).expect("break the file");
        dir.commit().await.expect_err("the file does not parse");
        dir.read_group(&g1()).await.expect_err("nor can it be read");
        // The retry plans from what it knew: the memory holds host 6 already.
        dir.modify_members(&g1(), &add(6)).await.expect("modify");
        dir.commit().await.expect_err("still broken");
        fs::write(&path, CONTENT).expect("repair the file");
        dir.modify_members(&g1(), &add(6)).await.expect("modify");
        dir.commit().await.expect("commit");
        assert_eq!(
            file_members(&path, &g1()),
            norm(&[host(1), host(2), host(6)])
        );
    }

    #[tokio::test]
    async fn an_edit_made_since_the_file_was_read_is_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        let admin = dn("CN=admin,OU=Users,DC=ad,DC=com");
        // By hand, in place (same inode): an unmanaged member and a new group.
        let edited = CONTENT.replace(
            "member: CN=host2,OU=Hosts,DC=ad,DC=com\n",
            "member: CN=host2,OU=Hosts,DC=ad,DC=com\nmember: CN=admin,OU=Users,DC=ad,DC=com\n",
        )
            + "\ndn: CN=new,OU=Groups,DC=ad,DC=com\nobjectClass: group\nsAMAccountName: new\n";
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(edited.as_bytes()))
            .expect("edit");

        let change = MemberChange {
            add: vec![host(3)],
            delete: vec![host(1)],
        };
        dir.modify_members(&g1(), &change).await.expect("modify");
        dir.commit().await.expect("commit");
        assert_eq!(
            file_members(&path, &g1()),
            norm(&[host(2), host(3), admin.clone()])
        );
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.contains("dn: CN=new,OU=Groups,DC=ad,DC=com"), "{text}");
        // The memory follows the file: later reads see the edit.
        assert_eq!(
            members_of(&dir, &g1()).await,
            norm(&[host(2), host(3), admin])
        );
        let groups = dir
            .search_groups(&dn("OU=Groups,DC=ad,DC=com"))
            .await
            .expect("search");
        assert_eq!(groups.len(), 3);
    }

    #[tokio::test]
    async fn two_directories_on_one_file_both_land() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let g2 = dn("CN=proid2-gmsa-hosts,OU=Groups,DC=ad,DC=com");
        let a = LdifFileDirectory::open(&path).expect("open a");
        let b = LdifFileDirectory::open(&path).expect("open b");
        a.modify_members(&g1(), &add(7)).await.expect("modify a");
        b.modify_members(&g2, &add(8)).await.expect("modify b");
        b.modify_members(&g1(), &add(9)).await.expect("modify b");
        a.commit().await.expect("commit a");
        b.commit().await.expect("commit b");
        assert_eq!(
            file_members(&path, &g1()),
            norm(&[host(1), host(2), host(7), host(9)])
        );
        assert_eq!(file_members(&path, &g2), norm(&[host(1), host(8)]));
    }

    #[tokio::test]
    async fn a_group_removed_since_the_file_was_read_fails_the_commit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        dir.modify_members(&g1(), &add(3)).await.expect("modify");
        let records: Vec<ldif::Record> = ldif::parse(CONTENT)
            .expect("parses")
            .into_iter()
            .filter(|r| dn(&r.dn) != g1())
            .collect();
        let without = ldif::write(&records);
        fs::write(&path, &without).expect("remove the group");
        let err = dir.commit().await.expect_err("the group is gone");
        let shown = err.to_string();
        assert!(
            shown.contains(g1().as_str()) && shown.contains("nothing saved"),
            "{shown}"
        );
        assert_eq!(fs::read_to_string(&path).expect("read"), without);
        assert_eq!(
            dir.read_group(&g1()).await.expect("read"),
            None,
            "memory follows the file"
        );
    }

    #[tokio::test]
    async fn a_commit_waits_for_the_lock_on_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = Arc::new(LdifFileDirectory::open(&path).expect("open"));
        dir.modify_members(&g1(), &add(4)).await.expect("modify");
        let held = File::open(&path).expect("open");
        // SAFETY: a valid open descriptor.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        let committing = tokio::spawn({
            let dir = Arc::clone(&dir);
            async move { dir.commit().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!committing.is_finished(), "the commit waits");
        assert_eq!(fs::read_to_string(&path).expect("read"), CONTENT);
        drop(held);
        committing.await.expect("join").expect("commit");
        assert!(file_members(&path, &g1()).contains(&host(4).normalised().to_owned()));
    }

    #[tokio::test]
    async fn stale_temp_files_are_removed_by_the_next_commit() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        // A run that was killed, and one that is still alive.
        let mut dead = std::process::Command::new("true").spawn().expect("spawn");
        dead.wait().expect("wait");
        let mut live = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn");
        let stale = format!(".directory.ldif.tmp.{}", dead.id());
        let kept = format!(".directory.ldif.tmp.{}", live.id());
        fs::write(tmp.path().join(&stale), "half").expect("stale");
        fs::write(tmp.path().join(&kept), "in use").expect("live");
        fs::write(tmp.path().join(".other.ldif.tmp.1"), "not ours").expect("other");
        let dir = LdifFileDirectory::open(&path).expect("open");
        dir.modify_members(&g1(), &add(4)).await.expect("modify");
        let committed = dir.commit().await;
        let _ = live.kill();
        let _ = live.wait();
        committed.expect("commit");
        let mut want = vec![
            kept,
            ".other.ldif.tmp.1".to_owned(),
            "directory.ldif".to_owned(),
        ];
        want.sort();
        assert_eq!(names_in(tmp.path()), want);
    }

    #[tokio::test]
    async fn an_edit_saved_while_the_new_content_is_written_is_kept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        dir.modify_members(&g1(), &add(3)).await.expect("modify");
        // An editor that takes no lock saves by rename during the commit.
        let edited = CONTENT.replace("info: keep me", "info: edited meanwhile");
        let (at, text) = (path.clone(), edited.clone());
        on_next_rename(&path, move || {
            let temp = at.with_file_name("editor-temp");
            fs::write(&temp, &text).expect("editor writes");
            fs::rename(&temp, &at).expect("editor renames");
        });
        dir.commit().await.expect("commit");
        let saved = fs::read_to_string(&path).expect("read");
        assert!(saved.contains("info: edited meanwhile"), "{saved}");
        assert_eq!(
            file_members(&path, &g1()),
            norm(&[host(1), host(2), host(3)])
        );
        assert_eq!(names_in(tmp.path()), ["directory.ldif"]);
    }

    #[tokio::test]
    async fn a_full_search_sees_hand_edits_unless_changes_are_pending() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        let ou = dn("OU=Groups,DC=ad,DC=com");
        let new_group =
            "\ndn: CN=new,OU=Groups,DC=ad,DC=com\nobjectClass: group\nsAMAccountName: new\n";
        fs::write(&path, format!("{CONTENT}{new_group}")).expect("edit");
        assert_eq!(dir.search_groups(&ou).await.expect("search").len(), 3);

        // With a change pending, the view stays; the commit brings both.
        dir.modify_members(&g1(), &add(5)).await.expect("modify");
        let another =
            "\ndn: CN=newer,OU=Groups,DC=ad,DC=com\nobjectClass: group\nsAMAccountName: newer\n";
        fs::write(&path, format!("{CONTENT}{new_group}{another}")).expect("edit");
        assert_eq!(dir.search_groups(&ou).await.expect("search").len(), 3);
        assert!(members_of(&dir, &g1())
            .await
            .contains(&host(5).normalised().to_owned()));
        dir.commit().await.expect("commit");
        assert_eq!(dir.search_groups(&ou).await.expect("search").len(), 4);
        assert!(file_members(&path, &g1()).contains(&host(5).normalised().to_owned()));

        // A broken edit is reported by the search, naming the file and line.
        fs::write(&path, "dn: CN=x\nbroken\n").expect("break");
        let err = dir.search_groups(&ou).await.expect_err("invalid");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: line 2: expected `attribute: value`, found \"broken\"",
                path.display()
            )
        );
    }

    #[test]
    fn duplicate_dns_are_an_error_naming_both_lines() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let text = "version: 1\n\ndn: CN=a,DC=ad,DC=com\ncn: a\n\ndn: CN=b,DC=ad,DC=com\ncn: b\n\ndn: cn=A, dc=AD,dc=com\ncn: a\n";
        let path = write_file(tmp.path(), text);
        let err = LdifFileDirectory::open(&path).expect_err("duplicate");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: line 9: the entry \"cn=A, dc=AD,dc=com\" repeats the DN of the entry on line 3",
                path.display()
            )
        );
    }

    #[test]
    fn open_errors_name_the_file_and_the_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = tmp.path().join("missing.ldif");
        let err = LdifFileDirectory::open(&missing).expect_err("missing");
        assert!(
            err.to_string()
                .starts_with(&format!("{}: ", missing.display())),
            "{err}"
        );

        let path = write_file(tmp.path(), "version: 1\n\ndn: CN=a\ncn: a\nbroken\n");
        let err = LdifFileDirectory::open(&path).expect_err("bad content");
        assert!(matches!(err, DirError::Fatal(_)));
        assert_eq!(
            err.to_string(),
            format!(
                "{}: line 5: expected `attribute: value`, found \"broken\"",
                path.display()
            )
        );

        fs::write(&path, b"dn: CN=a\ncn: a\ndescription: caf\xe9\n").expect("write");
        let err = LdifFileDirectory::open(&path).expect_err("latin-1");
        assert_eq!(
            err.to_string(),
            format!("{}: line 3: not UTF-8 text", path.display())
        );
    }

    #[test]
    fn a_relative_path_is_shown_as_given() {
        // The current directory is shared by all tests; only read here.
        let err = LdifFileDirectory::open("no-such-directory.ldif").expect_err("missing");
        assert!(
            err.to_string().starts_with("no-such-directory.ldif: "),
            "{err}"
        );
    }

    #[tokio::test]
    async fn reads_and_capabilities_come_from_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        assert!(dir.capabilities().await.expect("caps").permissive_modify);
        let groups = dir
            .search_groups(&dn("OU=Groups,DC=ad,DC=com"))
            .await
            .expect("search");
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].members.len(), 2, "the folded member counts");
        let found = dir
            .find_group(&dn("DC=ad,DC=com"), "PROID2-gmsa-hosts")
            .await
            .expect("find");
        assert_eq!(found.map(|g| g.members.len()), Some(1));
        assert!(dir.warnings().is_empty());
    }

    /// The bytes of heap that each thread holds, counted by the allocator of
    /// this test binary (every unit test runs on it; the count is one
    /// thread-local addition per allocation).
    mod heap {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static HELD: Cell<isize> = const { Cell::new(0) };
        }

        fn count(bytes: usize, sign: isize) {
            // During a thread's teardown the count is gone; nothing to do.
            let _ = HELD.try_with(|held| held.set(held.get() + sign * bytes as isize));
        }

        /// The bytes allocated and not yet freed by this thread.
        pub fn held() -> isize {
            HELD.with(Cell::get)
        }

        struct Counting;

        // SAFETY: every call is passed on to the system allocator as is.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                count(layout.size(), 1);
                // SAFETY: the caller's layout, as given.
                unsafe { System.alloc(layout) }
            }

            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                count(layout.size(), -1);
                // SAFETY: `ptr` came from `alloc` with this layout.
                unsafe { System.dealloc(ptr, layout) }
            }

            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                count(layout.size(), 1);
                // SAFETY: the caller's layout, as given.
                unsafe { System.alloc_zeroed(layout) }
            }

            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                // SAFETY: the caller's pointer, layout and size, as given.
                let new = unsafe { System.realloc(ptr, layout, new_size) };
                if !new.is_null() {
                    count(layout.size(), -1);
                    count(new_size, 1);
                }
                new
            }
        }

        #[global_allocator]
        static COUNTING: Counting = Counting;
    }

    /// One round of the calls a daemon makes again and again, none of which
    /// changes the file: the capabilities, a group found and read, and a
    /// member change that is already so.
    async fn round(dir: &dyn Directory) {
        dir.capabilities().await.expect("caps");
        let base = dn("OU=Groups,DC=ad,DC=com");
        let found = dir.find_group(&base, "proid1-gmsa-hosts").await;
        assert!(found.expect("find").is_some());
        assert!(dir.read_group(&g1()).await.expect("read").is_some());
        let already = MemberChange {
            add: vec![host(1)],
            delete: Vec::new(),
        };
        dir.modify_members(&g1(), &already).await.expect("modify");
    }

    /// The heap this thread holds after `rounds` more rounds than after one:
    /// what the directory keeps per call. Every call here completes on this
    /// thread (none reads or writes the file), so the count sees it all.
    async fn kept_over(dir: &dyn Directory, rounds: usize) -> isize {
        round(dir).await;
        let before = heap::held();
        for _ in 0..rounds {
            round(dir).await;
        }
        heap::held() - before
    }

    /// A long `run --directory FILE` makes the same calls for as long as it
    /// runs: the backend must keep nothing per call (the in-memory fake's
    /// call log is not part of its engine).
    #[tokio::test]
    async fn the_backend_keeps_no_history_of_its_calls() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = write_file(tmp.path(), CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        let rounds = 1000;
        let kept = kept_over(&dir, rounds).await;
        assert!(
            kept < rounds as isize,
            "{kept} bytes kept over {rounds} rounds of calls"
        );
        assert!(dir.pending().is_empty(), "no change was needed");
    }

    /// The same measure on the tests' fake, which does record every call:
    /// it sees a history when there is one, so the test above can fail.
    #[tokio::test]
    async fn the_measure_sees_the_fakes_call_log() {
        let records = ldif::parse(CONTENT).expect("parse");
        let fake = MemoryDirectory::new(records, Flavour::Permissive);
        let rounds = 1000;
        let kept = kept_over(&fake, rounds).await;
        let logged = std::mem::size_of::<super::super::memory::Call>() * 4 * rounds;
        assert!(
            kept >= logged as isize,
            "{kept} bytes kept, {logged} expected for the log alone"
        );
        assert_eq!(fake.calls().len(), 4 * (rounds + 1));
    }
}
