//! The egress allowlist: which host and port a sandbox may reach.
//!
//! Entry syntax (as written in `network.allowed_domains` and policy):
//! `api.github.com`, `api.github.com:8443`, `*.npmjs.org` (sub-domains
//! only, never the bare name), `203.0.113.7:8080`, `[2001:db8::1]:443`.
//! A name rule without a port allows 443 through CONNECT and 80/443 for
//! plain HTTP. An IP rule is the only way to reach a literal address, and
//! the only way a name may resolve to a loopback, private, link-local or
//! metadata address.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::host::{Host, parse_host, split_authority};

/// How a connection asks for its destination; decides default ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A CONNECT tunnel or a transparent connection carrying TLS.
    Tunnel,
    /// A plain HTTP request (proxied absolute-form or transparent port 80).
    Http,
}

/// The host part of a rule, canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// One name.
    Exact(String),
    /// `*.suffix`, stored as `.suffix`: every sub-domain, not the suffix.
    Suffix(String),
    /// One address.
    Ip(IpAddr),
}

impl Pattern {
    /// Parses a host pattern: a name, `*.domain` or an address. `*`,
    /// `*.tld` and wildcards over addresses are refused.
    pub fn parse(host: &str) -> Result<Pattern, String> {
        if host == "*" {
            return Err("allow-all is not supported; list the hosts the sandbox needs".into());
        }
        if let Some(suffix) = host.strip_prefix("*.") {
            return match parse_host(suffix) {
                Ok(Host::Name(n)) if n.contains('.') => Ok(Pattern::Suffix(format!(".{n}"))),
                Ok(Host::Name(_)) => {
                    Err("a wildcard over a whole top-level domain is too broad".into())
                }
                Ok(Host::Ip(_)) => Err("wildcards apply to names, not addresses".into()),
                Err(e) => Err(e.to_string()),
            };
        }
        match parse_host(host) {
            Ok(Host::Name(n)) => Ok(Pattern::Exact(n)),
            Ok(Host::Ip(ip)) => Ok(Pattern::Ip(ip.to_canonical())),
            Err(e) => Err(format!(
                "{e}; write a host name, `*.domain`, or an IP address, optionally with `:port`"
            )),
        }
    }

    /// Whether `host` is matched.
    pub fn matches(&self, host: &Host) -> bool {
        match (self, host) {
            (Pattern::Exact(p), Host::Name(n)) => p == n,
            (Pattern::Suffix(s), Host::Name(n)) => n.ends_with(s.as_str()),
            (Pattern::Ip(a), Host::Ip(b)) => *a == b.to_canonical(),
            _ => false,
        }
    }

    /// Whether every host `other` matches is matched by this one.
    pub fn covers(&self, other: &Pattern) -> bool {
        match (self, other) {
            (Pattern::Suffix(s), Pattern::Suffix(t)) => t.ends_with(s.as_str()),
            (_, Pattern::Exact(n)) => self.matches(&Host::Name(n.clone())),
            (_, Pattern::Ip(ip)) => self.matches(&Host::Ip(*ip)),
            _ => false,
        }
    }
}

/// One allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pattern: Pattern,
    port: Option<u16>,
    /// The entry as written, for messages and audit.
    pub text: String,
}

/// A refused allowlist entry: which one and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The entry cannot be parsed.
    #[error("network rule `{entry}`: {why}")]
    Invalid {
        /// The entry as written.
        entry: String,
        /// What is wrong and how to write it.
        why: String,
    },
}

fn invalid(entry: &str, why: impl Into<String>) -> RuleError {
    RuleError::Invalid {
        entry: entry.to_string(),
        why: why.into(),
    }
}

impl Rule {
    /// Parses one entry.
    pub fn parse(entry: &str) -> Result<Rule, RuleError> {
        let text = entry.trim();
        let (host, port) = match split_authority(text) {
            Some((h, p)) => (h, Some(p)),
            None if text
                .rsplit_once(':')
                .is_some_and(|(h, _)| !h.contains(':') && !h.starts_with('['))
                || (text.starts_with('[') && text.contains("]:")) =>
            {
                return Err(invalid(entry, "the port must be a number from 1 to 65535"));
            }
            None => (text, None),
        };
        let pattern = Pattern::parse(host).map_err(|why| invalid(entry, why))?;
        Ok(Rule {
            pattern,
            port,
            text: text.to_string(),
        })
    }

    fn host_matches(&self, host: &Host) -> bool {
        self.pattern.matches(host)
    }

    /// The port it names, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// The host part.
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// Every port the rule opens: its own, or 80 and 443 (plain HTTP to
    /// both, `CONNECT` to 443) when it names none.
    pub fn ports(&self) -> Vec<u16> {
        self.port.map_or(vec![80, 443], |p| vec![p])
    }

    fn port_matches(&self, port: u16, access: Access) -> bool {
        match (self.port, access) {
            (Some(p), _) => p == port,
            (None, Access::Tunnel) => port == 443,
            (None, Access::Http) => port == 80 || port == 443,
        }
    }
}

/// The merged allowlist of one sandbox, plus its static name → address
/// entries (`network.hosts`).
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    rules: Vec<Rule>,
    hosts: BTreeMap<String, IpAddr>,
}

impl Allowlist {
    /// Parses every entry; reports the first bad one.
    pub fn parse<S: AsRef<str>>(
        entries: &[S],
        hosts: &BTreeMap<String, String>,
    ) -> Result<Allowlist, RuleError> {
        let rules = entries
            .iter()
            .map(|e| Rule::parse(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut map = BTreeMap::new();
        for (name, addr) in hosts {
            let entry = format!("{name}: {addr}");
            let name = match parse_host(name) {
                Ok(Host::Name(n)) => n,
                _ => return Err(invalid(&entry, "the key must be a host name")),
            };
            let ip = match parse_host(addr) {
                Ok(Host::Ip(ip)) => ip.to_canonical(),
                _ => return Err(invalid(&entry, "the value must be an IP address")),
            };
            map.insert(name, ip);
        }
        Ok(Allowlist { rules, hosts: map })
    }

    /// The rule that allows `host:port`, if any.
    pub fn rule_for(&self, host: &Host, port: u16, access: Access) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.host_matches(host) && r.port_matches(port, access))
    }

    /// Whether some rule names this host at all (any port): the DNS
    /// answerer resolves exactly these names.
    pub fn knows_name(&self, name: &str) -> bool {
        let host = Host::Name(name.to_string());
        self.rules.iter().any(|r| r.host_matches(&host))
    }

    /// Whether an IP rule names `ip` for `port`, which lets a name resolve
    /// to it even when it is loopback/private/metadata.
    pub fn names_address(&self, ip: IpAddr, port: u16, access: Access) -> bool {
        let host = Host::Ip(ip.to_canonical());
        self.rules
            .iter()
            .any(|r| r.host_matches(&host) && r.port_matches(port, access))
    }

    /// A static address configured for `name`.
    pub fn static_address(&self, name: &str) -> Option<IpAddr> {
        self.hosts.get(name).copied()
    }

    /// Ports the transparent listeners accept on: 80, 443 and every port
    /// a name rule lists.
    pub fn transparent_ports(&self) -> Vec<u16> {
        let mut ports = vec![80, 443];
        for r in &self.rules {
            if let (Some(p), Pattern::Exact(_) | Pattern::Suffix(_)) = (r.port, &r.pattern)
                && !ports.contains(&p)
            {
                ports.push(p);
            }
        }
        ports.sort_unstable();
        ports
    }

    /// No rules at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Allowlist {
        match Allowlist::parse(entries, &BTreeMap::new()) {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        }
    }

    fn allows(l: &Allowlist, host: &str, port: u16, access: Access) -> bool {
        match parse_host(host) {
            Ok(h) => l.rule_for(&h, port, access).is_some(),
            Err(_) => false,
        }
    }

    #[test]
    fn exact_wildcard_and_port_rules() {
        let l = list(&[
            "api.github.com",
            "*.npmjs.org",
            "git.example.com:22",
            "203.0.113.7:8080",
        ]);
        assert!(allows(&l, "api.github.com", 443, Access::Tunnel));
        assert!(allows(&l, "API.GITHUB.COM.", 443, Access::Tunnel));
        assert!(!allows(&l, "api.github.com", 22, Access::Tunnel));
        assert!(allows(&l, "api.github.com", 80, Access::Http));
        assert!(!allows(&l, "api.github.com", 80, Access::Tunnel));
        assert!(allows(&l, "registry.npmjs.org", 443, Access::Tunnel));
        assert!(allows(&l, "a.b.npmjs.org", 443, Access::Tunnel));
        // Wildcard edge cases (anchors §4.9).
        assert!(!allows(&l, "npmjs.org", 443, Access::Tunnel));
        assert!(!allows(&l, "evilnpmjs.org", 443, Access::Tunnel));
        assert!(!allows(
            &l,
            "registry.npmjs.org.evil.com",
            443,
            Access::Tunnel
        ));
        assert!(!allows(&l, "api.github.com.evil.com", 443, Access::Tunnel));
        assert!(allows(&l, "git.example.com", 22, Access::Tunnel));
        assert!(!allows(&l, "git.example.com", 443, Access::Tunnel));
        assert!(allows(&l, "203.0.113.7", 8080, Access::Tunnel));
        assert!(allows(&l, "::ffff:203.0.113.7", 8080, Access::Tunnel));
        assert!(!allows(&l, "203.0.113.7", 443, Access::Tunnel));
        let ip = "203.0.113.7".parse().unwrap_or(IpAddr::from([0; 4]));
        assert!(l.names_address(ip, 8080, Access::Tunnel));
        assert!(!l.names_address(ip, 5432, Access::Tunnel));
        assert!(l.knows_name("registry.npmjs.org"));
        assert!(!l.knows_name("npmjs.org"));
        assert_eq!(l.transparent_ports(), vec![22, 80, 443]);
    }

    #[test]
    fn bad_entries_say_what_and_how() {
        for (bad, why) in [
            ("*", "allow-all"),
            ("*.com", "too broad"),
            ("a.com:http", "port must be a number"),
            ("a.com:0", "port must be a number"),
            ("user@a.com", "forbidden character"),
            ("*.10.0.0.1", "not addresses"),
            ("0177.0.0.1", "numeric"),
        ] {
            match Rule::parse(bad) {
                Ok(r) => panic!("{bad:?} accepted as {r:?}"),
                Err(e) => assert!(e.to_string().contains(why), "{bad:?}: {e}"),
            }
        }
        let mut hosts = BTreeMap::new();
        hosts.insert("db.internal".to_string(), "not-an-ip".to_string());
        let e = Allowlist::parse(&["db.internal"], &hosts)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("must be an IP address")));
    }
}
