//! What the daemon tells its operators: Prometheus metrics at `/metrics`,
//! liveness at `/healthz` and readiness at `/readyz` (200 once the initial
//! sync has been applied, and only while this replica may write).
//!
//! The metrics live in one [`Metrics`] value shared by the event loop and the
//! HTTP server; the encoding is `prometheus-client`'s and the HTTP is
//! hyper's, so nothing here parses HTTP by hand.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// Labels of the Modify request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `success`, `failure` or `vanished`.
    pub outcome: &'static str,
}

/// Labels of the role gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    /// `leader` or `follower`.
    pub role: &'static str,
}

/// Labels of the build information gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// The crate version the binary was built from.
    pub version: &'static str,
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Servers in scope.
    pub servers_in_scope: Gauge,
    /// Placements on in-scope servers.
    pub placements: Gauge,
    /// Proids with at least one placement.
    pub proids: Gauge,
    /// Proids waiting to be reconciled.
    pub dirty_groups: Gauge,
    /// Proids with placements and no group.
    pub missing_groups: Gauge,
    /// Modify requests sent, by the outcome of their group.
    pub modify_requests: Family<OutcomeLabels, Counter>,
    /// Retries after transient directory failures.
    pub retries: Counter,
    /// Full resyncs started.
    pub resyncs: Counter,
    /// Plans whose deletions the guard refused.
    pub guard_refusals: Counter,
    /// Deletions held back by the guard right now.
    pub refused_deletions_pending: Gauge,
    /// Server files that could not be read or parsed.
    pub server_file_errors: Counter,
    /// Full rescans of the tree (overflow or doubt).
    pub rescans: Counter,
    /// Seconds from the first event that dirtied a proid to its change being applied.
    pub event_to_applied: Histogram,
    /// Unix time of the last successful full sync.
    pub last_full_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 for the current role.
    pub role: Family<RoleLabels, Gauge>,
    /// Unix time of the last role change.
    pub last_role_change: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// 1 while `/readyz` answers 200, else 0: alerts cannot scrape `/readyz`.
    ready_gauge: Gauge,
    ready: AtomicBool,
    not_ready_reason: Mutex<String>,
    current_role: Mutex<&'static str>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, registered under the `gmsa` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gmsa");
        let m = Metrics {
            servers_in_scope: Gauge::default(),
            placements: Gauge::default(),
            proids: Gauge::default(),
            dirty_groups: Gauge::default(),
            missing_groups: Gauge::default(),
            modify_requests: Family::default(),
            retries: Counter::default(),
            resyncs: Counter::default(),
            guard_refusals: Counter::default(),
            refused_deletions_pending: Gauge::default(),
            server_file_errors: Counter::default(),
            rescans: Counter::default(),
            event_to_applied: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            last_full_sync: Gauge::default(),
            role: Family::default(),
            last_role_change: Gauge::default(),
            ready_gauge: Gauge::default(),
            ready: AtomicBool::new(false),
            not_ready_reason: Mutex::new("initial sync not done".into()),
            current_role: Mutex::new("follower"),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "servers_in_scope",
            "Servers in scope",
            m.servers_in_scope.clone(),
        );
        r.register(
            "placements",
            "Placements on in-scope servers",
            m.placements.clone(),
        );
        r.register(
            "proids",
            "Proids with at least one placement",
            m.proids.clone(),
        );
        r.register(
            "dirty_groups",
            "Proids waiting to be reconciled",
            m.dirty_groups.clone(),
        );
        r.register(
            "missing_groups",
            "Proids with placements and no group",
            m.missing_groups.clone(),
        );
        r.register(
            "modify_requests",
            "Modify requests sent, by the outcome of their group",
            m.modify_requests.clone(),
        );
        r.register(
            "retries",
            "Retries after transient directory failures",
            m.retries.clone(),
        );
        r.register("resyncs", "Full resyncs started", m.resyncs.clone());
        r.register(
            "guard_refusals",
            "Plans whose deletions the mass-deletion guard refused",
            m.guard_refusals.clone(),
        );
        r.register(
            "refused_deletions_pending",
            "Deletions held back by the mass-deletion guard",
            m.refused_deletions_pending.clone(),
        );
        r.register(
            "server_file_errors",
            "Server files that could not be read or parsed",
            m.server_file_errors.clone(),
        );
        r.register(
            "rescans",
            "Full rescans of the placement tree",
            m.rescans.clone(),
        );
        r.register(
            "event_to_applied_seconds",
            "Seconds from the first event that dirtied a proid to its change being applied",
            m.event_to_applied.clone(),
        );
        r.register(
            "last_full_sync_timestamp_seconds",
            "Unix time of the last successful full sync",
            m.last_full_sync.clone(),
        );
        r.register("role", "1 for this replica's current role", m.role.clone());
        r.register(
            "last_role_change_timestamp_seconds",
            "Unix time of the last role change",
            m.last_role_change.clone(),
        );
        r.register(
            "ready",
            "1 while this replica is ready (as /readyz), 0 otherwise",
            m.ready_gauge.clone(),
        );
        // Constant 1, labelled so that dashboards and alerts can tell
        // which version each replica runs.
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register(
            "build_info",
            "Build information of this binary; the value is always 1",
            build_info,
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) = encode(&mut text, &self.registry) {
            panic!("BUG: encoding metrics into a String cannot fail: {err}");
        }
        text
    }

    /// Marks the daemon ready (or not, with the reason `/readyz` shows).
    pub fn set_ready(&self, ready: Result<(), String>) {
        self.ready_gauge.set(i64::from(ready.is_ok()));
        match ready {
            Ok(()) => self.ready.store(true, Ordering::SeqCst),
            Err(reason) => {
                self.ready.store(false, Ordering::SeqCst);
                *self
                    .not_ready_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = reason;
            }
        }
    }

    /// True once the daemon is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn readiness(&self) -> (StatusCode, String) {
        let role = self.role();
        if self.is_ready() {
            return (StatusCode::OK, format!("ready ({role})\n"));
        }
        let reason = self
            .not_ready_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let body = format!("not ready ({role}): {reason}\n");
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }

    /// The current role, as `/readyz` shows it.
    pub fn role(&self) -> &'static str {
        *self.current_role.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the role and the time it changed.
    pub fn set_role(&self, role: &'static str) {
        *self.current_role.lock().unwrap_or_else(|p| p.into_inner()) = role;
        for r in ["leader", "follower"] {
            self.role
                .get_or_create(&RoleLabels { role: r })
                .set(i64::from(r == role));
        }
        self.last_role_change.set(unix_now());
    }
}

/// Seconds since the Unix epoch, as a float.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// Binds the metrics endpoint. Binding happens before the daemon starts
/// its work so that a bad address is a startup error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                warn!(error = %err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, req.uri().path())) }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %err, "metrics connection ended");
            }
        });
    }
}

fn respond(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let (status, body) = metrics.readiness();
            (status, "text/plain", body)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_metrics_with_their_prefix() {
        let m = Metrics::new();
        m.servers_in_scope.set(3);
        m.modify_requests
            .get_or_create(&OutcomeLabels { outcome: "success" })
            .inc_by(2);
        m.event_to_applied.observe(0.12);
        let text = m.encode();
        assert!(text.contains("gmsa_servers_in_scope 3"), "{text}");
        assert!(
            text.contains("gmsa_modify_requests_total{outcome=\"success\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("gmsa_event_to_applied_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn readiness_follows_the_flag() {
        let m = Metrics::new();
        assert_eq!(
            respond(&m, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        m.set_ready(Ok(()));
        assert_eq!(respond(&m, "/readyz").status(), StatusCode::OK);
        m.set_ready(Err("lost the lock".into()));
        assert_eq!(
            respond(&m, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(respond(&m, "/healthz").status(), StatusCode::OK);
        assert_eq!(respond(&m, "/nope").status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn ready_gauge_follows_readiness() {
        let m = Metrics::new();
        assert!(m.encode().contains("\ngmsa_ready 0\n"), "{}", m.encode());
        m.set_ready(Ok(()));
        assert!(m.encode().contains("\ngmsa_ready 1\n"), "{}", m.encode());
        m.set_ready(Err("zookeeper: connection lost".into()));
        assert!(m.encode().contains("\ngmsa_ready 0\n"), "{}", m.encode());
    }

    #[test]
    fn build_info_names_the_crate_version() {
        let text = Metrics::new().encode();
        let line = format!(
            "\ngmsa_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&line), "{text}");
        assert!(text.contains("# TYPE gmsa_build_info gauge\n"), "{text}");
    }
}
