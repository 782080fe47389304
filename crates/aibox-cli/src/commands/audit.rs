//! `aibox audit …`

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::args::{AuditCmd, Format};

pub fn run(cli_config: Option<PathBuf>, cmd: AuditCmd) -> Result<i32> {
    let AuditCmd::Verify {
        name,
        all: _,
        file,
        format,
    } = cmd;
    let logs: Vec<(String, PathBuf)> = match (name, file) {
        (_, Some(f)) => vec![(f.display().to_string(), f)],
        (Some(n), None) => {
            aibox_core::validate_name(&n).map_err(anyhow::Error::msg)?;
            let (loaded, _) = super::load_config(cli_config)?;
            let p = aibox_supervisor::client::audit_log_path(&loaded.data_dir(), &n);
            if !p.exists() {
                bail!(
                    "no audit log for sandbox `{n}` ({} does not exist)",
                    p.display()
                );
            }
            vec![(n, p)]
        }
        (None, None) => {
            let (loaded, _) = super::load_config(cli_config)?;
            let dir = loaded.data_dir().join("audit");
            let mut v = Vec::new();
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    // (A decision log an earlier aibox kept here,
                    // `<name>.decisions.jsonl`, is not a chained log.)
                    if p.extension().is_some_and(|x| x == "jsonl")
                        && !aibox_supervisor::decisions::is_decision_log(&p)
                    {
                        let n = p
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        v.push((n, p));
                    }
                }
            }
            v.sort();
            if v.is_empty() {
                bail!("no audit logs in {}", dir.display());
            }
            v
        }
    };
    let mut broken = false;
    let mut out = Vec::new();
    for (label, path) in logs {
        let report = aibox_audit::verify_file(&path)
            .with_context(|| format!("verifying {}", path.display()))?;
        broken |= !report.is_intact();
        match format {
            Format::Json => out.push(serde_json::json!({"log": label, "path": path, "intact": report.is_intact(), "report": report})),
            Format::Text => match &report.broken {
                None => println!("{label}: intact ({} events, head {})", report.verified, &report.head[..16]),
                Some(b) if b.torn_tail => println!(
                    "{label}: TORN TAIL at index {} ({}); the {} events before it verify",
                    b.index, b.reason, report.verified
                ),
                Some(b) => println!("{label}: BROKEN at index {}: {}", b.index, b.reason),
            },
        }
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if broken { 1 } else { 0 })
}
