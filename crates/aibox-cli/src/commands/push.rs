//! `aibox push`: the review queue of git pushes from sandboxes, and the
//! push rules a sandbox starts with.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use aibox_audit::{EventType, Severity};
use aibox_push::queue::{PushRequest, Queue, Status};
use aibox_supervisor::proto::{PushMode, PushSpec};
use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::args::{Format, PushCmd};

/// The queue directory.
fn queue(loaded: &aibox_config::Loaded) -> Queue {
    Queue::new(&loaded.data_dir().join("pushes"))
}

/// What `git push` may do in a sandbox of workspace `ws`: the policy's
/// decision on a bare `git push` (tool rules and Rego), and the remotes
/// it may push to: those the workspace had when aibox first saw it
/// (recorded then, on the host), plus `credentials.push_remotes`. A
/// sandbox can edit `.git/config`; what it adds there is not trusted.
pub(crate) fn spec(
    loaded: &aibox_config::Loaded,
    merged: &aibox_policy::Merged,
    ws: &Path,
    name: &str,
) -> Result<PushSpec> {
    let mut decider = aibox_policy::Decider::new(merged)
        .map_err(|e| anyhow::anyhow!("the policy's decision on git push: {e}"))?;
    let d = decider.decide(&aibox_policy::ExecInput {
        argv: vec!["git".into(), "push".into()],
        exe: "/usr/bin/git".into(),
        sandbox: name.into(),
        ..aibox_policy::ExecInput::default()
    });
    let mode = match d.action {
        aibox_policy::Action::Allow => PushMode::Direct,
        aibox_policy::Action::Review => PushMode::Review,
        _ => PushMode::Blocked,
    };
    let c = &loaded.config.credentials;
    let mut trusted = first_seen(loaded, ws)?;
    trusted.extend(c.push_remotes.iter().cloned());
    Ok(PushSpec {
        sandbox: name.into(),
        remotes: trusted,
        mode,
        queue: queue(loaded).dir().to_path_buf(),
        ca_file: (!c.upstream_ca.is_empty()).then(|| c.upstream_ca.clone().into()),
    })
}

/// Refuses push rules the proxy could not hold: with pushes reviewed or
/// blocked, a git token in the sandbox's hands would push through a
/// tunnel the proxy cannot read. Names remote hosts no credential is
/// bound to (the proxy does not read those connections either).
pub(crate) fn held(
    spec: PushSpec,
    issued: &[aibox_supervisor::proto::IssuedCredential],
) -> Result<PushSpec> {
    if spec.mode == PushMode::Direct {
        return Ok(spec);
    }
    if let Some(c) = issued.iter().find(|c| c.kind == "git-token" && c.exposed) {
        bail!(
            "the policy exposes credential `{}` (a git token) while git push is {}: with the real token inside, pushes could go around the proxy\n  fix: remove `{}` from the policy's credentials.expose, or make git push safe",
            c.name,
            if spec.mode == PushMode::Review {
                "review-required"
            } else {
                "blocked-by-default"
            },
            c.name
        );
    }
    for u in &spec.remotes {
        let Ok(key) = aibox_push::normalize(u) else {
            continue;
        };
        let authority = key.split('/').nth(2).unwrap_or("");
        let bound = issued.iter().any(|c| {
            c.kind == "git-token"
                && c.hosts.iter().any(|h| {
                    let full = if h.contains(':') && !h.ends_with(']') {
                        h.clone()
                    } else {
                        format!("{h}:443")
                    };
                    full.eq_ignore_ascii_case(authority)
                })
        });
        if key.starts_with("https:") && !bound {
            eprintln!(
                "aibox: no git token is bound to {authority}, so the proxy cannot read pushes to {u} (it refuses those it sees; bind a token with `aibox auth add git-token --host HOST`)"
            );
        }
    }
    Ok(spec)
}

/// The remotes recorded for `ws` the first time a sandbox started on
/// it (recording them now if this is the first time). Remotes the
/// workspace has gained since are named on stderr and left out.
fn first_seen(loaded: &aibox_config::Loaded, ws: &Path) -> Result<Vec<String>> {
    use sha2::Digest;
    let dir = queue(loaded).dir().join("workspaces");
    let id = hex::encode(sha2::Sha256::digest(ws.as_os_str().as_encoded_bytes()));
    let record = dir.join(format!("{}.json", &id[..16]));
    let now = remotes(ws);
    if let Ok(text) = std::fs::read(&record) {
        let known: Vec<String> = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| serde_json::from_value(v["remotes"].clone()).ok())
            .with_context(|| {
                format!(
                    "{} is not a remotes record; remove it to record the workspace's remotes again",
                    record.display()
                )
            })?;
        let keys: Vec<String> = known
            .iter()
            .filter_map(|u| aibox_push::normalize(u).ok())
            .collect();
        for u in &now {
            if aibox_push::normalize(u).is_ok_and(|k| !keys.contains(&k))
                && !loaded.config.credentials.push_remotes.contains(u)
            {
                eprintln!(
                    "aibox: the workspace's remote {u} was added after aibox first saw the workspace; sandboxes may not push to it (to allow it, add it to credentials.push_remotes)"
                );
            }
        }
        return Ok(known);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let body = serde_json::to_vec_pretty(&json!({"workspace": ws, "remotes": now}))?;
    // Whole or not at all (a start running beside this one reads it) and
    // never through a link planted in the data directory.
    aibox_core::replace_private_file(&record, &body)
        .with_context(|| format!("writing {}", record.display()))?;
    Ok(now)
}

/// The git directory whose config holds `ws`'s remotes: `ws/.git`, or
/// for a worktree or submodule (`.git` is a file), the directory it
/// names, and that one's common directory.
fn git_dir(ws: &Path) -> Option<std::path::PathBuf> {
    let dot = ws.join(".git");
    let meta = std::fs::symlink_metadata(&dot).ok()?;
    if meta.is_dir() {
        return Some(dot);
    }
    if !meta.is_file() {
        return None;
    }
    let text = std::fs::read_to_string(&dot).ok()?;
    let target = text.trim().strip_prefix("gitdir:")?.trim();
    let dir = ws.join(target);
    match std::fs::read_to_string(dir.join("commondir")) {
        Ok(c) => Some(dir.join(c.trim())),
        Err(_) => Some(dir),
    }
}

/// The `url` and `pushurl` of every remote in the workspace's git config,
/// read as a plain file (no includes, no hooks, nothing of the workspace
/// runs).
fn remotes(ws: &Path) -> Vec<String> {
    let Some(cfg) = git_dir(ws)
        .map(|d| d.join("config"))
        .filter(|c| c.is_file())
    else {
        return Vec::new();
    };
    let out = std::process::Command::new("git")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", "/nonexistent")
        .arg("config")
        .arg("--file")
        .arg(&cfg)
        .arg("--no-includes")
        .arg("-z")
        .arg("--get-regexp")
        .arg(r"^remote\..*\.(push)?url$")
        .output();
    let Ok(out) = out else {
        eprintln!(
            "aibox: git is not installed on the host, so the workspace has no remotes to push to"
        );
        return Vec::new();
    };
    // `-z`: each entry is `key\nvalue\0`.
    String::from_utf8_lossy(&out.stdout)
        .split('\0')
        .filter_map(|e| e.split_once('\n').map(|(_, u)| u.trim().to_string()))
        .filter(|u| aibox_push::normalize(u).is_ok())
        .collect()
}

pub fn run(cli_config: Option<std::path::PathBuf>, cmd: PushCmd) -> Result<i32> {
    let (loaded, sources) = super::load_config(cli_config)?;
    let q = queue(&loaded);
    match cmd {
        PushCmd::Status { all, format } => status(&q, all, format),
        PushCmd::Show { id, format } => show(&q, &id, format),
        PushCmd::Approve { id } => approve(&loaded, &sources, &q, &id),
        PushCmd::Cancel { id } => cancel(&loaded, &q, &id),
    }
}

/// `s` safe to print on the reviewer's terminal: what came from the
/// sandbox (commit messages, author names, file names) may carry escape
/// sequences that rewrite the screen, or bidi controls that reorder it.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && c != '\n') || bidi {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

fn age(created: &str) -> String {
    humantime::parse_rfc3339(created)
        .ok()
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .map(|d| {
            let s = d.as_secs();
            match s {
                0..60 => format!("{s}s"),
                60..3600 => format!("{}m", s / 60),
                3600..86400 => format!("{}h", s / 3600),
                _ => format!("{}d", s / 86400),
            }
        })
        .unwrap_or_else(|| "?".into())
}

fn refs(r: &PushRequest) -> String {
    r.updates
        .iter()
        .map(|u| {
            if u.new.is_none() {
                format!("-{}", u.dst)
            } else if u.force {
                format!("+{}", u.dst)
            } else {
                u.dst.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn status(q: &Queue, all: bool, format: Format) -> Result<i32> {
    let list: Vec<PushRequest> = q
        .list()?
        .into_iter()
        .filter(|r| all || r.status == Status::Pending)
        .collect();
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    if list.is_empty() {
        println!("no {}pushes queued", if all { "" } else { "pending " });
        return Ok(0);
    }
    println!(
        "{:<9} {:<16} {:<10} {:>7} {:>5}  {:<40} REFS",
        "ID", "SANDBOX", "STATUS", "COMMITS", "AGE", "REMOTE"
    );
    for r in &list {
        println!(
            "{:<9} {:<16} {:<10} {:>7} {:>5}  {:<40} {}",
            r.id,
            clean(&r.sandbox),
            r.status.as_str(),
            r.commits_total,
            age(&r.created),
            clean(&r.url),
            clean(&refs(r))
        );
    }
    Ok(0)
}

fn show(q: &Queue, id: &str, format: Format) -> Result<i32> {
    let r = q.load(id)?;
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    println!("push {}  ({})", r.id, r.status.as_str());
    println!("  sandbox: {}", clean(&r.sandbox));
    println!("  remote:  {}", clean(&r.url));
    println!("  queued:  {} ({} ago)", r.created, age(&r.created));
    if let (Some(by), Some(at)) = (&r.decided_by, &r.decided_at) {
        println!("  decided: by {} at {at}", clean(by));
    }
    for u in &r.updates {
        let short = |o: &Option<String>| {
            o.as_deref().map_or_else(
                || "(none)".to_string(),
                |s| s[..s.len().min(12)].to_string(),
            )
        };
        println!(
            "  update:  {} {} → {}{}",
            clean(&u.dst),
            short(&u.old),
            short(&u.new),
            if u.force { " (forced)" } else { "" }
        );
    }
    println!("\ncommits new to the remote: {}", r.commits_total);
    for c in &r.commits {
        println!(
            "  {} {} ({})",
            clean(&c.oid[..c.oid.len().min(12)]),
            clean(&c.subject),
            clean(&c.author)
        );
    }
    if r.commits_total > r.commits.len() as u64 {
        println!("  … and {} more", r.commits_total - r.commits.len() as u64);
    }
    println!("\ndiffstat:\n{}", clean(r.diffstat.trim_end()));
    if let Some(o) = &r.outcome {
        println!("\noutcome:\n{}", clean(o.trim_end()));
    }
    Ok(0)
}

/// Who is deciding: the login behind sudo, else this user.
fn approver() -> String {
    let user = aibox_core::current_user();
    match std::env::var("SUDO_USER") {
        Ok(s) if !s.is_empty() && s != user => format!("{s} (as {user})"),
        _ => user,
    }
}

/// Appends `event` to the sandbox's audit log: through its supervisor
/// while it runs (it owns the chain), else directly.
fn record(
    loaded: &aibox_config::Loaded,
    sandbox: &str,
    event: EventType,
    sev: Severity,
    d: serde_json::Value,
) {
    let data = loaded.data_dir();
    let paths = aibox_supervisor::paths::SandboxPaths::new(&loaded.runtime_dir(), &data, sandbox);
    if aibox_supervisor::client::is_alive(&paths) {
        // The running supervisor owns the log's chain: never write beside it.
        if let Err(e) = aibox_supervisor::client::record(&paths, event, sev, d) {
            eprintln!("aibox: warning: sandbox {sandbox} did not record the decision: {e}");
        }
        return;
    }
    let log = aibox_supervisor::client::audit_log_path(&data, sandbox);
    let r = aibox_audit::AuditLog::open(&log, sandbox, &aibox_core::current_user()).and_then(
        |mut l| {
            let th = &loaded.config.audit.detection;
            if th.enabled
                && let Ok(p) = th.parse()
            {
                l.set_detector(
                    aibox_audit::detect::Detector::new(p),
                    aibox_audit::Source::AiboxCli,
                );
            }
            let details = match d {
                serde_json::Value::Object(m) => m,
                _ => serde_json::Map::new(),
            };
            l.append(event, aibox_audit::Source::AiboxCli, sev, details)
                .map(drop)
        },
    );
    if let Err(e) = r {
        eprintln!(
            "aibox: warning: the decision could not be written to {}: {e}",
            log.display()
        );
    }
}

fn argv(r: &PushRequest) -> Vec<String> {
    let mut a = vec!["git".to_string(), "push".into(), r.url.clone()];
    a.extend(r.updates.iter().map(|u| {
        format!(
            "{}{}:{}",
            if u.force { "+" } else { "" },
            u.new.as_deref().unwrap_or(""),
            u.dst
        )
    }));
    a
}

fn pending(q: &Queue, id: &str) -> Result<PushRequest> {
    let r = q.load(id)?;
    if r.status != Status::Pending {
        bail!(
            "push {id} is {} already{}",
            r.status.as_str(),
            r.decided_by
                .as_deref()
                .map(|b| format!(" (by {b})"))
                .unwrap_or_default()
        );
    }
    Ok(r)
}

fn approve(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    q: &Queue,
    id: &str,
) -> Result<i32> {
    let _lock = q.lock(id)?;
    let mut r = pending(q, id)?;
    let key = aibox_push::normalize(&r.url)?;
    let (host, port) = key
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .context("the queued remote URL has no host")?;
    let token = super::auth::git_token_for(loaded, sources, &host, port)?;
    let remote = aibox_push::host::Remote {
        resolve: r.resolve.clone(),
        ca_file: r.ca_file.clone(),
        token,
    };
    let who = approver();
    // The sandbox's credential is used now, on the approver's word: on
    // record before it goes out (after the sandbox stopped, this raises
    // aibox-008 by design: every use outside a session is seen).
    if remote.token.is_some() {
        record(
            loaded,
            &r.sandbox,
            EventType::CredentialUse,
            Severity::Info,
            json!({
                "credential_type": "git-token", "host": host, "port": port,
                "approver": who, "push_id": r.id, "purpose": "approved git push",
            }),
        );
    }
    let result = aibox_push::host::push(&r, &remote);
    r.decided_by = Some(who.clone());
    r.decided_at =
        Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
    let ok = result.is_ok();
    match &result {
        Ok(report) => {
            r.status = Status::Pushed;
            r.outcome = Some(report.clone());
        }
        Err(e) => {
            r.status = Status::Failed;
            r.outcome = Some(e.to_string());
        }
    }
    q.save(&r)?;
    if ok {
        aibox_push::host::drop_refs(&r.repo, &r.id, &remote);
    }
    record(
        loaded,
        &r.sandbox,
        EventType::ToolApprove,
        if ok {
            Severity::Info
        } else {
            Severity::Warning
        },
        json!({
            "argv": argv(&r), "approver": who, "push_id": r.id, "remote": r.url,
            "status": r.status.as_str(), "outcome": r.outcome, "commits": r.commits_total,
        }),
    );
    match result {
        Ok(report) => {
            println!("push {id} approved by {who} and pushed to {}", r.url);
            print!("{report}");
            Ok(0)
        }
        Err(e) => bail!(
            "push {id} was approved but the push failed: {e}\n  The queued commits are kept; the sandbox can push again after fetching (the remote may have moved since the review)."
        ),
    }
}

fn cancel(loaded: &aibox_config::Loaded, q: &Queue, id: &str) -> Result<i32> {
    let _lock = q.lock(id)?;
    let mut r = pending(q, id)?;
    let who = approver();
    r.status = Status::Cancelled;
    r.decided_by = Some(who.clone());
    r.decided_at =
        Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
    q.save(&r)?;
    aibox_push::host::drop_refs(&r.repo, &r.id, &aibox_push::host::Remote::default());
    record(
        loaded,
        &r.sandbox,
        EventType::ToolDeny,
        Severity::Info,
        json!({
            "argv": argv(&r), "rule": "git-push-review", "push_id": r.id,
            "reason": format!("cancelled by {who}"), "remote": r.url,
        }),
    );
    println!("push {id} cancelled; nothing was pushed");
    Ok(0)
}
