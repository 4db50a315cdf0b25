//! The crash sweep both LUKS2 sweeps run (`cutover_tests.rs`, `steps_tests.rs`): a fault at
//! every operation in turn, each on a fresh machine with its own seed; after it (an error:
//! the machine runs on a little first) the live system's reads are checked, then the power
//! is cut under every cache policy and each crash image is checked. The outcomes of the
//! images are counted by name.

use super::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

pub(super) const POLICIES: [CachePolicy; 6] = [
    CachePolicy::LoseAll,
    CachePolicy::KeepAll,
    CachePolicy::TearAll,
    CachePolicy::Random,
    CachePolicy::Random,
    CachePolicy::Random,
];

#[derive(Default)]
pub(super) struct Sweep {
    /// Fault points (operations) reached.
    pub points: u64,
    /// Crash images checked.
    pub images: u64,
    /// How many images ended in each outcome.
    pub outcomes: BTreeMap<&'static str, u64>,
    pub failures: Vec<String>,
}

impl Sweep {
    pub fn count(&self, outcome: &str) -> u64 {
        self.outcomes.get(outcome).copied().unwrap_or(0)
    }

    /// Print the counts.
    pub fn report(&self, name: &str) {
        eprintln!(
            "{name}: {} fault points, {} crash images: {:?}, {} failures",
            self.points,
            self.images,
            self.outcomes,
            self.failures.len()
        );
    }

    /// Print the counts and each failure's first line, then fail with the first whole.
    pub fn assert_no_failures(&self, name: &str) {
        self.report(name);
        for f in &self.failures {
            eprintln!("FAILURE {}", f.lines().next().unwrap_or(""));
        }
        assert!(self.failures.is_empty(), "{name}: {} failures; first:\n{}", self.failures.len(), self.failures[0]);
    }
}

/// `fault` at every operation from `first` on. `run` runs the machine and, when it got past
/// its last operation without the fault firing, checks the completed run. A point where the
/// fault does not fire ends the sweep after `misses` of them (runs differ in length with the
/// seed). `image` checks one crash image (the machine after the cut, its policy, an RNG
/// seeded per fault point for further random choices) and names its outcome. Stops after
/// `max_failures`.
pub(super) fn sweep(
    sc: &Scenario,
    fault: Fault,
    first: u64,
    misses: u32,
    max_failures: usize,
    run: &dyn Fn(&Sim) -> Result<(), String>,
    image: &mut dyn FnMut(Sim, CachePolicy, &mut ChaCha8Rng) -> Result<&'static str, String>,
) -> Sweep {
    let mut s = Sweep::default();
    let mut missed = 0;
    for i in first.. {
        let mut sc = sc.clone();
        sc.seed = sc.seed.wrapping_add(i * 7919);
        let sim = Sim::new(&sc);
        sim.set_fault(i, fault);
        let r = run(&sim);
        let ctx = |sim: &Sim, what: &str, msg: String| {
            format!("{fault:?} at op {i} (seed {}), {what}: {msg}\n--- trace ---\n{}", sc.seed, sim.trace_tail(30))
        };
        if sim.fired().is_none() {
            if let Err(e) = r {
                s.failures.push(ctx(&sim, "no fault", e));
            }
            missed += 1;
            if missed == misses || !s.failures.is_empty() {
                break;
            }
            continue;
        }
        s.points += 1;
        if fault != Fault::PowerCut {
            sim.revive();
            sim.idle(6);
        }
        // What the live system read until then was right (reads blocked behind a device the
        // fault left suspended are no loss: the power cut ends them).
        let seen = sim.w.borrow().violations.clone();
        if !seen.is_empty() {
            s.failures.push(ctx(&sim, "the live system", format!("it saw:\n  {}", seen.join("\n  "))));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(sc.seed ^ 0x5eed);
        for (j, &policy) in POLICIES.iter().enumerate() {
            let cur = sim.power_cut(sc.seed.wrapping_add(j as u64), policy);
            s.images += 1;
            match image(cur, policy, &mut rng) {
                Ok(what) => *s.outcomes.entry(what).or_default() += 1,
                Err(e) => s.failures.push(format!(
                    "{fault:?} at op {i} (seed {}), crash image {policy:?}: {e}\n--- trace ---\n{}",
                    sc.seed,
                    sim.trace_tail(30)
                )),
            }
            if s.failures.len() >= max_failures {
                return s;
            }
        }
    }
    s
}
