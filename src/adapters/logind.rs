//! systemd-logind, through its own command-line tools (systemd >= 252, Debian bookworm):
//! a *delay* inhibitor for shutdown and sleep (`systemd-inhibit --mode=delay`), and the
//! Manager's `PrepareForShutdown` / `PrepareForSleep` signals (`busctl monitor --json=short`).
//! What luksify does on them is decided in `app::power`; this only talks to logind.

use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A signal of logind's Manager that luksify follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerSignal {
    /// `PrepareForShutdown(b)`: true when a shutdown or reboot is about to happen (false: it
    /// was cancelled).
    Shutdown(bool),
    /// `PrepareForSleep(b)`: true before a suspend or hibernation, false after the wake.
    Sleep(bool),
    /// The monitor ended: no more signals will come.
    Gone,
}

/// Whether the system runs systemd (its documented test: `sd_booted`), so that logind may
/// be asked. Without it (rescue shells, the UML test bed) luksify holds no inhibitor.
pub fn present() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// One line of `busctl monitor --json=short`: a logind Manager signal, or None.
pub fn parse_monitor_line(line: &str) -> Option<PowerSignal> {
    let j: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    if j["type"] != "signal" || j["interface"] != "org.freedesktop.login1.Manager" {
        return None;
    }
    let b = j["payload"]["data"][0].as_bool()?;
    match j["member"].as_str()? {
        "PrepareForShutdown" => Some(PowerSignal::Shutdown(b)),
        "PrepareForSleep" => Some(PowerSignal::Sleep(b)),
        _ => None,
    }
}

/// The match of logind's Manager signals on the system bus.
const MATCH: &str = "type='signal',sender='org.freedesktop.login1',path='/org/freedesktop/login1',interface='org.freedesktop.login1.Manager'";

/// Follow logind's signals: `busctl monitor` runs until the returned child is killed; each
/// signal goes to `on` (on a thread of its own), and [`PowerSignal::Gone`] when the monitor
/// ends. Returns once busctl says it is monitoring (so no signal after this is missed).
pub fn monitor(mut on: Box<dyn FnMut(PowerSignal) + Send>) -> io::Result<Child> {
    let mut child = Command::new("busctl")
        .args(["monitor", "--system", "--json=short", &format!("--match={MATCH}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("SYSTEMD_LOG_TARGET", "console")
        .spawn()?;
    let out = child.stdout.take().expect("piped");
    let mut err = BufReader::new(child.stderr.take().expect("piped"));
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    std::thread::spawn(move || {
        let mut said = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            match err.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.contains("Monitoring bus message stream") => {
                    let _ = tx.send(Ok(()));
                    // keep reading (and dropping) whatever else it says
                    let _ = io::copy(&mut err, &mut io::sink());
                    return;
                }
                Ok(_) => said.push_str(&line),
            }
        }
        let _ = tx.send(Err(said.trim().to_string()));
    });
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(s) = parse_monitor_line(&line) {
                on(s);
            }
        }
        on(PowerSignal::Gone);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(child),
        Ok(Err(said)) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(io::Error::other(format!("busctl monitor failed: {said}")))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(io::Error::other("busctl monitor did not start within 10 s"))
        }
    }
}

/// A logind delay inhibitor for shutdown and sleep, held while its `systemd-inhibit` runs:
/// that one runs `cat` on a pipe from luksify, so it ends (and logind lets the machine go)
/// when luksify releases it or exits, however it exits.
pub struct Inhibitor {
    held: Option<(Child, ChildStdin)>,
}

impl Inhibitor {
    /// Take the inhibitor (who = luksify, `why`); returns once logind has granted it.
    pub fn take(why: &str) -> io::Result<Inhibitor> {
        let mut child = Command::new("systemd-inhibit")
            .args(["--what=shutdown:sleep", "--who=luksify", "--mode=delay"])
            .arg(format!("--why={why}"))
            .args(["sh", "-c", "echo held; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "held" {
            drop(stdin);
            let mut said = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut said);
            }
            let st = child.wait()?;
            return Err(io::Error::other(format!("systemd-inhibit failed ({st}): {}", said.trim())));
        }
        Ok(Inhibitor { held: Some((child, stdin)) })
    }

    /// Let logind go on: end `systemd-inhibit` and wait for it.
    pub fn release(&mut self) {
        if let Some((mut child, stdin)) = self.held.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for Inhibitor {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busctl_monitor_lines_become_logind_signals() {
        let shutdown = r#"{"type":"signal","endian":"l","flags":1,"version":1,"cookie":1321,"timestamp-realtime":1733212345678901,"sender":":1.2","path":"/org/freedesktop/login1","interface":"org.freedesktop.login1.Manager","member":"PrepareForShutdown","payload":{"type":"b","data":[true]}}"#;
        assert_eq!(parse_monitor_line(shutdown), Some(PowerSignal::Shutdown(true)));
        let wake = shutdown.replace("PrepareForShutdown", "PrepareForSleep").replace("[true]", "[false]");
        assert_eq!(parse_monitor_line(&wake), Some(PowerSignal::Sleep(false)));
        let sleep = wake.replace("[false]", "[true]");
        assert_eq!(parse_monitor_line(&sleep), Some(PowerSignal::Sleep(true)));
        // other signals of the same interface, other interfaces, method calls, noise
        assert_eq!(parse_monitor_line(&shutdown.replace("PrepareForShutdown", "SessionNew")), None);
        assert_eq!(parse_monitor_line(&shutdown.replace("login1.Manager", "login1.Session")), None);
        assert_eq!(parse_monitor_line(&shutdown.replace(r#""type":"signal""#, r#""type":"method_call""#)), None);
        assert_eq!(parse_monitor_line("Monitoring bus message stream."), None);
        assert_eq!(parse_monitor_line(""), None);
    }
}
