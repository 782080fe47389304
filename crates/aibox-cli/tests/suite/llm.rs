//! The LLM gateway, end to end: curl inside a real sandbox talks HTTPS to
//! a local "LLM" (an HTTPS server on the host's loopback with its own CA,
//! reached through `network.resolve`), holding only a placeholder key; the
//! gateway terminates TLS with the sandbox's CA, adds the real key, limits
//! and logs. (A real LLM API cannot be reached from this machine: the
//! local server stands in for it and answers like one.)

use super::common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

/// The real keys: only the host side ever holds them.
pub(crate) const KEY: &str = "sk-test-REALKEY-4f1c9a7be2d34c0f";
const KEY2: &str = "sk-test-OTHERKEY-99ab01cd";

/// What the stand-in LLM says about a credential: never the value itself
/// (a real API does not echo keys, and the sandbox must not see them).
fn verdict(v: &str) -> &'static str {
    match v {
        "" => "none",
        KEY => "real",
        x if x == format!("Bearer {KEY2}") => "real-bearer-2",
        x if x.contains("aibox-placeholder") || x.contains("placeholder") => "placeholder",
        _ => "other",
    }
}

/// The stand-in LLM: answers a JSON body saying which credentials it was
/// given, with a usage object; with `"stream": true` in the request, three
/// server-sent events 400 ms apart.
pub(crate) fn llm_server(config: Arc<rustls::ServerConfig>) -> u16 {
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
                let mut head = Vec::new();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    head.push(h.trim_end().to_string());
                }
                let header = |name: &str| {
                    head.iter()
                        .find_map(|h| {
                            let (k, v) = h.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                        .unwrap_or_default()
                };
                let len: usize = header("content-length").parse().unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = r.read_exact(&mut body);
                let body = String::from_utf8_lossy(&body).into_owned();
                let echo = serde_json::json!({
                    "request_line": head.first(),
                    "saw_x_api_key": verdict(&header("x-api-key")),
                    "saw_authorization": verdict(&header("authorization")),
                    "saw_host": header("host"),
                    "usage": {"input_tokens": 10, "output_tokens": 20},
                });
                if body.contains("\"stream\":true") {
                    let _ = tls.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
                    );
                    let events = [
                        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n",
                        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hi\"}}\n\n",
                        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":33}}\n\n",
                    ];
                    for (i, e) in events.iter().enumerate() {
                        if i > 0 {
                            std::thread::sleep(std::time::Duration::from_millis(1000));
                        }
                        let _ = tls.write_all(e.as_bytes());
                        let _ = tls.flush();
                    }
                } else {
                    let out = echo.to_string();
                    let _ = tls.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{out}",
                            out.len()
                        )
                        .as_bytes(),
                    );
                }
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

/// Config for a gateway in front of the stand-in LLM at `port`.
fn gateway_config(c: &Ctx, port: u16, ca_pem: &str, mode: &str, extra: &str) -> String {
    let ca = c.dir.path().join("llm-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    format!(
        "network:
  allowed_domains: [\"127.0.0.1:{port}\"]
  resolve: {{llm.test: 127.0.0.1, llm2.test: 127.0.0.1}}
  llm_gateway:
    providers:
      - {{name: main, host: llm.test, style: anthropic, api_key_env: AIBOX_TEST_LLM_KEY, upstream: \"https://llm.test:{port}\", upstream_ca: {ca}}}
      - {{name: second, host: llm2.test, style: openai, api_key_env: AIBOX_TEST_LLM_KEY2, upstream: \"https://llm2.test:{port}/base\", upstream_ca: {ca}}}
    routes: [{{model: \"routed-*\", provider: second}}]
{extra}audit:
  llm_logging_mode: {mode}
",
        ca = ca.display()
    )
}

all_backends!(llm_gateway_holds_the_key_limits_and_logs, |mut c: Ctx| {
    let (ca_pem, config) = tls_server(&["llm.test", "llm2.test"]);
    let port = llm_server(config);
    c.add_config(&gateway_config(
        &c,
        port,
        &ca_pem,
        "full",
        "    requests_per_minute: 5\n    max_body: 1k\n",
    ));
    c.env("AIBOX_TEST_LLM_KEY", KEY);
    c.env("AIBOX_TEST_LLM_KEY2", KEY2);
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "llm"]));
    let sh = |script: &str| c.out(&["exec", "--name", "llm", "--", "sh", "-c", script]);
    // The supervisor got the keys over its stdin, not in its environment
    // (which the engines it runs would inherit).
    let st: serde_json::Value =
        serde_json::from_str(&ok(&c.out(&["status", "--name", "llm", "--format", "json"])))
            .unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", st["supervisor_pid"])).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        !environ.contains(KEY)
            && !environ.contains(KEY2)
            && !environ.contains("AIBOX_TEST_LLM_KEY"),
        "a key is in the supervisor's environment"
    );

    // 1: through the proxy (CONNECT), the placeholder key from the
    // environment; the LLM sees the real one.
    let out = ok(&sh(
        "curl -sS https://llm.test/v1/messages -H \"x-api-key: $ANTHROPIC_API_KEY\" -d '{\"model\":\"claude-test\",\"max_tokens\":5}'",
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["saw_x_api_key"], "real", "{v}");
    assert_eq!(v["saw_authorization"], "none", "{v}");
    assert_eq!(v["request_line"], "POST /v1/messages HTTP/1.1", "{v}");
    // 2: routed by model to the second provider: its key, its style, its
    // base path — even though the sandbox connected to the first host.
    let out = ok(&sh(
        "curl -sS --noproxy '*' https://llm.test/v1/chat -H 'authorization: Bearer placeholder' -d '{\"model\":\"routed-7\"}'",
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["saw_authorization"], "real-bearer-2", "{v}");
    assert_eq!(v["saw_x_api_key"], "none", "{v}");
    assert_eq!(v["request_line"], "POST /base/v1/chat HTTP/1.1", "{v}");
    // 3: a stream arrives event by event, not buffered to the end.
    let out = ok(&sh(
        "curl -sSN https://llm.test/v1/messages -d '{\"model\":\"claude-test\",\"stream\":true}' | while IFS= read -r l; do case \"$l\" in event:*) echo \"$(date +%s%N) $l\";; esac; done",
    ));
    let times: Vec<u128> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(times.len(), 3, "{out}");
    let spread_ms = (times[2] - times[0]) / 1_000_000;
    // (2 s apart when sent; buffered, they would come together. The
    // margin is for a slow `date` in a loaded sandbox.)
    assert!(
        spread_ms >= 1000,
        "events arrived together ({spread_ms} ms apart): {out}"
    );
    // Methods that could echo the key back (TRACE) never reach the LLM.
    let out = ok(&sh(
        "curl -sS -o /dev/null -w '%{http_code}' -X TRACE https://llm.test/v1/messages",
    ));
    assert_eq!(out, "405");
    // 4: too big a body is a 413 (max_body 1k).
    let out = ok(&sh(
        "head -c 4000 /dev/zero | tr '\\0' a > /tmp/big; curl -sS -o /dev/null -w '%{http_code}' https://llm.test/v1/messages --data-binary @/tmp/big",
    ));
    assert_eq!(out, "413");
    // 5: requests per minute (5): three were admitted; two more pass, then
    // 429 with Retry-After.
    let out = ok(&sh(
        "for i in 1 2 3; do curl -sS -o /dev/null -D /tmp/h$i -w 'code=%{http_code}\\n' https://llm.test/v1/messages -d '{\"model\":\"m\"}'; done; grep -i '^retry-after' /tmp/h3",
    ));
    let statuses: Vec<&str> = out.lines().filter(|l| l.starts_with("code=")).collect();
    assert_eq!(statuses, ["code=200", "code=200", "code=429"], "{out}");
    let retry: u64 = out
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=60).contains(&retry), "{out}");

    // The key is nowhere inside: not in any process's environment or
    // command line, not in any file a sandbox process can read where
    // secrets would be put. (The script assembles it from two halves, so
    // that its own command line does not contain it.)
    let (a, b) = KEY.split_at(10);
    let out = ok(&sh(&format!(
        "printf '%s%s\\n' '{a}' '{b}' > /dev/shm/k; grep -lF -f /dev/shm/k /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; grep -rlF -f /dev/shm/k /workspace /home/dev /tmp /aibox /run /etc/ssl/certs/ca-certificates.crt 2>/dev/null; rm /dev/shm/k; env | grep -c '^ANTHROPIC_API_KEY=aibox-placeholder'; echo scanned"
    )));
    assert_eq!(out, "1\nscanned\n", "{out}");
    // (The scan can find: the pattern file itself matches before it goes.)
    let out = ok(&sh(&format!(
        "printf '%s%s\\n' '{a}' '{b}' > /tmp/k2; grep -rlF -f /tmp/k2 /tmp; rm /tmp/k2"
    )));
    assert_eq!(out, "/tmp/k2\n", "the scan cannot find anything: {out}");
    ok(&c.out(&["stop", "--name", "llm"]));

    // Audit: full mode has the bodies; the key is not in the log.
    let log = audit_text(&c, "llm");
    assert!(
        !log.contains(KEY) && !log.contains(KEY2),
        "a key reached the audit log"
    );
    let events = audit_events(&c, "llm");
    let reqs: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event_type"] == "llm.request")
        .map(|e| &e["details"])
        .collect();
    let resps: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event_type"] == "llm.response")
        .map(|e| &e["details"])
        .collect();
    assert!(reqs.iter().any(|d| d["model"] == "claude-test"
        && d["provider"] == "main"
        && d["body"].as_str().is_some_and(|b| b.contains("max_tokens"))
        && d["sha256"].as_str().is_some_and(|h| h.len() == 64)));
    assert!(
        reqs.iter()
            .any(|d| d["model"] == "routed-7" && d["provider"] == "second")
    );
    assert!(resps.iter().any(|d| {
        d["status"] == 200
            && d["input_tokens"] == 10
            && d["output_tokens"] == 20
            && d["body"]
                .as_str()
                .is_some_and(|b| b.contains("saw_x_api_key"))
    }));
    // The stream's tokens, from its events.
    assert!(
        resps
            .iter()
            .any(|d| d["input_tokens"] == 7 && d["output_tokens"] == 33)
    );
    assert!(
        resps
            .iter()
            .any(|d| d["status"] == 413 && d["limited"] == "max_body_bytes")
    );
    assert!(
        resps
            .iter()
            .any(|d| d["status"] == 429 && d["limited"] == "requests_per_minute")
    );
    assert!(ok(&c.out(&["audit", "verify", "--name", "llm"])).contains("intact"));
});

both_modes!(llm_logging_modes_write_what_they_claim, |mut c: Ctx| {
    let (ca_pem, config) = tls_server(&["llm.test", "llm2.test"]);
    let port = llm_server(config);
    c.env("AIBOX_TEST_LLM_KEY", KEY);
    c.env("AIBOX_TEST_LLM_KEY2", KEY2);
    let base = std::fs::read_to_string(&c.config).unwrap();
    for (i, mode) in ["hash", "metadata_only"].iter().enumerate() {
        std::fs::write(&c.config, &base).unwrap();
        c.add_config(&gateway_config(&c, port, &ca_pem, mode, ""));
        let name = format!("llmlog{i}");
        let ws = c.ws.display().to_string();
        // (The body comes from a file: a command line is logged.)
        std::fs::write(
            c.ws.join("body.json"),
            "{\"model\":\"secret-prompt-model\",\"prompt\":\"the secret prompt\"}",
        )
        .unwrap();
        ok(&c.out(&[
            "run",
            "-w",
            &ws,
            "--name",
            &name,
            "--",
            "sh",
            "-c",
            "curl -sS https://llm.test/v1/messages -d @/workspace/body.json",
        ]));
        let events = audit_events(&c, &name);
        let req = events
            .iter()
            .find(|e| e["event_type"] == "llm.request")
            .map(|e| e["details"].clone())
            .unwrap_or_else(|| panic!("no llm.request: {events:?}"));
        let resp = events
            .iter()
            .find(|e| e["event_type"] == "llm.response")
            .map(|e| e["details"].clone())
            .unwrap_or_else(|| panic!("no llm.response: {events:?}"));
        assert!(
            req.get("body").is_none() && resp.get("body").is_none(),
            "{mode}: {req} {resp}"
        );
        let log = audit_text(&c, &name);
        assert!(
            !log.contains("the secret prompt"),
            "{mode}: the prompt was logged"
        );
        match *mode {
            "hash" => {
                assert_eq!(req["sha256"].as_str().map(str::len), Some(64), "{req}");
                assert_eq!(resp["sha256"].as_str().map(str::len), Some(64), "{resp}");
            }
            _ => assert!(
                req.get("sha256").is_none() && resp.get("sha256").is_none(),
                "{req} {resp}"
            ),
        }
        assert_eq!(req["model"], "secret-prompt-model");
        assert_eq!(resp["input_tokens"], 10);
    }
});

both_modes!(llm_gateway_config_errors_are_clear, |mut c: Ctx| {
    // No key in the environment: refused before anything starts.
    c.add_config(
        "network:\n  llm_gateway:\n    providers:\n      - {name: main, host: llm.test, style: anthropic, api_key_env: AIBOX_TEST_UNSET_KEY}\n",
    );
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("AIBOX_TEST_UNSET_KEY is not set"),
        "{}",
        stderr(&o)
    );
    // A plain-HTTP upstream is refused at config load.
    let base = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(
        &c.config,
        base.replace(
            "api_key_env: AIBOX_TEST_UNSET_KEY}",
            "api_key_env: K, upstream: \"http://llm.test\"}",
        ),
    )
    .unwrap();
    c.env("K", "x");
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("must start with https://"),
        "{}",
        stderr(&o)
    );
});
