//! The produce stream's request body, written without copying the batches.
//!
//! tonic's encoder writes each message whole into one buffer, so every batch would be
//! copied once more on its way to the socket. Here a message goes out as two HTTP/2
//! data chunks: its gRPC prefix with every field but the batch, and then the batch's
//! own `Bytes`, which the HTTP/2 layer hands to a vectored socket write as it is.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use sluice_proto::v1::produce_service_server::SERVICE_NAME;
use sluice_proto::v1::{ProduceRequest, ProduceStreamRequest, ProduceStreamResponse};
use tokio::sync::mpsc;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::codegen::{http, Body as HttpBody, Service};
use tonic::transport::Channel;
use tonic::Status;

use crate::connection::MAX_MESSAGE_BYTES;

/// `ProduceStreamRequest.request`'s field number.
const REQUEST_FIELD: u32 = 2;
/// `ProduceRequest.records`'s field number.
const RECORDS_FIELD: u32 = 3;

/// A length-delimited field's key.
fn key(field: u32) -> u64 {
    u64::from(field) << 3 | 2
}

/// One stream item, `ProduceStreamRequest { correlation_id, request: inner }`, as gRPC's
/// wire form in two parts: everything up to the batch, then the batch. The batch is the
/// last field written; protobuf readers accept fields in any order.
pub(crate) fn split_message(correlation_id: u64, mut inner: ProduceRequest) -> (Bytes, Bytes) {
    let records = std::mem::take(&mut inner.records);
    let outer = ProduceStreamRequest {
        correlation_id,
        request: None,
    };
    let outer_len = outer.encoded_len();
    let inner_head_len = inner.encoded_len();
    let varint_len = |v: u64| prost::encoding::encoded_len_varint(v);
    let records_len = if records.is_empty() {
        0
    } else {
        varint_len(key(RECORDS_FIELD)) + varint_len(records.len() as u64) + records.len()
    };
    let inner_len = inner_head_len + records_len;
    let message_len =
        outer_len + varint_len(key(REQUEST_FIELD)) + varint_len(inner_len as u64) + inner_len;
    let mut head = BytesMut::with_capacity(5 + message_len - records.len());
    head.put_u8(0);
    head.put_u32(message_len as u32);
    // `encode` fails only for want of room, and `head` has exactly enough.
    let _ = outer.encode(&mut head);
    prost::encoding::encode_varint(key(REQUEST_FIELD), &mut head);
    prost::encoding::encode_varint(inner_len as u64, &mut head);
    let _ = inner.encode(&mut head);
    if !records.is_empty() {
        prost::encoding::encode_varint(key(RECORDS_FIELD), &mut head);
        prost::encoding::encode_varint(records.len() as u64, &mut head);
    }
    (head.freeze(), records)
}

/// The request body: each `(correlation id, request)` from `rx`, as [`split_message`]
/// cuts it.
struct RequestBody {
    rx: mpsc::Receiver<(u64, ProduceRequest)>,
    /// The batch to send after the head just sent.
    batch: Option<Bytes>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if let Some(batch) = self.batch.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(batch))));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some((id, req))) => {
                let (head, batch) = split_message(id, req);
                let len = head.len() - 5 + batch.len();
                if len > MAX_MESSAGE_BYTES {
                    // As tonic's encoder does: the stream fails, nothing is sent.
                    return Poll::Ready(Some(Err(Status::out_of_range(format!(
                        "a produce message of {len} bytes; the limit is {MAX_MESSAGE_BYTES}"
                    )))));
                }
                if !batch.is_empty() {
                    self.batch = Some(batch);
                }
                Poll::Ready(Some(Ok(http_body::Frame::data(head))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Decodes the broker's answers (tonic's prost decoder, without its codec crate).
struct AnswerDecoder;

impl Decoder for AnswerDecoder {
    type Item = ProduceStreamResponse;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        ProduceStreamResponse::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("invalid produce answer: {e}")))
    }
}

/// Opens `ProduceService/ProduceStream` on `channel`, sending what `rx` yields.
pub(crate) async fn produce_stream(
    mut channel: Channel,
    rx: mpsc::Receiver<(u64, ProduceRequest)>,
) -> Result<Streaming<ProduceStreamResponse>, Status> {
    let body = tonic::body::Body::new(RequestBody { rx, batch: None });
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
        return Ok(Streaming::new_empty(AnswerDecoder, response.into_body()));
    }
    let code = response.status();
    Ok(Streaming::new_response(
        AnswerDecoder,
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
    fn the_two_parts_decode_as_the_message() {
        let big: &'static [u8] = Box::leak(vec![0xab; 70_000].into_boxed_slice());
        for records in [&b""[..], b"x", big] {
            let (head, batch) = split_message(300, request(records));
            assert_eq!(&batch[..], records);
            assert_eq!(batch.as_ptr(), records.as_ptr(), "the batch is not copied");
            let wire = [&head[..], &batch[..]].concat();
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
