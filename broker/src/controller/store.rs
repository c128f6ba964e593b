//! The controller's Raft log on disk, as raft-rs's `Storage`: a snapshot, the hard
//! state, and an append-only file of the entries after the snapshot.
//!
//! - `raft.snapshot`: the latest snapshot (metadata and state-machine data), replaced
//!   atomically (write, fsync, rename).
//! - `raft.hardstate`: term, vote and commit, replaced atomically on every change.
//! - `raft.wal`: records `[len u32][crc32 u32][Entry]`. An append whose first index is
//!   at or below the last overwrites the tail, on disk as in memory: replay applies the
//!   same rule. A torn record at the end (a crash mid-write) is cut off on open.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::{BrokerError, Result};

const SNAPSHOT: &str = "raft.snapshot";
const HARDSTATE: &str = "raft.hardstate";
const WAL: &str = "raft.wal";

fn storage_err(path: &Path, e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Storage(format!("{}: {e}", path.display()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| storage_err(path, e))
}

/// The Raft log of one controller.
pub struct RaftStore {
    dir: PathBuf,
    hard: HardState,
    snapshot: Snapshot,
    /// Entries after the snapshot, in index order.
    entries: Vec<Entry>,
    wal: File,
}

impl std::fmt::Debug for RaftStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStore")
            .field("dir", &self.dir)
            .field("first_index", &self.first())
            .field("last_index", &self.last())
            .finish_non_exhaustive()
    }
}

impl RaftStore {
    /// Opens the store in `dir`; a new one starts with `voters` as its configuration.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<RaftStore> {
        fs::create_dir_all(dir).map_err(|e| storage_err(dir, e))?;
        let snap_path = dir.join(SNAPSHOT);
        let snapshot = match fs::read(&snap_path) {
            Ok(b) => Snapshot::parse_from_bytes(&b).map_err(|e| storage_err(&snap_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut s = Snapshot::default();
                s.mut_metadata()
                    .set_conf_state(ConfState::from((voters.to_vec(), vec![])));
                s
            }
            Err(e) => return Err(storage_err(&snap_path, e)),
        };
        let hard_path = dir.join(HARDSTATE);
        let hard = match fs::read(&hard_path) {
            Ok(b) => HardState::parse_from_bytes(&b).map_err(|e| storage_err(&hard_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HardState::default(),
            Err(e) => return Err(storage_err(&hard_path, e)),
        };
        let wal_path = dir.join(WAL);
        let (entries, valid_len) = replay(&wal_path, snapshot.get_metadata().index)?;
        let wal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&wal_path)
            .map_err(|e| storage_err(&wal_path, e))?;
        let on_disk = wal.metadata().map_err(|e| storage_err(&wal_path, e))?.len();
        if on_disk > valid_len {
            tracing::warn!(path = %wal_path.display(), cut = on_disk - valid_len, "cutting a torn tail off the Raft log");
            wal.set_len(valid_len)
                .map_err(|e| storage_err(&wal_path, e))?;
            wal.sync_all().map_err(|e| storage_err(&wal_path, e))?;
        }
        Ok(RaftStore {
            dir: dir.to_path_buf(),
            hard,
            snapshot,
            entries,
            wal,
        })
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot.get_metadata().index + self.entries.len() as u64
    }

    /// Appends entries from a Ready, overwriting any tail they conflict with; durable
    /// on return.
    pub fn append(&mut self, ents: &[Entry]) -> Result<()> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        let buf = frame_entries(ents)?;
        let path = self.dir.join(WAL);
        self.wal
            .write_all(&buf)
            .and_then(|()| self.wal.sync_data())
            .map_err(|e| storage_err(&path, e))?;
        splice(
            &mut self.entries,
            self.snapshot.get_metadata().index,
            first.index,
            ents,
        );
        Ok(())
    }

    /// Stores a new hard state; durable on return.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<()> {
        if *hs == self.hard {
            return Ok(());
        }
        let bytes = hs
            .write_to_bytes()
            .map_err(|e| BrokerError::Internal(format!("encoding the hard state: {e}")))?;
        write_atomically(&self.dir.join(HARDSTATE), &bytes)?;
        self.hard = hs.clone();
        Ok(())
    }

    /// Records the commit index (with the rest of the hard state).
    pub fn set_commit(&mut self, commit: u64) -> Result<()> {
        let mut hs = self.hard.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<()> {
        let meta = snap.get_metadata();
        if meta.index <= self.snapshot.get_metadata().index {
            return Ok(());
        }
        self.write_snapshot(snap)?;
        self.entries.clear();
        self.rewrite_wal()?;
        let mut hs = self.hard.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        self.set_hard_state(&hs)
    }

    /// Takes a snapshot of the state machine at `index` (applied) and drops the entries
    /// it covers.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<()> {
        if index <= self.snapshot.get_metadata().index || index > self.last() {
            return Ok(());
        }
        let term = self.term_of(index)?;
        let conf = self.snapshot.get_metadata().get_conf_state().clone();
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf);
        // Counted against the old snapshot, before it is replaced.
        let covered = (index - self.snapshot.get_metadata().index) as usize;
        self.write_snapshot(&snap)?;
        self.entries.drain(..covered.min(self.entries.len()));
        self.rewrite_wal()
    }

    /// The latest snapshot (data may be empty before the first compaction).
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn write_snapshot(&mut self, snap: &Snapshot) -> Result<()> {
        let bytes = snap
            .write_to_bytes()
            .map_err(|e| BrokerError::Internal(format!("encoding a snapshot: {e}")))?;
        write_atomically(&self.dir.join(SNAPSHOT), &bytes)?;
        self.snapshot = snap.clone();
        Ok(())
    }

    /// Replaces the WAL with exactly the entries held now (after the snapshot).
    fn rewrite_wal(&mut self) -> Result<()> {
        let buf = frame_entries(&self.entries)?;
        let path = self.dir.join(WAL);
        write_atomically(&path, &buf)?;
        self.wal = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| storage_err(&path, e))?;
        Ok(())
    }

    fn term_of(&self, idx: u64) -> Result<u64> {
        raft::Storage::term(self, idx).map_err(|e| {
            BrokerError::Internal(format!(
                "no Raft entry {idx} (log holds {}..={}): {e}",
                self.first(),
                self.last()
            ))
        })
    }
}

/// The WAL records of `ents`: `[len u32][crc32 u32][Entry]` each.
fn frame_entries(ents: &[Entry]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    for e in ents {
        let bytes = e
            .write_to_bytes()
            .map_err(|err| BrokerError::Internal(format!("encoding a Raft entry: {err}")))?;
        buf.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        buf.extend_from_slice(&crc32fast::hash(&bytes).to_be_bytes());
        buf.extend_from_slice(&bytes);
    }
    Ok(buf)
}

/// Replaces entries from `index` on with `ents` (the Raft append rule).
fn splice(entries: &mut Vec<Entry>, snapshot_index: u64, index: u64, ents: &[Entry]) {
    let keep = index.saturating_sub(snapshot_index + 1) as usize;
    entries.truncate(keep.min(entries.len()));
    // Entries at or below the snapshot are already covered by it.
    entries.extend(ents.iter().filter(|e| e.index > snapshot_index).cloned());
}

/// Reads the WAL: the entries after `snapshot_index`, and the length of its valid prefix.
fn replay(path: &Path, snapshot_index: u64) -> Result<(Vec<Entry>, u64)> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(storage_err(path, e)),
    };
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= data.len() {
        let len =
            u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]) as usize;
        let crc = u32::from_be_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        let Some(body) = data.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        let Ok(e) = Entry::parse_from_bytes(body) else {
            break;
        };
        splice(
            &mut entries,
            snapshot_index,
            e.index,
            std::slice::from_ref(&e),
        );
        pos += 8 + len;
    }
    Ok((entries, pos as u64))
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard.clone(),
            conf_state: self.snapshot.get_metadata().get_conf_state().clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let from = (low - self.first()) as usize;
        let to = (high - self.first()) as usize;
        let mut out = self.entries[from..to].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.snapshot.get_metadata();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < snap.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        let mut e = Entry {
            index,
            term,
            ..Entry::default()
        };
        e.set_data(data.as_bytes().to_vec().into());
        e
    }

    fn datas(s: &RaftStore) -> Vec<String> {
        s.entries
            .iter()
            .map(|e| format!("{}:{}", e.index, String::from_utf8_lossy(e.get_data())))
            .collect()
    }

    #[test]
    fn appends_overwrite_conflicting_tails_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RaftStore::open(dir.path(), &[1, 2, 3]).expect("open");
        assert_eq!(
            s.initial_state().expect("state").conf_state.voters,
            vec![1, 2, 3]
        );
        s.append(&[entry(1, 1, "a"), entry(2, 1, "b"), entry(3, 1, "c")])
            .expect("append");
        // A new leader overwrites from index 2.
        s.append(&[entry(2, 2, "B"), entry(3, 2, "C"), entry(4, 2, "D")])
            .expect("append");
        let hs = HardState {
            term: 2,
            vote: 3,
            commit: 3,
            ..HardState::default()
        };
        s.set_hard_state(&hs).expect("hard state");
        let want = ["1:a", "2:B", "3:C", "4:D"];
        assert_eq!(datas(&s), want);
        drop(s);
        let s = RaftStore::open(dir.path(), &[1, 2, 3]).expect("reopen");
        assert_eq!(datas(&s), want);
        assert_eq!(s.initial_state().expect("state").hard_state, hs);
        assert_eq!(s.term(3).expect("term"), 2);
        assert_eq!(
            s.entries(2, 4, None, GetEntriesContext::empty(false))
                .expect("entries")
                .len(),
            2
        );
    }

    #[test]
    fn compaction_keeps_the_tail_and_a_torn_wal_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RaftStore::open(dir.path(), &[1]).expect("open");
        let ents: Vec<Entry> = (1..=10).map(|i| entry(i, 1, &format!("e{i}"))).collect();
        s.append(&ents).expect("append");
        s.compact(6, b"state@6".to_vec()).expect("compact");
        assert_eq!(s.first_index().expect("first"), 7);
        assert_eq!(s.term(6).expect("term at the snapshot"), 1);
        assert!(matches!(
            s.entries(5, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(s.snapshot(6, 2).expect("snapshot").get_data(), b"state@6");
        assert_eq!(s.term(7).expect("term"), 1);
        assert_eq!(datas(&s), ["7:e7", "8:e8", "9:e9", "10:e10"]);
        drop(s);
        // A crash mid-append leaves half a record at the end of the WAL.
        let mut wal = OpenOptions::new()
            .append(true)
            .open(dir.path().join(WAL))
            .expect("wal");
        wal.write_all(&[0, 0, 0, 50, 1, 2, 3]).expect("torn");
        drop(wal);
        let mut s = RaftStore::open(dir.path(), &[1]).expect("reopen");
        assert_eq!(datas(&s), ["7:e7", "8:e8", "9:e9", "10:e10"]);
        s.append(&[entry(11, 1, "e11")])
            .expect("append after the cut");
        drop(s);
        let s = RaftStore::open(dir.path(), &[1]).expect("reopen");
        assert_eq!(s.last_index().expect("last"), 11);
    }

    #[test]
    fn an_installed_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RaftStore::open(dir.path(), &[1, 2]).expect("open");
        s.append(&[entry(1, 1, "old")]).expect("append");
        let mut snap = Snapshot::default();
        snap.set_data(b"leader state".to_vec().into());
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 3;
        snap.mut_metadata()
            .set_conf_state(ConfState::from((vec![1, 2], vec![])));
        s.apply_snapshot(&snap).expect("install");
        assert_eq!(s.first_index().expect("first"), 21);
        assert_eq!(s.last_index().expect("last"), 20);
        drop(s);
        let s = RaftStore::open(dir.path(), &[1, 2]).expect("reopen");
        assert_eq!(s.latest_snapshot().get_data(), b"leader state");
        assert_eq!(s.initial_state().expect("state").hard_state.commit, 20);
    }
}
