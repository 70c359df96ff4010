//! Writes a synthetic estate for the benchmarks: a placement tree and a
//! directory LDIF whose groups have drifted from it by a known amount.
//!
//! ```text
//! cargo run --release --example estate -- --preset L --out target/estate-L
//! cargo run --release --example estate -- --hosts 1000 --placements 20000 \
//!     --proids 500 --drift 0.05 --unmanaged 0.02 --seed 1 --out DIR
//! ```
//!
//! DIR receives `tree/` (for `--fs-root`), `directory.ldif` (for
//! `--directory`, or `slapadd` with the AD-like test schema), `config.yml`
//! (both, with absolute paths) and `summary.json` (the sizes and the plan a
//! correct reconciler must print). The summary is also printed. The same
//! parameters always produce the same files.

#[allow(dead_code)]
#[path = "../benches/support/estate.rs"]
mod estate;

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use estate::{Estate, Params, GROUP_OU, PARTITION};

/// Generates a placement tree and a matching, drifted directory LDIF.
#[derive(Parser)]
#[command(name = "estate")]
struct Args {
    /// Named sizes: S (1,000 hosts, 20,000 placements, 500 proids), L
    /// (10,000, 200,000, 5,000) or XL (50,000, 1,000,000, 20,000), all with
    /// the same spread and drift. Explicit sizes override it.
    #[arg(long)]
    preset: Option<String>,
    /// Hosts.
    #[arg(long)]
    hosts: Option<usize>,
    /// Placements (at least one per proid).
    #[arg(long)]
    placements: Option<usize>,
    /// Proids.
    #[arg(long)]
    proids: Option<usize>,
    /// Share of true members missing from the groups, and of stale hosts in them.
    #[arg(long, default_value_t = 0.05)]
    drift: f64,
    /// Unmanaged members (user accounts) per true member.
    #[arg(long, default_value_t = 0.02)]
    unmanaged: f64,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Replace an earlier estate in the output directory.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("estate: error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The named sizes: those of the benchmarks' support module, and XL, five
/// times L's hosts and placements with four times its proids, drawn the
/// same way (Zipf spread, drift and unmanaged shares, seed).
fn preset(name: &str) -> Option<Params> {
    match name {
        "XL" | "xl" => Params::preset("L").map(|l| Params {
            hosts: 50_000,
            placements: 1_000_000,
            proids: 20_000,
            ..l
        }),
        _ => Params::preset(name),
    }
}

fn run(args: Args) -> Result<(), String> {
    let base = match args.preset.as_deref() {
        Some(name) => preset(name).ok_or_else(|| format!("unknown preset {name:?}: S, L or XL"))?,
        None => Params::preset("S").ok_or("the S preset exists")?,
    };
    let explicit = [args.hosts, args.placements, args.proids];
    if args.preset.is_none() && explicit.iter().any(Option::is_none) {
        return Err("give --preset, or all of --hosts, --placements and --proids".into());
    }
    let params = Params {
        hosts: args.hosts.unwrap_or(base.hosts),
        placements: args.placements.unwrap_or(base.placements),
        proids: args.proids.unwrap_or(base.proids),
        drift: args.drift,
        unmanaged: args.unmanaged,
        seed: args.seed,
    };
    params.check()?;

    let out = &args.out;
    let tree = out.join("tree");
    let ldif = out.join("directory.ldif");
    if tree.exists() || ldif.exists() {
        if !args.force {
            return Err(format!(
                "{} already holds an estate; remove it or pass --force",
                out.display()
            ));
        }
        // Half-written trees are removed too: `.modified` is written last.
        if tree.exists() {
            fs::remove_dir_all(&tree).map_err(|e| format!("{}: {e}", tree.display()))?;
        }
    }
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let out = fs::canonicalize(out).map_err(|e| format!("{}: {e}", out.display()))?;

    let started = Instant::now();
    let estate = Estate::generate(params);
    estate
        .write_tree(&tree)
        .map_err(|e| format!("{}: {e}", tree.display()))?;
    estate
        .write_ldif(&ldif)
        .map_err(|e| format!("{}: {e}", ldif.display()))?;
    let config = format!(
        "# Written by the estate generator; keys are the long option names.\n\
         fs-root: {}\npartition: {PARTITION}\ngroup-ou: {GROUP_OU}\ndirectory: {}\n",
        out.join("tree").display(),
        out.join("directory.ldif").display()
    );
    let config_path = out.join("config.yml");
    fs::write(&config_path, config).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let summary = estate.summary_json();
    let summary_path = out.join("summary.json");
    fs::write(&summary_path, format!("{summary}\n"))
        .map_err(|e| format!("{}: {e}", summary_path.display()))?;

    let e = &estate.expected;
    eprintln!(
        "estate: wrote {} in {:.1}s: {} hosts, {} placements, {} proids; \
         expected plan: {} groups, {} additions, {} deletions",
        out.display(),
        started.elapsed().as_secs_f64(),
        params.hosts,
        params.placements,
        params.proids,
        e.groups_changed,
        e.adds,
        e.deletes
    );
    println!("{summary}");
    Ok(())
}
