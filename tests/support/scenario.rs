//! Scenario fixtures and golden files: one directory per scenario under
//! `fixtures/scenarios/`, compared (or with `UPDATE_GOLDEN=1` rewritten)
//! file by file, and the built binary run on them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One scenario directory.
pub struct Scenario {
    pub name: String,
    pub dir: PathBuf,
}

impl Scenario {
    /// Every scenario, sorted by name.
    pub fn all() -> Vec<Scenario> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/scenarios");
        let mut all: Vec<Scenario> = fs::read_dir(&root)
            .expect("fixtures/scenarios")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_dir())
            .map(|dir| Scenario {
                name: dir
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                dir,
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The options of the scenario, one per line of its `options` file.
    pub fn options(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("options"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Compares `actual` with the golden file, or rewrites it under `UPDATE_GOLDEN=1`.
    pub fn golden(&self, file: &str, actual: &str, failures: &mut Vec<String>) {
        let path = self.dir.join(file);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            fs::write(&path, actual).expect("write golden file");
            return;
        }
        let expected = fs::read_to_string(&path).unwrap_or_else(|_| {
            format!(
                "<missing {}: run UPDATE_GOLDEN=1 cargo test>",
                path.display()
            )
        });
        if expected != actual {
            failures.push(format!(
                "{}/{file} differs:\n{}",
                self.name,
                diff(&expected, actual)
            ));
        }
    }
}

/// A line diff: `-` expected, `+` actual, around the first difference.
pub fn diff(expected: &str, actual: &str) -> String {
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    let first = e.iter().zip(&a).take_while(|(x, y)| x == y).count();
    let mut out = format!("first difference at line {}\n", first + 1);
    for line in e.iter().skip(first).take(20) {
        out += &format!("-{line}\n");
    }
    for line in a.iter().skip(first).take(20) {
        out += &format!("+{line}\n");
    }
    out
}

/// What a run of the binary gave.
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `gmsa-reconciler <command> <args>` with a clean `GMSA_*` environment.
pub fn run_bin(command: &str, args: &[String]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gmsa-reconciler"));
    cmd.arg(command).args(args);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("GMSA_") || key == "RUST_LOG" {
            cmd.env_remove(key);
        }
    }
    let out = cmd.output().expect("run gmsa-reconciler");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Copies a directory tree (files and directories only).
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create dir");
    for entry in fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}
