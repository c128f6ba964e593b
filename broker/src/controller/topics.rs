//! Topics in a cluster: admin changes are committed through the metadata log, and every
//! broker follows that log by opening the logs of the topics it learns of.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::metadata::Command;
use super::Controller;
use crate::error::{BrokerError, Result};
use crate::replication::Replication;
use crate::topic::config::TopicConfig;
use crate::topic::manager::{NewTopic, Topics};

/// How long an admin call waits for this broker to apply its own change.
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// How often the roles of local replicas are looked at again without a metadata change.
const ROLE_RETRY: Duration = Duration::from_millis(200);

/// Creates a topic through the controller, after checking it here as a single broker
/// would; returns once this broker has opened it.
pub async fn create(
    c: &Controller,
    topics: &Topics,
    name: String,
    partitions: u32,
    replication_factor: u32,
    configs: BTreeMap<String, String>,
    validate_only: bool,
) -> Result<()> {
    // Name, partition count and configs are checked by the local rules; the
    // replication factor against the cluster's brokers, by the controller.
    topics
        .create(NewTopic {
            name: name.clone(),
            partitions,
            replication_factor: 1,
            configs: configs.clone(),
            validate_only: true,
            topic_id: 0,
        })
        .await?;
    let brokers = c.metadata().brokers.len() as u32;
    if replication_factor == 0 || replication_factor > brokers {
        return Err(BrokerError::InvalidReplicationFactor {
            requested: i64::from(replication_factor),
            available: brokers,
        });
    }
    if validate_only {
        return Ok(());
    }
    c.change_topic(
        &name,
        &Command::CreateTopic {
            name: name.clone(),
            partitions,
            replication_factor,
            configs,
        },
    )
    .await?;
    wait_local(topics, &name, |t| {
        t.is_some_and(|t| t.partitions.len() as u32 >= partitions)
    })
    .await
}

/// Deletes a topic through the controller.
pub async fn delete(c: &Controller, topics: &Topics, name: String) -> Result<()> {
    c.change_topic(&name, &Command::DeleteTopic { name: name.clone() })
        .await?;
    wait_local(topics, &name, |t| t.is_none()).await
}

/// Grows a topic through the controller.
pub async fn add_partitions(
    c: &Controller,
    topics: &Topics,
    name: String,
    total: u32,
) -> Result<()> {
    c.change_topic(
        &name,
        &Command::CreatePartitions {
            name: name.clone(),
            total,
        },
    )
    .await?;
    wait_local(topics, &name, |t| {
        t.is_some_and(|t| t.partitions.len() as u32 >= total)
    })
    .await
}

/// Changes a topic's config overrides through the controller.
pub async fn alter(
    c: &Controller,
    name: String,
    set: BTreeMap<String, String>,
    delete: Vec<String>,
) -> Result<()> {
    let md = c.metadata();
    let t = md
        .topics
        .get(&name)
        .ok_or_else(|| BrokerError::UnknownTopic(name.clone()))?;
    let mut configs = t.configs.clone();
    for k in &delete {
        configs.remove(k);
    }
    configs.extend(set);
    TopicConfig::resolve(&TopicConfig::default(), &configs).map_err(BrokerError::InvalidConfig)?;
    c.change_topic(
        &name,
        &Command::AlterConfigs {
            name: name.clone(),
            configs,
        },
    )
    .await
}

async fn wait_local(
    topics: &Topics,
    name: &str,
    done: impl Fn(Option<&crate::topic::manager::TopicState>) -> bool,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    loop {
        let md = topics.metadata();
        if done(md.topics.get(name).map(|t| &**t)) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BrokerError::RequestTimedOut(APPLY_WAIT.as_millis() as u64));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Keeps this broker's topics in step with the metadata log: opens what was created or
/// grown, applies config changes, and deletes what the log deleted — also what it
/// deleted (or deleted and created again under a new id) while this broker was away.
/// A topic the log never named (one from before this broker joined a cluster) is left
/// alone.
pub async fn follow(c: Controller, topics: Topics, mut replication: Replication) {
    let mut rx = c.metadata_watch();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    loop {
        let md = rx.borrow_and_update().clone();
        // A restarted broker replays its own Raft log first: until it has heard from
        // the active controller and applied what that one committed, its view may be
        // stale (it could still see itself leading an epoch long over, or miss a
        // deletion), so roles and deletions wait for that.
        let current = c
            .status()
            .await
            .is_ok_and(|s| s.leader.is_some() && s.applied >= s.commit);
        if current {
            for (name, l) in &topics.metadata().topics {
                let id = l.meta.topic_id;
                if id == 0 && !md.topics.contains_key(name) && warned.insert(name.clone()) {
                    tracing::warn!(
                        topic = %name,
                        "this topic's data predates the broker's cluster, which does not know the topic: it takes no writes and serves nothing; create the topic through the cluster, or remove its folders"
                    );
                }
                if id == 0 || md.topics.get(name).is_some_and(|t| t.id == id) {
                    continue;
                }
                tracing::info!(topic = %name, id, "deleting a replica of a topic the cluster deleted");
                if let Err(e) = topics.delete(name.clone()).await {
                    tracing::error!(topic = %name, error = %e, "could not delete a topic the metadata log deleted");
                }
            }
        }
        let local = topics.metadata();
        for (name, t) in &md.topics {
            let result = match local.topics.get(name) {
                // A replica of an older topic of this name waits for its deletion.
                Some(l) if l.meta.topic_id != 0 && l.meta.topic_id != t.id => Ok(()),
                None => topics
                    .create(NewTopic {
                        name: name.clone(),
                        partitions: t.partitions.len() as u32,
                        replication_factor: 1,
                        configs: t.configs.clone(),
                        validate_only: false,
                        topic_id: t.id,
                    })
                    .await
                    .map(|_| ()),
                Some(l) if l.partitions.len() < t.partitions.len() => {
                    topics
                        .add_partitions(name.clone(), t.partitions.len() as u32)
                        .await
                }
                Some(l) if l.meta.configs != t.configs => {
                    let gone = l
                        .meta
                        .configs
                        .keys()
                        .filter(|k| !t.configs.contains_key(*k))
                        .cloned()
                        .collect();
                    topics
                        .alter_config(name.clone(), t.configs.clone(), gone)
                        .await
                }
                Some(_) => Ok(()),
            };
            if let Err(e) = result {
                tracing::error!(topic = %name, error = %e, "could not follow the metadata log for a topic");
            }
        }
        if current {
            replication.apply(&md, &topics).await;
        }
        // Also wake up now and then: partitions that were not open, or a status that
        // was not current, are taken again.
        if let Ok(Err(_)) = tokio::time::timeout(ROLE_RETRY, rx.changed()).await {
            return;
        }
    }
}
