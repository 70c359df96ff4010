//! The `gmsa-reconciler` binary: parse the command line, set up logging,
//! run the command, and turn its result into an exit code. Errors are
//! printed on one line, without a backtrace. Text logs and the error line
//! quote paths and names from outside with their control characters
//! escaped, so that no file name can write a log line of its own. The log
//! format is found before the options parse, so that with `--log-format
//! json` every line on standard error is JSON: logs, clap's usage errors,
//! the fatal error, `config`'s problems and a panic alike.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

use gmsa_reconciler::cli::{
    self, CheckConfig, Cli, CliError, Command, Config, ExplainConfig, LogFormat, LogSettings,
    RunConfig,
};
use gmsa_reconciler::commands::{self, EXIT_ERROR, EXIT_OK};
use gmsa_reconciler::config_check;
use gmsa_reconciler::model::escape_controls;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "run") {
        limit_malloc_arenas();
    }
    // Known before the options parse, so that every line on standard
    // error, the usage error and a panic included, is in this format.
    let log_format = cli::requested_log_format(&args);
    if log_format == LogFormat::Json {
        std::panic::set_hook(Box::new(|info| {
            error_line(LogFormat::Json, &format!("panic: {info}"));
        }));
    }
    let cli = match cli::parse(args) {
        Ok(cli) => cli,
        Err(CliError::Usage(err)) => {
            // Help and version are not errors; usage errors exit 1, not
            // clap's 2, which `plan --exit-code` uses for "changes".
            if !err.use_stderr() {
                let _ = err.print();
                return ExitCode::from(0);
            }
            match log_format {
                LogFormat::Json => error_line(log_format, err.render().to_string().trim_end()),
                LogFormat::Text => {
                    let _ = err.print();
                }
            }
            return ExitCode::from(EXIT_ERROR);
        }
        Err(err) => return fail(&anyhow::Error::new(err), log_format),
    };
    match run(cli, log_format) {
        Ok(code) => ExitCode::from(code),
        Err(err) => fail(&err, log_format),
    }
}

/// The daemon runs for months. glibc gives each thread that starts to
/// allocate while the others hold their arenas an arena of its own, and
/// what a thread touches there stays mapped: a step in the resident size
/// each time the blocking pool grows. Two arenas serve the daemon's few
/// busy threads. An operator's own `MALLOC_ARENA_MAX` wins. Called first
/// thing, before any other thread exists: glibc reads the limit when it
/// first needs a second arena.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` sets one of malloc's tunables; no other thread
        // runs yet, and the value is one glibc documents.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn fail(err: &anyhow::Error, format: LogFormat) -> ExitCode {
    // Our errors carry their causes in their own message.
    error_line(format, &err.to_string());
    ExitCode::from(EXIT_ERROR)
}

/// One error line on standard error: `gmsa-reconciler: error: ...` with
/// control characters escaped, or a JSON object shaped like the JSON log
/// lines (`timestamp`, `level`, `fields.message`, `target`). Written
/// directly, not through `tracing`, so that no filter can hide it.
fn error_line(format: LogFormat, text: &str) {
    let line = match format {
        LogFormat::Text => format!("gmsa-reconciler: error: {}", escape_controls(text)),
        LogFormat::Json => {
            let mut timestamp = String::new();
            let _ = tracing_subscriber::fmt::time::SystemTime.format_time(
                &mut tracing_subscriber::fmt::format::Writer::new(&mut timestamp),
            );
            serde_json::json!({
                "timestamp": timestamp,
                "level": "ERROR",
                "fields": { "message": text },
                "target": "gmsa_reconciler",
            })
            .to_string()
        }
    };
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The async runtime of one command. The daemon's runs on one thread:
/// its loop, its LDAP connection and its endpoints, with the tree's scans
/// and file work on the blocking pool. At a steady 1,000 changes a second
/// a worker thread woke the loop for every answer, and those hand-offs
/// were a quarter of its CPU (BENCHMARKS.md). The one-shot commands keep
/// worker threads, which decode a search's pages beside the planning.
fn runtime(command: &Command) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))
}

fn run(cli: Cli, log_format: LogFormat) -> anyhow::Result<u8> {
    let runtime = runtime(&cli.command)?;
    let mut stdout = std::io::stdout().lock();
    let code = match cli.command {
        Command::Plan(args) => {
            let config = Config::from_args(&args.common, Some(&args.write))?;
            init_logging(config.log, false);
            runtime.block_on(commands::plan_command(&config, args.exit_code, &mut stdout))?
        }
        Command::Sync(args) => {
            let config =
                Config::from_args(&args.common, Some(&args.write))?.with_audit(&args.audit);
            init_logging(config.log, false);
            runtime.block_on(commands::sync_command(&config, args.dry_run, &mut stdout))?
        }
        Command::Check(args) => {
            let check = CheckConfig::from_args(&args)?;
            init_logging(check.config.log, false);
            runtime.block_on(commands::check_command(&check, &mut stdout))?
        }
        Command::Explain(args) => {
            let explain = ExplainConfig::from_args(&args)?;
            init_logging(explain.config.log, false);
            runtime.block_on(commands::explain_command(&explain, &mut stdout))?
        }
        Command::Finish(args) => {
            init_logging(
                LogSettings {
                    format: LogFormat::Text,
                    verbosity: args.verbose as i8 - args.quiet as i8,
                },
                false,
            );
            commands::finish_command(&args.container_dir, &mut stdout)?
        }
        Command::Run(args) => {
            let run = RunConfig::from_args(&args)?;
            init_logging(run.config.log, true);
            runtime.block_on(gmsa_reconciler::daemon::run_until_signalled(run))?
        }
        Command::Config(args) => {
            let report = config_check::check(&args.args);
            stdout.write_all(report.render().as_bytes())?;
            for problem in &report.problems {
                error_line(log_format, problem);
            }
            if report.is_valid() {
                EXIT_OK
            } else {
                EXIT_ERROR
            }
        }
        Command::Completions(args) => {
            args.shell
                .generate(&mut cli::command(), &mut stdout)
                .map_err(|e| anyhow::anyhow!("writing the output: {e}"))?;
            EXIT_OK
        }
    };
    stdout
        .flush()
        .map_err(|e| anyhow::anyhow!("writing the output: {e}"))?;
    Ok(code)
}

/// Logs go to standard error: warnings by default for one-shot commands,
/// information for the daemon; `-v`/`-q` move one level each; `RUST_LOG`
/// overrides everything.
fn init_logging(log: LogSettings, daemon: bool) {
    const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
    let base: i8 = if daemon { 2 } else { 1 };
    let level = LEVELS[(base + log.verbosity).clamp(0, 4) as usize];
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match log.format {
        // JSON escapes what it quotes.
        LogFormat::Json => builder.json().try_init(),
        // The default text formatter prints messages and `%` fields as they
        // are: each field goes through `escape_controls` instead, in the
        // default layout (the message bare, other fields as `name=value`).
        LogFormat::Text => builder
            .fmt_fields(
                tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
                    let text = format!("{value:?}");
                    let text = escape_controls(&text);
                    match field.name() {
                        "message" => writer.write_str(&text),
                        name => {
                            let name = name.strip_prefix("r#").unwrap_or(name);
                            write!(writer, "{name}={text}")
                        }
                    }
                })
                .delimited(" "),
            )
            .try_init(),
    };
}
