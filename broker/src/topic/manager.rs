//! The one owner of topic metadata: creates, deletes, grows and reconfigures topics, and
//! publishes each new state as an immutable snapshot that request handlers read.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use sluice_log_store::manager::is_valid_topic_name;
use sluice_log_store::{Log, LogManager, TopicPartition};
use tokio::sync::{mpsc, oneshot, watch};

use super::config::TopicConfig;
use super::registry::{self, TopicMeta};
use crate::error::{BrokerError, Result};
use crate::partition::PartitionHandle;

/// Most partitions one topic may have.
pub const MAX_PARTITIONS: u32 = 10_000;

/// A topic as request handlers see it.
#[derive(Debug)]
pub struct TopicState {
    /// Persisted metadata.
    pub meta: TopicMeta,
    /// Effective configuration.
    pub config: TopicConfig,
    /// One handle per partition, indexed by partition number.
    pub partitions: Vec<PartitionHandle>,
}

impl TopicState {
    /// The handle of partition `p`, or the error a client should see.
    pub fn partition(&self, p: i64) -> Result<&PartitionHandle> {
        usize::try_from(p)
            .ok()
            .and_then(|i| self.partitions.get(i))
            .ok_or_else(|| BrokerError::UnknownPartition {
                topic: self.meta.name.clone(),
                partition: p,
                count: self.meta.partitions,
            })
    }
}

/// Every topic, as of one moment.
#[derive(Debug, Default)]
pub struct Metadata {
    /// Topics by name.
    pub topics: BTreeMap<String, Arc<TopicState>>,
}

impl Metadata {
    /// The topic named `name`, or `UnknownTopic`.
    pub fn topic(&self, name: &str) -> Result<&Arc<TopicState>> {
        self.topics
            .get(name)
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))
    }
}

/// A topic to create.
#[derive(Debug, Clone)]
pub struct NewTopic {
    /// Name.
    pub name: String,
    /// Partitions (0 means the broker default).
    pub partitions: u32,
    /// Replication factor (0 means the broker default).
    pub replication_factor: i64,
    /// Config overrides.
    pub configs: BTreeMap<String, String>,
    /// Only check that the topic could be created.
    pub validate_only: bool,
    /// The cluster's id for this topic (0: a topic of this broker alone).
    pub topic_id: u64,
}

enum AdminCommand {
    Create(NewTopic, oneshot::Sender<Result<Arc<TopicState>>>),
    Delete(String, oneshot::Sender<Result<()>>),
    AddPartitions(String, u32, oneshot::Sender<Result<()>>),
    AlterConfig {
        name: String,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
        reply: oneshot::Sender<Result<()>>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// Broker-wide settings the topic manager needs.
#[derive(Debug, Clone)]
pub struct TopicDefaults {
    /// Config of a topic that sets nothing.
    pub config: TopicConfig,
    /// Partitions of a topic created without a count.
    pub partitions: u32,
    /// Replication factor of a topic created without one.
    pub replication_factor: u32,
    /// Brokers that can hold replicas (1 for a single node).
    pub brokers: u32,
    /// In a cluster, a partition waits for the metadata log to make it leader or
    /// follower before it takes writes.
    pub replicated: bool,
}

/// Reaches the topic manager; cheap to clone.
#[derive(Clone, Debug)]
pub struct Topics {
    tx: mpsc::Sender<AdminCommand>,
    snapshot: watch::Receiver<Arc<Metadata>>,
}

impl Topics {
    /// Loads topics from the data directory, opens every partition log, and starts the
    /// manager task.
    pub fn start(manager: Arc<LogManager>, defaults: TopicDefaults) -> Result<Topics> {
        let data_dir = manager.data_dir().to_path_buf();
        let metas = registry::load(&data_dir).map_err(BrokerError::Internal)?;
        let mut owner = Owner {
            data_dir,
            manager,
            defaults,
            metas: BTreeMap::new(),
            topics: BTreeMap::new(),
            publish: None,
        };
        for meta in metas.into_values() {
            owner.open_existing(meta)?;
        }
        owner.remove_strays()?;
        let (publish, snapshot) = watch::channel(owner.snapshot());
        owner.publish = Some(publish);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(owner.run(rx));
        Ok(Topics { tx, snapshot })
    }

    /// The current metadata.
    pub fn metadata(&self) -> Arc<Metadata> {
        Arc::clone(&self.snapshot.borrow())
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> AdminCommand,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        rx.await.map_err(|_| BrokerError::ShuttingDown)?
    }

    /// Creates a topic.
    pub async fn create(&self, topic: NewTopic) -> Result<Arc<TopicState>> {
        self.call(|r| AdminCommand::Create(topic, r)).await
    }

    /// Deletes a topic and its data.
    pub async fn delete(&self, name: String) -> Result<()> {
        self.call(|r| AdminCommand::Delete(name, r)).await
    }

    /// Grows a topic to `total` partitions.
    pub async fn add_partitions(&self, name: String, total: u32) -> Result<()> {
        self.call(|r| AdminCommand::AddPartitions(name, total, r))
            .await
    }

    /// Sets and removes config overrides of a topic.
    pub async fn alter_config(
        &self,
        name: String,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
    ) -> Result<()> {
        self.call(|reply| AdminCommand::AlterConfig {
            name,
            set,
            delete,
            reply,
        })
        .await
    }

    /// Closes every partition cleanly.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(AdminCommand::Shutdown(reply)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Owner {
    data_dir: PathBuf,
    manager: Arc<LogManager>,
    defaults: TopicDefaults,
    metas: BTreeMap<String, TopicMeta>,
    topics: BTreeMap<String, Arc<TopicState>>,
    publish: Option<watch::Sender<Arc<Metadata>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Owner {
    fn snapshot(&self) -> Arc<Metadata> {
        Arc::new(Metadata {
            topics: self.topics.clone(),
        })
    }

    fn publish(&self) {
        if let Some(p) = &self.publish {
            p.send_replace(self.snapshot());
        }
    }

    fn persist(&self, metas: &BTreeMap<String, TopicMeta>) -> Result<()> {
        registry::store(&self.data_dir, metas)
            .map_err(|e| BrokerError::Storage(format!("writing topic metadata: {e}")))
    }

    fn resolve(&self, meta: &TopicMeta) -> Result<TopicConfig> {
        TopicConfig::resolve(&self.defaults.config, &meta.configs)
            .map_err(BrokerError::InvalidConfig)
    }

    fn spawn(&self, tp: TopicPartition, log: Log, config: &TopicConfig) -> PartitionHandle {
        PartitionHandle::spawn(
            tp,
            log,
            config.clone(),
            Arc::clone(&self.manager),
            self.defaults.replicated,
        )
    }

    fn open_partition(&self, tp: &TopicPartition, config: &TopicConfig) -> Result<PartitionHandle> {
        let log = if self.manager.partition_dir(tp).is_dir() {
            self.manager.open_log(tp, config.log.clone())?
        } else {
            // Metadata was persisted before the folder was made: make it now.
            self.manager.create(tp, config.log.clone())?
        };
        Ok(self.spawn(tp.clone(), log, config))
    }

    fn open_existing(&mut self, meta: TopicMeta) -> Result<()> {
        let config = self.resolve(&meta)?;
        let mut partitions = Vec::new();
        for p in 0..meta.partitions {
            partitions.push(self.open_partition(&TopicPartition::new(&meta.name, p), &config)?);
        }
        self.topics.insert(
            meta.name.clone(),
            Arc::new(TopicState {
                meta: meta.clone(),
                config,
                partitions,
            }),
        );
        self.metas.insert(meta.name.clone(), meta);
        Ok(())
    }

    /// Deletes partition folders no topic owns: what a crash left of a deleted topic.
    fn remove_strays(&self) -> Result<()> {
        for tp in self.manager.partitions()? {
            let owned = self
                .metas
                .get(&tp.topic)
                .is_some_and(|m| tp.partition < m.partitions);
            if !owned {
                tracing::warn!(partition = %tp, "deleting the log of a partition no topic owns");
                let log = self
                    .manager
                    .open_log(&tp, self.defaults.config.log.clone())?;
                self.manager.delete(log)?;
            }
        }
        Ok(())
    }

    async fn run(mut self, mut rx: mpsc::Receiver<AdminCommand>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                AdminCommand::Create(t, reply) => {
                    let _ = reply.send(self.create(t));
                }
                AdminCommand::Delete(name, reply) => {
                    let _ = reply.send(self.delete(&name).await);
                }
                AdminCommand::AddPartitions(name, total, reply) => {
                    let _ = reply.send(self.add_partitions(&name, total));
                }
                AdminCommand::AlterConfig {
                    name,
                    set,
                    delete,
                    reply,
                } => {
                    let _ = reply.send(self.alter_config(&name, set, delete).await);
                }
                AdminCommand::Shutdown(reply) => {
                    for topic in self.topics.values() {
                        for p in &topic.partitions {
                            if let Err(e) = p.close().await {
                                tracing::error!(partition = %p.topic_partition(), error = %e, "close failed");
                            }
                        }
                    }
                    self.topics.clear();
                    self.publish();
                    // Partition tasks drop their share of the log manager just after they
                    // answer `close`; wait for that, then drop ours, so the data directory
                    // is unlocked before anyone hears the broker has stopped.
                    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
                    while Arc::strong_count(&self.manager) > 1
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                    drop(self);
                    let _ = reply.send(());
                    return;
                }
            }
        }
    }

    fn create(&mut self, t: NewTopic) -> Result<Arc<TopicState>> {
        if !is_valid_topic_name(&t.name) {
            return Err(BrokerError::InvalidTopic(t.name));
        }
        if self.metas.contains_key(&t.name) {
            return Err(BrokerError::TopicExists(t.name));
        }
        let partitions = if t.partitions == 0 {
            self.defaults.partitions
        } else {
            t.partitions
        };
        if partitions > MAX_PARTITIONS {
            return Err(BrokerError::InvalidPartitions(format!(
                "{partitions} partitions is more than the limit of {MAX_PARTITIONS}"
            )));
        }
        let replication_factor = match t.replication_factor {
            0 => i64::from(self.defaults.replication_factor),
            n => n,
        };
        if replication_factor < 1 || replication_factor > i64::from(self.defaults.brokers) {
            return Err(BrokerError::InvalidReplicationFactor {
                requested: replication_factor,
                available: self.defaults.brokers,
            });
        }
        let meta = TopicMeta {
            name: t.name.clone(),
            partitions,
            replication_factor: replication_factor as u32,
            configs: t.configs,
            created_ms: now_ms(),
            topic_id: t.topic_id,
        };
        let config = self.resolve(&meta)?;
        if t.validate_only {
            return Ok(Arc::new(TopicState {
                meta,
                config,
                partitions: Vec::new(),
            }));
        }
        let mut metas = self.metas.clone();
        metas.insert(meta.name.clone(), meta.clone());
        self.persist(&metas)?;
        let mut handles = Vec::new();
        for p in 0..partitions {
            let tp = TopicPartition::new(&meta.name, p);
            match self.manager.create(&tp, config.log.clone()) {
                Ok(log) => handles.push(self.spawn(tp, log, &config)),
                Err(e) => {
                    // Undo: forget the topic; its strays are removed at the next start.
                    let _ = self.persist(&self.metas);
                    return Err(e.into());
                }
            }
        }
        let state = Arc::new(TopicState {
            meta: meta.clone(),
            config,
            partitions: handles,
        });
        self.metas = metas;
        self.topics.insert(meta.name.clone(), Arc::clone(&state));
        self.publish();
        tracing::info!(topic = %meta.name, partitions, "created topic");
        Ok(state)
    }

    async fn delete(&mut self, name: &str) -> Result<()> {
        let Some(state) = self.topics.get(name).cloned() else {
            return Err(BrokerError::UnknownTopic(name.to_string()));
        };
        let mut metas = self.metas.clone();
        metas.remove(name);
        // Forget first: a crash after this leaves only stray folders, which the next
        // start removes; the topic never comes back.
        self.persist(&metas)?;
        self.metas = metas;
        self.topics.remove(name);
        self.publish();
        for p in &state.partitions {
            if let Err(e) = p.delete().await {
                tracing::error!(partition = %p.topic_partition(), error = %e, "deleting partition log failed");
            }
        }
        tracing::info!(topic = %name, "deleted topic");
        Ok(())
    }

    fn add_partitions(&mut self, name: &str, total: u32) -> Result<()> {
        let Some(state) = self.topics.get(name).cloned() else {
            return Err(BrokerError::UnknownTopic(name.to_string()));
        };
        let current = state.meta.partitions;
        if total <= current {
            return Err(BrokerError::InvalidPartitions(format!(
                "topic {name:?} has {current} partitions; the new count must be larger"
            )));
        }
        if total > MAX_PARTITIONS {
            return Err(BrokerError::InvalidPartitions(format!(
                "{total} partitions is more than the limit of {MAX_PARTITIONS}"
            )));
        }
        let mut meta = state.meta.clone();
        meta.partitions = total;
        let mut metas = self.metas.clone();
        metas.insert(name.to_string(), meta.clone());
        self.persist(&metas)?;
        let mut partitions = state.partitions.clone();
        for p in current..total {
            partitions.push(self.open_partition(&TopicPartition::new(name, p), &state.config)?);
        }
        self.metas = metas;
        self.topics.insert(
            name.to_string(),
            Arc::new(TopicState {
                meta,
                config: state.config.clone(),
                partitions,
            }),
        );
        self.publish();
        Ok(())
    }

    async fn alter_config(
        &mut self,
        name: &str,
        set: BTreeMap<String, String>,
        delete: Vec<String>,
    ) -> Result<()> {
        let Some(state) = self.topics.get(name).cloned() else {
            return Err(BrokerError::UnknownTopic(name.to_string()));
        };
        let mut meta = state.meta.clone();
        for key in &delete {
            meta.configs.remove(key);
        }
        meta.configs.extend(set);
        let config = self.resolve(&meta)?;
        let mut metas = self.metas.clone();
        metas.insert(name.to_string(), meta.clone());
        self.persist(&metas)?;
        for p in &state.partitions {
            p.set_config(config.clone()).await?;
        }
        self.metas = metas;
        self.topics.insert(
            name.to_string(),
            Arc::new(TopicState {
                meta,
                config,
                partitions: state.partitions.clone(),
            }),
        );
        self.publish();
        Ok(())
    }
}
