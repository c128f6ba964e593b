//! A small history checker for replicated writes: a producer records every send with
//! its outcome; the partition is then read from offset 0, and no acknowledged record
//! may be missing, duplicated, or at another offset than the one acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_client::{Acks, Producer, ProducerConfig, ProducerRecord};
use sluice_log_store::BatchIter;
use sluice_proto::v1::fetch_service_client::FetchServiceClient;
use sluice_proto::v1::{FetchPartition, FetchRequest};

/// What became of one send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged at this offset.
    Acked(u64),
    /// Failed, or its answer was lost: it may or may not be in the log.
    Unknown(String),
}

/// One send: the record's value and, once known, what became of it.
type Send = (String, Option<Outcome>);

/// Every send so far, in the order they were made.
#[derive(Debug, Clone, Default)]
pub struct History {
    sends: Arc<Mutex<Vec<Send>>>,
}

impl History {
    /// A record about to be sent; returns its index.
    fn sent(&self, value: String) -> usize {
        let mut s = self.sends.lock().expect("history lock");
        s.push((value, None));
        s.len() - 1
    }

    fn outcome(&self, i: usize, o: Outcome) {
        self.sends.lock().expect("history lock")[i].1 = Some(o);
    }

    /// How many sends were acknowledged.
    pub fn acked(&self) -> usize {
        self.sends
            .lock()
            .expect("history lock")
            .iter()
            .filter(|(_, o)| matches!(o, Some(Outcome::Acked(_))))
            .count()
    }

    /// How many of the sends from the `from`-th on were acknowledged.
    pub fn acked_since(&self, from: usize) -> usize {
        self.sends
            .lock()
            .expect("history lock")
            .iter()
            .skip(from)
            .filter(|(_, o)| matches!(o, Some(Outcome::Acked(_))))
            .count()
    }

    /// How many sends have no outcome yet.
    pub fn open(&self) -> usize {
        self.sends
            .lock()
            .expect("history lock")
            .iter()
            .filter(|(_, o)| o.is_none())
            .count()
    }

    /// Checks `log` (offset, value) against the history; returns the problems found.
    pub fn check(&self, log: &[(u64, String)]) -> Vec<String> {
        let mut problems = Vec::new();
        let mut at: HashMap<&str, Vec<u64>> = HashMap::new();
        for (o, v) in log {
            at.entry(v.as_str()).or_default().push(*o);
        }
        for w in log.windows(2) {
            if w[1].0 <= w[0].0 {
                problems.push(format!("offsets out of order: {} then {}", w[0].0, w[1].0));
            }
        }
        for (value, outcome) in self.sends.lock().expect("history lock").iter() {
            let seen = at.get(value.as_str()).cloned().unwrap_or_default();
            match outcome {
                Some(Outcome::Acked(offset)) => {
                    if seen.is_empty() {
                        problems.push(format!("{value} acked at {offset} is missing"));
                    } else if seen.len() > 1 {
                        problems.push(format!("{value} acked at {offset} appears at {seen:?}"));
                    } else if seen[0] != *offset {
                        problems.push(format!("{value} acked at {offset} is at {}", seen[0]));
                    }
                }
                Some(Outcome::Unknown(_)) if seen.len() > 1 => {
                    problems.push(format!("{value} appears at {seen:?}"));
                }
                None => problems.push(format!("{value} has no outcome")),
                _ => {}
            }
        }
        problems
    }
}

/// A producer with acks=all that never retries an ambiguous failure (a retry of a batch
/// whose answer was lost could write it twice); redirects to a new leader still happen,
/// for `delivery_timeout`.
pub async fn producer(brokers: &str, delivery_timeout: Duration) -> Producer {
    Producer::connect(ProducerConfig {
        brokers: brokers.to_string(),
        acks: Acks::All,
        linger: Duration::from_millis(2),
        retries: 0,
        delivery_timeout,
        request_timeout: Duration::from_secs(15),
        ..ProducerConfig::default()
    })
    .await
    .expect("producer")
}

/// Sends `value` to partition 0 of `topic` and records the outcome when it comes.
pub async fn send(
    history: &History,
    producer: &Producer,
    topic: &str,
    value: String,
) -> tokio::task::JoinHandle<()> {
    let i = history.sent(value.clone());
    let h = history.clone();
    let sent = producer
        .send(ProducerRecord::new(topic.to_string(), value.into_bytes()).partition(0))
        .await;
    tokio::spawn(async move {
        let o = match sent {
            Ok(d) => match d.await {
                Ok(m) => m
                    .offset
                    .map_or(Outcome::Unknown("no offset".into()), Outcome::Acked),
                Err(e) => Outcome::Unknown(e.to_string()),
            },
            Err(e) => Outcome::Unknown(e.to_string()),
        };
        h.outcome(i, o);
    })
}

/// Every record of partition `p` below the high watermark of the broker at `addr`.
pub async fn read_all(addr: &str, topic: &str, p: i32) -> Vec<(u64, String)> {
    let mut c = FetchServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
        .max_decoding_message_size(256 << 20);
    let mut out = Vec::new();
    let mut offset = 0u64;
    loop {
        let resp = c
            .fetch(FetchRequest {
                partitions: vec![FetchPartition {
                    topic: topic.to_string(),
                    partition: p,
                    fetch_offset: offset as i64,
                    partition_max_bytes: 4 << 20,
                }],
                max_wait_ms: 0,
                min_bytes: 0,
                max_bytes: 0,
                member: None,
                request_id: 0,
            })
            .await
            .expect("fetch")
            .into_inner();
        let part = &resp.partitions[0];
        assert!(part.error.is_none(), "fetch failed: {:?}", part.error);
        if part.records.is_empty() {
            return out;
        }
        for batch in BatchIter::new(part.records.clone()) {
            for r in batch.expect("batch").records().expect("records") {
                if r.offset >= offset {
                    let v = r.value.map(|v| String::from_utf8_lossy(&v).into_owned());
                    out.push((r.offset, v.unwrap_or_default()));
                    offset = r.offset + 1;
                }
            }
        }
    }
}
