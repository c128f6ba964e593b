//! Which sealed segments retention deletes: a pure function of their sizes and ages.

/// What retention needs to know of one sealed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentStats {
    /// Bytes in the segment's log file.
    pub size_bytes: u64,
    /// Largest record timestamp in the segment (ms).
    pub max_timestamp: i64,
}

/// How many of the oldest sealed segments to delete.
///
/// A segment goes when its newest record is older than `retention_ms`, or while the
/// whole log (sealed segments plus `active_bytes`) would still be at least
/// `retention_bytes` without it. Deletion is always a prefix: a young segment stops the
/// time rule even if an older-looking one follows it, so the log never gets a hole.
pub fn segments_to_delete(
    sealed: &[SegmentStats],
    active_bytes: u64,
    now_ms: i64,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
) -> usize {
    let by_time = match retention_ms {
        Some(ms) => {
            let cutoff = now_ms.saturating_sub(i64::try_from(ms).unwrap_or(i64::MAX));
            sealed
                .iter()
                .take_while(|s| s.max_timestamp < cutoff)
                .count()
        }
        None => 0,
    };
    let by_size = match retention_bytes {
        Some(limit) => {
            let mut total: u64 = sealed.iter().map(|s| s.size_bytes).sum::<u64>() + active_bytes;
            let mut n = 0;
            for s in sealed {
                if total.saturating_sub(s.size_bytes) < limit {
                    break;
                }
                total -= s.size_bytes;
                n += 1;
            }
            n
        }
        None => 0,
    };
    by_time.max(by_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(size_bytes: u64, max_timestamp: i64) -> SegmentStats {
        SegmentStats {
            size_bytes,
            max_timestamp,
        }
    }

    #[test]
    fn table() {
        let segs = [seg(100, 10), seg(100, 20), seg(100, 30)];
        // (active bytes, now, retention.ms, retention.bytes, expected)
        type Case = (u64, i64, Option<u64>, Option<u64>, usize);
        let cases: &[Case] = &[
            (100, 1000, None, None, 0),
            (100, 25, Some(10), None, 1), // cutoff 15: only the first is older
            (100, 1000, Some(10), None, 3), // all sealed are old; active never goes
            (100, 31, Some(0), None, 3),
            (100, 30, Some(0), None, 2), // max ts 30 is not older than cutoff 30
            (100, 0, None, Some(400), 0),
            (100, 0, None, Some(300), 1),
            (100, 0, None, Some(150), 2),
            (100, 0, None, Some(1), 3),
            (100, 25, Some(10), Some(150), 2), // the stricter rule wins
        ];
        for &(active, now, ms, bytes, want) in cases {
            assert_eq!(
                segments_to_delete(&segs, active, now, ms, bytes),
                want,
                "active={active} now={now} ms={ms:?} bytes={bytes:?}"
            );
        }
    }

    #[test]
    fn time_rule_deletes_only_a_prefix() {
        let segs = [seg(1, 10), seg(1, 100), seg(1, 10)];
        assert_eq!(segments_to_delete(&segs, 0, 50, Some(0), None), 1);
    }
}
