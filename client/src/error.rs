//! The client's one error type.

use std::collections::HashMap;

use sluice_proto::ErrorReason;
use tonic::{Code, Status};

/// What went wrong, with the broker's machine-readable reason when it gave one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The broker refused the request and said why.
    #[error("{message} ({})", reason.as_str_name())]
    Broker {
        /// The reason; decide retries from this.
        reason: ErrorReason,
        /// The gRPC status code.
        code: Code,
        /// Human-readable text.
        message: String,
        /// Facts that go with the reason (offset bounds, leader hints).
        metadata: HashMap<String, String>,
    },
    /// A gRPC failure without a Sluice reason (connection lost, say).
    #[error("{code:?}: {message}")]
    Rpc {
        /// The gRPC status code.
        code: Code,
        /// Its message.
        message: String,
    },
    /// No broker in the list could be reached.
    #[error("cannot connect to {brokers}: {message}")]
    Connect {
        /// The brokers tried.
        brokers: String,
        /// What the last attempt said.
        message: String,
    },
    /// The caller passed something unusable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A batch could not be built or read.
    #[error("record batch: {0}")]
    Batch(String),
    /// The producer or consumer was closed.
    #[error("closed")]
    Closed,
    /// A wait ran out.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl ClientError {
    /// The broker's reason, if it gave one.
    pub fn reason(&self) -> Option<ErrorReason> {
        match self {
            ClientError::Broker { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// Whether retrying the same request may succeed: the broker's reason says so, or the
    /// connection failed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Broker { reason, .. } => sluice_proto::is_retriable(*reason),
            ClientError::Rpc { code, .. } => {
                matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
            }
            ClientError::Connect { .. } | ClientError::Timeout(_) => true,
            _ => false,
        }
    }

    /// Whether the broker could not be reached or the connection broke (rather than
    /// the broker answering).
    pub fn is_unreachable(&self) -> bool {
        match self {
            ClientError::Rpc { code, .. } => {
                matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
            }
            ClientError::Connect { .. } => true,
            _ => false,
        }
    }

    /// A metadata value the broker attached, as text.
    pub fn metadata_str(&self, key: &str) -> Option<&str> {
        match self {
            ClientError::Broker { metadata, .. } => metadata.get(key).map(String::as_str),
            _ => None,
        }
    }

    /// A metadata value the broker attached, parsed.
    pub fn metadata_u64(&self, key: &str) -> Option<u64> {
        match self {
            ClientError::Broker { metadata, .. } => metadata.get(key)?.parse().ok(),
            _ => None,
        }
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        match sluice_proto::reason_of(&s) {
            Some((reason, metadata)) => ClientError::Broker {
                reason,
                code: s.code(),
                message: s.message().to_string(),
                metadata,
            },
            None => ClientError::Rpc {
                code: s.code(),
                message: s.message().to_string(),
            },
        }
    }
}

impl From<&sluice_proto::v1::Error> for ClientError {
    fn from(e: &sluice_proto::v1::Error) -> Self {
        ClientError::from(sluice_proto::error_to_status(e))
    }
}

impl From<sluice_log_store::Error> for ClientError {
    fn from(e: sluice_log_store::Error) -> Self {
        ClientError::Batch(e.to_string())
    }
}

/// Result with the client's error.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
