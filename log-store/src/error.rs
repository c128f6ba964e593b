//! The one error type of the log store.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the log store, named by what happened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The batch's stored checksum does not match its bytes.
    #[error("corrupt batch: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    CrcMismatch {
        /// CRC carried in the header.
        stored: u32,
        /// CRC computed over the bytes.
        computed: u32,
    },
    /// The batch's length field disagrees with the bytes given.
    #[error("corrupt batch: length field says {declared} bytes but {actual} bytes were given")]
    LengthMismatch {
        /// Total size implied by the length field.
        declared: usize,
        /// Bytes actually present.
        actual: usize,
    },
    /// The header's record count disagrees with the records it holds.
    #[error("corrupt batch: header declares {declared} records but the batch holds {actual}")]
    RecordCountMismatch {
        /// Count from the header.
        declared: i64,
        /// Records found.
        actual: i64,
    },
    /// A batch is larger than the configured limit.
    #[error("batch of {size} bytes exceeds the limit of {limit} bytes")]
    BatchTooLarge {
        /// Batch size in bytes.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The batch or one of its records cannot be decoded.
    #[error("corrupt batch: {0}")]
    Malformed(&'static str),
    /// The batch uses a format version this build does not read.
    #[error("corrupt batch: unsupported format version {0}")]
    UnsupportedVersion(i8),
    /// The batch names a compression codec this build does not know.
    #[error("corrupt batch: unknown compression codec {0}")]
    UnknownCompression(u8),
    /// Compressing or decompressing the records failed.
    #[error("corrupt batch: {codec} decompression failed: {reason}")]
    Compression {
        /// Codec name.
        codec: &'static str,
        /// What the codec said.
        reason: String,
    },
    /// A read asked for an offset outside the log.
    #[error("offset {offset} is out of range [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        /// Offset asked for.
        offset: u64,
        /// First offset still in the log.
        log_start_offset: u64,
        /// Offset the next appended record will get.
        log_end_offset: u64,
    },
    /// A segment file holds bytes that are not a valid batch where one must be.
    #[error("corrupt segment {}: at position {position} (near offset {offset}): {reason}", path.display())]
    CorruptSegment {
        /// The damaged file.
        path: PathBuf,
        /// Byte position of the damage.
        position: u64,
        /// Offset of the last good batch boundary before the damage.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// An operating-system I/O call failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// File or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A previous write failed in a way that left the log unable to guarantee its tail.
    #[error("log {} refuses writes after an earlier I/O error; reopen it", path.display())]
    Poisoned {
        /// Partition folder.
        path: PathBuf,
    },
    /// A replicated batch does not start at the log end offset.
    #[error("replicated batch starts at offset {got} but the log ends at {expected}")]
    UnexpectedOffset {
        /// The log end offset.
        expected: u64,
        /// The batch's base offset.
        got: u64,
    },
    /// A topic name breaks the naming rule.
    #[error("invalid topic name {0:?}: use 1 to 249 of [a-zA-Z0-9._-], not \".\" or \"..\"")]
    InvalidTopicName(String),
    /// A partition folder already exists.
    #[error("partition {0} already exists")]
    PartitionExists(String),
    /// A partition folder does not exist.
    #[error("partition {0} does not exist")]
    UnknownPartition(String),
    /// A configuration value is not acceptable.
    #[error("invalid log config: {0}")]
    InvalidConfig(String),
    /// The leader-epoch checkpoint cannot be read (the log rebuilds it from its batches).
    #[error("damaged leader-epoch checkpoint {}: {content:?}", path.display())]
    DamagedCheckpoint {
        /// The file.
        path: PathBuf,
        /// What it holds.
        content: String,
    },
    /// Another process holds the data directory.
    #[error("data directory {} is locked by another process", path.display())]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// True when the error says the batch itself is bad (as opposed to the log or the disk).
    pub fn is_corrupt_batch(&self) -> bool {
        matches!(
            self,
            Error::CrcMismatch { .. }
                | Error::LengthMismatch { .. }
                | Error::RecordCountMismatch { .. }
                | Error::Malformed(_)
                | Error::UnsupportedVersion(_)
                | Error::UnknownCompression(_)
                | Error::Compression { .. }
        )
    }

    /// True when the error is the disk being full.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Error::Io { source, .. } => {
                source.kind() == io::ErrorKind::StorageFull
                    || source.kind() == io::ErrorKind::QuotaExceeded
                    || source.kind() == io::ErrorKind::FileTooLarge
            }
            _ => false,
        }
    }
}

/// Result with the log store's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
