//! `aibox policy …`: the tiers from the config (or the command line),
//! validated, merged and shown; dry-run decisions.

use std::path::{Path, PathBuf};

use aibox_policy::{Merged, TierSource, Violation};
use anyhow::{Context, Result};

use crate::args::{DocFormat, Format, PolicyCmd, TierArgs};

/// Where the system's org baseline lives.
pub(crate) const SYSTEM_ORG_POLICY: &str = "/etc/aibox/org-policy.yaml";

/// The tier files: explicit ones must exist, the config's defaults may be
/// absent.
pub(crate) fn sources(
    cfg: &aibox_config::Config,
    args: &TierArgs,
    workspace: &Path,
) -> Vec<TierSource> {
    sources_with(cfg, args, workspace, Path::new(SYSTEM_ORG_POLICY))
}

fn sources_with(
    cfg: &aibox_config::Config,
    args: &TierArgs,
    workspace: &Path,
    system: &Path,
) -> Vec<TierSource> {
    let pick = |name: &str, explicit: &Option<PathBuf>, default: Option<PathBuf>| {
        explicit
            .clone()
            .map(|path| TierSource {
                name: name.into(),
                path,
                required: true,
            })
            .or(default.map(|path| TierSource {
                name: name.into(),
                path,
                required: false,
            }))
    };
    let p = &cfg.policy;
    let nonempty = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
    // The system's org baseline always applies when it exists: a user's
    // config or environment may add an org file below it, never drop it.
    let configured = nonempty(&p.org_baseline_path);
    let system_tier = (args.org.is_none()
        && system.exists()
        && configured.as_deref() != Some(system))
    .then(|| TierSource {
        name: "org".into(),
        path: system.to_path_buf(),
        required: true,
    });
    [
        system_tier,
        pick("org", &args.org, configured),
        pick("team", &args.team, nonempty(&p.team_policy_path)),
        pick(
            "project",
            &args.project,
            nonempty(&p.project_policy_path).map(|r| workspace.join(r)),
        ),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The outcome of loading and merging.
pub(crate) struct Outcome {
    pub merged: Merged,
    /// The tiers that loaded, top first.
    pub tiers: Vec<aibox_policy::Tier>,
    pub unreadable: Vec<String>,
    pub issues: Vec<aibox_policy::Issue>,
    pub violations: Vec<Violation>,
}

impl Outcome {
    /// Every problem, one per line.
    pub(crate) fn problems(&self) -> Vec<String> {
        self.unreadable
            .iter()
            .cloned()
            .chain(self.issues.iter().map(ToString::to_string))
            .chain(self.violations.iter().map(ToString::to_string))
            .collect()
    }
}

pub(crate) fn evaluate(sources: &[TierSource]) -> Outcome {
    let loaded = aibox_policy::load_tiers(sources);
    let (merged, violations) = aibox_policy::merge(&loaded.tiers);
    Outcome {
        merged,
        tiers: loaded.tiers,
        unreadable: loaded.unreadable,
        issues: loaded.issues,
        violations,
    }
}

fn workspace(args: &TierArgs) -> Result<PathBuf> {
    match &args.workspace {
        Some(w) => std::fs::canonicalize(w).with_context(|| format!("workspace {}", w.display())),
        None => std::env::current_dir().context("the current directory"),
    }
}

pub fn run(cli_config: Option<PathBuf>, cmd: PolicyCmd) -> Result<i32> {
    let (loaded, _) = super::load_config(cli_config)?;
    match cmd {
        PolicyCmd::Validate { tiers, format } => {
            let src = sources(&loaded.config, &tiers, &workspace(&tiers)?);
            let o = evaluate(&src);
            let code = if !o.unreadable.is_empty() {
                2
            } else if !o.issues.is_empty() || !o.violations.is_empty() {
                1
            } else {
                0
            };
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "valid": code == 0,
                        "policy_version": o.merged.version,
                        "tiers": o.merged.tiers,
                        "unreadable": o.unreadable,
                        "issues": o.issues,
                        "violations": o.violations,
                    }))?
                ),
                Format::Text => {
                    for p in o.problems() {
                        eprintln!("aibox: {p}");
                    }
                    if code == 0 {
                        if o.merged.tiers.is_empty() {
                            println!("no policy files (looked for: {})", list(&src));
                        } else {
                            println!(
                                "valid: {} (policy version {})",
                                tier_list(&o.merged),
                                o.merged.version
                            );
                        }
                    }
                }
            }
            Ok(code)
        }
        PolicyCmd::Show {
            tiers,
            merged: _,
            format,
        } => {
            let o = evaluate(&sources(&loaded.config, &tiers, &workspace(&tiers)?));
            let problems = o.problems();
            if !problems.is_empty() {
                anyhow::bail!(
                    "{}\n  fix: correct the policy files (`aibox policy validate` lists the problems)",
                    problems.join("\n")
                );
            }
            match format {
                DocFormat::Json => println!("{}", serde_json::to_string_pretty(&o.merged)?),
                DocFormat::Yaml => {
                    println!("# policy version {}", o.merged.version);
                    for (n, p, h) in &o.merged.tiers {
                        println!("# {n} tier: {p} ({h})");
                    }
                    for (n, p, _) in &o.merged.rego {
                        println!("# {n} tier Rego: {p}");
                    }
                    print!(
                        "{}",
                        aibox_policy::to_yaml(&o.merged.policy)
                            .map_err(|e| anyhow::anyhow!("writing YAML: {e}"))?
                    );
                }
            }
            Ok(0)
        }
        PolicyCmd::Check {
            tiers,
            format,
            command,
        } => {
            let o = evaluate(&sources(&loaded.config, &tiers, &workspace(&tiers)?));
            let problems = o.problems();
            if !problems.is_empty() {
                anyhow::bail!("{}", problems.join("\n"));
            }
            let mut decider =
                aibox_policy::rego::Decider::new(&o.merged).map_err(anyhow::Error::msg)?;
            let exe = resolve_exe(&command[0]);
            let d = decider.decide(&aibox_policy::rego::ExecInput {
                argv: command.clone(),
                exe,
                cwd: "/workspace".into(),
                uid: aibox_core::guest::UID,
                ..Default::default()
            });
            let decision = match d.action {
                aibox_policy::rego::Action::Deny => "deny",
                aibox_policy::rego::Action::Review => "allow (logged for review)",
                aibox_policy::rego::Action::Allow => "allow",
            };
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "command": command, "decision": d,
                    }))?
                ),
                Format::Text => {
                    println!("decision:   {decision}");
                    println!("risk class: {}", d.risk.as_str());
                    println!("rule:       {} ({} tier)", d.rule, d.tier);
                    println!("reason:     {}", d.reason);
                    println!("policy:     {}", d.policy_version);
                }
            }
            Ok(0)
        }
        PolicyCmd::Explain {
            name,
            log_entry,
            format,
        } => explain(&loaded, &name, log_entry, format),
        PolicyCmd::Test { tiers, format } => {
            let mut results = aibox_policy::rego::run_tests(aibox_policy::rego::BASELINE)
                .map_err(anyhow::Error::msg)?;
            // Each tier's modules are tested on their own, as they are
            // evaluated.
            let o = evaluate(&sources(&loaded.config, &tiers, &workspace(&tiers)?));
            let problems = o.problems();
            if !problems.is_empty() {
                anyhow::bail!("{}", problems.join("\n"));
            }
            let mut names: Vec<&str> = o.merged.rego.iter().map(|(t, _, _)| t.as_str()).collect();
            names.dedup();
            for name in names {
                let modules: Vec<(&str, &str)> = o
                    .merged
                    .rego
                    .iter()
                    .filter(|(t, _, _)| t == name)
                    .map(|(_, p, x)| (p.as_str(), x.as_str()))
                    .collect();
                let mut r = aibox_policy::rego::run_tests(&modules)
                    .map_err(|e| anyhow::anyhow!("{name} tier Rego: {e}"))?;
                for t in &mut r {
                    t.name = format!("{name}: {}", t.name);
                }
                results.extend(r);
            }
            let failed = results.iter().filter(|r| !r.passed).count();
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&results)?),
                Format::Text => {
                    for r in &results {
                        let tag = if r.passed { "PASS" } else { "FAIL" };
                        match &r.error {
                            Some(e) => println!("{tag}  {}: {}", r.name, e.trim()),
                            None => println!("{tag}  {}", r.name),
                        }
                    }
                    println!("{} passed, {failed} failed", results.len() - failed);
                }
            }
            Ok(i32::from(failed > 0))
        }
    }
}

/// `aibox policy explain`: entry `n` of the sandbox's decision log,
/// decided again under the policy snapshot it names.
fn explain(
    loaded: &aibox_config::Loaded,
    name: &crate::args::NameArg,
    n: u64,
    format: Format,
) -> Result<i32> {
    use aibox_policy::{Action, Decider};
    let sandbox = match &name.name {
        Some(s) => {
            aibox_core::validate_name(s).map_err(anyhow::Error::msg)?;
            s.clone()
        }
        None => super::lifecycle::default_name(),
    };
    let audit = aibox_supervisor::client::audit_log_path(&loaded.data_dir(), &sandbox);
    let log = aibox_supervisor::decisions::path_for(&audit);
    // (Where an earlier aibox kept it, it moves first.)
    aibox_supervisor::decisions::migrate_legacy(&audit)
        .with_context(|| format!("moving the old decision log to {}", log.display()))?;
    let e = aibox_supervisor::decisions::find(&log, n).map_err(|e| match e {
        aibox_supervisor::decisions::FindError::Io { .. } => anyhow::anyhow!(
            "{e}: no decision log for sandbox `{sandbox}`; name the sandbox with --name"
        ),
        e => anyhow::Error::new(e),
    })?;
    let snap = aibox_supervisor::paths::policy_snapshot_for(&audit, &e.policy_version);
    let merged: Option<Merged> = std::fs::read(&snap)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    // Decided again: the strictest decision over the entry's inputs.
    let again = match &merged {
        Some(m) if m.version == e.policy_version => {
            let mut d = Decider::new(m).map_err(anyhow::Error::msg)?;
            // The one that stands, picked as the gate picks.
            let all: Vec<_> = e.inputs.iter().map(|i| d.decide(i)).collect();
            aibox_policy::strictest(&all).and_then(|i| all.get(i).cloned())
        }
        _ => None,
    };
    // (A denial by the gate itself, not by a rule, is reproduced as such.)
    let reproduced = e.rule == "gate"
        || again
            .as_ref()
            .is_some_and(|d| d.action == e.decision && d.rule == e.rule);
    let tier_file = merged.as_ref().and_then(|m| {
        m.tiers
            .iter()
            .find(|(t, _, _)| *t == e.tier)
            .map(|(_, f, _)| f.clone())
    });
    let exception = (e.decision == Action::Deny).then(|| match (e.tier.as_str(), &tier_file) {
        ("org baseline", _) => format!(
            "rule {} is part of aibox's org baseline (policies/org/); an exception needs the org policy owner to run the command outside the sandbox or to change the baseline for your organisation",
            e.rule
        ),
        ("aibox", _) => "the gate could not identify the program; run it by a plain path inside the sandbox".to_string(),
        (t, Some(f)) => format!(
            "rule {} comes from the {t} tier ({f}); lower tiers can only tighten it, so ask the owner of that file for a narrower rule (check it first with `aibox policy check -- {}`)",
            e.rule, e.command
        ),
        (t, None) => format!("rule {} comes from the {t} tier; ask its owner", e.rule),
    });
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "entry": e, "reproduced": reproduced, "decided_again": again,
                "policy_snapshot": snap, "tier_file": tier_file, "exception": exception,
            }))?
        ),
        Format::Text => {
            let verdict = match e.decision {
                Action::Allow => "allow",
                Action::Review => "allow, logged for review",
                Action::Deny => "deny",
            };
            println!("entry:      {} of {}", e.entry, log.display());
            println!("time:       {}", e.timestamp);
            // (Strings from the sandbox: control characters are shown
            // escaped, never sent to the terminal.)
            println!("command:    {}", clean(&e.command));
            println!("program:    {}", clean(&e.target));
            println!("decision:   {verdict} ({})", e.risk_class.as_str());
            println!(
                "rule:       {} ({} tier{})",
                e.rule,
                e.tier,
                tier_file
                    .as_deref()
                    .map(|f| format!(", {f}"))
                    .unwrap_or_default()
            );
            println!("reason:     {}", clean(&e.reason));
            println!("policy:     {}", e.policy_version);
            if e.truncated {
                println!(
                    "note:       the logged arguments were shortened to fit the log; they are decided again as logged"
                );
            }
            for (i, inp) in e.inputs.iter().enumerate() {
                let what = if i == 0 { "decided on" } else { "also decided" };
                println!("{what}: {} sha256:{}", clean(&inp.exe), inp.exe_sha256);
                if !inp.exe_aliases.is_empty() {
                    println!("  also known as: {}", clean(&inp.exe_aliases.join(", ")));
                }
                println!("  argv: {}", serde_json::to_string(&inp.argv)?);
                println!(
                    "  cwd: {}  parent: {}  env: {} names",
                    clean(&inp.cwd),
                    clean(&inp.parent),
                    inp.env_names.len()
                );
            }
            match (&merged, &again) {
                (None, _) => println!(
                    "reproduced: no (the policy snapshot {} is missing)",
                    snap.display()
                ),
                (Some(_), Some(d)) => println!(
                    "reproduced: {} (decided again: {:?} by {})",
                    if reproduced { "yes" } else { "NO" },
                    d.action,
                    d.rule
                ),
                (Some(_), None) => {
                    println!("reproduced: {}", if reproduced { "yes" } else { "no" })
                }
            }
            if let Some(x) = &exception {
                println!("exception:  {x}");
            }
        }
    }
    Ok(i32::from(!reproduced))
}

/// `s` with control characters escaped.
fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The file `argv0` names: a path as given, else the first match on the
/// host's PATH (a dry run has no sandbox to look in).
fn resolve_exe(argv0: &str) -> String {
    if argv0.contains('/') {
        return argv0.to_string();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(argv0))
        .find(|p| p.is_file())
        .map_or_else(|| argv0.to_string(), |p| p.display().to_string())
}

/// `org /etc/…, project /work/…`.
fn tier_list(m: &Merged) -> String {
    m.tiers
        .iter()
        .map(|(n, p, _)| format!("{n} {p}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn list(src: &[TierSource]) -> String {
    src.iter()
        .map(|s| s.path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the merged policy means for one start: checked before anything
/// exists, refused with every reason at once.
pub(crate) struct AtStart {
    /// `sha256:…` of the merged policy (empty: no policy files).
    pub version: String,
    /// Allowlist rules the policy itself grants (host:port), added to the
    /// config's.
    pub rules: Vec<String>,
    /// The merged policy.
    pub policy: aibox_policy::PolicyFile,
    /// The same with its provenance (what the exec gate decides with).
    pub merged: aibox_policy::Merged,
}

/// Loads, merges and applies the policy to a start of `runtime` with
/// config `c` around workspace `ws`.
pub(crate) fn at_start(
    c: &aibox_config::Config,
    runtime: aibox_config::Runtime,
    ws: &Path,
) -> Result<AtStart> {
    let o = evaluate(&sources(c, &TierArgs::default(), ws));
    let mut problems = o.problems();
    let p = o.merged.policy.clone();
    if !problems.is_empty() && o.merged.tiers.is_empty() {
        // A broken or unreadable tier is never the same as no policy.
        anyhow::bail!(
            "the policy refuses this start:\n  {}\n  (`aibox policy validate` explains)",
            problems.join("\n  ")
        );
    }
    if o.merged.tiers.is_empty() {
        return Ok(AtStart {
            version: String::new(),
            rules: Vec::new(),
            policy: p,
            merged: o.merged,
        });
    }
    // Tool rules are enforced by the exec gate alone, which gVisor cannot
    // host (it delivers no seccomp notifications): never start a sandbox
    // that would ignore them. (A rule on `git push` itself is also
    // enforced by the proxy and the push broker, which gVisor has.)
    let tools = p.tools.as_ref();
    let has_tool_rules = tools
        .and_then(|t| t.rules.as_ref())
        .is_some_and(|r| r.iter().any(|x| x.matches != ["git", "push"]))
        || tools
            .and_then(|t| t.default)
            .is_some_and(|d| d != aibox_policy::Risk::Safe)
        || !o.merged.rego.is_empty();
    if has_tool_rules && runtime != aibox_config::Runtime::Native && c.gvisor.enabled {
        problems.push(format!(
            "tools: the policy ({}) has command rules, which the exec gate enforces, and gVisor cannot host the gate (it delivers no seccomp notifications); set gvisor.enabled: false or use --runtime native",
            tier_list(&o.merged)
        ));
    }
    if !c.sandbox.exec_gate {
        problems.push(format!(
            "sandbox.exec_gate: false, but a policy applies ({}) and only the exec gate enforces its tool rules; remove the setting",
            tier_list(&o.merged)
        ));
    }
    // Project Rego must sit in the directory that is read-only inside
    // (a policy file at the workspace top has none).
    let project_file = Path::new(&c.policy.project_policy_path);
    if o.merged.rego.iter().any(|(t, _, _)| t == "project") && project_file.components().count() < 2
    {
        problems.push(format!(
            "project tier: Rego modules need the policy file in a directory of its own (e.g. aibox/policy.yaml), which is read-only inside the sandbox; policy.project_policy_path is `{}`",
            c.policy.project_policy_path
        ));
    }
    use aibox_policy::schema::Engine;
    if let Some(rt) = &p.runtime {
        let engine = match runtime {
            aibox_config::Runtime::Native => Engine::Native,
            aibox_config::Runtime::Podman => Engine::Podman,
            aibox_config::Runtime::Docker => Engine::Docker,
        };
        if let Some(list) = &rt.engines
            && !list.contains(&engine)
        {
            problems.push(format!(
                "runtime.engines: the policy allows {list:?}, not {engine:?}; choose one of them with --runtime"
            ));
        }
        if rt.rootless == Some(true) && aibox_core::euid() == 0 {
            problems.push(
                "runtime.rootless: the policy requires rootless sandboxes; run aibox as an ordinary user".into(),
            );
        }
        let gvisor = runtime == aibox_config::Runtime::Podman && c.gvisor.enabled;
        if rt.gvisor_required == Some(true) && !gvisor {
            problems.push(
                "runtime.gvisor_required: the policy requires gVisor; use --runtime podman with gvisor.enabled: true".into(),
            );
        }
    }
    if let Some(r) = &p.resources {
        let over = |what: &str, have: u64, max: u64, shown: String| {
            (have > max).then(|| {
                format!("resources.{what}: the config asks for {shown}, above the policy's limit; lower it in the config")
            })
        };
        let size = |s: &str| aibox_config::parse_size(s).unwrap_or(u64::MAX);
        problems.extend(
            [
                r.cpus.and_then(|m| {
                    over(
                        "cpus",
                        u64::from(c.resources.cpus),
                        u64::from(m),
                        c.resources.cpus.to_string(),
                    )
                }),
                r.pids
                    .and_then(|m| over("pids", c.resources.pids, m, c.resources.pids.to_string())),
                r.memory.as_deref().and_then(|m| {
                    over(
                        "memory",
                        size(&c.resources.memory),
                        size(m),
                        c.resources.memory.clone(),
                    )
                }),
                r.tmp_size.as_deref().and_then(|m| {
                    over(
                        "tmp_size",
                        size(&c.resources.tmp_size),
                        size(m),
                        c.resources.tmp_size.clone(),
                    )
                }),
            ]
            .into_iter()
            .flatten(),
        );
    }
    let deny = p
        .filesystem
        .as_ref()
        .and_then(|f| f.deny.clone())
        .unwrap_or_default();
    for (i, path) in deny.iter().enumerate() {
        if let Some(why) = aibox_sandbox::mask_path_problem(path) {
            problems.push(format!("filesystem.deny[{i}] `{path}`: {why}"));
        }
    }
    if !deny.is_empty() && (runtime == aibox_config::Runtime::Docker || c.gvisor.enabled) {
        problems.push(format!(
            "filesystem.deny: the policy ({}) denies paths, which aibox masks on the native backend and on podman with runc; docker's command line cannot mask paths and this gVisor does not mask them reliably; use --runtime native, or podman with gvisor.enabled: false",
            tier_list(&o.merged)
        ));
    }
    let mut rules = Vec::new();
    if let Some(allow) = p.network.as_ref().and_then(|n| n.allow.as_ref()) {
        let pats: Vec<(
            Vec<aibox_policy::hosts::Pattern>,
            &aibox_policy::schema::AllowEntry,
        )> = allow
            .iter()
            .map(|e| {
                (
                    e.hosts
                        .iter()
                        .filter_map(|h| aibox_policy::hosts::parse_pattern(h).ok())
                        .collect(),
                    e,
                )
            })
            .collect();
        let permits = |hp: &aibox_policy::hosts::Pattern, port: u16| {
            pats.iter().any(|(ps, e)| {
                e.ports.contains(&port) && ps.iter().any(|x| aibox_policy::hosts::covers(x, hp))
            })
        };
        // Where the gateway sends requests, and fixed addresses for names,
        // are destinations too.
        for prov in &c.network.llm_gateway.providers {
            let Some(up) = &prov.upstream else { continue };
            let authority = up
                .trim_start_matches("https://")
                .split('/')
                .next()
                .unwrap_or_default();
            // (Parsed as the proxy parses a rule; the gateway's default
            // port is 443.)
            match aibox_net::Rule::parse(authority) {
                Ok(r) if permits(r.pattern(), r.port().unwrap_or(443)) => {}
                _ => problems.push(format!(
                    "network.llm_gateway: provider `{}` sends requests to {authority}, outside the policy's network.allow",
                    prov.name
                )),
            }
        }
        for (name, addr) in &c.network.resolve {
            match aibox_policy::hosts::parse_pattern(addr.trim()) {
                Ok(hp) if pats.iter().any(|(ps, _)| ps.iter().any(|x| aibox_policy::hosts::covers(x, &hp))) => {}
                _ => problems.push(format!(
                    "network.resolve: `{name}` → {addr}: the policy's network.allow does not name that address, so a name could be sent anywhere; list the address in the policy or remove the entry"
                )),
            }
        }
        for rule in aibox_config::all_rules(&c.network) {
            // Exactly as the proxy will read it.
            let Ok(r) = aibox_net::Rule::parse(&rule) else {
                problems.push(format!(
                    "network: `{rule}` cannot be checked against the policy's network.allow; write it as host, host:port, *.domain or an address"
                ));
                continue;
            };
            for port in r.ports() {
                if !permits(r.pattern(), port) {
                    problems.push(format!(
                        "network: `{rule}` (port {port}) is outside the policy's network.allow; remove it from the config{}",
                        if rule.contains(':') { "" } else { ", or name a port the policy permits (e.g. host:443)" }
                    ));
                }
            }
        }
        // Destinations come from the org and team tiers only: the project
        // tier sits in the sandbox's own workspace (a cloned repository
        // brings one), so it may bound the allowlist but never add to it.
        let upper_allows = o.tiers.iter().any(|t| {
            t.name != "project" && t.policy.network.as_ref().is_some_and(|n| n.allow.is_some())
        });
        for e in allow.iter().filter(|_| upper_allows) {
            for h in &e.hosts {
                for port in &e.ports {
                    let host = if h.parse::<std::net::Ipv6Addr>().is_ok() {
                        format!("[{h}]")
                    } else {
                        h.clone()
                    };
                    rules.push(format!("{host}:{port}"));
                }
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "the policy refuses this start ({}):\n  {}\n  (`aibox policy validate` and `aibox policy show --merged` explain the policy)",
            tier_list(&o.merged),
            problems.join("\n  ")
        );
    }
    Ok(AtStart {
        version: o.merged.version.clone(),
        rules,
        policy: p,
        merged: o.merged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The system's org file cannot be dropped by the user's config or
    /// environment: a configured org file only adds a tier below it.
    #[test]
    fn the_system_org_policy_always_applies() {
        let dir = std::env::temp_dir().join(format!("aibox-sys-org-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let system = dir.join("org-policy.yaml");
        std::fs::write(&system, "version: 1\n").unwrap();
        let mut cfg = aibox_config::Config::default();
        let ws = Path::new("/nonexistent-ws");
        let names = |cfg: &aibox_config::Config, args: &TierArgs| {
            sources_with(cfg, args, ws, &system)
                .into_iter()
                .map(|s| (s.name, s.path))
                .collect::<Vec<_>>()
        };
        for configured in ["", "/elsewhere/org.yaml"] {
            cfg.policy.org_baseline_path = configured.into();
            let got = names(&cfg, &TierArgs::default());
            assert_eq!(
                got[0],
                ("org".to_string(), system.clone()),
                "{configured:?}: {got:?}"
            );
        }
        // Configured as the system file itself: once.
        cfg.policy.org_baseline_path = system.display().to_string();
        let got = names(&cfg, &TierArgs::default());
        assert_eq!(
            got.iter().filter(|(_, p)| *p == system).count(),
            1,
            "{got:?}"
        );
        // Without a system file, the configured one is the org tier.
        std::fs::remove_file(&system).unwrap();
        cfg.policy.org_baseline_path = "/elsewhere/org.yaml".into();
        let got = names(&cfg, &TierArgs::default());
        assert_eq!(
            got[0],
            ("org".to_string(), PathBuf::from("/elsewhere/org.yaml"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
