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
            Error::Usage(_) => exit::ERROR,
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

/// Exit codes: 0 success, 1 error (one line on stderr), 2 usage (clap), 3 refused by the plan,
/// 4 stopped on request (SIGINT/SIGTERM) at a safe point: `luksify resume` continues;
/// 5 converted, but the system integration is incomplete (the message says what to do);
/// 6 a conversion is in progress but its journal is missing or damaged, or the LUKS2 header
/// at the device's start (which may record one) cannot be read.
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const REFUSED: i32 = 3;
    pub const PAUSED: i32 = 4;
    pub const INTEGRATION: i32 = 5;
    /// A conversion is in progress but its journal is missing or damaged, or the LUKS2 header
    /// that may record one cannot be read (nothing changed).
    pub const DAMAGED: i32 = 6;
}

/// Print how a run failed: one line on stderr, and with `--json` the error as JSON on stdout.
pub fn report(e: &Error, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&e.to_json()).expect("serialises"));
    }
    eprintln!("luksify: {e}");
}
