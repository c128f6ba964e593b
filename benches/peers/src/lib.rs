//! What the peers' load generators share: their record values, percentiles and each
//! producer's share of the records.
//!
//! This crate is a workspace of its own so that the peers' clients never change how
//! Sluice itself is built: `rabbitmq-stream-client` turns on tokio's `full` features,
//! and in one build with it every binary's tokio gets `parking_lot` locks, whose
//! spinning calls `sched_yield` (see docs/benchmarks.md, "No parking_lot"). For the same
//! reason `rabbit-load` is a package of its own here (`rabbit/`), built apart from this
//! one, so the NATS and Redis tools run on the same tokio as Sluice's load tool.

/// The record values a peer's load generator cycles through: `count` values of `size`
/// bytes, each half pseudo-random (seeded by its position) and half constant.
pub fn peer_payloads(size: usize, count: u64) -> Vec<Vec<u8>> {
    (1..=count)
        .map(|seed| {
            let mut x = seed | 1;
            (0..size)
                .map(|i| {
                    if i < size / 2 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    } else {
                        b'x'
                    }
                })
                .collect()
        })
        .collect()
}

/// The `p` quantile of sorted latencies in microseconds, in milliseconds (0 when none).
pub fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// Producer `i`'s share when `records` are split over `producers` (the first ones take
/// the remainder).
pub fn share(records: u64, producers: u32, i: u32) -> u64 {
    let producers = u64::from(producers.max(1));
    records / producers + u64::from(u64::from(i) < records % producers)
}
