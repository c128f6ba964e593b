//! A gRPC message written as pieces, so its large `bytes` fields go to the socket as
//! the caller's own buffers.
//!
//! tonic's encoder writes a whole message into one buffer, copying every record a
//! produce sends or a fetch answers. [`Pieces`] writes the small encoded parts into a
//! head buffer and hands each large field over by reference, as a chunk of its own;
//! HTTP/2 sends all the chunks with one vectored write. Producer and broker both write
//! this way, so the rules for the prefix, keys and lengths live here once.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use tonic::Status;

use crate::MAX_MESSAGE_BYTES;

/// A length-delimited field's key.
fn key(field: u32) -> u64 {
    // Wire type 2: length-delimited.
    u64::from(field) << 3 | 2
}

/// The bytes a length-delimited field takes besides its content.
pub fn field_overhead(field: u32, len: usize) -> usize {
    prost::encoding::encoded_len_varint(key(field))
        + prost::encoding::encoded_len_varint(len as u64)
}

/// The bytes a `bytes` field of this content takes (none when empty: proto3 leaves it
/// out).
pub fn bytes_field_len(field: u32, content: &Bytes) -> usize {
    if content.is_empty() {
        0
    } else {
        field_overhead(field, content.len()) + content.len()
    }
}

/// One message's wire form, written in order as small encoded parts and, by reference,
/// the `bytes` fields between them. Protobuf readers take fields in any order, so a
/// large field can come last in its message.
pub struct Pieces {
    chunks: VecDeque<Bytes>,
    head: BytesMut,
}

impl Pieces {
    /// A message of `message_len` bytes (its gRPC prefix is written here); refused, as
    /// tonic's encoder refuses it, past `MAX_MESSAGE_BYTES`.
    pub fn new(message_len: usize) -> Result<Self, Status> {
        if message_len > MAX_MESSAGE_BYTES {
            return Err(Status::out_of_range(format!(
                "a message of {message_len} bytes; the limit is {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        let mut head = BytesMut::with_capacity(256);
        head.put_u8(0);
        head.put_u32(message_len as u32);
        Ok(Pieces {
            chunks: VecDeque::new(),
            head,
        })
    }

    /// Appends `m`'s fields.
    pub fn encoded(&mut self, m: &impl prost::Message) {
        // Writing to a growable buffer cannot run out of room, the only way it fails.
        let _ = m.encode(&mut self.head);
    }

    /// Appends the key and length of a length-delimited field whose content follows.
    pub fn field_start(&mut self, field: u32, len: usize) {
        prost::encoding::encode_varint(key(field), &mut self.head);
        prost::encoding::encode_varint(len as u64, &mut self.head);
    }

    /// Appends a `bytes` field, its content by reference (nothing when empty).
    pub fn bytes_field(&mut self, field: u32, content: Bytes) {
        if content.is_empty() {
            return;
        }
        self.field_start(field, content.len());
        self.chunks.push_back(self.head.split().freeze());
        self.chunks.push_back(content);
    }

    /// The message's chunks, in order.
    pub fn into_chunks(mut self) -> VecDeque<Bytes> {
        if !self.head.is_empty() {
            self.chunks.push_back(self.head.split().freeze());
        }
        self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ProduceRequest, ProduceStreamRequest};
    use prost::Message;

    #[test]
    fn pieces_decode_as_the_message_and_keep_the_bytes_field_uncopied() {
        let records = Bytes::from(vec![0xab; 70_000]);
        let inner = ProduceRequest {
            topic: "orders".into(),
            partition: 7,
            records: Bytes::new(),
            acks: 2,
            timeout_ms: 30_000,
        };
        let outer = ProduceStreamRequest {
            correlation_id: 300,
            request: None,
        };
        let inner_len = inner.encoded_len() + bytes_field_len(3, &records);
        let len = outer.encoded_len() + field_overhead(2, inner_len) + inner_len;
        let mut out = Pieces::new(len).expect("within the limit");
        out.encoded(&outer);
        out.field_start(2, inner_len);
        out.encoded(&inner);
        out.bytes_field(3, records.clone());
        let chunks = out.into_chunks();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1].as_ptr(), records.as_ptr(), "not copied");
        let wire: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(wire[0], 0, "uncompressed");
        let prefix_len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
        assert_eq!(prefix_len, wire.len() - 5);
        let back = ProduceStreamRequest::decode(&wire[5..]).expect("decodes");
        let want = ProduceStreamRequest {
            request: Some(ProduceRequest { records, ..inner }),
            ..outer
        };
        assert_eq!(back, want);
    }

    #[test]
    fn a_message_past_the_limit_is_refused() {
        let refused = Pieces::new(MAX_MESSAGE_BYTES + 1).err().map(|s| s.code());
        assert_eq!(refused, Some(tonic::Code::OutOfRange));
        assert!(Pieces::new(MAX_MESSAGE_BYTES).is_ok());
    }
}
