//! One broker's produce stream, on an HTTP/2 connection of its own.
//!
//! The stream is driven straight through `h2` rather than through tonic's channel: there
//! a request body is polled by a task of its own that hands each message to the
//! connection's task, so every batch cost two task wake-ups before reaching the socket,
//! and each is a thread wake-up when the tasks sit on different threads. Here the
//! producer's dispatcher puts each message into the stream itself, and only the
//! connection's task stands between it and the socket. The batch is not copied: a
//! message is its gRPC prefix with every field but the batch, chained to the batch's
//! own `Bytes` (`sluice_proto::wire::Pieces`), which h2 hands to a vectored socket
//! write as they are.

use std::time::Duration;

use bytes::buf::Chain;
use bytes::{Buf, Bytes, BytesMut};
use h2::client::SendRequest;
use h2::{Ping, RecvStream, SendStream};
use prost::Message as _;
use sluice_proto::v1::produce_service_server::SERVICE_NAME;
use sluice_proto::v1::{ProduceRequest, ProduceStreamRequest, ProduceStreamResponse};
use sluice_proto::wire::{bytes_field_len, field_overhead, Pieces};
use tokio::net::TcpStream;
use tonic::Status;

use crate::connection::{broker_uri, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES};

/// `ProduceStreamRequest.request`'s field number.
const REQUEST_FIELD: u32 = 2;
/// `ProduceRequest.records`'s field number.
const RECORDS_FIELD: u32 = 3;
/// How long connecting may take, as for the client's other channels.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The connection is pinged this often, busy or not...
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection is dropped if the ping is not answered within this.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The gRPC message prefix: a compressed flag and a 4-byte length.
const PREFIX: usize = 5;

/// One message on the stream: everything up to the batch, then the batch itself. Handed
/// to the stream in one call, so the connection's task, which may run on another thread
/// meanwhile, does not write the head alone before the batch has been handed over.
pub(crate) type Message = Chain<Bytes, Bytes>;

/// The message that carries `inner` as the stream item `correlation_id`,
/// `ProduceStreamRequest { correlation_id, request: inner }` in gRPC's wire form: its
/// head, with every field but the batch, chained to the batch by reference (the last
/// field written). Refused past `MAX_MESSAGE_BYTES`, as tonic's encoder refuses it.
pub(crate) fn message(correlation_id: u64, mut inner: ProduceRequest) -> Result<Message, Status> {
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
    // The batch is written last, so the head and the batch (none when empty) are all.
    let mut chunks = out.into_chunks();
    let head = chunks.pop_front().unwrap_or_default();
    let batch = chunks.pop_front().unwrap_or_default();
    if !chunks.is_empty() {
        return Err(Status::internal(
            "a produce message in more than two pieces",
        ));
    }
    Ok(head.chain(batch))
}

/// The end of the request stream, for the empty last frame.
pub(crate) fn end_of_stream() -> Message {
    Bytes::new().chain(Bytes::new())
}

/// The `host:port` of a broker address given as `host:port` or `http://host:port`.
fn authority(addr: &str) -> Result<String, Status> {
    let uri: http::Uri = broker_uri(addr)
        .parse()
        .map_err(|e| Status::invalid_argument(format!("broker address {addr}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(Status::invalid_argument(format!(
            "broker address {addr}: only http:// is supported"
        )));
    }
    uri.authority()
        .map(|a| a.to_string())
        .ok_or_else(|| Status::invalid_argument(format!("broker address {addr}: no host")))
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("{what}: {e}"))
}

/// Opens `ProduceService/ProduceStream` on a new connection to `addr`, and returns its
/// sending half and its answers once the broker has accepted the call.
pub(crate) async fn open(addr: &str) -> Result<(SendStream<Message>, Answers), Status> {
    let authority = authority(addr)?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&authority))
        .await
        .map_err(|_| Status::unavailable(format!("{addr}: connecting timed out")))?
        .map_err(|e| unavailable(addr, e))?;
    tcp.set_nodelay(true).map_err(|e| unavailable(addr, e))?;
    // The same windows and frame size as the client's tonic channels.
    let (client, mut connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .max_frame_size(MAX_FRAME_BYTES)
        .handshake::<_, Message>(tcp)
        .await
        .map_err(|e| unavailable(addr, e))?;
    let mut ping = connection.ping_pong();
    let broker = addr.to_string();
    tokio::spawn(async move {
        let keep_alive = async {
            loop {
                tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
                let pong = match ping.as_mut() {
                    Some(p) => tokio::time::timeout(KEEP_ALIVE_TIMEOUT, p.ping(Ping::opaque())),
                    None => return std::future::pending().await,
                };
                if !matches!(pong.await, Ok(Ok(_))) {
                    return;
                }
            }
        };
        // Dropping the connection ends its streams with an error, which their
        // readers see.
        tokio::select! {
            end = &mut connection => if let Err(e) = end {
                tracing::debug!(broker = %broker, error = %e, "produce connection ended");
            },
            () = keep_alive => {
                tracing::warn!(broker = %broker, "the broker did not answer a ping; dropping the connection");
            }
        }
    });
    let (response, send) = start(client, &authority).await?;
    let response = response.await.map_err(|e| unavailable(addr, e))?;
    // A failure before any answer (a refused call) comes as headers only.
    if let Some(status) = Status::from_header_map(response.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    if response.status() != http::StatusCode::OK {
        return Err(Status::unknown(format!(
            "{addr}: the produce call was answered with HTTP {}",
            response.status()
        )));
    }
    Ok((
        send,
        Answers {
            recv: response.into_body(),
            buf: BytesMut::new(),
        },
    ))
}

/// Sends the call's headers.
async fn start(
    client: SendRequest<Message>,
    authority: &str,
) -> Result<(h2::client::ResponseFuture, SendStream<Message>), Status> {
    let mut client = client
        .ready()
        .await
        .map_err(|e| unavailable(authority, e))?;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{authority}/{SERVICE_NAME}/ProduceStream"))
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(())
        .map_err(|e| Status::internal(format!("cannot build the produce request: {e}")))?;
    client
        .send_request(request, false)
        .map_err(|e| unavailable(authority, e))
}

/// The broker's answers on a produce stream.
pub(crate) struct Answers {
    recv: RecvStream,
    /// Bytes received and not yet cut into messages.
    buf: BytesMut,
}

impl Answers {
    /// The next answer; `None` once the broker ended the stream with an OK status.
    pub(crate) async fn next(&mut self) -> Option<Result<ProduceStreamResponse, Status>> {
        loop {
            match take_answer(&mut self.buf) {
                Ok(Some(m)) => return Some(Ok(m)),
                Ok(None) => {}
                Err(status) => return Some(Err(status)),
            }
            match self.recv.data().await {
                Some(Ok(chunk)) => {
                    // The window opens again as soon as the bytes are ours.
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Some(Err(unavailable("produce stream", e))),
                None => return self.ended().await,
            }
        }
    }

    /// The stream's end: its trailers say how the call ended.
    async fn ended(&mut self) -> Option<Result<ProduceStreamResponse, Status>> {
        if !self.buf.is_empty() {
            return Some(Err(Status::internal(format!(
                "the produce stream ended inside an answer ({} bytes left over)",
                self.buf.len()
            ))));
        }
        match self.recv.trailers().await {
            Ok(Some(trailers)) => match Status::from_header_map(&trailers) {
                Some(status) if status.code() != tonic::Code::Ok => Some(Err(status)),
                Some(_) => None,
                None => Some(Err(Status::internal(
                    "the produce stream ended without a grpc-status",
                ))),
            },
            Ok(None) => Some(Err(Status::internal(
                "the produce stream ended without trailers",
            ))),
            Err(e) => Some(Err(unavailable("produce stream", e))),
        }
    }
}

/// Cuts one whole answer off the front of `buf`, if `buf` holds one.
fn take_answer(buf: &mut BytesMut) -> Result<Option<ProduceStreamResponse>, Status> {
    if buf.len() < PREFIX {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(Status::internal(
            "the broker sent a compressed answer, which was not asked for",
        ));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(Status::out_of_range(format!(
            "an answer of {len} bytes; the limit is {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    if buf.len() < PREFIX + len {
        buf.reserve(PREFIX + len - buf.len());
        return Ok(None);
    }
    buf.advance(PREFIX);
    let message = buf.split_to(len);
    ProduceStreamResponse::decode(message.freeze())
        .map(Some)
        .map_err(|e| Status::internal(format!("an undecodable answer: {e}")))
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
    fn the_message_decodes_and_carries_the_batch_uncopied() {
        let big: &'static [u8] = Box::leak(vec![0xab; 70_000].into_boxed_slice());
        for records in [&b""[..], b"x", big] {
            let mut m = message(300, request(records)).expect("within the limit");
            // A head, then the batch as a part of its own (empty when it is).
            assert_eq!(&m.last_ref()[..], records);
            if !records.is_empty() {
                assert_eq!(
                    m.last_ref().as_ptr(),
                    records.as_ptr(),
                    "the batch is not copied"
                );
            }
            let wire = m.copy_to_bytes(m.remaining());
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

    fn framed(m: &ProduceStreamResponse) -> Vec<u8> {
        let body = m.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn answers_are_cut_whole_however_the_bytes_arrive() {
        use sluice_proto::v1::{produce_stream_response, ProduceResponse};
        let answers: Vec<ProduceStreamResponse> = (0..3u64)
            .map(|i| ProduceStreamResponse {
                correlation_id: i + 1,
                result: Some(produce_stream_response::Result::Response(ProduceResponse {
                    base_offset: (i * 10) as i64,
                    log_append_time: -1,
                    ..ProduceResponse::default()
                })),
            })
            .collect();
        let wire: Vec<u8> = answers.iter().flat_map(framed).collect();
        for cut in 1..=wire.len() {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(cut) {
                buf.extend_from_slice(piece);
                while let Some(m) = take_answer(&mut buf).expect("well formed") {
                    got.push(m);
                }
            }
            assert_eq!(got, answers, "pieces of {cut} bytes");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn compressed_oversized_and_undecodable_answers_are_errors() {
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        let code = take_answer(&mut compressed).err().map(|s| s.code());
        assert_eq!(code, Some(tonic::Code::Internal));
        let mut huge = BytesMut::from(&[0u8, 0xff, 0xff, 0xff, 0xff][..]);
        let code = take_answer(&mut huge).err().map(|s| s.code());
        assert_eq!(code, Some(tonic::Code::OutOfRange));
        // Field 1 as a varint that never ends.
        let mut garbage = BytesMut::from(&[0u8, 0, 0, 0, 2, 0x08, 0xff][..]);
        let code = take_answer(&mut garbage).err().map(|s| s.code());
        assert_eq!(code, Some(tonic::Code::Internal));
    }

    #[test]
    fn broker_addresses_name_a_host_and_port() {
        assert_eq!(
            authority("127.0.0.1:9292").ok(),
            Some("127.0.0.1:9292".into())
        );
        assert_eq!(
            authority("http://localhost:9292").ok(),
            Some("localhost:9292".into())
        );
        let refused = authority("https://localhost:9292").err().map(|s| s.code());
        assert_eq!(refused, Some(tonic::Code::InvalidArgument));
    }
}
