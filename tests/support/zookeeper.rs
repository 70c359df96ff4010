//! A throwaway standalone ZooKeeper on a free 127.0.0.1 port, in a temp
//! directory, from the project's `fixtures/zookeeper/zoo.cfg.template`.
//! It can be stopped (killed, as a crash would), restarted on the same port
//! and data, and frozen; it is killed when dropped, a failing test included.
//!
//! Needs `java` and the Debian `zookeeper` package (3.8); `JAVA` and
//! `ZOOKEEPER_JAR` point elsewhere. A missing one fails the test: these
//! tests are never skipped.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TEMPLATE: &str = include_str!("../../fixtures/zookeeper/zoo.cfg.template");
const DEFAULT_JAR: &str = "/usr/share/java/zookeeper.jar";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// One ZooKeeper server process (or none while stopped).
pub struct ZooKeeper {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl ZooKeeper {
    /// Starts a server and waits until it answers `ruok`.
    pub fn start() -> ZooKeeper {
        // A port picked free may be taken before the server binds it:
        // pick again a few times.
        let mut last = String::new();
        for _ in 0..3 {
            let mut zk = ZooKeeper::stopped();
            match zk.try_start() {
                Ok(()) => return zk,
                Err(e) => last = e,
            }
        }
        panic!("ZooKeeper did not start: {last}");
    }

    /// Prepares a server (port, config, data directory) without starting
    /// it, so a client can be pointed at it before it exists.
    pub fn stopped() -> ZooKeeper {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        fs::create_dir(dir.path().join("data")).expect("data dir");
        let config = TEMPLATE
            .replace("@DIR@", &dir.path().display().to_string())
            .replace("@PORT@", &port.to_string());
        fs::write(dir.path().join("zoo.cfg"), config).expect("zoo.cfg");
        ZooKeeper {
            dir,
            port,
            child: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `HOST:PORT` list for clients.
    pub fn servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether the server answers `ruok` with `imok` right now.
    pub fn is_ok(&self) -> bool {
        ruok(self.port)
    }

    /// Starts the server process on its port and data; panics with the
    /// server's log if it does not come up.
    pub fn boot(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("ZooKeeper did not start: {e}");
        }
    }

    /// Kills the server (no clean shutdown, as in a crash) and waits until
    /// its port is closed.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(!self.is_ok(), "ZooKeeper still answers after stop");
    }

    /// Stops and starts again on the same port and data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.boot();
    }

    /// Freezes the process (SIGSTOP): its sockets stay open but nothing
    /// answers, as with a hung server or a silent network partition.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("ZooKeeper is not running");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("zookeeper.log")
    }

    fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "ZooKeeper is already running");
        let jar = std::env::var("ZOOKEEPER_JAR").unwrap_or_else(|_| DEFAULT_JAR.to_owned());
        assert!(
            std::path::Path::new(&jar).exists(),
            "ZooKeeper is not installed: {jar} is missing \
             (apt-get install zookeeper, or set ZOOKEEPER_JAR)"
        );
        let java = std::env::var("JAVA").unwrap_or_else(|_| "java".to_owned());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let conf = self.dir.path();
        let child = Command::new(&java)
            .arg("-Xmx256m")
            .arg("-cp")
            .arg(format!("{}:{jar}", conf.display()))
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(conf.join("zoo.cfg"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("java is not installed ({java:?} not found): apt-get install default-jre-headless zookeeper, or set JAVA")
            }
            Err(e) => panic!("cannot run {java:?}: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "exited with {status} on port {}; log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            if Instant::now() > deadline {
                let mut child = self.child.take().expect("child");
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no imok on port {} within {READY_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(4000);
        log.get(start..).unwrap_or(&log).to_owned()
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen process still dies of SIGKILL.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// The four-letter `ruok` check.
fn ruok(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"ruok").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer == "imok"
}
