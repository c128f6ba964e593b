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
    /// Afterwards, time wake-ups for this long (0: not at all).
    #[arg(long, default_value_t = 0.0)]
    wake_secs: f64,
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
    }
}
