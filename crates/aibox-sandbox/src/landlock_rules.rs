//! The Landlock ruleset: read and execute everywhere, write only beneath
//! the writable mounts. Also scopes signals and abstract unix sockets to
//! the sandbox (ABI 6+).

use landlock::BitFlags;
use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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

/// Directories whose programs `exec_blocked` names are looked up in.
pub const PROGRAM_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The files the program names `names` denote in [`PROGRAM_DIRS`], with
/// links resolved (Landlock judges the file executed, not the link).
pub fn blocked_files(names: &[String]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for dir in PROGRAM_DIRS {
        for name in names {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                continue;
            }
            if let Ok(real) = std::fs::canonicalize(Path::new(dir).join(name))
                && real.is_file()
                && !out.contains(&real)
            {
                out.push(real);
            }
        }
    }
    out
}

/// Where reading and execution stay allowed when `blocked` files must not
/// run: every entry of every directory on the way to a blocked file,
/// except that directory's own next step, the blocked files themselves
/// and their other hard links (Landlock rules belong to inodes). Symbolic
/// links are skipped (their targets are covered where they live).
fn execute_grants(blocked: &[PathBuf]) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let inodes: BTreeSet<(u64, u64)> = blocked
        .iter()
        .filter_map(|b| std::fs::metadata(b).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let mut ancestors: BTreeSet<PathBuf> = BTreeSet::new();
    for b in blocked {
        let mut p = b.parent();
        while let Some(d) = p {
            ancestors.insert(d.to_path_buf());
            p = d.parent();
        }
    }
    let mut grants = Vec::new();
    for dir in &ancestors {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if ancestors.contains(&path) || blocked.contains(&path) {
                continue;
            }
            if e.file_type().is_ok_and(|t| t.is_symlink()) {
                continue;
            }
            if std::fs::symlink_metadata(&path).is_ok_and(|m| inodes.contains(&(m.dev(), m.ino())))
            {
                continue;
            }
            grants.push(path);
        }
    }
    grants
}

/// Restricts the calling thread (and its future children): read and
/// execute everywhere, everything beneath `writable`, and neither
/// execution nor reading of the files in `blocked` (see
/// [`blocked_files`]): not reading them also keeps a loader
/// (`ld.so /usr/bin/curl`) or a copy from running them.
pub fn apply(writable: &[&str], blocked: &[PathBuf]) -> Result<LandlockState, SandboxError> {
    let err = |e: &dyn std::fmt::Display| SandboxError::Sys {
        what: "applying the Landlock ruleset".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let read = AccessFs::from_read(TARGET_ABI);
    let (root_rights, grants) = if blocked.is_empty() {
        (read, Vec::new())
    } else {
        (BitFlags::from(AccessFs::ReadDir), execute_grants(blocked))
    };
    let status: RestrictionStatus = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))
        .map_err(|e| err(&e))?
        .scope(Scope::from_all(TARGET_ABI))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?
        .add_rules(path_beneath_rules(["/"], root_rights))
        .map_err(|e| err(&e))?
        .add_rules(path_beneath_rules(grants, read))
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
