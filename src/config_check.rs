//! The `config` command: every source of options (flags, `GMSA_*`
//! variables, the `--config` file) checked one value at a time, then the
//! command's own validation, and the effective options printed with where
//! each came from.
//!
//! The commands themselves stop at the first problem, which is right for a
//! daemon that must not start half-configured; an operator fixing a file
//! wants every problem at once. So each value is put through its option's
//! own parser separately (a bad value is one problem, not the end), and the
//! values that passed are then parsed together and validated by the same
//! functions the commands use. Secrets stay out: the bind password is never
//! read (a password file is shown as its path), and a URL is shown only as its
//! scheme and address (`cli::shown_url`).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, FromArgMatches};

use crate::cli::{
    self, absolute_from_cwd, file_key_arg, file_value, read_config_file, shown_url, Cli, CliError,
    Command, Config, FileValue, PASSWORD_ENV,
};
use crate::model::escape_controls;

/// The commands whose options `config` checks; the first is the default.
pub const TARGETS: &[&str] = &["run", "plan", "sync", "check", "explain"];

/// Where an option's effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The command line.
    Flag,
    /// The named environment variable.
    Environment(String),
    /// The config file.
    File(PathBuf),
    /// The documented default (a value or a description of one).
    Default,
    /// Not set, and no default.
    Unset,
}

/// An option's effective value, as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shown {
    /// An on/off option.
    Flag(bool),
    /// A repeatable option.
    Count(u64),
    /// One or more values.
    Values(Vec<String>),
    /// The default's text from the option's help.
    Default(String),
    /// Nothing.
    None,
}

/// One option of the checked command.
#[derive(Debug, Clone)]
pub struct Effective {
    /// The long name, as a config-file key.
    pub name: String,
    /// The value.
    pub value: Shown,
    /// Where it came from.
    pub source: Source,
}

/// What `config` found.
#[derive(Debug, Clone)]
pub struct ConfigReport {
    /// The command checked.
    pub command: String,
    /// Its options, in the order of its `-h`.
    pub options: Vec<Effective>,
    /// Remarks that are not problems (where the password comes from).
    pub notes: Vec<String>,
    /// Every problem, one line each.
    pub problems: Vec<String>,
    /// Whether the report is printed as JSON (`--format json`).
    pub json: bool,
    /// The command's help, when that is what was asked for instead.
    pub help: Option<String>,
}

/// The option's value source and raw values after the lenient parse.
struct Given {
    source: Source,
    value: FileValue,
}

/// Checks `args` (`[COMMAND] [OPTIONS...]`, as given to `config`).
pub fn check(args: &[OsString]) -> ConfigReport {
    let (target, rest) = match args.first().and_then(|a| a.to_str()) {
        Some(name) if TARGETS.contains(&name) => (name.to_owned(), &args[1..]),
        Some(name) if !name.starts_with('-') => {
            let mut report = empty(TARGETS[0]);
            report.problems.push(format!(
                "{}: config checks the options of {}; the first argument names one of them",
                escape_controls(name),
                TARGETS.join(", ")
            ));
            return report;
        }
        _ => (TARGETS[0].to_owned(), args),
    };
    let all = cli::command();
    let Some(sub) = all.find_subcommand(&target).cloned() else {
        panic!("BUG: config names {target}, which the command line does not define");
    };
    let mut report = empty(&target);

    // Structure first (unknown flags, missing values), with every value
    // taken as text: the values are checked one by one below.
    let lenient = lenient(&sub).bin_name(format!("gmsa-reconciler {target}"));
    let argv = std::iter::once(OsString::from(&target)).chain(rest.iter().cloned());
    let matches = match lenient.try_get_matches_from(argv) {
        Ok(matches) => matches,
        // `config plan -h` asks what plan takes: its help, as `plan -h`.
        Err(err) if !err.use_stderr() => {
            report.help = Some(err.render().to_string());
            return report;
        }
        Err(err) => {
            report.problems.push(clap_problem(&target, &err));
            return report;
        }
    };

    let mut bad: BTreeSet<String> = BTreeSet::new();
    let mut given: Vec<(clap::Arg, Option<Given>)> = Vec::new();
    for arg in options(&sub) {
        let id = arg.get_id().as_str();
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => Source::Flag,
            Some(ValueSource::EnvVariable) => Source::Environment(
                arg.get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            _ => {
                given.push((arg.clone(), None));
                continue;
            }
        };
        let origin = match &source {
            Source::Environment(name) => name.clone(),
            _ => format!("--{}", arg.get_long().unwrap_or_default()),
        };
        let value = match arg.get_action() {
            ArgAction::SetTrue => FileValue::Flag(matches.get_flag(id)),
            ArgAction::Count => FileValue::Count(u64::from(matches.get_count(id))),
            _ => {
                let raw: Vec<OsString> = matches
                    .get_raw(id)
                    .map(|values| values.map(|v| v.to_owned()).collect())
                    .unwrap_or_default();
                for value in &raw {
                    if let Err(err) = check_value(arg, value) {
                        report
                            .problems
                            .push(format!("{origin}: {}", clap_text(&err)));
                        bad.insert(arg.get_long().unwrap_or_default().to_owned());
                    }
                }
                let raw = if cli::is_path_option(arg) {
                    raw.iter()
                        .map(|v| absolute_from_cwd(Path::new(v)).map_or(v.clone(), Into::into))
                        .collect()
                } else {
                    raw
                };
                FileValue::Values(raw)
            }
        };
        given.push((arg.clone(), Some(Given { source, value })));
    }

    // The file fills what neither a flag nor the environment set.
    let file = given.iter().find_map(|(arg, given)| match given {
        Some(Given {
            value: FileValue::Values(values),
            ..
        }) if arg.get_long() == Some("config") => values.first().map(PathBuf::from),
        _ => None,
    });
    if let Some(path) = &file {
        merge_file(path, &all, &sub, &mut given, &mut report, &mut bad);
    }

    report.json = given.iter().any(|(arg, given)| {
        arg.get_long() == Some("format")
            && matches!(given, Some(Given { value: FileValue::Values(v), .. }) if v.iter().any(|v| v == "json"))
    });
    if std::env::var_os(PASSWORD_ENV).is_some() {
        report
            .notes
            .push(format!("bind password: from {PASSWORD_ENV} (not shown)"));
    }

    // The values that passed, validated together as the command would.
    let mut argv = vec![OsString::from("gmsa-reconciler"), OsString::from(&target)];
    for (arg, given) in &given {
        if let Some(given) = given {
            if !bad.contains(arg.get_long().unwrap_or_default()) {
                argv.extend(given.value.clone().into_args(arg));
            }
        }
    }
    let problems = match without_env(all, &target).try_get_matches_from(&argv) {
        Ok(matches) => match Cli::from_arg_matches(&matches) {
            Ok(cli) => validate(cli.command),
            Err(err) => vec![CliError::Usage(err)],
        },
        Err(err) => vec![CliError::Usage(err)],
    };
    for problem in problems {
        // An option whose value was refused above is reported once.
        if let CliError::Invalid { option, .. } = &problem {
            if bad.contains(option.trim_start_matches('-')) {
                continue;
            }
        }
        let text = match &problem {
            CliError::Usage(err) => clap_problem(&target, err),
            other => other.to_string(),
        };
        if !report.problems.contains(&text) {
            report.problems.push(text);
        }
    }

    report.options = given
        .into_iter()
        .map(|(arg, given)| effective(&arg, given))
        .collect();
    report
}

fn empty(command: &str) -> ConfigReport {
    ConfigReport {
        command: command.to_owned(),
        options: Vec::new(),
        notes: Vec::new(),
        problems: Vec::new(),
        json: false,
        help: None,
    }
}

/// The options of `sub` that a config file or a flag can set.
fn options(sub: &clap::Command) -> impl Iterator<Item = &clap::Arg> {
    // In the order of `-h`: `cli::command` puts them so.
    sub.get_arguments()
        .filter(|a| !matches!(a.get_long(), None | Some("help" | "version")))
}

/// `sub` with every value taken as text, so that only the structure of the
/// arguments can fail.
fn lenient(sub: &clap::Command) -> clap::Command {
    let ids: Vec<_> = options(sub)
        .filter(|a| a.get_action().takes_values())
        .map(|a| a.get_id().clone())
        .collect();
    let mut lenient = sub.clone();
    for id in ids {
        lenient = lenient.mut_arg(id, |a| {
            a.value_parser(clap::builder::ValueParser::os_string())
        });
    }
    lenient
}

/// The whole command line with `target`'s environment variables ignored:
/// their values were checked and are passed as flags.
fn without_env(all: clap::Command, target: &str) -> clap::Command {
    all.mut_subcommand(target, |sub| {
        let ids: Vec<_> = sub.get_arguments().map(|a| a.get_id().clone()).collect();
        ids.into_iter().fold(sub, |sub, id| {
            sub.mut_arg(id, |a| a.env(Option::<&'static str>::None))
        })
    })
}

fn merge_file(
    path: &Path,
    all: &clap::Command,
    sub: &clap::Command,
    given: &mut [(clap::Arg, Option<Given>)],
    report: &mut ConfigReport,
    bad: &mut BTreeSet<String>,
) {
    let keys = match read_config_file(path) {
        Ok(keys) => keys,
        Err(err) => {
            report.problems.push(err.to_string());
            return;
        }
    };
    let folder = path.parent().unwrap_or(Path::new("/"));
    for (key, value) in keys {
        let arg = match file_key_arg(path, &key, all, sub) {
            Ok(Some(arg)) => arg,
            Ok(None) => {
                // A key of another command: its value is checked all the
                // same, since that command reads this file too.
                if let Some(why) = other_command_value(all, &key, &value, folder) {
                    report
                        .problems
                        .push(cli::config_file_error(path, why).to_string());
                }
                continue;
            }
            Err(err) => {
                report.problems.push(err.to_string());
                continue;
            }
        };
        let value = match file_value(arg, &value, folder) {
            Ok(value) => value,
            Err(why) => {
                report
                    .problems
                    .push(cli::config_file_error(path, why).to_string());
                bad.insert(key.clone());
                continue;
            }
        };
        let Some((_, slot)) = given.iter_mut().find(|(a, _)| a.get_id() == arg.get_id()) else {
            continue;
        };
        if slot.is_some() {
            continue;
        }
        if let FileValue::Values(values) = &value {
            for v in values {
                if let Err(err) = check_value(arg, v) {
                    let why = format!("key {key:?}: {}", clap_text(&err));
                    report
                        .problems
                        .push(cli::config_file_error(path, why).to_string());
                    bad.insert(key.clone());
                }
            }
        }
        *slot = Some(Given {
            source: Source::File(path.to_owned()),
            value,
        });
    }
}

/// What is wrong with `value` for the option `key` of the first command
/// that has it, if anything.
fn other_command_value(
    all: &clap::Command,
    key: &str,
    value: &serde_yaml::Value,
    folder: &Path,
) -> Option<String> {
    let arg = all
        .get_subcommands()
        .flat_map(|s| s.get_arguments())
        .find(|a| a.get_long() == Some(key))?;
    match file_value(arg, value, folder) {
        Err(why) => Some(why),
        Ok(FileValue::Values(values)) => values.iter().find_map(|v| {
            check_value(arg, v)
                .err()
                .map(|err| format!("key {key:?}: {}", clap_text(&err)))
        }),
        Ok(_) => None,
    }
}

/// The command's own validation, every problem listed.
fn validate(command: Command) -> Vec<CliError> {
    let required = |config: &Config| {
        let mut problems = Vec::new();
        if let Err(e) = config.require_fs_root() {
            problems.push(e);
        }
        if let Err(e) = config.require_group_ou() {
            problems.push(e);
        }
        problems
    };
    match command {
        Command::Plan(args) => match Config::validate(&args.common, Some(&args.write)) {
            Ok(config) => required(&config),
            Err(problems) => problems,
        },
        Command::Sync(args) => {
            let mut problems = match Config::validate(&args.common, Some(&args.write)) {
                Ok(config) => required(&config),
                Err(problems) => problems,
            };
            problems.extend(audit_log_problem(&args.audit));
            problems
        }
        Command::Run(args) => {
            let mut problems = cli::RunConfig::validate(&args).err().unwrap_or_default();
            problems.extend(audit_log_problem(&args.audit));
            problems
        }
        Command::Check(args) => cli::CheckConfig::validate(&args).err().unwrap_or_default(),
        Command::Explain(args) => cli::ExplainConfig::validate(&args)
            .err()
            .unwrap_or_default(),
        Command::Finish(_) | Command::Config(_) | Command::Completions(_) => {
            panic!("BUG: config checks only the commands in TARGETS")
        }
    }
}

/// Why `sync` or `run` would refuse `--audit-log`, found as they open it
/// but without creating it (see [`crate::audit::check_log`]).
fn audit_log_problem(audit: &cli::AuditArgs) -> Option<CliError> {
    let path = audit.audit_log.as_deref()?;
    let source = crate::audit::check_log(path).err()?;
    let shown = crate::audit::AuditError {
        path: path.to_owned(),
        source,
    }
    .to_string();
    let why = shown
        .strip_prefix("--audit-log ")
        .unwrap_or(&shown)
        .to_owned();
    Some(CliError::Invalid {
        option: "--audit-log",
        why,
    })
}

fn effective(arg: &clap::Arg, given: Option<Given>) -> Effective {
    let name = arg.get_long().unwrap_or_default().to_owned();
    let url = cli::is_url_option(arg);
    let redact = |v: &OsString| {
        let text = v.to_string_lossy().into_owned();
        if url {
            shown_url(&text)
        } else {
            text
        }
    };
    match given {
        Some(Given { source, value }) => Effective {
            value: match value {
                FileValue::Flag(on) => Shown::Flag(on),
                FileValue::Count(n) => Shown::Count(n),
                FileValue::Values(values) => Shown::Values(values.iter().map(redact).collect()),
            },
            name,
            source,
        },
        None => {
            let (value, source) = match (arg.get_action(), documented_default(arg)) {
                (_, Some(text)) => (Shown::Default(text), Source::Default),
                (ArgAction::SetTrue, None) => (Shown::Flag(false), Source::Default),
                (ArgAction::Count, None) => (Shown::Count(0), Source::Default),
                _ => (Shown::None, Source::Unset),
            };
            Effective {
                name,
                value,
                source,
            }
        }
    }
}

/// The `[default: ...]` an option's help documents. The defaults live in
/// the help text (and the validation), not in clap, because a value from
/// the config file must beat a default.
fn documented_default(arg: &clap::Arg) -> Option<String> {
    let help = arg.get_help()?.to_string();
    let start = help.find("[default: ")? + "[default: ".len();
    let end = help[start..].find(']')? + start;
    Some(help[start..end].to_owned())
}

/// One value put through its option's own parser, alone.
fn check_value(arg: &clap::Arg, value: &OsString) -> Result<(), clap::Error> {
    let long = arg.get_long().unwrap_or_default();
    let mut flag = OsString::from(format!("--{long}="));
    flag.push(value);
    clap::Command::new("gmsa-reconciler")
        .no_binary_name(true)
        .arg(arg.clone().env(Option::<&'static str>::None))
        .try_get_matches_from([flag])
        .map(|_| ())
}

/// The first line of a clap error, without its `error: ` prefix.
fn clap_text(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

fn clap_problem(target: &str, err: &clap::Error) -> String {
    format!("{target}: {}", clap_text(err))
}

impl ConfigReport {
    /// Whether the configuration is valid.
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }

    /// The report: YAML text (the set options as keys, defaults and unset
    /// options as comments, each with its source) or, with `--format json`,
    /// one JSON object. Values are written as JSON strings, which YAML
    /// reads back, so no value can start a line of its own.
    pub fn render(&self) -> String {
        if let Some(help) = &self.help {
            return help.clone();
        }
        if self.json {
            return self.render_json();
        }
        let mut out = format!(
            "# gmsa-reconciler config {}: the effective options and where each came from\n",
            self.command
        );
        for option in &self.options {
            let value = shown_text(&option.value);
            let line = match &option.source {
                Source::Flag if option.name == "config" => {
                    format!("# {}: {value}  (flag)", option.name)
                }
                Source::Environment(var) if option.name == "config" => {
                    format!(
                        "# {}: {value}  (environment {})",
                        option.name,
                        escape_controls(var)
                    )
                }
                Source::Flag => format!("{}: {value}  # flag", option.name),
                Source::Environment(var) => {
                    format!(
                        "{}: {value}  # environment {}",
                        option.name,
                        escape_controls(var)
                    )
                }
                Source::File(path) => format!(
                    "{}: {value}  # file {}",
                    option.name,
                    escape_controls(&path.display().to_string())
                ),
                Source::Default => format!("# {}: {value}  (default)", option.name),
                Source::Unset => format!("# {}: not set", option.name),
            };
            out.push_str(&line);
            out.push('\n');
        }
        for note in &self.notes {
            out.push_str(&format!("# {}\n", escape_controls(note)));
        }
        match self.problems.len() {
            0 => out.push_str("# valid\n"),
            n => out.push_str(&format!(
                "# invalid: {n} problem{} (listed on standard error)\n",
                if n == 1 { "" } else { "s" }
            )),
        }
        out
    }

    fn render_json(&self) -> String {
        let options: Vec<serde_json::Value> = self
            .options
            .iter()
            .map(|option| {
                let (source, detail) = match &option.source {
                    Source::Flag => (Some("flag"), None),
                    Source::Environment(var) => (Some("environment"), Some(var.clone())),
                    Source::File(path) => (Some("file"), Some(path.display().to_string())),
                    Source::Default => (Some("default"), None),
                    Source::Unset => (None, None),
                };
                serde_json::json!({
                    "name": option.name,
                    "value": shown_json(&option.value),
                    "source": source,
                    "from": detail,
                })
            })
            .collect();
        let mut text = serde_json::json!({
            "command": self.command,
            "valid": self.is_valid(),
            "options": options,
            "notes": self.notes,
            "problems": self.problems,
        })
        .to_string();
        text.push('\n');
        text
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

fn shown_text(value: &Shown) -> String {
    match value {
        Shown::Flag(on) => on.to_string(),
        Shown::Count(n) => n.to_string(),
        Shown::Values(values) if values.len() == 1 => json_string(&values[0]),
        Shown::Values(values) => format!(
            "[{}]",
            values
                .iter()
                .map(|v| json_string(v))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Shown::Default(text) => escape_controls(text).into_owned(),
        Shown::None => String::new(),
    }
}

fn shown_json(value: &Shown) -> serde_json::Value {
    match value {
        Shown::Flag(on) => (*on).into(),
        Shown::Count(n) => (*n).into(),
        Shown::Values(values) if values.len() == 1 => values[0].clone().into(),
        Shown::Values(values) => values.clone().into(),
        Shown::Default(text) => text.clone().into(),
        Shown::None => serde_json::Value::Null,
    }
}
