//! The `gmsa-reconciler` binary: parse the command line, set up logging,
//! run the command, and turn its result into an exit code. Errors are
//! printed on one line, without a backtrace; with JSON logs that line is a
//! JSON object like every other. Text logs and the error line quote paths
//! and names from outside with their control characters escaped, so that no
//! file name can write a log line of its own.

use std::io::Write;
use std::process::ExitCode;

use gmsa_reconciler::cli::{
    self, CheckConfig, Cli, CliError, Command, Config, LogFormat, LogSettings, RunConfig,
};
use gmsa_reconciler::commands::{self, EXIT_ERROR};
use gmsa_reconciler::model::escape_controls;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let json = json_requested(std::env::args_os());
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(CliError::Usage(err)) => {
            // Help and version are not errors; usage errors exit 1, not
            // clap's 2, which `plan --exit-code` uses for "changes".
            let code = if err.use_stderr() { EXIT_ERROR } else { 0 };
            let _ = err.print();
            return ExitCode::from(code);
        }
        Err(err) => return fail(&anyhow::Error::new(err), json),
    };
    let json = json || log_format(&cli) == Some(LogFormat::Json);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => fail(&err, json),
    }
}

/// Whether JSON logs were asked for on the command line or in the
/// environment, looked at before parsing so that an error in the rest of
/// the command line is JSON too.
fn json_requested(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    let args: Vec<_> = args.collect();
    let flag = args.iter().enumerate().any(|(i, arg)| {
        arg == "--log-format=json"
            || (arg == "--log-format" && args.get(i + 1).is_some_and(|v| v == "json"))
    });
    flag || std::env::var_os("GMSA_LOG_FORMAT").is_some_and(|v| v == "json")
}

/// The log format the parsed command line settled on, if it has one.
fn log_format(cli: &Cli) -> Option<LogFormat> {
    match &cli.command {
        Command::Plan(args) => args.common.log_format,
        Command::Sync(args) => args.common.log_format,
        Command::Check(args) => args.common.log_format,
        Command::Run(args) => args.common.log_format,
        Command::Finish(_) => None,
    }
}

fn fail(err: &anyhow::Error, json: bool) -> ExitCode {
    // Our errors carry their causes in their own message.
    let text = err.to_string();
    let line = if json {
        // With JSON logs every line on standard error is JSON, this one too,
        // in the shape of the log lines before it.
        let mut timestamp = String::new();
        let _ = tracing_subscriber::fmt::time::FormatTime::format_time(
            &tracing_subscriber::fmt::time::SystemTime,
            &mut tracing_subscriber::fmt::format::Writer::new(&mut timestamp),
        );
        serde_json::json!({
            "timestamp": timestamp,
            "level": "ERROR",
            "fields": { "message": format!("gmsa-reconciler: error: {text}") },
            "target": "gmsa_reconciler",
        })
        .to_string()
    } else {
        format!("gmsa-reconciler: error: {}", escape_controls(&text))
    };
    let _ = writeln!(std::io::stderr(), "{line}");
    ExitCode::from(EXIT_ERROR)
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?;
    let mut stdout = std::io::stdout().lock();
    let code = match cli.command {
        Command::Plan(args) => {
            let config = Config::from_args(&args.common, Some(&args.write))?;
            init_logging(config.log, false);
            runtime.block_on(commands::plan_command(&config, args.exit_code, &mut stdout))?
        }
        Command::Sync(args) => {
            let config = Config::from_args(&args.common, Some(&args.write))?;
            init_logging(config.log, false);
            runtime.block_on(commands::sync_command(&config, args.dry_run, &mut stdout))?
        }
        Command::Check(args) => {
            let check = CheckConfig::from_args(&args)?;
            init_logging(check.config.log, false);
            runtime.block_on(commands::check_command(&check, &mut stdout))?
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
