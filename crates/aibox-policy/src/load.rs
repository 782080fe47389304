//! Reading one tier's file: strict YAML (unknown fields and wrong types are
//! errors with the line and key path), then value checks, all reported.

use std::path::Path;

use crate::schema::{AllowEntry, PolicyFile};
use crate::{Issue, PolicyError};

/// Reads and checks the policy file of `tier` at `path`.
pub fn load(tier: &str, path: &Path) -> Result<PolicyFile, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Unreadable {
        tier: tier.to_string(),
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse(tier, &path.display().to_string(), &text)
}

/// Parses and checks policy text (`file` names it in messages).
pub fn parse(tier: &str, file: &str, text: &str) -> Result<PolicyFile, PolicyError> {
    let issue = |path: String, line: Option<usize>, message: String| Issue {
        tier: tier.to_string(),
        file: file.to_string(),
        line,
        path,
        message,
    };
    // YAML first (syntax errors carry the line), then the typed reading
    // from that tree, which is strict about types (a quoted "443" is not a
    // port) and knows the key path.
    let tree = match serde_saphyr::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Null) => serde_json::Value::Object(Default::default()),
        Ok(v) => v,
        Err(e) => {
            let first = e.to_string();
            let (line, message) = split_location(first.lines().next().unwrap_or_default());
            return Err(PolicyError::Invalid(vec![issue(
                String::new(),
                line,
                message,
            )]));
        }
    };
    let policy = match serde_path_to_error::deserialize::<_, PolicyFile>(tree) {
        Ok(p) => p,
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let line = line_of(text, &path);
            // (Values are cut short: a message must not reproduce a file.)
            let mut message = e.inner().to_string();
            if let Some((i, _)) = message.char_indices().nth(300) {
                message.truncate(i);
                message.push('…');
            }
            return Err(PolicyError::Invalid(vec![issue(path, line, message)]));
        }
    };
    let mut issues = Vec::new();
    check(&policy, &mut |path: String, message: String| {
        let line = line_of(text, &path);
        issues.push(issue(path, line, message));
    });
    if issues.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyError::Invalid(issues))
    }
}

/// `error: line 6 column 7: message` → (Some(6), "message").
fn split_location(s: &str) -> (Option<usize>, String) {
    let s = s.strip_prefix("error: ").unwrap_or(s);
    if let Some(rest) = s.strip_prefix("line ")
        && let Some((loc, msg)) = rest.split_once(": ")
    {
        let line = loc.split_whitespace().next().and_then(|n| n.parse().ok());
        return (line, msg.to_string());
    }
    (None, s.to_string())
}

/// The line where the last key of `path` (`a.b[2].c`) appears, found by
/// walking the text's keys in order (best effort, for messages).
fn line_of(text: &str, path: &str) -> Option<usize> {
    let keys: Vec<&str> = path
        .split('.')
        .map(|k| k.split('[').next().unwrap_or(k))
        .filter(|k| !k.is_empty())
        .collect();
    let mut want = keys.iter().peekable();
    let mut found = None;
    for (n, l) in text.lines().enumerate() {
        // Block style (`key:` at the start) or flow style (`{a: 1, key: 2}`):
        // several keys of the path may sit on one line.
        while let Some(k) = want.peek() {
            let pat = format!("{k}:");
            let hit = l.match_indices(&pat).any(|(i, _)| {
                i == 0 || matches!(l.as_bytes()[i - 1], b' ' | b'{' | b',' | b'-' | b'\t')
            });
            if !hit {
                break;
            }
            found = Some(n + 1);
            want.next();
        }
    }
    if want.peek().is_some() && found.is_none() {
        return None;
    }
    found
}

/// A size such as `512m`, `8g`, or a number of bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match t[digits.len()..]
        .trim_end_matches('b')
        .trim_end_matches('i')
    {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult).filter(|v| *v > 0)
}

/// A duration such as `4h` or `30m`.
pub fn parse_ttl(s: &str) -> Option<std::time::Duration> {
    humantime::parse_duration(s.trim())
        .ok()
        .filter(|d| !d.is_zero())
}

fn check(p: &PolicyFile, report: &mut dyn FnMut(String, String)) {
    if p.version != 1 {
        report(
            "version".into(),
            format!("version {} is not supported; write `version: 1`", p.version),
        );
    }
    if let Some(allow) = p.network.as_ref().and_then(|n| n.allow.as_ref()) {
        let mut ids = std::collections::BTreeSet::new();
        for (i, e) in allow.iter().enumerate() {
            check_entry(i, e, &mut ids, report);
        }
    }
    if let Some(fs) = &p.filesystem {
        if let Some(root) = &fs.workspace_root
            && root != "/workspace"
        {
            report(
                "filesystem.workspace_root".into(),
                format!("`{root}`: the workspace is always at /workspace"),
            );
        }
        for (i, d) in fs.deny.iter().flatten().enumerate() {
            if !d.starts_with('/') || d.contains('\0') || d.split('/').any(|c| c == "..") {
                report(
                    format!("filesystem.deny[{i}]"),
                    format!("`{d}` must be an absolute path without `..`"),
                );
            }
        }
    }
    if let Some(rules) = p.tools.as_ref().and_then(|t| t.rules.as_ref()) {
        for (i, r) in rules.iter().enumerate() {
            if r.matches.is_empty() || r.matches.iter().any(|t| t.is_empty()) {
                report(
                    format!("tools.rules[{i}].match"),
                    "needs at least one non-empty token (the program's name first)".into(),
                );
            }
        }
    }
    if let Some(r) = &p.resources {
        if r.cpus == Some(0) {
            report("resources.cpus".into(), "must be at least 1".into());
        }
        if r.pids == Some(0) {
            report("resources.pids".into(), "must be at least 1".into());
        }
        for (key, v) in [("memory", &r.memory), ("tmp_size", &r.tmp_size)] {
            if let Some(v) = v
                && parse_size(v).is_none()
            {
                report(
                    format!("resources.{key}"),
                    format!("`{v}` is not a size such as 512m or 8g"),
                );
            }
        }
    }
    if let Some(engines) = p.runtime.as_ref().and_then(|r| r.engines.as_ref())
        && engines.is_empty()
    {
        report(
            "runtime.engines".into(),
            "an empty list would allow no backend at all; list at least one".into(),
        );
    }
    if let Some(c) = &p.credentials {
        for (key, v) in [
            ("git_token_ttl", &c.git_token_ttl),
            ("llm_api_key_ttl", &c.llm_api_key_ttl),
            ("mirror_token_ttl", &c.mirror_token_ttl),
        ] {
            if let Some(v) = v
                && parse_ttl(v).is_none()
            {
                report(
                    format!("credentials.{key}"),
                    format!("`{v}` is not a duration such as 4h or 30m"),
                );
            }
        }
        for n in c.expose.iter().flatten() {
            let ok = !n.is_empty()
                && n.len() <= 64
                && !n.starts_with('-')
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                report(
                    "credentials.expose".into(),
                    format!("`{n}` is not a credential name (see `aibox auth list`)"),
                );
            }
        }
    }
}

fn check_entry(
    i: usize,
    e: &AllowEntry,
    ids: &mut std::collections::BTreeSet<String>,
    report: &mut dyn FnMut(String, String),
) {
    let at = format!("network.allow[{i}]");
    if e.id.trim().is_empty() {
        report(format!("{at}.id"), "needs a name".into());
    } else if !ids.insert(e.id.clone()) {
        report(format!("{at}.id"), format!("`{}` is used twice", e.id));
    }
    if e.hosts.is_empty() {
        report(format!("{at}.hosts"), "needs at least one host".into());
    }
    for (j, h) in e.hosts.iter().enumerate() {
        if let Err(why) = crate::hosts::check_pattern(h) {
            report(format!("{at}.hosts[{j}]"), format!("`{h}`: {why}"));
        }
    }
    if e.ports.is_empty() {
        report(format!("{at}.ports"), "needs at least one port".into());
    }
    if e.ports.contains(&0) {
        report(format!("{at}.ports"), "ports are 1-65535".into());
    }
    if let Some(rl) = e.rate_limit {
        // (0 would read as "no limit" further on.)
        if rl.requests_per_min == Some(0) {
            report(
                format!("{at}.rate_limit.requests_per_min"),
                "must be at least 1".into(),
            );
        }
        if rl.tokens_per_min == Some(0) {
            report(
                format!("{at}.rate_limit.tokens_per_min"),
                "must be at least 1".into(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<Issue> {
        match parse("org", "org.yaml", text) {
            Err(PolicyError::Invalid(v)) => v,
            other => panic!("expected errors, got {other:?}"),
        }
    }

    #[test]
    fn unknown_fields_and_types_name_line_and_path() {
        let e = errors(
            "version: 1\ntools:\n  rules:\n    - match: [a]\n      risk: safe\n      bogus: 1\n",
        );
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, Some(6));
        assert_eq!(e[0].path, "tools.rules[0].bogus");
        assert!(
            e[0].message.contains("unknown field `bogus`"),
            "{}",
            e[0].message
        );
        let e = errors(
            "version: 1\nnetwork:\n  allow:\n    - id: x\n      hosts: [a.test]\n      ports: [\"443\"]\n",
        );
        assert_eq!(e[0].path, "network.allow[0].ports[0]");
        assert_eq!(e[0].line, Some(6));
        let e = errors("version: 1\ntools:\n  rules:\n    - match: [rm]\n      risk: dangerous\n");
        assert_eq!(e[0].path, "tools.rules[0].risk");
        assert!(
            e[0].message.contains("dangerous") || e[0].message.contains("variant"),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn value_errors_are_all_reported() {
        let e = errors(
            "version: 2\nnetwork:\n  allow:\n    - id: a\n      hosts: [\"*\", \"*.com\", ok.test]\n      ports: []\n    - id: a\n      hosts: []\n      ports: [0]\nfilesystem:\n  deny: [relative, /a/../b]\nresources:\n  memory: lots\ncredentials:\n  git_token_ttl: forever\n",
        );
        let paths: Vec<&str> = e.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "version",
            "network.allow[0].hosts[0]",
            "network.allow[0].hosts[1]",
            "network.allow[0].ports",
            "network.allow[1].id",
            "network.allow[1].hosts",
            "network.allow[1].ports",
            "filesystem.deny[0]",
            "filesystem.deny[1]",
            "resources.memory",
            "credentials.git_token_ttl",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        assert_eq!(
            e.iter()
                .find(|i| i.path == "resources.memory")
                .and_then(|i| i.line),
            Some(13)
        );
    }

    #[test]
    fn a_good_file_parses() {
        let p = parse(
            "team",
            "team.yaml",
            "version: 1\nnetwork:\n  mode: deny-by-default\n  allow:\n    - id: forge\n      hosts: [git.example.com, \"*.example.org\", 10.0.0.5]\n      ports: [443, 22]\n      rate_limit: {requests_per_min: 60}\ntools:\n  default: safe\n  rules:\n    - match: [git, push]\n      risk: review-required\n      reason: pushes are reviewed\nresources: {cpus: 4, memory: 8g}\nruntime: {engines: [native, podman], rootless: true}\ncredentials: {git_token_ttl: 4h, revoke_on_stop: true}\n",
        )
        .unwrap();
        assert_eq!(p.version, 1);
        assert_eq!(p.tools.unwrap().rules.unwrap()[0].matches, ["git", "push"]);
        assert_eq!(parse_size("8g"), Some(8 << 30));
        assert_eq!(
            parse_ttl("4h"),
            Some(std::time::Duration::from_secs(4 * 3600))
        );
    }
}
