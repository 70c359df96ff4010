//! Drives a running `gmsa-reconciler run` for the benchmarks
//! (`scripts/bench-daemon`, `scripts/bench-rss`, `scripts/bench-steady`):
//! changes placements in its tree the way the mirror does (a `.tmp*` file
//! renamed into place, or a file removed) and times how long each change
//! takes to reach the directory.
//!
//! ```text
//! daemon_load latency --tree DIR --ldap-url URL --bind-dn DN \
//!     --bind-password-file FILE --log DAEMON.LOG --changes 200 --out rows.csv
//! daemon_load burst --tree DIR --ldap-url URL --bind-dn DN \
//!     --bind-password-file FILE --placements 10000
//! daemon_load sustain --tree DIR --ldif FILE.ldif --pid PID \
//!     --changes 100000 --rate 500 --every 10000
//! daemon_load steady --tree DIR --ldap-url URL --bind-dn DN \
//!     --bind-password-file FILE --log DAEMON.LOG --pid PID \
//!     --ready-url http://127.0.0.1:PORT/readyz --rate 1000 --seconds 60
//! ```
//!
//! `latency` makes one change at a time (at least `--gap-ms` apart), alternately a placement of a proid
//! on a host that ran none of it (the host must join the group) and the
//! removal of a host's only placement of a proid (the host must leave it),
//! and waits until the directory shows it before the next one. Each change
//! is timed twice: on the client, from the moment the rename or unlink
//! returned to the first LDAP Compare that sees the new state (polled every
//! `--poll-ms`), and by the daemon itself, from the `latency_ms` field of
//! its "change applied" log line (event received to Modify answered).
//!
//! `burst` writes `--placements` new placements as fast as it can, each of
//! a proid on a host that ran none of it (distinct pairs, proids and hosts
//! drawn uniformly), then polls the directory until every group holds
//! every new member: one base search per group whose filter asks for all
//! its new members, groups taken in DN order, waiting `--poll-ms` at a
//! group not done yet. The time reported runs from the first write to the
//! answer that confirmed the last group; the first write's wall-clock time
//! is reported too, to compare with the server's log.
//!
//! `sustain` runs against `run --directory FILE.ldif`: it makes `--changes`
//! placement changes at `--rate` a second, first `--pool` additions (each
//! a proid on a host that ran none of it), then by turns the removal of
//! its oldest placement and a new one, so every change is a membership
//! change and the state stays bounded. After every `--every` changes it
//! stops, waits until the LDIF file holds the desired state of every
//! group (the file read by hand, host members compared with the tree's
//! placements) and reads the daemon's VmRSS, VmHWM, RssAnon and thread
//! count from `/proc/PID/status`. The last sample is taken after the last
//! change, so the run ends with the file checked.
//!
//! `steady` runs against `run` on an LDAP server: the changes of
//! `sustain` (`--pool` additions, then by turns the removal of the oldest
//! and a new addition) at `--rate` a second for `--seconds`, each due at
//! its place in an absolute schedule (a late change does not delay the
//! ones after it). The tree is read and `--ready-url` polled first, so
//! the stream starts as soon as the daemon is ready (its resync interval
//! counts from then). Every second it reads the daemon's CPU time
//! (utime + stime of `/proc/PID/stat`) and VmRSS. After the stream it
//! waits until every group it touched holds the tree's hosts, then reads
//! what the daemon logged since it started (`--log`, JSON, with the
//! "change applied" lines of `gmsa_reconciler::daemon::sync` at debug):
//! the latency of each applied change (`latency_ms`, the daemon's clock:
//! event taken -> Modify answered), the full resyncs (from "scanning the
//! placement tree" with why "full resync" to "full sync done"), and the
//! longest gap between two events the daemon took during the stream
//! (each "change applied" line dates the first event of its proid's
//! batch: its time minus `since_event_ms`, as the line is written once
//! the whole pass is done). A change counts as during a resync when the
//! time from its event to its Modify's answer overlaps one.
//!
//! The directory is read with ldap3 directly, not through the reconciler's
//! own code, so the check does not share the code it measures. Results are
//! one JSON object on standard output; `--out` also gets one CSV row per
//! change.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use ldap3::{Ldap, LdapConnAsync, Scope};

/// Changes placements under a running daemon and times the directory's answer.
#[derive(Parser)]
#[command(name = "daemon_load")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Single changes, one at a time; latency percentiles.
    Latency(LatencyArgs),
    /// Many new placements at once; time until the directory holds them all.
    Burst(BurstArgs),
    /// A long steady stream of changes against `run --directory FILE.ldif`;
    /// the daemon's resident memory every so many changes.
    Sustain(SustainArgs),
    /// A steady stream of changes at a fixed rate against `run` on LDAP;
    /// the daemon's CPU, memory and latency, split around full resyncs.
    Steady(SteadyArgs),
}

#[derive(Args)]
struct Common {
    /// The daemon's placement tree (its --fs-root).
    #[arg(long)]
    tree: PathBuf,
    /// The LDAP server the daemon writes to.
    #[arg(long)]
    ldap_url: String,
    /// DN to bind as.
    #[arg(long)]
    bind_dn: String,
    /// File holding the bind password.
    #[arg(long)]
    bind_password_file: PathBuf,
    /// The OU of the groups.
    #[arg(long, default_value = "ou=Groups,dc=ad,dc=com")]
    group_ou: String,
    /// A proid's group is `cn=<proid><suffix>` under the OU.
    #[arg(long, default_value = "-gmsa-hosts")]
    group_suffix: String,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Give up when the directory has not caught up within this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// CSV file of one row per change.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct LatencyArgs {
    #[command(flatten)]
    common: Common,
    /// The daemon's log (`--log-format json -v`), for its own latency figures.
    #[arg(long)]
    log: PathBuf,
    /// Changes to make.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Milliseconds between two Compares while waiting for a change.
    #[arg(long, default_value_t = 2)]
    poll_ms: u64,
    /// Least milliseconds from one change to the next. A change that comes
    /// within the daemon's batch window of the one before waits for the
    /// window; an isolated one is applied at once. Give more than the
    /// window to time isolated changes, 0 for changes back to back.
    #[arg(long, default_value_t = 0)]
    gap_ms: u64,
}

#[derive(Args)]
struct BurstArgs {
    #[command(flatten)]
    common: Common,
    /// New placements to write.
    #[arg(long, default_value_t = 10_000)]
    placements: usize,
    /// Checks in flight at once once groups are done.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Milliseconds between two checks of a group not done yet.
    #[arg(long, default_value_t = 50)]
    poll_ms: u64,
}

#[derive(Args)]
struct SustainArgs {
    /// The daemon's placement tree (its --fs-root).
    #[arg(long)]
    tree: PathBuf,
    /// The daemon's LDIF file (its --directory).
    #[arg(long)]
    ldif: PathBuf,
    /// The daemon's process id, for its memory in /proc/PID/status.
    #[arg(long)]
    pid: u32,
    /// The OU of the groups.
    #[arg(long, default_value = "ou=Groups,dc=ad,dc=com")]
    group_ou: String,
    /// A proid's group is `cn=<proid><suffix>` under the OU.
    #[arg(long, default_value = "-gmsa-hosts")]
    group_suffix: String,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Give up when the file has not caught up within this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Changes to make.
    #[arg(long, default_value_t = 100_000)]
    changes: usize,
    /// Changes a second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Placements of the driver's alive at once: the first this many
    /// changes add, then each removal of the oldest is followed by an add.
    #[arg(long, default_value_t = 1000)]
    pool: usize,
    /// Wait for the file to hold the desired state and sample the memory
    /// after every this many changes.
    #[arg(long, default_value_t = 10_000)]
    every: usize,
    /// CSV file of one row per sample.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct SteadyArgs {
    #[command(flatten)]
    common: Common,
    /// The daemon's log (`--log-format json`, "change applied" at debug).
    #[arg(long)]
    log: PathBuf,
    /// The daemon's process id, for /proc/PID/stat and /proc/PID/status.
    #[arg(long)]
    pid: u32,
    /// The daemon's /readyz (`http://HOST:PORT/readyz`): the stream starts
    /// once it answers 200. Without it the stream starts at once.
    #[arg(long)]
    ready_url: Option<String>,
    /// Changes a second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Length of the stream in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u32,
    /// Placements of the driver's alive at once: the first this many
    /// changes add, then each removal of the oldest is followed by an add.
    #[arg(long, default_value_t = 1000)]
    pool: usize,
    /// Seconds of the stream whose memory samples the growth leaves out.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Mode::Sustain(args) = cli.mode {
        return match sustain(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("daemon_load: error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("daemon_load: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.mode {
        Mode::Latency(args) => runtime.block_on(latency(args)),
        Mode::Burst(args) => runtime.block_on(burst(args)),
        Mode::Steady(args) => runtime.block_on(steady(args)),
        Mode::Sustain(_) => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("daemon_load: error: {err}");
            ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, String>;

/// The tree as the driver sees it: hosts with their DNs and, per proid and
/// host, the instances placed.
struct Tree {
    root: PathBuf,
    /// Host name and `nt.dn`.
    hosts: Vec<(String, String)>,
    proids: Vec<String>,
    /// (proid, host) indexes to instance names.
    placed: HashMap<(usize, usize), Vec<String>>,
    /// Every instance name already used, so new ones are unique.
    names: HashSet<String>,
    next_id: u64,
}

impl Tree {
    fn scan(root: &Path) -> Res<Tree> {
        let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
        let servers = root.join("servers");
        let mut hosts = Vec::new();
        for entry in fs::read_dir(&servers).map_err(|e| err(&servers, e))? {
            let entry = entry.map_err(|e| err(&servers, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let text = fs::read_to_string(entry.path()).map_err(|e| err(&entry.path(), e))?;
            let dn = text
                .lines()
                .find_map(|l| l.strip_prefix("nt.dn:"))
                .map(|v| v.trim().to_owned())
                .ok_or_else(|| format!("servers/{name}: no nt.dn"))?;
            hosts.push((name, dn));
        }
        hosts.sort();
        let host_index: HashMap<String, usize> = hosts
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let mut proid_index: BTreeMap<String, usize> = BTreeMap::new();
        let mut pairs: Vec<(String, usize, String)> = Vec::new();
        let mut names = HashSet::new();
        let placement = root.join("placement");
        for (host, &h) in &host_index {
            let dir = placement.join(host);
            let Ok(listing) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in listing {
                let entry = entry.map_err(|e| err(&dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let Some((proid, _)) = name.split_once('.') else {
                    continue;
                };
                proid_index.entry(proid.to_owned()).or_insert(0);
                pairs.push((proid.to_owned(), h, name.clone()));
                names.insert(name);
            }
        }
        let proids: Vec<String> = proid_index.keys().cloned().collect();
        for (i, p) in proids.iter().enumerate() {
            proid_index.insert(p.clone(), i);
        }
        let mut placed: HashMap<(usize, usize), Vec<String>> = HashMap::new();
        for (proid, h, name) in pairs {
            placed
                .entry((proid_index[&proid], h))
                .or_default()
                .push(name);
        }
        if hosts.is_empty() || proids.is_empty() {
            return Err(format!("{}: no hosts or no placements", root.display()));
        }
        Ok(Tree {
            root: root.to_owned(),
            hosts,
            proids,
            placed,
            names,
            next_id: 9_000_000_000,
        })
    }

    /// A (proid, host) pair whose host runs nothing of the proid.
    fn pick_absent(
        &self,
        rng: &mut fastrand::Rng,
        taken: &HashSet<(usize, usize)>,
    ) -> (usize, usize) {
        loop {
            let pair = (
                rng.usize(..self.proids.len()),
                rng.usize(..self.hosts.len()),
            );
            if !self.placed.contains_key(&pair) && !taken.contains(&pair) {
                return pair;
            }
        }
    }

    /// A (proid, host) pair with exactly one instance.
    fn pick_single(&self, rng: &mut fastrand::Rng) -> Option<(usize, usize)> {
        let singles: Vec<(usize, usize)> = self
            .placed
            .iter()
            .filter(|(_, v)| v.len() == 1)
            .map(|(k, _)| *k)
            .collect();
        if singles.is_empty() {
            return None;
        }
        // HashMap order is not stable: sort so a seed gives the same run.
        let mut singles = singles;
        singles.sort_unstable();
        Some(singles[rng.usize(..singles.len())])
    }

    /// Places a new instance of `proid` on `host` as the mirror does.
    fn place(&mut self, (p, h): (usize, usize)) -> Res<()> {
        let name = loop {
            self.next_id += 1;
            let name = format!("{}.bench#{:010}", self.proids[p], self.next_id);
            if !self.names.contains(&name) {
                break name;
            }
        };
        let dir = self.root.join("placement").join(&self.hosts[h].0);
        let tmp = dir.join(format!(".tmp-bench-{}", self.next_id));
        fs::write(&tmp, "{\"expires\": 1800000000}\n")
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        fs::rename(&tmp, dir.join(&name)).map_err(|e| format!("{}: {e}", dir.display()))?;
        self.names.insert(name.clone());
        self.placed.entry((p, h)).or_default().push(name);
        Ok(())
    }

    /// Removes the only instance of `proid` on `host`.
    fn unplace(&mut self, pair: (usize, usize)) -> Res<()> {
        let Some(names) = self.placed.remove(&pair) else {
            return Err("BUG: removing a pair that is not placed".into());
        };
        let dir = self.root.join("placement").join(&self.hosts[pair.1].0);
        for name in names {
            let path = dir.join(&name);
            fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }
}

async fn connect(c: &Common) -> Res<Ldap> {
    let password = fs::read_to_string(&c.bind_password_file)
        .map_err(|e| format!("{}: {e}", c.bind_password_file.display()))?;
    let password = password.strip_suffix('\n').unwrap_or(&password);
    let (conn, mut ldap) = LdapConnAsync::new(&c.ldap_url)
        .await
        .map_err(|e| format!("{}: {e}", c.ldap_url))?;
    ldap3::drive!(conn);
    ldap.simple_bind(&c.bind_dn, password)
        .await
        .and_then(|r| r.success())
        .map_err(|e| format!("bind as {}: {e}", c.bind_dn))?;
    Ok(ldap)
}

fn group_dn(c: &Common, proid: &str) -> String {
    format!("cn={proid}{},{}", c.group_suffix, c.group_ou)
}

/// Reads the daemon's JSON log from where it was last read.
struct LogTail {
    reader: BufReader<fs::File>,
    partial: String,
}

impl LogTail {
    fn open_at_end(path: &Path) -> Res<LogTail> {
        let mut file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        file.seek(SeekFrom::End(0))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(LogTail {
            reader: BufReader::new(file),
            partial: String::new(),
        })
    }

    /// The `latency_ms` of the daemon's next "change applied" for `proid`.
    fn applied(&mut self, proid: &str) -> Option<f64> {
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            self.partial.push_str(&line);
            if !self.partial.ends_with('\n') {
                return None;
            }
            let line = std::mem::take(&mut self.partial);
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let fields = &value["fields"];
            if fields["message"] == "change applied" && fields["proid"] == proid {
                if let Some(ms) = fields["latency_ms"].as_f64() {
                    return Some(ms);
                }
            }
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(values: &[f64]) -> serde_json::Value {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let r = |x: f64| (x * 10.0).round() / 10.0;
    serde_json::json!({
        "n": v.len(),
        "p50": r(percentile(&v, 50.0)),
        "p90": r(percentile(&v, 90.0)),
        "p99": r(percentile(&v, 99.0)),
        "max": r(v.last().copied().unwrap_or(f64::NAN)),
        "mean": r(mean),
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn latency(args: LatencyArgs) -> Res<()> {
    let c = &args.common;
    let mut tree = Tree::scan(&c.tree)?;
    let mut ldap = connect(c).await?;
    let mut log = LogTail::open_at_end(&args.log)?;
    let mut rng = fastrand::Rng::with_seed(c.seed);
    let timeout = Duration::from_secs(c.timeout);
    let poll = Duration::from_millis(args.poll_ms);
    let mut csv = String::from("i,kind,proid,host,client_ms,daemon_ms\n");
    let (mut client, mut daemon) = (Vec::new(), Vec::new());
    let mut by_kind: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let gap = Duration::from_millis(args.gap_ms);
    let mut last_change: Option<Instant> = None;
    for i in 0..args.changes {
        let add = i % 2 == 0;
        let pair = if add {
            tree.pick_absent(&mut rng, &HashSet::new())
        } else {
            tree.pick_single(&mut rng)
                .ok_or("no host runs exactly one instance of a proid")?
        };
        let proid = tree.proids[pair.0].clone();
        let (host, host_dn) = tree.hosts[pair.1].clone();
        let group = group_dn(c, &proid);
        // The group must be in the old state before the clock starts.
        let before = ldap
            .compare(&group, "member", host_dn.as_bytes())
            .await
            .and_then(|r| r.equal())
            .map_err(|e| format!("compare on {group}: {e}"))?;
        if before == add {
            return Err(format!(
                "{group}: {host_dn} is {} a member before the change",
                if add { "already" } else { "not" }
            ));
        }
        if let Some(last) = last_change {
            tokio::time::sleep_until((last + gap).into()).await;
        }
        if add {
            tree.place(pair)?;
        } else {
            tree.unplace(pair)?;
        }
        let started = Instant::now();
        last_change = Some(started);
        let seen = loop {
            let now = ldap
                .compare(&group, "member", host_dn.as_bytes())
                .await
                .and_then(|r| r.equal())
                .map_err(|e| format!("compare on {group}: {e}"))?;
            if now == add {
                break started.elapsed();
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "change {i} ({proid} on {host}) not applied within {timeout:?}"
                ));
            }
            tokio::time::sleep(poll).await;
        };
        // The daemon logs after the Modify returned; give it a moment.
        let logged_by = Instant::now() + Duration::from_secs(5);
        let daemon_ms = loop {
            if let Some(ms) = log.applied(&proid) {
                break ms;
            }
            if Instant::now() > logged_by {
                return Err(format!(
                    "no \"change applied\" line for {proid} in the daemon's log"
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let client_ms = seen.as_secs_f64() * 1000.0;
        let kind = if add { "add" } else { "remove" };
        client.push(client_ms);
        daemon.push(daemon_ms);
        let entry = by_kind.entry(kind).or_default();
        entry.0.push(client_ms);
        entry.1.push(daemon_ms);
        csv.push_str(&format!(
            "{i},{kind},{proid},{host},{client_ms:.3},{daemon_ms:.3}\n"
        ));
    }
    let _ = ldap.unbind().await;
    if let Some(out) = &c.out {
        fs::write(out, csv).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let kinds: serde_json::Map<String, serde_json::Value> = by_kind
        .into_iter()
        .map(|(k, (cl, dm))| {
            (
                k.to_owned(),
                serde_json::json!({"client_ms": stats(&cl), "daemon_ms": stats(&dm)}),
            )
        })
        .collect();
    let summary = serde_json::json!({
        "changes": args.changes,
        "poll_ms": args.poll_ms,
        "gap_ms": args.gap_ms,
        "client_ms": stats(&client),
        "daemon_ms": stats(&daemon),
        "by_kind": kinds,
    });
    println!("{summary}");
    Ok(())
}

/// Escapes a filter value (RFC 4515).
fn escape_filter(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for ch in value.chars() {
        match ch {
            '*' => out.push_str("\\2a"),
            '(' => out.push_str("\\28"),
            ')' => out.push_str("\\29"),
            '\\' => out.push_str("\\5c"),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// A base search of `group`: its entries, or why it failed.
async fn base_search(
    ldap: &mut Ldap,
    group: &str,
    filter: &str,
    attrs: Vec<&str>,
) -> Res<Vec<ldap3::ResultEntry>> {
    let ldap3::SearchResult(entries, result) = ldap
        .search(group, Scope::Base, filter, attrs)
        .await
        .map_err(|e| format!("search {group}: {e}"))?;
    if result.rc != 0 {
        return Err(format!(
            "search {group}: result {}: {}",
            result.rc, result.text
        ));
    }
    Ok(entries)
}

/// True when the group holds every one of `members`.
async fn holds_all(mut ldap: Ldap, group: String, filter: String) -> Res<(String, bool)> {
    let entries = base_search(&mut ldap, &group, &filter, vec!["1.1"]).await?;
    Ok((group, !entries.is_empty()))
}

async fn burst(args: BurstArgs) -> Res<()> {
    use futures::stream::{self, StreamExt};

    let c = &args.common;
    let mut tree = Tree::scan(&c.tree)?;
    let ldap = connect(c).await?;
    let mut rng = fastrand::Rng::with_seed(c.seed);
    let mut chosen: HashSet<(usize, usize)> = HashSet::new();
    let mut order = Vec::with_capacity(args.placements);
    while order.len() < args.placements {
        let pair = tree.pick_absent(&mut rng, &chosen);
        chosen.insert(pair);
        order.push(pair);
    }
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for &(p, h) in &order {
        expected
            .entry(group_dn(c, &tree.proids[p]))
            .or_default()
            .insert(tree.hosts[h].1.clone());
    }
    let values = order.len();

    let first_write_unix = unix_now();
    let started = Instant::now();
    for &pair in &order {
        tree.place(pair)?;
    }
    let written = started.elapsed();

    let timeout = Duration::from_secs(c.timeout);
    let pending: Vec<(String, String)> = expected
        .iter()
        .map(|(group, members)| {
            let terms: String = members
                .iter()
                .map(|m| format!("(member={})", escape_filter(m)))
                .collect();
            (group.clone(), format!("(&{terms})"))
        })
        .collect();
    let groups = pending.len();
    // The groups are checked in DN order (the order the daemon writes a
    // batch in), and a round stops at the first group not done yet: while
    // the daemon works, the poll costs the server one search per
    // `--poll-ms`, not one per group, so it does not slow what it measures.
    let mut checks = 0usize;
    let mut next = 0usize;
    let mut chunk = 1usize;
    let poll = Duration::from_millis(args.poll_ms);
    while next < pending.len() {
        let head: Vec<(String, String)> = pending[next..(next + chunk).min(pending.len())].to_vec();
        checks += head.len();
        let answers: Vec<Res<(String, bool)>> = stream::iter(head)
            .map(|(g, f)| holds_all(ldap.clone(), g, f))
            .buffered(args.in_flight.max(1))
            .collect()
            .await;
        let mut advanced = 0;
        for answer in answers {
            let (_, ok) = answer?;
            if !ok {
                break;
            }
            advanced += 1;
        }
        next += advanced;
        if advanced == chunk {
            chunk = args.in_flight.max(1);
            continue;
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "{} groups still lack new members after {timeout:?}",
                pending.len() - next
            ));
        }
        chunk = 1;
        tokio::time::sleep(poll).await;
    }
    let converged = started.elapsed();
    if let Some(out) = &c.out {
        let mut csv = String::from("proid,host\n");
        for &(p, h) in &order {
            csv.push_str(&format!("{},{}\n", tree.proids[p], tree.hosts[h].0));
        }
        fs::write(out, csv).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let summary = serde_json::json!({
        "placements": values,
        "groups": groups,
        "first_write_unix": first_write_unix,
        "written_s": (written.as_secs_f64() * 1000.0).round() / 1000.0,
        "converged_s": (converged.as_secs_f64() * 1000.0).round() / 1000.0,
        "checks": checks,
    });
    println!("{summary}");
    let _ = std::io::stdout().flush();
    Ok(())
}

/// A process's memory from `/proc/PID/status`, in kB (VmRSS, VmHWM,
/// RssAnon), and its thread count.
fn memory_kb(pid: u32) -> Res<(u64, u64, u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().trim_end_matches("kB").trim())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("{path}: no {name} line"))
    };
    Ok((
        field("VmRSS:")?,
        field("VmHWM:")?,
        field("RssAnon:")?,
        field("Threads:")?,
    ))
}

/// The `member` values of every entry in an LDIF content file, by DN,
/// both lower-cased. Read by hand, not through the reconciler's code:
/// lines folded with a leading space are joined, entries end at a blank
/// line, and a base64 (`::`) DN or member value is an error (the estate
/// and the reconciler's writer have none).
fn ldif_members(path: &Path) -> Res<HashMap<String, HashSet<String>>> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix(' ') {
            if let Some((_, last)) = lines.last_mut() {
                last.push_str(rest);
                continue;
            }
        }
        lines.push((n + 1, line.to_owned()));
    }
    let mut groups: HashMap<String, HashSet<String>> = HashMap::new();
    let mut dn: Option<String> = None;
    for (n, line) in lines {
        let at = || format!("{}:{n}", path.display());
        if line.is_empty() {
            dn = None;
        } else if line.starts_with('#') {
        } else if let Some(v) = line.strip_prefix("dn:") {
            if v.starts_with(':') {
                return Err(format!("{}: a base64 DN", at()));
            }
            let name = v.trim().to_ascii_lowercase();
            groups.entry(name.clone()).or_default();
            dn = Some(name);
        } else if let Some(v) = line.strip_prefix("member:") {
            if v.starts_with(':') {
                return Err(format!("{}: a base64 member value", at()));
            }
            let Some(entry) = &dn else {
                return Err(format!("{}: member outside an entry", at()));
            };
            if let Some(set) = groups.get_mut(entry) {
                set.insert(v.trim().to_ascii_lowercase());
            }
        }
    }
    Ok(groups)
}

/// The groups whose host members differ from the tree's placements, by
/// reading the LDIF file: 0 when the file holds the desired state.
/// Members that are not hosts of the tree (user accounts) are left out.
fn groups_off(
    path: &Path,
    tree: &Tree,
    group_of: &[String],
    host_dns: &HashSet<String>,
) -> Res<usize> {
    let file = ldif_members(path)?;
    let mut desired: Vec<HashSet<String>> = vec![HashSet::new(); tree.proids.len()];
    for &(p, h) in tree.placed.keys() {
        desired[p].insert(tree.hosts[h].1.to_ascii_lowercase());
    }
    let mut off = 0;
    for (p, want) in desired.iter().enumerate() {
        let empty = HashSet::new();
        let have = file.get(&group_of[p]).unwrap_or(&empty);
        let hosts: HashSet<&String> = have.iter().filter(|m| host_dns.contains(*m)).collect();
        if hosts.len() != want.len() || !want.iter().all(|m| hosts.contains(m)) {
            off += 1;
        }
    }
    Ok(off)
}

fn sustain(args: SustainArgs) -> Res<()> {
    let mut tree = Tree::scan(&args.tree)?;
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let group_of: Vec<String> = tree
        .proids
        .iter()
        .map(|p| format!("cn={p}{},{}", args.group_suffix, args.group_ou).to_ascii_lowercase())
        .collect();
    let host_dns: HashSet<String> = tree
        .hosts
        .iter()
        .map(|(_, dn)| dn.to_ascii_lowercase())
        .collect();
    let timeout = Duration::from_secs(args.timeout);
    let every = args.every.max(1);
    let pace = Duration::from_secs(1) / args.rate.max(1);
    let mut alive: std::collections::VecDeque<(usize, usize)> = Default::default();
    let mut samples = Vec::new();
    let mut csv =
        String::from("changes,vm_rss_kb,vm_hwm_kb,rss_anon_kb,threads,catch_up_s,segment_s\n");

    // Waits until the file holds the desired state, then samples.
    let mut sample = |done: usize, segment: Duration, tree: &Tree| -> Res<serde_json::Value> {
        let started = Instant::now();
        loop {
            let off = groups_off(&args.ldif, tree, &group_of, &host_dns)?;
            if off == 0 {
                break;
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "after {done} changes, {off} groups in {} still differ from the tree after {timeout:?}",
                    args.ldif.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let caught_up = started.elapsed();
        let (rss, hwm, anon, threads) = memory_kb(args.pid)?;
        csv.push_str(&format!(
            "{done},{rss},{hwm},{anon},{threads},{:.3},{:.3}\n",
            caught_up.as_secs_f64(),
            segment.as_secs_f64()
        ));
        Ok(serde_json::json!({
            "changes": done,
            "vm_rss_kb": rss,
            "vm_hwm_kb": hwm,
            "rss_anon_kb": anon,
            "threads": threads,
            "catch_up_s": (caught_up.as_secs_f64() * 1000.0).round() / 1000.0,
            "segment_s": (segment.as_secs_f64() * 1000.0).round() / 1000.0,
        }))
    };

    samples.push(sample(0, Duration::ZERO, &tree)?);
    let (mut adds, mut removes) = (0usize, 0usize);
    let mut done = 0;
    while done < args.changes {
        let segment = every.min(args.changes - done);
        let started = Instant::now();
        for k in 0..segment {
            let due = started + pace * k as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // The first changes add up to the pool; after that a removal
            // of the oldest comes before each add, so every change is a
            // membership change and the state stays bounded.
            let i = done + k;
            if i >= args.pool && (i - args.pool) % 2 == 0 && !alive.is_empty() {
                let pair = alive.pop_front().ok_or("BUG: no placement to remove")?;
                tree.unplace(pair)?;
                removes += 1;
            } else {
                let pair = tree.pick_absent(&mut rng, &HashSet::new());
                tree.place(pair)?;
                alive.push_back(pair);
                adds += 1;
            }
        }
        let spent = started.elapsed();
        done += segment;
        samples.push(sample(done, spent, &tree)?);
    }
    if let Some(out) = &args.out {
        fs::write(out, &csv).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let summary = serde_json::json!({
        "changes": done,
        "adds": adds,
        "removes": removes,
        "rate": args.rate,
        "pool": args.pool,
        "every": every,
        "samples": samples,
    });
    println!("{summary}");
    Ok(())
}

/// The daemon's CPU time so far (utime + stime of `/proc/PID/stat`), in
/// clock ticks.
fn cpu_ticks(pid: u32) -> Res<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // the fields are counted from the last ')'. utime and stime are
    // fields 14 and 15, the 12th and 13th after it.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| format!("{path}: no command name"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("{path}: no field {}", i + 3))
    };
    Ok(tick(11)? + tick(12)?)
}

/// Clock ticks a second (`getconf CLK_TCK`).
fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// True when `url` (`http://HOST:PORT/PATH`) answers 200 to a GET.
fn http_ok(url: &str) -> Res<bool> {
    use std::io::Read;
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not an http:// address"))?;
    let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
        return Ok(false);
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /{path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if conn.write_all(request.as_bytes()).is_err() {
        return Ok(false);
    }
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    Ok(answer
        .lines()
        .next()
        .is_some_and(|status| status.split_whitespace().nth(1) == Some("200")))
}

/// Seconds since the Unix epoch of an RFC 3339 time in UTC or with an
/// offset (`2026-12-02T13:46:36.123456Z`), as the daemon's JSON log
/// stamps its lines.
fn rfc3339_unix(stamp: &str) -> Option<f64> {
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|v| v.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let (clock, offset_s) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (
            c,
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
        )
    };
    let mut hms = clock.splitn(3, ':');
    let h: i64 = hms.next()?.parse().ok()?;
    let min: i64 = hms.next()?.parse().ok()?;
    let sec: f64 = hms.next()?.parse().ok()?;
    // Days since 1970-01-01 of the date (proleptic Gregorian), counted in
    // 400-year eras from a year that starts in March.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60 - offset_s) as f64 + sec)
}

/// What the daemon logged about a stream: each applied change (its time
/// and latency), and the full resyncs.
#[derive(Default)]
struct SteadyLog {
    /// (the change came, latency in ms), Unix seconds.
    applied: Vec<(f64, f64)>,
    /// (start, end, the full sync's own seconds, groups read, changes
    /// planned, complete), Unix seconds.
    resyncs: Vec<(f64, f64, f64, u64, u64, bool)>,
}

/// Reads the daemon's JSON log from byte `from` on.
fn read_steady_log(path: &Path, from: u64) -> Res<SteadyLog> {
    let mut file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.seek(SeekFrom::Start(from))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = SteadyLog::default();
    let mut scan_started: Option<f64> = None;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let Some(at) = value["timestamp"].as_str().and_then(rfc3339_unix) else {
            continue;
        };
        let fields = &value["fields"];
        match fields["message"].as_str() {
            Some("change applied") => {
                if let Some(ms) = fields["latency_ms"].as_f64() {
                    // The line is logged when the whole pass is done; the
                    // change came `since_event_ms` before it.
                    let since = fields["since_event_ms"].as_f64().unwrap_or(ms);
                    out.applied.push((at - since / 1000.0, ms));
                }
            }
            Some("scanning the placement tree") if fields["why"] == "full resync" => {
                scan_started = Some(at);
            }
            Some("full sync done") => {
                let ms = fields["duration_ms"].as_f64().unwrap_or(0.0);
                let start = scan_started.take().unwrap_or(at - ms / 1000.0);
                out.resyncs.push((
                    start,
                    at,
                    ms / 1000.0,
                    fields["groups"].as_u64().unwrap_or(0),
                    fields["changes"].as_u64().unwrap_or(0),
                    fields["complete"].as_bool().unwrap_or(false),
                ));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The median of `values` (the mean of the two middle ones).
fn median(values: &[u64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2] as f64,
        n => (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0,
    }
}

/// The groups among `touched` whose host members differ from the tree's
/// placements (members that are not hosts of the tree left out).
async fn groups_differing(
    ldap: &mut Ldap,
    c: &Common,
    tree: &Tree,
    touched: &BTreeSet<usize>,
    host_dns: &HashSet<String>,
) -> Res<usize> {
    let mut desired: HashMap<usize, HashSet<String>> = HashMap::new();
    for &(p, h) in tree.placed.keys() {
        if touched.contains(&p) {
            desired
                .entry(p)
                .or_default()
                .insert(tree.hosts[h].1.to_ascii_lowercase());
        }
    }
    let mut off = 0;
    for &p in touched {
        let group = group_dn(c, &tree.proids[p]);
        let entries = base_search(ldap, &group, "(objectClass=*)", vec!["member"]).await?;
        let have: HashSet<String> = entries
            .into_iter()
            .flat_map(|e| {
                ldap3::SearchEntry::construct(e)
                    .attrs
                    .remove("member")
                    .unwrap_or_default()
            })
            .map(|m| m.to_ascii_lowercase())
            .filter(|m| host_dns.contains(m))
            .collect();
        let empty = HashSet::new();
        if &have != desired.get(&p).unwrap_or(&empty) {
            off += 1;
        }
    }
    Ok(off)
}

async fn steady(args: SteadyArgs) -> Res<()> {
    let c = &args.common;
    let mut tree = Tree::scan(&c.tree)?;
    let mut rng = fastrand::Rng::with_seed(c.seed);
    let host_dns: HashSet<String> = tree
        .hosts
        .iter()
        .map(|(_, dn)| dn.to_ascii_lowercase())
        .collect();
    let hz = clock_ticks_per_s();
    if let Some(url) = &args.ready_url {
        let deadline = Instant::now() + Duration::from_secs(c.timeout.max(300));
        while !http_ok(url)? {
            if Instant::now() > deadline {
                return Err(format!("{url}: not ready in time"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let log_from = fs::metadata(&args.log)
        .map_err(|e| format!("{}: {e}", args.log.display()))?
        .len();
    let total = args.rate as usize * args.seconds as usize;
    let rate = f64::from(args.rate.max(1));
    let mut alive: std::collections::VecDeque<(usize, usize)> = Default::default();
    let mut touched: BTreeSet<usize> = BTreeSet::new();
    let none_taken: HashSet<(usize, usize)> = HashSet::new();
    let (mut adds, mut removes) = (0usize, 0usize);
    // (seconds into the stream, CPU ticks, VmRSS kB)
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let mut csv = String::from("t_s,cpu_ticks,vm_rss_kb,changes\n");
    let mut sample = |t: f64, done: usize, samples: &mut Vec<(f64, u64, u64)>| -> Res<()> {
        let ticks = cpu_ticks(args.pid)?;
        let (rss, ..) = memory_kb(args.pid)?;
        csv.push_str(&format!("{t:.3},{ticks},{rss},{done}\n"));
        samples.push((t, ticks, rss));
        Ok(())
    };
    let start_unix = unix_now();
    let started = Instant::now();
    sample(0.0, 0, &mut samples)?;
    let mut next_sample = 1u32;
    let mut behind_max = Duration::ZERO;
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        loop {
            let now = Instant::now();
            let tick = started + Duration::from_secs(u64::from(next_sample));
            if tick <= now.min(due) {
                sample(tick.duration_since(started).as_secs_f64(), i, &mut samples)?;
                next_sample += 1;
                continue;
            }
            if due > now {
                std::thread::sleep(due.min(tick) - now);
                continue;
            }
            behind_max = behind_max.max(now - due);
            break;
        }
        // As `sustain`: additions up to the pool, then by turns the
        // removal of the oldest and a new addition, each a membership
        // change.
        if i >= args.pool && (i - args.pool) % 2 == 0 && !alive.is_empty() {
            let pair = alive.pop_front().ok_or("BUG: no placement to remove")?;
            tree.unplace(pair)?;
            removes += 1;
        } else {
            let pair = tree.pick_absent(&mut rng, &none_taken);
            tree.place(pair)?;
            touched.insert(pair.0);
            alive.push_back(pair);
            adds += 1;
        }
    }
    // The last second, sampled when it is over.
    let end = started + Duration::from_secs(u64::from(args.seconds));
    if let Some(wait) = end.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    let stream = started.elapsed();
    sample(stream.as_secs_f64(), total, &mut samples)?;
    let end_unix = start_unix + stream.as_secs_f64();

    let mut ldap = connect(c).await?;
    let timeout = Duration::from_secs(c.timeout);
    let settling = Instant::now();
    loop {
        let off = groups_differing(&mut ldap, c, &tree, &touched, &host_dns).await?;
        if off == 0 {
            break;
        }
        if settling.elapsed() > timeout {
            return Err(format!(
                "{off} of the {} groups the stream changed still differ from the tree after {timeout:?}",
                touched.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled = settling.elapsed();
    let _ = ldap.unbind().await;
    // What the daemon logged about the last changes is written by now:
    // the directory holds them.
    let log = read_steady_log(&args.log, log_from)?;

    let (first, last) = (samples[0], samples[samples.len() - 1]);
    let cpu_s = (last.1 - first.1) as f64 / hz;
    let per_second: Vec<f64> = samples
        .windows(2)
        .map(|w| (w[1].1 - w[0].1) as f64 / hz / (w[1].0 - w[0].0).max(1e-9) * 100.0)
        .collect();
    let settled_rss: Vec<u64> = samples
        .iter()
        .filter(|s| s.0 >= f64::from(args.warmup))
        .map(|s| s.2)
        .collect();
    let window = (settled_rss.len() / 2).min(10);
    let growth_kb = if window == 0 {
        f64::NAN
    } else {
        median(&settled_rss[settled_rss.len() - window..]) - median(&settled_rss[..window])
    };

    let overlaps = |from: f64, to: f64| log.resyncs.iter().any(|r| from <= r.1 && to >= r.0);
    let (mut during, mut outside, mut all) = (Vec::new(), Vec::new(), Vec::new());
    let mut taken_at = Vec::new();
    for &(received, ms) in &log.applied {
        let at = received + ms / 1000.0;
        all.push(ms);
        if overlaps(received, at) {
            during.push(ms);
        } else {
            outside.push(ms);
        }
        if received >= start_unix && received <= end_unix {
            taken_at.push(received);
        }
    }
    taken_at.sort_by(f64::total_cmp);
    let mut gap = (0.0f64, start_unix);
    for w in taken_at.windows(2) {
        if w[1] - w[0] > gap.0 {
            gap = (w[1] - w[0], w[0]);
        }
    }
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let resyncs: Vec<serde_json::Value> = log
        .resyncs
        .iter()
        .map(|&(from, to, sync_s, groups, changes, complete)| {
            serde_json::json!({
                "start_unix": r3(from),
                "end_unix": r3(to),
                "start_s": r3(from - start_unix),
                "duration_s": r3(to - from),
                // The tree's scan before it (the daemon goes on taking
                // events and writing batches meanwhile).
                "scan_s": r3(to - from - sync_s),
                "in_stream": from >= start_unix && from <= end_unix,
                "groups": groups,
                "changes": changes,
                "complete": complete,
            })
        })
        .collect();
    if let Some(out) = &c.out {
        fs::write(out, &csv).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    let mut per_sorted = per_second.clone();
    per_sorted.sort_by(f64::total_cmp);
    let summary = serde_json::json!({
        "rate": args.rate,
        "seconds": args.seconds,
        "changes": total,
        "adds": adds,
        "removes": removes,
        "groups_changed": touched.len(),
        "stream_start_unix": r3(start_unix),
        "stream_end_unix": r3(end_unix),
        "stream_s": r3(stream.as_secs_f64()),
        "achieved_rate": r1(total as f64 / stream.as_secs_f64()),
        "behind_schedule_max_ms": r1(behind_max.as_secs_f64() * 1000.0),
        "settled_s": r3(settled.as_secs_f64()),
        "cpu": {
            "clock_ticks": last.1 - first.1,
            "seconds": r3(cpu_s),
            "pct_of_one_core": r1(cpu_s / stream.as_secs_f64() * 100.0),
            "per_second_pct_p50": r1(percentile(&per_sorted, 50.0)),
            "per_second_pct_max": r1(per_sorted.last().copied().unwrap_or(f64::NAN)),
        },
        "rss_kb": {
            "first": first.2,
            "last": last.2,
            "max": samples.iter().map(|s| s.2).max().unwrap_or(0),
            "growth": growth_kb,
            "warmup_s": args.warmup,
            "window": window,
            "samples": samples.iter().map(|s| s.2).collect::<Vec<u64>>(),
        },
        "latency_ms": {
            "all": stats(&all),
            "during_resync": stats(&during),
            "outside_resync": stats(&outside),
        },
        "resyncs": resyncs,
        "intake": {
            "longest_gap_ms": r1(gap.0 * 1000.0),
            "gap_start_s": r3(gap.1 - start_unix),
            "during_resync": overlaps(gap.1, gap.1 + gap.0),
            "events_dated": taken_at.len(),
        },
    });
    println!("{summary}");
    let _ = std::io::stdout().flush();
    Ok(())
}
