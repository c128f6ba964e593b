//! Per-log configuration, with Kafka's names and defaults.

use std::time::Duration;

use crate::batch::HEADER_LEN;
use crate::error::{Error, Result};

/// When appended data is forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// `fdatasync` before an append counts as done (group commit batches these). Survives
    /// power loss. The default.
    EveryBatch,
    /// `fdatasync` at most this often. A power loss may lose the last interval's appends;
    /// a process crash loses nothing (the page cache keeps them).
    Interval(Duration),
    /// Never forced; the OS writes back when it likes. A power loss may lose any amount of
    /// recent data; a process crash loses nothing.
    Os,
}

/// Configuration of one partition log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll the active segment once it would exceed this size (`segment.bytes`, default 1 GiB).
    pub segment_bytes: u64,
    /// Roll the active segment once it is this old (`segment.ms`, default 7 days).
    pub segment_ms: Option<u64>,
    /// Delete sealed segments whose newest record is older than this (`retention.ms`,
    /// default 7 days; `None` keeps them forever).
    pub retention_ms: Option<u64>,
    /// Delete the oldest sealed segments while the log is larger than this
    /// (`retention.bytes`, default unlimited).
    pub retention_bytes: Option<u64>,
    /// Bytes of log between two index entries (`index.interval.bytes`, default 4096).
    pub index_interval_bytes: u32,
    /// Preallocated size of each index file (`segment.index.bytes`, default 10 MiB).
    pub index_max_bytes: u32,
    /// Largest accepted batch, header included (`max.message.bytes`, default 1 MiB plus the
    /// batch header).
    pub max_batch_bytes: u32,
    /// When appends are forced to disk.
    pub flush: FlushPolicy,
    /// Bytes at the end of the log kept in the page cache (`cache.window.bytes`,
    /// default unlimited): older bytes are written back and dropped from it, so the
    /// appends reuse the pages they free. `None` leaves it all to the kernel.
    pub cache_window_bytes: Option<u64>,
}

/// One day in milliseconds.
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: Some(7 * DAY_MS),
            retention_ms: Some(7 * DAY_MS),
            retention_bytes: None,
            index_interval_bytes: 4096,
            index_max_bytes: 10 << 20,
            max_batch_bytes: (1 << 20) + HEADER_LEN as u32,
            flush: FlushPolicy::EveryBatch,
            cache_window_bytes: None,
        }
    }
}

impl LogConfig {
    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<()> {
        if self.segment_bytes < 1024 {
            return Err(Error::InvalidConfig(format!(
                "segment.bytes must be at least 1024, got {}",
                self.segment_bytes
            )));
        }
        if self.segment_bytes > u64::from(u32::MAX) {
            return Err(Error::InvalidConfig(format!(
                "segment.bytes must be at most {}, got {}",
                u32::MAX,
                self.segment_bytes
            )));
        }
        if self.index_max_bytes < 1024 {
            return Err(Error::InvalidConfig(format!(
                "segment.index.bytes must be at least 1024, got {}",
                self.index_max_bytes
            )));
        }
        if self.index_interval_bytes == 0 {
            return Err(Error::InvalidConfig(
                "index.interval.bytes must be positive".into(),
            ));
        }
        if (self.max_batch_bytes as usize) < HEADER_LEN + 1 {
            return Err(Error::InvalidConfig(format!(
                "max.message.bytes must be larger than the {HEADER_LEN}-byte batch header"
            )));
        }
        if self.segment_ms == Some(0) {
            return Err(Error::InvalidConfig("segment.ms must be positive".into()));
        }
        Ok(())
    }
}
