//! The broker's one error type. It is turned into a gRPC status in exactly one place,
//! `grpc::status`.

use sluice_log_store::Error as LogError;

/// What went wrong while serving a request, named for the client's point of view.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The topic does not exist.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// The topic exists but not this partition.
    #[error("topic {topic:?} has no partition {partition} (it has {count})")]
    UnknownPartition {
        /// Topic name.
        topic: String,
        /// Partition asked for.
        partition: i64,
        /// Partitions the topic has.
        count: u32,
    },
    /// Creating a topic that exists.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// A topic name breaks the naming rule.
    #[error("invalid topic name {0:?}: use 1 to 249 of [a-zA-Z0-9._-], not \".\" or \"..\"")]
    InvalidTopic(String),
    /// A config key or value is not acceptable.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A partition count is not acceptable.
    #[error("invalid partition count: {0}")]
    InvalidPartitions(String),
    /// More replicas than brokers.
    #[error("replication factor {requested} is more than the {available} available broker(s)")]
    InvalidReplicationFactor {
        /// Requested replication factor.
        requested: i64,
        /// Brokers that could hold a replica.
        available: u32,
    },
    /// A batch larger than `max.message.bytes`.
    #[error("record batch of {size} bytes exceeds max.message.bytes={limit}")]
    MessageTooLarge {
        /// Batch size.
        size: usize,
        /// The topic's limit.
        limit: usize,
    },
    /// A batch that fails validation.
    #[error("corrupt record batch: {0}")]
    CorruptMessage(String),
    /// A fetch or seek outside what the partition holds.
    #[error("offset {offset} is out of range [{log_start_offset}, {high_watermark}]")]
    OffsetOutOfRange {
        /// Offset asked for.
        offset: u64,
        /// First offset still kept.
        log_start_offset: u64,
        /// End of what consumers may read.
        high_watermark: u64,
    },
    /// Fewer in-sync replicas than `min.insync.replicas`.
    #[error("only {isr} in-sync replica(s), min.insync.replicas is {min}")]
    NotEnoughReplicas {
        /// In-sync replicas.
        isr: u32,
        /// Required.
        min: u32,
    },
    /// The acks a producer asked for did not arrive in time.
    #[error("request timed out after {0} ms waiting for acks")]
    RequestTimedOut(u64),
    /// The request is malformed in a way no other variant names.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The disk failed or is full.
    #[error("storage error: {0}")]
    Storage(String),
    /// The consumer group does not exist.
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    /// A group member that is no longer in the group, or asks for what it does not hold.
    #[error("fenced: {0}")]
    Fenced(String),
    /// This broker does not lead the partition.
    #[error("this broker does not lead {topic}-{partition}{}", .leader.map(|l| format!("; broker {l} does")).unwrap_or_default())]
    NotLeader {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i64,
        /// The leader's id, if there is one.
        leader: Option<u64>,
        /// The leader's address, if known.
        address: Option<String>,
    },
    /// This broker does not coordinate the group (now).
    #[error("this broker does not coordinate group {group:?}{}", .address.as_ref().map(|a| format!("; {a} does")).unwrap_or_default())]
    NotCoordinator {
        /// The group.
        group: String,
        /// The coordinator's id, if there is one.
        coordinator: Option<u64>,
        /// Its address, if known.
        address: Option<String>,
    },
    /// A metadata write reached a controller that is not the Raft leader.
    #[error("this broker is not the active controller{}", .0.map(|l| format!("; node {l} is")).unwrap_or_default())]
    NotController(Option<u64>),
    /// The broker is stopping.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// A bug or an impossible state.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<LogError> for BrokerError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::BatchTooLarge { size, limit } => BrokerError::MessageTooLarge { size, limit },
            e if e.is_corrupt_batch() => BrokerError::CorruptMessage(e.to_string()),
            LogError::OffsetOutOfRange {
                offset,
                log_start_offset,
                log_end_offset,
            } => BrokerError::OffsetOutOfRange {
                offset,
                log_start_offset,
                high_watermark: log_end_offset,
            },
            LogError::InvalidConfig(m) => BrokerError::InvalidConfig(m),
            LogError::InvalidTopicName(n) => BrokerError::InvalidTopic(n),
            e => BrokerError::Storage(e.to_string()),
        }
    }
}

/// Result with the broker's error.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
