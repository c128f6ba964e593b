//! Zig-zag varints, as Kafka's record format uses for every record field.

use crate::error::{Error, Result};

/// Appends `v` as a zig-zag varint.
pub fn put_varint(buf: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

/// Bytes `v` takes as a zig-zag varint.
pub fn varint_len(v: i64) -> usize {
    let z = ((v << 1) ^ (v >> 63)) as u64;
    let bits = 64 - (z | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads a zig-zag varint at `*pos`, advancing it.
#[inline]
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<i64> {
    // Most fields of a record (deltas, small lengths, counts) fit one or two bytes:
    // decode those without the loop, which every record runs several times.
    match buf.get(*pos..*pos + 2) {
        Some(&[b0, _]) if b0 < 0x80 => {
            *pos += 1;
            return Ok(unzigzag(u64::from(b0)));
        }
        Some(&[b0, b1]) if b1 < 0x80 => {
            *pos += 2;
            return Ok(unzigzag(u64::from(b0 & 0x7f) | (u64::from(b1) << 7)));
        }
        _ => {}
    }
    get_varint_slow(buf, pos)
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

#[cold]
fn get_varint_slow(buf: &[u8], pos: &mut usize) -> Result<i64> {
    let mut z: u64 = 0;
    let mut shift = 0u32;
    loop {
        let Some(&b) = buf.get(*pos) else {
            return Err(Error::Malformed("varint runs past the end of the records"));
        };
        *pos += 1;
        if shift >= 64 {
            return Err(Error::Malformed("varint is longer than 10 bytes"));
        }
        z |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    Ok(unzigzag(z))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_edges() {
        for v in [
            0i64,
            1,
            -1,
            63,
            -64,
            64,
            300,
            -300,
            i32::MAX as i64,
            i64::MAX,
            i64::MIN,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "length of {v}");
            let mut pos = 0;
            assert_eq!(get_varint(&buf, &mut pos).ok(), Some(v));
            assert_eq!(pos, buf.len());
        }
    }

    #[test]
    fn short_forms_decode_alike_at_the_end_of_a_buffer_and_before_more_bytes() {
        for v in (-20_000i64..20_000).chain([i64::MIN, i64::MAX, 1 << 40]) {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            let len = buf.len();
            // At the end the one- and two-byte forms take the general path; followed by
            // another byte they take the short ones.
            let mut pos = 0;
            assert_eq!(get_varint(&buf, &mut pos).ok(), Some(v), "{v} at the end");
            assert_eq!(pos, len);
            buf.push(0x7f);
            let mut pos = 0;
            assert_eq!(
                get_varint(&buf, &mut pos).ok(),
                Some(v),
                "{v} before a byte"
            );
            assert_eq!(pos, len);
        }
    }

    #[test]
    fn truncated_varint_is_an_error() {
        let mut pos = 0;
        assert!(get_varint(&[0x80, 0x80], &mut pos).is_err());
    }

    #[test]
    fn overlong_varint_is_an_error() {
        let mut pos = 0;
        assert!(get_varint(&[0xff; 11], &mut pos).is_err());
    }
}
