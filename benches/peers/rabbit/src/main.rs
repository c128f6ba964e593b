//! A load generator for RabbitMQ streams, a peer `benches/compare` measures Sluice
//! against: publishes fixed-size records to a stream over the stream protocol with a
//! window of publishes awaiting their confirms, and prints records/s and confirm
//! latency percentiles in the same shape as `nats-load`. With `--consume` it then
//! reads the stream back from its first record with one consumer (the consume-backlog
//! workload) and prints records/s as `print_consumed` does; with `--end-to-end` one
//! consumer reads it while it is written and times each record from when it was due to
//! its arrival.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rabbitmq_stream_client::types::{Message, MessageResult, OffsetSpecification, ResponseKind};
use rabbitmq_stream_client::{Client, ClientOptions, Environment};
use sluice_client::Schedule;
use sluice_peer_load::{
    peer_payloads, print_consumed, share, stamped, within, Arrivals, LoadArgs, Summary,
    READ_BACK_WAIT,
};
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
    /// Under `--end-to-end`, when the run started: each value is stamped with its due
    /// time since then.
    stamp_from: Option<Instant>,
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
        stamp_from,
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
        let payload = &pool[(i % pool.len() as u64) as usize];
        let body = match stamp_from {
            Some(started) => stamped(payload, sent.saturating_duration_since(started)),
            None => payload.clone(),
        };
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

/// Chunks the server may send the read-back consumer ahead of its credits, given at
/// subscribe; each chunk that arrives hands one back. The client's own consumer (0.3)
/// subscribes with 1, so every chunk waits a round trip for the one before it to reach
/// the client; 10 keeps chunks coming while those credits travel (it is what the Java
/// client's consumer builder starts with) and still bounds what the server pushes ahead
/// of a slow reader to 10 chunks.
const CONSUME_CREDITS: u16 = 10;

/// The subscription the read-back's connection opens (its only one).
const SUBSCRIPTION: u8 = 1;

/// One chunk as the read-back's handler reports it: its record count, when it arrived
/// and, for the end-to-end workload, its records; or why the read cannot go on.
type Chunk = Result<(u64, Instant, Vec<Message>), String>;

/// Reads the stream back from its first record with one consumer until `records` have
/// arrived: the records that arrived (`records`, or more if records whose publish
/// failed were stored anyway) and the seconds from just before the consumer was built
/// until the last of them arrived.
///
/// The consumer is the client's raw one (a `Client` subscribed with a handler), not the
/// `Environment`'s consumer builder: in 0.3 the builder's consumer is only read as a
/// `futures` `Stream`, a crate this package does not depend on, and it fixes the initial
/// credit at 1 (see `CONSUME_CREDITS`). The handler does what the builder's does, one
/// credit back per chunk, but counts the chunk's records instead of queueing each one.
/// Like `replicas`, it reaches the server as `localhost` at `port`, and reads from
/// that node's copy of the stream. With `arrivals` (the end-to-end workload, read while
/// the stream is written) it times each record as its chunk arrives.
async fn consume(
    port: u16,
    stream: &str,
    records: u64,
    mut arrivals: Option<Arrivals>,
) -> Result<(u64, f64, Option<Arrivals>), BoxError> {
    let keep = arrivals.is_some();
    let mut opts = ClientOptions::default();
    opts.set_port(port);
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
    let started = Instant::now();
    let client = within("connecting the consumer", Client::connect(opts)).await?;
    let crediting = client.clone();
    client
        .set_handler(move |item: MessageResult| {
            let tx = tx.clone();
            let client = crediting.clone();
            async move {
                let chunk = match item {
                    Some(Ok(response)) => match response.kind_ref() {
                        ResponseKind::Deliver(chunk) => {
                            let now = Instant::now();
                            // Credit before counting, so the next chunk is on its way
                            // while this one is reported.
                            Some(match client.credit(SUBSCRIPTION, 1).await {
                                Ok(()) => Ok((
                                    chunk.messages.len() as u64,
                                    now,
                                    if keep {
                                        chunk.messages.clone()
                                    } else {
                                        Vec::new()
                                    },
                                )),
                                Err(e) => Err(format!("credit not sent: {e}")),
                            })
                        }
                        ResponseKind::Credit(refused) => {
                            Some(Err(format!("credit refused: {refused:?}")))
                        }
                        ResponseKind::MetadataUpdate(update) => {
                            Some(Err(format!("stream changed: {update:?}")))
                        }
                        _ => None,
                    },
                    Some(Err(e)) => Some(Err(e.to_string())),
                    None => Some(Err("connection closed".to_owned())),
                };
                if let Some(chunk) = chunk {
                    // A closed channel means the read-back is already over.
                    let _ = tx.send(chunk);
                }
                Ok(())
            }
        })
        .await;
    let subscribed = within(
        "subscribing",
        client.subscribe(
            SUBSCRIPTION,
            stream,
            OffsetSpecification::First,
            CONSUME_CREDITS,
            HashMap::new(),
        ),
    )
    .await?;
    if !subscribed.is_ok() {
        return Err(format!("subscribing to {stream} refused: {:?}", subscribed.code()).into());
    }
    let mut count = 0u64;
    while count < records {
        let chunk = match tokio::time::timeout(READ_BACK_WAIT, rx.recv()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => Err("handler dropped".to_owned()),
            Err(_) => Err(format!("no delivery for {} s", READ_BACK_WAIT.as_secs())),
        };
        match chunk {
            Ok((n, arrived, messages)) => {
                count += n;
                if let Some(arrivals) = arrivals.as_mut() {
                    for m in &messages {
                        arrivals.arrived(m.data().unwrap_or_default(), arrived);
                    }
                }
            }
            Err(e) => {
                return Err(format!("read back {count} of {records} records, then: {e}").into())
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let unsubscribed = within("unsubscribing", client.unsubscribe(SUBSCRIPTION)).await?;
    if !unsubscribed.is_ok() {
        return Err(format!("unsubscribing refused: {:?}", unsubscribed.code()).into());
    }
    within("closing the consumer", client.close()).await?;
    Ok((count, secs, arrivals))
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
    // The end-to-end reader is reading before the first record goes.
    let reader = args.load.end_to_end.then(|| {
        let (port, stream, records) = (args.port, args.stream.clone(), args.load.records);
        tokio::spawn(async move {
            consume(
                port,
                &stream,
                records,
                Some(Arrivals::new(started, records)),
            )
            .await
        })
    });
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
                stamp_from: args.load.end_to_end.then_some(started),
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
    let e2e = match reader {
        Some(reader) => {
            let (_, _, arrivals) = reader.await??;
            arrivals.map(Arrivals::summary)
        }
        None => None,
    };
    if args.load.json {
        println!(
            "{{\"records\":{confirmed},\"replicas\":{replicas},\"failed\":{failed},\"seconds\":{secs:.3},\"records_per_sec\":{rate:.0},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"p999_ms\":{p999:.3}{}}}",
            e2e.as_ref().map_or(String::new(), |e| e.json_fields())
        );
    } else {
        println!(
            "{confirmed} records confirmed ({replicas} replicas besides the leader) in {secs:.2} s: {rate:.0} records/s ({:.1} MB/s), latency p50 {p50:.2} ms, p99 {p99:.2} ms, p99.9 {p999:.2} ms",
            rate * args.load.record_size as f64 / 1e6
        );
        if let Some(e2e) = &e2e {
            e2e.print_text();
        }
    }
    // Read back before the stream is deleted; a failed read-back still lets it be.
    let consumed = if args.load.consume {
        consume(args.port, &args.stream, confirmed, None)
            .await
            .map(|(count, secs, _)| {
                print_consumed(count, secs, args.load.record_size, args.load.json);
            })
    } else {
        Ok(())
    };
    let _ = env.delete_stream(&args.stream).await;
    match first_error {
        Some(e) => {
            if let Err(read) = consumed {
                eprintln!("reading back failed too: {read}");
            }
            Err(format!("{failed} records failed; first error: {e}").into())
        }
        None => consumed,
    }
}
