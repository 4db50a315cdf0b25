//! When to start a suspend: the kernel's timer tick, as seen from when dm's ioctls return.
//!
//! A dm suspend waits for two SRCU grace periods and a table swap for a third, with every
//! I/O to the device held meanwhile. Where the kernel ends a grace period only on its timer
//! tick (Tiny SRCU runs its grace periods from an irq_work, which an architecture without a
//! self-interrupt, User-Mode Linux, runs from the tick; HZ=100 there), a suspend returns on
//! the second tick after it began: one started 1 ms before a tick holds I/O 11 ms, one started
//! just after a tick 20 ms (measured on the test bed's 7.2 kernel: 10.8 ms and 19.5 ms, an
//! idle device, nothing in flight). The time until then is spent either way, suspended or
//! not, so waiting for the right moment with the device live costs the conversion nothing
//! and takes up to a tick off every suspended window.
//!
//! [`TickGrid`] learns the grid from the moments suspends returned (a resume that swaps
//! tables also ends on a tick, but returns only after destroying the old table, at any time
//! after it). Only when the last few all sit on one grid of a plausible tick period (on
//! distinct ticks of it, a little after each) does it say to wait; on a kernel whose
//! suspends return at any time it never does, and luksify suspends at once, as before.

use std::collections::VecDeque;

/// Tick periods looked for (HZ=100, 250, 300), longest first. Shorter ones (HZ=1000) are
/// not worth aligning to and too easily matched by chance.
const PERIODS_NS: [u64; 3] = [10_000_000, 4_000_000, 3_333_333];
/// How many of the latest returns must sit on the grid.
pub const NEED: usize = 5;
/// How far apart (after the tick) returns on one grid may land: the suspending task runs
/// again only when the CPU is free (the test bed's writer and dm-crypt's workers compete for
/// its one CPU); at most an eighth of the period.
const SPREAD_NS: u64 = 1_500_000;
/// How long before a tick a suspend is started: the ioctl's way from the call to its first
/// grace period (1 ms before the tick catches it, 0.5 ms does not always), and the sleep's
/// own lateness when the CPU is busy.
const LEAD_NS: u64 = 1_500_000;

/// The kernel's tick grid, learnt from when suspends returned (see the module's doc).
/// Times are nanoseconds from any fixed origin, observed in order.
#[derive(Debug, Clone, Default)]
pub struct TickGrid {
    marks: VecDeque<u64>,
}

impl TickGrid {
    pub fn new() -> TickGrid {
        TickGrid::default()
    }

    /// A suspend returned at `t` (no earlier than the one observed before).
    pub fn observe(&mut self, t: u64) {
        if self.marks.len() == NEED {
            self.marks.pop_front();
        }
        self.marks.push_back(t);
    }

    /// Suspends returned at `marks` (in order), taken as times since `origin` (no later than
    /// any of them).
    pub fn observe_since(&mut self, origin: std::time::Instant, marks: &[std::time::Instant]) {
        for &m in marks {
            self.observe((m - origin).as_nanos() as u64);
        }
    }

    /// The grid the latest returns sit on: (period, phase of the tick), phase in [0, period).
    /// Returns land on a tick or a little after it: the earliest of them, modulo the period,
    /// is taken for the tick.
    pub fn grid(&self) -> Option<(u64, u64)> {
        if self.marks.len() < NEED {
            return None;
        }
        let last = *self.marks.back()?;
        PERIODS_NS.into_iter().find_map(|p| {
            let spread = SPREAD_NS.min(p / 8);
            // on distinct ticks: returns bunched closer than a period prove no grid
            if self.marks.iter().zip(self.marks.iter().skip(1)).any(|(a, b)| b.saturating_sub(*a) < p - spread) {
                return None;
            }
            // each return's offset from the last one's, modulo the period, in (-p/2, p/2]
            let offsets = self.marks.iter().map(|&m| {
                let r = (m + p - last % p) % p;
                if r > p / 2 {
                    r as i64 - p as i64
                } else {
                    r as i64
                }
            });
            let (lo, hi) = offsets.fold((i64::MAX, i64::MIN), |(lo, hi), o| (lo.min(o), hi.max(o)));
            // lo <= 0 (the last return's own offset is 0)
            ((hi - lo) as u64 <= spread).then(|| (p, (last % p + p - lo.unsigned_abs()) % p))
        })
    }

    /// How long to wait at `now` so that a suspend starts [`LEAD_NS`] before a tick: zero
    /// if no grid is known (or the moment is now).
    pub fn wait_before_suspend(&self, now: u64) -> u64 {
        let Some((p, phase)) = self.grid() else { return 0 };
        // the next tick at or after now + LEAD
        let since = (now + LEAD_NS + p - phase) % p; // time since the last tick, at now + LEAD
        match since {
            0 => 0,
            s => p - s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn grid_of(marks: &[u64]) -> TickGrid {
        let mut g = TickGrid::new();
        for &m in marks {
            g.observe(m);
        }
        g
    }

    #[test]
    fn returns_on_a_10ms_grid_are_found_and_the_suspend_waits_for_lead_before_the_next_tick() {
        // ticks at ..3 ms; returns 0.2 to 1.1 ms after them, 20, 30, 50, 70 ms apart
        let g = grid_of(&[
            1_003 * MS + 500_000,
            1_023 * MS + 200_000,
            1_053 * MS + 1_100_000,
            1_103 * MS + 400_000,
            1_173 * MS + 900_000,
        ]);
        // the tick: the earliest return modulo the period
        assert_eq!(g.grid(), Some((10 * MS, 3 * MS + 200_000)));
        let g = grid_of(&[1_003 * MS, 1_023 * MS, 1_053 * MS, 1_103 * MS, 1_173 * MS]);
        assert_eq!(g.grid(), Some((10 * MS, 3 * MS)));
        // now = 1_180 ms: next tick 1_183, start at 1_181.5: wait 1.5 ms
        assert_eq!(g.wait_before_suspend(1_180 * MS), 1_500_000);
        // just after a tick: wait 8.5 ms
        assert_eq!(g.wait_before_suspend(1_183 * MS + 1), 8_500_000 - 1);
        // exactly LEAD before a tick: no wait; a bit less than LEAD: the next one
        assert_eq!(g.wait_before_suspend(1_191 * MS + 500_000), 0);
        assert_eq!(g.wait_before_suspend(1_192 * MS), 9_500_000);
    }

    #[test]
    fn a_grid_across_the_period_boundary_is_one_grid() {
        // ticks at ..9.9 ms: returns up to 0.7 ms after them, on both sides of ..0
        let g = grid_of(&[9_900_000, 30_600_000, 50_300_000, 69_900_000, 100_500_000]);
        assert_eq!(g.grid(), Some((10 * MS, 9_900_000)));
    }

    #[test]
    fn every_wait_lands_lead_before_a_tick_and_is_shorter_than_a_period() {
        let g = grid_of(&[7 * MS, 17 * MS, 47 * MS, 67 * MS, 107 * MS]);
        for now in (200 * MS..230 * MS).step_by(123_457) {
            let w = g.wait_before_suspend(now);
            assert!(w < 10 * MS, "{now}: {w}");
            assert_eq!((now + w + LEAD_NS) % (10 * MS), 7 * MS, "{now}: {w}");
        }
    }

    #[test]
    fn a_250hz_grid_is_found_as_such() {
        let g = grid_of(&[4 * MS + 100, 12 * MS, 24 * MS, 36 * MS + 150_000, 44 * MS + 300_000]);
        assert_eq!(g.grid(), Some((4 * MS, 0)));
    }

    #[test]
    fn no_grid_no_wait() {
        // too few returns
        let g = grid_of(&[10 * MS, 20 * MS, 30 * MS, 40 * MS]);
        assert_eq!(g.grid(), None);
        assert_eq!(g.wait_before_suspend(45 * MS), 0);
        // returns at any time (a kernel whose grace periods do not wait for a tick)
        let g = grid_of(&[10 * MS, 23_700_000, 31_100_000, 52_900_000, 66_400_000]);
        assert_eq!(g.grid(), None);
        assert_eq!(g.wait_before_suspend(70 * MS), 0);
        // bunched within the tolerance (the simulator: suspends take microseconds) is no grid
        let g = grid_of(&[10 * MS, 10 * MS + 20_000, 10 * MS + 40_000, 10 * MS + 60_000, 10 * MS + 80_000]);
        assert_eq!(g.grid(), None);
        // more spread than a return's lateness explains
        let g = grid_of(&[3 * MS, 13 * MS + 1_700_000, 23 * MS, 33 * MS, 43 * MS]);
        assert_eq!(g.grid(), None);
        // one return off the grid among the last five is enough to stop waiting
        let g = grid_of(&[3 * MS, 13 * MS, 28 * MS, 43 * MS + 100_000, 53 * MS]);
        assert_eq!(g.grid(), None);
    }

    #[test]
    fn only_the_latest_returns_count() {
        let mut g = grid_of(&[MS, 5_300_000, 9_900_000, 12_000_000]);
        for t in [23 * MS, 33 * MS, 43 * MS, 63 * MS, 83 * MS] {
            g.observe(t);
        }
        assert_eq!(g.grid(), Some((10 * MS, 3 * MS)));
        g.observe(88 * MS);
        assert_eq!(g.grid(), None);
    }
}
