//! The `sluice` CLI as tests run it: one command, its input fed, bounded by a timeout.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::binaries::binary;

/// Runs `sluice ARGS` against `brokers`, feeding `stdin`; bounded by a timeout.
pub fn sluice(brokers: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(binary("sluice"))
        .args(args)
        .env("SLUICE_BROKERS", brokers)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).expect("write stdin");
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("sluice output"),
        Err(_) => {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            panic!("sluice {args:?} did not finish within 60 s");
        }
    }
}

/// The command's stdout, after asserting it succeeded (stderr shown if not).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
