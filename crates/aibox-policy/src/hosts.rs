//! Host patterns of `network.allow`: names, `*.suffix` wildcards (sub-
//! domains only) and IP addresses. The proxy's own parser (aibox-net's
//! `rules::Pattern`), so that the policy and the proxy never read a host
//! two ways.

pub use aibox_net::rules::Pattern;

/// Parses `h` exactly as the proxy parses the host of a rule.
pub fn parse_pattern(h: &str) -> Result<Pattern, String> {
    Pattern::parse(h)
}

/// Checks `h` (for the loader).
pub fn check_pattern(h: &str) -> Result<(), String> {
    parse_pattern(h).map(drop)
}

/// Whether every host `child` matches is matched by `parent`.
pub fn covers(parent: &Pattern, child: &Pattern) -> bool {
    parent.covers(child)
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
