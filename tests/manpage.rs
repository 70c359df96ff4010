//! The man pages in `deploy/man/` are generated from the command-line
//! definitions; this test regenerates them and fails when a committed page
//! is stale, missing or left over. To refresh them:
//! `UPDATE_GOLDEN=1 cargo test --test manpage`.

use std::collections::BTreeMap;
use std::path::Path;

/// The pages, by file name, as `clap_mangen` renders them: one for the
/// program and one per subcommand (`gmsa-reconciler-plan.1`, ...).
fn render() -> BTreeMap<String, Vec<u8>> {
    // A page names the variable that sets an option (clap_mangen's `env`
    // feature), never the value it has where the page was made.
    let command = gmsa_reconciler::cli::command();
    let dir = tempfile::tempdir().expect("temp dir");
    clap_mangen::generate_to(command, dir.path()).expect("render the man pages");
    std::fs::read_dir(dir.path())
        .expect("read the pages")
        .map(|entry| {
            let entry = entry.expect("entry");
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(entry.path()).expect("read page"))
        })
        .collect()
}

#[test]
fn the_committed_man_pages_are_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/man");
    let pages = render();
    assert!(
        pages.contains_key("gmsa-reconciler.1"),
        "{:?}",
        pages.keys()
    );
    assert!(
        pages.contains_key("gmsa-reconciler-config.1"),
        "{:?}",
        pages.keys()
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(&dir).expect("create deploy/man");
        for entry in std::fs::read_dir(&dir).expect("read deploy/man") {
            std::fs::remove_file(entry.expect("entry").path()).expect("remove old page");
        }
        for (name, page) in &pages {
            std::fs::write(dir.join(name), page).expect("write page");
        }
        return;
    }
    let mut stale = Vec::new();
    for (name, page) in &pages {
        match std::fs::read(dir.join(name)) {
            Ok(committed) if &committed == page => {}
            Ok(_) => stale.push(format!("{name} is stale")),
            Err(_) => stale.push(format!("{name} is missing")),
        }
    }
    for entry in std::fs::read_dir(&dir).expect("read deploy/man") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if !pages.contains_key(&name) {
            stale.push(format!("{name} is no longer generated"));
        }
    }
    assert!(
        stale.is_empty(),
        "deploy/man: {}; regenerate with `UPDATE_GOLDEN=1 cargo test --test manpage`",
        stale.join(", ")
    );
}

/// The page reads as a man page: `man` formats it without warnings, with
/// the options under their headings and the required ones marked.
#[test]
fn the_man_page_formats_cleanly() {
    let pages = render();
    let dir = tempfile::tempdir().expect("temp dir");
    let plan = dir.path().join("gmsa-reconciler-plan.1");
    std::fs::write(&plan, &pages["gmsa-reconciler-plan.1"]).expect("write");
    let out = std::process::Command::new("man")
        .args(["--warnings", "-l"])
        .arg(&plan)
        .env("MANWIDTH", "120")
        .output()
        .expect("run man");
    // Without a terminal, man still emboldens by overstriking: drop each
    // character that a backspace takes back.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{warnings}");
    assert!(warnings.trim().is_empty(), "man warns: {warnings}");
    for wanted in [
        "--fs-root",
        "[required]",
        "DIRECTORY",
        "SAFETY",
        "GMSA_GROUP_OU",
    ] {
        assert!(text.contains(wanted), "{wanted} missing from:\n{text}");
    }
}
