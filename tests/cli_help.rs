//! `-h` and shell completions through the binary: options grouped under
//! the documented headings, required options marked, and a completion
//! script that bash loads and that completes subcommands and options.

mod support;

use std::collections::BTreeMap;

use support::scenario::run_bin;

const HEADINGS: &[&str] = &[
    "Input",
    "Directory",
    "Safety",
    "Output",
    "Daemon",
    "Replicas",
    "Node mode",
];

/// The long options of a `-h` text by the heading they are listed under.
fn sections(help: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut heading = String::new();
    for line in help.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            heading = line.trim_end_matches(':').to_owned();
            continue;
        }
        let Some(at) = line.find("--") else { continue };
        let trimmed = line.trim_start();
        // Only option lines: they start with `-x, --long` or `--long`.
        if !(trimmed.starts_with("--") || trimmed.starts_with('-') && at < 10) {
            continue;
        }
        let long: String = line[at + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        out.entry(heading.clone()).or_default().push(long);
    }
    out
}

fn help(command: &str) -> String {
    let out = run_bin(command, &["-h".to_owned()]);
    assert_eq!(out.code, 0, "{command} -h: {}", out.stderr);
    out.stdout
}

#[test]
fn help_lists_every_option_under_a_documented_heading() {
    for command in ["plan", "sync", "run", "check"] {
        let sections = sections(&help(command));
        for (heading, options) in &sections {
            if heading == "Options" {
                assert_eq!(
                    options,
                    &["help", "version"],
                    "{command}: ungrouped options"
                );
                continue;
            }
            assert!(
                HEADINGS.contains(&heading.as_str()),
                "{command}: heading {heading:?} is not one of {HEADINGS:?}"
            );
        }
        for heading in ["Input", "Directory", "Output"] {
            assert!(sections.contains_key(heading), "{command}: no {heading}");
        }
    }
    // In the documented order.
    let text = help("run");
    let order: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(' ') && l.ends_with(':') && *l != "Options:")
        .map(|l| l.trim_end_matches(':'))
        .collect();
    assert_eq!(order, HEADINGS);
    let run = sections(&help("run"));
    assert!(run["Replicas"].contains(&"no-lock".to_owned()), "{run:?}");
    assert!(
        run["Daemon"].contains(&"resync-interval".to_owned()),
        "{run:?}"
    );
    assert!(run["Node mode"].contains(&"app-root".to_owned()), "{run:?}");
    assert!(run["Safety"].contains(&"max-delete".to_owned()), "{run:?}");
    assert!(run["Directory"].contains(&"ldap-url".to_owned()), "{run:?}");
}

/// The line of `--long` in a `-h` text, with its description (which may
/// be on the next line when the option's name is long).
fn option_text(help: &str, long: &str) -> String {
    let lines: Vec<&str> = help.lines().collect();
    let at = lines
        .iter()
        .position(|l| {
            l.trim_start().starts_with(&format!("--{long} "))
                || l.contains(&format!(", --{long}"))
                || l.trim() == format!("--{long}")
        })
        .unwrap_or_else(|| panic!("--{long} not in:\n{help}"));
    let mut text = lines[at].to_owned();
    if let Some(next) = lines.get(at + 1) {
        if !next.trim_start().starts_with('-') {
            text.push_str(next);
        }
    }
    text
}

#[test]
fn required_options_are_marked() {
    let plan = help("plan");
    for long in ["fs-root", "group-ou"] {
        assert!(
            option_text(&plan, long).contains("[required]"),
            "plan --{long}"
        );
    }
    for long in ["partition", "directory", "max-delete"] {
        assert!(
            !option_text(&plan, long).contains("[required"),
            "plan --{long}"
        );
    }
    let check = help("check");
    for long in ["proid", "group-ou"] {
        assert!(
            option_text(&check, long).contains("[required]"),
            "check --{long}"
        );
    }
    assert!(option_text(&check, "host-dn").contains("[required unless --self]"));
    // check reads the tree only for the DCs: not required there.
    assert!(!option_text(&check, "fs-root").contains("[required"));
    let run = help("run");
    assert!(option_text(&run, "fs-root").contains("[required]"));
    assert!(option_text(&run, "group-ou").contains("[required unless --app-root]"));
    assert!(option_text(&run, "no-lock").contains("unless --zookeeper]"));
}

#[test]
fn bash_completion_completes_subcommands_and_options() {
    let script = run_bin("completions", &["bash".to_owned()]);
    assert_eq!(script.code, 0, "{}", script.stderr);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gmsa-reconciler.bash");
    std::fs::write(&path, &script.stdout).expect("write script");
    // Load it as bash-completion would, then ask it what follows what.
    let complete = |words: &str| {
        let program = format!(
            "source {path}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; \
             fn=$(complete -p gmsa-reconciler | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p'); \
             \"$fn\" gmsa-reconciler \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            path = path.display()
        );
        let out = std::process::Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &program])
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let subcommands = complete("gmsa-reconciler ''");
    for sub in ["plan", "sync", "run", "check", "config", "completions"] {
        assert!(
            subcommands.lines().any(|l| l == sub),
            "{sub} not offered: {subcommands}"
        );
    }
    let options = complete("gmsa-reconciler run --res");
    assert_eq!(options.trim(), "--resync-interval", "{options}");
    let formats = complete("gmsa-reconciler plan --format ''");
    let mut formats: Vec<&str> = formats.lines().collect();
    formats.sort();
    assert_eq!(formats, ["json", "ldif"]);
}

#[test]
fn zsh_and_fish_scripts_name_every_subcommand() {
    for shell in ["zsh", "fish"] {
        let script = run_bin("completions", &[shell.to_owned()]);
        assert_eq!(script.code, 0, "{shell}: {}", script.stderr);
        for word in [
            "plan", "sync", "run", "check", "config", "fs-root", "no-lock",
        ] {
            assert!(script.stdout.contains(word), "{shell}: {word} missing");
        }
    }
    let unknown = run_bin("completions", &["tcsh".to_owned()]);
    assert_eq!(unknown.code, 1);
    assert!(unknown.stderr.contains("tcsh"), "{}", unknown.stderr);
}
