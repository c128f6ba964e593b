//! A partition replica's role. As leader it tracks where each follower is and derives
//! the high watermark from the ISR; as follower it takes the leader's. It lives with the
//! log inside the partition task, so it needs no lock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_log_store::{FlushPolicy, Log, TopicPartition};
use tokio::sync::{mpsc, oneshot};

use super::{Acks, AppendResult};
use crate::error::{BrokerError, Result};
use crate::topic::config::TopicConfig;

/// How long a proposed ISR change may stay uncommitted before it is proposed again.
const ISR_RETRY: Duration = Duration::from_secs(5);

/// The leader's view of a partition, as the metadata log committed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderRole {
    /// The leader epoch; batches written now carry it.
    pub epoch: i32,
    /// The partition epoch the ISR is from.
    pub partition_epoch: i32,
    /// Replicas in sync.
    pub isr: Vec<u64>,
    /// Every replica.
    pub replicas: Vec<u64>,
}

/// What the metadata log says this broker is for a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Leads it.
    Leader(LeaderRole),
    /// Copies `leader`, which leads in `epoch`.
    Follower {
        /// The leader epoch.
        epoch: i32,
        /// The leader's broker id.
        leader: u64,
    },
}

/// An ISR change a leader asks the controller to commit.
#[derive(Debug, Clone)]
pub struct IsrChange {
    /// The partition.
    pub tp: Arc<TopicPartition>,
    /// The partition epoch the change starts from.
    pub partition_epoch: i32,
    /// The leader (unchanged).
    pub leader: u64,
    /// The ISR wanted.
    pub isr: Vec<u64>,
}

/// What replication needs from the broker around it.
#[derive(Debug, Clone)]
pub struct ReplicationContext {
    /// This broker's id.
    pub broker_id: u64,
    /// `replica.lag.time.max.ms`: a follower not caught up for this long leaves the ISR.
    pub lag_max: Duration,
    /// Where ISR changes go to be committed.
    pub alter: mpsc::UnboundedSender<IsrChange>,
}

#[derive(Debug)]
struct FollowerPos {
    /// The follower's log end offset, from its last fetch.
    leo: u64,
    /// When it last held everything the leader had (Kafka's lastCaughtUpTime).
    caught_up: Instant,
    /// The leader's log end at the follower's previous fetch, and when that was.
    prev_leader_leo: u64,
    prev_fetch: Instant,
}

#[derive(Debug)]
struct Leading {
    role: LeaderRole,
    followers: HashMap<u64, FollowerPos>,
    pending_isr: Option<(Vec<u64>, Instant)>,
}

#[derive(Debug)]
enum Mode {
    /// A single broker: the only replica.
    Standalone,
    Leader(Leading),
    Follower {
        epoch: i32,
    },
}

type Waiter = (oneshot::Sender<Result<AppendResult>>, AppendResult);

/// One replica's replication state.
#[derive(Debug)]
pub(super) struct Replica {
    tp: Arc<TopicPartition>,
    mode: Mode,
    hw: u64,
    ctx: Option<ReplicationContext>,
    /// `acks=all` producers, in offset order, waiting for the high watermark.
    pending: VecDeque<Waiter>,
}

/// What this replica holds for sure: what is on disk under `every-batch`, what is
/// written otherwise (the topic chose to trust the page cache).
fn local_end(log: &Log, config: &TopicConfig) -> u64 {
    match config.log.flush {
        FlushPolicy::EveryBatch => log.recovery_point(),
        _ => log.log_end_offset(),
    }
}

impl Replica {
    /// The only replica of a partition.
    pub fn standalone(tp: Arc<TopicPartition>, log: &Log, config: &TopicConfig) -> Replica {
        Replica {
            tp,
            mode: Mode::Standalone,
            hw: local_end(log, config),
            ctx: None,
            pending: VecDeque::new(),
        }
    }

    /// A replica in a cluster before the metadata log gave it a role: it takes no
    /// writes, and shows nothing as committed until a leader says so (its own log end
    /// may hold a tail the cluster never committed).
    pub fn unassigned(tp: Arc<TopicPartition>) -> Replica {
        Replica {
            tp,
            mode: Mode::Follower { epoch: -1 },
            hw: 0,
            ctx: None,
            pending: VecDeque::new(),
        }
    }

    /// Consumers read below this.
    pub fn high_watermark(&self) -> u64 {
        self.hw
    }

    /// Whether this replica takes producers' writes (the only replica, or the leader).
    pub fn leads(&self) -> bool {
        matches!(self.mode, Mode::Standalone | Mode::Leader(_))
    }

    /// The epoch a leader stamps on the batches it appends.
    pub fn leader_epoch(&self) -> i32 {
        match &self.mode {
            Mode::Standalone => 0,
            Mode::Leader(l) => l.role.epoch,
            Mode::Follower { epoch } => *epoch,
        }
    }

    fn not_leader(&self) -> BrokerError {
        BrokerError::NotLeader {
            topic: self.tp.topic.clone(),
            partition: i64::from(self.tp.partition),
            leader: None,
            address: None,
        }
    }

    /// ISR members that are keeping up now: the committed ISR, less followers silent
    /// past `replica.lag.time.max.ms` whose removal could not be committed yet (the
    /// controller may be out of reach). Used only to refuse writes, never to commit.
    fn keeping_up(&self) -> u32 {
        match (&self.mode, &self.ctx) {
            (Mode::Standalone, _) => 1,
            (Mode::Follower { .. }, _) => 0,
            (Mode::Leader(l), None) => l.role.isr.len() as u32,
            (Mode::Leader(l), Some(ctx)) => l
                .role
                .isr
                .iter()
                .filter(|b| {
                    **b == ctx.broker_id
                        || l.followers
                            .get(b)
                            .is_some_and(|f| f.caught_up.elapsed() <= ctx.lag_max)
                })
                .count() as u32,
        }
    }

    /// Refuses an append this replica must not take, before anything is written.
    pub fn check_append(&self, acks: Acks, config: &TopicConfig) -> Result<()> {
        if matches!(self.mode, Mode::Follower { .. }) {
            return Err(self.not_leader());
        }
        let isr = self.keeping_up();
        if acks == Acks::All && isr < config.min_insync_replicas {
            return Err(BrokerError::NotEnoughReplicas {
                isr,
                min: config.min_insync_replicas,
            });
        }
        Ok(())
    }

    /// Parks an `acks=all` producer until the high watermark passes its batch.
    pub fn wait_for_hw(&mut self, reply: oneshot::Sender<Result<AppendResult>>, r: AppendResult) {
        self.pending.push_back((reply, r));
    }

    /// Recomputes the high watermark.
    pub fn settle_hw(&mut self, log: &Log, config: &TopicConfig) {
        let leo = log.log_end_offset();
        match &self.mode {
            Mode::Standalone => self.hw = local_end(log, config),
            Mode::Follower { .. } => self.hw = self.hw.min(leo),
            Mode::Leader(l) => {
                let me = self.ctx.as_ref().map_or(0, |c| c.broker_id);
                let mut members: Vec<u64> = l.role.isr.clone();
                // A follower being added counts at once (KIP-497's maximal ISR); one
                // being removed counts until the removal commits.
                if let Some((wanted, _)) = &l.pending_isr {
                    members.extend(wanted.iter().filter(|b| !l.role.isr.contains(b)));
                }
                let candidate = members
                    .iter()
                    .map(|b| {
                        if *b == me {
                            local_end(log, config)
                        } else {
                            l.followers.get(b).map_or(0, |f| f.leo)
                        }
                    })
                    .min()
                    .unwrap_or(0);
                let min_isr = config.min_insync_replicas as usize;
                // With fewer in sync than min.insync.replicas nothing new is committed,
                // unless the topic could never reach that many.
                let enough = l.role.isr.len() >= min_isr || l.role.replicas.len() < min_isr;
                if enough {
                    self.hw = self.hw.max(candidate);
                }
                self.hw = self.hw.min(leo);
            }
        }
    }

    /// Answers every waiting producer the high watermark now covers; call after the
    /// new high watermark is published.
    pub fn answer_pending(&mut self) {
        while let Some((_, r)) = self.pending.front() {
            if r.last_offset >= self.hw {
                break;
            }
            if let Some((reply, r)) = self.pending.pop_front() {
                let _ = reply.send(Ok(r));
            }
        }
    }

    /// Fails every waiting producer.
    pub fn fail_pending(&mut self, err: &BrokerError) {
        for (reply, _) in self.pending.drain(..) {
            let _ = reply.send(Err(err.clone()));
        }
    }

    /// Takes the role the metadata log gives this replica.
    pub fn set_role(
        &mut self,
        role: Role,
        ctx: ReplicationContext,
        log: &Log,
        config: &TopicConfig,
    ) {
        let me = ctx.broker_id;
        self.ctx = Some(ctx);
        match role {
            Role::Follower { epoch, .. } => {
                let err = self.not_leader();
                self.fail_pending(&err);
                self.mode = Mode::Follower { epoch };
            }
            Role::Leader(role) => {
                let same_epoch =
                    matches!(&self.mode, Mode::Leader(l) if l.role.epoch == role.epoch);
                if same_epoch {
                    if let Mode::Leader(l) = &mut self.mode {
                        if l.role.partition_epoch != role.partition_epoch {
                            l.pending_isr = None;
                        }
                        l.role = role;
                    }
                } else {
                    let now = Instant::now();
                    let followers = role
                        .replicas
                        .iter()
                        .filter(|b| **b != me)
                        .map(|b| {
                            (
                                *b,
                                FollowerPos {
                                    leo: 0,
                                    caught_up: now,
                                    prev_leader_leo: u64::MAX,
                                    prev_fetch: now,
                                },
                            )
                        })
                        .collect();
                    self.mode = Mode::Leader(Leading {
                        role,
                        followers,
                        pending_isr: None,
                    });
                }
                if let Mode::Leader(l) = &self.mode {
                    let min = config.min_insync_replicas;
                    if (l.role.isr.len() as u32) < min && l.role.replicas.len() as u32 >= min {
                        self.fail_pending(&BrokerError::NotEnoughReplicas {
                            isr: l.role.isr.len() as u32,
                            min,
                        });
                    }
                }
            }
        }
        self.settle_hw(log, config);
    }

    /// Checks that this replica leads in `epoch`.
    pub fn check_leader_epoch(&self, epoch: i32) -> Result<()> {
        match &self.mode {
            Mode::Leader(l) if l.role.epoch == epoch => Ok(()),
            _ => Err(self.not_leader()),
        }
    }

    /// Checks that this replica follows in `epoch`.
    pub fn check_follower_epoch(&self, epoch: i32) -> Result<()> {
        match &self.mode {
            Mode::Follower { epoch: e } if *e == epoch => Ok(()),
            _ => Err(BrokerError::Fenced(format!(
                "{} is no longer a follower in leader epoch {epoch}",
                self.tp
            ))),
        }
    }

    /// A follower fetched at `offset`: it holds everything below. Moves the high
    /// watermark and asks for the follower to rejoin the ISR once it has caught up.
    pub fn on_replica_fetch(
        &mut self,
        replica: u64,
        epoch: i32,
        offset: u64,
        log: &Log,
        config: &TopicConfig,
    ) -> Result<()> {
        self.check_leader_epoch(epoch)?;
        let leo = log.log_end_offset();
        let hw = self.hw;
        let mut wanted = None;
        if let Mode::Leader(l) = &mut self.mode {
            let Some(f) = l.followers.get_mut(&replica) else {
                return Err(BrokerError::InvalidRequest(format!(
                    "broker {replica} holds no replica of {}",
                    self.tp
                )));
            };
            let now = Instant::now();
            if offset <= leo {
                f.leo = offset;
            }
            if offset >= leo {
                f.caught_up = now;
            } else if offset >= f.prev_leader_leo {
                // It has what the leader had at its previous fetch.
                f.caught_up = f.caught_up.max(f.prev_fetch);
            }
            f.prev_leader_leo = leo;
            f.prev_fetch = now;
            let out_of_isr = !l.role.isr.contains(&replica);
            let asked = l
                .pending_isr
                .as_ref()
                .is_some_and(|(w, at)| w.contains(&replica) && at.elapsed() < ISR_RETRY);
            if out_of_isr && !asked && offset >= hw && f.leo == offset {
                let mut isr = l.role.isr.clone();
                isr.push(replica);
                wanted = Some(isr);
            }
        }
        if let Some(isr) = wanted {
            self.propose_isr(isr);
        }
        self.settle_hw(log, config);
        Ok(())
    }

    /// A leader's periodic check: followers not caught up for `replica.lag.time.max.ms`
    /// are proposed out of the ISR.
    pub fn check_lag(&mut self, config: &TopicConfig) {
        let (Mode::Leader(l), Some(_)) = (&self.mode, &self.ctx) else {
            return;
        };
        let min = config.min_insync_replicas;
        let isr = self.keeping_up();
        if isr < min && l.role.replicas.len() as u32 >= min && !self.pending.is_empty() {
            // They would wait for the request timeout: say why now.
            self.fail_pending(&BrokerError::NotEnoughReplicas { isr, min });
            return;
        }
        let (Mode::Leader(l), Some(ctx)) = (&self.mode, &self.ctx) else {
            return;
        };
        if l.pending_isr
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < ISR_RETRY)
        {
            return;
        }
        let lagging: Vec<u64> = l
            .role
            .isr
            .iter()
            .filter(|b| **b != ctx.broker_id)
            .filter(|b| {
                l.followers
                    .get(b)
                    .is_some_and(|f| f.caught_up.elapsed() > ctx.lag_max)
            })
            .copied()
            .collect();
        if lagging.is_empty() {
            return;
        }
        let isr = l
            .role
            .isr
            .iter()
            .filter(|b| !lagging.contains(b))
            .copied()
            .collect();
        tracing::info!(partition = %self.tp, ?lagging, "followers fell behind; shrinking the ISR");
        self.propose_isr(isr);
    }

    fn propose_isr(&mut self, isr: Vec<u64>) {
        let (Mode::Leader(l), Some(ctx)) = (&mut self.mode, &self.ctx) else {
            return;
        };
        let change = IsrChange {
            tp: Arc::clone(&self.tp),
            partition_epoch: l.role.partition_epoch,
            leader: ctx.broker_id,
            isr: isr.clone(),
        };
        if ctx.alter.send(change).is_ok() {
            l.pending_isr = Some((isr, Instant::now()));
        }
    }

    /// A follower takes the leader's high watermark, capped by what it holds.
    pub fn follow_hw(&mut self, leader_hw: u64, log: &Log) {
        self.hw = leader_hw.min(log.log_end_offset());
    }
}
