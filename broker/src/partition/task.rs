//! The partition task's loop: take every command that is waiting, run them against the
//! log on a blocking thread, flush once, then answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_log_store::{AppendOptions, FlushPolicy, Log, LogManager, TopicPartition};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Acks, AppendResult, Command, OffsetSpec, PartitionState};
use crate::error::{BrokerError, Result};
use crate::topic::config::{TimestampType, TopicConfig};

/// Commands taken in one round; bounds the latency one round adds.
const MAX_ROUND: usize = 512;
/// How often retention runs (Kafka's `log.retention.check.interval.ms` is 5 minutes).
const RETENTION_CHECK: Duration = Duration::from_secs(60);

pub(super) struct Task {
    pub tp: Arc<TopicPartition>,
    pub log: Option<Log>,
    pub config: TopicConfig,
    pub manager: Arc<LogManager>,
    pub rx: mpsc::Receiver<Command>,
    pub state: Arc<watch::Sender<PartitionState>>,
}

/// The high watermark of a single replica: what is durable under `EveryBatch`, what is
/// written otherwise (the topic chose to trust the page cache).
pub(super) fn state_of(log: &Log, config: &TopicConfig) -> PartitionState {
    let high_watermark = match config.log.flush {
        FlushPolicy::EveryBatch => log.recovery_point(),
        _ => log.log_end_offset(),
    };
    PartitionState {
        log_start_offset: log.log_start_offset(),
        high_watermark,
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
    loop {
        let work = tokio::select! {
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
        let Some(log) = task.log.take() else { return };
        let config = task.config.clone();
        let manager = Arc::clone(&task.manager);
        let retention_due = last_retention.elapsed() >= RETENTION_CHECK;
        if retention_due {
            last_retention = Instant::now();
        }
        let tp = Arc::clone(&task.tp);
        let state = Arc::clone(&task.state);
        let round = tokio::task::spawn_blocking(move || {
            let mut log = Some(log);
            let (after, changed) = match work {
                Work::Tick => {
                    tick(&tp, log.as_mut(), retention_due);
                    (After::Continue, None)
                }
                Work::Commands(cmds) if cmds.is_empty() => {
                    if let Some(l) = log.take() {
                        if let Err(e) = l.close() {
                            tracing::error!(partition = %tp, error = %e, "closing log failed");
                        }
                    }
                    (After::Stop, None)
                }
                Work::Commands(cmds) => run_round(&mut log, cmds, &config, &manager, &state),
            };
            (log, changed.unwrap_or(config), after)
        })
        .await;
        let (log, config, after) = match round {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(partition = %task.tp, error = %e, "partition round panicked");
                return;
            }
        };
        if config.log.flush != task.config.log.flush {
            ticker = tokio::time::interval(tick_interval(&config));
        }
        task.config = config;
        if let Some(l) = &log {
            publish(&task.state, l, &task.config);
        }
        task.log = log;
        if matches!(after, After::Stop) || closed_channel || task.log.is_none() {
            return;
        }
    }
}

fn tick_interval(config: &TopicConfig) -> Duration {
    match config.log.flush {
        FlushPolicy::Interval(d) => d.clamp(Duration::from_millis(1), RETENTION_CHECK),
        _ => RETENTION_CHECK,
    }
}

fn tick(tp: &TopicPartition, log: Option<&mut Log>, retention_due: bool) {
    let Some(log) = log else { return };
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

/// Publishes the log's offsets; done before producers are answered, so that whoever
/// hears "appended" also sees the high watermark that append moved.
fn publish(state: &watch::Sender<PartitionState>, log: &Log, config: &TopicConfig) {
    let now = state_of(log, config);
    state.send_if_modified(|s| {
        let changed = *s != now;
        *s = now;
        changed
    });
}

type Waiting = Vec<(oneshot::Sender<Result<AppendResult>>, AppendResult)>;

/// Runs one round of commands in order. Appends are written without a flush; the flush
/// policy is applied once at the end (group commit), and only then are `acks=all`
/// producers answered.
fn run_round(
    log_slot: &mut Option<Log>,
    cmds: Vec<Command>,
    config: &TopicConfig,
    manager: &LogManager,
    state: &watch::Sender<PartitionState>,
) -> (After, Option<TopicConfig>) {
    let mut waiting_for_flush: Waiting = Vec::new();
    let mut waiting_for_write: Waiting = Vec::new();
    let mut after = After::Continue;
    let mut new_config: Option<TopicConfig> = None;
    for cmd in cmds {
        let Some(log) = log_slot.as_mut() else {
            refuse(cmd);
            continue;
        };
        match cmd {
            Command::Append { batch, acks, reply } => {
                // One node is the whole ISR; refuse before writing, so nothing is half-written.
                if acks == Acks::All && config.min_insync_replicas > 1 {
                    let _ = reply.send(Err(BrokerError::NotEnoughReplicas {
                        isr: 1,
                        min: config.min_insync_replicas,
                    }));
                    continue;
                }
                let log_append_time =
                    (config.timestamp_type == TimestampType::LogAppendTime).then(now_ms);
                let options = AppendOptions {
                    leader_epoch: 0,
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
                            waiting_for_flush.push((reply, result));
                        } else {
                            waiting_for_write.push((reply, result));
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
                reply,
            } => {
                let state = state_of(log, new_config.as_ref().unwrap_or(config));
                // Between the high watermark and the log end there is nothing to see yet,
                // but the offset is valid (acks=1 answers before the flush moves it).
                let result = if offset < state.log_start_offset || offset > state.log_end_offset {
                    Err(BrokerError::OffsetOutOfRange {
                        offset,
                        log_start_offset: state.log_start_offset,
                        high_watermark: state.high_watermark,
                    })
                } else {
                    log.read_bounded(offset, max_bytes, state.high_watermark)
                        .map_err(BrokerError::from)
                };
                let _ = reply.send(result);
            }
            Command::ListOffset { spec, reply } => {
                let state = state_of(log, config);
                let result = match spec {
                    OffsetSpec::Earliest => Ok((state.log_start_offset, -1)),
                    OffsetSpec::Latest => Ok((state.high_watermark, -1)),
                    OffsetSpec::Timestamp(ts) => match log.offset_for_timestamp(ts) {
                        Ok(Some((offset, found))) if offset < state.high_watermark => {
                            Ok((offset, found))
                        }
                        Ok(_) => Ok((state.high_watermark, -1)),
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
                answer(
                    log,
                    config,
                    state,
                    &mut waiting_for_write,
                    &mut waiting_for_flush,
                );
                let result = log_slot
                    .take()
                    .map_or(Ok(()), |l| l.close().map_err(BrokerError::from));
                let _ = reply.send(result);
                after = After::Stop;
            }
            Command::Delete { reply } => {
                answer(
                    log,
                    config,
                    state,
                    &mut waiting_for_write,
                    &mut waiting_for_flush,
                );
                let result = log_slot
                    .take()
                    .map_or(Ok(()), |l| manager.delete(l).map_err(BrokerError::from));
                let _ = reply.send(result);
                after = After::Stop;
            }
        }
    }
    if let Some(log) = log_slot.as_mut() {
        let config = new_config.as_ref().unwrap_or(config);
        answer(
            log,
            config,
            state,
            &mut waiting_for_write,
            &mut waiting_for_flush,
        );
    }
    (after, new_config)
}

/// Answers the round's `acks=1` producers, flushes per policy, then answers its
/// `acks=all` producers; the offsets are published before each group hears back.
fn answer(
    log: &mut Log,
    config: &TopicConfig,
    state: &watch::Sender<PartitionState>,
    written: &mut Waiting,
    durable: &mut Waiting,
) {
    if !written.is_empty() {
        publish(state, log, config);
        for (reply, result) in written.drain(..) {
            let _ = reply.send(Ok(result));
        }
    }
    let flushed = log.apply_flush_policy().map_err(BrokerError::from);
    if let Err(e) = &flushed {
        tracing::error!(error = %e, "flush failed");
    }
    publish(state, log, config);
    for (reply, result) in durable.drain(..) {
        let _ = reply.send(flushed.clone().map(|()| result));
    }
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
        Command::SetConfig { reply, .. } | Command::Close { reply } | Command::Delete { reply } => {
            let _ = reply.send(Err(err));
        }
        Command::Roll { reply } | Command::DeleteBefore { reply, .. } => {
            let _ = reply.send(Err(err));
        }
    }
}
