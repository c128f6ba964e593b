//! The controller's replicated state machine: cluster metadata, changed only by
//! commands committed through Raft: the brokers and when each last heartbeated, topics,
//! and per partition its replicas, leader, leader epoch and ISR.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::node::StateMachine;
use crate::error::{BrokerError, Result};

/// A command of the metadata log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Names the cluster; only the first one committed counts, so every member ends up
    /// with the same id whichever proposed first.
    InitCluster {
        /// The cluster id.
        id: String,
    },
    /// Creates a topic, placing its replicas over the registered brokers.
    CreateTopic {
        /// Name (already checked against the naming rule).
        name: String,
        /// Partitions.
        partitions: u32,
        /// Replicas per partition.
        replication_factor: u32,
        /// Config overrides (already validated).
        configs: BTreeMap<String, String>,
    },
    /// Deletes a topic.
    DeleteTopic {
        /// Name.
        name: String,
    },
    /// Grows a topic to `total` partitions.
    CreatePartitions {
        /// Name.
        name: String,
        /// The new partition count.
        total: u32,
    },
    /// Replaces a topic's config overrides.
    AlterConfigs {
        /// Name.
        name: String,
        /// The overrides now.
        configs: BTreeMap<String, String>,
    },
    /// Changes a partition's leader and ISR, only if nobody changed the partition since
    /// the sender looked (`partition_epoch`). A new leader bumps the leader epoch.
    AlterPartition {
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// The partition epoch the change was computed from.
        partition_epoch: i32,
        /// The leader afterwards (0: none).
        leader: u64,
        /// The ISR afterwards.
        isr: Vec<u64>,
    },
    /// A broker is up at `address`; sent every heartbeat interval.
    Heartbeat {
        /// Broker id.
        id: u64,
        /// Address clients use.
        address: String,
        /// The sender's clock (ms since the epoch) when it sent this.
        at_ms: i64,
    },
}

impl Command {
    /// The command's bytes in the log.
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| BrokerError::Internal(format!("encoding: {e}")))
    }
}

/// A registered broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    /// Address clients use.
    pub address: String,
    /// Its last heartbeat (ms since the epoch, its own clock).
    pub last_heartbeat_ms: i64,
}

/// One partition's placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    /// Brokers holding a replica; the first is the preferred leader.
    pub replicas: Vec<u64>,
    /// The leader.
    pub leader: u64,
    /// Bumped at every leader change.
    pub leader_epoch: i32,
    /// Replicas in sync with the leader.
    pub isr: Vec<u64>,
    /// Bumped at every change of leader or ISR; fences changes computed from an older
    /// state.
    #[serde(default)]
    pub partition_epoch: i32,
}

impl PartitionRecord {
    fn new(replicas: Vec<u64>) -> PartitionRecord {
        // Every replica of a new partition is empty, hence in sync.
        PartitionRecord {
            leader: replicas.first().copied().unwrap_or(0),
            leader_epoch: 0,
            isr: replicas.clone(),
            replicas,
            partition_epoch: 0,
        }
    }
}

/// A topic as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRecord {
    /// Partitions, by number.
    pub partitions: Vec<PartitionRecord>,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// Config overrides.
    pub configs: BTreeMap<String, String>,
    /// Unique over the cluster's life: a topic deleted and created again under its name
    /// gets a new id, so a broker that was away knows its old copy is not this topic.
    #[serde(default)]
    pub id: u64,
}

/// The whole metadata state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The cluster's id, once one was committed.
    pub cluster_id: Option<String>,
    /// Brokers by id.
    pub brokers: BTreeMap<u64, BrokerInfo>,
    /// Topics by name.
    #[serde(default)]
    pub topics: BTreeMap<String, TopicRecord>,
    /// The id of the last topic created.
    #[serde(default)]
    pub last_topic_id: u64,
}

/// Why a command was refused, as every member computes it the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The topic exists.
    TopicExists,
    /// The topic does not exist.
    UnknownTopic,
    /// More replicas than registered brokers.
    ReplicationFactor {
        /// Asked for.
        requested: u32,
        /// Brokers registered.
        available: u32,
    },
    /// A partition count that does not grow the topic.
    Partitions(String),
    /// The partition changed since the change was computed.
    StalePartitionEpoch {
        /// Its epoch now.
        current: i32,
    },
}

impl Refusal {
    /// The broker error a client sees.
    pub fn into_error(self, topic: &str) -> BrokerError {
        match self {
            Refusal::TopicExists => BrokerError::TopicExists(topic.to_string()),
            Refusal::UnknownTopic => BrokerError::UnknownTopic(topic.to_string()),
            Refusal::ReplicationFactor {
                requested,
                available,
            } => BrokerError::InvalidReplicationFactor {
                requested: i64::from(requested),
                available,
            },
            Refusal::Partitions(m) => BrokerError::InvalidPartitions(m),
            Refusal::StalePartitionEpoch { current } => BrokerError::Fenced(format!(
                "partition of {topic} changed meanwhile (partition epoch now {current})"
            )),
        }
    }
}

/// Replicas of partition `p`: consecutive brokers (by id) from a start that moves with
/// the partition and the topic, so leaders spread over the cluster.
fn place(name: &str, p: u32, rf: u32, brokers: &[u64]) -> Vec<u64> {
    let seed = name
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let n = brokers.len() as u32;
    let start = seed.wrapping_add(p) % n.max(1);
    (0..rf.min(n))
        .map(|i| brokers[((start + i) % n) as usize])
        .collect()
}

impl Metadata {
    fn apply_topic_command(&mut self, cmd: Command) -> Result<(), Refusal> {
        let brokers: Vec<u64> = self.brokers.keys().copied().collect();
        match cmd {
            Command::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
            } => {
                if self.topics.contains_key(&name) {
                    return Err(Refusal::TopicExists);
                }
                if replication_factor as usize > brokers.len() || replication_factor == 0 {
                    return Err(Refusal::ReplicationFactor {
                        requested: replication_factor,
                        available: brokers.len() as u32,
                    });
                }
                let parts = (0..partitions)
                    .map(|p| PartitionRecord::new(place(&name, p, replication_factor, &brokers)))
                    .collect();
                self.last_topic_id += 1;
                self.topics.insert(
                    name,
                    TopicRecord {
                        partitions: parts,
                        replication_factor,
                        configs,
                        id: self.last_topic_id,
                    },
                );
            }
            Command::DeleteTopic { name } => {
                if self.topics.remove(&name).is_none() {
                    return Err(Refusal::UnknownTopic);
                }
            }
            Command::CreatePartitions { name, total } => {
                let Some(t) = self.topics.get_mut(&name) else {
                    return Err(Refusal::UnknownTopic);
                };
                let have = t.partitions.len() as u32;
                if total <= have {
                    return Err(Refusal::Partitions(format!(
                        "topic {name} has {have} partitions; it can only grow"
                    )));
                }
                for p in have..total {
                    t.partitions.push(PartitionRecord::new(place(
                        &name,
                        p,
                        t.replication_factor,
                        &brokers,
                    )));
                }
            }
            Command::AlterConfigs { name, configs } => {
                let Some(t) = self.topics.get_mut(&name) else {
                    return Err(Refusal::UnknownTopic);
                };
                t.configs = configs;
            }
            Command::AlterPartition {
                topic,
                partition,
                partition_epoch,
                leader,
                isr,
            } => {
                let Some(p) = self
                    .topics
                    .get_mut(&topic)
                    .and_then(|t| t.partitions.get_mut(partition as usize))
                else {
                    return Err(Refusal::UnknownTopic);
                };
                if p.partition_epoch != partition_epoch {
                    return Err(Refusal::StalePartitionEpoch {
                        current: p.partition_epoch,
                    });
                }
                let outside = isr
                    .iter()
                    .chain(std::iter::once(&leader))
                    .find(|b| **b != 0 && !p.replicas.contains(b));
                if let Some(b) = outside {
                    return Err(Refusal::Partitions(format!(
                        "broker {b} holds no replica of {topic}-{partition}"
                    )));
                }
                if leader != p.leader {
                    p.leader_epoch += 1;
                }
                p.leader = leader;
                p.isr = isr;
                p.partition_epoch += 1;
            }
            Command::InitCluster { .. } | Command::Heartbeat { .. } => {}
        }
        Ok(())
    }
}

/// The state machine; publishes every new state to its watchers.
#[derive(Debug)]
pub struct MetadataMachine {
    state: Metadata,
    publish: watch::Sender<Arc<Metadata>>,
}

impl MetadataMachine {
    /// An empty state and a receiver that sees every applied change.
    pub fn new() -> (MetadataMachine, watch::Receiver<Arc<Metadata>>) {
        let (publish, rx) = watch::channel(Arc::new(Metadata::default()));
        (
            MetadataMachine {
                state: Metadata::default(),
                publish,
            },
            rx,
        )
    }
}

impl StateMachine for MetadataMachine {
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        let cmd: Command = match serde_json::from_slice(command) {
            Ok(c) => c,
            Err(e) => {
                // Every node skips it the same way, so the state stays identical.
                tracing::warn!(error = %e, "skipping a metadata command not understood");
                return Vec::new();
            }
        };
        match cmd {
            Command::InitCluster { id } => {
                if self.state.cluster_id.is_none() {
                    self.state.cluster_id = Some(id);
                }
            }
            Command::CreateTopic { .. }
            | Command::DeleteTopic { .. }
            | Command::CreatePartitions { .. }
            | Command::AlterConfigs { .. }
            | Command::AlterPartition { .. } => {
                let outcome = self.state.apply_topic_command(cmd);
                if outcome.is_ok() {
                    self.publish.send_replace(Arc::new(self.state.clone()));
                }
                return serde_json::to_vec(&outcome).unwrap_or_default();
            }
            Command::Heartbeat { id, address, at_ms } => {
                let b = self.state.brokers.entry(id).or_insert(BrokerInfo {
                    address: address.clone(),
                    last_heartbeat_ms: at_ms,
                });
                b.address = address;
                b.last_heartbeat_ms = b.last_heartbeat_ms.max(at_ms);
            }
        }
        self.publish.send_replace(Arc::new(self.state.clone()));
        Vec::new()
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.state).unwrap_or_default()
    }

    fn restore(&mut self, data: &[u8]) -> Result<()> {
        self.state = serde_json::from_slice(data)
            .map_err(|e| BrokerError::Storage(format!("controller snapshot: {e}")))?;
        self.publish.send_replace(Arc::new(self.state.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cluster_id_wins_and_snapshots_round_trip() {
        let (mut m, rx) = MetadataMachine::new();
        for id in ["first", "second"] {
            let cmd = Command::InitCluster { id: id.into() };
            m.apply(&cmd.encode().expect("encode"));
        }
        let hb = Command::Heartbeat {
            id: 2,
            address: "b:1".into(),
            at_ms: 5,
        };
        m.apply(&hb.encode().expect("encode"));
        m.apply(b"not a command");
        assert_eq!(rx.borrow().cluster_id.as_deref(), Some("first"));
        assert_eq!(rx.borrow().brokers[&2].last_heartbeat_ms, 5);
        let (mut other, rx2) = MetadataMachine::new();
        other.restore(&m.snapshot()).expect("restore");
        assert_eq!(**rx2.borrow(), **rx.borrow());
    }

    fn run(m: &mut MetadataMachine, cmd: Command) -> std::result::Result<(), Refusal> {
        serde_json::from_slice(&m.apply(&cmd.encode().expect("encode"))).expect("answer")
    }

    #[test]
    fn topics_are_placed_over_the_brokers_and_refusals_are_the_same_everywhere() {
        let (mut m, rx) = MetadataMachine::new();
        for id in [1, 2, 3] {
            m.apply(
                &Command::Heartbeat {
                    id,
                    address: format!("b{id}:1"),
                    at_ms: 1,
                }
                .encode()
                .expect("encode"),
            );
        }
        let create = |name: &str, partitions, rf| Command::CreateTopic {
            name: name.into(),
            partitions,
            replication_factor: rf,
            configs: BTreeMap::new(),
        };
        assert_eq!(run(&mut m, create("t", 6, 2)), Ok(()));
        let t = rx.borrow().topics["t"].clone();
        let mut leaders: Vec<u64> = t.partitions.iter().map(|p| p.leader).collect();
        for p in &t.partitions {
            assert_eq!(p.replicas.len(), 2);
            assert_ne!(p.replicas[0], p.replicas[1]);
            assert_eq!(p.leader, p.replicas[0]);
        }
        leaders.sort_unstable();
        leaders.dedup();
        assert_eq!(leaders, [1, 2, 3], "leadership spreads over the brokers");
        assert_eq!(run(&mut m, create("t", 1, 1)), Err(Refusal::TopicExists));
        assert_eq!(
            run(&mut m, create("u", 1, 4)),
            Err(Refusal::ReplicationFactor {
                requested: 4,
                available: 3
            })
        );
        assert!(matches!(
            run(
                &mut m,
                Command::CreatePartitions {
                    name: "t".into(),
                    total: 6
                }
            ),
            Err(Refusal::Partitions(_))
        ));
        assert_eq!(
            run(
                &mut m,
                Command::CreatePartitions {
                    name: "t".into(),
                    total: 8
                }
            ),
            Ok(())
        );
        assert_eq!(rx.borrow().topics["t"].partitions.len(), 8);
        assert_eq!(
            run(&mut m, Command::DeleteTopic { name: "t".into() }),
            Ok(())
        );
        assert_eq!(
            run(&mut m, Command::DeleteTopic { name: "t".into() }),
            Err(Refusal::UnknownTopic)
        );
    }
}
