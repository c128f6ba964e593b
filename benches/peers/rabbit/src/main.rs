//! A load generator for RabbitMQ streams, a peer `benches/compare` measures Sluice
//! against: publishes fixed-size records to a stream over the stream protocol with a
//! window of publishes awaiting their confirms, and prints records/s and confirm
//! latency percentiles in the same shape as `nats-load`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rabbitmq_stream_client::types::Message;
use rabbitmq_stream_client::{Client, ClientOptions, Environment};
use sluice_client::Schedule;
use sluice_peer_load::{peer_payloads, share, LoadArgs, Summary};
use tokio::sync::{mpsc, Semaphore};

#[derive(Parser)]
#[command(about = "Publish to a RabbitMQ stream and report throughput")]
struct Args {
    /// Server host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Stream protocol port.
    #[arg(long, default_value_t = 5552)]
    port: u16,
    /// Stream (deleted and created fresh).
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Messages the client gathers into one publish frame.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Longest a partial publish frame waits for more messages (ms).
    #[arg(long, default_value_t = 1)]
    batch_delay_ms: u64,
    #[command(flatten)]
    load: LoadArgs,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One confirm, as the callback reports it: microseconds since the send, or a failure.
type Outcome = Result<u32, String>;

/// One producer's share of the run and how it sends.
struct Load {
    records: u64,
    window: usize,
    batch_size: usize,
    batch_delay: Duration,
    /// Records per second, when paced.
    rate: Option<f64>,
    /// Least time between a wake's last due record and the next wake, when paced.
    wake_gap: Duration,
}

async fn run_producer(
    env: Environment,
    stream: String,
    pool: Arc<Vec<Vec<u8>>>,
    load: Load,
) -> Result<(Vec<u32>, u64, Option<String>), BoxError> {
    let Load {
        records,
        window,
        batch_size,
        batch_delay,
        rate,
        wake_gap,
    } = load;
    let producer = env
        .producer()
        .batch_size(batch_size)
        .batch_delay(batch_delay)
        .build(&stream)
        .await?;
    // A permit per unconfirmed publish: the confirm callback hands it back.
    let permits = Arc::new(Semaphore::new(window));
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let send = |i: u64, sent: Instant| {
        let permits = permits.clone();
        let tx = tx.clone();
        let producer = &producer;
        let body = pool[(i % pool.len() as u64) as usize].clone();
        async move {
            permits.acquire().await?.forget();
            let released = permits.clone();
            producer
                .send(Message::builder().body(body).build(), move |status| {
                    let outcome = match status {
                        Ok(s) if s.confirmed() => {
                            Ok(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
                        }
                        Ok(s) => Err(format!("not confirmed: {:?}", s.status())),
                        Err(e) => Err(e.to_string()),
                    };
                    // The receiver outlives every callback; a closed channel means the
                    // run is already over and the outcome is not needed.
                    let _ = tx.send(outcome);
                    released.add_permits(1);
                    async {}
                })
                .await?;
            Ok::<_, BoxError>(())
        }
    };
    match rate {
        None => {
            for i in 0..records {
                send(i, Instant::now()).await?;
            }
        }
        Some(per_second) => {
            let runtime = tokio::runtime::Handle::current();
            // Paced from a thread of this task's own: block_in_place lets it sleep
            // precisely without holding up the runtime's other work.
            tokio::task::block_in_place(|| {
                Schedule::new(per_second)
                    .with_wake_gap(wake_gap)
                    .drive(&runtime, records, &send)
            })?;
        }
    }
    drop(tx);
    let mut latencies = Vec::with_capacity(records as usize);
    let mut failed = 0u64;
    let mut first_error = None;
    for _ in 0..records {
        match rx.recv().await {
            Some(Ok(us)) => latencies.push(us),
            Some(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            None => {
                failed += 1;
                first_error.get_or_insert_with(|| "confirm callback dropped".to_owned());
            }
        }
    }
    producer.close().await?;
    Ok((latencies, failed, first_error))
}

/// Copies the stream has besides its leader, as the server reports them: a check that a
/// cluster run really replicates. The client's options reach the server as `localhost`.
async fn replicas(port: u16, stream: &str) -> Result<usize, BoxError> {
    let mut opts = ClientOptions::default();
    opts.set_port(port);
    let client = Client::connect(opts).await?;
    let meta = client.metadata(vec![stream.to_owned()]).await?;
    client.close().await?;
    Ok(meta.get(stream).map_or(0, |m| m.replicas.len()))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    args.load.check()?;
    let env = Environment::builder()
        .host(&args.host)
        .port(args.port)
        .build()
        .await?;
    let _ = env.delete_stream(&args.stream).await;
    env.stream_creator().create(&args.stream).await?;
    let replicas = replicas(args.port, &args.stream).await?;
    let pool: Arc<Vec<Vec<u8>>> = Arc::new(peer_payloads(args.load.record_size, 1024));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..args.load.producers {
        let n = share(args.load.records, args.load.producers, p);
        tasks.push(tokio::spawn(run_producer(
            env.clone(),
            args.stream.clone(),
            pool.clone(),
            Load {
                records: n,
                window: args.load.window,
                batch_size: args.batch_size,
                batch_delay: Duration::from_millis(args.batch_delay_ms),
                rate: args.load.producer_rate(),
                wake_gap: args.load.wake_gap(),
            },
        )));
    }
    let mut latencies = Vec::with_capacity(args.load.records as usize);
    let mut failed = 0u64;
    let mut first_error = None;
    for t in tasks {
        let (lat, f, e) = t.await??;
        latencies.extend(lat);
        failed += f;
        if first_error.is_none() {
            first_error = e;
        }
    }
    let confirmed = latencies.len() as u64;
    let Summary {
        secs,
        rate,
        p50,
        p99,
        p999,
        ..
    } = Summary::of(confirmed, started, &mut latencies);
    if args.load.json {
        println!(
            "{{\"records\":{confirmed},\"replicas\":{replicas},\"failed\":{failed},\"seconds\":{secs:.3},\"records_per_sec\":{rate:.0},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"p999_ms\":{p999:.3}}}"
        );
    } else {
        println!(
            "{confirmed} records confirmed ({replicas} replicas besides the leader) in {secs:.2} s: {rate:.0} records/s ({:.1} MB/s), latency p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms",
            rate * args.load.record_size as f64 / 1e6
        );
    }
    let _ = env.delete_stream(&args.stream).await;
    match first_error {
        Some(e) => Err(format!("{failed} records failed; first error: {e}").into()),
        None => Ok(()),
    }
}
