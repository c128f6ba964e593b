//! The workspace's own binaries (`sluice-broker`, `sluice`), built once per test run so
//! tests exercise exactly what users run.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The folder cargo puts this profile's binaries in (`target/debug`).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .expect("test executable lives in target/<profile>/deps")
}

static BUILT: OnceLock<Result<(), String>> = OnceLock::new();

/// The path of a workspace binary, building the broker and CLI binaries first (once).
pub fn binary(name: &str) -> PathBuf {
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = bin_dir().ends_with("release");
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "sluice-broker",
            "-p",
            "sluice-client",
            "--bins",
        ]);
        if release {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("cargo build of the binaries failed: {s}")),
            Err(e) => Err(format!("cannot run cargo: {e}")),
        }
    });
    if let Err(e) = built {
        panic!("{e}");
    }
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}
