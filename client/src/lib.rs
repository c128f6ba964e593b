//! The Sluice client: [`Producer`], [`Consumer`] and [`Admin`] for Rust programs. The
//! `sluice` command-line tool is a thin layer over them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice_client::ClientError> {
//! use sluice_client::{Producer, ProducerConfig, ProducerRecord};
//! let producer = Producer::connect(ProducerConfig::default()).await?;
//! let delivery = producer.send(ProducerRecord::new("orders", "hello").key("customer-1")).await?;
//! let meta = delivery.await?;
//! println!("partition {} offset {:?}", meta.partition, meta.offset);
//! # Ok(()) }
//! ```

pub mod admin;
pub mod connection;
pub mod consumer;
pub mod error;
mod fetch_stream;
mod group;
pub mod pace;
pub mod producer;
mod routes;

pub use admin::{Admin, NewTopic, OffsetSpec};
pub use consumer::{
    AssignmentListener, Consumer, ConsumerConfig, ConsumerRecord, OffsetReset, TopicPartition,
};
pub use error::{ClientError, Result};
pub use pace::Schedule;
pub use producer::{
    Acks, DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata,
};
pub use sluice_log_store::{Compression, Header};
pub use sluice_proto::ErrorReason;
