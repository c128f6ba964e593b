//! `log-writer`: appends to a partition log in a loop and reports every acknowledged
//! append on stdout, for crash and full-disk tests that kill or starve it.
//!
//! Each record's value is `rec-OFFSET`, so a reader can check any record on its own.
//! Lines printed: `acked BASE LAST` after each append returned, `error KIND MESSAGE` on
//! the first failed append, and with `--verify-after-error`, `verified N` once the log
//! was reopened and every acknowledged record checked in the same process.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sluice_log_store::{
    AppendOptions, BatchIter, Compression, FlushPolicy, Log, LogConfig, RecordBatchBuilder,
};

/// Append numbered records to a log until told to stop, killed, or out of space.
#[derive(Parser)]
struct Args {
    /// The partition folder.
    #[arg(long)]
    dir: PathBuf,
    /// Records per batch.
    #[arg(long, default_value_t = 10)]
    records: u32,
    /// Extra bytes of padding per record value.
    #[arg(long, default_value_t = 100)]
    pad: usize,
    /// Stop after this many batches (default: never).
    #[arg(long)]
    batches: Option<u64>,
    /// `segment.bytes`.
    #[arg(long, default_value_t = 1 << 20)]
    segment_bytes: u64,
    /// `segment.index.bytes`.
    #[arg(long, default_value_t = 64 * 1024)]
    index_bytes: u32,
    /// Flush every batch (default: leave it to the OS; a SIGKILL loses nothing either way).
    #[arg(long)]
    fsync: bool,
    /// Limit the size of any file this process writes (RLIMIT_FSIZE), to make writes fail.
    #[arg(long)]
    max_file_bytes: Option<u64>,
    /// After the first failed append, try this many more, then reopen the log and check
    /// every acknowledged record.
    #[arg(long)]
    verify_after_error: Option<u32>,
}

fn config(args: &Args) -> LogConfig {
    LogConfig {
        segment_bytes: args.segment_bytes,
        index_max_bytes: args.index_bytes,
        retention_ms: None,
        flush: if args.fsync {
            FlushPolicy::EveryBatch
        } else {
            FlushPolicy::Os
        },
        ..LogConfig::default()
    }
}

#[allow(unsafe_code)]
fn limit_file_size(bytes: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    // SAFETY: plain system calls with valid arguments; ignoring SIGXFSZ makes an
    // over-limit write fail with EFBIG instead of killing the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn build(first_offset: u64, args: &Args) -> bytes::Bytes {
    let mut b = RecordBatchBuilder::new(Compression::None);
    let pad = "p".repeat(args.pad);
    for i in 0..u64::from(args.records) {
        let v = format!("rec-{}{pad}", first_offset + i);
        b.append(0, None, Some(v.as_bytes()), &[]);
    }
    b.build().expect("a batch of small records always builds")
}

/// Checks that offsets `0..end` (from the log start) hold `rec-OFFSET`.
fn verify(log: &Log, end: u64) -> Result<u64, String> {
    let mut offset = log.log_start_offset();
    let mut n = 0;
    while offset < end {
        let bytes = log.read(offset, 1 << 20).map_err(|e| e.to_string())?;
        if bytes.is_empty() {
            return Err(format!(
                "nothing to read at offset {offset}, expected up to {end}"
            ));
        }
        for batch in BatchIter::new(bytes) {
            let batch = batch.map_err(|e| e.to_string())?;
            for r in batch.records().map_err(|e| e.to_string())? {
                let value = r.value.unwrap_or_default();
                let want = format!("rec-{}", r.offset);
                if !value.starts_with(want.as_bytes()) {
                    return Err(format!("offset {} holds the wrong record", r.offset));
                }
                offset = r.offset + 1;
                n += 1;
            }
        }
    }
    Ok(n)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(bytes) = args.max_file_bytes {
        if let Err(e) = limit_file_size(bytes) {
            eprintln!("setrlimit: {e}");
            return ExitCode::from(2);
        }
    }
    let mut log = match Log::open(&args.dir, config(&args)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("open: {e}");
            return ExitCode::from(2);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut done = 0u64;
    let mut acked_end = log.log_end_offset();
    loop {
        if args.batches.is_some_and(|n| done >= n) {
            break;
        }
        let batch = build(log.log_end_offset(), &args);
        match log.append(&batch, AppendOptions::default()) {
            Ok(info) => {
                // The line is written only after append returned: it is the ack.
                let _ = writeln!(out, "acked {} {}", info.base_offset, info.last_offset);
                let _ = out.flush();
                acked_end = info.last_offset + 1;
                done += 1;
            }
            Err(e) => {
                let kind = if e.is_storage_full() { "full" } else { "other" };
                let _ = writeln!(out, "error {kind} {e}");
                let _ = out.flush();
                let Some(retries) = args.verify_after_error else {
                    return ExitCode::from(3);
                };
                for _ in 0..retries {
                    let batch = build(log.log_end_offset(), &args);
                    if let Ok(info) = log.append(&batch, AppendOptions::default()) {
                        let _ = writeln!(out, "acked {} {}", info.base_offset, info.last_offset);
                        acked_end = info.last_offset + 1;
                    }
                }
                if log.log_end_offset() != acked_end {
                    let _ = writeln!(
                        out,
                        "bad log end {} after acks up to {acked_end}",
                        log.log_end_offset()
                    );
                    return ExitCode::from(4);
                }
                if let Err(e) = verify(&log, acked_end) {
                    let _ = writeln!(out, "bad read before reopen: {e}");
                    return ExitCode::from(4);
                }
                drop(log);
                return match Log::open_with_report(&args.dir, config(&args)) {
                    Ok((log, report)) => match verify(&log, acked_end) {
                        Ok(n) if log.log_end_offset() == acked_end => {
                            let _ = writeln!(
                                out,
                                "verified {n} truncated {}",
                                report.truncation.is_some()
                            );
                            ExitCode::SUCCESS
                        }
                        Ok(_) => {
                            let _ = writeln!(
                                out,
                                "bad log end {} after reopen, acks up to {acked_end}",
                                log.log_end_offset()
                            );
                            ExitCode::from(4)
                        }
                        Err(e) => {
                            let _ = writeln!(out, "bad read after reopen: {e}");
                            ExitCode::from(4)
                        }
                    },
                    Err(e) => {
                        let _ = writeln!(out, "reopen failed: {e}");
                        ExitCode::from(4)
                    }
                };
            }
        }
    }
    match log.close() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("close: {e}");
            ExitCode::from(2)
        }
    }
}
