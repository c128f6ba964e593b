//! Per-partition open batches and the queue of batches ready to send. Shared between
//! `send` callers and the sender task behind one short-held mutex: no lock is held across
//! an `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rustc_hash::FxHashMap;
use sluice_log_store::RecordBatchBuilder;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::partitioner::partition_for_key;
use super::{DeliveryFuture, ProducerConfig, ProducerRecord};
use crate::error::{ClientError, Result};

/// Why a record could not be appended without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// The topic's partition count is not cached yet.
    UnknownTopic,
    /// `buffer_memory` is used up.
    BufferFull,
}

/// The outcome of `try_append`: done (well or not), or the record back and why.
pub(crate) enum TryAppend {
    Done(Result<DeliveryFuture>),
    Blocked(ProducerRecord, Blocked),
}

/// What the broker said of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// Offset of the batch's first record (`None` with `acks=0`).
    pub base_offset: Option<u64>,
    /// Broker append time under `LogAppendTime`, else -1.
    pub log_append_time: i64,
}

/// A batch's final outcome, shared by all its records' futures.
pub type BatchOutcome = std::result::Result<Acked, ClientError>;

/// A built batch on its way to the broker.
pub(crate) struct ReadyBatch {
    pub topic: Arc<str>,
    pub partition: u32,
    pub bytes: Bytes,
    pub slot: watch::Sender<Option<BatchOutcome>>,
    pub attempts: u32,
    pub created: Instant,
    pub not_before: Option<Instant>,
    /// Bytes this batch holds against `buffer_memory`.
    pub buffered: usize,
}

struct OpenBatch {
    builder: RecordBatchBuilder,
    created: Instant,
    slot: watch::Sender<Option<BatchOutcome>>,
}

struct TopicInfo {
    name: Arc<str>,
    partitions: u32,
    sticky: Option<u32>,
}

#[derive(Default)]
struct State {
    // Fx hashing: these maps are looked up on every send, with short trusted keys.
    topics: FxHashMap<Arc<str>, TopicInfo>,
    open: FxHashMap<(Arc<str>, u32), OpenBatch>,
    ready: VecDeque<ReadyBatch>,
    buffered: usize,
    /// Batches opened and not yet finished (open, ready or in flight).
    outstanding: usize,
    /// `flush` calls waiting: while non-zero, batches do not linger.
    flushing: usize,
    round_robin: u32,
}

pub(crate) struct Accumulator {
    config: ProducerConfig,
    state: Mutex<State>,
    /// Wakes the sender: a batch is ready or a flush started.
    pub wake: Notify,
    space: Notify,
    idle: Notify,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl std::fmt::Debug for Accumulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accumulator")
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl Accumulator {
    pub fn new(config: ProducerConfig) -> Self {
        Accumulator {
            config,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            space: Notify::new(),
            idle: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep going with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        self.lock().topics.get(topic).map(|t| t.partitions)
    }

    pub fn set_partition_count(&self, topic: &Arc<str>, partitions: u32) {
        let mut st = self.lock();
        let info = st
            .topics
            .entry(Arc::clone(topic))
            .or_insert_with(|| TopicInfo {
                name: Arc::clone(topic),
                partitions,
                sticky: None,
            });
        info.partitions = partitions;
    }

    pub fn forget_partition_counts(&self) {
        self.lock().topics.clear();
    }

    /// Adds the record to its batch under one lock when its topic's partition count is
    /// known and the buffer has room (the common case); otherwise gives it back.
    pub fn try_append(&self, record: ProducerRecord) -> TryAppend {
        let mut st = self.lock();
        let Some(partitions) = st.topics.get(&record.topic).map(|t| t.partitions) else {
            return TryAppend::Blocked(record, Blocked::UnknownTopic);
        };
        if st.buffered >= self.config.buffer_memory {
            return TryAppend::Blocked(record, Blocked::BufferFull);
        }
        TryAppend::Done(self.append_checked(&mut st, record, partitions))
    }

    /// Waits for room in the buffer, then appends; used once `try_append` found it full
    /// or the topic unknown.
    pub async fn append(&self, record: ProducerRecord, partitions: u32) -> Result<DeliveryFuture> {
        let deadline = Instant::now() + self.config.delivery_timeout;
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            {
                let mut st = self.lock();
                if st.buffered < self.config.buffer_memory {
                    return self.append_checked(&mut st, record, partitions);
                }
            }
            if tokio::time::timeout_at(deadline, space).await.is_err() {
                return Err(ClientError::Timeout(format!(
                    "buffer_memory ({} bytes) stayed full for the delivery timeout",
                    self.config.buffer_memory
                )));
            }
        }
    }

    fn append_checked(
        &self,
        st: &mut State,
        record: ProducerRecord,
        partitions: u32,
    ) -> Result<DeliveryFuture> {
        if let Some(p) = record.partition {
            if p >= partitions {
                return Err(ClientError::InvalidArgument(format!(
                    "topic {} has {partitions} partitions; there is no partition {p}",
                    record.topic
                )));
            }
        }
        let round_robin = st.round_robin;
        if !st.topics.contains_key(&record.topic) {
            st.topics.insert(
                Arc::clone(&record.topic),
                TopicInfo {
                    name: Arc::clone(&record.topic),
                    partitions,
                    sticky: None,
                },
            );
        }
        let Some(info) = st.topics.get_mut(&record.topic) else {
            unreachable!("the topic was inserted above")
        };
        let partition = match (record.partition, &record.key) {
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, partitions),
            (None, None) => *info.sticky.get_or_insert(round_robin % partitions.max(1)),
        };
        let topic = Arc::clone(&info.name);
        st.round_robin = st.round_robin.wrapping_add(1);
        let key = (Arc::clone(&topic), partition);
        let estimate = record.key.as_ref().map_or(0, Bytes::len)
            + record.value.as_ref().map_or(0, Bytes::len)
            + 24;
        let full = st.open.get(&key).is_some_and(|b| {
            !b.builder.is_empty() && b.builder.size_bytes() + estimate > self.config.batch_size
        });
        if full {
            self.close_batch(st, &key);
        }
        if !st.open.contains_key(&key) {
            let (slot, _) = watch::channel(None);
            st.open.insert(
                key.clone(),
                OpenBatch {
                    builder: RecordBatchBuilder::with_capacity(
                        self.config.compression,
                        self.config.batch_size.min(1 << 20),
                    ),
                    created: Instant::now(),
                    slot,
                },
            );
            st.outstanding += 1;
            // The sender may be asleep with no batch to wait for: it must learn when this
            // one's linger ends.
            self.wake.notify_one();
        }
        let (index, added, size, outcome) = {
            let Some(open) = st.open.get_mut(&key) else {
                unreachable!("the open batch was inserted above")
            };
            let index = open.builder.len();
            let added = open.builder.append(
                record.timestamp.unwrap_or_else(now_ms),
                record.key.as_deref(),
                record.value.as_deref(),
                &record.headers,
            );
            (
                index,
                added,
                open.builder.size_bytes(),
                open.slot.subscribe(),
            )
        };
        st.buffered += added;
        if size >= self.config.batch_size {
            self.close_batch(st, &key);
        }
        Ok(DeliveryFuture {
            topic,
            partition,
            index,
            outcome,
        })
    }

    /// Builds the open batch of `key` and queues it.
    fn close_batch(&self, st: &mut State, key: &(Arc<str>, u32)) {
        let Some(open) = st.open.remove(key) else {
            return;
        };
        if let Some(info) = st.topics.get_mut(&*key.0) {
            if info.sticky == Some(key.1) {
                info.sticky = None;
            }
        }
        let buffered = open.builder.size_bytes();
        match open.builder.build() {
            Ok(bytes) => {
                st.ready.push_back(ReadyBatch {
                    topic: Arc::clone(&key.0),
                    partition: key.1,
                    bytes,
                    slot: open.slot,
                    attempts: 0,
                    created: open.created,
                    not_before: None,
                    buffered,
                });
                self.wake.notify_one();
            }
            Err(e) => {
                let _ = open.slot.send(Some(Err(e.into())));
                st.buffered -= buffered.min(st.buffered);
                st.outstanding -= 1;
            }
        }
    }

    /// Batches to send now (at most `room`), after closing batches whose linger passed,
    /// and when the sender should look again.
    pub fn take_ready(&self, room: usize) -> (Vec<ReadyBatch>, Option<Instant>) {
        let now = Instant::now();
        let mut st = self.lock();
        let linger = self.config.linger;
        let mut expired: Vec<_> = st
            .open
            .iter()
            .filter(|(_, b)| st.flushing > 0 || b.created + linger <= now)
            .map(|(k, b)| (b.created, k.clone()))
            .collect();
        // A batch past its linger stays open, and keeps filling, until there is room to
        // send it: while the pipe is full, records gather into fewer, larger batches
        // instead of queueing one small batch each (as Kafka's accumulator does).
        let free = if st.flushing > 0 {
            usize::MAX
        } else {
            room.saturating_sub(st.ready.len())
        };
        expired.sort_unstable();
        let keep_open = expired.len().saturating_sub(free);
        for (_, key) in expired.into_iter().take(free) {
            self.close_batch(&mut st, &key);
        }
        let mut out = Vec::new();
        // Batches kept open for want of room are sent when a send completes, which
        // wakes the sender; only the others have a linger deadline to wait for.
        let mut next: Option<Instant> = st
            .open
            .values()
            .map(|b| b.created + linger)
            .filter(|t| keep_open == 0 || *t > now)
            .min();
        let mut waiting = VecDeque::new();
        // Partitions with an older batch still waiting out its backoff: their later
        // batches wait too, so a partition's batches go out in order.
        let mut held: Vec<(Arc<str>, u32)> = Vec::new();
        while let Some(b) = st.ready.pop_front() {
            let key = (Arc::clone(&b.topic), b.partition);
            match b.not_before {
                Some(t) if t > now => {
                    next = Some(next.map_or(t, |n| n.min(t)));
                    held.push(key);
                    waiting.push_back(b);
                }
                _ if held.contains(&key) => waiting.push_back(b),
                _ if out.len() < room => out.push(b),
                _ => {
                    held.push(key);
                    waiting.push_back(b);
                }
            }
        }
        st.ready = waiting;
        (out, next)
    }

    /// Puts a failed batch back to be sent again after a backoff.
    pub fn requeue(&self, mut batch: ReadyBatch, backoff: Duration) {
        batch.not_before = Some(Instant::now() + backoff);
        let mut st = self.lock();
        // In creation order among the queued batches: several batches of a partition
        // sent back together (a redirect, a broker gone) keep their order.
        let at = st
            .ready
            .iter()
            .position(|b| b.created > batch.created)
            .unwrap_or(st.ready.len());
        st.ready.insert(at, batch);
        drop(st);
        self.wake.notify_one();
    }

    /// Gives a batch its final outcome.
    pub fn complete(&self, batch: ReadyBatch, outcome: BatchOutcome) {
        let _ = batch.slot.send(Some(outcome));
        let mut st = self.lock();
        st.buffered -= batch.buffered.min(st.buffered);
        st.outstanding -= 1;
        let idle = st.outstanding == 0;
        drop(st);
        self.space.notify_waiters();
        if idle {
            self.idle.notify_waiters();
        }
    }

    pub fn outstanding(&self) -> usize {
        self.lock().outstanding
    }

    pub async fn flush(&self) -> Result<()> {
        self.lock().flushing += 1;
        self.wake.notify_one();
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.lock().outstanding == 0 {
                break;
            }
            // Batches opened while flushing must not linger either.
            self.wake.notify_one();
            idle.await;
        }
        self.lock().flushing -= 1;
        Ok(())
    }
}
