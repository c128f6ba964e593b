//! `sluice topic create|list|describe|delete|alter`.

use clap::Subcommand;
use serde_json::json;
use sluice_client::{Admin, NewTopic};
use sluice_proto::v1::TopicDescription;

use crate::output::{ids, print_json, print_table, Output};
use crate::{parse_pairs, CliError, Global};

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Number of partitions [default: the broker's].
        #[arg(long, short = 'p')]
        partitions: Option<u32>,
        /// Replicas per partition [default: the broker's].
        #[arg(long, short = 'r')]
        replication_factor: Option<u32>,
        /// Config override `key=value` (repeatable), e.g. `retention.ms=7d`.
        #[arg(long = "config", short = 'c')]
        configs: Vec<String>,
    },
    /// List topics.
    List,
    /// Describe a topic: partitions with leader, replicas, ISR and offsets; configs.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and its data.
    Delete {
        /// Topic name.
        name: String,
    },
    /// Add partitions or change configs.
    Alter {
        /// Topic name.
        name: String,
        /// The new (larger) number of partitions.
        #[arg(long, short = 'p')]
        partitions: Option<u32>,
        /// Config to set, `key=value` (repeatable).
        #[arg(long = "config", short = 'c')]
        configs: Vec<String>,
        /// Config to remove (back to the broker default; repeatable).
        #[arg(long = "delete-config")]
        delete_configs: Vec<String>,
    },
}

pub async fn run(global: &Global, cmd: TopicCommand) -> Result<(), CliError> {
    let admin = Admin::connect(&global.brokers).await?;
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
        } => {
            let d = admin
                .create_topic(NewTopic {
                    name,
                    partitions: partitions.unwrap_or(0),
                    replication_factor: replication_factor.unwrap_or(0),
                    configs: parse_pairs(&configs)?,
                })
                .await?;
            match global.output {
                Output::Json => print_json(&describe_json(&d)),
                Output::Table => println!(
                    "created topic {} with {} partition(s), replication factor {}",
                    d.name,
                    d.partitions.len(),
                    d.replication_factor
                ),
            }
        }
        TopicCommand::List => {
            let topics = admin.list_topics().await?;
            match global.output {
                Output::Json => print_json(&json!(topics
                    .iter()
                    .map(|t| json!({
                        "name": t.name,
                        "partitions": t.partitions,
                        "replication_factor": t.replication_factor,
                        "internal": t.internal,
                    }))
                    .collect::<Vec<_>>())),
                Output::Table => print_table(
                    &["NAME", "PARTITIONS", "REPLICAS", "INTERNAL"],
                    &topics
                        .iter()
                        .map(|t| {
                            vec![
                                t.name.clone(),
                                t.partitions.to_string(),
                                t.replication_factor.to_string(),
                                t.internal.to_string(),
                            ]
                        })
                        .collect::<Vec<_>>(),
                ),
            }
        }
        TopicCommand::Describe { name } => {
            let d = admin.describe_topic(&name).await?;
            match global.output {
                Output::Json => print_json(&describe_json(&d)),
                Output::Table => {
                    println!(
                        "NAME {}  PARTITIONS {}  REPLICATION-FACTOR {}",
                        d.name,
                        d.partitions.len(),
                        d.replication_factor
                    );
                    let mut configs: Vec<_> = d.configs.iter().collect();
                    configs.sort();
                    let overridden = |k: &str| d.overridden_configs.iter().any(|o| o == k);
                    println!(
                        "CONFIGS {}",
                        configs
                            .iter()
                            .map(|(k, v)| format!(
                                "{k}={v}{}",
                                if overridden(k) { "*" } else { "" }
                            ))
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    println!();
                    print_table(
                        &[
                            "PARTITION",
                            "LEADER",
                            "EPOCH",
                            "REPLICAS",
                            "ISR",
                            "LOG-START-OFFSET",
                            "HIGH-WATERMARK",
                            "LOG-END-OFFSET",
                        ],
                        &d.partitions
                            .iter()
                            .map(|p| {
                                vec![
                                    p.partition.to_string(),
                                    p.leader.to_string(),
                                    p.leader_epoch.to_string(),
                                    ids(&p.replicas),
                                    ids(&p.isr),
                                    p.log_start_offset.to_string(),
                                    p.high_watermark.to_string(),
                                    p.log_end_offset.to_string(),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    );
                }
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            if global.output == Output::Table {
                println!("deleted topic {name}");
            } else {
                print_json(&json!({ "deleted": name }));
            }
        }
        TopicCommand::Alter {
            name,
            partitions,
            configs,
            delete_configs,
        } => {
            if partitions.is_none() && configs.is_empty() && delete_configs.is_empty() {
                return Err(CliError::Usage(
                    "nothing to alter: give --partitions, --config or --delete-config".into(),
                ));
            }
            if let Some(n) = partitions {
                admin.create_partitions(&name, n).await?;
            }
            if !configs.is_empty() || !delete_configs.is_empty() {
                admin
                    .alter_topic_config(&name, parse_pairs(&configs)?, delete_configs)
                    .await?;
            }
            let d = admin.describe_topic(&name).await?;
            match global.output {
                Output::Json => print_json(&describe_json(&d)),
                Output::Table => println!("altered topic {name}"),
            }
        }
    }
    Ok(())
}

fn describe_json(d: &TopicDescription) -> serde_json::Value {
    json!({
        "name": d.name,
        "replication_factor": d.replication_factor,
        "internal": d.internal,
        "configs": d.configs,
        "overridden_configs": d.overridden_configs,
        "partitions": d.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "leader": p.leader,
            "leader_epoch": p.leader_epoch,
            "replicas": p.replicas,
            "isr": p.isr,
            "log_start_offset": p.log_start_offset,
            "high_watermark": p.high_watermark,
            "log_end_offset": p.log_end_offset,
        })).collect::<Vec<_>>(),
    })
}
