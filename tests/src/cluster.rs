//! Broker clusters on 127.0.0.1 for tests: addresses chosen before start (members
//! must know each other), the quorum flag, and bounded waits on what `sluice` reports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::broker::BrokerProcess;
use crate::cli::sluice;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The brokers' data folders, addresses and the quorum flag naming them.
pub struct Quorum {
    dir: tempfile::TempDir,
    /// Broker `i`'s address (node id `i + 1`).
    pub addrs: Vec<String>,
    flag: String,
    extra: Vec<String>,
}

impl Quorum {
    /// Three members; `extra` flags are given to every broker.
    pub fn new(extra: &[&str]) -> Quorum {
        Quorum::of(3, extra)
    }

    /// `n` members; `extra` flags are given to every broker.
    pub fn of(n: usize, extra: &[&str]) -> Quorum {
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let flag = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}@{a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        Quorum {
            dir: tempfile::tempdir().expect("tempdir"),
            addrs,
            flag,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Broker `i`'s data folder.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node-{}", i + 1))
    }

    /// Every address, comma-separated (a client's bootstrap list).
    pub fn bootstrap(&self) -> String {
        self.addrs.join(",")
    }

    /// Starts every member and waits (bounded) until the controller sees them all
    /// alive; each slot is `take`n to stop its broker.
    pub fn start_all(&self) -> Vec<Option<BrokerProcess>> {
        let brokers = (0..self.addrs.len()).map(|i| Some(self.start(i))).collect();
        let ids: Vec<i64> = (1..=self.addrs.len() as i64).collect();
        wait_for_brokers(&self.addrs[0], &ids, None);
        brokers
    }

    /// Starts broker `i` (node id `i + 1`) on its address and folder.
    pub fn start(&self, i: usize) -> BrokerProcess {
        let id = (i + 1).to_string();
        let mut args = vec!["--node-id", &id, "--controller-quorum", &self.flag];
        args.extend(self.extra.iter().map(String::as_str));
        BrokerProcess::start_on(&self.data_dir(i), &self.addrs[i], &args)
    }
}

/// `sluice cluster info` as JSON, or `None` when the broker does not answer.
pub fn cluster_info(addr: &str) -> Option<serde_json::Value> {
    let out = sluice(addr, &["--output", "json", "cluster", "info"], "");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Waits (at most 30 s) until `addr` reports a controller other than `not` and exactly
/// the live brokers `alive`.
pub fn wait_for_brokers(addr: &str, alive: &[i64], not: Option<i64>) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(info) = cluster_info(addr) {
            let controller = info["controller_id"].as_i64().unwrap_or(-1);
            let mut live: Vec<i64> = info["brokers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["alive"].as_bool() == Some(true))
                .filter_map(|b| b["node_id"].as_i64())
                .collect();
            live.sort_unstable();
            if controller > 0 && Some(controller) != not && live == alive {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "cluster never reached live brokers {alive:?} (controller not {not:?}): {info}"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "{addr} never answered cluster info"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One partition as `sluice topic describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    /// Leader id (-1: none).
    pub leader: i64,
    /// Leader epoch.
    pub epoch: i64,
    /// Replicas.
    pub replicas: Vec<i64>,
    /// In-sync replicas, sorted.
    pub isr: Vec<i64>,
    /// High watermark.
    pub high_watermark: i64,
    /// Log end offset.
    pub log_end_offset: i64,
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_i64)
        .collect()
}

/// The partitions of `topic` as `addr` describes them, or `None` if it cannot.
pub fn describe(addr: &str, topic: &str) -> Option<Vec<PartitionView>> {
    let out = sluice(addr, &["--output", "json", "topic", "describe", topic], "");
    if !out.status.success() {
        return None;
    }
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        d["partitions"]
            .as_array()?
            .iter()
            .map(|p| {
                let mut isr = ids(&p["isr"]);
                isr.sort_unstable();
                PartitionView {
                    leader: p["leader"].as_i64().unwrap_or(-1),
                    epoch: p["leader_epoch"].as_i64().unwrap_or(-1),
                    replicas: ids(&p["replicas"]),
                    isr,
                    high_watermark: p["high_watermark"].as_i64().unwrap_or(-1),
                    log_end_offset: p["log_end_offset"].as_i64().unwrap_or(-1),
                }
            })
            .collect(),
    )
}

/// Waits (at most `secs`) until some broker in `addrs` describes partition `p` of
/// `topic` so that `ready` holds; returns that view.
pub fn wait_partition(
    addrs: &[&str],
    topic: &str,
    p: usize,
    secs: u64,
    ready: impl Fn(&PartitionView) -> bool,
) -> PartitionView {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    loop {
        for a in addrs {
            if let Some(v) = describe(a, topic).and_then(|mut v| (p < v.len()).then(|| v.remove(p)))
            {
                if ready(&v) {
                    return v;
                }
                last = Some(v);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{topic}-{p} never reached the expected state within {secs} s; last seen {last:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The broker coordinating `group` (the leader of the offsets partition it hashes to),
/// as `addr` describes `__consumer_offsets`, waiting at most `secs` for every offsets
/// partition to have a leader and `ready` to hold for the group's.
pub fn group_coordinator(
    addr: &str,
    group: &str,
    secs: u64,
    ready: impl Fn(&PartitionView) -> bool,
) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(parts) = describe(addr, "__consumer_offsets") {
            let p = sluice_broker::group::offsets_partition(group, parts.len() as u32);
            if parts.iter().all(|v| v.leader > 0) && ready(&parts[p as usize]) {
                return parts[p as usize].leader;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no coordinator for group {group:?} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
