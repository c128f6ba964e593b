//! One partition's log on disk: the record-batch format, segments, indexes, recovery
//! and retention. Knows nothing of networks or replicas.
//!
//! A partition is a folder of segments named by base offset (`00000000000000000000.log`
//! with its `.index` and `.timeindex`). [`Log`] owns one such folder; [`LogManager`]
//! owns a data directory of them.

pub mod batch;
pub mod config;
pub mod epochs;
pub mod error;
mod index;
pub mod log;
pub mod manager;
pub mod memory;
mod remover;
pub mod retention;
mod segment;
pub mod tail;
pub mod units;

pub use batch::{
    BatchHeader, BatchIter, Compression, Header, Record, RecordBatch, RecordBatchBuilder,
};
pub use config::{FlushPolicy, LogConfig};
pub use epochs::{EpochEntry, EpochHistory};
pub use error::{Error, Result};
pub use log::{
    AppendInfo, AppendOptions, BackgroundFlush, FlushDone, Log, OpenReport, Truncation, Writeback,
};
pub use manager::{LogManager, TopicPartition};
pub use tail::TailView;
