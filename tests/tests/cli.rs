//! The built `sluice-broker` and `sluice` binaries as users run them: real processes,
//! real gRPC on 127.0.0.1, SIGKILL and SIGTERM.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_tests::binaries::binary;
use sluice_tests::broker::BrokerProcess;
use sluice_tests::cli::{ok, sluice};

#[test]
fn cli_round_trip_with_keys_json_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let b = broker.address().to_string();

    ok(&sluice(
        &b,
        &[
            "topic",
            "create",
            "events",
            "--partitions",
            "2",
            "--config",
            "retention.ms=2d",
        ],
        "",
    ));
    let listing = ok(&sluice(&b, &["topic", "list"], ""));
    assert!(
        listing.contains("events") && listing.contains("PARTITIONS"),
        "{listing}"
    );

    let input: String = (0..200)
        .map(|i| format!("user{}|event-{i}\n", i % 7))
        .collect();
    ok(&sluice(
        &b,
        &["produce", "events", "--key-separator", "|"],
        &input,
    ));
    let out = ok(&sluice(
        &b,
        &[
            "consume",
            "events",
            "--from-beginning",
            "--max-messages",
            "200",
            "--print-key",
            "--timeout-ms",
            "10000",
        ],
        "",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 200);
    // Per key, events come back in the order they were produced.
    for user in 0..7 {
        let key = format!("user{user}");
        let seq: Vec<u32> = lines
            .iter()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.trim_start_matches("event-").parse().expect("seq"))
            .collect();
        assert!(!seq.is_empty());
        assert!(seq.windows(2).all(|w| w[0] < w[1]), "{key}: {seq:?}");
    }

    let json = ok(&sluice(
        &b,
        &["--output", "json", "topic", "describe", "events"],
        "",
    ));
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    let hw: i64 = v["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["high_watermark"].as_i64().expect("hw"))
        .sum();
    assert_eq!(hw, 200);
    assert_eq!(v["configs"]["retention.ms"], "172800000");
    let table = ok(&sluice(&b, &["topic", "describe", "events"], ""));
    for col in [
        "LEADER",
        "EPOCH",
        "REPLICAS",
        "ISR",
        "LOG-START-OFFSET",
        "HIGH-WATERMARK",
    ] {
        assert!(table.contains(col), "{col} in {table}");
    }

    // --offset on one partition starts exactly there.
    let p0 = ok(&sluice(
        &b,
        &[
            "consume",
            "events",
            "--partition",
            "0",
            "--offset",
            "3",
            "--max-messages",
            "1",
            "--timeout-ms",
            "5000",
            "--output",
            "json",
        ],
        "",
    ));
    let rec: serde_json::Value = serde_json::from_str(p0.trim()).expect("json record");
    assert_eq!(rec["offset"], 3);

    // Failures: one line on stderr, non-zero exit.
    let dup = sluice(&b, &["topic", "create", "events"], "");
    assert!(!dup.status.success());
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(
        err.starts_with("sluice: ") && err.contains("TOPIC_EXISTS") && err.lines().count() == 1,
        "{err}"
    );
    let missing = sluice(&b, &["produce", "missing"], "x\n");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("UNKNOWN_TOPIC_OR_PARTITION"));
    let unreachable = sluice("127.0.0.1:1", &["topic", "list"], "");
    assert!(!unreachable.status.success());

    assert!(broker.sigterm(), "broker exits 0 on SIGTERM");
}

#[test]
fn acknowledged_records_survive_sigkill_and_sigterm_closes_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let b = broker.address().to_string();
    ok(&sluice(
        &b,
        &["topic", "create", "durable", "--partitions", "1"],
        "",
    ));
    let input: String = (0..5000).map(|i| format!("record-{i}\n")).collect();
    ok(&sluice(
        &b,
        &["produce", "durable", "--acks", "all"],
        &input,
    ));
    broker.sigkill();

    let broker = BrokerProcess::start(dir.path(), &[]);
    let b = broker.address().to_string();
    let out = ok(&sluice(
        &b,
        &[
            "consume",
            "durable",
            "--from-beginning",
            "--max-messages",
            "5000",
            "--timeout-ms",
            "10000",
        ],
        "",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5000);
    assert!(lines
        .iter()
        .enumerate()
        .all(|(i, l)| *l == format!("record-{i}")));

    let data_dir = broker.data_dir().to_path_buf();
    assert!(broker.sigterm(), "broker exits 0 on SIGTERM");
    assert!(
        data_dir.join("durable-0").join(".clean-shutdown").exists(),
        "SIGTERM closed the log cleanly"
    );
}

#[test]
fn consume_from_time_starts_at_the_first_later_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let b = broker.address().to_string();
    ok(&sluice(&b, &["topic", "create", "timed"], ""));
    ok(&sluice(&b, &["produce", "timed"], "old-1\nold-2\n"));
    std::thread::sleep(Duration::from_millis(50));
    let cut = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        .to_string();
    std::thread::sleep(Duration::from_millis(50));
    ok(&sluice(&b, &["produce", "timed"], "new-1\nnew-2\n"));
    let out = ok(&sluice(
        &b,
        &[
            "consume",
            "timed",
            "--from-time",
            &cut,
            "--timeout-ms",
            "2000",
        ],
        "",
    ));
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["new-1", "new-2"]);
    assert!(broker.sigterm());
}

#[test]
fn bench_produce_paces_groups_and_reads_every_record_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let b = broker.address().to_string();
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "--output",
            "json",
            "bench",
            "produce",
            "--topic",
            "loaded",
            "--records",
            "3000",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&sluice(&b, &args, ""))).expect("json")
    };
    // Paced at 20,000 a second: 3,000 records take about 150 ms, all acked, and the
    // reader sees every one of them.
    let paced = run(&[
        "--throughput",
        "20000",
        "--end-to-end",
        "--timeline-ms",
        "50",
    ]);
    assert_eq!(paced["records"], 3000, "{paced}");
    assert_eq!(paced["failed"], 0, "{paced}");
    assert_eq!(paced["end_to_end_ms"]["records"], 3000, "{paced}");
    let seconds = paced["seconds"].as_f64().expect("seconds");
    assert!(seconds >= 0.14, "paced to the rate: {paced}");
    // The timeline puts each record in the 50 ms window it was due in: 1,000 a window.
    let timeline = paced["timeline"].as_array().expect("timeline");
    let starts: Vec<f64> = timeline
        .iter()
        .map(|w| w["from_secs"].as_f64().expect("from"))
        .collect();
    assert_eq!(starts, vec![0.0, 0.05, 0.1], "{paced}");
    for w in timeline {
        assert_eq!(w["records"], 1000, "{paced}");
        assert_eq!(w["end_to_end"]["records"], 1000, "{paced}");
        assert!(w["p99"].as_f64() <= w["max"].as_f64(), "{paced}");
    }
    // With a warm-up of 50 ms at 20,000 a second the first 1,000 records go untimed,
    // by the producer and by the reader alike; all are still sent and read.
    let warmed = run(&[
        "--throughput",
        "20000",
        "--end-to-end",
        "--warmup-secs",
        "0.05",
    ]);
    assert_eq!(warmed["records"], 3000, "{warmed}");
    assert_eq!(warmed["latency_ms"]["records"], 2000, "{warmed}");
    assert_eq!(warmed["end_to_end_ms"]["read"], 3000, "{warmed}");
    assert_eq!(warmed["end_to_end_ms"]["records"], 2000, "{warmed}");
    // Waking every 20 ms or so, the pacer sends what fell due meanwhile together: every
    // record still goes, and each waited up to the gap, which its latency includes.
    let gapped = run(&["--throughput", "20000", "--wake-gap-us", "20000"]);
    assert_eq!(gapped["records"], 3000, "{gapped}");
    assert_eq!(gapped["failed"], 0, "{gapped}");
    let p50 = gapped["latency_ms"]["p50"].as_f64().expect("p50");
    assert!(p50 >= 5.0, "records wait for the pacer's wake: {gapped}");
    // In groups, flat out.
    let grouped = run(&["--send-many", "1000"]);
    assert_eq!(grouped["records"], 3000, "{grouped}");
    // Flat out one send at a time, with room for only a few batches so that sends wait:
    // every record is acknowledged, timed and read back, and carries a wall-clock
    // timestamp from the run (the tool stamps records from its own clock readings).
    let before_ms = now_ms();
    let flat = run(&[
        "--end-to-end",
        "--buffer-memory",
        "8192",
        "--batch-size",
        "2048",
    ]);
    let after_ms = now_ms();
    assert_eq!(flat["records"], 3000, "{flat}");
    assert_eq!(flat["failed"], 0, "{flat}");
    assert_eq!(flat["latency_ms"]["records"], 3000, "{flat}");
    assert_eq!(flat["end_to_end_ms"]["records"], 3000, "{flat}");
    let flat_records = ok(&sluice(
        &b,
        &[
            "--output",
            "json",
            "consume",
            "loaded",
            "--offset",
            "12000",
            "--max-messages",
            "3000",
            "--timeout-ms",
            "10000",
        ],
        "",
    ));
    let stamps: Vec<i64> = flat_records
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("record json");
            v["timestamp"].as_i64().expect("timestamp")
        })
        .collect();
    assert_eq!(stamps.len(), 3000);
    assert!(
        stamps.iter().all(|&t| (before_ms..=after_ms).contains(&t)),
        "timestamps within the run [{before_ms}, {after_ms}]: {:?}..{:?}",
        stamps.first(),
        stamps.last()
    );
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "in send order");
    let err = sluice(
        &b,
        &[
            "bench",
            "produce",
            "--topic",
            "loaded",
            "--record-size",
            "4",
            "--end-to-end",
        ],
        "",
    );
    assert!(
        !err.status.success(),
        "a record too small for its send time is refused"
    );
    assert!(broker.sigterm());
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The README's quick start, run as written with the built binaries first on PATH.
#[test]
fn readme_quick_start_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let start = readme
        .find("<!-- quick-start -->")
        .expect("quick-start marker");
    let end = readme
        .find("<!-- /quick-start -->")
        .expect("quick-start end marker");
    let block = &readme[start..end];
    let commands: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("sluice ") || l.starts_with("printf "))
        .collect();
    assert!(commands.len() >= 4, "quick start commands: {commands:?}");

    let dir = tempfile::tempdir().expect("tempdir");
    // `sluice-broker` with no arguments is the README's broker; only the port differs.
    let broker = BrokerProcess::start(&dir.path().join("data"), &[]);
    let bin_dir = binary("sluice").parent().expect("bin dir").to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut last = String::new();
    for cmd in commands {
        let out = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("PATH", &path)
            .env("SLUICE_BROKERS", broker.address())
            .current_dir(dir.path())
            .output()
            .expect("run");
        last = ok(&out);
    }
    assert!(broker.sigterm());
    assert!(!last.is_empty());
}
