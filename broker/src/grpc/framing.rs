//! gRPC messages read straight from a request's HTTP/2 DATA frames, and answers whose
//! record bytes go to the socket as they are.
//!
//! tonic's decoder copies every DATA frame into one growing buffer and then reserves a
//! whole message's length again once the message's prefix is read, so a message that
//! arrived in one frame is copied twice before the handler sees it. Here a message is
//! the frames' own bytes: one slice when it arrived in one frame (as from tonic's
//! client, with frames of up to `MAX_FRAME_BYTES`), or its pieces when it spans frames
//! (as from Sluice's producer, which sends each batch as a frame of its own). Decoding
//! a `bytes` field that lies within one piece slices it; only a field split across
//! frames is copied.
//!
//! tonic's encoder likewise writes a whole answer into one buffer, so a fetch copied
//! every record it returned out of the log's mapped pages before the socket copied it
//! again. [`respond`] sends an answer written as [`Pieces`] instead: the records slices
//! go out as chunks of their own.
//!
//! [`Intercept`] routes the calls served this way to these functions and every other
//! call of the service to tonic's generated server.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sluice_proto::wire::Pieces;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Body as HttpBody;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::MAX_MESSAGE_BYTES;

/// gRPC's message prefix: a compressed flag and a big-endian length.
const PREFIX: usize = 5;

/// One gRPC message as its frames brought it: a `Buf` over its pieces whose
/// `copy_to_bytes` slices a piece when the bytes asked for lie within it.
#[derive(Debug, Default)]
pub(crate) struct Message {
    /// Never holds an empty piece, so `chunk` is empty only at the end.
    pieces: VecDeque<Bytes>,
    remaining: usize,
}

impl Message {
    fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.remaining += piece.len();
            self.pieces.push_back(piece);
        }
    }
}

impl Buf for Message {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.pieces.front().map_or(&[], |p| &p[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.pieces.front_mut() else {
                return;
            };
            let n = cnt.min(front.len());
            front.advance(n);
            self.remaining -= n;
            cnt -= n;
            if front.is_empty() {
                self.pieces.pop_front();
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if let Some(front) = self.pieces.front_mut() {
            if front.len() >= len {
                let out = front.split_to(len);
                self.remaining -= len;
                if front.is_empty() {
                    self.pieces.pop_front();
                }
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(len);
        out.put(self.take(len));
        out.freeze()
    }
}

/// Splits a request body into gRPC messages, without copying their bytes.
pub(crate) struct MessageReader<B> {
    body: B,
    /// What is left of the last DATA frame.
    chunk: Bytes,
    /// A prefix split across frames, gathered.
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// The length of the message being read, once its prefix is in.
    want: Option<usize>,
    /// The pieces of the message being read.
    message: Message,
    max_message: usize,
    done: bool,
}

impl<B> MessageReader<B>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    /// Reads messages of at most `max_message` bytes from `body`.
    pub(crate) fn new(body: B, max_message: usize) -> Self {
        MessageReader {
            body,
            chunk: Bytes::new(),
            prefix: [0; PREFIX],
            prefix_len: 0,
            want: None,
            message: Message::default(),
            max_message,
            done: false,
        }
    }

    /// The next whole message; `None` once the client has closed its side.
    pub(crate) async fn next(&mut self) -> Result<Option<Message>, Status> {
        loop {
            if let Some(message) = self.take()? {
                return Ok(Some(message));
            }
            // `take` used up the frame: only now is another read.
            if self.done {
                return if self.want.is_some() || self.prefix_len > 0 {
                    Err(Status::internal(
                        "the request ended inside a message (truncated gRPC frame)",
                    ))
                } else {
                    Ok(None)
                };
            }
            match std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.body).poll_frame(cx)).await
            {
                None => self.done = true,
                Some(Ok(frame)) => {
                    // Trailers on a request carry nothing we use.
                    if let Ok(data) = frame.into_data() {
                        self.chunk = data;
                    }
                }
                // As tonic does: a client that cancels its request has ended it.
                Some(Err(status)) if status.code() == Code::Cancelled => self.done = true,
                Some(Err(status)) => return Err(status),
            }
        }
    }

    /// A message out of what has arrived, if a whole one has; otherwise takes the
    /// frame into the gathered prefix or message.
    fn take(&mut self) -> Result<Option<Message>, Status> {
        loop {
            let Some(len) = self.want else {
                let n = (PREFIX - self.prefix_len).min(self.chunk.len());
                if n == 0 {
                    return Ok(None);
                }
                self.chunk
                    .copy_to_slice(&mut self.prefix[self.prefix_len..self.prefix_len + n]);
                self.prefix_len += n;
                if self.prefix_len == PREFIX {
                    self.prefix_len = 0;
                    self.want = Some(self.message_len(self.prefix)?);
                }
                continue;
            };
            let n = (len - self.message.remaining()).min(self.chunk.len());
            self.message.push(self.chunk.split_to(n));
            if self.message.remaining() == len {
                self.want = None;
                return Ok(Some(std::mem::take(&mut self.message)));
            }
            return Ok(None);
        }
    }

    fn message_len(&self, prefix: [u8; PREFIX]) -> Result<usize, Status> {
        match prefix[0] {
            0 => {}
            // No encoding is accepted (see `of_request`), so none may be used.
            1 => {
                return Err(Status::internal(
                    "a compressed message, but the request named no grpc-encoding",
                ))
            }
            f => {
                return Err(Status::internal(format!(
                    "invalid gRPC compressed flag {f} (0 and 1 are valid)"
                )))
            }
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > self.max_message {
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes; the limit is {} bytes",
                self.max_message
            )));
        }
        Ok(len)
    }
}

impl MessageReader<Body> {
    /// Reads the messages of `req`, of at most `MAX_MESSAGE_BYTES`; refuses a request
    /// that compresses them, as this reader accepts no encoding.
    pub(crate) fn of_request(req: http::Request<Body>) -> Result<Self, Status> {
        check_encoding(&req)?;
        Ok(MessageReader::new(req.into_body(), MAX_MESSAGE_BYTES))
    }
}

fn check_encoding<B>(req: &http::Request<B>) -> Result<(), Status> {
    match req.headers().get("grpc-encoding") {
        None => Ok(()),
        Some(v) if v.as_bytes() == b"identity" => Ok(()),
        Some(v) => Err(Status::unimplemented(format!(
            "messages compressed with {} are not accepted here; send them uncompressed",
            String::from_utf8_lossy(v.as_bytes())
        ))),
    }
}

/// The calls of one service served here rather than by tonic's generated server.
pub trait Handler: Clone + Send + Sync + 'static {
    /// The gRPC service's full name.
    const NAME: &'static str;

    /// Whether `req` is one of this handler's calls.
    fn takes(&self, req: &http::Request<Body>) -> bool;

    /// Serves one of this handler's calls.
    fn serve(&self, req: http::Request<Body>) -> BoxFuture<http::Response<Body>, Infallible>;
}

/// Whether `req` calls `method` of `service`.
pub(crate) fn is_call(req: &http::Request<Body>, service: &str, method: &str) -> bool {
    req.uri()
        .path()
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(service))
        .and_then(|p| p.strip_prefix('/'))
        == Some(method)
}

/// A generated service whose hot calls `H` serves itself.
#[derive(Clone)]
pub struct Intercept<S, H> {
    generated: S,
    handler: H,
}

impl<S, H> Intercept<S, H> {
    /// `generated`, with `handler`'s calls taken over.
    pub fn new(generated: S, handler: H) -> Self {
        Intercept { generated, handler }
    }
}

impl<S, H: Handler> NamedService for Intercept<S, H> {
    const NAME: &'static str = H::NAME;
}

impl<S, H> Service<http::Request<Body>> for Intercept<S, H>
where
    S: Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = BoxFuture<http::Response<Body>, Infallible>,
    >,
    H: Handler,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.generated.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if self.handler.takes(&req) {
            self.handler.serve(req)
        } else {
            self.generated.call(req)
        }
    }
}

/// Serves a unary call: reads its one message, lets `call` answer it, and writes the
/// answer with `write`; a failure on either side goes back as a status.
pub(crate) fn serve_unary<M, R, Fut>(
    req: http::Request<Body>,
    call: impl FnOnce(M) -> Fut + Send + 'static,
    write: fn(R) -> http::Response<Body>,
) -> BoxFuture<http::Response<Body>, Infallible>
where
    M: prost::Message + Default + Send + 'static,
    R: 'static,
    Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>> + Send + 'static,
{
    Box::pin(async move {
        let answer = match read_unary::<M>(req).await {
            Ok(request) => call(request).await,
            Err(status) => Err(status),
        };
        Ok(match answer {
            Ok(response) => write(response.into_inner()),
            Err(status) => status.into_http(),
        })
    })
}

/// Reads a unary call's one message.
async fn read_unary<M: prost::Message + Default>(req: http::Request<Body>) -> Result<M, Status> {
    let mut reader = MessageReader::of_request(req)?;
    let Some(message) = reader.next().await? else {
        return Err(Status::internal("the request carried no message"));
    };
    let request =
        M::decode(message).map_err(|e| Status::internal(format!("invalid request: {e}")))?;
    if reader.next().await?.is_some() {
        return Err(Status::internal(
            "a unary call carried more than one message",
        ));
    }
    Ok(request)
}

/// A call's answer written as [`Pieces`]: its chunks, then the trailers of a call that
/// succeeded.
pub(crate) fn respond(answer: Pieces) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    grpc_response(Body::new(Chunks {
        chunks: answer.into_chunks(),
        trailers: Some(trailers),
    }))
}

/// A gRPC answer with `body`.
fn grpc_response(body: Body) -> http::Response<Body> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A streaming call's answers as they come from `answers`, then its trailers: OK once
/// the sender is gone, or the status an answer's place holds.
pub(crate) fn respond_stream(
    answers: tokio::sync::mpsc::Receiver<Result<Pieces, Status>>,
) -> http::Response<Body> {
    grpc_response(Body::new(Streamed {
        answers,
        chunks: VecDeque::new(),
        ended: false,
    }))
}

/// A body of answers arriving over a channel, each sent as its chunks.
struct Streamed {
    answers: tokio::sync::mpsc::Receiver<Result<Pieces, Status>>,
    chunks: VecDeque<Bytes>,
    ended: bool,
}

impl HttpBody for Streamed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        loop {
            if let Some(chunk) = self.chunks.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            let status = match std::task::ready!(self.answers.poll_recv(cx)) {
                Some(Ok(answer)) => {
                    self.chunks = answer.into_chunks();
                    continue;
                }
                Some(Err(status)) => status,
                None => Status::ok(""),
            };
            self.ended = true;
            // A status as an answer's headers holds exactly what its trailers must.
            let mut trailers = status.into_http::<Body>().into_parts().0.headers;
            trailers.remove(http::header::CONTENT_TYPE);
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.chunks.is_empty()
    }
}

/// A body of data chunks, then trailers.
struct Chunks {
    chunks: VecDeque<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl HttpBody for Chunks {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        Poll::Ready(
            self.trailers
                .take()
                .map(|t| Ok(http_body::Frame::trailers(t))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A body that yields the given DATA frames, then ends.
    struct Frames(VecDeque<Bytes>);

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn framed(messages: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    async fn read_all(frames: Vec<Bytes>, max: usize) -> Result<Vec<Bytes>, Status> {
        let mut r = MessageReader::new(Frames(frames.into()), max);
        let mut out = Vec::new();
        while let Some(mut m) = r.next().await? {
            out.push(m.copy_to_bytes(m.remaining()));
        }
        Ok(out)
    }

    fn messages() -> Vec<Vec<u8>> {
        vec![
            b"first".to_vec(),
            Vec::new(),
            (0..=255u8).cycle().take(3000).collect(),
            b"x".to_vec(),
        ]
    }

    #[tokio::test]
    async fn messages_come_out_whole_however_the_frames_cut_them() {
        let msgs = messages();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        let wire = framed(&refs);
        // Every frame size from one byte (prefixes split too) to all in one frame.
        for size in [1, 2, 3, 4, 5, 6, 7, 64, 1000, 3004, 3005, wire.len()] {
            let frames = wire.chunks(size).map(Bytes::copy_from_slice).collect();
            let got = read_all(frames, 1 << 20).await.expect("reads");
            assert_eq!(got, msgs, "frames of {size} bytes");
        }
    }

    #[tokio::test]
    async fn a_message_within_one_frame_is_a_slice_of_it() {
        let wire = Bytes::from(framed(&[b"hello", b"world"]));
        let mut r = MessageReader::new(Frames(vec![wire.clone()].into()), 1 << 20);
        let mut first = r.next().await.expect("reads").expect("a message");
        let bytes = first.copy_to_bytes(5);
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(bytes.as_ptr(), wire[PREFIX..].as_ptr(), "not copied");
    }

    #[tokio::test]
    async fn a_field_within_one_frame_of_a_split_message_is_a_slice_of_that_frame() {
        // As the producer sends a batch: the prefix and the fields before the batch,
        // then the batch as a frame of its own.
        let wire = framed(&[b"head:the batch itself"]);
        let (head, batch) = wire.split_at(PREFIX + 5);
        let batch = Bytes::copy_from_slice(batch);
        let frames = vec![Bytes::copy_from_slice(head), batch.clone()];
        let mut r = MessageReader::new(Frames(frames.into()), 1 << 20);
        let mut m = r.next().await.expect("reads").expect("a message");
        assert_eq!(m.remaining(), 21);
        assert_eq!(&m.copy_to_bytes(5)[..], b"head:");
        let got = m.copy_to_bytes(16);
        assert_eq!(&got[..], b"the batch itself");
        assert_eq!(got.as_ptr(), batch.as_ptr(), "not copied");
        assert_eq!(m.remaining(), 0);
        assert!(r.next().await.expect("reads").is_none());
    }

    #[test]
    fn bytes_across_pieces_are_gathered_in_order() {
        let mut m = Message::default();
        for p in [&b"ab"[..], b"", b"cde", b"f"] {
            m.push(Bytes::copy_from_slice(p));
        }
        assert_eq!(m.remaining(), 6);
        assert_eq!(&m.copy_to_bytes(3)[..], b"abc");
        m.advance(1);
        assert_eq!(m.chunk(), b"e");
        assert_eq!(&m.copy_to_bytes(2)[..], b"ef");
        assert_eq!(m.remaining(), 0);
        assert!(m.chunk().is_empty());
    }

    #[tokio::test]
    async fn a_body_that_ends_inside_a_message_is_an_error() {
        let wire = framed(&[b"hello"]);
        for cut in [1, PREFIX, PREFIX + 2] {
            let frames = vec![Bytes::copy_from_slice(&wire[..cut])];
            let err = read_all(frames, 1 << 20).await.expect_err("truncated");
            assert_eq!(err.code(), Code::Internal, "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn an_oversized_or_compressed_message_is_refused() {
        let wire = framed(&[&[7u8; 100]]);
        let err = read_all(vec![Bytes::from(wire.clone())], 99)
            .await
            .expect_err("too large");
        assert_eq!(err.code(), Code::OutOfRange);
        assert!(err.message().contains("100 bytes"), "{}", err.message());

        let mut compressed = wire.clone();
        compressed[0] = 1;
        let err = read_all(vec![Bytes::from(compressed)], 1 << 20)
            .await
            .expect_err("compressed");
        assert_eq!(err.code(), Code::Internal);

        let mut bad = wire;
        bad[0] = 9;
        let err = read_all(vec![Bytes::from(bad)], 1 << 20)
            .await
            .expect_err("bad flag");
        assert_eq!(err.code(), Code::Internal);
    }
}
