//! The command line: options from flags, `GMSA_*` environment variables and
//! a YAML `--config` file (precedence flag > environment > file), validated
//! into a [`Config`] the rest of the program can trust.
//!
//! The file is merged by turning each of its keys that neither a flag nor
//! the environment set into the flag it names and parsing again, so every
//! option has exactly one parser and one set of checks whatever its source.
//! A key no command knows is answered with the nearest known key.
//!
//! [`command`] is the one definition that parsing, `-h`, completions, the
//! man pages and `config` share: options grouped under [`HEADINGS`], the
//! ones a command cannot do without marked. The validators come in two
//! forms: `from_args` stops at the first problem, as a command must;
//! `validate` lists every problem, for `config`.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::election::ElectionConfig;
use crate::model::{
    host_port_problem, Dn, GroupPattern, HostName, ModelError, PartitionGlob, Proid,
};
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
    /// Explain why each host is or is not in a proid's group.
    Explain(ExplainArgs),
    /// Post the event of a container that stopped (run by its finish script).
    Finish(FinishArgs),
    /// Validate every source of options and print the effective options of a command, each with where it came from.
    #[command(
        override_usage = "gmsa-reconciler config [COMMAND] [OPTIONS of COMMAND]...",
        after_help = "COMMAND is plan, sync, run, check or explain [default: run]; the options are those COMMAND takes, with --config FILE and GMSA_* variables as it would read them. Exit 0 when valid, 1 with every problem listed when not."
    )]
    Config(ConfigArgs),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
}

/// Options of `config`: the command to check, then that command's options,
/// taken as given and checked one by one (see `config_check`).
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The command whose options are checked, then its options.
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 0..
    )]
    pub args: Vec<OsString>,
}

/// Options of `completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell the script is for.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// The shells `completions` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    /// Bash.
    Bash,
    /// Zsh.
    Zsh,
    /// Fish.
    Fish,
}

impl CompletionShell {
    /// Writes the completion script of `command` for this shell.
    pub fn generate(
        self,
        command: &mut clap::Command,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<()> {
        let shell = match self {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        };
        let mut script = Vec::new();
        clap_complete::generate(shell, command, "gmsa-reconciler", &mut script);
        if self == CompletionShell::Bash {
            // The bash generator spells the state of a subcommand of a
            // hyphenated program two ways: the loop that walks the words
            // sets `gmsa__reconciler__subcmd__plan`, the arms that list
            // its options test `gmsa__subcmd__reconciler__subcmd__plan`,
            // so no option after a subcommand would ever complete. The
            // arms are respelled the loop's way.
            let text = String::from_utf8_lossy(&script)
                .replace("gmsa__subcmd__reconciler", "gmsa__reconciler");
            script = text.into_bytes();
        }
        out.write_all(&script)
    }
}

/// Options of `finish`.
#[derive(Debug, Args)]
pub struct FinishArgs {
    /// The container directory, `<app-root>/apps/<unique name>`.
    #[arg(value_parser = AbsolutePath)]
    pub container_dir: PathBuf,
    /// More log output (repeatable).
    #[arg(short, long, action = ArgAction::Count, help_heading = "Output")]
    pub verbose: u8,
    /// Less log output (repeatable).
    #[arg(short, long, action = ArgAction::Count, help_heading = "Output")]
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
    #[arg(long, env = "GMSA_EXIT_CODE", help_heading = "Output")]
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
    #[command(flatten)]
    #[allow(missing_docs)]
    pub audit: AuditArgs,
    /// Print what would be done; write nothing.
    #[arg(long, env = "GMSA_DRY_RUN", help_heading = "Safety")]
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
    #[command(flatten)]
    #[allow(missing_docs)]
    pub audit: AuditArgs,
    /// Print what would be done; write nothing.
    #[arg(long, env = "GMSA_DRY_RUN", help_heading = "Safety")]
    pub dry_run: bool,
    /// How long to gather changes before reconciling them [default: 100ms].
    #[arg(long, env = "GMSA_BATCH_WINDOW", value_parser = parse_duration, help_heading = "Daemon")]
    pub batch_window: Option<Duration>,
    /// Full resync period [default: 10m].
    #[arg(long, env = "GMSA_RESYNC_INTERVAL", value_parser = parse_duration, help_heading = "Daemon")]
    pub resync_interval: Option<Duration>,
    /// Serve Prometheus metrics, /healthz and /readyz on HOST:PORT.
    #[arg(long, env = "GMSA_METRICS_ADDR", help_heading = "Daemon")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// ZooKeeper servers (HOST:PORT,...) for leader election between replicas.
    #[arg(long, env = "GMSA_ZOOKEEPER", help_heading = "Replicas")]
    pub zookeeper: Option<String>,
    /// ZooKeeper path of the replicas' lock [default: /election/gmsa-reconciler].
    #[arg(long, env = "GMSA_LOCK_PATH", help_heading = "Replicas")]
    pub lock_path: Option<String>,
    /// ZooKeeper session timeout: how long a dead leader holds the lock [default: 10s].
    #[arg(long, env = "GMSA_ZOOKEEPER_SESSION_TIMEOUT", value_parser = parse_duration, help_heading = "Replicas")]
    pub zookeeper_session_timeout: Option<Duration>,
    /// Run alone, without leader election (only one replica may run).
    #[arg(long, env = "GMSA_NO_LOCK", help_heading = "Replicas")]
    pub no_lock: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub node: NodeArgs,
}

/// Options of node mode (`run --app-root`).
#[derive(Debug, Args)]
#[command(next_help_heading = "Node mode")]
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
    // The line above is `--help` text, where `<app-root>` is not HTML.
    #[allow(rustdoc::invalid_html_tags)]
    #[arg(long, env = "GMSA_CREDENTIAL_SPEC_DIR", value_parser = AbsolutePath)]
    pub credential_spec_dir: Option<PathBuf>,
    /// Before configuring a gMSA proid's instance, wait up to this long for this host to be in its group.
    #[arg(long, env = "GMSA_WAIT_FOR_GROUP", value_parser = parse_duration)]
    pub wait_for_group: Option<Duration>,
    /// The LDAP server --wait-for-group reads, with --ldap-url's bind and TLS settings [default: this host's DC, nt.dc of servers/<--hostname>, with --ldap-url's scheme].
    #[arg(long, env = "GMSA_CHECK_LDAP_URL")]
    pub check_ldap_url: Option<String>,
    /// Command run (by /bin/sh) each time the wait sees this host join a proid's group, before that proid's instances are configured, e.g. to renew Kerberos tickets; placeholders {proid}, {group}, {hostname}; a failure aborts them with `join-hook`. Needs --wait-for-group.
    #[arg(long, env = "GMSA_ON_JOIN_COMMAND")]
    pub on_join_command: Option<String>,
    /// Run --on-join-command also for groups this host is already in when the node starts.
    #[arg(long, env = "GMSA_ON_JOIN_AT_STARTUP")]
    pub on_join_at_startup: bool,
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
    #[arg(long, env = "GMSA_PROID", help_heading = "Input")]
    pub proid: Option<String>,
    /// The host's computer DN.
    #[arg(long, env = "GMSA_HOST_DN", help_heading = "Input")]
    pub host_dn: Option<String>,
    /// Check this host instead: its DN and domain controller come from servers/<--hostname> under --fs-root, and the membership is read from that controller (unless --ldap-url names one).
    #[arg(
        long = "self",
        env = "GMSA_SELF",
        conflicts_with = "host_dn",
        help_heading = "Input"
    )]
    pub this_host: bool,
    /// This host's name in servers/, with --self [default: the machine's FQDN].
    #[arg(long, env = "GMSA_HOSTNAME", help_heading = "Input")]
    pub hostname: Option<String>,
}

/// Options of `explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub write: WriteArgs,
    /// The proid whose group is explained.
    #[arg(long, env = "GMSA_PROID", help_heading = "Input")]
    pub proid: Option<String>,
    /// Only this host (its name in servers/ and placement/).
    #[arg(long, env = "GMSA_HOST", help_heading = "Input")]
    pub host: Option<String>,
}

/// Options every command shares.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// YAML file of options: keys are long option names without `--`.
    #[arg(long, env = "GMSA_CONFIG", value_parser = AbsolutePath, help_heading = "Input")]
    pub config: Option<PathBuf>,
    /// Root of the placement tree (holds .modified, servers/, placement/).
    #[arg(long, env = "GMSA_FS_ROOT", value_parser = AbsolutePath, help_heading = "Input")]
    pub fs_root: Option<PathBuf>,
    /// Shell glob of the partitions whose servers are managed [default: *].
    #[arg(long, env = "GMSA_PARTITION", help_heading = "Input")]
    pub partition: Option<String>,
    /// DN of the OU holding the proids' groups.
    #[arg(long, env = "GMSA_GROUP_OU", help_heading = "Directory")]
    pub group_ou: Option<String>,
    /// sAMAccountName pattern of a proid's group; `{}` is the proid [default: {}-gmsa-hosts].
    #[arg(long, env = "GMSA_GROUP_PATTERN", help_heading = "Directory")]
    pub group_pattern: Option<String>,
    /// DN of a subtree holding the hosts' computer objects (repeatable): its members in the groups are managed even when no server file names them [default: none].
    #[arg(long, env = "GMSA_HOST_OU", action = ArgAction::Append, help_heading = "Directory")]
    pub host_ou: Vec<String>,
    /// LDIF content file used as the directory (instead of LDAP).
    #[arg(long, env = "GMSA_DIRECTORY", value_parser = AbsolutePath, help_heading = "Directory")]
    pub directory: Option<PathBuf>,
    /// LDAP server URL; repeat for failover, tried in order [default: ldap://<nt.dc> of the servers].
    #[arg(long, env = "GMSA_LDAP_URL", value_delimiter = ',', action = ArgAction::Append, help_heading = "Directory")]
    pub ldap_url: Vec<String>,
    /// DN to bind as (simple bind); the password comes from --bind-password-file or GMSA_BIND_PASSWORD.
    #[arg(long, env = "GMSA_BIND_DN", help_heading = "Directory")]
    pub bind_dn: Option<String>,
    /// File holding the bind password.
    #[arg(long, env = "GMSA_BIND_PASSWORD_FILE", value_parser = AbsolutePath, help_heading = "Directory")]
    pub bind_password_file: Option<PathBuf>,
    /// SASL mechanism instead of a simple bind (gssapi; needs TLS).
    #[arg(long, env = "GMSA_SASL", value_enum, help_heading = "Directory")]
    pub sasl: Option<Sasl>,
    /// Upgrade ldap:// connections with StartTLS.
    #[arg(long, env = "GMSA_STARTTLS", help_heading = "Directory")]
    pub starttls: bool,
    /// PEM file of CA certificates to trust besides the system store.
    #[arg(long, env = "GMSA_TLS_CA_FILE", value_parser = AbsolutePath, help_heading = "Directory")]
    pub tls_ca_file: Option<PathBuf>,
    /// Do not verify the server's certificate (unsafe; for tests only).
    #[arg(long, env = "GMSA_TLS_INSECURE", help_heading = "Directory")]
    pub tls_insecure: bool,
    /// Timeout of every directory operation [default: 30s].
    #[arg(long, env = "GMSA_TIMEOUT", value_parser = parse_duration, help_heading = "Directory")]
    pub timeout: Option<Duration>,
    /// Read a group's members this many values at a time (`member;range=...`), for servers that range only on request [default: as the server sends them; AD ranges at 1500].
    #[arg(long, env = "GMSA_RANGE_WINDOW", value_parser = clap::value_parser!(u32).range(1..), help_heading = "Directory")]
    pub range_window: Option<u32>,
    /// Output format [default: ldif].
    #[arg(long, env = "GMSA_FORMAT", value_enum, help_heading = "Output")]
    pub format: Option<FormatArg>,
    /// Log format on standard error [default: text].
    #[arg(long, env = "GMSA_LOG_FORMAT", value_enum, help_heading = "Output")]
    pub log_format: Option<LogFormat>,
    /// More log output (repeatable).
    #[arg(short, long, action = ArgAction::Count, help_heading = "Output")]
    pub verbose: u8,
    /// Less log output (repeatable).
    #[arg(short, long, action = ArgAction::Count, help_heading = "Output")]
    pub quiet: u8,
}

/// Options of the commands that write.
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// Refuse a plan deleting more values than this [default: 500].
    #[arg(long, env = "GMSA_MAX_DELETE", help_heading = "Safety")]
    pub max_delete: Option<usize>,
    /// Refuse a plan deleting more than this percentage of the managed members (beyond 10 values) [default: 20].
    #[arg(long, env = "GMSA_MAX_DELETE_PERCENT", value_parser = clap::value_parser!(u32).range(0..=100), help_heading = "Safety")]
    pub max_delete_percent: Option<u32>,
    /// Apply deletions whatever their number.
    #[arg(long, env = "GMSA_ALLOW_MASS_DELETE", help_heading = "Safety")]
    pub allow_mass_delete: bool,
    /// Values per Modify request at most [default: 1000].
    #[arg(long, env = "GMSA_MAX_VALUES_PER_MODIFY", value_parser = clap::value_parser!(u32).range(1..), help_heading = "Directory")]
    pub max_values_per_modify: Option<u32>,
}

/// The audit option of the commands that apply changes (`sync` and `run`;
/// `plan` and `explain` write nothing to record).
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Append every applied membership change to FILE as a JSON line (created 0600).
    #[arg(long, env = "GMSA_AUDIT_LOG", value_parser = AbsolutePath, value_name = "FILE", help_heading = "Output")]
    pub audit_log: Option<PathBuf>,
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
/// here (see `file_args`), so they arrive absolute.
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
pub(crate) fn is_path_option(arg: &clap::Arg) -> bool {
    arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>()
}

/// Options a command cannot do without, marked in its `-h`. They cannot be
/// clap's `required`: a value may still come from the config file, which is
/// merged after the first parse.
const REQUIRED: &[(&str, &str, &str)] = &[
    ("plan", "fs_root", "[required]"),
    ("plan", "group_ou", "[required]"),
    ("sync", "fs_root", "[required]"),
    ("sync", "group_ou", "[required]"),
    ("run", "fs_root", "[required]"),
    ("run", "group_ou", "[required unless --app-root]"),
    ("run", "app_root", "[required unless --group-ou]"),
    (
        "run",
        "zookeeper",
        "[required with --group-ou, unless --no-lock]",
    ),
    (
        "run",
        "no_lock",
        "[required with --group-ou, unless --zookeeper]",
    ),
    ("check", "group_ou", "[required]"),
    ("check", "proid", "[required]"),
    ("check", "host_dn", "[required unless --self]"),
    ("explain", "fs_root", "[required]"),
    ("explain", "group_ou", "[required]"),
    ("explain", "proid", "[required]"),
];

/// The headings of `-h`, in order.
pub const HEADINGS: &[&str] = &[
    "Input",
    "Directory",
    "Safety",
    "Output",
    "Daemon",
    "Replicas",
    "Node mode",
];

/// The command-line definition: the derived one with the required options
/// marked and the options in the order of [`HEADINGS`]. Parsing, `-h`,
/// completions, the man page and `config` all use this one.
pub fn command() -> clap::Command {
    let mut command = Cli::command();
    for &(sub, id, mark) in REQUIRED {
        command = command.mut_subcommand(sub, |s| {
            s.mut_arg(id, |arg| {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                arg.help(format!("{help} {mark}"))
            })
        });
    }
    let subs: Vec<String> = command
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for sub in subs {
        command = command.mut_subcommand(sub, order_by_heading);
    }
    command
}

/// clap lists headings in the order their first option was defined, and
/// the shared options (Input, Directory, Output) are defined before the
/// write options (Safety). Re-adding each option with a heading in heading
/// order (`mut_arg` moves an option to the end) puts them in that order;
/// within a heading the display order is kept. Options without a heading
/// (help, version, positionals) are not moved.
fn order_by_heading(sub: clap::Command) -> clap::Command {
    let mut ids: Vec<(usize, usize, clap::Id)> = sub
        .get_arguments()
        .filter_map(|a| {
            let rank = HEADINGS
                .iter()
                .position(|h| Some(*h) == a.get_help_heading())?;
            Some((rank, a.get_display_order(), a.get_id().clone()))
        })
        .collect();
    ids.sort();
    ids.into_iter()
        .fold(sub, |sub, (_, _, id)| sub.mut_arg(id, |a| a))
}

/// The log format asked for, found before (and whether or not) the options
/// parse, so that even a usage error is reported in it: the last
/// `--log-format` on the command line, else `GMSA_LOG_FORMAT`, else the
/// config file's `log-format` key. Anything unreadable counts as text.
pub fn requested_log_format(args: &[OsString]) -> LogFormat {
    let value_of = |name: &str| {
        let mut found = None;
        let mut args = args.iter().filter_map(|a| a.to_str());
        while let Some(arg) = args.next() {
            if arg == "--" {
                break;
            }
            if arg == format!("--{name}") {
                found = args.next().map(str::to_owned);
            } else if let Some(value) = arg.strip_prefix(&format!("--{name}=")) {
                found = Some(value.to_owned());
            }
        }
        found
    };
    let parse = |text: &str| LogFormat::from_str(text.trim(), true).ok();
    if let Some(format) = value_of("log-format").as_deref().and_then(parse) {
        return format;
    }
    let env = std::env::var("GMSA_LOG_FORMAT").ok();
    if let Some(format) = env.as_deref().and_then(parse) {
        return format;
    }
    let config = value_of("config").or_else(|| std::env::var("GMSA_CONFIG").ok());
    let from_file = config.and_then(|path| {
        let path = absolute_from_cwd(Path::new(&path)).ok()?;
        read_config_file(&path)
            .ok()?
            .into_iter()
            .find(|(key, _)| key == "log-format")
            .and_then(|(_, value)| value.as_str().and_then(parse))
    });
    from_file.unwrap_or_default()
}

/// Parses the command line, the environment and the config file.
pub fn parse<I, T>(args: I) -> Result<Cli, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let command = command();
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
/// the environment set. The first problem stops the merge; `config` lists
/// them all (see `config_check`).
fn file_args(
    path: &Path,
    all: &clap::Command,
    command: &clap::Command,
    matches: &clap::ArgMatches,
) -> Result<Vec<OsString>, CliError> {
    let mut out = Vec::new();
    for (key, value) in read_config_file(path)? {
        let Some(arg) = file_key_arg(path, &key, all, command)? else {
            continue;
        };
        if matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let folder = path.parent().unwrap_or(Path::new("/"));
        let value = file_value(arg, &value, folder).map_err(|why| config_file_error(path, why))?;
        out.extend(value.into_args(arg));
    }
    Ok(out)
}

pub(crate) fn config_file_error(path: &Path, why: String) -> CliError {
    CliError::ConfigFile {
        path: path.display().to_string(),
        why,
    }
}

/// The keys of a config file, in its order, with their values. The file is
/// the operator's, not the mirror's: a symlink to it is followed, as
/// mounted configuration often is one.
pub(crate) fn read_config_file(path: &Path) -> Result<Vec<(String, serde_yaml::Value)>, CliError> {
    let err = |why: String| config_file_error(path, why);
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| err(format!("not valid YAML: {e}")))?;
    let map = match value {
        serde_yaml::Value::Mapping(map) => map,
        serde_yaml::Value::Null => return Ok(Vec::new()),
        _ => return Err(err("must be a mapping of option names to values".into())),
    };
    let mut keys = Vec::new();
    for (key, value) in map {
        let Some(key) = key.as_str() else {
            return Err(err(format!("key {key:?} is not a string")));
        };
        keys.push((key.to_owned(), value));
    }
    Ok(keys)
}

/// The option of `command` a config-file key names: `None` for a key of
/// another command (one file serves them all), an error for a key no
/// command knows, with the nearest known key suggested.
pub(crate) fn file_key_arg<'a>(
    path: &Path,
    key: &str,
    all: &clap::Command,
    command: &'a clap::Command,
) -> Result<Option<&'a clap::Arg>, CliError> {
    let err = |why: String| config_file_error(path, why);
    if key == "config" {
        return Err(err("a config file cannot name another config file".into()));
    }
    if let Some(arg) = command.get_arguments().find(|a| a.get_long() == Some(key)) {
        return Ok(Some(arg));
    }
    let known = file_keys(all);
    if known.iter().any(|k| k == key) {
        return Ok(None);
    }
    let why = match nearest_key(key, &known) {
        Some(near) => format!("unknown key {key:?}; did you mean {near:?}?"),
        None => format!("unknown key {key:?}"),
    };
    Err(err(why))
}

/// Every key a config file may hold: the long options of all commands.
fn file_keys(all: &clap::Command) -> Vec<String> {
    let mut keys: Vec<String> = all
        .get_subcommands()
        .flat_map(|s| s.get_arguments())
        .filter_map(|a| a.get_long())
        .filter(|long| !matches!(*long, "help" | "version" | "config"))
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The known key closest to `key` by edit distance, when it is close enough
/// to be a typo (at most a third of the key's length, and at most 3 edits);
/// `_` for `-` counts as no edit, since YAML habits differ.
fn nearest_key<'a>(key: &str, known: &'a [String]) -> Option<&'a str> {
    let key = key.replace('_', "-").to_ascii_lowercase();
    let limit = (key.chars().count() / 3).clamp(1, 3);
    known
        .iter()
        .map(|k| (strsim::levenshtein(&key, k), k))
        .filter(|(distance, _)| *distance <= limit)
        .min()
        .map(|(_, k)| k.as_str())
}

/// A config-file value, checked against the kind of option it is for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FileValue {
    /// An on/off option.
    Flag(bool),
    /// A repeatable option (`verbose: 2`).
    Count(u64),
    /// One or more values, paths already resolved against the file's folder.
    Values(Vec<OsString>),
}

impl FileValue {
    /// The flags that give the option this value.
    pub(crate) fn into_args(self, arg: &clap::Arg) -> Vec<OsString> {
        let flag = format!("--{}", arg.get_long().unwrap_or_default());
        match self {
            FileValue::Flag(on) => on.then(|| flag.into()).into_iter().collect(),
            FileValue::Count(n) => (0..n).map(|_| OsString::from(&flag)).collect(),
            FileValue::Values(values) => values
                .into_iter()
                .map(|v| {
                    let mut arg = OsString::from(format!("{flag}="));
                    arg.push(v);
                    arg
                })
                .collect(),
        }
    }
}

/// Converts one config-file value for `arg`; the error says what is wrong
/// with the key.
pub(crate) fn file_value(
    arg: &clap::Arg,
    value: &serde_yaml::Value,
    folder: &Path,
) -> Result<FileValue, String> {
    let key = arg.get_long().unwrap_or_default();
    let bad = |what: &str| format!("key {key:?}: {what}");
    match arg.get_action() {
        ArgAction::SetTrue => match value {
            serde_yaml::Value::Bool(on) => Ok(FileValue::Flag(*on)),
            _ => Err(bad("must be true or false")),
        },
        ArgAction::Count => value
            .as_u64()
            .map(FileValue::Count)
            .ok_or_else(|| bad("must be a count")),
        _ => {
            let items = match value {
                serde_yaml::Value::Sequence(items) => items.clone(),
                other => vec![other.clone()],
            };
            // A second value would silently replace the first.
            if items.len() > 1 && matches!(arg.get_action(), ArgAction::Set) {
                return Err(bad("takes one value, not a list"));
            }
            let mut values = Vec::new();
            for item in items {
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
                    values.push(lexically_clean(&folder.join(&text)).into_os_string());
                } else {
                    values.push(text.into());
                }
            }
            Ok(FileValue::Values(values))
        }
    }
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
    /// Values of `member` asked for per read, when forced.
    pub range_window: Option<u32>,
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
    /// Subtrees whose members are managed (`--host-ou`).
    pub host_ous: Vec<Dn>,
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
    /// Where applied changes are appended (`--audit-log` of `sync` and `run`).
    pub audit_log: Option<PathBuf>,
}

/// Log settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSettings {
    /// Text or JSON lines.
    pub format: LogFormat,
    /// `-v` count minus `-q` count.
    pub verbosity: i8,
}

/// Every problem found in a set of options, in the order they were found.
pub type Problems = Vec<CliError>;

/// The value of a check, with its problem (if any) kept in `problems`.
fn keep<T>(problems: &mut Problems, result: Result<T, CliError>) -> Option<T> {
    result.map_err(|e| problems.push(e)).ok()
}

/// The first problem: what the commands stop on.
fn first(mut problems: Problems) -> CliError {
    if problems.is_empty() {
        panic!("BUG: a validation failed without a problem");
    }
    problems.swap_remove(0)
}

impl Config {
    /// Validates the shared options (and the write options when given).
    pub fn from_args(common: &CommonArgs, write: Option<&WriteArgs>) -> Result<Config, CliError> {
        Config::validate(common, write).map_err(first)
    }

    /// Validates the shared options (and the write options when given),
    /// listing every problem of the options that can be checked apart.
    pub fn validate(common: &CommonArgs, write: Option<&WriteArgs>) -> Result<Config, Problems> {
        let mut problems = Problems::new();
        let partition = keep(
            &mut problems,
            PartitionGlob::parse(common.partition.as_deref().unwrap_or("*"))
                .map_err(|e| invalid("--partition", model_why(e))),
        );
        let group_ou = keep(
            &mut problems,
            common
                .group_ou
                .as_deref()
                .map(Dn::parse)
                .transpose()
                .map_err(|e| invalid("--group-ou", model_why(e))),
        );
        let pattern = keep(
            &mut problems,
            GroupPattern::parse(common.group_pattern.as_deref().unwrap_or("{}-gmsa-hosts"))
                .map_err(|e| invalid("--group-pattern", model_why(e))),
        );
        let host_ous = keep(&mut problems, host_ous(&common.host_ou));
        let directory = keep(&mut problems, directory_choice(common));
        let (Some(partition), Some(group_ou), Some(pattern), Some(host_ous), Some(directory)) =
            (partition, group_ou, pattern, host_ous, directory)
        else {
            return Err(problems);
        };
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
            host_ous,
            directory,
            format,
            log: LogSettings {
                format: common.log_format.unwrap_or_default(),
                verbosity: common.verbose as i8 - common.quiet as i8,
            },
            guard,
            apply,
            audit_log: None,
        })
    }

    /// These settings with `sync`'s or `run`'s `--audit-log`.
    pub fn with_audit(self, audit: &AuditArgs) -> Config {
        Config {
            audit_log: audit.audit_log.clone(),
            ..self
        }
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

/// `--host-ou` values as DNs. The root DN is refused: it would make every
/// member of every group the reconciler's to delete.
fn host_ous(values: &[String]) -> Result<Vec<Dn>, CliError> {
    values
        .iter()
        .map(|value| {
            let dn = Dn::parse(value).map_err(|e| invalid("--host-ou", model_why(e)))?;
            if dn.normalised().is_empty() {
                return Err(invalid(
                    "--host-ou",
                    "the root DN would manage every member of every group; name the OU of the hosts' computer objects",
                ));
            }
            Ok(dn)
        })
        .collect()
}

fn model_why(err: ModelError) -> String {
    err.to_string()
}

/// The options whose values are server URLs: what is shown of them (by
/// `config`, in errors) goes through [`shown_url`], whatever their source.
const URL_OPTIONS: &[&str] = &["ldap-url", "check-ldap-url"];

/// Whether `arg` takes a server URL, whose value is shown only through
/// [`shown_url`].
pub(crate) fn is_url_option(arg: &clap::Arg) -> bool {
    arg.get_long()
        .is_some_and(|long| URL_OPTIONS.contains(&long))
}

/// What may be printed of the URL `url`: its scheme and `HOST[:PORT]`, with
/// userinfo (`user:password@`) replaced, an address that is not `HOST[:PORT]`
/// replaced, and anything after the address (DN, query, extensions such as
/// `x-bindpw=`, fragment) replaced: each of those may hold a secret.
pub(crate) fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not shown: not a scheme://HOST[:PORT] URL>".to_owned();
    };
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    let scheme = if scheme_ok {
        scheme
    } else {
        "<scheme not shown>"
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (credentials, address) = match authority.rfind('@') {
        Some(at) => ("<credentials removed>@", &authority[at + 1..]),
        None => ("", authority),
    };
    let address = match host_port_problem(address) {
        None => address,
        Some(_) => "<address not shown>",
    };
    let more = if tail.is_empty() || tail == "/" {
        ""
    } else {
        "/<rest not shown>"
    };
    format!("{scheme}://{credentials}{address}{more}")
}

/// `url` as [`shown_url`] shows it, when it holds userinfo
/// (`user:password@`), which is refused.
pub(crate) fn credentials_in_url(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest[..authority_end].contains('@').then(|| shown_url(url))
}

/// Why `url` is not `ldap://HOST[:PORT]` or `ldaps://HOST[:PORT]` (a final
/// `/` allowed), if it is not, the address checked by [`host_port_problem`]
/// as every server address is. Only what [`shown_url`] shows is ever
/// quoted: a DN, query, extension (`x-bindpw=...`), fragment or mistyped
/// address may hold a secret, and the connection would use none of them.
fn ldap_url_problem(url: &str) -> Option<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some("a value without ldap:// or ldaps:// (not shown: it may hold a secret); expected ldap://HOST[:PORT] or ldaps://HOST[:PORT]".into());
    };
    if !(scheme.eq_ignore_ascii_case("ldap") || scheme.eq_ignore_ascii_case("ldaps")) {
        return Some(format!(
            "{}: the scheme is not ldap or ldaps; expected ldap://HOST[:PORT] or ldaps://HOST[:PORT]",
            shown_url(url)
        ));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if let Some(why) = host_port_problem(authority) {
        return Some(format!(
            "{}: {why} (not shown: it may hold a secret); expected {scheme}://HOST[:PORT], PORT from 1 to 65535",
            shown_url(url)
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
        || common.tls_insecure
        || common.range_window.is_some();
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
                "is an LDIF file; LDAP options (--bind-dn, --sasl, TLS, --range-window) do not apply to it",
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
        range_window: common.range_window,
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
        RunConfig::validate(args).map_err(first)
    }

    /// Validates `run`'s options, listing every problem of the options that
    /// can be checked apart (node mode is checked once the shared options
    /// are valid: it depends on them).
    pub fn validate(args: &RunArgs) -> Result<RunConfig, Problems> {
        let mut problems = Problems::new();
        let config = match Config::validate(&args.common, Some(&args.write)) {
            Ok(config) => Some(config.with_audit(&args.audit)),
            Err(mut p) => {
                problems.append(&mut p);
                None
            }
        };
        if args.common.fs_root.is_none() {
            problems.push(invalid(
                "--fs-root",
                "is required (the placement tree's root directory)",
            ));
        }
        let groups = args.common.group_ou.is_some();
        let node = config
            .as_ref()
            .and_then(|config| keep(&mut problems, node_config(&args.node, config)));
        if !groups && args.node.app_root.is_none() {
            problems.push(invalid(
                "--group-ou",
                "or --app-root is required: run reconciles groups, configures containers, or both",
            ));
        }
        let resync_interval = args.resync_interval.unwrap_or(Duration::from_secs(600));
        if resync_interval.is_zero() {
            problems.push(invalid("--resync-interval", "must be more than zero"));
        }
        let election = keep(&mut problems, election_config(args, groups));
        let (Some(config), Some(node), Some(election), true) =
            (config, node, election, problems.is_empty())
        else {
            return Err(problems);
        };
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
            || args.on_join_command.is_some()
            || args.on_join_at_startup
            || args.check_ldap_url.is_some()
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
    node.group_pattern = config.pattern.clone();
    node.check_ldap_url = match &args.check_ldap_url {
        None => None,
        Some(url) => {
            if let Some(shown) = credentials_in_url(url) {
                return Err(invalid(
                    "--check-ldap-url",
                    format!("{shown}: credentials in an LDAP URL are refused; the bind of --ldap-url is used"),
                ));
            }
            if let Some(problem) = ldap_url_problem(url) {
                return Err(invalid("--check-ldap-url", problem));
            }
            if args.wait_for_group.is_none() {
                return Err(invalid(
                    "--check-ldap-url",
                    "needs --wait-for-group (it is the server that wait reads)",
                ));
            }
            if matches!(config.directory, DirectoryChoice::LdifFile(_)) {
                return Err(invalid(
                    "--check-ldap-url",
                    "needs LDAP: with --directory the wait reads that file",
                ));
            }
            Some(url.clone())
        }
    };
    node.join_hook = match (&args.on_join_command, args.on_join_at_startup) {
        (None, true) => {
            return Err(invalid(
                "--on-join-at-startup",
                "needs --on-join-command (the command it runs)",
            ))
        }
        (None, false) => None,
        (Some(_), _) if args.wait_for_group.is_none() => {
            return Err(invalid(
                "--on-join-command",
                "needs --wait-for-group: a join is seen by that wait, before the instances are configured",
            ))
        }
        (Some(command), at_startup) => {
            crate::node::script::Template::parse(command, crate::node::JOIN_PLACEHOLDERS)
                .map_err(|e| invalid("--on-join-command", e))?;
            Some(crate::node::JoinHook {
                command: command.clone(),
                at_startup,
            })
        }
    };
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

/// This replica's name in audit records: `--hostname` when given, else the
/// machine's fully qualified name.
pub fn replica_name(hostname: Option<&str>) -> String {
    match hostname {
        Some(name) => name.to_owned(),
        None => machine_fqdn().unwrap_or_else(|| "unknown".to_owned()),
    }
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
    /// Whose membership is checked.
    pub host: CheckHost,
}

/// The host `check` asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckHost {
    /// A computer DN given on the command line (`--host-dn`).
    Dn(Dn),
    /// This host (`--self`): its DN and domain controller are read from
    /// `servers/<name>` when the check runs.
    This(HostName),
}

impl CheckConfig {
    /// Validates `check`'s options.
    pub fn from_args(args: &CheckArgs) -> Result<CheckConfig, CliError> {
        CheckConfig::validate(args).map_err(first)
    }

    /// Validates `check`'s options, listing every problem.
    pub fn validate(args: &CheckArgs) -> Result<CheckConfig, Problems> {
        let mut problems = Problems::new();
        let config = match Config::validate(&args.common, None) {
            Ok(config) => {
                let mut usable = keep(&mut problems, config.require_group_ou().map(|_| ()));
                if args.this_host && config.require_fs_root().is_err() {
                    problems.push(invalid(
                        "--fs-root",
                        "is required by --self (this host's server file is read from it)",
                    ));
                    usable = None;
                }
                usable.map(|()| config)
            }
            Err(mut p) => {
                problems.append(&mut p);
                None
            }
        };
        let proid = keep(&mut problems, required_proid(args.proid.as_deref()));
        let host = if args.this_host {
            let name = match &args.hostname {
                Some(name) => Ok(name.clone()),
                None => machine_fqdn().ok_or_else(|| {
                    invalid(
                        "--hostname",
                        "is required: the machine's name could not be found",
                    )
                }),
            };
            keep(
                &mut problems,
                name.and_then(|name| {
                    HostName::new(&name)
                        .map(CheckHost::This)
                        .map_err(|e| invalid("--hostname", model_why(e)))
                }),
            )
        } else {
            keep(
                &mut problems,
                args.host_dn
                    .as_deref()
                    .ok_or_else(|| invalid("--host-dn", "or --self is required"))
                    .and_then(|dn| {
                        Dn::parse(dn)
                            .map(CheckHost::Dn)
                            .map_err(|e| invalid("--host-dn", model_why(e)))
                    }),
            )
        };
        let (Some(config), Some(proid), Some(host)) = (config, proid, host) else {
            return Err(problems);
        };
        Ok(CheckConfig {
            config,
            proid,
            host,
        })
    }
}

/// `--proid`, which `check` and `explain` require.
fn required_proid(proid: Option<&str>) -> Result<Proid, CliError> {
    let proid = proid.ok_or_else(|| invalid("--proid", "is required"))?;
    Proid::new(proid).ok_or_else(|| invalid("--proid", format!("{proid:?} is not a proid name")))
}

/// Validated options of `explain`.
#[derive(Debug, Clone)]
pub struct ExplainConfig {
    /// Shared settings (the guard's among them: `explain` judges deletions
    /// as `sync` would).
    pub config: Config,
    /// The proid.
    pub proid: Proid,
    /// Only this host, when given.
    pub host: Option<HostName>,
}

impl ExplainConfig {
    /// Validates `explain`'s options: the first problem.
    pub fn from_args(args: &ExplainArgs) -> Result<ExplainConfig, CliError> {
        ExplainConfig::validate(args).map_err(first)
    }

    /// Validates `explain`'s options, every problem listed.
    pub fn validate(args: &ExplainArgs) -> Result<ExplainConfig, Problems> {
        let mut problems = Problems::new();
        let config = match Config::validate(&args.common, Some(&args.write)) {
            Ok(config) => {
                let required = config.require_fs_root().and(config.require_group_ou());
                keep(&mut problems, required.map(|_| ())).map(|()| config)
            }
            Err(mut p) => {
                problems.append(&mut p);
                None
            }
        };
        let proid = keep(&mut problems, required_proid(args.proid.as_deref()));
        let host = keep(
            &mut problems,
            args.host
                .as_deref()
                .map(HostName::new)
                .transpose()
                .map_err(|e| invalid("--host", model_why(e))),
        );
        let (Some(config), Some(proid), Some(host)) = (config, proid, host) else {
            return Err(problems);
        };
        Ok(ExplainConfig {
            config,
            proid,
            host,
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
        command().debug_assert();
    }

    /// `-h` groups options under these headings; an option without one
    /// would be listed apart, under clap's "Options".
    #[test]
    fn every_option_has_a_documented_heading() {
        for sub in command().get_subcommands() {
            for arg in sub.get_arguments().filter(|a| a.get_long().is_some()) {
                let long = arg.get_long().unwrap_or_default();
                if matches!(long, "help" | "version") {
                    continue;
                }
                let heading = arg.get_help_heading();
                assert!(
                    heading.is_some_and(|h| HEADINGS.contains(&h)),
                    "{} --{long}: heading {heading:?}",
                    sub.get_name()
                );
            }
        }
    }

    #[test]
    fn every_required_mark_names_an_option() {
        let command = Cli::command();
        for &(sub, id, _) in REQUIRED {
            let sub = command.find_subcommand(sub).expect("subcommand");
            assert!(sub.get_arguments().any(|a| a.get_id() == id), "{id}");
        }
    }

    #[test]
    fn the_nearest_key_is_a_likely_typo_only() {
        let known: Vec<String> = ["partition", "max-delete", "max-delete-percent", "no-lock"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(nearest_key("partiton", &known), Some("partition"));
        assert_eq!(nearest_key("max_delete", &known), Some("max-delete"));
        assert_eq!(
            nearest_key("Max-Delete-Percnt", &known),
            Some("max-delete-percent")
        );
        assert_eq!(nearest_key("nolock", &known), Some("no-lock"));
        assert_eq!(nearest_key("colour", &known), None);
        assert_eq!(nearest_key("x", &known), None);
    }

    #[test]
    fn the_log_format_is_found_before_the_options_parse() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        let found = |list: &[&str]| requested_log_format(&args(list));
        assert_eq!(
            found(&["g", "plan", "--log-format", "json", "--bogus"]),
            LogFormat::Json
        );
        assert_eq!(
            found(&["g", "plan", "--log-format=json", "--log-format=text"]),
            LogFormat::Text
        );
        assert_eq!(
            found(&["g", "plan", "--", "--log-format=json"]),
            LogFormat::Text
        );
        let file = write_config("log-format: json\nnot: [valid\n");
        let config = format!("--config={}", file.path().display());
        assert_eq!(
            found(&["g", "plan", &config]),
            LogFormat::Text,
            "unreadable file"
        );
        let file = write_config("log-format: json\npartiton: x\n");
        let config = format!("--config={}", file.path().display());
        assert_eq!(found(&["g", "plan", &config]), LogFormat::Json);
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
            "audit_log",
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
            (
                "a:s3cret@dc1",
                "<not shown: not a scheme://HOST[:PORT] URL>",
            ),
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
    fn urls_are_shown_as_scheme_and_address_only() {
        for (url, shown) in [
            ("ldap://dc1.ad.com:389", "ldap://dc1.ad.com:389"),
            ("ldaps://[::1]:636/", "ldaps://[::1]:636"),
            (
                "ldap://dc1/dc=x????x-bindpw=s3cret",
                "ldap://dc1/<rest not shown>",
            ),
            ("ldap://dc1:389:s3cret", "ldap://<address not shown>"),
            ("ldap://dc1:s3cret", "ldap://<address not shown>"),
            ("ldap://[::1", "ldap://<address not shown>"),
            ("s3cret:x@y://dc1", "<scheme not shown>://dc1"),
            ("s3cret", "<not shown: not a scheme://HOST[:PORT] URL>"),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
        }
    }

    #[test]
    fn ldap_urls_are_scheme_host_and_port_and_never_quoted_when_refused() {
        for bad in [
            "ldap://dc1:abc",
            "ldap://dc1:99999",
            "ldap://dc1:0",
            "ldap://dc 1",
            "ldap://:389",
            "ldap://[::1",
            "ldap://dc1:389:s3cret",
            "ldap://dc1..x",
        ] {
            let why = ldap_url_problem(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(
                !why.contains("s3cret") && !why.contains(bad),
                "{bad}: {why}"
            );
        }
        let long_label = format!("ldap://{}.ad.com", "a".repeat(64));
        assert!(ldap_url_problem(&long_label).is_some());
        for good in [
            "ldap://dc1",
            "ldaps://dc1.ad.com:636/",
            "ldap://10.0.0.1:389",
            "ldap://[::1]:389",
            "LDAP://DC1:65535",
        ] {
            assert_eq!(ldap_url_problem(good), None, "{good}");
        }
    }

    #[test]
    fn host_ous_are_repeatable_dns_and_never_the_root() {
        let config = |extra: &[&str]| {
            let mut argv = vec!["gmsa-reconciler", "plan", "--directory", "d.ldif"];
            argv.extend_from_slice(extra);
            let args = plan_args(parse(argv).expect("parse"));
            Config::from_args(&args.common, Some(&args.write))
        };
        let two = config(&[
            "--host-ou",
            "OU=Cell Hosts,OU=Computers,DC=ad,DC=com",
            "--host-ou=OU=Smith\\, John,DC=ad,DC=com",
        ])
        .expect("valid");
        let shown: Vec<&str> = two.host_ous.iter().map(Dn::as_str).collect();
        assert_eq!(
            shown,
            [
                "OU=Cell Hosts,OU=Computers,DC=ad,DC=com",
                "OU=Smith\\, John,DC=ad,DC=com"
            ],
            "commas in a DN do not split the value"
        );
        assert!(config(&[]).expect("valid").host_ous.is_empty());
        let root = config(&["--host-ou="]).expect_err("the root DN");
        assert!(root.to_string().starts_with("--host-ou:"), "{root}");
        let bad = config(&["--host-ou=not a dn"]).expect_err("not a DN");
        assert!(bad.to_string().starts_with("--host-ou:"), "{bad}");
    }

    #[test]
    fn check_asks_about_a_dn_or_this_host() {
        let check = |extra: &[&str]| {
            let mut argv = vec!["gmsa-reconciler", "check", "--group-ou=OU=G,DC=ad,DC=com"];
            argv.extend_from_slice(extra);
            match parse(argv)?.command {
                Command::Check(args) => CheckConfig::from_args(&args),
                other => panic!("expected check, got {other:?}"),
            }
        };
        let this = check(&[
            "--proid=web",
            "--self",
            "--fs-root=/t",
            "--hostname=h1.ad.com",
        ])
        .expect("valid");
        assert_eq!(
            this.host,
            CheckHost::This(HostName::new("h1.ad.com").expect("name"))
        );
        let dn = check(&["--proid=web", "--host-dn=CN=h1,DC=ad,DC=com"]).expect("valid");
        assert!(matches!(dn.host, CheckHost::Dn(_)));
        let neither = check(&["--proid=web"]).expect_err("no host");
        assert!(neither.to_string().contains("--self"), "{neither}");
        let no_root = check(&["--proid=web", "--self", "--hostname=h1"]).expect_err("no tree");
        assert!(no_root.to_string().starts_with("--fs-root:"), "{no_root}");
        let both = check(&["--proid=web", "--self", "--host-dn=CN=h,DC=ad,DC=com"]);
        assert!(both.is_err(), "--self and --host-dn are one or the other");
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
        let window = args(&["--ldap-url", "ldap://x", "--range-window", "500"]).expect("ok");
        assert!(matches!(
            window.directory,
            DirectoryChoice::Ldap(LdapChoice {
                range_window: Some(500),
                ..
            })
        ));
        let ldif =
            args(&["--directory", "d.ldif", "--range-window", "500"]).expect_err("LDAP only");
        assert!(ldif.to_string().starts_with("--directory:"), "{ldif}");
        let pattern = args(&["--directory", "d", "--group-pattern", "x"]).expect_err("pattern");
        assert!(
            pattern.to_string().starts_with("--group-pattern:"),
            "{pattern}"
        );
    }
}
