//! What the daemon tells its operators: Prometheus metrics at `/metrics`,
//! liveness at `/healthz` and readiness at `/readyz` (200 once the initial
//! sync has been applied, and only while this replica may write).
//!
//! The metrics live in one [`Metrics`] value shared by the event loop and the
//! HTTP server; the encoding is `prometheus-client`'s and the HTTP is
//! hyper's, so nothing here parses HTTP by hand. `/metrics` is the
//! Prometheus text format 0.0.4 under its own `Content-Type`: the format
//! every Prometheus server and `promtool check metrics` read, where an
//! OpenMetrics body sent as `text/plain` loses its counters' help text.
//! Beside the daemon's own `gmsa_*` metrics it serves the standard
//! `process_*` ones (memory, file descriptors, CPU, start time), read from
//! `/proc` on each scrape by `metrics-process`.
//!
//! Readiness is also told to systemd (`Type=notify`): `READY=1` once, when
//! the daemon first becomes ready, and `STATUS=` whenever readiness
//! changes, so that `systemctl status` shows why a replica is not ready.
//!
//! The endpoint listens to anyone who can reach it, so it is bounded
//! ([`Limits`]): a connection over the cap is closed as soon as it is
//! accepted, a request head must arrive in time and fit a small buffer,
//! request bodies are refused, and a connection that stops moving bytes is
//! dropped. A flood of connections therefore holds at most the cap's file
//! descriptors, never the ones reconciliation needs.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::daemon::NotReady;
use crate::model::escape_controls;

/// Labels of the Modify request counter and of the join command counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Modify requests: `success`, `vanished`, or what failed: an LDAP
    /// result code's name, `unreachable`, `stalled` or `failure`. Join
    /// commands: `success`, `failure`, `timeout` or `error`.
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
    /// Runs of the node's join command, by how they ended.
    pub join_hook_runs: Family<OutcomeLabels, Counter>,
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
    /// Audit records of applied changes that `--audit-log` could not take.
    pub audit_write_failures: Counter,
    /// Rescans of the tree after the startup scan (overflow, doubt, watcher
    /// restart, periodic resync).
    pub rescans: Counter,
    /// Requests for a rescan (overflows, doubts), most of them coalesced.
    pub rescan_requests: Counter,
    /// Groups re-read one by one, outside full syncs.
    pub group_reads: Counter,
    /// Times the tree watcher was started after the first (it failed or stopped).
    pub watcher_restarts: Counter,
    /// Connections to this endpoint closed at once because of the cap.
    pub http_connections_refused: Counter,
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
    not_ready_reason: Mutex<NotReady>,
    current_role: Mutex<&'static str>,
    /// What the service manager has been told of readiness.
    notified: Mutex<Notified>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics: the daemon's own under the `gmsa` prefix,
    /// and the standard process metrics.
    pub fn new() -> Metrics {
        let m = Metrics {
            servers_in_scope: Gauge::default(),
            placements: Gauge::default(),
            proids: Gauge::default(),
            dirty_groups: Gauge::default(),
            missing_groups: Gauge::default(),
            modify_requests: Family::default(),
            join_hook_runs: Family::default(),
            retries: Counter::default(),
            resyncs: Counter::default(),
            guard_refusals: Counter::default(),
            refused_deletions_pending: Gauge::default(),
            server_file_errors: Counter::default(),
            audit_write_failures: Counter::default(),
            rescans: Counter::default(),
            rescan_requests: Counter::default(),
            group_reads: Counter::default(),
            watcher_restarts: Counter::default(),
            http_connections_refused: Counter::default(),
            event_to_applied: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            last_full_sync: Gauge::default(),
            role: Family::default(),
            last_role_change: Gauge::default(),
            ready_gauge: Gauge::default(),
            ready: AtomicBool::new(false),
            not_ready_reason: Mutex::new(NotReady::NotSynced),
            current_role: Mutex::new("follower"),
            notified: Mutex::new(Notified::default()),
            registry: Registry::default(),
        };
        process_start_fallback();
        // The process metrics keep their standard names, without the prefix.
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let r = registry.sub_registry_with_prefix("gmsa");
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
            "join_hook_runs",
            "Runs of the node's join command (--on-join-command), by outcome: success, failure, timeout, error",
            m.join_hook_runs.clone(),
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
            "audit_write_failures",
            "Audit records of applied membership changes that could not be written to --audit-log (each is logged in full at ERROR)",
            m.audit_write_failures.clone(),
        );
        r.register(
            "rescans",
            "Rescans of the placement tree after the startup scan (overflow, doubt, watcher restart, periodic resync)",
            m.rescans.clone(),
        );
        r.register(
            "rescan_requests",
            "Requests for a rescan of the tree (overflows, doubts), coalesced into rescans",
            m.rescan_requests.clone(),
        );
        r.register(
            "group_reads",
            "Groups re-read one by one outside full syncs",
            m.group_reads.clone(),
        );
        r.register(
            "watcher_restarts",
            "Times the tree watcher was restarted after failing or stopping",
            m.watcher_restarts.clone(),
        );
        r.register(
            "http_connections_refused",
            "Connections to the metrics endpoint closed at once because of the connection cap",
            m.http_connections_refused.clone(),
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

    /// Every metric in the Prometheus text format 0.0.4
    /// ([`METRICS_CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) = prometheus_text::encode(&mut text, &self.registry) {
            panic!("BUG: encoding metrics into a String cannot fail: {err}");
        }
        text
    }

    /// Marks the daemon ready (or not, with the reason `/readyz` shows),
    /// and tells systemd when that changed.
    pub fn set_ready(&self, ready: Result<(), NotReady>) {
        self.ready_gauge.set(i64::from(ready.is_ok()));
        // The flag is set before systemd hears READY=1, so that `/readyz`
        // already answers 200 when the unit counts as started.
        match &ready {
            Ok(()) => self.ready.store(true, Ordering::SeqCst),
            Err(reason) => {
                self.ready.store(false, Ordering::SeqCst);
                *self
                    .not_ready_reason
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = reason.clone();
            }
        }
        self.notify_readiness(ready);
    }

    /// Sends the service manager what changed in readiness, if anything.
    /// Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.
    fn notify_readiness(&self, ready: Result<(), NotReady>) {
        let mut notified = self.notified.lock().unwrap_or_else(|p| p.into_inner());
        let Some(message) = notified.update(ready) else {
            return;
        };
        let mut states = Vec::with_capacity(2);
        if message.ready {
            states.push(sd_notify::NotifyState::Ready);
        }
        states.push(sd_notify::NotifyState::Status(&message.status));
        if let Err(err) = sd_notify::notify(&states) {
            // Readiness still shows at /readyz; systemd alone misses it.
            warn!(error = %err, "cannot notify systemd of readiness");
        }
    }

    /// True once the daemon is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub(crate) fn readiness(&self) -> (StatusCode, String) {
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

/// The `Content-Type` of `/metrics`: the Prometheus text format 0.0.4,
/// which is what [`Metrics::encode`] writes.
pub const METRICS_CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Readiness as the service manager last heard it.
#[derive(Debug, Default)]
struct Notified {
    /// The state last sent; `None` before the first.
    last: Option<Result<(), NotReady>>,
    /// `READY=1` has gone out: systemd takes it once, as the end of startup.
    ready_sent: bool,
}

/// One notification for the service manager.
#[derive(Debug, PartialEq, Eq)]
struct Notification {
    /// Send `READY=1` (the first time the daemon is ready).
    ready: bool,
    /// The `STATUS=` text, one line whatever the reason holds.
    status: String,
}

impl Notified {
    /// What to send now that readiness is `now`; `None` when systemd
    /// already knows it. The reason is quoted with its control characters
    /// escaped: the protocol is one `KEY=value` per line, and a reason
    /// quoting a name from the tree must not add a line such as `READY=1`.
    fn update(&mut self, now: Result<(), NotReady>) -> Option<Notification> {
        if self.last.as_ref() == Some(&now) {
            return None;
        }
        let status = match &now {
            Ok(()) => "ready".to_owned(),
            Err(reason) => format!("not ready: {}", escape_controls(&reason.to_string())),
        };
        let ready = now.is_ok() && !self.ready_sent;
        self.ready_sent |= ready;
        self.last = Some(now);
        Some(Notification { ready, status })
    }
}

/// The standard `process_*` metrics of this process, read on each scrape.
/// Help texts end in a full stop as the registry's do (it adds one).
/// The reads are of `/proc/self`, which never waits on a disk, so they run
/// on the thread answering the scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = metrics_process::collector::collect();
        if let Some(cpu) = now.cpu_seconds_total {
            encoder
                .encode_descriptor(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds.",
                    None,
                    MetricType::Counter,
                )?
                .encode_counter::<NoLabelSet, _, f64>(&cpu, None)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                now.resident_memory_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                now.virtual_memory_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                now.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit).",
                now.max_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                now.threads,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                encoder
                    .encode_descriptor(name, help, None, MetricType::Gauge)?
                    .encode_gauge(&value)?;
            }
        }
        // Under systemd's ProcSubset=pid the kernel's boot time is hidden,
        // and the crate cannot tell the start time without it.
        let start = now
            .start_time_seconds
            .map(|s| s as f64)
            .unwrap_or_else(process_start_fallback);
        encoder
            .encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&start)?;
        Ok(())
    }
}

/// When this process first set up its metrics (the daemon does so as it
/// starts): the start time when the kernel's cannot be read.
fn process_start_fallback() -> f64 {
    static FIRST: OnceLock<f64> = OnceLock::new();
    *FIRST.get_or_init(unix_now)
}

/// Binds the metrics endpoint. Binding happens before the daemon starts
/// its work so that a bad address is a startup error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The bounds of the metrics endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; one more is closed as soon as it is
    /// accepted rather than queued holding a file descriptor.
    pub max_connections: usize,
    /// From the moment a connection waits for a request (just opened, or
    /// after an answer) until that request's head is complete. hyper starts
    /// this clock while a kept-alive connection waits, so it also closes
    /// idle keep-alive connections.
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves either way for this long is
    /// closed (a client that stops reading its answer, for example).
    pub idle_timeout: Duration,
    /// The largest request head accepted (hyper's read buffer, which
    /// cannot be under 8 KiB); request bodies are refused outright.
    pub max_request_head: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        // A Prometheus server and an operator's curl need a handful of
        // connections and a few hundred bytes of request.
        Limits {
            max_connections: 32,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            max_request_head: 16 * 1024,
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` with the default
/// [`Limits`] until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    serve_with(listener, metrics, Limits::default()).await
}

/// Serves the endpoint within `limits` until the task is dropped.
pub async fn serve_with(listener: TcpListener, metrics: Arc<Metrics>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_request_head.max(8192));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Out of file descriptors, most likely: the kernel keeps
                // the connection queued until one is free.
                warn!(error = %err, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.http_connections_refused.inc();
            debug!(%peer, "metrics endpoint: too many connections; closing this one");
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (io, last_moved) = Watched::new(stream);
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&metrics, &req)) }
            });
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::select! {
                ended = conn => if let Err(err) = ended {
                    debug!(%peer, error = %err, "metrics connection ended");
                },
                () = idle(&last_moved, limits.idle_timeout) => {
                    debug!(%peer, "metrics connection idle; closing it");
                }
            }
        });
    }
}

/// Completes once no byte has moved for `limit`.
async fn idle(last_moved: &Moved, limit: Duration) {
    loop {
        let since = last_moved.elapsed();
        if since >= limit {
            return;
        }
        tokio::time::sleep(limit - since).await;
    }
}

/// When bytes last moved on a connection.
struct Moved {
    epoch: Instant,
    millis: AtomicU64,
}

impl Moved {
    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.millis.store(now, Ordering::Relaxed);
    }

    fn elapsed(&self) -> Duration {
        let at = Duration::from_millis(self.millis.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(at)
    }
}

/// A stream that notes when bytes move through it.
struct Watched<S> {
    inner: S,
    moved: Arc<Moved>,
}

impl<S> Watched<S> {
    fn new(inner: S) -> (Watched<S>, Arc<Moved>) {
        let moved = Arc::new(Moved {
            epoch: Instant::now(),
            millis: AtomicU64::new(0),
        });
        let watched = Watched {
            inner,
            moved: moved.clone(),
        };
        (watched, moved)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.moved.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The answer to one request. Nothing here takes a body, so a request
/// that brings one is refused and its connection closed rather than read.
fn answer<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    let headers = req.headers();
    let has_body = headers.contains_key(hyper::header::TRANSFER_ENCODING)
        || headers
            .get(hyper::header::CONTENT_LENGTH)
            .is_some_and(|len| len.as_bytes() != b"0");
    if has_body {
        let mut response = Response::new(Full::new(Bytes::from_static(b"no request body\n")));
        *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return response;
    }
    respond(metrics, req.uri().path())
}

fn respond(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (StatusCode::OK, METRICS_CONTENT_TYPE, metrics.encode()),
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

/// The value of the unlabelled sample `name` in `text`, as
/// [`Metrics::encode`] writes it.
#[cfg(test)]
pub(crate) fn sample(text: &str, name: &str) -> f64 {
    let prefix = format!("{name} ");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line.parse().expect("a number")
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

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Serves on a free loopback port within `limits`.
    async fn endpoint(limits: Limits) -> (SocketAddr, Arc<Metrics>) {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new());
        tokio::spawn(serve_with(listener, metrics.clone(), limits));
        (addr, metrics)
    }

    /// Everything the server sends until it closes (or 10 s pass).
    async fn read_until_closed(stream: &mut TcpStream) -> Option<String> {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out));
        match read.await {
            Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once() {
        let limits = Limits {
            max_connections: 2,
            ..Limits::default()
        };
        let (addr, metrics) = endpoint(limits).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            // A full exchange proves the server took the connection.
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            let mut buf = [0u8; 256];
            let n = stream.read(&mut buf).await.expect("read");
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            held.push(stream);
        }
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let got = read_until_closed(&mut third).await;
        assert_eq!(got.as_deref(), Some(""), "closed without an answer");
        assert_eq!(metrics.http_connections_refused.get(), 1);
        drop(held);
        // The slots free up once the held connections go.
        let mut again = None;
        for _ in 0..100 {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let answer = read_until_closed(&mut stream).await.unwrap_or_default();
            if answer.starts_with("HTTP/1.1 200") {
                again = Some(answer);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(again.is_some(), "served again after the flood");
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_after_the_header_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let (addr, _) = endpoint(limits).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // Half a request head, then nothing.
        stream.write_all(b"GET /metr").await.expect("write");
        let got = read_until_closed(&mut stream).await;
        assert!(got.is_some(), "the server closed the connection");
        // A kept-alive connection waiting for its next request, too.
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let got = read_until_closed(&mut stream).await.expect("closed");
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    }

    #[tokio::test]
    async fn oversized_heads_and_bodies_are_refused() {
        let (addr, _) = endpoint(Limits::default()).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let big = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        // The server may close before all of it is written.
        let _ = stream.write_all(big.as_bytes()).await;
        let got = read_until_closed(&mut stream).await.unwrap_or_default();
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 431"),
            "an oversized head is not answered: {got}"
        );

        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .expect("write");
        let got = read_until_closed(&mut stream).await.expect("closed");
        assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_until_nothing_moved_for_the_limit() {
        let moved = Moved {
            epoch: Instant::now(),
            millis: AtomicU64::new(0),
        };
        let limit = Duration::from_secs(10);
        tokio::time::advance(Duration::from_secs(6)).await;
        moved.touch();
        let started = Instant::now();
        idle(&moved, limit).await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
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
        m.set_ready(Err(NotReady::Zookeeper("connection lost".into())));
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
        m.set_ready(Err(NotReady::Zookeeper("connection lost".into())));
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

    #[test]
    fn metrics_are_the_prometheus_text_format_under_its_content_type() {
        let m = Metrics::new();
        m.retries.inc();
        let text = m.encode();
        // Counters are declared under their sample's name, as Prometheus
        // reads it; OpenMetrics would say `gmsa_retries` and lose the help.
        assert!(
            text.contains(
                "# HELP gmsa_retries_total Retries after transient directory failures.\n\
                 # TYPE gmsa_retries_total counter\n\
                 gmsa_retries_total 1\n"
            ),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
        let response = respond(&m, "/metrics");
        let content_type = response.headers()[hyper::header::CONTENT_TYPE].to_str();
        assert_eq!(
            content_type.expect("ascii"),
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }

    #[test]
    fn process_metrics_describe_this_process() {
        let m = Metrics::new();
        // Other tests open and close files meanwhile: hold far more than
        // the process has otherwise, so that a bound holds whatever they do.
        let held: Vec<_> = (0..200)
            .map(|_| tempfile::tempfile().expect("temp file"))
            .collect();
        let after = m.encode();
        drop(held);
        assert!(
            sample(&after, "process_open_fds") >= 200.0,
            "200 files held open:\n{after}"
        );
        assert!(sample(&after, "process_resident_memory_bytes") > 1e6);
        assert!(sample(&after, "process_max_fds") >= sample(&after, "process_open_fds"));
        assert!(sample(&after, "process_threads") >= 1.0);
        assert!(sample(&after, "process_cpu_seconds_total") >= 0.0);
        assert!(after.contains("# TYPE process_cpu_seconds_total counter\n"));
        let start = sample(&after, "process_start_time_seconds");
        let now = unix_now();
        assert!(
            start <= now && start > now - 86_400.0,
            "started {start}, now {now}"
        );
    }

    #[test]
    fn systemd_hears_ready_once_and_every_change_of_status() {
        let mut n = Notified::default();
        let waiting = Err(NotReady::Tree("waiting for .modified".to_owned()));
        assert_eq!(
            n.update(waiting.clone()),
            Some(Notification {
                ready: false,
                status: "not ready: waiting for .modified".into()
            })
        );
        assert_eq!(n.update(waiting), None, "nothing new, nothing sent");
        assert_eq!(
            n.update(Ok(())),
            Some(Notification {
                ready: true,
                status: "ready".into()
            })
        );
        assert_eq!(n.update(Ok(())), None);
        let lost = Err(NotReady::Zookeeper("connection lost".to_owned()));
        assert_eq!(
            n.update(lost).map(|m| m.ready),
            Some(false),
            "a status change"
        );
        assert_eq!(
            n.update(Ok(())),
            Some(Notification {
                ready: false,
                status: "ready".into()
            }),
            "READY=1 only once"
        );
    }

    #[test]
    fn a_not_ready_reason_cannot_add_a_notify_line() {
        let mut n = Notified::default();
        let reason = "placement tree unusable: /srv/x\nREADY=1\nMAINPID=1".to_owned();
        let message = n
            .update(Err(NotReady::Tree(reason)))
            .expect("a notification");
        assert!(!message.ready);
        assert!(!message.status.contains('\n'), "{:?}", message.status);
        assert_eq!(
            message.status,
            "not ready: placement tree unusable: /srv/x\\nREADY=1\\nMAINPID=1"
        );
    }
}
