//! Builds record batches: the client uses it to produce, tests to make data.

use bytes::Bytes;

use super::record::{encode_record, RecordFields};
use super::{
    checksum, Compression, Header, ATTRIBUTES_POS, BASE_SEQUENCE_POS, CRC_POS, FIRST_TIMESTAMP_POS,
    HEADER_LEN, LAST_OFFSET_DELTA_POS, LEADER_EPOCH_POS, LENGTH_POS, LOG_OVERHEAD, MAGIC,
    MAGIC_POS, MAX_TIMESTAMP_POS, PRODUCER_EPOCH_POS, PRODUCER_ID_POS, RECORD_COUNT_POS,
};
use crate::error::Result;

/// Accumulates records and produces one batch with base offset 0, ready to send.
///
/// Uncompressed records are written straight after a reserved header, so `build`
/// copies nothing; compressed batches are compressed once, in `build`.
#[derive(Debug)]
pub struct RecordBatchBuilder {
    compression: Compression,
    /// Header space followed by the raw records.
    buf: Vec<u8>,
    count: u32,
    first_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
}

impl RecordBatchBuilder {
    /// A builder for an empty batch with the given codec.
    pub fn new(compression: Compression) -> Self {
        Self::with_capacity(compression, 16 * 1024)
    }

    /// A builder whose buffer starts with room for `bytes` of records.
    pub fn with_capacity(compression: Compression, bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + bytes);
        buf.resize(HEADER_LEN, 0);
        RecordBatchBuilder {
            compression,
            buf,
            count: 0,
            first_timestamp: 0,
            max_timestamp: i64::MIN,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
        }
    }

    /// Marks the batch as written by an idempotent producer.
    pub fn producer(mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Adds a record; returns the bytes it took (before compression).
    pub fn append(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
    ) -> usize {
        if self.count == 0 {
            self.first_timestamp = timestamp;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp);
        let fields = RecordFields {
            timestamp_delta: timestamp.wrapping_sub(self.first_timestamp),
            offset_delta: i64::from(self.count),
            key,
            value,
            headers,
        };
        self.count += 1;
        encode_record(&mut self.buf, &fields)
    }

    /// Records added so far.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether no record was added.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size of the batch so far, uncompressed, header included.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Finishes the batch: header, optional compression, CRC.
    pub fn build(self) -> Result<Bytes> {
        let mut out = match self.compression {
            Compression::None => self.buf,
            codec => {
                let mut out = Vec::with_capacity(HEADER_LEN + (self.buf.len() - HEADER_LEN) / 2);
                out.resize(HEADER_LEN, 0);
                codec.compress(&self.buf[HEADER_LEN..], &mut out)?;
                out
            }
        };
        let max_timestamp = if self.count == 0 {
            -1
        } else {
            self.max_timestamp
        };
        let length = (out.len() - LOG_OVERHEAD) as i32;
        out[..8].copy_from_slice(&0i64.to_be_bytes());
        out[LENGTH_POS..LENGTH_POS + 4].copy_from_slice(&length.to_be_bytes());
        out[LEADER_EPOCH_POS..LEADER_EPOCH_POS + 4].copy_from_slice(&(-1i32).to_be_bytes());
        out[MAGIC_POS] = MAGIC as u8;
        let attributes = i16::from(self.compression.id());
        out[ATTRIBUTES_POS..ATTRIBUTES_POS + 2].copy_from_slice(&attributes.to_be_bytes());
        let last_delta = self.count.saturating_sub(1) as i32;
        out[LAST_OFFSET_DELTA_POS..LAST_OFFSET_DELTA_POS + 4]
            .copy_from_slice(&last_delta.to_be_bytes());
        out[FIRST_TIMESTAMP_POS..FIRST_TIMESTAMP_POS + 8]
            .copy_from_slice(&self.first_timestamp.to_be_bytes());
        out[MAX_TIMESTAMP_POS..MAX_TIMESTAMP_POS + 8].copy_from_slice(&max_timestamp.to_be_bytes());
        out[PRODUCER_ID_POS..PRODUCER_ID_POS + 8].copy_from_slice(&self.producer_id.to_be_bytes());
        out[PRODUCER_EPOCH_POS..PRODUCER_EPOCH_POS + 2]
            .copy_from_slice(&self.producer_epoch.to_be_bytes());
        out[BASE_SEQUENCE_POS..BASE_SEQUENCE_POS + 4]
            .copy_from_slice(&self.base_sequence.to_be_bytes());
        out[RECORD_COUNT_POS..RECORD_COUNT_POS + 4]
            .copy_from_slice(&(self.count as i32).to_be_bytes());
        let crc = checksum(&out[ATTRIBUTES_POS..]);
        out[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_be_bytes());
        Ok(Bytes::from(out))
    }
}
