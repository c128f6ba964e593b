//! A load generator for NATS JetStream, the peer `benches/compare` measures Sluice
//! against: publishes fixed-size records to a file-backed stream with a window of
//! publishes awaiting their acks, and prints records/s and ack latency percentiles in
//! the same shape as `sluice bench produce`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Publish to a NATS JetStream stream and report throughput")]
struct Args {
    /// Server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Stream (created fresh, file storage).
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Records to publish.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Bytes per record (half random-looking, half constant).
    #[arg(long, default_value_t = 100)]
    record_size: usize,
    /// Publishes in flight awaiting their acks.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Replicas of the stream (3 needs a three-server cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

fn payload(size: usize, seed: u64) -> bytes::Bytes {
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
        .collect::<Vec<u8>>()
        .into()
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let client = async_nats::connect(&args.url).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream(&args.stream).await;
    let subject = format!("{}.data", args.stream);
    js.create_stream(stream::Config {
        name: args.stream.clone(),
        subjects: vec![subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: args.replicas,
        ..Default::default()
    })
    .await?;
    let pool: Vec<bytes::Bytes> = (0..1024)
        .map(|i| payload(args.record_size, i + 1))
        .collect();
    let mut window = VecDeque::with_capacity(args.window);
    let mut latencies = Vec::with_capacity(args.records as usize);
    let started = Instant::now();
    for i in 0..args.records {
        if window.len() >= args.window {
            if let Some((sent, ack)) = window.pop_front() {
                let ack: jetstream::context::PublishAckFuture = ack;
                ack.await?;
                let sent: Instant = sent;
                latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
        }
        let sent = Instant::now();
        let ack = js
            .publish(subject.clone(), pool[(i % 1024) as usize].clone())
            .await?;
        window.push_back((sent, ack));
    }
    while let Some((sent, ack)) = window.pop_front() {
        ack.await?;
        latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    latencies.sort_unstable();
    let rate = args.records as f64 / secs;
    let (p50, p99, p999) = (
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        pct(&latencies, 0.999),
    );
    if args.json {
        println!(
            "{{\"records\":{},\"seconds\":{secs:.3},\"records_per_sec\":{rate:.0},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"p999_ms\":{p999:.3}}}",
            args.records
        );
    } else {
        println!(
            "{} records sent in {secs:.2} s: {rate:.0} records/s ({:.1} MB/s), latency p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms",
            args.records,
            rate * args.record_size as f64 / 1e6
        );
    }
    let _ = js.delete_stream(&args.stream).await;
    let _ = Duration::ZERO;
    Ok(())
}
