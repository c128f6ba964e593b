//! What a page of memory costs the first time it is written: a large buffer is touched
//! a page at a time, a chunk after another, and each chunk's time is printed. On a
//! virtual machine whose free memory goes back to the host, the first gigabytes come
//! from memory the guest freed lately and cost what a page fault costs; past them, each
//! page is backed again by the host as it is first written, several times slower. A
//! broker writing into new page-cache pages pays the same, so a run that writes more
//! than the fast part slows once it is used up; this tells how large that part is.
//!
//!   fresh-pages                  # 6 GiB, 256 MiB at a time
//!   fresh-pages --gib 8 --chunk-mib 512

use std::hint::black_box;
use std::time::Instant;

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// How much memory to touch, in GiB.
    #[arg(long, default_value_t = 6)]
    gib: usize,
    /// Memory timed at a time, in MiB.
    #[arg(long, default_value_t = 256)]
    chunk_mib: usize,
}

/// The page size assumed when touching (the smallest on the machines Sluice runs on).
const PAGE: usize = 4096;

fn main() {
    let args = Args::parse();
    let chunk = args.chunk_mib << 20;
    let chunks = (args.gib << 30).checked_div(chunk).unwrap_or(0);
    if chunks == 0 {
        eprintln!("--gib must be at least one chunk (--chunk-mib, which must be above 0)");
        std::process::exit(2);
    }
    // Zeroed on request: the allocator maps fresh pages and nothing touches them
    // until the loop below does.
    let mut memory = vec![0u8; chunks * chunk];
    println!("chunk (MiB)  from (GiB)  seconds  µs per 4 KiB page");
    let mut per_page = Vec::with_capacity(chunks);
    for (i, part) in memory.chunks_mut(chunk).enumerate() {
        let started = Instant::now();
        for page in part.chunks_mut(PAGE) {
            page[0] = 1;
            black_box(&mut page[0]);
        }
        let secs = started.elapsed().as_secs_f64();
        let micros = secs * 1e6 / (chunk / PAGE) as f64;
        per_page.push(micros);
        println!(
            "{:>11}  {:>10.2}  {:>7.3}  {:>17.2}",
            args.chunk_mib,
            (i * chunk) as f64 / f64::from(1u32 << 30),
            secs,
            micros
        );
    }
    black_box(&memory);
    let fastest = per_page.iter().copied().fold(f64::INFINITY, f64::min);
    // A chunk more than twice the fastest counts as memory the host had to back again.
    let fast = per_page.iter().take_while(|&&m| m <= 2.0 * fastest).count();
    println!(
        "first {:.2} GiB at about {:.2} µs a page; after that {}",
        (fast * chunk) as f64 / f64::from(1u32 << 30),
        fastest,
        match per_page.get(fast..).filter(|rest| !rest.is_empty()) {
            Some(rest) => {
                let mean = rest.iter().sum::<f64>() / rest.len() as f64;
                format!("{mean:.2} µs a page on average ({:.1}x)", mean / fastest)
            }
            None => "no slower chunk".to_string(),
        }
    );
}
