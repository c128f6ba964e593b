//! A partition's log: segments ordered by base offset; append, read, roll, retention,
//! truncation, flush and clean close.
//!
//! A `Log` has one owner (the broker gives each partition a task) and its methods take
//! `&mut self` to write and `&self` to read.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;

use crate::batch::{
    check_framing, set_base_offset, set_log_append_time, set_partition_leader_epoch, validate,
    BatchHeader, RecordBatch, ValidateOptions, HEADER_LEN,
};
use crate::config::{FlushPolicy, LogConfig};
use crate::epochs::EpochHistory;
use crate::error::{Error, Result};
use crate::retention::{segments_to_delete, SegmentStats};
use crate::segment::{
    now_ms, remove_if_present, sync_dir, AppendFailure, OpenMode, Segment, DELETED_SUFFIX,
};
use crate::tail::{TailAnchors, TailView};

pub use crate::segment::{Release, Truncation, Writeback};

/// Name of the marker a clean close leaves in the partition folder.
pub const CLEAN_SHUTDOWN_MARKER: &str = ".clean-shutdown";

/// What an append assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of the batch's last record.
    pub last_offset: u64,
    /// Records in the batch.
    pub record_count: u32,
    /// The batch's max timestamp as stored (the append time under `LogAppendTime`).
    pub max_timestamp: i64,
}

/// How a batch is appended by a leader.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppendOptions {
    /// Leader epoch to stamp into the batch.
    pub leader_epoch: i32,
    /// When set, the batch's timestamps become this broker time (`LogAppendTime`).
    pub log_append_time: Option<i64>,
}

/// What opening a log found.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Whether the previous close was clean.
    pub clean: bool,
    /// Set when recovery cut a damaged tail.
    pub truncation: Option<Truncation>,
}

/// One partition's log on disk.
pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    validate_opts: ValidateOptions,
    segments: BTreeMap<u64, Segment>,
    /// Offsets below this are on disk (fsynced).
    recovery_point: u64,
    last_flush: Instant,
    poisoned: bool,
    epochs: EpochHistory,
    /// Background flushes running (at most `FLUSHES_AT_ONCE` following the appends, one
    /// otherwise); while any runs, the interval policy does not flush in line.
    flushes_in_flight: usize,
    /// Flushes the policy asks for are left to `start_background_flush`.
    background_flush: bool,
    /// Bumped by every truncation: a background flush begun before one does not move
    /// the recovery point, since the offsets it covered may since hold other batches.
    truncations: u64,
    /// Batch boundaries near the end of the active segment, for [`Log::tail_view`].
    tail: TailAnchors,
    /// The base offset of a segment sealed without its fsync, which a background flush
    /// owes it. At most one at a time, and only the one before the active segment, so
    /// after a crash recovering the last two segments is enough.
    unsynced_seal: Option<u64>,
    /// What the appends have put in the page cache so far, for a background flush that
    /// follows them (`BackgroundFlush::run_each`); kept only while flushes are the
    /// owner's under `FlushPolicy::EveryBatch`, so one running stops following once the
    /// policy changes.
    written: Arc<Mutex<Written>>,
}

/// The end of what the log's writes have handed to the page cache, and where: the
/// active segment's base offset and the count of truncations when it was written; and
/// the end the newest fsync begun so far covers, so two running at once never sync the
/// same appends twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Written {
    base: u64,
    truncations: u64,
    end: u64,
    sync_started: u64,
}

/// Fsyncs that may run at once when they follow the appends (`FlushPolicy::EveryBatch`).
/// With one, an append that came while it ran waited for the rest of it and then for
/// the whole next one; with a second running beside it, the next starts as soon as
/// either ends. Appending 220 MB/s and syncing as fast as the disk allowed, the time
/// from a write to the end of an fsync covering it went from 1.35-1.41 ms at p99 with
/// one to 0.51-0.53 ms with two, and 0.52-0.55 with three
/// (docs/benchmarks-history.md, "Two fsyncs at once").
const FLUSHES_AT_ONCE: usize = 2;

/// An fsync taken off the append path: of a segment sealed without one (`Log::roll`),
/// and under `flush.policy=interval` or `every-batch` of the active segment. It runs on
/// its own handles to the files while appends go on, so a second's worth of dirty pages,
/// or a whole segment's, does not stall the producers behind it.
#[derive(Debug)]
pub struct BackgroundFlush {
    /// The segment sealed without its fsync, synced first: its file, path, base
    /// offset and size.
    sealed: Option<(fs::File, PathBuf, u64, u64)>,
    /// The active segment, under `flush.policy=interval` or `every-batch`.
    active: Option<(fs::File, PathBuf)>,
    upto: u64,
    truncations: u64,
    /// Under `every-batch`: what the appends have written, and the base offset of the
    /// segment `active` is, so `run_each` can go on to what they wrote meanwhile.
    follow: Option<(Arc<Mutex<Written>>, u64)>,
}

/// A finished background flush, or one round of one that follows the appends, to hand
/// back to its log.
#[derive(Debug)]
pub struct FlushDone {
    sealed: Option<u64>,
    upto: u64,
    truncations: u64,
    result: Result<()>,
    /// The flush's last round: the log may start another after this one.
    last: bool,
}

impl BackgroundFlush {
    /// Runs the fsync once (blocking).
    pub fn run(mut self) -> FlushDone {
        let result = self.sync();
        FlushDone {
            sealed: self.sealed.take().map(|(_, _, base, _)| base),
            upto: self.upto,
            truncations: self.truncations,
            result,
            last: true,
        }
    }

    /// Runs the fsync (blocking), reporting each round to `report`; under `every-batch`,
    /// goes straight on to another round for whatever the appends wrote to the same
    /// segment meanwhile, until a round finds nothing new. Handing every round back to
    /// the log before the next could start left the disk idle between fsyncs for a
    /// fifth of the time.
    pub fn run_each(mut self, mut report: impl FnMut(FlushDone)) {
        loop {
            let result = self.sync();
            let next = if result.is_ok() { self.more() } else { None };
            report(FlushDone {
                sealed: self.sealed.take().map(|(_, _, base, _)| base),
                upto: self.upto,
                truncations: self.truncations,
                result,
                last: next.is_none(),
            });
            match next {
                Some(end) => self.upto = end,
                None => return,
            }
        }
    }

    fn sync(&self) -> Result<()> {
        match &self.sealed {
            Some((file, path, _, size)) => {
                crate::segment::sync_sealed(file, *size).map_err(|e| Error::io(path, e))
            }
            None => Ok(()),
        }
        .and_then(|()| match &self.active {
            Some((file, path)) => file.sync_data().map_err(|e| Error::io(path, e)),
            None => Ok(()),
        })
    }

    /// The end of what the appends wrote since any fsync began, if it is in the
    /// segment this flush syncs and no truncation came between; this flush then takes it.
    fn more(&self) -> Option<u64> {
        let (written, base) = self.follow.as_ref()?;
        let mut now = written.lock().unwrap_or_else(PoisonError::into_inner);
        let same = now.base == *base && now.truncations == self.truncations;
        if !same || now.end <= now.sync_started.max(self.upto) {
            // Nothing new, or another flush beside this one took it.
            return None;
        }
        now.sync_started = now.end;
        Some(now.end)
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("log_start_offset", &self.log_start_offset())
            .field("log_end_offset", &self.log_end_offset())
            .field("segments", &self.segments.len())
            .finish()
    }
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

impl Log {
    /// Opens the log in `dir`, creating it if needed. See [`Log::open_with_report`].
    pub fn open(dir: &Path, config: LogConfig) -> Result<Log> {
        Log::open_with_report(dir, config).map(|(log, _)| log)
    }

    /// Opens the log in `dir`, creating it if needed, and says what recovery did.
    ///
    /// After a clean close the indexes are trusted. Otherwise the tail segment is scanned
    /// batch by batch; the first batch whose length, CRC or offset is wrong, and
    /// everything after it, is cut off and the indexes are rebuilt. Older segments were
    /// synced when they were sealed: damage there is an error naming the file and
    /// position, never skipped.
    pub fn open_with_report(dir: &Path, config: LogConfig) -> Result<(Log, OpenReport)> {
        config.validate()?;
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut bases = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(base) = parse_segment_name(&name) {
                bases.push(base);
            } else if name.ends_with(".truncating") || name.ends_with(DELETED_SUFFIX) {
                // A truncation that did not finish (the original is still in place), or a
                // deleted segment whose removal a crash cut short (or that the remover's
                // thread is taking away right now: then it is gone already).
                remove_if_present(&entry.path())?;
            }
        }
        bases.sort_unstable();
        let marker = dir.join(CLEAN_SHUTDOWN_MARKER);
        let clean = marker.exists();
        if clean {
            // Remove it before any write, so a crash from here on is seen as one.
            fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
            sync_dir(dir)?;
        }
        let mut report = OpenReport {
            clean,
            truncation: None,
        };
        let mut segments = BTreeMap::new();
        let last = bases.len().checked_sub(1);
        let mut expected_next: Option<u64> = None;
        for (i, &base) in bases.iter().enumerate() {
            // After a crash the segment before the last may have been sealed without its
            // fsync (`Log::roll`): every batch of it is checked, and a damaged one is
            // recovered like the last.
            let before_last = !clean && last.is_some_and(|l| i + 1 == l);
            let mode = match (Some(i) == last, clean) {
                (false, _) => OpenMode::Sealed,
                (true, true) => OpenMode::ActiveClean,
                (true, false) => OpenMode::ActiveRecover,
            };
            let mut recovered = false;
            let (mut seg, truncation) = if before_last {
                // Read-only first: a segment that checks whole stays sealed without a
                // write, so a full disk does not stop the reopen. Only a damaged one is
                // rebuilt, which needs room for its indexes.
                let whole = Segment::open(dir, base, &config, OpenMode::Sealed)
                    .and_then(|(seg, t)| seg.verify().map(|_| (seg, t)));
                match whole {
                    Ok(opened) => opened,
                    Err(Error::CorruptSegment { .. }) => {
                        recovered = true;
                        Segment::open(dir, base, &config, OpenMode::ActiveRecover)?
                    }
                    Err(e) => return Err(e),
                }
            } else {
                Segment::open(dir, base, &config, mode)?
            };
            if let Some(prev_next) = expected_next {
                if prev_next > base {
                    return Err(Error::CorruptSegment {
                        path: seg.log_path().to_path_buf(),
                        position: 0,
                        offset: base,
                        reason: format!(
                            "segment starts at offset {base} but the previous one ends at {prev_next}"
                        ),
                    });
                }
            }
            expected_next = Some(seg.next_offset());
            let cut = truncation.is_some();
            if let Some(t) = truncation {
                tracing::warn!(
                    path = %t.path.display(),
                    valid_bytes = t.valid_bytes,
                    truncated_bytes = t.truncated_bytes,
                    reason = %t.reason,
                    "recovered log by truncating a damaged tail"
                );
                report.truncation = Some(t);
            }
            if recovered {
                if cut {
                    // The last segment's batches cannot follow a cut one: they go too,
                    // and the cut segment becomes the tail.
                    for &later in &bases[i + 1..] {
                        crate::segment::remove_files(dir, later)?;
                    }
                    sync_dir(dir)?;
                    segments.insert(base, seg);
                    break;
                }
                seg.seal()?;
            }
            segments.insert(base, seg);
        }
        if segments.is_empty() {
            segments.insert(0, Segment::create(dir, 0, &config)?);
            sync_dir(dir)?;
        }
        let mut log = Log {
            dir: dir.to_path_buf(),
            validate_opts: validate_options(&config),
            config,
            segments,
            recovery_point: 0,
            last_flush: Instant::now(),
            poisoned: false,
            epochs: EpochHistory::empty(dir),
            flushes_in_flight: 0,
            background_flush: false,
            truncations: 0,
            tail: TailAnchors::default(),
            unsynced_seal: None,
            written: Arc::new(Mutex::new(Written {
                base: 0,
                truncations: 0,
                end: 0,
                sync_started: 0,
            })),
        };
        // Whatever survived is made durable now, so the recovery point is the log end.
        log.active().flush()?;
        log.recovery_point = log.log_end_offset();
        log.epochs = match EpochHistory::load(dir) {
            Ok(mut h)
                if !h.entries().is_empty() || log.log_end_offset() == log.log_start_offset() =>
            {
                // Epochs whose batches did not survive recovery are not history.
                h.truncate_from_end(log.log_end_offset())?;
                h.truncate_from_start(log.log_start_offset())?;
                h
            }
            Ok(_) => log.rebuild_epochs()?,
            Err(e) => {
                tracing::warn!(error = %e, "rebuilding the leader-epoch history from the log");
                log.rebuild_epochs()?
            }
        };
        Ok((log, report))
    }

    /// Rebuilds the leader-epoch history from the batches' epochs (the checkpoint was
    /// missing or damaged); reads every batch header once.
    fn rebuild_epochs(&self) -> Result<EpochHistory> {
        let mut h = EpochHistory::empty(&self.dir);
        let end = self.log_end_offset();
        let mut offset = self.log_start_offset();
        while offset < end {
            let data = self.read(offset, 8 << 20)?;
            if data.is_empty() {
                break;
            }
            for batch in crate::batch::BatchIter::new(data) {
                let header = *batch?.header();
                h.assign(header.partition_leader_epoch, header.base_offset)?;
                offset = header.last_offset() + 1;
            }
        }
        Ok(h)
    }

    /// The leader-epoch history: each epoch and the first offset written in it.
    pub fn epoch_history(&self) -> &EpochHistory {
        &self.epochs
    }

    /// OffsetsForLeaderEpoch: the largest epoch not above `epoch` and the offset where it
    /// ended here (the log end for the latest); `None` if `epoch` predates the history.
    pub fn end_offset_for_epoch(&self, epoch: i32) -> Option<(i32, u64)> {
        self.epochs.end_offset_for(epoch, self.log_end_offset())
    }

    fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a log always has an active segment")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a log always has an active segment")
    }

    /// The partition folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log's configuration.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Replaces the configuration; size and age limits apply from the next append.
    pub fn set_config(&mut self, config: LogConfig) -> Result<()> {
        config.validate()?;
        self.validate_opts = validate_options(&config);
        self.config = config;
        Ok(())
    }

    /// First offset still in the log.
    pub fn log_start_offset(&self) -> u64 {
        self.segments.keys().next().copied().unwrap_or(0)
    }

    /// Offset the next appended record will get.
    pub fn log_end_offset(&self) -> u64 {
        self.active().next_offset()
    }

    /// Offsets below this are known to be on disk.
    pub fn recovery_point(&self) -> u64 {
        self.recovery_point
    }

    /// Total bytes of all segments' log files.
    pub fn size_bytes(&self) -> u64 {
        self.segments.values().map(Segment::size).sum()
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Base offsets of all segments, oldest first.
    pub fn segment_base_offsets(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    fn check_writable(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned {
                path: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Validates a producer's batch, gives it offsets from the log end and appends it,
    /// then applies the flush policy. Under `FlushPolicy::EveryBatch` it is on disk when
    /// this returns.
    pub fn append(&mut self, batch: &[u8], options: AppendOptions) -> Result<AppendInfo> {
        let info = self.append_deferred(batch, options)?;
        self.apply_flush_policy()?;
        Ok(info)
    }

    /// Like [`Log::append`] but without the flush: the caller appends several batches
    /// and then calls [`Log::apply_flush_policy`] once (group commit).
    pub fn append_deferred(&mut self, batch: &[u8], options: AppendOptions) -> Result<AppendInfo> {
        self.check_writable()?;
        let mut header = validate(batch, &self.validate_opts)?;
        let base_offset = self.log_end_offset();
        // Recorded before the batch is written: a crash in between leaves an entry past
        // the log end, which the next open drops.
        self.epochs.assign(options.leader_epoch, base_offset)?;
        header.base_offset = base_offset;
        header.partition_leader_epoch = options.leader_epoch;
        let mut stamped = [0u8; HEADER_LEN];
        stamped.copy_from_slice(&batch[..HEADER_LEN]);
        set_base_offset(&mut stamped, base_offset);
        set_partition_leader_epoch(&mut stamped, options.leader_epoch);
        match options.log_append_time {
            None => self.write_batch(&stamped, &batch[HEADER_LEN..], &header)?,
            Some(now) => {
                // Rare path: the CRC covers the timestamps, so the batch is copied.
                let mut owned = batch.to_vec();
                owned[..HEADER_LEN].copy_from_slice(&stamped);
                set_log_append_time(&mut owned, now);
                let header = BatchHeader::parse(&owned)?;
                stamped.copy_from_slice(&owned[..HEADER_LEN]);
                self.write_batch(&stamped, &owned[HEADER_LEN..], &header)?;
            }
        }
        Ok(AppendInfo {
            base_offset,
            last_offset: header.last_offset(),
            record_count: header.record_count,
            max_timestamp: options.log_append_time.unwrap_or(header.max_timestamp),
        })
    }

    /// Appends a batch copied from a leader, keeping its offsets and epoch, then applies
    /// the flush policy. Its base offset must be this log's end offset.
    pub fn append_replicated(&mut self, batch: &[u8]) -> Result<AppendInfo> {
        let info = self.append_replicated_deferred(batch)?;
        self.apply_flush_policy()?;
        Ok(info)
    }

    /// Like [`Log::append_replicated`] without the flush: a follower appends everything
    /// one fetch returned and flushes once.
    pub fn append_replicated_deferred(&mut self, batch: &[u8]) -> Result<AppendInfo> {
        self.check_writable()?;
        let header = validate(batch, &self.validate_opts)?;
        let expected = self.log_end_offset();
        if header.base_offset != expected {
            return Err(Error::UnexpectedOffset {
                expected,
                got: header.base_offset,
            });
        }
        self.epochs
            .assign(header.partition_leader_epoch, header.base_offset)?;
        let mut stamped = [0u8; HEADER_LEN];
        stamped.copy_from_slice(&batch[..HEADER_LEN]);
        self.write_batch(&stamped, &batch[HEADER_LEN..], &header)?;
        Ok(AppendInfo {
            base_offset: header.base_offset,
            last_offset: header.last_offset(),
            record_count: header.record_count,
            max_timestamp: header.max_timestamp,
        })
    }

    fn write_batch(
        &mut self,
        stamped: &[u8; HEADER_LEN],
        body: &[u8],
        header: &BatchHeader,
    ) -> Result<()> {
        let len = header.total_len() as u64;
        if self.roll_due(len, header.last_offset()) {
            self.roll()?;
        }
        let position = self.active().size();
        match self.active_mut().append(stamped, body, header) {
            Ok(()) => {
                self.tail.appended(header.base_offset, position, len);
                if self.flushes_follow_appends() {
                    // After the write: a flush that reads this end syncs what it names.
                    let base = self.active().base_offset();
                    let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
                    written.base = base;
                    written.truncations = self.truncations;
                    written.end = header.last_offset() + 1;
                }
                Ok(())
            }
            Err(AppendFailure::Recoverable(e)) => Err(e),
            Err(AppendFailure::Poisoned(e)) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Whether appending `len` bytes ending at `last_offset` starts a new segment first:
    /// the active one is too old or has no room.
    fn roll_due(&self, len: u64, last_offset: u64) -> bool {
        let active = self.active();
        let age_roll = match (self.config.segment_ms, active.rolling_time_ms()) {
            (Some(ms), Some(t)) => !active.is_empty() && now_ms().saturating_sub(t) >= ms as i64,
            _ => false,
        };
        age_roll || active.must_roll_for(len, last_offset)
    }

    /// Whether `len` more bytes of batches would go into the active segment with no new
    /// segment made, as far as its age, size and offsets tell now (an index filling up
    /// part-way through can still roll it): what an owner checks before appending on a
    /// thread that should not wait for files to be created.
    pub fn fits_active_segment(&self, len: u64) -> bool {
        // A record takes more than one byte, so `len` bounds how many offsets they use.
        !self.roll_due(len, self.log_end_offset().saturating_add(len))
    }

    /// Flushes if the policy asks for it now: always under `EveryBatch` (when anything is
    /// unflushed), when the interval has passed under `Interval`, never under `Os`;
    /// never in line once the owner took flushes over with `flush_in_background`.
    pub fn apply_flush_policy(&mut self) -> Result<()> {
        let due = match self.config.flush {
            FlushPolicy::EveryBatch => !self.background_flush,
            FlushPolicy::Interval(every) => {
                !self.background_flush
                    && self.flushes_in_flight == 0
                    && self.last_flush.elapsed() >= every
            }
            FlushPolicy::Os => false,
        };
        if due && self.recovery_point < self.log_end_offset() {
            self.flush()?;
        } else if matches!(self.config.flush, FlushPolicy::Interval(_)) && !self.background_flush {
            // Under `Os` the kernel decides when to write back, as that policy says;
            // starting it early there measured slower and no better at p99.
            if let Some(writeback) = self.active_mut().take_writeback() {
                writeback.run();
            }
        }
        Ok(())
    }

    /// Under `FlushPolicy::Interval` with flushes in the background: the early writeback
    /// of the active segment's newest dirty pages, when enough have gathered, for the
    /// owner to start away from the appends (`Writeback::run`) as it does the flush.
    pub fn take_writeback(&mut self) -> Option<Writeback> {
        if !self.background_flush || !matches!(self.config.flush, FlushPolicy::Interval(_)) {
            return None;
        }
        self.active_mut().take_writeback()
    }

    /// Under a cache window (`LogConfig::cache_window_bytes`): the release of what lies
    /// further than the window from the log's end, for the owner to run away from the
    /// appends (`Release::run`). Looks back from the active segment to the newest one
    /// wholly outside the window: the ones before that were dropped as they left it
    /// (after a reopen, or a window set later, the kernel keeps deciding for them).
    pub fn take_release(&mut self) -> Option<Release> {
        let window = self.config.cache_window_bytes?;
        // Bytes in the segments newer than the one looked at.
        let mut newer = 0u64;
        for (i, seg) in self.segments.values_mut().rev().enumerate() {
            let outside = i > 0 && newer >= window;
            let keep_from = if outside {
                u64::MAX
            } else {
                seg.size().saturating_sub(window - newer)
            };
            if let Some(release) = seg.take_release(keep_from) {
                return Some(release);
            }
            if outside {
                return None;
            }
            newer = newer.saturating_add(seg.size());
        }
        None
    }

    /// Whether a background flush goes on to what the appends wrote meanwhile, and so
    /// whether the appends publish where they ended (`written`): under
    /// `FlushPolicy::EveryBatch` once the owner runs the flushes. One condition for both,
    /// so a flush never follows an end nobody publishes.
    fn flushes_follow_appends(&self) -> bool {
        self.background_flush && self.config.flush == FlushPolicy::EveryBatch
    }

    /// From now on `apply_flush_policy` leaves flushes and early writeback to the
    /// owner, who takes them with `start_background_flush` and `take_writeback`; so does
    /// `roll` the fsync of the segment it seals (except under `FlushPolicy::EveryBatch`,
    /// which seals in line).
    pub fn flush_in_background(&mut self) {
        self.background_flush = true;
    }

    /// Forces what was appended to disk now, in line, unless it is there already:
    /// for an owner that flushes in the background but must know a write durable before
    /// it answers (a follower under `FlushPolicy::EveryBatch`).
    pub fn flush_if_behind(&mut self) -> Result<()> {
        if self.recovery_point < self.log_end_offset() {
            self.flush()?;
        }
        Ok(())
    }

    /// When a flush is due and none is running (under `FlushPolicy::EveryBatch`, fewer
    /// than `FLUSHES_AT_ONCE`): starts one to run away from the appends
    /// (`BackgroundFlush::run`), whose result goes back through `finish_background_flush`.
    /// Due when a segment was sealed without its fsync (under any policy), under
    /// `FlushPolicy::Interval` when the interval has passed, and under
    /// `FlushPolicy::EveryBatch` whenever something is unflushed that no running flush
    /// covers: appends go on while it runs, and the next flush covers them all (group
    /// commit).
    pub fn start_background_flush(&mut self) -> Result<Option<BackgroundFlush>> {
        let at_once = if self.flushes_follow_appends() {
            FLUSHES_AT_ONCE
        } else {
            1
        };
        if self.poisoned || self.flushes_in_flight >= at_once {
            // A poisoned log: every append already reports it; a flush has nothing it
            // could vouch for.
            return Ok(None);
        }
        let end = self.log_end_offset();
        let active_due = match self.config.flush {
            FlushPolicy::Interval(every) => {
                self.last_flush.elapsed() >= every && self.recovery_point < end
            }
            FlushPolicy::EveryBatch => {
                self.background_flush && self.recovery_point < end && self.claim_sync(end)
            }
            FlushPolicy::Os => false,
        };
        let sealed = match self.unsynced_seal.and_then(|base| self.segments.get(&base)) {
            Some(seg) => Some((
                seg.clone_file()?,
                seg.log_path().to_path_buf(),
                seg.base_offset(),
                seg.size(),
                seg.next_offset(),
            )),
            None => None,
        };
        let mut follow = None;
        let (active, upto) = if active_due {
            let active = self.active();
            let file = (active.clone_file()?, active.log_path().to_path_buf());
            if self.flushes_follow_appends() {
                follow = Some((Arc::clone(&self.written), active.base_offset()));
            }
            self.last_flush = Instant::now();
            (Some(file), end)
        } else {
            match &sealed {
                Some((_, _, _, _, sealed_end)) => (None, *sealed_end),
                None => return Ok(None),
            }
        };
        self.flushes_in_flight += 1;
        Ok(Some(BackgroundFlush {
            sealed: sealed.map(|(file, path, base, size, _)| (file, path, base, size)),
            active,
            upto,
            truncations: self.truncations,
            follow,
        }))
    }

    /// Whether a new fsync, following the appends, would cover appends up to `end`
    /// that no running one does; if so, it takes them. With none running it always
    /// would, whatever an earlier one took.
    fn claim_sync(&self, end: u64) -> bool {
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let taken = written.truncations != self.truncations || written.sync_started >= end;
        if self.flushes_in_flight > 0 && taken {
            return false;
        }
        written.sync_started = end;
        true
    }

    /// Takes a background flush's result: on success the recovery point covers what it
    /// flushed; a failed fsync poisons the log, as one in line does.
    pub fn finish_background_flush(&mut self, done: FlushDone) -> Result<()> {
        if done.last {
            self.flushes_in_flight = self.flushes_in_flight.saturating_sub(1);
        }
        if let Err(e) = done.result {
            self.poisoned = true;
            return Err(e);
        }
        if done.sealed.is_some() && done.sealed == self.unsynced_seal {
            self.unsynced_seal = None;
        }
        if done.truncations == self.truncations {
            self.recovery_point = self
                .recovery_point
                .max(done.upto.min(self.log_end_offset()));
        }
        Ok(())
    }

    /// Syncs the segment sealed without its fsync, if there is one, in line.
    fn sync_unsynced_seal(&mut self) -> Result<()> {
        if let Some(seg) = self.unsynced_seal.and_then(|base| self.segments.get(&base)) {
            if let Err(e) = seg.flush() {
                self.poisoned = true;
                return Err(e);
            }
        }
        self.unsynced_seal = None;
        Ok(())
    }

    /// Forgets the segment sealed without its fsync once it is gone or active again (a
    /// truncation or retention removed or reopened it).
    fn settle_unsynced_seal(&mut self) {
        if let Some(base) = self.unsynced_seal {
            if !self.segments.contains_key(&base) || self.active().base_offset() == base {
                self.unsynced_seal = None;
            }
        }
    }

    /// Forces everything appended so far to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.check_writable()?;
        self.sync_unsynced_seal()?;
        if let Err(e) = self.active().flush() {
            // After a failed fsync the page cache may have dropped the dirty pages; the
            // tail is no longer known, so writes stop until the log is reopened.
            self.poisoned = true;
            return Err(e);
        }
        self.recovery_point = self.log_end_offset();
        self.last_flush = Instant::now();
        Ok(())
    }

    /// Seals the active segment and starts a new one at the log end offset.
    pub fn roll(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.active().is_empty() {
            return Ok(());
        }
        let next = self.log_end_offset();
        self.tail.clear();
        // Only the segment before the active one may wait for its fsync: a crash then
        // leaves at most the last two to recover.
        self.sync_unsynced_seal()?;
        let base = self.active().base_offset();
        self.recovery_point = self.recovery_point.max(base);
        // Seal first, so a crash never leaves an unsealed segment before the tail. With
        // an owner to run it, the fsync goes to the background: under `flush.policy=os`
        // most of a full segment is still dirty here, and the appends behind the roll
        // would wait for all of it to reach the disk.
        let deferred =
            self.background_flush && !matches!(self.config.flush, FlushPolicy::EveryBatch);
        if deferred {
            self.active_mut().seal_unsynced()?;
        } else {
            self.active_mut().seal()?;
            self.recovery_point = self.recovery_point.max(next);
        }
        let seg = match Segment::create(&self.dir, next, &self.config) {
            Ok(seg) => seg,
            Err(e) => {
                // No room for a new segment (a full disk): keep appending to this one.
                self.active_mut().unseal()?;
                return Err(e);
            }
        };
        sync_dir(&self.dir)?;
        self.segments.insert(next, seg);
        if deferred {
            self.unsynced_seal = Some(base);
        }
        Ok(())
    }

    /// The newest batches as a snapshot others can read from while this log goes on
    /// appending: what [`Log::read_bounded`] would give for offsets near the end.
    pub fn tail_view(&self) -> TailView {
        self.tail
            .view(self.active().written(), self.log_end_offset())
    }

    /// Whole batches starting with the one holding `offset`, up to `max_bytes` (at least
    /// one batch, whatever its size), as a slice of the segment file. Empty at the log end.
    pub fn read(&self, offset: u64, max_bytes: usize) -> Result<Bytes> {
        self.read_bounded(offset, max_bytes, self.log_end_offset())
    }

    /// Like [`Log::read`], but never returns a batch whose last offset is at or past
    /// `upper` (the high watermark, for consumers).
    pub fn read_bounded(&self, offset: u64, max_bytes: usize, upper: u64) -> Result<Bytes> {
        let start = self.log_start_offset();
        let end = self.log_end_offset();
        if offset < start || offset > end {
            return Err(Error::OffsetOutOfRange {
                offset,
                log_start_offset: start,
                log_end_offset: end,
            });
        }
        if offset == end || offset >= upper {
            return Ok(Bytes::new());
        }
        let floor = self.segments.range(..=offset).next_back().map(|(_, s)| s);
        let after = self.segments.range(offset + 1..).map(|(_, s)| s);
        for seg in floor.into_iter().chain(after) {
            if let Some(pos) = seg.position_of(offset)? {
                return seg.read(pos, max_bytes, upper);
            }
        }
        Ok(Bytes::new())
    }

    /// The earliest record whose timestamp is at least `timestamp`, as (offset,
    /// timestamp); `None` when every record is older.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<(u64, i64)>> {
        for seg in self.segments.values() {
            let Some((pos, _)) = seg.batch_for_timestamp(timestamp)? else {
                continue;
            };
            let batch = RecordBatch::new(seg.batch_at(pos)?)?;
            let found = batch
                .records()?
                .into_iter()
                .find(|r| r.timestamp >= timestamp)
                .map(|r| (r.offset, r.timestamp));
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Deletes the oldest sealed segments that retention allows; returns how many.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<usize> {
        let sealed: Vec<SegmentStats> = self
            .segments
            .values()
            .take(self.segments.len() - 1)
            .map(|s| SegmentStats {
                size_bytes: s.size(),
                max_timestamp: s.max_timestamp(),
            })
            .collect();
        let n = segments_to_delete(
            &sealed,
            self.active().size(),
            now_ms,
            self.config.retention_ms,
            self.config.retention_bytes,
        );
        for _ in 0..n {
            if let Some((_, seg)) = self.segments.pop_first() {
                seg.delete()?;
            }
        }
        if n > 0 {
            sync_dir(&self.dir)?;
            self.epochs.truncate_from_start(self.log_start_offset())?;
        }
        Ok(n)
    }

    /// Deletes every sealed segment whose records all lie below `offset`, moving the log
    /// start offset up (Kafka's DeleteRecords, by whole segments); returns how many went.
    /// The active segment always stays.
    pub fn delete_segments_before(&mut self, offset: u64) -> Result<usize> {
        let doomed: Vec<u64> = self
            .segments
            .iter()
            .take(self.segments.len() - 1)
            .take_while(|(_, s)| s.next_offset() <= offset)
            .map(|(&base, _)| base)
            .collect();
        for base in &doomed {
            if let Some(seg) = self.segments.remove(base) {
                seg.delete()?;
            }
        }
        if !doomed.is_empty() {
            sync_dir(&self.dir)?;
            self.epochs.truncate_from_start(self.log_start_offset())?;
            self.settle_unsynced_seal();
        }
        Ok(doomed.len())
    }

    /// Removes every record at or after `offset` (followers use this to drop a
    /// divergent tail). Truncation is by whole batch: when `offset` falls inside a batch
    /// that batch goes too, so the new log end offset may be below `offset`. Returns the
    /// new log end offset.
    pub fn truncate_to(&mut self, offset: u64) -> Result<u64> {
        self.check_writable()?;
        if offset >= self.log_end_offset() {
            return Ok(self.log_end_offset());
        }
        if offset <= self.log_start_offset() {
            self.truncate_fully(offset)?;
            return Ok(offset);
        }
        while let Some((&base, _)) = self.segments.last_key_value() {
            if base < offset {
                break;
            }
            if let Some((_, seg)) = self.segments.pop_last() {
                seg.delete()?;
            }
        }
        self.truncations += 1;
        self.tail.clear();
        let new_end = self.active_mut().truncate_to(offset)?;
        sync_dir(&self.dir)?;
        self.recovery_point = self.recovery_point.min(new_end);
        self.settle_unsynced_seal();
        self.epochs.truncate_from_end(new_end)?;
        Ok(new_end)
    }

    /// Empties the log and restarts it at `start_offset`.
    pub fn truncate_fully(&mut self, start_offset: u64) -> Result<()> {
        self.check_writable()?;
        self.truncations += 1;
        self.tail.clear();
        while let Some((_, seg)) = self.segments.pop_first() {
            seg.delete()?;
        }
        self.segments.insert(
            start_offset,
            Segment::create(&self.dir, start_offset, &self.config)?,
        );
        sync_dir(&self.dir)?;
        self.recovery_point = start_offset;
        self.unsynced_seal = None;
        self.epochs.clear()
    }

    /// Checks every batch in every segment (length, CRC, offset order); returns the
    /// number of batches.
    pub fn verify(&self) -> Result<u64> {
        let mut n = 0;
        for seg in self.segments.values() {
            n += seg.verify()?;
        }
        Ok(n)
    }

    /// Flushes, trims the active segment's indexes and leaves the clean-shutdown marker,
    /// so the next open trusts the indexes instead of scanning.
    pub fn close(mut self) -> Result<()> {
        self.check_writable()?;
        self.sync_unsynced_seal()?;
        self.active_mut().close_clean()?;
        let marker = self.dir.join(CLEAN_SHUTDOWN_MARKER);
        fs::File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&marker, e))?;
        sync_dir(&self.dir)
    }

    /// Deletes the log and its folder.
    pub fn delete(self) -> Result<()> {
        let dir = self.dir.clone();
        drop(self);
        fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

fn validate_options(config: &LogConfig) -> ValidateOptions {
    ValidateOptions {
        max_batch_bytes: config.max_batch_bytes as usize,
        verify_compressed_records: true,
    }
}

/// Walks batches in raw segment bytes without a `Log`: for tools that must not modify
/// what they inspect. Returns each batch's position and header, or the first damage.
pub fn scan_segment_bytes(data: &[u8]) -> Vec<(usize, Result<BatchHeader>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        match check_framing(&data[pos..]) {
            Ok(h) => {
                let len = h.total_len();
                out.push((pos, Ok(h)));
                pos += len;
            }
            Err(e) => {
                out.push((pos, Err(e)));
                break;
            }
        }
    }
    out
}
