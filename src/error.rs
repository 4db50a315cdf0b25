//! The error every layer above the adapters returns: one line for the user, naming the
//! problem and what to do, plus an exit code.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plan refuses: nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// Bad input from the user (key file, options): nothing was changed.
    #[error("{0}")]
    Usage(String),
    /// Not run as root: nothing was looked at or changed.
    #[error("{0}")]
    NotRoot(String),
    /// The passphrase opens no keyslot: nothing was changed.
    #[error("{0}")]
    BadPassphrase(String),
    /// The device named does not exist, is not a block device, or cannot be opened.
    #[error("{0}")]
    WrongDevice(String),
    /// Another program holds the device: another luksify (the device lock), cryptsetup's
    /// reencryption lock, or an LVM command LVM's VG lock. Nothing was changed.
    #[error("{0}")]
    Busy(String),
    /// Stopped on request at a safe point.
    #[error("stopped at a safe point ({0}); run `luksify resume {1}` to continue")]
    Paused(String, String),
    /// An operation failed; the message says what state the device is in.
    #[error("{0}")]
    Failed(String),
    /// The conversion succeeded but the system integration did not finish: the message
    /// says what to do by hand.
    #[error("converted, but integration incomplete: {0}")]
    Integration(String),
    /// Signs of a conversion in progress whose journal is missing or damaged: `message` says
    /// what is known and what is safe; nothing was changed.
    #[error("{message}")]
    Damaged { message: String, damage: Box<crate::core::evidence::Damage> },
    /// A LUKS2 header is at the device's start but cannot be read (no copy verifies, its JSON
    /// does not parse, an unknown requirement) or, for `resume`, its reencryption metadata
    /// does not verify against its digest: it may hold a conversion in progress, so this is
    /// never "no conversion". The message says what is wrong; nothing was changed.
    #[error("{0}")]
    DamagedHeader(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Refused(_) => exit::REFUSED,
            Error::Usage(_) | Error::NotRoot(_) | Error::BadPassphrase(_) => exit::USAGE_OR_PERMISSION,
            Error::WrongDevice(_) => exit::WRONG_DEVICE,
            Error::Busy(_) => exit::BUSY,
            Error::Paused(..) => exit::PAUSED,
            Error::Failed(_) => exit::ERROR,
            Error::Integration(_) => exit::INTEGRATION,
            Error::Damaged { .. } | Error::DamagedHeader(_) => exit::DAMAGED,
        }
    }

    /// The error as `--json` prints it: `{"error": {"code", "message"}}`, and for a damaged
    /// conversion also what `status --json` says of one in progress (for an unreadable LUKS2
    /// header, `in_progress` is null: whether it holds a conversion cannot be told).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "error": { "code": self.exit_code(), "message": self.to_string() } });
        if let Error::Damaged { damage, .. } = self {
            v["in_progress"] = true.into();
            v["state"] = "damaged".into();
            v["damage"] = serde_json::to_value(damage).expect("serialises");
        }
        if let Error::DamagedHeader(_) = self {
            v["in_progress"] = serde_json::Value::Null;
            v["state"] = "damaged".into();
        }
        v
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attach context to any error: `.ctx("reading the journal")?`.
pub trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Failed(format!("{}: {e}", what())))
    }
}

/// Exit codes, in one table. 0-5 are cryptsetup's (man cryptsetup, "RETURN CODES") where
/// the case is the same; luksify's own outcomes start at 10, clear of cryptsetup's range
/// (0-5, and room for it to grow), of shells' 126-165 and of `timeout`'s 124-125.
///
/// | code | cryptsetup                   | luksify                                               |
/// |------|------------------------------|-------------------------------------------------------|
/// | 0    | success                      | success                                               |
/// | 1    | wrong parameters             | an operation failed (the message says the state)      |
/// | 2    | no permission (bad passphrase)| usage error, wrong passphrase, not root              |
/// | 3    | out of memory                | (not used)                                            |
/// | 4    | wrong device specified       | device missing, not a block device, cannot be opened  |
/// | 5    | device already exists / busy | another luksify, cryptsetup or LVM command holds it   |
/// | 10   |                              | refused by the plan: nothing was changed              |
/// | 11   |                              | stopped on request at a safe point: `resume` goes on  |
/// | 12   |                              | converted, but the system integration is incomplete   |
/// | 13   |                              | conversion in progress, journal or header damaged     |
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    /// clap's usage errors, luksify's own ([`super::Error::Usage`]), a wrong passphrase
    /// and not root: cryptsetup's "no permission".
    pub const USAGE_OR_PERMISSION: i32 = 2;
    pub const WRONG_DEVICE: i32 = 4;
    pub const BUSY: i32 = 5;
    pub const REFUSED: i32 = 10;
    pub const PAUSED: i32 = 11;
    pub const INTEGRATION: i32 = 12;
    /// A conversion is in progress but its journal is missing or damaged, or the LUKS2 header
    /// that may record one cannot be read (nothing changed).
    pub const DAMAGED: i32 = 13;

    /// Every code and what it means, for `--help` and the man page.
    pub const TABLE: &[(i32, &str)] = &[
        (OK, "success"),
        (ERROR, "an operation failed; the message says what state the device is in"),
        (USAGE_OR_PERMISSION, "usage error, wrong passphrase, or not run as root (cryptsetup: no permission)"),
        (WRONG_DEVICE, "DEVICE does not exist, is not a block device, or cannot be opened"),
        (BUSY, "another luksify, cryptsetup or LVM command holds DEVICE or its VG; nothing was changed"),
        (REFUSED, "refused by the plan; nothing was changed"),
        (PAUSED, "stopped on request at a safe point: `luksify resume DEVICE` continues"),
        (INTEGRATION, "converted, but the system integration is incomplete (the message says what to do)"),
        (DAMAGED, "a conversion is in progress but its journal or LUKS2 header is damaged; nothing was changed"),
    ];

    /// The table for `luksify --help`.
    pub fn help_text() -> String {
        let mut s = String::from("Exit status (0-5 as cryptsetup's where the case is the same):\n");
        for (c, what) in TABLE {
            s.push_str(&format!("  {c:<3} {what}\n"));
        }
        s
    }

    /// The table as the man page's EXIT STATUS section (roff).
    pub fn man_section() -> String {
        let mut s = String::from(
            ".SH \"EXIT STATUS\"\n0\\-5 as cryptsetup(8)'s where the case is the same; luksify's own from 10.\n",
        );
        for (c, what) in TABLE {
            s.push_str(&format!(".TP\n\\fB{c}\\fR\n{}\n", what.replace('-', "\\-")));
        }
        s
    }
}

/// Print how a run failed: one line on stderr, and with `--json` the error as JSON on stdout.
pub fn report(e: &Error, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&e.to_json()).expect("serialises"));
    }
    eprintln!("luksify: {e}");
}

#[cfg(test)]
mod tests {
    use super::exit::*;

    #[test]
    fn the_table_has_every_code_once_and_cryptsetups_meanings_below_10() {
        let codes: Vec<i32> = TABLE.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes, [0, 1, 2, 4, 5, 10, 11, 12, 13]);
        assert!(TABLE[2].1.contains("wrong passphrase") && TABLE[3].1.contains("does not exist"));
        let h = help_text();
        assert!(h.contains("  13  a conversion is in progress"), "{h}");
        let m = man_section();
        assert!(m.starts_with(".SH \"EXIT STATUS\"\n"), "{m}");
        assert!(m.contains(".TP\n\\fB11\\fR\nstopped on request"), "{m}");
        assert!(!m.contains("0-5"), "a plain '-' in roff is a hyphen: {m}");
    }
}
