//! `dump-log`: prints and verifies segment files without modifying them.
//!
//! ```text
//! dump-log data/orders-0                 # every segment of a partition
//! dump-log --records 00000000000000000000.log
//! dump-log --verify data/orders-0        # silent unless damaged; exit 1 on damage
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use sluice_log_store::log::scan_segment_bytes;
use sluice_log_store::RecordBatch;

/// Print and verify Sluice segment files.
#[derive(Parser)]
#[command(name = "dump-log", version)]
struct Args {
    /// Segment `.log` files or partition folders.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Also print every record (key and value, lossy UTF-8).
    #[arg(long)]
    records: bool,
    /// Print nothing but damage; exit 1 when any file is damaged.
    #[arg(long)]
    verify: bool,
}

fn segment_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        Ok(files)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

/// Dumps one file; returns false when it is damaged.
fn dump(path: &Path, args: &Args) -> bool {
    let data = match std::fs::read(path) {
        Ok(d) => Bytes::from(d),
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return false;
        }
    };
    if !args.verify {
        println!("# {} ({} bytes)", path.display(), data.len());
    }
    let mut ok = true;
    let mut expected: Option<u64> = None;
    let mut batches = 0u64;
    for (pos, result) in scan_segment_bytes(&data) {
        let header = match result {
            Ok(h) => h,
            Err(e) => {
                println!("{}: DAMAGED at position {pos}: {e}", path.display());
                ok = false;
                break;
            }
        };
        if expected.is_some_and(|want| want != header.base_offset) {
            println!(
                "{}: DAMAGED at position {pos}: base offset {} where {} was expected",
                path.display(),
                header.base_offset,
                expected.unwrap_or_default()
            );
            ok = false;
        }
        expected = Some(header.next_offset());
        batches += 1;
        if args.verify {
            continue;
        }
        let codec = header.compression().map_or("unknown", |c| c.name());
        println!(
            "position {pos} offsets {}..={} count {} size {} epoch {} first_ts {} max_ts {} codec {codec} crc ok",
            header.base_offset,
            header.last_offset(),
            header.record_count,
            header.total_len(),
            header.partition_leader_epoch,
            header.first_timestamp,
            header.max_timestamp,
        );
        if args.records {
            let bytes = data.slice(pos..pos + header.total_len());
            match RecordBatch::new(bytes).and_then(|b| b.records()) {
                Ok(records) => {
                    for r in records {
                        let show = |b: &Option<Bytes>| {
                            b.as_ref().map_or("<none>".to_string(), |b| {
                                String::from_utf8_lossy(b).into_owned()
                            })
                        };
                        println!(
                            "  offset {} ts {} key {} value {} headers {}",
                            r.offset,
                            r.timestamp,
                            show(&r.key),
                            show(&r.value),
                            r.headers.len()
                        );
                    }
                }
                Err(e) => {
                    println!("  records DAMAGED: {e}");
                    ok = false;
                }
            }
        }
    }
    if !args.verify {
        println!(
            "# {batches} batches, {}",
            if ok { "intact" } else { "DAMAGED" }
        );
    }
    ok
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut ok = true;
    for path in &args.paths {
        match segment_files(path) {
            Ok(files) => {
                for f in files {
                    ok &= dump(&f, &args);
                }
            }
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
