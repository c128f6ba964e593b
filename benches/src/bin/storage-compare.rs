//! Runs the log store and `dd bs=1M` side by side on the same disk, alternating, and
//! prints each figure of the storage issue next to its reference, as ratios taken in
//! the same run (absolute times drift on a shared machine; ratios drift less).
//!
//! `cargo run --release -p sluice-benches --bin storage-compare -- --dir DIR`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use sluice_benches::{bench_config, fill_log, gb_per_s, median, time_dd, time_log_append};
use sluice_log_store::{BatchIter, Log};

#[derive(Parser)]
#[command(about = "Sluice log store against dd, in one run")]
struct Args {
    /// A folder on the disk to measure (a temporary folder is made inside it).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// MiB written per append round.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Rounds of each writer; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Also time recovery from a cold page cache (needs the right to write
    /// /proc/sys/vm/drop_caches; skipped with a note otherwise).
    #[arg(long)]
    cold: bool,
    /// Random lookups timed.
    #[arg(long, default_value_t = 1_000_000)]
    lookups: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let tmp = tempfile::tempdir_in(&args.dir)?;
    let bytes = args.mib << 20;
    let dd_out = tmp.path().join("dd.out");
    let log_dir = tmp.path().join("bench-0");

    let mut dd_os = Vec::new();
    let mut log_os = Vec::new();
    let mut dd_sync = Vec::new();
    let mut log_sync = Vec::new();
    for round in 0..args.rounds {
        // Alternate which goes first, so neither always meets the other's writeback.
        if round % 2 == 0 {
            dd_os.push(time_dd(&dd_out, args.mib, false)?);
            log_os.push(time_log_append(&log_dir, bytes, false)?);
        } else {
            log_os.push(time_log_append(&log_dir, bytes, false)?);
            dd_os.push(time_dd(&dd_out, args.mib, false)?);
        }
        dd_sync.push(time_dd(&dd_out, args.mib, true)?);
        log_sync.push(time_log_append(&log_dir, bytes, true)?);
        let r = |v: &[Duration]| v.last().map_or(0.0, |d| gb_per_s(bytes, *d));
        eprintln!(
            "round {}/{}: flush by OS sluice {:.2} GB/s dd {:.2} GB/s; fdatasync sluice {:.2} GB/s dd {:.2} GB/s",
            round + 1,
            args.rounds,
            r(&log_os),
            r(&dd_os),
            r(&log_sync),
            r(&dd_sync)
        );
    }
    let (dd_os, log_os) = (median(&mut dd_os), median(&mut log_os));
    let (dd_sync, log_sync) = (median(&mut dd_sync), median(&mut log_sync));

    // Reads, lookups and recovery on one 1 GiB log, left unclosed as a crash leaves it.
    let config = bench_config(bytes);
    let log = fill_log(&log_dir, bytes, config.clone())?;
    let end = log.log_end_offset();
    let size = log.size_bytes();
    let mut out = vec![0u8; 2 << 20];
    let mut reads = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let mut offset = 0;
        while offset < end {
            let data = log.read(offset, 1 << 20)?;
            let n = data.len().min(out.len());
            out[..n].copy_from_slice(&data[..n]);
            // Without this the copy into a buffer nobody reads is optimised away.
            std::hint::black_box(&mut out);
            let last = BatchIter::new(data).last().ok_or("empty read")??;
            offset = last.header().last_offset() + 1;
        }
        reads.push(started.elapsed());
    }
    let read = median(&mut reads);

    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let started = Instant::now();
    let mut found = 0usize;
    for _ in 0..args.lookups {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        found += std::hint::black_box(log.read(x % end, 1)?).len();
    }
    let lookup = started.elapsed() / args.lookups.max(1) as u32;
    assert!(found > 0);
    drop(log);

    let mut recoveries = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let (log, report) = Log::open_with_report(&log_dir, config.clone())?;
        let took = started.elapsed();
        if report.clean || log.log_end_offset() != end {
            return Err("recovery did not scan, or lost records".into());
        }
        recoveries.push(took);
        drop(log);
    }
    let recovery = median(&mut recoveries);
    let cold = if args.cold {
        cold_recovery(&log_dir, config, end)?
    } else {
        None
    };

    let row = |what: &str, ours: String, reference: String, ratio: String, aim: &str| {
        println!("{what:<34} {ours:>14} {reference:>14} {ratio:>8}   {aim}");
    };
    println!(
        "{:<34} {:>14} {:>14} {:>8}   aim",
        "figure", "sluice", "reference", "ratio"
    );
    let ratio = |ours: Duration, theirs: Duration| theirs.as_secs_f64() / ours.as_secs_f64();
    row(
        &format!("append {} MiB, flush by OS", args.mib),
        format!("{:.2} GB/s", gb_per_s(bytes, log_os)),
        format!("{:.2} GB/s dd", gb_per_s(bytes, dd_os)),
        format!("{:.2}", ratio(log_os, dd_os)),
        ">= 0.80 of dd",
    );
    row(
        &format!("append {} MiB, then fdatasync", args.mib),
        format!("{:.2} GB/s", gb_per_s(bytes, log_sync)),
        format!("{:.2} GB/s dd", gb_per_s(bytes, dd_sync)),
        format!("{:.2}", ratio(log_sync, dd_sync)),
        "(for context)",
    );
    row(
        "sequential read, 1 MiB fetches",
        format!("{:.2} GB/s", gb_per_s(size, read)),
        "2.00 GB/s".into(),
        format!("{:.2}", gb_per_s(size, read) / 2.0),
        ">= 2 GB/s",
    );
    row(
        "random offset lookup",
        format!("{:.2} µs", lookup.as_secs_f64() * 1e6),
        "2.00 µs".into(),
        format!("{:.2}", 2e-6 / lookup.as_secs_f64()),
        "<= 2 µs",
    );
    row(
        &format!("recovery of a {} MiB tail", args.mib),
        format!("{:.2} s", recovery.as_secs_f64()),
        "1.50 s".into(),
        format!("{:.2}", 1.5 / recovery.as_secs_f64()),
        "<= 1.5 s",
    );
    match cold {
        Some(t) => row(
            &format!("recovery of a {} MiB tail, cold", args.mib),
            format!("{:.2} s", t.as_secs_f64()),
            "1.50 s".into(),
            format!("{:.2}", 1.5 / t.as_secs_f64()),
            "(disk-bound)",
        ),
        None if args.cold => {
            println!("cold recovery not measured: page cache could not be dropped")
        }
        None => {}
    }
    println!("(ratio > 1 is better than the reference)");
    Ok(())
}

/// Recovery after the page cache is dropped, as after a power loss: bound by the disk.
fn cold_recovery(
    dir: &std::path::Path,
    config: sluice_log_store::LogConfig,
    end: u64,
) -> Result<Option<Duration>, Box<dyn std::error::Error>> {
    let _ = std::process::Command::new("sync").status();
    if std::fs::write("/proc/sys/vm/drop_caches", "1\n").is_err() {
        return Ok(None);
    }
    let started = Instant::now();
    let (log, report) = Log::open_with_report(dir, config)?;
    let took = started.elapsed();
    if report.clean || log.log_end_offset() != end {
        return Err("recovery did not scan, or lost records".into());
    }
    Ok(Some(took))
}
