//! Sending ready batches to partition leaders. A dispatcher routes each batch to the
//! broker that leads its partition (learned from NOT_LEADER answers, which name the
//! leader) and puts it on that broker's produce stream itself; one task per broker
//! opens the stream, matches its answers by correlation id, and retries what failed
//! for a retriable reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use h2::SendStream;
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

/// Batches sent on one stream and not answered yet, by correlation id. Shared by the
/// dispatcher, which puts each batch here before sending it, and the stream's task,
/// which takes it out when its answer comes: whichever takes a batch out owns it, so a
/// batch whose send fails as the stream breaks is handled once, by one of them.
struct Unanswered {
    /// False once the stream's task has given up on the stream; nothing is put here then.
    open: bool,
    /// Each batch with when it was put on the stream. Ids are given in sending order,
    /// so the first entry is the batch that has waited longest.
    batches: BTreeMap<u64, (Instant, ReadyBatch)>,
}

type Pending = Arc<Mutex<Unanswered>>;

fn lock(p: &Mutex<Unanswered>) -> MutexGuard<'_, Unanswered> {
    // Nothing here can be left half-changed by a panic.
    p.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the producer's tasks share.
struct Shared {
    acc: Arc<Accumulator>,
    config: ProducerConfig,
    events: mpsc::UnboundedSender<Event>,
    /// Batches handed to a broker's stream (or waiting for it to open) and not answered.
    in_flight: AtomicUsize,
    timeout_ms: u32,
}

impl Shared {
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

/// What a broker's task tells the dispatcher. `link` tells a link from an earlier one
/// to the same broker, whose news is stale.
enum Event {
    /// The stream is open: batches go straight onto it from now on.
    Opened { addr: String, link: OpenLink },
    /// The stream could not be opened; nothing was sent on it.
    OpenFailed {
        addr: String,
        link: u64,
        err: ClientError,
    },
    /// The broker does not lead the batch's partition (nothing was written); `to` is
    /// the leader it named, if any.
    Redirect {
        batch: ReadyBatch,
        to: Option<String>,
        err: ClientError,
    },
    /// The stream broke or ended; its task has settled every batch it held.
    Down { addr: String, link: u64 },
}

/// The sending half of an open produce stream.
struct OpenLink {
    id: u64,
    send: SendStream<super::wire::Message>,
    pending: Pending,
    next_correlation: u64,
}

impl Drop for OpenLink {
    fn drop(&mut self) {
        // Ends the request stream, so the broker answers what it has and then ends its
        // side, and the stream's task ends once every answer is in.
        let _ = self.send.send_data(super::wire::end_of_stream(), true);
    }
}

impl OpenLink {
    /// Puts `b` on the stream; gives it back if the stream is gone (then it was not
    /// sent, or not whole, so the broker cannot have written it).
    fn send(&mut self, shared: &Shared, b: ReadyBatch) -> Result<(), ReadyBatch> {
        self.next_correlation += 1;
        let id = self.next_correlation;
        let req = ProduceRequest {
            topic: b.topic.to_string(),
            partition: b.partition as i32,
            records: b.bytes.clone(),
            acks: wire_acks(shared.config.acks),
            timeout_ms: shared.timeout_ms,
        };
        let message = match super::wire::message(id, req) {
            Ok(message) => message,
            Err(status) => {
                shared.done();
                shared.acc.complete(b, Err(ClientError::from(status)));
                return Ok(());
            }
        };
        if shared.config.acks == Acks::None {
            if self.send.send_data(message, false).is_err() {
                return Err(b);
            }
            shared.done();
            let acked = Acked {
                base_offset: None,
                log_append_time: -1,
            };
            shared.acc.complete(b, Ok(acked));
            return Ok(());
        }
        {
            let mut pending = lock(&self.pending);
            if !pending.open {
                return Err(b);
            }
            pending.batches.insert(id, (Instant::now(), b));
        }
        if self.send.send_data(message, false).is_err() {
            // Unless the stream's task has taken it to settle, it is ours to send again.
            if let Some((_, b)) = lock(&self.pending).batches.remove(&id) {
                return Err(b);
            }
        }
        Ok(())
    }
}

/// One broker's stream, as the dispatcher sees it.
enum Link {
    /// Being opened; these wait for it.
    Opening {
        id: u64,
        queued: Vec<ReadyBatch>,
    },
    Open(OpenLink),
}

impl Link {
    fn id(&self) -> u64 {
        match self {
            Link::Opening { id, .. } | Link::Open(OpenLink { id, .. }) => *id,
        }
    }
}

/// Where batches go: partition leaders, and one link per broker.
struct Router {
    routes: Routes,
    links: HashMap<String, Link>,
    next_link: u64,
}

impl Router {
    /// Forgets the link to `addr` if it is still `link`.
    fn down(&mut self, addr: &str, link: u64) -> Option<Link> {
        if self.links.get(addr).map(Link::id) != Some(link) {
            return None;
        }
        self.routes.down(addr);
        self.links.remove(addr)
    }

    /// Sends `b` to `addr`, opening a stream to it first if there is none.
    fn send(&mut self, shared: &Arc<Shared>, addr: String, b: ReadyBatch) {
        match self.links.get_mut(&addr) {
            Some(Link::Open(link)) => {
                if let Err(b) = link.send(shared, b) {
                    // That stream broke meanwhile: never sent, send it again.
                    shared.done();
                    let id = link.id;
                    self.down(&addr, id);
                    shared.acc.requeue(b, Duration::ZERO);
                }
            }
            Some(Link::Opening { queued, .. }) => queued.push(b),
            None => {
                self.next_link += 1;
                let id = self.next_link;
                tokio::spawn(stream_task(Arc::clone(shared), addr.clone(), id));
                self.links.insert(
                    addr,
                    Link::Opening {
                        id,
                        queued: vec![b],
                    },
                );
            }
        }
    }
}

async fn dispatch(
    first_addr: String,
    first: Channel,
    acc: Arc<Accumulator>,
    config: ProducerConfig,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let timeout_ms = config.request_timeout.as_millis().min(u128::from(u32::MAX)) as u32;
    let mut router = Router {
        routes: Routes::new(&config.brokers, first_addr, first),
        links: HashMap::new(),
        next_link: 0,
    };
    let shared = Arc::new(Shared {
        acc,
        config,
        events: events_tx,
        in_flight: AtomicUsize::new(0),
        timeout_ms,
    });
    let (acc, config) = (&shared.acc, &shared.config);
    loop {
        if Arc::strong_count(acc) == 1 && acc.outstanding() == 0 {
            // Dropping the links ends every stream, and then its task.
            return;
        }
        let room = config
            .max_in_flight
            .saturating_sub(shared.in_flight.load(Ordering::Acquire));
        let (ready, next_wake) = acc.take_ready(room);
        for b in ready {
            let addr = router
                .routes
                .address(&(b.topic.to_string(), b.partition))
                .to_string();
            shared.in_flight.fetch_add(1, Ordering::AcqRel);
            router.send(&shared, addr, b);
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
                Event::Opened { addr, link } => {
                    let current = matches!(
                        router.links.get(&addr),
                        Some(Link::Opening { id, .. }) if *id == link.id
                    );
                    if !current {
                        // A stale link: dropping it ends its stream.
                        continue;
                    }
                    let queued = match router.links.insert(addr.clone(), Link::Open(link)) {
                        Some(Link::Opening { queued, .. }) => queued,
                        _ => Vec::new(),
                    };
                    for b in queued {
                        router.send(&shared, addr.clone(), b);
                    }
                }
                Event::OpenFailed { addr, link, err } => {
                    if let Some(Link::Opening { queued, .. }) = router.down(&addr, link) {
                        // Nothing was sent: these go back to be routed again, after a pause.
                        for b in queued {
                            shared.done();
                            resend(acc, config, b, err.clone());
                        }
                    }
                }
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
                Event::Down { addr, link } => {
                    router.down(&addr, link);
                }
            },
        }
    }
}

/// Opens one broker's produce stream, hands its sending half to the dispatcher, and
/// settles every answer until the stream ends.
async fn stream_task(shared: Arc<Shared>, addr: String, link: u64) {
    let (send, mut answers) = match super::wire::open(&addr).await {
        Ok(opened) => opened,
        Err(status) => {
            let err = ClientError::from(status);
            tracing::warn!(broker = %addr, error = %err, "cannot open the produce stream");
            let _ = shared.events.send(Event::OpenFailed { addr, link, err });
            return;
        }
    };
    let pending: Pending = Arc::new(Mutex::new(Unanswered {
        open: true,
        batches: BTreeMap::new(),
    }));
    let opened = Event::Opened {
        addr: addr.clone(),
        link: OpenLink {
            id: link,
            send,
            pending: Arc::clone(&pending),
            next_correlation: 0,
        },
    };
    // If the dispatcher is gone the link is dropped with the event, ending the stream.
    let _ = shared.events.send(opened);
    let patience = answer_patience(shared.config.request_timeout);
    let mut gave_up = false;
    loop {
        // A broker that keeps its socket open but stops answering (stopped, or stuck)
        // would otherwise hold what it was sent until a keep-alive ping failed. With
        // nothing awaiting an answer, this looks again after `patience` at what was
        // sent meanwhile, so a batch is given up within twice that.
        let oldest = lock(&pending)
            .batches
            .first_key_value()
            .map(|(_, (sent, _))| *sent);
        let deadline = oldest.unwrap_or_else(Instant::now) + patience;
        let answer = match tokio::time::timeout_at(deadline.into(), answers.next()).await {
            Ok(answer) => answer,
            Err(_) if oldest.is_some() => {
                tracing::warn!(broker = %addr, waited_ms = patience.as_millis() as u64, "no answer from the broker in time; dropping its produce stream");
                gave_up = true;
                break;
            }
            Err(_) => continue,
        };
        match answer {
            Some(Ok(resp)) => {
                let Some((_, batch)) = lock(&pending).batches.remove(&resp.correlation_id) else {
                    continue;
                };
                match resp.result {
                    Some(produce_stream_response::Result::Response(r)) => {
                        shared.done();
                        let acked = Acked {
                            base_offset: u64::try_from(r.base_offset).ok(),
                            log_append_time: r.log_append_time,
                        };
                        shared.acc.complete(batch, Ok(acked));
                    }
                    Some(produce_stream_response::Result::Error(e)) => {
                        shared.answer(batch, ClientError::from(&e));
                    }
                    None => {
                        shared.done();
                        let err = ClientError::Batch("empty produce answer".into());
                        shared.acc.complete(batch, Err(err));
                    }
                }
            }
            Some(Err(status)) => {
                tracing::warn!(broker = %addr, error = %status, "produce stream failed");
                break;
            }
            None => break,
        }
    }
    // The stream is gone: whatever was in flight may or may not have been written.
    let unanswered: Vec<ReadyBatch> = {
        let mut pending = lock(&pending);
        pending.open = false;
        std::mem::take(&mut pending.batches)
            .into_values()
            .map(|(_, b)| b)
            .collect()
    };
    let _ = shared.events.send(Event::Down {
        addr: addr.clone(),
        link,
    });
    for b in unanswered {
        let err = if gave_up {
            ClientError::Timeout(format!(
                "no answer from broker {addr} within {} ms",
                patience.as_millis()
            ))
        } else {
            ClientError::Rpc {
                code: tonic::Code::Unavailable,
                message: "produce stream closed before the answer".into(),
            }
        };
        shared.done();
        retry_or_fail(&shared.acc, &shared.config, b, err);
    }
}

/// How long a batch may wait for its answer before the stream is given up, as Kafka's
/// producer gives up a connection after `request.timeout.ms`. The broker itself answers
/// by `request_timeout` (an acks=all batch that cannot be replicated in time gets
/// REQUEST_TIMED_OUT), so a little more is allowed for that answer to arrive.
fn answer_patience(request_timeout: Duration) -> Duration {
    request_timeout + request_timeout.min(Duration::from_secs(5))
}
