//! The agents' pre-tool hooks. Outside, the managed settings that register
//! them; inside the sandbox, `/aibox/aibox __hook claude-code`, which reads
//! Claude Code's `PreToolUse` JSON on stdin, asks the supervisor (over
//! `/aibox/gate.sock`) for the policy's decision on the command line, and
//! answers in Claude Code's hook format, so the agent hears "denied by
//! policy rule X" before it runs anything. The exec gate still decides
//! every program when it actually runs; the hook only says it first.

use std::io::{BufRead, Read, Write};

use aibox_policy::Action;
use aibox_supervisor::gate::{HookReply, HookRequest};
use serde_json::{Value, json};

/// The hidden subcommand.
pub const INSIDE_ARG: &str = "__hook";

/// `/etc/claude-code/managed-settings.json` for the sandbox: managed
/// settings outrank user and project settings, and the file sits in a
/// read-only overlay of /etc.
pub fn claude_code_settings() -> (String, String) {
    let body = json!({
        "hooks": {
            "PreToolUse": [{
                "matcher": "Bash",
                "hooks": [{
                    "type": "command",
                    "command": format!("{} {INSIDE_ARG} claude-code", aibox_sandbox::container::BINARY),
                    "timeout": 30,
                }],
            }],
        },
    });
    (
        "claude-code/managed-settings.json".to_string(),
        serde_json::to_string_pretty(&body).unwrap_or_default(),
    )
}

/// Runs the in-sandbox hook client; returns the exit code.
pub fn inside(args: &[String]) -> i32 {
    let agent = args.first().map(String::as_str).unwrap_or_default();
    if agent != "claude-code" {
        eprintln!("usage: {INSIDE_ARG} claude-code   (reads the hook's JSON on stdin)");
        return 2;
    }
    let mut text = String::new();
    if std::io::stdin()
        .take(4 * 1024 * 1024)
        .read_to_string(&mut text)
        .is_err()
    {
        return deny("aibox: the hook's input could not be read");
    }
    let Ok(input) = serde_json::from_str::<Value>(&text) else {
        return deny("aibox: the hook's input is not JSON");
    };
    // Only shell commands are decided here.
    if input["tool_name"] != "Bash" {
        return 0;
    }
    let Some(command) = input["tool_input"]["command"].as_str() else {
        return deny("aibox: the Bash tool call has no command");
    };
    let req = HookRequest {
        agent: agent.to_string(),
        tool: "Bash".into(),
        command: command.to_string(),
        cwd: input["cwd"].as_str().unwrap_or("/workspace").to_string(),
    };
    match ask(&req) {
        Ok(r) if r.decision == Action::Deny => deny(&format!(
            "denied by policy rule {} ({} tier): {} [command: {}] (decision log entry {}; `aibox policy explain --log-entry {}` on the host explains it and how to ask for an exception)",
            r.rule, r.tier, r.reason, r.command, r.entry, r.entry
        )),
        Ok(_) => 0,
        // Fail closed: no answer is not a yes.
        Err(e) => deny(&format!("aibox: the policy service did not answer ({e})")),
    }
}

fn ask(req: &HookRequest) -> std::io::Result<HookReply> {
    let mut s = std::os::unix::net::UnixStream::connect(aibox_sandbox::GATE_SOCKET)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reply = String::new();
    std::io::BufReader::new(s).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

/// Claude Code's PreToolUse denial: the reason goes to the model.
fn deny(reason: &str) -> i32 {
    let out = json!({
        "hookSpecificOutput": {
            "hookEventName": "PreToolUse",
            "permissionDecision": "deny",
            "permissionDecisionReason": reason,
        },
    });
    println!("{out}");
    0
}
