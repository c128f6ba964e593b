//! `ProduceService`: unary appends, and a stream that keeps many batches in flight.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt};
use prost::Message;
use sluice_proto::v1::produce_service_server::{ProduceService, ProduceServiceServer};
use sluice_proto::v1::{
    produce_stream_response, Acks as WireAcks, ProduceRequest, ProduceResponse,
    ProduceStreamRequest, ProduceStreamResponse,
};
use tonic::codec::{EncodeBody, SingleMessageCompressionOverride};
use tonic::codegen::{http, BoxFuture};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstEncoder;

use super::framing::{is_call, Handler, Intercept, MessageReader};
use super::{partition_number, to_error, to_status, Context};
use crate::error::{BrokerError, Result};
use crate::partition::{Acks, AppendResult};
use crate::MAX_MESSAGE_BYTES;

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

/// The answers of a produce stream, as the response body sends them.
pub type ProduceStreamStream =
    Pin<Box<dyn Stream<Item = std::result::Result<ProduceStreamResponse, Status>> + Send>>;

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

    type ProduceStreamStream = ProduceStreamStream;

    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceStreamRequest>>,
    ) -> std::result::Result<Response<Self::ProduceStreamStream>, Status> {
        Ok(Response::new(answers(
            Arc::clone(&self.ctx),
            Box::pin(request.into_inner()),
        )))
    }
}

/// `ProduceService` as the server routes it: `ProduceStream` reads its batches with
/// [`MessageReader`], which hands over a batch as the bytes of the HTTP/2 frame it came
/// in (tonic's reader copies each twice); every other call goes to the generated server.
pub type ProduceRoutes = Intercept<ProduceServiceServer<ProduceSvc>, ProduceCalls>;

impl ProduceRoutes {
    /// The routes over a broker context.
    pub fn over(ctx: Arc<Context>) -> Self {
        let generated = ProduceServiceServer::new(ProduceSvc::new(Arc::clone(&ctx)))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Intercept::new(generated, ProduceCalls { ctx })
    }
}

/// The produce calls served without tonic's codec.
#[derive(Clone)]
pub struct ProduceCalls {
    ctx: Arc<Context>,
}

impl Handler for ProduceCalls {
    const NAME: &'static str = <ProduceServiceServer<ProduceSvc> as NamedService>::NAME;

    fn takes(&self, req: &http::Request<tonic::body::Body>) -> bool {
        is_call(req, Self::NAME, "ProduceStream")
    }

    fn serve(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, Infallible> {
        let response = match MessageReader::of_request(req) {
            Ok(reader) => {
                let inbound = futures_util::stream::unfold(reader, |mut reader| async move {
                    match reader.next().await {
                        // Decoding from the frames' bytes slices the batch out of them.
                        Ok(Some(message)) => Some((
                            ProduceStreamRequest::decode(message)
                                .map_err(|e| Status::internal(format!("invalid request: {e}"))),
                            reader,
                        )),
                        Ok(None) => None,
                        Err(status) => Some((Err(status), reader)),
                    }
                });
                let body = EncodeBody::new_server(
                    ProstEncoder::<ProduceStreamResponse>::default(),
                    answers(Arc::clone(&self.ctx), Box::pin(inbound)),
                    None,
                    SingleMessageCompressionOverride::default(),
                    Some(MAX_MESSAGE_BYTES),
                );
                let mut response = http::Response::new(tonic::body::Body::new(body));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
                response
            }
            Err(status) => status.into_http(),
        };
        Box::pin(std::future::ready(Ok(response)))
    }
}

/// A produce stream's batches, however they were read.
type Inbound =
    Pin<Box<dyn Stream<Item = std::result::Result<ProduceStreamRequest, Status>> + Send>>;

/// The answers to one produce stream, in the order their acks complete.
fn answers(ctx: Arc<Context>, inbound: Inbound) -> ProduceStreamStream {
    let stop_ctx = Arc::clone(&ctx);
    let stream = ProduceStream {
        inbound,
        ctx,
        stop: Box::pin(async move { stop_ctx.stopped().await }),
        awaiting: FuturesUnordered::new(),
        reading: true,
        ended: false,
    };
    Box::pin(futures_util::stream::unfold(stream, |mut s| async move {
        s.next_answer().await.map(|answer| (answer, s))
    }))
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
    inbound: Inbound,
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
                next = self.inbound.next(), if can_read => Step::Read(next.transpose()),
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
