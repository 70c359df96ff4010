//! Small file-system steps that the node's crash safety rests on: writing a
//! file so that readers see either the old or the whole new content, and
//! touching or testing the marker files of a container's `data/`.
//!
//! Every temp file is named with a leading `.`, which the rest of the product
//! ignores, so a crash never leaves something that looks like data.
//!
//! A container's `data/` is written by the container's own processes too, so
//! a marker there may be anything. Only a regular file is a marker: a
//! symlink, FIFO, socket or device in a marker's place counts as absent
//! (with a warning) and is never followed, read or written through; when the
//! node sets a marker, such an entry is replaced by a regular file. So
//! nothing outside the app root is ever created, read or touched through
//! `data/`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::safe_fs::{self, Kind, ReadError};

/// Writes `content` to `path` through a dot-prefixed temp file in the same
/// directory, synced and then renamed over the target, with the given mode.
pub(crate) fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent(path)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(content)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Writes `content` to `path` only if nothing is there yet, atomically: the
/// complete temp file is hard-linked to the target, which fails when the
/// target exists. Returns false when the target was already there.
pub(crate) fn write_new(path: &Path, content: &[u8]) -> io::Result<bool> {
    let dir = parent(path)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(content)?;
    tmp.as_file().sync_all()?;
    match fs::hard_link(tmp.path(), path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sets a marker: creates `path` as an empty regular file, or finds it one
/// already (its content and times are left as they are). Anything else in
/// its place but a directory (a planted symlink, a FIFO) is removed, with a
/// warning, and replaced; a link is never written through.
pub(crate) fn touch(path: &Path) -> io::Result<()> {
    match safe_fs::touch(path) {
        Ok(()) => Ok(()),
        Err(ReadError::WrongType { found, .. }) if found != Kind::Directory => {
            tracing::warn!(
                path = %path.display(),
                found = %found,
                "a marker that is not a regular file: replaced, not followed"
            );
            remove_file_if_exists(path)?;
            safe_fs::touch(path).map_err(into_io)
        }
        Err(err) => Err(into_io(err)),
    }
}

/// True when the marker `path` is set: a regular file is there. Anything
/// else there counts as absent, with a warning naming what it is.
pub(crate) fn marker(path: &Path) -> bool {
    match safe_fs::probe(path) {
        Ok(None) => false,
        Ok(Some(Kind::File)) => true,
        Ok(Some(found)) => {
            tracing::warn!(
                path = %path.display(),
                found = %found,
                "a marker that is not a regular file counts as absent"
            );
            false
        }
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "a marker that cannot be examined counts as absent");
            false
        }
    }
}

/// A marker's content, read without following a link or blocking.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum MarkerText {
    /// No regular file is there (anything else there is warned about).
    Absent,
    /// A regular file is there but could not be read (why).
    Unreadable(String),
    /// The file's text (invalid UTF-8 replaced).
    Text(String),
}

/// Reads a marker of at most [`safe_fs::MAX_FILE`] bytes.
pub(crate) fn read_marker(path: &Path) -> MarkerText {
    match safe_fs::read_regular(path, safe_fs::MAX_FILE) {
        Ok(bytes) => MarkerText::Text(String::from_utf8_lossy(&bytes).into_owned()),
        Err(ReadError::NotFound) => MarkerText::Absent,
        Err(err @ ReadError::WrongType { .. }) => {
            tracing::warn!(path = %path.display(), error = %err, "a marker that is not a regular file counts as absent");
            MarkerText::Absent
        }
        Err(err) => MarkerText::Unreadable(err.to_string()),
    }
}

/// A container's `data/` directory, when it is one (not a link to
/// elsewhere): markers are only ever looked for and set inside it.
pub(crate) fn data_dir(container_dir: &Path) -> io::Result<std::path::PathBuf> {
    let data = container_dir.join("data");
    match safe_fs::probe(&data)? {
        Some(Kind::Directory) => Ok(data),
        Some(found) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{found}, not a directory; never followed"),
        )),
        None => Err(io::Error::new(io::ErrorKind::NotFound, "no data directory")),
    }
}

fn into_io(err: ReadError) -> io::Error {
    match err {
        ReadError::Io(err) => err,
        ReadError::NotFound => io::Error::new(io::ErrorKind::NotFound, "does not exist"),
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// Points a symlink at `target`, replacing whatever `link` was, atomically.
pub(crate) fn symlink_atomic(target: &Path, link: &Path) -> io::Result<()> {
    let dir = parent(link)?;
    for _ in 0..16 {
        let tmp = dir.join(format!(".link-{:016x}.tmp", fastrand::u64(..)));
        match std::os::unix::fs::symlink(target, &tmp) {
            Ok(()) => {
                return fs::rename(&tmp, link).inspect_err(|_| {
                    let _ = fs::remove_file(&tmp);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temp name for a symlink",
    ))
}

/// Removes a file, counting "already gone" as success.
pub(crate) fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// True when something (even a dangling symlink) exists at `path`.
pub(crate) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The names in a directory that are data: everything not starting with `.`,
/// sorted. A missing directory has none.
pub(crate) fn data_names(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        match name.to_str() {
            Some(name) if !name.starts_with('.') => names.push(name.to_owned()),
            _ => {}
        }
    }
    names.sort();
    Ok(names)
}

fn parent(path: &Path) -> io::Result<&Path> {
    path.parent().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o644).expect("write");
        write_atomic(&path, b"two", 0o755).expect("rewrite");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[test]
    fn write_new_keeps_the_first_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        assert!(write_new(&path, b"first").expect("write"));
        assert!(!write_new(&path, b"second").expect("write"));
        assert_eq!(fs::read(&path).expect("read"), b"first");
        assert_eq!(data_names(dir.path()).expect("list"), ["f"]);
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[test]
    fn symlink_is_replaced_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let link = dir.path().join("l");
        symlink_atomic(Path::new("a"), &link).expect("link");
        symlink_atomic(Path::new("b"), &link).expect("relink");
        assert_eq!(fs::read_link(&link).expect("readlink"), Path::new("b"));
        assert!(exists(&link), "a dangling link still exists");
        assert_eq!(data_names(dir.path()).expect("list"), ["l"]);
    }

    #[test]
    fn markers_are_regular_files_and_links_are_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        fs::write(&outside, b"keep").expect("write");
        let data = dir.path().join("data");
        fs::create_dir(&data).expect("mkdir");
        let link = data.join("terminated");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        assert!(!marker(&link), "a link is not a marker");
        assert_eq!(read_marker(&link), MarkerText::Absent);
        touch(&link).expect("replaced");
        assert_eq!(safe_fs::probe(&link).expect("probe"), Some(Kind::File));
        assert!(marker(&link));
        assert_eq!(fs::read(&outside).expect("read"), b"keep");
        let dangling = data.join("aborted");
        std::os::unix::fs::symlink(dir.path().join("created"), &dangling).expect("symlink");
        touch(&dangling).expect("replaced");
        assert!(!dir.path().join("created").exists(), "nothing made outside");
        assert_eq!(read_marker(&dangling), MarkerText::Text(String::new()));
        assert_eq!(read_marker(&data.join("none")), MarkerText::Absent);
        let linked_data = dir.path().join("c2");
        fs::create_dir(&linked_data).expect("mkdir");
        std::os::unix::fs::symlink(&data, linked_data.join("data")).expect("symlink");
        assert!(data_dir(&linked_data).is_err());
        assert_eq!(data_dir(dir.path()).expect("a directory"), data);
    }

    #[test]
    fn data_names_skip_dot_files_and_missing_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        touch(&dir.path().join(".hidden")).expect("touch");
        touch(&dir.path().join("b")).expect("touch");
        touch(&dir.path().join("a")).expect("touch");
        assert_eq!(data_names(dir.path()).expect("list"), ["a", "b"]);
        assert!(data_names(&dir.path().join("missing"))
            .expect("list")
            .is_empty());
        remove_file_if_exists(&dir.path().join("a")).expect("remove");
        remove_file_if_exists(&dir.path().join("a")).expect("remove again");
    }
}
