//! The leader-epoch history of one partition log: for each leader epoch, the first
//! offset written in it. Followers find where their log diverges from a new leader's by
//! asking for the end offset of their latest epoch (Kafka's OffsetsForLeaderEpoch,
//! KIP-101), never by trusting their own high watermark.
//!
//! Kept in `leader-epoch-checkpoint`, a small text file rewritten atomically whenever
//! an epoch starts or the log is truncated at either end.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::segment::sync_dir;

/// The checkpoint file's name inside a partition folder.
pub const CHECKPOINT_FILE: &str = "leader-epoch-checkpoint";
const VERSION: u32 = 0;

/// One epoch and the first offset its leader wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochEntry {
    /// Leader epoch.
    pub epoch: i32,
    /// First offset written in it.
    pub start_offset: u64,
}

/// The history, oldest first; epochs and start offsets both strictly increase.
#[derive(Debug)]
pub struct EpochHistory {
    path: PathBuf,
    entries: Vec<EpochEntry>,
}

impl EpochHistory {
    /// Reads the checkpoint in `dir` (an empty history when there is none).
    pub fn load(dir: &Path) -> Result<EpochHistory> {
        let path = dir.join(CHECKPOINT_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let entries = if text.is_empty() {
            Vec::new()
        } else {
            parse(&text).ok_or_else(|| Error::DamagedCheckpoint {
                path: path.clone(),
                content: text.chars().take(200).collect(),
            })?
        };
        Ok(EpochHistory { path, entries })
    }

    /// An empty history that will be written to `dir` (for rebuilding a damaged one).
    pub fn empty(dir: &Path) -> EpochHistory {
        EpochHistory {
            path: dir.join(CHECKPOINT_FILE),
            entries: Vec::new(),
        }
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    /// The newest epoch, if any was recorded.
    pub fn latest_epoch(&self) -> Option<i32> {
        self.entries.last().map(|e| e.epoch)
    }

    /// Records that `epoch` starts at `start_offset`. An epoch older than the latest is
    /// ignored (a stale leader's batch); the latest epoch again changes nothing.
    pub fn assign(&mut self, epoch: i32, start_offset: u64) -> Result<()> {
        if epoch < 0 {
            return Ok(());
        }
        if let Some(last) = self.entries.last() {
            if epoch <= last.epoch {
                return Ok(());
            }
        }
        // A new epoch never starts below a previous one's start; if it would (a leader
        // that truncated), the older entries past it are no longer history.
        self.entries.retain(|e| e.start_offset < start_offset);
        self.entries.push(EpochEntry {
            epoch,
            start_offset,
        });
        self.persist()
    }

    /// The answer to OffsetsForLeaderEpoch for `epoch`, given the log end offset: the
    /// largest known epoch not above `epoch`, and the offset where it ended (the next
    /// epoch's start, or the log end for the latest). `None` when `epoch` is older than
    /// every recorded one.
    pub fn end_offset_for(&self, epoch: i32, log_end_offset: u64) -> Option<(i32, u64)> {
        let i = self.entries.iter().rposition(|e| e.epoch <= epoch)?;
        let end = self
            .entries
            .get(i + 1)
            .map_or(log_end_offset, |next| next.start_offset);
        Some((self.entries[i].epoch, end))
    }

    /// The log was cut back to end at `end_offset`: epochs that started at or after it
    /// are gone.
    pub fn truncate_from_end(&mut self, end_offset: u64) -> Result<()> {
        let before = self.entries.len();
        self.entries.retain(|e| e.start_offset < end_offset);
        if self.entries.len() != before {
            self.persist()?;
        }
        Ok(())
    }

    /// The log now starts at `start_offset`: epochs that ended before it are gone, and
    /// the one holding it starts there.
    pub fn truncate_from_start(&mut self, start_offset: u64) -> Result<()> {
        let keep_from = self
            .entries
            .iter()
            .rposition(|e| e.start_offset <= start_offset);
        let Some(i) = keep_from else { return Ok(()) };
        if i == 0 && self.entries[0].start_offset == start_offset {
            return Ok(());
        }
        self.entries.drain(..i);
        self.entries[0].start_offset = start_offset;
        self.persist()
    }

    /// Forgets everything (the log was emptied).
    pub fn clear(&mut self) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        self.entries.clear();
        self.persist()
    }

    fn persist(&self) -> Result<()> {
        let mut text = format!("{VERSION}\n{}\n", self.entries.len());
        for e in &self.entries {
            text.push_str(&format!("{} {}\n", e.epoch, e.start_offset));
        }
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| Error::io(&self.path, e))?;
        match self.path.parent() {
            Some(dir) => sync_dir(dir),
            None => Ok(()),
        }
    }
}

fn parse(text: &str) -> Option<Vec<EpochEntry>> {
    let mut lines = text.lines();
    if lines.next()?.trim().parse::<u32>().ok()? != VERSION {
        return None;
    }
    let count: usize = lines.next()?.trim().parse().ok()?;
    let mut entries = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let (epoch, offset) = lines.next()?.trim().split_once(' ')?;
        let entry = EpochEntry {
            epoch: epoch.parse().ok()?,
            start_offset: offset.parse().ok()?,
        };
        if entries.last().is_some_and(|p: &EpochEntry| {
            p.epoch >= entry.epoch || p.start_offset >= entry.start_offset
        }) {
            return None;
        }
        entries.push(entry);
    }
    lines.all(|l| l.trim().is_empty()).then_some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(pairs: &[(i32, u64)]) -> (tempfile::TempDir, EpochHistory) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = EpochHistory::load(dir.path()).expect("load");
        for &(e, o) in pairs {
            h.assign(e, o).expect("assign");
        }
        (dir, h)
    }

    #[test]
    fn end_offsets_follow_kafkas_offsets_for_leader_epoch() {
        let (_d, h) = history(&[(0, 0), (1, 10), (3, 25)]);
        assert_eq!(
            h.end_offset_for(3, 40),
            Some((3, 40)),
            "latest ends at the log end"
        );
        assert_eq!(h.end_offset_for(7, 40), Some((3, 40)));
        assert_eq!(h.end_offset_for(1, 40), Some((1, 25)));
        // Epoch 2 never wrote: the answer is epoch 1 and where it ended.
        assert_eq!(h.end_offset_for(2, 40), Some((1, 25)));
        assert_eq!(h.end_offset_for(0, 40), Some((0, 10)));
        assert_eq!(h.end_offset_for(-1, 40), None);
    }

    #[test]
    fn stale_and_repeated_epochs_change_nothing() {
        let (_d, mut h) = history(&[(2, 5)]);
        h.assign(2, 9).expect("same epoch");
        h.assign(1, 12).expect("stale epoch");
        assert_eq!(
            h.entries(),
            &[EpochEntry {
                epoch: 2,
                start_offset: 5
            }]
        );
    }

    #[test]
    fn truncation_at_both_ends_and_reload() {
        let (dir, mut h) = history(&[(0, 0), (1, 10), (3, 25)]);
        h.truncate_from_end(25).expect("end");
        assert_eq!(h.latest_epoch(), Some(1));
        h.truncate_from_start(12).expect("start");
        assert_eq!(
            h.entries(),
            &[EpochEntry {
                epoch: 1,
                start_offset: 12
            }]
        );
        let again = EpochHistory::load(dir.path()).expect("reload");
        assert_eq!(again.entries(), h.entries());
    }

    #[test]
    fn a_damaged_checkpoint_is_an_error_not_an_empty_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        for bad in [
            "0\n2\n1 5\n",
            "0\n2\n3 5\n1 9\n",
            "9\n0\n",
            "0\n1\nx y\n",
            "0\n1\n1 5\n2 6\n",
        ] {
            fs::write(dir.path().join(CHECKPOINT_FILE), bad).expect("write");
            assert!(EpochHistory::load(dir.path()).is_err(), "{bad:?} accepted");
        }
    }
}
