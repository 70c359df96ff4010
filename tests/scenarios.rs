//! Scenario tests: every directory under `fixtures/scenarios/` is a placement
//! tree, a directory (LDIF) and the options to use; the binary's `plan` and
//! `sync` output, exit codes, log lines and the directory after `sync` must
//! equal the golden files beside them. A second `sync` must change nothing.
//! A scenario with an `explain` file (one set of arguments per line) also
//! runs `explain` with each, before anything is written, against
//! `expected-explain`.
//!
//! Regenerate the golden files with `UPDATE_GOLDEN=1 cargo test --test scenarios`
//! and review the diff.

mod support;

use std::fs;
use std::path::Path;

use support::scenario::{copy_dir, run_bin, Scenario};

/// Lines of standard error with the parts that vary from run to run
/// (timestamps, temp paths) taken out.
fn normalise_stderr(stderr: &str, tmp: &Path) -> String {
    let tmp = tmp.display().to_string();
    let mut out = String::new();
    for line in stderr.lines() {
        let line = line.replace(&tmp, "<tmp>");
        // Text log lines: "<timestamp>  LEVEL target: message".
        let line = match ["ERROR ", " WARN ", " INFO ", "DEBUG "]
            .iter()
            .find_map(|level| line.find(level).map(|at| (level.trim(), at + level.len())))
        {
            Some((level, rest)) => {
                let rest = &line[rest..];
                let message = rest.split_once(": ").map_or(rest, |(_, m)| m);
                format!("{level} {message}")
            }
            None => line,
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn check(scenario: &Scenario, failures: &mut Vec<String>) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let tree = tmp.path().join("tree");
    copy_dir(&scenario.dir.join("tree"), &tree);
    let directory = tmp.path().join("directory.ldif");
    fs::copy(scenario.dir.join("directory.ldif"), &directory).expect("copy directory");
    let mut args = vec![
        "--fs-root".to_owned(),
        tree.display().to_string(),
        "--directory".to_owned(),
        directory.display().to_string(),
    ];
    args.extend(scenario.options());

    if let Ok(questions) = fs::read_to_string(scenario.dir.join("explain")) {
        let mut answers = String::new();
        for line in questions.lines().filter(|l| !l.trim().is_empty()) {
            let mut explain_args = args.clone();
            explain_args.extend(line.split_whitespace().map(str::to_owned));
            let out = run_bin("explain", &explain_args);
            answers += &format!(
                "## explain {line}\n## exit: {}\n{}## stderr\n{}\n",
                out.code,
                out.stdout,
                normalise_stderr(&out.stderr, tmp.path())
            );
        }
        scenario.golden("expected-explain", &answers, failures);
    }

    let plan = run_bin("plan", &args);
    let sync = run_bin("sync", &args);
    let after = fs::read_to_string(&directory).expect("directory after sync");
    let again = run_bin("sync", &args);
    let after_again = fs::read_to_string(&directory).expect("directory after a second sync");

    scenario.golden("expected.ldif", &plan.stdout, failures);
    scenario.golden("expected-sync.ldif", &sync.stdout, failures);
    scenario.golden("expected-directory.ldif", &after, failures);
    scenario.golden(
        "expected-exit",
        &format!("plan: {}\nsync: {}\n", plan.code, sync.code),
        failures,
    );
    let logs = format!(
        "# plan\n{}# sync\n{}",
        normalise_stderr(&plan.stderr, tmp.path()),
        normalise_stderr(&sync.stderr, tmp.path())
    );
    scenario.golden("expected-stderr", &logs, failures);
    if after_again != after {
        failures.push(format!(
            "{}: a second sync changed the directory again:\n{}",
            scenario.name, again.stdout
        ));
    }
}

#[test]
fn scenarios_match_their_golden_files() {
    let scenarios = Scenario::all();
    assert!(scenarios.len() >= 19, "fixtures/scenarios/ went missing");
    let mut failures = Vec::new();
    for scenario in &scenarios {
        check(scenario, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
