//! `sluice bench produce|consume`: load tools in the manner of Kafka's perf-test tools.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::{Args, Subcommand};
use futures_util::FutureExt;
use serde_json::json;
use sluice_client::{
    Acks, Admin, Compression, Consumer, ConsumerConfig, DeliveryFuture, ErrorReason, NewTopic,
    OffsetReset, Producer, ProducerConfig, ProducerRecord, Schedule,
};
use tokio::sync::mpsc;

use crate::output::{print_json, Output};
use crate::produce::{parse_acks, parse_compression, parse_linger};
use crate::{CliError, Global};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Send records as fast as allowed and report throughput and latency.
    Produce(ProduceBench),
    /// Read a topic from the beginning and report throughput.
    Consume(ConsumeBench),
}

#[derive(Debug, Args)]
pub struct ProduceBench {
    /// Topic (created with --partitions if missing).
    #[arg(long)]
    topic: String,
    /// Records to send in all.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Bytes per record value (half random, half repeated).
    #[arg(long, default_value_t = 100)]
    record_size: usize,
    /// Acknowledgement: 0, 1 or all.
    #[arg(long, default_value = "1", value_parser = parse_acks)]
    acks: Acks,
    /// Independent producers (connections), sending in parallel.
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Batch size in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    batch_size: usize,
    /// Linger in ms (fractions allowed: 0.2 is 200 µs).
    #[arg(long, default_value = "5", value_parser = parse_linger)]
    linger_ms: Duration,
    /// Batches in flight per producer.
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Bytes each producer may hold unacknowledged (records wait for room beyond it):
    /// a small window bounds flat-out latency, as a peer's window of unacked sends does.
    #[arg(long, default_value_t = 64 << 20)]
    buffer_memory: usize,
    /// Compression: none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none", value_parser = parse_compression)]
    compression: Compression,
    /// Cap on records per second across producers (0: as fast as possible). Latency is
    /// then timed from each record's scheduled send.
    #[arg(long, default_value_t = 0)]
    throughput: u64,
    /// Under --throughput, the pacing thread wakes no sooner than this many µs after the
    /// last record it sent fell due, and sends what fell due meanwhile in one call (0:
    /// as soon as the next record is due). Fewer wakes cost the tool less CPU; records
    /// are still timed from when they fell due, so the wait counts in the latency.
    #[arg(long, default_value_t = 0)]
    wake_gap_us: u64,
    /// Stop sending after this many seconds even if records remain (0: no limit); for
    /// sustained runs, with a large --records.
    #[arg(long, default_value_t = 0)]
    duration_secs: u64,
    /// Records handed to the producer per call: 1 sends each with `send`; more use
    /// `send_many`, one call per group, every record of a group timed from the group's
    /// send. Under --throughput the records due at each wake go in one `send_many`
    /// whatever this says.
    #[arg(long, default_value_t = 1)]
    send_many: u32,
    /// Also time each record end to end, from its send (scheduled, under --throughput)
    /// to its arrival at a consumer reading the topic alongside; the record carries its
    /// send time in its first 8 bytes.
    #[arg(long)]
    end_to_end: bool,
    /// Seconds at the start whose records are left out of the latencies (a warm-up, as
    /// OpenMessaging Benchmark runs one): connections, buffers and the log's first pages
    /// settle meanwhile. Those records are still sent, read back and counted.
    #[arg(long, default_value_t = 0.0)]
    warmup_secs: f64,
    /// Also print latency over time: p50, p99 and max of the records sent in each
    /// window of this many ms (0: not printed). Shows whether a tail is spread over
    /// the run or comes from a few bad moments.
    #[arg(long, default_value_t = 0)]
    timeline_ms: u64,
    /// Partitions when the topic has to be created.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Config for a topic that has to be created, `key=value` (repeatable).
    #[arg(long = "topic-config")]
    topic_configs: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ConsumeBench {
    /// Topic to read.
    #[arg(long)]
    topic: String,
    /// Stop after this many records (default: when no new record arrives for the timeout).
    #[arg(long)]
    records: Option<u64>,
    /// Stop when no new record arrived for this long (ms).
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Bytes per partition per answer (`max.partition.fetch.bytes`).
    #[arg(long, default_value_t = 1 << 20)]
    partition_fetch_bytes: u32,
    /// Bytes per answer across its partitions (`fetch.max.bytes`; the consumer asks
    /// for at most 2 MiB whatever this says).
    #[arg(long, default_value_t = 50 << 20)]
    fetch_max_bytes: u32,
}

pub async fn run(global: &Global, cmd: BenchCommand) -> Result<(), CliError> {
    match cmd {
        BenchCommand::Produce(args) => produce(global, args).await,
        BenchCommand::Consume(args) => consume(global, args).await,
    }
}

/// Distinct payloads, half random bytes, so compression and caches see realistic data.
fn payloads(size: usize, count: usize) -> Vec<Bytes> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..count)
        .map(|_| {
            let mut v = Vec::with_capacity(size);
            for i in 0..size {
                if i < size / 2 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    v.push(state as u8);
                } else {
                    v.push(b'a' + (i % 26) as u8);
                }
            }
            Bytes::from(v)
        })
        .collect()
}

async fn ensure_topic(global: &Global, args: &ProduceBench) -> Result<(), CliError> {
    let admin = Admin::connect(&global.brokers).await?;
    match admin.describe_topic(&args.topic).await {
        Ok(_) => Ok(()),
        Err(e) if e.reason() == Some(ErrorReason::UnknownTopicOrPartition) => {
            admin
                .create_topic(NewTopic {
                    name: args.topic.clone(),
                    partitions: args.partitions,
                    replication_factor: 0,
                    configs: crate::parse_pairs(&args.topic_configs)?,
                })
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

async fn produce(global: &Global, args: ProduceBench) -> Result<(), CliError> {
    if args.producers == 0 || args.records == 0 || args.send_many == 0 {
        return Err(CliError::Usage(
            "--producers, --records and --send-many must be positive".into(),
        ));
    }
    if args.end_to_end && args.record_size < 8 {
        return Err(CliError::Usage(
            "--end-to-end needs --record-size of at least 8 (the send time)".into(),
        ));
    }
    if !(args.warmup_secs >= 0.0 && args.warmup_secs.is_finite()) {
        return Err(CliError::Usage(
            "--warmup-secs must be a number of seconds, 0 or more".into(),
        ));
    }
    ensure_topic(global, &args).await?;
    let pool = payloads(args.record_size, 1024);
    let mut producers = Vec::new();
    for _ in 0..args.producers {
        let producer = Producer::connect(ProducerConfig {
            brokers: global.brokers.clone(),
            acks: args.acks,
            batch_size: args.batch_size,
            linger: args.linger_ms,
            max_in_flight: args.max_in_flight,
            buffer_memory: args.buffer_memory,
            compression: args.compression,
            ..ProducerConfig::default()
        })
        .await?;
        // Metadata is looked up before the clock starts, not charged to the first record.
        producer.partitions_for(&args.topic).await?;
        producers.push(producer);
    }
    // The reader is at the log end before the first record goes.
    let reader = match args.end_to_end {
        true => Some(open_reader(global, &args.topic).await?),
        false => None,
    };
    let per_producer = args.records / u64::from(args.producers);
    let extra = args.records % u64::from(args.producers);
    let shares: Vec<u64> = (0..u64::from(args.producers))
        .map(|i| per_producer + u64::from(i < extra))
        .collect();
    // Room for every latency, touched before the clock starts (`latency_list`). A
    // sustained run's record count is only a cap: a list grows past it instead.
    let room = |n: u64| latency_list(n.min(1 << 24) as usize);
    let lists: Vec<Vec<u32>> = shares.iter().map(|&n| room(n)).collect();
    let read_list = reader.as_ref().map(|_| room(args.records));
    // Every producer starts now; send times travel in the records as nanoseconds since.
    let started = Instant::now();
    let wall_started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    // Records due (or sent) before this are the warm-up: sent, not timed.
    let measure_from = started + warmup;
    let (expected_tx, expected_rx) = tokio::sync::watch::channel(None);
    let window = (args.timeline_ms > 0).then(|| Duration::from_millis(args.timeline_ms));
    let reader = reader.zip(read_list).map(|(consumer, latencies)| {
        read_back(
            consumer,
            started,
            warmup,
            Timeline::new(window),
            expected_rx,
            latencies,
        )
    });
    let end_to_end = args.end_to_end;
    let mut tasks = Vec::new();
    for ((producer, n), list) in producers.into_iter().zip(shares).zip(lists) {
        let pool = pool.clone();
        let topic: std::sync::Arc<str> = args.topic.as_str().into();
        // Each producer gets its share of the rate.
        let duration_secs = args.duration_secs;
        let wake_gap = Duration::from_micros(args.wake_gap_us);
        let group = u64::from(args.send_many);
        let interval = (args.throughput > 0)
            .then(|| Duration::from_secs_f64(f64::from(args.producers) / args.throughput as f64));
        // A paced run is timed by delivery callbacks, which run as each answer is read:
        // handing every record's future to a waiting task instead cost a wake-up of that
        // task per batch, on the two CPUs the broker shares.
        // Only the tally in use gets the room for every latency.
        let (paced_list, waited_list) = match interval {
            Some(_) => (list, Vec::new()),
            None => (Vec::new(), list),
        };
        let paced = Arc::new(Mutex::new(Tally::new(
            paced_list,
            window,
            started,
            measure_from,
        )));
        tasks.push(tokio::spawn(async move {
            // Futures reach the waiter in chunks: one channel message per record would
            // cost the load tool more than the producer.
            let chunk_len = 256;
            let (tx, mut rx) = mpsc::channel::<Vec<(Instant, DeliveryFuture)>>(1 << 10);
            let waiter = tokio::spawn(async move {
                let mut tally = Tally::new(waited_list, window, started, measure_from);
                // Send times of records seen acknowledged and not yet timed. They are timed
                // together, by one clock read taken after all of them were seen done, so
                // none is timed before its acknowledgement; reading the clock for every
                // record was a visible share of the tool's CPU.
                let mut seen: Vec<Instant> = Vec::with_capacity(chunk_len);
                while let Some(chunk) = rx.recv().await {
                    for (sent, d) in chunk {
                        let mut wait = d.into_future();
                        let outcome = match (&mut wait).now_or_never() {
                            Some(outcome) => outcome,
                            None => {
                                // Those seen so far are done now: time them before waiting.
                                tally.time(&mut seen, Instant::now());
                                wait.await
                            }
                        };
                        if let Some(sent) = tally.count(sent, outcome) {
                            seen.push(sent);
                        }
                    }
                    tally.time(&mut seen, Instant::now());
                }
                tally
            });
            let begin = started;
            let stop_at = (duration_secs > 0).then(|| begin + Duration::from_secs(duration_secs));
            let schedule =
                interval.map(|iv| Schedule::starting_at(begin, iv).with_wake_gap(wake_gap));
            let mut arena = BytesMut::new();
            // Record `j`, sent at `sent` when the caller read the clock for it (flat out);
            // a paced record's send time is when it fell due, and the producer stamps it.
            let mut record = move |j: u64, sent: Option<Instant>| {
                let payload = &pool[(j as usize) % pool.len()];
                let value = if end_to_end {
                    let at = sent
                        .or_else(|| schedule.map(|s| s.due(j)))
                        .unwrap_or_else(Instant::now);
                    stamp(&mut arena, payload, at.duration_since(started))
                } else {
                    payload.clone()
                };
                // The tool's own reading stamps the record, as an application stamps its
                // events: the producer's wall-clock reading for a record without a
                // timestamp was a sixth of the sending thread's time.
                let timestamp =
                    sent.map(|at| wall_started_ms + at.duration_since(started).as_millis() as i64);
                // Every field named: `..ProducerRecord::default()` built a record and
                // dropped its parts for every one sent.
                ProducerRecord {
                    topic: topic.clone(),
                    partition: None,
                    key: None,
                    value: Some(value),
                    headers: Vec::new(),
                    timestamp,
                }
            };
            match schedule {
                Some(schedule) => {
                    let producer = producer.clone();
                    let runtime = tokio::runtime::Handle::current();
                    let tally = Arc::clone(&paced);
                    tokio::task::spawn_blocking(move || {
                        let pace = Pace {
                            schedule,
                            records: n,
                            stop_at,
                        };
                        send_paced(&runtime, &producer, &pace, record, &tally);
                    })
                    .await
                    .map_err(|e| sluice_client::ClientError::Batch(format!("sender: {e}")))?;
                }
                None => {
                    let mut chunk = Vec::with_capacity(chunk_len);
                    let mut j = 0;
                    // One clock reading times a run of up to `READING_RUN` sends, none of
                    // which waited: each is timed from before it began, a few µs early at
                    // most, never late. A send that waited ends the run, so the next one
                    // reads the clock again. A reading per record was a twelfth of the
                    // sending thread's time.
                    let mut scheduled = Instant::now();
                    let mut run = 0;
                    while j < n {
                        if run == READING_RUN {
                            scheduled = Instant::now();
                            run = 0;
                        }
                        if stop_at.is_some_and(|t| scheduled >= t) {
                            break;
                        }
                        run += 1;
                        if group == 1 {
                            let mut send =
                                std::pin::pin!(producer.send(record(j, Some(scheduled))));
                            let delivery = match (&mut send).now_or_never() {
                                Some(done) => done?,
                                None => {
                                    run = READING_RUN;
                                    send.await?
                                }
                            };
                            chunk.push((scheduled, delivery));
                            j += 1;
                        } else {
                            let end = (j + group).min(n);
                            let sent = producer
                                .send_many((j..end).map(|i| record(i, Some(scheduled))))
                                .await;
                            chunk.extend(sent.into_iter().map(|d| (scheduled, d)));
                            j = end;
                            run = READING_RUN;
                        }
                        if chunk.len() >= chunk_len {
                            let full = std::mem::replace(&mut chunk, Vec::with_capacity(chunk_len));
                            if tx.send(full).await.is_err() {
                                break;
                            }
                        }
                    }
                    if !chunk.is_empty() {
                        let _ = tx.send(chunk).await;
                    }
                }
            }
            // Every callback has run once the flush is over.
            producer.flush().await?;
            drop(tx);
            let mut tally = waiter
                .await
                .map_err(|e| sluice_client::ClientError::Batch(format!("waiter: {e}")))?;
            let empty = Tally::new(Vec::new(), window, started, measure_from);
            tally.merge(std::mem::replace(&mut *lock_tally(&paced), empty));
            Ok::<_, sluice_client::ClientError>(tally)
        }));
    }
    let mut latencies = Vec::new();
    let mut acked = 0;
    let mut failed = 0;
    let mut first_error = None;
    let mut ack_timeline = Timeline::new(window);
    for t in tasks {
        let tally = t
            .await
            .map_err(|e| CliError::Usage(format!("producer task failed: {e}")))??;
        latencies.extend(tally.latencies);
        ack_timeline.merge(tally.timeline);
        acked += tally.acked;
        failed += tally.failed;
        if first_error.is_none() {
            first_error = tally.first_error;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = expected_tx.send(Some(acked));
    let read_back = match reader {
        Some(reading) => Some(
            reading
                .await
                .map_err(|e| CliError::Usage(format!("reader: {e}")))??,
        ),
        None => None,
    };
    latencies.sort_unstable();
    let rps = acked as f64 / secs;
    let mbps = rps * args.record_size as f64 / 1e6;
    let (p50, p99, p999, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        percentile(&latencies, 1.0),
    );
    let mut read_back = read_back;
    let e2e_timeline = read_back.as_mut().map(|r| std::mem::take(&mut r.timeline));
    let timeline = timeline_rows(ack_timeline, e2e_timeline);
    let e2e = read_back.map(|r| {
        (
            r.read,
            r.latencies.len(),
            percentile(&r.latencies, 0.50),
            percentile(&r.latencies, 0.99),
            percentile(&r.latencies, 0.999),
            percentile(&r.latencies, 1.0),
        )
    });
    if let Some((read, n, p50, p99, p999, max)) = e2e {
        if global.output == Output::Table {
            println!(
                "end to end ({read} records read back, {n} timed): p50 {p50:.2} ms, p99 {p99:.2} ms, \
                 p99.9 {p999:.2} ms, max {max:.2} ms"
            );
        }
    }
    let e2e_json = e2e.map(|(read, n, p50, p99, p999, max)| {
        json!({ "read": read, "records": n, "p50": p50, "p99": p99, "p99_9": p999, "max": max })
    });
    match global.output {
        Output::Json => print_json(&json!({
            "end_to_end_ms": e2e_json,
            "records": acked,
            "failed": failed,
            "seconds": secs,
            "records_per_sec": rps,
            "mb_per_sec": mbps,
            "record_size": args.record_size,
            "producers": args.producers,
            "acks": format!("{:?}", args.acks),
            "latency_ms": { "p50": p50, "p99": p99, "p99_9": p999, "max": max, "records": latencies.len() },
            "warmup_secs": args.warmup_secs,
            "timeline": timeline.iter().map(|row| json!({
                "from_secs": row.from.as_secs_f64(),
                "records": row.ack.records,
                "p50": row.ack.p50, "p99": row.ack.p99, "max": row.ack.max,
                "end_to_end": row.e2e.as_ref().map(|e| json!({
                    "records": e.records, "p50": e.p50, "p99": e.p99, "max": e.max,
                })),
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let timed = if args.warmup_secs > 0.0 {
                format!(
                    " ({} timed after {} s warm-up)",
                    latencies.len(),
                    args.warmup_secs
                )
            } else {
                String::new()
            };
            println!(
                "{acked} records sent in {secs:.2} s: {rps:.0} records/s ({mbps:.1} MB/s), \
                 latency p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms, max {max:.2} ms{timed}"
            );
            print_timeline(&timeline);
        }
    }
    match first_error {
        Some(e) => Err(CliError::Usage(format!(
            "{failed} records failed; first error: {e}"
        ))),
        None => Ok(()),
    }
}

/// Flat-out sends timed by one clock reading (see the send loop).
const READING_RUN: u32 = 16;

/// A copy of `payload` whose first 8 bytes carry `since_epoch` in nanoseconds. Copies
/// are cut from one shared buffer, `arena`: an allocation and a free per record showed
/// in the tool's profile.
fn stamp(arena: &mut BytesMut, payload: &[u8], since_epoch: Duration) -> Bytes {
    if arena.capacity() < payload.len() {
        arena.reserve(payload.len().max(1) * 256);
    }
    sluice_client::pace::put_stamped(arena, payload, since_epoch);
    arena.split().freeze()
}

/// What the end-to-end reader saw: the records it read, and one latency (µs) per record
/// past the warm-up, sorted.
struct ReadBack {
    read: u64,
    latencies: Vec<u32>,
    timeline: Timeline,
}

/// An empty list with room for `n` latencies, its pages already touched: a page first
/// touched mid-run costs a fault, paid by whichever thread is timing records (about
/// 12,000 of them for a run of 7.5 M records, on a machine where each cost several µs
/// because its free memory goes back to the host).
fn latency_list(n: usize) -> Vec<u32> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, u32::MAX);
    v.clear();
    v
}

/// A latency as the lists keep it: whole µs, capped at `u32::MAX` (over an hour).
fn micros_of(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// Latencies (µs) grouped by the window their record was sent in, for `--timeline-ms`;
/// collects nothing without a window.
#[derive(Default)]
struct Timeline {
    window: Option<Duration>,
    windows: Vec<Vec<u32>>,
}

/// Windows past this are not kept: a send time read from a record that is not the
/// tool's own could otherwise ask for any amount of memory.
const MAX_WINDOWS: usize = 1 << 20;

impl Timeline {
    fn new(window: Option<Duration>) -> Timeline {
        Timeline {
            window,
            windows: Vec::new(),
        }
    }

    /// Adds a record sent `sent` after the run began.
    fn add(&mut self, sent: Duration, micros: u32) {
        let Some(window) = self.window else { return };
        let i = (sent.as_nanos() / window.as_nanos().max(1)) as usize;
        if i >= MAX_WINDOWS {
            return;
        }
        if self.windows.len() <= i {
            self.windows.resize_with(i + 1, Vec::new);
        }
        self.windows[i].push(micros);
    }

    fn merge(&mut self, other: Timeline) {
        if self.windows.len() < other.windows.len() {
            self.windows.resize_with(other.windows.len(), Vec::new);
        }
        for (mine, theirs) in self.windows.iter_mut().zip(other.windows) {
            mine.extend(theirs);
        }
    }

    /// Each window's summary, `None` where it timed nothing.
    fn summaries(self) -> Vec<Option<WindowSummary>> {
        self.windows
            .into_iter()
            .map(|mut v| {
                v.sort_unstable();
                (!v.is_empty()).then(|| WindowSummary {
                    records: v.len(),
                    p50: percentile(&v, 0.50),
                    p99: percentile(&v, 0.99),
                    max: percentile(&v, 1.0),
                })
            })
            .collect()
    }
}

/// One window's latencies, in ms.
struct WindowSummary {
    records: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

/// A line of the timeline: send to acknowledgement, and end to end where measured.
struct TimelineRow {
    from: Duration,
    ack: WindowSummary,
    e2e: Option<WindowSummary>,
}

fn timeline_rows(acks: Timeline, e2e: Option<Timeline>) -> Vec<TimelineRow> {
    let Some(window) = acks.window else {
        return Vec::new();
    };
    let mut e2e = e2e.map(Timeline::summaries).unwrap_or_default().into_iter();
    acks.summaries()
        .into_iter()
        .enumerate()
        .filter_map(|(i, ack)| {
            let e2e = e2e.next().flatten();
            Some(TimelineRow {
                from: window * u32::try_from(i).ok()?,
                ack: ack?,
                e2e,
            })
        })
        .collect()
}

fn print_timeline(rows: &[TimelineRow]) {
    if rows.is_empty() {
        return;
    }
    println!("sent at (s)  records  ack p50 / p99 / max (ms)     end to end p50 / p99 / max (ms)");
    for r in rows {
        let e2e = r.e2e.as_ref().map_or(String::new(), |e| {
            format!("{:8.2} {:8.2} {:8.2}", e.p50, e.p99, e.max)
        });
        println!(
            "{:11.2} {:8} {:8.2} {:8.2} {:8.2}    {e2e}",
            r.from.as_secs_f64(),
            r.ack.records,
            r.ack.p50,
            r.ack.p99,
            r.ack.max,
        );
    }
}

/// A consumer at the end of every partition of `topic`.
async fn open_reader(global: &Global, topic: &str) -> Result<Consumer, CliError> {
    let mut consumer = Consumer::connect(ConsumerConfig {
        brokers: global.brokers.clone(),
        auto_offset_reset: OffsetReset::Latest,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign_topic(topic).await?;
    consumer.seek_to_end().await?;
    Ok(consumer)
}

/// Reads in the background, timing each record sent `measure_from` or later after
/// `epoch` from the send time it carries to the poll that returned it (and adding it to
/// `timeline`), until it has read `expected` records (known once the producers are
/// done) or nothing new has come for 10 s. The latencies go into `latencies`, whose room
/// is taken up front: growing the list mid-run copies it, and at millions of records
/// each copy held up the reader, and the tasks sharing its thread, for milliseconds,
/// which showed as latency spikes when the list reached 1, 2 and 4 million.
fn read_back(
    mut consumer: Consumer,
    epoch: Instant,
    measure_from: Duration,
    mut timeline: Timeline,
    mut expected: tokio::sync::watch::Receiver<Option<u64>>,
    mut latencies: Vec<u32>,
) -> tokio::task::JoinHandle<Result<ReadBack, CliError>> {
    tokio::spawn(async move {
        let mut read = 0u64;
        let mut last_new = Instant::now();
        loop {
            let records = consumer.poll(Duration::from_millis(100)).await?;
            let now = epoch.elapsed();
            if !records.is_empty() {
                last_new = Instant::now();
            }
            for r in records {
                let sent = r.value.as_deref().and_then(sluice_client::pace::stamp_of);
                let Some(sent) = sent else { continue };
                read += 1;
                if sent < measure_from {
                    continue;
                }
                let micros = micros_of(now.saturating_sub(sent));
                latencies.push(micros);
                timeline.add(sent, micros);
            }
            let target = *expected.borrow_and_update();
            match target {
                Some(n) if read >= n => break,
                Some(_) if last_new.elapsed() > Duration::from_secs(10) => break,
                _ => {}
            }
        }
        latencies.sort_unstable();
        Ok(ReadBack {
            read,
            latencies,
            timeline,
        })
    })
}

/// A paced run: its schedule, its records, and when to stop if they last longer.
struct Pace {
    schedule: Schedule,
    records: u64,
    stop_at: Option<Instant>,
}

/// Sends on schedule from a thread of its own (see `Schedule::wait_due` for why a
/// thread). Each time it wakes it sends every record then due in one `send_many`; a
/// callback times them, each from when it fell due, as their batch's answer is read.
fn send_paced(
    runtime: &tokio::runtime::Handle,
    producer: &Producer,
    pace: &Pace,
    mut record: impl FnMut(u64, Option<Instant>) -> ProducerRecord,
    tally: &Arc<Mutex<Tally>>,
) {
    let schedule = &pace.schedule;
    let mut j = 0;
    while j < pace.records {
        if pace.stop_at.is_some_and(|t| schedule.due(j) >= t) {
            break;
        }
        let end = schedule.wait_due(j, pace.records);
        let sent = runtime.block_on(producer.send_many((j..end).map(|i| record(i, None))));
        // Records of one batch get their outcome at the same moment: one callback, and
        // one clock read, times the whole run of them.
        let mut sent = sent.into_iter().peekable();
        let mut k = j;
        while let Some(mut last) = sent.next() {
            let from = k;
            k += 1;
            while let Some(next) = sent.next_if(|d| d.same_batch(&last)) {
                last = next;
                k += 1;
            }
            let (to, tally, schedule) = (k, Arc::clone(tally), *schedule);
            last.on_delivery(move |outcome| {
                let now = Instant::now();
                let sent = (from..to).map(|i| schedule.due(i));
                lock_tally(&tally).count_batch(sent, outcome, now);
            });
        }
        j = end;
    }
}

/// One producer's outcomes: how many records were acknowledged or failed, and the
/// latency of each acknowledged after the warm-up.
struct Tally {
    latencies: Vec<u32>,
    acked: u64,
    failed: u64,
    first_error: Option<sluice_client::ClientError>,
    timeline: Timeline,
    started: Instant,
    measure_from: Instant,
}

impl Tally {
    /// A tally that keeps its latencies in `latencies` (empty, with room made ahead).
    fn new(
        latencies: Vec<u32>,
        window: Option<Duration>,
        started: Instant,
        measure_from: Instant,
    ) -> Tally {
        Tally {
            latencies,
            acked: 0,
            failed: 0,
            first_error: None,
            timeline: Timeline::new(window),
            started,
            measure_from,
        }
    }

    /// Counts one outcome; gives back the send time if the record is to be timed.
    fn count(
        &mut self,
        sent: Instant,
        outcome: Result<sluice_client::RecordMetadata, sluice_client::ClientError>,
    ) -> Option<Instant> {
        match outcome {
            Ok(_) => self.acked(sent),
            Err(e) => {
                self.failed += 1;
                self.first_error.get_or_insert(e);
                None
            }
        }
    }

    /// Counts a batch's records, sent at `sent`, whose one outcome was seen by `now`.
    fn count_batch(
        &mut self,
        sent: impl Iterator<Item = Instant>,
        outcome: Result<sluice_client::RecordMetadata, sluice_client::ClientError>,
        now: Instant,
    ) {
        match outcome {
            Ok(_) => {
                for at in sent {
                    if let Some(at) = self.acked(at) {
                        self.time_one(at, now);
                    }
                }
            }
            Err(e) => {
                self.failed += sent.count() as u64;
                self.first_error.get_or_insert(e);
            }
        }
    }

    /// Counts one acknowledged record; gives back its send time if it is to be timed.
    fn acked(&mut self, sent: Instant) -> Option<Instant> {
        self.acked += 1;
        (sent >= self.measure_from).then_some(sent)
    }

    /// Times records sent at `sent`, all seen acknowledged by `now`.
    fn time(&mut self, sent: &mut Vec<Instant>, now: Instant) {
        for at in sent.drain(..) {
            self.time_one(at, now);
        }
    }

    /// Times one record sent at `at` and seen acknowledged by `now`.
    fn time_one(&mut self, at: Instant, now: Instant) {
        let micros = micros_of(now.saturating_duration_since(at));
        self.latencies.push(micros);
        let since_start = at.saturating_duration_since(self.started);
        self.timeline.add(since_start, micros);
    }

    fn merge(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.timeline.merge(other.timeline);
        self.acked += other.acked;
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

fn lock_tally(t: &Mutex<Tally>) -> std::sync::MutexGuard<'_, Tally> {
    // A callback that panicked mid-update would leave at worst one record uncounted.
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn consume(global: &Global, args: ConsumeBench) -> Result<(), CliError> {
    let mut consumer = Consumer::connect(ConsumerConfig {
        brokers: global.brokers.clone(),
        auto_offset_reset: OffsetReset::Earliest,
        max_partition_fetch_bytes: args.partition_fetch_bytes,
        fetch_max_bytes: args.fetch_max_bytes,
        ..ConsumerConfig::default()
    })
    .await?;
    consumer.assign_topic(&args.topic).await?;
    consumer.seek_to_beginning().await?;
    let started = Instant::now();
    let mut last = Instant::now();
    let mut records = 0u64;
    let mut bytes = 0u64;
    let mut finished = started;
    loop {
        if args.records.is_some_and(|n| records >= n) {
            break;
        }
        if last.elapsed() >= Duration::from_millis(args.timeout_ms) {
            break;
        }
        let batch = consumer.poll(Duration::from_millis(200)).await?;
        if !batch.is_empty() {
            last = Instant::now();
            records += batch.len() as u64;
            bytes += batch
                .iter()
                .map(|r| r.value.as_ref().map_or(0, Bytes::len) as u64)
                .sum::<u64>();
            finished = last;
        }
    }
    let secs = finished.duration_since(started).as_secs_f64().max(1e-9);
    let rps = records as f64 / secs;
    let mbps = bytes as f64 / secs / 1e6;
    match global.output {
        Output::Json => print_json(&json!({
            "records": records,
            "bytes": bytes,
            "seconds": secs,
            "records_per_sec": rps,
            "mb_per_sec": mbps,
        })),
        Output::Table => println!(
            "{records} records ({bytes} value bytes) read in {secs:.2} s: {rps:.0} records/s ({mbps:.1} MB/s)"
        ),
    }
    Ok(())
}
