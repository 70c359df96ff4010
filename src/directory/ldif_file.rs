//! The embedded backend: a directory kept in one LDIF content file.
//!
//! The file is read once at [`LdifFileDirectory::open`]; reads and modifies
//! then go to an in-memory copy that behaves like a server with permissive
//! modify, and [`Directory::commit`] writes the whole content back, only when
//! something changed since the last commit. The write is atomic (a
//! dot-prefixed temp file in the same directory, fsync, rename over the
//! target, fsync of the directory), so a crash leaves the old file or the new
//! one, never half of one; a symlinked path updates the file it points to,
//! and the file keeps its permission bits.
//!
//! Every entry and attribute is written back unchanged and in order, but the
//! layout is ours: comments are dropped, folded lines are unfolded, and a
//! value is base64-encoded exactly when RFC 2849 requires it. Changes made to
//! the file by someone else after it was opened are overwritten by the next
//! commit, and modifies that are never committed are lost.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::memory::{Flavour, MemoryDirectory};
use super::{Capabilities, DirError, Directory, Group, MemberChange};
use crate::ldif;
use crate::model::Dn;

/// A directory read from, and saved to, an LDIF content file.
#[derive(Debug)]
pub struct LdifFileDirectory {
    path: PathBuf,
    memory: MemoryDirectory,
    /// The generation last written (or read); held across the save so that
    /// two commits never write at once.
    saved: tokio::sync::Mutex<u64>,
}

impl LdifFileDirectory {
    /// Reads and parses the file. Errors name the file as given and, for
    /// bad content, the line.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DirError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display();
        let bytes = fs::read(&path).map_err(|err| DirError::Fatal(format!("{shown}: {err}")))?;
        let text = String::from_utf8(bytes).map_err(|err| {
            let good = &err.as_bytes()[..err.utf8_error().valid_up_to()];
            let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
            DirError::Fatal(format!("{shown}: line {line}: not UTF-8 text"))
        })?;
        let records =
            ldif::parse(&text).map_err(|err| DirError::Fatal(format!("{shown}: {err}")))?;
        let memory = MemoryDirectory::new(records, Flavour::Permissive);
        let saved = tokio::sync::Mutex::new(memory.generation());
        Ok(LdifFileDirectory {
            path,
            memory,
            saved,
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
}

/// Replaces `path` with `text` atomically and durably.
fn save(path: &Path, text: &str) -> io::Result<()> {
    // Renaming over a symlink would replace the link, not what it names.
    let target = match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(path)?,
        _ => path.to_path_buf(),
    };
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map_or_else(|| "directory".into(), |n| n.to_string_lossy().into_owned());
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)?;
    if let Ok(meta) = fs::metadata(&target) {
        temp.as_file().set_permissions(meta.permissions())?;
    }
    temp.write_all(text.as_bytes())?;
    temp.as_file().sync_all()?;
    // On failure the temp file is removed when `temp` is dropped.
    temp.persist(&target).map_err(|err| err.error)?;
    fs::File::open(&dir)?.sync_all()
}

#[async_trait]
impl Directory for LdifFileDirectory {
    async fn capabilities(&self) -> Result<Capabilities, DirError> {
        self.memory.capabilities().await
    }

    async fn search_groups(&self, base: &Dn) -> Result<Vec<Group>, DirError> {
        self.memory.search_groups(base).await
    }

    async fn find_group(&self, base: &Dn, name: &str) -> Result<Option<Group>, DirError> {
        self.memory.find_group(base, name).await
    }

    async fn read_group(&self, dn: &Dn) -> Result<Option<Group>, DirError> {
        self.memory.read_group(dn).await
    }

    async fn modify_members(&self, group: &Dn, change: &MemberChange) -> Result<(), DirError> {
        self.memory.modify_members(group, change).await
    }

    async fn commit(&self) -> Result<(), DirError> {
        let mut saved = self.saved.lock().await;
        let (generation, records) = self.memory.snapshot();
        if generation == *saved {
            return Ok(());
        }
        let text = ldif::write(&records);
        let path = self.path.clone();
        let shown = self.path.display().to_string();
        let result = tokio::task::spawn_blocking(move || save(&path, &text)).await;
        match result {
            Ok(Ok(())) => {
                *saved = generation;
                Ok(())
            }
            Ok(Err(err)) => Err(DirError::Fatal(format!("{shown}: cannot save: {err}"))),
            Err(err) => Err(DirError::Fatal(format!("{shown}: cannot save: {err}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

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

    #[tokio::test]
    async fn a_failed_save_is_fatal_names_the_file_and_is_retried() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sub = tmp.path().join("sub");
        fs::create_dir(&sub).expect("mkdir");
        let path = write_file(&sub, CONTENT);
        let dir = LdifFileDirectory::open(&path).expect("open");
        let change = MemberChange {
            add: vec![host(6)],
            delete: vec![],
        };
        dir.modify_members(&g1(), &change).await.expect("modify");
        fs::remove_dir_all(&sub).expect("remove the file's directory");
        let err = dir.commit().await.expect_err("cannot save");
        assert!(matches!(err, DirError::Fatal(_)), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        // The change is still pending: once the directory is back, it is saved.
        fs::create_dir(&sub).expect("mkdir");
        dir.commit().await.expect("commit");
        let text = fs::read_to_string(&path).expect("read");
        assert!(text.contains(host(6).as_str()), "{text}");
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
}
