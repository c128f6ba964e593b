//! `sluice produce TOPIC`: one record per stdin line.

use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use serde_json::json;
use sluice_client::{Acks, Compression, DeliveryFuture, Producer, ProducerConfig, ProducerRecord};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::output::{print_json, Output};
use crate::{CliError, Global};

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to write to.
    topic: String,
    /// Acknowledgement to wait for: 0, 1 or all.
    #[arg(long, default_value = "all", value_parser = parse_acks)]
    acks: Acks,
    /// Write every record to this partition (default: by key, or sticky when keyless).
    #[arg(long)]
    partition: Option<u32>,
    /// Split each line at the first SEP into key and value.
    #[arg(long, value_name = "SEP")]
    key_separator: Option<String>,
    /// Compression: none, gzip, snappy, lz4 or zstd.
    #[arg(long, default_value = "none", value_parser = parse_compression)]
    compression: Compression,
    /// How long a batch may wait to fill, in ms (fractions allowed: 0.2 is 200 µs).
    #[arg(long, default_value = "5", value_parser = parse_linger)]
    linger_ms: Duration,
    /// Batch size in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    batch_size: usize,
    /// How often a batch that failed for a retriable reason is sent again [default:
    /// until the delivery timeout].
    #[arg(long)]
    retries: Option<u32>,
    /// Give up on a record this long after it was sent, in ms.
    #[arg(long, default_value_t = 120_000)]
    delivery_timeout_ms: u64,
}

pub fn parse_acks(s: &str) -> Result<Acks, String> {
    Acks::parse(s).ok_or_else(|| format!("{s:?}: use 0, 1 or all"))
}

/// A linger in ms, whole or not, as a duration.
pub fn parse_linger(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|ms| (0.0..=3_600_000.0).contains(ms))
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .ok_or_else(|| format!("{s:?}: use a number of ms from 0 to 3600000"))
}

pub fn parse_compression(s: &str) -> Result<Compression, String> {
    Compression::parse(s).ok_or_else(|| format!("{s:?}: use none, gzip, snappy, lz4 or zstd"))
}

pub async fn run(global: &Global, args: ProduceArgs) -> Result<(), CliError> {
    let producer = Producer::connect(ProducerConfig {
        brokers: global.brokers.clone(),
        acks: args.acks,
        compression: args.compression,
        linger: args.linger_ms,
        batch_size: args.batch_size,
        retries: args.retries.unwrap_or(u32::MAX),
        delivery_timeout: Duration::from_millis(args.delivery_timeout_ms),
        ..ProducerConfig::default()
    })
    .await?;
    // Outcomes are awaited beside the sending, so memory stays bounded by the buffer.
    let (tx, mut rx) = mpsc::channel::<DeliveryFuture>(100_000);
    let waiter = tokio::spawn(async move {
        let mut acked = 0u64;
        let mut first_error = None;
        while let Some(d) = rx.recv().await {
            match d.await {
                Ok(_) => acked += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        (acked, first_error)
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut sent = 0u64;
    let topic: std::sync::Arc<str> = args.topic.as_str().into();
    while let Some(line) = lines.next_line().await? {
        let (key, value) = match &args.key_separator {
            Some(sep) => match line.split_once(sep.as_str()) {
                Some((k, v)) => (Some(Bytes::from(k.to_string())), v.to_string()),
                None => (None, line),
            },
            None => (None, line),
        };
        let record = ProducerRecord {
            topic: std::sync::Arc::clone(&topic),
            partition: args.partition,
            key,
            value: Some(Bytes::from(value)),
            ..ProducerRecord::default()
        };
        let delivery = producer.send(record).await?;
        sent += 1;
        if tx.send(delivery).await.is_err() {
            break;
        }
    }
    producer.flush().await?;
    drop(tx);
    let (acked, first_error) = waiter
        .await
        .map_err(|e| CliError::Usage(format!("delivery task failed: {e}")))?;
    if global.output == Output::Json {
        print_json(&json!({ "sent": sent, "acknowledged": acked }));
    }
    match first_error {
        Some(e) => Err(CliError::Usage(format!(
            "{} of {sent} records were not acknowledged; first error: {e}",
            sent - acked
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linger_may_be_a_fraction_of_a_millisecond_but_not_negative_or_not_a_number() {
        assert_eq!(parse_linger("5"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_linger("0.25"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_linger("0"), Ok(Duration::ZERO));
        for bad in ["-1", "NaN", "inf", "1e9", "5ms", ""] {
            let e = parse_linger(bad).expect_err(bad);
            assert!(e.contains("ms from 0 to 3600000"), "{bad}: {e}");
        }
    }
}
