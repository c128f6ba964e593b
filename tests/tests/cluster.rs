//! The metadata controller quorum with real broker processes on 127.0.0.1: election,
//! broker liveness, the controller SIGKILLed and replaced, a member's return.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_client::{ClientError, ErrorReason};
use sluice_proto::v1::controller_service_client::ControllerServiceClient;
use sluice_proto::v1::RaftBatch;
use sluice_tests::binaries::binary;
use sluice_tests::broker::BrokerProcess;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn cluster_info(addr: &str) -> Option<serde_json::Value> {
    let out = Command::new(binary("sluice"))
        .args(["--brokers", addr, "--output", "json", "cluster", "info"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Waits until `addr` reports a controller and exactly the live brokers `alive`.
fn wait_for(addr: &str, alive: &[i64], not: Option<i64>) -> serde_json::Value {
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

#[test]
fn the_controller_quorum_elects_fails_over_and_takes_a_member_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let quorum = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}@{a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let start = |i: usize| {
        let id = (i + 1).to_string();
        BrokerProcess::start_on(
            &dir.path().join(format!("node-{id}")),
            &addrs[i],
            &["--node-id", &id, "--controller-quorum", &quorum],
        )
    };
    let mut brokers: Vec<Option<BrokerProcess>> = (0..3).map(|i| Some(start(i))).collect();

    let info = wait_for(&addrs[1], &[1, 2, 3], None);
    let controller = info["controller_id"].as_i64().expect("controller");
    // One cluster id, committed through Raft, whichever broker answers (each starts
    // out proposing its own; the first committed wins everywhere).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ids: Vec<String> = addrs
            .iter()
            .map(|a| {
                let i = wait_for(a, &[1, 2, 3], None);
                i["cluster_id"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        if ids.iter().all(|i| !i.is_empty() && *i == ids[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "brokers never agreed on a cluster id: {ids:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(info["raft_term"].as_u64().unwrap_or(0) >= 1, "{info}");

    // SIGKILL the active controller: the other two elect a new one, which sees the old
    // one stop heartbeating.
    let idx = (controller - 1) as usize;
    brokers[idx].take().expect("running").sigkill();
    let survivor = &addrs[(idx + 1) % 3];
    let mut alive: Vec<i64> = (1..=3).filter(|&id| id != controller).collect();
    alive.sort_unstable();
    let after = wait_for(survivor, &alive, Some(controller));
    assert!(
        after["raft_term"].as_u64() > info["raft_term"].as_u64(),
        "a new term: {info} then {after}"
    );

    // The old controller comes back from its own Raft log and rejoins as a member.
    brokers[idx] = Some(start(idx));
    wait_for(&addrs[idx], &[1, 2, 3], None);

    // Raft traffic is heard only from quorum members.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = ControllerServiceClient::connect(format!("http://{}", addrs[0]))
            .await
            .expect("connect");
        let err = c
            .raft(RaftBatch {
                from: 9,
                messages: vec![],
            })
            .await
            .expect_err("a stranger is refused");
        let err = ClientError::from(err);
        assert_eq!(err.reason(), Some(ErrorReason::InvalidRequest), "{err}");
    });

    for b in brokers.into_iter().flatten() {
        assert!(b.sigterm(), "broker stops cleanly");
    }
}
