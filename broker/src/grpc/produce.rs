//! `ProduceService`: unary appends, and a stream that keeps many batches in flight.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt};
use sluice_proto::v1::produce_service_server::ProduceService;
use sluice_proto::v1::{
    produce_stream_response, Acks as WireAcks, ProduceRequest, ProduceResponse,
    ProduceStreamRequest, ProduceStreamResponse,
};
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
        let ctx = Arc::clone(&self.ctx);
        let stop_ctx = Arc::clone(&self.ctx);
        let stream = ProduceStream {
            inbound: request.into_inner(),
            ctx,
            stop: Box::pin(async move { stop_ctx.stopped().await }),
            awaiting: FuturesUnordered::new(),
            reading: true,
            ended: false,
        };
        let answers = futures_util::stream::unfold(stream, |mut s| async move {
            s.next_answer().await.map(|answer| (answer, s))
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

/// Most batches one produce stream may have waiting for their acks; at this many it
/// reads no more until an answer goes out (a client keeps far fewer in flight).
const MAX_AWAITING: usize = 1024;

/// A batch's answer, once its acks are in.
type Awaiting = Pin<Box<dyn Future<Output = ProduceStreamResponse> + Send>>;

/// One produce stream: the batches it reads, and those awaiting their acks. It is the
/// response body itself, so reading, queueing and answering run on the task that sends
/// the answers: no task per batch, and no channel between the reader and the response.
struct ProduceStream {
    inbound: Streaming<ProduceStreamRequest>,
    ctx: Arc<Context>,
    /// Resolves when the broker begins to stop.
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    awaiting: FuturesUnordered<Awaiting>,
    /// False once the client closed its side or the broker is stopping.
    reading: bool,
    /// True once the stream failed: nothing more is sent.
    ended: bool,
}

/// What one wait of a produce stream brought.
enum Step {
    Answer(ProduceStreamResponse),
    Read(std::result::Result<Option<ProduceStreamRequest>, Status>),
    Stop,
}

impl ProduceStream {
    /// The next answer, reading and queueing batches meanwhile, in the order acks
    /// complete; `None` once reading has ended and every batch taken is answered.
    async fn next_answer(&mut self) -> Option<std::result::Result<ProduceStreamResponse, Status>> {
        loop {
            if self.ended || (!self.reading && self.awaiting.is_empty()) {
                return None;
            }
            let can_read = self.reading && self.awaiting.len() < MAX_AWAITING;
            let step = tokio::select! {
                Some(answer) = self.awaiting.next(), if !self.awaiting.is_empty() => {
                    Step::Answer(answer)
                }
                next = self.inbound.message(), if can_read => Step::Read(next),
                () = &mut self.stop, if self.reading => Step::Stop,
            };
            match step {
                Step::Answer(answer) => return Some(Ok(answer)),
                Step::Read(Ok(Some(item))) => {
                    if let Some(answer) = self.take(item).await {
                        return Some(Ok(answer));
                    }
                }
                Step::Read(Ok(None)) => self.reading = false,
                Step::Read(Err(status)) => {
                    self.ended = true;
                    return Some(Err(status));
                }
                // Stopping: take no more batches; answer those taken, then end.
                Step::Stop => self.reading = false,
            }
        }
    }

    /// Queues one batch on its partition (in stream order); returns an answer due at
    /// once, which is an error or nothing.
    async fn take(&mut self, item: ProduceStreamRequest) -> Option<ProduceStreamResponse> {
        let id = item.correlation_id;
        let Some(req) = item.request else {
            let e = BrokerError::InvalidRequest("stream item without a request".into());
            return Some(failed(id, &e));
        };
        match submit(&self.ctx, req).await {
            Ok((Acks::None, _)) => None,
            Ok((_, pending)) => {
                self.awaiting.push(Box::pin(async move {
                    match pending.await {
                        Ok(r) => ProduceStreamResponse {
                            correlation_id: id,
                            result: Some(produce_stream_response::Result::Response(r)),
                        },
                        Err(e) => failed(id, &e),
                    }
                }));
                None
            }
            Err(e) => Some(failed(id, &e)),
        }
    }
}

fn failed(id: u64, e: &BrokerError) -> ProduceStreamResponse {
    ProduceStreamResponse {
        correlation_id: id,
        result: Some(produce_stream_response::Result::Error(to_error(e))),
    }
}
