//! A load generator for NATS JetStream, the peer `benches/compare` measures Sluice
//! against: publishes fixed-size records to a file-backed stream with a window of
//! publishes awaiting their acks, and prints records/s and ack latency percentiles in
//! the same shape as `sluice bench produce`. With `--consume` it then reads the stream
//! back from its first record with one consumer (the consume-backlog workload); with
//! `--end-to-end` one consumer reads it while it is written and times each record from
//! when it was due to its arrival.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, context::PublishAckFuture, stream};
use clap::Parser;
use futures_util::StreamExt;
use sluice_client::Schedule;
use sluice_peer_load::{
    peer_payloads, print_consumed, share, stamped, Arrivals, LoadArgs, Summary, READ_BACK_WAIT,
};
use tokio::sync::{mpsc, Semaphore};

#[derive(Parser)]
#[command(about = "Publish to a NATS JetStream stream and report throughput")]
struct Args {
    /// Server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Stream (created fresh, file storage).
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Replicas of the stream (3 needs a three-server cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    #[command(flatten)]
    load: LoadArgs,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Creates the stream afresh, retrying while a new cluster has not yet elected the
/// leader of its JetStream metadata (creation fails until then).
async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subject: &str,
    replicas: usize,
) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = js.delete_stream(name).await;
        let created = js
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![subject.to_owned()],
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                eprintln!("stream not created yet ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// One publisher's sending side: a window of publishes awaiting acks, whose acks a
/// waiter task takes in order and times as they arrive.
struct Publisher {
    js: jetstream::Context,
    subject: String,
    pool: Arc<Vec<bytes::Bytes>>,
    window: Arc<Semaphore>,
    acks: mpsc::UnboundedSender<(Instant, PublishAckFuture)>,
    /// Under `--end-to-end`, when the run started: each value is stamped with its due
    /// time since then.
    stamp_from: Option<Instant>,
}

impl Publisher {
    async fn send(&self, i: u64, sent: Instant) -> Result<(), BoxError> {
        self.window.acquire().await?.forget();
        let payload = &self.pool[(i % self.pool.len() as u64) as usize];
        let value = match self.stamp_from {
            Some(started) => stamped(payload, sent.saturating_duration_since(started)).into(),
            None => payload.clone(),
        };
        let ack = self.js.publish(self.subject.clone(), value).await?;
        self.acks
            .send((sent, ack))
            .map_err(|_| "the ack waiter stopped")?;
        Ok(())
    }
}

/// How one publisher sends: its share of the records and its pace.
struct Share {
    records: u64,
    window: usize,
    rate: Option<f64>,
    wake_gap: Duration,
    stamp_from: Option<Instant>,
}

async fn publish(
    url: String,
    subject: String,
    pool: Arc<Vec<bytes::Bytes>>,
    load: Share,
) -> Result<Vec<u32>, BoxError> {
    let Share {
        records,
        window,
        rate,
        wake_gap,
        stamp_from,
    } = load;
    let js = jetstream::new(async_nats::connect(&url).await?);
    let window = Arc::new(Semaphore::new(window));
    let (acks, mut pending) = mpsc::unbounded_channel::<(Instant, PublishAckFuture)>();
    let permits = Arc::clone(&window);
    // The connection closes with its last handle, failing the acks still due: the
    // waiter keeps one until it has them all.
    let connection = js.clone();
    let waiter = tokio::spawn(async move {
        let _connection = connection;
        let mut latencies = Vec::with_capacity(records as usize);
        while let Some((sent, ack)) = pending.recv().await {
            ack.await?;
            latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            permits.add_permits(1);
        }
        Ok::<_, BoxError>(latencies)
    });
    let publisher = Publisher {
        js,
        subject,
        pool,
        window,
        acks,
        stamp_from,
    };
    match rate {
        None => {
            for i in 0..records {
                publisher.send(i, Instant::now()).await?;
            }
            // Closes the ack channel: the waiter ends once the last ack is in.
            drop(publisher);
        }
        Some(per_second) => {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let publisher = &publisher;
                Schedule::new(per_second).with_wake_gap(wake_gap).drive(
                    &runtime,
                    records,
                    |j, due| publisher.send(j, due),
                )
            })
            .await??;
        }
    }
    waiter.await?
}

/// Records each pull request of the read-back asks for. The client asks again once half
/// a request has arrived, so one is always outstanding and the server never waits on
/// the client; batches from 1,000 to 30,000 read about as fast. It stays well under the
/// 65,536 messages a subscription buffers (at most one and a half requests are in
/// flight), past which async-nats would drop messages as a slow consumer's.
const CONSUME_BATCH: usize = 10_000;

/// Reads `stream` back from its first record with one consumer until `records` have
/// arrived, and returns how many did and the seconds from just before the consumer's
/// creation to the last one's arrival; with `arrivals`, times each record as it comes
/// (the end-to-end workload, read while the stream is written).
///
/// The consumer is a pull consumer that delivers all and acks none, read through its
/// `messages()` stream of overlapping pull requests: no acks to send and no
/// per-record bookkeeping. Of what async-nats 0.46 offers for a replay it read a
/// backlog fastest, with an ordered push consumer (flow control, each record's reply
/// subject parsed to check its sequence) as fast and an ordered pull consumer (the same
/// check, requests fixed at 500 records) some 40% slower. A push consumer without flow
/// control could outrun the client and lose records as a slow consumer's.
async fn consume(
    js: &jetstream::Context,
    stream: &str,
    records: u64,
    mut arrivals: Option<Arrivals>,
) -> Result<(u64, f64, Option<Arrivals>), BoxError> {
    let started = Instant::now();
    let reader = js
        .create_consumer_on_stream(
            consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            },
            stream,
        )
        .await?;
    let mut messages = reader
        .stream()
        .max_messages_per_batch(CONSUME_BATCH)
        .messages()
        .await?;
    let mut count = 0;
    let mut last = None;
    while count < records {
        let message = tokio::time::timeout(READ_BACK_WAIT, messages.next())
            .await
            .map_err(|_| {
                format!("no record read back for {READ_BACK_WAIT:?} after {count} of {records}")
            })?
            .ok_or_else(|| format!("the consumer ended after {count} of {records} records"))??;
        count += 1;
        if let Some(arrivals) = arrivals.as_mut() {
            arrivals.arrived(&message.payload, Instant::now());
        }
        last = Some(message);
    }
    let secs = started.elapsed().as_secs_f64();
    // Delivery is in stream order from the first record, so the last one read being
    // the stream's record `records` shows each was read once: none missed, none twice.
    if let Some(last) = last {
        let sequence = last.info()?.stream_sequence;
        if sequence != records {
            return Err(format!(
                "read {records} records back but the last was stream sequence {sequence}"
            )
            .into());
        }
    }
    Ok((count, secs, arrivals))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    args.load.check()?;
    let js = jetstream::new(async_nats::connect(&args.url).await?);
    let subject = format!("{}.data", args.stream);
    create_stream(&js, &args.stream, &subject, args.replicas).await?;
    let pool: Arc<Vec<bytes::Bytes>> = Arc::new(
        peer_payloads(args.load.record_size, 1024)
            .into_iter()
            .map(bytes::Bytes::from)
            .collect(),
    );
    let started = Instant::now();
    // The end-to-end reader is reading before the first record goes.
    let reader = args.load.end_to_end.then(|| {
        let (js, stream, records) = (js.clone(), args.stream.clone(), args.load.records);
        tokio::spawn(async move {
            consume(&js, &stream, records, Some(Arrivals::new(started, records))).await
        })
    });
    let mut tasks = Vec::new();
    for p in 0..args.load.producers {
        let load = Share {
            records: share(args.load.records, args.load.producers, p),
            window: args.load.window,
            rate: args.load.producer_rate(),
            wake_gap: args.load.wake_gap(),
            stamp_from: args.load.end_to_end.then_some(started),
        };
        tasks.push(tokio::spawn(publish(
            args.url.clone(),
            subject.clone(),
            pool.clone(),
            load,
        )));
    }
    let mut latencies = Vec::with_capacity(args.load.records as usize);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let sent = Summary::of(args.load.records, started, &mut latencies);
    let e2e = match reader {
        Some(reader) => {
            let (_, _, arrivals) = reader.await??;
            arrivals.map(Arrivals::summary)
        }
        None => None,
    };
    sent.print_sent(args.load.record_size, args.load.json, e2e.as_ref());
    let consumed = if args.load.consume {
        Some(consume(&js, &args.stream, args.load.records, None).await)
    } else {
        None
    };
    // The stream goes even when its read-back failed.
    let _ = js.delete_stream(&args.stream).await;
    if let Some(consumed) = consumed {
        let (count, secs, _) = consumed?;
        print_consumed(count, secs, args.load.record_size, args.load.json);
    }
    Ok(())
}
