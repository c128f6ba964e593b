//! The Sluice gRPC API, package `sluice.v1`: the generated messages and services, the
//! encoded descriptor set (for server reflection), and the error-reason helpers that
//! both sides use to put a machine-readable reason on a gRPC status and read it back.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Generated code for `sluice.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

pub mod wire;

pub use v1::ErrorReason;

/// The encoded `FileDescriptorSet` of every Sluice .proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));

/// Largest gRPC message a broker or client sends or accepts (a produce carries one
/// batch; a fetch answer many).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Largest HTTP/2 frame a broker or client takes. With HTTP/2's default of 16 KiB a
/// 256 KiB batch came in sixteen frames, each decoded, flow-controlled and handed on by
/// itself; in one frame, 1 KiB records went about 1.5 times as fast on a third to a half
/// less broker CPU, and a consumer on a backlog read about a third faster
/// (docs/benchmarks-history.md).
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// The `ErrorInfo` domain of Sluice's reasons.
pub const ERROR_DOMAIN: &str = "sluice.io";

/// The gRPC status code that goes with a reason.
pub fn code_of(reason: ErrorReason) -> Code {
    use ErrorReason as R;
    match reason {
        R::UnknownTopicOrPartition | R::UnknownGroup => Code::NotFound,
        R::TopicExists => Code::AlreadyExists,
        R::InvalidTopic
        | R::InvalidConfig
        | R::InvalidPartitions
        | R::InvalidReplicationFactor
        | R::MessageTooLarge
        | R::CorruptMessage
        | R::InvalidRequest => Code::InvalidArgument,
        R::OffsetOutOfRange => Code::OutOfRange,
        R::NotLeader | R::NotCoordinator => Code::FailedPrecondition,
        R::LeaderNotAvailable | R::NotEnoughReplicas | R::StorageError | R::ShuttingDown => {
            Code::Unavailable
        }
        R::Fenced => Code::Aborted,
        R::RequestTimedOut => Code::DeadlineExceeded,
        R::Throttled => Code::ResourceExhausted,
        R::Internal | R::Unspecified => Code::Internal,
    }
}

/// Whether a client may retry a request that failed for this reason.
pub fn is_retriable(reason: ErrorReason) -> bool {
    matches!(
        reason,
        ErrorReason::NotLeader
            | ErrorReason::NotCoordinator
            | ErrorReason::LeaderNotAvailable
            | ErrorReason::NotEnoughReplicas
            | ErrorReason::RequestTimedOut
            | ErrorReason::Throttled
            | ErrorReason::ShuttingDown
    )
}

/// A gRPC status for `reason`, with the reason and `metadata` in an `ErrorInfo` detail.
pub fn status(
    reason: ErrorReason,
    message: impl Into<String>,
    metadata: impl IntoIterator<Item = (String, String)>,
) -> Status {
    let metadata: HashMap<String, String> = metadata.into_iter().collect();
    Status::with_error_details(
        code_of(reason),
        message,
        ErrorDetails::with_error_info(reason.as_str_name(), ERROR_DOMAIN, metadata),
    )
}

/// The reason and metadata of a status made by [`status`]; `None` for a status without a
/// Sluice `ErrorInfo` (a transport error, say).
pub fn reason_of(status: &Status) -> Option<(ErrorReason, HashMap<String, String>)> {
    let details = status.get_error_details();
    let info = details.error_info()?;
    if info.domain != ERROR_DOMAIN {
        return None;
    }
    let reason = ErrorReason::from_str_name(&info.reason)?;
    Some((reason, info.metadata.clone()))
}

/// The in-message form of a failure, for stream items and fetch partitions.
pub fn error_message(
    reason: ErrorReason,
    message: impl Into<String>,
    metadata: impl IntoIterator<Item = (String, String)>,
) -> v1::Error {
    v1::Error {
        reason: reason as i32,
        code: code_of(reason) as i32,
        message: message.into(),
        metadata: metadata.into_iter().collect(),
    }
}

/// Turns an in-message failure back into a status, so clients handle both forms alike.
pub fn error_to_status(e: &v1::Error) -> Status {
    let reason = ErrorReason::try_from(e.reason).unwrap_or(ErrorReason::Unspecified);
    status(
        reason,
        e.message.clone(),
        e.metadata.iter().map(|(k, v)| (k.clone(), v.clone())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn status_carries_reason_and_metadata() {
        let s = status(
            ErrorReason::OffsetOutOfRange,
            "offset 9 is out of range [0, 5]",
            [
                ("log_start_offset".to_string(), "0".to_string()),
                ("high_watermark".to_string(), "5".to_string()),
            ],
        );
        assert_eq!(s.code(), Code::OutOfRange);
        let (reason, md) = reason_of(&s).expect("reason");
        assert_eq!(reason, ErrorReason::OffsetOutOfRange);
        assert_eq!(md["high_watermark"], "5");
        assert!(reason_of(&Status::internal("plain")).is_none());
    }

    #[test]
    fn every_reason_has_a_name_and_code() {
        for i in 1..=20 {
            let r = ErrorReason::try_from(i).expect("reason");
            assert_eq!(ErrorReason::from_str_name(r.as_str_name()), Some(r));
            let back = error_to_status(&error_message(r, "m", []));
            assert_eq!(reason_of(&back).map(|(r, _)| r), Some(r));
            assert_eq!(back.code(), code_of(r));
        }
    }

    #[test]
    fn descriptor_set_holds_the_services() {
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("decode");
        let services: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect();
        for want in [
            "sluice.v1.ProduceService",
            "sluice.v1.FetchService",
            "sluice.v1.AdminService",
        ] {
            assert!(services.iter().any(|s| s == want), "{want} in {services:?}");
        }
    }
}
