//! Topic configuration: Kafka's keys, validated once, turned into a log config.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_log_store::{FlushPolicy, LogConfig};

use sluice_log_store::units::{parse_bytes, parse_duration_ms};

/// Whether records keep the producer's timestamp or get the broker's append time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    /// Keep the producer's timestamp (`CreateTime`).
    CreateTime,
    /// Stamp the broker's time at append (`LogAppendTime`).
    LogAppendTime,
}

/// A topic's effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicConfig {
    /// Settings for each partition's log.
    pub log: LogConfig,
    /// `message.timestamp.type`.
    pub timestamp_type: TimestampType,
    /// `min.insync.replicas`.
    pub min_insync_replicas: u32,
    /// `unclean.leader.election.enable`.
    pub unclean_leader_election: bool,
}

/// Every key a topic accepts, with its meaning; anything else is refused.
pub const TOPIC_CONFIG_KEYS: &[(&str, &str)] = &[
    (
        "retention.ms",
        "delete sealed segments older than this (ms or 7d; -1 keeps forever)",
    ),
    (
        "retention.bytes",
        "delete oldest sealed segments while the partition is larger (-1: no limit)",
    ),
    ("segment.bytes", "roll the active segment at this size"),
    ("segment.ms", "roll the active segment at this age"),
    (
        "segment.index.bytes",
        "preallocated size of each index file",
    ),
    ("index.interval.bytes", "bytes of log between index entries"),
    ("max.message.bytes", "largest accepted record batch"),
    ("message.timestamp.type", "CreateTime or LogAppendTime"),
    (
        "flush.policy",
        "every-batch (fsync before ack), interval (every flush.ms) or os",
    ),
    ("flush.ms", "fsync interval under flush.policy=interval"),
    (
        "min.insync.replicas",
        "replicas that must have a batch before acks=all succeeds",
    ),
    (
        "unclean.leader.election.enable",
        "allow an out-of-sync replica to become leader",
    ),
    ("cleanup.policy", "delete (compact is not supported yet)"),
    (
        "cache.window.bytes",
        "bytes at the end of each partition kept in the page cache; older ones are written back and dropped (-1: no limit)",
    ),
];

impl TopicConfig {
    /// The broker's defaults overlaid with `overrides`; every key and value checked.
    pub fn resolve(
        defaults: &TopicConfig,
        overrides: &BTreeMap<String, String>,
    ) -> Result<TopicConfig, String> {
        let mut c = defaults.clone();
        let mut flush_ms: Option<u64> = match c.log.flush {
            FlushPolicy::Interval(d) => Some(d.as_millis() as u64),
            _ => None,
        };
        let mut flush_kind: Option<String> = None;
        for (key, value) in overrides {
            let v = value.trim();
            let bad = |why: String| format!("{key}={value}: {why}");
            match key.as_str() {
                "retention.ms" => {
                    c.log.retention_ms = optional(v, parse_duration_ms).map_err(bad)?
                }
                "retention.bytes" => {
                    c.log.retention_bytes = optional(v, parse_bytes).map_err(bad)?
                }
                "segment.bytes" => c.log.segment_bytes = parse_bytes(v).map_err(bad)?,
                "segment.ms" => c.log.segment_ms = optional(v, parse_duration_ms).map_err(bad)?,
                "segment.index.bytes" => {
                    c.log.index_max_bytes = to_u32(parse_bytes(v).map_err(bad)?).map_err(bad)?
                }
                "index.interval.bytes" => {
                    c.log.index_interval_bytes =
                        to_u32(parse_bytes(v).map_err(bad)?).map_err(bad)?
                }
                "max.message.bytes" => {
                    c.log.max_batch_bytes = to_u32(parse_bytes(v).map_err(bad)?).map_err(bad)?
                }
                "message.timestamp.type" => {
                    c.timestamp_type = match v {
                        "CreateTime" => TimestampType::CreateTime,
                        "LogAppendTime" => TimestampType::LogAppendTime,
                        _ => return Err(bad("use CreateTime or LogAppendTime".into())),
                    }
                }
                "flush.policy" => flush_kind = Some(v.to_string()),
                "flush.ms" => flush_ms = Some(parse_duration_ms(v).map_err(bad)?),
                "min.insync.replicas" => {
                    c.min_insync_replicas = v
                        .parse()
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| bad("must be a whole number of at least 1".into()))?
                }
                "unclean.leader.election.enable" => {
                    c.unclean_leader_election =
                        v.parse().map_err(|_| bad("must be true or false".into()))?
                }
                "cache.window.bytes" => {
                    c.log.cache_window_bytes = optional(v, parse_bytes).map_err(bad)?
                }
                "cleanup.policy" => {
                    if v != "delete" {
                        return Err(bad("only cleanup.policy=delete is supported".into()));
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown topic config {key:?}; known keys: {}",
                        TOPIC_CONFIG_KEYS
                            .iter()
                            .map(|(k, _)| *k)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
        }
        if let Some(kind) = flush_kind {
            c.log.flush = match kind.as_str() {
                "every-batch" => FlushPolicy::EveryBatch,
                "os" => FlushPolicy::Os,
                "interval" => {
                    FlushPolicy::Interval(Duration::from_millis(flush_ms.unwrap_or(1000)))
                }
                other => {
                    return Err(format!(
                        "flush.policy={other}: use every-batch, interval or os"
                    ))
                }
            };
        } else if let (FlushPolicy::Interval(_), Some(ms)) = (c.log.flush, flush_ms) {
            c.log.flush = FlushPolicy::Interval(Duration::from_millis(ms));
        }
        // As in Kafka, min.insync.replicas above the replication factor is accepted; every
        // acks=all produce then fails with NOT_ENOUGH_REPLICAS.
        c.log.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// The effective settings as Kafka-style key/value pairs, for describe.
    pub fn describe(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let opt = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
        m.insert("retention.ms".into(), opt(self.log.retention_ms));
        m.insert("retention.bytes".into(), opt(self.log.retention_bytes));
        m.insert("segment.bytes".into(), self.log.segment_bytes.to_string());
        m.insert(
            "cache.window.bytes".into(),
            opt(self.log.cache_window_bytes),
        );
        m.insert("segment.ms".into(), opt(self.log.segment_ms));
        m.insert(
            "segment.index.bytes".into(),
            self.log.index_max_bytes.to_string(),
        );
        m.insert(
            "index.interval.bytes".into(),
            self.log.index_interval_bytes.to_string(),
        );
        m.insert(
            "max.message.bytes".into(),
            self.log.max_batch_bytes.to_string(),
        );
        m.insert(
            "message.timestamp.type".into(),
            match self.timestamp_type {
                TimestampType::CreateTime => "CreateTime",
                TimestampType::LogAppendTime => "LogAppendTime",
            }
            .into(),
        );
        let (policy, ms) = match self.log.flush {
            FlushPolicy::EveryBatch => ("every-batch", None),
            FlushPolicy::Interval(d) => ("interval", Some(d.as_millis() as u64)),
            FlushPolicy::Os => ("os", None),
        };
        m.insert("flush.policy".into(), policy.into());
        if let Some(ms) = ms {
            m.insert("flush.ms".into(), ms.to_string());
        }
        m.insert(
            "min.insync.replicas".into(),
            self.min_insync_replicas.to_string(),
        );
        m.insert(
            "unclean.leader.election.enable".into(),
            self.unclean_leader_election.to_string(),
        );
        m.insert("cleanup.policy".into(), "delete".into());
        m
    }
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            log: LogConfig::default(),
            timestamp_type: TimestampType::CreateTime,
            min_insync_replicas: 1,
            unclean_leader_election: false,
        }
    }
}

/// `-1` means "no limit", as in Kafka.
fn optional(v: &str, parse: fn(&str) -> Result<u64, String>) -> Result<Option<u64>, String> {
    if v == "-1" {
        Ok(None)
    } else {
        parse(v).map(Some)
    }
}

fn to_u32(v: u64) -> Result<u32, String> {
    u32::try_from(v).map_err(|_| format!("{v} is larger than {}", u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(pairs: &[(&str, &str)]) -> Result<TopicConfig, String> {
        let m = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TopicConfig::resolve(&TopicConfig::default(), &m)
    }

    #[test]
    fn accepts_kafka_keys_and_human_units() {
        let c = resolve(&[
            ("retention.ms", "7d"),
            ("retention.bytes", "1GiB"),
            ("segment.bytes", "64MiB"),
            ("max.message.bytes", "2097152"),
            ("message.timestamp.type", "LogAppendTime"),
            ("flush.policy", "interval"),
            ("flush.ms", "250"),
            ("min.insync.replicas", "2"),
            ("cache.window.bytes", "256MiB"),
        ])
        .expect("valid");
        assert_eq!(c.log.retention_ms, Some(604_800_000));
        assert_eq!(c.log.retention_bytes, Some(1 << 30));
        assert_eq!(c.log.segment_bytes, 64 << 20);
        assert_eq!(c.log.max_batch_bytes, 2 << 20);
        assert_eq!(c.timestamp_type, TimestampType::LogAppendTime);
        assert_eq!(
            c.log.flush,
            FlushPolicy::Interval(Duration::from_millis(250))
        );
        assert_eq!(c.min_insync_replicas, 2);
        assert_eq!(c.log.cache_window_bytes, Some(256 << 20));
        assert_eq!(TopicConfig::default().log.cache_window_bytes, None);
        let described = c.describe();
        assert_eq!(described["flush.ms"], "250");
        assert_eq!(described["retention.bytes"], (1u64 << 30).to_string());
        let again = TopicConfig::resolve(&TopicConfig::default(), &described).expect("round trip");
        assert_eq!(again, c);
    }

    #[test]
    fn refuses_bad_keys_and_values() {
        assert!(resolve(&[("retention.mss", "1")])
            .expect_err("unknown")
            .contains("unknown topic config"));
        assert!(resolve(&[("segment.bytes", "10")]).is_err());
        assert!(resolve(&[("message.timestamp.type", "Now")]).is_err());
        // As in Kafka, more in-sync replicas than the topic has is a legal setting:
        // acks=all produces then fail with NOT_ENOUGH_REPLICAS instead of at creation.
        assert_eq!(
            resolve(&[("min.insync.replicas", "4")])
                .expect("legal")
                .min_insync_replicas,
            4
        );
        assert!(resolve(&[("min.insync.replicas", "0")]).is_err());
        assert!(resolve(&[("cleanup.policy", "compact")]).is_err());
        assert!(resolve(&[("flush.policy", "sometimes")]).is_err());
        assert!(resolve(&[("cache.window.bytes", "lots")]).is_err());
        assert_eq!(
            resolve(&[("retention.ms", "-1")])
                .expect("forever")
                .log
                .retention_ms,
            None
        );
    }
}
