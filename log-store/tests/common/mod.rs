//! Helpers shared by the log-store integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use sluice_log_store::{Compression, LogConfig, RecordBatchBuilder};

/// A batch of `n` records whose values are `tag-i`, timestamps `ts + i`.
pub fn batch(tag: &str, n: u32, ts: i64) -> Bytes {
    let mut b = RecordBatchBuilder::new(Compression::None);
    for i in 0..n {
        let v = format!("{tag}-{i}");
        b.append(
            ts + i64::from(i),
            Some(tag.as_bytes()),
            Some(v.as_bytes()),
            &[],
        );
    }
    b.build().expect("build")
}

/// A batch of `n` records of `size` bytes each.
pub fn sized_batch(n: u32, size: usize, ts: i64) -> Bytes {
    let mut b = RecordBatchBuilder::new(Compression::None);
    let value = vec![b'v'; size];
    for i in 0..n {
        b.append(ts + i64::from(i), None, Some(&value), &[]);
    }
    b.build().expect("build")
}

/// Small segments and a dense index, so tests cross boundaries quickly.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        index_max_bytes: 4096,
        retention_ms: None,
        ..LogConfig::default()
    }
}

/// The values of every record in `bytes` (whole batches), with offsets.
pub fn values(bytes: &Bytes) -> Vec<(u64, String)> {
    sluice_log_store::BatchIter::new(bytes.clone())
        .flat_map(|b| b.expect("batch").records().expect("records"))
        .map(|r| {
            (
                r.offset,
                String::from_utf8(r.value.expect("value").to_vec()).expect("utf8"),
            )
        })
        .collect()
}
