//! Shared pieces of the Sluice benchmarks: the workload (100-byte records in ~16 KiB
//! batches), logs filled to a size, `dd` as the disk's reference writer, and buffers for
//! writes that bypass the page cache.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_log_store::{
    AppendOptions, Compression, FlushPolicy, Log, LogConfig, RecordBatchBuilder,
};

/// Size of one record's value in the standard workload.
pub const RECORD_SIZE: usize = 100;
/// Records per batch: with keys absent and a 100-byte value each record takes about
/// 108 bytes, so 150 of them make a batch of about 16 KiB.
pub const RECORDS_PER_BATCH: usize = 150;

/// One batch of the standard workload, uncompressed, timestamps from `base_ms`.
pub fn workload_batch(base_ms: i64) -> Bytes {
    let value = [b'x'; RECORD_SIZE];
    let mut b = RecordBatchBuilder::new(Compression::None);
    for i in 0..RECORDS_PER_BATCH {
        b.append(base_ms + i as i64, None, Some(&value), &[]);
    }
    // The builder only fails on a batch too large to describe, which this is not.
    b.build().expect("a 16 KiB batch always builds")
}

/// A log config for benchmarks: flush left to the OS, one segment big enough for
/// `bytes`, nothing deleted by retention.
pub fn bench_config(bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes: (bytes + (64 << 20)).min(u64::from(u32::MAX)),
        segment_ms: None,
        retention_ms: None,
        flush: FlushPolicy::Os,
        ..LogConfig::default()
    }
}

/// Appends workload batches to a fresh log in `dir` until it holds at least `bytes`.
pub fn fill_log(dir: &Path, bytes: u64, config: LogConfig) -> sluice_log_store::Result<Log> {
    let mut log = Log::open(dir, config)?;
    let batch = workload_batch(1_700_000_000_000);
    while log.size_bytes() < bytes {
        log.append(&batch, AppendOptions::default())?;
    }
    Ok(log)
}

/// Appends `bytes` of workload batches to a fresh log in `dir` (then flushes if
/// `sync`) and returns the elapsed time.
pub fn time_log_append(dir: &Path, bytes: u64, sync: bool) -> sluice_log_store::Result<Duration> {
    let batch = workload_batch(1_700_000_000_000);
    settle();
    let started = Instant::now();
    let mut log = Log::open(dir, bench_config(bytes))?;
    let mut written = 0u64;
    while written < bytes {
        log.append(&batch, AppendOptions::default())?;
        written += batch.len() as u64;
    }
    if sync {
        log.flush()?;
    }
    let elapsed = started.elapsed();
    log.delete()?;
    Ok(elapsed)
}

/// Writes `mib` MiB to `path` with `dd bs=1M` (then `fdatasync` if `sync`) and returns
/// the elapsed time, measured around the whole process.
pub fn time_dd(path: &Path, mib: u64, sync: bool) -> std::io::Result<Duration> {
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .arg("bs=1M")
        .arg(format!("count={mib}"))
        .arg("status=none");
    if sync {
        cmd.arg("conv=fdatasync");
    }
    settle();
    let started = Instant::now();
    let status = cmd.status()?;
    let elapsed = started.elapsed();
    std::fs::remove_file(path)?;
    if !status.success() {
        return Err(std::io::Error::other(format!("dd failed: {status}")));
    }
    Ok(elapsed)
}

/// Writes back every dirty page first, so each timed writer starts from the same state
/// instead of paying for the previous one's writeback.
fn settle() {
    // Only a fairness aid: if `sync` cannot run, the figures are noisier, not wrong.
    let _ = Command::new("sync").status();
}

/// The median of some durations (they are sorted in place).
pub fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// What `O_DIRECT` asks of a write's buffer, offset and length: whole 4 KiB blocks.
pub const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer of a given length that starts on a `DIRECT_ALIGN` boundary, for
/// writes to a file opened with `O_DIRECT`.
pub struct DirectBuffer {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl DirectBuffer {
    /// `len` zero bytes, aligned.
    pub fn new(len: usize) -> DirectBuffer {
        let buf = vec![0u8; len + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        DirectBuffer { buf, start, len }
    }

    /// The aligned bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    /// The aligned bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Bytes per second as GB/s (10^9).
pub fn gb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_buffers_start_aligned_and_hold_their_length() {
        for len in [DIRECT_ALIGN, 1 << 20] {
            let mut b = DirectBuffer::new(len);
            assert_eq!(b.bytes().len(), len);
            assert_eq!(b.bytes().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert!(b.bytes().iter().all(|&x| x == 0));
            b.bytes_mut()[len - 1] = 7;
            assert_eq!(b.bytes()[len - 1], 7);
        }
    }

    #[test]
    fn the_workload_batch_is_about_16_kib_of_100_byte_records() {
        let b = workload_batch(0);
        assert!((15 << 10..17 << 10).contains(&b.len()), "{} bytes", b.len());
        let batch = sluice_log_store::RecordBatch::new(b).expect("valid");
        assert_eq!(batch.header().record_count as usize, RECORDS_PER_BATCH);
    }

    #[test]
    fn a_timed_append_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_dir = dir.path().join("p-0");
        time_log_append(&log_dir, 1 << 20, true).expect("append");
        assert!(!log_dir.exists());
        let dd_file = dir.path().join("dd.out");
        time_dd(&dd_file, 1, false).expect("dd");
        assert!(!dd_file.exists());
    }
}
