//! Per-partition open batches and the queue of batches ready to send. Shared between
//! `send` callers and the sender task behind one short-held mutex: no lock is held across
//! an `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rustc_hash::FxHashMap;
use sluice_log_store::RecordBatchBuilder;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::partitioner::partition_for_key;
use super::{DeliveryFuture, ProducerConfig, ProducerRecord, SlotOwner};
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
    pub slot: SlotOwner,
    pub attempts: u32,
    pub created: Instant,
    pub not_before: Option<Instant>,
    /// Bytes this batch holds against `buffer_memory`.
    pub buffered: usize,
}

struct OpenBatch {
    builder: RecordBatchBuilder,
    created: Instant,
    slot: SlotOwner,
}

struct TopicInfo {
    name: Arc<str>,
    /// Partition count (0 until looked up, or after it was forgotten).
    partitions: u32,
    sticky: Option<u32>,
    /// The open batch of each partition, by number: a send finds its batch with the
    /// one topic lookup.
    open: Vec<Option<OpenBatch>>,
}

impl TopicInfo {
    fn new(name: &Arc<str>, partitions: u32) -> TopicInfo {
        TopicInfo {
            // A name of its own, not the caller's `Arc`: every record's metadata clones
            // this one on whichever thread awaits it, and sharing the caller's count
            // made each clone there fight the caller's per-record clone and drop for
            // one cache line.
            name: Arc::from(&**name),
            partitions,
            sticky: None,
            open: Vec::new(),
        }
    }

    fn open_batches(&self) -> impl Iterator<Item = (u32, &OpenBatch)> {
        (0u32..)
            .zip(&self.open)
            .filter_map(|(p, b)| b.as_ref().map(|b| (p, b)))
    }
}

#[derive(Default)]
struct State {
    // Fx hashing: looked up on every send, with short trusted keys.
    topics: FxHashMap<Arc<str>, TopicInfo>,
    queue: Queue,
    /// `flush` calls waiting: while non-zero, batches do not linger.
    flushing: usize,
}

/// Everything a send touches besides its topic: kept apart from `topics` so a send can
/// hold its topic's entry and these at once, after one map lookup.
#[derive(Default)]
struct Queue {
    ready: VecDeque<ReadyBatch>,
    buffered: usize,
    /// Batches opened and not yet finished (open, ready or in flight).
    outstanding: usize,
    round_robin: u32,
    /// A batch opened or became ready under the lock: the sender is woken once the lock
    /// is let go ([`Accumulator::unlock`]).
    wake_sender: bool,
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

/// The clock as a run of appends sees it: each reading taken at most once per run, so
/// the records of one run count as appended at the same moment.
#[derive(Default)]
struct RunClock {
    /// Wall-clock ms, to stamp records that carry no timestamp.
    ms: Option<i64>,
    /// For linger deadlines.
    instant: Option<Instant>,
}

impl RunClock {
    fn ms(&mut self) -> i64 {
        *self.ms.get_or_insert_with(now_ms)
    }

    fn instant(&mut self) -> Instant {
        *self.instant.get_or_insert_with(Instant::now)
    }
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

    /// Lets go of the lock, then wakes the sender if it has news. Woken under the lock,
    /// the sender's thread ran (on one CPU, in place of the sending thread) only to wait
    /// for the lock, and the sending thread had to run again to let it go.
    fn unlock(&self, mut guard: MutexGuard<'_, State>) {
        let wake = std::mem::take(&mut guard.queue.wake_sender);
        drop(guard);
        if wake {
            self.wake.notify_one();
        }
    }

    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        self.lock()
            .topics
            .get(topic)
            .map(|t| t.partitions)
            .filter(|n| *n > 0)
    }

    pub fn set_partition_count(&self, topic: &Arc<str>, partitions: u32) {
        let mut st = self.lock();
        let info = st
            .topics
            .entry(Arc::clone(topic))
            .or_insert_with(|| TopicInfo::new(topic, partitions));
        info.partitions = partitions;
    }

    /// Forgets every partition count (open batches stay): the next send of each topic
    /// looks it up again.
    pub fn forget_partition_counts(&self) {
        for info in self.lock().topics.values_mut() {
            info.partitions = 0;
        }
    }

    /// Adds the record to its batch under one lock when its topic's partition count is
    /// known and the buffer has room (the common case); otherwise gives it back.
    pub fn try_append(&self, record: ProducerRecord) -> TryAppend {
        let mut guard = self.lock();
        let State { topics, queue, .. } = &mut *guard;
        let outcome = match topics.get_mut(&record.topic).filter(|t| t.partitions > 0) {
            None => TryAppend::Blocked(record, Blocked::UnknownTopic),
            Some(_) if queue.buffered >= self.config.buffer_memory => {
                TryAppend::Blocked(record, Blocked::BufferFull)
            }
            Some(info) => {
                TryAppend::Done(self.append_to(info, queue, record, &mut RunClock::default()))
            }
        };
        self.unlock(guard);
        outcome
    }

    /// Appends records under one lock, looking their topic up again only when it
    /// changes, until one cannot be appended without waiting: that one is given back
    /// with the reason. A record refused outright gets a failed future in `out`.
    pub fn try_append_many(
        &self,
        records: &mut impl Iterator<Item = ProducerRecord>,
        out: &mut Vec<DeliveryFuture>,
    ) -> Option<(ProducerRecord, Blocked)> {
        let mut guard = self.lock();
        let blocked = self.append_run(&mut guard, records, out);
        self.unlock(guard);
        blocked
    }

    /// `try_append_many` under the lock.
    fn append_run(
        &self,
        state: &mut State,
        records: &mut impl Iterator<Item = ProducerRecord>,
        out: &mut Vec<DeliveryFuture>,
    ) -> Option<(ProducerRecord, Blocked)> {
        let State { topics, queue, .. } = state;
        let mut current: Option<&mut TopicInfo> = None;
        // One clock read stamps the whole run, as if sent in the same moment.
        let mut now = RunClock::default();
        for record in records {
            if queue.buffered >= self.config.buffer_memory {
                return Some((record, Blocked::BufferFull));
            }
            let info = match current.take() {
                Some(info)
                    if Arc::ptr_eq(&info.name, &record.topic) || info.name == record.topic =>
                {
                    info
                }
                _ => match topics.get_mut(&record.topic).filter(|t| t.partitions > 0) {
                    Some(info) => info,
                    None => return Some((record, Blocked::UnknownTopic)),
                },
            };
            let requested = record.partition.unwrap_or(0);
            out.push(match self.append_to(info, queue, record, &mut now) {
                Ok(d) => d,
                Err(e) => DeliveryFuture::failed(Arc::clone(&info.name), requested, e),
            });
            current = Some(info);
        }
        None
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
                let mut guard = self.lock();
                let State { topics, queue, .. } = &mut *guard;
                if queue.buffered < self.config.buffer_memory {
                    let info = topics
                        .entry(Arc::clone(&record.topic))
                        .or_insert_with(|| TopicInfo::new(&record.topic, partitions));
                    info.partitions = partitions;
                    let appended = self.append_to(info, queue, record, &mut RunClock::default());
                    self.unlock(guard);
                    return appended;
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

    /// Appends to the record's partition's open batch. A record without a timestamp is
    /// stamped from `now`, read from the clock at most once for a run of records.
    fn append_to(
        &self,
        info: &mut TopicInfo,
        queue: &mut Queue,
        record: ProducerRecord,
        now: &mut RunClock,
    ) -> Result<DeliveryFuture> {
        let partitions = info.partitions;
        if let Some(p) = record.partition {
            if p >= partitions {
                return Err(ClientError::InvalidArgument(format!(
                    "topic {} has {partitions} partitions; there is no partition {p}",
                    record.topic
                )));
            }
        }
        let partition = match (record.partition, &record.key) {
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, partitions),
            (None, None) => *info
                .sticky
                .get_or_insert(queue.round_robin % partitions.max(1)),
        };
        queue.round_robin = queue.round_robin.wrapping_add(1);
        let slot = partition as usize;
        if info.open.len() <= slot {
            info.open.resize_with(slot + 1, || None);
        }
        let estimate = record.key.as_ref().map_or(0, Bytes::len)
            + record.value.as_ref().map_or(0, Bytes::len)
            + 24;
        let full = info.open[slot].as_ref().is_some_and(|b| {
            !b.builder.is_empty() && b.builder.size_bytes() + estimate > self.config.batch_size
        });
        if full {
            self.close_batch(info, partition, queue);
        }
        let open = info.open[slot].get_or_insert_with(|| {
            queue.outstanding += 1;
            // The sender may be asleep with no batch to wait for: it must learn when
            // this one's linger ends.
            queue.wake_sender = true;
            OpenBatch {
                builder: RecordBatchBuilder::with_capacity(
                    self.config.compression,
                    self.config.batch_size.min(1 << 20),
                ),
                created: now.instant(),
                slot: SlotOwner::new(Arc::clone(&info.name)),
            }
        });
        let index = open.builder.len();
        queue.buffered += open.builder.append(
            record.timestamp.unwrap_or_else(|| now.ms()),
            record.key.as_deref(),
            record.value.as_deref(),
            &record.headers,
        );
        let slot = open.slot.share();
        // A batch whose linger has passed closes on the next record rather than at the
        // sender's next look: the sender's timer ticks in milliseconds, so a linger
        // shorter than that would otherwise last a millisecond whenever records keep
        // coming. Not while batches already wait to go: then it keeps filling, as it
        // would in `take_ready`.
        let lingered = !self.config.linger.is_zero()
            && queue.ready.is_empty()
            && open.created + self.config.linger <= now.instant();
        if lingered || open.builder.size_bytes() >= self.config.batch_size {
            self.close_batch(info, partition, queue);
        }
        Ok(DeliveryFuture {
            partition,
            index,
            slot,
        })
    }

    /// Builds the open batch of a partition and queues it.
    fn close_batch(&self, info: &mut TopicInfo, partition: u32, queue: &mut Queue) {
        let Some(open) = info.open.get_mut(partition as usize).and_then(Option::take) else {
            return;
        };
        if info.sticky == Some(partition) {
            info.sticky = None;
        }
        let size = open.builder.size_bytes();
        match open.builder.build() {
            Ok(bytes) => {
                queue.ready.push_back(ReadyBatch {
                    topic: Arc::clone(&info.name),
                    partition,
                    bytes,
                    slot: open.slot,
                    attempts: 0,
                    created: open.created,
                    not_before: None,
                    buffered: size,
                });
                queue.wake_sender = true;
            }
            Err(e) => {
                open.slot.finish(Err(e.into()));
                queue.buffered -= size.min(queue.buffered);
                queue.outstanding -= 1;
            }
        }
    }

    /// Batches to send now (at most `room`), after closing batches whose linger passed,
    /// and when the sender should look again.
    pub fn take_ready(&self, room: usize) -> (Vec<ReadyBatch>, Option<Instant>) {
        let mut guard = self.lock();
        // Read under the lock: every batch seen here was opened before `now`. Read before
        // it, a batch opened meanwhile looked too young to send even with no linger; the
        // sender then slept on a timer (a millisecond, tokio's resolution) although the
        // wake-up that batch rang had already been spent.
        let now = Instant::now();
        let st = &mut *guard;
        let linger = self.config.linger;
        let flushing = st.flushing > 0;
        let mut expired: Vec<(Instant, Arc<str>, u32)> = st
            .topics
            .values()
            .flat_map(|t| t.open_batches().map(move |(p, b)| (t, p, b)))
            .filter(|(_, _, b)| flushing || b.created + linger <= now)
            .map(|(t, p, b)| (b.created, Arc::clone(&t.name), p))
            .collect();
        // A batch past its linger stays open, and keeps filling, until there is room to
        // send it: while the pipe is full, records gather into fewer, larger batches
        // instead of queueing one small batch each (as Kafka's accumulator does).
        let free = if flushing {
            usize::MAX
        } else {
            room.saturating_sub(st.queue.ready.len())
        };
        expired.sort_unstable();
        let keep_open = expired.len().saturating_sub(free);
        for (_, topic, p) in expired.into_iter().take(free) {
            if let Some(info) = st.topics.get_mut(&topic) {
                self.close_batch(info, p, &mut st.queue);
            }
        }
        let mut out = Vec::new();
        // Batches kept open for want of room are sent when a send completes, which
        // wakes the sender; only the others have a linger deadline to wait for.
        let mut next: Option<Instant> = st
            .topics
            .values()
            .flat_map(TopicInfo::open_batches)
            .map(|(_, b)| b.created + linger)
            .filter(|t| keep_open == 0 || *t > now)
            .min();
        let mut waiting = VecDeque::new();
        // Partitions with an older batch still waiting out its backoff: their later
        // batches wait too, so a partition's batches go out in order.
        let mut held: Vec<(Arc<str>, u32)> = Vec::new();
        while let Some(b) = st.queue.ready.pop_front() {
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
        st.queue.ready = waiting;
        self.unlock(guard);
        (out, next)
    }

    /// Puts a failed batch back to be sent again after a backoff.
    pub fn requeue(&self, mut batch: ReadyBatch, backoff: Duration) {
        batch.not_before = Some(Instant::now() + backoff);
        let mut st = self.lock();
        // In creation order among the queued batches: several batches of a partition
        // sent back together (a redirect, a broker gone) keep their order.
        let ready = &mut st.queue.ready;
        let at = ready
            .iter()
            .position(|b| b.created > batch.created)
            .unwrap_or(ready.len());
        ready.insert(at, batch);
        drop(st);
        self.wake.notify_one();
    }

    /// Gives a batch its final outcome.
    pub fn complete(&self, batch: ReadyBatch, outcome: BatchOutcome) {
        batch.slot.finish(outcome);
        let mut st = self.lock();
        let q = &mut st.queue;
        q.buffered -= batch.buffered.min(q.buffered);
        q.outstanding -= 1;
        let idle = q.outstanding == 0;
        drop(st);
        self.space.notify_waiters();
        if idle {
            self.idle.notify_waiters();
        }
    }

    pub fn outstanding(&self) -> usize {
        self.lock().queue.outstanding
    }

    pub async fn flush(&self) -> Result<()> {
        self.lock().flushing += 1;
        self.wake.notify_one();
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.lock().queue.outstanding == 0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::producer::{ProducerConfig, ProducerRecord};

    fn record(topic: &Arc<str>, partition: u32) -> ProducerRecord {
        ProducerRecord {
            topic: Arc::clone(topic),
            partition: Some(partition),
            value: Some(Bytes::from_static(b"v")),
            ..ProducerRecord::default()
        }
    }

    fn append(acc: &Accumulator, record: ProducerRecord) -> DeliveryFuture {
        match acc.try_append(record) {
            TryAppend::Done(r) => r.expect("appended"),
            TryAppend::Blocked(_, why) => panic!("blocked: {why:?}"),
        }
    }

    #[test]
    fn a_batch_past_its_linger_closes_on_the_next_record_unless_batches_wait_to_go() {
        let linger = Duration::from_millis(2);
        let acc = Accumulator::new(ProducerConfig {
            linger,
            ..ProducerConfig::default()
        });
        let topic: Arc<str> = "t".into();
        acc.set_partition_count(&topic, 2);
        let first = append(&acc, record(&topic, 0));
        // Within the linger the batch stays open.
        assert_eq!(acc.lock().queue.ready.len(), 0);
        std::thread::sleep(linger + Duration::from_millis(1));
        // Past it, the next record goes in and the batch closes with it, with no look
        // from the sender in between.
        let second = append(&acc, record(&topic, 0));
        assert!(second.same_batch(&first));
        assert_eq!(second.index, 1);
        let ready: Vec<u32> = acc.lock().queue.ready.iter().map(|b| b.partition).collect();
        assert_eq!(ready, [0]);
        // While that batch waits to go, partition 1's lingered batch keeps filling.
        let third = append(&acc, record(&topic, 1));
        std::thread::sleep(linger + Duration::from_millis(1));
        let fourth = append(&acc, record(&topic, 1));
        assert!(fourth.same_batch(&third));
        assert_eq!(acc.lock().queue.ready.len(), 1);
        // Once the sender has taken what waited, it sends the other too.
        let (sent, _) = acc.take_ready(usize::MAX);
        let sent: Vec<u32> = sent.iter().map(|b| b.partition).collect();
        assert_eq!(sent, [0, 1]);
    }

    #[test]
    fn with_no_linger_a_take_leaves_no_batch_to_a_timer() {
        let acc = Arc::new(Accumulator::new(ProducerConfig {
            linger: Duration::ZERO,
            ..ProducerConfig::default()
        }));
        let topic: Arc<str> = "t".into();
        acc.set_partition_count(&topic, 1);
        let appender = {
            let (acc, topic) = (Arc::clone(&acc), Arc::clone(&topic));
            std::thread::spawn(move || {
                for _ in 0..50_000 {
                    drop(append(&acc, record(&topic, 0)));
                }
            })
        };
        // Batches open while takes run on another thread. With no linger, each take
        // must send every batch opened before it: one left behind would wait for the
        // sender's timer, which had been told to wake at once.
        let mut takes = 0u64;
        while !appender.is_finished() {
            let (ready, next) = acc.take_ready(usize::MAX);
            assert_eq!(next, None, "a batch was left for later after {takes} takes");
            for b in ready {
                acc.complete(
                    b,
                    Ok(Acked {
                        base_offset: Some(0),
                        log_append_time: -1,
                    }),
                );
            }
            takes += 1;
        }
        appender.join().expect("appender");
    }
}
