//! `Producer`: batches records per partition and keeps many batches in flight, on one
//! gRPC stream per partition leader.
//!
//! `send` puts a record into its partition's open batch and returns at once with a
//! [`DeliveryFuture`]; a batch goes out when it reaches `batch_size` or has waited
//! `linger`. A background task routes each ready batch to its partition's leader (a
//! NOT_LEADER answer names the leader, and the batch, which was not written, goes there
//! at once, without counting as a retry); a task per broker owns that broker's stream,
//! matches answers by correlation id, and retries batches that failed for a retriable
//! reason (with backoff, until `delivery_timeout`). Like Kafka's producer without
//! idempotence, a retried batch can land after a later batch of the same partition, and a
//! batch whose answer was lost may land twice; keyed order holds whenever no retry
//! happens. Set `retries` to 0 to fail such batches instead (redirects still happen).

mod accumulator;
pub mod partitioner;
mod sender;
mod wire;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use sluice_log_store::{Compression, Header};
use tokio::sync::Notify;

use crate::admin::Admin;
use crate::connection::connect_first;
use crate::error::{ClientError, Result};

pub use accumulator::BatchOutcome;
use accumulator::{Accumulator, Blocked, TryAppend};

/// What the producer waits for before a send counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// `acks=0`: nothing; offsets are unknown.
    None,
    /// `acks=1`: the leader appended the batch.
    Leader,
    /// `acks=all`: every in-sync replica has it (the default).
    All,
}

impl Acks {
    /// Parses `0`, `1`, `all` or `-1`.
    pub fn parse(s: &str) -> Option<Acks> {
        match s {
            "0" => Some(Acks::None),
            "1" => Some(Acks::Leader),
            "all" | "-1" => Some(Acks::All),
            _ => None,
        }
    }
}

/// Producer settings, with Kafka's names.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Brokers, `host:port,host:port`.
    pub brokers: String,
    /// `acks` (default all).
    pub acks: Acks,
    /// `batch.size`: a batch is sent once it holds this many bytes (default 64 KiB; larger
    /// than Kafka's 16 KiB because batches are the broker's unit of work).
    pub batch_size: usize,
    /// `linger.ms`: how long a batch may wait to fill (default 5 ms). Finer than a
    /// millisecond is kept too: while records keep coming, a batch closes on the first
    /// one after its linger.
    pub linger: Duration,
    /// `compression.type` (default none).
    pub compression: Compression,
    /// `retries` for retriable failures (default unlimited, within `delivery_timeout`).
    pub retries: u32,
    /// `retry.backoff.ms` (default 100 ms, doubling to 1 s).
    pub retry_backoff: Duration,
    /// `delivery.timeout.ms`: a send fails once this much time has passed (default 120 s).
    pub delivery_timeout: Duration,
    /// `request.timeout.ms`: how long the broker may wait for acks (default 30 s). A
    /// batch unanswered for that long and a little more (up to 5 s) gives up its broker's
    /// connection: everything in flight on it is retried or, out of retries, fails.
    pub request_timeout: Duration,
    /// `buffer.memory`: bytes of unsent records before `send` waits (default 64 MiB).
    pub buffer_memory: usize,
    /// Batches in flight at once on the stream (default 64).
    pub max_in_flight: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            brokers: crate::connection::DEFAULT_BROKERS.to_string(),
            acks: Acks::All,
            batch_size: 64 * 1024,
            linger: Duration::from_millis(5),
            compression: Compression::None,
            retries: u32::MAX,
            retry_backoff: Duration::from_millis(100),
            delivery_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(30),
            buffer_memory: 64 << 20,
            max_in_flight: 64,
        }
    }
}

/// A record to send.
#[derive(Debug, Clone)]
pub struct ProducerRecord {
    /// Topic (shared: a producer sending many records to one topic clones a pointer).
    pub topic: Arc<str>,
    /// Partition; `None` lets the partitioner choose (by key, or sticky when keyless).
    pub partition: Option<u32>,
    /// Key.
    pub key: Option<Bytes>,
    /// Value (`None` is a tombstone).
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
    /// Timestamp in ms; `None` means now.
    pub timestamp: Option<i64>,
}

impl Default for ProducerRecord {
    fn default() -> Self {
        // `..ProducerRecord::default()` is how records are written: one shared empty
        // name keeps that from allocating (and freeing) a topic per record.
        static NO_TOPIC: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
        ProducerRecord {
            topic: Arc::clone(&NO_TOPIC),
            partition: None,
            key: None,
            value: None,
            headers: Vec::new(),
            timestamp: None,
        }
    }
}

impl ProducerRecord {
    /// A keyless record.
    pub fn new(topic: impl Into<Arc<str>>, value: impl Into<Bytes>) -> Self {
        ProducerRecord {
            topic: topic.into(),
            partition: None,
            key: None,
            value: Some(value.into()),
            headers: Vec::new(),
            timestamp: None,
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }
}

/// Where a record went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Topic (shared with the producer's other records of it: no copy per record).
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset; `None` with `acks=0`.
    pub offset: Option<u64>,
    /// The broker's append time under `LogAppendTime`, else -1.
    pub log_append_time: i64,
}

/// A record's callback, given its batch's outcome.
type Callback = Box<dyn FnOnce(&BatchOutcome) + Send>;

/// A batch's outcome, once known, shared by the futures of all its records: one
/// allocation per batch, one reference count step per record.
pub(crate) struct BatchSlot {
    topic: Arc<str>,
    outcome: OnceLock<BatchOutcome>,
    done: Notify,
    /// Callbacks of records sent with [`DeliveryFuture::on_delivery`], run once the
    /// outcome is set.
    callbacks: Mutex<Vec<Callback>>,
}

impl std::fmt::Debug for BatchSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchSlot")
            .field("topic", &self.topic)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl BatchSlot {
    /// Sets the outcome (the first one given stands), runs the callbacks waiting for it
    /// and wakes every waiting record.
    fn finish(&self, outcome: BatchOutcome) {
        let _ = self.outcome.set(outcome);
        // The outcome is set before the list is taken, and `on_delivery` looks at the
        // outcome under the list's lock: each callback is either taken here or run by
        // `on_delivery` itself, never both, never neither.
        let callbacks = std::mem::take(&mut *lock_callbacks(&self.callbacks));
        if let Some(outcome) = self.outcome.get() {
            for callback in callbacks {
                run_callback(callback, outcome);
            }
        }
        self.done.notify_waiters();
    }
}

fn lock_callbacks(m: &Mutex<Vec<Callback>>) -> MutexGuard<'_, Vec<Callback>> {
    // A panic cannot leave the list half-changed.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a user's callback; a panic in it is logged, not let loose on the producer's
/// task, whose other batches would be stranded.
fn run_callback(callback: Callback, outcome: &BatchOutcome) {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(outcome)));
    if ran.is_err() {
        tracing::error!("a delivery callback panicked");
    }
}

/// The batch's side of a `BatchSlot`: a batch dropped before it finished (the producer
/// shut down) leaves its records `Closed` rather than waiting forever.
#[derive(Debug)]
pub(crate) struct SlotOwner(Arc<BatchSlot>);

impl SlotOwner {
    pub(crate) fn new(topic: Arc<str>) -> SlotOwner {
        SlotOwner(Arc::new(BatchSlot {
            topic,
            outcome: OnceLock::new(),
            done: Notify::new(),
            callbacks: Mutex::new(Vec::new()),
        }))
    }

    /// Gives the batch its outcome; later ones are ignored.
    pub(crate) fn finish(&self, outcome: BatchOutcome) {
        self.0.finish(outcome);
    }

    /// A handle for one more record's future.
    pub(crate) fn share(&self) -> Arc<BatchSlot> {
        Arc::clone(&self.0)
    }
}

impl Drop for SlotOwner {
    fn drop(&mut self) {
        if self.0.outcome.get().is_none() {
            self.0.finish(Err(ClientError::Closed));
        }
    }
}

/// Resolves when the record's batch is acknowledged or has failed for good.
#[derive(Debug)]
pub struct DeliveryFuture {
    partition: u32,
    index: u32,
    slot: Arc<BatchSlot>,
}

impl DeliveryFuture {
    /// A record that failed before it was queued, in `send_many`: its future carries the
    /// error so the records around it still go.
    pub(crate) fn failed(topic: Arc<str>, partition: u32, error: ClientError) -> DeliveryFuture {
        let owner = SlotOwner::new(topic);
        owner.finish(Err(error));
        DeliveryFuture {
            partition,
            index: 0,
            slot: owner.share(),
        }
    }

    /// The partition the record was put in.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Whether this record and `other` were put in the same batch: their outcomes then
    /// come together, at the same moment, so one callback can stand for both.
    pub fn same_batch(&self, other: &DeliveryFuture) -> bool {
        Arc::ptr_eq(&self.slot, &other.slot)
    }

    async fn resolve(self) -> Result<RecordMetadata> {
        loop {
            let done = self.slot.done.notified();
            tokio::pin!(done);
            // Registered before looking, so a finish in between is not missed.
            done.as_mut().enable();
            if let Some(outcome) = self.slot.outcome.get() {
                return self.metadata(outcome);
            }
            done.await;
        }
    }

    fn metadata(&self, outcome: &BatchOutcome) -> Result<RecordMetadata> {
        record_metadata(&self.slot.topic, self.partition, self.index, outcome)
    }

    /// Runs `callback` with the record's outcome instead of waiting for it, as Kafka's
    /// send callback does: on the producer's own task, as soon as the broker's answer is
    /// read (or now, if the outcome is known already). It holds up other answers while
    /// it runs, so it should be short. Callbacks waiting on one batch run in the order given.
    pub fn on_delivery(self, callback: impl FnOnce(Result<RecordMetadata>) + Send + 'static) {
        let (topic, partition, index) = (Arc::clone(&self.slot.topic), self.partition, self.index);
        let callback: Callback =
            Box::new(move |outcome| callback(record_metadata(&topic, partition, index, outcome)));
        let mut waiting = lock_callbacks(&self.slot.callbacks);
        match self.slot.outcome.get() {
            Some(outcome) => {
                drop(waiting);
                run_callback(callback, outcome);
            }
            None => waiting.push(callback),
        }
    }
}

/// Record `index` of a batch of `partition`, given the batch's outcome.
fn record_metadata(
    topic: &Arc<str>,
    partition: u32,
    index: u32,
    outcome: &BatchOutcome,
) -> Result<RecordMetadata> {
    match outcome {
        Ok(acked) => Ok(RecordMetadata {
            topic: Arc::clone(topic),
            partition,
            offset: acked.base_offset.map(|b| b + u64::from(index)),
            log_append_time: acked.log_append_time,
        }),
        Err(e) => Err(e.clone()),
    }
}

impl IntoFuture for DeliveryFuture {
    type Output = Result<RecordMetadata>;
    type IntoFuture = DeliveryWait;

    fn into_future(self) -> Self::IntoFuture {
        DeliveryWait {
            delivery: Some(self),
            waiting: None,
        }
    }
}

/// The future a [`DeliveryFuture`] becomes when awaited. Records of a batch resolve
/// together, so most find their outcome already there: those resolve without allocating.
pub struct DeliveryWait {
    delivery: Option<DeliveryFuture>,
    waiting: Option<Pin<Box<dyn Future<Output = Result<RecordMetadata>> + Send>>>,
}

impl std::fmt::Debug for DeliveryWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryWait").finish_non_exhaustive()
    }
}

impl Future for DeliveryWait {
    type Output = Result<RecordMetadata>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if let Some(d) = self.delivery.take() {
            if let Some(outcome) = d.slot.outcome.get() {
                return std::task::Poll::Ready(d.metadata(outcome));
            }
            self.waiting = Some(Box::pin(d.resolve()));
        }
        match self.waiting.as_mut() {
            Some(w) => w.as_mut().poll(cx),
            None => std::task::Poll::Ready(Err(ClientError::Closed)),
        }
    }
}

/// Records `send_many` appends under one hold of the producer's lock.
const SEND_MANY_RUN: usize = 1024;

/// Sends records to topics.
#[derive(Debug, Clone)]
pub struct Producer {
    accumulator: Arc<Accumulator>,
    admin: Admin,
}

impl Producer {
    /// Connects and starts the background sender.
    pub async fn connect(config: ProducerConfig) -> Result<Producer> {
        if config.batch_size == 0 || config.max_in_flight == 0 {
            return Err(ClientError::InvalidArgument(
                "batch_size and max_in_flight must be positive".into(),
            ));
        }
        let (addr, channel) = connect_first(&config.brokers).await?;
        let accumulator = Arc::new(Accumulator::new(config.clone()));
        sender::spawn(addr, channel.clone(), Arc::clone(&accumulator), config);
        Ok(Producer {
            accumulator,
            admin: Admin::with_channel(channel),
        })
    }

    async fn fetch_partition_count(&self, topic: &Arc<str>) -> Result<u32> {
        let d = self.admin.describe_topic_for_produce(topic).await?;
        let n = d.partitions.len() as u32;
        self.accumulator.set_partition_count(topic, n);
        Ok(n)
    }

    /// Adds a record to its partition's batch. Waits only when `buffer_memory` is full
    /// (or, the first time a topic is used, for its partition count). The returned future
    /// resolves to the record's partition and offset.
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        match self.accumulator.try_append(record) {
            TryAppend::Done(appended) => appended,
            TryAppend::Blocked(record, blocked) => self.append_blocked(record, blocked).await,
        }
    }

    /// Sends records in order, as `send` would one at a time, but takes the producer's
    /// lock and looks up the topic once for a run of records instead of once each: the
    /// way to the highest rates when records come in groups. Returns one future per
    /// record, in order; a record that could not be queued (a partition out of range, a
    /// topic that does not exist, no buffer room within the delivery timeout) gets a
    /// future that resolves to that error, and the records after it still go.
    pub async fn send_many(
        &self,
        records: impl IntoIterator<Item = ProducerRecord>,
    ) -> Vec<DeliveryFuture> {
        let mut records = records.into_iter().peekable();
        let mut out = Vec::with_capacity(records.size_hint().0);
        while records.peek().is_some() {
            // The lock is let go between runs, so the sender can take batches meanwhile.
            let mut run = records.by_ref().take(SEND_MANY_RUN);
            if let Some((record, blocked)) = self.accumulator.try_append_many(&mut run, &mut out) {
                let topic = Arc::clone(&record.topic);
                let partition = record.partition.unwrap_or(0);
                out.push(
                    self.append_blocked(record, blocked)
                        .await
                        .unwrap_or_else(|e| DeliveryFuture::failed(topic, partition, e)),
                );
            }
        }
        out
    }

    /// The slow path of a send: learns the topic's partition count or waits for room.
    async fn append_blocked(
        &self,
        record: ProducerRecord,
        blocked: Blocked,
    ) -> Result<DeliveryFuture> {
        match blocked {
            Blocked::UnknownTopic => {
                let partitions = self.fetch_partition_count(&record.topic).await?;
                self.accumulator.append(record, partitions).await
            }
            Blocked::BufferFull => {
                let partitions = self.partition_count(&record.topic).await?;
                self.accumulator.append(record, partitions).await
            }
        }
    }

    /// The number of partitions of `topic`, fetched once and cached (Kafka's
    /// `partitionsFor`); calling it before sending takes the metadata lookup off the
    /// first record's latency.
    pub async fn partitions_for(&self, topic: &str) -> Result<u32> {
        self.partition_count(&Arc::from(topic)).await
    }

    async fn partition_count(&self, topic: &Arc<str>) -> Result<u32> {
        match self.accumulator.partition_count(topic) {
            Some(n) => Ok(n),
            None => self.fetch_partition_count(topic).await,
        }
    }

    /// Sends every buffered record now and waits until each has its outcome.
    pub async fn flush(&self) -> Result<()> {
        self.accumulator.flush().await
    }

    /// Forgets cached partition counts (after a topic gained partitions).
    pub fn refresh_metadata(&self) {
        self.accumulator.forget_partition_counts();
    }
}

#[cfg(test)]
mod tests {
    use super::accumulator::Acked;
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn futures(owner: &SlotOwner, n: u32) -> Vec<DeliveryFuture> {
        (0..n)
            .map(|index| DeliveryFuture {
                partition: 3,
                index,
                slot: owner.share(),
            })
            .collect()
    }

    fn acked(base: u64) -> BatchOutcome {
        Ok(Acked {
            base_offset: Some(base),
            log_append_time: -1,
        })
    }

    #[test]
    fn each_callback_runs_once_whether_it_comes_before_or_after_the_outcome() {
        for _ in 0..200 {
            let owner = SlotOwner::new("t".into());
            let seen = Arc::new(Mutex::new(Vec::new()));
            let batch = futures(&owner, 64);
            let registering = {
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || {
                    for d in batch {
                        let seen = Arc::clone(&seen);
                        d.on_delivery(move |outcome| {
                            let meta = outcome.expect("acknowledged");
                            assert_eq!(meta.partition, 3);
                            lock_vec(&seen).push(meta.offset);
                        });
                    }
                })
            };
            // Races the registrations: some callbacks are waiting, some come after.
            owner.finish(acked(100));
            registering.join().expect("no callback failed");
            let mut offsets = lock_vec(&seen).clone();
            offsets.sort_unstable();
            assert_eq!(offsets, (100..164).map(Some).collect::<Vec<_>>());
        }
    }

    fn lock_vec<T>(m: &Mutex<Vec<T>>) -> MutexGuard<'_, Vec<T>> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[test]
    fn a_panicking_callback_spares_the_others_and_the_futures() {
        let owner = SlotOwner::new("t".into());
        let mut batch = futures(&owner, 3);
        let ran = Arc::new(AtomicUsize::new(0));
        let waiting = batch.pop().expect("three");
        for (i, d) in batch.into_iter().enumerate() {
            let ran = Arc::clone(&ran);
            d.on_delivery(move |_| {
                ran.fetch_add(1, Ordering::SeqCst);
                assert!(i != 0, "the first callback panics");
            });
        }
        owner.finish(acked(7));
        assert_eq!(ran.load(Ordering::SeqCst), 2, "both callbacks ran");
        let meta = waiting.into_future().now_or_never_for_test();
        assert_eq!(meta.map(|m| m.offset).ok(), Some(Some(9)));
    }

    #[test]
    fn callbacks_of_a_batch_dropped_unsent_get_closed() {
        let owner = SlotOwner::new("t".into());
        let (tx, rx) = std::sync::mpsc::channel();
        for d in futures(&owner, 2) {
            let tx = tx.clone();
            d.on_delivery(move |outcome| {
                let _ = tx.send(matches!(outcome, Err(ClientError::Closed)));
            });
        }
        drop(owner);
        let closed: Vec<bool> = rx.try_iter().collect();
        assert_eq!(closed, vec![true, true]);
    }

    impl DeliveryWait {
        /// The outcome of a record whose batch has one already.
        fn now_or_never_for_test(mut self) -> Result<RecordMetadata> {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            match Pin::new(&mut self).poll(&mut cx) {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => Err(ClientError::Batch("still pending".into())),
            }
        }
    }
}
