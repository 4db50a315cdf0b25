//! The error every layer above the adapters returns: one line for the user, naming the
//! problem and what to do, plus an exit code.

use crate::cli::exit;

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
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Refused(_) => exit::REFUSED,
            Error::Usage(_) => exit::ERROR,
            Error::Paused(..) => exit::PAUSED,
            Error::Failed(_) => exit::ERROR,
            Error::Integration(_) => exit::INTEGRATION,
        }
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
