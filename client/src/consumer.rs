//! `Consumer`: assign partitions yourself (`assign`, `seek`), or join a consumer group
//! (`subscribe`) and let the group's coordinator spread partitions over its members.
//!
//! ## Delivery guarantees in a group
//!
//! A group remembers, per partition, the committed offset: where a member that takes
//! the partition over starts. When you commit decides what a crash costs:
//!
//! - **At-least-once** (the default): commit *after* processing. Auto-commit does this:
//!   every `auto_commit_interval`, and when a partition is taken away or the consumer
//!   closes, `poll` commits the positions of records it already returned. A crash
//!   between processing and the next commit replays those records to the next owner.
//! - **At-most-once**: turn auto-commit off and call `commit_sync` right after `poll`
//!   returns, *before* processing. A crash then loses the records being processed, but
//!   never delivers one twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_log_store::{BatchIter, Header};
use sluice_proto::v1::group_service_client::GroupServiceClient;
use sluice_proto::v1::{CommitOffsetsRequest, FetchOffsetsRequest, OffsetCommit};
use sluice_proto::v1::{FetchPartition, FetchRequest, FetchResponse};
use sluice_proto::ErrorReason;
use tonic::transport::Channel;

use crate::admin::{to_i32, Admin, OffsetSpec};
use crate::connection::connect_first;
use crate::error::{ClientError, Result};
use crate::fetch_stream::Streams;
use crate::group::{at_coordinator, to_wire, Membership};
use crate::routes::Routes;

/// Where to start when a partition has no valid position (`auto.offset.reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// The oldest record still kept.
    Earliest,
    /// Only records written from now on (the default, as in Kafka).
    Latest,
    /// Fail with the out-of-range error.
    None,
}

/// Most bytes the consumer asks one answer for. Answers follow each other on the
/// fetch stream without a request between them, so a larger one saves no round trip,
/// while each is received into memory of its own, and the larger it is the more of that
/// memory is pages the process has not touched yet: one consumer of 8 partitions read
/// 4.9-6.5 M records/s with answers of up to 32 MiB (0.37-0.54 s of system time per
/// 5 M records, mostly page faults) against 6.4-8.5 M with 2 MiB (0.11-0.16 s), and
/// one partition read as fast either way (docs/benchmarks-history.md).
pub const ANSWER_BYTES: u32 = 2 << 20;

/// Consumer settings, with Kafka's names.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Brokers, `host:port,host:port`.
    pub brokers: String,
    /// `auto.offset.reset` (default latest).
    pub auto_offset_reset: OffsetReset,
    /// `fetch.min.bytes` (default 1).
    pub fetch_min_bytes: u32,
    /// `fetch.max.wait.ms` (default 500 ms).
    pub fetch_max_wait: Duration,
    /// `max.partition.fetch.bytes` (default 1 MiB).
    pub max_partition_fetch_bytes: u32,
    /// `fetch.max.bytes` (default 50 MiB, as Kafka's); an answer carries at most
    /// `ANSWER_BYTES` (2 MiB) whatever this says, besides a first batch larger than that.
    pub fetch_max_bytes: u32,
    /// `group.id`: needed for `subscribe` and commits.
    pub group_id: Option<String>,
    /// `group.remote.assignor`: range, roundrobin or sticky (default sticky); every
    /// member of a group must ask for the same one.
    pub group_assignor: String,
    /// `enable.auto.commit` (default true): `poll` commits what it returned, see the
    /// module docs.
    pub enable_auto_commit: bool,
    /// `auto.commit.interval.ms` (default 5 s).
    pub auto_commit_interval: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            brokers: crate::connection::DEFAULT_BROKERS.to_string(),
            auto_offset_reset: OffsetReset::Latest,
            fetch_min_bytes: 1,
            fetch_max_wait: Duration::from_millis(500),
            max_partition_fetch_bytes: 1 << 20,
            fetch_max_bytes: 50 << 20,
            group_id: None,
            group_assignor: "sticky".to_string(),
            enable_auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
        }
    }
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic (shared by all records of a fetch).
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Timestamp (ms).
    pub timestamp: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
}

/// A topic and partition.
pub type TopicPartition = (String, u32);

/// Called with (revoked, assigned) partitions when a group changes this member's share.
pub type AssignmentListener = Box<dyn FnMut(&[TopicPartition], &[TopicPartition]) + Send>;

/// Reads assigned partitions from positions it keeps.
pub struct Consumer {
    config: ConsumerConfig,
    channel: Channel,
    /// Where group traffic goes: the broker the consumer connected to, until a
    /// NOT_COORDINATOR answer names the group's coordinator.
    groups_addr: String,
    /// Partition leaders: fetches and offset look-ups go to them.
    routes: Routes,
    groups: GroupServiceClient<Channel>,
    membership: Option<Membership>,
    listener: Option<AssignmentListener>,
    last_commit: std::time::Instant,
    admin: Admin,
    /// Assigned partitions and their next offsets (`None`: reset before fetching).
    positions: BTreeMap<TopicPartition, Option<u64>>,
    /// High watermarks seen in the last fetch.
    high_watermarks: BTreeMap<TopicPartition, u64>,
    /// One fetch call per broker, answered as records arrive.
    streams: Streams,
}

/// A fetch's answer, decoded.
#[derive(Debug, Default)]
struct Fetched {
    records: Vec<ConsumerRecord>,
    /// Per partition that answered: the next position and the high watermark.
    progress: Vec<(TopicPartition, u64, u64)>,
    /// Partitions whose position is gone, to be reset by `auto.offset.reset`.
    out_of_range: Vec<TopicPartition>,
    /// Partitions the broker asked does not lead, with the leader it named.
    not_led: Vec<(TopicPartition, Option<String>)>,
}

/// Checks and decodes a fetch's batches, keeping records at or after each partition's
/// position in `want` (sorted, as `Consumer::wanted` gives it).
fn decode(
    resp: FetchResponse,
    want: &[(TopicPartition, u64)],
    reset: OffsetReset,
) -> Result<Fetched> {
    let mut fetched = Fetched::default();
    for p in resp.partitions {
        let tp = (p.topic, p.partition.max(0) as u32);
        if let Some(e) = &p.error {
            let err = ClientError::from(e);
            if err.reason() == Some(ErrorReason::OffsetOutOfRange) && reset != OffsetReset::None {
                fetched.out_of_range.push(tp);
                continue;
            }
            if err.reason() == Some(ErrorReason::NotLeader) {
                let leader = err.metadata_str("leader_address").map(str::to_string);
                fetched.not_led.push((tp, leader));
                continue;
            }
            return Err(err);
        }
        let Ok(i) = want.binary_search_by(|(t, _)| t.cmp(&tp)) else {
            continue;
        };
        let mut position = want[i].1;
        let topic: Arc<str> = Arc::from(tp.0.as_str());
        for batch in BatchIter::new(p.records) {
            let batch = batch?;
            if batch.header().last_offset() < position {
                continue;
            }
            if !batch.crc_ok() {
                return Err(ClientError::Batch(format!(
                    "batch at offset {} of {}-{} failed its CRC check",
                    batch.header().base_offset,
                    tp.0,
                    tp.1
                )));
            }
            // The count comes off the wire: bounded by what the bytes could hold.
            let count = (batch.header().record_count as usize).min(batch.bytes().len() / 8);
            fetched.records.reserve(count);
            let records = &mut fetched.records;
            batch.for_each_record(|r| {
                if r.offset < position {
                    return;
                }
                position = r.offset + 1;
                records.push(ConsumerRecord {
                    topic: Arc::clone(&topic),
                    partition: tp.1,
                    offset: r.offset,
                    timestamp: r.timestamp,
                    key: r.key,
                    value: r.value,
                    headers: r.headers,
                });
            })?;
        }
        fetched
            .progress
            .push((tp, position, p.high_watermark.max(0) as u64));
    }
    Ok(fetched)
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.config)
            .field("positions", &self.positions)
            .field("group", &self.membership.as_ref().map(Membership::group))
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Connects to the first reachable broker.
    pub async fn connect(config: ConsumerConfig) -> Result<Consumer> {
        let (home, channel) = connect_first(&config.brokers).await?;
        Ok(Consumer {
            routes: Routes::new(&config.brokers, home.clone(), channel.clone()),
            groups_addr: home,
            groups: GroupServiceClient::new(channel.clone()),
            admin: Admin::with_channel(channel.clone()),
            channel,
            membership: None,
            listener: None,
            last_commit: std::time::Instant::now(),
            config,
            positions: BTreeMap::new(),
            high_watermarks: BTreeMap::new(),
            streams: Streams::new(),
        })
    }

    /// Reads exactly these partitions from now on; positions of partitions kept stay.
    pub fn assign(&mut self, partitions: impl IntoIterator<Item = TopicPartition>) {
        let mut next = BTreeMap::new();
        for tp in partitions {
            let pos = self.positions.get(&tp).copied().flatten();
            next.insert(tp, pos);
        }
        self.positions = next;
    }

    /// Every partition of `topic`, assigned.
    pub async fn assign_topic(&mut self, topic: &str) -> Result<()> {
        let d = self.admin.describe_topic(topic).await?;
        self.assign((0..d.partitions.len() as u32).map(|p| (topic.to_string(), p)));
        Ok(())
    }

    /// Joins the consumer group `group_id` subscribed to `topics`; the group's
    /// coordinator then decides which of their partitions this consumer reads, and
    /// changes that as members come and go. Replaces any manual assignment.
    pub fn subscribe<I, S>(&mut self, topics: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let group = self.subscribing_group()?;
        let topics: std::collections::BTreeSet<String> =
            topics.into_iter().map(Into::into).collect();
        if topics.is_empty() {
            return Err(ClientError::InvalidArgument(
                "subscribe needs at least one topic".into(),
            ));
        }
        self.join_group(group, topics, String::new());
        Ok(())
    }

    /// Like [`Consumer::subscribe`], for every topic whose whole name matches the
    /// regular expression `pattern`, now and as topics are created (internal topics
    /// never match). The broker checks the pattern; a bad one fails the next `poll`.
    pub fn subscribe_pattern(&mut self, pattern: &str) -> Result<()> {
        let group = self.subscribing_group()?;
        if pattern.is_empty() {
            return Err(ClientError::InvalidArgument(
                "the subscription pattern is empty".into(),
            ));
        }
        self.join_group(group, Default::default(), pattern.to_string());
        Ok(())
    }

    fn join_group(
        &mut self,
        group: String,
        topics: std::collections::BTreeSet<String>,
        pattern: String,
    ) {
        match &self.membership {
            Some(m) => m.subscribe(topics, pattern),
            None => {
                self.positions.clear();
                self.membership = Some(Membership::join(
                    self.channel.clone(),
                    group,
                    self.config.group_assignor.clone(),
                    topics,
                    pattern,
                    self.config.brokers.clone(),
                ));
            }
        }
    }

    /// Calls `listener(revoked, assigned)` whenever the group changes this member's
    /// partitions (from inside `poll`, after revoked partitions were committed when
    /// auto-commit is on).
    pub fn on_assignment_change(
        &mut self,
        listener: impl FnMut(&[TopicPartition], &[TopicPartition]) + Send + 'static,
    ) {
        self.listener = Some(Box::new(listener));
    }

    /// Commits the position of every partition this consumer reads, and waits until the
    /// commit is durable.
    pub async fn commit_sync(&mut self) -> Result<()> {
        let offsets = self.current_positions();
        self.commit_offsets(&offsets).await
    }

    /// Starts committing every current position and returns at once; the handle tells
    /// how it went.
    pub fn commit_async(&mut self) -> tokio::task::JoinHandle<Result<()>> {
        let request = self.commit_request(&self.current_positions());
        let mut client = self.groups.clone();
        let bootstrap = self.config.brokers.clone();
        self.last_commit = std::time::Instant::now();
        tokio::spawn(async move {
            match request {
                Some(r) => {
                    let r = r?;
                    at_coordinator(&mut client, &bootstrap, |mut c| {
                        let r = r.clone();
                        async move { c.commit_offsets(r).await }
                    })
                    .await
                    .map(drop)
                }
                None => Ok(()),
            }
        })
    }

    /// Commits these offsets (the next offset to read, per partition).
    pub async fn commit_offsets(&mut self, offsets: &[(TopicPartition, u64)]) -> Result<()> {
        self.last_commit = std::time::Instant::now();
        match self.commit_request(offsets) {
            Some(r) => {
                let r = r?;
                at_coordinator(&mut self.groups, &self.config.brokers, |mut c| {
                    let r = r.clone();
                    async move { c.commit_offsets(r).await }
                })
                .await?;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// The group's committed offsets for `partitions` (`None` where nothing is committed).
    pub async fn committed(&mut self, partitions: &[TopicPartition]) -> Result<Vec<Option<u64>>> {
        let group = self.group_id()?;
        let set: std::collections::BTreeSet<TopicPartition> = partitions.iter().cloned().collect();
        let request = FetchOffsetsRequest {
            group_id: group,
            partitions: to_wire(&set),
        };
        let resp = at_coordinator(&mut self.groups, &self.config.brokers, |mut c| {
            let r = request.clone();
            async move { c.fetch_offsets(r).await }
        })
        .await?;
        let found: BTreeMap<TopicPartition, u64> = resp
            .offsets
            .into_iter()
            .filter_map(|o| {
                let offset = u64::try_from(o.offset).ok()?;
                Some(((o.topic, u32::try_from(o.partition).ok()?), offset))
            })
            .collect();
        Ok(partitions.iter().map(|tp| found.get(tp).copied()).collect())
    }

    /// Commits (with auto-commit on) and leaves the group, so its partitions move to the
    /// other members at once rather than after the session timeout.
    pub async fn close(mut self) -> Result<()> {
        self.streams.clear();
        let committed = if self.membership.is_some() && self.config.enable_auto_commit {
            self.commit_sync().await
        } else {
            Ok(())
        };
        if let Some(m) = self.membership.take() {
            m.leave().await?;
        }
        committed
    }

    fn subscribing_group(&self) -> Result<String> {
        self.config.group_id.clone().ok_or_else(|| {
            ClientError::InvalidArgument("subscribe needs a group_id in the consumer config".into())
        })
    }

    fn group_id(&self) -> Result<String> {
        self.config
            .group_id
            .clone()
            .ok_or_else(|| ClientError::InvalidArgument("committed offsets need a group_id".into()))
    }

    fn current_positions(&self) -> Vec<(TopicPartition, u64)> {
        self.positions
            .iter()
            .filter_map(|(tp, p)| p.map(|p| (tp.clone(), p)))
            .collect()
    }

    /// The commit request for `offsets`, or `None` when there is nothing to commit.
    fn commit_request(
        &self,
        offsets: &[(TopicPartition, u64)],
    ) -> Option<Result<CommitOffsetsRequest>> {
        if offsets.is_empty() {
            return None;
        }
        let group = match self.group_id() {
            Ok(g) => g,
            Err(e) => return Some(Err(e)),
        };
        let member = self.membership.as_ref().map(Membership::member_ref);
        let offsets = offsets
            .iter()
            .map(|((topic, partition), offset)| OffsetCommit {
                topic: topic.clone(),
                partition: *partition as i32,
                offset: *offset as i64,
                metadata: String::new(),
            })
            .collect();
        Some(Ok(CommitOffsetsRequest {
            group_id: group,
            member_id: member
                .as_ref()
                .map(|m| m.member_id.clone())
                .unwrap_or_default(),
            member_epoch: member.map_or(0, |m| m.member_epoch),
            offsets,
        }))
    }

    /// Adopts the group's latest assignment: commits and drops what was taken away,
    /// starts what was given from its committed offset, and tells the coordinator.
    async fn follow_group(&mut self) -> Result<()> {
        let Some(m) = &self.membership else {
            return Ok(());
        };
        if let Some(addr) = m.coordinator() {
            if addr != self.groups_addr {
                // The heartbeat task found the group's coordinator elsewhere: commits and
                // membership-checked fetches go there too.
                self.groups = GroupServiceClient::new(self.routes.channel(&addr)?);
                self.groups_addr = addr;
            }
        }
        if let Some(e) = m.take_error() {
            // Retriable trouble (a broker restarting) and fencing are handled by the
            // heartbeat task; anything else is the caller's to see.
            if !e.is_retriable()
                && e.reason() != Some(ErrorReason::Fenced)
                && !matches!(e, ClientError::Rpc { .. } | ClientError::Connect { .. })
            {
                return Err(e);
            }
        }
        let Some(target) = m.assignment() else {
            return Ok(());
        };
        let owned: std::collections::BTreeSet<TopicPartition> =
            self.positions.keys().cloned().collect();
        if target == owned {
            return Ok(());
        }
        let revoked: Vec<TopicPartition> = owned.difference(&target).cloned().collect();
        let added: Vec<TopicPartition> = target.difference(&owned).cloned().collect();
        if !revoked.is_empty() && self.config.enable_auto_commit {
            let offsets: Vec<(TopicPartition, u64)> = revoked
                .iter()
                .filter_map(|tp| {
                    self.positions
                        .get(tp)
                        .copied()
                        .flatten()
                        .map(|p| (tp.clone(), p))
                })
                .collect();
            if let Err(e) = self.commit_offsets(&offsets).await {
                // The partitions are going either way; the next owner replays from the
                // last successful commit (at-least-once).
                tracing::warn!(error = %e, "committing revoked partitions failed");
            }
        }
        for tp in &revoked {
            self.positions.remove(tp);
            self.high_watermarks.remove(tp);
        }
        if !added.is_empty() {
            let committed = self.committed(&added).await?;
            for (tp, c) in added.iter().zip(committed) {
                self.positions.insert(tp.clone(), c);
            }
        }
        if let Some(m) = &self.membership {
            m.set_owned(target);
        }
        if let Some(listener) = self.listener.as_mut() {
            listener(&revoked, &added);
        }
        Ok(())
    }

    /// The assigned partitions.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.positions.keys().cloned().collect()
    }

    /// Sets the next offset to read.
    pub fn seek(&mut self, tp: &TopicPartition, offset: u64) -> Result<()> {
        match self.positions.get_mut(tp) {
            Some(p) => {
                *p = Some(offset);
                Ok(())
            }
            None => Err(ClientError::InvalidArgument(format!(
                "{}-{} is not assigned",
                tp.0, tp.1
            ))),
        }
    }

    async fn seek_all(&mut self, spec: OffsetSpec) -> Result<()> {
        let tps: Vec<_> = self.positions.keys().cloned().collect();
        let left = self.locate(tps, spec).await?;
        if let Some((t, p)) = left.first() {
            return Err(ClientError::Broker {
                reason: ErrorReason::NotLeader,
                code: tonic::Code::Unavailable,
                message: format!("no leader answered for {t}-{p}"),
                metadata: Default::default(),
            });
        }
        Ok(())
    }

    /// Moves every assigned partition to its oldest record.
    pub async fn seek_to_beginning(&mut self) -> Result<()> {
        self.seek_all(OffsetSpec::Earliest).await
    }

    /// Moves every assigned partition to its end (only new records will be read).
    pub async fn seek_to_end(&mut self) -> Result<()> {
        self.seek_all(OffsetSpec::Latest).await
    }

    /// Moves every assigned partition to its first record at or after `timestamp_ms`.
    pub async fn seek_to_timestamp(&mut self, timestamp_ms: i64) -> Result<()> {
        self.seek_all(OffsetSpec::Timestamp(timestamp_ms)).await
    }

    /// The next offset to be read from `tp`, if known.
    pub fn position(&self, tp: &TopicPartition) -> Option<u64> {
        self.positions.get(tp).copied().flatten()
    }

    /// The high watermark of `tp` from the last fetch.
    pub fn high_watermark(&self, tp: &TopicPartition) -> Option<u64> {
        self.high_watermarks.get(tp).copied()
    }

    async fn reset(&mut self, tps: Vec<TopicPartition>) -> Result<()> {
        let spec = match self.config.auto_offset_reset {
            OffsetReset::Earliest => OffsetSpec::Earliest,
            OffsetReset::Latest => OffsetSpec::Latest,
            OffsetReset::None => {
                return Err(ClientError::InvalidArgument(format!(
                    "no position for {} partition(s) and auto_offset_reset is none",
                    tps.len()
                )))
            }
        };
        // Those still without a leader are reset again at the next poll.
        self.locate(tps, spec).await.map(drop)
    }

    /// Sets the positions of `tps` to the offsets `spec` names, asking each partition's
    /// leader; a NOT_LEADER answer names the next one to ask (a few hops at most, while
    /// an election settles). Returns the partitions no leader answered for.
    async fn locate(
        &mut self,
        tps: Vec<TopicPartition>,
        spec: OffsetSpec,
    ) -> Result<Vec<TopicPartition>> {
        let mut left = tps;
        for _ in 0..5 {
            let mut by_leader: BTreeMap<String, Vec<TopicPartition>> = BTreeMap::new();
            for tp in left.drain(..) {
                by_leader
                    .entry(self.routes.address(&tp).to_string())
                    .or_default()
                    .push(tp);
            }
            for (addr, tps) in by_leader {
                let admin = Admin::with_channel(self.routes.channel(&addr)?);
                let queries: Vec<_> = tps.iter().map(|(t, p)| (t.clone(), *p, spec)).collect();
                match admin.list_offsets_each(&queries).await {
                    Ok(answers) => {
                        for (tp, answer) in tps.into_iter().zip(answers) {
                            match answer {
                                Ok((offset, _)) => {
                                    self.positions.insert(tp, Some(offset));
                                }
                                Err(e) if e.reason() == Some(ErrorReason::NotLeader) => {
                                    self.routes
                                        .learn(tp.clone(), e.metadata_str("leader_address"));
                                    left.push(tp);
                                }
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    Err(e) if e.is_retriable() && e.reason().is_none() => {
                        self.routes.down(&addr);
                        left.extend(tps);
                    }
                    Err(e) => return Err(e),
                }
            }
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(left)
    }

    /// Fetches the next records of the assigned partitions, waiting at most `timeout` for
    /// some to arrive. An empty result means none arrived in time.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        self.follow_group().await?;
        if let Some(m) = &self.membership {
            if self.positions.is_empty() {
                // Nothing assigned yet (or now): wait for the coordinator's answer.
                m.wait_for_assignment(timeout).await;
                self.follow_group().await?;
                if self.positions.is_empty() {
                    return Ok(Vec::new());
                }
            }
            if self.config.enable_auto_commit
                && self.last_commit.elapsed() >= self.config.auto_commit_interval
            {
                let done = self.commit_async();
                drop(done);
            }
        }
        match self.poll_assigned(timeout).await {
            Err(e) if e.reason() == Some(ErrorReason::Fenced) && self.membership.is_some() => {
                tracing::warn!(error = %e, "fenced while fetching; joining the group again");
                if let Some(m) = &self.membership {
                    m.rejoin();
                }
                self.positions.clear();
                self.streams.clear();
                Ok(Vec::new())
            }
            other => other,
        }
    }

    async fn poll_assigned(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        let unknown: Vec<_> = self
            .positions
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(tp, _)| tp.clone())
            .collect();
        if !unknown.is_empty() {
            self.reset(unknown).await?;
        }
        if self.positions.is_empty() {
            self.streams.clear();
            tokio::time::sleep(timeout).await;
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let requests = self.requests(&self.wanted(), self.config.fetch_max_wait)?;
        let leaders: BTreeSet<String> = requests.iter().map(|(a, _, _)| a.clone()).collect();
        self.streams.retain(&leaders);
        for (addr, channel, request) in requests {
            self.streams.ask(&addr, channel, request);
        }
        let Some((addr, answer)) = self.streams.next(deadline).await else {
            return Ok(Vec::new());
        };
        let (resp, want) = match answer {
            Ok(answered) => answered,
            Err(status) => {
                let err = ClientError::from(status);
                if err.reason().is_none() && err.is_retriable() {
                    // Its partitions are asked elsewhere next time.
                    tracing::debug!(broker = %addr, error = %err, "fetch failed; routing around it");
                    self.routes.down(&addr);
                    tokio::time::sleep_until(
                        deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                    )
                    .await;
                    return Ok(Vec::new());
                }
                return Err(err);
            }
        };
        let fetched = decode(resp, &want, self.config.auto_offset_reset)?;
        let redirected = !fetched.not_led.is_empty();
        for (tp, leader) in &fetched.not_led {
            self.routes.learn(tp.clone(), leader.as_deref());
        }
        if redirected && fetched.records.is_empty() {
            // Asked the wrong broker (an election may be running): do not spin.
            tokio::time::sleep(Duration::from_millis(50).min(timeout)).await;
        }
        for (tp, position, high_watermark) in fetched.progress {
            self.high_watermarks.insert(tp.clone(), high_watermark);
            if let Some(p) = self.positions.get_mut(&tp) {
                *p = Some(position);
            }
        }
        if !fetched.out_of_range.is_empty() {
            self.reset(fetched.out_of_range).await?;
        }
        Ok(fetched.records)
    }

    /// Every assigned partition with a known position, in order.
    fn wanted(&self) -> Vec<(TopicPartition, u64)> {
        self.positions
            .iter()
            .filter_map(|(tp, pos)| pos.map(|p| (tp.clone(), p)))
            .collect()
    }

    /// One fetch request per broker leading some of `want`.
    fn requests(
        &mut self,
        want: &[(TopicPartition, u64)],
        wait: Duration,
    ) -> Result<Vec<(String, Channel, FetchRequest)>> {
        let mut by_leader: BTreeMap<String, Vec<FetchPartition>> = BTreeMap::new();
        for ((topic, partition), offset) in want {
            let addr = self
                .routes
                .address(&(topic.clone(), *partition))
                .to_string();
            by_leader.entry(addr).or_default().push(FetchPartition {
                topic: topic.clone(),
                partition: to_i32(*partition)?,
                fetch_offset: *offset as i64,
                partition_max_bytes: self.config.max_partition_fetch_bytes,
            });
        }
        let mut out = Vec::with_capacity(by_leader.len());
        for (addr, partitions) in by_leader {
            let channel = self.routes.channel(&addr)?;
            // The group's coordinator checks membership on the fetches it serves; other
            // brokers do not know the group.
            let member = if addr == self.groups_addr {
                self.membership.as_ref().map(Membership::member_ref)
            } else {
                None
            };
            out.push((
                addr,
                channel,
                FetchRequest {
                    partitions,
                    max_wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
                    min_bytes: self.config.fetch_min_bytes,
                    // Not 0, which the broker takes as "not set" (its default, 50 MiB).
                    max_bytes: self.config.fetch_max_bytes.clamp(1, ANSWER_BYTES),
                    member,
                    request_id: 0,
                },
            ));
        }
        Ok(out)
    }
}
