//! The policy file format (`version: 1`). Every section and field is
//! optional: an omitted field inherits the tier above; the merge decides
//! whether a given value tightens or loosens (see [`crate::merge`]).

use serde::{Deserialize, Serialize};

/// One tier's policy file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Format version; 1 is the only one.
    pub version: u32,
    /// Egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    /// Paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<FilesystemPolicy>,
    /// Commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<ToolsPolicy>,
    /// Sandbox limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesPolicy>,
    /// Backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimePolicy>,
    /// Credential lifetimes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsPolicy>,
    /// Rego modules of this tier (paths relative to this file's directory,
    /// regular files inside it). Their `data.aibox.tools.findings` add
    /// findings to every exec decision; like every tier, they can only
    /// make a decision stricter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego: Option<Vec<String>>,
}

/// `network`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// `deny-by-default`, the only mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<NetMode>,
    /// The destinations this tier permits. Omitted: this tier sets no
    /// bound. Present (even empty): nothing outside it, in this tier or
    /// below, and in the sandbox's own configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<AllowEntry>>,
}

/// The network mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NetMode {
    /// Everything not allowed is refused.
    DenyByDefault,
}

/// One permitted group of destinations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// Name, for messages and the audit log.
    pub id: String,
    /// Host names (`api.github.com`), sub-domain wildcards
    /// (`*.githubusercontent.com`) or IP addresses.
    pub hosts: Vec<String>,
    /// Ports (1-65535).
    pub ports: Vec<u16>,
    /// Limits for these hosts (the LLM gateway applies them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Request and token limits.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_min: Option<u32>,
    /// Tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_min: Option<u64>,
}

/// `filesystem`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesystemPolicy {
    /// Where the workspace is mounted (`/workspace`; may not change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_root: Option<String>,
    /// Absolute paths no sandbox process may read or write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
}

/// `tools`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolsPolicy {
    /// Risk class of a command no rule matches (`safe` if no tier says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Risk>,
    /// Rules; a command gets the strictest class of all rules matching it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<ToolRule>>,
}

/// A command rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolRule {
    /// Leading argv tokens (the program's base name first); `*` matches
    /// any one token.
    #[serde(rename = "match")]
    pub matches: Vec<String>,
    /// Risk class.
    pub risk: Risk,
    /// Why, shown on refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Risk classes, in increasing strictness.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Risk {
    /// Runs.
    Safe,
    /// Runs, logged for review.
    ReviewRequired,
    /// Refused.
    BlockedByDefault,
}

impl Risk {
    /// As written in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Safe => "safe",
            Risk::ReviewRequired => "review-required",
            Risk::BlockedByDefault => "blocked-by-default",
        }
    }
}

/// `resources`: upper bounds for the sandbox's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcesPolicy {
    /// CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory, e.g. `8g`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Size of each of `/tmp` and `/var/tmp`, e.g. `2g`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_size: Option<String>,
}

/// `runtime`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuntimePolicy {
    /// Backends a sandbox may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engines: Option<Vec<Engine>>,
    /// Sandboxes must be started without root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootless: Option<bool>,
    /// Container sandboxes must run under gVisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gvisor_required: Option<bool>,
}

/// Backends.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The embedded namespaces sandbox.
    Native,
    /// Podman.
    Podman,
    /// Docker.
    Docker,
}

/// `credentials`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CredentialsPolicy {
    /// Longest lifetime of a git token (`4h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_token_ttl: Option<String>,
    /// Longest lifetime of an LLM key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_api_key_ttl: Option<String>,
    /// Longest lifetime of a mirror token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_token_ttl: Option<String>,
    /// Revoke every credential when the sandbox stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_on_stop: Option<bool>,
    /// Never write credentials into the workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_persist_to_workspace: Option<bool>,
    /// Credentials whose real value the sandbox may hold (instead of a
    /// placeholder the proxy replaces). A lower tier may only remove
    /// names from its parent's list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose: Option<Vec<String>>,
}
