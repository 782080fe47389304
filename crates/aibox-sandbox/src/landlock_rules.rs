//! The Landlock ruleset: read and execute everywhere, write only beneath
//! the writable mounts. Also scopes signals and abstract unix sockets to
//! the sandbox (ABI 6+).

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};
use serde::{Deserialize, Serialize};

use crate::SandboxError;

/// Highest ABI whose rights we ask for; newer kernels enforce it fully.
const TARGET_ABI: ABI = ABI::V6;

/// Outcome of applying the ruleset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockState {
    /// Every requested right is enforced.
    Full,
    /// The kernel enforces only part of the requested rights (older ABI).
    Partial,
    /// The kernel has no Landlock.
    Unavailable,
}

/// Landlock ABI version the running kernel reports (0 = none).
pub fn kernel_abi() -> i32 {
    crate::sys::landlock_abi()
}

/// Restricts the calling thread (and its future children).
pub fn apply(writable: &[&str]) -> Result<LandlockState, SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Sys {
        what: "applying the Landlock ruleset".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let status: RestrictionStatus = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))
        .map_err(|e| err(&e))?
        .scope(Scope::from_all(TARGET_ABI))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(TARGET_ABI)))
        .map_err(|e| err(&e))?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(TARGET_ABI)))
        .map_err(|e| err(&e))?
        .restrict_self()
        .map_err(|e| err(&e))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockState::Full,
        RulesetStatus::PartiallyEnforced => LandlockState::Partial,
        RulesetStatus::NotEnforced => LandlockState::Unavailable,
    })
}
