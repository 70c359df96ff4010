//! A small tmpfs for tests that need a file system of their own: to fill
//! it, or to remount it read-only (the tests run as root).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a temp directory, unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it).
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed ({status}): these tests run as root"
        );
        Tmpfs { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Remounts it with `options` (`ro`, `rw`, ...).
    pub fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {options}: {status}");
    }

    /// Fills the file system, then frees `pages` pages of 4 KiB; the
    /// filler file's path, to free the rest by removing it.
    pub fn fill_leaving(&self, pages: u64) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 1 << 16];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        let used = file.metadata().expect("filler").len().div_ceil(4096);
        file.set_len(used.saturating_sub(pages) * 4096)
            .expect("free pages");
        file.sync_all().expect("sync");
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let done = Command::new("umount")
            .arg(self.path())
            .status()
            .is_ok_and(|s| s.success());
        if !done {
            // Still busy (a process of a failed test): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(self.path()).status();
        }
    }
}
