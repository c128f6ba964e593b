//! How steadily this machine's CPUs run: a fixed piece of work is timed over and over,
//! and every 20 ms window whose typical piece took at least twice the run's median
//! counts as slow. On a shared virtual machine the host can slow every vCPU at once
//! for tens of milliseconds; a latency percentile that such windows cover says more
//! about the machine than about the program measured, so this is run beside latency
//! benchmarks to tell the two apart.
//!
//!   cpu-steadiness --secs 20                 # every CPU busy, nothing else running
//!   cpu-steadiness --secs 8 --duty-percent 5 # alongside a benchmark, a light load

use std::time::{Duration, Instant};

use clap::Parser;

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
