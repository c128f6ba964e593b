//! What this machine allows, apart from any program on it: two probes run beside the
//! benchmarks, so a figure can be told apart from the machine under it.
//!
//! `cpu`: how steadily the CPUs run. A fixed piece of work is timed over and over, and
//! every 20 ms window whose typical piece took at least twice the run's median counts
//! as slow. On a shared virtual machine the host can slow every vCPU at once for tens
//! of milliseconds; a latency percentile that such windows cover says more about the
//! machine than about the program measured.
//!
//! `memory`: how fast memory the program has not used before can be written, against
//! memory it already holds. A log writes into page-cache pages it has never touched; on
//! a virtual machine whose host takes back the guest's free pages, each such page costs
//! a fault on the host as well, and that, not the copy, can bound a write-heavy burst.
//!
//!   machine-probe cpu --secs 20                  # every CPU busy, nothing else running
//!   machine-probe cpu --secs 8 --duty-percent 5  # alongside a benchmark, a light load
//!   machine-probe memory --gib 4

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    probe: Probe,
}

#[derive(Debug, Subcommand)]
enum Probe {
    /// How steadily the CPUs run.
    Cpu(CpuArgs),
    /// Writing fresh memory against memory already held.
    Memory(MemoryArgs),
}

#[derive(Debug, clap::Args)]
struct MemoryArgs {
    /// GiB to allocate and write, in pieces of 256 MiB.
    #[arg(long, default_value_t = 2)]
    gib: usize,
}

#[derive(Debug, clap::Args)]
struct CpuArgs {
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
}

/// Window over which piece times are summarized.
const WINDOW: Duration = Duration::from_millis(20);

/// A fixed amount of arithmetic (tens of microseconds) whose result is used, so the
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
    match Cli::parse().probe {
        Probe::Cpu(args) => cpu(&args),
        Probe::Memory(args) => memory(&args),
    }
}

/// Bytes of one allocation of the memory probe.
const PIECE_BYTES: usize = 256 << 20;

/// GiB/s at which `pieces` were each written once (first touch if they are new).
fn write_rate(pieces: &mut [Vec<u8>], fill: u8) -> f64 {
    let started = Instant::now();
    for p in pieces.iter_mut() {
        p.fill(fill);
    }
    std::hint::black_box(&pieces);
    let bytes = (pieces.len() * PIECE_BYTES) as f64;
    bytes / f64::from(1u32 << 30) / started.elapsed().as_secs_f64()
}

/// Allocates zeroed pieces without touching them: `vec![0; n]` takes pages straight
/// from the kernel, which maps them only when written.
fn fresh_pieces(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|_| vec![0u8; PIECE_BYTES]).collect()
}

fn memory(args: &MemoryArgs) {
    let n = (args.gib.max(1) << 30) / PIECE_BYTES;
    let mut pieces = fresh_pieces(n);
    let first = write_rate(&mut pieces, 1);
    let resident = write_rate(&mut pieces, 2);
    // Freed and taken again: the kernel hands back pages it may have given to the
    // host meanwhile, as a log's page cache does after old files are deleted.
    drop(pieces);
    std::thread::sleep(Duration::from_secs(2));
    let mut again = fresh_pieces(n);
    let reused = write_rate(&mut again, 3);
    println!(
        "{} GiB: first write {first:.2} GiB/s; freed, taken again after 2 s and written \
         {reused:.2} GiB/s; written again while held {resident:.2} GiB/s",
        args.gib.max(1)
    );
}

fn cpu(args: &CpuArgs) {
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
}
