//! Pacing for load tools: sending records at a fixed rate, each timed from when it was
//! due.

use std::time::{Duration, Instant};

/// A fixed-rate schedule: record `i` is due at `start + i * interval`, and a load tool
/// times its latency from then, so a late sender counts against the server.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    interval: Duration,
    /// Least time between the last record one wake sent falling due and the next wake.
    wake_gap: Duration,
}

impl Schedule {
    /// A schedule of `per_second` records a second from now.
    pub fn new(per_second: f64) -> Schedule {
        Schedule::starting_at(
            Instant::now(),
            Duration::from_secs_f64(1.0 / per_second.max(1e-9)),
        )
    }

    /// A schedule of one record each `interval` from `start`.
    pub fn starting_at(start: Instant, interval: Duration) -> Schedule {
        Schedule {
            start,
            interval,
            wake_gap: Duration::ZERO,
        }
    }

    /// The same schedule, its sender waking no sooner than `gap` after the record before
    /// the next one fell due, so each wake sends a larger group and no record waits more
    /// than `gap` past its time. Waking costs the sender (a
    /// sleep, a hand-off to the client) whatever it sends; records are still timed from
    /// when they fell due, so the wait counts against the latency measured.
    pub fn with_wake_gap(self, gap: Duration) -> Schedule {
        Schedule {
            wake_gap: gap,
            ..self
        }
    }

    /// When record `i` is due.
    pub fn due(&self, i: u64) -> Instant {
        // In integers: the interval is whole nanoseconds already, and a float multiply
        // for every record cost a load tool a visible share of its CPU.
        let nanos = u64::try_from(self.interval.as_nanos()).unwrap_or(u64::MAX);
        self.start + Duration::from_nanos(nanos.saturating_mul(i))
    }

    /// Blocks this thread until record `next` is due (and the wake gap, if any, has
    /// passed since record `next - 1` was), then returns the end (exclusive,
    /// at most `limit`) of the run of records due by now, so a late wake sends them
    /// together. A thread sleeps to within tens of microseconds; an async runtime's
    /// timer ticks in milliseconds and would count its lateness against the server.
    pub fn wait_due(&self, next: u64, limit: u64) -> u64 {
        let mut at = self.due(next);
        if next > 0 && !self.wake_gap.is_zero() {
            at = at.max(self.due(next - 1) + self.wake_gap);
        }
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let behind = (Instant::now() - self.start).as_secs_f64() / self.interval.as_secs_f64();
        ((behind as u64) + 1)
            .clamp(next + 1, next + 4096)
            .min(limit)
    }

    /// Sends records `0..records` on schedule from the calling thread, which may block:
    /// each time it wakes, every record then due goes through `send(i, due)` on
    /// `runtime`. Stops at the first error.
    pub fn drive<E, F, Fut>(
        &self,
        runtime: &tokio::runtime::Handle,
        records: u64,
        mut send: F,
    ) -> Result<(), E>
    where
        F: FnMut(u64, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let mut i = 0;
        while i < records {
            let end = self.wait_due(i, records);
            runtime.block_on(async {
                for j in i..end {
                    send(j, self.due(j)).await?;
                }
                Ok(())
            })?;
            i = end;
        }
        Ok(())
    }
}

/// Writes a record's value for the end-to-end workload: when the record was due, as
/// nanoseconds since the run started in 8 little-endian bytes, in place of `payload`'s
/// first 8 bytes, then the rest of `payload` (a shorter one makes a value of 8 bytes).
/// Every load tool stamps its records this way, so each reader times them alike.
pub fn put_stamped(out: &mut impl bytes::BufMut, payload: &[u8], since_start: Duration) {
    let nanos = u64::try_from(since_start.as_nanos()).unwrap_or(u64::MAX);
    out.put_u64_le(nanos);
    out.put_slice(payload.get(8..).unwrap_or_default());
}

/// The due time [`put_stamped`] put in `value`, if it holds one.
pub fn stamp_of(value: &[u8]) -> Option<Duration> {
    let nanos = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    Some(Duration::from_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_takes_the_first_eight_bytes_and_reads_back() {
        let payload: Vec<u8> = (0..20).collect();
        let due = Duration::from_nanos(1_234_567_890);
        let mut value = Vec::new();
        put_stamped(&mut value, &payload, due);
        assert_eq!(value.len(), payload.len());
        assert_eq!(&value[8..], &payload[8..]);
        assert_eq!(stamp_of(&value), Some(due));
        let mut short = Vec::new();
        put_stamped(&mut short, b"abc", due);
        assert_eq!(short.len(), 8);
        assert_eq!(stamp_of(b"seven.."), None);
    }

    #[test]
    fn records_fall_due_at_whole_multiples_of_the_interval() {
        let start = Instant::now();
        let s = Schedule::starting_at(start, Duration::from_nanos(625));
        assert_eq!(s.due(0), start);
        assert_eq!(s.due(3), start + Duration::from_nanos(1_875));
        // 1.6 million records a second: the last of a second's records is due 625 ns
        // before the second is out.
        assert_eq!(s.due(1_600_000), start + Duration::from_secs(1));
        assert_eq!(s.due(1_599_999), start + Duration::from_nanos(999_999_375));
    }

    #[test]
    fn a_wake_gap_sends_what_fell_due_meanwhile_in_one_group() {
        // One record every 10 µs, from 50 ms ago: record 5,000 is due now.
        let interval = Duration::from_micros(10);
        let start = Instant::now() - Duration::from_millis(50);
        let plain = Schedule::starting_at(start, interval);
        let gapped = plain.with_wake_gap(Duration::from_millis(20));
        // Without a gap a late sender takes everything due (up to its cap of 4,096).
        assert_eq!(plain.wait_due(100, 1_000_000), 4_196);
        // With one, record 5,000 waits until 20 ms after record 4,999 was due, and by
        // then about 2,000 more have fallen due: they go together.
        let sent_at = Instant::now();
        let end = gapped.wait_due(5_000, 1_000_000);
        let slept = sent_at.elapsed();
        assert!(slept >= Duration::from_millis(15), "slept {slept:?}");
        assert!(end >= 7_000, "end {end}");
        // However many fell due, a wake sends no further than the limit.
        assert_eq!(gapped.wait_due(5_000, 5_001), 5_001);
    }
}
