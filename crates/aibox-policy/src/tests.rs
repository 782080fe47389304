//! Merge tests: every field, tightening and loosening, omitted fields; and
//! a property test that a merged policy never allows what a parent denies.

use super::*;
use crate::schema::*;
use proptest::prelude::*;

fn tier(name: &str, yaml: &str) -> Tier {
    Tier {
        name: name.into(),
        path: format!("{name}.yaml"),
        policy: parse(name, &format!("{name}.yaml"), yaml).unwrap_or_else(|e| panic!("{e}")),
        rego: Vec::new(),
    }
}

/// Merges org then child; returns the merged policy and the violations'
/// key paths.
fn two(org: &str, child: &str) -> (PolicyFile, Vec<String>) {
    let (m, v) = merge(&[tier("org", org), tier("team", child)]);
    (m.policy, v.into_iter().map(|v| v.path).collect())
}

const ORG: &str = "version: 1
network:
  mode: deny-by-default
  allow:
    - id: forge
      hosts: [git.example.com, \"*.example.org\"]
      ports: [443, 22]
    - id: llm
      hosts: [api.llm.test]
      ports: [443]
      rate_limit: {requests_per_min: 60, tokens_per_min: 1000}
filesystem:
  deny: [/workspace/.env]
tools:
  default: safe
  rules:
    - match: [curl]
      risk: blocked-by-default
    - match: [git, push]
      risk: review-required
resources: {cpus: 4, memory: 8g, pids: 1000, tmp_size: 2g}
runtime: {engines: [native, podman], rootless: true, gvisor_required: false}
credentials: {git_token_ttl: 4h, llm_api_key_ttl: 8h, revoke_on_stop: true, no_persist_to_workspace: true, expose: [git-token]}
";

#[test]
fn omitted_fields_inherit_and_violate_nothing() {
    let (p, v) = two(ORG, "version: 1\n");
    assert!(v.is_empty(), "{v:?}");
    let org = parse("org", "org.yaml", ORG).unwrap();
    assert_eq!(p, org);
    // Sections present but fields omitted: the same.
    let (p, v) = two(
        ORG,
        "version: 1\nnetwork: {}\nfilesystem: {}\ntools: {}\nresources: {}\nruntime: {}\ncredentials: {}\n",
    );
    assert!(v.is_empty(), "{v:?}");
    assert_eq!(p, org);
}

#[test]
fn tightening_is_accepted_field_by_field() {
    for (child, check) in [
        (
            "network:\n  allow:\n    - {id: g, hosts: [git.example.com], ports: [443]}\n",
            (|p: &PolicyFile| {
                let a = p.network.as_ref().unwrap().allow.as_ref().unwrap();
                a.len() == 1 && a[0].hosts == ["git.example.com"] && a[0].ports == [443]
            }) as fn(&PolicyFile) -> bool,
        ),
        (
            "network:\n  allow:\n    - {id: d, hosts: [docs.example.org, \"*.cdn.example.org\"], ports: [443]}\n",
            |p| {
                p.network.as_ref().unwrap().allow.as_ref().unwrap()[0]
                    .hosts
                    .len()
                    == 2
            },
        ),
        (
            "network:\n  allow:\n    - {id: l, hosts: [api.llm.test], ports: [443], rate_limit: {requests_per_min: 10}}\n",
            |p| {
                let rl = p.network.as_ref().unwrap().allow.as_ref().unwrap()[0]
                    .rate_limit
                    .unwrap();
                // Lower rpm taken; tpm inherited from the parent.
                rl.requests_per_min == Some(10) && rl.tokens_per_min == Some(1000)
            },
        ),
        ("network:\n  allow: []\n", |p| {
            p.network
                .as_ref()
                .unwrap()
                .allow
                .as_ref()
                .unwrap()
                .is_empty()
        }),
        ("filesystem:\n  deny: [/workspace/secrets]\n", |p| {
            p.filesystem.as_ref().unwrap().deny.as_ref().unwrap().len() == 2
        }),
        ("tools:\n  default: review-required\n", |p| {
            p.tools.as_ref().unwrap().default == Some(Risk::ReviewRequired)
        }),
        (
            "tools:\n  rules:\n    - {match: [git, push], risk: blocked-by-default}\n    - {match: [npm, publish], risk: blocked-by-default}\n",
            |p| {
                let r = p.tools.as_ref().unwrap().rules.as_ref().unwrap();
                r.len() == 3 && r[1].risk == Risk::BlockedByDefault
            },
        ),
        (
            "resources: {cpus: 2, memory: 4g, pids: 500, tmp_size: 1g}\n",
            |p| {
                let r = p.resources.as_ref().unwrap();
                r.cpus == Some(2) && r.memory.as_deref() == Some("4g") && r.pids == Some(500)
            },
        ),
        (
            "runtime: {engines: [native], rootless: true, gvisor_required: true}\n",
            |p| {
                let r = p.runtime.as_ref().unwrap();
                r.engines.as_deref() == Some(&[Engine::Native][..])
                    && r.gvisor_required == Some(true)
            },
        ),
        (
            "credentials: {git_token_ttl: 1h, mirror_token_ttl: 2h}\n",
            |p| {
                let c = p.credentials.as_ref().unwrap();
                c.git_token_ttl.as_deref() == Some("1h")
                    && c.mirror_token_ttl.as_deref() == Some("2h")
            },
        ),
    ] {
        let (p, v) = two(ORG, &format!("version: 1\n{child}"));
        assert!(v.is_empty(), "{child}: {v:?}");
        assert!(check(&p), "{child}: {p:#?}");
    }
}

#[test]
fn every_loosening_is_reported_with_its_path() {
    let child = "version: 1
network:
  allow:
    - id: more
      hosts: [evil.test, git.example.com, example.org, \"*.example.com\"]
      ports: [443, 8443]
    - id: llm
      hosts: [api.llm.test]
      ports: [443]
      rate_limit: {requests_per_min: 600, tokens_per_min: 5000}
tools:
  default: safe
  rules:
    - {match: [curl], risk: safe}
    - {match: [git, push], risk: safe}
    - {match: [wget], risk: safe}
resources: {cpus: 8, memory: 16g, pids: 5000, tmp_size: 4g}
runtime: {engines: [native, docker], rootless: false}
credentials: {git_token_ttl: 24h, llm_api_key_ttl: 9h, revoke_on_stop: false, no_persist_to_workspace: false, expose: [git-token, mirror-token]}
";
    let (org, team) = (tier("org", ORG), tier("team", child));
    let (m, v) = merge(&[org, team]);
    let paths: Vec<&str> = v.iter().map(|v| v.path.as_str()).collect();
    for want in [
        "network.allow[0].hosts[0]",
        "network.allow[0].hosts[1]",
        "network.allow[0].hosts[2]",
        "network.allow[0].hosts[3]",
        "network.allow[1].rate_limit.requests_per_min",
        "network.allow[1].rate_limit.tokens_per_min",
        "tools.rules[0].risk",
        "tools.rules[1].risk",
        "resources.cpus",
        "resources.memory",
        "resources.pids",
        "resources.tmp_size",
        "runtime.engines",
        "runtime.rootless",
        "credentials.git_token_ttl",
        "credentials.llm_api_key_ttl",
        "credentials.revoke_on_stop",
        "credentials.no_persist_to_workspace",
        "credentials.expose",
    ] {
        assert!(paths.contains(&want), "{want} not reported: {paths:?}");
    }
    // Each names the tier, the parent value and the attempt.
    let cpus = v.iter().find(|v| v.path == "resources.cpus").unwrap();
    assert_eq!(
        (
            cpus.tier.as_str(),
            cpus.parent.as_str(),
            cpus.attempted.as_str()
        ),
        ("team", "4", "8")
    );
    let push = v.iter().find(|v| v.path == "tools.rules[1].risk").unwrap();
    assert_eq!(push.parent, "review-required for `git push`");
    assert_eq!(push.attempted, "safe");
    // `tools.default: safe` equals the parent's: not a loosening.
    assert!(!paths.contains(&"tools.default"));
    // The merged result kept the stricter values.
    let p = &m.policy;
    assert_eq!(p.resources.as_ref().unwrap().cpus, Some(4));
    assert_eq!(p.runtime.as_ref().unwrap().rootless, Some(true));
    assert_eq!(
        p.runtime.as_ref().unwrap().engines.as_deref(),
        Some(&[Engine::Native][..])
    );
    assert_eq!(classify(p, &["curl".into()]).0, Risk::BlockedByDefault);
    let allow = p.network.as_ref().unwrap().allow.as_ref().unwrap();
    assert_eq!(allow[0].hosts, ["git.example.com"], "{allow:?}");
    assert_eq!(allow[0].ports, [443]);
    assert_eq!(allow[1].rate_limit.unwrap().requests_per_min, Some(60));
}

#[test]
fn the_policy_version_follows_the_content() {
    let (a, _) = merge(&[tier("org", ORG)]);
    let (b, _) = merge(&[tier("org", ORG), tier("team", "version: 1\n")]);
    assert_eq!(a.version, b.version);
    let (c, _) = merge(&[
        tier("org", ORG),
        tier("team", "version: 1\nresources: {cpus: 1}\n"),
    ]);
    assert_ne!(a.version, c.version);
    assert!(a.version.starts_with("sha256:") && a.version.len() == 71);
}

#[test]
fn classification() {
    let p = parse("org", "o", ORG).unwrap();
    let c = |s: &str| classify(&p, &s.split(' ').map(String::from).collect::<Vec<_>>());
    assert_eq!(c("/usr/bin/curl -s x"), (Risk::BlockedByDefault, Some(0)));
    assert_eq!(c("git push origin"), (Risk::ReviewRequired, Some(1)));
    assert_eq!(c("git status"), (Risk::Safe, None));
    assert_eq!(c("ls"), (Risk::Safe, None));
}

// ---- property: merging never loosens ----

const HOSTS: [&str; 6] = [
    "a.test",
    "b.test",
    "x.a.test",
    "*.a.test",
    "*.x.a.test",
    "10.0.0.1",
];
const PORTS: [u16; 3] = [22, 80, 443];
const CMDS: [&str; 5] = ["curl", "git", "npm", "ls", "rm"];

fn risk() -> impl Strategy<Value = Risk> {
    prop_oneof![
        Just(Risk::Safe),
        Just(Risk::ReviewRequired),
        Just(Risk::BlockedByDefault)
    ]
}

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    prop_oneof![Just(None), s.prop_map(Some)].boxed()
}

fn entry() -> impl Strategy<Value = AllowEntry> {
    (
        proptest::sample::subsequence(HOSTS.to_vec(), 1..4),
        proptest::sample::subsequence(PORTS.to_vec(), 1..3),
        opt(0u32..200),
    )
        .prop_map(|(hosts, ports, rpm)| AllowEntry {
            id: "e".into(),
            hosts: hosts.into_iter().map(String::from).collect(),
            ports,
            rate_limit: rpm.map(|r| RateLimit {
                requests_per_min: Some(r),
                tokens_per_min: None,
            }),
        })
}

fn policy() -> impl Strategy<Value = PolicyFile> {
    (
        opt(proptest::collection::vec(entry(), 0..3)),
        opt(risk()),
        opt(proptest::collection::vec(
            (proptest::sample::select(CMDS.to_vec()), risk()),
            0..4,
        )),
        (
            opt(1u32..16),
            opt(1u64..5000),
            opt(proptest::sample::select(vec!["1g", "4g", "8g"])),
        ),
        (opt(proptest::bool::ANY), opt(proptest::bool::ANY)),
        (
            opt(proptest::sample::select(vec!["1h", "4h", "8h"])),
            opt(proptest::bool::ANY),
        ),
    )
        .prop_map(
            |(allow, default, rules, (cpus, pids, memory), (rootless, gvisor), (ttl, revoke))| {
                PolicyFile {
                    version: 1,
                    network: Some(NetworkPolicy { mode: None, allow }),
                    filesystem: None,
                    rego: None,
                    tools: Some(ToolsPolicy {
                        default,
                        rules: rules.map(|r| {
                            r.into_iter()
                                .map(|(c, risk)| ToolRule {
                                    matches: vec![c.to_string()],
                                    risk,
                                    reason: None,
                                })
                                .collect()
                        }),
                    }),
                    resources: Some(ResourcesPolicy {
                        cpus,
                        memory: memory.map(String::from),
                        pids,
                        tmp_size: None,
                    }),
                    runtime: Some(RuntimePolicy {
                        engines: None,
                        rootless,
                        gvisor_required: gvisor,
                    }),
                    credentials: Some(CredentialsPolicy {
                        git_token_ttl: ttl.map(String::from),
                        revoke_on_stop: revoke,
                        ..Default::default()
                    }),
                }
            },
        )
}

/// Whether `p` lets `host` be reached on `port` (no allowlist: no bound).
fn reaches(p: &PolicyFile, host: &str, port: u16) -> bool {
    let Some(allow) = p.network.as_ref().and_then(|n| n.allow.as_ref()) else {
        return true;
    };
    let Ok(h) = hosts::parse_pattern(host) else {
        return false;
    };
    allow.iter().any(|e| {
        e.ports.contains(&port)
            && e.hosts
                .iter()
                .filter_map(|x| hosts::parse_pattern(x).ok())
                .any(|x| hosts::covers(&x, &h))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn merged_never_allows_what_a_parent_denies(parent in policy(), child in policy()) {
        let tiers = [
            Tier { name: "org".into(), path: "o".into(), policy: parent.clone(), rego: Vec::new() },
            Tier { name: "team".into(), path: "t".into(), policy: child, rego: Vec::new() },
        ];
        let (m, _) = merge(&tiers);
        let p = &m.policy;
        for h in ["a.test", "b.test", "x.a.test", "y.x.a.test", "10.0.0.1", "c.test"] {
            for port in PORTS {
                prop_assert!(!reaches(p, h, port) || reaches(&parent, h, port), "{h}:{port}");
            }
        }
        for c in CMDS {
            let argv = vec![c.to_string()];
            prop_assert!(classify(p, &argv).0 >= classify(&parent, &argv).0, "{c}");
        }
        let (pr, mr) = (parent.resources.clone().unwrap_or_default(), p.resources.clone().unwrap_or_default());
        if let Some(x) = pr.cpus { prop_assert!(mr.cpus.is_some_and(|m| m <= x)); }
        if let Some(x) = pr.pids { prop_assert!(mr.pids.is_some_and(|m| m <= x)); }
        if let Some(x) = &pr.memory {
            prop_assert!(mr.memory.as_deref().and_then(load::parse_size) <= load::parse_size(x));
        }
        let (prt, mrt) = (parent.runtime.clone().unwrap_or_default(), p.runtime.clone().unwrap_or_default());
        if prt.rootless == Some(true) { prop_assert_eq!(mrt.rootless, Some(true)); }
        if prt.gvisor_required == Some(true) { prop_assert_eq!(mrt.gvisor_required, Some(true)); }
        let (pc, mc) = (parent.credentials.clone().unwrap_or_default(), p.credentials.clone().unwrap_or_default());
        if pc.revoke_on_stop == Some(true) { prop_assert_eq!(mc.revoke_on_stop, Some(true)); }
        if let Some(x) = &pc.git_token_ttl {
            let secs = |s: &str| load::parse_ttl(s).map(|d| d.as_secs());
            prop_assert!(mc.git_token_ttl.as_deref().and_then(secs) <= secs(x));
        }
        // Rate limits of what stays reachable (here: port 443) never rise.
        let limit = |q: &PolicyFile, h: &str| -> Option<u32> {
            q.network.as_ref()?.allow.as_ref()?.iter()
                .filter(|e| e.ports.contains(&443) && e.hosts.iter().any(|x| x == h))
                .filter_map(|e| e.rate_limit.and_then(|r| r.requests_per_min)).min()
        };
        for h in HOSTS {
            if let (Some(pl), true, Some(ml)) = (limit(&parent, h), reaches(p, h, 443), limit(p, h)) {
                prop_assert!(ml <= pl, "{h}: {ml} > {pl}");
            }
        }
    }
}

#[test]
fn a_new_rule_cannot_undercut_the_default_above() {
    let (p, v) = two(
        "version: 1\ntools: {default: review-required}\n",
        "version: 1\ntools:\n  default: blocked-by-default\n  rules: [{match: [curl], risk: safe}, {match: [ls], risk: review-required}]\n",
    );
    assert_eq!(v, ["tools.rules[0].risk"]);
    let c = |s: &str| classify(&p, &[s.to_string()]).0;
    assert_eq!(c("curl"), Risk::ReviewRequired);
    assert_eq!(c("ls"), Risk::ReviewRequired);
    assert_eq!(c("make"), Risk::BlockedByDefault);
}

/// docs/policy.schema.json is generated from the types; regenerate with
/// AIBOX_BLESS=1.
#[test]
fn published_json_schema_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/policy.schema.json");
    let want = serde_json::to_string_pretty(&json_schema()).unwrap() + "\n";
    if std::env::var_os("AIBOX_BLESS").is_some() {
        std::fs::write(path, &want).unwrap();
    }
    let have = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        have == want,
        "docs/policy.schema.json is stale; run with AIBOX_BLESS=1 to regenerate"
    );
}

/// A tier's Rego: loaded from beside its file, checked before use, and
/// able only to add denials (attributed to the tier).
#[test]
fn tier_rego_is_checked_and_only_tightens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("team.yaml");
    let source = |p: &std::path::Path| TierSource {
        name: "team".into(),
        path: p.to_path_buf(),
        required: true,
    };
    let module = "package aibox.tools\nimport rego.v1\nimport data.aibox.exec\nfindings contains {\"risk\": \"blocked-by-default\", \"rule\": \"team.rego/no-make\", \"reason\": \"no make\"} if \"make\" in exec.names\n# A finding milder than the baseline's cannot undo it.\nfindings contains {\"risk\": \"safe\", \"rule\": \"team.rego/rm-ok\", \"reason\": \"fine\"} if \"rm\" in exec.names\n";
    std::fs::write(dir.path().join("team.rego"), module).unwrap();
    std::fs::write(&file, "version: 1\nrego: [team.rego]\n").unwrap();
    let l = load_tiers(&[source(&file)]);
    assert!(l.issues.is_empty(), "{:?}", l.issues);
    let (m, _) = merge(&l.tiers);
    assert_eq!(m.rego.len(), 1);
    assert!(m.policy.rego.is_none());
    let mut d = crate::Decider::new(&m).unwrap();
    let input = |argv: &[&str], exe: &str| crate::ExecInput {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        exe: exe.into(),
        ..Default::default()
    };
    let x = d.decide(&input(&["make"], "/usr/bin/make"));
    assert_eq!(
        (x.action, x.rule.as_str(), x.tier.as_str()),
        (crate::Action::Deny, "team.rego/no-make", "team")
    );
    let x = d.decide(&input(&["rm", "-rf", "/"], "/usr/bin/rm"));
    assert_eq!(
        (x.action, x.rule.as_str()),
        (crate::Action::Deny, "org.rego/rm-root")
    );
    // The module's text is part of the policy version.
    std::fs::write(
        dir.path().join("team.rego"),
        module.replace("no make", "none"),
    )
    .unwrap();
    let (m2, _) = merge(&load_tiers(&[source(&file)]).tiers);
    assert_ne!(m.version, m2.version);

    // Refused: outside the directory, a symlink, a hard link, a module
    // that does not evaluate, a missing one.
    std::os::unix::fs::symlink(dir.path().join("team.rego"), dir.path().join("link.rego")).unwrap();
    std::fs::hard_link(dir.path().join("team.rego"), dir.path().join("hard.rego")).unwrap();
    std::fs::write(
        dir.path().join("bad.rego"),
        "package aibox.tools\nimport rego.v1\nfindings contains x if { x := nope }\n",
    )
    .unwrap();
    for (rego, want) in [
        ("../team.rego", "plain relative path"),
        ("/etc/x.rego", "plain relative path"),
        ("link.rego", "symbolic link"),
        ("hard.rego", "no other hard links"),
        ("bad.rego", "does not evaluate"),
        ("missing.rego", "No such file"),
    ] {
        std::fs::write(&file, format!("version: 1\nrego: [\"{rego}\"]\n")).unwrap();
        let l = load_tiers(&[source(&file)]);
        assert!(
            l.issues
                .iter()
                .any(|i| i.path == "rego[0]" && i.message.contains(want)),
            "{rego}: {:?}",
            l.issues
        );
        assert!(l.tiers[0].rego.is_empty());
    }
}

#[test]
fn only_org_and_team_can_expose_a_credential() {
    let expose = |m: &Merged| m.policy.credentials.as_ref().and_then(|c| c.expose.clone());
    // The project tier is in the workspace: alone it exposes nothing.
    let project = "version: 1\ncredentials: {expose: [git-token]}\n";
    let (m, v) = merge(&[tier("project", project)]);
    assert_eq!(expose(&m), Some(Vec::new()));
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].path, "credentials.expose");
    // An org or team tier can; the project may then only remove names.
    let org = "version: 1\ncredentials: {expose: [git-token, mirror-token]}\n";
    let (m, v) = merge(&[tier("org", org), tier("project", project)]);
    assert_eq!(expose(&m), Some(vec!["git-token".to_string()]));
    assert!(v.is_empty(), "{v:?}");
    let (m, v) = merge(&[tier("team", project)]);
    assert_eq!(expose(&m), Some(vec!["git-token".to_string()]));
    assert!(v.is_empty(), "{v:?}");
}
