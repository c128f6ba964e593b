//! Property test: random sequences of append, roll, retention, truncate, close, crash
//! and read against a simple in-memory model of the log.

mod common;

use common::values;
use proptest::prelude::*;
use sluice_log_store::{AppendOptions, Compression, Error, Log, LogConfig, RecordBatchBuilder};

#[derive(Debug, Clone)]
enum Op {
    Append { records: u8, size: u8, ts: u16 },
    Roll,
    RetainBytes(u16),
    Truncate(u16),
    TruncateFully(u16),
    Close,
    Crash,
    Read(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1u8..12, 0u8..120, any::<u16>()).prop_map(|(records, size, ts)| Op::Append { records, size, ts }),
        1 => Just(Op::Roll),
        1 => (0u16..4000).prop_map(Op::RetainBytes),
        2 => any::<u16>().prop_map(Op::Truncate),
        1 => (0u16..50).prop_map(Op::TruncateFully),
        1 => Just(Op::Close),
        1 => Just(Op::Crash),
        3 => any::<u16>().prop_map(Op::Read),
    ]
}

/// The model: batches as (base offset, values).
#[derive(Default)]
struct Model {
    start: u64,
    batches: Vec<(u64, Vec<String>)>,
    next: u64,
}

impl Model {
    fn records_from(&self, offset: u64) -> Vec<(u64, String)> {
        self.batches
            .iter()
            .filter(|(base, v)| base + v.len() as u64 > offset)
            .flat_map(|(base, v)| {
                v.iter()
                    .enumerate()
                    .map(move |(i, s)| (base + i as u64, s.clone()))
            })
            .collect()
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 1024,
        index_interval_bytes: 128,
        index_max_bytes: 1024,
        retention_ms: None,
        ..LogConfig::default()
    }
}

fn read_all(log: &Log, from: u64) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut offset = from;
    while offset < log.log_end_offset() {
        let bytes = log.read(offset, 300).expect("read");
        let got = values(&bytes);
        assert!(!got.is_empty(), "read at {offset} returned nothing");
        offset = got.last().expect("nonempty").0 + 1;
        out.extend(got.into_iter().filter(|(o, _)| *o >= from));
    }
    out
}

fn check(log: &Log, model: &Model) {
    assert_eq!(log.log_end_offset(), model.next, "log end offset");
    assert_eq!(log.log_start_offset(), model.start, "log start offset");
    assert_eq!(read_all(log, model.start), model.records_from(model.start));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = Some(Log::open(dir.path(), config()).expect("open"));
        let mut model = Model::default();
        let mut counter = 0u64;
        for op in ops {
            let l = log.as_mut().expect("open log");
            match op {
                Op::Append { records, size, ts } => {
                    let mut b = RecordBatchBuilder::new(Compression::None);
                    let mut vals = Vec::new();
                    for i in 0..records {
                        counter += 1;
                        let v = format!("{counter}:{}", "x".repeat(size as usize));
                        b.append(i64::from(ts) + i64::from(i), None, Some(v.as_bytes()), &[]);
                        vals.push(v);
                    }
                    let info = l.append(&b.build().expect("build"), AppendOptions::default()).expect("append");
                    prop_assert_eq!(info.base_offset, model.next);
                    model.batches.push((model.next, vals));
                    model.next = info.last_offset + 1;
                }
                Op::Roll => l.roll().expect("roll"),
                Op::RetainBytes(limit) => {
                    let mut c = config();
                    c.retention_bytes = Some(u64::from(limit));
                    l.set_config(c).expect("config");
                    l.apply_retention(0).expect("retention");
                    l.set_config(config()).expect("config");
                    let start = l.log_start_offset();
                    prop_assert!(start >= model.start && start <= model.next);
                    prop_assert!(start == model.next || model.batches.iter().any(|(b, _)| *b == start),
                        "log start {} is not a batch boundary", start);
                    model.batches.retain(|(b, _)| *b >= start);
                    model.start = start;
                }
                Op::Truncate(at) => {
                    let at = u64::from(at) % (model.next + 2);
                    let new_end = l.truncate_to(at).expect("truncate");
                    if at >= model.next {
                        prop_assert_eq!(new_end, model.next);
                    } else if at <= model.start {
                        prop_assert_eq!(new_end, at);
                        model.batches.clear();
                        model.start = at;
                        model.next = at;
                    } else {
                        // The batch holding `at` goes, with everything after it.
                        model.batches.retain(|(b, v)| b + v.len() as u64 <= at);
                        model.next = model.batches.last().map_or(model.start, |(b, v)| b + v.len() as u64);
                        prop_assert_eq!(new_end, model.next);
                    }
                }
                Op::TruncateFully(extra) => {
                    let at = model.next + u64::from(extra);
                    l.truncate_fully(at).expect("truncate fully");
                    model.batches.clear();
                    model.start = at;
                    model.next = at;
                }
                Op::Close => {
                    log.take().expect("log").close().expect("close");
                    log = Some(Log::open(dir.path(), config()).expect("reopen"));
                }
                Op::Crash => {
                    drop(log.take());
                    let (l, report) = Log::open_with_report(dir.path(), config()).expect("recover");
                    prop_assert!(report.truncation.is_none(), "a crash without damage lost data: {:?}", report.truncation);
                    log = Some(l);
                }
                Op::Read(at) => {
                    let at = u64::from(at) % (model.next + 3);
                    match l.read(at, 200) {
                        Ok(bytes) if at < model.start || at > model.next => {
                            prop_assert!(false, "read at {} outside [{}, {}] returned {} bytes", at, model.start, model.next, bytes.len());
                        }
                        Ok(bytes) => {
                            let got = values(&bytes);
                            let want = model.records_from(at);
                            prop_assert_eq!(got.is_empty(), at == model.next);
                            prop_assert_eq!(&got[..], &want[..got.len()]);
                        }
                        Err(Error::OffsetOutOfRange { log_start_offset, log_end_offset, .. }) => {
                            prop_assert!(at < model.start || at > model.next);
                            prop_assert_eq!((log_start_offset, log_end_offset), (model.start, model.next));
                        }
                        Err(e) => prop_assert!(false, "read failed: {}", e),
                    }
                }
            }
            check(log.as_ref().expect("log"), &model);
        }
        log.take().expect("log").verify().expect("verify");
    }
}
