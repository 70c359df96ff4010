//! The Prometheus files in `deploy/prometheus/` against the binary they
//! describe. Alert rules and dashboards fail silently when a metric is
//! renamed: an expression over a name nobody exports is simply empty. So
//! every `gmsa_*` name in the rules, their unit tests and the Grafana
//! dashboard must be one that a running daemon serves at `/metrics`, every
//! metric it serves must be in OPERATIONS.md's table, and every dashboard
//! query must be PromQL that `promtool` parses. (`promtool check rules` and
//! `promtool test rules` on the rules themselves run in `scripts/test`.)

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::daemon::http_get;
use support::tree::{groups_ldif, Tree};
use support::{free_port, tool, wait_until};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Every `gmsa_...` metric name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("gmsa_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The sample names a scrape of `body` can return: from each `# TYPE`
/// line (a family with no samples yet still has one) and every sample.
fn exported(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut words = decl.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            match kind {
                "counter" if !name.ends_with("_total") => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {}
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// The metric families a scrape of `body` declares (the `# TYPE` names).
fn families(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Every PromQL expression of the dashboard: panel targets and the
/// template variables' queries.
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                dashboard_queries(v, out);
            }
        }
        _ => {}
    }
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/prometheus/grafana-dashboard.json"))
        .expect("grafana-dashboard.json is valid JSON")
}

/// `run` as a child process; killed if the test fails before it stops it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metrics(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

#[test]
fn the_daemon_exports_every_metric_the_alerts_and_the_dashboard_use() {
    let tree = Tree::new();
    tree.server("h1", "p1", "cn=h1,ou=Computers,dc=ad,dc=com");
    tree.place("h1", "web.app#1");
    let dir = tempfile::tempdir().expect("temp dir");
    let directory = dir.path().join("directory.ldif");
    fs::write(&directory, groups_ldif(&[("web-gmsa-hosts", &[])])).expect("directory");
    let port = free_port();
    let child = support::e2e::bin()
        .arg("run")
        .arg(format!("--fs-root={}", tree.root().display()))
        .arg(format!("--directory={}", directory.display()))
        .arg("--group-ou=OU=Groups,DC=ad,DC=com")
        .arg("--partition=p1")
        .arg("--no-lock")
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gmsa-reconciler run");
    let mut daemon = Daemon(child);

    // Without `.modified` the daemon waits, and says so in gmsa_ready.
    wait_until("the metrics endpoint", Duration::from_secs(20), || {
        http_get(port, "/metrics").0 == 200
    });
    let waiting = metrics(port);
    assert!(waiting.contains("\ngmsa_ready 0\n"), "{waiting}");
    let version = format!(
        "\ngmsa_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    assert!(waiting.contains(&version), "{waiting}");

    tree.mark_ready();
    wait_until("/readyz to answer 200", Duration::from_secs(20), || {
        http_get(port, "/readyz").0 == 200
    });
    let body = metrics(port);
    assert!(body.contains("\ngmsa_ready 1\n"), "{body}");

    let served = exported(&body);
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts.test.yml",
        "deploy/prometheus/grafana-dashboard.json",
    ] {
        let used = names_in(&read(file));
        assert!(!used.is_empty(), "{file} names no gmsa_ metric");
        let unknown: Vec<_> = used.difference(&served).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the daemon does not export: {unknown:?}\n/metrics:\n{body}"
        );
    }

    // OPERATIONS.md's table documents every family the daemon serves.
    let operations = read("deploy/OPERATIONS.md");
    let documented: BTreeSet<String> = operations
        .lines()
        .filter(|l| l.starts_with("| `gmsa_"))
        .flat_map(|l| names_in(l.split('|').nth(1).unwrap_or_default()))
        .flat_map(|n| {
            let family = n.strip_suffix("_total").unwrap_or(&n).to_owned();
            [n, family]
        })
        .collect();
    let undocumented: Vec<_> = families(&body)
        .into_iter()
        .filter(|f| f.starts_with("gmsa_") && !documented.contains(f))
        .collect();
    assert!(
        undocumented.is_empty(),
        "metrics missing from the table in deploy/OPERATIONS.md: {undocumented:?}"
    );

    unsafe {
        libc::kill(daemon.0.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = daemon.0.try_wait().expect("wait for the daemon") {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "run exited with {status} on SIGTERM");
}

#[test]
fn every_dashboard_query_is_promql_that_promtool_accepts() {
    let dashboard = dashboard();
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("every panel has a numeric id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        if panel["type"] != "row" {
            let targets = panel["targets"].as_array().map(Vec::len).unwrap_or(0);
            assert!(targets > 0, "panel {:?} has no query", panel["title"]);
        }
    }
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() > 20, "only {} queries found", queries.len());

    // Grafana's variables, given values Prometheus would see, turn every
    // query into a recording rule for `promtool check rules` to parse.
    let dir = tempfile::tempdir().expect("temp dir");
    let rules = dir.path().join("dashboard-queries.yml");
    let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        let promql = query
            .replace("$__rate_interval", "2m")
            .replace("$instance", ".*")
            .replace("$job", "gmsa-reconciler");
        assert!(!promql.contains('$'), "unknown variable in {query}");
        let promql = match promql.strip_prefix("label_values(") {
            // label_values(selector, label) is Grafana's, not PromQL; its
            // selector is.
            Some(args) => args
                .rsplit_once(',')
                .expect("label_values args")
                .0
                .to_owned(),
            None => promql,
        };
        let quoted = serde_json::to_string(&promql).expect("quote");
        text += &format!("      - record: dashboard:query{i}\n        expr: {quoted}\n");
    }
    fs::write(&rules, &text).expect("write rules");
    let out = Command::new(tool("promtool"))
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool rejects a dashboard query:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
