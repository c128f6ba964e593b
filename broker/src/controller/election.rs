//! The active controller's watch over partition leadership: a broker whose heartbeats
//! stopped leaves every ISR, and a partition whose leader is gone gets a new one from
//! its ISR, with a new leader epoch. Only the Raft leader acts; every decision is a
//! metadata command, fenced by the partition epoch it was computed from.

use std::time::Duration;

use tokio::time::Instant;

use super::metadata::{Command, Metadata, PartitionRecord};
use super::Controller;
use crate::group::offsets::OFFSETS_TOPIC;
use crate::topic::config::TopicConfig;

/// How often the controller looks.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// The leader and ISR a partition should have now, when they differ from what it has.
pub fn decide(
    p: &PartitionRecord,
    alive: impl Fn(u64) -> bool,
    unclean: bool,
) -> Option<(u64, Vec<u64>)> {
    let live_isr: Vec<u64> = p.isr.iter().copied().filter(|b| alive(*b)).collect();
    if p.leader != 0 && alive(p.leader) {
        // Fence dead followers out, so acks=all stops waiting for them.
        return (live_isr.len() < p.isr.len() && !live_isr.is_empty())
            .then_some((p.leader, live_isr));
    }
    if let Some(next) = p.replicas.iter().find(|r| live_isr.contains(r)) {
        return Some((*next, live_isr));
    }
    if unclean {
        if let Some(next) = p.replicas.iter().find(|r| alive(**r)) {
            tracing::warn!(
                broker = next,
                "unclean leader election: records may be lost"
            );
            return Some((*next, vec![*next]));
        }
    }
    // Nobody in sync is alive: the partition goes offline, keeping its last ISR so
    // that the first of them to return leads again.
    (p.leader != 0).then(|| (0, p.isr.clone()))
}

fn changes(c: &Controller, md: &Metadata) -> Vec<Command> {
    let alive = |id: u64| md.brokers.get(&id).is_some_and(|b| c.is_alive(b));
    let mut out = Vec::new();
    for (name, t) in &md.topics {
        let unclean = TopicConfig::resolve(&TopicConfig::default(), &t.configs)
            .is_ok_and(|tc| tc.unclean_leader_election);
        for (i, p) in t.partitions.iter().enumerate() {
            if let Some((leader, isr)) = decide(p, alive, unclean) {
                out.push(Command::AlterPartition {
                    topic: name.clone(),
                    partition: i as u32,
                    partition_epoch: p.partition_epoch,
                    leader,
                    isr,
                });
            }
        }
    }
    out
}

/// The replicated offsets topic, created once every quorum member has registered (up
/// to three, its replication factor).
fn offsets_topic(c: &Controller, md: &Metadata) -> Option<Command> {
    let rf = c.quorum_size().min(3);
    if md.topics.contains_key(OFFSETS_TOPIC) || md.brokers.len() < rf {
        return None;
    }
    Some(Command::CreateTopic {
        name: OFFSETS_TOPIC.to_string(),
        partitions: c.offsets_partitions(),
        replication_factor: rf as u32,
        // Kept forever: expiry writes tombstones and compaction rewrites it.
        configs: [("retention.ms".to_string(), "-1".to_string())].into(),
    })
}

/// Runs on every broker of the quorum; acts while this one is the active controller.
pub async fn run(c: Controller) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let leading = c.status().await.is_ok_and(|s| s.leader == Some(c.id()));
        if !leading {
            leading_since = None;
            continue;
        }
        // A new controller first gives every broker a session to heartbeat to it, so
        // that nobody is fenced only because the controller just changed.
        let since = *leading_since.get_or_insert_with(Instant::now);
        if since.elapsed() < c.session_timeout() {
            continue;
        }
        let md = c.metadata();
        if let Some(cmd) = offsets_topic(&c, &md) {
            if let Err(e) = c.propose(&cmd).await {
                tracing::debug!(error = %e, "offsets topic not created yet");
            }
        }
        for cmd in changes(&c, &md) {
            if let Command::AlterPartition {
                topic,
                partition,
                leader,
                isr,
                ..
            } = &cmd
            {
                tracing::info!(%topic, partition, leader, ?isr, "electing");
            }
            if let Err(e) = c.propose(&cmd).await {
                tracing::debug!(error = %e, "partition change not committed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(leader: u64, isr: &[u64]) -> PartitionRecord {
        PartitionRecord {
            replicas: vec![1, 2, 3],
            leader,
            leader_epoch: 4,
            isr: isr.to_vec(),
            partition_epoch: 7,
        }
    }

    #[test]
    fn leaders_come_from_the_live_isr_and_dead_followers_leave_it() {
        let up = |live: &'static [u64]| move |b: u64| live.contains(&b);
        // All well: nothing to do.
        assert_eq!(decide(&part(1, &[1, 2, 3]), up(&[1, 2, 3]), false), None);
        // A follower died: it leaves the ISR, the leader stays.
        assert_eq!(
            decide(&part(1, &[1, 2, 3]), up(&[1, 2]), false),
            Some((1, vec![1, 2]))
        );
        // The leader died: the next live ISR member leads.
        assert_eq!(
            decide(&part(1, &[1, 2, 3]), up(&[2, 3]), false),
            Some((2, vec![2, 3]))
        );
        // A live replica outside the ISR is not elected without unclean election.
        assert_eq!(
            decide(&part(1, &[1, 2]), up(&[3]), false),
            Some((0, vec![1, 2]))
        );
        assert_eq!(decide(&part(0, &[1, 2]), up(&[3]), false), None);
        assert_eq!(
            decide(&part(0, &[1, 2]), up(&[3]), true),
            Some((3, vec![3]))
        );
        // An offline partition whose ISR member returns gets it as leader.
        assert_eq!(
            decide(&part(0, &[1, 2]), up(&[2, 3]), false),
            Some((2, vec![2]))
        );
    }
}
