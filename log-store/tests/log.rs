//! The partition log through its public API, on real files.
#![allow(clippy::field_reassign_with_default)]

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::time::Duration;

use common::{batch, sized_batch, small_config, values};
use sluice_log_store::log::CLEAN_SHUTDOWN_MARKER;
use sluice_log_store::{AppendOptions, BackgroundFlush, Error, FlushPolicy, Log, LogConfig};

fn opts() -> AppendOptions {
    AppendOptions::default()
}

#[test]
fn append_assigns_offsets_and_read_returns_whole_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), LogConfig::default()).expect("open");
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (0, 0));
    let a = log.append(&batch("a", 3, 100), opts()).expect("append");
    let b = log.append(&batch("b", 2, 200), opts()).expect("append");
    assert_eq!((a.base_offset, a.last_offset), (0, 2));
    assert_eq!((b.base_offset, b.last_offset), (3, 4));
    assert_eq!(log.log_end_offset(), 5);

    let all = log.read(0, 1 << 20).expect("read");
    let got = values(&all);
    assert_eq!(got.len(), 5);
    assert_eq!(got[3], (3, "b-0".to_string()));

    // An offset inside a batch returns that whole batch.
    let from_one = values(&log.read(1, 1 << 20).expect("read"));
    assert_eq!(from_one[0].0, 0);
    // max_bytes smaller than a batch still returns one whole batch.
    let one = values(&log.read(3, 1).expect("read"));
    assert_eq!(one, vec![(3, "b-0".into()), (4, "b-1".into())]);
    // Reading at the log end is empty, not an error.
    assert!(log.read(5, 100).expect("read").is_empty());
}

#[test]
fn out_of_range_reads_carry_both_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), LogConfig::default()).expect("open");
    log.append(&batch("a", 3, 1), opts()).expect("append");
    match log.read(4, 100) {
        Err(Error::OffsetOutOfRange {
            offset: 4,
            log_start_offset: 0,
            log_end_offset: 3,
        }) => {}
        other => panic!("expected out of range, got {other:?}"),
    }
}

#[test]
fn bad_batches_are_rejected_without_touching_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), LogConfig::default()).expect("open");
    log.append(&batch("ok", 2, 1), opts()).expect("append");
    let size = log.size_bytes();

    let mut flipped = batch("x", 2, 1).to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(matches!(
        log.append(&flipped, opts()),
        Err(Error::CrcMismatch { .. })
    ));
    let good = batch("x", 2, 1);
    assert!(matches!(
        log.append(&good[..good.len() - 3], opts()),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(log.append(&[1, 2, 3], opts()).is_err());

    let mut small = LogConfig::default();
    small.max_batch_bytes = 100;
    log.set_config(small).expect("config");
    assert!(matches!(
        log.append(&sized_batch(10, 100, 1), opts()),
        Err(Error::BatchTooLarge { .. })
    ));
    assert_eq!(log.size_bytes(), size);
    assert_eq!(log.log_end_offset(), 2);
    assert_eq!(values(&log.read(0, 1 << 20).expect("read")).len(), 2);
}

#[test]
fn rolls_on_size_and_reads_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for i in 0..100 {
        log.append(&batch(&format!("b{i}"), 5, i), opts())
            .expect("append");
    }
    assert!(log.segment_count() > 2, "{} segments", log.segment_count());
    for base in log.segment_base_offsets() {
        let name = format!("{base:020}.log");
        assert!(dir.path().join(&name).exists(), "{name}");
        assert!(dir.path().join(format!("{base:020}.index")).exists());
        assert!(dir.path().join(format!("{base:020}.timeindex")).exists());
    }
    // Every offset can be read, and the first record returned is the batch holding it.
    let mut offset = 0;
    let mut seen = 0;
    while offset < log.log_end_offset() {
        let got = values(&log.read(offset, 700).expect("read"));
        assert!(!got.is_empty());
        assert_eq!(got[0].0, offset);
        seen += got.len();
        offset = got.last().expect("nonempty").0 + 1;
    }
    assert_eq!(seen, 500);
    for probe in [0u64, 1, 4, 5, 123, 250, 499] {
        let got = values(&log.read(probe, 1).expect("read"));
        let first = got[0].0;
        assert!(
            first <= probe && probe < first + 5,
            "probe {probe} got {first}"
        );
        assert_eq!(
            got[(probe - first) as usize].1,
            format!("b{}-{}", probe / 5, probe % 5)
        );
    }
}

#[test]
fn read_bounded_never_passes_the_upper_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), LogConfig::default()).expect("open");
    for i in 0..4 {
        log.append(&batch(&format!("b{i}"), 2, 1), opts())
            .expect("append");
    }
    let got = values(&log.read_bounded(0, 1 << 20, 4).expect("read"));
    assert_eq!(got.last().expect("some").0, 3);
    assert!(log.read_bounded(4, 1 << 20, 4).expect("read").is_empty());
}

#[test]
fn the_tail_view_reads_what_the_log_reads_until_the_segment_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), LogConfig::default()).expect("open");
    assert_eq!(log.tail_view().read(0, 1 << 20, 0), None, "empty log");
    // Batches of ~17 KiB: several anchors, and offsets far enough back that they leave
    // the view.
    for i in 0..400 {
        log.append(&sized_batch(8, 2048, i), opts())
            .expect("append");
    }
    let end = log.log_end_offset();
    let view = log.tail_view();
    assert_eq!(view.end_offset(), end);
    let mut served = 0;
    for offset in (0..end).step_by(3) {
        for (max, upper) in [(1 << 20, end), (1, end), (40_000, end - 20)] {
            if let Some(got) = view.read(offset, max, upper) {
                let want = log.read_bounded(offset, max, upper).expect("read");
                assert_eq!(got, want, "offset {offset} max {max} upper {upper}");
                served += 1;
            }
        }
    }
    // The newest few MiB are served from the view, the oldest are not.
    assert!(view.read(0, 1 << 20, end).is_none());
    assert!(served > 300, "served {served}");
    // A roll or truncation empties the view: the segment it described changed.
    log.roll().expect("roll");
    assert_eq!(log.tail_view().read(end - 1, 1 << 20, end), None);
    log.append(&batch("after", 2, 1), opts()).expect("append");
    let after = log
        .tail_view()
        .read(end, 1 << 20, end + 2)
        .expect("new batch");
    assert_eq!(values(&after)[0], (end, "after-0".to_string()));
    log.truncate_to(end).expect("truncate");
    assert_eq!(log.tail_view().read(end, 1 << 20, end + 2), None);
    // A view taken before still reads what it saw.
    assert_eq!(
        values(&view.read(end - 8, 1 << 20, end).expect("old view")).len(),
        8
    );
}

#[test]
fn offset_for_timestamp_finds_the_first_record_at_or_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for i in 0..50 {
        log.append(&batch("t", 4, 1000 + i * 10), opts())
            .expect("append");
    }
    // Batch i holds timestamps 1000+10i .. 1000+10i+3 at offsets 4i .. 4i+3.
    assert_eq!(
        log.offset_for_timestamp(0).expect("lookup"),
        Some((0, 1000))
    );
    assert_eq!(
        log.offset_for_timestamp(1002).expect("lookup"),
        Some((2, 1002))
    );
    assert_eq!(
        log.offset_for_timestamp(1005).expect("lookup"),
        Some((4, 1010))
    );
    assert_eq!(
        log.offset_for_timestamp(1253).expect("lookup"),
        Some((103, 1253))
    );
    assert_eq!(
        log.offset_for_timestamp(1493).expect("lookup"),
        Some((199, 1493))
    );
    assert_eq!(log.offset_for_timestamp(1494).expect("lookup"), None);
    log.roll().expect("roll");
    drop(log);
    let log = Log::open(dir.path(), small_config()).expect("reopen");
    assert_eq!(
        log.offset_for_timestamp(1253).expect("lookup"),
        Some((103, 1253))
    );
}

#[test]
fn log_append_time_restamps_the_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), LogConfig::default()).expect("open");
    let info = log
        .append(
            &batch("a", 3, 5),
            AppendOptions {
                leader_epoch: 3,
                log_append_time: Some(777),
            },
        )
        .expect("append");
    assert_eq!(info.max_timestamp, 777);
    let bytes = log.read(0, 1 << 20).expect("read");
    let b = sluice_log_store::RecordBatch::new(bytes).expect("batch");
    assert!(b.crc_ok());
    assert_eq!(b.header().partition_leader_epoch, 3);
    assert!(b
        .records()
        .expect("records")
        .iter()
        .all(|r| r.timestamp == 777));
}

#[test]
fn retention_by_bytes_and_time_moves_the_log_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = small_config();
    config.retention_bytes = Some(8192);
    let mut log = Log::open(dir.path(), config).expect("open");
    for i in 0..200 {
        log.append(&batch("r", 5, i), opts()).expect("append");
    }
    let before = log.segment_count();
    let deleted = log.apply_retention(0).expect("retention");
    assert!(deleted > 0 && log.segment_count() == before - deleted);
    assert!(log.size_bytes() >= 8192 - 4096, "kept {}", log.size_bytes());
    let start = log.log_start_offset();
    assert!(start > 0);
    assert!(matches!(
        log.read(start - 1, 100),
        Err(Error::OffsetOutOfRange { .. })
    ));
    assert_eq!(values(&log.read(start, 100).expect("read"))[0].0, start);
    assert!(!dir.path().join(format!("{:020}.log", 0)).exists());

    let mut by_time = small_config();
    by_time.retention_ms = Some(1000);
    log.set_config(by_time).expect("config");
    // Records were stamped near time 0; "now" far later expires every sealed segment.
    log.apply_retention(10_000_000).expect("retention");
    assert_eq!(log.segment_count(), 1, "only the active segment stays");
    assert_eq!(log.log_start_offset(), log.segment_base_offsets()[0]);
}

#[test]
fn deleted_segments_are_removed_away_from_the_log_and_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = small_config();
    config.retention_bytes = Some(8192);
    let mut log = Log::open(dir.path(), config.clone()).expect("open");
    for i in 0..200 {
        log.append(&batch("r", 5, i), opts()).expect("append");
    }
    let deleted = log.apply_retention(0).expect("retention");
    assert!(deleted > 0);
    // The names are gone at once; the files follow on the remover's thread.
    assert!(!dir.path().join(format!("{:020}.log", 0)).exists());
    wait_until_none_end_with(dir.path(), ".deleted");
    let start = log.log_start_offset();
    let end = log.log_end_offset();
    drop(log);
    // A crash between the rename and the removal leaves files under the deleted names:
    // a reopen removes them and keeps the log as it was.
    for ext in ["log", "index", "timeindex"] {
        fs::write(
            dir.path().join(format!("{:020}.{ext}.deleted", 0)),
            b"left over",
        )
        .expect("write");
    }
    let log = Log::open(dir.path(), config).expect("reopen");
    assert_eq!(entries_ending(dir.path(), ".deleted"), 0);
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (start, end));
    assert_eq!(values(&log.read(start, 100).expect("read"))[0].0, start);
}

#[test]
fn a_deleted_partition_folder_goes_at_once_and_its_files_soon_after() {
    use sluice_log_store::manager::{LogManager, TopicPartition};
    let dir = tempfile::tempdir().expect("tempdir");
    let manager = LogManager::open(dir.path()).expect("open");
    let tp = TopicPartition::new("gone", 0);
    let mut log = manager.create(&tp, small_config()).expect("create");
    for i in 0..50 {
        log.append(&batch("r", 5, i), opts()).expect("append");
    }
    manager.delete(log).expect("delete");
    assert!(!manager.partition_dir(&tp).exists());
    assert!(manager.partitions().expect("partitions").is_empty());
    wait_until_none_end_with(dir.path(), "-delete");
    drop(manager);
    // A crash between the rename and the removal leaves the folder aside: opening the
    // data folder again removes it.
    let left = dir.path().join("gone-0.1-delete");
    fs::create_dir(&left).expect("mkdir");
    fs::write(left.join("00000000000000000000.log"), b"left over").expect("write");
    let _manager = LogManager::open(dir.path()).expect("reopen");
    assert_eq!(entries_ending(dir.path(), "-delete"), 0);
}

/// How many entries of `dir` have names ending in `suffix`.
fn entries_ending(dir: &std::path::Path, suffix: &str) -> usize {
    fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
        .count()
}

/// Waits (up to 10 s, then fails) until no entry of `dir` ends in `suffix`: what the
/// remover's thread takes away.
fn wait_until_none_end_with(dir: &std::path::Path, suffix: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while entries_ending(dir, suffix) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "entries ending in {suffix} still in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn rolls_on_age() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::default();
    config.segment_ms = Some(50);
    let mut log = Log::open(dir.path(), config).expect("open");
    log.append(&batch("a", 1, sluice_now()), opts())
        .expect("append");
    // `fits_active_segment` foresees the age roll as well as the size one.
    assert!(log.fits_active_segment(100));
    log.append(&batch("a", 1, sluice_now()), opts())
        .expect("append");
    assert_eq!(log.segment_count(), 1);
    std::thread::sleep(Duration::from_millis(80));
    assert!(!log.fits_active_segment(100));
    log.append(&batch("a", 1, sluice_now()), opts())
        .expect("append");
    assert_eq!(log.segment_count(), 2);
}

#[test]
fn fits_active_segment_says_beforehand_whether_an_append_rolls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    let mut rolls_seen = 0;
    for i in 0..100 {
        let b = batch(&format!("b{i}"), 5, i);
        let fits = log.fits_active_segment(b.len() as u64);
        let before = log.segment_count();
        log.append(&b, opts()).expect("append");
        let rolled = log.segment_count() > before;
        assert_eq!(fits, !rolled, "batch {i}: fits {fits}, rolled {rolled}");
        rolls_seen += usize::from(rolled);
    }
    assert!(rolls_seen >= 2, "{rolls_seen} rolls");
    // Rolls by age: `rolls_on_age`.
}

fn sluice_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[test]
fn truncate_to_drops_the_tail_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for i in 0..100 {
        log.append(&batch(&format!("b{i}"), 5, i), opts())
            .expect("append");
    }
    let segments = log.segment_count();
    // Offset 203 is inside batch 40 (200..204): the whole batch goes.
    assert_eq!(log.truncate_to(203).expect("truncate"), 200);
    assert_eq!(log.log_end_offset(), 200);
    assert!(log.segment_count() < segments);
    let got = values(&log.read(195, 1 << 20).expect("read"));
    assert_eq!(got.last().expect("some").0, 199);
    // Appends continue from the new end, and survive a reopen.
    let info = log.append(&batch("new", 2, 1), opts()).expect("append");
    assert_eq!(info.base_offset, 200);
    log.close().expect("close");
    let log = Log::open(dir.path(), small_config()).expect("reopen");
    assert_eq!(log.log_end_offset(), 202);
    assert_eq!(values(&log.read(200, 1 << 20).expect("read"))[0].1, "new-0");
    log.verify().expect("verify");
}

#[test]
fn truncate_under_a_reader_keeps_the_reader_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), LogConfig::default()).expect("open");
    for i in 0..10 {
        log.append(&batch(&format!("b{i}"), 3, i), opts())
            .expect("append");
    }
    let held = log.read(0, 1 << 20).expect("read");
    assert_eq!(log.truncate_to(6).expect("truncate"), 6);
    // The held slice still sees all ten batches, undamaged.
    let got = values(&held);
    assert_eq!(got.len(), 30);
    assert_eq!(got[29].1, "b9-2");
    log.append(&batch("after", 1, 1), opts()).expect("append");
    assert_eq!(values(&log.read(6, 1 << 20).expect("read"))[0].1, "after-0");
    log.verify().expect("verify");
}

#[test]
fn truncate_below_start_empties_and_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for i in 0..20 {
        log.append(&batch("x", 5, i), opts()).expect("append");
    }
    log.truncate_fully(1000).expect("truncate fully");
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (1000, 1000));
    let info = log.append(&batch("y", 1, 1), opts()).expect("append");
    assert_eq!(info.base_offset, 1000);
}

#[test]
fn append_replicated_keeps_offsets_and_checks_continuity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let mut leader = Log::open(leader_dir.path(), LogConfig::default()).expect("open");
    let mut follower = Log::open(dir.path(), LogConfig::default()).expect("open");
    for i in 0..3 {
        leader
            .append(
                &batch(&format!("l{i}"), 2, i),
                AppendOptions {
                    leader_epoch: 4,
                    log_append_time: None,
                },
            )
            .expect("append");
    }
    let all = leader.read(0, 1 << 20).expect("read");
    let batches: Vec<_> = sluice_log_store::BatchIter::new(all.clone())
        .collect::<Result<_, _>>()
        .expect("batches");
    assert!(matches!(
        follower.append_replicated(batches[1].bytes()),
        Err(Error::UnexpectedOffset {
            expected: 0,
            got: 2
        })
    ));
    for b in &batches {
        follower.append_replicated(b.bytes()).expect("replicate");
    }
    assert_eq!(follower.read(0, 1 << 20).expect("read"), all);
}

#[test]
fn clean_close_leaves_a_marker_and_reopen_trusts_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for i in 0..50 {
        log.append(&batch("c", 5, i), opts()).expect("append");
    }
    log.close().expect("close");
    assert!(dir.path().join(CLEAN_SHUTDOWN_MARKER).exists());
    let (log, report) = Log::open_with_report(dir.path(), small_config()).expect("reopen");
    assert!(report.clean);
    assert!(
        !dir.path().join(CLEAN_SHUTDOWN_MARKER).exists(),
        "marker is consumed"
    );
    assert_eq!(log.log_end_offset(), 250);
    assert_eq!(values(&log.read(123, 1).expect("read"))[0].0, 120);
    drop(log); // no close: the next open must recover
    let (log, report) = Log::open_with_report(dir.path(), small_config()).expect("reopen");
    assert!(!report.clean);
    assert!(report.truncation.is_none());
    assert_eq!(log.log_end_offset(), 250);
}

#[test]
fn flush_policies_move_the_recovery_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::default();
    config.flush = FlushPolicy::Os;
    let mut log = Log::open(dir.path(), config.clone()).expect("open");
    log.append(&batch("a", 2, 1), opts()).expect("append");
    assert_eq!(log.recovery_point(), 0);
    log.flush().expect("flush");
    assert_eq!(log.recovery_point(), 2);

    config.flush = FlushPolicy::EveryBatch;
    log.set_config(config.clone()).expect("config");
    log.append(&batch("b", 2, 1), opts()).expect("append");
    assert_eq!(log.recovery_point(), 4);

    config.flush = FlushPolicy::Interval(Duration::from_millis(30));
    log.set_config(config).expect("config");
    log.append_deferred(&batch("c", 2, 1), opts())
        .expect("append");
    std::thread::sleep(Duration::from_millis(40));
    log.apply_flush_policy().expect("flush");
    assert_eq!(log.recovery_point(), 6);
}

#[test]
fn interval_flushes_run_beside_appends_and_a_truncation_voids_one_in_flight() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::default();
    config.flush = FlushPolicy::Interval(Duration::from_millis(20));
    let mut log = Log::open(dir.path(), config).expect("open");
    log.flush_in_background();
    log.append_deferred(&batch("a", 2, 1), opts())
        .expect("append");
    std::thread::sleep(Duration::from_millis(30));
    // Due, but left to the owner: nothing is flushed in line.
    log.apply_flush_policy().expect("policy");
    assert_eq!(log.recovery_point(), 0);

    let flush = log
        .start_background_flush()
        .expect("start")
        .expect("a flush is due");
    assert!(
        log.start_background_flush().expect("start").is_none(),
        "one at a time"
    );
    // Appends go on while it runs; it covers only what was there when it began.
    log.append_deferred(&batch("b", 2, 1), opts())
        .expect("append");
    let done = std::thread::spawn(move || flush.run())
        .join()
        .expect("flush thread");
    log.finish_background_flush(done).expect("finish");
    assert_eq!(log.recovery_point(), 2);
    assert_eq!(log.log_end_offset(), 4);

    // A flush begun before a truncation does not vouch for the batches after it.
    std::thread::sleep(Duration::from_millis(30));
    let flush = log
        .start_background_flush()
        .expect("start")
        .expect("a flush is due");
    log.truncate_to(2).expect("truncate");
    log.append_deferred(&batch("c", 2, 1), opts())
        .expect("append");
    log.finish_background_flush(flush.run()).expect("finish");
    assert_eq!(log.recovery_point(), 2);
    let kept: Vec<String> = values(&log.read(0, 1 << 20).expect("read"))
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(kept, ["a-0", "a-1", "c-0", "c-1"]);
}

#[test]
fn every_batch_flushes_left_to_the_owner_cover_every_append_and_follow_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::default();
    config.flush = FlushPolicy::EveryBatch;
    let mut log = Log::open(dir.path(), config).expect("open");
    log.flush_in_background();
    // Nothing written: nothing to flush.
    assert!(log.start_background_flush().expect("start").is_none());
    log.append(&batch("a", 2, 1), opts()).expect("append");
    // Not in line: the append returns with nothing on disk for sure.
    assert_eq!(log.recovery_point(), 0);
    let flush = log
        .start_background_flush()
        .expect("start")
        .expect("due at once, with no interval to wait for");
    assert!(
        log.start_background_flush().expect("start").is_none(),
        "one at a time"
    );
    log.append(&batch("b", 3, 1), opts()).expect("append");
    log.finish_background_flush(flush.run()).expect("finish");
    assert_eq!(log.recovery_point(), 2, "only what was there when it began");
    // What came meanwhile is due next, straight away.
    let flush = log
        .start_background_flush()
        .expect("start")
        .expect("the appends made during the last flush");
    log.finish_background_flush(flush.run()).expect("finish");
    assert_eq!(log.recovery_point(), 5);
    assert!(log.start_background_flush().expect("start").is_none());
    // An owner that must know a write durable before answering flushes in line.
    log.append(&batch("c", 1, 1), opts()).expect("append");
    log.flush_if_behind().expect("flush");
    assert_eq!(log.recovery_point(), 6);
}

#[test]
fn an_every_batch_flush_goes_on_to_what_was_written_meanwhile_in_the_same_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::default();
    config.flush = FlushPolicy::EveryBatch;
    config.segment_bytes = 4096;
    let mut log = Log::open(dir.path(), config).expect("open");
    log.flush_in_background();
    log.append(&batch("a", 2, 1), opts()).expect("append");
    let flush = log.start_background_flush().expect("start").expect("due");
    log.append(&batch("b", 3, 1), opts()).expect("append");
    // Two rounds: what was there when it began, then what came meanwhile, each handed
    // back on its own.
    let mut done = Vec::new();
    flush.run_each(|d| done.push(d));
    assert_eq!(done.len(), 2);
    let mut done = done.into_iter();
    log.finish_background_flush(done.next().expect("first"))
        .expect("finish");
    assert_eq!(log.recovery_point(), 2);
    assert!(
        log.start_background_flush().expect("start").is_none(),
        "still running"
    );
    log.finish_background_flush(done.next().expect("second"))
        .expect("finish");
    assert_eq!(log.recovery_point(), 5);
    assert!(log.start_background_flush().expect("start").is_none());

    // A truncation meanwhile: one round, which vouches for nothing.
    log.append(&batch("c", 1, 1), opts()).expect("append");
    let flush = log.start_background_flush().expect("start").expect("due");
    log.truncate_to(5).expect("truncate");
    log.append(&batch("d", 2, 1), opts()).expect("append");
    assert_eq!(finish_rounds(&mut log, flush), 1);
    assert_eq!(log.recovery_point(), 5);
    // The next flush covers the batch written since.
    let flush = log.start_background_flush().expect("start").expect("due");
    finish_rounds(&mut log, flush);
    assert_eq!(log.recovery_point(), 7);

    // A new segment meanwhile: the flush's file is not where those appends went.
    log.append(&batch("e", 1, 1), opts()).expect("append");
    let flush = log.start_background_flush().expect("start").expect("due");
    let big = "x".repeat(3000);
    let before = log.segment_base_offsets().len();
    log.append(&batch(&big, 2, 1), opts()).expect("append");
    assert!(log.segment_base_offsets().len() > before, "rolled");
    assert_eq!(finish_rounds(&mut log, flush), 1, "stops at the roll");
    // The roll synced the segment it sealed; the new one waits for a flush of its own.
    assert_eq!(log.recovery_point(), 8);
    let flush = log.start_background_flush().expect("start").expect("due");
    finish_rounds(&mut log, flush);
    assert_eq!(log.recovery_point(), 10);

    // A topic that leaves every-batch: a flush running stops following the appends.
    log.append(&batch("f", 1, 1), opts()).expect("append");
    let flush = log.start_background_flush().expect("start").expect("due");
    let mut os = log.config().clone();
    os.flush = FlushPolicy::Os;
    log.set_config(os).expect("config");
    log.append(&batch("g", 1, 1), opts()).expect("append");
    assert_eq!(finish_rounds(&mut log, flush), 1);
}

/// Runs `flush` to its end and hands every round back to `log`; how many rounds it took.
fn finish_rounds(log: &mut Log, flush: BackgroundFlush) -> usize {
    let mut done = Vec::new();
    flush.run_each(|d| done.push(d));
    let rounds = done.len();
    for d in done {
        log.finish_background_flush(d).expect("finish");
    }
    rounds
}

#[test]
fn a_second_every_batch_flush_runs_beside_the_first_for_appends_it_does_not_cover() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::default();
    config.flush = FlushPolicy::EveryBatch;
    let mut log = Log::open(dir.path(), config).expect("open");
    log.flush_in_background();
    log.append(&batch("a", 2, 1), opts()).expect("append");
    let first = log.start_background_flush().expect("start").expect("due");
    assert!(
        log.start_background_flush().expect("start").is_none(),
        "the running one covers every append"
    );
    log.append(&batch("b", 3, 1), opts()).expect("append");
    let second = log
        .start_background_flush()
        .expect("start")
        .expect("a second beside the first");
    log.append(&batch("c", 1, 1), opts()).expect("append");
    assert!(
        log.start_background_flush().expect("start").is_none(),
        "two at once at most"
    );
    // The second ends first, and goes on to the append that came meanwhile: an fsync
    // covers whatever was written before it began, whichever ends first.
    assert_eq!(finish_rounds(&mut log, second), 2);
    assert_eq!(log.recovery_point(), 6);
    // The first finds nothing left that the second did not take.
    assert_eq!(finish_rounds(&mut log, first), 1);
    assert_eq!(
        log.recovery_point(),
        6,
        "an earlier end does not move it back"
    );
    assert!(log.start_background_flush().expect("start").is_none());
    log.append(&batch("d", 1, 1), opts()).expect("append");
    let next = log.start_background_flush().expect("start").expect("due");
    finish_rounds(&mut log, next);
    assert_eq!(log.recovery_point(), 7);
}

#[test]
fn early_writeback_under_the_interval_policy_is_not_a_flush() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::default();
    config.flush = FlushPolicy::Interval(Duration::from_secs(3600));
    let mut log = Log::open(dir.path(), config).expect("open");
    // Well past the 1 MiB after which writeback of the tail is started.
    let mut appended = 0;
    while log.size_bytes() < 10 << 20 {
        log.append_deferred(&sized_batch(64, 1024, appended), opts())
            .expect("append");
        appended += 64;
        log.apply_flush_policy().expect("policy");
    }
    // Writeback was only started: the recovery point still says nothing is on disk.
    assert_eq!(log.recovery_point(), 0);
    assert_eq!(log.log_end_offset(), appended as u64);
    assert_eq!(log.verify().expect("verify") as i64, appended / 64);
}

#[test]
fn with_flushes_in_the_background_early_writeback_is_handed_to_the_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = LogConfig::default();
    config.flush = FlushPolicy::Interval(Duration::from_secs(3600));
    let mut log = Log::open(dir.path(), config.clone()).expect("open");
    log.flush_in_background();
    let mut appended = 0;
    let mut jobs = 0u64;
    // A job once at least 1 MiB of new tail has gathered, and not before.
    while log.size_bytes() < 8 << 20 {
        log.append_deferred(&sized_batch(64, 1024, appended), opts())
            .expect("append");
        appended += 64;
        log.apply_flush_policy().expect("policy");
        if let Some(writeback) = log.take_writeback() {
            jobs += 1;
            std::thread::spawn(move || writeback.run())
                .join()
                .expect("writeback thread");
        }
    }
    let mib = log.size_bytes() >> 20;
    assert!(jobs <= mib && jobs >= mib / 2, "{jobs} jobs for {mib} MiB");
    assert!(log.take_writeback().is_none(), "nothing new since the last");
    assert_eq!(log.recovery_point(), 0, "writeback is not a flush");

    // Under `os` the kernel alone decides.
    let dir = tempfile::tempdir().expect("tempdir");
    config.flush = FlushPolicy::Os;
    let mut log = Log::open(dir.path(), config).expect("open");
    log.flush_in_background();
    while log.size_bytes() < 10 << 20 {
        log.append_deferred(&sized_batch(64, 1024, appended), opts())
            .expect("append");
        appended += 64;
    }
    assert!(log.take_writeback().is_none());
}

fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    segment_files(dir).pop().expect("a segment")
}

/// The log files of the segments in `dir`, oldest first.
fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> = fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs
}

/// Writes `n` batches of 3 records and returns the byte size after each one.
fn fill(dir: &std::path::Path, n: usize) -> Vec<u64> {
    let mut log = Log::open(dir, LogConfig::default()).expect("open");
    let mut sizes = Vec::new();
    for i in 0..n {
        log.append(&batch(&format!("t{i}"), 3, i as i64), opts())
            .expect("append");
        sizes.push(log.size_bytes());
    }
    sizes
}

#[test]
fn torn_tail_cut_at_every_kind_of_byte_recovers_the_valid_prefix() {
    let src = tempfile::tempdir().expect("tempdir");
    let sizes = fill(src.path(), 20);
    let full = fs::read(last_segment(src.path())).expect("read");
    // Cut at a spread of positions: inside headers, inside records, at boundaries.
    let cuts: Vec<u64> = (0..full.len() as u64)
        .step_by(7)
        .chain([full.len() as u64 - 1])
        .collect();
    for cut in cuts {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = dir.path().join(format!("{:020}.log", 0));
        fs::write(&seg, &full[..cut as usize]).expect("write");
        let (log, report) = Log::open_with_report(dir.path(), LogConfig::default()).expect("open");
        let whole = sizes.iter().take_while(|&&s| s <= cut).count();
        assert_eq!(log.log_end_offset(), whole as u64 * 3, "cut at {cut}");
        let expect_valid = if whole == 0 { 0 } else { sizes[whole - 1] };
        assert_eq!(
            fs::metadata(&seg).expect("meta").len(),
            expect_valid,
            "cut at {cut}"
        );
        assert_eq!(
            report.truncation.is_some(),
            cut != expect_valid,
            "cut at {cut}"
        );
        log.verify().expect("verify");
    }
}

#[test]
fn garbage_appended_is_cut_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sizes = fill(dir.path(), 10);
    let seg = last_segment(dir.path());
    for garbage in [
        vec![0u8; 100],
        vec![0xffu8; 7],
        (0..=255u8).collect::<Vec<_>>(),
    ] {
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .and_then(|mut f| f.write_all(&garbage))
            .expect("append garbage");
        let (log, report) = Log::open_with_report(dir.path(), LogConfig::default()).expect("open");
        assert_eq!(log.log_end_offset(), 30);
        assert_eq!(fs::metadata(&seg).expect("meta").len(), sizes[9]);
        assert!(report.truncation.is_some());
    }
}

#[test]
fn flipped_bit_in_the_tail_cuts_from_that_batch() {
    let src = tempfile::tempdir().expect("tempdir");
    let sizes = fill(src.path(), 10);
    let full = fs::read(last_segment(src.path())).expect("read");
    for (victim, offset_in_batch) in [(0usize, 30u64), (4, 20), (9, 61), (9, 5)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let seg = dir.path().join(format!("{:020}.log", 0));
        let mut bytes = full.clone();
        let start = if victim == 0 { 0 } else { sizes[victim - 1] };
        bytes[(start + offset_in_batch) as usize] ^= 0x04;
        fs::write(&seg, &bytes).expect("write");
        let log = Log::open(dir.path(), LogConfig::default()).expect("open");
        assert_eq!(log.log_end_offset(), victim as u64 * 3, "victim {victim}");
        assert_eq!(fs::metadata(&seg).expect("meta").len(), start);
    }
}

#[test]
fn corrupt_sealed_segment_is_reported_with_file_and_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for i in 0..40 {
        log.append(&batch("s", 5, i), opts()).expect("append");
    }
    log.close().expect("close");
    let first = dir.path().join(format!("{:020}.log", 0));
    let mut bytes = fs::read(&first).expect("read");
    let len = bytes.len();
    bytes[len - 10] ^= 0xff; // inside the last batch, past the last index entry
    fs::write(&first, &bytes).expect("write");
    match Log::open(dir.path(), small_config()) {
        Err(Error::CorruptSegment { path, position, .. }) => {
            assert_eq!(path, first);
            assert!(position > 0 && position < len as u64);
        }
        other => panic!("expected a corrupt-segment error, got {other:?}"),
    }
    // The bytes are still there: nothing was silently cut.
    assert_eq!(fs::read(&first).expect("read").len(), len);
}

#[test]
fn missing_index_of_a_sealed_segment_is_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for i in 0..40 {
        log.append(&batch("i", 5, i), opts()).expect("append");
    }
    log.close().expect("close");
    fs::remove_file(dir.path().join(format!("{:020}.index", 0))).expect("rm");
    fs::write(dir.path().join(format!("{:020}.timeindex", 0)), [1, 2, 3]).expect("garble");
    let log = Log::open(dir.path(), small_config()).expect("open");
    for probe in [0u64, 3, 7, 11] {
        let got = values(&log.read(probe, 1).expect("read"));
        assert!(got[0].0 <= probe && probe < got[0].0 + 5);
    }
    assert_eq!(log.offset_for_timestamp(3).expect("lookup"), Some((3, 3)));
}

#[test]
fn deleting_before_an_offset_drops_whole_sealed_segments_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for i in 0..200 {
        log.append(&batch("d", 5, i), opts()).expect("append");
    }
    let bases = log.segment_base_offsets();
    assert!(bases.len() > 3, "several segments: {bases:?}");
    // An offset inside the third segment: the first two go, the third stays.
    let cut = bases[2] + 1;
    assert_eq!(log.delete_segments_before(cut).expect("delete"), 2);
    assert_eq!(log.log_start_offset(), bases[2]);
    assert_eq!(
        values(&log.read(bases[2], 100).expect("read"))[0].0,
        bases[2]
    );
    // Past the end: every sealed segment goes, the active one stays.
    let end = log.log_end_offset();
    log.delete_segments_before(u64::MAX).expect("delete");
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.log_end_offset(), end);
    drop(log);
    let log = Log::open(dir.path(), small_config()).expect("reopen");
    assert_eq!(log.log_end_offset(), end, "survives a reopen");
}

fn with_epoch(epoch: i32) -> AppendOptions {
    AppendOptions {
        leader_epoch: epoch,
        ..AppendOptions::default()
    }
}

#[test]
fn the_leader_epoch_history_follows_appends_truncation_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = Log::open(dir.path(), small_config()).expect("open");
    for (i, epoch) in [0, 0, 1, 1, 1, 4].into_iter().enumerate() {
        log.append(&batch("e", 5, i as i64), with_epoch(epoch))
            .expect("append");
    }
    let starts: Vec<(i32, u64)> = log
        .epoch_history()
        .entries()
        .iter()
        .map(|e| (e.epoch, e.start_offset))
        .collect();
    assert_eq!(starts, [(0, 0), (1, 10), (4, 25)]);
    assert_eq!(log.end_offset_for_epoch(4), Some((4, 30)));
    assert_eq!(
        log.end_offset_for_epoch(3),
        Some((1, 25)),
        "epoch 3 never wrote"
    );
    // The batches carry their epoch, so a stale leader's epoch is visible on disk too.
    let first = sluice_log_store::BatchIter::new(log.read(25, 1).expect("read"))
        .next()
        .expect("batch")
        .expect("valid");
    assert_eq!(first.header().partition_leader_epoch, 4);

    // A divergent tail cut off: its epoch goes with it, and stays gone after a reopen.
    log.truncate_to(25).expect("truncate");
    assert_eq!(log.end_offset_for_epoch(4), Some((1, 25)));
    log.close().expect("close");
    let mut log = Log::open(dir.path(), small_config()).expect("reopen");
    assert_eq!(log.epoch_history().latest_epoch(), Some(1));

    // A follower's copy keeps the leader's epochs.
    let mut replica =
        sluice_log_store::RecordBatchBuilder::new(sluice_log_store::Compression::None);
    replica.append(1, None, Some(b"r"), &[]);
    let mut bytes = replica.build().expect("build").to_vec();
    sluice_log_store::batch::set_base_offset(&mut bytes, 25);
    sluice_log_store::batch::set_partition_leader_epoch(&mut bytes, 6);
    log.append_replicated(&bytes).expect("replicated");
    assert_eq!(log.end_offset_for_epoch(6), Some((6, 26)));
    drop(log);

    // A damaged checkpoint is rebuilt from the batches, not trusted and not fatal.
    fs::write(
        dir.path().join(sluice_log_store::epochs::CHECKPOINT_FILE),
        "garbage",
    )
    .expect("damage");
    let log = Log::open(dir.path(), small_config()).expect("reopen");
    let rebuilt: Vec<(i32, u64)> = log
        .epoch_history()
        .entries()
        .iter()
        .map(|e| (e.epoch, e.start_offset))
        .collect();
    assert_eq!(rebuilt, [(0, 0), (1, 10), (6, 25)]);
    drop(log);

    // An epoch recorded just before a crash lost its batch lies past the log end: the
    // next open drops it.
    fs::write(
        dir.path().join(sluice_log_store::epochs::CHECKPOINT_FILE),
        "0\n3\n0 0\n6 25\n9 26\n",
    )
    .expect("write");
    let log = Log::open(dir.path(), small_config()).expect("reopen");
    assert_eq!(log.epoch_history().latest_epoch(), Some(6));
}

/// A log whose owner runs its flushes, under `flush.policy=os`, with small segments.
fn owned_os_log(dir: &std::path::Path) -> Log {
    let mut config = small_config();
    config.flush = FlushPolicy::Os;
    let mut log = Log::open(dir, config).expect("open");
    log.flush_in_background();
    log
}

/// Appends batches of 4 records tagged `t0`, `t1`, ... until the log has `segments`
/// segments; returns how many batches went in.
fn fill_segments(log: &mut Log, segments: usize) -> usize {
    let mut n = 0;
    while log.segment_count() < segments {
        log.append(&batch(&format!("t{n}"), 4, n as i64), opts())
            .expect("append");
        n += 1;
    }
    n
}

#[test]
fn a_sealed_segment_of_several_writeback_chunks_is_synced_whole() {
    // The sealing fsync writes a segment back 8 MiB at a time: a segment of two chunks
    // and a part of a third must come out whole, and count as on disk only after.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_bytes: (16 << 20) + (300 << 10),
        flush: FlushPolicy::Os,
        retention_ms: None,
        ..LogConfig::default()
    };
    let mut log = Log::open(dir.path(), config.clone()).expect("open");
    log.flush_in_background();
    let (mut appended, mut batches) = (0u64, 0u64);
    while log.segment_count() < 2 {
        log.append(&sized_batch(64, 1000, appended as i64), opts())
            .expect("append");
        appended += 64;
        batches += 1;
    }
    let sealed_end = log.segment_base_offsets()[1];
    assert!(log.size_bytes() > 16 << 20, "{}", log.size_bytes());
    assert_eq!(log.recovery_point(), 0);
    let job = log
        .start_background_flush()
        .expect("start")
        .expect("the sealed segment's fsync is due");
    log.finish_background_flush(job.run()).expect("finish");
    assert_eq!(log.recovery_point(), sealed_end);
    assert_eq!(log.verify().expect("verify"), batches);
    log.close().expect("close");

    let log = Log::open(dir.path(), config).expect("reopen");
    assert_eq!(log.log_end_offset(), appended);
    for from in [0, sealed_end - 1] {
        let got = values(&log.read(from, 1 << 20).expect("read"));
        let first = got.first().expect("a record");
        assert_eq!(first.0, from - from % 64);
        assert_eq!(first.1, "v".repeat(1000));
    }
}

#[test]
fn a_roll_leaves_the_sealing_fsync_to_the_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = owned_os_log(dir.path());
    fill_segments(&mut log, 2);
    let sealed_end = log.segment_base_offsets()[1];
    // The full segment is sealed but not yet known to be on disk.
    assert_eq!(log.recovery_point(), 0);
    let job = log
        .start_background_flush()
        .expect("start")
        .expect("the sealed segment's fsync is due at once, under `os` too");
    assert!(
        log.start_background_flush().expect("start").is_none(),
        "one at a time"
    );
    log.finish_background_flush(job.run()).expect("finish");
    assert_eq!(log.recovery_point(), sealed_end);
    assert!(
        log.start_background_flush().expect("start").is_none(),
        "nothing else is due under `os`"
    );

    // A second roll before the first's fsync ran syncs the first in line: never more
    // than one sealed segment waits.
    fill_segments(&mut log, 3);
    fill_segments(&mut log, 4);
    let bases = log.segment_base_offsets();
    assert!(log.recovery_point() >= bases[2], "{bases:?}");
    assert_eq!(
        log.verify().expect("verify") as usize,
        log.log_end_offset() as usize / 4
    );
}

#[test]
fn after_a_crash_the_segment_sealed_without_its_fsync_is_recovered_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = owned_os_log(dir.path());
    let batches = fill_segments(&mut log, 3);
    let end = log.log_end_offset();
    assert_eq!(end as usize, batches * 4);
    // A crash: no close, and the owner never ran the fsync.
    drop(log);

    let (mut log, report) = Log::open_with_report(dir.path(), small_config()).expect("reopen");
    assert!(!report.clean);
    assert!(report.truncation.is_none(), "nothing was damaged");
    assert_eq!(log.log_end_offset(), end);
    assert_eq!(log.segment_count(), 3);
    let got = values(&log.read(0, 1 << 20).expect("read"));
    assert_eq!(got[0], (0, "t0-0".to_string()));
    let info = log.append(&batch("after", 1, 0), opts()).expect("append");
    assert_eq!(info.base_offset, end);
    assert_eq!(log.verify().expect("verify") as usize, batches + 1);
}

#[test]
fn a_segment_that_lost_its_tail_before_its_fsync_drops_the_one_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut log = owned_os_log(dir.path());
    fill_segments(&mut log, 3);
    let bases = log.segment_base_offsets();
    drop(log);
    // The segment before the last lost the end of its pages in the crash.
    let path = dir.path().join(format!("{:020}.log", bases[1]));
    let len = fs::metadata(&path).expect("metadata").len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(len / 2))
        .expect("cut");

    let (mut log, report) = Log::open_with_report(dir.path(), small_config()).expect("reopen");
    let truncation = report.truncation.expect("the cut segment is reported");
    assert_eq!(truncation.path, path);
    // The last segment's batches would follow a gap: they are gone, and the cut
    // segment is the tail.
    assert_eq!(log.segment_base_offsets(), bases[..2].to_vec());
    assert!(!dir.path().join(format!("{:020}.log", bases[2])).exists());
    let end = log.log_end_offset();
    assert!(end > bases[1] && end < bases[2], "{end} in {bases:?}");
    // What is left is whole and in order, from the first offset to the new end.
    let mut offsets = Vec::new();
    while offsets.len() < end as usize {
        let got = values(&log.read(offsets.len() as u64, 1 << 20).expect("read"));
        assert!(!got.is_empty(), "nothing at {}", offsets.len());
        offsets.extend(got.iter().map(|(o, _)| *o));
    }
    assert_eq!(offsets, (0..end).collect::<Vec<_>>());
    let info = log.append(&batch("after", 1, 0), opts()).expect("append");
    assert_eq!(info.base_offset, end);
    log.verify().expect("verify");
}

/// A batch of 16 records of about 1 KiB whose values name the batch and the record.
fn numbered_batch(n: u64) -> bytes::Bytes {
    let mut b = sluice_log_store::RecordBatchBuilder::new(sluice_log_store::Compression::None);
    for i in 0..16 {
        let v = format!("{n:08}-{i:02}|").repeat(90);
        b.append(n as i64, None, Some(v.as_bytes()), &[]);
    }
    b.build().expect("build")
}

#[test]
fn a_cache_window_drops_older_bytes_from_the_page_cache_and_they_read_back_intact() {
    // On the disk of the build, not a tmpfs, whose pages are the file itself.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let mut config = LogConfig::default();
    config.flush = FlushPolicy::Os;
    config.segment_bytes = 24 << 20;
    config.cache_window_bytes = Some(8 << 20);
    let mut log = Log::open(dir.path(), config.clone()).expect("open");
    log.flush_in_background();
    let mut batches = 0u64;
    let mut jobs = 0;
    while log.size_bytes() < 56 << 20 {
        log.append_deferred(&numbered_batch(batches), opts())
            .expect("append");
        // A consumer at the tail: its reads map the pages into the log's mapping,
        // where the page cache would otherwise keep them.
        let tail = log.read(batches * 16, 1 << 20).expect("read the tail");
        assert_eq!(values(&tail).len(), 16);
        batches += 1;
        if let Some(release) = log.take_release() {
            jobs += 1;
            std::thread::spawn(move || release.run())
                .join()
                .expect("release thread");
        }
    }
    // 56 MiB written, 8 kept: at least 40 MiB dropped, in chunks of 16 MiB or what a
    // sealed segment had left.
    assert!((3..=6).contains(&jobs), "{jobs} releases");
    let segments = segment_files(dir.path());
    assert_eq!(segments.len(), 3, "{segments:?}");
    let (cached, pages) = sluice_log_store::memory::cached_pages(&segments[0]).expect("mincore");
    assert!(
        cached * 10 < pages,
        "{cached} of the first segment's {pages} pages still cached"
    );
    // What was dropped comes back from the disk, every record as written.
    let mut offset = 0;
    while offset < log.log_end_offset() {
        let read = log.read(offset, 1 << 20).expect("read");
        for (o, v) in values(&read) {
            assert_eq!(o, offset, "offsets run on");
            let (batch, record) = (o / 16, o % 16);
            assert_eq!(v, format!("{batch:08}-{record:02}|").repeat(90));
            offset += 1;
        }
    }
    assert_eq!(offset, batches * 16);

    // A window wider than a segment: every segment wholly outside it is dropped, not
    // only the newest such one.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    config.cache_window_bytes = Some(40 << 20);
    let mut log = Log::open(dir.path(), config.clone()).expect("open");
    log.flush_in_background();
    let mut n = 0;
    while log.size_bytes() < 100 << 20 {
        log.append_deferred(&numbered_batch(n), opts())
            .expect("append");
        n += 1;
        if let Some(release) = log.take_release() {
            release.run();
        }
    }
    let segments = segment_files(dir.path());
    assert_eq!(segments.len(), 5, "{segments:?}");
    for old in &segments[..2] {
        let (cached, pages) = sluice_log_store::memory::cached_pages(old).expect("mincore");
        assert!(
            cached * 10 < pages,
            "{old:?}: {cached} of {pages} pages cached"
        );
    }

    // A window of nothing still drops whole chunks, not each append's few pages; and a
    // release dropped without running (a runtime shutting down) does not stop the next.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    config.cache_window_bytes = Some(0);
    let mut log = Log::open(dir.path(), config.clone()).expect("open");
    log.flush_in_background();
    let mut jobs = 0;
    let mut skipped = false;
    for n in 0..2048 {
        log.append_deferred(&numbered_batch(n), opts())
            .expect("append");
        if let Some(release) = log.take_release() {
            if !skipped {
                skipped = true;
                drop(release);
                continue;
            }
            jobs += 1;
            release.run();
        }
    }
    assert!(skipped);
    let chunks = log.size_bytes() / (16 << 20);
    assert!(
        jobs >= 1 && jobs <= chunks,
        "{jobs} releases for {chunks} chunks"
    );

    // Without a window nothing is taken.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    config.cache_window_bytes = None;
    let mut log = Log::open(dir.path(), config).expect("open");
    log.flush_in_background();
    for n in 0..2048 {
        log.append_deferred(&numbered_batch(n), opts())
            .expect("append");
        assert!(log.take_release().is_none());
    }
}
