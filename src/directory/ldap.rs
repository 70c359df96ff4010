//! The [`Directory`] of a real LDAP server (Active Directory, Samba, OpenLDAP):
//! the only module that speaks LDAP.
//!
//! It owns everything the protocol makes our problem: one reused connection
//! opened lazily and reopened after a failure (URLs tried in order), a timeout
//! on every request, TLS and the bind, paged searches (AD refuses more than
//! 1000 entries unpaged), ranged retrieval of large `member` attributes (AD
//! hands out at most 1500 values per read), the permissive-modify control,
//! and the mapping of every failure onto [`DirError`] with the LDAP result
//! code kept intact. Request counters ([`LdapDirectory::stats`]) make the
//! number of round trips visible to tests and benchmarks.
//!
//! A server that stops answering (a frozen DC: its socket accepts, nothing
//! answers) costs one timeout, not one per request: the connection that
//! timed out is dropped and its URL is left alone for one more timeout, so
//! the requests behind it go to the next URL or fail at once with
//! [`DirError::Stalled`] instead of each waiting out a timeout of its own.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ldap3::asn1::{parse_tag, StructureTag};
use ldap3::controls::RawControl;
use ldap3::{
    Ldap, LdapConnAsync, LdapConnSettings, LdapError, LdapResult, Mod, ResultEntry, Scope,
};
use native_tls::{Certificate, TlsConnector};
use tokio::sync::{Mutex, OnceCell};

use super::{Capabilities, DirError, Directory, DomainFacts, Group, MemberChange, Op};
use crate::model::{escape_filter_value, Dn, DnCache};

/// OID of the permissive-modify control: adding a present value or deleting
/// an absent one succeeds instead of failing.
pub const PERMISSIVE_MODIFY_OID: &str = "1.2.840.113556.1.4.1413";

/// OID of the Simple Paged Results control (RFC 2696).
const PAGED_RESULTS_OID: &str = "1.2.840.113556.1.4.319";

/// The largest page AD (and our AD-like test servers) accept.
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Entries (or groups) a long conversion turns into ours between two
/// yields to the runtime: the daemon shares its thread with this
/// connection, and a page of a thousand groups, made in one go, held its
/// batches for tens of milliseconds during every resync.
const YIELD_EVERY: usize = 64;

/// Yields to the runtime's other tasks after every [`YIELD_EVERY`]th item
/// (`i` counts from 0).
async fn now_and_then(i: usize) {
    if i % YIELD_EVERY == YIELD_EVERY - 1 {
        tokio::task::yield_now().await;
    }
}

/// How to reach and authenticate to the directory.
#[derive(Debug, Clone)]
pub struct LdapConfig {
    /// `ldap://` or `ldaps://` URLs, tried in order until one connects.
    pub urls: Vec<String>,
    /// How to authenticate after connecting.
    pub bind: Bind,
    /// Upgrade `ldap://` connections with StartTLS.
    pub starttls: bool,
    /// Extra trusted CA certificates (PEM, one or more), on top of the
    /// system store.
    pub tls_ca_file: Option<PathBuf>,
    /// Accept any server certificate. Only ever set on explicit request.
    pub tls_insecure: bool,
    /// Limit for every single request (connect, bind, each search page,
    /// each range read, each modify).
    pub timeout: Duration,
    /// Entries per page of a paged search, 1 to [`MAX_PAGE_SIZE`].
    pub page_size: i32,
    /// `None`: read `member` plainly and follow `member;range=...` when the
    /// server answers with a range. `Some(n)`: always ask for `n` values at a
    /// time, `member;range=0-(n-1)` and onwards (for servers that only range
    /// on request, and for tests).
    pub range_window: Option<u32>,
    /// When to send the permissive-modify control.
    pub permissive: PermissiveMode,
}

impl LdapConfig {
    /// A configuration with the defaults: no TLS, 30 s timeout, pages of
    /// 500, plain member reads, permissive modify when the server lists it.
    pub fn new(urls: Vec<String>, bind: Bind) -> Self {
        LdapConfig {
            urls,
            bind,
            starttls: false,
            tls_ca_file: None,
            tls_insecure: false,
            timeout: Duration::from_secs(30),
            page_size: 500,
            range_window: None,
            permissive: PermissiveMode::Auto,
        }
    }
}

/// How to authenticate.
#[derive(Debug, Clone)]
pub enum Bind {
    /// No bind at all.
    Anonymous,
    /// A simple bind with a DN (or, on AD, `user@realm`) and a password.
    Simple {
        /// The bind DN.
        dn: String,
        /// The password.
        password: Password,
    },
    /// A SASL GSSAPI (Kerberos) bind with the credentials in the default
    /// ticket cache; needs the `kerberos` feature and TLS.
    Gssapi,
}

/// When to send the permissive-modify control with a Modify.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PermissiveMode {
    /// When the root DSE lists it in `supportedControl`.
    #[default]
    Auto,
    /// Never.
    Never,
    /// Always, whatever the server lists.
    Always,
}

/// A bind password. It never shows in `Debug` or `Display` output, so it
/// cannot end up in a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password given as a string.
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    /// Reads a password file; one trailing newline (as editors and `echo`
    /// leave) is not part of the password. The error names the file only.
    ///
    /// The file may be a symlink (secret stores mount them so), but it must
    /// be a regular file of at most 64 KiB, opened without blocking. A file
    /// that group or others may read is used, with a warning naming it and
    /// the fix: refusing it would stop a running service over a mode bit.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        use std::io::Read;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        const CAP: u64 = 64 * 1024;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o044 != 0 {
            tracing::warn!(
                "{}: the bind password file is readable by group or others (mode {mode:03o}); make it private: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
        let mut bytes = Vec::new();
        file.take(CAP + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > CAP {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {CAP} bytes: not a password"),
            ));
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))?;
        let text = match text.strip_suffix('\n') {
            Some(rest) => rest.strip_suffix('\r').unwrap_or(rest),
            None => &text,
        };
        Ok(Password(text.to_owned()))
    }

    /// The secret itself, for the bind request.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl fmt::Display for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Requests sent so far, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LdapStats {
    /// Connections opened (each one also binds, unless anonymous).
    pub connects: u64,
    /// Search requests, each page of a paged search counted, range
    /// continuations not.
    pub searches: u64,
    /// Base searches made only to read further ranges of a `member`.
    pub range_reads: u64,
    /// Modify requests.
    pub modifies: u64,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    searches: AtomicU64,
    range_reads: AtomicU64,
    modifies: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// An open connection: the handle and the task that drives it. Dropping it
/// stops the task, which closes the socket.
struct Conn {
    id: u64,
    url: String,
    ldap: Ldap,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Why one URL could not be used.
enum Attempt {
    /// No connection: refused, reset. Another try may work.
    Unreachable(String),
    /// The server took the connection but did not answer within the
    /// timeout (connect, TLS or bind): it is left alone for a while.
    Stalled(String),
    /// TLS could not be established (certificate not trusted, StartTLS
    /// refused): retrying will not help until the configuration changes.
    Tls(String),
    /// The server answered the bind with a result code: the next server
    /// is tried only when the code is transient (busy, unavailable), as the
    /// same credentials would fail everywhere.
    Refused(DirError),
}

/// How a request failed.
enum Failed {
    /// The connection broke under it (closed or reset by the server): a
    /// new connection may succeed at once.
    Closed(DirError),
    /// Anything else, a timeout included.
    Other(DirError),
}

impl Failed {
    fn into_error(self) -> DirError {
        match self {
            Failed::Closed(err) | Failed::Other(err) => err,
        }
    }
}

/// A [`Directory`] on an LDAP server.
pub struct LdapDirectory {
    config: LdapConfig,
    tls: Option<TlsConnector>,
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
    caps: OnceCell<Capabilities>,
    counters: Counters,
    /// URLs that left a request unanswered for a whole timeout, with when
    /// they may be asked again.
    stalled: std::sync::Mutex<BTreeMap<String, Instant>>,
}

impl fmt::Debug for LdapDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LdapDirectory")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl LdapDirectory {
    /// Checks the configuration and prepares TLS; connects on first use.
    /// Every configuration problem is [`DirError::Fatal`].
    pub fn new(config: LdapConfig) -> Result<Self, DirError> {
        validate(&config)?;
        let tls = tls_connector(&config)?;
        Ok(LdapDirectory {
            config,
            tls,
            conn: Mutex::new(None),
            next_id: AtomicU64::new(1),
            caps: OnceCell::new(),
            counters: Counters::default(),
            stalled: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &LdapConfig {
        &self.config
    }

    /// Requests sent so far.
    pub fn stats(&self) -> LdapStats {
        let c = &self.counters;
        LdapStats {
            connects: c.connects.load(Ordering::Relaxed),
            searches: c.searches.load(Ordering::Relaxed),
            range_reads: c.range_reads.load(Ordering::Relaxed),
            modifies: c.modifies.load(Ordering::Relaxed),
        }
    }

    /// The URL of the open connection, if there is one.
    pub async fn connected_url(&self) -> Option<String> {
        self.conn.lock().await.as_ref().map(|c| c.url.clone())
    }

    /// Unbinds and closes the connection, if one is open; the next
    /// operation connects again.
    pub async fn disconnect(&self) {
        let conn = self.conn.lock().await.take();
        if let Some(mut conn) = conn {
            // Politeness only: the socket closes when `conn` drops anyway.
            let _ = tokio::time::timeout(self.config.timeout, conn.ldap.unbind()).await;
        }
    }

    /// The handle of the open connection and its URL, connecting first
    /// when there is none or the last one was closed by the server.
    async fn handle(&self) -> Result<(u64, String, Ldap), DirError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_mut() {
            if !conn.ldap.is_closed() {
                return Ok((conn.id, conn.url.clone(), conn.ldap.clone()));
            }
            tracing::debug!(url = %conn.url, "LDAP connection closed; reconnecting");
        }
        *slot = None;
        let conn = self.connect().await?;
        let handle = (conn.id, conn.url.clone(), conn.ldap.clone());
        *slot = Some(conn);
        Ok(handle)
    }

    /// Records that `url` gave no answer within the timeout: it is not asked
    /// again for one more timeout. Said once per episode, however many
    /// requests were waiting on it.
    fn mark_stalled(&self, url: &str) {
        let timeout = self.config.timeout;
        let now = Instant::now();
        let mut stalled = self
            .stalled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = stalled.get(url).is_some_and(|until| *until > now);
        stalled.insert(url.to_owned(), now + timeout);
        drop(stalled);
        if !known {
            tracing::warn!(
                %url,
                ?timeout,
                "LDAP server stopped answering; its connection is dropped and it is left alone for one timeout: the remaining work goes to the next --ldap-url or fails at once"
            );
        }
    }

    /// True while `url` is left alone after a stall.
    fn is_stalled(&self, url: &str) -> bool {
        let stalled = self
            .stalled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stalled
            .get(url)
            .is_some_and(|until| *until > Instant::now())
    }

    /// Drops connection `id` (if it is still the current one) after it
    /// failed, so that the next operation opens a new one.
    async fn forget(&self, id: u64) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|c| c.id == id) {
            *slot = None;
        }
    }

    /// Tries the URLs in order, skipping those that stopped answering a
    /// moment ago; [`DirError::Stalled`] when that is every one of them.
    async fn connect(&self) -> Result<Conn, DirError> {
        if matches!(self.config.bind, Bind::Gssapi) {
            // Before any connection: MIT's library would block for good
            // opening a FIFO, with no timeout of ours around it.
            kerberos_preflight().map_err(|err| DirError::Fatal(err.to_string()))?;
        }
        let mut failures = Vec::new();
        let mut all_tls = true;
        let mut all_skipped = true;
        for url in &self.config.urls {
            if self.is_stalled(url) {
                all_tls = false;
                failures.push(format!(
                    "{url}: stopped answering within {:?}; not asked again yet",
                    self.config.timeout
                ));
                continue;
            }
            all_skipped = false;
            match self.connect_one(url).await {
                Ok(conn) => {
                    tracing::debug!(%url, "connected to LDAP server");
                    return Ok(conn);
                }
                // Busy or unavailable: another server may do better.
                Err(Attempt::Refused(err)) if err.is_transient() => {
                    tracing::debug!(%url, %err, "LDAP server refused the bind for now");
                    all_tls = false;
                    failures.push(format!("{url}: {err}"));
                }
                // The same credentials would fail everywhere.
                Err(Attempt::Refused(err)) => return Err(err),
                Err(Attempt::Unreachable(why)) => {
                    tracing::debug!(%url, %why, "LDAP server unreachable");
                    all_tls = false;
                    failures.push(format!("{url}: {why}"));
                }
                Err(Attempt::Stalled(why)) => {
                    self.mark_stalled(url);
                    all_tls = false;
                    failures.push(format!("{url}: {why}"));
                }
                Err(Attempt::Tls(why)) => {
                    tracing::debug!(%url, %why, "TLS with LDAP server failed");
                    failures.push(format!("{url}: {why}"));
                }
            }
        }
        let message = format!("no LDAP server usable: {}", failures.join("; "));
        if all_skipped && !self.config.urls.is_empty() {
            // Nothing was sent: every server is being left alone, and
            // trying again at once would only wait out the same timeouts.
            return Err(DirError::Stalled {
                op: Op::Connect,
                message,
            });
        }
        if all_tls {
            Err(DirError::Fatal(message))
        } else {
            Err(DirError::Unreachable {
                op: Op::Connect,
                message,
            })
        }
    }

    async fn connect_one(&self, url: &str) -> Result<Conn, Attempt> {
        let timeout = self.config.timeout;
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(timeout)
            .set_starttls(self.config.starttls);
        if let Some(tls) = &self.tls {
            settings = settings.set_connector(tls.clone());
        }
        let (conn, ldap) = match LdapConnAsync::with_settings(settings, url).await {
            Ok(pair) => pair,
            Err(LdapError::NativeTLS { source }) => {
                return Err(Attempt::Tls(format!("TLS handshake failed: {source}")))
            }
            Err(LdapError::LdapResult { result }) => {
                return Err(Attempt::Tls(format!(
                    "StartTLS refused: {}",
                    super::rc::describe(result.rc, &result.text)
                )))
            }
            Err(LdapError::Timeout { .. }) => {
                return Err(Attempt::Stalled(format!(
                    "connect: no answer within {timeout:?}"
                )))
            }
            Err(err) => return Err(Attempt::Unreachable(err.to_string())),
        };
        let url_owned = url.to_owned();
        let driver = tokio::spawn(async move {
            if let Err(err) = conn.drive().await {
                tracing::debug!(url = %url_owned, %err, "LDAP connection ended");
            }
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            id,
            url: url.to_owned(),
            ldap,
            driver,
        };
        bump(&self.counters.connects);
        self.bind(&conn, url).await?;
        Ok(conn)
    }

    async fn bind(&self, conn: &Conn, url: &str) -> Result<(), Attempt> {
        let mut ldap = conn.ldap.clone();
        let (who, result) = match &self.config.bind {
            Bind::Anonymous => return Ok(()),
            Bind::Simple { dn, password } => (
                dn.clone(),
                tokio::time::timeout(self.config.timeout, ldap.simple_bind(dn, password.expose()))
                    .await,
            ),
            Bind::Gssapi => (
                "GSSAPI".to_owned(),
                tokio::time::timeout(self.config.timeout, gssapi_bind(&mut ldap, url)).await,
            ),
        };
        match result {
            Err(_) => Err(Attempt::Stalled(format!(
                "bind: no answer within {:?}",
                self.config.timeout
            ))),
            Ok(Ok(res)) if res.rc == 0 => Ok(()),
            Ok(Ok(res)) => Err(Attempt::Refused(DirError::Result {
                op: Op::Connect,
                dn: who,
                code: res.rc,
                message: res.text,
            })),
            Ok(Err(err)) => match classify(Op::Connect, &who, err) {
                DirError::Unreachable { message, .. } => {
                    Err(Attempt::Unreachable(format!("bind: {message}")))
                }
                DirError::Fatal(message) if matches!(self.config.bind, Bind::Gssapi) => {
                    Err(Attempt::Refused(DirError::Fatal(format!(
                        "{message} (Kerberos: KRB5_CLIENT_KTNAME must name a keytab the service \
                         can read holding the account's current keys, or KRB5CCNAME a cache with \
                         a valid ticket; KRB5_CONFIG must reach the realm's KDC; and {url} must \
                         name the DC as its SPN does, ldap/{host})",
                        host = url_host(url).unwrap_or_default()
                    ))))
                }
                other => Err(Attempt::Refused(other)),
            },
        }
    }

    /// Runs one request on the current connection with the timeout; a
    /// transport failure or a timeout drops the connection, and a timeout
    /// also leaves the server alone for a while (see [`Self::mark_stalled`]).
    ///
    /// With a Kerberos bind, a connection the server closed under the
    /// request is bound again at once, with fresh credentials, and the
    /// request sent once more. Samba (and, reportedly, AD) keeps a
    /// GSSAPI-bound connection open past its service ticket's end, then
    /// closes it when the next request arrives, after a Notice of
    /// Disconnection (message id 0, result 52) and without answering the
    /// request; the Kerberos library gets a new ticket, from the client
    /// keytab, for the new bind. A request that timed out is not repeated,
    /// and the repeat is not counted in [`LdapStats`].
    async fn request<T, F, Fut>(&self, op: Op, dn: &str, f: F) -> Result<T, DirError>
    where
        F: Fn(Ldap) -> Fut,
        Fut: std::future::Future<Output = Result<T, LdapError>>,
    {
        match self.request_once(op, dn, &f).await {
            Err(Failed::Closed(err)) if matches!(self.config.bind, Bind::Gssapi) => {
                let (id, url, ldap) = self.handle().await?;
                tracing::info!(
                    %url,
                    why = %err,
                    "the LDAP server closed the Kerberos-authenticated connection (Samba and AD do \
                     once its ticket has expired); re-bound with fresh credentials, sending the request again"
                );
                self.request_on(op, dn, &f, id, url, ldap)
                    .await
                    .map_err(Failed::into_error)
            }
            other => other.map_err(Failed::into_error),
        }
    }

    async fn request_once<T, F, Fut>(&self, op: Op, dn: &str, f: &F) -> Result<T, Failed>
    where
        F: Fn(Ldap) -> Fut,
        Fut: std::future::Future<Output = Result<T, LdapError>>,
    {
        let (id, url, ldap) = self.handle().await.map_err(Failed::Other)?;
        self.request_on(op, dn, f, id, url, ldap).await
    }

    async fn request_on<T, F, Fut>(
        &self,
        op: Op,
        dn: &str,
        f: &F,
        id: u64,
        url: String,
        ldap: Ldap,
    ) -> Result<T, Failed>
    where
        F: Fn(Ldap) -> Fut,
        Fut: std::future::Future<Output = Result<T, LdapError>>,
    {
        let outcome = tokio::time::timeout(self.config.timeout, f(ldap)).await;
        let err = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => match classify(op, dn, err) {
                err @ DirError::Unreachable { .. } => {
                    self.forget(id).await;
                    return Err(Failed::Closed(err));
                }
                other => other,
            },
            Err(_) => {
                self.mark_stalled(&url);
                self.forget(id).await;
                DirError::Unreachable {
                    op,
                    message: format!(
                        "{dn}: {url} gave no answer within {:?}",
                        self.config.timeout
                    ),
                }
            }
        };
        Err(Failed::Other(err))
    }

    /// One search request (one page when `cookie` is given); returns the
    /// entries and the final result with its controls.
    async fn search_once(
        &self,
        op: Op,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[String],
        controls: Vec<RawControl>,
    ) -> Result<(Vec<RawEntry>, LdapResult), DirError> {
        let attrs = attrs.to_vec();
        let (entries, result) = self
            .request(op, base, |mut ldap| {
                let controls = controls.clone();
                let attrs = attrs.clone();
                async move {
                    // An empty control list would still go out as an (empty)
                    // controls field.
                    if !controls.is_empty() {
                        ldap.with_controls(controls);
                    }
                    let mut stream = ldap.streaming_search(base, scope, filter, attrs).await?;
                    let mut entries = Vec::new();
                    while let Some(entry) = stream.next().await? {
                        entries.push(entry);
                    }
                    let result = stream.finish().await;
                    Ok((entries, result))
                }
            })
            .await?;
        let mut parsed = Vec::with_capacity(entries.len());
        let entries = entries
            .into_iter()
            .filter(|e| !e.is_ref() && !e.is_intermediate());
        for (i, entry) in entries.enumerate() {
            parsed.push(RawEntry::parse(entry)?);
            now_and_then(i).await;
        }
        Ok((parsed, result))
    }

    /// A search with the Simple Paged Results control, page after page,
    /// each page's entries handed to `page` as it arrives, [`YIELD_EVERY`]
    /// at a time.
    async fn search_pages(
        &self,
        base: &str,
        filter: &str,
        attrs: &[String],
        mut page: impl FnMut(Vec<RawEntry>) -> Result<(), DirError>,
    ) -> Result<(), DirError> {
        let mut cookie: Vec<u8> = Vec::new();
        loop {
            bump(&self.counters.searches);
            let control = paged_control(self.config.page_size, &cookie);
            let (entries, result) = self
                .search_once(
                    Op::Search,
                    base,
                    Scope::Subtree,
                    filter,
                    attrs,
                    vec![control],
                )
                .await?;
            if result.rc != 0 {
                return Err(result_error(Op::Search, base, result));
            }
            let mut entries = entries.into_iter();
            loop {
                let part: Vec<RawEntry> = entries.by_ref().take(YIELD_EVERY).collect();
                if part.is_empty() {
                    break;
                }
                page(part)?;
                tokio::task::yield_now().await;
            }
            match next_cookie(&result)? {
                Some(next) if !next.is_empty() => cookie = next,
                // No control back means the server ignored paging and sent
                // everything; an empty cookie means the last page.
                _ => return Ok(()),
            }
        }
    }

    /// The `member` attribute names to ask for in the first read.
    fn member_attrs(&self) -> Vec<String> {
        let member = match self.config.range_window {
            Some(n) => format!("member;range=0-{}", n.saturating_sub(1)),
            None => "member".to_owned(),
        };
        vec!["sAMAccountName".to_owned(), member]
    }

    /// Reads the remaining ranges of a group's `member`; `Ok(false)` when
    /// the group vanished meanwhile.
    async fn complete_members(
        &self,
        group: &mut PartialGroup,
        dns: &mut DnCache,
    ) -> Result<bool, DirError> {
        while let Some(start) = group.next {
            let attr = match self.config.range_window {
                Some(n) => format!(
                    "member;range={start}-{}",
                    start.saturating_add(n.saturating_sub(1))
                ),
                None => format!("member;range={start}-*"),
            };
            bump(&self.counters.range_reads);
            let dn = group.dn.clone();
            let (entries, result) = self
                .search_once(
                    Op::Search,
                    &dn,
                    Scope::Base,
                    "(objectClass=*)",
                    &[attr],
                    Vec::new(),
                )
                .await?;
            if result.rc == super::rc::NO_SUCH_OBJECT {
                return Ok(false);
            }
            if result.rc != 0 {
                return Err(result_error(Op::Search, &dn, result));
            }
            let Some(entry) = entries.into_iter().next() else {
                return Ok(false);
            };
            let before = group.next;
            group.absorb_members(&entry, start, dns)?;
            if group.next.is_some() && group.next <= before {
                return Err(DirError::Fatal(format!(
                    "{dn}: the server's member ranges do not advance past {start}"
                )));
            }
        }
        Ok(true)
    }

    /// Turns search entries into complete groups, sorted by DN.
    async fn groups_from(&self, entries: Vec<RawEntry>) -> Result<Vec<Group>, DirError> {
        let mut dns = DnCache::default();
        let mut partials = Vec::with_capacity(entries.len());
        for entry in entries {
            partials.push(PartialGroup::read(entry, &mut dns)?);
        }
        self.complete_groups(partials, dns).await
    }

    /// The groups a paged search finds, each page's entries turned into
    /// groups as it arrives: the raw entries of all the groups are never
    /// held at once beside the groups made of them.
    async fn groups_paged(&self, base: &str, filter: &str) -> Result<Vec<Group>, DirError> {
        let mut dns = DnCache::default();
        let mut partials = Vec::new();
        self.search_pages(base, filter, &self.member_attrs(), |entries| {
            for entry in entries {
                partials.push(PartialGroup::read(entry, &mut dns)?);
            }
            Ok(())
        })
        .await?;
        self.complete_groups(partials, dns).await
    }

    /// Reads the members that did not fit in the first read of each group,
    /// and makes the groups, in DN order; groups that vanished meanwhile
    /// are left out.
    async fn complete_groups(
        &self,
        partials: Vec<PartialGroup>,
        mut dns: DnCache,
    ) -> Result<Vec<Group>, DirError> {
        let mut groups = BTreeMap::new();
        for (i, mut partial) in partials.into_iter().enumerate() {
            now_and_then(i).await;
            if !self.complete_members(&mut partial, &mut dns).await? {
                tracing::debug!(dn = %partial.dn, "group vanished while reading its members");
                continue;
            }
            let group = partial.finish()?;
            groups.insert(group.dn.clone(), group);
        }
        Ok(groups.into_values().collect())
    }

    async fn permissive(&self) -> Result<bool, DirError> {
        Ok(match self.config.permissive {
            PermissiveMode::Always => true,
            PermissiveMode::Never => false,
            PermissiveMode::Auto => self.capabilities().await?.permissive_modify,
        })
    }
}

#[async_trait]
impl Directory for LdapDirectory {
    async fn capabilities(&self) -> Result<Capabilities, DirError> {
        let caps = self
            .caps
            .get_or_try_init(|| async {
                bump(&self.counters.searches);
                let attrs = ["supportedControl".to_owned()];
                let (entries, result) = self
                    .search_once(
                        Op::Connect,
                        "",
                        Scope::Base,
                        "(objectClass=*)",
                        &attrs,
                        Vec::new(),
                    )
                    .await?;
                if result.rc != 0 {
                    return Err(result_error(Op::Connect, "root DSE", result));
                }
                let controls: BTreeSet<String> = entries
                    .iter()
                    .flat_map(|e| e.values("supportedControl"))
                    .filter_map(|v| String::from_utf8(v.clone()).ok())
                    .collect();
                Ok(Capabilities {
                    permissive_modify: controls.contains(PERMISSIVE_MODIFY_OID),
                })
            })
            .await?;
        Ok(*caps)
    }

    async fn domain_facts(&self) -> Result<DomainFacts, DirError> {
        let text = |entry: Option<&RawEntry>, attr: &str| -> Option<String> {
            entry?
                .values(attr)
                .next()
                .and_then(|v| String::from_utf8(v.clone()).ok())
        };
        let missing = |what: &str| DirError::Fatal(format!("the directory does not say {what}"));
        let attrs = [
            "defaultNamingContext",
            "rootDomainNamingContext",
            "configurationNamingContext",
        ]
        .map(str::to_owned);
        let (rootdse, _) = self
            .search_once(
                Op::Search,
                "",
                Scope::Base,
                "(objectClass=*)",
                &attrs,
                Vec::new(),
            )
            .await?;
        let nc = text(rootdse.first(), "defaultNamingContext")
            .ok_or_else(|| missing("its defaultNamingContext"))?;
        let root_nc =
            text(rootdse.first(), "rootDomainNamingContext").unwrap_or_else(|| nc.clone());
        let config_nc = text(rootdse.first(), "configurationNamingContext")
            .ok_or_else(|| missing("its configurationNamingContext"))?;

        let attrs = ["objectSid", "objectGUID"].map(str::to_owned);
        let (domain, _) = self
            .search_once(
                Op::Search,
                &nc,
                Scope::Base,
                "(objectClass=*)",
                &attrs,
                Vec::new(),
            )
            .await?;
        let binary = |attr: &str| domain.first().and_then(|e| e.values(attr).next().cloned());
        let sid = binary("objectSid").ok_or_else(|| missing("the domain's objectSid"))?;
        let guid = binary("objectGUID").ok_or_else(|| missing("the domain's objectGUID"))?;

        let partitions = format!("CN=Partitions,{config_nc}");
        let filter = format!(
            "(&(objectClass=crossRef)(nCName={}))",
            escape_filter_value(&nc)
        );
        let attrs = ["nETBIOSName", "dnsRoot"].map(str::to_owned);
        let (refs, _) = self
            .search_once(
                Op::Search,
                &partitions,
                Scope::Subtree,
                &filter,
                &attrs,
                Vec::new(),
            )
            .await?;
        let netbios_name = text(refs.first(), "nETBIOSName")
            .ok_or_else(|| missing("the domain's NetBIOS name"))?;
        let dns_name = text(refs.first(), "dnsRoot").unwrap_or_else(|| super::dns_name_of(&nc));
        Ok(DomainFacts {
            dns_name,
            dns_tree_name: super::dns_name_of(&root_nc),
            netbios_name,
            sid,
            guid,
        })
    }

    async fn search_groups(&self, base: &Dn) -> Result<Vec<Group>, DirError> {
        self.groups_paged(base.as_str(), "(objectClass=group)")
            .await
    }

    async fn find_group(&self, base: &Dn, name: &str) -> Result<Option<Group>, DirError> {
        let filter = format!(
            "(&(objectClass=group)(sAMAccountName={}))",
            escape_filter_value(name)
        );
        let mut groups = self.groups_paged(base.as_str(), &filter).await?;
        if groups.len() > 1 {
            tracing::warn!(
                name,
                count = groups.len(),
                "several groups share one sAMAccountName; using the first by DN"
            );
        }
        Ok((!groups.is_empty()).then(|| groups.swap_remove(0)))
    }

    async fn read_group(&self, dn: &Dn) -> Result<Option<Group>, DirError> {
        bump(&self.counters.searches);
        let (entries, result) = self
            .search_once(
                Op::Search,
                dn.as_str(),
                Scope::Base,
                "(objectClass=group)",
                &self.member_attrs(),
                Vec::new(),
            )
            .await?;
        if result.rc == super::rc::NO_SUCH_OBJECT {
            return Ok(None);
        }
        if result.rc != 0 {
            return Err(result_error(Op::Search, dn.as_str(), result));
        }
        Ok(self.groups_from(entries).await?.into_iter().next())
    }

    async fn modify_members(&self, group: &Dn, change: &MemberChange) -> Result<(), DirError> {
        let mods = member_mods(change);
        if mods.is_empty() {
            return Ok(());
        }
        let controls = if self.permissive().await? {
            vec![permissive_control()]
        } else {
            Vec::new()
        };
        bump(&self.counters.modifies);
        let dn = group.as_str();
        let result = self
            .request(Op::Modify, dn, |mut ldap| {
                let controls = controls.clone();
                let mods = mods.clone();
                async move {
                    if !controls.is_empty() {
                        ldap.with_controls(controls);
                    }
                    ldap.modify(dn, mods).await
                }
            })
            .await?;
        if result.rc != 0 {
            return Err(result_error(Op::Modify, dn, result));
        }
        Ok(())
    }
}

/// `add: member` before `delete: member`, each with distinct values (by
/// normalised DN) and left out when empty: an empty delete would remove
/// every member.
fn member_mods(change: &MemberChange) -> Vec<Mod<&str>> {
    fn values(dns: &[Dn]) -> HashSet<&str> {
        let unique: BTreeSet<&Dn> = dns.iter().collect();
        unique.into_iter().map(Dn::as_str).collect()
    }
    let mut mods = Vec::new();
    if !change.add.is_empty() {
        mods.push(Mod::Add("member", values(&change.add)));
    }
    if !change.delete.is_empty() {
        mods.push(Mod::Delete("member", values(&change.delete)));
    }
    mods
}

fn permissive_control() -> RawControl {
    RawControl {
        ctype: PERMISSIVE_MODIFY_OID.to_owned(),
        crit: false,
        val: None,
    }
}

fn paged_control(size: i32, cookie: &[u8]) -> RawControl {
    ldap3::controls::PagedResults {
        size,
        cookie: cookie.to_vec(),
    }
    .into()
}

/// The cookie of the paged-results response control, `None` when the
/// server sent none. Parsed here rather than by ldap3, whose parser panics
/// on a malformed value.
fn next_cookie(result: &LdapResult) -> Result<Option<Vec<u8>>, DirError> {
    let Some(control) = result.ctrls.iter().find(|c| c.1.ctype == PAGED_RESULTS_OID) else {
        return Ok(None);
    };
    let malformed = || DirError::Fatal("malformed paged results control from the server".into());
    let value = control.1.val.as_deref().ok_or_else(malformed)?;
    let (_, tag) = parse_tag(value).map_err(|_| malformed())?;
    let parts = tag.expect_constructed().ok_or_else(malformed)?;
    let cookie = parts
        .into_iter()
        .nth(1)
        .and_then(StructureTag::expect_primitive)
        .ok_or_else(malformed)?;
    Ok(Some(cookie))
}

fn result_error(op: Op, dn: &str, result: LdapResult) -> DirError {
    DirError::Result {
        op,
        dn: dn.to_owned(),
        code: result.rc,
        message: result.text,
    }
}

/// Sorts an ldap3 error into what happens next.
fn classify(op: Op, dn: &str, err: LdapError) -> DirError {
    match err {
        LdapError::LdapResult { result } => result_error(op, dn, result),
        LdapError::FilterParsing | LdapError::AddNoValues | LdapError::UrlParsing { .. } => {
            DirError::Fatal(format!("{op} {dn}: {err}"))
        }
        #[cfg(feature = "kerberos")]
        LdapError::GssapiOperationError(_) | LdapError::NoGssapiToken => {
            DirError::Fatal(format!("{op} {dn}: {err}"))
        }
        other => DirError::Unreachable {
            op,
            message: format!("{dn}: {other}"),
        },
    }
}

/// A search result entry in our terms: the DN and each attribute's values,
/// attribute names as the server spelled them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawEntry {
    dn: String,
    attrs: Vec<(String, Vec<Vec<u8>>)>,
}

impl RawEntry {
    /// Decodes an entry without panicking on a malformed one (ldap3's own
    /// `SearchEntry::construct` would).
    fn parse(entry: ResultEntry) -> Result<RawEntry, DirError> {
        let malformed = || DirError::Fatal("malformed search result entry from the server".into());
        let mut parts = entry
            .0
            .match_id(4)
            .and_then(StructureTag::expect_constructed)
            .ok_or_else(malformed)?
            .into_iter();
        let dn = parts
            .next()
            .and_then(StructureTag::expect_primitive)
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(malformed)?;
        let mut attrs = Vec::new();
        for attr in parts
            .next()
            .and_then(StructureTag::expect_constructed)
            .ok_or_else(malformed)?
        {
            let mut pair = attr.expect_constructed().ok_or_else(malformed)?.into_iter();
            let name = pair
                .next()
                .and_then(StructureTag::expect_primitive)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(malformed)?;
            let values = pair
                .next()
                .and_then(StructureTag::expect_constructed)
                .ok_or_else(malformed)?
                .into_iter()
                .map(|v| v.expect_primitive().ok_or_else(malformed))
                .collect::<Result<Vec<_>, _>>()?;
            attrs.push((name, values));
        }
        Ok(RawEntry { dn, attrs })
    }

    /// The values of an attribute without options, matched without regard
    /// to case.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Vec<u8>> + 'a {
        self.attrs
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.iter())
    }
}

/// Which part of a multi-valued attribute a read returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Range {
    /// From `low` to the end.
    Last { low: u32 },
    /// From `low` to `high`; more follow.
    Part { low: u32, high: u32 },
}

/// Splits an attribute description such as `member;range=0-1499`: `None`
/// when it is not `member`, `Some(None)` for `member` without a range.
fn member_range(description: &str) -> Result<Option<Option<Range>>, DirError> {
    let mut parts = description.split(';');
    if !parts
        .next()
        .is_some_and(|a| a.eq_ignore_ascii_case("member"))
    {
        return Ok(None);
    }
    let Some(range) = parts.find_map(|o| {
        o.get(..6)
            .filter(|p| p.eq_ignore_ascii_case("range="))
            .map(|_| &o[6..])
    }) else {
        return Ok(Some(None));
    };
    let bad = || DirError::Fatal(format!("unexpected attribute range {description:?}"));
    let (low, high) = range.split_once('-').ok_or_else(bad)?;
    let low: u32 = low.parse().map_err(|_| bad())?;
    if high == "*" {
        return Ok(Some(Some(Range::Last { low })));
    }
    let high: u32 = high.parse().map_err(|_| bad())?;
    if high < low {
        return Err(bad());
    }
    Ok(Some(Some(Range::Part { low, high })))
}

/// A group being read: what arrived so far and where to continue.
#[derive(Debug)]
struct PartialGroup {
    dn: String,
    sam_account_name: Option<String>,
    /// As read; sorted into a set once all are in (at cluster scale a
    /// million members, which one sort and one bulk build of each group's
    /// set take in much less time than a million inserts).
    members: Vec<Dn>,
    /// Where the next range starts; `None` when all members are in.
    next: Option<u32>,
}

impl PartialGroup {
    fn new(dn: String) -> Self {
        PartialGroup {
            dn,
            sam_account_name: None,
            members: Vec::new(),
            next: None,
        }
    }

    /// A group from the entry of its first read.
    fn read(entry: RawEntry, dns: &mut DnCache) -> Result<PartialGroup, DirError> {
        let mut partial = PartialGroup::new(entry.dn.clone());
        partial.absorb(&entry, dns)?;
        Ok(partial)
    }

    /// Takes the account name and the first part of `member` from the
    /// entry of the first read.
    fn absorb(&mut self, entry: &RawEntry, dns: &mut DnCache) -> Result<(), DirError> {
        if let Some(name) = entry.values("sAMAccountName").next() {
            self.sam_account_name = Some(String::from_utf8_lossy(name).into_owned());
        }
        self.absorb_members(entry, 0, dns)
    }

    /// Takes the `member` values of one read that asked from `expected`.
    /// No `member` at all means there is nothing (more) to read.
    fn absorb_members(
        &mut self,
        entry: &RawEntry,
        expected: u32,
        dns: &mut DnCache,
    ) -> Result<(), DirError> {
        self.next = None;
        for (name, values) in &entry.attrs {
            let Some(range) = member_range(name)? else {
                continue;
            };
            for value in values {
                let text = std::str::from_utf8(value).map_err(|_| {
                    DirError::Fatal(format!("{}: a member value is not UTF-8", self.dn))
                })?;
                let dn = dns.parse(text).map_err(|e| {
                    DirError::Fatal(format!("{}: the server returned a member {e}", self.dn))
                })?;
                self.members.push(dn);
            }
            match range {
                None | Some(Range::Last { .. }) => {}
                Some(Range::Part { low, high }) => {
                    if low != expected {
                        return Err(DirError::Fatal(format!(
                            "{}: asked for members from {expected}, the server answered {name}",
                            self.dn
                        )));
                    }
                    self.next = Some(high.saturating_add(1));
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Group, DirError> {
        let dn = Dn::parse(&self.dn)
            .map_err(|e| DirError::Fatal(format!("the server returned a group {e}")))?;
        // Stable, and the first of equal DNs kept: a member spelled twice
        // keeps its first spelling, as inserting each into the set would.
        self.members.sort();
        self.members.dedup();
        Ok(Group {
            dn,
            sam_account_name: self.sam_account_name.unwrap_or_default(),
            members: self.members.into_iter().collect(),
        })
    }
}

fn validate(config: &LdapConfig) -> Result<(), DirError> {
    let fatal = |m: String| Err(DirError::Fatal(m));
    if config.urls.is_empty() {
        return fatal("no LDAP URL given".into());
    }
    for url in &config.urls {
        if url_host(url).is_none() {
            return fatal(format!(
                "unsupported LDAP URL {url:?}: expected ldap://HOST[:PORT] or ldaps://HOST[:PORT]"
            ));
        }
    }
    if !(1..=MAX_PAGE_SIZE).contains(&config.page_size) {
        return fatal(format!(
            "page size {} is outside 1..={MAX_PAGE_SIZE}",
            config.page_size
        ));
    }
    if config.range_window == Some(0) {
        return fatal("a range window must hold at least one value".into());
    }
    if config.timeout.is_zero() {
        return fatal("the LDAP timeout must be positive".into());
    }
    match &config.bind {
        Bind::Anonymous => {}
        Bind::Simple { dn, password } => {
            // An empty password makes a simple bind an unauthenticated one
            // (RFC 4513 5.1.2) that "succeeds" without any rights.
            if dn.is_empty() || password.expose().is_empty() {
                return fatal("a simple bind needs a bind DN and a non-empty password".into());
            }
        }
        Bind::Gssapi => {
            if !cfg!(feature = "kerberos") {
                return fatal(
                    "Kerberos (GSSAPI) bind requested, but this binary was built without \
                     Kerberos support (cargo feature `kerberos`)"
                        .into(),
                );
            }
            if let Some(url) = config
                .urls
                .iter()
                .find(|u| !is_ldaps(u) && !config.starttls)
            {
                return fatal(format!(
                    "Kerberos (GSSAPI) bind to {url} needs TLS: use ldaps:// or StartTLS \
                     (GSSAPI's own encryption over plain ldap:// is unreliable on large responses)"
                ));
            }
        }
    }
    Ok(())
}

fn is_ldaps(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("ldaps://"))
}

/// The host part of an `ldap://` or `ldaps://` URL (without port or
/// brackets), `None` for anything else.
fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .split_once("://")
        .filter(|(scheme, _)| {
            scheme.eq_ignore_ascii_case("ldap") || scheme.eq_ignore_ascii_case("ldaps")
        })?
        .1;
    let authority = rest.split(['/', '?']).next()?;
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']')?.0
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// A TLS connector when the defaults (system roots, full verification)
/// are not what was asked for.
fn tls_connector(config: &LdapConfig) -> Result<Option<TlsConnector>, DirError> {
    if config.tls_ca_file.is_none() && !config.tls_insecure {
        return Ok(None);
    }
    let mut builder = TlsConnector::builder();
    if let Some(path) = &config.tls_ca_file {
        for cert in read_ca_file(path)? {
            builder.add_root_certificate(cert);
        }
    }
    if config.tls_insecure {
        builder.danger_accept_invalid_certs(true);
        builder.danger_accept_invalid_hostnames(true);
    }
    builder
        .build()
        .map(Some)
        .map_err(|e| DirError::Fatal(format!("cannot set up TLS: {e}")))
}

/// Every certificate in a PEM file (a bundle may hold several).
fn read_ca_file(path: &Path) -> Result<Vec<Certificate>, DirError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let fatal = |why: String| DirError::Fatal(format!("TLS CA file {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| fatal(e.to_string()))?;
    let mut certs = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            return Err(fatal("unterminated certificate".into()));
        };
        let end = start + len + END.len();
        let cert = Certificate::from_pem(&rest.as_bytes()[start..end])
            .map_err(|e| fatal(format!("certificate {}: {e}", certs.len() + 1)))?;
        certs.push(cert);
        rest = &rest[end..];
    }
    if certs.is_empty() {
        return Err(fatal("no PEM certificate in it".into()));
    }
    Ok(certs)
}

#[cfg(feature = "kerberos")]
async fn gssapi_bind(ldap: &mut Ldap, url: &str) -> Result<LdapResult, LdapError> {
    // `validate` accepted only URLs with a host.
    let host = url_host(url).unwrap_or_default();
    ldap.sasl_gssapi_bind(host).await
}

/// The client keytab MIT's library reads for a GSSAPI bind.
const KEYTAB_ENV: &str = "KRB5_CLIENT_KTNAME";
/// The credential cache MIT's library reads and writes.
const CCACHE_ENV: &str = "KRB5CCNAME";

/// The file a keytab or cache name (`FILE:<path>` or a bare path) names;
/// `None` for the other types (`MEMORY:`, `KEYRING:`, `DIR:`, `KCM:`, ...).
fn krb5_file(value: &str) -> Option<&Path> {
    match value.strip_prefix("FILE:") {
        Some(path) => Some(Path::new(path)),
        None if value.starts_with('/') || !value.contains(':') => Some(Path::new(value)),
        None => None,
    }
}

/// What a file that is not a regular one is.
fn file_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Why a file a GSSAPI bind would open is refused before the bind: it
/// cannot work, or opening it would block the bind for good. Each names
/// the variable and the file.
#[derive(Debug, thiserror::Error)]
enum KerberosFileError {
    /// The keytab does not exist.
    #[error("{}: the keytab {} does not exist", KEYTAB_ENV, .path.display())]
    NoKeytab {
        /// The keytab's path.
        path: PathBuf,
    },
    /// The keytab cannot be looked at.
    #[error("{}: the keytab {}: {source}", KEYTAB_ENV, .path.display())]
    KeytabStat {
        /// The keytab's path.
        path: PathBuf,
        /// Why `stat` failed.
        source: std::io::Error,
    },
    /// Something other than a regular file is there.
    #[error("{}: the keytab {} is {kind}, not a regular file", KEYTAB_ENV, .path.display())]
    KeytabNotAFile {
        /// The keytab's path.
        path: PathBuf,
        /// What is there.
        kind: &'static str,
    },
    /// The keytab cannot be opened for reading.
    #[error("{}: the keytab {} cannot be read: {source}", KEYTAB_ENV, .path.display())]
    KeytabUnreadable {
        /// The keytab's path.
        path: PathBuf,
        /// Why it cannot be opened.
        source: std::io::Error,
    },
    /// The credential cache cannot be looked at.
    #[error("{}: the credential cache {}: {source}", CCACHE_ENV, .path.display())]
    CacheStat {
        /// The cache's path.
        path: PathBuf,
        /// Why `stat` failed.
        source: std::io::Error,
    },
    /// Something other than a regular file is there.
    #[error("{}: the credential cache {} is {kind}, not a regular file (or absent, to be made)", CCACHE_ENV, .path.display())]
    CacheNotAFile {
        /// The cache's path.
        path: PathBuf,
        /// What is there.
        kind: &'static str,
    },
}

/// Checks the files a GSSAPI bind would open, without opening anything
/// but a regular file: the keytab of `KRB5_CLIENT_KTNAME` must be a
/// readable regular file, the `FILE:` cache of `KRB5CCNAME` a regular file
/// or absent. `stat` follows a link (a mounted secret is one) but never
/// opens, so a FIFO cannot block here; a FIFO opened by libkrb5 would
/// block the bind for good, past every timeout.
fn kerberos_preflight() -> Result<(), KerberosFileError> {
    if let Some(value) = std::env::var_os(KEYTAB_ENV) {
        let value = value.to_string_lossy();
        if let Some(path) = krb5_file(&value) {
            let owned = || path.to_path_buf();
            match std::fs::metadata(path) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    return Err(KerberosFileError::NoKeytab { path: owned() })
                }
                Err(source) => {
                    return Err(KerberosFileError::KeytabStat {
                        path: owned(),
                        source,
                    })
                }
                Ok(meta) if !meta.is_file() => {
                    return Err(KerberosFileError::KeytabNotAFile {
                        path: owned(),
                        kind: file_kind(meta.file_type()),
                    })
                }
                Ok(_) => {
                    if let Err(source) = std::fs::File::open(path) {
                        return Err(KerberosFileError::KeytabUnreadable {
                            path: owned(),
                            source,
                        });
                    }
                }
            }
        }
    }
    if let Some(value) = std::env::var_os(CCACHE_ENV) {
        let value = value.to_string_lossy();
        if let Some(path) = krb5_file(&value) {
            let owned = || path.to_path_buf();
            match std::fs::metadata(path) {
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(KerberosFileError::CacheStat {
                        path: owned(),
                        source,
                    })
                }
                Ok(meta) if !meta.is_file() => {
                    return Err(KerberosFileError::CacheNotAFile {
                        path: owned(),
                        kind: file_kind(meta.file_type()),
                    })
                }
                Ok(_) => {}
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "kerberos"))]
async fn gssapi_bind(_ldap: &mut Ldap, _url: &str) -> Result<LdapResult, LdapError> {
    panic!("BUG: `validate` refuses GSSAPI without the kerberos feature")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dn(s: &str) -> Dn {
        Dn::parse(s).expect("valid DN")
    }

    fn simple() -> Bind {
        Bind::Simple {
            dn: "cn=svc,dc=ad,dc=com".into(),
            password: Password::new("s3cret-value"),
        }
    }

    fn entry(attrs: &[(&str, &[&str])]) -> RawEntry {
        RawEntry {
            dn: "CN=g,OU=Groups,DC=ad".into(),
            attrs: attrs
                .iter()
                .map(|(n, v)| {
                    (
                        n.to_string(),
                        v.iter().map(|s| s.as_bytes().to_vec()).collect(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn password_is_redacted_and_file_loses_one_newline() {
        let p = Password::new("hunter2");
        assert!(!format!("{p:?} {p}").contains("hunter2"));
        let b = simple();
        assert!(!format!("{b:?}").contains("s3cret-value"));
        let dir = tempfile::tempdir().expect("tempdir");
        for (content, want) in [
            ("pw\n", "pw"),
            ("pw\r\n", "pw"),
            ("pw\n\n", "pw\n"),
            ("pw", "pw"),
            (" pw ", " pw "),
        ] {
            let path = dir.path().join("pw");
            std::fs::write(&path, content).expect("write");
            assert_eq!(Password::from_file(&path).expect("read").expose(), want);
        }
        assert!(Password::from_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn member_ranges_parse() {
        assert_eq!(member_range("sAMAccountName").expect("ok"), None);
        assert_eq!(member_range("memberOf").expect("ok"), None);
        assert_eq!(member_range("member").expect("ok"), Some(None));
        assert_eq!(member_range("Member").expect("ok"), Some(None));
        assert_eq!(
            member_range("member;range=0-1499").expect("ok"),
            Some(Some(Range::Part { low: 0, high: 1499 }))
        );
        assert_eq!(
            member_range("MEMBER;Range=1500-*").expect("ok"),
            Some(Some(Range::Last { low: 1500 }))
        );
        for bad in [
            "member;range=x-1",
            "member;range=5",
            "member;range=9-3",
            "member;range=1-y",
        ] {
            assert!(member_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn partial_group_tracks_where_to_continue() {
        let mut g = PartialGroup::new("CN=g,OU=Groups,DC=ad".into());
        g.absorb(
            &entry(&[
                ("sAMAccountName", &["g-gmsa-hosts"]),
                ("member;range=0-1", &["CN=a,DC=ad", "CN=b,DC=ad"]),
            ]),
            &mut DnCache::default(),
        )
        .expect("absorb");
        assert_eq!(g.next, Some(2));
        g.absorb_members(
            &entry(&[("member;range=2-*", &["CN=c,DC=ad"])]),
            2,
            &mut DnCache::default(),
        )
        .expect("absorb");
        assert_eq!(g.next, None);
        let group = g.finish().expect("finish");
        assert_eq!(group.sam_account_name, "g-gmsa-hosts");
        assert_eq!(group.members.len(), 3);

        let mut g = PartialGroup::new("CN=g,DC=ad".into());
        let err = g
            .absorb_members(
                &entry(&[("member;range=5-9", &["CN=a,DC=ad"])]),
                2,
                &mut DnCache::default(),
            )
            .expect_err("wrong start");
        assert!(matches!(err, DirError::Fatal(_)));
        let err = g
            .absorb_members(
                &entry(&[("member", &["not a dn"])]),
                0,
                &mut DnCache::default(),
            )
            .expect_err("bad dn");
        assert!(matches!(err, DirError::Fatal(_)));
    }

    #[test]
    fn a_member_spelled_twice_keeps_its_first_spelling() {
        let mut g = PartialGroup::new("CN=g,DC=ad".into());
        g.absorb(
            &entry(&[(
                "member;range=0-2",
                &["CN=b,DC=ad", "cn=A,dc=AD", "CN=a,DC=ad"],
            )]),
            &mut DnCache::default(),
        )
        .expect("absorb");
        g.absorb_members(
            &entry(&[("member;range=3-*", &["CN=B,DC=AD", "CN=c,DC=ad"])]),
            3,
            &mut DnCache::default(),
        )
        .expect("absorb");
        let members: Vec<String> = g
            .finish()
            .expect("finish")
            .members
            .iter()
            .map(|dn| dn.as_str().to_owned())
            .collect();
        assert_eq!(members, ["cn=A,dc=AD", "CN=b,DC=ad", "CN=c,DC=ad"]);
    }

    #[test]
    fn a_plain_member_read_is_complete() {
        let mut g = PartialGroup::new("CN=g,DC=ad".into());
        g.absorb(
            &entry(&[("member", &["CN=a,DC=ad"]), ("cn", &["g"])]),
            &mut DnCache::default(),
        )
        .expect("absorb");
        assert_eq!(g.next, None);
        assert_eq!(g.finish().expect("finish").sam_account_name, "");
    }

    #[test]
    fn mods_skip_empty_sides_and_duplicates() {
        let change = MemberChange {
            add: vec![dn("CN=a,DC=ad"), dn("cn=A,dc=AD")],
            delete: vec![],
        };
        let mods = member_mods(&change);
        assert_eq!(mods.len(), 1);
        match &mods[0] {
            Mod::Add(attr, values) => {
                assert_eq!(*attr, "member");
                assert_eq!(values.len(), 1);
            }
            other => panic!("unexpected {other:?}"),
        }
        let change = MemberChange {
            add: vec![dn("CN=a,DC=ad")],
            delete: vec![dn("CN=b,DC=ad"), dn("CN=c,DC=ad")],
        };
        let mods = member_mods(&change);
        assert!(matches!(&mods[0], Mod::Add(_, v) if v.len() == 1));
        assert!(matches!(&mods[1], Mod::Delete(_, v) if v.len() == 2));
        assert!(member_mods(&MemberChange::default()).is_empty());
    }

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("ldap://dc1.ad.com"), Some("dc1.ad.com"));
        assert_eq!(url_host("LDAPS://dc1:636/"), Some("dc1"));
        assert_eq!(url_host("ldap://[::1]:389"), Some("::1"));
        assert_eq!(url_host("ldap://"), None);
        assert_eq!(url_host("ldapi:///run/sock"), None);
        assert_eq!(url_host("dc1.ad.com"), None);
    }

    #[test]
    fn configuration_problems_are_fatal() {
        let fatal = |c: LdapConfig| matches!(LdapDirectory::new(c), Err(DirError::Fatal(_)));
        let base = || LdapConfig::new(vec!["ldap://127.0.0.1:1".into()], simple());
        assert!(LdapDirectory::new(base()).is_ok());
        assert!(fatal(LdapConfig::new(vec![], Bind::Anonymous)));
        assert!(fatal(LdapConfig::new(
            vec!["http://x".into()],
            Bind::Anonymous
        )));
        assert!(fatal(LdapConfig {
            page_size: 1001,
            ..base()
        }));
        assert!(fatal(LdapConfig {
            page_size: 0,
            ..base()
        }));
        assert!(fatal(LdapConfig {
            range_window: Some(0),
            ..base()
        }));
        let empty_pw = Bind::Simple {
            dn: "cn=x".into(),
            password: Password::new(""),
        };
        assert!(fatal(LdapConfig::new(vec!["ldap://h".into()], empty_pw)));
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        assert!(fatal(LdapConfig {
            tls_ca_file: Some(missing),
            ..base()
        }));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        assert!(fatal(LdapConfig {
            tls_ca_file: Some(garbage),
            ..base()
        }));
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert!(fatal(LdapConfig {
            tls_ca_file: Some(broken),
            ..base()
        }));
    }

    #[test]
    fn gssapi_needs_the_feature_and_tls() {
        let gssapi = |urls: &[&str], starttls: bool| {
            let config = LdapConfig {
                starttls,
                ..LdapConfig::new(urls.iter().map(|u| u.to_string()).collect(), Bind::Gssapi)
            };
            LdapDirectory::new(config).map(|_| ())
        };
        let plain = gssapi(&["ldaps://dc1", "ldap://dc2"], false).expect_err("plain ldap");
        let DirError::Fatal(message) = plain else {
            panic!("not fatal: {plain:?}")
        };
        if cfg!(feature = "kerberos") {
            assert!(
                message.contains("ldap://dc2") && message.contains("TLS"),
                "{message}"
            );
            assert!(gssapi(&["ldaps://dc1"], false).is_ok());
            assert!(gssapi(&["ldap://dc1"], true).is_ok());
        } else {
            assert!(message.contains("without Kerberos"), "{message}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_transient_and_names_no_password() {
        // Port 1 on loopback: nothing listens there.
        let config = LdapConfig {
            timeout: Duration::from_secs(5),
            ..LdapConfig::new(vec!["ldap://127.0.0.1:1".into()], simple())
        };
        let dir = LdapDirectory::new(config).expect("valid config");
        let err = dir
            .read_group(&dn("CN=g,DC=ad"))
            .await
            .expect_err("nothing listens");
        assert!(
            matches!(
                err,
                DirError::Unreachable {
                    op: Op::Connect,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_transient());
        assert!(!err.to_string().contains("s3cret-value"));
        assert_eq!(dir.stats().connects, 0);
    }

    #[tokio::test]
    async fn an_empty_change_sends_nothing() {
        let config = LdapConfig::new(vec!["ldap://127.0.0.1:1".into()], simple());
        let dir = LdapDirectory::new(config).expect("valid config");
        dir.modify_members(&dn("CN=g,DC=ad"), &MemberChange::default())
            .await
            .expect("nothing to do");
        assert_eq!(dir.stats(), LdapStats::default());
    }
}
