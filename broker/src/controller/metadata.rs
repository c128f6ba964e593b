//! The controller's replicated state machine: cluster metadata, changed only by
//! commands committed through Raft. So far it holds the brokers and when each last
//! heartbeated; topics and partition leadership move here next.

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

/// The whole metadata state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The cluster's id, once one was committed.
    pub cluster_id: Option<String>,
    /// Brokers by id.
    pub brokers: BTreeMap<u64, BrokerInfo>,
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
}
