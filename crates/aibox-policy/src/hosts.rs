//! Host patterns of `network.allow`: names, `*.suffix` wildcards (sub-
//! domains only) and IP addresses, in aibox-net's canonical form, and
//! whether one pattern is inside another.

use aibox_net::{Host, parse_host};

/// A parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// One name or address.
    Exact(Host),
    /// Every sub-domain of the suffix (not the suffix itself).
    Suffix(String),
}

/// Parses `h`, refusing what would allow too much or is not a host.
pub fn parse_pattern(h: &str) -> Result<Pattern, String> {
    if h == "*" {
        return Err("`*` would allow every host; list hosts or `*.domain` wildcards".into());
    }
    if let Some(suffix) = h.strip_prefix("*.") {
        let s = match parse_host(suffix) {
            Ok(Host::Name(n)) => n,
            _ => return Err("a wildcard needs a domain after `*.`".into()),
        };
        if !s.contains('.') {
            return Err("a wildcard over a whole top-level domain allows too much".into());
        }
        return Ok(Pattern::Suffix(s));
    }
    parse_host(h)
        .map(Pattern::Exact)
        .map_err(|e| format!("not a host name or address: {e}"))
}

/// Checks `h` (for the loader).
pub fn check_pattern(h: &str) -> Result<(), String> {
    parse_pattern(h).map(drop)
}

/// Whether every host `child` matches is matched by `parent`.
pub fn covers(parent: &Pattern, child: &Pattern) -> bool {
    match (parent, child) {
        (Pattern::Exact(p), Pattern::Exact(c)) => p == c,
        (Pattern::Suffix(s), Pattern::Exact(Host::Name(n))) => n.ends_with(&format!(".{s}")),
        (Pattern::Suffix(s), Pattern::Suffix(t)) => t == s || t.ends_with(&format!(".{s}")),
        _ => false,
    }
}

/// Whether `host` (canonical) is matched by `p`.
pub fn matches(p: &Pattern, host: &Host) -> bool {
    covers(p, &Pattern::Exact(host.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        parse_pattern(s).unwrap()
    }

    #[test]
    fn coverage() {
        for (parent, child, yes) in [
            ("api.github.com", "api.github.com", true),
            ("API.GitHub.com.", "api.github.com", true),
            ("api.github.com", "github.com", false),
            ("*.github.com", "api.github.com", true),
            ("*.github.com", "a.b.github.com", true),
            ("*.github.com", "github.com", false),
            ("*.github.com", "evilgithub.com", false),
            ("*.github.com", "*.github.com", true),
            ("*.github.com", "*.api.github.com", true),
            ("*.api.github.com", "*.github.com", false),
            ("api.github.com", "*.github.com", false),
            ("10.0.0.5", "10.0.0.5", true),
            ("10.0.0.5", "10.0.0.6", false),
            ("*.example.com", "10.0.0.5", false),
        ] {
            assert_eq!(covers(&p(parent), &p(child)), yes, "{parent} ⊇ {child}");
        }
        for bad in ["*", "*.com", "*.", "a b", "user@host", "*.10.0.0.1"] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
    }
}
