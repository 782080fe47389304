//! `aibox network test`: runs aibox-net's probes inside a running sandbox
//! (as `/aibox/aibox __net-test PLAN`, through the ordinary exec path, so
//! they see exactly what any command there sees) and reports them.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use aibox_net::probe::{Check, Outcome, Plan};
use anyhow::{Context, Result, bail};

use crate::args::{Format, NetworkCmd};

/// First argument of the in-sandbox side.
pub const INSIDE_ARG: &str = "__net-test";

/// The in-sandbox side: runs the plan given as JSON and prints one JSON
/// line per check.
pub fn inside() -> i32 {
    let Some(plan) = std::env::args()
        .nth(2)
        .and_then(|j| serde_json::from_str::<Plan>(&j).ok())
    else {
        eprintln!("aibox: usage: {INSIDE_ARG} PLAN-JSON");
        return 2;
    };
    for c in aibox_net::probe::run(&plan) {
        println!("{}", serde_json::to_string(&c).unwrap_or_default());
    }
    0
}

pub fn run(cli_config: Option<PathBuf>, cmd: NetworkCmd) -> Result<i32> {
    let NetworkCmd::Test { name, host, format } = cmd;
    let (loaded, paths) = super::lifecycle::target(cli_config.clone(), &name)?;
    let conn = super::lifecycle::connect(&loaded, &paths)?;
    let st = aibox_supervisor::client::status(conn)?;
    let plan = match &st.network {
        None => Plan {
            enabled: false,
            proxy_port: loaded.config.network.proxy_port,
            allowed: None,
            public_ip_allowed: false,
        },
        Some(n) => Plan {
            enabled: true,
            proxy_port: n
                .proxy
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(loaded.config.network.proxy_port),
            allowed: match &host {
                Some(h) => Some(parse_target(h)?),
                None => n
                    .allowed
                    .iter()
                    .find_map(|r| parse_target(r).ok().filter(|(h, _)| is_name(h))),
            },
            public_ip_allowed: n.allowed.iter().any(|r| r.starts_with("1.1.1.1")),
        },
    };
    let exe = std::env::current_exe().context("locating the aibox binary")?;
    let mut cmd = Command::new(exe);
    if let Some(c) = &cli_config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd
        .args(["exec", "--name", &paths.name, "--"])
        .arg(aibox_sandbox::container::BINARY)
        .arg(INSIDE_ARG)
        .arg(serde_json::to_string(&plan)?)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the checks in the sandbox")?;
    let checks: Vec<Check> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if !out.status.success() || checks.is_empty() {
        bail!(
            "the checks did not run inside sandbox `{}` (exit {:?})",
            paths.name,
            out.status.code()
        );
    }
    let failed = checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
        Format::Text => {
            println!("network test of sandbox `{}`:", paths.name);
            for c in &checks {
                let tag = match c.outcome {
                    Outcome::Pass => "PASS",
                    Outcome::Fail => "FAIL",
                    Outcome::Skip => "SKIP",
                };
                println!("  {tag}  {}: {}", c.name, c.detail);
            }
            let skipped = checks.iter().filter(|c| c.outcome == Outcome::Skip).count();
            println!(
                "{} passed, {failed} failed, {skipped} skipped",
                checks.len() - failed - skipped
            );
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// `host` or `host:port` (443 by default).
fn parse_target(s: &str) -> Result<(String, u16)> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| format!("--host {s}: `{p}` is not a port (1-65535)"))?,
        ),
        _ => (s, 443),
    };
    let parsed = aibox_net::parse_host(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|e| anyhow::anyhow!("--host {s}: {e}"))?;
    Ok((parsed.to_string(), port))
}

fn is_name(h: &str) -> bool {
    !h.starts_with('*') && h.parse::<std::net::IpAddr>().is_err()
}
