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

/// Which groups this broker coordinates: those hashing to the offsets partitions it
/// leads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leading {
    /// Partitions of `__consumer_offsets` (0 while it does not exist).
    pub partitions: u32,
    /// The ones this broker leads.
    pub led: BTreeSet<u32>,
}

impl Leading {
    /// Every partition of a topic with `partitions` partitions.
    pub fn all(partitions: u32) -> Leading {
        Leading {
            partitions,
            led: (0..partitions).collect(),
        }
    }

    /// Whether `group` hashes to a partition this broker leads.
    pub fn coordinates(&self, group: &str) -> bool {
        self.partitions > 0
            && self
                .led
                .contains(&super::offsets_partition(group, self.partitions))
    }
}

/// A group's committed offsets, per partition asked (`None`: nothing committed).
type GroupOffsets = Vec<(Tp, Option<Committed>)>;

enum Command {
    Lead(Leading, oneshot::Sender<Result<()>>),
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
        reply: oneshot::Sender<Result<GroupOffsets>>,
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
    /// Compact a partition of `__consumer_offsets` once it holds this many more
    /// records than there are live offsets in it.
    pub compact_after_records: u64,
    /// Partitions `__consumer_offsets` is created with on a single broker.
    pub offsets_partitions: u32,
}

/// A cloneable handle to the coordinator task.
#[derive(Debug, Clone)]
pub struct GroupCoordinator {
    tx: mpsc::Sender<Command>,
    leading: watch::Receiver<Leading>,
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
    /// The groups this broker coordinates now (all, on a single broker).
    leading: watch::Sender<Leading>,
}

impl GroupCoordinator {
    /// Opens the offsets topic, replays it, and starts the coordinator task.
    pub async fn start(topics: Topics, config: CoordinatorConfig) -> Result<GroupCoordinator> {
        let store = OffsetStore::open(topics.clone(), config.offsets_partitions).await?;
        let leading = Leading::all(store.partitions());
        let mut offsets = OffsetMap::new();
        for p in &leading.led {
            offsets.extend(store.load(*p).await?);
        }
        Ok(Self::spawn(topics, config, store, offsets, leading))
    }

    /// A coordinator in a cluster: idle until [`GroupCoordinator::set_leading`] says
    /// which partitions of the replicated offsets topic this broker leads.
    pub fn start_in_cluster(topics: Topics, config: CoordinatorConfig) -> GroupCoordinator {
        let store = OffsetStore::attach(topics.clone());
        Self::spawn(topics, config, store, OffsetMap::new(), Leading::default())
    }

    fn spawn(
        topics: Topics,
        config: CoordinatorConfig,
        store: OffsetStore,
        offsets: OffsetMap,
        leading: Leading,
    ) -> GroupCoordinator {
        let (tx, rx) = mpsc::channel(1024);
        let (leading_tx, leading_rx) = watch::channel(leading);
        let c = Coordinator {
            config,
            topics,
            store,
            groups: BTreeMap::new(),
            offsets,
            leading: leading_tx,
        };
        tokio::spawn(c.run(rx));
        GroupCoordinator {
            tx,
            leading: leading_rx,
        }
    }

    /// Whether this broker coordinates `group` now.
    pub fn coordinates(&self, group: &str) -> bool {
        self.leading.borrow().coordinates(group)
    }

    /// Takes over the groups of newly led offsets partitions (replaying the offsets
    /// this replica holds) and hands over those of partitions no longer led
    /// (forgetting their groups and offsets). Fails if a partition could not be
    /// replayed; the others are taken over, and a later call retries it.
    pub async fn set_leading(&self, leading: Leading) -> Result<()> {
        self.call(|r| Command::Lead(leading, r)).await?
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
        .await?
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
            Command::Lead(wanted, reply) => {
                let _ = reply.send(self.lead(wanted).await);
            }
            Command::Heartbeat(hb, reply) => {
                let r = self.owns(&hb.group).and_then(|()| self.heartbeat(hb));
                let _ = reply.send(r);
            }
            Command::Commit {
                group,
                member,
                offsets,
                reply,
            } => {
                let r = match self.owns(&group) {
                    Ok(()) => self.commit(&group, member, offsets).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::FetchOffsets {
                group,
                partitions,
                reply,
            } => {
                if let Err(e) = self.owns(&group) {
                    let _ = reply.send(Err(e));
                    return;
                }
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
                let _ = reply.send(Ok(out));
            }
            Command::CheckFetch {
                group,
                member_id,
                member_epoch,
                partitions,
                reply,
            } => {
                let r = self.owns(&group).and_then(|()| {
                    self.check_member(&group, &member_id, member_epoch, &partitions)
                });
                let _ = reply.send(r);
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
                let r = self.owns(&group).and_then(|()| self.describe(&group));
                let _ = reply.send(r);
            }
            Command::Delete(group, reply) => {
                let r = match self.owns(&group) {
                    Ok(()) => self.delete(&group).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
        }
    }

    /// Fails with `NotCoordinator` unless `group` hashes to a partition led here; the
    /// service edge names the coordinator, this only closes the race with a handover.
    fn owns(&self, group: &str) -> Result<()> {
        if self.leading.borrow().coordinates(group) {
            return Ok(());
        }
        Err(BrokerError::NotCoordinator {
            group: group.to_string(),
            coordinator: None,
            address: None,
        })
    }

    async fn lead(&mut self, wanted: Leading) -> Result<()> {
        let mut now = self.leading.borrow().clone();
        if now.partitions != wanted.partitions {
            // Groups hash differently now: start over.
            now = Leading {
                partitions: wanted.partitions,
                led: BTreeSet::new(),
            };
        }
        let n = wanted.partitions;
        let keep = |g: &String| wanted.led.contains(&super::offsets_partition(g, n));
        // Members of handed-over groups rejoin at the new coordinator, which replays
        // their offsets.
        self.groups.retain(|g, _| keep(g));
        self.offsets.retain(|g, _| keep(g));
        now.led.retain(|p| wanted.led.contains(p));
        let mut result = Ok(());
        for &p in wanted.led.difference(&now.led.clone()) {
            match self.store.load(p).await {
                Ok(offsets) => {
                    self.offsets.extend(offsets);
                    now.led.insert(p);
                }
                Err(e) => result = Err(e),
            }
        }
        tracing::info!(partitions = ?now.led, ok = result.is_ok(), "group coordinator leads offsets partitions");
        self.leading.send_replace(now);
        result
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
        let leading = self.leading.borrow().clone();
        if leading.led.is_empty() {
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
        let n = leading.partitions;
        let mut live_per_partition: BTreeMap<u32, u64> = BTreeMap::new();
        for (g, o) in &self.offsets {
            *live_per_partition
                .entry(super::offsets_partition(g, n))
                .or_default() += o.len() as u64;
        }
        for &p in &leading.led {
            let count = live_per_partition.get(&p).copied().unwrap_or(0);
            if self.store.records(p).saturating_sub(count) >= self.config.compact_after_records {
                let live: OffsetMap = self
                    .offsets
                    .iter()
                    .filter(|(g, _)| super::offsets_partition(g, n) == p)
                    .map(|(g, o)| (g.clone(), o.clone()))
                    .collect();
                if let Err(e) = self.store.compact(p, &live).await {
                    tracing::warn!(partition = p, error = %e, "compacting the offsets topic failed; will retry");
                }
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
