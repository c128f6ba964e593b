//! Group membership for a [`crate::Consumer`]: a background task heartbeats to the
//! coordinator and keeps the latest assignment; the consumer adopts it in `poll` and
//! reports back what it owns, so a partition taken from it can move on.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sluice_proto::v1::group_service_client::GroupServiceClient;
use sluice_proto::v1::{GroupMemberRef, HeartbeatRequest, TopicPartitions};
use sluice_proto::ErrorReason;
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::connection::{connect_first, endpoint};
use crate::consumer::TopicPartition;
use crate::error::{ClientError, Result};

/// What the heartbeat task and the consumer share.
#[derive(Debug, Default)]
struct MemberState {
    member_id: String,
    epoch: i32,
    topics: BTreeSet<String>,
    /// A regular expression subscribing every topic whose whole name matches.
    pattern: String,
    /// The coordinator's latest answer (`None` before the first).
    assignment: Option<BTreeSet<TopicPartition>>,
    /// What the consumer has adopted.
    owned: BTreeSet<TopicPartition>,
    /// The last heartbeat error, for `poll` to surface when it cannot go on.
    error: Option<ClientError>,
    /// The coordinator's address, once a NOT_COORDINATOR answer named it.
    coordinator: Option<String>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<MemberState>,
    /// Wakes the heartbeat task early (owned partitions or subscription changed).
    wake: Notify,
    /// Wakes `poll` when a new assignment arrives.
    assigned: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, MemberState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One consumer's membership in one group.
#[derive(Debug)]
pub(crate) struct Membership {
    group: String,
    assignor: String,
    client: GroupServiceClient<Channel>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs a group call on `client`; when the broker answers that it does not coordinate
/// the group and names the one that does, `client` moves there and the call is made
/// again. When the broker cannot be reached (the coordinator died, say), `client`
/// starts over at the first reachable broker of `bootstrap` (if given), which names
/// the coordinator now.
pub(crate) async fn at_coordinator<T, F, Fut>(
    client: &mut GroupServiceClient<Channel>,
    bootstrap: &str,
    call: F,
) -> Result<T>
where
    F: Fn(GroupServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let mut moved = false;
    let mut restarted = bootstrap.is_empty();
    loop {
        let err = match call(client.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(status) => ClientError::from(status),
        };
        match moved_to(&err) {
            Some(addr) if !moved => {
                moved = true;
                *client = GroupServiceClient::new(coordinator_channel(&addr)?);
            }
            None if err.is_unreachable() && !restarted => {
                restarted = true;
                moved = false;
                let (_, channel) = connect_first(bootstrap).await?;
                *client = GroupServiceClient::new(channel);
            }
            _ => return Err(err),
        }
    }
}

/// The coordinator a NOT_COORDINATOR answer names.
fn moved_to(err: &ClientError) -> Option<String> {
    (err.reason() == Some(ErrorReason::NotCoordinator))
        .then(|| err.metadata_str("coordinator_address").map(str::to_string))
        .flatten()
}

fn coordinator_channel(addr: &str) -> Result<Channel> {
    endpoint(addr)
        .map(|e| e.connect_lazy())
        .map_err(|message| ClientError::Connect {
            brokers: addr.to_string(),
            message,
        })
}

pub(crate) fn to_wire(set: &BTreeSet<TopicPartition>) -> Vec<TopicPartitions> {
    let mut out: Vec<TopicPartitions> = Vec::new();
    for (t, p) in set {
        match out.last_mut() {
            Some(last) if last.topic == *t => last.partitions.push(*p as i32),
            _ => out.push(TopicPartitions {
                topic: t.clone(),
                partitions: vec![*p as i32],
            }),
        }
    }
    out
}

pub(crate) fn from_wire(list: &[TopicPartitions]) -> BTreeSet<TopicPartition> {
    list.iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .filter_map(|&p| u32::try_from(p).ok())
                .map(|p| (t.topic.clone(), p))
        })
        .collect()
}

impl Membership {
    /// Joins `group` subscribed to `topics` and starts heartbeating.
    pub fn join(
        channel: Channel,
        group: String,
        assignor: String,
        topics: BTreeSet<String>,
        pattern: String,
        bootstrap: String,
    ) -> Membership {
        let client = GroupServiceClient::new(channel);
        let shared = Arc::new(Shared {
            state: Mutex::new(MemberState {
                topics,
                pattern,
                ..MemberState::default()
            }),
            wake: Notify::new(),
            assigned: Notify::new(),
        });
        let task = tokio::spawn(heartbeat_loop(
            client.clone(),
            group.clone(),
            assignor.clone(),
            Arc::clone(&shared),
            bootstrap,
        ));
        Membership {
            group,
            assignor,
            client,
            shared,
            task,
        }
    }

    /// Changes the subscription; the next heartbeat (sent now) tells the coordinator.
    pub fn subscribe(&self, topics: BTreeSet<String>, pattern: String) {
        {
            let mut st = self.shared.lock();
            st.topics = topics;
            st.pattern = pattern;
        }
        self.shared.wake.notify_one();
    }

    /// The coordinator's latest assignment, if one arrived.
    pub fn assignment(&self) -> Option<BTreeSet<TopicPartition>> {
        self.shared.lock().assignment.clone()
    }

    /// Records what the consumer now owns and heartbeats at once, so partitions it let go
    /// reach their new owner without waiting a heartbeat interval.
    pub fn set_owned(&self, owned: BTreeSet<TopicPartition>) {
        self.shared.lock().owned = owned;
        self.shared.wake.notify_one();
    }

    /// Waits up to `timeout` for a new assignment.
    pub async fn wait_for_assignment(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.shared.assigned.notified()).await;
    }

    /// The last heartbeat error, taken.
    pub fn take_error(&self) -> Option<ClientError> {
        self.shared.lock().error.take()
    }

    /// How fetches and commits name this member.
    pub fn member_ref(&self) -> GroupMemberRef {
        let st = self.shared.lock();
        GroupMemberRef {
            group_id: self.group.clone(),
            member_id: st.member_id.clone(),
            member_epoch: st.epoch,
        }
    }

    /// The coordinator's address, if the member moved to one other than the broker it
    /// joined through.
    pub fn coordinator(&self) -> Option<String> {
        self.shared.lock().coordinator.clone()
    }

    /// The group id.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// After a FENCED answer: forget the membership and join again.
    pub fn rejoin(&self) {
        {
            let mut st = self.shared.lock();
            st.member_id.clear();
            st.epoch = 0;
            st.assignment = Some(BTreeSet::new());
            st.owned.clear();
        }
        self.shared.wake.notify_one();
    }

    /// Leaves the group (its partitions move at once) and stops heartbeating.
    pub async fn leave(self) -> Result<()> {
        self.task.abort();
        let (member_id, topics) = {
            let st = self.shared.lock();
            (st.member_id.clone(), st.topics.clone())
        };
        if member_id.is_empty() {
            return Ok(());
        }
        let mut client = match self.coordinator() {
            Some(addr) => GroupServiceClient::new(coordinator_channel(&addr)?),
            None => self.client.clone(),
        };
        client
            .heartbeat(HeartbeatRequest {
                group_id: self.group.clone(),
                member_id,
                member_epoch: -1,
                subscribed_topics: topics.into_iter().collect(),
                assignor: self.assignor.clone(),
                owned: Vec::new(),
                subscribed_pattern: String::new(),
            })
            .await?;
        Ok(())
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Without `leave` the coordinator notices after the session timeout.
        self.task.abort();
    }
}

async fn heartbeat_loop(
    mut client: GroupServiceClient<Channel>,
    group: String,
    assignor: String,
    shared: Arc<Shared>,
    bootstrap: String,
) {
    let mut interval = Duration::from_secs(3);
    // The broker the consumer joined through: it names the coordinator if the one
    // moved to stops answering. If it stops answering itself, another bootstrap
    // broker takes its place.
    let mut home = client.clone();
    loop {
        let req = {
            let st = shared.lock();
            HeartbeatRequest {
                group_id: group.clone(),
                member_id: st.member_id.clone(),
                member_epoch: st.epoch,
                subscribed_topics: st.topics.iter().cloned().collect(),
                assignor: assignor.clone(),
                owned: to_wire(&st.owned),
                subscribed_pattern: st.pattern.clone(),
            }
        };
        let wait;
        match client.heartbeat(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                interval = Duration::from_millis(u64::from(resp.heartbeat_interval_ms.max(10)));
                wait = interval;
                let assignment = from_wire(&resp.assignment);
                let mut st = shared.lock();
                st.member_id = resp.member_id;
                st.epoch = resp.member_epoch;
                if st.assignment.as_ref() != Some(&assignment) {
                    st.assignment = Some(assignment);
                    shared.assigned.notify_waiters();
                }
            }
            Err(status) => {
                let err = ClientError::from(status);
                if let Some(addr) = moved_to(&err) {
                    // The coordinator moved (its broker lost the offsets topic's
                    // leadership): join again there.
                    tracing::info!(group = %group, coordinator = %addr, "group coordinator moved");
                    match coordinator_channel(&addr) {
                        Ok(ch) => client = GroupServiceClient::new(ch),
                        Err(e) => tracing::warn!(error = %e, "bad coordinator address"),
                    }
                    let mut st = shared.lock();
                    st.coordinator = Some(addr);
                    st.member_id.clear();
                    st.epoch = 0;
                    wait = Duration::ZERO;
                } else if err.reason() == Some(ErrorReason::NotCoordinator) {
                    // No coordinator right now (an election is running).
                    wait = Duration::from_millis(200);
                } else if err.reason() == Some(ErrorReason::Fenced) {
                    tracing::warn!(group = %group, error = %err, "fenced; joining the group again");
                    let mut st = shared.lock();
                    st.member_id.clear();
                    st.epoch = 0;
                    st.assignment = Some(BTreeSet::new());
                    shared.assigned.notify_waiters();
                    wait = Duration::ZERO;
                } else {
                    tracing::warn!(group = %group, error = %err, "heartbeat failed");
                    if err.is_unreachable() {
                        if shared.lock().coordinator.take().is_some() {
                            client = home.clone();
                        } else if let Ok((addr, channel)) = connect_first(&bootstrap).await {
                            tracing::info!(group = %group, broker = %addr, "heartbeating through another broker");
                            home = GroupServiceClient::new(channel);
                            client = home.clone();
                        }
                    }
                    // Retry sooner than a full interval, but without hammering.
                    wait = (interval / 3).max(Duration::from_millis(100));
                }
                shared.lock().error = Some(err);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.wake.notified() => {}
        }
    }
}
