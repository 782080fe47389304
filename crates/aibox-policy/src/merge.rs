//! The tighten-only merge: org, then team, then project. A lower tier may
//! only narrow what the tiers above allow; an omitted field inherits. Every
//! loosening attempt is reported (tier, key path, parent value, attempted
//! value), and the merged policy keeps the stricter value, so that even a
//! policy with violations never allows more than its parents.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::hosts::{Pattern, covers, parse_pattern};
use crate::load::{parse_size, parse_ttl};
use crate::schema::*;

/// One tier's policy, as loaded.
#[derive(Debug, Clone)]
pub struct Tier {
    /// `org`, `team` or `project`.
    pub name: String,
    /// Where it came from.
    pub path: String,
    /// Its content.
    pub policy: PolicyFile,
    /// Its Rego modules: (path, text).
    pub rego: Vec<(String, String)>,
}

/// A lower tier's attempt to loosen what a higher one set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The tier that tried.
    pub tier: String,
    /// Its file.
    pub file: String,
    /// Key path in that file.
    pub path: String,
    /// What the tiers above allow.
    pub parent: String,
    /// What the tier asked for.
    pub attempted: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tier ({}): `{}` would loosen the policy: the tiers above set {}; this file asks for {}",
            self.tier, self.file, self.path, self.parent, self.attempted
        )
    }
}

/// The merged policy and where it came from.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Merged {
    /// `sha256:<hex>` of the merged policy: the "policy version" every
    /// decision records.
    pub version: String,
    /// The tiers, top first: (name, file, sha256 of the file's policy).
    pub tiers: Vec<(String, String, String)>,
    /// The effective policy.
    pub policy: PolicyFile,
    /// For each of `policy.tools.rules`, the tier it comes from (the
    /// lowest tier that set it as it stands).
    #[serde(default)]
    pub rule_tiers: Vec<String>,
    /// The tiers' Rego modules: (tier, path, text), top first. Part of
    /// the policy version.
    #[serde(default)]
    pub rego: Vec<(String, String, String)>,
}

fn sha256_of<T: Serialize>(v: &T) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

/// Merges `tiers` (top first). Returns the merged policy (always no looser
/// than any tier above) and every loosening attempt.
pub fn merge(tiers: &[Tier]) -> (Merged, Vec<Violation>) {
    let mut eff = PolicyFile {
        version: 1,
        ..PolicyFile::default()
    };
    let mut violations = Vec::new();
    for (i, t) in tiers.iter().enumerate() {
        let mut m = Merger {
            tier: &t.name,
            file: &t.path,
            out: &mut violations,
        };
        if i == 0 {
            eff = t.policy.clone();
            eff.version = 1;
            // (Rego stays with its tier: see `Merged::rego`.)
            eff.rego = None;
            // A project tier alone may still expose nothing (see `policy`).
            if t.name == "project"
                && let Some(c) = eff.credentials.as_mut()
                && let Some(x) = c.expose.as_mut()
                && !x.is_empty()
            {
                m.violation("credentials.expose", "[]".into(), show(x));
                x.clear();
            }
        } else {
            m.policy(&mut eff, &t.policy);
        }
    }
    let rule_tiers = eff
        .tools
        .as_ref()
        .and_then(|t| t.rules.as_ref())
        .into_iter()
        .flatten()
        .map(|r| {
            let has = |t: &&Tier, same_risk: bool| {
                t.policy
                    .tools
                    .as_ref()
                    .and_then(|x| x.rules.as_ref())
                    .is_some_and(|rs| {
                        rs.iter()
                            .any(|x| x.matches == r.matches && (!same_risk || x.risk == r.risk))
                    })
            };
            tiers
                .iter()
                .rev()
                .find(|t| has(t, true))
                .or_else(|| tiers.iter().find(|t| has(t, false)))
                .map(|t| t.name.clone())
                .unwrap_or_default()
        })
        .collect();
    let rego: Vec<(String, String, String)> = tiers
        .iter()
        .flat_map(|t| {
            t.rego
                .iter()
                .map(|(p, x)| (t.name.clone(), p.clone(), x.clone()))
        })
        .collect();
    let version = if rego.is_empty() {
        sha256_of(&eff)
    } else {
        sha256_of(&(&eff, &rego))
    };
    let merged = Merged {
        rule_tiers,
        rego,
        version,
        tiers: tiers
            .iter()
            .map(|t| (t.name.clone(), t.path.clone(), sha256_of(&t.policy)))
            .collect(),
        policy: eff,
    };
    (merged, violations)
}

struct Merger<'a> {
    tier: &'a str,
    file: &'a str,
    out: &'a mut Vec<Violation>,
}

fn show<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

impl Merger<'_> {
    fn violation(&mut self, path: impl Into<String>, parent: String, attempted: String) {
        self.out.push(Violation {
            tier: self.tier.to_string(),
            file: self.file.to_string(),
            path: path.into(),
            parent,
            attempted,
        });
    }

    fn policy(&mut self, eff: &mut PolicyFile, c: &PolicyFile) {
        if let Some(n) = &c.network {
            let e = eff.network.get_or_insert_with(Default::default);
            if n.mode.is_some() {
                e.mode = n.mode;
            }
            if let Some(allow) = &n.allow {
                e.allow = Some(match &e.allow {
                    None => allow.clone(),
                    Some(parent) => self.allow(parent, allow),
                });
            }
        }
        if let Some(f) = &c.filesystem {
            let e = eff.filesystem.get_or_insert_with(Default::default);
            if f.workspace_root.is_some() {
                e.workspace_root = f.workspace_root.clone();
            }
            if let Some(deny) = &f.deny {
                let list = e.deny.get_or_insert_with(Vec::new);
                for d in deny {
                    if !list.contains(d) {
                        list.push(d.clone());
                    }
                }
            }
        }
        if let Some(t) = &c.tools {
            let e = eff.tools.get_or_insert_with(Default::default);
            let parent_default = e.default;
            if let Some(d) = t.default {
                match e.default {
                    Some(p) if d < p => {
                        self.violation("tools.default", p.as_str().into(), d.as_str().into())
                    }
                    _ => e.default = Some(d),
                }
            }
            if let Some(rules) = &t.rules {
                let list = e.rules.get_or_insert_with(Vec::new);
                for (i, r) in rules.iter().enumerate() {
                    match list.iter_mut().find(|p| p.matches == r.matches) {
                        Some(p) if r.risk < p.risk => self.violation(
                            format!("tools.rules[{i}].risk"),
                            format!("{} for `{}`", p.risk.as_str(), r.matches.join(" ")),
                            r.risk.as_str().into(),
                        ),
                        Some(p) => *p = r.clone(),
                        // A new rule milder than the default above would
                        // let its commands out from under that default.
                        None if parent_default.is_some_and(|d| r.risk < d) => {
                            let d = parent_default.unwrap_or(Risk::Safe);
                            self.violation(
                                format!("tools.rules[{i}].risk"),
                                format!(
                                    "{} (the default above) for `{}`",
                                    d.as_str(),
                                    r.matches.join(" ")
                                ),
                                r.risk.as_str().into(),
                            );
                            list.push(ToolRule {
                                risk: d,
                                ..r.clone()
                            });
                        }
                        None => list.push(r.clone()),
                    }
                }
            }
        }
        if let Some(r) = &c.resources {
            let e = eff.resources.get_or_insert_with(Default::default);
            self.at_most("resources.cpus", &mut e.cpus, r.cpus, |v| u64::from(*v));
            self.at_most("resources.pids", &mut e.pids, r.pids, |v| *v);
            self.at_most("resources.memory", &mut e.memory, r.memory.clone(), |v| {
                parse_size(v).unwrap_or(u64::MAX)
            });
            self.at_most(
                "resources.tmp_size",
                &mut e.tmp_size,
                r.tmp_size.clone(),
                |v| parse_size(v).unwrap_or(u64::MAX),
            );
        }
        if let Some(r) = &c.runtime {
            let e = eff.runtime.get_or_insert_with(Default::default);
            if let Some(engines) = &r.engines {
                e.engines = Some(match &e.engines {
                    None => engines.clone(),
                    Some(parent) => {
                        let extra: Vec<&Engine> =
                            engines.iter().filter(|x| !parent.contains(x)).collect();
                        if !extra.is_empty() {
                            self.violation("runtime.engines", show(parent), show(engines));
                        }
                        engines
                            .iter()
                            .filter(|x| parent.contains(x))
                            .copied()
                            .collect()
                    }
                });
            }
            self.keep_true("runtime.rootless", &mut e.rootless, r.rootless);
            self.keep_true(
                "runtime.gvisor_required",
                &mut e.gvisor_required,
                r.gvisor_required,
            );
        }
        if let Some(cr) = &c.credentials {
            let e = eff.credentials.get_or_insert_with(Default::default);
            let ttl = |v: &String| {
                parse_ttl(v).map_or(u64::MAX, |d| {
                    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
                })
            };
            self.at_most(
                "credentials.git_token_ttl",
                &mut e.git_token_ttl,
                cr.git_token_ttl.clone(),
                ttl,
            );
            self.at_most(
                "credentials.llm_api_key_ttl",
                &mut e.llm_api_key_ttl,
                cr.llm_api_key_ttl.clone(),
                ttl,
            );
            self.at_most(
                "credentials.mirror_token_ttl",
                &mut e.mirror_token_ttl,
                cr.mirror_token_ttl.clone(),
                ttl,
            );
            self.keep_true(
                "credentials.revoke_on_stop",
                &mut e.revoke_on_stop,
                cr.revoke_on_stop,
            );
            self.keep_true(
                "credentials.no_persist_to_workspace",
                &mut e.no_persist_to_workspace,
                cr.no_persist_to_workspace,
            );
            if let Some(expose) = &cr.expose {
                // The project tier lives in the workspace, where a cloned
                // repository or the sandbox itself can write: it may only
                // remove names, even when no tier above named any.
                let inherited = match (&e.expose, self.tier) {
                    (None, "project") => Some(Vec::new()),
                    (p, _) => p.clone(),
                };
                e.expose = Some(match &inherited {
                    None => expose.clone(),
                    Some(parent) => {
                        if expose.iter().any(|x| !parent.contains(x)) {
                            self.violation("credentials.expose", show(parent), show(expose));
                        }
                        expose
                            .iter()
                            .filter(|x| parent.contains(x))
                            .cloned()
                            .collect()
                    }
                });
            }
        }
    }

    /// A limit: the child may lower it, not raise it.
    fn at_most<T: Clone + Serialize>(
        &mut self,
        path: &str,
        eff: &mut Option<T>,
        child: Option<T>,
        key: impl Fn(&T) -> u64,
    ) {
        let Some(c) = child else { return };
        match eff {
            Some(p) if key(&c) > key(p) => self.violation(path, show(p), show(&c)),
            _ => *eff = Some(c),
        }
    }

    /// A protection: once on, it stays on.
    fn keep_true(&mut self, path: &str, eff: &mut Option<bool>, child: Option<bool>) {
        match (*eff, child) {
            (Some(true), Some(false)) => self.violation(path, "true".into(), "false".into()),
            (_, Some(c)) if *eff != Some(true) => *eff = Some(c),
            _ => {}
        }
    }

    /// The child's allowlist, each entry checked against the parent's:
    /// every host and port must be inside a parent entry, and rate limits
    /// may only be lower (omitted: the parent's). What is not inside is
    /// reported and left out.
    fn allow(&mut self, parent: &[AllowEntry], child: &[AllowEntry]) -> Vec<AllowEntry> {
        let parsed: Vec<(Vec<Pattern>, &AllowEntry)> = parent
            .iter()
            .map(|e| {
                (
                    e.hosts
                        .iter()
                        .filter_map(|h| parse_pattern(h).ok())
                        .collect(),
                    e,
                )
            })
            .collect();
        let mut out = Vec::new();
        for (i, e) in child.iter().enumerate() {
            // Per host, the ports the parent permits for it: hosts with the
            // same ports share an entry (a host must not gain a port that
            // another host of the entry was granted).
            let mut groups: Vec<(Vec<u16>, Vec<String>)> = Vec::new();
            let mut limits: Vec<RateLimit> = Vec::new();
            for (j, h) in e.hosts.iter().enumerate() {
                let Ok(hp) = parse_pattern(h) else { continue };
                let mut ports = Vec::new();
                for port in &e.ports {
                    let inside: Vec<&AllowEntry> = parsed
                        .iter()
                        .filter(|(pats, pe)| {
                            pe.ports.contains(port) && pats.iter().any(|p| covers(p, &hp))
                        })
                        .map(|(_, pe)| *pe)
                        .collect();
                    if inside.is_empty() {
                        self.violation(
                            format!("network.allow[{i}].hosts[{j}]"),
                            describe(parent),
                            format!("{h} port {port}"),
                        );
                    } else {
                        ports.push(*port);
                        limits.extend(inside.iter().filter_map(|pe| pe.rate_limit));
                    }
                }
                if ports.is_empty() {
                    continue;
                }
                match groups.iter_mut().find(|(p, _)| *p == ports) {
                    Some((_, hosts)) => hosts.push(h.clone()),
                    None => groups.push((ports, vec![h.clone()])),
                }
            }
            // The strictest parent limit applies; the child may go lower.
            let rpm = limits.iter().filter_map(|l| l.requests_per_min).min();
            let tpm = limits.iter().filter_map(|l| l.tokens_per_min).min();
            let mine = e.rate_limit.unwrap_or_default();
            let eff_limit = RateLimit {
                requests_per_min: match (rpm, mine.requests_per_min) {
                    (Some(p), Some(c)) if c > p => {
                        self.violation(
                            format!("network.allow[{i}].rate_limit.requests_per_min"),
                            p.to_string(),
                            c.to_string(),
                        );
                        Some(p)
                    }
                    (p, c) => c.or(p),
                },
                tokens_per_min: match (tpm, mine.tokens_per_min) {
                    (Some(p), Some(c)) if c > p => {
                        self.violation(
                            format!("network.allow[{i}].rate_limit.tokens_per_min"),
                            p.to_string(),
                            c.to_string(),
                        );
                        Some(p)
                    }
                    (p, c) => c.or(p),
                },
            };
            let rate_limit = (eff_limit != RateLimit::default()).then_some(eff_limit);
            for (ports, hosts) in groups {
                out.push(AllowEntry {
                    id: e.id.clone(),
                    hosts,
                    ports,
                    rate_limit,
                });
            }
        }
        out
    }
}

fn describe(entries: &[AllowEntry]) -> String {
    if entries.is_empty() {
        return "no destinations".into();
    }
    entries
        .iter()
        .map(|e| {
            format!(
                "{} ({} on {})",
                e.id,
                e.hosts.join(", "),
                e.ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join("/")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
