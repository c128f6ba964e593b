//! Consumer groups end to end: `sluice consume --group` processes sharing a topic, a
//! member SIGKILLed mid-stream, offsets across broker restarts, partitions added while
//! a group runs, and fencing.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_broker::group::offsets_partition;
use sluice_client::{
    Acks, Admin, ClientError, Consumer, ConsumerConfig, ErrorReason, NewTopic, OffsetReset,
    Producer, ProducerConfig, ProducerRecord,
};
use sluice_proto::v1::group_service_client::GroupServiceClient;
use sluice_proto::v1::{CommitOffsetsRequest, HeartbeatRequest, OffsetCommit};
use sluice_tests::binaries::binary;
use sluice_tests::broker::{BrokerProcess, InProcessBroker};
use sluice_tests::cli::{ok, sluice};
use sluice_tests::process::ChildProcess;

/// Short group timings, so membership changes show within seconds.
const FAST_GROUPS: [&str; 4] = [
    "--group-session-timeout-ms",
    "3000",
    "--group-heartbeat-interval-ms",
    "300",
];

fn describe(brokers: &str, group: &str) -> serde_json::Value {
    let text = ok(&sluice(
        brokers,
        &["group", "describe", group, "--output", "json"],
        "",
    ));
    serde_json::from_str(&text).expect("describe prints JSON")
}

/// Each member's current assignment as "topic-partition" strings.
fn assignments(d: &serde_json::Value) -> Vec<BTreeSet<String>> {
    d["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let mut set = BTreeSet::new();
                    for t in m["assignment"].as_array().into_iter().flatten() {
                        for p in t["partitions"].as_array().into_iter().flatten() {
                            set.insert(format!("{}-{}", t["topic"].as_str().unwrap_or(""), p));
                        }
                    }
                    set
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `members` members hold disjoint assignments covering `partitions`.
fn wait_for_split(brokers: &str, group: &str, members: usize, partitions: usize, sizes: &[usize]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = sluice(
            brokers,
            &["group", "describe", group, "--output", "json"],
            "",
        );
        if !out.status.success() {
            // Before the first member's heartbeat the group does not exist yet.
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("UNKNOWN_GROUP"), "describe failed: {err}");
            assert!(Instant::now() < deadline, "group {group} never appeared");
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let d: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let a = assignments(&d);
        let union: BTreeSet<&String> = a.iter().flatten().collect();
        let total: usize = a.iter().map(BTreeSet::len).sum();
        let mut got: Vec<usize> = a.iter().map(BTreeSet::len).collect();
        got.sort_unstable();
        if a.len() == members && union.len() == partitions && total == partitions && got == sizes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "group never split {partitions} partitions over {members} members as {sizes:?}: {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn consumer_process(brokers: &str, group: &str, topic: &str) -> ChildProcess {
    let mut cmd = Command::new(binary("sluice"));
    cmd.args([
        "consume",
        topic,
        "--group",
        group,
        "--from-beginning",
        "--output",
        "json",
    ])
    .env("SLUICE_BROKERS", brokers)
    .env("RUST_LOG", "error");
    ChildProcess::spawn(cmd).expect("spawn sluice consume")
}

fn produce_keyed(brokers: &str, topic: &str, from: usize, to: usize) {
    let lines: String = (from..to).map(|i| format!("k{i}:v{i}\n")).collect();
    ok(&sluice(
        brokers,
        &["produce", topic, "--acks", "all", "--key-separator", ":"],
        &lines,
    ));
}

/// Reads members' output until every value in `expected` was printed by one of them.
fn collect_until(
    members: &[&ChildProcess],
    seen: &mut BTreeSet<String>,
    expected: &BTreeSet<String>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !expected.is_subset(seen) {
        assert!(
            Instant::now() < deadline,
            "records never consumed: {:?}",
            expected.difference(seen).take(10).collect::<Vec<_>>()
        );
        for m in members {
            while let Some(line) = m.next_line(Duration::from_millis(20)) {
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON record");
                if let Some(value) = v["value"].as_str() {
                    seen.insert(value.to_string());
                }
            }
        }
    }
}

#[test]
fn three_cli_members_share_partitions_and_a_killed_members_move_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &FAST_GROUPS);
    let b = broker.address().to_string();
    ok(&sluice(
        &b,
        &["topic", "create", "events", "--partitions", "6"],
        "",
    ));
    produce_keyed(&b, "events", 0, 300);

    let mut members = vec![
        consumer_process(&b, "g", "events"),
        consumer_process(&b, "g", "events"),
        consumer_process(&b, "g", "events"),
    ];
    wait_for_split(&b, "g", 3, 6, &[2, 2, 2]);
    let mut seen = BTreeSet::new();
    let first: BTreeSet<String> = (0..300).map(|i| format!("v{i}")).collect();
    collect_until(&members.iter().collect::<Vec<_>>(), &mut seen, &first);

    // SIGKILL one member: no leave, no commit. Its partitions move once its session
    // (3 s here) runs out, and whatever it had not committed is read again.
    let mut killed = members.remove(0);
    killed.kill().expect("SIGKILL a member");
    produce_keyed(&b, "events", 300, 600);
    wait_for_split(&b, "g", 2, 6, &[3, 3]);
    let all: BTreeSet<String> = (0..600).map(|i| format!("v{i}")).collect();
    let mut after = BTreeSet::new();
    collect_until(
        &members.iter().collect::<Vec<_>>(),
        &mut after,
        &(300..600).map(|i| format!("v{i}")).collect(),
    );
    seen.extend(after);
    assert!(
        all.is_subset(&seen),
        "every record was consumed by some member"
    );

    // A clean stop commits and leaves: the group ends empty with no lag.
    for m in &mut members {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        let rc = unsafe { libc::kill(m.pid() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let status = m.wait(Duration::from_secs(20)).expect("member exits");
        assert!(status.success(), "member exited {status}");
    }
    let d = describe(&b, "g");
    assert_eq!(d["state"], "EMPTY", "{d}");
    let lag: i64 = d["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o["lag"].as_i64().unwrap_or(-1))
        .sum();
    assert_eq!(lag, 0, "everything committed on a clean stop: {d}");

    // Offsets can be moved only while nobody consumes.
    ok(&sluice(
        &b,
        &[
            "group",
            "reset-offsets",
            "g",
            "--topic",
            "events",
            "--to-earliest",
        ],
        "",
    ));
    let d = describe(&b, "g");
    let lag: i64 = d["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o["lag"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(lag, 600, "reset to the start: {d}");
    ok(&sluice(&b, &["group", "delete", "g"], ""));
    let out = sluice(&b, &["group", "describe", "g"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNKNOWN_GROUP"));
    assert!(broker.sigterm(), "broker stops cleanly");
}

fn consumer_config(addr: &str, group: &str) -> ConsumerConfig {
    ConsumerConfig {
        brokers: addr.to_string(),
        auto_offset_reset: OffsetReset::Earliest,
        group_id: Some(group.to_string()),
        ..ConsumerConfig::default()
    }
}

async fn poll_until(
    consumer: &mut Consumer,
    what: &str,
    mut done: impl FnMut(&[sluice_client::ConsumerRecord]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = consumer
            .poll(Duration::from_millis(200))
            .await
            .expect("poll");
        if done(&records) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

async fn produce(addr: &str, topic: &str, partition: Option<u32>, n: usize) {
    let producer = Producer::connect(ProducerConfig {
        brokers: addr.to_string(),
        acks: Acks::All,
        ..ProducerConfig::default()
    })
    .await
    .expect("producer");
    for i in 0..n {
        let mut r = ProducerRecord::new(topic, format!("v{i}")).key(format!("k{i}"));
        r.partition = partition;
        let _ = producer.send(r).await.expect("send");
    }
    producer.flush().await.expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_a_broker_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    Admin::connect(&addr)
        .await
        .expect("admin")
        .create_topic(NewTopic::new("ledger", 2))
        .await
        .expect("create");
    produce(&addr, "ledger", None, 50).await;
    let mut consumer = Consumer::connect(ConsumerConfig {
        enable_auto_commit: false,
        ..consumer_config(&addr, "auditors")
    })
    .await
    .expect("consumer");
    consumer.subscribe(["ledger"]).expect("subscribe");
    let mut count = 0;
    poll_until(&mut consumer, "50 records", |r| {
        count += r.len();
        count >= 50
    })
    .await;
    consumer.commit_sync().await.expect("commit");
    let before = Admin::connect(&addr)
        .await
        .expect("admin")
        .group_offsets("auditors")
        .await
        .expect("offsets");
    assert_eq!(before.iter().map(|(_, o)| o).sum::<u64>(), 50, "{before:?}");
    consumer.close().await.expect("close");
    broker.stop().await;

    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let admin = Admin::connect(&broker.address()).await.expect("admin");
    let after = admin.group_offsets("auditors").await.expect("offsets");
    assert_eq!(before, after);
    // A member of the restarted broker starts where the group left off: nothing again.
    let mut consumer = Consumer::connect(consumer_config(&broker.address(), "auditors"))
        .await
        .expect("consumer");
    consumer.subscribe(["ledger"]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let r = consumer
            .poll(Duration::from_millis(200))
            .await
            .expect("poll");
        assert!(
            r.is_empty(),
            "committed records were delivered again: {r:?}"
        );
    }
    consumer.close().await.expect("close");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_added_while_the_group_runs_is_picked_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |c| {
        c.group_heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("growing", 1))
        .await
        .expect("create");
    let mut consumer = Consumer::connect(consumer_config(&addr, "watchers"))
        .await
        .expect("consumer");
    let changes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen_changes = std::sync::Arc::clone(&changes);
    consumer.on_assignment_change(move |revoked, assigned| {
        if let Ok(mut c) = seen_changes.lock() {
            c.push((revoked.to_vec(), assigned.to_vec()));
        }
    });
    consumer.subscribe(["growing"]).expect("subscribe");
    produce(&addr, "growing", Some(0), 5).await;
    let mut n = 0;
    poll_until(&mut consumer, "the first records", |r| {
        n += r.len();
        n >= 5
    })
    .await;
    admin.create_partitions("growing", 3).await.expect("grow");
    produce(&addr, "growing", Some(2), 5).await;
    poll_until(&mut consumer, "a record from the new partition", |r| {
        r.iter().any(|r| r.partition == 2)
    })
    .await;
    let mut all: BTreeSet<(String, u32)> = BTreeSet::new();
    for (_, assigned) in changes.lock().expect("changes").iter() {
        all.extend(assigned.iter().cloned());
    }
    assert_eq!(
        all,
        (0..3).map(|p| ("growing".to_string(), p)).collect(),
        "the listener heard of every partition"
    );
    consumer.close().await.expect("close");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_members_are_fenced_and_bad_requests_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |c| {
        c.group_session_timeout = Duration::from_millis(600);
        c.group_heartbeat_interval = Duration::from_millis(100);
    })
    .await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("t", 2))
        .await
        .expect("create");
    let mut groups = GroupServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let join = |member_id: &str, epoch: i32, assignor: &str| HeartbeatRequest {
        group_id: "g".into(),
        member_id: member_id.into(),
        member_epoch: epoch,
        subscribed_topics: vec!["t".into()],
        assignor: assignor.into(),
        owned: vec![],
        subscribed_pattern: String::new(),
    };
    let first = groups
        .heartbeat(join("", 0, "range"))
        .await
        .expect("join")
        .into_inner();
    assert!(!first.member_id.is_empty());
    let assigned: BTreeMap<String, Vec<i32>> = first
        .assignment
        .iter()
        .map(|t| (t.topic.clone(), t.partitions.clone()))
        .collect();
    assert_eq!(
        assigned.get("t"),
        Some(&vec![0, 1]),
        "a lone member gets everything"
    );

    // Every member must ask for the same assignor.
    let err = ClientError::from(
        groups
            .heartbeat(join("", 0, "roundrobin"))
            .await
            .expect_err("mismatch"),
    );
    assert_eq!(err.reason(), Some(ErrorReason::InvalidRequest), "{err}");
    let err = ClientError::from(
        groups
            .heartbeat(join("", 0, "fastest"))
            .await
            .expect_err("unknown assignor"),
    );
    assert_eq!(err.reason(), Some(ErrorReason::InvalidRequest), "{err}");

    // Offsets cannot be set from outside, nor the group deleted, while it has members.
    let err = admin
        .set_group_offsets("g", &[(("t".into(), 0), 1)])
        .await
        .expect_err("busy");
    assert_eq!(err.reason(), Some(ErrorReason::InvalidRequest), "{err}");
    let err = admin.delete_group("g").await.expect_err("busy");
    assert_eq!(err.reason(), Some(ErrorReason::InvalidRequest), "{err}");

    // Silent past its session: removed, and then fenced on commit, fetch and heartbeat.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let commit = CommitOffsetsRequest {
        group_id: "g".into(),
        member_id: first.member_id.clone(),
        member_epoch: first.member_epoch,
        offsets: vec![OffsetCommit {
            topic: "t".into(),
            partition: 0,
            offset: 1,
            metadata: String::new(),
        }],
    };
    let err = ClientError::from(
        groups
            .commit_offsets(commit.clone())
            .await
            .expect_err("fenced"),
    );
    assert_eq!(err.reason(), Some(ErrorReason::Fenced), "{err}");
    let err = ClientError::from(
        groups
            .heartbeat(join(&first.member_id, first.member_epoch, "range"))
            .await
            .expect_err("fenced"),
    );
    assert_eq!(err.reason(), Some(ErrorReason::Fenced), "{err}");

    // A live member may not commit partitions it does not hold.
    let second = groups
        .heartbeat(join("", 0, "range"))
        .await
        .expect("join")
        .into_inner();
    let mut bad = commit.clone();
    bad.member_id = second.member_id.clone();
    bad.member_epoch = second.member_epoch;
    bad.offsets[0].partition = 7;
    let err = ClientError::from(groups.commit_offsets(bad).await.expect_err("not assigned"));
    assert_eq!(err.reason(), Some(ErrorReason::Fenced), "{err}");
    let mut huge = commit.clone();
    huge.member_id = String::new();
    huge.group_id = "elsewhere".into();
    huge.offsets[0].metadata = "m".repeat(5000);
    let err = ClientError::from(
        groups
            .commit_offsets(huge)
            .await
            .expect_err("too much metadata"),
    );
    assert_eq!(err.reason(), Some(ErrorReason::InvalidRequest), "{err}");
    assert!(
        admin.group_offsets("g").await.expect("offsets").is_empty(),
        "nothing was stored"
    );
    assert!(admin
        .group_offsets("elsewhere")
        .await
        .expect("offsets")
        .is_empty());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offsets_topic_is_compacted_and_idle_groups_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tweak = |c: &mut sluice_broker::BrokerConfig| {
        c.offsets_compact_after_records = 50;
        c.group_heartbeat_interval = Duration::from_millis(200);
    };
    let expiring = |c: &mut sluice_broker::BrokerConfig| {
        tweak(c);
        c.offsets_retention = Duration::from_secs(2);
    };
    let broker = InProcessBroker::start(dir.path(), tweak).await;
    let admin = Admin::connect(&broker.address()).await.expect("admin");
    admin
        .create_topic(NewTopic::new("t", 3))
        .await
        .expect("create");
    // 300 commits of 3 offsets: 900 records, of which 3 are live.
    for i in 0..300u64 {
        let offsets: Vec<((String, u32), u64)> = (0..3)
            .map(|p| (("t".to_string(), p), i + u64::from(p)))
            .collect();
        admin
            .set_group_offsets("busy", &offsets)
            .await
            .expect("commit");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = admin
            .describe_topic("__consumer_offsets")
            .await
            .expect("describe");
        let p = &d.partitions[offsets_partition("busy", d.partitions.len() as u32) as usize];
        if p.log_start_offset > 0 && p.log_end_offset - p.log_start_offset < 100 {
            break;
        }
        assert!(Instant::now() < deadline, "never compacted: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut expect: Vec<((String, u32), u64)> = (0..3)
        .map(|p| (("t".to_string(), p), 299 + u64::from(p)))
        .collect();
    expect.sort();
    let mut got = admin.group_offsets("busy").await.expect("offsets");
    got.sort();
    assert_eq!(got, expect, "compaction kept the latest offsets");
    broker.stop().await;

    // A restart replays the compacted topic to the same offsets.
    let broker = InProcessBroker::start(dir.path(), tweak).await;
    let admin = Admin::connect(&broker.address()).await.expect("admin");
    let mut got = admin.group_offsets("busy").await.expect("offsets");
    got.sort();
    assert_eq!(got, expect, "replayed after compaction");
    broker.stop().await;

    // With a short offsets.retention the group, empty all along, expires for good.
    let broker = InProcessBroker::start(dir.path(), expiring).await;
    let admin = Admin::connect(&broker.address()).await.expect("admin");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin.list_groups().await.expect("list").is_empty() {
        assert!(Instant::now() < deadline, "offsets never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.stop().await;
    let broker = InProcessBroker::start(dir.path(), |c| {
        c.offsets_retention = Duration::from_secs(3600)
    })
    .await;
    let admin = Admin::connect(&broker.address()).await.expect("admin");
    assert!(
        admin
            .group_offsets("busy")
            .await
            .expect("offsets")
            .is_empty(),
        "expiry is durable"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_member_takes_only_what_moves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |c| {
        c.group_heartbeat_interval = Duration::from_millis(100);
    })
    .await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("work", 6))
        .await
        .expect("create");
    let revoked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut first = Consumer::connect(consumer_config(&addr, "crew"))
        .await
        .expect("first");
    let log = std::sync::Arc::clone(&revoked);
    first.on_assignment_change(move |gone, _| {
        if let Ok(mut l) = log.lock() {
            l.extend(gone.iter().cloned());
        }
    });
    first.subscribe(["work"]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(20);
    while first.assignment().len() < 6 {
        assert!(
            Instant::now() < deadline,
            "the first member never got all six"
        );
        first.poll(Duration::from_millis(100)).await.expect("poll");
    }
    let kept_before: BTreeSet<(String, u32)> = first.assignment().into_iter().collect();

    let mut second = Consumer::connect(consumer_config(&addr, "crew"))
        .await
        .expect("second");
    second.subscribe(["work"]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(20);
    while first.assignment().len() != 3 || second.assignment().len() != 3 {
        assert!(
            Instant::now() < deadline,
            "the two members never split six partitions"
        );
        first.poll(Duration::from_millis(50)).await.expect("poll");
        second.poll(Duration::from_millis(50)).await.expect("poll");
    }
    let gone: BTreeSet<(String, u32)> = revoked.lock().expect("revoked").iter().cloned().collect();
    let kept: BTreeSet<(String, u32)> = first.assignment().into_iter().collect();
    assert_eq!(
        gone.len(),
        3,
        "only the partitions that moved were revoked: {gone:?}"
    );
    assert!(kept.is_subset(&kept_before) && kept.is_disjoint(&gone));
    let theirs: BTreeSet<(String, u32)> = second.assignment().into_iter().collect();
    assert_eq!(
        theirs, gone,
        "the newcomer got exactly what the first let go"
    );
    second.close().await.expect("close");
    first.close().await.expect("close");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_lets_go_is_removed_after_the_rebalance_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |c| {
        c.group_heartbeat_interval = Duration::from_millis(100);
        c.group_rebalance_timeout = Duration::from_millis(800);
    })
    .await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("t", 2))
        .await
        .expect("create");
    let mut groups = GroupServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let beat = |member_id: &str, epoch: i32, owned: Vec<i32>| HeartbeatRequest {
        group_id: "g".into(),
        member_id: member_id.into(),
        member_epoch: epoch,
        subscribed_topics: vec!["t".into()],
        assignor: "range".into(),
        owned: if owned.is_empty() {
            vec![]
        } else {
            vec![sluice_proto::v1::TopicPartitions {
                topic: "t".into(),
                partitions: owned,
            }]
        },
        subscribed_pattern: String::new(),
    };
    let stuck = groups
        .heartbeat(beat("", 0, vec![]))
        .await
        .expect("join")
        .into_inner();
    // The first member takes both partitions and keeps saying it owns them, heartbeat
    // after heartbeat, as a consumer whose application stopped polling would.
    let stuck = groups
        .heartbeat(beat(&stuck.member_id, stuck.member_epoch, vec![0, 1]))
        .await
        .expect("beat")
        .into_inner();
    let newcomer = groups
        .heartbeat(beat("", 0, vec![]))
        .await
        .expect("join")
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    let mut stuck_epoch = stuck.member_epoch;
    let mut newcomer_epoch = newcomer.member_epoch;
    let mut stuck_removed = false;
    while got.len() != 2 {
        assert!(
            Instant::now() < deadline,
            "the newcomer never got both partitions"
        );
        if !stuck_removed {
            match groups
                .heartbeat(beat(&stuck.member_id, stuck_epoch, vec![0, 1]))
                .await
            {
                Ok(r) => stuck_epoch = r.into_inner().member_epoch,
                Err(status) => {
                    assert_eq!(
                        ClientError::from(status).reason(),
                        Some(ErrorReason::Fenced)
                    );
                    stuck_removed = true;
                }
            }
        }
        let r = groups
            .heartbeat(beat(&newcomer.member_id, newcomer_epoch, got.clone()))
            .await
            .expect("beat")
            .into_inner();
        newcomer_epoch = r.member_epoch;
        got = r
            .assignment
            .iter()
            .flat_map(|t| t.partitions.clone())
            .collect();
        // While the stuck member claims both partitions the newcomer gets neither. The
        // coordinator's sweep may have removed it since its last heartbeat: then its
        // next one is fenced; an answer would mean both held the partitions.
        if !stuck_removed && !got.is_empty() {
            let status = groups
                .heartbeat(beat(&stuck.member_id, stuck_epoch, vec![0, 1]))
                .await
                .expect_err(&format!("given {got:?} while still held"));
            assert_eq!(
                ClientError::from(status).reason(),
                Some(ErrorReason::Fenced)
            );
            stuck_removed = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stuck_removed,
        "the stuck member was removed, not left holding partitions"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_subscription_follows_matching_topics_as_they_appear() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |c| {
        c.group_heartbeat_interval = Duration::from_millis(100);
    })
    .await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    for t in ["orders.eu", "orders.us", "other"] {
        admin
            .create_topic(NewTopic::new(t, 1))
            .await
            .expect("create");
        produce(&addr, t, Some(0), 3).await;
    }
    let mut consumer = Consumer::connect(consumer_config(&addr, "pattern"))
        .await
        .expect("consumer");
    consumer
        .subscribe_pattern(r"orders\..*")
        .expect("subscribe");
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    poll_until(&mut consumer, "both orders topics", |r| {
        for rec in r {
            *seen.entry(rec.topic.to_string()).or_default() += 1;
        }
        seen.values().sum::<usize>() >= 6
    })
    .await;
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["orders.eu", "orders.us"],
        "only matching topics"
    );
    // A topic created later that matches joins the subscription.
    admin
        .create_topic(NewTopic::new("orders.asia", 1))
        .await
        .expect("create");
    produce(&addr, "orders.asia", Some(0), 3).await;
    let mut asia = 0;
    poll_until(&mut consumer, "the new topic", |r| {
        asia += r.iter().filter(|rec| &*rec.topic == "orders.asia").count();
        asia == 3
    })
    .await;
    consumer.close().await.expect("close");

    // A pattern the broker cannot compile is an error, not a silent empty subscription.
    let mut bad = Consumer::connect(consumer_config(&addr, "bad-pattern"))
        .await
        .expect("consumer");
    bad.subscribe_pattern("orders(").expect("accepted locally");
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match bad.poll(Duration::from_millis(200)).await {
            Err(e) => break e,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "the bad pattern was never refused"
            ),
        }
    };
    assert_eq!(err.reason(), Some(ErrorReason::InvalidRequest), "{err}");
    broker.stop().await;
}
