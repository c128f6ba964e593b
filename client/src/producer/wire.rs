//! The produce stream's request body, written without copying the batches.
//!
//! tonic's encoder writes each message whole into one buffer, so every batch would be
//! copied once more on its way to the socket. Here a message goes out as two HTTP/2
//! data chunks (`sluice_proto::wire::Pieces`): its gRPC prefix with every field but the
//! batch, and then the batch's own `Bytes`, which the HTTP/2 layer hands to a vectored
//! socket write as it is.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use prost::Message;
use sluice_proto::v1::produce_service_server::SERVICE_NAME;
use sluice_proto::v1::{ProduceRequest, ProduceStreamRequest, ProduceStreamResponse};
use sluice_proto::wire::{bytes_field_len, field_overhead, Pieces};
use tokio::sync::mpsc;
use tonic::codec::Streaming;
use tonic::codegen::{http, Body as HttpBody, Service};
use tonic::transport::Channel;
use tonic::Status;
use tonic_prost::ProstDecoder;

use crate::connection::MAX_MESSAGE_BYTES;

/// `ProduceStreamRequest.request`'s field number.
const REQUEST_FIELD: u32 = 2;
/// `ProduceRequest.records`'s field number.
const RECORDS_FIELD: u32 = 3;

/// One stream item, `ProduceStreamRequest { correlation_id, request: inner }`, as gRPC's
/// wire form in chunks: everything up to the batch, then the batch by reference (the
/// last field written). Refused past `MAX_MESSAGE_BYTES`, as tonic's encoder refuses it.
pub(crate) fn message_chunks(
    correlation_id: u64,
    mut inner: ProduceRequest,
) -> Result<VecDeque<Bytes>, Status> {
    let records = std::mem::take(&mut inner.records);
    let outer = ProduceStreamRequest {
        correlation_id,
        request: None,
    };
    let inner_len = inner.encoded_len() + bytes_field_len(RECORDS_FIELD, &records);
    let len = outer.encoded_len() + field_overhead(REQUEST_FIELD, inner_len) + inner_len;
    let mut out = Pieces::new(len)?;
    out.encoded(&outer);
    out.field_start(REQUEST_FIELD, inner_len);
    out.encoded(&inner);
    out.bytes_field(RECORDS_FIELD, records);
    Ok(out.into_chunks())
}

/// The request body: each `(correlation id, request)` from `rx`, as [`message_chunks`]
/// cuts it.
struct RequestBody {
    rx: mpsc::Receiver<(u64, ProduceRequest)>,
    /// The rest of the message being sent.
    pending: VecDeque<Bytes>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.pending.is_empty() {
            match self.rx.poll_recv(cx) {
                // A message too large fails the stream, as tonic's encoder does.
                Poll::Ready(Some((id, req))) => match message_chunks(id, req) {
                    Ok(chunks) => self.pending = chunks,
                    Err(status) => return Poll::Ready(Some(Err(status))),
                },
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(
            self.pending
                .pop_front()
                .map(|c| Ok(http_body::Frame::data(c))),
        )
    }
}

/// Opens `ProduceService/ProduceStream` on `channel`, sending what `rx` yields.
pub(crate) async fn produce_stream(
    mut channel: Channel,
    rx: mpsc::Receiver<(u64, ProduceRequest)>,
) -> Result<Streaming<ProduceStreamResponse>, Status> {
    let body = tonic::body::Body::new(RequestBody {
        rx,
        pending: VecDeque::new(),
    });
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("/{SERVICE_NAME}/ProduceStream"))
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(body)
        .map_err(|e| Status::internal(format!("cannot build the produce request: {e}")))?;
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    // A failure before any answer comes as a response of headers only.
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
        return Ok(Streaming::new_empty(
            ProstDecoder::<ProduceStreamResponse>::default(),
            response.into_body(),
        ));
    }
    let code = response.status();
    Ok(Streaming::new_response(
        ProstDecoder::<ProduceStreamResponse>::default(),
        response.into_body(),
        code,
        None,
        Some(MAX_MESSAGE_BYTES),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(records: &'static [u8]) -> ProduceRequest {
        ProduceRequest {
            topic: "orders".into(),
            partition: 7,
            records: Bytes::from_static(records),
            acks: 2,
            timeout_ms: 30_000,
        }
    }

    #[test]
    fn the_chunks_decode_as_the_message() {
        let big: &'static [u8] = Box::leak(vec![0xab; 70_000].into_boxed_slice());
        for records in [&b""[..], b"x", big] {
            let chunks = message_chunks(300, request(records)).expect("within the limit");
            // A head, then the batch as a chunk of its own (none when it is empty).
            assert_eq!(chunks.len(), if records.is_empty() { 1 } else { 2 });
            if let [_, batch] = chunks.iter().collect::<Vec<_>>()[..] {
                assert_eq!(&batch[..], records);
                assert_eq!(batch.as_ptr(), records.as_ptr(), "the batch is not copied");
            }
            let wire: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(wire[0], 0, "uncompressed");
            let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
            assert_eq!(len, wire.len() - 5, "the prefix counts the whole message");
            let back = ProduceStreamRequest::decode(&wire[5..]).expect("decodes");
            let want = ProduceStreamRequest {
                correlation_id: 300,
                request: Some(request(records)),
            };
            assert_eq!(back, want);
        }
    }
}
