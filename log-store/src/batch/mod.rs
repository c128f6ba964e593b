//! The record batch: one format on the wire and on disk.
//!
//! The layout mirrors Kafka's record batch v2, big-endian, so that a Kafka-protocol
//! listener can translate batches cheaply. The only difference is the checksum: Sluice
//! uses CRC-32 (IEEE, `crc32fast`) where Kafka uses CRC-32C; it lives behind
//! [`checksum`] so it can change in one place.
//!
//! ```text
//! offset  size  field
//!      0     8  base offset            (stamped by the broker)
//!      8     4  batch length           (bytes after this field)
//!     12     4  partition leader epoch (stamped by the broker)
//!     16     1  format version (magic) = 2
//!     17     4  CRC of bytes 21..end
//!     21     2  attributes             (bits 0-2 codec, 3 timestamp type, 4 transactional, 5 control)
//!     23     4  last offset delta
//!     27     8  first timestamp
//!     35     8  max timestamp
//!     43     8  producer id
//!     51     2  producer epoch
//!     53     4  base sequence
//!     57     4  record count
//!     61        records (compressed as a whole when the codec is not `none`)
//! ```
//!
//! Because the CRC starts after the leader epoch, the broker stamps the base offset
//! and leader epoch without recomputing it.

mod builder;
mod compression;
mod record;
mod varint;

pub use builder::RecordBatchBuilder;
pub use compression::Compression;
pub use record::{Header, Record};

use bytes::Bytes;

use crate::error::{Error, Result};

/// Position of the base offset.
pub const BASE_OFFSET_POS: usize = 0;
/// Position of the batch length.
pub const LENGTH_POS: usize = 8;
/// Position of the partition leader epoch.
pub const LEADER_EPOCH_POS: usize = 12;
/// Position of the format version byte.
pub const MAGIC_POS: usize = 16;
/// Position of the CRC.
pub const CRC_POS: usize = 17;
/// Position of the attributes; the CRC covers everything from here on.
pub const ATTRIBUTES_POS: usize = 21;
/// Position of the last offset delta.
pub const LAST_OFFSET_DELTA_POS: usize = 23;
/// Position of the first timestamp.
pub const FIRST_TIMESTAMP_POS: usize = 27;
/// Position of the max timestamp.
pub const MAX_TIMESTAMP_POS: usize = 35;
/// Position of the producer id.
pub const PRODUCER_ID_POS: usize = 43;
/// Position of the producer epoch.
pub const PRODUCER_EPOCH_POS: usize = 51;
/// Position of the base sequence.
pub const BASE_SEQUENCE_POS: usize = 53;
/// Position of the record count.
pub const RECORD_COUNT_POS: usize = 57;
/// Size of the fixed header; records start here.
pub const HEADER_LEN: usize = 61;
/// Bytes before the length field's coverage starts (base offset + length).
pub const LOG_OVERHEAD: usize = 12;
/// The only format version this build writes and reads.
pub const MAGIC: i8 = 2;

const COMPRESSION_MASK: i16 = 0x07;
const TIMESTAMP_TYPE_BIT: i16 = 0x08;
const TRANSACTIONAL_BIT: i16 = 0x10;
const CONTROL_BIT: i16 = 0x20;

/// The checksum over a batch's covered bytes (everything from the attributes on).
pub fn checksum(covered: &[u8]) -> u32 {
    crc32fast::hash(covered)
}

/// Whether record timestamps are the producer's or the broker's append time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampType {
    /// The producer's timestamp (Kafka's `CreateTime`).
    #[default]
    CreateTime,
    /// The broker's time at append (Kafka's `LogAppendTime`).
    LogAppendTime,
}

/// The decoded fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Bytes after the length field.
    pub batch_length: u32,
    /// Epoch of the leader that appended the batch (-1 before the broker stamps it).
    pub partition_leader_epoch: i32,
    /// Format version.
    pub magic: i8,
    /// Stored checksum.
    pub crc: u32,
    /// Raw attribute bits.
    pub attributes: i16,
    /// Offset of the last record relative to the base offset.
    pub last_offset_delta: u32,
    /// Timestamp of the first record.
    pub first_timestamp: i64,
    /// Largest timestamp in the batch.
    pub max_timestamp: i64,
    /// Idempotent producer id, or -1.
    pub producer_id: i64,
    /// Idempotent producer epoch, or -1.
    pub producer_epoch: i16,
    /// Sequence number of the first record, or -1.
    pub base_sequence: i32,
    /// Number of records.
    pub record_count: u32,
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

impl BatchHeader {
    /// Decodes the header at the start of `buf` without checking the CRC.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        if buf.len() < HEADER_LEN {
            return Err(Error::LengthMismatch {
                declared: HEADER_LEN,
                actual: buf.len(),
            });
        }
        let base_offset = be_i64(buf, BASE_OFFSET_POS);
        let batch_length = be_i32(buf, LENGTH_POS);
        let magic = buf[MAGIC_POS] as i8;
        if magic != MAGIC {
            return Err(Error::UnsupportedVersion(magic));
        }
        if base_offset < 0 {
            return Err(Error::Malformed("negative base offset"));
        }
        if batch_length < (HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(Error::Malformed("batch length is shorter than the header"));
        }
        let last_offset_delta = be_i32(buf, LAST_OFFSET_DELTA_POS);
        let record_count = be_i32(buf, RECORD_COUNT_POS);
        if last_offset_delta < 0 || record_count < 0 {
            return Err(Error::Malformed("negative record count or offset delta"));
        }
        Ok(BatchHeader {
            base_offset: base_offset as u64,
            batch_length: batch_length as u32,
            partition_leader_epoch: be_i32(buf, LEADER_EPOCH_POS),
            magic,
            crc: be_i32(buf, CRC_POS) as u32,
            attributes: be_i16(buf, ATTRIBUTES_POS),
            last_offset_delta: last_offset_delta as u32,
            first_timestamp: be_i64(buf, FIRST_TIMESTAMP_POS),
            max_timestamp: be_i64(buf, MAX_TIMESTAMP_POS),
            producer_id: be_i64(buf, PRODUCER_ID_POS),
            producer_epoch: be_i16(buf, PRODUCER_EPOCH_POS),
            base_sequence: be_i32(buf, BASE_SEQUENCE_POS),
            record_count: record_count as u32,
        })
    }

    /// Total size of the batch in bytes, header included.
    pub fn total_len(&self) -> usize {
        self.batch_length as usize + LOG_OVERHEAD
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> u64 {
        self.base_offset + u64::from(self.last_offset_delta)
    }

    /// Offset after the last record.
    pub fn next_offset(&self) -> u64 {
        self.last_offset() + 1
    }

    /// The codec of the records part.
    pub fn compression(&self) -> Result<Compression> {
        Compression::from_id((self.attributes & COMPRESSION_MASK) as u8)
    }

    /// The timestamp type.
    pub fn timestamp_type(&self) -> TimestampType {
        if self.attributes & TIMESTAMP_TYPE_BIT != 0 {
            TimestampType::LogAppendTime
        } else {
            TimestampType::CreateTime
        }
    }

    /// Whether the batch belongs to a transaction.
    pub fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_BIT != 0
    }

    /// Whether the batch is a control batch (transaction markers).
    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_BIT != 0
    }
}

/// Limits applied when a batch arrives from a producer or a leader.
#[derive(Debug, Clone, Copy)]
pub struct ValidateOptions {
    /// Largest accepted batch, header included.
    pub max_batch_bytes: usize,
    /// Decompress compressed batches to check their record count and offset deltas.
    pub verify_compressed_records: bool,
}

impl Default for ValidateOptions {
    fn default() -> Self {
        ValidateOptions {
            max_batch_bytes: 1024 * 1024 + HEADER_LEN,
            verify_compressed_records: true,
        }
    }
}

/// Checks one whole batch: size limit, length field, version, CRC, and that the records
/// agree with the header's count and offset deltas. Nothing is modified.
pub fn validate(batch: &[u8], opts: &ValidateOptions) -> Result<BatchHeader> {
    if batch.len() > opts.max_batch_bytes {
        return Err(Error::BatchTooLarge {
            size: batch.len(),
            limit: opts.max_batch_bytes,
        });
    }
    let header = BatchHeader::parse(batch)?;
    if header.total_len() != batch.len() {
        return Err(Error::LengthMismatch {
            declared: header.total_len(),
            actual: batch.len(),
        });
    }
    let computed = checksum(&batch[ATTRIBUTES_POS..]);
    if computed != header.crc {
        return Err(Error::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    if header.record_count == 0 {
        return Err(Error::RecordCountMismatch {
            declared: 0,
            actual: 0,
        });
    }
    if header.last_offset_delta + 1 != header.record_count {
        return Err(Error::Malformed(
            "last offset delta does not match the record count",
        ));
    }
    let compression = header.compression()?;
    let body = &batch[HEADER_LEN..];
    match compression {
        Compression::None => record::check_records(body, header.record_count)?,
        _ if opts.verify_compressed_records => {
            let raw = compression.decompress(body, decompressed_limit(opts.max_batch_bytes))?;
            record::check_records(&raw, header.record_count)?;
        }
        _ => {}
    }
    Ok(header)
}

/// Bound on decompressed size: generous for real data, fatal for bombs.
fn decompressed_limit(max_batch_bytes: usize) -> usize {
    max_batch_bytes.saturating_mul(64).max(64 << 20)
}

/// Checks only the length field and CRC of the batch at the start of `buf`; used by
/// recovery, where the batch was validated once already and only damage matters.
pub fn check_framing(buf: &[u8]) -> Result<BatchHeader> {
    let header = BatchHeader::parse(buf)?;
    if header.total_len() > buf.len() {
        return Err(Error::LengthMismatch {
            declared: header.total_len(),
            actual: buf.len(),
        });
    }
    let computed = checksum(&buf[ATTRIBUTES_POS..header.total_len()]);
    if computed != header.crc {
        return Err(Error::CrcMismatch {
            stored: header.crc,
            computed,
        });
    }
    Ok(header)
}

/// Writes the base offset into a batch; the CRC does not cover it.
pub fn set_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[BASE_OFFSET_POS..BASE_OFFSET_POS + 8]
        .copy_from_slice(&(base_offset as i64).to_be_bytes());
}

/// Writes the partition leader epoch into a batch; the CRC does not cover it.
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[LEADER_EPOCH_POS..LEADER_EPOCH_POS + 4].copy_from_slice(&epoch.to_be_bytes());
}

/// Marks a batch as using the broker's append time `now_ms` and recomputes its CRC, as
/// topics with `message.timestamp.type=LogAppendTime` require.
pub fn set_log_append_time(batch: &mut [u8], now_ms: i64) {
    let attributes = be_i16(batch, ATTRIBUTES_POS) | TIMESTAMP_TYPE_BIT;
    batch[ATTRIBUTES_POS..ATTRIBUTES_POS + 2].copy_from_slice(&attributes.to_be_bytes());
    batch[MAX_TIMESTAMP_POS..MAX_TIMESTAMP_POS + 8].copy_from_slice(&now_ms.to_be_bytes());
    let crc = checksum(&batch[ATTRIBUTES_POS..]);
    batch[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_be_bytes());
}

/// One batch over shared bytes, with its header decoded.
#[derive(Debug, Clone)]
pub struct RecordBatch {
    header: BatchHeader,
    bytes: Bytes,
}

impl RecordBatch {
    /// Wraps one whole batch; checks the length field but not the CRC.
    pub fn new(bytes: Bytes) -> Result<Self> {
        let header = BatchHeader::parse(&bytes)?;
        if header.total_len() != bytes.len() {
            return Err(Error::LengthMismatch {
                declared: header.total_len(),
                actual: bytes.len(),
            });
        }
        Ok(RecordBatch { header, bytes })
    }

    /// The decoded header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Whether the stored CRC matches the bytes.
    pub fn crc_ok(&self) -> bool {
        checksum(&self.bytes[ATTRIBUTES_POS..]) == self.header.crc
    }

    /// Like [`RecordBatch::records`], but hands each record to `f` instead of collecting
    /// them (a consumer builds its own record type without an intermediate vector). On
    /// an error `f` may already have seen some records; discard them.
    pub fn for_each_record(&self, mut f: impl FnMut(Record)) -> Result<()> {
        let compression = self.header.compression()?;
        let body = match compression {
            Compression::None => self.bytes.slice(HEADER_LEN..),
            c => Bytes::from(c.decompress(
                &self.bytes[HEADER_LEN..],
                decompressed_limit(self.bytes.len()),
            )?),
        };
        let append_time = (self.header.timestamp_type() == TimestampType::LogAppendTime)
            .then_some(self.header.max_timestamp);
        record::for_each_record(&body, &self.header, |mut r| {
            if let Some(t) = append_time {
                r.timestamp = t;
            }
            f(r);
        })
    }

    /// Decodes every record, decompressing if needed; offsets and timestamps are absolute.
    pub fn records(&self) -> Result<Vec<Record>> {
        let mut records =
            Vec::with_capacity((self.header.record_count as usize).min(self.bytes.len() / 8));
        self.for_each_record(|r| records.push(r))?;
        Ok(records)
    }
}

/// Iterates the whole batches in a buffer holding several, as a fetch returns them.
#[derive(Debug, Clone)]
pub struct BatchIter {
    rest: Bytes,
}

impl BatchIter {
    /// Iterates `bytes`, which must hold whole batches back to back.
    pub fn new(bytes: Bytes) -> Self {
        BatchIter { rest: bytes }
    }

    /// The offset after the last whole batch at the front of `bytes`, where a read of
    /// what follows them starts; `None` when they hold no whole batch.
    pub fn end_offset(bytes: &[u8]) -> Option<u64> {
        // Headers only: every answer of a fetch stream is walked this way on both ends,
        // besides the consumer's decoding, so no slice of `Bytes` (a shared count) each.
        let mut rest = bytes;
        let mut end = None;
        while let Ok(header) = BatchHeader::parse(rest) {
            let Some(after) = rest.get(header.total_len()..) else {
                break;
            };
            end = Some(header.last_offset().saturating_add(1));
            rest = after;
        }
        end
    }
}

impl Iterator for BatchIter {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let header = match BatchHeader::parse(&self.rest) {
            Ok(h) => h,
            Err(e) => {
                self.rest.clear();
                return Some(Err(e));
            }
        };
        let len = header.total_len();
        if len > self.rest.len() {
            let actual = self.rest.len();
            self.rest.clear();
            return Some(Err(Error::LengthMismatch {
                declared: len,
                actual,
            }));
        }
        let bytes = self.rest.split_to(len);
        Some(Ok(RecordBatch { header, bytes }))
    }
}

#[cfg(test)]
mod tests;
