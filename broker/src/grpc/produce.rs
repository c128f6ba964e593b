//! `ProduceService`: unary appends, and a stream that keeps many batches in flight.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use sluice_proto::v1::produce_service_server::ProduceService;
use sluice_proto::v1::{
    produce_stream_response, Acks as WireAcks, ProduceRequest, ProduceResponse,
    ProduceStreamRequest, ProduceStreamResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{partition_number, to_error, to_status, Context};
use crate::error::{BrokerError, Result};
use crate::partition::{Acks, AppendResult};

/// Longest a produce waits for its acks when the request does not say (Kafka's
/// `request.timeout.ms`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `sluice.v1.ProduceService`.
#[derive(Debug, Clone)]
pub struct ProduceSvc {
    ctx: Arc<Context>,
}

impl ProduceSvc {
    /// The service over a broker context.
    pub fn new(ctx: Arc<Context>) -> Self {
        ProduceSvc { ctx }
    }
}

fn acks_of(a: i32) -> Result<Acks> {
    match WireAcks::try_from(a) {
        Ok(WireAcks::None) => Ok(Acks::None),
        Ok(WireAcks::Leader) => Ok(Acks::Leader),
        Ok(WireAcks::All | WireAcks::Unspecified) => Ok(Acks::All),
        Err(_) => Err(BrokerError::InvalidRequest(format!(
            "unknown acks value {a}"
        ))),
    }
}

fn answer(r: AppendResult) -> ProduceResponse {
    let signed = |o: u64| if o == u64::MAX { -1 } else { o as i64 };
    ProduceResponse {
        base_offset: signed(r.base_offset),
        last_offset: signed(r.last_offset),
        log_append_time: r.log_append_time,
        log_start_offset: r.log_start_offset as i64,
    }
}

/// Queues the batch on its partition (in arrival order) and returns the wait for acks.
async fn submit(
    ctx: &Context,
    req: ProduceRequest,
) -> Result<(
    Acks,
    impl std::future::Future<Output = Result<ProduceResponse>>,
)> {
    let acks = acks_of(req.acks)?;
    ctx.check_leader(&req.topic, partition_number(req.partition))?;
    let topic = ctx.topic_for_produce(&req.topic).await?;
    let partition = topic.partition(partition_number(req.partition))?;
    let limit = topic.config.log.max_batch_bytes as usize;
    if req.records.len() > limit {
        return Err(BrokerError::MessageTooLarge {
            size: req.records.len(),
            limit,
        });
    }
    let timeout = match req.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let pending = partition.submit(req.records, acks).await?;
    Ok((acks, async move {
        match tokio::time::timeout(timeout, pending).await {
            Ok(r) => r.map(answer),
            Err(_) => Err(BrokerError::RequestTimedOut(timeout.as_millis() as u64)),
        }
    }))
}

#[tonic::async_trait]
impl ProduceService for ProduceSvc {
    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> std::result::Result<Response<ProduceResponse>, Status> {
        let (acks, pending) = submit(&self.ctx, request.into_inner())
            .await
            .map_err(|e| to_status(&e))?;
        if acks == Acks::None {
            return Ok(Response::new(ProduceResponse {
                base_offset: -1,
                last_offset: -1,
                log_append_time: -1,
                log_start_offset: -1,
            }));
        }
        pending.await.map(Response::new).map_err(|e| to_status(&e))
    }

    type ProduceStreamStream =
        Pin<Box<dyn Stream<Item = std::result::Result<ProduceStreamResponse, Status>> + Send>>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceStreamRequest>>,
    ) -> std::result::Result<Response<Self::ProduceStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let ctx = Arc::clone(&self.ctx);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = inbound.message() => next,
                    // Shutting down: take no more batches; answer those taken, then end.
                    () = ctx.stopped() => break,
                };
                let item = match next {
                    Ok(Some(item)) => item,
                    Ok(None) => break,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let id = item.correlation_id;
                let Some(req) = item.request else {
                    let e = BrokerError::InvalidRequest("stream item without a request".into());
                    let _ = tx.send(Ok(failed(id, &e))).await;
                    continue;
                };
                // Queue in stream order; wait for acks concurrently.
                match submit(&ctx, req).await {
                    Ok((Acks::None, _)) => {}
                    Ok((_, pending)) => {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let msg = match pending.await {
                                Ok(r) => ProduceStreamResponse {
                                    correlation_id: id,
                                    result: Some(produce_stream_response::Result::Response(r)),
                                },
                                Err(e) => failed(id, &e),
                            };
                            let _ = tx.send(Ok(msg)).await;
                        });
                    }
                    Err(e) => {
                        if tx.send(Ok(failed(id, &e))).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn failed(id: u64, e: &BrokerError) -> ProduceStreamResponse {
    ProduceStreamResponse {
        correlation_id: id,
        result: Some(produce_stream_response::Result::Error(to_error(e))),
    }
}
