//! One canonical form for host names, so that the allowlist, the DNS
//! answerer and the proxy never disagree about which host a request means.
//!
//! Anything that could be read two ways is refused rather than guessed:
//! NUL and control bytes, userinfo (`@`), backslashes, percent escapes,
//! numeric forms that some resolvers read as IPv4 (`2130706433`,
//! `0177.0.0.1`, `0x7f.1`), overlong names and labels.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A host as the proxy understands it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: ASCII (IDN converted to punycode), lower case, no
    /// trailing dot.
    Name(String),
    /// An IP address literal.
    Ip(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// Why a host string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Empty host.
    #[error("the host is empty")]
    Empty,
    /// A byte that has no place in a host name.
    #[error("the host contains a forbidden character ({0:?})")]
    Forbidden(char),
    /// Longer than DNS allows.
    #[error("the host name is longer than 253 characters")]
    TooLong,
    /// A label is empty or longer than 63 characters.
    #[error("the host name has an empty label or one longer than 63 characters")]
    BadLabel,
    /// A numeric form some resolvers would read as an IPv4 address.
    #[error("the host looks like a numeric IPv4 address in a non-standard form")]
    AmbiguousNumber,
    /// The internationalised name cannot be converted to ASCII.
    #[error("the internationalised host name is not valid (IDNA)")]
    Idna,
    /// Malformed bracketed IPv6 literal.
    #[error("the bracketed IPv6 address is not valid")]
    BadIpv6,
}

/// Parses and canonicalises a host (a name, an IPv4 literal in dotted
/// decimal, or an IPv6 literal with or without brackets).
pub fn parse_host(raw: &str) -> Result<Host, HostError> {
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(HostError::BadIpv6)?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|a| Host::Ip(IpAddr::V6(a)))
            .map_err(|_| HostError::BadIpv6);
    }
    if let Ok(a) = raw.parse::<Ipv6Addr>() {
        return Ok(Host::Ip(IpAddr::V6(a)));
    }
    // Std's parser accepts only plain dotted decimal (no octal, hex or
    // shortened forms), which is the one form every client agrees on.
    if let Ok(a) = raw.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(a)));
    }
    for c in raw.chars() {
        if c.is_control() || c.is_whitespace() || "@\\%/?#[]:<>\"'`|{}^,;=*!$&()+~".contains(c) {
            return Err(HostError::Forbidden(c));
        }
    }
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() || trimmed.ends_with('.') {
        return Err(HostError::BadLabel);
    }
    let ascii = if trimmed.is_ascii() {
        trimmed.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii_strict(trimmed).map_err(|_| HostError::Idna)?
    };
    check_name(&ascii)?;
    Ok(Host::Name(ascii))
}

/// Checks an ASCII lower-case name: lengths, characters, and no
/// numeric-looking final label (WHATWG URL parsers treat such names as
/// IPv4 numbers, so `0x7f.1` could mean 127.0.0.1 to a client).
fn check_name(name: &str) -> Result<(), HostError> {
    if name.len() > 253 {
        return Err(HostError::TooLong);
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(HostError::BadLabel);
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(HostError::Forbidden(c));
        }
        last = label;
    }
    let numeric = last.chars().all(|c| c.is_ascii_digit())
        || (last.starts_with("0x") && last[2..].chars().all(|c| c.is_ascii_hexdigit()));
    if numeric {
        return Err(HostError::AmbiguousNumber);
    }
    Ok(())
}

/// Splits `host:port` (with `[v6]:port` for IPv6); the port is required.
pub fn split_authority(authority: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        let port = rest[end + 1..].strip_prefix(':')?;
        (&authority[..end + 2], port)
    } else {
        let (h, p) = authority.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    if port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    if port == 0 {
        return None;
    }
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Host {
        Host::Name(s.into())
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(parse_host("API.GitHub.com."), Ok(name("api.github.com")));
        assert_eq!(
            parse_host("bücher.example"),
            Ok(name("xn--bcher-kva.example"))
        );
        assert_eq!(
            parse_host("127.0.0.1"),
            Ok(Host::Ip(
                "127.0.0.1"
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
            ))
        );
        assert!(matches!(
            parse_host("[::ffff:127.0.0.1]"),
            Ok(Host::Ip(IpAddr::V6(_)))
        ));
        assert!(matches!(parse_host("::1"), Ok(Host::Ip(IpAddr::V6(_)))));
    }

    #[test]
    fn ambiguous_or_malicious_hosts_are_refused() {
        for bad in [
            "",
            ".",
            "a..b",
            "evil.com\0.allowed.com",
            "evil.com%00.allowed.com",
            "user@allowed.com",
            "allowed.com\\@evil.com",
            "allowed.com:443@evil",
            "allowed.com evil",
            "2130706433",
            "0177.0.0.1",
            "0x7f.1",
            "127.1",
            "1.2.3.4.5",
            "[::1",
            "[nothost]",
            "*.allowed.com",
        ] {
            assert!(
                parse_host(bad).is_err(),
                "{bad:?} accepted: {:?}",
                parse_host(bad)
            );
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert_eq!(parse_host(&long_label), Err(HostError::BadLabel));
        let long = format!("{}com", "a.".repeat(127));
        assert_eq!(parse_host(&long), Err(HostError::TooLong));
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.com:443"), Some(("a.com", 443)));
        assert_eq!(split_authority("[::1]:80"), Some(("[::1]", 80)));
        assert_eq!(split_authority("a.com"), None);
        assert_eq!(split_authority("a.com:0"), None);
        assert_eq!(split_authority("a.com:65536"), None);
        assert_eq!(split_authority("a.com:+443"), None);
        assert_eq!(split_authority("::1:80"), None);
        assert_eq!(split_authority("a.com:443@evil:80"), None);
    }
}
