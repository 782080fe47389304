//! Which destination addresses the proxy refuses unless a rule names them:
//! everything that is not ordinary public unicast (anti-SSRF). Embedded
//! IPv4 addresses in IPv6 forms (mapped, compatible, NAT64, 6to4) are
//! judged as the IPv4 address they carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why an address is not public, or None for an ordinary public address.
pub fn restricted(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => restricted_v4(a),
        IpAddr::V6(a) => restricted_v6(a),
    }
}

fn restricted_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    let reason = match o {
        [0, ..] => "unspecified/\"this network\" (0.0.0.0/8)",
        [127, ..] => "loopback",
        [10, ..] => "private (10.0.0.0/8)",
        [172, b, ..] if (16..32).contains(&b) => "private (172.16.0.0/12)",
        [192, 168, ..] => "private (192.168.0.0/16)",
        [169, 254, 169, 254] | [168, 63, 129, 16] => "cloud metadata service",
        [192, 0, 0, _] => "IETF protocol assignments (192.0.0.0/24, includes 192.0.0.192 metadata)",
        [198, 18..=19, ..] => "benchmarking range (198.18.0.0/15, used by fake-IP proxies)",
        [169, 254, ..] => "link-local",
        [100, b, ..] if (64..128).contains(&b) => {
            "carrier-grade NAT / cloud metadata (100.64.0.0/10)"
        }
        [a0, ..] if (224..240).contains(&a0) => "multicast",
        [a0, ..] if a0 >= 240 => "reserved/broadcast",
        _ => return None,
    };
    Some(reason)
}

/// The IPv4 address of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
fn mapped_v4(a: Ipv6Addr) -> Option<Ipv4Addr> {
    match a.segments() {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        _ => None,
    }
}

fn restricted_v6(a: Ipv6Addr) -> Option<&'static str> {
    if a.is_unspecified() {
        return Some("unspecified (::)");
    }
    if a.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = mapped_v4(a) {
        return restricted_v4(v4);
    }
    let seg = a.segments();
    // Translation and tunnel prefixes reach whatever gateway sits there;
    // only a rule naming the address may use them.
    if seg[0] == 0 && seg[1] & 0xff00 == 0 {
        return Some("reserved (::/8: IPv4-compatible, SIIT and other embedded forms)");
    }
    if seg[0] == 0x64 && seg[1] == 0xff9b {
        return Some("NAT64 prefix carrying an IPv4 address");
    }
    if seg[0] == 0x2002 {
        return Some("6to4 prefix carrying an IPv4 address");
    }
    let s0 = a.segments()[0];
    let reason = match s0 {
        x if x & 0xfe00 == 0xfc00 => "unique local (fc00::/7, includes fd00:ec2::254 metadata)",
        x if x & 0xffc0 == 0xfe80 => "link-local",
        x if x & 0xffc0 == 0xfec0 => "site-local (deprecated)",
        x if x & 0xff00 == 0xff00 => "multicast",
        0x2001 if a.segments()[1] == 0 => "Teredo tunnel",
        0x0100 if a.segments()[1..4] == [0, 0, 0] => "discard-only (100::/64)",
        _ => return None,
    };
    Some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Option<&'static str> {
        match s.parse::<IpAddr>() {
            Ok(ip) => restricted(ip),
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn restricted_addresses() {
        for s in [
            "0.0.0.0",
            "127.0.0.1",
            "127.255.1.2",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "100.64.0.1",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::8.8.8.8",
            "2002:7f00:0001::1",
            "2002:808:808::ffff:0:0",
            "64:ff9b:1:a00:0:ffff:808:808",
            "::ffff:0:808:808",
            "168.63.129.16",
            "192.0.0.192",
            "198.18.0.1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
        ] {
            assert!(r(s).is_some(), "{s} passed as public");
        }
        // Documentation ranges are not special to the proxy: some
        // networks (mirrors, test labs) route them.
        for s in [
            "203.0.113.80",
            "8.8.8.8",
            "151.101.2.132",
            "172.32.0.1",
            "100.128.0.1",
            "::ffff:8.8.8.8",
            "2a04:4e42::644",
        ] {
            assert_eq!(r(s), None, "{s} refused");
        }
    }
}
