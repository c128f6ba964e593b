//! One record inside a batch: varint-framed, Kafka v2 layout.
//!
//! ```text
//! length varint | attributes i8 | timestamp delta varint | offset delta varint
//! key length varint (-1 = none) | key | value length varint (-1 = none) | value
//! header count varint | per header: key length varint | key (UTF-8) | value length varint | value
//! ```

use bytes::Bytes;

use super::varint::{get_varint, put_varint, varint_len};
use super::BatchHeader;
use crate::error::{Error, Result};

/// A record header: a string key and an optional value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value, if any.
    pub value: Option<Bytes>,
}

/// A decoded record with its absolute offset and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Offset in the partition.
    pub offset: u64,
    /// Timestamp in milliseconds since the epoch.
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// Value, if any (a tombstone has none).
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<Header>,
}

fn opt_len(b: Option<&[u8]>) -> i64 {
    b.map_or(-1, |b| b.len() as i64)
}

fn field_len(b: Option<&[u8]>) -> usize {
    varint_len(opt_len(b)) + b.map_or(0, <[u8]>::len)
}

/// The fields of a record to encode, borrowed.
pub(crate) struct RecordFields<'a> {
    pub timestamp_delta: i64,
    pub offset_delta: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [Header],
}

/// Appends one framed record to `out`; returns the bytes written.
pub(crate) fn encode_record(out: &mut Vec<u8>, r: &RecordFields<'_>) -> usize {
    let mut body = 1
        + varint_len(r.timestamp_delta)
        + varint_len(r.offset_delta)
        + field_len(r.key)
        + field_len(r.value)
        + varint_len(r.headers.len() as i64);
    for h in r.headers {
        body += field_len(Some(h.key.as_bytes())) + field_len(h.value.as_deref());
    }
    let start = out.len();
    out.reserve(body + 5);
    put_varint(out, body as i64);
    out.push(0);
    put_varint(out, r.timestamp_delta);
    put_varint(out, r.offset_delta);
    put_field(out, r.key);
    put_field(out, r.value);
    put_varint(out, r.headers.len() as i64);
    for h in r.headers {
        put_field(out, Some(h.key.as_bytes()));
        put_field(out, h.value.as_deref());
    }
    out.len() - start
}

fn put_field(out: &mut Vec<u8>, b: Option<&[u8]>) {
    put_varint(out, opt_len(b));
    if let Some(b) = b {
        out.extend_from_slice(b);
    }
}

/// Reads one record's framing at `*pos`: returns the body range and advances past it.
fn frame(buf: &[u8], pos: &mut usize) -> Result<(usize, usize)> {
    let len = get_varint(buf, pos)?;
    if len < 1 {
        return Err(Error::Malformed("record length is not positive"));
    }
    let start = *pos;
    let Some(end) = start.checked_add(len as usize).filter(|&e| e <= buf.len()) else {
        return Err(Error::Malformed("record runs past the end of the batch"));
    };
    *pos = end;
    Ok((start, end))
}

/// Walks the record framing: the records must fill `buf` exactly, number `count`, and
/// carry offset deltas 0, 1, 2, … Field contents are not decoded.
pub(crate) fn check_records(buf: &[u8], count: u32) -> Result<()> {
    let mut pos = 0;
    let mut seen: i64 = 0;
    while pos < buf.len() {
        let (start, _end) = frame(buf, &mut pos)?;
        let mut p = start + 1; // attributes
        get_varint(buf, &mut p)?; // timestamp delta
        let offset_delta = get_varint(buf, &mut p)?;
        if offset_delta != seen {
            return Err(Error::Malformed(
                "record offset deltas are not 0, 1, 2, ...",
            ));
        }
        seen += 1;
    }
    if seen != i64::from(count) {
        return Err(Error::RecordCountMismatch {
            declared: i64::from(count),
            actual: seen,
        });
    }
    Ok(())
}

fn get_field(buf: &Bytes, pos: &mut usize, end: usize) -> Result<Option<Bytes>> {
    let len = get_varint(buf, pos)?;
    if len < 0 {
        return Ok(None);
    }
    let Some(stop) = pos.checked_add(len as usize).filter(|&s| s <= end) else {
        return Err(Error::Malformed("record field runs past the record"));
    };
    let out = buf.slice(*pos..stop);
    *pos = stop;
    Ok(Some(out))
}

/// Decodes the records of an (uncompressed) records part one by one into `f`; on an
/// error, `f` may already have seen the records before the damage.
pub(crate) fn for_each_record(
    buf: &Bytes,
    header: &BatchHeader,
    mut f: impl FnMut(Record),
) -> Result<()> {
    let mut seen = 0usize;
    let mut pos = 0;
    while pos < buf.len() {
        let (start, end) = frame(buf, &mut pos)?;
        let mut p = start + 1;
        let ts_delta = get_varint(buf, &mut p)?;
        let offset_delta = get_varint(buf, &mut p)?;
        if !(0..=i64::from(u32::MAX)).contains(&offset_delta) {
            return Err(Error::Malformed("record offset delta out of range"));
        }
        let key = get_field(buf, &mut p, end)?;
        let value = get_field(buf, &mut p, end)?;
        let n_headers = get_varint(buf, &mut p)?;
        if n_headers < 0 || n_headers as usize > end - p {
            return Err(Error::Malformed("record header count is impossible"));
        }
        let mut headers = Vec::with_capacity(n_headers as usize);
        for _ in 0..n_headers {
            let key = get_field(buf, &mut p, end)?
                .ok_or(Error::Malformed("record header without a key"))?;
            let key = String::from_utf8(key.to_vec())
                .map_err(|_| Error::Malformed("record header key is not UTF-8"))?;
            let value = get_field(buf, &mut p, end)?;
            headers.push(Header { key, value });
        }
        if p != end {
            return Err(Error::Malformed("record length disagrees with its fields"));
        }
        seen += 1;
        f(Record {
            offset: header.base_offset + offset_delta as u64,
            timestamp: header.first_timestamp.wrapping_add(ts_delta),
            key,
            value,
            headers,
        });
    }
    if seen != header.record_count as usize {
        return Err(Error::RecordCountMismatch {
            declared: i64::from(header.record_count),
            actual: seen as i64,
        });
    }
    Ok(())
}
