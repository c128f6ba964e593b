//! `AdminService`: topics and the cluster.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::admin_service_server::AdminService;
use sluice_proto::v1::{
    AlterTopicConfigRequest, AlterTopicConfigResponse, BrokerDescription, CreatePartitionsRequest,
    CreatePartitionsResponse, CreateTopicRequest, CreateTopicResponse, DeleteTopicRequest,
    DeleteTopicResponse, DescribeClusterRequest, DescribeClusterResponse, DescribeTopicsRequest,
    DescribeTopicsResponse, ListTopicsRequest, ListTopicsResponse, PartitionDescription,
    TopicDescription, TopicListing,
};
use tonic::{Request, Response, Status};

use super::{to_status, Context};
use crate::error::BrokerError;
use crate::topic::manager::{NewTopic, TopicState};

/// Serves `sluice.v1.AdminService`.
#[derive(Debug, Clone)]
pub struct AdminSvc {
    ctx: Arc<Context>,
}

impl AdminSvc {
    /// The service over a broker context.
    pub fn new(ctx: Arc<Context>) -> Self {
        AdminSvc { ctx }
    }

    fn describe(&self, t: &TopicState) -> TopicDescription {
        let node = self.ctx.config.node_id as i32;
        // In a cluster, placement comes from the metadata log.
        let placed = self
            .ctx
            .controller
            .as_ref()
            .and_then(|c| c.metadata().topics.get(&t.meta.name).cloned());
        let ids = |v: &[u64]| v.iter().map(|&i| i as i32).collect::<Vec<_>>();
        TopicDescription {
            name: t.meta.name.clone(),
            partitions: t
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let s = p.state();
                    let record = placed.as_ref().and_then(|t| t.partitions.get(i));
                    PartitionDescription {
                        partition: i as i32,
                        leader: record.map_or(node, |r| r.leader as i32),
                        leader_epoch: record.map_or(0, |r| r.leader_epoch),
                        replicas: record.map_or(vec![node], |r| ids(&r.replicas)),
                        isr: record.map_or(vec![node], |r| ids(&r.isr)),
                        log_start_offset: s.log_start_offset as i64,
                        high_watermark: s.high_watermark as i64,
                        log_end_offset: s.log_end_offset as i64,
                    }
                })
                .collect(),
            replication_factor: placed
                .as_ref()
                .map_or(t.meta.replication_factor as i32, |p| {
                    p.replication_factor as i32
                }),
            configs: t.config.describe().into_iter().collect(),
            overridden_configs: t.meta.configs.keys().cloned().collect(),
            internal: t.meta.name.starts_with("__"),
        }
    }
}

/// In a cluster, a partition's offsets are its leader's: for partitions led elsewhere
/// they are asked of the leader (-1 when it does not answer), since this broker's
/// replica may lag or hold nothing.
pub(super) async fn leaders_offsets(ctx: &Context, topics: &mut [TopicDescription]) {
    let Some(c) = &ctx.controller else {
        return;
    };
    let me = c.id() as i32;
    let mut leaders: Vec<i32> = topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| p.leader))
        .filter(|l| *l != me)
        .collect();
    leaders.sort_unstable();
    leaders.dedup();
    let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
    let md = c.metadata();
    for leader in leaders {
        let address = c
            .peer_address(leader as u64)
            .map(str::to_string)
            .or_else(|| md.brokers.get(&(leader as u64)).map(|b| b.address.clone()));
        let theirs = match address {
            Some(a) => ask_offsets(&a, names.clone()).await,
            None => None,
        };
        for t in topics.iter_mut() {
            let remote = theirs
                .as_ref()
                .and_then(|r| r.iter().find(|d| d.name == t.name));
            for p in t.partitions.iter_mut().filter(|p| p.leader == leader) {
                let found =
                    remote.and_then(|d| d.partitions.iter().find(|q| q.partition == p.partition));
                (p.log_start_offset, p.high_watermark, p.log_end_offset) = match found {
                    Some(q) => (q.log_start_offset, q.high_watermark, q.log_end_offset),
                    None => (-1, -1, -1),
                };
            }
        }
    }
}

/// A broker's own view of `names` (its replicas' offsets), or `None` if it does not
/// answer within a second.
async fn ask_offsets(address: &str, names: Vec<String>) -> Option<Vec<TopicDescription>> {
    let endpoint = crate::peer_endpoint(address, Duration::from_secs(1)).ok()?;
    let mut client = AdminServiceClient::new(endpoint.connect_lazy());
    let answer = client
        .describe_topics(DescribeTopicsRequest {
            names,
            allow_auto_create: false,
            local_offsets: true,
        })
        .await
        .ok()?;
    Some(answer.into_inner().topics)
}

fn non_negative(what: &str, v: i32) -> Result<u32, BrokerError> {
    u32::try_from(v).map_err(|_| match what {
        "partitions" => BrokerError::InvalidPartitions(format!("{v} is negative")),
        _ => BrokerError::InvalidRequest(format!("{what} {v} is negative")),
    })
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn create_topic(
        &self,
        request: Request<CreateTopicRequest>,
    ) -> Result<Response<CreateTopicResponse>, Status> {
        let req = request.into_inner();
        if let Some(c) = &self.ctx.controller {
            let result = async {
                let partitions = match non_negative("partitions", req.partitions)? {
                    0 => self.ctx.config.default_partitions,
                    n => n,
                };
                let rf = match non_negative("replication factor", req.replication_factor)? {
                    0 => self.ctx.config.default_replication_factor,
                    n => n,
                };
                crate::controller::topics::create(
                    c,
                    &self.ctx.topics,
                    req.name.clone(),
                    partitions,
                    rf,
                    req.configs.into_iter().collect(),
                    req.validate_only,
                )
                .await?;
                let md = self.ctx.topics.metadata();
                let topic = md.topic(&req.name).ok().map(|t| self.describe(t));
                Ok::<_, BrokerError>(CreateTopicResponse { topic })
            }
            .await;
            return result.map(Response::new).map_err(|e| to_status(&e));
        }
        let result = async {
            let partitions = non_negative("partitions", req.partitions)?;
            let topic = self
                .ctx
                .topics
                .create(NewTopic {
                    name: req.name,
                    partitions,
                    replication_factor: i64::from(req.replication_factor),
                    configs: req.configs.into_iter().collect::<BTreeMap<_, _>>(),
                    validate_only: req.validate_only,
                    topic_id: 0,
                })
                .await?;
            Ok::<_, BrokerError>(CreateTopicResponse {
                topic: Some(self.describe(&topic)),
            })
        }
        .await;
        result.map(Response::new).map_err(|e| to_status(&e))
    }

    async fn list_topics(
        &self,
        _request: Request<ListTopicsRequest>,
    ) -> Result<Response<ListTopicsResponse>, Status> {
        let md = self.ctx.topics.metadata();
        let placed = self.ctx.controller.as_ref().map(|c| c.metadata());
        let topics = md
            .topics
            .values()
            .map(|t| TopicListing {
                name: t.meta.name.clone(),
                partitions: t.meta.partitions as i32,
                replication_factor: placed
                    .as_ref()
                    .and_then(|p| p.topics.get(&t.meta.name))
                    .map_or(t.meta.replication_factor as i32, |p| {
                        p.replication_factor as i32
                    }),
                internal: t.meta.name.starts_with("__"),
            })
            .collect();
        Ok(Response::new(ListTopicsResponse { topics }))
    }

    async fn describe_topics(
        &self,
        request: Request<DescribeTopicsRequest>,
    ) -> Result<Response<DescribeTopicsResponse>, Status> {
        let req = request.into_inner();
        let md = self.ctx.topics.metadata();
        let topics = if req.names.is_empty() {
            md.topics.values().map(|t| self.describe(t)).collect()
        } else {
            let mut out = Vec::new();
            for name in &req.names {
                let t = match md.topic(name) {
                    Ok(t) => Arc::clone(t),
                    Err(_) if req.allow_auto_create => self
                        .ctx
                        .topic_for_produce(name)
                        .await
                        .map_err(|e| to_status(&e))?,
                    Err(e) => return Err(to_status(&e)),
                };
                out.push(self.describe(&t));
            }
            out
        };
        let mut topics = topics;
        if !req.local_offsets && !req.allow_auto_create {
            leaders_offsets(&self.ctx, &mut topics).await;
        }
        Ok(Response::new(DescribeTopicsResponse { topics }))
    }

    async fn delete_topic(
        &self,
        request: Request<DeleteTopicRequest>,
    ) -> Result<Response<DeleteTopicResponse>, Status> {
        let name = request.into_inner().name;
        if name == crate::group::offsets::OFFSETS_TOPIC {
            return Err(to_status(&BrokerError::InvalidRequest(format!(
                "{name} is internal: it holds every group's committed offsets"
            ))));
        }
        let result = match &self.ctx.controller {
            Some(c) => crate::controller::topics::delete(c, &self.ctx.topics, name).await,
            None => self.ctx.topics.delete(name).await,
        };
        result
            .map(|()| Response::new(DeleteTopicResponse {}))
            .map_err(|e| to_status(&e))
    }

    async fn create_partitions(
        &self,
        request: Request<CreatePartitionsRequest>,
    ) -> Result<Response<CreatePartitionsResponse>, Status> {
        let req = request.into_inner();
        let result = async {
            let total = non_negative("partitions", req.total_count)?;
            match &self.ctx.controller {
                Some(c) => {
                    crate::controller::topics::add_partitions(c, &self.ctx.topics, req.name, total)
                        .await
                }
                None => self.ctx.topics.add_partitions(req.name, total).await,
            }
        }
        .await;
        result
            .map(|()| Response::new(CreatePartitionsResponse {}))
            .map_err(|e| to_status(&e))
    }

    async fn alter_topic_config(
        &self,
        request: Request<AlterTopicConfigRequest>,
    ) -> Result<Response<AlterTopicConfigResponse>, Status> {
        let req = request.into_inner();
        let result = match &self.ctx.controller {
            Some(c) => {
                crate::controller::topics::alter(
                    c,
                    req.name,
                    req.set.into_iter().collect(),
                    req.delete,
                )
                .await
            }
            None => {
                self.ctx
                    .topics
                    .alter_config(req.name, req.set.into_iter().collect(), req.delete)
                    .await
            }
        };
        result
            .map(|()| Response::new(AlterTopicConfigResponse {}))
            .map_err(|e| to_status(&e))
    }

    async fn describe_cluster(
        &self,
        _request: Request<DescribeClusterRequest>,
    ) -> Result<Response<DescribeClusterResponse>, Status> {
        let node = self.ctx.config.node_id as i32;
        if let Some(c) = &self.ctx.controller {
            let status = c.status().await.map_err(|e| to_status(&e))?;
            let md = c.metadata();
            return Ok(Response::new(DescribeClusterResponse {
                cluster_id: md
                    .cluster_id
                    .clone()
                    .unwrap_or_else(|| self.ctx.cluster_id.clone()),
                brokers: md
                    .brokers
                    .iter()
                    .map(|(id, b)| BrokerDescription {
                        node_id: *id as i32,
                        address: b.address.clone(),
                        alive: c.is_alive(b),
                    })
                    .collect(),
                controller_id: status.leader.map_or(-1, |l| l as i32),
                raft_term: status.term,
                raft_commit_index: status.commit,
                answered_by: node,
            }));
        }
        Ok(Response::new(DescribeClusterResponse {
            cluster_id: self.ctx.cluster_id.clone(),
            brokers: vec![BrokerDescription {
                node_id: node,
                address: self.ctx.config.advertised_addr.clone(),
                alive: true,
            }],
            controller_id: node,
            raft_term: 0,
            raft_commit_index: 0,
            answered_by: node,
        }))
    }
}
