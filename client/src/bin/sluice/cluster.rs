//! `sluice cluster info` and `sluice cluster health`.

use clap::Subcommand;
use serde_json::json;
use sluice_client::Admin;

use crate::output::{print_json, print_table, Output};
use crate::{CliError, Global};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Brokers with liveness, the controller, and the metadata log's Raft term and commit
    /// index.
    Info,
    /// Exits 0 once the broker answers and knows the active controller (a container
    /// health check); otherwise says why and exits 1.
    Health,
}

pub async fn run(global: &Global, cmd: ClusterCommand) -> Result<(), CliError> {
    let admin = Admin::connect(&global.brokers).await?;
    let c = admin.describe_cluster().await?;
    if let ClusterCommand::Health = cmd {
        if c.controller_id <= 0 {
            return Err(CliError::Usage(
                "the broker answers but knows no active controller yet".into(),
            ));
        }
        println!("ok: controller {}", c.controller_id);
        return Ok(());
    }
    match global.output {
        Output::Json => print_json(&json!({
            "cluster_id": c.cluster_id,
            "controller_id": c.controller_id,
            "raft_term": c.raft_term,
            "raft_commit_index": c.raft_commit_index,
            "brokers": c.brokers.iter().map(|b| json!({
                "node_id": b.node_id, "address": b.address, "alive": b.alive,
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            println!(
                "CLUSTER {}  CONTROLLER {}  RAFT-TERM {}  COMMIT-INDEX {}",
                c.cluster_id, c.controller_id, c.raft_term, c.raft_commit_index
            );
            println!();
            print_table(
                &["ID", "ADDRESS", "ALIVE", "CONTROLLER"],
                &c.brokers
                    .iter()
                    .map(|b| {
                        vec![
                            b.node_id.to_string(),
                            b.address.clone(),
                            b.alive.to_string(),
                            (b.node_id == c.controller_id).to_string(),
                        ]
                    })
                    .collect::<Vec<_>>(),
            );
        }
    }
    Ok(())
}
