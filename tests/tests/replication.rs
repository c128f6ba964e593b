//! Partition replication across three broker processes on 127.0.0.1, killed with
//! SIGKILL: followers copy their leader byte for byte, leave and rejoin the ISR through
//! the controller, and acks=all refuses to pretend when too few replicas are left.

use std::path::Path;
use std::time::Duration;

use sluice_tests::cli::{ok, sluice};
use sluice_tests::cluster::{
    describe, group_coordinator, wait_for_brokers, wait_partition, PartitionView, Quorum,
};

/// Lines `from..to`, one record each.
fn numbered(from: u32, to: u32) -> String {
    (from..to).map(|i| format!("r{i}\n")).collect()
}

/// The bytes of a replica's log segments, in order.
fn log_bytes(data_dir: &Path, topic: &str, p: u32) -> Vec<u8> {
    let dir = data_dir.join(format!("{topic}-{p}"));
    let mut segments: Vec<_> = std::fs::read_dir(&dir)
        .expect("partition folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    segments
        .iter()
        .flat_map(|s| std::fs::read(s).expect("segment"))
        .collect()
}

fn consume_all(addr: &str, topic: &str, n: usize) -> Vec<String> {
    let count = n.to_string();
    let out = ok(&sluice(
        addr,
        &[
            "consume",
            topic,
            "--from-beginning",
            "--max-messages",
            &count,
            "--timeout-ms",
            "10000",
        ],
        "",
    ));
    out.lines().map(str::to_string).collect()
}

#[test]
fn followers_copy_the_leader_leave_the_isr_and_rejoin_it() {
    let q = Quorum::new(&["--replica-lag-time-max-ms", "2000"]);
    let mut brokers = q.start_all();
    let placed = create_rf3(&q.addrs[0], "rep");
    assert_eq!(
        placed.isr,
        vec![1, 2, 3],
        "a new partition is in sync everywhere"
    );
    let leader = (placed.leader - 1) as usize;
    let lead = q.addrs[leader].clone();
    let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);

    // acks=all: answered only once every ISR member has the records.
    ok(&sluice(
        &lead,
        &["produce", "rep", "--acks", "all"],
        &numbered(0, 1000),
    ));
    let v = wait_partition(&[&lead], "rep", 0, 10, |v| v.high_watermark == 1000);
    assert_eq!(v.log_end_offset, 1000);

    // Test 3: a follower is SIGKILLed; the controller fences it out of the ISR, writes
    // go on with two in sync; restarted, it catches up and rejoins.
    brokers[f1].take().expect("running").sigkill();
    let shrunk = wait_partition(&[&lead], "rep", 0, 30, |v| v.isr.len() == 2);
    assert!(!shrunk.isr.contains(&((f1 + 1) as i64)), "{shrunk:?}");
    ok(&sluice(
        &lead,
        &["produce", "rep", "--acks", "all"],
        &numbered(1000, 2000),
    ));
    brokers[f1] = Some(q.start(f1));
    wait_partition(&[&lead], "rep", 0, 30, |v| v.isr == [1, 2, 3]);
    ok(&sluice(
        &lead,
        &["produce", "rep", "--acks", "all"],
        &numbered(2000, 3000),
    ));
    wait_partition(&[&lead], "rep", 0, 10, |v| v.high_watermark == 3000);
    // Any broker describes a partition with its leader's offsets.
    let via_follower = describe(&q.addrs[f2], "rep").expect("describe")[0].clone();
    assert_eq!(
        (via_follower.high_watermark, via_follower.log_end_offset),
        (3000, 3000)
    );
    // Every replica holds the same bytes: offsets, epochs and CRCs as the leader wrote.
    let want = log_bytes(&q.data_dir(leader), "rep", 0);
    for f in [f1, f2] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log_bytes(&q.data_dir(f), "rep", 0) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "replica on broker {} differs from the leader's",
                f + 1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let got = consume_all(&lead, "rep", 3000);
    assert_eq!(got.len(), 3000);
    assert!(got.iter().enumerate().all(|(i, l)| *l == format!("r{i}")));

    // Test 6: with only the leader left (the controller has no quorum either, so the
    // ISR cannot shrink), acks=all is refused with NOT_ENOUGH_REPLICAS once the
    // followers have been silent for replica.lag.time.max.ms, and nothing is written.
    brokers[f1].take().expect("running").sigkill();
    brokers[f2].take().expect("running").sigkill();
    std::thread::sleep(Duration::from_millis(2500));
    let before = describe(&lead, "rep").expect("describe")[0].clone();
    let refused = sluice(
        &lead,
        &["produce", "rep", "--acks", "all", "--retries", "0"],
        "lost\n",
    );
    assert!(!refused.status.success(), "acks=all with one replica left");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("NOT_ENOUGH_REPLICAS"), "{err}");
    let after = describe(&lead, "rep").expect("describe")[0].clone();
    assert_eq!(
        after.log_end_offset, before.log_end_offset,
        "nothing half-written"
    );
    assert_eq!(after.high_watermark, 3000);

    for b in brokers.into_iter().flatten() {
        b.sigkill();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Every replica's log of `topic`-0 is the same, byte for byte (bounded wait).
fn assert_identical(q: &Quorum, topic: &str) {
    assert_identical_on(q, topic, &[0, 1, 2]);
}

/// The logs of `topic`-0 on brokers `on` (indexes) are the same, byte for byte.
fn assert_identical_on(q: &Quorum, topic: &str, on: &[usize]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let logs: Vec<Vec<u8>> = on
            .iter()
            .map(|&i| log_bytes(&q.data_dir(i), topic, 0))
            .collect();
        if logs.iter().all(|l| *l == logs[0]) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replicas differ: sizes {:?}",
            logs.iter().map(Vec::len).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates `topic` with one partition, three replicas and min.insync.replicas=2, and
/// waits until all three are in sync.
fn create_rf3(addr: &str, topic: &str) -> PartitionView {
    ok(&sluice(
        addr,
        &[
            "topic",
            "create",
            topic,
            "-p",
            "1",
            "-r",
            "3",
            "--config",
            "min.insync.replicas=2",
        ],
        "",
    ));
    wait_partition(&[addr], topic, 0, 10, |v| v.leader > 0 && v.isr.len() == 3)
}

/// Test 1: acks=all records written while the partition leader is SIGKILLed are all
/// there after the failover, once each, at the offsets they were acknowledged at.
#[test]
fn acks_all_records_survive_the_leaders_loss() {
    use sluice_tests::history::{producer, read_all, send, History};
    let q = Quorum::new(&["--replica-lag-time-max-ms", "2000"]);
    let mut brokers = q.start_all();
    let leader = (create_rf3(&q.addrs[0], "hist").leader - 1) as usize;
    let rt = runtime();
    let history = History::default();
    let p = rt.block_on(producer(&q.bootstrap(), Duration::from_secs(60)));
    // About 2,000 records a second for 12 s; the leader dies 3 s in.
    let start = std::time::Instant::now();
    let mut waits = Vec::new();
    let mut killed_at = None;
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(12) {
        for _ in 0..20 {
            waits.push(rt.block_on(send(&history, &p, "hist", format!("h{i}"))));
            i += 1;
        }
        if killed_at.is_none() && start.elapsed() > Duration::from_secs(3) {
            brokers[leader].take().expect("running").sigkill();
            killed_at = Some(i as usize);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed_at = killed_at.expect("the leader was killed");
    rt.block_on(async {
        let all = futures_join(waits);
        tokio::time::timeout(Duration::from_secs(90), all)
            .await
            .expect("every send has an outcome within 90 s");
    });
    assert_eq!(history.open(), 0);
    let acked = history.acked();
    let acked_after = history.acked_since(killed_at);
    assert!(
        acked > (i as usize) / 2 && acked_after > 0,
        "most records are acknowledged, some sent after the leader died: {acked} of {i}, {acked_after} after"
    );
    let v = wait_partition(
        &[&q.addrs[(leader + 1) % 3], &q.addrs[(leader + 2) % 3]],
        "hist",
        0,
        30,
        |v| v.leader > 0 && v.leader != (leader + 1) as i64,
    );
    let new_leader = &q.addrs[(v.leader - 1) as usize];
    let log = rt.block_on(read_all(new_leader, "hist", 0));
    eprintln!(
        "{acked} of {i} sends acknowledged ({acked_after} sent after the leader died); the log holds {}",
        log.len()
    );
    let problems = history.check(&log);
    assert!(problems.is_empty(), "history check: {problems:?}");

    // Test 4 in passing: the old leader returns as a follower, cuts whatever tail it
    // had that was never committed, and ends byte-identical with the others.
    brokers[leader] = Some(q.start(leader));
    wait_partition(&[new_leader], "hist", 0, 30, |v| v.isr.len() == 3);
    assert_identical(&q, "hist");
    drop(p);
    for b in brokers.into_iter().flatten() {
        b.sigkill();
    }
}

async fn futures_join(waits: Vec<tokio::task::JoinHandle<()>>) {
    for w in waits {
        let _ = w.await;
    }
}

/// Tests 7 and 4: a leader holds records its stopped (SIGSTOP) followers never got:
/// consumers at the high watermark see nothing of them; after SIGCONT and a failover,
/// the old leader returns, cuts that tail, and every replica ends byte-identical with
/// no record that was not committed.
#[test]
fn an_uncommitted_tail_is_never_read_and_is_cut_after_failover() {
    use sluice_tests::history::read_all;
    let q = Quorum::new(&["--replica-lag-time-max-ms", "2000"]);
    let mut brokers = q.start_all();
    let leader = (create_rf3(&q.addrs[0], "tail").leader - 1) as usize;
    let lead = q.addrs[leader].clone();
    let followers = [(leader + 1) % 3, (leader + 2) % 3];
    ok(&sluice(
        &lead,
        &["produce", "tail", "--acks", "all"],
        &numbered(0, 100),
    ));
    let before = wait_partition(&[&lead], "tail", 0, 10, |v| v.high_watermark == 100);

    for f in followers {
        brokers[f].as_ref().expect("running").signal(libc::SIGSTOP);
    }
    // The followers' last fetches were already waiting at the leader: once those are
    // answered (empty, after at most 500 ms) no fetch can carry what comes next.
    std::thread::sleep(Duration::from_millis(1500));
    let tail: String = (0..50).map(|i| format!("uncommitted{i}\n")).collect();
    ok(&sluice(&lead, &["produce", "tail", "--acks", "1"], &tail));
    let held = describe(&lead, "tail").expect("describe")[0].clone();
    assert_eq!((held.high_watermark, held.log_end_offset), (100, 150));
    let rt = runtime();
    let seen = rt.block_on(read_all(&lead, "tail", 0));
    assert_eq!(seen.len(), 100, "consumers stop at the high watermark");
    assert!(seen.iter().all(|(_, v)| !v.starts_with("uncommitted")));

    brokers[leader].take().expect("running").sigkill();
    for f in followers {
        brokers[f].as_ref().expect("running").signal(libc::SIGCONT);
    }
    let live: Vec<&str> = followers.iter().map(|f| q.addrs[*f].as_str()).collect();
    let v = wait_partition(&live, "tail", 0, 40, |v| {
        v.leader > 0 && v.leader != (leader + 1) as i64 && v.epoch > before.epoch
    });
    let new_lead = q.addrs[(v.leader - 1) as usize].clone();
    ok(&sluice(
        &live.join(","),
        &["produce", "tail", "--acks", "all"],
        &numbered(100, 150),
    ));
    brokers[leader] = Some(q.start(leader));
    wait_partition(&[&new_lead], "tail", 0, 30, |v| {
        v.isr.len() == 3 && v.high_watermark == 150
    });
    assert_identical(&q, "tail");
    let log = rt.block_on(read_all(&new_lead, "tail", 0));
    let want: Vec<(u64, String)> = (0..150).map(|i| (i, format!("r{i}"))).collect();
    assert_eq!(log, want, "the committed records, and only they, in order");
    for b in brokers.into_iter().flatten() {
        b.sigkill();
    }
}

/// Tests 8 and 5: all three brokers SIGKILLed at once under acks=all load, then
/// restarted: topics, every acknowledged record and the group's committed offset are
/// back.
#[test]
fn the_whole_cluster_killed_at_once_keeps_what_it_acknowledged() {
    use sluice_tests::history::{producer, read_all, send, History};
    let q = Quorum::new(&[]);
    let mut brokers = q.start_all();
    let leader = (create_rf3(&q.addrs[0], "all").leader - 1) as usize;
    let lead = q.addrs[leader].clone();
    ok(&sluice(
        &lead,
        &["produce", "all", "--acks", "all"],
        &numbered(0, 10),
    ));
    // A group reads and commits (the consumer commits as it closes), through a broker
    // that need not be the group's coordinator.
    let read = ok(&sluice(
        &q.addrs[(leader + 1) % 3],
        &[
            "consume",
            "all",
            "--group",
            "g",
            "--from-beginning",
            "--max-messages",
            "10",
            "--timeout-ms",
            "20000",
        ],
        "",
    ));
    assert_eq!(read.lines().count(), 10);

    let rt = runtime();
    let history = History::default();
    // Nothing can be delivered once every broker is gone: give up soon.
    let p = rt.block_on(producer(&q.bootstrap(), Duration::from_secs(5)));
    let mut waits = Vec::new();
    for i in 0..5000 {
        waits.push(rt.block_on(send(&history, &p, "all", format!("load{i}"))));
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        if i == 3000 {
            for b in brokers.iter_mut() {
                b.take().expect("running").sigkill();
            }
            break;
        }
    }
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(90), futures_join(waits))
            .await
            .expect("every send has an outcome within 90 s");
    });
    drop(p);
    let acked = history.acked();
    assert!(acked > 0, "some records were acknowledged before the crash");

    brokers = (0..3).map(|i| Some(q.start(i))).collect();
    let v = wait_partition(&[&q.addrs[0]], "all", 0, 40, |v| v.leader > 0);
    let lead = q.addrs[(v.leader - 1) as usize].clone();
    // The high watermark is re-learned from the followers' fetches.
    wait_partition(&[&lead], "all", 0, 30, |v| {
        v.high_watermark == v.log_end_offset
    });
    let log = rt.block_on(read_all(&lead, "all", 0));
    assert_eq!(
        log[..10].iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        (0..10).map(|i| format!("r{i}")).collect::<Vec<_>>()
    );
    let problems = history.check(&log[10..]);
    assert!(problems.is_empty(), "history check: {problems:?}");
    eprintln!(
        "{acked} acknowledged before the crash; {} records back",
        log.len()
    );

    let committed = |via: &str| {
        let out = sluice(via, &["--output", "json", "group", "describe", "g"], "");
        if !out.status.success() {
            return None;
        }
        let g: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        g["offsets"][0]["committed_offset"].as_i64()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while committed(&q.addrs[leader]) != Some(10) {
        assert!(
            std::time::Instant::now() < deadline,
            "the group's committed offset never came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The coordinator is the leader of the offsets partition the group hashes to;
    // SIGKILL it and the group's offsets are still there, served by the replica that
    // takes over.
    let coordinator = (group_coordinator(&q.addrs[0], "g", 20, |v| v.isr.len() == 3) - 1) as usize;
    brokers[coordinator].take().expect("running").sigkill();
    let survivor = q.addrs[(coordinator + 1) % 3].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while committed(&survivor) != Some(10) {
        assert!(
            std::time::Instant::now() < deadline,
            "the group's offsets did not move with the coordinator"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for b in brokers.into_iter().flatten() {
        b.sigkill();
    }
}

/// No replica outside the ISR is elected unless the topic asks for unclean election;
/// once it does, the out-of-sync replica leads (losing what it never copied), and the
/// old leader, back, truncates to it. Five brokers, so the controller quorum outlives
/// both replicas of the partition.
#[test]
fn an_out_of_sync_replica_leads_only_with_unclean_election() {
    let q = Quorum::of(5, &[]);
    let mut brokers = q.start_all();
    ok(&sluice(
        &q.addrs[0],
        &["topic", "create", "u", "-p", "1", "-r", "2"],
        "",
    ));
    let v = wait_partition(&[&q.addrs[0]], "u", 0, 10, |v| {
        v.leader > 0 && v.isr.len() == 2
    });
    let leader = (v.leader - 1) as usize;
    let follower = (v
        .replicas
        .iter()
        .find(|&&r| r != v.leader)
        .expect("follower")
        - 1) as usize;
    let other = (0..5)
        .find(|i| *i != leader && *i != follower)
        .expect("a broker without a replica");
    let via = q.addrs[other].clone();
    ok(&sluice(
        &via,
        &["produce", "u", "--acks", "all"],
        &numbered(0, 10),
    ));
    wait_partition(&[&via], "u", 0, 10, |v| v.high_watermark == 10);

    // The follower dies and leaves the ISR; the leader alone takes five more.
    brokers[follower].take().expect("running").sigkill();
    wait_partition(&[&via], "u", 0, 20, |v| v.isr == vec![v.leader]);
    ok(&sluice(
        &via,
        &["produce", "u", "--acks", "1"],
        &numbered(10, 15),
    ));
    wait_partition(&[&via], "u", 0, 10, |v| v.high_watermark == 15);

    // The leader dies too, and the follower returns out of sync: no leader.
    brokers[leader].take().expect("running").sigkill();
    wait_partition(&[&via], "u", 0, 20, |v| v.leader <= 0);
    brokers[follower] = Some(q.start(follower));
    let alive: Vec<i64> = (1..=5).filter(|&id| id != v.leader).collect();
    wait_for_brokers(&via, &alive, Some(v.leader));
    // Several controller rounds pass (it checks every 250 ms) and the partition stays
    // offline.
    for _ in 0..10 {
        let now = describe(&via, "u").expect("describe");
        assert!(
            now[0].leader <= 0,
            "elected without unclean election: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let refused = sluice(
        &via,
        &[
            "produce",
            "u",
            "--acks",
            "1",
            "--delivery-timeout-ms",
            "2000",
        ],
        "lost\n",
    );
    assert!(
        !refused.status.success(),
        "a partition without a leader took a write"
    );

    // The topic allows unclean election: the returned follower leads in a new epoch,
    // without the five records it never copied.
    ok(&sluice(
        &via,
        &[
            "topic",
            "alter",
            "u",
            "-c",
            "unclean.leader.election.enable=true",
        ],
        "",
    ));
    let elected = wait_partition(&[&via], "u", 0, 20, |now| {
        now.leader == (follower + 1) as i64
    });
    assert!(elected.epoch > v.epoch, "{elected:?} after {v:?}");
    ok(&sluice(
        &via,
        &["produce", "u", "--acks", "1"],
        &numbered(20, 23),
    ));
    let want: Vec<String> = (0..10).chain(20..23).map(|i| format!("r{i}")).collect();
    assert_eq!(consume_all(&via, "u", want.len()), want);

    // The old leader returns as a follower: its five records go, the new ones come.
    brokers[leader] = Some(q.start(leader));
    wait_partition(&[&via], "u", 0, 30, |v| v.isr.len() == 2);
    assert_identical_on(&q, "u", &[leader, follower]);
    for b in brokers.into_iter().flatten() {
        b.sigkill();
    }
}

/// A broker away while one topic was deleted and another deleted and created again
/// drops its copies when it returns, and copies the new topic from scratch.
#[test]
fn a_returning_broker_drops_topics_deleted_while_it_was_away() {
    let q = Quorum::new(&[]);
    let mut brokers = q.start_all();
    for t in ["gone", "again"] {
        create_rf3(&q.addrs[0], t);
        ok(&sluice(
            &q.addrs[0],
            &["produce", t, "--acks", "all"],
            &numbered(0, 5),
        ));
        wait_partition(&[&q.addrs[0]], t, 0, 10, |v| v.high_watermark == 5);
    }
    let away = q.data_dir(2);
    assert!(away.join("gone-0").exists() && away.join("again-0").exists());

    brokers[2].take().expect("running").sigkill();
    wait_for_brokers(&q.addrs[0], &[1, 2], Some(3));
    for t in ["gone", "again"] {
        ok(&sluice(&q.addrs[0], &["topic", "delete", t], ""));
    }
    ok(&sluice(
        &q.addrs[0],
        &["topic", "create", "again", "-p", "1", "-r", "3"],
        "",
    ));
    wait_partition(&[&q.addrs[0]], "again", 0, 10, |v| v.leader > 0);
    ok(&sluice(
        &q.addrs[0],
        &["produce", "again", "--acks", "all"],
        &numbered(100, 103),
    ));

    brokers[2] = Some(q.start(2));
    wait_partition(&[&q.addrs[0]], "again", 0, 30, |v| v.isr.len() == 3);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while away.join("gone-0").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the returned broker kept a topic deleted while it was away"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_identical(&q, "again");
    let want: Vec<String> = (100..103).map(|i| format!("r{i}")).collect();
    assert_eq!(consume_all(&q.addrs[2], "again", 3), want);
    for b in brokers.into_iter().flatten() {
        b.sigkill();
    }
}

/// A group member whose first bootstrap broker, which also coordinates its group, is
/// SIGKILLed carries on through the other bootstrap brokers: it reads every record and
/// commits at the new coordinator when it stops.
#[test]
fn a_member_outlives_its_bootstrap_broker_and_coordinator() {
    use std::collections::BTreeSet;
    use std::process::Command;
    use std::time::Instant;

    use sluice_tests::binaries::binary;
    use sluice_tests::process::ChildProcess;

    let q = Quorum::new(&[]);
    let mut brokers = q.start_all();
    let v = create_rf3(&q.addrs[0], "feed");
    let lead = q.addrs[(v.leader - 1) as usize].clone();
    // A group coordinated by a broker that does not lead the data partition.
    let home_id = (1..=3).find(|id| *id != v.leader).expect("a follower");
    let group = (0..1000)
        .map(|i| format!("cg{i}"))
        .find(|g| group_coordinator(&q.addrs[0], g, 20, |_| true) == home_id)
        .expect("a group coordinated by the follower");
    let home = (home_id - 1) as usize;
    let mut bootstrap = vec![q.addrs[home].clone()];
    bootstrap.extend((0..3).filter(|i| *i != home).map(|i| q.addrs[i].clone()));

    let mut cmd = Command::new(binary("sluice"));
    cmd.args(["consume", "feed", "--group", &group, "--from-beginning"])
        .env("SLUICE_BROKERS", bootstrap.join(","))
        .env("RUST_LOG", "error");
    let mut consumer = ChildProcess::spawn(cmd).expect("spawn sluice consume");
    let mut seen = BTreeSet::new();
    let mut read_until = |n: u32, secs: u64| {
        let want: BTreeSet<String> = (0..n).map(|i| format!("r{i}")).collect();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !want.is_subset(&seen) {
            assert!(
                Instant::now() < deadline,
                "the member read {} of {n} records",
                want.intersection(&seen).count()
            );
            if let Some(line) = consumer.next_line(Duration::from_millis(200)) {
                seen.insert(line);
            }
        }
    };
    ok(&sluice(
        &lead,
        &["produce", "feed", "--acks", "all"],
        &numbered(0, 50),
    ));
    read_until(50, 30);

    brokers[home].take().expect("running").sigkill();
    ok(&sluice(
        &lead,
        &["produce", "feed", "--acks", "all"],
        &numbered(50, 100),
    ));
    read_until(100, 60);

    #[allow(unsafe_code)]
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    let rc = unsafe { libc::kill(consumer.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = consumer
        .wait(Duration::from_secs(30))
        .expect("consumer exits");
    assert!(status.success(), "the member closed cleanly: {status:?}");
    let out = ok(&sluice(
        &lead,
        &["--output", "json", "group", "describe", &group],
        "",
    ));
    let d: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        d["offsets"][0]["committed_offset"].as_i64(),
        Some(100),
        "committed at the new coordinator: {d}"
    );
    for b in brokers.into_iter().flatten() {
        b.sigkill();
    }
}
