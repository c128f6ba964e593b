//! `sluice consume TOPIC`: one record per stdout line.

use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use sluice_client::{Consumer, ConsumerConfig, OffsetReset};

use crate::output::Output;
use crate::{CliError, Global};

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to read.
    topic: String,
    /// Read only this partition (default: all).
    #[arg(long, conflicts_with = "group")]
    partition: Option<u32>,
    /// Consume as a member of this consumer group: the group shares the partitions out
    /// and remembers the offsets (committed every 5 s and on exit).
    #[arg(long)]
    group: Option<String>,
    /// The group's assignor: range, roundrobin or sticky.
    #[arg(long, default_value = "sticky", requires = "group")]
    assignor: String,
    /// Start at the oldest record still kept.
    #[arg(long, conflicts_with_all = ["offset", "from_time"])]
    from_beginning: bool,
    /// Start at this offset.
    #[arg(long, conflicts_with_all = ["from_time", "group"])]
    offset: Option<u64>,
    /// Start at the first record at or after this time: ms since the epoch, or a
    /// duration ago such as `-15m` or `-2h`.
    #[arg(long, allow_hyphen_values = true, conflicts_with = "group")]
    from_time: Option<String>,
    /// Stop after this many records.
    #[arg(long)]
    max_messages: Option<u64>,
    /// Stop when no new record arrived for this many ms.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Print `key<TAB>value`.
    #[arg(long)]
    print_key: bool,
}

fn parse_time(s: &str) -> Result<i64, CliError> {
    if let Some(ago) = s.strip_prefix('-') {
        let ms = sluice_log_store::units::parse_duration_ms(ago).map_err(CliError::Usage)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        return Ok(now - ms as i64);
    }
    s.parse().map_err(|_| {
        CliError::Usage(format!(
            "--from-time {s:?}: ms since the epoch, or -15m / -2h"
        ))
    })
}

pub async fn run(global: &Global, args: ConsumeArgs) -> Result<(), CliError> {
    let mut consumer = Consumer::connect(ConsumerConfig {
        brokers: global.brokers.clone(),
        auto_offset_reset: if args.from_beginning {
            OffsetReset::Earliest
        } else {
            OffsetReset::Latest
        },
        group_id: args.group.clone(),
        group_assignor: args.assignor.clone(),
        ..ConsumerConfig::default()
    })
    .await?;
    if args.group.is_some() {
        // Where to start is the group's committed offset; --from-beginning only decides
        // for partitions the group has never committed, as in Kafka.
        consumer.subscribe([args.topic.clone()])?;
        let result = tokio::select! {
            r = print_records(global, &args, &mut consumer) => r,
            () = stop_signal() => Ok(()),
        };
        let closed = consumer.close().await;
        result?;
        return closed.map_err(Into::into);
    }
    match args.partition {
        Some(p) => consumer.assign([(args.topic.clone(), p)]),
        None => consumer.assign_topic(&args.topic).await?,
    }
    if args.from_beginning {
        consumer.seek_to_beginning().await?;
    } else if let Some(offset) = args.offset {
        for tp in consumer.assignment() {
            consumer.seek(&tp, offset)?;
        }
    } else if let Some(t) = &args.from_time {
        consumer.seek_to_timestamp(parse_time(t)?).await?;
    } else {
        consumer.seek_to_end().await?;
    }
    print_records(global, &args, &mut consumer).await
}

/// Resolves on SIGINT or SIGTERM, so a group member commits and leaves before exiting.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

async fn print_records(
    global: &Global,
    args: &ConsumeArgs,
    consumer: &mut Consumer,
) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let mut seen = 0u64;
    let mut last_record = Instant::now();
    loop {
        if args.max_messages.is_some_and(|max| seen >= max) {
            return Ok(());
        }
        let wait = match args.timeout_ms {
            Some(ms) => {
                let left = Duration::from_millis(ms).saturating_sub(last_record.elapsed());
                if left.is_zero() {
                    return Ok(());
                }
                left.min(Duration::from_millis(500))
            }
            None => Duration::from_millis(500),
        };
        let records = consumer.poll(wait).await?;
        if !records.is_empty() {
            last_record = Instant::now();
        }
        let mut out = stdout.lock();
        for r in records {
            if args.max_messages.is_some_and(|max| seen >= max) {
                break;
            }
            seen += 1;
            let text = |b: &Option<bytes::Bytes>| {
                b.as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default()
            };
            let line = match global.output {
                Output::Json => json!({
                    "topic": &*r.topic,
                    "partition": r.partition,
                    "offset": r.offset,
                    "timestamp": r.timestamp,
                    "key": r.key.as_ref().map(|_| text(&r.key)),
                    "value": r.value.as_ref().map(|_| text(&r.value)),
                })
                .to_string(),
                Output::Table if args.print_key => format!("{}\t{}", text(&r.key), text(&r.value)),
                Output::Table => text(&r.value),
            };
            match writeln!(out, "{line}") {
                Ok(()) => {}
                // The reader went away (`| head`): that is a normal end.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        if let Err(e) = out.flush() {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
    }
}
