//! `aibox network test`: checks run from inside a sandbox that its egress
//! is what the configuration says: the allowed host reachable through the
//! proxy, and everything else (denied names, raw addresses, DNS to real
//! servers, UDP, ICMP) going nowhere.
//!
//! The checks are blocking and use only the sandbox's own view of the
//! network (its `/etc/resolv.conf`, its loopback), exactly as a tool
//! inside would.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A name no rule should allow (`.invalid` is reserved, and `*.invalid`
/// is refused as a whole top-level domain).
pub const DENIED_NAME: &str = "denied.aibox-network-test.invalid";
/// A public address that no sandbox should reach without a rule.
const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(1, 1, 1, 1);
/// A public DNS resolver.
const PUBLIC_RESOLVER: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);
const TIMEOUT: Duration = Duration::from_secs(5);

/// What to check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Whether the sandbox has egress at all (`network.enabled`).
    pub enabled: bool,
    /// The proxy's port on 127.0.0.1.
    pub proxy_port: u16,
    /// An allowed `host` and port to reach; None when no rule names one.
    pub allowed: Option<(String, u16)>,
    /// Whether a rule names [`PUBLIC_IP`] (then the proxy may reach it).
    pub public_ip_allowed: bool,
}

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// As it should be.
    Pass,
    /// Not as it should be.
    Fail,
    /// Not applicable to this configuration.
    Skip,
}

/// One check's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
    /// What was seen.
    pub detail: String,
}

fn check(name: &str, outcome: Outcome, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        outcome,
        detail: detail.into(),
    }
}

fn pass_if(ok: bool) -> Outcome {
    if ok { Outcome::Pass } else { Outcome::Fail }
}

/// Runs every check of `plan`, in order.
pub fn run(plan: &Plan) -> Vec<Check> {
    let mut out = Vec::new();
    let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, plan.proxy_port));
    if plan.enabled {
        match &plan.allowed {
            Some((host, port)) => {
                let r = proxy_connect(proxy, &format!("{host}:{port}"));
                out.push(check(
                    "allowed host reachable through the proxy",
                    pass_if(matches!(r, Ok(200))),
                    format!("CONNECT {host}:{port}: {}", shown(&r)),
                ));
                let r = resolve(host);
                let synthetic = r.as_ref().is_ok_and(|a| {
                    a.iter().any(
                        |ip| matches!(ip, IpAddr::V4(v) if v.octets()[..2] == crate::dns::SYNTHETIC_PREFIX),
                    )
                });
                out.push(check(
                    "allowed host resolves to an aibox address",
                    pass_if(synthetic),
                    format!("{host}: {}", shown_addrs(&r)),
                ));
            }
            None => out.push(check(
                "allowed host reachable through the proxy",
                Outcome::Skip,
                "no rule names a single host (add one to network.allowed_domains, or pass --host)",
            )),
        }
        let r = proxy_connect(proxy, &format!("{DENIED_NAME}:443"));
        out.push(check(
            "denied host refused by the proxy",
            pass_if(matches!(r, Ok(403))),
            format!("CONNECT {DENIED_NAME}:443: {}", shown(&r)),
        ));
        if plan.public_ip_allowed {
            out.push(check(
                "raw IP refused by the proxy",
                Outcome::Skip,
                format!("a rule names {PUBLIC_IP}"),
            ));
        } else {
            let r = proxy_connect(proxy, &format!("{PUBLIC_IP}:443"));
            out.push(check(
                "raw IP refused by the proxy",
                pass_if(matches!(r, Ok(403))),
                format!("CONNECT {PUBLIC_IP}:443: {}", shown(&r)),
            ));
        }
    } else {
        let r = TcpStream::connect_timeout(&proxy, TIMEOUT);
        out.push(check(
            "no proxy (network disabled)",
            pass_if(r.is_err()),
            format!("connect {proxy}: {}", shown_io(&r)),
        ));
    }
    let r = TcpStream::connect_timeout(&SocketAddr::from((PUBLIC_IP, 443)), TIMEOUT);
    out.push(check(
        "raw IP unreachable without the proxy",
        pass_if(r.is_err()),
        format!("connect {PUBLIC_IP}:443: {}", shown_io(&r)),
    ));
    let r = resolve(DENIED_NAME);
    out.push(check(
        "DNS for a denied name fails",
        pass_if(r.is_err()),
        format!("{DENIED_NAME}: {}", shown_addrs(&r)),
    ));
    let r = udp_exchange(SocketAddr::from((PUBLIC_RESOLVER, 53)), &dns_query());
    out.push(check(
        "DNS to a public resolver goes nowhere",
        pass_if(r.is_err()),
        format!("UDP {PUBLIC_RESOLVER}:53: {}", shown_io(&r)),
    ));
    let r = udp_exchange(SocketAddr::from((PUBLIC_IP, 443)), b"\x0dQUIC?");
    out.push(check(
        "UDP (QUIC) goes nowhere",
        pass_if(r.is_err()),
        format!("UDP {PUBLIC_IP}:443: {}", shown_io(&r)),
    ));
    let r = icmp_echo(PUBLIC_IP);
    out.push(check(
        "ICMP goes nowhere",
        pass_if(r.is_err()),
        format!("echo to {PUBLIC_IP}: {}", shown_io(&r)),
    ));
    out
}

fn shown(r: &std::io::Result<u16>) -> String {
    match r {
        Ok(code) => format!("HTTP {code}"),
        Err(e) => e.to_string(),
    }
}

fn shown_io<T>(r: &std::io::Result<T>) -> String {
    match r {
        Ok(_) => "it got through".into(),
        Err(e) => format!("refused ({e})"),
    }
}

fn shown_addrs(r: &std::io::Result<Vec<IpAddr>>) -> String {
    match r {
        Ok(a) => a
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("no address ({e})"),
    }
}

/// The status code the proxy answers a CONNECT with.
fn proxy_connect(proxy: SocketAddr, target: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect_timeout(&proxy, TIMEOUT)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n") && head.len() < 256 {
        if s.read(&mut b)? == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("the proxy gave no status line"))
}

/// Addresses of `name` from the system resolver (the sandbox's).
fn resolve(name: &str) -> std::io::Result<Vec<IpAddr>> {
    Ok((name, 443)
        .to_socket_addrs()?
        .map(|a| a.ip())
        .collect::<Vec<_>>())
}

/// Sends one datagram and waits briefly for any answer: Ok only if the
/// packet went out and something came back.
fn udp_exchange(to: SocketAddr, payload: &[u8]) -> std::io::Result<usize> {
    let u = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    u.set_read_timeout(Some(Duration::from_secs(2)))?;
    u.send_to(payload, to)?;
    let mut buf = [0u8; 512];
    u.recv(&mut buf)
}

/// A DNS query for `example.com` A.
fn dns_query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["example", "com"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// One ICMP echo on an unprivileged ICMP socket: Ok only if a reply came.
fn icmp_echo(to: Ipv4Addr) -> std::io::Result<usize> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let echo: [u8; 8] = [8, 0, 0, 0, 0, 1, 0, 1];
    s.send_to(&echo, &SocketAddr::from((to, 0)).into())?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    s.recv(&mut buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_query_is_well_formed() {
        let q = dns_query();
        let m = hickory_proto::op::Message::from_vec(&q).unwrap();
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].name().to_ascii(), "example.com.");
    }

    /// Against a stand-in proxy: the status line is read, not guessed.
    #[test]
    fn proxy_status_is_read() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut b = [0u8; 256];
                let n = s.read(&mut b).unwrap();
                let code = if String::from_utf8_lossy(&b[..n]).contains(DENIED_NAME) {
                    403
                } else {
                    200
                };
                let _ = write!(s, "HTTP/1.1 {code} X\r\n\r\n");
            }
        });
        assert_eq!(proxy_connect(at, "ok.test:443").unwrap(), 200);
        assert_eq!(
            proxy_connect(at, &format!("{DENIED_NAME}:443")).unwrap(),
            403
        );
    }
}
