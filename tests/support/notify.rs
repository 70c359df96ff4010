//! A stand-in for systemd's notification socket: a Unix datagram socket
//! whose path goes to the daemon as `NOTIFY_SOCKET`, and the messages it
//! received (`READY=1`, `STATUS=...`), one datagram each.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The socket and what arrived on it so far.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    received: Vec<String>,
    _dir: TempDir,
}

impl NotifySocket {
    /// A fresh socket in its own temp directory.
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        NotifySocket {
            socket,
            path,
            received: Vec::new(),
            _dir: dir,
        }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives until a message satisfies `done` and returns it; fails the
    /// test after 20 s.
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(message) = self.receive() {
                if done(&message) {
                    return message;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no notification {what} in 20 s; received {:?}",
                self.received
            );
        }
    }

    /// Everything received so far, after taking what is queued now.
    pub fn drain(&mut self) -> &[String] {
        self.socket.set_nonblocking(true).expect("non-blocking");
        while self.receive().is_some() {}
        self.socket.set_nonblocking(false).expect("blocking");
        &self.received
    }

    fn receive(&mut self) -> Option<String> {
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.socket.recv(&mut buf).ok()?;
        let message = String::from_utf8(buf[..n].to_vec()).expect("UTF-8 notification");
        self.received.push(message.clone());
        Some(message)
    }
}
