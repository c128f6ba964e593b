//! Compression of a batch's records part; the codec is a batch attribute.

use std::io::{Read, Write};

use crate::error::{Error, Result};

/// Compression codec of a batch's records, stored in attribute bits 0–2 (Kafka's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Compression {
    /// Records stored as they are.
    #[default]
    None,
    /// gzip (deflate).
    Gzip,
    /// Snappy, framed format.
    Snappy,
    /// LZ4, frame format.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// The attribute bits for this codec.
    pub fn id(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// The codec named by attribute bits.
    pub fn from_id(id: u8) -> Result<Self> {
        Ok(match id {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Snappy,
            3 => Compression::Lz4,
            4 => Compression::Zstd,
            other => return Err(Error::UnknownCompression(other)),
        })
    }

    /// The codec's name as configs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// Parses a codec name (`none`, `gzip`, `snappy`, `lz4`, `zstd`).
    pub fn parse(name: &str) -> Option<Self> {
        [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ]
        .into_iter()
        .find(|c| c.name().eq_ignore_ascii_case(name))
    }

    /// Compresses `raw`, appending the result to `out`.
    pub(crate) fn compress(self, raw: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let fail = |e: std::io::Error| Error::Compression {
            codec: self.name(),
            reason: e.to_string(),
        };
        match self {
            Compression::None => out.extend_from_slice(raw),
            Compression::Gzip => {
                let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
                enc.write_all(raw).map_err(fail)?;
                enc.finish().map_err(fail)?;
            }
            Compression::Snappy => {
                let mut enc = snap::write::FrameEncoder::new(out);
                enc.write_all(raw).map_err(fail)?;
                enc.flush().map_err(fail)?;
            }
            Compression::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(out);
                enc.write_all(raw).map_err(fail)?;
                enc.finish().map_err(|e| Error::Compression {
                    codec: "lz4",
                    reason: e.to_string(),
                })?;
            }
            Compression::Zstd => {
                let compressed = zstd::bulk::compress(raw, 1).map_err(fail)?;
                out.extend_from_slice(&compressed);
            }
        }
        Ok(())
    }

    /// Decompresses `data`, refusing to produce more than `limit` bytes (a guard against
    /// decompression bombs).
    pub(crate) fn decompress(self, data: &[u8], limit: usize) -> Result<Vec<u8>> {
        let fail = |e: std::io::Error| Error::Compression {
            codec: self.name(),
            reason: e.to_string(),
        };
        let mut out = Vec::new();
        let cap = limit as u64 + 1;
        match self {
            Compression::None => out.extend_from_slice(data),
            Compression::Gzip => {
                flate2::read::GzDecoder::new(data)
                    .take(cap)
                    .read_to_end(&mut out)
                    .map_err(fail)?;
            }
            Compression::Snappy => {
                snap::read::FrameDecoder::new(data)
                    .take(cap)
                    .read_to_end(&mut out)
                    .map_err(fail)?;
            }
            Compression::Lz4 => {
                lz4_flex::frame::FrameDecoder::new(data)
                    .take(cap)
                    .read_to_end(&mut out)
                    .map_err(fail)?;
            }
            Compression::Zstd => {
                zstd::stream::read::Decoder::new(data)
                    .map_err(fail)?
                    .take(cap)
                    .read_to_end(&mut out)
                    .map_err(fail)?;
            }
        }
        if out.len() > limit {
            return Err(Error::Compression {
                codec: self.name(),
                reason: format!("records decompress to more than {limit} bytes"),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_codec_round_trips() {
        let raw: Vec<u8> = (0..10_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        for c in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let mut out = Vec::new();
            c.compress(&raw, &mut out).expect("compress");
            let back = c.decompress(&out, raw.len()).expect("decompress");
            assert_eq!(back, raw, "{}", c.name());
            assert_eq!(Compression::from_id(c.id()).ok(), Some(c));
            assert_eq!(Compression::parse(c.name()), Some(c));
        }
    }

    #[test]
    fn decompression_limit_is_enforced() {
        let raw = vec![0u8; 100_000];
        let mut out = Vec::new();
        Compression::Zstd
            .compress(&raw, &mut out)
            .expect("compress");
        assert!(Compression::Zstd.decompress(&out, 1000).is_err());
    }

    #[test]
    fn garbage_does_not_decompress() {
        for c in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            assert!(
                c.decompress(b"definitely not compressed", 1 << 20).is_err(),
                "{}",
                c.name()
            );
        }
    }
}
