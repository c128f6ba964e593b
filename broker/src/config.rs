//! Broker configuration, layered: defaults < TOML file (`--config`) < `SLUICE_*`
//! environment < flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::topic::config::TopicConfig;

/// The `sluice-broker` command line. Every flag can also be set by its environment
/// variable or in the TOML file given with `--config` (same names, `_` for `-`).
#[derive(Debug, Default, Parser)]
#[command(name = "sluice-broker", version, about = "The Sluice message broker")]
pub struct BrokerArgs {
    /// TOML file with any of the settings below.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This broker's id in the cluster [default: 1].
    #[arg(long, env = "SLUICE_NODE_ID")]
    pub node_id: Option<u32>,
    /// Folder for partition logs and metadata [default: ./data].
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on for clients and peers [default: 127.0.0.1:9292].
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address clients should use to reach this broker [default: the listen address].
    #[arg(long, env = "SLUICE_ADVERTISED_ADDR")]
    pub advertised_addr: Option<String>,
    /// Create a topic with default settings when a producer writes to an unknown one
    /// [default: false].
    #[arg(long, env = "SLUICE_AUTO_CREATE_TOPICS", num_args = 0..=1, default_missing_value = "true")]
    pub auto_create_topics: Option<bool>,
    /// Partitions of a topic created without a count [default: 1].
    #[arg(long, env = "SLUICE_DEFAULT_PARTITIONS")]
    pub default_partitions: Option<u32>,
    /// Replication factor of a topic created without one [default: 1].
    #[arg(long, env = "SLUICE_DEFAULT_REPLICATION_FACTOR")]
    pub default_replication_factor: Option<u32>,
    /// Default topic config, `key=value` (repeatable; the environment variable takes a
    /// comma-separated list), e.g. `retention.ms=3d`, `flush.policy=os`.
    #[arg(
        long = "topic-config",
        env = "SLUICE_TOPIC_CONFIG",
        value_delimiter = ','
    )]
    pub topic_config: Vec<String>,
    /// The metadata controller quorum, `id@host:port,…` (each member's gRPC address);
    /// empty for a single broker without Raft.
    #[arg(long, env = "SLUICE_CONTROLLER_QUORUM")]
    pub controller_quorum: Option<String>,
    /// A group member silent this long is removed, in ms [default: 45000].
    #[arg(long, env = "SLUICE_GROUP_SESSION_TIMEOUT_MS")]
    pub group_session_timeout_ms: Option<u64>,
    /// How long a group member may keep partitions it was told to give up before it is
    /// removed, in ms [default: 300000].
    #[arg(long, env = "SLUICE_GROUP_REBALANCE_TIMEOUT_MS")]
    pub group_rebalance_timeout_ms: Option<u64>,
    /// How often group members heartbeat, in ms [default: 3000].
    #[arg(long, env = "SLUICE_GROUP_HEARTBEAT_INTERVAL_MS")]
    pub group_heartbeat_interval_ms: Option<u64>,
    /// Committed offsets of a group empty this long expire, in minutes [default: 10080].
    #[arg(long, env = "SLUICE_OFFSETS_RETENTION_MINUTES")]
    pub offsets_retention_minutes: Option<u64>,
    /// A follower not caught up with its leader for this long leaves the ISR, in ms
    /// [default: 30000].
    #[arg(long, env = "SLUICE_REPLICA_LAG_TIME_MAX_MS")]
    pub replica_lag_time_max_ms: Option<u64>,
    /// Partitions `__consumer_offsets` is created with; groups hash over them and each
    /// partition's leader coordinates its groups [default: 8]. A topic that exists
    /// keeps its count.
    #[arg(long, env = "SLUICE_OFFSETS_TOPIC_PARTITIONS")]
    pub offsets_topic_partitions: Option<u32>,
    /// Threads that serve connections and run the partitions' small rounds; large
    /// rounds and fsyncs run on threads of their own [default: half the CPUs, at
    /// least 1].
    #[arg(long, env = "SLUICE_NETWORK_THREADS")]
    pub network_threads: Option<usize>,
}

/// The TOML file's shape: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
struct FileConfig {
    node_id: Option<u32>,
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    advertised_addr: Option<String>,
    auto_create_topics: Option<bool>,
    default_partitions: Option<u32>,
    default_replication_factor: Option<u32>,
    #[serde(default)]
    topic_config: BTreeMap<String, String>,
    group_session_timeout_ms: Option<u64>,
    group_heartbeat_interval_ms: Option<u64>,
    group_rebalance_timeout_ms: Option<u64>,
    offsets_retention_minutes: Option<u64>,
    controller_quorum: Option<String>,
    replica_lag_time_max_ms: Option<u64>,
    offsets_topic_partitions: Option<u32>,
    network_threads: Option<usize>,
}

/// The broker's effective configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// This broker's id.
    pub node_id: u32,
    /// Folder for partition logs and metadata.
    pub data_dir: PathBuf,
    /// Listen address.
    pub listen: SocketAddr,
    /// Address clients use (defaults to the listen address).
    pub advertised_addr: String,
    /// Create unknown topics on produce.
    pub auto_create_topics: bool,
    /// Partitions of a topic created without a count.
    pub default_partitions: u32,
    /// Replication factor of a topic created without one.
    pub default_replication_factor: u32,
    /// Default topic config overrides (Kafka keys).
    pub topic_defaults: BTreeMap<String, String>,
    /// A group member silent this long is removed (`group.consumer.session.timeout.ms`).
    pub group_session_timeout: Duration,
    /// How often members heartbeat (`group.consumer.heartbeat.interval.ms`).
    pub group_heartbeat_interval: Duration,
    /// How long a member may keep partitions it was told to give up.
    pub group_rebalance_timeout: Duration,
    /// Offsets of a group empty this long expire (`offsets.retention.minutes`).
    pub offsets_retention: Duration,
    /// `__consumer_offsets` is compacted once it holds this many superseded records.
    pub offsets_compact_after_records: u64,
    /// Partitions `__consumer_offsets` is created with (`offsets.topic.num.partitions`).
    pub offsets_topic_partitions: u32,
    /// Controller quorum members (id, gRPC address); empty on a single broker.
    pub controller_quorum: Vec<(u64, String)>,
    /// A follower not caught up for this long leaves the ISR (`replica.lag.time.max.ms`).
    pub replica_lag_time_max: Duration,
    /// Worker threads of the async runtime (connections and partition tasks).
    pub network_threads: usize,
}

/// Most network threads a broker may be given.
pub const MAX_NETWORK_THREADS: usize = 256;

/// Half the CPUs this process may run on, at least one. Every hand-off between
/// threads costs a wake-up, so fewer threads than CPUs serve requests with less CPU
/// each; the other half is left to the threads that write, fsync and read the logs
/// (on two CPUs, one network thread took a sixth to a third less broker CPU per produce
/// request than two, at the same throughput: docs/benchmarks-history.md).
fn default_network_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9292";

impl Default for BrokerConfig {
    fn default() -> Self {
        let listen: SocketAddr = DEFAULT_LISTEN
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9292)));
        BrokerConfig {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            listen,
            advertised_addr: listen.to_string(),
            auto_create_topics: false,
            default_partitions: 1,
            default_replication_factor: 1,
            topic_defaults: BTreeMap::new(),
            group_session_timeout: Duration::from_secs(45),
            group_heartbeat_interval: Duration::from_secs(3),
            group_rebalance_timeout: Duration::from_secs(300),
            offsets_retention: Duration::from_secs(7 * 24 * 60 * 60),
            offsets_compact_after_records: 100_000,
            offsets_topic_partitions: 8,
            controller_quorum: Vec::new(),
            replica_lag_time_max: Duration::from_secs(30),
            network_threads: default_network_threads(),
        }
    }
}

impl BrokerConfig {
    /// Resolves flags and environment (already merged by clap) over the TOML file over
    /// the defaults, then validates.
    pub fn from_args(args: BrokerArgs) -> Result<BrokerConfig, String> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading config file {}: {e}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| format!("config file {}: {e}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let d = BrokerConfig::default();
        let listen = args.listen.or(file.listen).unwrap_or(d.listen);
        let mut topic_defaults = file.topic_config;
        for pair in &args.topic_config {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("--topic-config {pair:?}: expected key=value"))?;
            topic_defaults.insert(k.trim().to_string(), v.trim().to_string());
        }
        let config = BrokerConfig {
            node_id: args.node_id.or(file.node_id).unwrap_or(d.node_id),
            data_dir: args.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            listen,
            advertised_addr: args
                .advertised_addr
                .or(file.advertised_addr)
                .unwrap_or_else(|| listen.to_string()),
            auto_create_topics: args
                .auto_create_topics
                .or(file.auto_create_topics)
                .unwrap_or(d.auto_create_topics),
            default_partitions: args
                .default_partitions
                .or(file.default_partitions)
                .unwrap_or(d.default_partitions),
            default_replication_factor: args
                .default_replication_factor
                .or(file.default_replication_factor)
                .unwrap_or(d.default_replication_factor),
            topic_defaults,
            group_session_timeout: args
                .group_session_timeout_ms
                .or(file.group_session_timeout_ms)
                .map_or(d.group_session_timeout, Duration::from_millis),
            group_heartbeat_interval: args
                .group_heartbeat_interval_ms
                .or(file.group_heartbeat_interval_ms)
                .map_or(d.group_heartbeat_interval, Duration::from_millis),
            group_rebalance_timeout: args
                .group_rebalance_timeout_ms
                .or(file.group_rebalance_timeout_ms)
                .map_or(d.group_rebalance_timeout, Duration::from_millis),
            offsets_retention: args
                .offsets_retention_minutes
                .or(file.offsets_retention_minutes)
                .map_or(d.offsets_retention, |m| Duration::from_secs(m * 60)),
            offsets_compact_after_records: d.offsets_compact_after_records,
            offsets_topic_partitions: args
                .offsets_topic_partitions
                .or(file.offsets_topic_partitions)
                .unwrap_or(d.offsets_topic_partitions),
            controller_quorum: match args.controller_quorum.or(file.controller_quorum) {
                Some(text) => parse_quorum(&text)?,
                None => Vec::new(),
            },
            replica_lag_time_max: args
                .replica_lag_time_max_ms
                .or(file.replica_lag_time_max_ms)
                .map_or(d.replica_lag_time_max, Duration::from_millis),
            network_threads: args
                .network_threads
                .or(file.network_threads)
                .unwrap_or(d.network_threads),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks values that would otherwise fail later, less clearly.
    pub fn validate(&self) -> Result<(), String> {
        if self.default_partitions == 0 {
            return Err("default partitions must be at least 1".into());
        }
        if self.default_replication_factor == 0 {
            return Err("default replication factor must be at least 1".into());
        }
        if !(1..=1000).contains(&self.offsets_topic_partitions) {
            return Err(format!(
                "offsets topic partitions must be 1 to 1000, not {}",
                self.offsets_topic_partitions
            ));
        }
        if !(1..=MAX_NETWORK_THREADS).contains(&self.network_threads) {
            return Err(format!(
                "network threads must be 1 to {MAX_NETWORK_THREADS}, not {}",
                self.network_threads
            ));
        }
        if self.group_heartbeat_interval.is_zero()
            || self.group_heartbeat_interval >= self.group_session_timeout
        {
            return Err(format!(
                "group heartbeat interval ({} ms) must be positive and below the session timeout ({} ms)",
                self.group_heartbeat_interval.as_millis(),
                self.group_session_timeout.as_millis()
            ));
        }
        if !self.controller_quorum.is_empty()
            && !self
                .controller_quorum
                .iter()
                .any(|(id, _)| *id == u64::from(self.node_id))
        {
            return Err(format!(
                "--node-id {} is not in --controller-quorum",
                self.node_id
            ));
        }
        self.topic_config()?;
        Ok(())
    }

    /// The config of a topic that sets nothing itself.
    pub fn topic_config(&self) -> Result<TopicConfig, String> {
        TopicConfig::resolve(&TopicConfig::default(), &self.topic_defaults)
            .map_err(|e| format!("default topic config: {e}"))
    }
}

/// Parses `1@host:port,2@host:port`.
pub fn parse_quorum(text: &str) -> Result<Vec<(u64, String)>, String> {
    let mut out: Vec<(u64, String)> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('@')
            .ok_or_else(|| format!("controller quorum member {part:?}: expected id@host:port"))?;
        let id: u64 = id.parse().ok().filter(|&i| i > 0).ok_or_else(|| {
            format!("controller quorum member {part:?}: the id must be a positive number")
        })?;
        if addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!(
                "controller quorum member {part:?}: expected id@host:port"
            ));
        }
        if out.iter().any(|(i, _)| *i == id) {
            return Err(format!("controller quorum names node {id} twice"));
        }
        out.push((id, addr.to_string()));
    }
    if out.is_empty() {
        return Err("the controller quorum is empty".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_arguments_gives_the_single_node_default() {
        let c = BrokerConfig::from_args(BrokerArgs::default()).expect("valid");
        assert_eq!(c.listen.to_string(), "127.0.0.1:9292");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert!(!c.auto_create_topics);
        assert_eq!(c.advertised_addr, "127.0.0.1:9292");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broker.toml");
        std::fs::write(
            &path,
            "node_id = 7\nlisten = \"127.0.0.1:1234\"\nauto_create_topics = true\n[topic_config]\n\"retention.ms\" = \"1d\"\n",
        )
        .expect("write");
        let args = BrokerArgs {
            config: Some(path),
            listen: Some("127.0.0.1:4321".parse().expect("addr")),
            topic_config: vec!["segment.bytes=64MiB".into()],
            ..BrokerArgs::default()
        };
        let c = BrokerConfig::from_args(args).expect("valid");
        assert_eq!(c.node_id, 7);
        assert_eq!(c.listen.port(), 4321);
        assert!(c.auto_create_topics);
        let t = c.topic_config().expect("topic config");
        assert_eq!(t.log.retention_ms, Some(86_400_000));
        assert_eq!(t.log.segment_bytes, 64 << 20);
    }

    #[test]
    fn bad_settings_are_refused_clearly() {
        let args = BrokerArgs {
            topic_config: vec!["retention.ms=soon".into()],
            ..BrokerArgs::default()
        };
        let err = BrokerConfig::from_args(args).expect_err("invalid");
        assert!(err.contains("retention.ms"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "nodeid = 1\n").expect("write");
        let err = BrokerConfig::from_args(BrokerArgs {
            config: Some(path),
            ..BrokerArgs::default()
        })
        .expect_err("unknown key");
        assert!(err.contains("nodeid"), "{err}");
        let err = BrokerConfig::from_args(BrokerArgs {
            network_threads: Some(0),
            ..BrokerArgs::default()
        })
        .expect_err("no network threads");
        assert!(err.contains("network threads must be 1 to"), "{err}");
    }

    #[test]
    fn network_threads_default_to_half_the_cpus_and_can_be_set() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let c = BrokerConfig::from_args(BrokerArgs::default()).expect("valid");
        assert_eq!(c.network_threads, (cpus / 2).max(1));
        let c = BrokerConfig::from_args(BrokerArgs {
            network_threads: Some(3),
            ..BrokerArgs::default()
        })
        .expect("valid");
        assert_eq!(c.network_threads, 3);
    }

    #[test]
    fn quorums_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_quorum("1@127.0.0.1:9292, 2@b:9293").expect("ok"),
            vec![(1, "127.0.0.1:9292".to_string()), (2, "b:9293".to_string())]
        );
        for bad in ["", "1@", "x@a:1", "0@a:1", "1@a", "1@a:1,1@b:2", "1@:5"] {
            assert!(parse_quorum(bad).is_err(), "{bad:?} accepted");
        }
    }
}
