//! Real brokers for tests: in-process (the embeddable library) or as a child process of
//! the `sluice-broker` binary, always on 127.0.0.1 with an ephemeral port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_broker::{Broker, BrokerConfig, BrokerHandle};

use crate::binaries::binary;
use crate::process::ChildProcess;

/// A broker running inside the test process.
pub struct InProcessBroker {
    handle: Option<BrokerHandle>,
    addr: SocketAddr,
}

impl InProcessBroker {
    /// Starts a broker with data in `data_dir` and `tweak` applied to the default config.
    pub async fn start(data_dir: &Path, tweak: impl FnOnce(&mut BrokerConfig)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let mut config = BrokerConfig {
            data_dir: data_dir.to_path_buf(),
            ..BrokerConfig::default()
        };
        tweak(&mut config);
        let handle = Broker::start(config, listener, std::future::pending())
            .await
            .expect("broker starts");
        let addr = handle.local_addr();
        InProcessBroker {
            handle: Some(handle),
            addr,
        }
    }

    /// `host:port` for clients.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the broker cleanly (flush, close logs).
    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), h.shutdown())
                .await
                .expect("broker stops within 30 s")
                .expect("clean shutdown");
        }
    }
}

/// A `sluice-broker` child process.
pub struct BrokerProcess {
    child: ChildProcess,
    addr: String,
    data_dir: PathBuf,
}

impl BrokerProcess {
    /// Starts `sluice-broker --listen 127.0.0.1:0 --data-dir DIR ARGS…` and waits for its
    /// "listening on" line (at most 30 s).
    pub fn start(data_dir: &Path, args: &[&str]) -> Self {
        Self::start_on(data_dir, "127.0.0.1:0", args)
    }

    /// Like [`BrokerProcess::start`] on a chosen address (cluster members must know each
    /// other's addresses before they start).
    pub fn start_on(data_dir: &Path, listen: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(binary("sluice-broker"));
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "warn");
        let child = ChildProcess::spawn(cmd).expect("spawn sluice-broker");
        let line = child
            .next_line(Duration::from_secs(30))
            .expect("broker printed its address within 30 s");
        let addr = line
            .strip_prefix("sluice-broker listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from the broker: {line}"))
            .to_string();
        BrokerProcess {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// `host:port` for clients.
    pub fn address(&self) -> &str {
        &self.addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Sends `signal` (SIGSTOP, SIGCONT…) without waiting.
    pub fn signal(&self, signal: i32) {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        let rc = unsafe { libc::kill(self.child.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "signal {signal} delivered");
    }

    /// Sends SIGSTOP and waits (at most 10 s) until every thread of the broker is
    /// stopped: kill(2) returns before that, and a request sent meanwhile can still be
    /// answered.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.pid()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let states: Vec<Option<char>> = std::fs::read_dir(&tasks)
                .map(|dir| dir.flatten().map(|t| thread_state(&t.path())).collect())
                .unwrap_or_default();
            if !states.is_empty() && states.iter().all(|s| *s == Some('T')) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the broker's threads did not all stop within 10 s: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the broker with SIGKILL.
    pub fn sigkill(mut self) {
        self.child.kill().expect("SIGKILL the broker");
    }

    /// Sends SIGTERM and waits (at most 30 s) for a clean exit; returns whether it exited 0.
    pub fn sigterm(mut self) -> bool {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        let rc = unsafe { libc::kill(self.child.pid() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM delivered");
        self.child
            .wait(Duration::from_secs(30))
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// The state letter of the thread whose `/proc/PID/task/TID` folder is `task` (`T` when
/// stopped); it follows the command name, which is in parentheses.
fn thread_state(task: &Path) -> Option<char> {
    let stat = std::fs::read_to_string(task.join("stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}
