//! A clean shutdown or sleep is a pause, not a crash. While a conversion or `resume` runs on
//! a system with logind, luksify holds a logind delay inhibitor for shutdown and sleep
//! (`adapters::logind`), and every commit point asks [`stop_here`]:
//!
//! - a stop signal (SIGINT/SIGTERM/SIGHUP), or logind's `PrepareForShutdown(true)`: stop
//!   here (the run ends "paused"; the inhibitor goes with the process, and logind lets the
//!   machine go down);
//! - logind's `PrepareForSleep(true)`: stay here, every device resumed, give the inhibitor
//!   back so that the machine sleeps, wait for `PrepareForSleep(false)`, take the inhibitor
//!   again and go on.
//!
//! The decision is [`Gate::at_commit_point`], over the [`Inhibit`] trait, so that it is
//! unit-tested without D-Bus.

use crate::adapters::logind::{self, PowerSignal};
use crate::adapters::sys;
use std::io;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What the gate needs of an inhibitor: give it back, take it again.
pub(crate) trait Inhibit: Send {
    fn release(&mut self);
    fn retake(&mut self) -> io::Result<()>;
}

/// logind's, through `adapters::logind`.
struct Logind {
    why: String,
    held: Option<logind::Inhibitor>,
}

impl Inhibit for Logind {
    fn release(&mut self) {
        if let Some(mut i) = self.held.take() {
            i.release();
        }
    }
    fn retake(&mut self) -> io::Result<()> {
        self.held = Some(logind::Inhibitor::take(&self.why)?);
        Ok(())
    }
}

#[derive(Default)]
struct State {
    shutdown: bool,
    sleep: bool,
    /// No more signals will come (the monitor ended).
    gone: bool,
    /// The shutdown stop was said already.
    told: bool,
}

/// The signals seen so far and the inhibitor, shared by the monitor and the commit points.
pub(crate) struct Gate {
    state: Mutex<State>,
    cv: Condvar,
    inhibitor: Mutex<Box<dyn Inhibit>>,
    /// Longest wait for the wake after giving the inhibitor back for a sleep (the monotonic
    /// clock stands still while the machine sleeps, so this only counts awake time).
    wake_limit: Duration,
}

impl Gate {
    pub(crate) fn new(inhibitor: Box<dyn Inhibit>) -> Gate {
        Gate {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            inhibitor: Mutex::new(inhibitor),
            wake_limit: Duration::from_secs(300),
        }
    }

    /// A signal of logind's (from the monitor's thread).
    pub(crate) fn signal(&self, s: PowerSignal) {
        let mut st = self.state.lock().unwrap();
        match s {
            PowerSignal::Shutdown(b) => st.shutdown |= b,
            PowerSignal::Sleep(b) => st.sleep = b,
            PowerSignal::Gone => st.gone = true,
        }
        self.cv.notify_all();
    }

    /// At a commit point (nothing suspended, the last step committed): whether to stop here.
    /// A sleep is waited out here, the inhibitor given back meanwhile. `stop` is the stop
    /// signal's flag; `say` gets the lines for the user.
    pub(crate) fn at_commit_point(&self, stop: &dyn Fn() -> bool, say: &mut dyn FnMut(&str)) -> bool {
        loop {
            if stop() {
                return true;
            }
            let mut st = self.state.lock().unwrap();
            if st.shutdown {
                if !st.told {
                    st.told = true;
                    say("the system is shutting down: stopping at this commit point (the inhibitor is released as luksify exits)");
                }
                return true;
            }
            if !st.sleep {
                return false;
            }
            drop(st);
            self.inhibitor.lock().unwrap().release();
            say("the system is going to sleep: waiting at a commit point, no device suspended; inhibitor released");
            let t0 = Instant::now();
            let mut st = self.state.lock().unwrap();
            while st.sleep && !st.shutdown && !st.gone && !stop() {
                if t0.elapsed() >= self.wake_limit {
                    say("no wake-up signal from logind after the sleep; going on");
                    st.sleep = false;
                    break;
                }
                st = self.cv.wait_timeout(st, Duration::from_millis(200)).unwrap().0;
            }
            if st.gone {
                st.sleep = false;
            }
            let going_on = !st.shutdown && !st.sleep;
            drop(st);
            if going_on && !stop() {
                match self.inhibitor.lock().unwrap().retake() {
                    Ok(()) => say("the system woke up: inhibitor taken again, going on"),
                    Err(e) => {
                        say(&format!("the system woke up; cannot take the inhibitor again ({e}): going on without it"))
                    }
                }
            }
        }
    }
}

/// The process's gate, once a guarded run has armed it.
static GATE: OnceLock<Arc<Gate>> = OnceLock::new();

/// Every commit point of a guarded run asks this: a stop signal, logind's shutdown, or a
/// sleep (waited out here).
pub(super) fn stop_here() -> bool {
    match GATE.get() {
        Some(g) => g.at_commit_point(&sys::stop_requested, &mut |m| eprintln!("luksify: {m}")),
        None => sys::stop_requested(),
    }
}

/// Held for the run: the logind monitor, ended on drop. The inhibitor stays until the
/// process exits (right after, in `main`), so that a shutdown waits until luksify has said
/// where it stopped; its `systemd-inhibit` ends with luksify, however luksify ends.
pub(super) struct Armed {
    monitor: Option<std::process::Child>,
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(mut m) = self.monitor.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

/// Take logind's delay inhibitor for shutdown and sleep, naming `device`, and follow its
/// signals. Without logind (no systemd), or when it refuses, luksify goes on without:
/// a stop signal still stops it at a commit point.
pub(super) fn arm(device: &std::path::Path) -> Armed {
    let none = Armed { monitor: None };
    if !logind::present() {
        if std::env::var_os("LUKSIFY_DEBUG").is_some() {
            eprintln!("luksify: no systemd (/run/systemd/system): no shutdown/sleep inhibitor");
        }
        return none;
    }
    if GATE.get().is_some() {
        return none;
    }
    let why = format!(
        "luksify is encrypting {} in place; on shutdown or sleep it pauses at the next commit point",
        device.display()
    );
    let held = match logind::Inhibitor::take(&why) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("luksify: warning: no logind inhibitor ({e}); a shutdown still stops luksify at a commit point (SIGTERM)");
            return none;
        }
    };
    let gate = Arc::new(Gate::new(Box::new(Logind { why, held: Some(held) })));
    let g = gate.clone();
    let monitor = match logind::monitor(Box::new(move |s| g.signal(s))) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("luksify: warning: cannot follow logind's shutdown and sleep signals ({e}); no inhibitor held");
            return none; // (dropping the gate releases the inhibitor)
        }
    };
    let _ = GATE.set(gate);
    eprintln!(
        "luksify: holding a logind delay inhibitor for shutdown and sleep while {} is converted",
        device.display()
    );
    Armed { monitor: Some(monitor) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<Vec<&'static str>>>);
    impl Inhibit for Fake {
        fn release(&mut self) {
            self.0.lock().unwrap().push("release");
        }
        fn retake(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().push("take");
            Ok(())
        }
    }

    fn gate() -> (Arc<Gate>, Fake) {
        let f = Fake::default();
        (Arc::new(Gate::new(Box::new(f.clone()))), f)
    }

    #[test]
    fn nothing_pending_goes_on_and_a_stop_signal_stops() {
        let (g, f) = gate();
        let mut said = Vec::new();
        assert!(!g.at_commit_point(&|| false, &mut |m| said.push(m.to_string())));
        assert!(g.at_commit_point(&|| true, &mut |m| said.push(m.to_string())));
        assert!(said.is_empty() && f.0.lock().unwrap().is_empty());
    }

    #[test]
    fn a_shutdown_stops_at_the_commit_point_and_says_so_once() {
        let (g, f) = gate();
        g.signal(PowerSignal::Shutdown(true));
        let mut said = Vec::new();
        assert!(g.at_commit_point(&|| false, &mut |m| said.push(m.to_string())));
        assert!(g.at_commit_point(&|| false, &mut |m| said.push(m.to_string())));
        assert_eq!(said.len(), 1);
        assert!(said[0].contains("shutting down"), "{said:?}");
        // the inhibitor is kept until luksify exits: the machine waits for the stop
        assert!(f.0.lock().unwrap().is_empty());
        // a cancelled shutdown does not undo a stop that has begun
        g.signal(PowerSignal::Shutdown(false));
        assert!(g.at_commit_point(&|| false, &mut |_| {}));
    }

    #[test]
    fn a_sleep_is_waited_out_at_the_commit_point_without_the_inhibitor_then_the_run_goes_on() {
        let (g, f) = gate();
        g.signal(PowerSignal::Sleep(true));
        let waiting = Arc::new(AtomicBool::new(false));
        let (g2, w2) = (g.clone(), waiting.clone());
        let t = std::thread::spawn(move || {
            let mut said = Vec::new();
            let stop = g2.at_commit_point(&|| false, &mut |m| {
                said.push(m.to_string());
                w2.store(true, Ordering::SeqCst);
            });
            (stop, said)
        });
        while !waiting.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "the commit point did not wait for the wake-up");
        assert_eq!(*f.0.lock().unwrap(), ["release"], "the inhibitor must be given back for the sleep");
        g.signal(PowerSignal::Sleep(false));
        let (stop, said) = t.join().unwrap();
        assert!(!stop, "a sleep is a pause, not a stop");
        assert_eq!(*f.0.lock().unwrap(), ["release", "take"]);
        assert!(said[0].contains("going to sleep") && said[1].contains("woke up"), "{said:?}");
        // the next commit point goes straight on
        assert!(!g.at_commit_point(&|| false, &mut |_| {}));
    }

    #[test]
    fn a_shutdown_or_a_stop_signal_during_the_sleep_stops() {
        for by_signal in [false, true] {
            let (g, f) = gate();
            g.signal(PowerSignal::Sleep(true));
            let stop_flag = Arc::new(AtomicBool::new(false));
            let (g2, s2) = (g.clone(), stop_flag.clone());
            let t = std::thread::spawn(move || g2.at_commit_point(&|| s2.load(Ordering::SeqCst), &mut |_| {}));
            std::thread::sleep(Duration::from_millis(50));
            if by_signal {
                stop_flag.store(true, Ordering::SeqCst);
            } else {
                g.signal(PowerSignal::Shutdown(true));
            }
            assert!(t.join().unwrap(), "must stop");
            assert_eq!(*f.0.lock().unwrap(), ["release"], "no new inhibitor on the way out");
        }
    }

    #[test]
    fn without_a_wake_up_signal_the_wait_ends() {
        // the monitor ended: no wake-up will be seen
        let (g, f) = gate();
        g.signal(PowerSignal::Sleep(true));
        g.signal(PowerSignal::Gone);
        assert!(!g.at_commit_point(&|| false, &mut |_| {}));
        assert_eq!(*f.0.lock().unwrap(), ["release", "take"]);
        // logind never said it woke: the wait is bounded
        let f = Fake::default();
        let mut g = Gate::new(Box::new(f.clone()));
        g.wake_limit = Duration::from_millis(100);
        g.signal(PowerSignal::Sleep(true));
        let mut said = Vec::new();
        assert!(!g.at_commit_point(&|| false, &mut |m| said.push(m.to_string())));
        assert!(said.iter().any(|m| m.contains("no wake-up")), "{said:?}");
    }
}
