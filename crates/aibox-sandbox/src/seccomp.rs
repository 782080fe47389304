//! The syscall policy (`resources/seccomp/policy.yaml`) and its compilation
//! to seccomp BPF.
//!
//! The policy is data, embedded at build time, so the native filter and the
//! OCI profile of the container backends come from one file. Natively it
//! compiles to three stacked filters, installed in this order:
//!
//! 1. *conditional*: allows every allowed syscall, the `allow_if` ones only
//!    with matching arguments; anything else `EPERM`;
//! 2. *allowlist*: allows the allowed syscalls (unconditionally); anything
//!    else `ENOSYS`;
//! 3. *denylist*: `EPERM` for `deny` and `deny_if`; anything else allowed.
//!
//! The kernel runs all of them and keeps the most restrictive action; among
//! equal actions (two errnos) the most recently installed filter's wins. So
//! a denied call gets `EPERM` (3), an unknown one `ENOSYS` (2 over 1), and
//! an `allow_if` call with other arguments `EPERM` (1).

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
    /// Argument-conditional allows: syscall → alternatives (OR) of
    /// conditions (AND); other calls to the syscall are refused.
    #[serde(default)]
    pub allow_if: BTreeMap<String, Vec<Vec<ArgCondition>>>,
    /// Argument-conditional denials (native filter only): syscall →
    /// alternatives (OR) of conditions (AND).
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
        for (section, name, alts) in p
            .allow_if
            .iter()
            .map(|(n, a)| ("allow_if", n, a))
            .chain(p.deny_if.iter().map(|(n, a)| ("deny_if", n, a)))
        {
            if !allow.contains(name.as_str()) {
                return Err(SandboxError::Policy(format!(
                    "seccomp policy: {section} names `{name}`, which is not in `allow`"
                )));
            }
            if alts.is_empty() || alts.iter().any(Vec::is_empty) {
                return Err(SandboxError::Policy(format!(
                    "seccomp policy: {section}.{name} has an empty alternative (it would match every call)"
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

    fn rule(name: &str, alt: &[ArgCondition]) -> Value {
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
        json!({"syscall": name, "args": args})
    }

    /// seccompiler JSON for the three filters (see the module docs).
    fn to_seccompiler_json(&self) -> Result<Value, SandboxError> {
        let mut conditional: Vec<Value> = Vec::new();
        for name in &self.allow {
            match self.allow_if.get(name) {
                Some(alts) => conditional.extend(alts.iter().map(|a| Self::rule(name, a))),
                None => conditional.push(json!({"syscall": name})),
            }
        }
        let allowlist: Vec<Value> = self.allow.iter().map(|s| json!({"syscall": s})).collect();
        let mut denylist: Vec<Value> = self.deny.iter().map(|s| json!({"syscall": s})).collect();
        for (name, alts) in &self.deny_if {
            denylist.extend(alts.iter().map(|a| Self::rule(name, a)));
        }
        let deny_errno = errno(&self.deny_errno)?;
        Ok(json!({
            "conditional": {
                "mismatch_action": {"errno": deny_errno},
                "match_action": "allow",
                "filter": conditional,
            },
            "allowlist": {
                "mismatch_action": {"errno": errno(&self.default_errno)?},
                "match_action": "allow",
                "filter": allowlist,
            },
            "denylist": {
                "mismatch_action": "allow",
                "match_action": {"errno": deny_errno},
                "filter": denylist,
            }
        }))
    }

    /// Compiles the three filters in installation order.
    pub fn compile(&self) -> Result<Vec<seccompiler::BpfProgram>, SandboxError> {
        let json = self.to_seccompiler_json()?;
        let text = serde_json::to_vec(&json).map_err(|e| SandboxError::Policy(e.to_string()))?;
        let arch = seccompiler::TargetArch::x86_64;
        let mut map = seccompiler::compile_from_json(text.as_slice(), arch)
            .map_err(|e| SandboxError::Policy(format!("seccomp policy does not compile: {e}")))?;
        let mut take = |k: &str| {
            map.remove(k)
                .ok_or_else(|| SandboxError::Policy(format!("filter {k} missing")))
        };
        Ok(vec![
            take("conditional")?,
            take("allowlist")?,
            take("denylist")?,
        ])
    }

    /// The OCI runtime-spec seccomp profile (podman, docker, runc, runsc)
    /// equivalent to the native filter, as far as libseccomp can express it:
    /// `allow_if` becomes conditional SCMP_ACT_ALLOW rules (other arguments
    /// get the default errno, ENOSYS, rather than EPERM), and `deny_if`,
    /// which needs a masked not-equal test, is left out (see the policy).
    pub fn oci_profile(&self) -> Result<Value, SandboxError> {
        let op_name = |c: &ArgCondition| match c.op.as_str() {
            "eq" => "SCMP_CMP_EQ",
            "ne" => "SCMP_CMP_NE",
            _ => "SCMP_CMP_MASKED_EQ",
        };
        let mut rules = vec![
            json!({
                "names": self.allow.iter().filter(|s| !self.allow_if.contains_key(*s)).collect::<Vec<_>>(),
                "action": "SCMP_ACT_ALLOW",
            }),
            json!({"names": self.deny, "action": "SCMP_ACT_ERRNO", "errnoRet": errno(&self.deny_errno)?}),
            // Spelled out, not left to the default: docker 20.10 ignores
            // `defaultErrnoRet` and would answer EPERM, and glibc falls back
            // from clone3 to clone only on ENOSYS (every pthread_create in
            // the sandbox would fail).
            json!({"names": self.enosys, "action": "SCMP_ACT_ERRNO", "errnoRet": errno(&self.default_errno)?}),
        ];
        for (name, alts) in &self.allow_if {
            for alt in alts {
                let args: Vec<Value> = alt
                    .iter()
                    .map(|c| match c.mask {
                        // runtime-spec: MASKED_EQ compares (arg & value) == valueTwo.
                        Some(mask) => json!({"index": c.arg, "value": mask, "valueTwo": c.value, "op": op_name(c)}),
                        None => json!({"index": c.arg, "value": c.value, "valueTwo": 0, "op": op_name(c)}),
                    })
                    .collect();
                rules.push(json!({"names": [name], "action": "SCMP_ACT_ALLOW", "args": args}));
            }
        }
        Ok(json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": errno(&self.default_errno)?,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": rules,
        }))
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
        for cond in [
            "clone",
            "socket",
            "socketpair",
            "personality",
            "chmod",
            "openat",
        ] {
            assert!(
                p.allow_if.contains_key(cond),
                "{cond} has no argument filter"
            );
        }
        assert!(p.deny_if.contains_key("ioctl"));
        assert_eq!(p.compile().unwrap().len(), 3);
    }

    /// configs/seccomp.json is generated from the policy; regenerate with
    /// `AIBOX_BLESS=1 cargo test -p aibox-sandbox oci_profile_is_current`.
    #[test]
    fn oci_profile_is_current() {
        let p = SyscallPolicy::embedded().unwrap();
        let mut text = serde_json::to_string_pretty(&p.oci_profile().unwrap()).unwrap();
        text.push('\n');
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/seccomp.json");
        if std::env::var_os("AIBOX_BLESS").is_some() {
            std::fs::write(path, &text).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == text,
            "configs/seccomp.json is stale; run with AIBOX_BLESS=1 to regenerate"
        );
    }

    #[test]
    fn oci_profile_shape() {
        let v = SyscallPolicy::embedded().unwrap().oci_profile().unwrap();
        assert_eq!(v["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(v["defaultErrnoRet"], 38);
        let rules = v["syscalls"].as_array().unwrap();
        let unconditional: Vec<&str> = rules[0]["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        for never in [
            "ptrace", "mount", "clone3", "openat2", "socket", "clone", "chmod",
        ] {
            assert!(
                !unconditional.contains(&never),
                "{never} allowed unconditionally"
            );
        }
        let socket_rules = rules.iter().filter(|r| r["names"][0] == "socket").count();
        assert_eq!(socket_rules, 9);
    }

    #[test]
    fn empty_alternatives_are_refused() {
        let text = POLICY_YAML.replace(
            "  socketpair:\n    - [{arg: 0, op: eq, value: 1}]",
            "  socketpair:\n    - []",
        );
        assert_ne!(text, POLICY_YAML);
        assert!(SyscallPolicy::parse(&text).is_err());
    }

    #[test]
    fn overlap_is_refused() {
        let text = POLICY_YAML.replace("allow: [", "allow: [ptrace, ");
        assert!(SyscallPolicy::parse(&text).is_err());
    }
}
