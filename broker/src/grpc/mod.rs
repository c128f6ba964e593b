//! The gRPC edge: one file per service family, and the single place where broker errors
//! become gRPC statuses.

pub mod admin;
pub mod controller;
pub mod fetch;
pub mod framing;
pub mod group;
pub mod produce;
pub mod replica;

use std::sync::Arc;

use sluice_proto::{v1, ErrorReason};
use tonic::Status;

use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::group::offsets::OFFSETS_TOPIC;
use crate::topic::manager::{NewTopic, TopicState, Topics};

/// What every service needs.
#[derive(Debug)]
pub struct Context {
    /// The broker's configuration.
    pub config: BrokerConfig,
    /// Topic metadata and partitions.
    pub topics: Topics,
    /// The consumer group coordinator.
    pub groups: crate::group::GroupCoordinator,
    /// This broker's controller-quorum member, when the broker runs in a cluster.
    pub controller: Option<crate::controller::Controller>,
    /// This cluster's id, kept in the data directory.
    pub cluster_id: String,
    /// Turns true when the broker starts shutting down; long-lived calls end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl Context {
    /// Resolves once the broker is shutting down.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

impl Context {
    /// In a cluster, fails with `NotLeader` (naming the leader) unless this broker
    /// leads the partition; a single broker leads everything.
    pub fn check_leader(&self, topic: &str, partition: i64) -> Result<(), BrokerError> {
        let Some(c) = &self.controller else {
            return Ok(());
        };
        let md = c.metadata();
        let Some(t) = md.topics.get(topic) else {
            // Internal topics (offsets) are local to each broker for now.
            return Ok(());
        };
        let Some(p) = usize::try_from(partition)
            .ok()
            .and_then(|i| t.partitions.get(i))
        else {
            return Ok(());
        };
        if p.leader == c.id() {
            return Ok(());
        }
        Err(BrokerError::NotLeader {
            topic: topic.to_string(),
            partition,
            leader: (p.leader != 0).then_some(p.leader),
            address: md.brokers.get(&p.leader).map(|b| b.address.clone()),
        })
    }

    /// The broker coordinating `group` (id and address): this one on a single broker;
    /// in a cluster, the leader of the offsets partition the group hashes to.
    pub fn coordinator(&self, group: &str) -> Result<(u64, String), BrokerError> {
        let Some(c) = &self.controller else {
            return Ok((
                u64::from(self.config.node_id),
                self.config.advertised_addr.clone(),
            ));
        };
        let md = c.metadata();
        let leader = md
            .topics
            .get(OFFSETS_TOPIC)
            .and_then(|t| {
                let i = crate::group::offsets_partition(group, t.partitions.len() as u32);
                t.partitions.get(i as usize)
            })
            .map_or(0, |p| p.leader);
        match md.brokers.get(&leader) {
            Some(b) if leader != 0 => Ok((leader, b.address.clone())),
            _ => Err(BrokerError::NotCoordinator {
                group: group.to_string(),
                coordinator: None,
                address: None,
            }),
        }
    }

    /// Fails with `NotCoordinator` (naming the coordinator) unless this broker
    /// coordinates `group` now.
    pub fn check_coordinator(&self, group: &str) -> Result<(), BrokerError> {
        if self.groups.coordinates(group) {
            return Ok(());
        }
        let (coordinator, address) = match self.coordinator(group) {
            Ok((id, addr)) => (Some(id), Some(addr)),
            Err(_) => (None, None),
        };
        Err(BrokerError::NotCoordinator {
            group: group.to_string(),
            coordinator,
            address,
        })
    }

    /// The topic for a produce: created with defaults when unknown and the broker allows
    /// auto-creation.
    pub async fn topic_for_produce(&self, name: &str) -> Result<Arc<TopicState>, BrokerError> {
        match self.topics.metadata().topic(name) {
            Ok(t) => return Ok(Arc::clone(t)),
            Err(e) if !self.config.auto_create_topics => return Err(e),
            Err(_) => {}
        }
        let created = self
            .topics
            .create(NewTopic {
                name: name.to_string(),
                partitions: 0,
                replication_factor: 0,
                configs: Default::default(),
                validate_only: false,
                topic_id: 0,
            })
            .await;
        match created {
            Ok(t) => Ok(t),
            // Another request created it first.
            Err(BrokerError::TopicExists(_)) => self.topics.metadata().topic(name).cloned(),
            Err(e) => Err(e),
        }
    }
}

/// The reason and metadata a client sees for an error.
fn reason(e: &BrokerError) -> (ErrorReason, Vec<(String, String)>) {
    use BrokerError as E;
    match e {
        E::UnknownTopic(_) | E::UnknownPartition { .. } => {
            (ErrorReason::UnknownTopicOrPartition, vec![])
        }
        E::TopicExists(_) => (ErrorReason::TopicExists, vec![]),
        E::UnknownGroup(_) => (ErrorReason::UnknownGroup, vec![]),
        E::Fenced(_) => (ErrorReason::Fenced, vec![]),
        E::NotLeader {
            leader, address, ..
        } => {
            let mut md = Vec::new();
            if let Some(l) = leader {
                md.push(("leader_id".to_string(), l.to_string()));
            }
            if let Some(a) = address {
                md.push(("leader_address".to_string(), a.clone()));
            }
            (ErrorReason::NotLeader, md)
        }
        E::NotCoordinator {
            coordinator,
            address,
            ..
        } => {
            let mut md = Vec::new();
            if let Some(c) = coordinator {
                md.push(("coordinator_id".to_string(), c.to_string()));
            }
            if let Some(a) = address {
                md.push(("coordinator_address".to_string(), a.clone()));
            }
            (ErrorReason::NotCoordinator, md)
        }
        E::NotController(leader) => (
            ErrorReason::NotLeader,
            leader
                .map(|l| vec![("controller_id".to_string(), l.to_string())])
                .unwrap_or_default(),
        ),
        E::InvalidTopic(_) => (ErrorReason::InvalidTopic, vec![]),
        E::InvalidConfig(_) => (ErrorReason::InvalidConfig, vec![]),
        E::InvalidPartitions(_) => (ErrorReason::InvalidPartitions, vec![]),
        E::InvalidReplicationFactor { .. } => (ErrorReason::InvalidReplicationFactor, vec![]),
        E::MessageTooLarge { size, limit } => (
            ErrorReason::MessageTooLarge,
            vec![
                ("size".into(), size.to_string()),
                ("max_message_bytes".into(), limit.to_string()),
            ],
        ),
        E::CorruptMessage(_) => (ErrorReason::CorruptMessage, vec![]),
        E::OffsetOutOfRange {
            log_start_offset,
            high_watermark,
            ..
        } => (
            ErrorReason::OffsetOutOfRange,
            vec![
                ("log_start_offset".into(), log_start_offset.to_string()),
                ("high_watermark".into(), high_watermark.to_string()),
            ],
        ),
        E::NotEnoughReplicas { isr, min } => (
            ErrorReason::NotEnoughReplicas,
            vec![
                ("isr".into(), isr.to_string()),
                ("min_insync_replicas".into(), min.to_string()),
            ],
        ),
        E::RequestTimedOut(_) => (ErrorReason::RequestTimedOut, vec![]),
        E::InvalidRequest(_) => (ErrorReason::InvalidRequest, vec![]),
        E::Storage(_) => (ErrorReason::StorageError, vec![]),
        E::ShuttingDown => (ErrorReason::ShuttingDown, vec![]),
        E::Internal(_) => (ErrorReason::Internal, vec![]),
    }
}

/// A broker error as a gRPC status with its reason in an `ErrorInfo` detail.
pub fn to_status(e: &BrokerError) -> Status {
    let (r, md) = reason(e);
    sluice_proto::status(r, e.to_string(), md)
}

/// A broker error as an in-message failure (stream items, fetch partitions).
pub fn to_error(e: &BrokerError) -> v1::Error {
    let (r, md) = reason(e);
    sluice_proto::error_message(r, e.to_string(), md)
}

/// A partition number from the wire.
fn partition_number(p: i32) -> i64 {
    i64::from(p)
}
