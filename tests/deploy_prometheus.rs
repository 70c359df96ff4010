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
use std::io::{Read, Write};
use std::net::TcpStream;
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
    names_with(text, "gmsa_")
}

/// Every metric name in `text` that starts with `prefix`.
fn names_with(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
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

/// One GET: the response's Content-Type and body.
fn get_with_content_type(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    (content_type, body.to_owned())
}

/// Fails the test unless `promtool check metrics` accepts `body` without a
/// word of complaint.
fn promtool_check_metrics(body: &str) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics rejects /metrics ({}):\n{said}\n/metrics:\n{body}",
        out.status
    );
}

#[test]
fn promtool_check_metrics_fails_on_an_openmetrics_body() {
    // The check above can fail: the body /metrics served before (the
    // OpenMetrics text, counters declared without `_total`) is rejected.
    let body = "# HELP gmsa_retries Retries after transient directory failures.\n\
                # TYPE gmsa_retries counter\n\
                gmsa_retries_total 0\n\
                # EOF\n";
    let result = std::panic::catch_unwind(|| promtool_check_metrics(body));
    let message = result.expect_err("promtool accepted an OpenMetrics counter");
    let text = message
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(text.contains("no help text"), "{text}");
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

    // OPERATIONS.md's table documents every family the daemon serves,
    // its own and the process metrics.
    let operations = read("deploy/OPERATIONS.md");
    let documented: BTreeSet<String> = operations
        .lines()
        .filter(|l| l.starts_with("| `gmsa_") || l.starts_with("| `process_"))
        .flat_map(|l| {
            let name = l.split('|').nth(1).unwrap_or_default();
            let mut names = names_with(name, "gmsa_");
            names.extend(names_with(name, "process_"));
            names
        })
        .flat_map(|n| {
            let family = n.strip_suffix("_total").unwrap_or(&n).to_owned();
            [n, family]
        })
        .collect();
    let undocumented: Vec<_> = families(&body)
        .into_iter()
        .filter(|f| !documented.contains(f))
        .collect();
    assert!(
        undocumented.is_empty(),
        "metrics missing from the table in deploy/OPERATIONS.md: {undocumented:?}"
    );
    for process in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        assert!(served.contains(process), "no {process} in\n{body}");
    }

    // What Prometheus scrapes: the body passes `promtool check metrics`
    // (help text on every family, counters named as their samples) and
    // is declared as the format it is in.
    let (content_type, scraped) = get_with_content_type(port, "/metrics");
    assert_eq!(
        content_type, "text/plain; version=0.0.4; charset=utf-8",
        "the Prometheus text format's Content-Type"
    );
    assert!(
        !scraped.contains("# EOF"),
        "an OpenMetrics body:\n{scraped}"
    );
    promtool_check_metrics(&scraped);

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
