//! The task that owns one partition's log. Everything that touches the log goes through
//! its channel; produce requests written while an fsync runs share the next one (group
//! commit).

mod replica;
mod task;

use std::sync::Arc;

use bytes::Bytes;
use sluice_log_store::{Log, LogManager, TailView, TopicPartition};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{BrokerError, Result};
use crate::topic::config::TopicConfig;

pub use replica::{IsrChange, LeaderRole, ReplicationContext, Role};

/// What a producer waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Nothing: the answer is not awaited.
    None,
    /// The leader appended the batch.
    Leader,
    /// Every in-sync replica has it; on one node: appended and flushed per the topic's
    /// flush policy.
    All,
}

/// Offsets consumers and fetchers care about, published after every change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionState {
    /// First offset still kept.
    pub log_start_offset: u64,
    /// Consumers read below this.
    pub high_watermark: u64,
    /// Offset the next record will get.
    pub log_end_offset: u64,
}

impl PartitionState {
    /// Whether a reader may ask for `offset`: one still kept, or the log end.
    pub fn holds(&self, offset: u64) -> bool {
        (self.log_start_offset..=self.log_end_offset).contains(&offset)
    }
}

/// What the partition task publishes for readers that do not wait for it.
struct Published {
    state: watch::Sender<PartitionState>,
    /// The newest batches, while this replica leads.
    tail: watch::Sender<TailView>,
}

/// The outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of its last record.
    pub last_offset: u64,
    /// The broker's append time under `LogAppendTime`, else -1.
    pub log_append_time: i64,
    /// The partition's log start offset.
    pub log_start_offset: u64,
}

/// Which offset a `ListOffsets` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The high watermark.
    Latest,
    /// The first record at or after this time (ms).
    Timestamp(i64),
}

/// What a leader sends a fetching follower.
#[derive(Debug, Clone)]
pub struct ReplicaData {
    /// Whole batches from the fetch offset (empty when there is nothing new).
    pub records: Bytes,
    /// The leader's offsets.
    pub state: PartitionState,
}

enum Command {
    SetRole {
        role: Role,
        ctx: ReplicationContext,
        reply: oneshot::Sender<Result<()>>,
    },
    ReplicaRead {
        replica: u64,
        epoch: i32,
        offset: u64,
        max_bytes: usize,
        reply: oneshot::Sender<Result<ReplicaData>>,
    },
    EpochEnd {
        leader_epoch: i32,
        epoch: i32,
        reply: oneshot::Sender<Result<Option<(i32, u64)>>>,
    },
    LatestEpoch {
        reply: oneshot::Sender<Result<Option<i32>>>,
    },
    TruncateForEpoch {
        epoch: i32,
        answer: Option<(i32, u64)>,
        reply: oneshot::Sender<Result<u64>>,
    },
    AppendFromLeader {
        epoch: i32,
        records: Bytes,
        leader: PartitionState,
        reply: oneshot::Sender<Result<u64>>,
    },
    Append {
        batch: Bytes,
        acks: Acks,
        reply: oneshot::Sender<Result<AppendResult>>,
    },
    Read {
        offset: u64,
        max_bytes: usize,
        /// Read up to the log end, not the high watermark.
        to_log_end: bool,
        reply: oneshot::Sender<Result<Bytes>>,
    },
    ListOffset {
        spec: OffsetSpec,
        reply: oneshot::Sender<Result<(u64, i64)>>,
    },
    SetConfig {
        config: TopicConfig,
        reply: oneshot::Sender<Result<()>>,
    },
    Close {
        reply: oneshot::Sender<Result<()>>,
    },
    Roll {
        reply: oneshot::Sender<Result<u64>>,
    },
    DeleteBefore {
        offset: u64,
        reply: oneshot::Sender<Result<u64>>,
    },
    Delete {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// A cheap, cloneable way to reach one partition's task.
#[derive(Clone, Debug)]
pub struct PartitionHandle {
    tp: Arc<TopicPartition>,
    tx: mpsc::Sender<Command>,
    state: watch::Receiver<PartitionState>,
    tail: watch::Receiver<TailView>,
}

impl PartitionHandle {
    /// Starts the task that owns `log`: the only replica, or with `replicated` one that
    /// takes no writes until the metadata log gives it a role.
    pub fn spawn(
        tp: TopicPartition,
        log: Log,
        config: TopicConfig,
        manager: Arc<LogManager>,
        replicated: bool,
    ) -> PartitionHandle {
        let tp = Arc::new(tp);
        let replica = if replicated {
            replica::Replica::unassigned(Arc::clone(&tp))
        } else {
            replica::Replica::standalone(Arc::clone(&tp), &log, &config)
        };
        let state = task::state_of(&log, &replica);
        let (state_tx, state_rx) = watch::channel(state);
        let (tail_tx, tail_rx) = watch::channel(TailView::default());
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(task::run(task::Task {
            tp: Arc::clone(&tp),
            log: Some((log, replica)),
            config,
            manager,
            rx,
            out: Arc::new(Published {
                state: state_tx,
                tail: tail_tx,
            }),
        }));
        PartitionHandle {
            tp,
            tx,
            state: state_rx,
            tail: tail_rx,
        }
    }

    /// The topic-partition.
    pub fn topic_partition(&self) -> &TopicPartition {
        &self.tp
    }

    /// Whether both handles reach the same task (a topic deleted and created again gets
    /// new ones).
    pub fn same_task(&self, other: &PartitionHandle) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// Current offsets.
    pub fn state(&self) -> PartitionState {
        *self.state.borrow()
    }

    /// A receiver that wakes when the offsets change after this call (for long-poll
    /// fetches); what it holds now counts as seen.
    pub fn subscribe(&self) -> watch::Receiver<PartitionState> {
        let mut rx = self.state.clone();
        // A clone starts at the version this handle last saw, which may be long past:
        // left so, `changed` returned at once and a waiting fetch spun, asking the
        // partition task again and again for records that were not there.
        rx.mark_unchanged();
        rx
    }

    /// What [`PartitionHandle::read`] would return below `upper`, from the batches the
    /// partition last published, without a round on its task; `None` when `offset` is
    /// not among them.
    pub fn read_recent(&self, offset: u64, max_bytes: usize, upper: u64) -> Option<Bytes> {
        // The borrow is a read lock: cloned out at once, never held across anything.
        let view = self.tail.borrow().clone();
        view.read(offset, max_bytes, upper)
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        rx.await.map_err(|_| BrokerError::ShuttingDown)?
    }

    /// Appends a producer's batch and waits as `acks` says. With `Acks::None` it returns
    /// once the batch is queued, with offsets unknown (-1 shown as `u64::MAX`).
    pub async fn append(&self, batch: Bytes, acks: Acks) -> Result<AppendResult> {
        if acks == Acks::None {
            let (reply, _ignored) = oneshot::channel();
            self.tx
                .send(Command::Append { batch, acks, reply })
                .await
                .map_err(|_| BrokerError::ShuttingDown)?;
            return Ok(AppendResult {
                base_offset: u64::MAX,
                last_offset: u64::MAX,
                log_append_time: -1,
                log_start_offset: self.state().log_start_offset,
            });
        }
        self.call(|reply| Command::Append { batch, acks, reply })
            .await
    }

    /// Queues a batch behind every batch queued before it and returns the wait for its
    /// answer; a stream keeps its order by queueing in order and waiting concurrently.
    pub async fn submit(
        &self,
        batch: Bytes,
        acks: Acks,
    ) -> Result<impl std::future::Future<Output = Result<AppendResult>> + Send + 'static> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append { batch, acks, reply })
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        Ok(async move { rx.await.map_err(|_| BrokerError::ShuttingDown)? })
    }

    /// Whole batches from `offset`, below the high watermark, up to `max_bytes` (at least
    /// one batch).
    pub async fn read(&self, offset: u64, max_bytes: usize) -> Result<Bytes> {
        self.call(|reply| Command::Read {
            offset,
            max_bytes,
            to_log_end: false,
            reply,
        })
        .await
    }

    /// Like [`PartitionHandle::read`], up to the log end: what this replica holds,
    /// committed or not (a new leader's log is the truth from now on).
    pub async fn read_local(&self, offset: u64, max_bytes: usize) -> Result<Bytes> {
        self.call(|reply| Command::Read {
            offset,
            max_bytes,
            to_log_end: true,
            reply,
        })
        .await
    }

    /// The offset (and timestamp, -1 when not by time) a `ListOffsets` asks for; for a
    /// time after every record, the high watermark.
    pub async fn list_offset(&self, spec: OffsetSpec) -> Result<(u64, i64)> {
        self.call(|reply| Command::ListOffset { spec, reply }).await
    }

    /// Applies a new topic config to this partition.
    pub async fn set_config(&self, config: TopicConfig) -> Result<()> {
        self.call(|reply| Command::SetConfig { config, reply })
            .await
    }

    /// Seals the active segment (if it holds anything) and returns the log end offset,
    /// where the next segment starts.
    pub async fn roll(&self) -> Result<u64> {
        self.call(|reply| Command::Roll { reply }).await
    }

    /// Deletes whole segments below `offset`; returns the new log start offset.
    pub async fn delete_before(&self, offset: u64) -> Result<u64> {
        self.call(|reply| Command::DeleteBefore { offset, reply })
            .await
    }

    /// Takes the role the metadata log gives this broker for the partition.
    pub async fn set_role(&self, role: Role, ctx: ReplicationContext) -> Result<()> {
        self.call(|reply| Command::SetRole { role, ctx, reply })
            .await
    }

    /// Leader side of a follower's fetch: records that `replica` holds everything below
    /// `offset`, then returns batches from there up to the log end.
    pub async fn replica_read(
        &self,
        replica: u64,
        epoch: i32,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ReplicaData> {
        self.call(|reply| Command::ReplicaRead {
            replica,
            epoch,
            offset,
            max_bytes,
            reply,
        })
        .await
    }

    /// Leader side of OffsetsForLeaderEpoch, answered only while leading in
    /// `leader_epoch`.
    pub async fn epoch_end(&self, leader_epoch: i32, epoch: i32) -> Result<Option<(i32, u64)>> {
        self.call(|reply| Command::EpochEnd {
            leader_epoch,
            epoch,
            reply,
        })
        .await
    }

    /// The latest leader epoch in this replica's log.
    pub async fn latest_epoch(&self) -> Result<Option<i32>> {
        self.call(|reply| Command::LatestEpoch { reply }).await
    }

    /// Follower side of OffsetsForLeaderEpoch: cuts whatever the leader's `answer` for
    /// this replica's latest epoch shows it does not have (`None`: the leader has no
    /// such epoch, so everything goes). Returns the new log end offset.
    pub async fn truncate_for_epoch(&self, epoch: i32, answer: Option<(i32, u64)>) -> Result<u64> {
        self.call(|reply| Command::TruncateForEpoch {
            epoch,
            answer,
            reply,
        })
        .await
    }

    /// Follower side of a fetch: appends the leader's batches as they are and takes its
    /// high watermark. Returns the new log end offset.
    pub async fn append_from_leader(
        &self,
        epoch: i32,
        records: Bytes,
        leader: PartitionState,
    ) -> Result<u64> {
        self.call(|reply| Command::AppendFromLeader {
            epoch,
            records,
            leader,
            reply,
        })
        .await
    }

    /// Flushes and closes the log cleanly; the task ends.
    pub async fn close(&self) -> Result<()> {
        self.call(|reply| Command::Close { reply }).await
    }

    /// Deletes the log; the task ends.
    pub async fn delete(&self) -> Result<()> {
        self.call(|reply| Command::Delete { reply }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_log_store::{BatchIter, Compression, FlushPolicy, RecordBatchBuilder};

    fn batch(tag: &str, n: u32) -> Bytes {
        let mut b = RecordBatchBuilder::new(Compression::None);
        for i in 0..n {
            b.append(
                1000 + i64::from(i),
                None,
                Some(format!("{tag}-{i}").as_bytes()),
                &[],
            );
        }
        b.build().expect("build")
    }

    fn start(dir: &std::path::Path, config: TopicConfig) -> (PartitionHandle, Arc<LogManager>) {
        let manager = Arc::new(LogManager::open(dir).expect("manager"));
        let tp = TopicPartition::new("t", 0);
        let log = manager.create(&tp, config.log.clone()).expect("create");
        (
            PartitionHandle::spawn(tp, log, config, Arc::clone(&manager), false),
            manager,
        )
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_offsets_and_move_the_high_watermark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, _m) = start(dir.path(), TopicConfig::default());
        let mut waits = Vec::new();
        for i in 0..200 {
            let p = p.clone();
            let acks = if i % 2 == 0 { Acks::All } else { Acks::Leader };
            waits.push(tokio::spawn(async move {
                p.append(batch(&format!("b{i}"), 5), acks).await
            }));
        }
        let mut bases = Vec::new();
        for w in waits {
            bases.push(w.await.expect("join").expect("append").base_offset);
        }
        bases.sort_unstable();
        assert_eq!(bases, (0..200).map(|i| i * 5).collect::<Vec<_>>());
        // acks=all answered means flushed: the high watermark covers every batch.
        let state = p.state();
        assert_eq!(state.high_watermark, 1000);
        let data = p.read(0, 1 << 20).await.expect("read");
        assert!(BatchIter::new(data).count() > 1);
        p.close().await.expect("close");
    }

    #[tokio::test]
    async fn reads_stop_at_the_high_watermark_and_check_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, _m) = start(dir.path(), TopicConfig::default());
        p.append(batch("a", 3), Acks::All).await.expect("append");
        assert!(p.read(3, 1000).await.expect("read at hw").is_empty());
        match p.read(4, 1000).await {
            Err(BrokerError::OffsetOutOfRange {
                log_start_offset: 0,
                high_watermark: 3,
                ..
            }) => {}
            other => panic!("expected out of range, got {other:?}"),
        }
        assert_eq!(
            p.list_offset(OffsetSpec::Latest).await.expect("latest").0,
            3
        );
        assert_eq!(
            p.list_offset(OffsetSpec::Earliest)
                .await
                .expect("earliest")
                .0,
            0
        );
        assert_eq!(
            p.list_offset(OffsetSpec::Timestamp(1001))
                .await
                .expect("by time"),
            (1, 1001)
        );
        assert_eq!(
            p.list_offset(OffsetSpec::Timestamp(5000))
                .await
                .expect("by time")
                .0,
            3
        );
    }

    #[tokio::test]
    async fn corrupt_batches_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, _m) = start(dir.path(), TopicConfig::default());
        let mut bad = batch("x", 2).to_vec();
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        assert!(matches!(
            p.append(Bytes::from(bad), Acks::All).await,
            Err(BrokerError::CorruptMessage(_))
        ));
        assert_eq!(p.state().log_end_offset, 0);
    }

    #[tokio::test]
    async fn a_subscriber_wakes_for_changes_after_it_subscribed_not_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, _m) = start(dir.path(), TopicConfig::default());
        p.append(batch("a", 3), Acks::All).await.expect("append");
        // The offsets moved before this subscriber existed: it has nothing to wake for
        // (a long-poll fetch waiting on it used to spin instead of sleeping).
        let mut w = p.subscribe();
        assert_eq!(w.borrow().high_watermark, 3);
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), w.changed()).await;
        assert!(early.is_err(), "woke with nothing new");
        p.append(batch("b", 2), Acks::All).await.expect("append");
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), w.changed()).await;
        assert!(matches!(woke, Ok(Ok(()))), "did not wake for the append");
        assert_eq!(w.borrow_and_update().high_watermark, 5);
    }

    #[tokio::test]
    async fn recent_batches_read_as_the_task_reads_them_and_only_while_leading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, _m) = start(dir.path(), TopicConfig::default());
        assert_eq!(p.read_recent(0, 1 << 20, 0), None, "nothing appended yet");
        for i in 0..20 {
            p.append(batch(&format!("b{i}"), 3), Acks::All)
                .await
                .expect("append");
        }
        let hw = p.state().high_watermark;
        assert_eq!(hw, 60);
        for offset in 0..hw {
            for max in [1, 300, 1 << 20] {
                let recent = p.read_recent(offset, max, hw).expect("in the view");
                assert_eq!(
                    recent,
                    p.read(offset, max).await.expect("read"),
                    "at {offset}"
                );
            }
        }
        assert!(p.read_recent(10, 1 << 20, 9).expect("in view").is_empty());
        assert_eq!(p.read_recent(hw, 1 << 20, hw), None, "past the end");
        let copied = p.read(0, 1 << 20).await.expect("read");
        let leader = p.state();

        // A follower publishes nothing, though it appends batches as a leader does.
        let other = tempfile::tempdir().expect("tempdir");
        let manager = Arc::new(LogManager::open(other.path()).expect("manager"));
        let tp = TopicPartition::new("t", 0);
        let log = manager
            .create(&tp, TopicConfig::default().log)
            .expect("create");
        let follower = PartitionHandle::spawn(tp, log, TopicConfig::default(), manager, true);
        let leo = follower
            .append_from_leader(-1, copied, leader)
            .await
            .expect("append from leader");
        assert_eq!(leo, hw);
        assert!(!follower
            .read_local(0, 1 << 20)
            .await
            .expect("read")
            .is_empty());
        assert_eq!(follower.read_recent(0, 1 << 20, hw), None);
    }

    #[tokio::test]
    async fn os_flush_policy_exposes_appends_without_fsync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = TopicConfig::default();
        config.log.flush = FlushPolicy::Os;
        let (p, _m) = start(dir.path(), config);
        let mut state = p.subscribe();
        p.append(batch("a", 3), Acks::Leader).await.expect("append");
        // The offsets are published before the producer hears back. The guard
        // `wait_for` returns is a read lock on them: it is dropped at once, never held
        // across the next call.
        let seen = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            state.wait_for(|s| s.high_watermark == 3),
        )
        .await
        .map(|r| r.is_ok());
        assert_eq!(seen, Ok(true), "high watermark never reached 3");
        // Without fsync the log's recovery point stays behind what consumers see.
        assert_eq!(
            p.list_offset(OffsetSpec::Latest).await.expect("latest").0,
            3
        );
    }

    #[tokio::test]
    async fn appends_keep_their_order_whether_rounds_run_in_place_or_on_blocking_threads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = TopicConfig::default();
        config.log.flush = FlushPolicy::Os;
        // Small segments, so some rounds roll one (those go to a blocking thread).
        config.log.segment_bytes = 64 << 10;
        let (p, _m) = start(dir.path(), config);
        // Small batches (rounds run in place) and ones of over 256 KiB (rounds that go
        // to a blocking thread), interleaved and concurrent.
        let big = |tag: &str| {
            let mut b = RecordBatchBuilder::new(Compression::None);
            for i in 0..300 {
                b.append(
                    1000 + i,
                    None,
                    Some(format!("{tag}-{i}-{}", "x".repeat(1000)).as_bytes()),
                    &[],
                );
            }
            b.build().expect("build")
        };
        let mut waits = Vec::new();
        let mut expected = Vec::new();
        for i in 0..60 {
            let (b, n) = if i % 10 == 9 {
                (big(&format!("b{i}")), 300)
            } else {
                (batch(&format!("b{i}"), 5), 5)
            };
            expected.push(n);
            let p = p.clone();
            let acks = if i % 2 == 0 { Acks::All } else { Acks::Leader };
            waits.push(tokio::spawn(async move { p.append(b, acks).await }));
        }
        let mut next = 0u64;
        for (w, n) in waits.into_iter().zip(expected) {
            let r = w.await.expect("join").expect("append");
            // Spawned in order onto one channel: offsets follow the order sent.
            assert_eq!((r.base_offset, r.last_offset), (next, next + n - 1));
            next += n;
        }
        assert_eq!(p.state().high_watermark, next);
        let segments = std::fs::read_dir(dir.path().join("t-0"))
            .expect("partition dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log"))
            })
            .count();
        assert!(segments > 3, "{segments} segments");
        // Read back: every batch whole, in the order sent.
        let (mut offset, mut i) = (0, 0);
        while offset < next {
            let data = p.read(offset, 1 << 20).await.expect("read");
            let batches: Vec<_> = BatchIter::new(data).collect();
            assert!(!batches.is_empty(), "nothing at {offset}");
            for b in batches {
                let b = b.expect("batch");
                assert_eq!(b.header().base_offset, offset);
                let first = b.records().expect("records").remove(0);
                let value = first.value.expect("value");
                assert!(value.starts_with(format!("b{i}-0").as_bytes()), "batch {i}");
                offset = b.header().last_offset() + 1;
                i += 1;
            }
        }
        assert_eq!(i, 60);
        p.close().await.expect("close");
    }
}
