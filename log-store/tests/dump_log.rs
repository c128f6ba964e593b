//! The `dump-log` tool on real segment files.

mod common;

use std::process::Command;

use common::{batch, small_config};
use sluice_log_store::{AppendOptions, Log};

fn dump_log(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dump-log"))
        .args(args)
        .output()
        .expect("run dump-log");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn prints_verifies_and_finds_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for i in 0..30 {
        log.append(&batch(&format!("d{i}"), 4, i), AppendOptions::default())
            .expect("append");
    }
    log.close().expect("close");
    let path = dir.path().to_str().expect("utf8 path");

    let (ok, out) = dump_log(&["--records", path]);
    assert!(ok, "{out}");
    assert!(out.contains("offsets 0..=3 count 4"), "{out}");
    assert!(out.contains("value d0-0"), "{out}");
    assert!(out.contains("intact"));

    let (ok, out) = dump_log(&["--verify", path]);
    assert!(ok && out.is_empty(), "{out}");

    let first = dir.path().join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&first).expect("read");
    bytes[200] ^= 0x01;
    std::fs::write(&first, &bytes).expect("write");
    let (ok, out) = dump_log(&["--verify", path]);
    assert!(!ok);
    assert!(
        out.contains("00000000000000000000.log: DAMAGED at position"),
        "{out}"
    );
}
