//! The syscall policy (`resources/seccomp/policy.yaml`) and its compilation
//! to seccomp BPF.
//!
//! The policy is data, embedded at build time, so the native filter and the
//! OCI profile of the container backends come from one file. It compiles to
//! two stacked filters: an allowlist whose default is `ENOSYS`, then a
//! denylist (`deny` + `deny_if`) returning `EPERM`. When both return an
//! errno the kernel uses the one installed last, so denied calls get `EPERM`
//! and unknown ones `ENOSYS`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::SandboxError;

/// The embedded policy file.
pub const POLICY_YAML: &str = include_str!("../../../resources/seccomp/policy.yaml");

/// Parsed syscall policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyscallPolicy {
    /// Format version (1).
    pub version: u32,
    /// errno for syscalls outside the allowlist.
    pub default_errno: String,
    /// errno for denied calls.
    pub deny_errno: String,
    /// Allowed syscalls.
    pub allow: Vec<String>,
    /// Refused syscalls.
    pub deny: Vec<String>,
    /// Syscalls deliberately left out of the allowlist (documented ENOSYS).
    #[serde(default)]
    pub enosys: Vec<String>,
    /// Argument-conditional denials: syscall → alternatives (OR) of
    /// conditions (AND).
    #[serde(default)]
    pub deny_if: BTreeMap<String, Vec<Vec<ArgCondition>>>,
}

/// One argument comparison.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgCondition {
    /// Argument index (0–5).
    pub arg: u8,
    /// `eq`, `ne` or `masked_eq`.
    pub op: String,
    /// Mask for `masked_eq`.
    #[serde(default)]
    pub mask: Option<u64>,
    /// Value compared with.
    pub value: u64,
}

fn errno(name: &str) -> Result<u32, SandboxError> {
    let n = match name {
        "EPERM" => libc::EPERM,
        "ENOSYS" => libc::ENOSYS,
        "EACCES" => libc::EACCES,
        other => {
            return Err(SandboxError::Policy(format!(
                "unknown errno {other:?} (use EPERM, EACCES or ENOSYS)"
            )));
        }
    };
    Ok(n as u32)
}

impl SyscallPolicy {
    /// Parses and checks the embedded policy.
    pub fn embedded() -> Result<Self, SandboxError> {
        Self::parse(POLICY_YAML)
    }

    /// Parses and checks a policy text.
    pub fn parse(text: &str) -> Result<Self, SandboxError> {
        let p: SyscallPolicy = serde_saphyr::from_str(text)
            .map_err(|e| SandboxError::Policy(format!("seccomp policy: {e}")))?;
        if p.version != 1 {
            return Err(SandboxError::Policy(format!(
                "seccomp policy version {} is not supported",
                p.version
            )));
        }
        errno(&p.default_errno)?;
        errno(&p.deny_errno)?;
        let allow: BTreeSet<&str> = p.allow.iter().map(String::as_str).collect();
        if allow.len() != p.allow.len() {
            return Err(SandboxError::Policy(
                "seccomp policy: duplicate name in `allow`".into(),
            ));
        }
        for name in p.deny.iter().chain(&p.enosys) {
            if allow.contains(name.as_str()) {
                return Err(SandboxError::Policy(format!(
                    "seccomp policy: `{name}` is both allowed and denied"
                )));
            }
        }
        for (name, alts) in &p.deny_if {
            if !allow.contains(name.as_str()) {
                return Err(SandboxError::Policy(format!(
                    "seccomp policy: deny_if names `{name}`, which is not in `allow`"
                )));
            }
            for cond in alts.iter().flatten() {
                let ok_op = matches!(cond.op.as_str(), "eq" | "ne" | "masked_eq");
                if !ok_op || cond.arg > 5 || (cond.op == "masked_eq") != cond.mask.is_some() {
                    return Err(SandboxError::Policy(format!(
                        "seccomp policy: bad condition on `{name}`: {cond:?}"
                    )));
                }
            }
        }
        Ok(p)
    }

    /// seccompiler JSON for the allowlist and denylist filters.
    fn to_seccompiler_json(&self) -> Result<Value, SandboxError> {
        let allow_rules: Vec<Value> = self.allow.iter().map(|s| json!({"syscall": s})).collect();
        let mut deny_rules: Vec<Value> = self.deny.iter().map(|s| json!({"syscall": s})).collect();
        for (name, alts) in &self.deny_if {
            for alt in alts {
                let args: Vec<Value> = alt
                    .iter()
                    .map(|c| {
                        let op = match (c.op.as_str(), c.mask) {
                            ("masked_eq", Some(m)) => json!({"masked_eq": m}),
                            (op, _) => json!(op),
                        };
                        json!({"index": c.arg, "type": "dword", "op": op, "val": c.value})
                    })
                    .collect();
                deny_rules.push(json!({"syscall": name, "args": args}));
            }
        }
        Ok(json!({
            "allowlist": {
                "mismatch_action": {"errno": errno(&self.default_errno)?},
                "match_action": "allow",
                "filter": allow_rules,
            },
            "denylist": {
                "mismatch_action": "allow",
                "match_action": {"errno": errno(&self.deny_errno)?},
                "filter": deny_rules,
            }
        }))
    }

    /// Compiles the two filters, allowlist first (install in that order).
    pub fn compile(&self) -> Result<Vec<seccompiler::BpfProgram>, SandboxError> {
        let json = self.to_seccompiler_json()?;
        let text = serde_json::to_vec(&json).map_err(|e| SandboxError::Policy(e.to_string()))?;
        let arch = seccompiler::TargetArch::x86_64;
        let mut map = seccompiler::compile_from_json(text.as_slice(), arch)
            .map_err(|e| SandboxError::Policy(format!("seccomp policy does not compile: {e}")))?;
        let take = |map: &mut seccompiler::BpfMap, k: &str| {
            map.remove(k)
                .ok_or_else(|| SandboxError::Policy(format!("filter {k} missing")))
        };
        Ok(vec![
            take(&mut map, "allowlist")?,
            take(&mut map, "denylist")?,
        ])
    }
}

/// Installs compiled filters on the calling thread (needs no_new_privs).
pub fn install(filters: &[seccompiler::BpfProgram]) -> Result<(), SandboxError> {
    for f in filters {
        seccompiler::apply_filter(f).map_err(|e| SandboxError::Sys {
            what: "installing the seccomp filter".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_policy_parses_and_compiles() {
        let p = SyscallPolicy::embedded().unwrap();
        for must in [
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "unshare",
            "setns",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "request_key",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "swapon",
            "swapoff",
            "acct",
        ] {
            assert!(p.deny.iter().any(|d| d == must), "{must} not denied");
        }
        for cond in ["clone", "socket", "personality", "ioctl"] {
            assert!(
                p.deny_if.contains_key(cond),
                "{cond} has no argument filter"
            );
        }
        assert_eq!(p.compile().unwrap().len(), 2);
    }

    #[test]
    fn overlap_is_refused() {
        let text = POLICY_YAML.replace("allow: [", "allow: [ptrace, ");
        assert!(SyscallPolicy::parse(&text).is_err());
    }
}
