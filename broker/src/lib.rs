//! The Sluice broker as a library: [`Broker::start`] runs a whole broker on a listener
//! you bind, until a shutdown future you choose completes. `main.rs` only parses flags;
//! tests and users embed real brokers the same way:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use sluice_broker::{Broker, BrokerConfig};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let config = BrokerConfig { data_dir: "/tmp/sluice-test".into(), ..BrokerConfig::default() };
//! let broker = Broker::start(config, listener, std::future::pending()).await?;
//! println!("broker on {}", broker.local_addr());
//! broker.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod controller;
pub mod error;
pub mod group;
pub mod grpc;
pub mod partition;
pub mod replication;
pub mod topic;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sluice_log_store::LogManager;
use sluice_proto::v1::admin_service_server::AdminServiceServer;
use sluice_proto::v1::fetch_service_server::FetchServiceServer;
use sluice_proto::v1::group_service_server::GroupServiceServer;
use sluice_proto::v1::produce_service_server::ProduceServiceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

pub use config::{BrokerArgs, BrokerConfig};
pub use error::BrokerError;

use controller::{Controller, ControllerConfig};
use group::{CoordinatorConfig, GroupCoordinator};
use grpc::admin::AdminSvc;
use grpc::controller::ControllerSvc;
use grpc::fetch::{FetchRoutes, FetchSvc};
use grpc::group::GroupSvc;
use grpc::produce::{ProduceRoutes, ProduceSvc};
use grpc::replica::ReplicaRoutes;
use grpc::Context;
use sluice_proto::v1::controller_service_server::ControllerServiceServer;
use topic::manager::{TopicDefaults, Topics};

pub use sluice_proto::{MAX_FRAME_BYTES, MAX_MESSAGE_BYTES};

/// The endpoint of another broker at `addr` (`host:port`): it connects within a second,
/// gives each call `timeout`, and sends small messages at once (with Nagle's algorithm
/// a request could wait about 40 ms for the peer's delayed ACK).
pub(crate) fn peer_endpoint(
    addr: &str,
    timeout: Duration,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(timeout)
            .tcp_nodelay(true)
            .max_frame_size(MAX_FRAME_BYTES),
    )
}

/// How often a broker in a cluster heartbeats into the metadata log.
const BROKER_HEARTBEAT: Duration = Duration::from_secs(1);
/// A broker silent this long is shown as not alive.
const BROKER_SESSION: Duration = Duration::from_secs(6);

/// The folder of the data directory holding the controller's Raft log.
const RAFT_DIR: &str = "raft";

/// How long in-flight requests may take to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Starts brokers.
#[derive(Debug)]
pub struct Broker;

/// A running broker.
#[derive(Debug)]
pub struct BrokerHandle {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: JoinHandle<Result<(), BrokerError>>,
}

impl BrokerHandle {
    /// The address the broker listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, finishes in-flight requests, flushes and closes every log.
    pub async fn shutdown(mut self) -> Result<(), BrokerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.wait().await
    }

    /// Waits until the broker stops (its shutdown future completed).
    pub async fn wait(self) -> Result<(), BrokerError> {
        self.done
            .await
            .map_err(|e| BrokerError::Internal(format!("broker task failed: {e}")))?
    }
}

impl Broker {
    /// Opens the data directory, loads topics, and serves the gRPC API on `listener`
    /// until `shutdown` completes (or [`BrokerHandle::shutdown`] is called).
    pub async fn start(
        config: BrokerConfig,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<BrokerHandle, BrokerError> {
        config.validate().map_err(BrokerError::InvalidConfig)?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| BrokerError::Storage(format!("listener address: {e}")))?;
        let manager = Arc::new(LogManager::open(&config.data_dir)?.with_other_folder(RAFT_DIR));
        let cluster_id = load_cluster_id(&config.data_dir)?;
        let defaults = TopicDefaults {
            config: config.topic_config().map_err(BrokerError::InvalidConfig)?,
            partitions: config.default_partitions,
            replication_factor: config.default_replication_factor,
            brokers: 1,
            replicated: !config.controller_quorum.is_empty(),
        };
        let topics = Topics::start(manager, defaults)?;
        let coordinator_config = CoordinatorConfig {
            session_timeout: config.group_session_timeout,
            heartbeat_interval: config.group_heartbeat_interval,
            rebalance_timeout: config.group_rebalance_timeout,
            offsets_retention: config.offsets_retention,
            compact_after_records: config.offsets_compact_after_records,
            offsets_partitions: config.offsets_topic_partitions,
        };
        let groups = if config.controller_quorum.is_empty() {
            GroupCoordinator::start(topics.clone(), coordinator_config).await?
        } else {
            GroupCoordinator::start_in_cluster(topics.clone(), coordinator_config)
        };
        let controller = if config.controller_quorum.is_empty() {
            None
        } else {
            Some(Controller::start(ControllerConfig {
                node_id: u64::from(config.node_id),
                advertised_addr: config.advertised_addr.clone(),
                quorum: config.controller_quorum.clone(),
                dir: config.data_dir.join(RAFT_DIR),
                heartbeat_interval: BROKER_HEARTBEAT,
                session_timeout: BROKER_SESSION,
                cluster_id: cluster_id.clone(),
                offsets_partitions: config.offsets_topic_partitions,
            })?)
        };
        if let Some(c) = &controller {
            let replication =
                replication::Replication::start(c.clone(), config.replica_lag_time_max);
            tokio::spawn(controller::topics::follow(
                c.clone(),
                topics.clone(),
                replication,
            ));
            tokio::spawn(controller::election::run(c.clone()));
            tokio::spawn(group::follow_offsets_leadership(c.clone(), groups.clone()));
        }
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let ctx = Arc::new(Context {
            config,
            topics: topics.clone(),
            groups,
            controller: controller.clone(),
            cluster_id,
            stopping,
        });

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| BrokerError::Internal(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sluice_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| BrokerError::Internal(format!("reflection: {e}")))?;

        let produce = ProduceRoutes::over(Arc::clone(&ctx));
        let fetch = FetchRoutes::over(Arc::clone(&ctx));
        let admin = AdminServiceServer::new(AdminSvc::new(Arc::clone(&ctx)));
        let group = GroupServiceServer::new(GroupSvc::new(Arc::clone(&ctx)));
        let controller_svc = controller
            .clone()
            .map(|c| ControllerServiceServer::new(ControllerSvc::new(c)));
        let replica_svc = controller
            .is_some()
            .then(|| ReplicaRoutes::over(Arc::clone(&ctx)));

        // A single node is part of its cluster as soon as its topics are open.
        health_reporter
            .set_serving::<ProduceServiceServer<ProduceSvc>>()
            .await;
        health_reporter
            .set_serving::<FetchServiceServer<FetchSvc>>()
            .await;
        health_reporter
            .set_serving::<AdminServiceServer<AdminSvc>>()
            .await;
        health_reporter
            .set_serving::<GroupServiceServer<GroupSvc>>()
            .await;
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let stopping_tx = Arc::new(stopping_tx);
        let stop = {
            let stopping_tx = Arc::clone(&stopping_tx);
            async move {
                tokio::select! {
                    () = shutdown => {}
                    _ = stop_rx => {}
                }
                stopping_tx.send_replace(true);
            }
        };
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(produce)
            .add_service(fetch)
            .add_service(admin)
            .add_service(group)
            .add_optional_service(controller_svc)
            .add_optional_service(replica_svc);
        // `Server::tcp_nodelay` covers only sockets the server accepts itself; these come
        // from our listener. Without it, a small answer (an ack, a follower's fetch)
        // waits for the peer's delayed ACK: about 40 ms, every round trip.
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            if let Ok(c) = &conn {
                if let Err(e) = c.set_nodelay(true) {
                    tracing::warn!(error = %e, "could not set TCP_NODELAY");
                }
            }
            conn
        });
        tracing::info!(address = %local_addr, node_id = ctx.config.node_id, data_dir = %ctx.config.data_dir.display(), "sluice broker started");
        let done = tokio::spawn(async move {
            let serve = server.serve_with_incoming_shutdown(incoming, stop);
            let mut stopping = stopping_tx.subscribe();
            // In-flight requests get a grace period; then the connections are dropped.
            let grace = async move {
                let _ = stopping.wait_for(|s| *s).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            };
            let served = tokio::select! {
                r = serve => r,
                () = grace => {
                    tracing::warn!("requests still open after the grace period; closing them");
                    Ok(())
                }
            };
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            // In-flight requests are done; close every log cleanly.
            if let Some(c) = &controller {
                c.shutdown().await;
            }
            topics.shutdown().await;
            tracing::info!("sluice broker stopped");
            served.map_err(|e| BrokerError::Internal(format!("gRPC server: {e}")))
        });
        Ok(BrokerHandle {
            local_addr,
            stop: Some(stop_tx),
            done,
        })
    }
}

/// Reads the cluster id from the data directory, making one on first start.
fn load_cluster_id(data_dir: &Path) -> Result<String, BrokerError> {
    let path = data_dir.join("cluster.id");
    match std::fs::read_to_string(&path) {
        Ok(id) => return Ok(id.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(BrokerError::Storage(format!("{}: {e}", path.display()))),
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mixed = nanos ^ (u128::from(std::process::id()) << 64);
    let id = format!(
        "{:032x}",
        mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    );
    std::fs::write(&path, &id)
        .map_err(|e| BrokerError::Storage(format!("{}: {e}", path.display())))?;
    Ok(id)
}
