//! `GroupService`: consumer group membership, offsets and administration.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sluice_proto::v1::group_service_server::GroupService;
use sluice_proto::v1::{
    CommitOffsetsRequest, CommitOffsetsResponse, CommittedOffset, DeleteGroupRequest,
    DeleteGroupResponse, DescribeGroupRequest, DescribeGroupResponse, FetchOffsetsRequest,
    FetchOffsetsResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupListing,
    GroupMember, HeartbeatRequest, HeartbeatResponse, ListGroupsRequest, ListGroupsResponse,
    PartitionDescription, PartitionLag, TopicDescription, TopicPartitions,
};
use tonic::{Request, Response, Status};

use super::{to_status, Context};
use crate::error::BrokerError;
use crate::group::assignor::Tp;
use crate::group::coordinator::Heartbeat;
use crate::group::offsets::{now_ms, Committed};

/// Largest metadata string kept with a committed offset (Kafka's
/// `offset.metadata.max.bytes`).
const MAX_OFFSET_METADATA: usize = 4096;

/// Serves `sluice.v1.GroupService`.
#[derive(Debug, Clone)]
pub struct GroupSvc {
    ctx: Arc<Context>,
}

impl GroupSvc {
    /// The service over a broker context.
    pub fn new(ctx: Arc<Context>) -> Self {
        GroupSvc { ctx }
    }
}

/// Wire partitions to a set, refusing negative partition numbers.
pub fn tps_from_wire(list: &[TopicPartitions]) -> Result<BTreeSet<Tp>, BrokerError> {
    let mut out = BTreeSet::new();
    for t in list {
        for &p in &t.partitions {
            let p = u32::try_from(p).map_err(|_| {
                BrokerError::InvalidRequest(format!("partition {p} of {} is negative", t.topic))
            })?;
            out.insert((t.topic.clone(), p));
        }
    }
    Ok(out)
}

/// A set of partitions on the wire, grouped by topic.
pub fn tps_to_wire(set: &BTreeSet<Tp>) -> Vec<TopicPartitions> {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in set {
        by_topic.entry(t).or_default().push(*p as i32);
    }
    by_topic
        .into_iter()
        .map(|(topic, partitions)| TopicPartitions {
            topic: topic.to_string(),
            partitions,
        })
        .collect()
}

#[tonic::async_trait]
impl GroupService for GroupSvc {
    async fn find_coordinator(
        &self,
        request: Request<FindCoordinatorRequest>,
    ) -> Result<Response<FindCoordinatorResponse>, Status> {
        let (node_id, address) = self
            .ctx
            .coordinator(&request.into_inner().group_id)
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(FindCoordinatorResponse {
            node_id: node_id as i32,
            address,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        self.ctx
            .check_coordinator(&req.group_id)
            .map_err(|e| to_status(&e))?;
        let owned = tps_from_wire(&req.owned).map_err(|e| to_status(&e))?;
        let answer = self
            .ctx
            .groups
            .heartbeat(Heartbeat {
                group: req.group_id,
                member_id: req.member_id,
                member_epoch: req.member_epoch,
                topics: req.subscribed_topics.into_iter().collect(),
                pattern: (!req.subscribed_pattern.is_empty()).then_some(req.subscribed_pattern),
                assignor: req.assignor,
                owned,
            })
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(HeartbeatResponse {
            member_id: answer.member_id,
            member_epoch: answer.member_epoch,
            heartbeat_interval_ms: answer
                .heartbeat_interval
                .as_millis()
                .min(u128::from(u32::MAX)) as u32,
            assignment: tps_to_wire(&answer.assignment),
        }))
    }

    async fn commit_offsets(
        &self,
        request: Request<CommitOffsetsRequest>,
    ) -> Result<Response<CommitOffsetsResponse>, Status> {
        let req = request.into_inner();
        self.ctx
            .check_coordinator(&req.group_id)
            .map_err(|e| to_status(&e))?;
        let now = now_ms();
        let mut offsets = Vec::with_capacity(req.offsets.len());
        for o in req.offsets {
            let (Ok(partition), Ok(offset)) = (u32::try_from(o.partition), u64::try_from(o.offset))
            else {
                return Err(to_status(&BrokerError::InvalidRequest(format!(
                    "offset {} for partition {} of {} is negative",
                    o.offset, o.partition, o.topic
                ))));
            };
            if o.metadata.len() > MAX_OFFSET_METADATA {
                return Err(to_status(&BrokerError::InvalidRequest(format!(
                    "offset metadata of {} bytes for {}-{} exceeds {MAX_OFFSET_METADATA} bytes",
                    o.metadata.len(),
                    o.topic,
                    o.partition
                ))));
            }
            offsets.push((
                (o.topic, partition),
                Committed {
                    offset,
                    metadata: o.metadata,
                    timestamp: now,
                },
            ));
        }
        let member = (!req.member_id.is_empty()).then_some((req.member_id, req.member_epoch));
        self.ctx
            .groups
            .commit(req.group_id, member, offsets)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<FetchOffsetsRequest>,
    ) -> Result<Response<FetchOffsetsResponse>, Status> {
        let req = request.into_inner();
        self.ctx
            .check_coordinator(&req.group_id)
            .map_err(|e| to_status(&e))?;
        let partitions = if req.partitions.is_empty() {
            None
        } else {
            Some(
                tps_from_wire(&req.partitions)
                    .map_err(|e| to_status(&e))?
                    .into_iter()
                    .collect(),
            )
        };
        let found = self
            .ctx
            .groups
            .fetch_offsets(req.group_id, partitions)
            .await
            .map_err(|e| to_status(&e))?;
        let offsets = found
            .into_iter()
            .map(|((topic, partition), c)| CommittedOffset {
                topic,
                partition: partition as i32,
                offset: c.as_ref().map_or(-1, |c| c.offset as i64),
                metadata: c.as_ref().map(|c| c.metadata.clone()).unwrap_or_default(),
                commit_timestamp: c.as_ref().map_or(-1, |c| c.timestamp),
            })
            .collect();
        Ok(Response::new(FetchOffsetsResponse { offsets }))
    }

    async fn list_groups(
        &self,
        _request: Request<ListGroupsRequest>,
    ) -> Result<Response<ListGroupsResponse>, Status> {
        // Each broker lists the groups it coordinates; clients ask every broker.
        let groups = self
            .ctx
            .groups
            .list()
            .await
            .map_err(|e| to_status(&e))?
            .into_iter()
            .map(|g| GroupListing {
                group_id: g.group,
                state: g.state.to_string(),
                members: g.members as u32,
            })
            .collect();
        Ok(Response::new(ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<DescribeGroupRequest>,
    ) -> Result<Response<DescribeGroupResponse>, Status> {
        let group = request.into_inner().group_id;
        self.ctx
            .check_coordinator(&group)
            .map_err(|e| to_status(&e))?;
        let d = self
            .ctx
            .groups
            .describe(group)
            .await
            .map_err(|e| to_status(&e))?;
        let ends = self.high_watermarks(&d.offsets).await;
        Ok(Response::new(DescribeGroupResponse {
            group_id: d.group,
            state: d.state.to_string(),
            group_epoch: d.epoch,
            assignor: d.assignor,
            members: d
                .members
                .into_iter()
                .map(|m| GroupMember {
                    member_id: m.member_id,
                    member_epoch: m.member_epoch,
                    subscribed_topics: m.topics.into_iter().collect(),
                    assignment: tps_to_wire(&m.assignment),
                    target_assignment: tps_to_wire(&m.target),
                })
                .collect(),
            offsets: d
                .offsets
                .into_iter()
                .zip(ends)
                .map(|(o, end)| {
                    let committed = o.committed.map_or(-1, |c| c as i64);
                    PartitionLag {
                        topic: o.tp.0,
                        partition: o.tp.1 as i32,
                        committed_offset: committed,
                        log_end_offset: end,
                        // Unknown while the partition's leader does not answer.
                        lag: if end < 0 {
                            -1
                        } else {
                            (end - committed.max(0)).max(0)
                        },
                        member_id: o.member_id.unwrap_or_default(),
                    }
                })
                .collect(),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<DeleteGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        let group = request.into_inner().group_id;
        self.ctx
            .check_coordinator(&group)
            .map_err(|e| to_status(&e))?;
        self.ctx
            .groups
            .delete(group)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(DeleteGroupResponse {}))
    }
}

impl GroupSvc {
    /// Each partition's high watermark as its leader has it: the coordinator's own
    /// replica may lag, or it may hold none (-1 where the leader does not answer).
    async fn high_watermarks(&self, lags: &[crate::group::coordinator::PartitionLag]) -> Vec<i64> {
        let local: Vec<i64> = lags.iter().map(|o| o.log_end_offset as i64).collect();
        let Some(c) = &self.ctx.controller else {
            return local;
        };
        let md = c.metadata();
        let mut topics: Vec<TopicDescription> = Vec::new();
        for o in lags {
            let leader = md
                .topics
                .get(&o.tp.0)
                .and_then(|t| t.partitions.get(o.tp.1 as usize))
                .map_or(-1, |p| p.leader as i32);
            let p = PartitionDescription {
                partition: o.tp.1 as i32,
                leader,
                high_watermark: o.log_end_offset as i64,
                ..PartitionDescription::default()
            };
            match topics.iter_mut().find(|t| t.name == o.tp.0) {
                Some(t) => t.partitions.push(p),
                None => topics.push(TopicDescription {
                    name: o.tp.0.clone(),
                    partitions: vec![p],
                    ..TopicDescription::default()
                }),
            }
        }
        super::admin::leaders_offsets(&self.ctx, &mut topics).await;
        lags.iter()
            .zip(local)
            .map(|(o, own)| {
                topics
                    .iter()
                    .find(|t| t.name == o.tp.0)
                    .and_then(|t| t.partitions.iter().find(|p| p.partition == o.tp.1 as i32))
                    .map_or(own, |p| p.high_watermark)
            })
            .collect()
    }
}
