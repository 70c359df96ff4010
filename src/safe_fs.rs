//! The one way files from outside the process are opened: the placement
//! tree, app manifests and a container's marker files.
//!
//! Everything there is written by other processes (the mirror, the
//! supervisor, an operator, an attacker with write access to one
//! directory), so nothing is trusted about what a name points at. A file
//! is opened without blocking (a FIFO in a file's place cannot stall the
//! caller) and without following a final symlink (`O_NOFOLLOW`: a link
//! cannot lead a read or a write outside the tree), and what it is comes
//! from `fstat` on the open descriptor, so it cannot change between the
//! check and the use. Only regular files are data; their size is capped.
//! Directories are listed the same way: opened with `O_NOFOLLOW`, so a
//! host directory that is a symlink out of the tree is refused.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Server files and manifests above this size are invalid.
pub const MAX_FILE: u64 = 1 << 20;

/// Why a file from outside could not be used. Its `Display` says what was
/// found, without the path: callers name the path themselves.
#[derive(Debug)]
pub enum ReadError {
    /// Nothing is there (or it went away while being opened).
    NotFound,
    /// Something of another type is there: what was found, and what was wanted.
    WrongType {
        /// What is there.
        found: Kind,
        /// What was wanted: "a regular file" or "a directory".
        want: &'static str,
    },
    /// The file is larger than the cap.
    TooLarge {
        /// The file's size, as `fstat` or the read found it.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// It could not be opened or read.
    Io(io::Error),
}

/// What was found where a regular file was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link (never followed).
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
    /// A block or character device.
    Device,
    /// Something else.
    Other,
}

impl Kind {
    /// The kind of a file type from `lstat`, a listing or `fstat`.
    pub fn of(file_type: fs::FileType) -> Kind {
        if file_type.is_file() {
            Kind::File
        } else if file_type.is_dir() {
            Kind::Directory
        } else if file_type.is_symlink() {
            Kind::Symlink
        } else if file_type.is_fifo() {
            Kind::Fifo
        } else if file_type.is_socket() {
            Kind::Socket
        } else if file_type.is_block_device() || file_type.is_char_device() {
            Kind::Device
        } else {
            Kind::Other
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::File => "a regular file",
            Kind::Directory => "a directory",
            Kind::Symlink => "a symbolic link",
            Kind::Fifo => "a FIFO",
            Kind::Socket => "a socket",
            Kind::Device => "a device",
            Kind::Other => "an unknown kind of file",
        })
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::NotFound => f.write_str("does not exist"),
            ReadError::WrongType { found, want } => write!(f, "{found}, not {want}"),
            ReadError::TooLarge { size, cap } => {
                write!(f, "too large ({size} bytes; at most {cap} are read)")
            }
            ReadError::Io(err) => write!(f, "cannot be read: {err}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// "A regular file", what most callers want.
const FILE: &str = "a regular file";
/// "A directory", what [`list_dir`] wants.
const DIRECTORY: &str = "a directory";

impl ReadError {
    /// The error of a failed `open` of `path` for something that must be
    /// `want`; what is there is looked up (without following a link) when
    /// the error alone does not say.
    fn from_open(err: io::Error, path: &Path, want: &'static str) -> ReadError {
        let found = |found| ReadError::WrongType { found, want };
        match err.raw_os_error() {
            // A parent that is not a directory: nothing is at the path.
            Some(libc::ENOENT) => ReadError::NotFound,
            // O_NOFOLLOW on a symlink.
            Some(libc::ELOOP) => found(Kind::Symlink),
            // A socket cannot be opened at all; O_DIRECTORY on a file, or
            // a parent that is a file: say what is there.
            Some(libc::ENXIO) | Some(libc::EOPNOTSUPP) | Some(libc::ENOTDIR) => {
                match fs::symlink_metadata(path) {
                    Ok(meta) => found(Kind::of(meta.file_type())),
                    Err(_) => ReadError::NotFound,
                }
            }
            _ => ReadError::Io(err),
        }
    }

    /// Whether nothing is there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ReadError::NotFound)
    }
}

/// Opens `path` for reading without blocking and without following a final
/// symlink, and checks with `fstat` that it is a regular file of at most
/// `cap` bytes.
pub fn open_regular(path: &Path, cap: u64) -> Result<(File, u64), ReadError> {
    // A look first, so that a device is never opened (opening one can act:
    // a tape rewinds, a terminal becomes ours); the `fstat` below is the
    // check that counts, since the name may change in between.
    match probe(path) {
        Ok(None) => return Err(ReadError::NotFound),
        Ok(Some(Kind::File)) => {}
        Ok(Some(found)) => return Err(ReadError::WrongType { found, want: FILE }),
        Err(err) => return Err(ReadError::from_open(err, path, FILE)),
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(|err| ReadError::from_open(err, path, FILE))?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    match Kind::of(meta.file_type()) {
        Kind::File => {}
        found => return Err(ReadError::WrongType { found, want: FILE }),
    }
    if meta.len() > cap {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            cap,
        });
    }
    Ok((file, meta.len()))
}

/// Reads a regular file of at most `cap` bytes (see [`open_regular`]). A
/// file that grows past the cap while it is read is refused too.
pub fn read_regular(path: &Path, cap: u64) -> Result<Vec<u8>, ReadError> {
    let (file, len) = open_regular(path, cap)?;
    let mut content = Vec::with_capacity(usize::try_from(len).unwrap_or(0) + 1);
    file.take(cap + 1)
        .read_to_end(&mut content)
        .map_err(ReadError::Io)?;
    let size = content.len() as u64;
    if size > cap {
        return Err(ReadError::TooLarge { size, cap });
    }
    Ok(content)
}

/// What is at `path`, without following a symlink: `Ok(None)` for nothing.
/// For marker files whose presence is their meaning.
pub fn probe(path: &Path) -> io::Result<Option<Kind>> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(Kind::of(meta.file_type()))),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Creates `path` as an empty regular file, or finds it already one, never
/// following a symlink there (a marker planted as a link to a file outside
/// is refused, not written through). Does not block on a FIFO.
pub fn touch(path: &Path) -> Result<(), ReadError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(|err| ReadError::from_open(err, path, FILE))?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    match Kind::of(meta.file_type()) {
        Kind::File => Ok(()),
        found => Err(ReadError::WrongType { found, want: FILE }),
    }
}

/// An entry of a directory read with [`list_dir`]: its name and its type
/// as the listing gave it (`None` when the listing could not tell).
pub type Entry = (OsString, Option<fs::FileType>);

/// Lists a directory that must not be reached through a final symlink:
/// [`ReadError::WrongType`] when `path` is a link or anything but a
/// directory, [`ReadError::NotFound`] when nothing is there. Entries are in
/// the order the file system gives them; `.` and `..` are left out.
pub fn list_dir(path: &Path) -> Result<Vec<Entry>, ReadError> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)
        .map_err(|err| ReadError::from_open(err, path, DIRECTORY))?;
    // The descriptor pins the directory that was checked; listing it through
    // /proc/self/fd reads that one, even if the path is swapped meanwhile.
    let pinned = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let listing = match fs::read_dir(&pinned) {
        Ok(listing) => listing,
        // No /proc: the path itself, just checked.
        Err(_) => fs::read_dir(path).map_err(|err| ReadError::from_open(err, path, DIRECTORY))?,
    };
    let mut entries = Vec::new();
    for entry in listing {
        let entry = entry.map_err(ReadError::Io)?;
        let name = entry.file_name();
        entries.push((name, entry.file_type().ok()));
    }
    drop(dir);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
    }

    #[test]
    fn regular_files_are_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f");
        fs::write(&path, b"hello").expect("write");
        assert_eq!(read_regular(&path, 5).expect("read"), b"hello");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f");
        mkfifo(&path);
        assert!(matches!(
            read_regular(&path, MAX_FILE),
            Err(ReadError::WrongType {
                found: Kind::Fifo,
                ..
            })
        ));
        assert!(matches!(
            touch(&path),
            Err(ReadError::WrongType {
                found: Kind::Fifo,
                ..
            })
        ));
    }

    #[test]
    fn a_symlink_is_refused_and_never_followed() {
        let dir = tempfile::tempdir().expect("tmp");
        let outside = dir.path().join("outside");
        fs::write(&outside, b"secret").expect("write");
        let link = dir.path().join("link");
        symlink(&outside, &link).expect("symlink");
        assert!(matches!(
            read_regular(&link, MAX_FILE),
            Err(ReadError::WrongType {
                found: Kind::Symlink,
                ..
            })
        ));
        assert!(matches!(
            touch(&link),
            Err(ReadError::WrongType {
                found: Kind::Symlink,
                ..
            })
        ));
        let dangling = dir.path().join("dangling");
        symlink(dir.path().join("nowhere"), &dangling).expect("symlink");
        assert!(matches!(
            touch(&dangling),
            Err(ReadError::WrongType {
                found: Kind::Symlink,
                ..
            })
        ));
        assert!(
            !dir.path().join("nowhere").exists(),
            "nothing created through a link"
        );
        assert_eq!(probe(&link).expect("probe"), Some(Kind::Symlink));
    }

    #[test]
    fn a_symlink_loop_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        symlink(&b, &a).expect("symlink");
        symlink(&a, &b).expect("symlink");
        assert!(matches!(
            read_regular(&a, MAX_FILE),
            Err(ReadError::WrongType {
                found: Kind::Symlink,
                ..
            })
        ));
        assert!(matches!(
            list_dir(&a),
            Err(ReadError::WrongType {
                found: Kind::Symlink,
                ..
            })
        ));
    }

    #[test]
    fn a_device_is_refused() {
        assert!(matches!(
            read_regular(Path::new("/dev/null"), MAX_FILE),
            Err(ReadError::WrongType {
                found: Kind::Device,
                ..
            })
        ));
    }

    #[test]
    fn large_files_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f");
        fs::write(&path, vec![b'x'; 11]).expect("write");
        assert!(matches!(
            read_regular(&path, 10),
            Err(ReadError::TooLarge { size: 11, cap: 10 })
        ));
    }

    #[test]
    fn directories_and_missing_files() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(matches!(
            read_regular(dir.path(), MAX_FILE),
            Err(ReadError::WrongType {
                found: Kind::Directory,
                ..
            })
        ));
        assert!(matches!(
            read_regular(&dir.path().join("none"), MAX_FILE),
            Err(ReadError::NotFound)
        ));
        assert!(matches!(
            read_regular(&dir.path().join("none/deeper"), MAX_FILE),
            Err(ReadError::NotFound)
        ));
        assert_eq!(probe(&dir.path().join("none")).expect("probe"), None);
    }

    #[test]
    fn touch_creates_or_keeps_a_regular_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m");
        touch(&path).expect("create");
        fs::write(&path, b"kept").expect("write");
        touch(&path).expect("again");
        assert_eq!(fs::read(&path).expect("read"), b"kept");
        assert_eq!(probe(&path).expect("probe"), Some(Kind::File));
    }

    #[test]
    fn directories_are_listed_but_not_through_links() {
        let dir = tempfile::tempdir().expect("tmp");
        let real = dir.path().join("real");
        fs::create_dir(&real).expect("mkdir");
        fs::write(real.join("x"), b"").expect("write");
        let mut names: Vec<_> = list_dir(&real)
            .expect("list")
            .into_iter()
            .map(|(name, t)| (name, t.is_some_and(|t| t.is_file())))
            .collect();
        names.sort();
        assert_eq!(names, vec![(OsString::from("x"), true)]);
        let link = dir.path().join("link");
        symlink(&real, &link).expect("symlink");
        assert!(matches!(
            list_dir(&link),
            Err(ReadError::WrongType {
                found: Kind::Symlink,
                ..
            })
        ));
        assert!(matches!(
            list_dir(&real.join("x")),
            Err(ReadError::WrongType {
                found: Kind::File,
                want: "a directory"
            })
        ));
        assert!(matches!(
            list_dir(&dir.path().join("none")),
            Err(ReadError::NotFound)
        ));
    }
}
