//! Small types the planner and the boot checks share (so that neither imports the other's
//! file for them): the LUKS version and a refusal. `core::plan` re-exports both.

use serde::Serialize;

/// LUKS version (default data offset: LUKS1 2 MiB = 4096 sectors, LUKS2 16 MiB = 32768).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LuksVersion {
    Luks1,
    Luks2,
}

impl std::fmt::Display for LuksVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl LuksVersion {
    /// "luks1" / "luks2", as cryptsetup's `--type`.
    pub fn as_str(self) -> &'static str {
        match self {
            LuksVersion::Luks1 => "luks1",
            LuksVersion::Luks2 => "luks2",
        }
    }

    pub fn number(self) -> u8 {
        match self {
            LuksVersion::Luks1 => 1,
            LuksVersion::Luks2 => 2,
        }
    }

    /// cryptsetup's default data offset: 16 MiB for LUKS2, 2 MiB for LUKS1.
    pub fn default_shift(self) -> u64 {
        match self {
            LuksVersion::Luks1 => 4096,
            LuksVersion::Luks2 => 32768,
        }
    }
}

/// One reason not to convert, with a stable code for scripts and the advice for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
}
