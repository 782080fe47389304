//! The event schema: the 25 event types of the original AI-Box, their
//! severities and sources, and the detail fields each type must carry.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One audit event as stored (before or after chaining).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Position in this log, starting at 0.
    pub seq: u64,
    /// RFC 3339 UTC time with nanoseconds.
    pub timestamp: String,
    /// What happened.
    pub event_type: EventType,
    /// Name of the sandbox the event belongs to.
    pub sandbox_id: String,
    /// Host user that owns the sandbox.
    pub user_id: String,
    /// Component that produced the event.
    pub source: Source,
    /// How much attention it deserves.
    pub severity: Severity,
    /// Type-specific fields (integers, strings, booleans, arrays, objects).
    #[serde(default)]
    pub details: Map<String, Value>,
    /// Hash of the previous event (64 zeros for the first).
    pub prev_hash: String,
    /// Hash of this event, see the crate docs.
    #[serde(default)]
    pub hash: String,
}

macro_rules! event_types {
    ($( $variant:ident = $name:literal, years = $years:literal, required = [$($field:literal),*]; )*) => {
        /// The 25 event types (names as in the original AI-Box).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum EventType {
            $(
                #[doc = concat!("`", $name, "`")]
                #[serde(rename = $name)]
                $variant,
            )*
        }

        impl EventType {
            /// Every event type, in schema order.
            pub const ALL: &'static [EventType] = &[$(EventType::$variant),*];

            /// The dotted name, e.g. `sandbox.start`.
            pub fn as_str(self) -> &'static str {
                match self { $(EventType::$variant => $name,)* }
            }

            /// Retention in years (from the original's schema).
            pub fn retention_years(self) -> u32 {
                match self { $(EventType::$variant => $years,)* }
            }

            /// Detail fields every event of this type must carry.
            pub fn required_details(self) -> &'static [&'static str] {
                match self { $(EventType::$variant => &[$($field),*],)* }
            }
        }
    };
}

event_types! {
    SandboxCreate = "sandbox.create", years = 2, required = ["workspace", "runtime"];
    SandboxStart = "sandbox.start", years = 2, required = ["init_pid", "duration_ms"];
    SandboxStop = "sandbox.stop", years = 2, required = ["reason"];
    SandboxDestroy = "sandbox.destroy", years = 2, required = ["reason"];
    SandboxConfig = "sandbox.config", years = 2, required = ["config_sha256"];
    NetworkAllow = "network.allow", years = 1, required = ["host", "port"];
    NetworkDeny = "network.deny", years = 1, required = ["host", "port", "reason"];
    DnsQuery = "dns.query", years = 1, required = ["name", "qtype"];
    DnsResponse = "dns.response", years = 1, required = ["name", "rcode"];
    ToolInvoke = "tool.invoke", years = 2, required = ["argv"];
    ToolApprove = "tool.approve", years = 2, required = ["argv", "approver"];
    ToolDeny = "tool.deny", years = 2, required = ["argv", "rule", "reason"];
    CredentialIssue = "credential.issue", years = 2, required = ["credential_type"];
    CredentialUse = "credential.use", years = 2, required = ["credential_type", "host"];
    CredentialRotate = "credential.rotate", years = 2, required = ["credential_type"];
    CredentialRevoke = "credential.revoke", years = 2, required = ["credential_type"];
    PolicyAllow = "policy.allow", years = 2, required = ["action", "rule", "policy_version"];
    PolicyDeny = "policy.deny", years = 2, required = ["action", "rule", "policy_version", "reason"];
    LlmRequest = "llm.request", years = 1, required = ["host", "model"];
    LlmResponse = "llm.response", years = 1, required = ["host", "status"];
    FileRead = "file.read", years = 1, required = ["path"];
    FileWrite = "file.write", years = 1, required = ["path"];
    FalcoAlert = "falco.alert", years = 1, required = ["rule_id", "mitre"];
    SessionStart = "session.start", years = 2, required = ["session_id", "argv", "tty"];
    SessionEnd = "session.end", years = 2, required = ["session_id", "exit_code", "duration_ms"];
}

/// Severity levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Routine.
    Info,
    /// Unusual.
    Warning,
    /// Needs a look soon.
    High,
    /// Needs a look now.
    Critical,
}

/// Producing component. The original's sources plus `aibox-supervisor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The command-line client.
    AiboxCli,
    /// The per-sandbox supervisor process.
    AiboxSupervisor,
    /// An in-sandbox agent component.
    AiboxAgent,
    /// The LLM gateway.
    AiboxLlmProxy,
    /// HTTP proxy (Squid in the original).
    Squid,
    /// DNS (CoreDNS in the original).
    Coredns,
    /// Policy engine.
    Opa,
    /// Secrets backend.
    Vault,
    /// Runtime detection.
    Falco,
    /// Kernel audit.
    Auditd,
    /// Terminal recorder.
    SessionRecorder,
}

impl Event {
    /// Checks required detail fields and refuses floats anywhere in `details`.
    pub fn validate(&self) -> Result<(), String> {
        for field in self.event_type.required_details() {
            if !self.details.contains_key(*field) {
                return Err(format!("missing detail field `{field}`"));
            }
        }
        fn no_floats(v: &Value, path: &str) -> Result<(), String> {
            match v {
                Value::Number(n) if !(n.is_i64() || n.is_u64()) => Err(format!(
                    "`{path}` is a float; canonical events carry integers only"
                )),
                Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, x)| no_floats(x, &format!("{path}[{i}]"))),
                Value::Object(map) => map
                    .iter()
                    .try_for_each(|(k, x)| no_floats(x, &format!("{path}.{k}"))),
                _ => Ok(()),
            }
        }
        self.details
            .iter()
            .try_for_each(|(k, v)| no_floats(v, &format!("details.{k}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn there_are_25_distinct_types() {
        assert_eq!(EventType::ALL.len(), 25);
        let names: std::collections::BTreeSet<_> =
            EventType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(names.len(), 25);
        for t in EventType::ALL {
            let json = serde_json::to_string(t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
        }
    }
}
