//! How steadily this machine's CPUs run: a fixed piece of work is timed over and over,
//! and every 20 ms window whose typical piece took at least twice the run's median
//! counts as slow. On a shared virtual machine the host can slow every vCPU at once
//! for tens of milliseconds; a latency percentile that such windows cover says more
//! about the machine than about the program measured, so this is run beside latency
//! benchmarks to tell the two apart.
//!
//! With `--wake-secs` it then also times wake-ups: a thread per CPU sleeps 100 µs over
//! and over, and every wake-up that comes a millisecond or more late is counted. A
//! stall of a few milliseconds is too short to slow a 20 ms window by half, but it is
//! what a p99.9 of a latency benchmark is made of.
//!
//!   cpu-steadiness --secs 20                 # every CPU busy, nothing else running
//!   cpu-steadiness --secs 8 --duty-percent 5 # alongside a benchmark, a light load
//!   cpu-steadiness --secs 5 --wake-secs 5    # and the machine's late wake-ups
//!   cpu-steadiness --secs 1 --wake-secs 10 --write-mb-per-sec 185 --write-dir target
//!                                            # late wake-ups with the disk idle, then
//!                                            # while it takes 185 MB/s
//!
//! On a virtual machine the host does the disk's work, and a guest writing steadily
//! may find its vCPUs held up more often than an idle one: the second probe shows
//! whether it does, with no program of ours in the way. Its writes bypass the page cache
//! (`O_DIRECT`), so they cost the guest's CPUs next to nothing themselves.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use sluice_benches::DirectBuffer;

#[derive(Debug, Parser)]
struct Args {
    /// How long to measure.
    #[arg(long, default_value_t = 20.0)]
    secs: f64,
    /// Threads timing work (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Share of each thread's time spent working; below 100 it sleeps between pieces,
    /// so it can run beside the program under test without taking much from it.
    #[arg(long, default_value_t = 100)]
    duty_percent: u32,
    /// Afterwards, time wake-ups for this long (0: not at all).
    #[arg(long, default_value_t = 0.0)]
    wake_secs: f64,
    /// Time the wake-ups a second time while a thread writes this many MB/s to a file
    /// in `--write-dir`, bypassing the page cache (0: not at all).
    #[arg(long, default_value_t = 0.0, requires = "write_dir")]
    write_mb_per_sec: f64,
    /// Where the second probe's file goes (a folder on the disk under test; removed
    /// afterwards).
    #[arg(long)]
    write_dir: Option<PathBuf>,
}

/// How long each wake-up probe sleeps.
const NAP: Duration = Duration::from_micros(100);
/// A wake-up this much later than asked counts as late.
const LATE: Duration = Duration::from_millis(1);

/// Sleeps `NAP` over and over until `end`; returns the number of wake-ups and, for each
/// late one, when it was due (from `epoch`) and how late it came.
fn wake_ups(epoch: Instant, end: Instant) -> (u64, Vec<(Duration, Duration)>) {
    let mut count = 0u64;
    let mut late = Vec::new();
    loop {
        let asked = Instant::now();
        if asked >= end {
            return (count, late);
        }
        std::thread::sleep(NAP);
        count += 1;
        let over = asked.elapsed().saturating_sub(NAP);
        if over >= LATE {
            late.push((asked + NAP - epoch, over));
        }
    }
}

/// Bytes each direct write takes.
const WRITE_BLOCK: usize = 1 << 20;
/// The file written over and over is this long, so a long probe fills no disk.
const WRITE_FILE_BYTES: u64 = 1 << 30;

/// Writes `WRITE_BLOCK`s to a new file under `dir` at `mb_per_sec` until `end`,
/// bypassing the page cache; returns the bytes written.
fn write_steadily(dir: &Path, mb_per_sec: f64, end: Instant) -> std::io::Result<u64> {
    let folder = tempfile::TempDir::new_in(dir)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(folder.path().join("steady-writes"))?;
    let mut buffer = DirectBuffer::new(WRITE_BLOCK);
    // Not all zeros, in case the host would store those for less.
    for (i, b) in buffer.bytes_mut().iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
    }
    let started = Instant::now();
    let bytes_per_sec = mb_per_sec * 1e6;
    let mut written = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok(written);
        }
        let due = started + Duration::from_secs_f64(written as f64 / bytes_per_sec);
        if due > now {
            std::thread::sleep(due - now);
            continue;
        }
        file.write_all_at(buffer.bytes(), written % WRITE_FILE_BYTES)?;
        written += WRITE_BLOCK as u64;
    }
}

/// Times wake-ups as `report_wake_ups` does while `write_steadily` runs beside them.
fn report_wake_ups_while_writing(threads: usize, secs: f64, dir: &Path, mb_per_sec: f64) {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let writer = {
        let dir = dir.to_path_buf();
        std::thread::spawn(move || write_steadily(&dir, mb_per_sec, end))
    };
    println!("while the disk takes {mb_per_sec:.0} MB/s (direct writes of 1 MiB):");
    report_wake_ups(threads, secs);
    match writer.join() {
        Ok(Ok(bytes)) => println!(
            "written: {:.2} GB, {:.0} MB/s",
            bytes as f64 / 1e9,
            bytes as f64 / 1e6 / secs
        ),
        Ok(Err(e)) => println!("the writes failed, so the second probe is no measure: {e}"),
        Err(_) => println!("the writing thread panicked, so the second probe is no measure"),
    }
}

/// Runs the wake-up probe on `threads` threads and prints what it found.
fn report_wake_ups(threads: usize, secs: f64) {
    let epoch = Instant::now();
    let end = epoch + Duration::from_secs_f64(secs);
    let handles: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || wake_ups(epoch, end)))
        .collect();
    let mut total = 0u64;
    let mut late: Vec<(Duration, Duration)> = Vec::new();
    for (n, l) in handles.into_iter().filter_map(|h| h.join().ok()) {
        total += n;
        late.extend(l);
    }
    late.sort_unstable();
    let latest = late.iter().map(|l| l.1).max().unwrap_or_default();
    // Time a thread spent waiting past its wake-up, counting late wake-ups alone: work
    // that falls due in that time waits too, whatever program it belongs to, so once
    // stalls cover more than 1 % of the time a p99 holds some of them.
    let lost: Duration = late.iter().map(|l| l.1).sum();
    let lost_share = lost.as_secs_f64() / (secs * threads.max(1) as f64);
    println!(
        "{threads} threads sleeping {} us at a time for {secs:.1} s: {} of {total} wake-ups \
         came {} ms or more late ({:.1} a second), the latest by {:.2} ms; waiting past \
         them took {:.2} % of each thread's time",
        NAP.as_micros(),
        late.len(),
        LATE.as_millis(),
        late.len() as f64 / secs,
        latest.as_secs_f64() * 1e3,
        lost_share * 100.0,
    );
    let when: Vec<String> = late
        .iter()
        .take(30)
        .map(|(at, over)| format!("{:.2}s+{:.1}ms", at.as_secs_f64(), over.as_secs_f64() * 1e3))
        .collect();
    if !when.is_empty() {
        println!("late: {}", when.join(" "));
    }
}

/// Window over which piece times are summarized.
const WINDOW: Duration = Duration::from_millis(20);

/// A fixed amount of arithmetic (well under a millisecond) whose result is used, so the
/// compiler keeps it.
fn piece(seed: u64) -> u64 {
    let mut x = seed | 1;
    for _ in 0..40_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// Times pieces until `end`; returns (start offset from `epoch`, duration) of each.
fn measure(epoch: Instant, end: Instant, duty_percent: u32) -> Vec<(Duration, Duration)> {
    let mut out = Vec::new();
    let mut sink = 0u64;
    loop {
        let a = Instant::now();
        if a >= end {
            break;
        }
        sink = sink.wrapping_add(piece(sink ^ out.len() as u64));
        let took = a.elapsed();
        out.push((a - epoch, took));
        if duty_percent < 100 {
            let idle = took * (100 - duty_percent.max(1)) / duty_percent.max(1);
            std::thread::sleep(idle);
        }
    }
    std::hint::black_box(sink);
    out
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn main() {
    let args = Args::parse();
    if args.write_mb_per_sec > 0.0 && args.wake_secs <= 0.0 {
        eprintln!("--write-mb-per-sec times wake-ups: give --wake-secs too");
        std::process::exit(2);
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let duty = args.duty_percent.clamp(1, 100);
    let epoch = Instant::now();
    let end = epoch + Duration::from_secs_f64(args.secs.max(0.1));
    let handles: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || measure(epoch, end, duty)))
        .collect();
    let samples: Vec<(Duration, Duration)> = handles
        .into_iter()
        .filter_map(|h| h.join().ok())
        .flatten()
        .collect();
    let mut all: Vec<Duration> = samples.iter().map(|s| s.1).collect();
    let overall = median(&mut all);
    let windows = (args.secs.max(0.1) / WINDOW.as_secs_f64()).ceil() as usize;
    let mut per_window: Vec<Vec<Duration>> = vec![Vec::new(); windows];
    for (at, took) in &samples {
        let w = (at.as_nanos() / WINDOW.as_nanos()) as usize;
        if let Some(v) = per_window.get_mut(w) {
            v.push(*took);
        }
    }
    // A window with no piece finished in it is as slow as a window can be.
    let slow: Vec<bool> = per_window
        .iter_mut()
        .map(|v| v.is_empty() || median(v) >= overall * 2)
        .collect();
    let slow_count = slow.iter().filter(|s| **s).count();
    let mut episodes: Vec<(usize, usize)> = Vec::new();
    for (i, s) in slow.iter().enumerate() {
        if !*s {
            continue;
        }
        match episodes.last_mut() {
            Some((start, len)) if *start + *len == i => *len += 1,
            _ => episodes.push((i, 1)),
        }
    }
    let window_ms = WINDOW.as_millis() as usize;
    let longest = episodes.iter().map(|e| e.1).max().unwrap_or(0) * window_ms;
    println!(
        "{threads} threads at {duty}% duty for {:.1} s: median piece {:.1} us; {slow_count} of \
         {windows} windows of {window_ms} ms ran at half speed or less ({:.1} % of the time), \
         in {} episodes, the longest {longest} ms",
        args.secs,
        overall.as_secs_f64() * 1e6,
        100.0 * slow_count as f64 / windows.max(1) as f64,
        episodes.len(),
    );
    let starts: Vec<String> = episodes
        .iter()
        .take(30)
        .map(|(s, l)| {
            format!(
                "{:.2}s+{}ms",
                (s * window_ms) as f64 / 1000.0,
                l * window_ms
            )
        })
        .collect();
    if !starts.is_empty() {
        println!("episodes: {}", starts.join(" "));
    }
    if args.wake_secs > 0.0 {
        report_wake_ups(threads, args.wake_secs);
        if let Some(dir) = args
            .write_dir
            .as_deref()
            .filter(|_| args.write_mb_per_sec > 0.0)
        {
            report_wake_ups_while_writing(threads, args.wake_secs, dir, args.write_mb_per_sec);
        }
    }
}
