//! The state machine: from any journaled state, what the next step is, what the journal
//! says after it, and which bridge table a resume rebuilds. Pure.
//!
//! ```text
//!   (none) ──prepare──▶ Prepared ──insert bridge──▶ Bridged ──fence──▶ Migrating{L}
//!   Migrating{c} ──move [c-k, c)──▶ Migrating{c-k} … Migrating{0}
//!   Migrating{0} ──finish (pure crypt table, header at [0,S))──▶ HeaderWritten
//!   HeaderWritten ──LVM resize, wipe tail copies, clear journal──▶ (none)
//! ```

use super::geometry::Geometry;
use super::journal::State;
use super::tables::BridgePhase;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create staging + bridge (linear), reroute every LV onto the bridge (all or none).
    InsertBridge,
    /// Shadow [0, F) in the tail, map it from the shadow, write the marker on the raw device.
    Fence,
    /// Copy [from, to) encrypted to S+from, check it, commit, flip the table to crypt (in
    /// steps of at most 8 MiB, each committed).
    MoveChunk { from: u64, to: u64 },
    /// Pure crypt table, staging removed, header written at [0, S).
    Finish,
    /// LVM resize on the bridge, header copy and shadow wiped, journal cleared.
    Cleanup,
}

/// The next step from `state`.
pub fn next_step(g: &Geometry, state: State) -> Step {
    match state {
        State::Prepared => Step::InsertBridge,
        State::Bridged => Step::Fence,
        State::Migrating { cursor: 0 } => Step::Finish,
        State::Migrating { cursor } => {
            let (from, to) = g.chunk_below(cursor);
            Step::MoveChunk { from, to }
        }
        State::HeaderWritten => Step::Cleanup,
    }
}

/// The state the journal records once `step` is complete; None = journal cleared (done).
pub fn after(state: State, step: Step) -> Option<State> {
    match (state, step) {
        (State::Prepared, Step::InsertBridge) => Some(State::Bridged),
        (State::Bridged, Step::Fence) => Some(State::Migrating { cursor: u64::MAX }),
        (State::Migrating { cursor }, Step::MoveChunk { from, to }) if cursor == to => {
            Some(State::Migrating { cursor: from })
        }
        (State::Migrating { cursor: 0 }, Step::Finish) => Some(State::HeaderWritten),
        (State::HeaderWritten, Step::Cleanup) => None,
        _ => panic!("step {step:?} is not valid from {state:?}"),
    }
    .map(|s| match s {
        // Fence commits the cursor at L; the caller fills it from the geometry.
        State::Migrating { cursor: u64::MAX } => State::Migrating { cursor: u64::MAX },
        other => other,
    })
}

/// `after` with the geometry: the fence's cursor is L.
pub fn after_in(g: &Geometry, state: State, step: Step) -> Option<State> {
    match after(state, step) {
        Some(State::Migrating { cursor: u64::MAX }) => Some(State::Migrating { cursor: g.l }),
        other => other,
    }
}

/// The bridge table a resume rebuilds (or expects to find live) for `state`.
/// Every state has exactly one: the durable truth about where each sector's data is.
pub fn resume_phase(state: State) -> BridgePhase {
    match state {
        // Nothing has moved and nothing is fenced: the identity map.
        State::Prepared | State::Bridged => BridgePhase::Linear,
        // A chunk in flight at the crash is not committed: it is read from its intact source.
        State::Migrating { cursor } => BridgePhase::Steady { cursor },
        State::HeaderWritten => BridgePhase::Final,
    }
}

/// Whether resuming from `state` must (re)write the fence marker on the raw device: while
/// any plaintext is still unmoved, nothing may see a PV on the raw partition.
pub fn needs_marker(state: State) -> bool {
    matches!(state, State::Migrating { cursor } if cursor > 0)
}

/// Whether the staging crypt device is needed in `state`.
pub fn needs_staging(state: State) -> bool {
    matches!(state, State::Prepared | State::Bridged | State::Migrating { .. })
}

/// Fraction of the sectors moved, for progress reports.
pub fn progress(g: &Geometry, state: State) -> f64 {
    match state {
        State::Prepared | State::Bridged => 0.0,
        State::Migrating { cursor } => (g.l - cursor) as f64 / g.l as f64,
        State::HeaderWritten => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry::new(100_000, 10_000, 4096, 4096, 1024).unwrap()
    }

    #[test]
    fn walk_from_prepared_to_done_visits_every_chunk_once() {
        let g = geo();
        let mut st = State::Prepared;
        let mut steps = vec![];
        loop {
            let step = next_step(&g, st);
            steps.push(step);
            match after_in(&g, st, step) {
                Some(n) => st = n,
                None => break,
            }
        }
        assert_eq!(
            steps,
            vec![
                Step::InsertBridge,
                Step::Fence,
                Step::MoveChunk { from: 5904, to: 10_000 },
                Step::MoveChunk { from: 1808, to: 5904 },
                Step::MoveChunk { from: 0, to: 1808 },
                Step::Finish,
                Step::Cleanup,
            ]
        );
    }

    #[test]
    fn every_state_has_one_recovery() {
        let g = geo();
        let mut states = vec![State::Prepared, State::Bridged, State::HeaderWritten];
        states.push(State::Migrating { cursor: g.l });
        states.extend(g.schedule().iter().map(|(m, _)| State::Migrating { cursor: *m }));
        for st in states {
            let step = next_step(&g, st);
            let _ = after_in(&g, st, step); // does not panic: the step is valid from st
            let phase = resume_phase(st);
            match st {
                State::Migrating { cursor } => {
                    assert_eq!(phase, BridgePhase::Steady { cursor });
                    assert_eq!(needs_marker(st), cursor > 0);
                }
                State::HeaderWritten => assert_eq!(phase, BridgePhase::Final),
                _ => assert_eq!(phase, BridgePhase::Linear),
            }
        }
    }

    #[test]
    #[should_panic]
    fn a_chunk_that_is_not_the_next_one_is_refused() {
        let g = geo();
        after_in(&g, State::Migrating { cursor: 5904 }, Step::MoveChunk { from: 5904, to: 10_000 });
    }

    #[test]
    fn progress_is_monotonic() {
        let g = geo();
        let mut last = -1.0;
        for st in [
            State::Prepared,
            State::Bridged,
            State::Migrating { cursor: 10_000 },
            State::Migrating { cursor: 5904 },
            State::Migrating { cursor: 0 },
            State::HeaderWritten,
        ] {
            let p = progress(&g, st);
            assert!(p >= last);
            last = p;
        }
        assert_eq!(last, 1.0);
    }
}
