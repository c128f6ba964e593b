//! `Consumer` (without groups): assign partitions, seek, and poll records.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_log_store::{BatchIter, Header};
use sluice_proto::v1::fetch_service_client::FetchServiceClient;
use sluice_proto::v1::{FetchPartition, FetchRequest};
use sluice_proto::ErrorReason;
use tonic::transport::Channel;

use crate::admin::{to_i32, Admin, OffsetSpec};
use crate::connection::{connect, MAX_MESSAGE_BYTES};
use crate::error::{ClientError, Result};

/// Where to start when a partition has no valid position (`auto.offset.reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// The oldest record still kept.
    Earliest,
    /// Only records written from now on (the default, as in Kafka).
    Latest,
    /// Fail with the out-of-range error.
    None,
}

/// Consumer settings, with Kafka's names.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Brokers, `host:port,host:port`.
    pub brokers: String,
    /// `auto.offset.reset` (default latest).
    pub auto_offset_reset: OffsetReset,
    /// `fetch.min.bytes` (default 1).
    pub fetch_min_bytes: u32,
    /// `fetch.max.wait.ms` (default 500 ms).
    pub fetch_max_wait: Duration,
    /// `max.partition.fetch.bytes` (default 1 MiB).
    pub max_partition_fetch_bytes: u32,
    /// `fetch.max.bytes` (default 50 MiB).
    pub fetch_max_bytes: u32,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            brokers: crate::connection::DEFAULT_BROKERS.to_string(),
            auto_offset_reset: OffsetReset::Latest,
            fetch_min_bytes: 1,
            fetch_max_wait: Duration::from_millis(500),
            max_partition_fetch_bytes: 1 << 20,
            fetch_max_bytes: 50 << 20,
        }
    }
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic (shared by all records of a fetch).
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Timestamp (ms).
    pub timestamp: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
}

/// A topic and partition.
pub type TopicPartition = (String, u32);

/// Reads assigned partitions from positions it keeps.
#[derive(Debug)]
pub struct Consumer {
    config: ConsumerConfig,
    fetch: FetchServiceClient<Channel>,
    admin: Admin,
    /// Assigned partitions and their next offsets (`None`: reset before fetching).
    positions: BTreeMap<TopicPartition, Option<u64>>,
    /// High watermarks seen in the last fetch.
    high_watermarks: BTreeMap<TopicPartition, u64>,
}

impl Consumer {
    /// Connects to the first reachable broker.
    pub async fn connect(config: ConsumerConfig) -> Result<Consumer> {
        let channel = connect(&config.brokers).await?;
        Ok(Consumer {
            fetch: FetchServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            admin: Admin::with_channel(channel),
            config,
            positions: BTreeMap::new(),
            high_watermarks: BTreeMap::new(),
        })
    }

    /// Reads exactly these partitions from now on; positions of partitions kept stay.
    pub fn assign(&mut self, partitions: impl IntoIterator<Item = TopicPartition>) {
        let mut next = BTreeMap::new();
        for tp in partitions {
            let pos = self.positions.get(&tp).copied().flatten();
            next.insert(tp, pos);
        }
        self.positions = next;
    }

    /// Every partition of `topic`, assigned.
    pub async fn assign_topic(&mut self, topic: &str) -> Result<()> {
        let d = self.admin.describe_topic(topic).await?;
        self.assign((0..d.partitions.len() as u32).map(|p| (topic.to_string(), p)));
        Ok(())
    }

    /// The assigned partitions.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.positions.keys().cloned().collect()
    }

    /// Sets the next offset to read.
    pub fn seek(&mut self, tp: &TopicPartition, offset: u64) -> Result<()> {
        match self.positions.get_mut(tp) {
            Some(p) => {
                *p = Some(offset);
                Ok(())
            }
            None => Err(ClientError::InvalidArgument(format!(
                "{}-{} is not assigned",
                tp.0, tp.1
            ))),
        }
    }

    async fn seek_all(&mut self, spec: OffsetSpec) -> Result<()> {
        let queries: Vec<_> = self
            .positions
            .keys()
            .map(|(t, p)| (t.clone(), *p, spec))
            .collect();
        let answers = self.admin.list_offsets(&queries).await?;
        for ((topic, partition, _), (offset, _)) in queries.into_iter().zip(answers) {
            self.positions.insert((topic, partition), Some(offset));
        }
        Ok(())
    }

    /// Moves every assigned partition to its oldest record.
    pub async fn seek_to_beginning(&mut self) -> Result<()> {
        self.seek_all(OffsetSpec::Earliest).await
    }

    /// Moves every assigned partition to its end (only new records will be read).
    pub async fn seek_to_end(&mut self) -> Result<()> {
        self.seek_all(OffsetSpec::Latest).await
    }

    /// Moves every assigned partition to its first record at or after `timestamp_ms`.
    pub async fn seek_to_timestamp(&mut self, timestamp_ms: i64) -> Result<()> {
        self.seek_all(OffsetSpec::Timestamp(timestamp_ms)).await
    }

    /// The next offset to be read from `tp`, if known.
    pub fn position(&self, tp: &TopicPartition) -> Option<u64> {
        self.positions.get(tp).copied().flatten()
    }

    /// The high watermark of `tp` from the last fetch.
    pub fn high_watermark(&self, tp: &TopicPartition) -> Option<u64> {
        self.high_watermarks.get(tp).copied()
    }

    async fn reset(&mut self, tps: Vec<TopicPartition>) -> Result<()> {
        let spec = match self.config.auto_offset_reset {
            OffsetReset::Earliest => OffsetSpec::Earliest,
            OffsetReset::Latest => OffsetSpec::Latest,
            OffsetReset::None => {
                return Err(ClientError::InvalidArgument(format!(
                    "no position for {} partition(s) and auto_offset_reset is none",
                    tps.len()
                )))
            }
        };
        let queries: Vec<_> = tps.iter().map(|(t, p)| (t.clone(), *p, spec)).collect();
        let answers = self.admin.list_offsets(&queries).await?;
        for (tp, (offset, _)) in tps.into_iter().zip(answers) {
            self.positions.insert(tp, Some(offset));
        }
        Ok(())
    }

    /// Fetches the next records of the assigned partitions, waiting at most `timeout` for
    /// some to arrive. An empty result means none arrived in time.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        let unknown: Vec<_> = self
            .positions
            .iter()
            .filter(|(_, p)| p.is_none())
            .map(|(tp, _)| tp.clone())
            .collect();
        if !unknown.is_empty() {
            self.reset(unknown).await?;
        }
        if self.positions.is_empty() {
            tokio::time::sleep(timeout).await;
            return Ok(Vec::new());
        }
        let partitions = self
            .positions
            .iter()
            .map(|((topic, partition), pos)| {
                Ok(FetchPartition {
                    topic: topic.clone(),
                    partition: to_i32(*partition)?,
                    fetch_offset: pos.unwrap_or(0) as i64,
                    partition_max_bytes: self.config.max_partition_fetch_bytes,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let wait = timeout.min(self.config.fetch_max_wait);
        let resp = self
            .fetch
            .fetch(FetchRequest {
                partitions,
                max_wait_ms: wait.as_millis().min(u128::from(u32::MAX)) as u32,
                min_bytes: self.config.fetch_min_bytes,
                max_bytes: self.config.fetch_max_bytes,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        let mut out_of_range = Vec::new();
        for p in resp.partitions {
            let tp = (p.topic.clone(), p.partition as u32);
            if let Some(e) = &p.error {
                let err = ClientError::from(e);
                if err.reason() == Some(ErrorReason::OffsetOutOfRange)
                    && self.config.auto_offset_reset != OffsetReset::None
                {
                    out_of_range.push(tp);
                    continue;
                }
                return Err(err);
            }
            self.high_watermarks
                .insert(tp.clone(), p.high_watermark.max(0) as u64);
            let Some(Some(mut position)) = self.positions.get(&tp).copied() else {
                continue;
            };
            let topic: Arc<str> = Arc::from(tp.0.as_str());
            for batch in BatchIter::new(p.records) {
                let batch = batch?;
                if batch.header().last_offset() < position {
                    continue;
                }
                if !batch.crc_ok() {
                    return Err(ClientError::Batch(format!(
                        "batch at offset {} of {}-{} failed its CRC check",
                        batch.header().base_offset,
                        tp.0,
                        tp.1
                    )));
                }
                for r in batch.records()? {
                    if r.offset < position {
                        continue;
                    }
                    position = r.offset + 1;
                    out.push(ConsumerRecord {
                        topic: Arc::clone(&topic),
                        partition: tp.1,
                        offset: r.offset,
                        timestamp: r.timestamp,
                        key: r.key,
                        value: r.value,
                        headers: r.headers,
                    });
                }
            }
            self.positions.insert(tp, Some(position));
        }
        if !out_of_range.is_empty() {
            self.reset(out_of_range).await?;
        }
        Ok(out)
    }
}
