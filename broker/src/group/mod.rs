//! Consumer groups: the assignors, the coordinator, and committed offsets.

pub mod assignor;
pub mod coordinator;
pub mod offsets;

pub use coordinator::{CoordinatorConfig, GroupCoordinator};

use std::time::Duration;

use crate::controller::Controller;

/// In a cluster, the leader of the replicated offsets topic coordinates every group:
/// this follows the metadata log and makes the local coordinator take over or hand
/// over as that leadership moves.
pub async fn follow_offsets_leadership(c: Controller, groups: GroupCoordinator) {
    let mut rx = c.metadata_watch();
    let mut active = false;
    loop {
        let leads = rx
            .borrow_and_update()
            .topics
            .get(offsets::OFFSETS_TOPIC)
            .and_then(|t| t.partitions.first())
            .is_some_and(|p| p.leader == c.id());
        if leads != active {
            match groups.set_active(leads).await {
                Ok(()) => active = leads,
                // The local replica may not be open yet: try again shortly.
                Err(e) => tracing::debug!(error = %e, "group coordinator not switched yet"),
            }
        }
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await {
            return;
        }
    }
}
