//! The partition task's loop: take every command that is waiting, run them against the
//! log on a blocking thread, flush once, then answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_log_store::{
    AppendOptions, BatchIter, FlushDone, FlushPolicy, Log, LogManager, TailView, TopicPartition,
};
use tokio::sync::{mpsc, oneshot};

use super::replica::Replica;
use super::{Acks, AppendResult, Command, OffsetSpec, PartitionState, Published, ReplicaData};
use crate::error::{BrokerError, Result};
use crate::topic::config::{TimestampType, TopicConfig};

/// Commands taken in one round; bounds the latency one round adds.
const MAX_ROUND: usize = 512;
/// How often retention runs (Kafka's `log.retention.check.interval.ms` is 5 minutes).
const RETENTION_CHECK: Duration = Duration::from_secs(60);
/// How often a leader looks for followers that fell behind.
const LAG_CHECK: Duration = Duration::from_millis(500);

/// The log and the replication state that goes with it; they travel together to the
/// blocking thread each round.
type Owned = (Log, Replica);

pub(super) struct Task {
    pub tp: Arc<TopicPartition>,
    pub log: Option<Owned>,
    pub config: TopicConfig,
    pub manager: Arc<LogManager>,
    pub rx: mpsc::Receiver<Command>,
    pub out: Arc<Published>,
}

/// The offsets of `log` with the high watermark its replica computed.
pub(super) fn state_of(log: &Log, replica: &Replica) -> PartitionState {
    PartitionState {
        log_start_offset: log.log_start_offset(),
        high_watermark: replica.high_watermark(),
        log_end_offset: log.log_end_offset(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

enum Work {
    Commands(Vec<Command>),
    Tick,
    Flushed(FlushDone),
}

/// What a round asks of the loop afterwards.
enum After {
    Continue,
    Stop,
}

pub(super) async fn run(mut task: Task) {
    let mut ticker = tokio::time::interval(tick_interval(&task.config));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_retention = Instant::now();
    // Background flushes (under the interval and every-batch policies, and of a segment
    // sealed without its fsync) run beside the rounds and report here.
    let (flushed_tx, mut flushed_rx) = mpsc::unbounded_channel::<FlushDone>();
    if let Some((log, _)) = task.log.as_mut() {
        log.flush_in_background();
    }
    loop {
        let work = tokio::select! {
            Some(done) = flushed_rx.recv() => Work::Flushed(done),
            cmd = task.rx.recv() => match cmd {
                Some(first) => {
                    let mut cmds = vec![first];
                    while cmds.len() < MAX_ROUND {
                        match task.rx.try_recv() {
                            Ok(c) => cmds.push(c),
                            Err(_) => break,
                        }
                    }
                    Work::Commands(cmds)
                }
                None => {
                    // Every handle is gone: close cleanly.
                    Work::Commands(Vec::new())
                }
            },
            _ = ticker.tick() => Work::Tick,
        };
        let closed_channel = matches!(&work, Work::Commands(c) if c.is_empty());
        let inline = task
            .log
            .as_ref()
            .is_some_and(|(log, _)| runs_inline(&work, log, &task.config));
        let Some(owned) = task.log.take() else { return };
        let config = task.config.clone();
        let manager = Arc::clone(&task.manager);
        let retention_due = last_retention.elapsed() >= RETENTION_CHECK;
        if retention_due {
            last_retention = Instant::now();
        }
        let tp = Arc::clone(&task.tp);
        let out = Arc::clone(&task.out);
        let round = move || {
            let mut owned = Some(owned);
            let (after, changed) = match work {
                Work::Tick => {
                    if let Some((log, replica)) = owned.as_mut() {
                        tick(&tp, log, retention_due);
                        replica.check_lag(&config);
                        settle(&out, log, replica, &config);
                    }
                    (After::Continue, None)
                }
                Work::Commands(cmds) if cmds.is_empty() => {
                    if let Some((l, mut replica)) = owned.take() {
                        replica.fail_pending(&BrokerError::ShuttingDown);
                        if let Err(e) = l.close() {
                            tracing::error!(partition = %tp, error = %e, "closing log failed");
                        }
                    }
                    (After::Stop, None)
                }
                Work::Commands(cmds) => run_round(&mut owned, cmds, &config, &manager, &out),
                Work::Flushed(done) => {
                    if let Some((log, replica)) = owned.as_mut() {
                        if let Err(e) = log.finish_background_flush(done) {
                            let e = BrokerError::from(e);
                            tracing::error!(partition = %tp, error = %e, "flush failed");
                            replica.fail_pending(&e);
                        }
                        settle(&out, log, replica, &config);
                    }
                    (After::Continue, None)
                }
            };
            let background = match owned.as_mut().map(|(log, _)| log.start_background_flush()) {
                Some(Ok(flush)) => flush,
                Some(Err(e)) => {
                    tracing::error!(partition = %tp, error = %e, "flush could not start");
                    None
                }
                None => None,
            };
            let writeback = owned.as_mut().and_then(|(log, _)| log.take_writeback());
            let release = owned.as_mut().and_then(|(log, _)| log.take_release());
            (
                owned,
                changed.unwrap_or(config),
                after,
                background,
                (writeback, release),
            )
        };
        let round = if inline {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(round))
                .map_err(|_| "panicked".to_string())
        } else {
            tokio::task::spawn_blocking(round)
                .await
                .map_err(|e| e.to_string())
        };
        let (owned, config, after, background, (writeback, release)) = match round {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(partition = %task.tp, error = %e, "partition round failed");
                return;
            }
        };
        if config.log.flush != task.config.log.flush {
            ticker = tokio::time::interval(tick_interval(&config));
        }
        if let Some(flush) = background {
            let flushed_tx = flushed_tx.clone();
            tokio::task::spawn_blocking(move || {
                // The task may have stopped meanwhile; the fsync has still happened.
                flush.run_each(|done| {
                    let _ = flushed_tx.send(done);
                });
            });
        }
        if let Some(writeback) = writeback {
            // Off the task, as the flush: it may wait for the block layer.
            tokio::task::spawn_blocking(move || writeback.run());
        }
        if let Some(release) = release {
            // It waits for the disk.
            tokio::task::spawn_blocking(move || release.run());
        }
        task.config = config;
        task.log = owned;
        if matches!(after, After::Stop) || closed_channel || task.log.is_none() {
            return;
        }
    }
}

/// Most bytes a round may append and still run on the partition task itself.
const INLINE_ROUND_BYTES: usize = 256 * 1024;

/// Whether a round is cheap enough to run where the partition task is, rather than on a
/// blocking thread: only appends, together at most `INLINE_ROUND_BYTES` (a copy into the
/// page cache of tens of µs), into the active segment, with no fsync. Handing a round to
/// another thread and back costs two wake-ups, more than such a round itself (on two
/// CPUs about a quarter of the broker's CPU per produce request:
/// docs/benchmarks-history.md).
/// Everything that may wait on the disk (fsync, new segments, retention, reads that
/// fault pages in) still goes to a blocking thread, and so does early writeback under
/// `flush.policy=interval` (`sync_file_range`, which may wait for the block layer).
fn runs_inline(work: &Work, log: &Log, config: &TopicConfig) -> bool {
    let Work::Commands(cmds) = work else {
        // Taking a finished flush back is bookkeeping; ticks may fsync or delete.
        return matches!(work, Work::Flushed(_));
    };
    if cmds.is_empty() {
        return false;
    }
    let every_batch = config.log.flush == FlushPolicy::EveryBatch;
    let mut bytes = 0usize;
    for cmd in cmds {
        match cmd {
            // A leader's appends are flushed in the background, under every policy.
            Command::Append { batch, .. } => bytes += batch.len(),
            // A follower's, under every-batch, in line (`append_from_leader`).
            Command::AppendFromLeader { records, .. } if !every_batch => bytes += records.len(),
            _ => return false,
        }
    }
    bytes <= INLINE_ROUND_BYTES && log.fits_active_segment(bytes as u64)
}

fn tick_interval(config: &TopicConfig) -> Duration {
    let check = match config.log.flush {
        FlushPolicy::Interval(d) => d.clamp(Duration::from_millis(1), RETENTION_CHECK),
        _ => RETENTION_CHECK,
    };
    check.min(LAG_CHECK)
}

fn tick(tp: &TopicPartition, log: &mut Log, retention_due: bool) {
    if let Err(e) = log.apply_flush_policy() {
        tracing::error!(partition = %tp, error = %e, "flush failed");
    }
    if retention_due {
        match log.apply_retention(now_ms()) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(partition = %tp, segments = n, log_start_offset = log.log_start_offset(), "retention deleted segments")
            }
            Err(e) => tracing::error!(partition = %tp, error = %e, "retention failed"),
        }
    }
}

/// Moves the high watermark, publishes the offsets, then answers the `acks=all`
/// producers it covers: whoever hears "appended" also sees the high watermark move.
fn settle(out: &Published, log: &Log, replica: &mut Replica, config: &TopicConfig) {
    replica.settle_hw(log, config);
    // Before the offsets, so a fetch that sees them finds the batches in the view.
    // Only a leader's: nothing else serves consumers, and a follower's log may be cut.
    let tail = if replica.leads() {
        log.tail_view()
    } else {
        TailView::default()
    };
    out.tail.send_replace(tail);
    let now = state_of(log, replica);
    out.state.send_if_modified(|s| {
        let changed = *s != now;
        *s = now;
        changed
    });
    replica.answer_pending();
}

type Waiting = Vec<(oneshot::Sender<Result<AppendResult>>, AppendResult)>;

/// Runs one round of commands in order. Appends are written without a flush; the flush
/// policy is applied once at the end (for a leader that flushes in the background, it
/// leaves the flush to the next background one), and `acks=all` producers are answered
/// once the high watermark covers their batch.
fn run_round(
    slot: &mut Option<Owned>,
    cmds: Vec<Command>,
    config: &TopicConfig,
    manager: &LogManager,
    out: &Published,
) -> (After, Option<TopicConfig>) {
    let mut written: Waiting = Vec::new();
    let mut after = After::Continue;
    let mut new_config: Option<TopicConfig> = None;
    for cmd in cmds {
        let Some((log, replica)) = slot.as_mut() else {
            refuse(cmd);
            continue;
        };
        let config = new_config.as_ref().unwrap_or(config);
        match cmd {
            Command::Append { batch, acks, reply } => {
                if let Err(e) = replica.check_append(acks, config) {
                    let _ = reply.send(Err(e));
                    continue;
                }
                let log_append_time =
                    (config.timestamp_type == TimestampType::LogAppendTime).then(now_ms);
                let options = AppendOptions {
                    leader_epoch: replica.leader_epoch(),
                    log_append_time,
                };
                match log.append_deferred(&batch, options) {
                    Ok(info) => {
                        let result = AppendResult {
                            base_offset: info.base_offset,
                            last_offset: info.last_offset,
                            log_append_time: log_append_time.unwrap_or(-1),
                            log_start_offset: log.log_start_offset(),
                        };
                        if acks == Acks::All {
                            replica.wait_for_hw(reply, result);
                        } else {
                            written.push((reply, result));
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Read {
                offset,
                max_bytes,
                to_log_end,
                reply,
            } => {
                let now = state_of(log, replica);
                // Between the high watermark and the log end there is nothing to see yet,
                // but the offset is valid (acks=1 answers before the flush moves it).
                let result = if !now.holds(offset) {
                    Err(BrokerError::OffsetOutOfRange {
                        offset,
                        log_start_offset: now.log_start_offset,
                        high_watermark: now.high_watermark,
                    })
                } else {
                    let upper = if to_log_end {
                        now.log_end_offset
                    } else {
                        now.high_watermark
                    };
                    log.read_bounded(offset, max_bytes, upper)
                        .map_err(BrokerError::from)
                };
                let _ = reply.send(result);
            }
            Command::ListOffset { spec, reply } => {
                let now = state_of(log, replica);
                let result = match spec {
                    OffsetSpec::Earliest => Ok((now.log_start_offset, -1)),
                    OffsetSpec::Latest => Ok((now.high_watermark, -1)),
                    OffsetSpec::Timestamp(ts) => match log.offset_for_timestamp(ts) {
                        Ok(Some((offset, found))) if offset < now.high_watermark => {
                            Ok((offset, found))
                        }
                        Ok(_) => Ok((now.high_watermark, -1)),
                        Err(e) => Err(e.into()),
                    },
                };
                let _ = reply.send(result);
            }
            Command::SetConfig { config: c, reply } => {
                let result = log.set_config(c.log.clone()).map_err(BrokerError::from);
                if result.is_ok() {
                    new_config = Some(c);
                }
                let _ = reply.send(result);
            }
            Command::SetRole { role, ctx, reply } => {
                replica.set_role(role, ctx, log, config);
                let _ = reply.send(Ok(()));
            }
            Command::ReplicaRead {
                replica: follower,
                epoch,
                offset,
                max_bytes,
                reply,
            } => {
                let result = replica
                    .on_replica_fetch(follower, epoch, offset, log, config)
                    .and_then(|()| {
                        let leo = log.log_end_offset();
                        // Outside the log the follower gets no batches, only the
                        // offsets it needs to cut or restart its own log.
                        let records = if offset < log.log_start_offset() || offset >= leo {
                            bytes::Bytes::new()
                        } else {
                            log.read_bounded(offset, max_bytes, leo)?
                        };
                        Ok(ReplicaData {
                            records,
                            state: state_of(log, replica),
                        })
                    });
                // The follower's position may have moved the high watermark.
                settle(out, log, replica, config);
                let _ = reply.send(result);
            }
            Command::EpochEnd {
                leader_epoch,
                epoch,
                reply,
            } => {
                let result = replica
                    .check_leader_epoch(leader_epoch)
                    .map(|()| log.end_offset_for_epoch(epoch));
                let _ = reply.send(result);
            }
            Command::LatestEpoch { reply } => {
                let _ = reply.send(Ok(log.epoch_history().latest_epoch()));
            }
            Command::TruncateForEpoch {
                epoch,
                answer,
                reply,
            } => {
                let result = replica.check_follower_epoch(epoch).and_then(|()| {
                    // Keep what both logs agree on: up to where the leader's answer
                    // epoch ended there and here, whichever is first.
                    let cut = answer.map_or(log.log_start_offset(), |(e, end)| {
                        let here = log.end_offset_for_epoch(e).map_or(0, |(_, o)| o);
                        end.min(here)
                    });
                    Ok(log.truncate_to(cut)?)
                });
                settle(out, log, replica, config);
                let _ = reply.send(result);
            }
            Command::AppendFromLeader {
                epoch,
                records,
                leader,
                reply,
            } => {
                let result = replica
                    .check_follower_epoch(epoch)
                    .and_then(|()| append_from_leader(log, records, leader));
                if let Ok(leo) = result {
                    replica.follow_hw(leader.high_watermark.min(leo), log);
                }
                settle(out, log, replica, config);
                let _ = reply.send(result);
            }
            Command::Roll { reply } => {
                let result = log
                    .roll()
                    .map(|()| log.log_end_offset())
                    .map_err(BrokerError::from);
                let _ = reply.send(result);
            }
            Command::DeleteBefore { offset, reply } => {
                let result = log
                    .delete_segments_before(offset)
                    .map(|_| log.log_start_offset())
                    .map_err(BrokerError::from);
                let _ = reply.send(result);
            }
            Command::Close { reply } => {
                answer(log, replica, config, out, &mut written);
                let result = slot.take().map_or(Ok(()), |(l, mut r)| {
                    r.fail_pending(&BrokerError::ShuttingDown);
                    l.close().map_err(BrokerError::from)
                });
                let _ = reply.send(result);
                after = After::Stop;
            }
            Command::Delete { reply } => {
                answer(log, replica, config, out, &mut written);
                let result = slot.take().map_or(Ok(()), |(l, mut r)| {
                    r.fail_pending(&BrokerError::ShuttingDown);
                    manager.delete(l).map_err(BrokerError::from)
                });
                let _ = reply.send(result);
                after = After::Stop;
            }
        }
    }
    if let Some((log, replica)) = slot.as_mut() {
        let config = new_config.as_ref().unwrap_or(config);
        answer(log, replica, config, out, &mut written);
    }
    (after, new_config)
}

/// A follower's append of what one fetch returned: the leader's batches as they are,
/// flushed once, per policy. Returns the new log end offset.
fn append_from_leader(log: &mut Log, records: bytes::Bytes, leader: PartitionState) -> Result<u64> {
    if log.log_end_offset() > leader.log_end_offset {
        // This replica holds more than its leader: the surplus was never committed.
        log.truncate_to(leader.log_end_offset)?;
    }
    if log.log_end_offset() < leader.log_start_offset {
        // The leader no longer has what comes next here; start over where it starts.
        log.truncate_fully(leader.log_start_offset)?;
    }
    for batch in BatchIter::new(records) {
        let batch = batch?;
        if batch.header().last_offset() < log.log_end_offset() {
            continue;
        }
        log.append_replicated_deferred(batch.bytes())?;
    }
    if log.config().flush == FlushPolicy::EveryBatch {
        // The offset the follower asks for next counts toward the leader's high
        // watermark at once: under every-batch it must be on disk by then.
        log.flush_if_behind()?;
    } else {
        log.apply_flush_policy()?;
    }
    Ok(log.log_end_offset())
}

/// Answers the round's `acks=1` producers, flushes per policy, then settles the high
/// watermark, which answers the `acks=all` producers it covers.
fn answer(
    log: &mut Log,
    replica: &mut Replica,
    config: &TopicConfig,
    out: &Published,
    written: &mut Waiting,
) {
    if !written.is_empty() {
        settle(out, log, replica, config);
        for (reply, result) in written.drain(..) {
            let _ = reply.send(Ok(result));
        }
    }
    if let Err(e) = log.apply_flush_policy() {
        let e = BrokerError::from(e);
        tracing::error!(error = %e, "flush failed");
        replica.fail_pending(&e);
    }
    settle(out, log, replica, config);
}

fn refuse(cmd: Command) {
    let err = BrokerError::ShuttingDown;
    match cmd {
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::Read { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::ListOffset { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::ReplicaRead { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::EpochEnd { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Command::LatestEpoch { reply } => {
            let _ = reply.send(Err(err));
        }
        Command::SetConfig { reply, .. }
        | Command::SetRole { reply, .. }
        | Command::Close { reply }
        | Command::Delete { reply } => {
            let _ = reply.send(Err(err));
        }
        Command::Roll { reply }
        | Command::DeleteBefore { reply, .. }
        | Command::TruncateForEpoch { reply, .. }
        | Command::AppendFromLeader { reply, .. } => {
            let _ = reply.send(Err(err));
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_log_store::{Compression, RecordBatchBuilder};

    use super::*;

    fn append(bytes: usize) -> Command {
        let mut b = RecordBatchBuilder::new(Compression::None);
        b.append(1000, None, Some(&vec![b'x'; bytes]), &[]);
        Command::Append {
            batch: b.build().expect("build"),
            acks: Acks::Leader,
            reply: oneshot::channel().0,
        }
    }

    fn log(dir: &std::path::Path, config: &TopicConfig) -> Log {
        let manager = LogManager::open(dir).expect("manager");
        manager
            .create(&TopicPartition::new("t", 0), config.log.clone())
            .expect("create")
    }

    #[test]
    fn only_small_appends_without_fsync_or_new_segments_run_in_place() {
        let flushing = |flush| {
            let mut c = TopicConfig::default();
            c.log.flush = flush;
            c
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let os = flushing(FlushPolicy::Os);
        let mut l = log(dir.path(), &os);
        let small = || Work::Commands(vec![append(100), append(100)]);
        assert!(runs_inline(&small(), &l, &os));
        let interval = flushing(FlushPolicy::Interval(Duration::from_secs(1)));
        assert!(runs_inline(&small(), &l, &interval));
        // Under every-batch a leader's appends are flushed in the background...
        let every_batch = flushing(FlushPolicy::EveryBatch);
        assert!(runs_inline(&small(), &l, &every_batch));
        // ...and a follower's in line: that waits on the disk.
        let from_leader = Command::AppendFromLeader {
            epoch: 0,
            records: bytes::Bytes::from_static(b"x"),
            leader: PartitionState::default(),
            reply: oneshot::channel().0,
        };
        assert!(!runs_inline(
            &Work::Commands(vec![from_leader]),
            &l,
            &every_batch
        ));
        // Too many bytes together.
        let big = Work::Commands(vec![append(200 << 10), append(100 << 10)]);
        assert!(!runs_inline(&big, &l, &os));
        // Anything but appends.
        let read = Command::Read {
            offset: 0,
            max_bytes: 100,
            to_log_end: true,
            reply: oneshot::channel().0,
        };
        assert!(!runs_inline(
            &Work::Commands(vec![append(100), read]),
            &l,
            &os
        ));
        assert!(!runs_inline(&Work::Tick, &l, &os));
        assert!(!runs_inline(&Work::Commands(Vec::new()), &l, &os));

        // An append that would start a new segment.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tiny = os.clone();
        tiny.log.segment_bytes = 4096;
        l = log(dir.path(), &tiny);
        let Command::Append { batch, .. } = append(3000) else {
            unreachable!()
        };
        l.append(&batch, AppendOptions::default()).expect("append");
        assert!(!runs_inline(&Work::Commands(vec![append(2000)]), &l, &tiny));
        assert!(runs_inline(&Work::Commands(vec![append(100)]), &l, &tiny));
    }
}
