//! A real agent in the sandbox: Claude Code (the npm package, installed by
//! scripts/test.sh) talks to a stand-in Anthropic API through the LLM
//! gateway. The stand-in asks it to run `curl --version` with its Bash
//! tool; the PreToolUse hook aibox registers must refuse it with the
//! policy's reason, which Claude Code sends back to the model as the
//! tool's error. (The real API cannot be reached from this machine: the
//! local server answers the way it does, with server-sent events.)

use super::common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// Where scripts/test.sh installs Claude Code (`npm install
/// --ignore-scripts`, so the platform package holds the binary).
const CLAUDE: &str =
    "/usr/local/lib/aibox-test/claude-code/node_modules/@anthropic-ai/claude-code-linux-x64/claude";

/// Server-sent events of one assistant message made of `block` (a
/// content block start and its delta).
fn message(model: &str, block: serde_json::Value, delta: serde_json::Value, stop: &str) -> String {
    use serde_json::json;
    let events = [
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
                "role": "assistant", "model": model, "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": block}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": delta}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": {"output_tokens": 5}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    events
        .iter()
        .map(|(e, d)| format!("event: {e}\ndata: {d}\n\n"))
        .collect()
}

/// The stand-in API: the first turn that offers a Bash tool gets a
/// `tool_use` of `curl --version`; anything else (and the turn carrying
/// the tool's result) gets "done". Every request body is kept.
fn anthropic_stub(config: Arc<rustls::ServerConfig>) -> (u16, Arc<Mutex<Vec<String>>>) {
    use serde_json::json;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (config, seen) = (config.clone(), seen.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, s);
                loop {
                    let mut r = BufReader::new(&mut tls);
                    let mut len = 0usize;
                    let mut first = String::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        if first.is_empty() {
                            first = h.clone();
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let body = String::from_utf8_lossy(&body).into_owned();
                    seen.lock().unwrap().push(body.clone());
                    let req: serde_json::Value = serde_json::from_str(&body).unwrap_or(json!({}));
                    let model = req["model"].as_str().unwrap_or("m").to_string();
                    let (ctype, out) = if first.contains("count_tokens") {
                        ("application/json", json!({"input_tokens": 10}).to_string())
                    } else {
                        let offers_bash = req["tools"]
                            .as_array()
                            .is_some_and(|t| t.iter().any(|t| t["name"] == "Bash"));
                        let text = if body.contains("tool_result") || !offers_bash {
                            message(
                                &model,
                                json!({"type": "text", "text": ""}),
                                json!({"type": "text_delta", "text": "done"}),
                                "end_turn",
                            )
                        } else {
                            message(
                                &model,
                                json!({"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": {}}),
                                json!({"type": "input_json_delta", "partial_json":
                                    json!({"command": "curl --version", "description": "curl version"}).to_string()}),
                                "tool_use",
                            )
                        };
                        ("text/event-stream", text)
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                        out.len()
                    );
                    if tls.write_all(head.as_bytes()).is_err()
                        || tls.write_all(out.as_bytes()).is_err()
                        || tls.flush().is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, kept)
}

both_modes!(
    claude_code_hears_the_policy_before_it_runs_a_command,
    |mut c: Ctx| {
        if !std::path::Path::new(CLAUDE).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{CLAUDE} is missing: scripts/test.sh installs Claude Code for this test"
            );
            eprintln!("SKIPPED: {CLAUDE} is missing (scripts/test.sh installs it)");
            return;
        }
        let (ca_pem, config) = tls_server(&["llm.test"]);
        let (port, seen) = anthropic_stub(config);
        let ca = c.dir.path().join("llm-ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let org = c.dir.path().join("org-policy.yaml");
        std::fs::write(
        &org,
        "version: 1\ntools:\n  rules:\n    - {match: [curl], risk: blocked-by-default, reason: no direct downloads}\n",
    )
    .unwrap();
        c.add_config(&format!(
        "policy:\n  org_baseline_path: {org}\nnetwork:\n  allowed_domains: [\"127.0.0.1:{port}\"]\n  resolve: {{llm.test: 127.0.0.1}}\n  llm_gateway:\n    providers:\n      - {{name: main, host: llm.test, style: anthropic, api_key_env: AIBOX_TEST_LLM_KEY, upstream: \"https://llm.test:{port}\", upstream_ca: {ca}}}\n",
        org = org.display(),
        ca = ca.display()
    ));
        c.env("AIBOX_TEST_LLM_KEY", "sk-test-agent-key");
        let ws = c.ws.display().to_string();
        // Even told to bypass its own permission prompts, the agent is
        // stopped by the managed hook.
        let script = format!(
            "cd /workspace && ANTHROPIC_BASE_URL=https://llm.test CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 timeout 120 {CLAUDE} -p 'show the curl version' --permission-mode bypassPermissions --output-format json"
        );
        let o = c.out(&[
            "run", "-w", &ws, "--name", "agent", "--", "sh", "-c", &script,
        ]);
        let out = ok(&o);
        let result: serde_json::Value = serde_json::from_str(
            out.lines()
                .rev()
                .find(|l| l.starts_with('{'))
                .unwrap_or("{}"),
        )
        .unwrap_or_default();
        assert_eq!(result["result"], "done", "{out}\n{}", stderr(&o));
        // The model was told why, as the tool's error.
        let bodies = seen.lock().unwrap().clone();
        let told = bodies
            .iter()
            .find(|b| b.contains("tool_result"))
            .unwrap_or_else(|| panic!("no tool result reached the model: {bodies:#?}"));
        assert!(
            told.contains("denied by policy rule tools.rules[0] (org tier): no direct downloads")
                && told.contains("\"is_error\":true"),
            "{told}"
        );
        // The decision log has the hook's denial, and curl never ran.
        let log: Vec<serde_json::Value> =
            std::fs::read_to_string(c.data.join("decisions/agent.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        assert!(
            log.iter().any(|e| e["action"] == "hook:claude-code:Bash"
                && e["decision"] == "deny"
                && e["command"] == "curl --version"),
            "{log:#?}"
        );
        assert!(
            !log.iter()
                .any(|e| e["action"] == "exec" && e["target"] == "/usr/bin/curl"),
            "curl was executed: {log:#?}"
        );
    }
);
