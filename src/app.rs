//! Dispatch of the command line onto the engine and the adapters.

use crate::cli::{Cli, Command};
use crate::error::{Error, Result};

pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Some(Command::Status { .. }) => Err(Error::Failed("status: not built yet".into())),
        Some(Command::Resume { .. }) => Err(Error::Failed("resume: not built yet".into())),
        None => Err(Error::Failed("not built yet".into())),
    }
}
