//! The command line: options from flags, `GMSA_*` environment variables and
//! a YAML `--config` file (precedence flag > environment > file), validated
//! into a [`Config`] the rest of the program can trust.
//!
//! The file is merged by turning each of its keys that neither a flag nor
//! the environment set into the flag it names and parsing again, so every
//! option has exactly one parser and one set of checks whatever its source.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::election::ElectionConfig;
use crate::model::{Dn, GroupPattern, HostName, ModelError, PartitionGlob, Proid};
use crate::node::script::shell_quote;
use crate::node::{DomainInfo, GmsaProids, NodeConfig};
use crate::output::Format;
use crate::plan::GuardOptions;
use crate::reconcile::{ApplyOptions, Backoff};

/// The environment variable that may hold the bind password.
pub const PASSWORD_ENV: &str = "GMSA_BIND_PASSWORD";

/// Keeps AD gMSA host groups equal to the hosts that run each proid's containers.
#[derive(Debug, Parser)]
#[command(name = "gmsa-reconciler", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Read the tree and the directory once and print the changes.
    Plan(PlanArgs),
    /// Plan, apply, and print what was applied.
    Sync(SyncArgs),
    /// Run as a daemon: follow the tree and keep the groups right.
    Run(RunArgs),
    /// Tell whether a host DN is a member of a proid's group.
    Check(CheckArgs),
    /// Post the event of a container that stopped (run by its finish script).
    Finish(FinishArgs),
}

/// Options of `finish`.
#[derive(Debug, Args)]
pub struct FinishArgs {
    /// The container directory, `<app-root>/apps/<unique name>`.
    #[arg(value_parser = AbsolutePath)]
    pub container_dir: PathBuf,
    /// More log output (repeatable).
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (repeatable).
    #[arg(short, long, action = ArgAction::Count)]
    pub quiet: u8,
}

/// Options of `plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub write: WriteArgs,
    /// Exit 2 when there are changes, 0 when there are none.
    #[arg(long, env = "GMSA_EXIT_CODE")]
    pub exit_code: bool,
}

/// Options of `sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub write: WriteArgs,
    /// Print what would be done; write nothing.
    #[arg(long, env = "GMSA_DRY_RUN")]
    pub dry_run: bool,
}

/// Options of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub write: WriteArgs,
    /// Print what would be done; write nothing.
    #[arg(long, env = "GMSA_DRY_RUN")]
    pub dry_run: bool,
    /// How long to gather changes before reconciling them [default: 100ms].
    #[arg(long, env = "GMSA_BATCH_WINDOW", value_parser = parse_duration)]
    pub batch_window: Option<Duration>,
    /// Full resync period [default: 10m].
    #[arg(long, env = "GMSA_RESYNC_INTERVAL", value_parser = parse_duration)]
    pub resync_interval: Option<Duration>,
    /// Serve Prometheus metrics, /healthz and /readyz on HOST:PORT.
    #[arg(long, env = "GMSA_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// ZooKeeper servers (HOST:PORT,...) for leader election between replicas.
    #[arg(long, env = "GMSA_ZOOKEEPER")]
    pub zookeeper: Option<String>,
    /// ZooKeeper path of the replicas' lock [default: /election/gmsa-reconciler].
    #[arg(long, env = "GMSA_LOCK_PATH")]
    pub lock_path: Option<String>,
    /// ZooKeeper session timeout: how long a dead leader holds the lock [default: 10s].
    #[arg(long, env = "GMSA_ZOOKEEPER_SESSION_TIMEOUT", value_parser = parse_duration)]
    pub zookeeper_session_timeout: Option<Duration>,
    /// Run alone, without leader election (only one replica may run).
    #[arg(long, env = "GMSA_NO_LOCK")]
    pub no_lock: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub node: NodeArgs,
}

/// Options of node mode (`run --app-root`).
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Configure the containers placed on this host under DIR (node mode).
    #[arg(long, env = "GMSA_APP_ROOT", value_parser = AbsolutePath)]
    pub app_root: Option<PathBuf>,
    /// This host's name in placement/ [default: the machine's FQDN].
    #[arg(long, env = "GMSA_HOSTNAME")]
    pub hostname: Option<String>,
    /// Command each container's `run` executes; placeholders {container_dir}, {instance}, {proid}, {credential_spec} [default: the manifest's services under /bin/sh].
    #[arg(long, env = "GMSA_RUN_COMMAND")]
    pub run_command: Option<String>,
    /// Command each container's `finish` executes after recording its exit; placeholders {container_dir}, {app_root} [default: this binary's `finish {container_dir}`].
    #[arg(long, env = "GMSA_FINISH_COMMAND")]
    pub finish_command: Option<String>,
    /// Shell glob of the proids that run under a gMSA [default: every proid whose group exists].
    #[arg(long, env = "GMSA_GMSA_PROIDS")]
    pub gmsa_proids: Option<String>,
    /// Where credential specs are written [default: <app-root>/credential_specs].
    #[arg(long, env = "GMSA_CREDENTIAL_SPEC_DIR", value_parser = AbsolutePath)]
    pub credential_spec_dir: Option<PathBuf>,
    /// Before configuring a gMSA proid's instance, wait up to this long for this host to be in its group.
    #[arg(long, env = "GMSA_WAIT_FOR_GROUP", value_parser = parse_duration)]
    pub wait_for_group: Option<Duration>,
    /// How long stopped containers stay in cleanup/ [default: 1h].
    #[arg(long, env = "GMSA_RETAIN", value_parser = parse_duration)]
    pub retain: Option<Duration>,
    /// The domain's DNS name, for credential specs [default: read from the directory].
    #[arg(long, env = "GMSA_DOMAIN_DNS_NAME")]
    pub domain_dns_name: Option<String>,
    /// The forest root's DNS name [default: the domain's DNS name].
    #[arg(long, env = "GMSA_DOMAIN_DNS_TREE_NAME")]
    pub domain_dns_tree_name: Option<String>,
    /// The domain's NetBIOS name, for credential specs.
    #[arg(long, env = "GMSA_DOMAIN_NETBIOS_NAME")]
    pub domain_netbios_name: Option<String>,
    /// The domain's SID (S-1-5-21-...), for credential specs.
    #[arg(long, env = "GMSA_DOMAIN_SID")]
    pub domain_sid: Option<String>,
    /// The domain's GUID, for credential specs.
    #[arg(long, env = "GMSA_DOMAIN_GUID")]
    pub domain_guid: Option<String>,
}

/// Options of `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    /// The proid whose group is looked up.
    #[arg(long, env = "GMSA_PROID")]
    pub proid: Option<String>,
    /// The host's computer DN.
    #[arg(long, env = "GMSA_HOST_DN")]
    pub host_dn: Option<String>,
}

/// Options every command shares.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// YAML file of options: keys are long option names without `--`.
    #[arg(long, env = "GMSA_CONFIG", value_parser = AbsolutePath)]
    pub config: Option<PathBuf>,
    /// Root of the placement tree (holds .modified, servers/, placement/).
    #[arg(long, env = "GMSA_FS_ROOT", value_parser = AbsolutePath)]
    pub fs_root: Option<PathBuf>,
    /// Shell glob of the partitions whose servers are managed [default: *].
    #[arg(long, env = "GMSA_PARTITION")]
    pub partition: Option<String>,
    /// DN of the OU holding the proids' groups.
    #[arg(long, env = "GMSA_GROUP_OU")]
    pub group_ou: Option<String>,
    /// sAMAccountName pattern of a proid's group; `{}` is the proid [default: {}-gmsa-hosts].
    #[arg(long, env = "GMSA_GROUP_PATTERN")]
    pub group_pattern: Option<String>,
    /// LDIF content file used as the directory (instead of LDAP).
    #[arg(long, env = "GMSA_DIRECTORY", value_parser = AbsolutePath)]
    pub directory: Option<PathBuf>,
    /// LDAP server URL; repeat for failover, tried in order [default: ldap://<nt.dc> of the servers].
    #[arg(long, env = "GMSA_LDAP_URL", value_delimiter = ',', action = ArgAction::Append)]
    pub ldap_url: Vec<String>,
    /// DN to bind as (simple bind); the password comes from --bind-password-file or GMSA_BIND_PASSWORD.
    #[arg(long, env = "GMSA_BIND_DN")]
    pub bind_dn: Option<String>,
    /// File holding the bind password.
    #[arg(long, env = "GMSA_BIND_PASSWORD_FILE", value_parser = AbsolutePath)]
    pub bind_password_file: Option<PathBuf>,
    /// SASL mechanism instead of a simple bind (gssapi; needs TLS).
    #[arg(long, env = "GMSA_SASL", value_enum)]
    pub sasl: Option<Sasl>,
    /// Upgrade ldap:// connections with StartTLS.
    #[arg(long, env = "GMSA_STARTTLS")]
    pub starttls: bool,
    /// PEM file of CA certificates to trust besides the system store.
    #[arg(long, env = "GMSA_TLS_CA_FILE", value_parser = AbsolutePath)]
    pub tls_ca_file: Option<PathBuf>,
    /// Do not verify the server's certificate (unsafe; for tests only).
    #[arg(long, env = "GMSA_TLS_INSECURE")]
    pub tls_insecure: bool,
    /// Timeout of every directory operation [default: 30s].
    #[arg(long, env = "GMSA_TIMEOUT", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Output format [default: ldif].
    #[arg(long, env = "GMSA_FORMAT", value_enum)]
    pub format: Option<FormatArg>,
    /// Log format on standard error [default: text].
    #[arg(long, env = "GMSA_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// More log output (repeatable).
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (repeatable).
    #[arg(short, long, action = ArgAction::Count)]
    pub quiet: u8,
}

/// Options of the commands that write.
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Refuse a plan deleting more values than this [default: 500].
    #[arg(long, env = "GMSA_MAX_DELETE")]
    pub max_delete: Option<usize>,
    /// Refuse a plan deleting more than this percentage of the managed members (beyond 10 values) [default: 20].
    #[arg(long, env = "GMSA_MAX_DELETE_PERCENT", value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_delete_percent: Option<u32>,
    /// Apply deletions whatever their number.
    #[arg(long, env = "GMSA_ALLOW_MASS_DELETE")]
    pub allow_mass_delete: bool,
    /// Values per Modify request at most [default: 1000].
    #[arg(long, env = "GMSA_MAX_VALUES_PER_MODIFY", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_values_per_modify: Option<u32>,
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// RFC 2849 change records.
    Ldif,
    /// One JSON object.
    Json,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `--sasl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sasl {
    /// Kerberos through GSSAPI.
    Gssapi,
}

/// A configuration problem: one line naming the option or file and what is wrong.
#[derive(Debug, Error)]
pub enum CliError {
    /// clap's own usage errors (and help/version output).
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// A config file that can't be used.
    #[error("{path}: {why}")]
    ConfigFile {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// An option value that can't be used.
    #[error("{option}: {why}")]
    Invalid {
        /// The option, as `--name`.
        option: &'static str,
        /// What is wrong.
        why: String,
    },
}

fn invalid(option: &'static str, why: impl std::fmt::Display) -> CliError {
    CliError::Invalid {
        option,
        why: why.to_string(),
    }
}

/// Parses a duration: a number followed by `ms`, `s`, `m` or `h` (seconds
/// when there is no unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 100ms, 30s, 10m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?} has an unknown unit (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// The value parser of every path option: a relative path is made absolute
/// against the working directory and cleaned lexically (`.` dropped, `..`
/// folded), once, while the options are parsed. Symlinks are kept as given:
/// an operator may point `--fs-root` at a link on purpose, and the watcher
/// reports paths under the root exactly as it was spelled. Paths from a
/// `--config` file are resolved against the file's folder before they get
/// here (see [`file_args`]), so they arrive absolute.
///
/// An absolute root matters beyond tidiness: the watcher reports absolute
/// paths, and a relative root would match none of them.
#[derive(Debug, Clone, Copy)]
pub struct AbsolutePath;

impl clap::builder::TypedValueParser for AbsolutePath {
    type Value = PathBuf;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<PathBuf, clap::Error> {
        if value.is_empty() {
            let mut err = clap::Error::new(clap::error::ErrorKind::InvalidValue).with_cmd(cmd);
            if let Some(arg) = arg {
                err.insert(
                    clap::error::ContextKind::InvalidArg,
                    clap::error::ContextValue::String(arg.to_string()),
                );
            }
            err.insert(
                clap::error::ContextKind::InvalidValue,
                clap::error::ContextValue::String(String::new()),
            );
            return Err(err);
        }
        absolute_from_cwd(Path::new(value)).map_err(|e| {
            let what = arg.map_or_else(|| "a path".to_owned(), |a| a.to_string());
            clap::Error::raw(
                clap::error::ErrorKind::Io,
                format!(
                    "{what}: cannot make {} absolute: {e}\n",
                    Path::new(value).display()
                ),
            )
            .with_cmd(cmd)
        })
    }
}

/// `path` made absolute against the working directory, lexically clean.
pub fn absolute_from_cwd(path: &Path) -> std::io::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(lexically_clean(path));
    }
    Ok(lexically_clean(&std::env::current_dir()?.join(path)))
}

/// `path` without `.` components, repeated separators or `..` that can be
/// folded into the component before it; nothing is looked up on disk.
pub fn lexically_clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                let last = out.components().next_back();
                match last {
                    Some(Component::Normal(_)) => {
                        out.pop();
                    }
                    // `/..` is `/`.
                    Some(Component::RootDir) => {}
                    _ => out.push(".."),
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// True for the options whose values are paths: those parsed to a
/// `PathBuf`. Read from the option definitions, so a new path option is
/// resolved against the config file's folder without being listed here.
fn is_path_option(arg: &clap::Arg) -> bool {
    arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>()
}

/// Parses the command line, the environment and the config file.
pub fn parse<I, T>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let command = Cli::command();
    let matches = command.clone().try_get_matches_from(&args)?;
    let Some((name, sub)) = matches.subcommand() else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    // `finish` has no --config: asking clap for it there would panic.
    let Some(path) = sub.try_get_one::<PathBuf>("config").ok().flatten().cloned() else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let sub_command = command
        .find_subcommand(name)
        .cloned()
        .unwrap_or_else(|| panic!("BUG: clap matched subcommand {name} it does not know"));
    args.extend(file_args(&path, &command, &sub_command, sub)?);
    let matches = command.try_get_matches_from(&args)?;
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The config file's keys as flags, for the options that neither a flag nor
/// the environment set.
fn file_args(
    path: &PathBuf,
    all: &clap::Command,
    command: &clap::Command,
    matches: &clap::ArgMatches,
) -> Result<Vec<OsString>, CliError> {
    let shown = path.display().to_string();
    let err = |why: String| CliError::ConfigFile {
        path: shown.clone(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    // `path` is absolute (the option's parser made it so), so it has a folder.
    let folder = path.parent().unwrap_or(Path::new("/"));
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| err(format!("not valid YAML: {e}")))?;
    let map = match value {
        serde_yaml::Value::Mapping(map) => map,
        serde_yaml::Value::Null => return Ok(Vec::new()),
        _ => return Err(err("must be a mapping of option names to values".into())),
    };
    let mut out = Vec::new();
    for (key, value) in map {
        let Some(key) = key.as_str() else {
            return Err(err(format!("key {key:?} is not a string")));
        };
        if key == "config" {
            return Err(err("a config file cannot name another config file".into()));
        }
        let Some(arg) = command.get_arguments().find(|a| a.get_long() == Some(key)) else {
            // A key of another subcommand is fine: one file serves them all.
            let known = all
                .get_subcommands()
                .any(|s| s.get_arguments().any(|a| a.get_long() == Some(key)));
            if known {
                continue;
            }
            let longs = all
                .get_subcommands()
                .flat_map(|s| s.get_arguments().filter_map(|a| a.get_long()));
            let hint = nearest(key, longs)
                .map(|near| format!("; did you mean {near:?}?"))
                .unwrap_or_default();
            return Err(err(format!("unknown key {key:?}{hint}")));
        };
        let id = arg.get_id().as_str();
        if matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let flag = format!("--{key}");
        let bad = |what: &str| err(format!("key {key:?}: {what}"));
        match arg.get_action() {
            ArgAction::SetTrue => match value {
                serde_yaml::Value::Bool(true) => out.push(flag.into()),
                serde_yaml::Value::Bool(false) => {}
                _ => return Err(bad("must be true or false")),
            },
            ArgAction::Count => {
                let n = value.as_u64().ok_or_else(|| bad("must be a count"))?;
                out.extend((0..n).map(|_| OsString::from(&flag)));
            }
            _ => {
                let values = match value {
                    serde_yaml::Value::Sequence(items) => items,
                    other => vec![other],
                };
                for item in values {
                    let text = match item {
                        serde_yaml::Value::String(s) => s,
                        serde_yaml::Value::Number(n) => n.to_string(),
                        serde_yaml::Value::Bool(b) => b.to_string(),
                        _ => return Err(bad("must be a string, a number or a list of them")),
                    };
                    if is_path_option(arg) && !text.is_empty() {
                        // Relative to the file, wherever the program was
                        // started from: a config file and the tree it names
                        // move together.
                        let mut value = OsString::from(format!("{flag}="));
                        value.push(lexically_clean(&folder.join(&text)));
                        out.push(value);
                        continue;
                    }
                    out.push(format!("{flag}={text}").into());
                }
            }
        }
    }
    Ok(out)
}

/// The known key nearest to `key` by edit distance, when it is near enough
/// to be a typo (at most a third of the key's length, and at least one).
fn nearest<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let above = row[j + 1];
                row[j + 1] = (above + 1)
                    .min(row[j] + 1)
                    .min(diagonal + usize::from(ca != *cb));
                diagonal = above;
            }
        }
        row[b.len()]
    };
    let limit = (key.chars().count() / 3).max(1);
    known
        .map(|k| (distance(key, k), k))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, k)| k)
}

/// Where the groups are read and written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectoryChoice {
    /// The LDIF content file backend.
    LdifFile(PathBuf),
    /// LDAP servers: the given URLs, or when empty the servers' DCs.
    Ldap(LdapChoice),
}

/// LDAP connection settings before any connection is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdapChoice {
    /// URLs in failover order; empty means `ldap://<nt.dc>` of the servers.
    pub urls: Vec<String>,
    /// Simple-bind DN.
    pub bind_dn: Option<String>,
    /// Where the password comes from (never the password itself).
    pub password: PasswordSource,
    /// Bind with Kerberos.
    pub gssapi: bool,
    /// StartTLS on ldap:// URLs.
    pub starttls: bool,
    /// Extra CA certificates.
    pub tls_ca_file: Option<PathBuf>,
    /// Skip certificate verification.
    pub tls_insecure: bool,
    /// Timeout of each operation.
    pub timeout: Duration,
}

/// Where the bind password is read from when it is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// No password (anonymous or Kerberos).
    None,
    /// A file.
    File(PathBuf),
    /// The `GMSA_BIND_PASSWORD` environment variable.
    Env,
}

/// Settings every command shares, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The tree root, when given.
    pub fs_root: Option<PathBuf>,
    /// Partitions in scope.
    pub partition: PartitionGlob,
    /// Where the groups are searched.
    pub group_ou: Option<Dn>,
    /// The group name pattern.
    pub pattern: GroupPattern,
    /// The directory backend.
    pub directory: DirectoryChoice,
    /// Output format.
    pub format: Format,
    /// Log settings.
    pub log: LogSettings,
    /// The mass-deletion guard.
    pub guard: GuardOptions,
    /// How plans are applied.
    pub apply: ApplyOptions,
}

/// Log settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// `-v` count minus `-q` count.
    pub verbosity: i8,
}

impl Config {
    /// Validates the shared options (and the write options when given).
    pub fn from_args(common: &CommonArgs, write: Option<&WriteArgs>) -> Result<Config, CliError> {
        let partition = PartitionGlob::parse(common.partition.as_deref().unwrap_or("*"))
            .map_err(|e| invalid("--partition", model_why(e)))?;
        let group_ou = common
            .group_ou
            .as_deref()
            .map(Dn::parse)
            .transpose()
            .map_err(|e| invalid("--group-ou", model_why(e)))?;
        let pattern =
            GroupPattern::parse(common.group_pattern.as_deref().unwrap_or("{}-gmsa-hosts"))
                .map_err(|e| invalid("--group-pattern", model_why(e)))?;
        let directory = directory_choice(common)?;
        let format = match common.format {
            Some(FormatArg::Json) => Format::Json,
            Some(FormatArg::Ldif) | None => Format::Ldif,
        };
        let mut guard = GuardOptions::default();
        let mut apply = ApplyOptions::default();
        if let Some(w) = write {
            guard.max_delete = w.max_delete.unwrap_or(guard.max_delete);
            guard.max_delete_percent = w.max_delete_percent.unwrap_or(guard.max_delete_percent);
            guard.allow_mass_delete = w.allow_mass_delete;
            if let Some(n) = w.max_values_per_modify {
                apply.max_values_per_modify = n as usize;
            }
        }
        if let DirectoryChoice::Ldap(ldap) = &directory {
            // Give a slow server a few chances within one run.
            apply.backoff = Backoff {
                max: ldap.timeout.max(Backoff::default().max),
                ..Backoff::default()
            };
        }
        Ok(Config {
            fs_root: common.fs_root.clone(),
            partition,
            group_ou,
            pattern,
            directory,
            format,
            log: LogSettings {
                format: common.log_format.unwrap_or_default(),
                verbosity: common.verbose as i8 - common.quiet as i8,
            },
            guard,
            apply,
        })
    }

    /// The tree root, required by the commands that read the tree.
    pub fn require_fs_root(&self) -> Result<&PathBuf, CliError> {
        self.fs_root.as_ref().ok_or_else(|| {
            invalid(
                "--fs-root",
                "is required (the placement tree's root directory)",
            )
        })
    }

    /// The group OU, required by every command that reads groups.
    pub fn require_group_ou(&self) -> Result<&Dn, CliError> {
        self.group_ou.as_ref().ok_or_else(|| {
            invalid(
                "--group-ou",
                "is required (the DN of the OU holding the groups)",
            )
        })
    }
}

fn model_why(err: ModelError) -> String {
    err.to_string()
}

/// `url` with its userinfo (`user:password@`) replaced, when it has one:
/// `Some(shown)` is what may be printed of it.
fn credentials_in_url(url: &str) -> Option<String> {
    let (scheme, rest) = match url.find("://") {
        Some(at) => (&url[..at + 3], &url[at + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let at = authority.rfind('@')?;
    // The rest is not shown either: its extensions can carry a password too.
    let more = if tail.is_empty() || tail == "/" {
        ""
    } else {
        "/<rest not shown>"
    };
    Some(format!(
        "{scheme}<credentials removed>@{}{more}",
        &authority[at + 1..]
    ))
}

/// Why `url` is not `ldap://HOST[:PORT]` or `ldaps://HOST[:PORT]` (a final
/// `/` allowed), if it is not. Only the scheme and the authority are ever
/// quoted: a DN, query, extension (`x-bindpw=...`) or fragment may hold a
/// secret, and the connection would use none of them anyway.
fn ldap_url_problem(url: &str) -> Option<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some("a value without ldap:// or ldaps:// (not shown: it may hold a secret); expected ldap://HOST[:PORT] or ldaps://HOST[:PORT]".into());
    };
    if !(scheme.eq_ignore_ascii_case("ldap") || scheme.eq_ignore_ascii_case("ldaps")) {
        return Some(format!(
            "the scheme {scheme:?} is not ldap or ldaps; expected ldap://HOST[:PORT] or ldaps://HOST[:PORT]"
        ));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if authority.is_empty() {
        return Some(format!(
            "{scheme}:// names no host; expected {scheme}://HOST[:PORT]"
        ));
    }
    if !(tail.is_empty() || tail == "/") {
        return Some(format!(
            "{:?}: only {scheme}://HOST[:PORT] is accepted; the DN, query, extensions or fragment after it are refused (not shown: they may hold a secret)",
            format!("{scheme}://{authority}")
        ));
    }
    None
}

fn directory_choice(common: &CommonArgs) -> Result<DirectoryChoice, CliError> {
    // Checked before anything else quotes a URL: a password pasted into one
    // must not be echoed by an error about something else.
    for url in &common.ldap_url {
        if let Some(shown) = credentials_in_url(url) {
            return Err(invalid(
                "--ldap-url",
                format!(
                    "{shown}: credentials in an LDAP URL are refused (they would show in process lists and logs); bind with --bind-dn and --bind-password-file or {PASSWORD_ENV}"
                ),
            ));
        }
    }
    let ldap_only = common.bind_dn.is_some()
        || common.bind_password_file.is_some()
        || common.sasl.is_some()
        || common.starttls
        || common.tls_ca_file.is_some()
        || common.tls_insecure;
    if let Some(path) = &common.directory {
        if !common.ldap_url.is_empty() {
            return Err(invalid(
                "--directory",
                "cannot be combined with --ldap-url: choose one directory backend",
            ));
        }
        if ldap_only {
            return Err(invalid(
                "--directory",
                "is an LDIF file; LDAP options (--bind-dn, --sasl, TLS) do not apply to it",
            ));
        }
        return Ok(DirectoryChoice::LdifFile(path.clone()));
    }
    for url in &common.ldap_url {
        if let Some(why) = ldap_url_problem(url) {
            return Err(invalid("--ldap-url", why));
        }
    }
    let gssapi = common.sasl == Some(Sasl::Gssapi);
    if gssapi && common.bind_dn.is_some() {
        return Err(invalid(
            "--sasl",
            "gssapi binds with the Kerberos ticket; drop --bind-dn",
        ));
    }
    let password = match (&common.bind_password_file, std::env::var_os(PASSWORD_ENV)) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "--bind-password-file",
                format!("and {PASSWORD_ENV} are both set; use one"),
            ))
        }
        (Some(path), None) => PasswordSource::File(path.clone()),
        (None, Some(_)) => PasswordSource::Env,
        (None, None) => PasswordSource::None,
    };
    if common.bind_dn.is_some() && password == PasswordSource::None {
        return Err(invalid(
            "--bind-dn",
            format!("needs a password from --bind-password-file or {PASSWORD_ENV}"),
        ));
    }
    if common.bind_dn.is_none() && password != PasswordSource::None && !gssapi {
        return Err(invalid(
            "--bind-dn",
            "is required when a bind password is given",
        ));
    }
    Ok(DirectoryChoice::Ldap(LdapChoice {
        urls: common.ldap_url.clone(),
        bind_dn: common.bind_dn.clone(),
        password,
        gssapi,
        starttls: common.starttls,
        tls_ca_file: common.tls_ca_file.clone(),
        tls_insecure: common.tls_insecure,
        timeout: common.timeout.unwrap_or(Duration::from_secs(30)),
    }))
}

/// Validated options of `run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Shared settings.
    pub config: Config,
    /// Group reconciliation is on (`--group-ou` given).
    pub groups: bool,
    /// Node mode, when `--app-root` is given.
    pub node: Option<NodeConfig>,
    /// Write nothing.
    pub dry_run: bool,
    /// Coalescing window.
    pub batch_window: Duration,
    /// Full resync period.
    pub resync_interval: Duration,
    /// Metrics endpoint.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Leader election; `None` with `--no-lock` (or without group reconciliation).
    pub election: Option<ElectionConfig>,
}

impl RunConfig {
    /// Validates `run`'s options.
    pub fn from_args(args: &RunArgs) -> Result<RunConfig, CliError> {
        let config = Config::from_args(&args.common, Some(&args.write))?;
        config.require_fs_root()?;
        let groups = config.group_ou.is_some();
        let node = node_config(&args.node, &config)?;
        if !groups && node.is_none() {
            return Err(invalid(
                "--group-ou",
                "or --app-root is required: run reconciles groups, configures containers, or both",
            ));
        }
        let resync_interval = args.resync_interval.unwrap_or(Duration::from_secs(600));
        if resync_interval.is_zero() {
            return Err(invalid("--resync-interval", "must be more than zero"));
        }
        let election = election_config(args, groups)?;
        Ok(RunConfig {
            config,
            groups,
            node,
            election,
            dry_run: args.dry_run,
            batch_window: args.batch_window.unwrap_or(Duration::from_millis(100)),
            resync_interval,
            metrics_addr: args.metrics_addr,
        })
    }
}

/// Group reconciliation must say whether it runs alone or elects a leader:
/// two replicas writing at once would fight over the groups.
fn election_config(args: &RunArgs, groups: bool) -> Result<Option<ElectionConfig>, CliError> {
    match (&args.zookeeper, args.no_lock) {
        (Some(_), true) => Err(invalid("--no-lock", "cannot be combined with --zookeeper")),
        (None, false) if groups => Err(invalid(
            "--zookeeper",
            "or --no-lock is required: replicas elect a writer through ZooKeeper; --no-lock runs alone",
        )),
        (None, _) => {
            if args.lock_path.is_some() || args.zookeeper_session_timeout.is_some() {
                return Err(invalid("--zookeeper", "is required by --lock-path and --zookeeper-session-timeout"));
            }
            Ok(None)
        }
        (Some(servers), false) => {
            let mut election = ElectionConfig::new(servers.clone());
            if let Some(path) = &args.lock_path {
                election.lock_path = path.clone();
            }
            if let Some(timeout) = args.zookeeper_session_timeout {
                election.session_timeout = timeout;
            }
            election.validate().map_err(|e| invalid("--zookeeper", e))?;
            Ok(Some(election))
        }
    }
}

fn node_config(args: &NodeArgs, config: &Config) -> Result<Option<NodeConfig>, CliError> {
    let Some(app_root) = &args.app_root else {
        let stray = args.hostname.is_some()
            || args.run_command.is_some()
            || args.gmsa_proids.is_some()
            || args.wait_for_group.is_some()
            || args.credential_spec_dir.is_some();
        if stray {
            return Err(invalid(
                "--app-root",
                "is required by the node options (--hostname, --run-command, ...)",
            ));
        }
        return Ok(None);
    };
    let hostname = match &args.hostname {
        Some(name) => name.clone(),
        None => machine_fqdn().ok_or_else(|| {
            invalid(
                "--hostname",
                "is required: the machine's name could not be found",
            )
        })?,
    };
    let hostname = HostName::new(&hostname).map_err(|e| invalid("--hostname", model_why(e)))?;
    let fs_root = config.require_fs_root()?.clone();
    let mut node = NodeConfig::new(fs_root, hostname, app_root);
    node.run_command = args.run_command.clone();
    node.finish_command = match &args.finish_command {
        Some(command) => command.clone(),
        None => match std::env::current_exe() {
            Ok(exe) => format!(
                "{} finish {{container_dir}}",
                shell_quote(&exe.display().to_string())
            ),
            Err(_) => node.finish_command,
        },
    };
    node.gmsa_proids = match &args.gmsa_proids {
        Some(glob) => GmsaProids::Glob(
            glob::Pattern::new(glob)
                .map_err(|e| invalid("--gmsa-proids", format!("{glob:?}: {}", e.msg)))?,
        ),
        None if config.group_ou.is_some() => GmsaProids::GroupExists,
        None => GmsaProids::None,
    };
    if node.gmsa_proids == GmsaProids::GroupExists || args.wait_for_group.is_some() {
        config.require_group_ou().map_err(|_| {
            invalid(
                "--group-ou",
                "is required to find the proids' groups (or give --gmsa-proids and no --wait-for-group)",
            )
        })?;
    }
    if let Some(dir) = &args.credential_spec_dir {
        node.credential_spec_dir = dir.clone();
    }
    node.wait_for_group = args.wait_for_group;
    if let Some(retain) = args.retain {
        node.retain = retain;
    }
    node.domain = domain_info(args)?;
    Ok(Some(node))
}

fn domain_info(args: &NodeArgs) -> Result<Option<DomainInfo>, CliError> {
    let parts = [
        &args.domain_dns_name,
        &args.domain_netbios_name,
        &args.domain_sid,
        &args.domain_guid,
    ];
    if parts.iter().all(|p| p.is_none()) && args.domain_dns_tree_name.is_none() {
        return Ok(None);
    }
    let need = |value: &Option<String>, option: &'static str| {
        value
            .clone()
            .ok_or_else(|| invalid(option, "is required with the other --domain-* options (or give none to read them from the directory)"))
    };
    let dns_name = need(&args.domain_dns_name, "--domain-dns-name")?;
    let domain = DomainInfo {
        dns_tree_name: args
            .domain_dns_tree_name
            .clone()
            .unwrap_or_else(|| dns_name.clone()),
        dns_name,
        netbios_name: need(&args.domain_netbios_name, "--domain-netbios-name")?,
        sid: need(&args.domain_sid, "--domain-sid")?,
        guid: need(&args.domain_guid, "--domain-guid")?,
    };
    domain.validate().map_err(|e| invalid("--domain-*", e))?;
    Ok(Some(domain))
}

/// The machine's fully qualified name: `hostname --fqdn`, or the kernel's
/// host name when that fails.
fn machine_fqdn() -> Option<String> {
    let fqdn = std::process::Command::new("hostname")
        .arg("--fqdn")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    fqdn.or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    })
}

/// Validated options of `check`.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Shared settings.
    pub config: Config,
    /// The proid.
    pub proid: Proid,
    /// The host DN.
    pub host_dn: Dn,
}

impl CheckConfig {
    /// Validates `check`'s options.
    pub fn from_args(args: &CheckArgs) -> Result<CheckConfig, CliError> {
        let config = Config::from_args(&args.common, None)?;
        config.require_group_ou()?;
        let proid = args
            .proid
            .as_deref()
            .ok_or_else(|| invalid("--proid", "is required"))?;
        let proid = Proid::new(proid)
            .ok_or_else(|| invalid("--proid", format!("{proid:?} is not a proid name")))?;
        let host_dn = args
            .host_dn
            .as_deref()
            .ok_or_else(|| invalid("--host-dn", "is required"))?;
        let host_dn = Dn::parse(host_dn).map_err(|e| invalid("--host-dn", model_why(e)))?;
        Ok(CheckConfig {
            config,
            proid,
            host_dn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_parser_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        file
    }

    fn plan_args(cli: Cli) -> PlanArgs {
        match cli.command {
            Command::Plan(args) => args,
            other => panic!("expected plan, got {other:?}"),
        }
    }

    // One test touches the process environment, so the precedence checks
    // live together and do not race with each other.
    #[test]
    fn config_file_then_environment_then_flags() {
        let file = write_config(
            "fs-root: /from/file\npartition: 'p*'\nmax-delete: 7\nldap-url: [ldap://a, ldap://b]\nallow-mass-delete: true\nmetrics-addr: 127.0.0.1:9\nverbose: 2\n",
        );
        let config = file.path().to_str().expect("utf-8 path").to_owned();
        let args =
            plan_args(parse(["gmsa-reconciler", "plan", "--config", &config]).expect("parse"));
        assert_eq!(args.common.fs_root, Some(PathBuf::from("/from/file")));
        assert_eq!(args.common.partition.as_deref(), Some("p*"));
        assert_eq!(args.write.max_delete, Some(7));
        assert_eq!(args.common.ldap_url, ["ldap://a", "ldap://b"]);
        assert!(args.write.allow_mass_delete);
        assert_eq!(args.common.verbose, 2);

        // SAFETY of the test: nothing else in this test binary reads GMSA_PARTITION.
        std::env::set_var("GMSA_PARTITION", "from-env");
        let args =
            plan_args(parse(["gmsa-reconciler", "plan", "--config", &config]).expect("parse"));
        assert_eq!(args.common.partition.as_deref(), Some("from-env"));
        let args = plan_args(
            parse([
                "gmsa-reconciler",
                "plan",
                "--config",
                &config,
                "--partition",
                "flag",
            ])
            .expect("parse"),
        );
        assert_eq!(args.common.partition.as_deref(), Some("flag"));
        std::env::remove_var("GMSA_PARTITION");

        let bad = write_config("no-such-option: 1\n");
        let bad_path = bad.path().to_str().expect("utf-8 path").to_owned();
        let err =
            parse(["gmsa-reconciler", "plan", "--config", &bad_path]).expect_err("unknown key");
        assert!(
            err.to_string().contains("unknown key \"no-such-option\""),
            "{err}"
        );
        assert!(err.to_string().starts_with(&bad_path), "{err}");
    }

    /// The example config is the configuration's documentation: it must
    /// name every option with its environment variable, and parse.
    #[test]
    fn the_example_config_documents_every_option() {
        let text = include_str!("../deploy/gmsa-reconciler.yml");
        let value: serde_yaml::Value = serde_yaml::from_str(text).expect("example config parses");
        assert!(value.is_null() || value.is_mapping());
        let command = Cli::command();
        for sub in command.get_subcommands() {
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if matches!(long, "help" | "version" | "config") {
                    continue;
                }
                assert!(
                    text.contains(&format!("# {long}:")),
                    "{long} is not documented"
                );
                if let Some(env) = arg.get_env() {
                    let env = env.to_string_lossy();
                    assert!(
                        text.contains(&format!("[{env}]")),
                        "{env} is not documented"
                    );
                }
            }
        }
    }

    #[test]
    fn lexical_cleaning_keeps_links_and_folds_dots() {
        let clean = |p: &str| lexically_clean(Path::new(p));
        assert_eq!(clean("/a/./b//c/"), PathBuf::from("/a/b/c"));
        assert_eq!(clean("/a/b/../c"), PathBuf::from("/a/c"));
        assert_eq!(clean("/../a"), PathBuf::from("/a"));
        assert_eq!(clean("a/../../b"), PathBuf::from("../b"));
        assert_eq!(clean("./"), PathBuf::from("."));
    }

    /// Every option whose value is a path, found from the definitions as
    /// the config file's merge finds them, comes out absolute and clean.
    #[test]
    fn every_path_option_is_made_absolute() {
        let cwd = std::env::current_dir().expect("cwd");
        let command = Cli::command();
        let mut seen = BTreeSet::new();
        for sub in command.get_subcommands() {
            for arg in sub.get_arguments().filter(|a| is_path_option(a)) {
                let mut argv = vec!["gmsa-reconciler".to_owned(), sub.get_name().to_owned()];
                match arg.get_long() {
                    Some(long) => argv.push(format!("--{long}=rel/./x/../y")),
                    None => argv.push("rel/./x/../y".to_owned()),
                }
                let matches = command
                    .clone()
                    .try_get_matches_from(&argv)
                    .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
                let (_, sub_matches) = matches.subcommand().expect("a subcommand");
                let value = sub_matches
                    .get_one::<PathBuf>(arg.get_id().as_str())
                    .expect("the value");
                assert_eq!(value, &cwd.join("rel/y"), "{argv:?}");
                seen.insert(arg.get_id().to_string());
            }
        }
        for id in [
            "config",
            "fs_root",
            "directory",
            "bind_password_file",
            "tls_ca_file",
            "app_root",
            "credential_spec_dir",
            "container_dir",
        ] {
            assert!(
                seen.contains(id),
                "{id} is not seen as a path option: {seen:?}"
            );
        }
    }

    #[test]
    fn config_file_paths_are_relative_to_its_folder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf_dir = dir.path().join("etc");
        std::fs::create_dir(&conf_dir).expect("mkdir");
        let file = conf_dir.join("gmsa.yml");
        std::fs::write(
            &file,
            "fs-root: tree\ndirectory: ../data/./d.ldif\ntls-ca-file: /abs/ca.pem\ngroup-ou: ./not-a-path\n",
        )
        .expect("write");
        let config = file.to_str().expect("utf-8 path").to_owned();
        let args =
            plan_args(parse(["gmsa-reconciler", "plan", "--config", &config]).expect("parse"));
        assert_eq!(args.common.fs_root, Some(conf_dir.join("tree")));
        assert_eq!(args.common.directory, Some(dir.path().join("data/d.ldif")));
        assert_eq!(args.common.tls_ca_file, Some(PathBuf::from("/abs/ca.pem")));
        // Not a path option: left as written.
        assert_eq!(args.common.group_ou.as_deref(), Some("./not-a-path"));
        // A flag still wins, relative to the working directory.
        let args = plan_args(
            parse([
                "gmsa-reconciler",
                "plan",
                "--config",
                &config,
                "--fs-root",
                "here",
            ])
            .expect("parse"),
        );
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(args.common.fs_root, Some(cwd.join("here")));
    }

    #[test]
    fn credentials_in_urls_are_found_and_never_shown() {
        for (url, shown) in [
            (
                "ldap://user:s3cret@dc1:389/",
                "ldap://<credentials removed>@dc1:389",
            ),
            (
                "ldap://u:s3cret@dc1/????x-bindpw=s3cret",
                "ldap://<credentials removed>@dc1/<rest not shown>",
            ),
            ("ldaps://s3cret@dc1", "ldaps://<credentials removed>@dc1"),
            ("http://a:s3cret@b@dc1", "http://<credentials removed>@dc1"),
            ("a:s3cret@dc1", "<credentials removed>@dc1"),
        ] {
            assert_eq!(credentials_in_url(url).as_deref(), Some(shown), "{url}");
        }
        for url in [
            "ldap://dc1:389",
            "ldap://dc1/dc=x?member@x",
            "ldaps://[::1]:636",
        ] {
            assert_eq!(credentials_in_url(url), None, "{url}");
        }
    }

    #[test]
    fn backend_choice_is_validated() {
        let args = |extra: &[&str]| {
            let mut argv = vec!["gmsa-reconciler", "plan"];
            argv.extend_from_slice(extra);
            let args = plan_args(parse(argv).expect("parse"));
            Config::from_args(&args.common, Some(&args.write))
        };
        assert!(matches!(
            args(&["--directory", "d.ldif"]).expect("ok").directory,
            DirectoryChoice::LdifFile(_)
        ));
        let both = args(&["--directory", "d.ldif", "--ldap-url", "ldap://x"]).expect_err("both");
        assert!(both.to_string().starts_with("--directory:"), "{both}");
        let scheme = args(&["--ldap-url", "http://x"]).expect_err("scheme");
        assert!(scheme.to_string().contains("ldap://"), "{scheme}");
        let no_pw = args(&["--ldap-url", "ldap://x", "--bind-dn", "CN=a"]).expect_err("password");
        assert!(
            no_pw.to_string().contains("--bind-password-file"),
            "{no_pw}"
        );
        let pattern = args(&["--directory", "d", "--group-pattern", "x"]).expect_err("pattern");
        assert!(
            pattern.to_string().starts_with("--group-pattern:"),
            "{pattern}"
        );
    }
}
