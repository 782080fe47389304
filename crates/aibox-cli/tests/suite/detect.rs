//! The end-to-end audit scenario on a real sandbox: start, shell, allowed
//! and denied network, DNS, allowed/denied/review commands, credential
//! use and rotation, an LLM call, file writes in the workspace, alerts,
//! stop, and a push approved after the stop. Every one of the 25 event
//! types must be in the log, and each of the ten detection rules must
//! fire exactly when its (lowered) threshold is reached — never before —
//! with the events that reached it as evidence.

use super::common::*;
use super::push::{add_git_token, git_workspace, queued_id};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};

/// An HTTP server that reads whole request bodies and answers 200: what
/// the sandbox uploads counts as sent.
fn upload_sink() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(&s);
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                let _ = r.read_exact(&mut body);
                let _ = (&s).write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            });
        }
    });
    port
}

/// Starts `aibox metrics serve` on a free port and scrapes `/metrics`.
fn scrape(c: &Ctx) -> String {
    let mut serve = c
        .aibox(&["metrics", "serve", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(serve.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Business hours that exclude the present (two to three hours from now,
/// UTC), so every credential issued in the test is off-hours.
fn hours_excluding_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let m = (secs % 86400) / 60;
    let hhmm = |x: u64| format!("{:02}:{:02}", (x % 1440) / 60, x % 60);
    format!("{}-{}", hhmm(m + 120), hhmm(m + 180))
}

/// The longest base64 run in an event's non-content detail strings
/// (written here independently of the detector).
fn base64_run(d: &Value) -> u64 {
    fn walk(v: &Value, best: &mut u64) {
        match v {
            Value::String(s) => {
                let mut run = 0;
                for c in s.chars() {
                    if c.is_ascii_alphanumeric() || "+/=-_".contains(c) {
                        run += 1;
                        *best = (*best).max(run);
                    } else if c != '\n' && c != '\r' {
                        run = 0;
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, best)),
            Value::Object(m) => m.values().for_each(|x| walk(x, best)),
            _ => {}
        }
    }
    let mut best = 0;
    if let Value::Object(m) = d {
        for (k, v) in m {
            if ![
                "body",
                "request_body",
                "response_body",
                "prompt",
                "completion",
                "path",
            ]
            .contains(&k.as_str())
            {
                walk(v, &mut best);
            }
        }
    }
    best
}

fn is_alert(e: &Value, id: &str) -> bool {
    e["event_type"] == "falco.alert" && e["details"]["rule_id"] == id
}

/// Walks the log in order and checks that rule `id` fires exactly when
/// the amounts of qualifying events since its last alert reach
/// `threshold`: right after the event that reaches it (among the alerts
/// that event raised), never before, naming exactly those events. Returns
/// how often it fired.
fn fires_exactly(
    events: &[Value],
    id: &str,
    threshold: u64,
    reported: u64,
    amount: &dyn Fn(usize, &Value) -> u64,
) -> usize {
    let (mut sum, mut pending, mut fired) = (0u64, Vec::<u64>::new(), 0usize);
    let mut due = false;
    for (i, e) in events.iter().enumerate() {
        if is_alert(e, id) {
            assert!(
                due,
                "{id} fired at seq {} before its threshold ({sum} < {threshold})",
                e["seq"]
            );
            let evidence: Vec<u64> = e["details"]["evidence_seqs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            let tail = &pending[pending.len().saturating_sub(100)..];
            assert_eq!(evidence, tail, "{id} evidence at seq {}", e["seq"]);
            assert_eq!(e["details"]["threshold"], reported, "{id}");
            (sum, due) = (0, false);
            pending.clear();
            fired += 1;
            continue;
        }
        if due && e["event_type"] != "falco.alert" {
            panic!(
                "{id} did not fire after seq {} ({sum} >= {threshold})",
                events[i - 1]["seq"]
            );
        }
        let a = amount(i, e);
        if a > 0 {
            sum += a;
            pending.push(e["seq"].as_u64().unwrap());
            due = sum >= threshold;
        }
    }
    assert!(!due, "{id} did not fire at the end of the log");
    fired
}

both_modes!(
    every_event_type_and_every_rule_on_a_real_run,
    |mut c: Ctx| {
        let srv = git_workspace(&c);
        let p = srv.port;
        let sink = upload_sink();
        let (llm_ca, llm_tls) = tls_server(&["llm.test"]);
        let lp = crate::suite::llm::llm_server(llm_tls);
        let llm_ca_file = c.dir.path().join("llm-ca.pem");
        std::fs::write(&llm_ca_file, llm_ca).unwrap();
        c.env("AIBOX_TEST_LLM_KEY", crate::suite::llm::KEY);
        let policy = c.dir.path().join("org-policy.yaml");
        std::fs::write(
        &policy,
        "version: 1\ntools:\n  rules:\n    - match: [git, push]\n      risk: review-required\n      reason: pushes are reviewed\n    - match: [sort]\n      risk: blocked-by-default\n      reason: no sorting here\n",
    )
    .unwrap();
        c.add_config(&format!(
        "policy:
  org_baseline_path: {policy}
network:
  allowed_domains: [\"git.test:{p}\", \"127.0.0.1:{p}\", \"svc.test:{sink}\", \"127.0.0.1:{sink}\", \"127.0.0.1:{lp}\"]
  resolve: {{git.test: 127.0.0.1, svc.test: 127.0.0.1, llm.test: 127.0.0.1}}
  llm_gateway:
    providers:
      - {{name: main, host: llm.test, style: anthropic, api_key_env: AIBOX_TEST_LLM_KEY, upstream: \"https://llm.test:{lp}\", upstream_ca: {llm_ca}}}
credentials:
  upstream_ca: {git_ca}
audit:
  detection:
    outbound_bytes: 300000
    outbound_window: 1h
    dns_queries: 8
    dns_window: 1h
    business_hours: \"{hours}\"
    blocked_network: 5
    blocked_network_window: 1h
    llm_request_bytes: 100000
    policy_denials: 3
    policy_denials_window: 1h
",
        policy = policy.display(),
        llm_ca = llm_ca_file.display(),
        git_ca = srv.ca.display(),
        hours = hours_excluding_now(),
    ));
        add_git_token(&c, p, false);
        let ws = c.ws.display().to_string();
        ok(&c.out(&["start", "-w", &ws, "--name", "e2e"]));
        let sh = |script: &str| c.out(&["exec", "--name", "e2e", "--", "sh", "-c", script]);

        // A shell session, a file written and read in the workspace.
        let mut pty = Pty::spawn(c.aibox(&["shell", "--name", "e2e"]), 24, 80);
        pty.master
        .write_all(b"echo written-by-agent > /workspace/notes.txt; cat /workspace/notes.txt; echo done-$((6*7)); exit 0\n")
        .unwrap();
        let out = pty.read_until("done-42");
        assert!(out.contains("written-by-agent"), "{out:?}");
        assert_eq!(pty.child.wait().unwrap().code(), Some(0));
        // Denied commands: three reach the policy-burst threshold.
        let out = sh("for i in 1 2 3 4; do sort </dev/null; echo rc=$?; sleep 0.2; done");
        let text = stdout(&out);
        assert!(
            text.matches("rc=").count() == 4 && !text.contains("rc=0"),
            "{text}"
        );
        // DNS, allowed and denied.
        sh("for i in 1 2 3 4 5 6 7 8 9 10; do getent hosts q$i.example.test; done; true");
        // Blocked network, and the metadata service (a critical alert).
        sh(
            "for i in 1 2 3 4 5 6; do curl -s -o /dev/null http://evil$i.test/; done; curl -s -o /dev/null --connect-timeout 3 http://169.254.169.254/latest/meta-data/; true",
        );
        // Uploads: 2 × 200 kB reach the 300 kB outbound threshold.
        let up = ok(&sh(&format!(
            "for i in 1 2; do head -c 200000 /dev/zero | curl -sS --data-binary @- http://svc.test:{sink}/up; echo; done"
        )));
        assert_eq!(up.matches("ok").count(), 2, "{up}");
        // LLM calls: a small one, then one over the payload threshold.
        let llm = ok(&sh(
            "curl -sS https://llm.test/v1/messages -H \"x-api-key: $ANTHROPIC_API_KEY\" -d '{\"model\":\"m\"}'; echo; head -c 150000 /dev/zero | tr '\\0' a > /tmp/big; curl -sS https://llm.test/v1/messages -H \"x-api-key: $ANTHROPIC_API_KEY\" --data-binary @/tmp/big",
        ));
        assert_eq!(
            llm.matches("\"saw_x_api_key\":\"real\"").count(),
            2,
            "{llm}"
        );
        // A long base64 argument.
        let blob = "QUJD".repeat(2600);
        ok(&c.out(&["exec", "--name", "e2e", "--", "echo", &blob]));
        // git: fetch with the injected credential, a reviewed push, a push to
        // a foreign remote; then the credential is rotated in place.
        ok(&sh(
            "cd /workspace && git fetch -q origin && git reset -q --hard origin/main && git config user.name agent && git config user.email agent@sandbox",
        ));
        let queued = sh(
            "cd /workspace && echo change > feature.txt && git add feature.txt && git commit -qm 'agent change' && git push origin main 2>&1",
        );
        let id = queued_id(&stdout(&queued));
        let foreign = sh(&format!(
            "cd /workspace && git push https://git.test:{p}/other.git main 2>&1"
        ));
        assert!(!foreign.status.success());
        add_git_token(&c, p, true);
        ok(&c.out(&["stop", "--name", "e2e"]));
        // Approved after the stop: the credential is used with no session.
        ok(&c.out(&["push", "approve", &id]));

        let events = audit_events(&c, "e2e");
        let types: std::collections::BTreeSet<&str> = events
            .iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect();
        let all = [
            "sandbox.create",
            "sandbox.start",
            "sandbox.stop",
            "sandbox.destroy",
            "sandbox.config",
            "network.allow",
            "network.deny",
            "dns.query",
            "dns.response",
            "tool.invoke",
            "tool.approve",
            "tool.deny",
            "credential.issue",
            "credential.use",
            "credential.rotate",
            "credential.revoke",
            "policy.allow",
            "policy.deny",
            "llm.request",
            "llm.response",
            "file.read",
            "file.write",
            "falco.alert",
            "session.start",
            "session.end",
        ];
        let missing: Vec<&&str> = all.iter().filter(|t| !types.contains(**t)).collect();
        assert!(
            missing.is_empty(),
            "event types missing from the log: {missing:?}"
        );
        assert!(
            events.iter().any(|e| e["event_type"] == "file.write"
                && e["details"]["path"] == "/workspace/notes.txt")
        );

        // Each rule, exactly at its threshold.
        let typ = |e: &Value, t: &str| e["event_type"] == t;
        let one = |b: bool| u64::from(b);
        let n = |id, th, f: &dyn Fn(usize, &Value) -> u64| {
            // Single-event rules report their own measure as the threshold.
            let reported = if id == "aibox-005" { 100000 } else { th };
            let fired = fires_exactly(&events, id, th, reported, f);
            assert!(fired >= 1, "{id} never fired");
            fired
        };
        n("aibox-001", 300000, &|_, e| {
            if typ(e, "network.allow") {
                e["details"]["bytes_up"].as_u64().unwrap_or(0)
            } else {
                0
            }
        });
        n("aibox-002", 8, &|_, e| one(typ(e, "dns.query")));
        n("aibox-003", 1, &|_, e| one(typ(e, "credential.issue")));
        n("aibox-004", 5, &|_, e| one(typ(e, "network.deny")));
        n("aibox-005", 1, &|_, e| {
            one(typ(e, "llm.request") && e["details"]["bytes"].as_u64() >= Some(100000))
        });
        assert_eq!(
            n("aibox-006", 1, &|_, e| one(typ(e, "falco.alert")
                && e["severity"] == "critical"
                && !e["details"]["rule_id"]
                    .as_str()
                    .unwrap()
                    .starts_with("aibox-0"))),
            1
        );
        n("aibox-007", 3, &|_, e| one(typ(e, "policy.deny")));
        let stopped = |i: usize| {
            events[..i]
                .iter()
                .rev()
                .find(|e| {
                    typ(e, "sandbox.stop") || typ(e, "sandbox.create") || typ(e, "sandbox.start")
                })
                .is_some_and(|e| typ(e, "sandbox.stop"))
        };
        assert_eq!(
            n("aibox-008", 1, &|i, e| one((typ(e, "credential.use")
                || typ(e, "credential.issue"))
                && stopped(i))),
            1
        );
        n("aibox-009", 10240, &|_, e| {
            if typ(e, "falco.alert") {
                0
            } else {
                let r = base64_run(&e["details"]);
                // A single event either reaches it or not.
                if r >= 10240 { 10240 } else { 0 }
            }
        });
        n("aibox-010", 1, &|_, e| {
            one(typ(e, "tool.deny") && e["details"]["rule"] == "git-push-foreign-remote")
        });
        let alert = events.iter().find(|e| is_alert(e, "aibox-006")).unwrap();
        assert_eq!(
            (&alert["severity"], &alert["details"]["mitre"]),
            (&"critical".into(), &"T1611".into())
        );
        assert!(ok(&c.out(&["audit", "verify", "--name", "e2e"])).contains("intact"));

        // The metrics endpoint, scraped over HTTP: every series the
        // exported alert rules and dashboards use has samples here.
        let served = scrape(&c);
        assert!(served.contains("aibox_sandboxes_running 0\n"), "{served}");
        assert!(
            served.contains(
                "aibox_alerts_total{sandbox=\"e2e\",rule_id=\"aibox-004\",severity=\"high\"} "
            ),
            "{served}"
        );
        let with_samples: std::collections::BTreeSet<String> = served
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(|n| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .fold(n, |n, s| n.strip_suffix(s).unwrap_or(n))
                    .to_string()
            })
            .collect();
        let target = c.dir.path().join("siem");
        ok(&c.out(&["siem", "export", "--target", &target.display().to_string()]));
        let rules = target.join("prometheus/aibox-rules.yml");
        let check = std::process::Command::new("promtool")
            .args(["check", "rules"])
            .arg(&rules)
            .output()
            .unwrap();
        assert!(
            check.status.success() && stdout(&check).contains("10 rules found"),
            "{}{}",
            stdout(&check),
            stderr(&check)
        );
        let mut exprs: Vec<String> = Vec::new();
        let r: Value = serde_saphyr::from_str(&std::fs::read_to_string(&rules).unwrap()).unwrap();
        for rule in r["groups"][0]["rules"].as_array().unwrap() {
            exprs.push(rule["expr"].as_str().unwrap().to_string());
        }
        // The configured thresholds are the rules' numbers.
        assert!(
            exprs
                .iter()
                .any(|e| e.contains("decision=\"deny\"}[3600s])) >= 5")),
            "{exprs:?}"
        );
        for d in [
            "aibox-platform-ops",
            "aibox-security-posture",
            "aibox-executive",
        ] {
            let text = std::fs::read_to_string(target.join(format!("grafana/{d}.json"))).unwrap();
            let dash: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(dash["uid"], d);
            let panels = dash["panels"].as_array().unwrap();
            assert!(panels.len() >= 4, "{d}");
            for p in panels {
                for t in p["targets"].as_array().unwrap() {
                    exprs.push(t["expr"].as_str().unwrap().to_string());
                }
            }
        }
        for e in &exprs {
            let mut names = Vec::new();
            let mut rest = e.as_str();
            while let Some(at) = rest.find("aibox_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.push(&tail[..end]);
                rest = &tail[end..];
            }
            assert!(!names.is_empty(), "{e}");
            for n in names {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .fold(n, |n, s| n.strip_suffix(s).unwrap_or(n));
                assert!(
                    with_samples.contains(base),
                    "{e} uses {n}, which the endpoint does not serve: {with_samples:?}"
                );
            }
        }
    }
);
