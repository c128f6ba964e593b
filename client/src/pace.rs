//! Pacing for load tools: sending records at a fixed rate, each timed from when it was
//! due.

use std::time::{Duration, Instant};

/// A fixed-rate schedule: record `i` is due at `start + i * interval`, and a load tool
/// times its latency from then, so a late sender counts against the server.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    interval: Duration,
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
        Schedule { start, interval }
    }

    /// When record `i` is due.
    pub fn due(&self, i: u64) -> Instant {
        // In integers: the interval is whole nanoseconds already, and a float multiply
        // for every record cost a load tool a visible share of its CPU.
        let nanos = u64::try_from(self.interval.as_nanos()).unwrap_or(u64::MAX);
        self.start + Duration::from_nanos(nanos.saturating_mul(i))
    }

    /// Blocks this thread until record `next` is due, then returns the end (exclusive,
    /// at most `limit`) of the run of records due by now, so a late wake sends them
    /// together. A thread sleeps to within tens of microseconds; an async runtime's
    /// timer ticks in milliseconds and would count its lateness against the server.
    pub fn wait_due(&self, next: u64, limit: u64) -> u64 {
        let at = self.due(next);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
