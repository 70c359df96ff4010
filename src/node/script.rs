//! The supervisor scripts of a container (`run`, `finish`, `log/run`) as
//! plain POSIX sh, and the command templates the operator can put in them.
//!
//! Every value that comes from a manifest, a path or an instance name is
//! single-quoted before it reaches a script, so no name can inject shell
//! syntax; only the operator's own template text is taken verbatim.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use thiserror::Error;

use super::manifest::{EnvVar, Service};

/// Quotes a value as one shell word: inside single quotes, with each `'`
/// written as `'\''`.
pub fn shell_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// An operator's command with `{name}` placeholders; `{{` and `}}` stand for
/// literal braces (so shell `${VAR}` is written `${{VAR}}`).
///
/// A placeholder is always one word of the command, wherever it is: the
/// parser follows the shell's quoting through the text, and a placeholder
/// inside double quotes is rendered for double quotes, one outside quotes
/// is quoted itself. Inside single quotes nothing is expanded, so a
/// placeholder there is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Placeholder(String, Quoting),
}

/// Where in the shell's quoting a placeholder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quoting {
    /// Outside quotes (also inside `$(...)` or backquotes, which start
    /// their own quoting).
    None,
    /// Inside double quotes.
    Double,
    /// Inside single quotes: nothing is expanded there.
    Single,
}

/// Follows the shell's quoting through a template's literal text.
#[derive(Debug, Default)]
struct Quotes {
    /// Open contexts, innermost last.
    open: Vec<Context>,
    /// The last character was an unquoted `\`: the next one is literal.
    escaped: bool,
    /// The last character was `$`.
    dollar: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Single,
    Double,
    /// `$(`, with the depth of `(` opened inside it.
    Substitution(u32),
    Backquote,
}

impl Quotes {
    fn quoting(&self) -> Quoting {
        match self.open.last() {
            Some(Context::Single) => Quoting::Single,
            Some(Context::Double) => Quoting::Double,
            _ => Quoting::None,
        }
    }

    fn feed(&mut self, c: char) {
        let dollar = std::mem::replace(&mut self.dollar, false);
        if std::mem::replace(&mut self.escaped, false) {
            return;
        }
        match self.open.last_mut() {
            Some(Context::Single) => {
                if c == '\'' {
                    self.open.pop();
                }
            }
            Some(Context::Double) => match c {
                '"' => {
                    self.open.pop();
                }
                '\\' => self.escaped = true,
                '`' => self.open.push(Context::Backquote),
                '(' if dollar => self.open.push(Context::Substitution(0)),
                '$' => self.dollar = true,
                _ => {}
            },
            top => match c {
                '\'' => self.open.push(Context::Single),
                '"' => self.open.push(Context::Double),
                '\\' => self.escaped = true,
                '`' if top == Some(&mut Context::Backquote) => {
                    self.open.pop();
                }
                '`' => self.open.push(Context::Backquote),
                '(' if dollar => self.open.push(Context::Substitution(0)),
                '(' => {
                    if let Some(Context::Substitution(depth)) = top {
                        *depth += 1;
                    }
                }
                ')' => match top {
                    Some(Context::Substitution(0)) => {
                        self.open.pop();
                    }
                    Some(Context::Substitution(depth)) => *depth -= 1,
                    _ => {}
                },
                '$' => self.dollar = true,
                _ => {}
            },
        }
    }
}

/// Why a command template was refused: a configuration error, fixed by
/// the operator.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TemplateError {
    /// A `{` without its `}`.
    #[error("unclosed '{{' in {text:?}")]
    Unclosed {
        /// The template.
        text: String,
    },
    /// A placeholder the command cannot have.
    #[error(
        "unknown placeholder {{{name}}} in {text:?}; known: {}; a literal brace is written \
         twice (the shell's ${{{name}}} is written ${{{{{name}}}}})",
        known(allowed)
    )]
    Unknown {
        /// The placeholder's name.
        name: String,
        /// The template.
        text: String,
        /// The names it may use.
        allowed: Vec<String>,
    },
    /// A placeholder inside single quotes, where the shell expands nothing.
    #[error(
        "placeholder {{{name}}} inside single quotes in {text:?}: the shell would not expand it \
         there; put it outside the quotes ('...'{{{name}}}'...') or inside double quotes"
    )]
    InSingleQuotes {
        /// The placeholder's name.
        name: String,
        /// The template.
        text: String,
    },
    /// A `}` that closes nothing.
    #[error("unmatched '}}' in {text:?}; write '}}}}'")]
    Unmatched {
        /// The template.
        text: String,
    },
    /// Nothing to run (nothing but white space).
    #[error("an empty command")]
    Empty,
}

/// The allowed placeholders as a template writes them.
fn known(allowed: &[String]) -> String {
    allowed
        .iter()
        .map(|a| format!("{{{a}}}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Template {
    /// Parses a template, accepting only the given placeholder names.
    pub fn parse(text: &str, allowed: &[&str]) -> Result<Template, TemplateError> {
        if text.trim().is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut quotes = Quotes::default();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                    quotes.feed('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                    quotes.feed('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(TemplateError::Unclosed {
                                    text: text.to_owned(),
                                })
                            }
                        }
                    }
                    if !allowed.contains(&name.as_str()) {
                        return Err(TemplateError::Unknown {
                            name,
                            text: text.to_owned(),
                            allowed: allowed.iter().map(|a| a.to_string()).collect(),
                        });
                    }
                    let quoting = quotes.quoting();
                    if quoting == Quoting::Single {
                        return Err(TemplateError::InSingleQuotes {
                            name,
                            text: text.to_owned(),
                        });
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Placeholder(name, quoting));
                    // A placeholder is a word: it ends a `$` before it.
                    quotes.dollar = false;
                }
                '}' => {
                    return Err(TemplateError::Unmatched {
                        text: text.to_owned(),
                    })
                }
                c => {
                    literal.push(c);
                    quotes.feed(c);
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        if parts.is_empty() {
            return Err(TemplateError::Empty);
        }
        Ok(Template { parts })
    }

    /// The command with each placeholder replaced by its value, quoted
    /// for where it stands (single quotes outside quotes, escapes inside
    /// double quotes). A placeholder without a value becomes empty.
    pub fn render(&self, values: &BTreeMap<&str, String>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Placeholder(name, quoting) => {
                    let value = values.get(name.as_str()).map_or("", |v| v);
                    match quoting {
                        Quoting::Double => out.push_str(&double_quoted(value)),
                        Quoting::None | Quoting::Single => out.push_str(&shell_quote(value)),
                    }
                }
            }
        }
        out
    }
}

impl Template {
    /// The command for `/bin/sh -c` with each placeholder replaced by a
    /// reference to a positional parameter: the placeholder `order[i]`
    /// becomes `"${i+1}"` (`${i+1}` inside double quotes). The values
    /// themselves never enter the command: they are passed to the shell as
    /// arguments after it.
    pub fn render_positional(&self, order: &[&str]) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Placeholder(name, quoting) => {
                    let quote = if *quoting == Quoting::Double {
                        ""
                    } else {
                        "\""
                    };
                    match order.iter().position(|o| o == name) {
                        Some(i) => {
                            let _ = write!(out, "{quote}${{{}}}{quote}", i + 1);
                        }
                        None => out.push_str(&quote.repeat(2)),
                    }
                }
            }
        }
        out
    }
}

/// A value as it is written inside double quotes: `\\`, `"`, `$` and
/// `` ` `` escaped, so the shell takes it as it is.
fn double_quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What the container's `run` starts.
pub enum RunWhat<'a> {
    /// The operator's command, already rendered; run from the container directory.
    Command(&'a str),
    /// The manifest's services under `/bin/sh -c`, run from `data/`.
    Services(&'a [Service]),
}

/// The `run` script of a container.
pub fn run_script(
    instance: &str,
    container_dir: &str,
    environ: &[EnvVar],
    what: RunWhat<'_>,
) -> String {
    let mut s = header(&format!("Runs the container of {instance}."));
    let dir = match what {
        RunWhat::Command(_) => container_dir.to_owned(),
        RunWhat::Services(_) => format!("{container_dir}/data"),
    };
    let _ = writeln!(s, "cd {} || exit 111", shell_quote(&dir));
    for var in environ {
        // Names are validated as shell variable names; only values are quoted.
        let _ = writeln!(s, "{}={}", var.name, shell_quote(&var.value));
        let _ = writeln!(s, "export {}", var.name);
    }
    match what {
        RunWhat::Command(command) => {
            s.push_str(command);
            s.push('\n');
        }
        RunWhat::Services([one]) => {
            let _ = writeln!(s, "exec /bin/sh -c {}", shell_quote(&one.command));
        }
        RunWhat::Services(services) => {
            s.push_str(SERVICES_PRELUDE);
            for service in services {
                let _ = writeln!(
                    s,
                    "watch_service {} {} &\npids=\"$pids $!\"",
                    shell_quote(&service.name),
                    shell_quote(&service.command)
                );
            }
            s.push_str(SERVICES_WAIT);
        }
    }
    s
}

/// The shell that runs several services as one container: each service has
/// a watcher that forwards TERM to it; the first service to end records its
/// name and status in `.exited/status` (mkdir is the atomic "first") and
/// stops the rest, so the container ends with it and `finish` knows who.
const SERVICES_PRELUDE: &str = r#"rm -rf .exited
watch_service() {
    child=
    trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM
    /bin/sh -c "$2" &
    child=$!
    [ -n "${stopping-}" ] && kill -TERM "$child" 2>/dev/null
    wait "$child"
    rc=$?
    while kill -0 "$child" 2>/dev/null; do
        wait "$child"
        rc=$?
    done
    if mkdir .exited 2>/dev/null; then
        printf '%s %s\n' "$1" "$rc" > .exited/status
        kill -TERM $$ 2>/dev/null
    fi
}
pids=
trap 'stopping=1; kill -TERM $pids 2>/dev/null' TERM INT HUP
"#;

const SERVICES_WAIT: &str = r#"[ -n "${stopping-}" ] && kill -TERM $pids 2>/dev/null
for pid in $pids; do
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid"
    done
done
rc=0
[ -r .exited/status ] && read -r _ rc < .exited/status
exit "$rc"
"#;

/// The `finish` script: records `data/exitinfo` once (the first exit wins:
/// `ln` refuses to replace an existing file), then runs the finish command.
/// The supervisor passes the exit code and the signal number (s6 style).
///
/// The shell never builds JSON from a name: each service name the file can
/// hold (`default_service`, or one of `services` when `.exited/status`
/// names it) is encoded here, once, as a JSON string, and the script only
/// chooses among those encoded words; the numbers it adds are checked to be
/// digits. So no app or service name (quotes, backslashes, `%` and all) can
/// make `exitinfo` unreadable and cost the container its `finished` event.
pub fn finish_script(
    instance: &str,
    container_dir: &str,
    default_service: &str,
    services: &[&str],
    finish_command: &str,
) -> String {
    let mut s = header(&format!(
        "Records how the container of {instance} ended and reports it."
    ));
    let _ = writeln!(s, "data={}", shell_quote(&format!("{container_dir}/data")));
    let _ = writeln!(
        s,
        "service_json={}",
        shell_quote(&json_string(default_service))
    );
    s.push_str(FINISH_NUMBERS);
    if !services.is_empty() {
        s.push_str("if [ -r \"$data/.exited/status\" ]; then\n");
        s.push_str("    read -r exited _ < \"$data/.exited/status\"\n");
        s.push_str("    case $exited in\n");
        for service in services {
            let _ = writeln!(
                s,
                "        {}) service_json={} ;;",
                shell_quote(service),
                shell_quote(&json_string(service))
            );
        }
        s.push_str("    esac\nfi\n");
    }
    s.push_str(FINISH_RECORD);
    s.push_str(finish_command);
    s.push('\n');
    s
}

/// A JSON string literal (quotes included) holding `value`.
fn json_string(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

const FINISH_NUMBERS: &str = r#"number() {
    case $1 in
        '' | *[!0-9]* | 0?* | ??????????*) echo -1 ;;
        *) echo "$1" ;;
    esac
}
"#;

const FINISH_RECORD: &str = r#"if [ ! -e "$data/exitinfo" ]; then
    tmp="$data/.exitinfo.$$"
    printf '{"service": %s, "return_code": %s, "signal": %s, "timestamp": %s}\n' \
        "$service_json" "$(number "${1-}")" "$(number "${2-0}")" "$(date +%s)" > "$tmp" &&
        ln "$tmp" "$data/exitinfo" 2>/dev/null
    rm -f "$tmp"
fi
"#;

/// The `log/run` script: appends the container's output to `log/current`.
pub fn log_run_script(instance: &str, container_dir: &str) -> String {
    let mut s = header(&format!("Keeps the output of the container of {instance}."));
    let _ = writeln!(
        s,
        "exec cat >> {}",
        shell_quote(&format!("{container_dir}/log/current"))
    );
    s
}

fn header(what: &str) -> String {
    let what: String = what.chars().filter(|c| !c.is_control()).collect();
    format!("#!/bin/sh\n# {what}\n# Written by gmsa-reconciler; changes are overwritten.\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a shell snippet and returns what it prints.
    fn sh(script: &str) -> String {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .output()
            .expect("run sh");
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    }

    #[test]
    fn quoting_survives_the_shell() {
        for value in [
            "",
            "plain",
            "a b",
            "it's",
            "'",
            "$(touch x)`y`",
            "a\nb",
            "\\ \" * ?",
            "{}",
        ] {
            let printed = sh(&format!("printf '%s' {}", shell_quote(value)));
            assert_eq!(printed, value);
        }
    }

    #[test]
    fn templates_quote_values_and_keep_literal_text() {
        let t = Template::parse(
            "run --spec=file://{credential_spec} ${{HOME}} {instance}",
            &["credential_spec", "instance"],
        )
        .expect("valid");
        let values = BTreeMap::from([("instance", "p.a#1".to_owned())]);
        assert_eq!(t.render(&values), "run --spec=file://'' ${HOME} 'p.a#1'");
        for (bad, message) in [
            (
                "x {nope}",
                r#"unknown placeholder {nope} in "x {nope}"; known: {instance}, {proid}; a literal brace is written twice (the shell's ${nope} is written ${{nope}})"#,
            ),
            (
                "echo 'a{proid}'",
                r#"placeholder {proid} inside single quotes in "echo 'a{proid}'": the shell would not expand it there; put it outside the quotes ('...'{proid}'...') or inside double quotes"#,
            ),
            (" \t\n", "an empty command"),
            ("x {instance", r#"unclosed '{' in "x {instance""#),
            ("x }", r#"unmatched '}' in "x }"; write '}}'"#),
            ("", "an empty command"),
        ] {
            let err = Template::parse(bad, &["instance", "proid"]).expect_err(bad);
            assert_eq!(err.to_string(), message, "{err:?}");
        }
    }

    #[test]
    fn positional_templates_pass_values_as_arguments() {
        let t = Template::parse(
            "printf '%s|' {group} {proid} ${{HOME+x}}",
            &["proid", "group"],
        )
        .expect("valid");
        let command = t.render_positional(&["proid", "group"]);
        assert_eq!(command, "printf '%s|' \"${2}\" \"${1}\" ${HOME+x}");
        let hostile = "a'b; $(touch x) \"c\"";
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&command)
            .args(["hook", hostile, "g r"])
            .output()
            .expect("run sh");
        assert_eq!(
            String::from_utf8(out.stdout).expect("utf-8"),
            format!("g r|{hostile}|x|")
        );
    }

    #[test]
    fn a_placeholder_stays_one_word_wherever_it_is_quoted() {
        let hostile = "* a  b $(touch x) `y` \\ \" ' ";
        let text = "IFS=' m'; printf '<%s>' \"[{proid}]\" {proid} \"$(printf %s \"{proid}\")\" \"$((1))({proid})\"";
        let t = Template::parse(text, &["proid"]).expect("valid");
        let expected = format!("<[{hostile}]><{hostile}><{hostile}><1({hostile})>");
        let positional = t.render_positional(&["proid"]);
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&positional)
            .args(["hook", hostile])
            .current_dir(tempfile::tempdir().expect("tempdir").path())
            .output()
            .expect("run sh");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            expected,
            "{positional}"
        );
        let values = BTreeMap::from([("proid", hostile.to_owned())]);
        assert_eq!(sh(&t.render(&values)), expected, "{}", t.render(&values));
        // Quotes escaped or in another context do not count.
        for fine in [
            "echo \\'{proid}",
            "echo \"'\"{proid}",
            "echo \"$(echo ')')\"{proid}",
        ] {
            Template::parse(fine, &["proid"]).expect(fine);
        }
        for refused in ["echo '{proid}'", "echo \"$(echo '{proid}')\""] {
            let err = Template::parse(refused, &["proid"]).expect_err(refused);
            assert!(matches!(err, TemplateError::InSingleQuotes { .. }), "{err}");
        }
    }

    #[test]
    fn the_finish_script_writes_valid_json_whatever_the_names() {
        for (default, services, status, expected) in [
            (r#"we"b\x"#, &[][..], None, r#"we"b\x"#),
            ("%s%n", &[][..], None, "%s%n"),
            ("app", &["a'b", r#"c"d"#][..], Some(r#"c"d"#), r#"c"d"#),
            ("app", &["a'b"][..], Some("unknown"), "app"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = dir.path().to_str().expect("utf-8");
            std::fs::create_dir_all(dir.path().join("data/.exited")).expect("mkdir");
            if let Some(status) = status {
                std::fs::write(
                    dir.path().join("data/.exited/status"),
                    format!("{status} 3\n"),
                )
                .expect("write");
            }
            let script = finish_script("p.a#1", root, default, services, "true");
            let path = dir.path().join("finish");
            std::fs::write(&path, script).expect("write");
            let out = std::process::Command::new("/bin/sh")
                .arg(&path)
                .args(["3", "0"])
                .output()
                .expect("run sh");
            assert!(out.status.success(), "{out:?}");
            let text = std::fs::read_to_string(dir.path().join("data/exitinfo")).expect("exitinfo");
            let info: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
            assert_eq!(info["service"], expected, "{text}");
            assert_eq!(info["return_code"], 3);
            assert_eq!(info["signal"], 0);
        }
    }

    #[test]
    fn environment_values_reach_the_services_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("data")).expect("mkdir");
        let root = dir.path().to_str().expect("utf-8");
        let environ = [EnvVar {
            name: "GREETING".into(),
            value: "it's $HOME; `x`".into(),
        }];
        let services = [Service {
            name: "main".into(),
            command: "printf '%s|%s' \"$GREETING\" \"$(basename \"$PWD\")\"".into(),
        }];
        let script = run_script("p.a#1", root, &environ, RunWhat::Services(&services));
        assert_eq!(sh(&script), "it's $HOME; `x`|data");
    }
}
