//! Partition replication in a cluster: every broker gives its partitions the role the
//! metadata log names (leader or follower), runs a fetcher for each partition it
//! follows, and sends the ISR changes its leaders ask for to the controller.

pub mod fetcher;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::controller::metadata::{Command, Metadata};
use crate::controller::Controller;
use crate::partition::{IsrChange, LeaderRole, PartitionHandle, ReplicationContext, Role};
use crate::topic::manager::Topics;

/// The role last given to one local partition, and its fetcher when it follows.
struct Applied {
    handle: PartitionHandle,
    role: Role,
    fetcher: Option<JoinHandle<()>>,
}

impl Drop for Applied {
    fn drop(&mut self) {
        if let Some(f) = self.fetcher.take() {
            f.abort();
        }
    }
}

/// Keeps local partitions in the roles the metadata log gives them.
pub struct Replication {
    ctx: ReplicationContext,
    controller: Controller,
    applied: HashMap<(String, u32), Applied>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("broker_id", &self.ctx.broker_id)
            .field("partitions", &self.applied.len())
            .finish()
    }
}

impl Replication {
    /// Starts the task that commits ISR changes through `controller`.
    pub fn start(controller: Controller, lag_max: Duration) -> Replication {
        let (alter, rx) = mpsc::unbounded_channel();
        tokio::spawn(commit_isr_changes(controller.clone(), rx));
        Replication {
            ctx: ReplicationContext {
                broker_id: controller.id(),
                lag_max,
                alter,
            },
            applied: HashMap::new(),
            controller,
        }
    }

    /// Gives every local replica of a partition in `md` its role; starts and stops
    /// fetchers to match. Partitions not open here yet are taken at the next call.
    pub async fn apply(&mut self, md: &Metadata, topics: &Topics) {
        let me = self.ctx.broker_id;
        let local = topics.metadata();
        self.applied
            .retain(|(name, _), _| md.topics.contains_key(name) && local.topics.contains_key(name));
        for (name, t) in &md.topics {
            let Some(lt) = local.topics.get(name) else {
                continue;
            };
            for (i, p) in t.partitions.iter().enumerate() {
                if !p.replicas.contains(&me) {
                    continue;
                }
                let Some(handle) = lt.partitions.get(i) else {
                    continue;
                };
                let role = if p.leader == me {
                    Role::Leader(LeaderRole {
                        epoch: p.leader_epoch,
                        partition_epoch: p.partition_epoch,
                        isr: p.isr.clone(),
                        replicas: p.replicas.clone(),
                    })
                } else {
                    Role::Follower {
                        epoch: p.leader_epoch,
                        leader: p.leader,
                    }
                };
                let key = (name.clone(), i as u32);
                if let Some(a) = self.applied.get(&key) {
                    if a.role == role && a.handle.same_task(handle) {
                        continue;
                    }
                }
                if let Err(e) = handle.set_role(role.clone(), self.ctx.clone()).await {
                    tracing::warn!(topic = %name, partition = i, error = %e, "could not change a replica's role");
                    continue;
                }
                let fetcher = match &role {
                    Role::Follower { epoch, leader } if *leader != 0 => {
                        // Brokers reach each other at their quorum addresses (an inside
                        // network, say), clients at the advertised ones.
                        let address = self
                            .controller
                            .peer_address(*leader)
                            .map(str::to_string)
                            .or_else(|| md.brokers.get(leader).map(|b| b.address.clone()));
                        address.map(|address| {
                            tokio::spawn(fetcher::run(fetcher::Follow {
                                handle: handle.clone(),
                                me,
                                leader: *leader,
                                address,
                                epoch: *epoch,
                            }))
                        })
                    }
                    _ => None,
                };
                tracing::info!(topic = %name, partition = i, ?role, "replica role");
                // Replacing the entry aborts the previous fetcher.
                self.applied.insert(
                    key,
                    Applied {
                        handle: handle.clone(),
                        role,
                        fetcher,
                    },
                );
            }
        }
    }
}

/// Commits the ISR changes leaders ask for, one at a time; a refused one (the partition
/// changed meanwhile) is dropped, and the leader asks again if it still wants it.
async fn commit_isr_changes(c: Controller, mut rx: mpsc::UnboundedReceiver<IsrChange>) {
    while let Some(change) = rx.recv().await {
        let cmd = Command::AlterPartition {
            topic: change.tp.topic.clone(),
            partition: change.tp.partition,
            partition_epoch: change.partition_epoch,
            leader: change.leader,
            isr: change.isr.clone(),
        };
        match c.change_topic(&change.tp.topic, &cmd).await {
            Ok(()) => {
                tracing::info!(partition = %change.tp, isr = ?change.isr, "ISR change committed")
            }
            Err(e) => {
                tracing::info!(partition = %change.tp, isr = ?change.isr, error = %e, "ISR change not committed")
            }
        }
    }
}
