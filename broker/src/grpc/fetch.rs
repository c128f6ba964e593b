//! `FetchService`: long-poll fetches and offset look-ups.

use std::sync::Arc;
use std::time::Duration;

use std::convert::Infallible;

use futures_util::future::select_all;
use futures_util::FutureExt;
use prost::Message;
use sluice_proto::v1::fetch_service_server::{FetchService, FetchServiceServer};
use sluice_proto::v1::{
    offset_query, FetchPartitionResponse, FetchRequest, FetchResponse, ListOffsetsRequest,
    ListOffsetsResponse, OffsetAnswer,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use sluice_proto::wire::{bytes_field_len, field_overhead, Pieces};

use super::framing::{
    is_call, respond, respond_stream, serve_unary, Handler, Intercept, MessageReader,
};
use super::{partition_number, to_error, Context};
use crate::error::BrokerError;
use crate::partition::{OffsetSpec, PartitionHandle};
use crate::MAX_MESSAGE_BYTES;
use sluice_log_store::BatchIter;

/// Longest a fetch may wait, whatever it asks.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Bytes one fetch returns at most when it does not say.
const DEFAULT_MAX_BYTES: usize = 50 << 20;
/// Bytes per partition when the request does not say.
const DEFAULT_PARTITION_MAX_BYTES: usize = 1 << 20;

/// Serves `sluice.v1.FetchService`.
#[derive(Debug, Clone)]
pub struct FetchSvc {
    ctx: Arc<Context>,
}

impl FetchSvc {
    /// The service over a broker context.
    pub fn new(ctx: Arc<Context>) -> Self {
        FetchSvc { ctx }
    }

    /// Answers `req` as `Fetch` does, filling partitions from the one at `start` on
    /// (then from the first): the answer, and where the next answer to the same request
    /// should start filling, just after the last partition this one gave records to (as
    /// Kafka's fetch sessions move such partitions to the back). Under a `max_bytes`
    /// smaller than the partitions have to give, a stream then serves them in turn
    /// instead of the first ones until they are read to the end. The answer lists the
    /// partitions in the request's order whatever the start.
    async fn fetch_from(
        &self,
        req: FetchRequest,
        start: usize,
    ) -> Result<(FetchResponse, usize), Status> {
        // Only the coordinator knows the group; fetches elsewhere are not checked.
        let member = req
            .member
            .as_ref()
            .filter(|m| self.ctx.groups.coordinates(&m.group_id));
        if let Some(m) = member {
            // A group member may read only what the coordinator gave it.
            let mut tps = Vec::with_capacity(req.partitions.len());
            for p in &req.partitions {
                let partition = u32::try_from(p.partition).map_err(|_| {
                    super::to_status(&BrokerError::InvalidRequest(format!(
                        "partition {} of {} is negative",
                        p.partition, p.topic
                    )))
                })?;
                tps.push((p.topic.clone(), partition));
            }
            self.ctx
                .groups
                .check_fetch(m.group_id.clone(), m.member_id.clone(), m.member_epoch, tps)
                .await
                .map_err(|e| super::to_status(&e))?;
        }
        let deadline =
            Instant::now() + Duration::from_millis(u64::from(req.max_wait_ms)).min(MAX_WAIT);
        let min_bytes = req.min_bytes.max(1) as usize;
        let max_bytes = match req.max_bytes {
            0 => DEFAULT_MAX_BYTES,
            n => n as usize,
        };
        let n = req.partitions.len();
        let start = if n == 0 { 0 } else { start % n };
        loop {
            // Subscribe before reading, so data that lands in between still wakes us.
            let mut watches = Vec::new();
            let mut out: Vec<FetchPartitionResponse> = req
                .partitions
                .iter()
                .map(|fp| FetchPartitionResponse {
                    topic: fp.topic.clone(),
                    partition: fp.partition,
                    ..Default::default()
                })
                .collect();
            let mut total = 0usize;
            let mut any_error = false;
            let mut last_served = None;
            for i in (start..n).chain(0..start) {
                let fp = &req.partitions[i];
                let room = max_bytes.saturating_sub(total);
                let result = async {
                    let p = lookup(&self.ctx, &fp.topic, fp.partition)?;
                    let watch = p.subscribe();
                    let now = *watch.borrow();
                    watches.push(watch);
                    let offset = u64::try_from(fp.fetch_offset).map_err(|_| {
                        BrokerError::OffsetOutOfRange {
                            offset: 0,
                            log_start_offset: p.state().log_start_offset,
                            high_watermark: p.state().high_watermark,
                        }
                    })?;
                    let budget = match fp.partition_max_bytes {
                        0 => DEFAULT_PARTITION_MAX_BYTES,
                        n => n as usize,
                    }
                    .min(room);
                    let caught_up = now.holds(offset) && offset >= now.high_watermark;
                    if caught_up || (budget == 0 && total > 0) {
                        // Nothing to read yet (the watch wakes us when there is), or no
                        // room left: no round trip to the partition task for an empty
                        // answer.
                        return Ok((now, bytes::Bytes::new()));
                    }
                    if now.holds(offset) {
                        // A reader near the end is served from what the partition last
                        // published, without waiting for a round of its task.
                        let recent = p.read_recent(offset, budget.max(1), now.high_watermark);
                        if let Some(data) = recent {
                            return Ok((now, data));
                        }
                    }
                    let data = p.read(offset, budget.max(1)).await?;
                    Ok::<_, BrokerError>((p.state(), data))
                }
                .await;
                let resp = &mut out[i];
                match result {
                    Ok((state, mut data)) => {
                        resp.high_watermark = state.high_watermark as i64;
                        resp.log_start_offset = state.log_start_offset as i64;
                        if total > 0 && data.len() > room {
                            // A read gives at least one batch, however large; as in
                            // Kafka only the answer's first records may pass
                            // `max_bytes`, and this partition waits for its turn.
                            data = bytes::Bytes::new();
                        }
                        if !data.is_empty() {
                            last_served = Some(i);
                        }
                        total += data.len();
                        resp.records = data;
                    }
                    Err(e) => {
                        any_error = true;
                        resp.high_watermark = -1;
                        resp.log_start_offset = -1;
                        resp.error = Some(to_error(&e));
                    }
                }
            }
            if total >= min_bytes || any_error || watches.is_empty() || Instant::now() >= deadline {
                let response = FetchResponse {
                    partitions: out,
                    request_id: 0,
                };
                let next = last_served.map_or(start, |i| (i + 1) % n);
                return Ok((response, next));
            }
            // Wait for any partition's offsets to move, or the deadline.
            let changes = watches
                .iter_mut()
                .map(|w| w.changed().boxed())
                .collect::<Vec<_>>();
            tokio::select! {
                _ = select_all(changes) => {}
                _ = tokio::time::sleep_until(deadline) => {}
                () = self.ctx.stopped() => {
                    let response = FetchResponse {
                        partitions: out,
                        request_id: 0,
                    };
                    return Ok((response, start));
                }
            }
        }
    }
}

/// `FetchService` as the server routes it: `Fetch` answers with each partition's
/// records sent from the log's pages as they are (see [`respond`]); `ListOffsets` goes to
/// the generated server.
pub type FetchRoutes = Intercept<FetchServiceServer<FetchSvc>, FetchCalls>;

impl FetchRoutes {
    /// The routes over a broker context.
    pub fn over(ctx: Arc<Context>) -> Self {
        let svc = FetchSvc::new(ctx);
        let generated = FetchServiceServer::new(svc.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Intercept::new(generated, FetchCalls { svc })
    }
}

/// The fetch calls served without tonic's codec.
#[derive(Clone)]
pub struct FetchCalls {
    svc: FetchSvc,
}

impl Handler for FetchCalls {
    const NAME: &'static str = <FetchServiceServer<FetchSvc> as NamedService>::NAME;

    fn takes(&self, req: &http::Request<Body>) -> bool {
        is_call(req, Self::NAME, "Fetch") || is_call(req, Self::NAME, "FetchStream")
    }

    fn serve(&self, req: http::Request<Body>) -> BoxFuture<http::Response<Body>, Infallible> {
        let svc = self.svc.clone();
        if is_call(&req, Self::NAME, "FetchStream") {
            return Box::pin(async move {
                Ok(match MessageReader::of_request(req) {
                    Ok(requests) => {
                        let (tx, rx) = mpsc::channel(STREAM_AHEAD);
                        tokio::spawn(stream_answers(svc, requests, tx));
                        respond_stream(rx)
                    }
                    Err(status) => status.into_http(),
                })
            });
        }
        let call = move |r: FetchRequest| async move { svc.fetch(Request::new(r)).await };
        serve_unary(req, call, fetch_answer)
    }
}

/// Answers of a `FetchStream` call written ahead of the socket: one is prepared while
/// the last goes out, and HTTP/2's flow control holds the rest back.
const STREAM_AHEAD: usize = 1;

/// What woke a `FetchStream` call's loop.
enum Woke {
    Asked(Result<Option<super::framing::Message>, Status>),
    Answered(Result<(FetchResponse, usize), Status>),
    Stopped,
}

/// Serves one `FetchStream` call: answers the latest request as `Fetch` does, then
/// again from where that answer ended, sending only answers with records or errors,
/// until the client stops asking, goes away, or the broker stops.
async fn stream_answers(
    svc: FetchSvc,
    mut requests: MessageReader<Body>,
    answers: mpsc::Sender<Result<Pieces, Status>>,
) {
    let mut current: Option<FetchRequest> = None;
    // Where the next answer starts filling (`FetchSvc::fetch_from`); kept across
    // requests, so a client that asks anew after every answer is served in turn too.
    let mut start = 0;
    loop {
        // A request that arrives while the last is long-polling replaces it; dropping
        // the poll loses nothing, as it has sent nothing.
        let asked = current.clone().unwrap_or_default();
        let woke = tokio::select! {
            biased;
            () = svc.ctx.stopped() => Woke::Stopped,
            () = answers.closed() => return,
            m = requests.next() => Woke::Asked(m),
            a = svc.fetch_from(asked, start), if current.is_some() => Woke::Answered(a),
        };
        let failed = match woke {
            Woke::Stopped | Woke::Asked(Ok(None)) => return,
            Woke::Asked(Ok(Some(message))) => match FetchRequest::decode(message) {
                Ok(mut request) => {
                    // Empty answers are never sent, so a wait of 0 would only spin.
                    if request.max_wait_ms == 0 {
                        request.max_wait_ms = MAX_WAIT.as_millis() as u32;
                    }
                    // Nothing to read: wait for a request that names something.
                    current = (!request.partitions.is_empty()).then_some(request);
                    continue;
                }
                Err(e) => Status::invalid_argument(format!("invalid request: {e}")),
            },
            Woke::Asked(Err(status)) | Woke::Answered(Err(status)) => status,
            Woke::Answered(Ok((mut response, next))) => {
                start = next;
                let Some(request) = current.as_mut() else {
                    continue;
                };
                let id = request.request_id;
                let moved = advance(request, &response);
                let records = response.partitions.iter().any(|p| !p.records.is_empty());
                if response.partitions.iter().any(|p| p.error.is_some()) {
                    // The client must act on the error (reset, reroute) and ask anew.
                    current = None;
                } else if !moved && records {
                    // Records that move no position (none whole): asking for them again
                    // would only spin, so the client sees them and asks anew.
                    current = None;
                } else if !moved {
                    // The wait ran out with nothing new: poll again, silently.
                    continue;
                }
                response.request_id = id;
                match answer_pieces(response) {
                    Ok(pieces) => {
                        if answers.send(Ok(pieces)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(status) => status,
                }
            }
        };
        let _ = answers.send(Err(failed)).await;
        return;
    }
}

/// `FetchResponse.partitions`'s field number.
const PARTITIONS_FIELD: u32 = 1;
/// `FetchPartitionResponse.records`'s field number.
const RECORDS_FIELD: u32 = 5;

/// Moves each partition of `request` past the last batch `response` gave it (the two
/// list the same partitions in the same order); whether any moved.
fn advance(request: &mut FetchRequest, response: &FetchResponse) -> bool {
    let mut moved = false;
    for (asked, got) in request.partitions.iter_mut().zip(&response.partitions) {
        if got.error.is_some() {
            continue;
        }
        if let Some(end) = BatchIter::end_offset(&got.records) {
            let after = i64::try_from(end).unwrap_or(i64::MAX);
            if after > asked.fetch_offset {
                asked.fetch_offset = after;
                moved = true;
            }
        }
    }
    moved
}

/// A fetch's answer on the wire, each partition's records by reference.
fn fetch_answer(response: FetchResponse) -> http::Response<Body> {
    match answer_pieces(response) {
        Ok(out) => respond(out),
        Err(status) => status.into_http(),
    }
}

/// A fetch's answer as one gRPC message, each partition's records by reference.
fn answer_pieces(response: FetchResponse) -> Result<Pieces, Status> {
    // The fields besides the partitions, written before them (field order is free): an
    // answer that ends with a partition's records goes out in one write, while a small
    // field after them took a write, and a wake-up of the reader, of its own.
    let rest = FetchResponse {
        partitions: Vec::new(),
        request_id: response.request_id,
    };
    let parts: Vec<(FetchPartitionResponse, bytes::Bytes, usize)> = response
        .partitions
        .into_iter()
        .map(|mut p| {
            let records = std::mem::take(&mut p.records);
            let len = p.encoded_len() + bytes_field_len(RECORDS_FIELD, &records);
            (p, records, len)
        })
        .collect();
    let total = parts
        .iter()
        .map(|(_, _, len)| field_overhead(PARTITIONS_FIELD, *len) + len)
        .sum::<usize>()
        + rest.encoded_len();
    let mut out = Pieces::new(total)?;
    out.encoded(&rest);
    for (p, records, len) in parts {
        out.field_start(PARTITIONS_FIELD, len);
        out.encoded(&p);
        out.bytes_field(RECORDS_FIELD, records);
    }
    Ok(out)
}

fn lookup(ctx: &Context, topic: &str, partition: i32) -> Result<PartitionHandle, BrokerError> {
    ctx.check_leader(topic, partition_number(partition))?;
    let md = ctx.topics.metadata();
    let t = md.topic(topic)?;
    t.partition(partition_number(partition)).cloned()
}

#[tonic::async_trait]
impl FetchService for FetchSvc {
    // `FetchStream` is served by `FetchCalls` (`stream_answers`) before tonic's server
    // sees it; this stands in for the trait only.
    type FetchStreamStream = futures_util::stream::Empty<Result<FetchResponse, Status>>;

    async fn fetch_stream(
        &self,
        _request: Request<tonic::Streaming<FetchRequest>>,
    ) -> Result<Response<Self::FetchStreamStream>, Status> {
        Err(Status::internal("FetchStream is routed to its own handler"))
    }

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let (response, _) = self.fetch_from(request.into_inner(), 0).await?;
        Ok(Response::new(response))
    }

    async fn list_offsets(
        &self,
        request: Request<ListOffsetsRequest>,
    ) -> Result<Response<ListOffsetsResponse>, Status> {
        let mut answers = Vec::new();
        for q in request.into_inner().queries {
            let mut a = OffsetAnswer {
                topic: q.topic.clone(),
                partition: q.partition,
                offset: -1,
                timestamp_ms: -1,
                error: None,
            };
            let result = async {
                let spec = match q.spec {
                    Some(offset_query::Spec::Earliest(_)) => OffsetSpec::Earliest,
                    Some(offset_query::Spec::Latest(_)) | None => OffsetSpec::Latest,
                    Some(offset_query::Spec::TimestampMs(ts)) => OffsetSpec::Timestamp(ts),
                };
                lookup(&self.ctx, &q.topic, q.partition)?
                    .list_offset(spec)
                    .await
            }
            .await;
            match result {
                Ok((offset, ts)) => {
                    a.offset = offset as i64;
                    a.timestamp_ms = ts;
                }
                Err(e) => a.error = Some(to_error(&e)),
            }
            answers.push(a);
        }
        Ok(Response::new(ListOffsetsResponse { answers }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tonic::codegen::Body as _;

    /// Partition 3 of topic "a", holding `records`.
    fn holding(records: &Bytes) -> FetchPartitionResponse {
        FetchPartitionResponse {
            topic: "a".into(),
            partition: 3,
            high_watermark: 10,
            log_start_offset: 2,
            records: records.clone(),
            error: None,
        }
    }

    #[test]
    fn a_one_partition_answer_ends_with_its_records() {
        // Nothing after the records: a chunk after them would go out in a write of its
        // own, and the reader would wake for a message it cannot decode yet.
        let records = Bytes::from(vec![7u8; 3000]);
        let response = FetchResponse {
            partitions: vec![holding(&records)],
            request_id: 9,
        };
        let chunks = answer_pieces(response).expect("pieces").into_chunks();
        assert_eq!(chunks.len(), 2, "a head and the records");
        assert_eq!(chunks[1].as_ptr(), records.as_ptr());
        assert_eq!(chunks[1].len(), records.len());
    }

    #[tokio::test]
    async fn an_answer_decodes_whole_and_its_records_are_not_copied() {
        let records = Bytes::from(vec![7u8; 3000]);
        let response = FetchResponse {
            partitions: vec![
                holding(&records),
                // An empty partition and an error one: no records field at all.
                FetchPartitionResponse {
                    topic: "b".into(),
                    partition: 0,
                    high_watermark: 0,
                    ..Default::default()
                },
                FetchPartitionResponse {
                    topic: "c".into(),
                    partition: 1,
                    high_watermark: -1,
                    log_start_offset: -1,
                    error: Some(to_error(&BrokerError::InvalidRequest("x".into()))),
                    ..Default::default()
                },
            ],
            // Written before the partitions: it must still decode.
            request_id: 7,
        };
        let mut body = fetch_answer(response.clone()).into_body();
        let mut wire = Vec::new();
        let mut shared = false;
        let mut trailers = None;
        while let Some(frame) =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.expect("a frame");
            if frame.is_trailers() {
                trailers = frame.into_trailers().ok();
                continue;
            }
            let data = frame.into_data().expect("data");
            shared |= data.as_ptr() == records.as_ptr();
            wire.extend_from_slice(&data);
        }
        assert!(shared, "the records went out as the caller's bytes");
        let trailers = trailers.expect("trailers");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        assert_eq!(wire[0], 0);
        let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
        assert_eq!(len, wire.len() - 5);
        let back = FetchResponse::decode(&wire[5..]).expect("decodes");
        assert_eq!(back, response);
    }
}
