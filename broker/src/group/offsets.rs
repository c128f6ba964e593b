//! Committed offsets in the internal topic `__consumer_offsets`: one record per commit,
//! keyed by group, topic and partition, so the latest record of a key is its offset and
//! a record without a value (a tombstone) deletes it. Replayed into memory at start.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sluice_log_store::{BatchIter, Compression, RecordBatchBuilder};

use super::assignor::Tp;
use crate::error::{BrokerError, Result};
use crate::partition::{Acks, PartitionHandle};
use crate::topic::manager::{NewTopic, Topics};

/// The internal topic's name.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The next offset to read.
    pub offset: u64,
    /// Free text committed with it.
    pub metadata: String,
    /// When it was committed (ms since the epoch).
    pub timestamp: i64,
}

/// Every group's committed offsets.
pub type OffsetMap = BTreeMap<String, BTreeMap<Tp, Committed>>;

const KEY_VERSION: u8 = 0;

fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_u16(s.len().min(usize::from(u16::MAX)) as u16);
    buf.put_slice(&s.as_bytes()[..s.len().min(usize::from(u16::MAX))]);
}

fn get_str(buf: &mut &[u8]) -> Option<String> {
    if buf.remaining() < 2 {
        return None;
    }
    let len = usize::from(buf.get_u16());
    if buf.remaining() < len {
        return None;
    }
    let s = String::from_utf8(buf[..len].to_vec()).ok()?;
    buf.advance(len);
    Some(s)
}

/// The record key of a group's offset for one partition.
pub fn encode_key(group: &str, tp: &Tp) -> Bytes {
    let mut b = BytesMut::with_capacity(9 + group.len() + tp.0.len());
    b.put_u8(KEY_VERSION);
    put_str(&mut b, group);
    put_str(&mut b, &tp.0);
    b.put_u32(tp.1);
    b.freeze()
}

fn decode_key(mut b: &[u8]) -> Option<(String, Tp)> {
    if b.remaining() < 1 || b.get_u8() != KEY_VERSION {
        return None;
    }
    let group = get_str(&mut b)?;
    let topic = get_str(&mut b)?;
    if b.remaining() != 4 {
        return None;
    }
    Some((group, (topic, b.get_u32())))
}

fn encode_value(c: &Committed) -> Bytes {
    let mut b = BytesMut::with_capacity(18 + c.metadata.len());
    b.put_u64(c.offset);
    b.put_i64(c.timestamp);
    put_str(&mut b, &c.metadata);
    b.freeze()
}

fn decode_value(mut b: &[u8]) -> Option<Committed> {
    if b.remaining() < 16 {
        return None;
    }
    let offset = b.get_u64();
    let timestamp = b.get_i64();
    let metadata = get_str(&mut b)?;
    Some(Committed {
        offset,
        metadata,
        timestamp,
    })
}

/// Writes and replays the offsets topic.
#[derive(Debug, Clone)]
pub struct OffsetStore {
    topics: Topics,
}

impl OffsetStore {
    /// The offsets topic of a cluster, which the controller creates and replicates.
    pub fn attach(topics: Topics) -> OffsetStore {
        OffsetStore { topics }
    }

    /// Opens the offsets topic, creating it with `partitions` partitions (kept
    /// forever: expiry writes tombstones). An existing topic keeps its count, since
    /// groups hash to partitions by it.
    pub async fn open(topics: Topics, partitions: u32) -> Result<OffsetStore> {
        if topics.metadata().topic(OFFSETS_TOPIC).is_err() {
            let created = topics
                .create(NewTopic {
                    name: OFFSETS_TOPIC.to_string(),
                    partitions: partitions.max(1),
                    replication_factor: 0,
                    configs: [("retention.ms".to_string(), "-1".to_string())].into(),
                    validate_only: false,
                    topic_id: 0,
                })
                .await;
            match created {
                Ok(_) | Err(BrokerError::TopicExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(OffsetStore { topics })
    }

    fn partition(&self, partition: u32) -> Result<PartitionHandle> {
        let md = self.topics.metadata();
        let t = md.topic(OFFSETS_TOPIC)?;
        Ok(t.partition(i64::from(partition))?.clone())
    }

    /// The topic's partition count (0 while it does not exist here).
    pub fn partitions(&self) -> u32 {
        self.topics
            .metadata()
            .topic(OFFSETS_TOPIC)
            .map_or(0, |t| t.partitions.len() as u32)
    }

    /// The partition holding `group`'s offsets.
    fn partition_of(&self, group: &str) -> Result<PartitionHandle> {
        self.partition(super::offsets_partition(group, self.partitions()))
    }

    /// Reads one partition into a map of the latest offset per key: all this replica
    /// holds, which is everything committed when it has just become its leader.
    pub async fn load(&self, partition: u32) -> Result<OffsetMap> {
        let p = self.partition(partition)?;
        let mut map = OffsetMap::new();
        let mut next = p.state().log_start_offset;
        loop {
            let data = p.read_local(next, 1 << 20).await?;
            if data.is_empty() {
                break;
            }
            for batch in BatchIter::new(data) {
                let batch = batch.map_err(|e| BrokerError::Storage(e.to_string()))?;
                for r in batch
                    .records()
                    .map_err(|e| BrokerError::Storage(e.to_string()))?
                {
                    next = r.offset + 1;
                    let Some((group, tp)) = r.key.as_deref().and_then(decode_key) else {
                        tracing::warn!(
                            offset = r.offset,
                            "skipping an offsets record with a key not understood"
                        );
                        continue;
                    };
                    match r.value.as_deref().map(decode_value) {
                        None => {
                            if let Some(g) = map.get_mut(&group) {
                                g.remove(&tp);
                                if g.is_empty() {
                                    map.remove(&group);
                                }
                            }
                        }
                        Some(Some(c)) => {
                            map.entry(group).or_default().insert(tp, c);
                        }
                        Some(None) => {
                            tracing::warn!(
                                offset = r.offset,
                                "skipping an offsets record with a value not understood"
                            );
                        }
                    }
                }
            }
        }
        Ok(map)
    }

    /// Durably writes commits (`Some`) and deletions (`None`) of one group's offsets.
    pub async fn write(&self, group: &str, entries: &[(Tp, Option<Committed>)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        // One batch, so a commit is stored whole or not at all.
        let batch = offsets_batch(entries.iter().map(|(tp, c)| (group, tp, c.as_ref())))?;
        self.partition_of(group)?.append(batch, Acks::All).await?;
        Ok(())
    }

    /// Compacts one partition: every live offset it holds (`live`, the groups hashing
    /// to it) is written again from a fresh segment, then every older segment is
    /// deleted. The result is what Kafka's log compaction leaves (the latest record per
    /// key); a crash half-way leaves old records followed by the copy, which replays to
    /// the same offsets.
    pub async fn compact(&self, partition: u32, live: &OffsetMap) -> Result<()> {
        let p = self.partition(partition)?;
        let start = p.roll().await?;
        let records: Vec<(&str, &Tp, Option<&Committed>)> = live
            .iter()
            .flat_map(|(g, offsets)| offsets.iter().map(move |(tp, c)| (g.as_str(), tp, Some(c))))
            .collect();
        // Well under max.message.bytes per batch.
        for chunk in records.chunks(2000) {
            p.append(offsets_batch(chunk.iter().copied())?, Acks::All)
                .await?;
        }
        let start_now = p.delete_before(start).await?;
        tracing::info!(
            partition,
            log_start_offset = start_now,
            "compacted {OFFSETS_TOPIC}"
        );
        Ok(())
    }

    /// Records in one partition now (log end minus log start).
    pub fn records(&self, partition: u32) -> u64 {
        self.partition(partition).map_or(0, |p| {
            let s = p.state();
            s.log_end_offset.saturating_sub(s.log_start_offset)
        })
    }
}

/// One batch of offset records, stamped now; a `None` value is a tombstone.
fn offsets_batch<'a>(
    records: impl IntoIterator<Item = (&'a str, &'a Tp, Option<&'a Committed>)>,
) -> Result<Bytes> {
    let now = now_ms();
    let mut b = RecordBatchBuilder::new(Compression::None);
    for (group, tp, c) in records {
        let value = c.map(encode_value);
        b.append(now, Some(&encode_key(group, tp)), value.as_deref(), &[]);
    }
    b.build().map_err(|e| BrokerError::Internal(e.to_string()))
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_round_trip_and_garbage_is_refused() {
        let tp = ("orders".to_string(), 7);
        let key = encode_key("billing", &tp);
        assert_eq!(decode_key(&key), Some(("billing".to_string(), tp)));
        let c = Committed {
            offset: 42,
            metadata: "note".into(),
            timestamp: 1_700_000_000_000,
        };
        assert_eq!(decode_value(&encode_value(&c)), Some(c));
        assert_eq!(decode_key(&key[..key.len() - 1]), None);
        assert_eq!(decode_key(b"\x01"), None);
        assert_eq!(decode_value(b"short"), None);
    }
}
