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

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_log_store::{Compression, Header};
use tokio::sync::watch;

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
    /// `linger.ms`: how long a batch may wait to fill (default 5 ms).
    pub linger: Duration,
    /// `compression.type` (default none).
    pub compression: Compression,
    /// `retries` for retriable failures (default unlimited, within `delivery_timeout`).
    pub retries: u32,
    /// `retry.backoff.ms` (default 100 ms, doubling to 1 s).
    pub retry_backoff: Duration,
    /// `delivery.timeout.ms`: a send fails once this much time has passed (default 120 s).
    pub delivery_timeout: Duration,
    /// `request.timeout.ms`: how long the broker may wait for acks (default 30 s).
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
        ProducerRecord {
            topic: Arc::from(""),
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
            value: Some(value.into()),
            ..ProducerRecord::default()
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

/// Resolves when the record's batch is acknowledged or has failed for good.
#[derive(Debug)]
pub struct DeliveryFuture {
    topic: Arc<str>,
    partition: u32,
    index: u32,
    outcome: watch::Receiver<Option<BatchOutcome>>,
}

impl DeliveryFuture {
    /// The partition the record was put in.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    async fn resolve(mut self) -> Result<RecordMetadata> {
        // The guard is a read lock on the outcome: dropped before anything else.
        let done = self.outcome.wait_for(Option::is_some).await.is_ok();
        if !done {
            return Err(ClientError::Closed);
        }
        self.finish()
    }

    /// The record's metadata from its batch's outcome, which must be there.
    fn finish(&self) -> Result<RecordMetadata> {
        let outcome = self.outcome.borrow().clone();
        match outcome {
            Some(Ok(acked)) => Ok(RecordMetadata {
                topic: Arc::clone(&self.topic),
                partition: self.partition,
                offset: acked.base_offset.map(|b| b + u64::from(self.index)),
                log_append_time: acked.log_append_time,
            }),
            Some(Err(e)) => Err(e),
            None => Err(ClientError::Closed),
        }
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
            if d.outcome.borrow().is_some() {
                return std::task::Poll::Ready(d.finish());
            }
            self.waiting = Some(Box::pin(d.resolve()));
        }
        match self.waiting.as_mut() {
            Some(w) => w.as_mut().poll(cx),
            None => std::task::Poll::Ready(Err(ClientError::Closed)),
        }
    }
}

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
            TryAppend::Blocked(record, Blocked::UnknownTopic) => {
                let partitions = self.fetch_partition_count(&record.topic).await?;
                self.accumulator.append(record, partitions).await
            }
            TryAppend::Blocked(record, Blocked::BufferFull) => {
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
