//! The metadata controller: brokers named in `--controller-quorum` form one Raft group
//! (raft-rs) whose replicated state machine holds the cluster metadata. The Raft leader
//! is the active controller; every member answers metadata from its applied state.

pub mod election;
pub mod metadata;
pub mod node;
pub mod store;
pub mod topics;
pub mod transport;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::v1::controller_service_client::ControllerServiceClient;
use sluice_proto::v1::ProposeRequest;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{BrokerError, Result};
use metadata::{BrokerInfo, Command, Metadata, MetadataMachine};
use node::{NodeConfig, NodeStatus, RaftHandle};
use transport::GrpcTransport;

/// Settings of this broker's controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// This broker's id.
    pub node_id: u64,
    /// The address clients use to reach this broker.
    pub advertised_addr: String,
    /// Every quorum member: id and gRPC address.
    pub quorum: Vec<(u64, String)>,
    /// Where the Raft log lives.
    pub dir: PathBuf,
    /// How often this broker heartbeats into the metadata log.
    pub heartbeat_interval: Duration,
    /// A broker silent this long is shown as not alive.
    pub session_timeout: Duration,
    /// This broker's own cluster id, proposed as the cluster's if none is set yet.
    pub cluster_id: String,
    /// Partitions the controller creates `__consumer_offsets` with.
    pub offsets_partitions: u32,
}

/// This broker's member of the controller quorum; cheap to clone.
#[derive(Debug, Clone)]
pub struct Controller {
    id: u64,
    node: RaftHandle,
    quorum: Arc<Vec<(u64, String)>>,
    metadata: watch::Receiver<Arc<Metadata>>,
    session_timeout: Duration,
    offsets_partitions: u32,
    heartbeats: Arc<JoinHandle<()>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Controller {
    /// Opens the Raft log, joins the quorum and starts heartbeating.
    pub fn start(config: ControllerConfig) -> Result<Controller> {
        if !config.quorum.iter().any(|(id, _)| *id == config.node_id) {
            return Err(BrokerError::InvalidConfig(format!(
                "node {} is not in the controller quorum",
                config.node_id
            )));
        }
        let (machine, metadata) = MetadataMachine::new();
        let transport = Arc::new(GrpcTransport::start(config.node_id, &config.quorum));
        let node = node::start(
            NodeConfig {
                id: config.node_id,
                voters: config.quorum.iter().map(|(id, _)| *id).collect(),
                dir: config.dir.clone(),
                tick: Duration::from_millis(100),
                election_ticks: 10,
                heartbeat_ticks: 2,
                snapshot_after: 10_000,
            },
            machine,
            transport,
        )?;
        let quorum = Arc::new(config.quorum.clone());
        let heartbeats = {
            let node = node.clone();
            let quorum = Arc::clone(&quorum);
            let (id, address, every) = (
                config.node_id,
                config.advertised_addr.clone(),
                config.heartbeat_interval,
            );
            let cluster_id = config.cluster_id.clone();
            let named = metadata.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if named.borrow().cluster_id.is_none() {
                        let init = Command::InitCluster {
                            id: cluster_id.clone(),
                        };
                        if let Err(e) = propose_via(&node, &quorum, &init, 1).await {
                            tracing::debug!(error = %e, "cluster id not committed yet");
                        }
                    }
                    let cmd = Command::Heartbeat {
                        id,
                        address: address.clone(),
                        at_ms: now_ms(),
                    };
                    if let Err(e) = propose_via(&node, &quorum, &cmd, 1).await {
                        tracing::debug!(error = %e, "broker heartbeat not committed");
                    }
                }
            })
        };
        Ok(Controller {
            id: config.node_id,
            node,
            quorum,
            metadata,
            session_timeout: config.session_timeout,
            offsets_partitions: config.offsets_partitions,
            heartbeats: Arc::new(heartbeats),
        })
    }

    /// This broker's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The local Raft node.
    pub fn node(&self) -> &RaftHandle {
        &self.node
    }

    /// The address quorum member `id` is reached at by other brokers (its entry in
    /// `--controller-quorum`), which may differ from the one it advertises to clients.
    pub fn peer_address(&self, id: u64) -> Option<&str> {
        self.quorum
            .iter()
            .find(|(v, _)| *v == id)
            .map(|(_, a)| a.as_str())
    }

    /// How many brokers form the quorum.
    pub fn quorum_size(&self) -> usize {
        self.quorum.len()
    }

    /// Whether `id` is a quorum member.
    pub fn is_voter(&self, id: u64) -> bool {
        self.quorum.iter().any(|(v, _)| *v == id)
    }

    /// A receiver that sees every applied metadata change.
    pub fn metadata_watch(&self) -> watch::Receiver<Arc<Metadata>> {
        self.metadata.clone()
    }

    /// The latest applied metadata.
    pub fn metadata(&self) -> Arc<Metadata> {
        Arc::clone(&self.metadata.borrow())
    }

    /// The local Raft node's status (leader, term, commit).
    pub async fn status(&self) -> Result<NodeStatus> {
        self.node.status().await
    }

    /// How long a broker may be silent before it counts as gone.
    pub fn session_timeout(&self) -> Duration {
        self.session_timeout
    }

    /// Partitions `__consumer_offsets` is created with.
    pub fn offsets_partitions(&self) -> u32 {
        self.offsets_partitions
    }

    /// Whether a broker heartbeated within the session timeout.
    pub fn is_alive(&self, b: &BrokerInfo) -> bool {
        now_ms().saturating_sub(b.last_heartbeat_ms) < self.session_timeout.as_millis() as i64
    }

    /// Commits a command through the active controller, wherever it is, retrying while
    /// an election runs.
    pub async fn propose(&self, cmd: &Command) -> Result<Vec<u8>> {
        propose_via(&self.node, &self.quorum, cmd, 50).await
    }

    /// Commits a topic command and turns a refusal into the client's error.
    pub async fn change_topic(&self, topic: &str, cmd: &Command) -> Result<()> {
        let answer = self.propose(cmd).await?;
        let outcome: std::result::Result<(), metadata::Refusal> =
            serde_json::from_slice(&answer)
                .map_err(|e| BrokerError::Internal(format!("controller answer: {e}")))?;
        outcome.map_err(|r| r.into_error(topic))
    }

    /// Waits (at most `timeout`) until this broker's applied metadata satisfies `ready`.
    pub async fn wait_for(&self, timeout: Duration, ready: impl Fn(&Metadata) -> bool) -> bool {
        let mut rx = self.metadata.clone();
        tokio::time::timeout(timeout, rx.wait_for(|m| ready(m)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops heartbeating and the Raft node.
    pub async fn shutdown(&self) {
        self.heartbeats.abort();
        self.node.stop().await;
    }
}

/// Proposes locally, or forwards to the leader the local node names.
async fn propose_via(
    node: &RaftHandle,
    quorum: &[(u64, String)],
    cmd: &Command,
    attempts: u32,
) -> Result<Vec<u8>> {
    let data = cmd.encode()?;
    let mut last = BrokerError::NotController(None);
    for _ in 0..attempts.max(1) {
        match node.propose(data.clone()).await {
            Ok(answer) => return Ok(answer),
            Err(BrokerError::NotController(Some(leader))) if leader != node.id() => {
                match forward(quorum, leader, &data).await {
                    Ok(answer) => return Ok(answer),
                    Err(e) => last = e,
                }
            }
            Err(e @ BrokerError::NotController(_)) => last = e,
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

async fn forward(quorum: &[(u64, String)], leader: u64, data: &[u8]) -> Result<Vec<u8>> {
    let Some((_, addr)) = quorum.iter().find(|(id, _)| *id == leader) else {
        return Err(BrokerError::NotController(None));
    };
    let endpoint = crate::peer_endpoint(addr, Duration::from_secs(10))
        .map_err(|e| BrokerError::Internal(format!("controller address {addr}: {e}")))?;
    let mut client = ControllerServiceClient::new(endpoint.connect_lazy());
    let answer = client
        .propose(ProposeRequest {
            command: data.to_vec().into(),
        })
        .await
        .map_err(|status| {
            // Whatever went wrong there, the caller retries against whoever leads next.
            tracing::debug!(error = %status, "forwarding to the controller failed");
            BrokerError::NotController(None)
        })?;
    Ok(answer.into_inner().answer.to_vec())
}
