//! Sending ready batches to partition leaders. A dispatcher routes each batch to the
//! broker that leads its partition (learned from NOT_LEADER answers, which name the
//! leader); one task per broker owns that broker's produce stream, matches answers by
//! correlation id, and retries what failed for a retriable reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sluice_proto::v1::{produce_stream_response, Acks as WireAcks, ProduceRequest};
use sluice_proto::ErrorReason;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::accumulator::{Accumulator, Acked, ReadyBatch};
use super::{Acks, ProducerConfig};
use crate::error::ClientError;
use crate::routes::Routes;

/// Starts the dispatcher; `first` is the channel to `first_addr`, a broker that answered.
pub(crate) fn spawn(
    first_addr: String,
    first: Channel,
    acc: Arc<Accumulator>,
    config: ProducerConfig,
) {
    tokio::spawn(dispatch(first_addr, first, acc, config));
}

fn wire_acks(a: Acks) -> i32 {
    match a {
        Acks::None => WireAcks::None as i32,
        Acks::Leader => WireAcks::Leader as i32,
        Acks::All => WireAcks::All as i32,
    }
}

fn backoff(config: &ProducerConfig, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.min(4);
    (config.retry_backoff * factor).min(Duration::from_secs(1))
}

/// Retries `batch` if the error allows and time remains; otherwise fails it.
fn retry_or_fail(
    acc: &Accumulator,
    config: &ProducerConfig,
    mut batch: ReadyBatch,
    err: ClientError,
) {
    let retriable = err.is_retriable()
        && batch.attempts < config.retries
        && batch.created.elapsed() < config.delivery_timeout;
    if retriable {
        batch.attempts += 1;
        tracing::debug!(topic = %batch.topic, partition = batch.partition, attempts = batch.attempts, error = %err, "retrying batch");
        let wait = backoff(config, batch.attempts);
        acc.requeue(batch, wait);
    } else {
        acc.complete(batch, Err(err));
    }
}

/// Sends again a batch that was never sent (so it cannot have been written), unless
/// its delivery timeout has passed; this is not a retry and does not count as one.
fn resend(acc: &Accumulator, config: &ProducerConfig, batch: ReadyBatch, err: ClientError) {
    if batch.created.elapsed() < config.delivery_timeout {
        acc.requeue(batch, config.retry_backoff);
    } else {
        acc.complete(batch, Err(err));
    }
}

/// What a broker's task tells the dispatcher.
enum Event {
    /// The broker does not lead the batch's partition (nothing was written); `to` is
    /// the leader it named, if any.
    Redirect {
        batch: ReadyBatch,
        to: Option<String>,
        err: ClientError,
    },
    /// The broker could not be reached or its stream broke; its task has ended.
    Down { addr: String },
}

/// Where batches go: partition leaders, and one task per broker.
struct Router {
    routes: Routes,
    conns: HashMap<String, mpsc::Sender<ReadyBatch>>,
}

impl Router {
    fn down(&mut self, addr: &str) {
        self.conns.remove(addr);
        self.routes.down(addr);
    }
}

async fn dispatch(
    first_addr: String,
    first: Channel,
    acc: Arc<Accumulator>,
    config: ProducerConfig,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut router = Router {
        routes: Routes::new(&config.brokers, first_addr, first),
        conns: HashMap::new(),
    };
    loop {
        if Arc::strong_count(&acc) == 1 && acc.outstanding() == 0 {
            // Dropping the routes' senders ends every broker task.
            return;
        }
        let room = config
            .max_in_flight
            .saturating_sub(in_flight.load(Ordering::Acquire));
        let (ready, next_wake) = acc.take_ready(room);
        for b in ready {
            let addr = router
                .routes
                .address(&(b.topic.to_string(), b.partition))
                .to_string();
            let tx = match router.conns.get(&addr) {
                Some(tx) => tx.clone(),
                None => match router.routes.channel(&addr) {
                    Ok(channel) => {
                        let (tx, rx) = mpsc::channel(config.max_in_flight.max(16));
                        tokio::spawn(broker_task(BrokerTask {
                            addr: addr.clone(),
                            channel,
                            rx,
                            acc: Arc::clone(&acc),
                            config: config.clone(),
                            events: events_tx.clone(),
                            in_flight: Arc::clone(&in_flight),
                        }));
                        router.conns.insert(addr.clone(), tx.clone());
                        tx
                    }
                    Err(e) => {
                        router.down(&addr);
                        resend(&acc, &config, b, e);
                        continue;
                    }
                },
            };
            in_flight.fetch_add(1, Ordering::AcqRel);
            if let Err(mpsc::error::SendError(b)) = tx.send(b).await {
                // That broker's task ended meanwhile: never sent, send it again.
                in_flight.fetch_sub(1, Ordering::AcqRel);
                router.down(&addr);
                acc.requeue(b, Duration::ZERO);
            }
        }
        let wait = next_wake.map_or(Duration::from_millis(200), |t| {
            t.saturating_duration_since(tokio::time::Instant::now())
        });
        if wait.is_zero() {
            // Due already: a timer would round up to the next millisecond.
            tokio::task::yield_now().await;
            continue;
        }
        let sleep = tokio::time::sleep(wait);
        tokio::select! {
            _ = acc.wake.notified() => {}
            _ = sleep => {}
            Some(ev) = events.recv() => match ev {
                Event::Redirect { batch, to, err } => {
                    let key = (batch.topic.to_string(), batch.partition);
                    if batch.created.elapsed() >= config.delivery_timeout {
                        acc.complete(batch, Err(err));
                        continue;
                    }
                    // A redirect is not a retry: the batch was not written anywhere.
                    // Without a leader named (an election is running), wait a little,
                    // then ask whichever broker is the default.
                    let wait = if to.is_some() { Duration::ZERO } else { config.retry_backoff };
                    router.routes.learn(key, to.as_deref());
                    acc.requeue(batch, wait);
                }
                Event::Down { addr } => router.down(&addr),
            },
        }
    }
}

struct BrokerTask {
    addr: String,
    channel: Channel,
    rx: mpsc::Receiver<ReadyBatch>,
    acc: Arc<Accumulator>,
    config: ProducerConfig,
    events: mpsc::UnboundedSender<Event>,
    in_flight: Arc<AtomicUsize>,
}

impl BrokerTask {
    fn done(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        // The dispatcher may be waiting for room.
        self.acc.wake.notify_one();
    }

    fn answer(&self, batch: ReadyBatch, err: ClientError) {
        self.done();
        if err.reason() == Some(ErrorReason::NotLeader) {
            let to = err.metadata_str("leader_address").map(str::to_string);
            let _ = self.events.send(Event::Redirect { batch, to, err });
        } else {
            retry_or_fail(&self.acc, &self.config, batch, err);
        }
    }
}

/// Owns one broker's produce stream until the dispatcher drops its sender or the
/// stream breaks.
async fn broker_task(mut t: BrokerTask) {
    let timeout_ms = t
        .config
        .request_timeout
        .as_millis()
        .min(u128::from(u32::MAX)) as u32;
    let (req_tx, req_rx) = mpsc::channel(t.config.max_in_flight.max(16));
    let mut responses = match super::wire::produce_stream(t.channel.clone(), req_rx).await {
        Ok(r) => r,
        Err(status) => {
            let err = ClientError::from(status);
            tracing::warn!(broker = %t.addr, error = %err, "cannot open the produce stream");
            let _ = t.events.send(Event::Down {
                addr: t.addr.clone(),
            });
            // Nothing was sent: these go back to be routed again, after a pause.
            t.rx.close();
            while let Some(b) = t.rx.recv().await {
                t.done();
                resend(&t.acc, &t.config, b, err.clone());
            }
            return;
        }
    };
    let mut next_id: u64 = 0;
    let mut in_flight: HashMap<u64, ReadyBatch> = HashMap::new();
    let mut open = true;
    loop {
        if !open && in_flight.is_empty() {
            return;
        }
        tokio::select! {
            b = t.rx.recv(), if open => match b {
                Some(b) => {
                    next_id += 1;
                    let req = ProduceRequest {
                        topic: b.topic.to_string(),
                        partition: b.partition as i32,
                        records: b.bytes.clone(),
                        acks: wire_acks(t.config.acks),
                        timeout_ms,
                    };
                    if req_tx.send((next_id, req)).await.is_err() {
                        in_flight.insert(next_id, b);
                        break;
                    }
                    if t.config.acks == Acks::None {
                        t.done();
                        t.acc.complete(
                            b,
                            Ok(Acked {
                                base_offset: None,
                                log_append_time: -1,
                            }),
                        );
                    } else {
                        in_flight.insert(next_id, b);
                    }
                }
                None => open = false,
            },
            msg = responses.next(), if !in_flight.is_empty() => match msg {
                Some(Ok(resp)) => {
                    let Some(batch) = in_flight.remove(&resp.correlation_id) else { continue };
                    match resp.result {
                        Some(produce_stream_response::Result::Response(r)) => {
                            t.done();
                            t.acc.complete(
                                batch,
                                Ok(Acked {
                                    base_offset: u64::try_from(r.base_offset).ok(),
                                    log_append_time: r.log_append_time,
                                }),
                            );
                        }
                        Some(produce_stream_response::Result::Error(e)) => {
                            t.answer(batch, ClientError::from(&e));
                        }
                        None => {
                            t.done();
                            t.acc.complete(
                                batch,
                                Err(ClientError::Batch("empty produce answer".into())),
                            );
                        }
                    }
                }
                Some(Err(status)) => {
                    tracing::warn!(broker = %t.addr, error = %status, "produce stream failed");
                    break;
                }
                None => break,
            },
        }
    }
    // The stream is gone: whatever was in flight may or may not have been written.
    let _ = t.events.send(Event::Down {
        addr: t.addr.clone(),
    });
    for (_, b) in in_flight.drain() {
        let err = ClientError::Rpc {
            code: tonic::Code::Unavailable,
            message: "produce stream closed before the answer".into(),
        };
        t.done();
        retry_or_fail(&t.acc, &t.config, b, err);
    }
    t.rx.close();
    while let Some(b) = t.rx.recv().await {
        // Queued here but never sent.
        t.done();
        let err = ClientError::Rpc {
            code: tonic::Code::Unavailable,
            message: format!("broker {} unreachable", t.addr),
        };
        resend(&t.acc, &t.config, b, err);
    }
}
