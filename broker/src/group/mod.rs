//! Consumer groups: the assignors, the coordinator, and committed offsets.

pub mod assignor;
pub mod coordinator;
pub mod offsets;

pub use coordinator::{CoordinatorConfig, GroupCoordinator, Leading};

use std::time::Duration;

use crate::controller::Controller;

/// The `__consumer_offsets` partition that holds `group`'s offsets; its leader
/// coordinates the group. FNV-1a, so the answer never changes between versions or
/// platforms (a moved group would lose its offsets).
pub fn offsets_partition(group: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in group.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

/// In a cluster, the leader of each partition of the replicated offsets topic
/// coordinates the groups hashing to it: this follows the metadata log and makes the
/// local coordinator take over or hand over partitions as their leadership moves.
pub async fn follow_offsets_leadership(c: Controller, groups: GroupCoordinator) {
    let mut rx = c.metadata_watch();
    let mut current = Leading::default();
    loop {
        let wanted = {
            let md = rx.borrow_and_update();
            md.topics
                .get(offsets::OFFSETS_TOPIC)
                .map(|t| Leading {
                    partitions: t.partitions.len() as u32,
                    led: (0u32..)
                        .zip(&t.partitions)
                        .filter(|(_, p)| p.leader == c.id())
                        .map(|(i, _)| i)
                        .collect(),
                })
                .unwrap_or_default()
        };
        if wanted != current {
            match groups.set_leading(wanted.clone()).await {
                Ok(()) => current = wanted,
                // A local replica may not be open yet: try again shortly.
                Err(e) => tracing::debug!(error = %e, "group coordinator not switched yet"),
            }
        }
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::offsets_partition;

    #[test]
    fn groups_hash_to_fixed_partitions_spread_over_all() {
        // Fixed values: changing the hash would move groups away from their offsets.
        assert_eq!(offsets_partition("", 8), 0x811c_9dc5 % 8);
        assert_eq!(offsets_partition("billing", 8), 4);
        assert_eq!(offsets_partition("orders", 50), 20);
        assert_eq!(offsets_partition("billing", 0), 0);
        let mut seen = [0u32; 8];
        for i in 0..800 {
            seen[offsets_partition(&format!("group-{i}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
