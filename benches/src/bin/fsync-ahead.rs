//! What an `fdatasync` after an append costs on this disk, three ways: appending to a
//! file that grows with each write; writing into a file whose blocks were written
//! (with zeros, `O_DIRECT`) first, so the fsync changes no size and no block map; and
//! the same with each write padded to the end of its last page. Into blocks already
//! on disk a write that ends part-way into a page not cached makes the kernel read
//! that page first; the padded writes show whether a whole page avoids it. Each way
//! prints the write's and the fsync's p50 / p99 and the bytes read from the disk per
//! write (`/proc/self/io`).
//!
//!   fsync-ahead                          # 1,200 writes of 100,037 bytes, in target/
//!   fsync-ahead --writes 2000 --write-bytes 20011 --dir /somewhere/else

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use sluice_benches::{DirectBuffer, DIRECT_ALIGN};

#[derive(Debug, Parser)]
struct Args {
    /// Writes per way, each followed by an `fdatasync`.
    #[arg(long, default_value_t = 1200)]
    writes: usize,
    /// Bytes per write: not a whole number of pages, as batches are not.
    #[arg(long, default_value_t = 100_037)]
    write_bytes: usize,
    /// Where the file goes (on the disk under test).
    #[arg(long, default_value = "target")]
    dir: PathBuf,
}

/// The page the padded writes fill to its end.
const PAGE: usize = DIRECT_ALIGN;

/// Bytes of zeros written at once when zeroing a file first.
const ZERO_CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Append,
    Zeroed,
    ZeroedPadded,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Append => "appending",
            Way::Zeroed => "into zeroed blocks",
            Way::ZeroedPadded => "into zeroed blocks, padded",
        }
    }
}

fn main() {
    let args = Args::parse();
    if args.writes == 0 || args.write_bytes == 0 {
        eprintln!("--writes and --write-bytes must be above 0");
        std::process::exit(2);
    }
    let Some(total) = args.writes.checked_mul(args.write_bytes) else {
        eprintln!("--writes times --write-bytes is too large");
        std::process::exit(2);
    };
    let dir = match tempfile::tempdir_in(&args.dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("a folder in {}: {e}", args.dir.display());
            std::process::exit(2);
        }
    };
    println!(
        "{} writes of {} bytes, each followed by fdatasync, in {}",
        args.writes,
        args.write_bytes,
        args.dir.display()
    );
    println!("| way | write p50 / p99 (µs) | fdatasync p50 / p99 (µs) | read from disk per write (KiB) |");
    println!("| --- | ---: | ---: | ---: |");
    for way in [Way::Append, Way::Zeroed, Way::ZeroedPadded] {
        let path = dir.path().join("fsync-ahead.dat");
        match run(&path, way, &args, total) {
            Ok(r) => println!(
                "| {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} |",
                way.name(),
                r.write.0,
                r.write.1,
                r.fsync.0,
                r.fsync.1,
                r.read_kib
            ),
            Err(e) => {
                eprintln!("{}: {e}", way.name());
                // Exiting skips destructors: remove the folder first.
                drop(dir);
                std::process::exit(1);
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

struct Report {
    write: (f64, f64),
    fsync: (f64, f64),
    read_kib: f64,
}

/// Runs one way: `args.writes` writes of `args.write_bytes`, `total` bytes in all.
fn run(path: &Path, way: Way, args: &Args, total: usize) -> std::io::Result<Report> {
    if way != Way::Append {
        zero_first(path, total.div_ceil(ZERO_CHUNK) * ZERO_CHUNK)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let data: Vec<u8> = (0..args.write_bytes).map(|i| (i % 251 + 1) as u8).collect();
    let zeros = [0u8; PAGE];
    let read_before = read_bytes()?;
    let (mut writes, mut fsyncs) = (Vec::new(), Vec::new());
    let mut at = 0usize;
    for _ in 0..args.writes {
        let end = at + data.len();
        let pad = if way == Way::ZeroedPadded {
            (PAGE - end % PAGE) % PAGE
        } else {
            0
        };
        let started = Instant::now();
        // One call for data and padding: the kernel must see the whole last page in a
        // single write to skip reading it.
        write_all_vectored_at(&file, &[&data, &zeros[..pad]], at as u64)?;
        let written = Instant::now();
        file.sync_data()?;
        writes.push(written.duration_since(started).as_secs_f64() * 1e6);
        fsyncs.push(written.elapsed().as_secs_f64() * 1e6);
        at = end;
    }
    let read = read_bytes()?.saturating_sub(read_before);
    Ok(Report {
        write: p50_p99(&mut writes),
        fsync: p50_p99(&mut fsyncs),
        read_kib: read as f64 / 1024.0 / args.writes as f64,
    })
}

/// Writes `parts` one after another from `offset`, with `pwritev`, until all are in.
fn write_all_vectored_at(file: &File, parts: &[&[u8]], offset: u64) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
    let mut rest = &mut slices[..];
    let mut at = offset;
    while !rest.is_empty() {
        match rustix::io::pwritev(file, rest, at) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                IoSlice::advance_slices(&mut rest, n);
                at += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes `len` bytes of zeros to a new file with `O_DIRECT`, then syncs it: blocks on
/// the disk, none of them in the page cache.
fn zero_first(path: &Path, len: usize) -> std::io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let zeros = DirectBuffer::new(ZERO_CHUNK);
    for at in (0..len).step_by(ZERO_CHUNK) {
        file.write_all_at(zeros.bytes(), at as u64)?;
    }
    file.sync_all()?;
    // Nothing of it cached: a buffered handle opened next reads it from the disk.
    drop_cache(&file);
    Ok(())
}

#[allow(unsafe_code)]
fn drop_cache(file: &File) {
    // SAFETY: posix_fadvise(2) only reads its integer arguments; `file` is open.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

/// Bytes this process has made the disk read so far.
fn read_bytes() -> std::io::Result<u64> {
    let io = std::fs::read_to_string("/proc/self/io")?;
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no read_bytes in /proc/self/io"))
}

fn p50_p99(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (at(0.5), at(0.99))
}
