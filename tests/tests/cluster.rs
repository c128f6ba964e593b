//! The metadata controller quorum with real broker processes on 127.0.0.1: election,
//! broker liveness, the controller SIGKILLed and replaced, a member's return.

use std::time::{Duration, Instant};

use sluice_client::{ClientError, ErrorReason};
use sluice_log_store::{Compression, RecordBatchBuilder};
use sluice_proto::v1::controller_service_client::ControllerServiceClient;
use sluice_proto::v1::produce_service_client::ProduceServiceClient;
use sluice_proto::v1::{Acks, ProduceRequest, RaftBatch};
use sluice_tests::broker::BrokerProcess;
use sluice_tests::cli::{ok, sluice};
use sluice_tests::cluster::{describe, group_coordinator, wait_for_brokers as wait_for, Quorum};

#[test]
fn the_controller_quorum_elects_fails_over_and_takes_a_member_back() {
    let q = Quorum::new(&[]);
    let addrs = &q.addrs;
    let start = |i: usize| q.start(i);
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

fn sluice_ok(addr: &str, args: &[&str]) -> String {
    ok(&sluice(addr, args, ""))
}

fn placement(addr: &str, topic: &str) -> Vec<(i64, Vec<i64>)> {
    let text = sluice_ok(addr, &["--output", "json", "topic", "describe", topic]);
    let d: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    d["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            (
                p["leader"].as_i64().unwrap_or(-1),
                p["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(serde_json::Value::as_i64)
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn topics_go_through_the_controller_and_survive_its_loss() {
    let q = Quorum::new(&[]);
    let addrs = &q.addrs;
    let start = |i: usize| q.start(i);
    let mut brokers: Vec<Option<BrokerProcess>> = (0..3).map(|i| Some(start(i))).collect();
    let info = wait_for(&addrs[0], &[1, 2, 3], None);
    let controller = info["controller_id"].as_i64().expect("controller");

    // Created through one broker, the same placement is known to every broker.
    sluice_ok(
        &addrs[1],
        &["topic", "create", "orders", "-p", "3", "-r", "3"],
    );
    let placed = placement(&addrs[1], "orders");
    assert_eq!(placed.len(), 3);
    for (leader, replicas) in &placed {
        assert_eq!(replicas.len(), 3, "{placed:?}");
        assert_eq!(*leader, replicas[0]);
    }
    for a in addrs {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = sluice(a, &["--output", "json", "topic", "describe", "orders"], "");
            if out.status.success() {
                assert_eq!(
                    placement(a, "orders"),
                    placed,
                    "{a} knows the same placement"
                );
                break;
            }
            assert!(Instant::now() < deadline, "{a} never learned of the topic");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // More replicas than brokers is refused by the controller's rule.
    let out = sluice(&addrs[0], &["topic", "create", "wide", "-r", "4"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("INVALID_REPLICATION_FACTOR"));

    // Only the leader takes writes; the others name it, and the producer follows the
    // name: a record sent through a follower lands on the leader.
    let (leader, _) = placed[0].clone();
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let refused = rt.block_on(async {
        let mut c =
            ProduceServiceClient::connect(format!("http://{}", addrs[(follower - 1) as usize]))
                .await
                .expect("connect");
        let mut b = RecordBatchBuilder::new(Compression::None);
        b.append(0, None, Some(b"hello"), &[]);
        c.produce(ProduceRequest {
            topic: "orders".into(),
            partition: 0,
            records: b.build().expect("batch"),
            acks: Acks::All as i32,
            timeout_ms: 0,
        })
        .await
        .expect_err("a follower refuses writes")
    });
    let err = ClientError::from(refused);
    assert_eq!(err.reason(), Some(ErrorReason::NotLeader), "{err}");
    assert_eq!(err.metadata_u64("leader_id"), Some(leader as u64), "{err}");
    assert_eq!(
        err.metadata_str("leader_address"),
        Some(addrs[(leader - 1) as usize].as_str()),
        "{err}"
    );
    let via_follower = sluice(
        &addrs[(follower - 1) as usize],
        &["produce", "orders", "--partition", "0"],
        "hello\n",
    );
    assert!(via_follower.status.success(), "{via_follower:?}");
    let leader_view = describe(&addrs[(leader - 1) as usize], "orders").expect("describe");
    assert_eq!(
        leader_view[0].log_end_offset, 1,
        "the record is on the leader"
    );
    // Keyed records spread over three partitions led by three brokers, written and read
    // through one broker: producer and consumer find each partition's leader.
    let keyed: String = (0..30).map(|i| format!("k{i}:v{i}\n")).collect();
    let via = &addrs[follower as usize % 3];
    ok(&sluice(
        via,
        &["produce", "orders", "--key-separator", ":"],
        &keyed,
    ));
    let read = ok(&sluice(
        via,
        &[
            "consume",
            "orders",
            "--from-beginning",
            "--max-messages",
            "31",
            "--timeout-ms",
            "20000",
        ],
        "",
    ));
    let mut values: Vec<&str> = read.lines().collect();
    values.sort_unstable();
    let mut want: Vec<String> = (0..30).map(|i| format!("v{i}")).collect();
    want.push("hello".into());
    want.sort_unstable();
    assert_eq!(values, want);

    // A partition with one replica: brokers without it describe the leader's offsets.
    sluice_ok(
        &addrs[0],
        &["topic", "create", "single", "-p", "1", "-r", "1"],
    );
    ok(&sluice(&addrs[0], &["produce", "single"], "a\nb\nc\n"));
    for a in addrs {
        let v = describe(a, "single").expect("describe");
        assert_eq!(
            (v[0].high_watermark, v[0].log_end_offset),
            (3, 3),
            "via {a}"
        );
    }

    // Groups hash over the offsets partitions, so their coordinators are spread over
    // the brokers: one group per broker, each read and committed through `via`, each
    // described (with the lag of partitions its coordinator holds no replica of) and
    // all listed through any broker.
    let mut groups: Vec<(i64, String)> = Vec::new();
    for i in 0.. {
        let g = format!("g{i}");
        let c = group_coordinator(via, &g, 20, |_| true);
        if groups.iter().all(|(have, _)| *have != c) {
            groups.push((c, g));
        }
        if groups.len() == 3 {
            break;
        }
        assert!(
            i < 1000,
            "no group hashes to a partition led by each broker"
        );
    }
    for (_, g) in &groups {
        for (topic, n) in [("orders", "31"), ("single", "3")] {
            let read = ok(&sluice(
                via,
                &[
                    "consume",
                    topic,
                    "--group",
                    g,
                    "--from-beginning",
                    "--max-messages",
                    n,
                    "--timeout-ms",
                    "20000",
                ],
                "",
            ));
            assert_eq!(read.lines().count().to_string(), n, "group {g}");
        }
    }
    for (i, (_, g)) in groups.iter().enumerate() {
        let out = ok(&sluice(
            &addrs[i],
            &["--output", "json", "group", "describe", g],
            "",
        ));
        let d: serde_json::Value = serde_json::from_str(&out).expect("json");
        let sum = |field: &str| -> i64 {
            d["offsets"]
                .as_array()
                .expect("offsets")
                .iter()
                .filter_map(|o| o[field].as_i64())
                .sum()
        };
        assert_eq!(
            (sum("committed_offset"), sum("log_end_offset"), sum("lag")),
            (34, 34, 0),
            "group {g} committed everything it read: {d}"
        );
    }
    let listed = ok(&sluice(&addrs[2], &["group", "list"], ""));
    for (_, g) in &groups {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(g)),
            "{g} listed:\n{listed}"
        );
    }

    // The controller dies: a new one is elected and topic creation works again.
    let idx = (controller - 1) as usize;
    brokers[idx].take().expect("running").sigkill();
    let survivor = addrs[(idx + 1) % 3].clone();
    let alive: Vec<i64> = (1..=3).filter(|&id| id != controller).collect();
    wait_for(&survivor, &alive, Some(controller));
    sluice_ok(
        &survivor,
        &["topic", "create", "after-failover", "-p", "2", "-r", "2"],
    );
    assert_eq!(placement(&survivor, "after-failover").len(), 2);

    for b in brokers.into_iter().flatten() {
        assert!(b.sigterm(), "broker stops cleanly");
    }
}
