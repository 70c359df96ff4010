//! A placement tree in a temp directory, written the way the mirror writes
//! it (temp file in the same directory, then a rename), and polling helpers.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A placement tree under a temp directory.
pub struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    /// `servers/` and `placement/` exist; `.modified` does not yet.
    pub fn new() -> Tree {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir(dir.path().join("servers")).expect("servers/");
        fs::create_dir(dir.path().join("placement")).expect("placement/");
        Tree { dir }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `.modified` (again), as the mirror does after each update.
    pub fn mark_ready(&self) {
        write_atomically(&self.root().join(".modified"), "");
    }

    /// Writes a server file.
    pub fn server(&self, host: &str, partition: &str, dn: &str) {
        let content =
            format!("partition: {partition}\nnt.dc: dc1.ad.com\nnt.dn: {dn}\ncpu: 100%\n");
        write_atomically(&self.root().join("servers").join(host), &content);
    }

    /// Writes raw server file content.
    pub fn server_raw(&self, host: &str, content: &str) {
        write_atomically(&self.root().join("servers").join(host), content);
    }

    pub fn remove_server(&self, host: &str) {
        fs::remove_file(self.root().join("servers").join(host)).expect("remove server");
    }

    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.root().join("placement").join(host)
    }

    /// Places an instance on a host (creating its placement directory).
    pub fn place(&self, host: &str, instance: &str) {
        let dir = self.host_dir(host);
        fs::create_dir_all(&dir).expect("host dir");
        write_atomically(
            &dir.join(instance),
            "{\"expires\": 1900000000, \"identity\": 1}\n",
        );
    }

    pub fn unplace(&self, host: &str, instance: &str) {
        fs::remove_file(self.host_dir(host).join(instance)).expect("remove placement");
    }
}

/// Temp file in the same directory, then rename: the mirror's way.
pub fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_file_name(format!(".tmp{}", fastrand::u64(..)));
    fs::write(&tmp, content).expect("write temp");
    fs::rename(&tmp, path).expect("rename");
}

/// An LDIF directory with the base entries and the given groups.
pub fn groups_ldif(groups: &[(&str, &[&str])]) -> String {
    let mut out = String::from(
        "version: 1\n\ndn: dc=ad,dc=com\nobjectClass: dcObject\nobjectClass: organization\ndc: ad\no: ad\n\n\
         dn: ou=Groups,dc=ad,dc=com\nobjectClass: organizationalUnit\nou: Groups\n\n\
         dn: ou=Computers,dc=ad,dc=com\nobjectClass: organizationalUnit\nou: Computers\n",
    );
    for (name, members) in groups {
        out += &format!(
            "\ndn: cn={name},ou=Groups,dc=ad,dc=com\nobjectClass: group\ncn: {name}\nsAMAccountName: {name}\n"
        );
        for m in *members {
            out += &format!("member: {m}\n");
        }
    }
    out
}

/// Polls `check` until it holds; panics naming `what` after 20 s.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}
