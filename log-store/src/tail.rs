//! The newest batches of a log as a snapshot that readers slice without the log's
//! owner: a consumer that keeps up with producers reads what was just appended without
//! a round trip to whoever writes the log.

use std::sync::Arc;

use bytes::Bytes;

use crate::batch::BatchHeader;
use crate::segment::read_end;

/// Bytes between two anchors: a read walks at most this far through batch headers.
const ANCHOR_EVERY: u64 = 64 << 10;
/// How far back from the log end a view reaches; readers further behind go to the log.
const WINDOW: u64 = 4 << 20;

/// A batch boundary in the active segment: its base offset and file position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Anchor {
    offset: u64,
    position: u64,
}

/// Where batches start in the newest part of the active segment, kept by the log as it
/// appends. Cleared whenever the active segment changes under it (roll, truncation).
#[derive(Debug, Default)]
pub(crate) struct TailAnchors {
    /// Shared with published views; a new anchor copies it only when a view holds it.
    anchors: Arc<Vec<Anchor>>,
    since_last: u64,
}

impl TailAnchors {
    /// Records a batch of `len` bytes at `position` of the active segment.
    pub(crate) fn appended(&mut self, offset: u64, position: u64, len: u64) {
        if self.anchors.is_empty() || self.since_last >= ANCHOR_EVERY {
            let anchors = Arc::make_mut(&mut self.anchors);
            let end = position + len;
            // Keep the window: the second anchor still reaches back far enough.
            while anchors.len() > 1 && end - anchors[1].position > WINDOW {
                anchors.remove(0);
            }
            anchors.push(Anchor { offset, position });
            self.since_last = 0;
        }
        self.since_last += len;
    }

    /// Forgets every anchor: the active segment is no longer what they describe.
    pub(crate) fn clear(&mut self) {
        self.anchors = Arc::new(Vec::new());
        self.since_last = 0;
    }

    /// A view over `written`, the active segment's bytes so far, ending at `end_offset`.
    pub(crate) fn view(&self, written: Bytes, end_offset: u64) -> TailView {
        TailView {
            written,
            anchors: Arc::clone(&self.anchors),
            end_offset,
        }
    }
}

/// A snapshot of the newest batches of a log (see [`crate::Log::tail_view`]). Cheap to
/// clone; holding one keeps the segment's mapping alive, not the log.
#[derive(Debug, Clone, Default)]
pub struct TailView {
    written: Bytes,
    anchors: Arc<Vec<Anchor>>,
    end_offset: u64,
}

impl TailView {
    /// The log end offset when the view was taken.
    pub fn end_offset(&self) -> u64 {
        self.end_offset
    }

    /// What [`crate::Log::read_bounded`] would return, if the batch holding `offset` is
    /// in the view; `None` when it is not (too old, past the view's end, or no view), and
    /// the log must be asked instead.
    pub fn read(&self, offset: u64, max_bytes: usize, upper: u64) -> Option<Bytes> {
        if offset >= self.end_offset {
            return None;
        }
        let i = self.anchors.partition_point(|a| a.offset <= offset);
        let anchor = self.anchors.get(i.checked_sub(1)?)?;
        let data = &self.written[..];
        let mut start = usize::try_from(anchor.position).ok()?;
        loop {
            let header = header_at(data, start)?;
            if header.last_offset() >= offset {
                break;
            }
            start += header.total_len();
        }
        let end = read_end(start as u64, data.len() as u64, max_bytes, upper, |p| {
            header_at(data, p as usize).ok_or(())
        })
        .ok()?;
        Some(self.written.slice(start..end as usize))
    }
}

/// The header of a whole batch at `pos`, or `None` when there is none.
fn header_at(data: &[u8], pos: usize) -> Option<BatchHeader> {
    let header = BatchHeader::parse(data.get(pos..)?).ok()?;
    (pos + header.total_len() <= data.len()).then_some(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Compression, RecordBatchBuilder};

    /// Three batches of `n` records each from offset 0, back to back, with their anchors.
    fn written(n: u32, anchor_every_batch: bool) -> (Bytes, TailAnchors) {
        let mut out = Vec::new();
        let mut anchors = TailAnchors::default();
        for b in 0..3u32 {
            let mut builder = RecordBatchBuilder::new(Compression::None);
            for i in 0..n {
                builder.append(1000, None, Some(format!("r{b}-{i}").as_bytes()), &[]);
            }
            let mut batch = builder.build().expect("build").to_vec();
            let base = u64::from(b * n);
            batch[..8].copy_from_slice(&(base as i64).to_be_bytes());
            if anchor_every_batch {
                anchors.since_last = ANCHOR_EVERY;
            }
            anchors.appended(base, out.len() as u64, batch.len() as u64);
            out.extend_from_slice(&batch);
        }
        (Bytes::from(out), anchors)
    }

    fn offsets(data: Bytes) -> Vec<u64> {
        crate::BatchIter::new(data)
            .map(|b| b.expect("batch").header().base_offset)
            .collect()
    }

    #[test]
    fn reads_whole_batches_from_the_one_holding_the_offset() {
        for every in [false, true] {
            let (data, anchors) = written(4, every);
            let view = anchors.view(data.clone(), 12);
            assert_eq!(
                offsets(view.read(0, 1 << 20, 12).expect("in view")),
                [0, 4, 8]
            );
            assert_eq!(offsets(view.read(5, 1 << 20, 12).expect("in view")), [4, 8]);
            // Below the upper bound only.
            assert_eq!(offsets(view.read(1, 1 << 20, 8).expect("in view")), [0, 4]);
            assert!(view.read(8, 1 << 20, 8).expect("in view").is_empty());
            // At least one batch, then only what fits.
            assert_eq!(offsets(view.read(0, 1, 12).expect("in view")), [0]);
            // At or past the end, the log answers.
            assert_eq!(view.read(12, 1 << 20, 12), None);
        }
    }

    #[test]
    fn offsets_before_the_first_anchor_or_without_a_view_go_to_the_log() {
        let (data, mut anchors) = written(4, true);
        anchors.anchors = Arc::new(anchors.anchors[1..].to_vec());
        let view = anchors.view(data, 12);
        assert_eq!(view.read(3, 1 << 20, 12), None);
        assert_eq!(offsets(view.read(4, 1 << 20, 12).expect("in view")), [4, 8]);
        assert_eq!(TailView::default().read(0, 1 << 20, 12), None);
        anchors.clear();
        assert_eq!(anchors.view(Bytes::new(), 12).read(0, 1 << 20, 12), None);
    }

    #[test]
    fn old_anchors_leave_once_the_window_has_passed_them() {
        let mut anchors = TailAnchors::default();
        let len = ANCHOR_EVERY;
        let n = WINDOW / len + 10;
        for i in 0..n {
            anchors.appended(i, i * len, len);
        }
        let kept = &anchors.anchors;
        let end = n * len;
        assert!(end - kept[0].position > WINDOW, "kept too little");
        assert!(end - kept[1].position <= WINDOW, "kept too much");
        assert_eq!(kept.last().map(|a| a.offset), Some(n - 1));
    }
}
