//! Crash and full-disk tests of the log store with real processes: a child appends in a
//! loop and is killed with SIGKILL, or runs out of space; every append it acknowledged
//! must be there afterwards.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_log_store::{BatchIter, Log, LogConfig};
use sluice_tests::process::ChildProcess;

const WRITER: &str = env!("CARGO_BIN_EXE_log-writer");
const LINE_TIMEOUT: Duration = Duration::from_secs(20);

fn writer(dir: &Path, extra: &[&str]) -> ChildProcess {
    let mut cmd = Command::new(WRITER);
    cmd.arg("--dir").arg(dir).args(extra);
    ChildProcess::spawn(cmd).expect("spawn log-writer")
}

/// The end offset (last + 1) of the highest `acked BASE LAST` line.
fn acked_end(lines: &[String]) -> Option<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("acked "))
        .filter_map(|rest| rest.split_whitespace().nth(1)?.parse::<u64>().ok())
        .max()
        .map(|last| last + 1)
}

/// Reads the log from its start and checks that every record holds `rec-OFFSET`.
fn check_records(log: &Log) -> u64 {
    let mut offset = log.log_start_offset();
    let mut n = 0;
    while offset < log.log_end_offset() {
        let bytes = log.read(offset, 1 << 20).expect("read");
        assert!(!bytes.is_empty(), "nothing at offset {offset}");
        for batch in BatchIter::new(bytes) {
            let batch = batch.expect("batch");
            assert!(
                batch.crc_ok(),
                "CRC of batch at {}",
                batch.header().base_offset
            );
            for r in batch.records().expect("records") {
                let want = format!("rec-{}", r.offset);
                assert!(
                    r.value
                        .as_deref()
                        .is_some_and(|v| v.starts_with(want.as_bytes())),
                    "offset {} holds the wrong record",
                    r.offset
                );
                offset = r.offset + 1;
                n += 1;
            }
        }
    }
    n
}

fn writer_config() -> LogConfig {
    LogConfig {
        segment_bytes: 256 * 1024,
        index_max_bytes: 64 * 1024,
        retention_ms: None,
        ..LogConfig::default()
    }
}

#[test]
fn sigkill_mid_append_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let part = dir.path().join("crash-0");
    let mut acked = 0u64;
    // Kill after different amounts of work, with and without fsync per batch.
    for (round, wait_acks) in [40usize, 700, 5, 1500, 300, 2500].into_iter().enumerate() {
        let fsync = round % 2 == 1;
        let mut args = vec!["--segment-bytes", "262144", "--index-bytes", "65536"];
        if fsync {
            args.push("--fsync");
        }
        let mut child = writer(&part, &args);
        let mut seen = Vec::new();
        while seen.len() < wait_acks {
            match child.next_line(LINE_TIMEOUT) {
                Some(line) => seen.push(line),
                None => panic!("writer stopped early in round {round}: {seen:?}"),
            }
        }
        child.kill().expect("SIGKILL");
        // Lines already in the pipe were written after their append returned: acked too.
        seen.extend(child.remaining_lines(Duration::from_secs(5)));
        let round_end = acked_end(&seen).expect("some acks");
        assert!(round_end > acked, "round {round} made progress");
        acked = round_end;

        let (log, report) = Log::open_with_report(&part, writer_config()).expect("reopen");
        assert!(!report.clean, "a killed writer cannot have closed cleanly");
        assert!(
            log.log_end_offset() >= acked,
            "round {round}: log ends at {} but {acked} were acknowledged",
            log.log_end_offset()
        );
        let records = check_records(&log);
        assert_eq!(records, log.log_end_offset(), "round {round}");
        // Unacknowledged appends that made it whole are kept; the next round starts there.
        acked = log.log_end_offset();
        log.close().expect("close");
    }
    let log = Log::open(&part, writer_config()).expect("reopen");
    assert!(log.segment_count() > 1, "the rounds crossed segment rolls");
    log.verify().expect("verify");
}

#[test]
fn writes_failing_at_a_file_size_limit_leave_the_log_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let part = dir.path().join("limit-0");
    // One segment larger than the limit: the limit is hit mid-batch, inside a write.
    let mut child = writer(
        &part,
        &[
            "--segment-bytes",
            "1048576",
            "--index-bytes",
            "16384",
            "--max-file-bytes",
            "300000",
            "--verify-after-error",
            "3",
        ],
    );
    let status = child.wait(Duration::from_secs(60)).expect("writer exits");
    let lines = child.remaining_lines(Duration::from_secs(5));
    assert!(status.success(), "writer failed: {lines:?}");
    let error = lines
        .iter()
        .find(|l| l.starts_with("error "))
        .expect("an error line");
    assert!(error.starts_with("error full "), "{error}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("verified ") && l.ends_with("truncated false")),
        "{lines:?}"
    );
    let acked = acked_end(&lines).expect("acks");

    // Without the limit, the log reopens whole and takes appends again.
    let mut log = Log::open(&part, writer_config()).expect("reopen");
    assert_eq!(log.log_end_offset(), acked);
    assert_eq!(check_records(&log), acked);
    let mut b = sluice_log_store::RecordBatchBuilder::new(sluice_log_store::Compression::None);
    b.append(0, None, Some(format!("rec-{acked}").as_bytes()), &[]);
    let info = log
        .append(&b.build().expect("build"), Default::default())
        .expect("append after space returns");
    assert_eq!(info.base_offset, acked);
    assert_eq!(check_records(&log), acked + 1);
}

/// A real ENOSPC: the writer runs inside its own mount namespace on a 1 MiB tmpfs, so
/// both data and index writes (and segment rolls) meet a full file system. The check
/// runs in the writer itself, because the tmpfs vanishes with the namespace.
#[test]
fn full_disk_is_an_error_and_loses_nothing() {
    if std::env::var_os("SLUICE_SKIP_NAMESPACE_TESTS").is_some() {
        eprintln!("SKIPPED: SLUICE_SKIP_NAMESPACE_TESTS is set");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"mount -t tmpfs -o size=1m sluice-full "$0" || exit 97
exec "$1" --dir "$0/full-0" --segment-bytes 131072 --index-bytes 8192 --records 20 --verify-after-error 3"#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "sh", "-c", script])
        .arg(dir.path())
        .arg(WRITER);
    let mut child = ChildProcess::spawn(cmd).expect("spawn unshare");
    let status = child.wait(Duration::from_secs(60)).expect("writer exits");
    let lines = child.remaining_lines(Duration::from_secs(5));
    assert!(
        status.code() != Some(97) && status.code() != Some(1),
        "could not create a private tmpfs (needs root or user namespaces; set \
         SLUICE_SKIP_NAMESPACE_TESTS=1 to skip knowingly): {status:?}"
    );
    assert!(status.success(), "writer failed: {status:?} {lines:?}");
    let error = lines
        .iter()
        .find(|l| l.starts_with("error "))
        .expect("an error line");
    assert!(error.starts_with("error full "), "{error}");
    let verified = lines
        .iter()
        .find_map(|l| l.strip_prefix("verified "))
        .expect("verified line");
    let acked = acked_end(&lines).expect("acks");
    assert!(
        acked > 1000,
        "the disk filled only after real work: {acked}"
    );
    assert!(
        verified.starts_with(&format!("{acked} ")),
        "{verified} vs {acked}"
    );
}
