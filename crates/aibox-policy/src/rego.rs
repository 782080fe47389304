//! Rego, evaluated in-process with regorus (OPA-compatible): the org
//! baseline under `policies/org/` (embedded in the binary) adds findings the
//! YAML rules cannot express, and ships with `test_` rules that
//! [`run_tests`] runs like `opa test`.
//!
//! A [`Decider`] gives one decision for an exec request: the strictest of
//! the YAML tool rules (matched on the file actually executed, not on
//! argv[0]) and every Rego finding. Decisions are cached by (policy
//! version, input).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Merged, Risk, classify};

/// The org baseline modules: (path, text).
pub const BASELINE: &[(&str, &str)] = &[
    (
        "policies/org/tools.rego",
        include_str!("../../../policies/org/tools.rego"),
    ),
    (
        "policies/org/tools_test.rego",
        include_str!("../../../policies/org/tools_test.rego"),
    ),
];

/// Helpers every engine gets (`data.aibox.exec`): the names a program
/// goes by, its arguments.
pub const EXEC_LIB: (&str, &str) = (
    "policies/lib/exec.rego",
    include_str!("../../../policies/lib/exec.rego"),
);

/// The rule a decision reads.
const FINDINGS: &str = "data.aibox.tools.findings";

/// One exec request, as the gate sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecInput {
    /// The command line.
    pub argv: Vec<String>,
    /// Path of the file actually executed.
    pub exe: String,
    /// Its SHA-256 (empty when unknown).
    #[serde(default)]
    pub exe_sha256: String,
    /// Working directory.
    #[serde(default)]
    pub cwd: String,
    /// User id inside.
    #[serde(default)]
    pub uid: u32,
    /// Names of the environment variables (never their values).
    #[serde(default)]
    pub env_names: Vec<String>,
    /// Sandbox name.
    #[serde(default)]
    pub sandbox: String,
    /// Other names of the executed file in the system's program
    /// directories (the same file, or a file with the same SHA-256): a
    /// copy of curl called `fetch` is still curl.
    #[serde(default)]
    pub exe_aliases: Vec<String>,
    /// The parent process's program (`comm`), for context.
    #[serde(default)]
    pub parent: String,
}

/// What happens to the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Runs.
    Allow,
    /// Runs, logged for review.
    Review,
    /// Refused.
    Deny,
}

/// A decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// What happens.
    pub action: Action,
    /// Risk class.
    pub risk: Risk,
    /// The rule that decided (`tools.rules[i]`, `tools.default`, or a
    /// Rego rule name).
    pub rule: String,
    /// Why.
    pub reason: String,
    /// The policy version decided under.
    pub policy_version: String,
    /// SHA-256 of the input (hex, first 16), for the decision log.
    pub input_hash: String,
    /// The tier the deciding rule belongs to (`org`, `team`, `project`,
    /// `org baseline` for the shipped Rego, `default`).
    #[serde(default)]
    pub tier: String,
}

/// Which of `decisions` stands: the strictest, the first on a tie (the
/// file itself before its interpreter or a loader's program). None when
/// empty.
pub fn strictest(decisions: &[Decision]) -> Option<usize> {
    decisions
        .iter()
        .enumerate()
        .max_by(|(ia, a), (ib, b)| a.risk.cmp(&b.risk).then(ib.cmp(ia)))
        .map(|(i, _)| i)
}

/// Decides exec requests under one merged policy.
pub struct Decider {
    engine: regorus::Engine,
    /// One engine per tier that brings Rego: a tier's modules cannot
    /// redefine the baseline's rules or another tier's.
    tier_engines: Vec<(String, regorus::Engine)>,
    merged: Merged,
    /// Keyed by the SHA-256 of the whole input (the sandbox chooses argv:
    /// a short hash could be made to collide; the input itself can be
    /// megabytes).
    cache: HashMap<[u8; 32], Decision>,
}

impl std::fmt::Debug for Decider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decider")
            .field("policy_version", &self.merged.version)
            .finish_non_exhaustive()
    }
}

fn engine_with(modules: &[(&str, &str)]) -> Result<regorus::Engine, String> {
    let mut engine = regorus::Engine::new();
    for (path, text) in modules {
        engine
            .add_policy(path.to_string(), text.to_string())
            .map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(engine)
}

impl Decider {
    /// A decider for `merged` with the org baseline.
    pub fn new(merged: &Merged) -> Result<Decider, String> {
        let data = serde_json::json!({ "policy": merged.policy }).to_string();
        let with_data = |modules: &[(&str, &str)]| -> Result<regorus::Engine, String> {
            let mut engine = engine_with(modules)?;
            engine
                .add_data(regorus::Value::from_json_str(&data).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            Ok(engine)
        };
        let engine = with_data(BASELINE)?;
        let mut tier_engines = Vec::new();
        let mut names: Vec<&str> = merged.rego.iter().map(|(t, _, _)| t.as_str()).collect();
        names.dedup();
        for name in names {
            let mut modules: Vec<(&str, &str)> = vec![EXEC_LIB];
            modules.extend(
                merged
                    .rego
                    .iter()
                    .filter(|(t, _, _)| t == name)
                    .map(|(_, p, x)| (p.as_str(), x.as_str())),
            );
            tier_engines.push((name.to_string(), with_data(&modules)?));
        }
        Ok(Decider {
            engine,
            tier_engines,
            merged: merged.clone(),
            cache: HashMap::new(),
        })
    }

    /// The decision for `input`.
    pub fn decide(&mut self, input: &ExecInput) -> Decision {
        let json = serde_json::to_string(input).unwrap_or_default();
        let key: [u8; 32] = Sha256::digest(json.as_bytes()).into();
        if let Some(d) = self.cache.get(&key) {
            return d.clone();
        }
        let input_hash = hex::encode(&key[..8]);
        let d = self.evaluate(input, &json, input_hash);
        if self.cache.len() >= 4096 {
            self.cache.clear();
        }
        self.cache.insert(key, d.clone());
        d
    }

    fn evaluate(&mut self, input: &ExecInput, json: &str, input_hash: String) -> Decision {
        let p = &self.merged.policy;
        // The program is judged by the file executed and by the name it
        // was called by, the stricter counting: a renamed argv[0] does not
        // hide curl, and a copy of curl called `fetch` is caught by a rule
        // on `fetch` (rules on hashes belong in Rego, with exe_sha256).
        let base = input.exe.rsplit('/').next().unwrap_or(&input.exe);
        let argv0 = input.argv.first().map(String::as_str).unwrap_or_default();
        let mut risk = Risk::Safe;
        let mut rule = None;
        let mut first = true;
        for name in std::iter::once(base)
            .chain(input.exe_aliases.iter().map(String::as_str))
            .chain(std::iter::once(argv0))
        {
            let mut argv = vec![name.to_string()];
            argv.extend(input.argv.iter().skip(1).cloned());
            let (r, i) = classify(p, &argv);
            if first || r > risk || (r == risk && rule.is_none() && i.is_some()) {
                (risk, rule) = (r, i);
            }
            first = false;
        }
        let (mut rule, mut reason, mut tier) = match rule.and_then(|i| {
            p.tools
                .as_ref()?
                .rules
                .as_ref()?
                .get(i)
                .map(|r| (i, r.reason.clone()))
        }) {
            Some((i, why)) => (
                format!("tools.rules[{i}]"),
                why.unwrap_or_else(|| "matched a tool rule".into()),
                self.merged.rule_tiers.get(i).cloned().unwrap_or_default(),
            ),
            None => (
                "tools.default".to_string(),
                "no rule matches".to_string(),
                self.default_tier(),
            ),
        };
        match self.findings(json) {
            Ok(found) => {
                for (r, name, why, from) in found {
                    if r > risk {
                        (risk, rule, reason, tier) = (r, name, why, from);
                    }
                }
            }
            // Fail closed: a policy that cannot be evaluated denies.
            Err((from, e)) => {
                (risk, rule, reason, tier) = (
                    Risk::BlockedByDefault,
                    "rego".into(),
                    format!("the Rego policy could not be evaluated: {e}"),
                    from,
                );
            }
        }
        Decision {
            action: match risk {
                Risk::Safe => Action::Allow,
                Risk::ReviewRequired => Action::Review,
                Risk::BlockedByDefault => Action::Deny,
            },
            risk,
            rule,
            reason,
            policy_version: self.merged.version.clone(),
            input_hash,
            tier,
        }
    }

    /// The lowest tier that sets `tools.default` (`default` when none
    /// does: unmatched commands are `safe`).
    fn default_tier(&self) -> String {
        // (Tiers only record their file's hash; the default's origin is
        // the lowest tier whose policy, merged, sets one.)
        match self.merged.policy.tools.as_ref().and_then(|t| t.default) {
            Some(_) => self
                .merged
                .tiers
                .first()
                .map(|t| t.0.clone())
                .unwrap_or_default(),
            None => "default".into(),
        }
    }

    /// The policy version this decider decides under.
    pub fn policy_version(&self) -> &str {
        &self.merged.version
    }

    /// Every finding of the baseline and of each tier's Rego:
    /// (risk, rule, reason, tier).
    #[allow(clippy::type_complexity)]
    fn findings(
        &mut self,
        input_json: &str,
    ) -> Result<Vec<(Risk, String, String, String)>, (String, String)> {
        let base = || "org baseline".to_string();
        let input =
            regorus::Value::from_json_str(input_json).map_err(|e| (base(), e.to_string()))?;
        let mut out = Vec::new();
        for (f, from) in
            findings_of(&mut self.engine, input.clone(), false).map_err(|e| (base(), e))?
        {
            out.push((f.0, f.1, f.2, from.unwrap_or_else(base)));
        }
        for (name, engine) in &mut self.tier_engines {
            for (f, _) in findings_of(engine, input.clone(), true)
                .map_err(|e| (name.clone(), format!("{name} tier Rego: {e}")))?
            {
                out.push((f.0, f.1, f.2, name.clone()));
            }
        }
        Ok(out)
    }
}

type Finding = ((Risk, String, String), Option<String>);

/// `data.aibox.tools.findings` of `engine` for `input`. A tier's modules
/// may leave it undefined (they add nothing); the baseline may not.
fn findings_of(
    engine: &mut regorus::Engine,
    input: regorus::Value,
    undefined_is_empty: bool,
) -> Result<Vec<Finding>, String> {
    engine.set_input(input);
    let v = engine
        .eval_rule(FINDINGS.to_string())
        .map_err(|e| e.to_string())?;
    if undefined_is_empty && v == regorus::Value::Undefined {
        return Ok(Vec::new());
    }
    let text = v.to_json_str().map_err(|e| e.to_string())?;
    let set: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let Some(items) = set.as_array() else {
        return Err(format!("`findings` is not a set: {text}"));
    };
    let mut out = Vec::new();
    for f in items {
        let risk = serde_json::from_value::<Risk>(f["risk"].clone())
            .map_err(|e| format!("a finding has a bad risk class: {e}"))?;
        out.push((
            (
                risk,
                f["rule"].as_str().unwrap_or("rego").to_string(),
                f["reason"].as_str().unwrap_or_default().to_string(),
            ),
            None,
        ));
    }
    Ok(out)
}

/// One `test_` rule's result.
#[derive(Debug, Clone, Serialize)]
pub struct TestResult {
    /// `package.test_name`.
    pub name: String,
    /// True when the rule evaluated to `true`.
    pub passed: bool,
    /// Why it failed, if it did not evaluate.
    pub error: Option<String>,
}

/// Runs every `test_` rule of `modules` (like `opa test`).
pub fn run_tests(modules: &[(&str, &str)]) -> Result<Vec<TestResult>, String> {
    let mut all = vec![EXEC_LIB];
    all.extend(modules.iter().filter(|m| m.0 != EXEC_LIB.0).copied());
    let mut engine = engine_with(&all)?;
    let mut out = Vec::new();
    for (_, text) in modules {
        let Some(pkg) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("package ").map(str::trim))
        else {
            continue;
        };
        for l in text.lines() {
            let Some(rest) = l.strip_prefix("test_") else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let full = format!("{pkg}.test_{name}");
            let (passed, error) = match engine.eval_rule(format!("data.{full}")) {
                Ok(v) => (v == regorus::Value::from(true), None),
                Err(e) => (false, Some(e.to_string())),
            };
            out.push(TestResult {
                name: full,
                passed,
                error,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(argv: &[&str], exe: &str) -> ExecInput {
        ExecInput {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            exe: exe.into(),
            exe_sha256: String::new(),
            cwd: "/workspace".into(),
            uid: 1000,
            env_names: Vec::new(),
            sandbox: "t".into(),
            exe_aliases: Vec::new(),
            parent: String::new(),
        }
    }

    #[test]
    fn the_baseline_tests_pass() {
        let results = run_tests(BASELINE).unwrap();
        assert!(results.len() >= 6, "{results:?}");
        for r in &results {
            assert!(r.passed, "{r:?}");
        }
    }

    #[test]
    fn a_failing_rego_test_is_reported() {
        let results = run_tests(&[(
            "t.rego",
            "package t\nimport rego.v1\ntest_ok if { 1 == 1 }\ntest_bad if { 1 == 2 }\n",
        )])
        .unwrap();
        let by: HashMap<_, _> = results
            .iter()
            .map(|r| (r.name.as_str(), r.passed))
            .collect();
        assert_eq!(by.get("t.test_ok"), Some(&true));
        assert_eq!(by.get("t.test_bad"), Some(&false));
    }

    #[test]
    fn yaml_and_rego_decide_together_and_the_strictest_wins() {
        let tier = crate::Tier {
            name: "org".into(),
            path: "org.yaml".into(),
            policy: crate::parse(
                "org",
                "org.yaml",
                "version: 1\ntools:\n  rules:\n    - {match: [curl], risk: blocked-by-default, reason: no curl}\n    - {match: [rm], risk: review-required}\n",
            )
            .unwrap(),
            rego: Vec::new(),
        };
        let (merged, _) = crate::merge(&[tier]);
        let mut d = Decider::new(&merged).unwrap();
        // YAML, on the executed file (a renamed curl is curl).
        let x = d.decide(&input(&["fetch", "-s", "x"], "/usr/bin/curl"));
        assert_eq!(
            (x.action, x.rule.as_str(), x.reason.as_str()),
            (Action::Deny, "tools.rules[0]", "no curl")
        );
        // Rego is stricter than the YAML rule for rm -rf /.
        let x = d.decide(&input(&["rm", "-rf", "/"], "/usr/bin/rm"));
        assert_eq!(
            (x.action, x.rule.as_str()),
            (Action::Deny, "org.rego/rm-root")
        );
        // YAML alone for an ordinary rm.
        let x = d.decide(&input(&["rm", "f"], "/usr/bin/rm"));
        assert_eq!(
            (x.action, x.rule.as_str()),
            (Action::Review, "tools.rules[1]")
        );
        let x = d.decide(&input(&["ls"], "/usr/bin/ls"));
        assert_eq!(
            (x.action, x.rule.as_str()),
            (Action::Allow, "tools.default")
        );
        assert_eq!(x.policy_version, merged.version);
        // Cached: the same input, the same answer.
        assert_eq!(d.decide(&input(&["ls"], "/usr/bin/ls")), x);
    }
}
