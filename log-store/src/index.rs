//! Sparse, mmapped index files: the offset index (relative offset → file position) and
//! the time index (max timestamp so far → relative offset).
//!
//! The active segment's index files are preallocated to `segment.index.bytes` and
//! written through a mutable map; sealing trims them to their entries and maps them
//! read-only. An index is only a cache of what the log holds: recovery rebuilds it from
//! the log whenever it cannot be trusted.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, MmapMut, MmapOptions};

use crate::error::{Error, Result};

/// Width of an offset-index entry: relative offset u32, position u32.
pub(crate) const OFFSET_ENTRY: usize = 8;
/// Width of a time-index entry: timestamp i64, relative offset u32.
pub(crate) const TIME_ENTRY: usize = 12;

enum Map {
    None,
    Writable(MmapMut),
    ReadOnly(Mmap),
}

impl Map {
    fn bytes(&self) -> &[u8] {
        match self {
            Map::None => &[],
            Map::Writable(m) => m,
            Map::ReadOnly(m) => m,
        }
    }
}

/// One index file of fixed-width, big-endian entries sorted by key.
pub(crate) struct IndexFile {
    path: PathBuf,
    file: File,
    map: Map,
    width: usize,
    entries: usize,
}

impl IndexFile {
    /// Opens a sealed segment's index read-only. Fails with `None` inside `Ok` when the
    /// file is missing or its size is not whole entries, so the caller rebuilds it.
    pub(crate) fn open_sealed(path: &Path, width: usize) -> Result<Option<Self>> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
        if !len.is_multiple_of(width) {
            return Ok(None);
        }
        let map = map_read_only(&file, path, len)?;
        Ok(Some(IndexFile {
            path: path.to_path_buf(),
            file,
            map,
            width,
            entries: len / width,
        }))
    }

    /// Opens (or creates) an active segment's index, preallocated to `max_bytes`. With
    /// `keep_entries` the file's current whole entries are kept (it was trimmed by a clean
    /// close); otherwise it starts empty.
    pub(crate) fn open_active(
        path: &Path,
        width: usize,
        max_bytes: u32,
        keep_entries: bool,
    ) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
        let capacity = (max_bytes as usize / width) * width;
        let entries = if keep_entries && len.is_multiple_of(width) && len <= capacity {
            len / width
        } else {
            0
        };
        if entries == 0 {
            file.set_len(0).map_err(|e| Error::io(path, e))?;
        }
        preallocate(&file, path, capacity)?;
        let map = map_writable(&file, path)?;
        // Past the kept entries the file reads as zeros: it was cut to them (or to
        // nothing) before being extended, so the preallocation stays sparse.
        Ok(IndexFile {
            path: path.to_path_buf(),
            file,
            map,
            width,
            entries,
        })
    }

    /// Zeroes entries from `entry` up to the current count.
    fn zero_from(&mut self, entry: usize) {
        if let Map::Writable(m) = &mut self.map {
            let start = (entry * self.width).min(m.len());
            let end = (self.entries * self.width).min(m.len());
            if start < end {
                m[start..end].fill(0);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries
    }

    pub(crate) fn is_full(&self) -> bool {
        match &self.map {
            Map::Writable(m) => (self.entries + 1) * self.width > m.len(),
            _ => true,
        }
    }

    pub(crate) fn entry(&self, i: usize) -> &[u8] {
        &self.map.bytes()[i * self.width..(i + 1) * self.width]
    }

    /// Appends an entry; returns false when the index is full or sealed.
    pub(crate) fn push(&mut self, entry: &[u8]) -> bool {
        debug_assert_eq!(entry.len(), self.width);
        if self.is_full() {
            return false;
        }
        let at = self.entries * self.width;
        if let Map::Writable(m) = &mut self.map {
            m[at..at + self.width].copy_from_slice(entry);
            self.entries += 1;
            true
        } else {
            false
        }
    }

    /// Keeps only the first `n` entries.
    pub(crate) fn truncate_entries(&mut self, n: usize) {
        if n < self.entries {
            self.zero_from(n);
            self.entries = n;
        }
    }

    /// The last index `i` with `key(entry(i)) <= target`, by binary search.
    pub(crate) fn floor<K: Ord>(&self, target: K, key: impl Fn(&[u8]) -> K) -> Option<usize> {
        let (mut lo, mut hi) = (0usize, self.entries);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if key(self.entry(mid)) <= target {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo.checked_sub(1)
    }

    /// Trims the file to its entries, syncs it and maps it read-only.
    pub(crate) fn seal(&mut self) -> Result<()> {
        // Never change the size of a mapped file: unmap first. No `msync` before: the
        // pages written through the map stay in the page cache, and the `fsync` below
        // writes them; syncing twice made a roll wait for the disk twice per index.
        self.map = Map::None;
        let len = self.entries * self.width;
        self.file
            .set_len(len as u64)
            .map_err(|e| Error::io(&self.path, e))?;
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        self.map = map_read_only(&self.file, &self.path, len)?;
        Ok(())
    }

    /// Reopens a sealed index for appends (after a truncation made its segment active).
    pub(crate) fn unseal(&mut self, max_bytes: u32) -> Result<()> {
        self.map = Map::None;
        let capacity = (max_bytes as usize / self.width) * self.width;
        let capacity = capacity.max(self.entries * self.width);
        preallocate(&self.file, &self.path, capacity)?;
        // The file was trimmed to its entries when sealed, so the extension reads as zeros.
        self.map = map_writable(&self.file, &self.path)?;
        Ok(())
    }
}

/// Extends the file to `len` with blocks reserved on disk. A sparse file would be
/// cheaper, but writing a mapped page of a sparse file on a full disk kills the process
/// with SIGBUS; reserving the blocks turns that into an ordinary ENOSPC here.
fn preallocate(file: &File, path: &Path, len: usize) -> Result<()> {
    let current = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if current >= len as u64 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len as u64) {
        Ok(()) => Ok(()),
        // File systems without fallocate get a sparse extension instead.
        Err(rustix::io::Errno::OPNOTSUPP) => {
            file.set_len(len as u64).map_err(|e| Error::io(path, e))
        }
        Err(e) => {
            let err = std::io::Error::from(e);
            // Leave the file as it was: callers may retry once space is freed.
            let _ = file.set_len(current);
            Err(Error::io(path, err))
        }
    }
}

#[allow(unsafe_code)]
fn map_read_only(file: &File, path: &Path, len: usize) -> Result<Map> {
    if len == 0 {
        return Ok(Map::None);
    }
    // SAFETY: index files are private to this log; no other process writes them, and this
    // handle never changes the file's size while the map is alive (seal/unseal unmap
    // first).
    let m = unsafe { MmapOptions::new().len(len).map(file) }.map_err(|e| Error::io(path, e))?;
    Ok(Map::ReadOnly(m))
}

#[allow(unsafe_code)]
fn map_writable(file: &File, path: &Path) -> Result<Map> {
    // SAFETY: as in `map_read_only`; the file was just sized to the full map length.
    let m = unsafe { MmapOptions::new().map_mut(file) }.map_err(|e| Error::io(path, e))?;
    // No readahead: the first entry written to a new index faulted in a whole readahead
    // window of the preallocated file (8 MiB on a disk that reads ahead that far), about
    // 2 ms per index, and an append waited for both as a new segment took its first
    // entries. Entries are written one page at a time and looked up by binary search
    // anyway. Advice only: a kernel that refuses it leaves the map as it was.
    let _ = m.advise(Advice::Random);
    Ok(Map::Writable(m))
}

/// Encodes an offset-index entry.
pub(crate) fn offset_entry(relative_offset: u32, position: u32) -> [u8; OFFSET_ENTRY] {
    let mut e = [0u8; OFFSET_ENTRY];
    e[..4].copy_from_slice(&relative_offset.to_be_bytes());
    e[4..].copy_from_slice(&position.to_be_bytes());
    e
}

/// Decodes an offset-index entry.
pub(crate) fn read_offset_entry(e: &[u8]) -> (u32, u32) {
    (
        u32::from_be_bytes([e[0], e[1], e[2], e[3]]),
        u32::from_be_bytes([e[4], e[5], e[6], e[7]]),
    )
}

/// Encodes a time-index entry.
pub(crate) fn time_entry(timestamp: i64, relative_offset: u32) -> [u8; TIME_ENTRY] {
    let mut e = [0u8; TIME_ENTRY];
    e[..8].copy_from_slice(&timestamp.to_be_bytes());
    e[8..].copy_from_slice(&relative_offset.to_be_bytes());
    e
}

/// Decodes a time-index entry.
pub(crate) fn read_time_entry(e: &[u8]) -> (i64, u32) {
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&e[..8]);
    (
        i64::from_be_bytes(ts),
        u32::from_be_bytes([e[8], e[9], e[10], e[11]]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_floor_seal_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.index");
        let mut idx = IndexFile::open_active(&path, OFFSET_ENTRY, 1024, false).expect("open");
        for i in 0..10u32 {
            assert!(idx.push(&offset_entry(i * 10, i * 100)));
        }
        let key = |e: &[u8]| read_offset_entry(e).0;
        assert_eq!(idx.floor(0, key), Some(0));
        assert_eq!(idx.floor(15, key), Some(1));
        assert_eq!(idx.floor(1000, key), Some(9));
        idx.seal().expect("seal");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 80);
        drop(idx);
        let idx = IndexFile::open_sealed(&path, OFFSET_ENTRY)
            .expect("open")
            .expect("whole entries");
        assert_eq!(idx.len(), 10);
        assert_eq!(read_offset_entry(idx.entry(9)), (90, 900));
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_new_index_reads_no_pages_ahead_of_its_first_entry() {
        // On the disk, not in a tmpfs `/tmp`, where preallocating would fill every page.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let path = dir.path().join("0.index");
        let mut idx = IndexFile::open_active(&path, OFFSET_ENTRY, 10 << 20, false).expect("open");
        assert!(idx.push(&offset_entry(0, 0)));
        let map = idx.map.bytes();
        // SAFETY: sysconf reads a constant.
        let page =
            usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
        let mut resident = vec![0u8; map.len().div_ceil(page)];
        // SAFETY: the range is this live, page-aligned mapping, and `resident` has a byte
        // for each of its pages.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                map.len(),
                resident.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        let pages = resident.iter().filter(|b| **b & 1 == 1).count();
        assert!(
            pages <= 4,
            "{pages} of {} pages of a new index are in memory",
            resident.len()
        );
    }

    #[test]
    fn full_index_refuses_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.timeindex");
        let mut idx = IndexFile::open_active(&path, TIME_ENTRY, 36, false).expect("open");
        assert!(idx.push(&time_entry(1, 1)));
        assert!(idx.push(&time_entry(2, 2)));
        assert!(idx.push(&time_entry(3, 3)));
        assert!(idx.is_full());
        assert!(!idx.push(&time_entry(4, 4)));
    }

    #[test]
    fn partial_entries_mean_rebuild() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.index");
        std::fs::write(&path, [0u8; 13]).expect("write");
        assert!(IndexFile::open_sealed(&path, OFFSET_ENTRY)
            .expect("open")
            .is_none());
    }
}
