//! `sluice group list|describe|reset-offsets|delete`.

use clap::{ArgGroup, Subcommand};
use serde_json::json;
use sluice_client::{Admin, OffsetSpec};
use sluice_proto::v1::TopicPartitions;

use crate::output::{print_json, print_table, Output};
use crate::{CliError, Global};

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List consumer groups.
    List,
    /// A group's state and members, and per partition the committed offset, the log
    /// end offset and the lag.
    Describe {
        /// Group id.
        group: String,
    },
    /// Move a group's committed offsets for a topic (only while the group is empty).
    #[command(group(ArgGroup::new("to").required(true).args(["to_earliest", "to_latest", "to_offset", "to_time"])))]
    ResetOffsets {
        /// Group id.
        group: String,
        /// Topic whose partitions are reset.
        #[arg(long)]
        topic: String,
        /// To each partition's oldest record.
        #[arg(long)]
        to_earliest: bool,
        /// To each partition's end.
        #[arg(long)]
        to_latest: bool,
        /// To this offset in every partition.
        #[arg(long)]
        to_offset: Option<u64>,
        /// To the first record at or after this time (ms since the epoch).
        #[arg(long)]
        to_time: Option<i64>,
    },
    /// Delete an empty group and its committed offsets.
    Delete {
        /// Group id.
        group: String,
    },
}

fn partitions_text(list: &[TopicPartitions]) -> String {
    list.iter()
        .flat_map(|t| t.partitions.iter().map(move |p| format!("{}-{p}", t.topic)))
        .collect::<Vec<_>>()
        .join(",")
}

fn partitions_json(list: &[TopicPartitions]) -> serde_json::Value {
    json!(list
        .iter()
        .map(|t| json!({"topic": t.topic, "partitions": t.partitions}))
        .collect::<Vec<_>>())
}

pub async fn run(global: &Global, command: GroupCommand) -> Result<(), CliError> {
    let admin = Admin::connect(&global.brokers).await?;
    match command {
        GroupCommand::List => {
            let groups = admin.list_groups().await?;
            match global.output {
                Output::Json => print_json(&json!(groups
                    .iter()
                    .map(|g| json!({"group": g.group_id, "state": g.state, "members": g.members}))
                    .collect::<Vec<_>>())),
                Output::Table => print_table(
                    &["GROUP", "STATE", "MEMBERS"],
                    &groups
                        .iter()
                        .map(|g| vec![g.group_id.clone(), g.state.clone(), g.members.to_string()])
                        .collect::<Vec<_>>(),
                ),
            }
        }
        GroupCommand::Describe { group } => {
            let d = admin.describe_group(&group).await?;
            match global.output {
                Output::Json => print_json(&json!({
                    "group": d.group_id,
                    "state": d.state,
                    "group_epoch": d.group_epoch,
                    "assignor": d.assignor,
                    "members": d.members.iter().map(|m| json!({
                        "member_id": m.member_id,
                        "member_epoch": m.member_epoch,
                        "subscribed_topics": m.subscribed_topics,
                        "assignment": partitions_json(&m.assignment),
                        "target_assignment": partitions_json(&m.target_assignment),
                    })).collect::<Vec<_>>(),
                    "offsets": d.offsets.iter().map(|o| json!({
                        "topic": o.topic,
                        "partition": o.partition,
                        "committed_offset": o.committed_offset,
                        "log_end_offset": o.log_end_offset,
                        "lag": o.lag,
                        "member_id": o.member_id,
                    })).collect::<Vec<_>>(),
                })),
                Output::Table => {
                    println!(
                        "group {} state {} epoch {} assignor {} members {}",
                        d.group_id,
                        d.state,
                        d.group_epoch,
                        d.assignor,
                        d.members.len()
                    );
                    if !d.members.is_empty() {
                        println!();
                        print_table(
                            &["MEMBER", "EPOCH", "ASSIGNMENT"],
                            &d.members
                                .iter()
                                .map(|m| {
                                    vec![
                                        m.member_id.clone(),
                                        m.member_epoch.to_string(),
                                        partitions_text(&m.assignment),
                                    ]
                                })
                                .collect::<Vec<_>>(),
                        );
                    }
                    println!();
                    print_table(
                        &[
                            "TOPIC",
                            "PARTITION",
                            "COMMITTED",
                            "LOG-END",
                            "LAG",
                            "MEMBER",
                        ],
                        &d.offsets
                            .iter()
                            .map(|o| {
                                vec![
                                    o.topic.clone(),
                                    o.partition.to_string(),
                                    or_dash(o.committed_offset),
                                    // Unknown while the partition's leader is away.
                                    or_dash(o.log_end_offset),
                                    or_dash(o.lag),
                                    if o.member_id.is_empty() {
                                        "-".to_string()
                                    } else {
                                        o.member_id.clone()
                                    },
                                ]
                            })
                            .collect::<Vec<_>>(),
                    );
                }
            }
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to_earliest,
            to_latest,
            to_offset,
            to_time,
        } => {
            let d = admin.describe_topic(&topic).await?;
            let partitions: Vec<u32> = (0..d.partitions.len() as u32).collect();
            let targets: Vec<u64> = if let Some(o) = to_offset {
                partitions.iter().map(|_| o).collect()
            } else {
                let spec = if to_earliest {
                    OffsetSpec::Earliest
                } else if to_latest {
                    OffsetSpec::Latest
                } else {
                    OffsetSpec::Timestamp(to_time.unwrap_or(0))
                };
                let queries: Vec<_> = partitions
                    .iter()
                    .map(|&p| (topic.clone(), p, spec))
                    .collect();
                admin
                    .list_offsets(&queries)
                    .await?
                    .into_iter()
                    .map(|(o, _)| o)
                    .collect()
            };
            let offsets: Vec<((String, u32), u64)> = partitions
                .iter()
                .zip(&targets)
                .map(|(&p, &o)| ((topic.clone(), p), o))
                .collect();
            admin.set_group_offsets(&group, &offsets).await?;
            match global.output {
                Output::Json => print_json(&json!(offsets
                    .iter()
                    .map(|((t, p), o)| json!({"topic": t, "partition": p, "offset": o}))
                    .collect::<Vec<_>>())),
                Output::Table => print_table(
                    &["TOPIC", "PARTITION", "NEW-OFFSET"],
                    &offsets
                        .iter()
                        .map(|((t, p), o)| vec![t.clone(), p.to_string(), o.to_string()])
                        .collect::<Vec<_>>(),
                ),
            }
        }
        GroupCommand::Delete { group } => {
            admin.delete_group(&group).await?;
            if global.output == Output::Table {
                println!("deleted group {group}");
            } else {
                print_json(&json!({"deleted": group}));
            }
        }
    }
    Ok(())
}

/// A number, or `-` for the -1 that stands for none or unknown.
fn or_dash(v: i64) -> String {
    if v < 0 {
        "-".to_string()
    } else {
        v.to_string()
    }
}
