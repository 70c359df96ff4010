//! Real directory servers for integration tests: a throwaway OpenLDAP
//! `slapd` with Active Directory's size limits ([`Slapd`]) and a Samba AD
//! domain controller ([`SambaDc`]), each in its own temp directory on
//! 127.0.0.0/8, plus a throwaway certificate authority ([`TestCa`]).
//!
//! Every server process is started by one long-lived thread with
//! `PR_SET_PDEATHSIG`, so no server outlives the test binary, whatever way
//! it ends; per-test servers are also killed on `Drop` (a panicking test
//! included), shared ones and their directories when the binary exits.
//! Servers that are missing make the test fail, never skip.
//!
//! Samba is provisioned once (about ten seconds) into
//! `target/tmp/samba-template-<hash>/`, published by an atomic rename so
//! that concurrent test binaries never see half a template, and copied per
//! server. Samba's LDAP port cannot be configured, so every Samba server
//! listens on its own loopback address (127.x.y.z) instead of its own port.

#![allow(dead_code)]

pub mod daemon;
pub mod daemon_bin;
pub mod e2e;
pub mod node;
pub mod notify;
pub mod scenario;
pub mod tmpfs;
pub mod tree;
pub mod zookeeper;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Where the project's own server fixtures live.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ldap")
}

const INSTALL_HINT: &str = "the directory servers for the integration tests are not installed; \
     install them as the README's test section says (apt-get install slapd ldap-utils samba \
     samba-dsdb-modules samba-ad-provision samba-vfs-modules krb5-user \
     libsasl2-modules-gssapi-mit), then run the tests again";

/// The path of a program the tests need; fails the test when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs =
        std::env::split_paths(&path).chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` not found: {INSTALL_HINT}");
}

/// Polls `ready` until it returns true; fails the test after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command to completion, feeding `stdin`; fails the test when it
/// does not succeed.
pub fn run(cmd: &mut Command, stdin: &[u8], what: &str) -> Output {
    let out = run_unchecked(cmd, stdin);
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command to completion, feeding `stdin`.
pub fn run_unchecked(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut input = child.stdin.take().expect("stdin is piped");
    let data = stdin.to_vec();
    // A writer thread: a large input must not deadlock against full pipes.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait for command");
    writer.join().expect("stdin writer");
    out
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

// ---------------------------------------------------------------------------
// Process keeping

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Starts a server process from a thread that lives as long as the test
/// binary, with the parent-death signal set: the kernel kills the server
/// when that thread (and so the binary) goes away, even after a SIGKILL.
/// Spawning from the test's own thread would kill the server when that
/// test ends, which is wrong for shared servers.
fn spawn_server(mut cmd: Command) -> Child {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("test-server-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static: this thread never ends
                // before the process does.
            })
            .expect("spawn keeper thread");
        Mutex::new(tx)
    });
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    keeper
        .lock()
        .expect("keeper lock")
        .send((cmd, tx))
        .expect("keeper thread alive");
    rx.recv()
        .expect("keeper reply")
        .unwrap_or_else(|e| panic!("cannot start server: {e}"))
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Cleanups of shared servers, run when the test binary exits.
static AT_EXIT: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

extern "C" fn run_at_exit() {
    let Ok(mut list) = AT_EXIT.lock() else { return };
    for (pid, dir) in list.drain(..) {
        // SAFETY: plain kill(2) of a process we started.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Kills `pid` and removes `dir` when the test binary exits.
fn clean_at_exit(pid: u32, dir: PathBuf) {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a plain extern "C" function.
        unsafe {
            libc::atexit(run_at_exit);
        }
    });
    AT_EXIT.lock().expect("at-exit lock").push((pid, dir));
}

fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir")
}

fn write_secret(path: &Path, secret: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create secret file");
    // No newline: `ldapmodify -y` takes the whole file as the password.
    file.write_all(secret.as_bytes())
        .expect("write secret file");
}

// ---------------------------------------------------------------------------
// A throwaway certificate authority

/// A CA and one server certificate for `localhost` and 127.0.0.1, made with
/// the openssl command line.
pub struct TestCa {
    /// The CA certificate (PEM): what clients must trust.
    pub ca_cert: PathBuf,
    /// The server certificate (PEM).
    pub cert: PathBuf,
    /// The server key (PEM).
    pub key: PathBuf,
}

impl TestCa {
    /// Generates the CA and the server certificate into `dir`.
    pub fn generate(dir: &Path) -> TestCa {
        let openssl = tool("openssl");
        let p = |name: &str| dir.join(name);
        let ext = p("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName = DNS:localhost, IP:127.0.0.1\n\
             extendedKeyUsage = serverAuth\n\
             basicConstraints = CA:FALSE\n",
        )
        .expect("write extensions");
        run(
            Command::new(&openssl)
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=gmsa-reconciler test CA"])
                .arg("-keyout")
                .arg(p("ca.key"))
                .arg("-out")
                .arg(p("ca.pem")),
            b"",
            "openssl: make the CA",
        );
        run(
            Command::new(&openssl)
                .args([
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    "/CN=localhost",
                ])
                .arg("-keyout")
                .arg(p("server.key"))
                .arg("-out")
                .arg(p("server.csr")),
            b"",
            "openssl: make the server key",
        );
        run(
            Command::new(&openssl)
                .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
                .arg("-in")
                .arg(p("server.csr"))
                .arg("-CA")
                .arg(p("ca.pem"))
                .arg("-CAkey")
                .arg(p("ca.key"))
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(p("server.pem")),
            b"",
            "openssl: sign the server certificate",
        );
        TestCa {
            ca_cert: p("ca.pem"),
            cert: p("server.pem"),
            key: p("server.key"),
        }
    }
}

// ---------------------------------------------------------------------------
// OpenLDAP

/// A throwaway slapd on 127.0.0.1 with the AD-like schema and limits of
/// `fixtures/ldap/`, loaded with `fixtures/ldap/base.ldif` and whatever
/// the test adds.
pub struct Slapd {
    dir: TempDir,
    port: u16,
    tls: Option<(u16, TestCa)>,
    child: Option<Child>,
}

impl Slapd {
    /// The suffix of the test directory.
    pub const BASE: &'static str = "dc=ad,dc=com";
    /// An account the size limits apply to, with write access: what the
    /// reconciler binds as. (The rootdn is exempt from limits.)
    pub const SVC_DN: &'static str = "cn=svc,dc=ad,dc=com";
    /// Its password.
    pub const SVC_PASSWORD: &'static str = "svcpass";
    /// The rootdn's password (`rootpw` in `fixtures/ldap/slapd.conf.in`).
    const ADMIN_PASSWORD: &'static str = "secret";

    /// A server with the base entries only.
    pub fn start() -> Slapd {
        Slapd::start_with(&[])
    }

    /// A server with the base entries and `ldifs` (content records) loaded
    /// before it starts (fast even for thousands of entries).
    pub fn start_with(ldifs: &[&str]) -> Slapd {
        Slapd::launch(ldifs, false)
    }

    /// A server that also speaks TLS: StartTLS on [`Slapd::url`] and
    /// ldaps on [`Slapd::ldaps_url`], with a certificate from a fresh
    /// [`TestCa`] ([`Slapd::ca_file`]).
    pub fn start_tls() -> Slapd {
        Slapd::launch(&[], true)
    }

    /// One server for the whole test binary, for tests that do not stop it
    /// and keep to their own subtree. Removed when the binary exits.
    pub fn shared() -> &'static Slapd {
        static SHARED: OnceLock<Slapd> = OnceLock::new();
        SHARED.get_or_init(|| {
            let slapd = Slapd::start();
            let pid = slapd.child.as_ref().expect("running").id();
            clean_at_exit(pid, slapd.dir.path().to_owned());
            slapd
        })
    }

    fn launch(ldifs: &[&str], tls: bool) -> Slapd {
        let slapd_bin = tool("slapd");
        let slapadd = tool("slapadd");
        tool("ldapsearch");
        let dir = tempdir("slapd-");
        let d = dir.path();
        std::fs::create_dir(d.join("data")).expect("mkdir data");
        let tls = tls.then(|| (free_port(), TestCa::generate(d)));
        let tls_conf = match &tls {
            Some((_, ca)) => format!(
                "TLSCACertificateFile {}\nTLSCertificateFile {}\nTLSCertificateKeyFile {}",
                ca.ca_cert.display(),
                ca.cert.display(),
                ca.key.display()
            ),
            None => String::new(),
        };
        let template = std::fs::read_to_string(fixtures().join("slapd.conf.in"))
            .expect("read fixtures/ldap/slapd.conf.in");
        let conf = template
            .replace("@DIR@", &d.display().to_string())
            .replace(
                "@SCHEMA@",
                &fixtures().join("ad-mini.schema").display().to_string(),
            )
            .replace("@TLS@", &tls_conf);
        std::fs::write(d.join("slapd.conf"), conf).expect("write slapd.conf");
        let mut ldif = std::fs::read_to_string(fixtures().join("base.ldif"))
            .expect("read fixtures/ldap/base.ldif");
        for extra in ldifs {
            ldif.push('\n');
            ldif.push_str(extra);
            ldif.push('\n');
        }
        std::fs::write(d.join("load.ldif"), ldif).expect("write load.ldif");
        run(
            Command::new(&slapadd)
                .arg("-q")
                .arg("-f")
                .arg(d.join("slapd.conf"))
                .arg("-l")
                .arg(d.join("load.ldif")),
            b"",
            "slapadd",
        );
        write_secret(&d.join("admin.pw"), Slapd::ADMIN_PASSWORD);
        let mut slapd = Slapd {
            port: free_port(),
            dir,
            tls,
            child: None,
        };
        // A port picked as free can be taken before slapd binds it; try
        // again with fresh ports rather than fail.
        for attempt in 1..=3 {
            match slapd.spawn(&slapd_bin) {
                Ok(()) => return slapd,
                Err(log) if attempt < 3 => {
                    eprintln!("slapd did not start (attempt {attempt}), new ports: {log}");
                    slapd.port = free_port();
                    if let Some((port, _)) = &mut slapd.tls {
                        *port = free_port();
                    }
                }
                Err(log) => panic!("slapd did not start: {log}"),
            }
        }
        unreachable!()
    }

    /// Starts the process on the current ports; `Err(log)` when it exits
    /// before answering.
    fn spawn(&mut self, slapd_bin: &Path) -> Result<(), String> {
        let d = self.dir.path();
        let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
        if let Some((port, _)) = &self.tls {
            urls.push_str(&format!(" ldaps://127.0.0.1:{port}/"));
        }
        let log = d.join("slapd.log");
        let log_file = std::fs::File::create(&log).expect("create slapd.log");
        let mut cmd = Command::new(slapd_bin);
        cmd.arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-h")
            .arg(&urls)
            .args(["-d", "0"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log"))
            .stderr(log_file);
        let mut child = spawn_server(cmd);
        let url = self.url();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("slapd exited with {status}: {text}"));
            }
            if root_dse_answers(&url) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                kill_and_reap(&mut child);
                return Err("no answer within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ldap://127.0.0.1:<port>` (StartTLS-capable on a TLS server).
    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// `ldaps://127.0.0.1:<port>` of a server from [`Slapd::start_tls`].
    pub fn ldaps_url(&self) -> String {
        let (port, _) = self.tls.as_ref().expect("started with start_tls");
        format!("ldaps://127.0.0.1:{port}")
    }

    /// The CA certificate that signed the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        let (_, ca) = self.tls.as_ref().expect("started with start_tls");
        ca.ca_cert.clone()
    }

    /// The rootdn (no limits apply to it).
    pub fn admin_dn(&self) -> &'static str {
        "cn=admin,dc=ad,dc=com"
    }

    /// The rootdn's password.
    pub fn admin_password(&self) -> &'static str {
        Slapd::ADMIN_PASSWORD
    }

    /// The server's temp directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (SIGTERM, then SIGKILL after ten seconds); the
    /// data stays for [`Slapd::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) of our child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            kill_and_reap(&mut child);
        }
    }

    /// Starts the stopped server again on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        let slapd_bin = tool("slapd");
        // The old process has released its ports, but leave the kernel a
        // moment in case of a race with another test binding them.
        let mut last = String::new();
        for _ in 0..50 {
            match self.spawn(&slapd_bin) {
                Ok(()) => return,
                Err(log) => last = log,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("slapd did not restart on port {}: {last}", self.port);
    }

    /// Applies LDIF change records as the rootdn with `ldapmodify`.
    pub fn ldapmodify(&self, ldif: &str) -> Output {
        run(
            Command::new(tool("ldapmodify"))
                .args(["-x", "-H", &self.url(), "-D", self.admin_dn(), "-y"])
                .arg(self.dir.path().join("admin.pw")),
            ldif.as_bytes(),
            "ldapmodify",
        )
    }

    /// Adds entries (LDIF content records) as the rootdn.
    pub fn add_entries(&self, ldif: &str) -> Output {
        run(
            Command::new(tool("ldapmodify"))
                .args(["-a", "-x", "-H", &self.url(), "-D", self.admin_dn(), "-y"])
                .arg(self.dir.path().join("admin.pw")),
            ldif.as_bytes(),
            "ldapadd",
        )
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

fn root_dse_answers(url: &str) -> bool {
    Command::new(tool("ldapsearch"))
        .args([
            "-x",
            "-H",
            url,
            "-b",
            "",
            "-s",
            "base",
            "-o",
            "nettimeout=2",
        ])
        .arg("(objectClass=*)")
        .arg("namingContexts")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------
// Samba AD

/// Bump when the template recipe changes, so stale templates are not used.
const SAMBA_RECIPE: u32 = 2;

/// Contacts every Samba test server holds (`CN=cNNNN,OU=Bulk,DC=ad,DC=test`),
/// for groups with many members: Samba refuses members that do not exist.
pub const SAMBA_BULK_CONTACTS: usize = 3000;

/// A Samba AD domain controller (realm AD.TEST) on its own loopback
/// address, copied from the provisioned template.
pub struct SambaDc {
    dir: TempDir,
    ip: Ipv4Addr,
    child: Option<Child>,
    // Samba started with `-i` exits when its stdin closes: holding the
    // pipe keeps it running, and the kernel closing it ends Samba with
    // the test binary.
    stdin: Option<ChildStdin>,
}

impl SambaDc {
    /// The domain's base DN.
    pub const BASE: &'static str = "DC=ad,DC=test";
    /// The Kerberos realm.
    pub const REALM: &'static str = "AD.TEST";
    /// The administrator's simple-bind name.
    pub const ADMIN: &'static str = "Administrator@ad.test";

    /// A fresh domain controller for this test.
    pub fn start() -> SambaDc {
        let template = samba_template();
        let samba_bin = tool("samba");
        tool("ldapsearch");
        let mut last = String::new();
        for _ in 0..3 {
            let dir = tempdir("samba-");
            copy_tree(template, dir.path());
            let ip = pick_loopback_ip();
            render_smb_conf(dir.path(), ip);
            match start_samba(&samba_bin, dir.path(), ip) {
                Ok((child, stdin)) => {
                    return SambaDc {
                        dir,
                        ip,
                        child: Some(child),
                        stdin: Some(stdin),
                    }
                }
                Err(log) => last = log,
            }
        }
        panic!("samba did not start: {last}");
    }

    /// One domain controller for the whole test binary, for tests that
    /// keep to their own objects. Removed when the binary exits.
    pub fn shared() -> &'static SambaDc {
        static SHARED: OnceLock<SambaDc> = OnceLock::new();
        SHARED.get_or_init(|| {
            let dc = SambaDc::start();
            let pid = dc.child.as_ref().expect("running").id();
            clean_at_exit(pid, dc.dir.path().to_owned());
            dc
        })
    }

    /// The loopback address it listens on.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ldap://<ip>`.
    pub fn url(&self) -> String {
        format!("ldap://{}", self.ip)
    }

    /// `ldaps://<ip>` (Samba's self-signed certificate: not for `localhost`
    /// nor the address, so only `tls_insecure` accepts it).
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://{}", self.ip)
    }

    /// The administrator's password (random per template; never on a
    /// command line).
    pub fn admin_password(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.pw")).expect("read admin.pw")
    }

    /// The file holding the administrator's password.
    pub fn admin_password_file(&self) -> PathBuf {
        self.dir.path().join("admin.pw")
    }

    /// The DN of bulk contact `i` (0-based).
    pub fn bulk_contact(i: usize) -> String {
        format!("CN=c{i:04},OU=Bulk,{}", SambaDc::BASE)
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its smb.conf.
    pub fn smb_conf(&self) -> PathBuf {
        self.dir.path().join("etc/smb.conf")
    }

    /// Runs `samba-tool` on this server's configuration.
    pub fn samba_tool(&self, args: &[&str]) -> Output {
        run(
            Command::new(tool("samba-tool"))
                .args(args)
                .arg("-s")
                .arg(self.smb_conf()),
            b"",
            &format!("samba-tool {}", args.join(" ")),
        )
    }

    /// Applies LDIF change records as the administrator; the output
    /// (status included) is returned unchecked.
    pub fn ldapmodify_unchecked(&self, ldif: &str) -> Output {
        run_unchecked(
            Command::new(tool("ldapmodify"))
                .args(["-x", "-H", &self.url(), "-D", SambaDc::ADMIN, "-y"])
                .arg(self.admin_password_file()),
            ldif.as_bytes(),
        )
    }

    /// Applies LDIF change records as the administrator.
    pub fn ldapmodify(&self, ldif: &str) -> Output {
        let out = self.ldapmodify_unchecked(ldif);
        assert!(
            out.status.success(),
            "ldapmodify against samba failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A `krb5.conf` that points at this server's KDC only.
    pub fn krb5_conf(&self) -> PathBuf {
        let path = self.dir.path().join("krb5.conf");
        let text = std::fs::read_to_string(fixtures().join("krb5.conf.in"))
            .expect("read fixtures/ldap/krb5.conf.in")
            .replace("@IP@", &self.ip.to_string());
        std::fs::write(&path, text).expect("write krb5.conf");
        path
    }

    /// A `krb5.conf` like [`Self::krb5_conf`] that also asks the KDC for
    /// tickets of `lifetime` (a krb5.conf duration such as `130s`), in a
    /// file of its own.
    pub fn krb5_conf_with_lifetime(&self, lifetime: &str) -> PathBuf {
        let path = self.dir.path().join(format!("krb5-{lifetime}.conf"));
        let text = std::fs::read_to_string(self.krb5_conf())
            .expect("read krb5.conf")
            .replace(
                "[libdefaults]\n",
                &format!("[libdefaults]\n\tticket_lifetime = {lifetime}\n"),
            );
        assert!(
            text.contains("ticket_lifetime"),
            "unexpected krb5.conf:\n{text}"
        );
        std::fs::write(&path, text).expect("write krb5.conf");
        path
    }

    /// Creates user `name` with a random password nobody knows (a service
    /// account) and returns its SID.
    pub fn add_service_account(&self, name: &str) -> String {
        self.samba_tool(&["user", "add", name, "--random-password"]);
        let out = self.samba_tool(&["user", "show", name, "--attributes=objectSid"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("objectSid: "))
            .map(|sid| sid.trim().to_owned())
            .unwrap_or_else(|| panic!("no objectSid for {name}"))
    }

    /// Exports the current keys of `name` (a user of the realm) into the
    /// keytab `path`, as an administrator would with `samba-tool domain
    /// exportkeytab`. An existing file is replaced.
    pub fn export_keytab(&self, name: &str, path: &Path) {
        let _ = std::fs::remove_file(path);
        let path = path.to_str().expect("UTF-8 keytab path");
        let principal = format!("--principal={name}@{}", SambaDc::REALM);
        self.samba_tool(&["domain", "exportkeytab", path, &principal]);
    }

    /// Gives `sid` "Write Members" on the group objects below `ou`, the
    /// one right the reconciler's account needs (OPERATIONS.md).
    pub fn grant_write_members(&self, ou: &str, sid: &str) {
        // member (bf9679c0-...) of group objects (bf967a9c-...), inherited.
        let sddl = format!(
            "(OA;CI;WP;bf9679c0-0de6-11d0-a285-00aa003049e2;bf967a9c-0de6-11d0-a285-00aa003049e2;{sid})"
        );
        self.samba_tool(&[
            "dsacl",
            "set",
            &format!("--objectdn={ou}"),
            &format!("--sddl={sddl}"),
        ]);
    }

    /// The values of `member` of the entry `dn`, read with `ldapsearch` as
    /// the administrator (not through the reconciler's code).
    pub fn members_of(&self, dn: &str) -> std::collections::BTreeSet<String> {
        let out = run(
            Command::new(tool("ldapsearch"))
                .args(["-x", "-LLL", "-o", "ldif-wrap=no", "-H", &self.url()])
                .args(["-D", SambaDc::ADMIN, "-y"])
                .arg(self.admin_password_file())
                .args(["-s", "base", "-b", dn, "member"]),
            b"",
            "ldapsearch member",
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("member: "))
            .map(str::to_owned)
            .collect()
    }

    /// Gets a ticket for the administrator into a private ticket cache
    /// (password on stdin); returns `(krb5.conf, ccache)` for
    /// `KRB5_CONFIG` and `KRB5CCNAME`.
    pub fn kinit_admin(&self) -> (PathBuf, String) {
        let conf = self.krb5_conf();
        let ccache = format!("FILE:{}", self.dir.path().join("krb5cc").display());
        let mut password = self.admin_password();
        password.push('\n');
        run(
            Command::new(tool("kinit"))
                .arg(format!("Administrator@{}", SambaDc::REALM))
                .env("KRB5_CONFIG", &conf)
                .env("KRB5CCNAME", &ccache),
            password.as_bytes(),
            "kinit",
        );
        (conf, ccache)
    }
}

impl Drop for SambaDc {
    fn drop(&mut self) {
        self.stdin.take();
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    run(
        Command::new("cp").arg("-a").arg(from.join(".")).arg(to),
        b"",
        "copy the samba template",
    );
}

/// A 127.x.y.z address where nothing listens on Samba's ports.
fn pick_loopback_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id();
    for _ in 0..200 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ip = Ipv4Addr::new(
            127,
            (100 + pid % 100) as u8,
            ((pid / 100) % 250) as u8 + 1,
            (n % 250) as u8 + 2,
        );
        let free = [389, 636, 88, 464, 3268, 3269]
            .iter()
            .all(|&port| TcpListener::bind(SocketAddrV4::new(ip, port)).is_ok());
        if free {
            return ip;
        }
    }
    panic!("no free loopback address for samba");
}

fn render_smb_conf(dir: &Path, ip: Ipv4Addr) {
    let template =
        std::fs::read_to_string(dir.join("smb.conf.in")).expect("read template smb.conf.in");
    let conf = template
        .replace("@DIR@", &dir.display().to_string())
        .replace("@IP@", &ip.to_string());
    std::fs::write(dir.join("etc/smb.conf"), conf).expect("write smb.conf");
    for sub in ["run", "ncalrpc", "winbindd", "log"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
}

fn start_samba(samba_bin: &Path, dir: &Path, ip: Ipv4Addr) -> Result<(Child, ChildStdin), String> {
    let log = dir.join("samba.out");
    let log_file = std::fs::File::create(&log).expect("create samba.out");
    let mut cmd = Command::new(samba_bin);
    // One process instead of a dozen: enough for tests, and one pid to kill.
    cmd.args(["-i", "-M", "single", "-s"])
        .arg(dir.join("etc/smb.conf"))
        .stdin(Stdio::piped())
        .stdout(log_file.try_clone().expect("clone log"))
        .stderr(log_file);
    let mut child = spawn_server(cmd);
    let stdin = child.stdin.take().expect("stdin is piped");
    let url = format!("ldap://{ip}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("samba exited with {status}: {text}"));
        }
        if root_dse_answers(&url) {
            return Ok((child, stdin));
        }
        if Instant::now() > deadline {
            kill_and_reap(&mut child);
            return Err("no answer within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The provisioned template, made on first use (and kept in `target/tmp`
/// across runs, keyed by the Samba version and the recipe).
fn samba_template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let samba_tool = tool("samba-tool");
        let version = run(
            Command::new(tool("samba")).arg("--version"),
            b"",
            "samba --version",
        );
        let mut hasher = DefaultHasher::new();
        (SAMBA_RECIPE, SAMBA_BULK_CONTACTS, &version.stdout).hash(&mut hasher);
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&root).expect("mkdir target/tmp");
        let done = root.join(format!("samba-template-{:016x}", hasher.finish()));
        if done.join("READY").exists() {
            return done;
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let work = root.join(format!(
            "samba-template-{:016x}.tmp-{}-{stamp}",
            hasher.finish(),
            std::process::id()
        ));
        let started = Instant::now();
        provision(&samba_tool, &work);
        std::fs::write(work.join("READY"), b"").expect("write READY");
        // Publishing is one rename: a concurrent binary either sees no
        // template or a complete one. Losing the race is fine.
        if std::fs::rename(&work, &done).is_err() {
            let _ = std::fs::remove_dir_all(&work);
            assert!(done.join("READY").exists(), "samba template vanished");
        }
        eprintln!("provisioned the samba template in {:?}", started.elapsed());
        done
    })
}

fn provision(samba_tool: &Path, work: &Path) {
    let out = run(
        Command::new(samba_tool)
            .args(["domain", "provision"])
            .arg(format!("--targetdir={}", work.display()))
            .args([
                "--realm=AD.TEST",
                "--domain=AD",
                "--server-role=dc",
                "--dns-backend=NONE",
                "--host-name=dc1",
                "--option=interfaces=lo",
                "--option=bind interfaces only=yes",
            ]),
        b"",
        "samba-tool domain provision",
    );
    // Without --adminpass (a password would sit in argv) provision picks a
    // random one and logs it.
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let password = log
        .lines()
        .find_map(|l| {
            l.split_once("Admin password:")
                .map(|(_, p)| p.trim().to_owned())
        })
        .filter(|p| !p.is_empty())
        .expect("provision logs the generated admin password");
    write_secret(&work.join("admin.pw"), &password);

    // The template's smb.conf, with the copy's directory and address left
    // to fill in: only LDAP and the KDC, logs and sockets inside the copy,
    // and simple binds over plain LDAP allowed.
    let conf = std::fs::read_to_string(work.join("etc/smb.conf")).expect("read smb.conf");
    let mut out = String::new();
    for line in conf.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        match key {
            "interfaces" => out.push_str("\tinterfaces = @IP@/8\n"),
            "server services" => out.push_str("\tserver services = ldap, kdc\n"),
            "log file" => out.push_str(
                "\tlog file = @DIR@/log/log.%m\n\
                 \tpid directory = @DIR@/run\n\
                 \tncalrpc dir = @DIR@/ncalrpc\n\
                 \twinbindd socket directory = @DIR@/winbindd\n\
                 \tldap server require strong auth = no\n",
            ),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    let conf = out.replace(&work.display().to_string(), "@DIR@");
    assert!(
        conf.contains("@IP@") && conf.contains("pid directory"),
        "unexpected smb.conf:\n{conf}"
    );
    std::fs::write(work.join("smb.conf.in"), conf).expect("write smb.conf.in");

    // Keep the administrator's password from expiring in a cached template.
    let ip = pick_loopback_ip();
    render_smb_conf(work, ip);
    run(
        Command::new(samba_tool)
            .args(["domain", "passwordsettings", "set", "--max-pwd-age=0", "-s"])
            .arg(work.join("etc/smb.conf")),
        b"",
        "samba-tool domain passwordsettings",
    );

    // The bulk contacts, added through LDAP once for all copies.
    let (mut child, stdin) =
        start_samba(&tool("samba"), work, ip).unwrap_or_else(|log| panic!("samba: {log}"));
    let mut ldif = format!(
        "dn: OU=Bulk,{base}\nobjectClass: organizationalUnit\nou: Bulk\n\n",
        base = SambaDc::BASE
    );
    for i in 0..SAMBA_BULK_CONTACTS {
        ldif.push_str(&format!(
            "dn: {}\nobjectClass: contact\ncn: c{i:04}\n\n",
            SambaDc::bulk_contact(i)
        ));
    }
    run(
        Command::new(tool("ldapmodify"))
            .args([
                "-a",
                "-x",
                "-H",
                &format!("ldap://{ip}"),
                "-D",
                SambaDc::ADMIN,
                "-y",
            ])
            .arg(work.join("admin.pw")),
        ldif.as_bytes(),
        "add the bulk contacts to samba",
    );
    drop(stdin);
    // SAFETY: plain kill(2) of our child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_and_reap(&mut child);
    // What the run left behind that belongs to a running server.
    for sub in ["run", "ncalrpc", "winbindd", "log", "msg.lock", "msg.sock"] {
        let _ = std::fs::remove_dir_all(work.join(sub));
    }
    let _ = std::fs::remove_file(work.join("samba.out"));
}
