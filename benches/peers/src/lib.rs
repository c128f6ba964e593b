//! What the peers' load generators share: the load's options, their record values,
//! percentiles and each producer's share of the records.
//!
//! This crate is a workspace of its own so that the peers' clients never change how
//! Sluice itself is built: `rabbitmq-stream-client` turns on tokio's `full` features,
//! and in one build with it every binary's tokio gets `parking_lot` locks, whose
//! spinning calls `sched_yield` (see docs/benchmarks-history.md, "No parking_lot").
//! For the same reason `rabbit-load` is a package of its own here (`rabbit/`), built
//! apart from this one, so the NATS and Redis tools run on the same tokio as Sluice's
//! load tool.

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

/// A run's throughput and latency percentiles.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Records counted.
    pub records: u64,
    /// Seconds the run took.
    pub secs: f64,
    /// Records a second.
    pub rate: f64,
    /// Latency percentiles (ms).
    pub p50: f64,
    /// See `p50`.
    pub p99: f64,
    /// See `p50`.
    pub p999: f64,
}

impl Summary {
    /// `records` over the time since `started`, with the percentiles of `latencies` (µs),
    /// which this sorts.
    pub fn of(records: u64, started: std::time::Instant, latencies: &mut [u32]) -> Summary {
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        latencies.sort_unstable();
        Summary {
            records,
            secs,
            rate: records as f64 / secs,
            p50: percentile_ms(latencies, 0.5),
            p99: percentile_ms(latencies, 0.99),
            p999: percentile_ms(latencies, 0.999),
        }
    }

    /// Prints the run as one JSON line, or as a line of text for `record_size`-byte
    /// records sent; with the records' end-to-end timing when they were read back as
    /// they arrived (`e2e_*` fields, or a second line of text).
    pub fn print_sent(&self, record_size: usize, json: bool, e2e: Option<&EndToEnd>) {
        let Summary {
            records,
            secs,
            rate,
            p50,
            p99,
            p999,
        } = *self;
        if json {
            println!(
                "{{\"records\":{records},\"seconds\":{secs:.3},\"records_per_sec\":{rate:.0},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"p999_ms\":{p999:.3}{}}}",
                e2e.map_or(String::new(), EndToEnd::json_fields)
            );
        } else {
            println!(
                "{records} records sent in {secs:.2} s: {rate:.0} records/s ({:.1} MB/s), latency p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms",
                rate * record_size as f64 / 1e6
            );
            if let Some(e2e) = e2e {
                e2e.print_text();
            }
        }
    }
}

pub use sluice_client::pace::stamp_of;

/// The end-to-end workload's value for a record due `since_start` after the run
/// started: stamped as `sluice bench produce --end-to-end` stamps Sluice's records
/// (`sluice_client::pace::put_stamped`).
pub fn stamped(payload: &[u8], since_start: std::time::Duration) -> Vec<u8> {
    let mut value = Vec::with_capacity(payload.len().max(8));
    sluice_client::pace::put_stamped(&mut value, payload, since_start);
    value
}

/// Records read back as they arrive, each timed from when it was due (its stamp) to its
/// arrival: the end-to-end workload, measured alike for every peer.
#[derive(Debug)]
pub struct Arrivals {
    started: std::time::Instant,
    latencies: Vec<u32>,
    /// Records read back, stamped or not.
    pub read: u64,
}

impl Arrivals {
    /// Timing against a run that started at `started`, with room for `records`.
    pub fn new(started: std::time::Instant, records: u64) -> Self {
        Arrivals {
            started,
            latencies: Vec::with_capacity(records as usize),
            read: 0,
        }
    }

    /// A record whose value is `value` arrived at `now` (one clock reading may serve a
    /// whole delivery: each record in it had arrived by then).
    pub fn arrived(&mut self, value: &[u8], now: std::time::Instant) {
        self.read += 1;
        if let Some(due) = stamp_of(value) {
            let waited = now.saturating_duration_since(self.started + due);
            self.latencies
                .push(waited.as_micros().min(u128::from(u32::MAX)) as u32);
        }
    }

    /// The percentiles of what arrived.
    pub fn summary(mut self) -> EndToEnd {
        self.latencies.sort_unstable();
        EndToEnd {
            read: self.read,
            timed: self.latencies.len() as u64,
            p50: percentile_ms(&self.latencies, 0.5),
            p99: percentile_ms(&self.latencies, 0.99),
            p999: percentile_ms(&self.latencies, 0.999),
        }
    }
}

/// End-to-end latency percentiles (ms) of a run's records read back as they arrived.
#[derive(Debug, Clone, Copy)]
pub struct EndToEnd {
    /// Records read back.
    pub read: u64,
    /// Of those, records that carried a stamp.
    pub timed: u64,
    /// Percentiles (ms).
    pub p50: f64,
    /// See `p50`.
    pub p99: f64,
    /// See `p50`.
    pub p999: f64,
}

impl EndToEnd {
    /// The fields `Summary::print_sent` adds to its JSON line, each after a comma.
    pub fn json_fields(&self) -> String {
        format!(
            ",\"e2e_read\":{},\"e2e_timed\":{},\"e2e_p50_ms\":{:.3},\"e2e_p99_ms\":{:.3},\"e2e_p999_ms\":{:.3}",
            self.read, self.timed, self.p50, self.p99, self.p999
        )
    }

    /// Prints the percentiles as a line of text.
    pub fn print_text(&self) {
        println!(
            "end to end ({} records read back, {} timed): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
            self.read, self.timed, self.p50, self.p99, self.p999
        );
    }
}

/// Prints a read-back of the stream (the consume-backlog workload): `records` read by
/// one consumer in `secs`, as one JSON line (`consumed`, `seconds`, `consumed_per_sec`)
/// or as a line of text, after the line `Summary::print_sent` printed.
pub fn print_consumed(records: u64, secs: f64, record_size: usize, json: bool) {
    let secs = secs.max(1e-9);
    let rate = records as f64 / secs;
    if json {
        println!("{{\"consumed\":{records},\"seconds\":{secs:.3},\"consumed_per_sec\":{rate:.0}}}");
    } else {
        println!(
            "{records} records read back by one consumer in {secs:.2} s: {rate:.0} records/s ({:.1} MB/s)",
            rate * record_size as f64 / 1e6
        );
    }
}

/// Longest a read-back waits for any one step (connecting, a request, the next records)
/// before it gives up with an error, so a stream holding fewer records than were sent,
/// or a server gone quiet, fails the run instead of hanging it.
pub const READ_BACK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `work`, or an error naming `what` if it takes longer than `READ_BACK_WAIT`.
pub async fn within<T, E>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, Box<dyn std::error::Error + Send + Sync>>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout(READ_BACK_WAIT, work).await {
        Ok(done) => done.map_err(Into::into),
        Err(_) => Err(format!("{what}: nothing for {} s", READ_BACK_WAIT.as_secs()).into()),
    }
}

/// Producer `i`'s share when `records` are split over `producers` (the first ones take
/// the remainder).
pub fn share(records: u64, producers: u32, i: u32) -> u64 {
    let producers = u64::from(producers.max(1));
    records / producers + u64::from(u64::from(i) < records % producers)
}

/// The load's shape, the same options for every peer's tool (and named as
/// `sluice bench produce` names them).
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// Records to send in all.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Bytes per record (half random-looking, half constant).
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Records in flight awaiting their acknowledgement, per producer.
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// Concurrent producers, each on its own connection, sharing the stream.
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// Records per second across producers (0: as fast as the window allows). Latency
    /// is then timed from each record's scheduled send.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// With --rate, the pacing thread wakes no sooner than this many µs after the last
    /// record it sent fell due (as `sluice bench produce --wake-gap-us`); 0: as soon as
    /// the next record is due.
    #[arg(long, default_value_t = 0)]
    pub wake_gap_us: u64,
    /// After sending, read the whole stream back from its first record with one
    /// consumer and report records/s (`print_consumed`): the consume-backlog workload.
    #[arg(long)]
    pub consume: bool,
    /// While sending, read the stream with one consumer as records arrive and time
    /// each from when it was due to its arrival (`Arrivals`): the end-to-end workload.
    #[arg(long)]
    pub end_to_end: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

impl LoadArgs {
    /// Refuses a load that could never send anything.
    pub fn check(&self) -> Result<(), String> {
        if self.producers == 0 || self.window == 0 {
            return Err("--producers and --window must be positive".into());
        }
        if self.end_to_end && self.record_size < 8 {
            return Err("--end-to-end needs --record-size of at least 8 (the stamp)".into());
        }
        Ok(())
    }

    /// Each producer's records per second, when paced.
    pub fn producer_rate(&self) -> Option<f64> {
        (self.rate > 0).then(|| self.rate as f64 / f64::from(self.producers))
    }

    /// The pacing thread's least gap between wakes.
    pub fn wake_gap(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.wake_gap_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_stamp_replaces_the_first_eight_bytes_and_reads_back() {
        let payload: Vec<u8> = (0..20).collect();
        let due = Duration::from_nanos(1_234_567_890);
        let value = stamped(&payload, due);
        assert_eq!(value.len(), payload.len());
        assert_eq!(&value[8..], &payload[8..]);
        assert_eq!(stamp_of(&value), Some(due));
        assert_eq!(stamped(b"abc", due).len(), 8);
        assert_eq!(stamp_of(b"short"), None);
    }

    #[test]
    fn arrivals_time_stamped_records_from_when_they_were_due() {
        let started = Instant::now();
        let mut arrivals = Arrivals::new(started, 3);
        let now = started + Duration::from_millis(10);
        arrivals.arrived(&stamped(&[0; 16], Duration::from_millis(9)), now);
        arrivals.arrived(&stamped(&[0; 16], Duration::from_millis(7)), now);
        // A value without a stamp is counted, not timed.
        arrivals.arrived(b"x", now);
        let e2e = arrivals.summary();
        assert_eq!((e2e.read, e2e.timed), (3, 2));
        assert_eq!((e2e.p50, e2e.p99), (1.0, 3.0));
    }
}
