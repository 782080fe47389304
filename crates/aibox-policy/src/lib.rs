//! aibox policy: the org → team → project tiers of YAML policy, read
//! strictly ([`load`]), merged tighten-only ([`merge`]), and the command
//! classification the tool rules define ([`classify`]).

#![warn(missing_docs)]

pub mod hosts;
pub mod load;
pub mod merge;
pub mod rego;
pub mod schema;
pub mod shell;

pub use load::{load, parse};
pub use merge::{Merged, Tier, Violation, merge};
pub use rego::{Action, Decider, Decision, ExecInput, strictest};
pub use schema::{PolicyFile, Risk};

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Issue {
    /// `org`, `team` or `project`.
    pub tier: String,
    /// The file.
    pub file: String,
    /// Line, when known.
    pub line: Option<usize>,
    /// Key path (`tools.rules[0].risk`); empty for the whole file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Issue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, " ({} tier)", self.tier)?;
        if !self.path.is_empty() {
            write!(f, ": `{}`", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why a tier could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file cannot be read.
    #[error("{tier} policy {path} cannot be read: {reason}")]
    Unreadable {
        /// Tier.
        tier: String,
        /// File.
        path: String,
        /// The OS's words.
        reason: String,
    },
    /// The file is not a valid policy.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Issue>),
}

/// How a command is classified by the tool rules of `p`: the strictest
/// class of every rule matching `argv` (the program compared by its base
/// name), or the default (`safe` when no tier sets one), with the index
/// of the deciding rule.
pub fn classify(p: &PolicyFile, argv: &[String]) -> (Risk, Option<usize>) {
    let tools = p.tools.as_ref();
    let mut best: Option<(Risk, usize)> = None;
    for (i, r) in tools
        .and_then(|t| t.rules.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        if rule_matches(&r.matches, argv) && best.is_none_or(|(b, _)| r.risk > b) {
            best = Some((r.risk, i));
        }
    }
    match best {
        Some((risk, i)) => (risk, Some(i)),
        None => (tools.and_then(|t| t.default).unwrap_or(Risk::Safe), None),
    }
}

/// Program names `p` blocks whatever their arguments: the single-token
/// `blocked-by-default` rules. The sandbox denies their files execution
/// with Landlock as well as at the exec gate.
pub fn blocked_programs(p: &PolicyFile) -> Vec<String> {
    let mut out: Vec<String> = p
        .tools
        .as_ref()
        .and_then(|t| t.rules.as_ref())
        .into_iter()
        .flatten()
        .filter(|r| r.risk == Risk::BlockedByDefault && r.matches.len() == 1)
        .map(|r| r.matches[0].clone())
        .filter(|n| n != "*" && !n.is_empty() && !n.contains('/'))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn rule_matches(tokens: &[String], argv: &[String]) -> bool {
    if tokens.is_empty() || argv.len() < tokens.len() {
        return false;
    }
    tokens.iter().zip(argv).enumerate().all(|(i, (t, a))| {
        let a = if i == 0 {
            a.rsplit('/').next().unwrap_or(a)
        } else {
            a.as_str()
        };
        t == "*" || t == a
    })
}

#[cfg(test)]
mod tests;

/// Where one tier's file is, and whether it must exist.
#[derive(Debug, Clone)]
pub struct TierSource {
    /// `org`, `team` or `project`.
    pub name: String,
    /// The file.
    pub path: std::path::PathBuf,
    /// Named explicitly (a missing file is an error), or a default
    /// location (a missing file means the tier is absent).
    pub required: bool,
}

/// What loading the tiers found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The tiers present, top first.
    pub tiers: Vec<Tier>,
    /// Files that could not be read.
    pub unreadable: Vec<String>,
    /// Problems inside files.
    pub issues: Vec<Issue>,
}

/// Loads every tier of `sources`, collecting every problem of every file.
pub fn load_tiers(sources: &[TierSource]) -> Loaded {
    let mut out = Loaded::default();
    for s in sources {
        if !s.required && !s.path.exists() {
            continue;
        }
        match load(&s.name, &s.path) {
            Ok(policy) => {
                let rego = load_rego(&s.name, &s.path, &policy, &mut out.issues);
                out.tiers.push(Tier {
                    name: s.name.clone(),
                    path: s.path.display().to_string(),
                    policy,
                    rego,
                })
            }
            Err(PolicyError::Unreadable { .. }) if !s.required && !s.path.exists() => {}
            Err(e @ PolicyError::Unreadable { .. }) => out.unreadable.push(e.to_string()),
            Err(PolicyError::Invalid(v)) => out.issues.extend(v),
        }
    }
    out
}

/// Largest Rego module read.
const MAX_REGO: u64 = 1024 * 1024;

/// Reads the Rego modules `policy` names (relative to `file`'s directory):
/// plain relative paths to regular files with one link (so neither a
/// symlink nor a hard link can make a module writable from somewhere else
/// when its directory is read-only), which must parse.
fn load_rego(
    tier: &str,
    file: &std::path::Path,
    policy: &PolicyFile,
    issues: &mut Vec<Issue>,
) -> Vec<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let dir = file.parent().unwrap_or(std::path::Path::new("."));
    for (i, rel) in policy.rego.iter().flatten().enumerate() {
        let mut issue = |message: String| {
            issues.push(Issue {
                tier: tier.to_string(),
                file: file.display().to_string(),
                line: None,
                path: format!("rego[{i}]"),
                message,
            })
        };
        let r = std::path::Path::new(rel);
        if rel.is_empty()
            || !r
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            issue(format!(
                "`{rel}` must be a plain relative path below the policy file's directory (no `/` at the start, no `..`)"
            ));
            continue;
        }
        let path = dir.join(r);
        // Every directory between the policy file and the module, and the
        // module itself, must be real (no symlink).
        let mut walk = dir.to_path_buf();
        let mut linked = false;
        for c in r.components() {
            walk.push(c);
            if std::fs::symlink_metadata(&walk).is_ok_and(|m| m.file_type().is_symlink()) {
                linked = true;
            }
        }
        if linked {
            issue(format!(
                "{} (or a directory on its way) is a symbolic link; put the module itself there",
                path.display()
            ));
            continue;
        }
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                issue(format!("{}: {e}", path.display()));
                continue;
            }
        };
        if !meta.is_file() || meta.nlink() != 1 || meta.len() > MAX_REGO {
            issue(format!(
                "{} must be a regular file of at most 1 MiB with no other hard links",
                path.display()
            ));
            continue;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                issue(format!("{}: {e}", path.display()));
                continue;
            }
        };
        // Compiled and evaluated once on a sample exec, with the helpers
        // it may import: errors such as an undefined name show only then.
        let mut engine = regorus::Engine::new();
        let (lib, lib_text) = crate::rego::EXEC_LIB;
        let sample = r#"{"argv":["true"],"exe":"/usr/bin/true","exe_sha256":"","cwd":"/workspace","uid":1000,"env_names":[],"sandbox":"","exe_aliases":[],"parent":""}"#;
        let checked = engine
            .add_policy(lib.to_string(), lib_text.to_string())
            .and_then(|_| engine.add_policy(path.display().to_string(), text.clone()))
            .and_then(|_| {
                engine.set_input(regorus::Value::from_json_str(sample)?);
                engine.eval_rule("data.aibox.tools.findings".to_string())
            });
        if let Err(e) = checked {
            issue(format!("the module does not evaluate: {e}"));
            continue;
        }
        out.push((path.display().to_string(), text));
    }
    out
}

/// `p` as YAML (the format of the policy files).
pub fn to_yaml(p: &PolicyFile) -> Result<String, String> {
    serde_saphyr::to_string(p).map_err(|e| e.to_string())
}

/// The JSON Schema of policy files (published as `docs/policy.schema.json`).
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(PolicyFile)).unwrap_or_default()
}
