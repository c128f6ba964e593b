//! Criterion benches of one partition log: append and sequential read of 100-byte
//! records in ~16 KiB batches, random offset lookup, and recovery of a 1 GiB tail.
//!
//! `cargo bench -p sluice-benches --bench log_store`; the side-by-side comparison with
//! `dd` is the `storage-compare` binary.

// criterion_group! makes an undocumented public function.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sluice_benches::{bench_config, fill_log, workload_batch};
use sluice_log_store::{AppendOptions, Log};

const READ_LOG_BYTES: u64 = 256 << 20;
const RECOVERY_BYTES: u64 = 1 << 30;

fn append(c: &mut Criterion) {
    let batch = workload_batch(1_700_000_000_000);
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Bytes(batch.len() as u64));
    group.bench_function("16KiB_batch_flush_os", |b| {
        let dir = tempfile::tempdir().expect("tempdir");
        // Segments of 256 MiB roll now and then, as they would in a broker.
        let mut config = bench_config(0);
        config.segment_bytes = 256 << 20;
        config.retention_bytes = Some(512 << 20);
        let mut log = Log::open(dir.path(), config).expect("open");
        let mut appended = 0u64;
        b.iter(|| {
            log.append(&batch, AppendOptions::default())
                .expect("append");
            appended += 1;
            // Keep the bench's disk use bounded.
            if appended.is_multiple_of(16_384) {
                log.apply_retention(i64::MAX).expect("retention");
            }
        });
    });
    group.finish();
}

fn read(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = fill_log(dir.path(), READ_LOG_BYTES, bench_config(READ_LOG_BYTES)).expect("fill");
    let end = log.log_end_offset();
    let size = log.size_bytes();

    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Bytes(size));
    group.sample_size(20);
    group.bench_function("sequential_1MiB_fetches_copied_out", |b| {
        let mut out = vec![0u8; 2 << 20];
        b.iter(|| {
            // A fetch hands out a slice of the mmap; copying it out is what a socket
            // write would cost, so the bench counts it.
            let mut offset = 0;
            let mut total = 0usize;
            while offset < end {
                let data = log.read(offset, 1 << 20).expect("read");
                let n = data.len().min(out.len());
                out[..n].copy_from_slice(&data[..n]);
                std::hint::black_box(&mut out);
                total += n;
                let last = sluice_log_store::BatchIter::new(data)
                    .last()
                    .expect("a batch")
                    .expect("valid");
                offset = last.header().last_offset() + 1;
            }
            total
        });
    });
    group.finish();

    let mut group = c.benchmark_group("lookup");
    group.bench_function("random_offset_to_batch", |b| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        b.iter(|| {
            // xorshift: cheap, and the same sequence each run.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let data = log.read(x % end, 1).expect("lookup");
            data.len()
        });
    });
    group.finish();
}

fn recovery(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = bench_config(RECOVERY_BYTES);
    let log = fill_log(dir.path(), RECOVERY_BYTES, config.clone()).expect("fill");
    let end = log.log_end_offset();
    // Dropped without `close`: no clean marker, so every open scans the tail.
    drop(log);

    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(RECOVERY_BYTES));
    group.bench_function("1GiB_tail_segment", |b| {
        b.iter_batched(
            || (),
            |()| {
                let started = Instant::now();
                let (log, report) =
                    Log::open_with_report(dir.path(), config.clone()).expect("recover");
                assert!(!report.clean && report.truncation.is_none());
                assert_eq!(log.log_end_offset(), end);
                let took = started.elapsed();
                drop(log);
                took
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, append, read, recovery);
criterion_main!(benches);
