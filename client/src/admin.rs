//! `Admin`: topics, offsets and the cluster, one call each.

use std::collections::BTreeMap;

use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::fetch_service_client::FetchServiceClient;
use sluice_proto::v1::group_service_client::GroupServiceClient;
use sluice_proto::v1::{
    offset_query, AlterTopicConfigRequest, CreatePartitionsRequest, CreateTopicRequest,
    DeleteTopicRequest, DescribeClusterRequest, DescribeClusterResponse, DescribeTopicsRequest,
    ListOffsetsRequest, ListTopicsRequest, OffsetQuery, TopicDescription, TopicListing,
};
use sluice_proto::v1::{
    CommitOffsetsRequest, DeleteGroupRequest, DescribeGroupRequest, DescribeGroupResponse,
    FetchOffsetsRequest, GroupListing, ListGroupsRequest, OffsetCommit,
};
use tonic::transport::Channel;

use crate::connection::{connect, endpoint, MAX_MESSAGE_BYTES};
use crate::error::{ClientError, Result};
use crate::group::at_coordinator;

/// Which offset to look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The high watermark.
    Latest,
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// A topic to create.
#[derive(Debug, Clone, Default)]
pub struct NewTopic {
    /// Name.
    pub name: String,
    /// Partitions (0: the broker's default).
    pub partitions: u32,
    /// Replication factor (0: the broker's default).
    pub replication_factor: u32,
    /// Config overrides, Kafka keys.
    pub configs: BTreeMap<String, String>,
}

impl NewTopic {
    /// A topic with `partitions` partitions and the broker's other defaults.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        NewTopic {
            name: name.into(),
            partitions,
            ..NewTopic::default()
        }
    }

    /// Sets a config override.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.configs.insert(key.into(), value.into());
        self
    }
}

/// Administers a cluster.
#[derive(Debug, Clone)]
pub struct Admin {
    admin: AdminServiceClient<Channel>,
    fetch: FetchServiceClient<Channel>,
    groups: GroupServiceClient<Channel>,
    /// The brokers connected through, tried again when a group's coordinator is gone.
    bootstrap: String,
}

impl Admin {
    /// Connects to the first reachable broker of `brokers`.
    pub async fn connect(brokers: &str) -> Result<Admin> {
        let mut admin = Admin::with_channel(connect(brokers).await?);
        admin.bootstrap = brokers.to_string();
        Ok(admin)
    }

    /// Uses an existing channel.
    pub fn with_channel(channel: Channel) -> Admin {
        Admin {
            bootstrap: String::new(),
            admin: AdminServiceClient::new(channel.clone()),
            groups: GroupServiceClient::new(channel.clone()),
            fetch: FetchServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// Every consumer group. In a cluster each broker coordinates the groups of the
    /// offsets partitions it leads, so every live broker is asked and the answers
    /// merged; a live broker that cannot answer fails the listing rather than leave
    /// its groups out.
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let cluster = self.describe_cluster().await?;
        let live: Vec<&str> = cluster
            .brokers
            .iter()
            .filter(|b| b.alive)
            .map(|b| b.address.as_str())
            .collect();
        if live.len() <= 1 {
            let answer = self
                .groups
                .clone()
                .list_groups(ListGroupsRequest {})
                .await?;
            return Ok(answer.into_inner().groups);
        }
        let mut merged: BTreeMap<String, GroupListing> = BTreeMap::new();
        for addr in live {
            let channel = endpoint(addr)
                .map(|e| e.connect_lazy())
                .map_err(|message| ClientError::Connect {
                    brokers: addr.to_string(),
                    message,
                })?;
            let answer = GroupServiceClient::new(channel)
                .list_groups(ListGroupsRequest {})
                .await?;
            for g in answer.into_inner().groups {
                // During a handover two brokers may both know a group: keep the one
                // its members are at.
                match merged.get(&g.group_id) {
                    Some(seen) if seen.members >= g.members => {}
                    _ => {
                        merged.insert(g.group_id.clone(), g);
                    }
                }
            }
        }
        Ok(merged.into_values().collect())
    }

    /// A group's state, members, assignment, and per partition its committed offset,
    /// log end offset and lag.
    pub async fn describe_group(&self, group: &str) -> Result<DescribeGroupResponse> {
        at_coordinator(
            &mut self.groups.clone(),
            &self.bootstrap,
            |mut c| async move {
                c.describe_group(DescribeGroupRequest {
                    group_id: group.to_string(),
                })
                .await
            },
        )
        .await
    }

    /// Deletes a group with no members, and its committed offsets.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        at_coordinator(
            &mut self.groups.clone(),
            &self.bootstrap,
            |mut c| async move {
                c.delete_group(DeleteGroupRequest {
                    group_id: group.to_string(),
                })
                .await
            },
        )
        .await?;
        Ok(())
    }

    /// A group's committed offsets, as ((topic, partition), offset).
    pub async fn group_offsets(&self, group: &str) -> Result<Vec<((String, u32), u64)>> {
        let resp = at_coordinator(
            &mut self.groups.clone(),
            &self.bootstrap,
            |mut c| async move {
                c.fetch_offsets(FetchOffsetsRequest {
                    group_id: group.to_string(),
                    partitions: Vec::new(),
                })
                .await
            },
        )
        .await?;
        Ok(resp
            .offsets
            .into_iter()
            .filter_map(|o| {
                Some((
                    (o.topic, u32::try_from(o.partition).ok()?),
                    u64::try_from(o.offset).ok()?,
                ))
            })
            .collect())
    }

    /// Sets a group's committed offsets from outside; refused while it has members.
    pub async fn set_group_offsets(
        &self,
        group: &str,
        offsets: &[((String, u32), u64)],
    ) -> Result<()> {
        let offsets = offsets
            .iter()
            .map(|((topic, partition), offset)| {
                Ok(OffsetCommit {
                    topic: topic.clone(),
                    partition: to_i32(*partition)?,
                    offset: i64::try_from(*offset).map_err(|_| {
                        ClientError::InvalidArgument(format!("offset {offset} is too large"))
                    })?,
                    metadata: String::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let request = CommitOffsetsRequest {
            group_id: group.to_string(),
            member_id: String::new(),
            member_epoch: 0,
            offsets,
        };
        at_coordinator(&mut self.groups.clone(), &self.bootstrap, |mut c| {
            let r = request.clone();
            async move { c.commit_offsets(r).await }
        })
        .await?;
        Ok(())
    }

    /// Creates a topic and returns its description.
    pub async fn create_topic(&self, topic: NewTopic) -> Result<TopicDescription> {
        let resp = self
            .admin
            .clone()
            .create_topic(CreateTopicRequest {
                name: topic.name,
                partitions: to_i32(topic.partitions)?,
                replication_factor: to_i32(topic.replication_factor)?,
                configs: topic.configs.into_iter().collect(),
                validate_only: false,
            })
            .await?
            .into_inner();
        resp.topic
            .ok_or_else(|| ClientError::Batch("create answered without a topic".into()))
    }

    /// Every topic.
    pub async fn list_topics(&self) -> Result<Vec<TopicListing>> {
        Ok(self
            .admin
            .clone()
            .list_topics(ListTopicsRequest {})
            .await?
            .into_inner()
            .topics)
    }

    /// Describes the named topics (all when `names` is empty).
    pub async fn describe_topics(&self, names: &[String]) -> Result<Vec<TopicDescription>> {
        Ok(self
            .admin
            .clone()
            .describe_topics(DescribeTopicsRequest {
                names: names.to_vec(),
                allow_auto_create: false,
                local_offsets: false,
            })
            .await?
            .into_inner()
            .topics)
    }

    /// Describes one topic.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        self.describe_topics(&[name.to_string()])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Batch(format!("no description of {name}")))
    }

    /// Describes one topic for a producer: a broker that auto-creates topics creates it
    /// if it does not exist.
    pub(crate) async fn describe_topic_for_produce(&self, name: &str) -> Result<TopicDescription> {
        self.admin
            .clone()
            .describe_topics(DescribeTopicsRequest {
                names: vec![name.to_string()],
                allow_auto_create: true,
                local_offsets: false,
            })
            .await?
            .into_inner()
            .topics
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Batch(format!("no description of {name}")))
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.admin
            .clone()
            .delete_topic(DeleteTopicRequest { name: name.into() })
            .await?;
        Ok(())
    }

    /// Grows a topic to `total` partitions.
    pub async fn create_partitions(&self, name: &str, total: u32) -> Result<()> {
        self.admin
            .clone()
            .create_partitions(CreatePartitionsRequest {
                name: name.into(),
                total_count: to_i32(total)?,
            })
            .await?;
        Ok(())
    }

    /// Sets and removes config overrides.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
    ) -> Result<()> {
        self.admin
            .clone()
            .alter_topic_config(AlterTopicConfigRequest {
                name: name.into(),
                set: set.into_iter().collect(),
                delete,
            })
            .await?;
        Ok(())
    }

    /// Brokers and controller.
    pub async fn describe_cluster(&self) -> Result<DescribeClusterResponse> {
        Ok(self
            .admin
            .clone()
            .describe_cluster(DescribeClusterRequest {})
            .await?
            .into_inner())
    }

    /// Looks up one offset per partition; answers in the same order.
    pub async fn list_offsets(
        &self,
        queries: &[(String, u32, OffsetSpec)],
    ) -> Result<Vec<(u64, i64)>> {
        self.list_offsets_each(queries).await?.into_iter().collect()
    }

    /// Like [`Admin::list_offsets`], with each query's own outcome (a partition this
    /// broker does not lead fails alone).
    pub async fn list_offsets_each(
        &self,
        queries: &[(String, u32, OffsetSpec)],
    ) -> Result<Vec<Result<(u64, i64)>>> {
        let queries = queries
            .iter()
            .map(|(topic, partition, spec)| {
                Ok(OffsetQuery {
                    topic: topic.clone(),
                    partition: to_i32(*partition)?,
                    spec: Some(match spec {
                        OffsetSpec::Earliest => offset_query::Spec::Earliest(true),
                        OffsetSpec::Latest => offset_query::Spec::Latest(true),
                        OffsetSpec::Timestamp(t) => offset_query::Spec::TimestampMs(*t),
                    }),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let answers = self
            .fetch
            .clone()
            .list_offsets(ListOffsetsRequest { queries })
            .await?
            .into_inner()
            .answers;
        Ok(answers
            .into_iter()
            .map(|a| match &a.error {
                Some(e) => Err(ClientError::from(e)),
                None => Ok((a.offset.max(0) as u64, a.timestamp_ms)),
            })
            .collect())
    }
}

pub(crate) fn to_i32(v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| ClientError::InvalidArgument(format!("{v} is too large")))
}
