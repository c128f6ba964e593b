//! A follower's fetcher: first cuts any suffix its leader does not have (by leader
//! epoch, never by high watermark: KIP-101), then copies the leader's log as it grows.

use std::time::Duration;

use sluice_proto::v1::replica_service_client::ReplicaServiceClient;
use sluice_proto::v1::{EpochEndOffsetRequest, ReplicaFetchRequest};
use tonic::transport::Channel;

use crate::error::BrokerError;
use crate::partition::{PartitionHandle, PartitionState};
use crate::MAX_MESSAGE_BYTES;

/// How long the leader may hold a fetch when it has nothing new.
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// Bytes one fetch returns at most.
const FETCH_BYTES: u32 = 8 << 20;
/// Pause after a failed call.
const BACKOFF: Duration = Duration::from_millis(100);

/// One partition this broker follows.
#[derive(Debug)]
pub struct Follow {
    /// The local replica.
    pub handle: PartitionHandle,
    /// This broker.
    pub me: u64,
    /// The leader.
    pub leader: u64,
    /// The leader's address.
    pub address: String,
    /// The leader epoch being followed.
    pub epoch: i32,
}

/// Follows until the task is aborted (a new role) or the partition closes.
pub async fn run(f: Follow) {
    let endpoint = match crate::peer_endpoint(&f.address, FETCH_WAIT + Duration::from_secs(10)) {
        Ok(e) => e
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20)),
        Err(e) => {
            tracing::error!(address = %f.address, error = %e, "bad leader address");
            return;
        }
    };
    let mut client = ReplicaServiceClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let tp = f.handle.topic_partition().clone();
    loop {
        match truncate(&f, &mut client).await {
            Ok(end) => {
                tracing::info!(partition = %tp, leader = f.leader, epoch = f.epoch, log_end_offset = end, "following");
                break;
            }
            Err(Stop::Done) => return,
            Err(Stop::Retry(e)) => {
                tracing::debug!(partition = %tp, error = %e, "epoch end offset not known yet");
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
    loop {
        let fetch_offset = f.handle.state().log_end_offset;
        let req = ReplicaFetchRequest {
            topic: tp.topic.clone(),
            partition: tp.partition as i32,
            replica_id: f.me,
            leader_epoch: f.epoch,
            fetch_offset: fetch_offset as i64,
            max_bytes: FETCH_BYTES,
            max_wait_ms: FETCH_WAIT.as_millis() as u32,
        };
        let r = match client.replica_fetch(req).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                tracing::debug!(partition = %tp, error = %status, "replica fetch failed");
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        let leader = PartitionState {
            log_start_offset: r.log_start_offset.max(0) as u64,
            high_watermark: r.high_watermark.max(0) as u64,
            log_end_offset: r.log_end_offset.max(0) as u64,
        };
        match f
            .handle
            .append_from_leader(f.epoch, r.records, leader)
            .await
        {
            Ok(_) => {}
            Err(BrokerError::ShuttingDown | BrokerError::Fenced(_)) => return,
            Err(e) => {
                tracing::warn!(partition = %tp, error = %e, "could not append what the leader sent");
                tokio::time::sleep(BACKOFF).await;
            }
        }
    }
}

enum Stop {
    /// The partition closed or changed role.
    Done,
    /// Try again.
    Retry(String),
}

/// The OffsetsForLeaderEpoch exchange; returns the log end offset after the cut.
async fn truncate(f: &Follow, client: &mut ReplicaServiceClient<Channel>) -> Result<u64, Stop> {
    let local = |e: BrokerError| match e {
        BrokerError::ShuttingDown | BrokerError::Fenced(_) => Stop::Done,
        e => Stop::Retry(e.to_string()),
    };
    let Some(latest) = f.handle.latest_epoch().await.map_err(local)? else {
        // Nothing written under any epoch: nothing can diverge.
        return Ok(f.handle.state().log_end_offset);
    };
    let tp = f.handle.topic_partition();
    let answer = client
        .epoch_end_offset(EpochEndOffsetRequest {
            topic: tp.topic.clone(),
            partition: tp.partition as i32,
            replica_id: f.me,
            leader_epoch: f.epoch,
            epoch: latest,
        })
        .await
        .map_err(|s| Stop::Retry(s.to_string()))?
        .into_inner();
    let answer = (answer.epoch >= 0 && answer.end_offset >= 0)
        .then_some((answer.epoch, answer.end_offset as u64));
    f.handle
        .truncate_for_epoch(f.epoch, answer)
        .await
        .map_err(local)
}
