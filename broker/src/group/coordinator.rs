//! The group coordinator: one task owns every group's membership, target assignment
//! and committed offsets; requests reach it over a channel.
//!
//! Rebalances are incremental, as in Kafka's consumer group protocol (KIP-848): the
//! coordinator computes a target assignment whenever the group changes, and each member
//! learns in its heartbeat answer what to consume now. A partition moving from A to B
//! is first taken from A; B gets it only once A's heartbeat no longer lists it as owned,
//! so no two members consume it at once, and members keep every partition they do not
//! lose.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::assignor::{assign, Assignment, Strategy, Tp};
use super::offsets::{now_ms, Committed, OffsetMap, OffsetStore};
use crate::error::{BrokerError, Result};
use crate::topic::manager::Topics;

/// The assignor used when a member names none.
pub const DEFAULT_ASSIGNOR: &str = "sticky";

/// A heartbeat, decoded.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// Group id.
    pub group: String,
    /// Empty to join.
    pub member_id: String,
    /// 0 to join, -1 to leave, else the last epoch answered.
    pub member_epoch: i32,
    /// Subscribed topics.
    pub topics: BTreeSet<String>,
    /// A regular expression subscribing every topic whose whole name matches.
    pub pattern: Option<String>,
    /// Assignor asked for (empty: the default).
    pub assignor: String,
    /// Partitions the member consumes now.
    pub owned: BTreeSet<Tp>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatAnswer {
    /// The member's id.
    pub member_id: String,
    /// The member's epoch.
    pub member_epoch: i32,
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
    /// What to consume now.
    pub assignment: BTreeSet<Tp>,
}

/// A member as `describe` shows it.
#[derive(Debug, Clone)]
pub struct MemberDescription {
    /// Member id.
    pub member_id: String,
    /// Member epoch.
    pub member_epoch: i32,
    /// Subscribed topics.
    pub topics: BTreeSet<String>,
    /// What it consumes now.
    pub assignment: BTreeSet<Tp>,
    /// What it will consume once the others let go.
    pub target: BTreeSet<Tp>,
}

/// A partition's committed offset and lag.
#[derive(Debug, Clone)]
pub struct PartitionLag {
    /// Topic and partition.
    pub tp: Tp,
    /// Committed offset, if any.
    pub committed: Option<u64>,
    /// The partition's high watermark (0 when the partition is gone).
    pub log_end_offset: u64,
    /// The member consuming it.
    pub member_id: Option<String>,
}

/// A group as `describe` shows it.
#[derive(Debug, Clone)]
pub struct GroupDescription {
    /// Group id.
    pub group: String,
    /// EMPTY, RECONCILING or STABLE.
    pub state: &'static str,
    /// Group epoch.
    pub epoch: i32,
    /// Assignor in use.
    pub assignor: String,
    /// Members by id.
    pub members: Vec<MemberDescription>,
    /// Offsets and lag.
    pub offsets: Vec<PartitionLag>,
}

/// A group in a listing.
#[derive(Debug, Clone)]
pub struct GroupListing {
    /// Group id.
    pub group: String,
    /// EMPTY, RECONCILING or STABLE.
    pub state: &'static str,
    /// Members now.
    pub members: usize,
}

enum Command {
    Activate(bool, oneshot::Sender<Result<()>>),
    Heartbeat(Heartbeat, oneshot::Sender<Result<HeartbeatAnswer>>),
    Commit {
        group: String,
        member: Option<(String, i32)>,
        offsets: Vec<(Tp, Committed)>,
        reply: oneshot::Sender<Result<()>>,
    },
    FetchOffsets {
        group: String,
        partitions: Option<Vec<Tp>>,
        reply: oneshot::Sender<Vec<(Tp, Option<Committed>)>>,
    },
    CheckFetch {
        group: String,
        member_id: String,
        member_epoch: i32,
        partitions: Vec<Tp>,
        reply: oneshot::Sender<Result<()>>,
    },
    List(oneshot::Sender<Vec<GroupListing>>),
    Describe(String, oneshot::Sender<Result<GroupDescription>>),
    Delete(String, oneshot::Sender<Result<()>>),
}

/// Settings of the coordinator.
#[derive(Debug, Clone, Copy)]
pub struct CoordinatorConfig {
    /// A member silent this long is removed.
    pub session_timeout: Duration,
    /// How often members heartbeat.
    pub heartbeat_interval: Duration,
    /// How long a member may keep partitions it was told to give up (Kafka's
    /// `max.poll.interval.ms` plays this part).
    pub rebalance_timeout: Duration,
    /// Offsets of a group empty this long expire.
    pub offsets_retention: Duration,
    /// Compact `__consumer_offsets` once it holds this many more records than there
    /// are live offsets.
    pub compact_after_records: u64,
}

/// A cloneable handle to the coordinator task.
#[derive(Debug, Clone)]
pub struct GroupCoordinator {
    tx: mpsc::Sender<Command>,
    active: watch::Receiver<bool>,
}

struct Member {
    epoch: i32,
    /// The subscription as asked: names, and a pattern.
    explicit: BTreeSet<String>,
    pattern: Option<regex::Regex>,
    /// The subscription resolved against the topics that exist now.
    topics: BTreeSet<String>,
    owned: BTreeSet<Tp>,
    current: BTreeSet<Tp>,
    deadline: Instant,
    /// Set while the member still holds partitions it was told to give up: past this
    /// it is removed, so one stuck member cannot hold partitions forever.
    revoke_by: Option<Instant>,
}

#[derive(Default)]
struct Group {
    epoch: i32,
    assignor: Option<Strategy>,
    members: BTreeMap<String, Member>,
    target: Assignment,
    partitions: BTreeMap<String, u32>,
    /// When the last member left (ms since the epoch).
    empty_since: Option<i64>,
    joined: u64,
}

impl Group {
    fn state(&self) -> &'static str {
        if self.members.is_empty() {
            "EMPTY"
        } else if self.members.iter().all(|(id, m)| {
            self.target
                .get(id)
                .is_none_or(|t| *t == m.current && *t == m.owned)
        }) {
            "STABLE"
        } else {
            "RECONCILING"
        }
    }
}

struct Coordinator {
    config: CoordinatorConfig,
    topics: Topics,
    store: OffsetStore,
    groups: BTreeMap<String, Group>,
    offsets: OffsetMap,
    /// Whether this broker coordinates groups now (always, on a single broker).
    active: watch::Sender<bool>,
}

impl GroupCoordinator {
    /// Opens the offsets topic, replays it, and starts the coordinator task.
    pub async fn start(topics: Topics, config: CoordinatorConfig) -> Result<GroupCoordinator> {
        let store = OffsetStore::open(topics.clone()).await?;
        let offsets = store.load().await?;
        Ok(Self::spawn(topics, config, store, offsets, true))
    }

    /// A coordinator in a cluster: idle until [`GroupCoordinator::set_active`] says
    /// this broker leads the replicated offsets topic.
    pub fn start_in_cluster(topics: Topics, config: CoordinatorConfig) -> GroupCoordinator {
        let store = OffsetStore::attach(topics.clone());
        Self::spawn(topics, config, store, OffsetMap::new(), false)
    }

    fn spawn(
        topics: Topics,
        config: CoordinatorConfig,
        store: OffsetStore,
        offsets: OffsetMap,
        active: bool,
    ) -> GroupCoordinator {
        let (tx, rx) = mpsc::channel(1024);
        let (active_tx, active_rx) = watch::channel(active);
        let c = Coordinator {
            config,
            topics,
            store,
            groups: BTreeMap::new(),
            offsets,
            active: active_tx,
        };
        tokio::spawn(c.run(rx));
        GroupCoordinator {
            tx,
            active: active_rx,
        }
    }

    /// Whether this broker coordinates groups now.
    pub fn is_active(&self) -> bool {
        *self.active.borrow()
    }

    /// Takes over (replaying the offsets this replica holds) or hands over (forgetting
    /// groups and offsets) as leadership of the offsets topic moves.
    pub async fn set_active(&self, active: bool) -> Result<()> {
        self.call(|r| Command::Activate(active, r)).await?
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        rx.await.map_err(|_| BrokerError::ShuttingDown)
    }

    /// Handles a member's heartbeat.
    pub async fn heartbeat(&self, hb: Heartbeat) -> Result<HeartbeatAnswer> {
        self.call(|r| Command::Heartbeat(hb, r)).await?
    }

    /// Commits offsets, from a member (`Some((id, epoch))`) or administratively.
    pub async fn commit(
        &self,
        group: String,
        member: Option<(String, i32)>,
        offsets: Vec<(Tp, Committed)>,
    ) -> Result<()> {
        self.call(|reply| Command::Commit {
            group,
            member,
            offsets,
            reply,
        })
        .await?
    }

    /// Committed offsets of a group (of `partitions`, or all it has).
    pub async fn fetch_offsets(
        &self,
        group: String,
        partitions: Option<Vec<Tp>>,
    ) -> Result<Vec<(Tp, Option<Committed>)>> {
        self.call(|reply| Command::FetchOffsets {
            group,
            partitions,
            reply,
        })
        .await
    }

    /// Fails with `Fenced` unless the member is in the group and holds every partition.
    pub async fn check_fetch(
        &self,
        group: String,
        member_id: String,
        member_epoch: i32,
        partitions: Vec<Tp>,
    ) -> Result<()> {
        self.call(|reply| Command::CheckFetch {
            group,
            member_id,
            member_epoch,
            partitions,
            reply,
        })
        .await?
    }

    /// Every group with members or offsets.
    pub async fn list(&self) -> Result<Vec<GroupListing>> {
        self.call(Command::List).await
    }

    /// One group's state.
    pub async fn describe(&self, group: String) -> Result<GroupDescription> {
        self.call(|r| Command::Describe(group, r)).await?
    }

    /// Deletes an empty group and its offsets.
    pub async fn delete(&self, group: String) -> Result<()> {
        self.call(|r| Command::Delete(group, r)).await?
    }
}

fn fenced_unknown(group: &str, member: &str) -> BrokerError {
    BrokerError::Fenced(format!(
        "member {member:?} is not in group {group:?} (it left, or its session timed out); join again"
    ))
}

impl Coordinator {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let sweep_every = (self.config.heartbeat_interval / 2)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => return,
                },
                _ = sweep.tick() => self.sweep().await,
            }
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Activate(active, reply) => {
                // Members rejoin and find their offsets again either way.
                self.groups.clear();
                self.offsets.clear();
                let result = if active {
                    self.store.load().await.map(|o| self.offsets = o)
                } else {
                    Ok(())
                };
                self.active.send_replace(active && result.is_ok());
                tracing::info!(active, ok = result.is_ok(), "group coordinator");
                let _ = reply.send(result);
            }
            Command::Heartbeat(hb, reply) => {
                let _ = reply.send(self.heartbeat(hb));
            }
            Command::Commit {
                group,
                member,
                offsets,
                reply,
            } => {
                let r = self.commit(&group, member, offsets).await;
                let _ = reply.send(r);
            }
            Command::FetchOffsets {
                group,
                partitions,
                reply,
            } => {
                let have = self.offsets.get(&group);
                let out = match partitions {
                    Some(tps) => tps
                        .into_iter()
                        .map(|tp| {
                            let c = have.and_then(|g| g.get(&tp)).cloned();
                            (tp, c)
                        })
                        .collect(),
                    None => have
                        .map(|g| {
                            g.iter()
                                .map(|(tp, c)| (tp.clone(), Some(c.clone())))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                let _ = reply.send(out);
            }
            Command::CheckFetch {
                group,
                member_id,
                member_epoch,
                partitions,
                reply,
            } => {
                let _ =
                    reply.send(self.check_member(&group, &member_id, member_epoch, &partitions));
            }
            Command::List(reply) => {
                let mut ids: BTreeSet<&String> = self.groups.keys().collect();
                ids.extend(self.offsets.keys());
                let out = ids
                    .into_iter()
                    .map(|id| match self.groups.get(id) {
                        Some(g) => GroupListing {
                            group: id.clone(),
                            state: g.state(),
                            members: g.members.len(),
                        },
                        None => GroupListing {
                            group: id.clone(),
                            state: "EMPTY",
                            members: 0,
                        },
                    })
                    .collect();
                let _ = reply.send(out);
            }
            Command::Describe(group, reply) => {
                let _ = reply.send(self.describe(&group));
            }
            Command::Delete(group, reply) => {
                let r = self.delete(&group).await;
                let _ = reply.send(r);
            }
        }
    }

    fn heartbeat(&mut self, hb: Heartbeat) -> Result<HeartbeatAnswer> {
        if hb.group.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "group id must not be empty".into(),
            ));
        }
        let name = if hb.assignor.is_empty() {
            DEFAULT_ASSIGNOR
        } else {
            hb.assignor.as_str()
        };
        let strategy = Strategy::parse(name).ok_or_else(|| {
            BrokerError::InvalidRequest(format!(
                "unknown assignor {name:?}: use range, roundrobin or sticky"
            ))
        })?;
        let pattern = match hb.pattern.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => Some(regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                BrokerError::InvalidRequest(format!("subscription pattern {p:?}: {e}"))
            })?),
            None => None,
        };
        let md = self.topics.metadata();
        let resolved = resolve(&hb.topics, pattern.as_ref(), &md);
        let now = Instant::now();
        let session = self.config.session_timeout;
        let group = self.groups.entry(hb.group.clone()).or_default();
        let mut changed = false;

        if hb.member_epoch == -1 && group.members.remove(&hb.member_id).is_some() {
            tracing::info!(group = %hb.group, member = %hb.member_id, "member left");
            changed = true;
        }
        let member_id = if hb.member_epoch == -1 {
            hb.member_id.clone()
        } else if hb.member_id.is_empty() || !group.members.contains_key(&hb.member_id) {
            if !hb.member_id.is_empty() && hb.member_epoch != 0 {
                return Err(fenced_unknown(&hb.group, &hb.member_id));
            }
            if let Some(used) = group.assignor.filter(|_| !group.members.is_empty()) {
                if used != strategy {
                    return Err(BrokerError::InvalidRequest(format!(
                        "group {:?} uses the {} assignor; this member asked for {}",
                        hb.group,
                        used.name(),
                        strategy.name()
                    )));
                }
            }
            group.joined += 1;
            let id = if hb.member_id.is_empty() {
                format!("{}-{}-{:x}", hb.group, group.joined, now_ms())
            } else {
                hb.member_id.clone()
            };
            group.members.insert(
                id.clone(),
                Member {
                    epoch: 0,
                    explicit: hb.topics.clone(),
                    pattern,
                    topics: resolved,
                    owned: BTreeSet::new(),
                    current: BTreeSet::new(),
                    deadline: now + session,
                    revoke_by: None,
                },
            );
            group.assignor = Some(strategy);
            group.empty_since = None;
            tracing::info!(group = %hb.group, member = %id, "member joined");
            changed = true;
            id
        } else {
            let Some(m) = group.members.get_mut(&hb.member_id) else {
                return Err(fenced_unknown(&hb.group, &hb.member_id));
            };
            if hb.member_epoch > m.epoch {
                return Err(BrokerError::Fenced(format!(
                    "member epoch {} is ahead of the coordinator's {}",
                    hb.member_epoch, m.epoch
                )));
            }
            if group.assignor != Some(strategy) {
                return Err(BrokerError::InvalidRequest(format!(
                    "group {:?} uses the {} assignor; this member asked for {}",
                    hb.group,
                    group.assignor.map_or("no", Strategy::name),
                    strategy.name()
                )));
            }
            m.deadline = now + session;
            m.explicit = hb.topics.clone();
            m.pattern = pattern;
            if m.topics != resolved {
                m.topics = resolved;
                changed = true;
            }
            m.owned = hb.owned.clone();
            hb.member_id.clone()
        };

        let counts = partition_counts(&self.topics, group);
        if counts != group.partitions {
            group.partitions = counts;
            changed = true;
        }
        if changed {
            retarget(group);
        }
        if hb.member_epoch == -1 {
            if group.members.is_empty() {
                group.empty_since = Some(now_ms());
            }
            return Ok(HeartbeatAnswer {
                member_id,
                member_epoch: -1,
                heartbeat_interval: self.config.heartbeat_interval,
                assignment: BTreeSet::new(),
            });
        }
        let assignment = reconcile(group, &member_id);
        let epoch = group.epoch;
        if let Some(m) = group.members.get_mut(&member_id) {
            m.epoch = epoch;
            if m.owned.is_subset(&m.current) {
                m.revoke_by = None;
            } else if m.revoke_by.is_none() {
                m.revoke_by = Some(now + self.config.rebalance_timeout);
            }
        }
        Ok(HeartbeatAnswer {
            member_id,
            member_epoch: epoch,
            heartbeat_interval: self.config.heartbeat_interval,
            assignment,
        })
    }

    fn check_member(&self, group: &str, member_id: &str, epoch: i32, tps: &[Tp]) -> Result<()> {
        let m = self
            .groups
            .get(group)
            .and_then(|g| g.members.get(member_id))
            .ok_or_else(|| fenced_unknown(group, member_id))?;
        if epoch > m.epoch {
            return Err(BrokerError::Fenced(format!(
                "member epoch {epoch} is ahead of the coordinator's {}",
                m.epoch
            )));
        }
        if let Some(tp) = tps
            .iter()
            .find(|tp| !m.current.contains(*tp) && !m.owned.contains(*tp))
        {
            return Err(BrokerError::Fenced(format!(
                "partition {}-{} is not assigned to member {member_id:?} of group {group:?}",
                tp.0, tp.1
            )));
        }
        Ok(())
    }

    async fn commit(
        &mut self,
        group: &str,
        member: Option<(String, i32)>,
        offsets: Vec<(Tp, Committed)>,
    ) -> Result<()> {
        if group.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "group id must not be empty".into(),
            ));
        }
        let tps: Vec<Tp> = offsets.iter().map(|(tp, _)| tp.clone()).collect();
        match &member {
            Some((id, epoch)) => self.check_member(group, id, *epoch, &tps)?,
            None => {
                let active = self.groups.get(group).map_or(0, |g| g.members.len());
                if active > 0 {
                    return Err(BrokerError::InvalidRequest(format!(
                        "group {group:?} has {active} active member(s): offsets can only be set from outside while it is empty"
                    )));
                }
            }
        }
        let md = self.topics.metadata();
        for (tp, _) in &offsets {
            md.topic(&tp.0)?.partition(i64::from(tp.1))?;
        }
        let entries: Vec<(Tp, Option<Committed>)> = offsets
            .iter()
            .map(|(tp, c)| (tp.clone(), Some(c.clone())))
            .collect();
        self.store.write(group, &entries).await?;
        let g = self.offsets.entry(group.to_string()).or_default();
        for (tp, c) in offsets {
            g.insert(tp, c);
        }
        Ok(())
    }

    fn describe(&self, group: &str) -> Result<GroupDescription> {
        let g = self.groups.get(group);
        let offsets = self.offsets.get(group);
        if g.is_none_or(|g| g.members.is_empty()) && offsets.is_none() {
            return Err(BrokerError::UnknownGroup(group.to_string()));
        }
        let empty = Group::default();
        let g = g.unwrap_or(&empty);
        let members: Vec<MemberDescription> = g
            .members
            .iter()
            .map(|(id, m)| MemberDescription {
                member_id: id.clone(),
                member_epoch: m.epoch,
                topics: m.topics.clone(),
                assignment: m.current.clone(),
                target: g.target.get(id).cloned().unwrap_or_default(),
            })
            .collect();
        let mut tps: BTreeSet<Tp> = offsets
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        for m in &members {
            tps.extend(m.assignment.iter().cloned());
        }
        let md = self.topics.metadata();
        let lags = tps
            .into_iter()
            .map(|tp| {
                let log_end_offset = md
                    .topic(&tp.0)
                    .ok()
                    .and_then(|t| t.partition(i64::from(tp.1)).ok())
                    .map_or(0, |p| p.state().high_watermark);
                let member_id = members
                    .iter()
                    .find(|m| m.assignment.contains(&tp))
                    .map(|m| m.member_id.clone());
                PartitionLag {
                    committed: offsets.and_then(|o| o.get(&tp)).map(|c| c.offset),
                    tp,
                    log_end_offset,
                    member_id,
                }
            })
            .collect();
        Ok(GroupDescription {
            group: group.to_string(),
            state: g.state(),
            epoch: g.epoch,
            assignor: g
                .assignor
                .map_or(DEFAULT_ASSIGNOR, Strategy::name)
                .to_string(),
            members,
            offsets: lags,
        })
    }

    async fn delete(&mut self, group: &str) -> Result<()> {
        let members = self.groups.get(group).map_or(0, |g| g.members.len());
        if members > 0 {
            return Err(BrokerError::InvalidRequest(format!(
                "group {group:?} has {members} active member(s); stop them before deleting it"
            )));
        }
        let Some(offsets) = self.offsets.get(group) else {
            return if self.groups.remove(group).is_some() {
                Ok(())
            } else {
                Err(BrokerError::UnknownGroup(group.to_string()))
            };
        };
        let tombstones: Vec<(Tp, Option<Committed>)> =
            offsets.keys().map(|tp| (tp.clone(), None)).collect();
        self.store.write(group, &tombstones).await?;
        self.offsets.remove(group);
        self.groups.remove(group);
        Ok(())
    }

    /// Removes members whose session ran out, and expires offsets of long-empty groups.
    async fn sweep(&mut self) {
        if !*self.active.borrow() {
            return;
        }
        let now = Instant::now();
        let topics = self.topics.clone();
        let md = topics.metadata();
        for (name, g) in &mut self.groups {
            // Pattern subscriptions follow topics as they are created and deleted.
            let mut resubscribed = false;
            for m in g.members.values_mut() {
                let now_topics = resolve(&m.explicit, m.pattern.as_ref(), &md);
                if now_topics != m.topics {
                    m.topics = now_topics;
                    resubscribed = true;
                }
            }
            let before = g.members.len();
            g.members.retain(|id, m| {
                if m.deadline <= now {
                    tracing::info!(group = %name, member = %id, "member removed: session timed out");
                    return false;
                }
                if m.revoke_by.is_some_and(|t| t <= now) {
                    tracing::info!(group = %name, member = %id, "member removed: it kept partitions past the rebalance timeout");
                    return false;
                }
                true
            });
            let counts = partition_counts(&topics, g);
            if g.members.len() != before
                || resubscribed
                || (!g.members.is_empty() && counts != g.partitions)
            {
                g.partitions = counts;
                retarget(g);
                if g.members.is_empty() {
                    g.empty_since = Some(now_ms());
                }
            }
        }
        // A group nobody is in and that committed nothing leaves no trace.
        let offsets = &self.offsets;
        self.groups
            .retain(|name, g| !g.members.is_empty() || offsets.contains_key(name));
        let retention = self.config.offsets_retention.as_millis() as i64;
        let now_ms = now_ms();
        let expired: Vec<String> = self
            .offsets
            .iter()
            .filter(|(name, offsets)| {
                let group = self.groups.get(*name);
                let empty = group.is_none_or(|g| g.members.is_empty());
                let last_commit = offsets.values().map(|c| c.timestamp).max().unwrap_or(0);
                let since = group
                    .and_then(|g| g.empty_since)
                    .unwrap_or(last_commit)
                    .max(last_commit);
                empty && now_ms.saturating_sub(since) >= retention
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in expired {
            tracing::info!(group = %name, "offsets expired: the group was empty for offsets.retention.minutes");
            if let Err(e) = self.delete(&name).await {
                tracing::warn!(group = %name, error = %e, "could not expire offsets");
            }
        }
        let live: u64 = self.offsets.values().map(|g| g.len() as u64).sum();
        if self.store.records().saturating_sub(live) >= self.config.compact_after_records {
            if let Err(e) = self.store.compact(&self.offsets).await {
                tracing::warn!(error = %e, "compacting the offsets topic failed; will retry");
            }
        }
    }
}

/// A subscription resolved against the topics that exist: the names given, and every
/// non-internal topic the pattern matches whole.
fn resolve(
    explicit: &BTreeSet<String>,
    pattern: Option<&regex::Regex>,
    md: &crate::topic::manager::Metadata,
) -> BTreeSet<String> {
    let mut out = explicit.clone();
    if let Some(p) = pattern {
        out.extend(
            md.topics
                .keys()
                .filter(|t| !t.starts_with("__") && p.is_match(t))
                .cloned(),
        );
    }
    out
}

/// Partition counts of every topic some member subscribes to (unknown topics left out).
fn partition_counts(topics: &Topics, g: &Group) -> BTreeMap<String, u32> {
    let md = topics.metadata();
    g.members
        .values()
        .flat_map(|m| m.topics.iter())
        .filter_map(|t| {
            md.topic(t)
                .ok()
                .map(|s| (t.clone(), s.partitions.len() as u32))
        })
        .collect()
}

/// A new group epoch and target assignment.
fn retarget(g: &mut Group) {
    g.epoch += 1;
    let subs: BTreeMap<String, BTreeSet<String>> = g
        .members
        .iter()
        .map(|(id, m)| (id.clone(), m.topics.clone()))
        .collect();
    let strategy = g.assignor.unwrap_or(Strategy::Sticky);
    g.target = assign(strategy, &subs, &g.partitions, &g.target);
}

/// What `member` may consume now: its target, less partitions another member still
/// holds (it has not let them go yet).
fn reconcile(g: &mut Group, member: &str) -> BTreeSet<Tp> {
    let target = g.target.get(member).cloned().unwrap_or_default();
    let held_by_others: BTreeSet<&Tp> = g
        .members
        .iter()
        .filter(|(id, _)| id.as_str() != member)
        .flat_map(|(_, m)| m.owned.iter().chain(m.current.iter()))
        .collect();
    let now: BTreeSet<Tp> = target
        .into_iter()
        .filter(|tp| !held_by_others.contains(tp))
        .collect();
    if let Some(m) = g.members.get_mut(member) {
        m.current = now.clone();
    }
    now
}
