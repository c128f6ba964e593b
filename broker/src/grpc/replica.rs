//! `ReplicaService`: the leader's side of replication — follower fetches and the
//! OffsetsForLeaderEpoch look-up.

use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;

use prost::Message;
use sluice_proto::v1::replica_service_server::{ReplicaService, ReplicaServiceServer};
use sluice_proto::v1::{
    EpochEndOffsetRequest, EpochEndOffsetResponse, ReplicaFetchRequest, ReplicaFetchResponse,
};
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use sluice_proto::wire::{bytes_field_len, Pieces};

use super::framing::{is_call, respond, serve_unary, Handler, Intercept};
use super::{partition_number, to_status, Context};
use crate::error::BrokerError;
use crate::partition::PartitionHandle;
use crate::MAX_MESSAGE_BYTES;

/// Longest a replica fetch may wait, whatever it asks.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Serves `sluice.v1.ReplicaService`.
#[derive(Debug, Clone)]
pub struct ReplicaSvc {
    ctx: Arc<Context>,
}

impl ReplicaSvc {
    /// The service over a broker context.
    pub fn new(ctx: Arc<Context>) -> Self {
        ReplicaSvc { ctx }
    }

    fn partition(&self, topic: &str, partition: i32) -> Result<PartitionHandle, BrokerError> {
        let md = self.ctx.topics.metadata();
        md.topic(topic)?
            .partition(partition_number(partition))
            .cloned()
    }
}

/// `ReplicaService` as the server routes it: `ReplicaFetch` answers with the records
/// sent from the log's pages as they are (see [`respond`]); `EpochEndOffset` goes to the
/// generated server.
pub type ReplicaRoutes = Intercept<ReplicaServiceServer<ReplicaSvc>, ReplicaCalls>;

impl ReplicaRoutes {
    /// The routes over a broker context.
    pub fn over(ctx: Arc<Context>) -> Self {
        let svc = ReplicaSvc::new(ctx);
        let generated = ReplicaServiceServer::new(svc.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Intercept::new(generated, ReplicaCalls { svc })
    }
}

/// The replica calls served without tonic's codec.
#[derive(Clone)]
pub struct ReplicaCalls {
    svc: ReplicaSvc,
}

impl Handler for ReplicaCalls {
    const NAME: &'static str = <ReplicaServiceServer<ReplicaSvc> as NamedService>::NAME;

    fn takes(&self, req: &http::Request<Body>) -> bool {
        is_call(req, Self::NAME, "ReplicaFetch")
    }

    fn serve(&self, req: http::Request<Body>) -> BoxFuture<http::Response<Body>, Infallible> {
        let svc = self.svc.clone();
        let call =
            move |r: ReplicaFetchRequest| async move { svc.replica_fetch(Request::new(r)).await };
        serve_unary(req, call, replica_answer)
    }
}

/// A follower's fetch answer on the wire, its records by reference.
fn replica_answer(mut response: ReplicaFetchResponse) -> http::Response<Body> {
    let records = std::mem::take(&mut response.records);
    let len = response.encoded_len() + bytes_field_len(RECORDS_FIELD, &records);
    match Pieces::new(len) {
        Ok(mut out) => {
            out.encoded(&response);
            out.bytes_field(RECORDS_FIELD, records);
            respond(out)
        }
        Err(status) => status.into_http(),
    }
}

/// `ReplicaFetchResponse.records`'s field number.
const RECORDS_FIELD: u32 = 1;

#[tonic::async_trait]
impl ReplicaService for ReplicaSvc {
    async fn replica_fetch(
        &self,
        request: Request<ReplicaFetchRequest>,
    ) -> Result<Response<ReplicaFetchResponse>, Status> {
        let req = request.into_inner();
        let p = self
            .partition(&req.topic, req.partition)
            .map_err(|e| to_status(&e))?;
        let offset = u64::try_from(req.fetch_offset).map_err(|_| {
            to_status(&BrokerError::InvalidRequest(format!(
                "negative fetch offset {}",
                req.fetch_offset
            )))
        })?;
        let max_bytes = req.max_bytes.max(1) as usize;
        // Subscribed before reading, so an append in between still wakes the wait.
        let mut changes = p.subscribe();
        let mut data = p
            .replica_read(req.replica_id, req.leader_epoch, offset, max_bytes)
            .await
            .map_err(|e| to_status(&e))?;
        if data.records.is_empty() && offset == data.state.log_end_offset && req.max_wait_ms > 0 {
            let wait = Duration::from_millis(u64::from(req.max_wait_ms)).min(MAX_WAIT);
            let grown = async {
                // The guard `wait_for` returns is dropped at once.
                changes
                    .wait_for(|s| s.log_end_offset > offset)
                    .await
                    .is_ok()
            };
            tokio::select! {
                _ = tokio::time::timeout(wait, grown) => {}
                () = self.ctx.stopped() => {}
            }
            data = p
                .replica_read(req.replica_id, req.leader_epoch, offset, max_bytes)
                .await
                .map_err(|e| to_status(&e))?;
        }
        Ok(Response::new(ReplicaFetchResponse {
            records: data.records,
            high_watermark: data.state.high_watermark as i64,
            log_end_offset: data.state.log_end_offset as i64,
            log_start_offset: data.state.log_start_offset as i64,
        }))
    }

    async fn epoch_end_offset(
        &self,
        request: Request<EpochEndOffsetRequest>,
    ) -> Result<Response<EpochEndOffsetResponse>, Status> {
        let req = request.into_inner();
        let p = self
            .partition(&req.topic, req.partition)
            .map_err(|e| to_status(&e))?;
        let answer = p
            .epoch_end(req.leader_epoch, req.epoch)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(match answer {
            Some((epoch, end)) => EpochEndOffsetResponse {
                epoch,
                end_offset: end as i64,
            },
            None => EpochEndOffsetResponse {
                epoch: -1,
                end_offset: -1,
            },
        }))
    }
}
