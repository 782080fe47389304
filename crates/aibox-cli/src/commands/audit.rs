//! `aibox audit …`: verify (chain, checkpoints), tail, export.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::args::{AuditCmd, ExportFormat, Format};

/// The checkpoint signing key: `audit.signing_key_path`, by default
/// beside the user config file.
pub(crate) fn signing_key_path(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
) -> Result<PathBuf> {
    let p = &loaded.config.audit.signing_key_path;
    if !p.is_empty() {
        return Ok(PathBuf::from(p));
    }
    sources
        .user_file
        .parent()
        .map(|d| d.join("audit-signing.key"))
        .context("the user config file has no directory to keep the audit signing key in; set audit.signing_key_path")
}

/// The supervisor's checkpoint settings: the key (created now if it does
/// not exist, so that a bad key stops the start), events and seconds
/// between checkpoints. The key may not live in the data directory with
/// the logs it vouches for.
pub(crate) fn signing(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
) -> Result<(PathBuf, u64, u64)> {
    let key = signing_key_path(loaded, sources)?;
    let data = loaded.data_dir();
    if key.starts_with(&data) {
        bail!(
            "audit.signing_key_path {} is in the data directory {} with the logs it signs; keep it elsewhere",
            key.display(),
            data.display()
        );
    }
    aibox_audit::checkpoint::Signer::load_or_create(&key)?;
    let a = &loaded.config.audit;
    let secs = humantime::parse_duration(&a.checkpoint_interval)
        .map(|d| d.as_secs().max(1))
        .unwrap_or(60);
    Ok((key, a.checkpoint_every, secs))
}

/// Every chained log in the data directory: (sandbox, path of its active
/// file). A log is found by any of its files — the active `.jsonl`, its
/// `.manifest`, `.segments` or `.jsonl.checkpoints` — so deleting one of
/// them does not hide the log from `verify --all`.
fn all_logs(loaded: &aibox_config::Loaded) -> Result<Vec<(String, PathBuf)>> {
    let dir = loaded.data_dir().join("audit");
    let mut names = std::collections::BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            let f = e.file_name().to_string_lossy().into_owned();
            // (A decision log an earlier aibox kept here,
            // `<name>.decisions.jsonl`, is not a chained log.)
            let stem = if f.ends_with(".jsonl") && !aibox_supervisor::decisions::is_decision_log(&p)
            {
                f.strip_suffix(".jsonl")
            } else {
                f.strip_suffix(".manifest")
                    .or_else(|| f.strip_suffix(".segments"))
                    .or_else(|| f.strip_suffix(".jsonl.checkpoints"))
            };
            if let Some(n) = stem.filter(|n| aibox_core::validate_name(n).is_ok()) {
                names.insert(n.to_string());
            }
        }
    }
    let v: Vec<(String, PathBuf)> = names
        .into_iter()
        .map(|n| {
            let p = dir.join(format!("{n}.jsonl"));
            (n, p)
        })
        .collect();
    if v.is_empty() {
        bail!("no audit logs in {}", dir.display());
    }
    Ok(v)
}

fn named_log(loaded: &aibox_config::Loaded, n: &str) -> Result<PathBuf> {
    aibox_core::validate_name(n).map_err(anyhow::Error::msg)?;
    let p = aibox_supervisor::client::audit_log_path(&loaded.data_dir(), n);
    let any = p.exists()
        || aibox_audit::segments::manifest_path(&p).exists()
        || aibox_audit::checkpoint::checkpoints_path(&p).exists();
    if !any {
        bail!(
            "no audit log for sandbox `{n}` ({} does not exist)",
            p.display()
        );
    }
    Ok(p)
}

pub fn run(cli_config: Option<PathBuf>, cmd: AuditCmd) -> Result<i32> {
    match cmd {
        AuditCmd::Verify {
            name,
            all: _,
            file,
            format,
            local,
        } => verify(cli_config, name, file, format, local),
        AuditCmd::Tail {
            name,
            types,
            lines,
            follow,
        } => tail(cli_config, name, &types, lines, follow),
        AuditCmd::Export {
            name,
            format,
            output,
        } => export(cli_config, name, format, output),
        AuditCmd::Ship { name } => ship(cli_config, name),
    }
}

fn verify(
    cli_config: Option<PathBuf>,
    name: Option<String>,
    file: Option<PathBuf>,
    format: Format,
    local: bool,
) -> Result<i32> {
    let (loaded, sources) = super::load_config(cli_config)?;
    // The bucket's copies are compared too, unless asked not to; a bucket
    // that cannot be opened is an error, not a silent skip.
    let by_file = file.is_some();
    let archive = match loaded.config.audit.archive() {
        Some(c) if !local && !by_file => {
            let keys = super::auth::archive_keys(&loaded, &sources, &c)
                .context("audit storage (`--local` skips the bucket)")?;
            Some(
                aibox_siem::archive::Archive::open_with(&c, keys.as_ref()).map_err(|e| {
                    anyhow::anyhow!("audit storage: {e} (`--local` skips the bucket)")
                })?,
            )
        }
        _ => None,
    };
    let archive_state = loaded.data_dir().join("archive");
    let all_requested = name.is_none() && file.is_none();
    let logs: Vec<(String, PathBuf)> = match (name, file) {
        (_, Some(f)) => {
            let n = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            vec![(n, f)]
        }
        (Some(n), None) => {
            let p = named_log(&loaded, &n)?;
            vec![(n, p)]
        }
        // (None at all is an error below, unless logs were deleted.)
        (None, None) => all_logs(&loaded).unwrap_or_default(),
    };
    // The key itself when it is readable here; the public file must then
    // agree with it (a swapped public key would vouch for forgeries).
    let secret = signing_key_path(&loaded, &sources)?;
    let public = aibox_audit::checkpoint::public_key_path(&secret);
    let trusted = match aibox_audit::checkpoint::trusted_from_secret(&secret) {
        Some(t) => {
            if public.exists() {
                let p = aibox_audit::checkpoint::Trusted::load(&public)?;
                if p.key_id() != t.key_id() {
                    bail!(
                        "{} is not the public half of the signing key {}: checkpoints cannot be trusted until it is (remove it and start a sandbox to have it written again)",
                        public.display(),
                        secret.display()
                    );
                }
            }
            Some(t)
        }
        None if public.exists() => Some(aibox_audit::checkpoint::Trusted::load(&public)?),
        None => None,
    };
    let mut broken = false;
    let mut out = Vec::new();
    // Logs whose last checkpoint is kept beside the key but whose files
    // are all gone: deleted logs.
    if all_requested {
        for (label, cp) in anchored_without_files(&loaded, &secret, &logs) {
            broken = true;
            match format {
                Format::Json => out.push(serde_json::json!({
                    "log": label, "intact": false, "tampered": true,
                    "error": format!("deleted: its last checkpoint (event {}, signed {}) is kept beside the signing key, but none of its files exist", cp.seq, cp.time),
                })),
                Format::Text => println!(
                    "{label}: DELETED: its last checkpoint (event {}, signed {}) is kept beside the signing key, but none of its files exist",
                    cp.seq, cp.time
                ),
            }
        }
    }
    // Sandboxes the bucket has segments of (signed by this key) but this
    // data directory has no log for: deleted here.
    if all_requested && let Some(a) = &archive {
        // The folders of this key and of every key the local manifests
        // name (a rotated key's).
        let mut owners = std::collections::BTreeSet::new();
        if let Some(t) = &trusted {
            owners.insert(t.key_id().to_string());
        }
        for (_, p) in &logs {
            for e in aibox_audit::segments::read_manifest(p)
                .unwrap_or_default()
                .into_iter()
                .flatten()
            {
                owners.insert(e.key_id.unwrap_or_else(|| "unsigned".into()));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for o in owners.iter().filter(|o| {
            *o == "unsigned" || (o.len() == 16 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        }) {
            match a.sandboxes(o) {
                Ok(n) => names.extend(n),
                Err(e) => {
                    broken = true;
                    let msg = format!("{e} (`--local` skips the bucket)");
                    match format {
                        Format::Json => out.push(serde_json::json!({
                            "bucket": a.label(), "intact": false, "error": msg,
                        })),
                        Format::Text => println!("ARCHIVE NOT CHECKED: {msg}"),
                    }
                }
            }
        }
        for n in names {
            if logs.iter().any(|(l, _)| *l == n) {
                continue;
            }
            broken = true;
            let msg = format!(
                "deleted here: {} holds archived segments of it (signed by this key), but this data directory has no log of it",
                a.label()
            );
            match format {
                Format::Json => out.push(serde_json::json!({
                    "log": n, "intact": false, "tampered": true, "error": msg,
                })),
                Format::Text => println!("{n}: DELETED: {msg}"),
            }
        }
    }
    if logs.is_empty() && !broken {
        bail!(
            "no audit logs in {}",
            loaded.data_dir().join("audit").display()
        );
    }
    for (label, path) in logs {
        // One unreadable log does not hide the report on the others.
        let checked = aibox_audit::checkpoint::read_anchor(&secret, &path).and_then(|anchor| {
            aibox_audit::verify_with_checkpoints(&path, &label, trusted.as_ref(), anchor.as_ref())
        });
        let (report, cps) = match checked {
            Ok(r) => r,
            Err(e) => {
                broken = true;
                match format {
                    Format::Json => out.push(serde_json::json!({
                        "log": label, "path": path, "intact": false, "error": e.to_string(),
                    })),
                    Format::Text => println!("{label}: CANNOT VERIFY: {e}"),
                }
                continue;
            }
        };
        // (Not for a file given by path: its copies are not this data
        // directory's.)
        let signer = trusted.as_ref().map(|t| t.key_id().to_string());
        let remote = match &archive {
            Some(a) => match a.check(&path, &label, &archive_state, signer.as_deref()) {
                Ok(r) => Some(r),
                // (Reported with this log, as not checked rather than
                // tampered; the other logs still are.)
                Err(e) => Some(aibox_siem::archive::RemoteReport {
                    bucket: a.label().to_string(),
                    error: Some(format!("{e} (`--local` skips the bucket)")),
                    ..Default::default()
                }),
            },
            None => None,
        };
        let remote_bad = remote.as_ref().is_some_and(|r| !r.problems.is_empty());
        // Segments not in the bucket yet, or a bucket that could not be
        // compared: not tampering, but the check must not pass.
        let remote_pending = remote
            .as_ref()
            .is_some_and(|r| !r.pending.is_empty() || r.error.is_some());
        broken |= remote_bad || remote_pending;
        let tampered = report.broken.as_ref().is_some_and(|b| !b.torn_tail)
            || !cps.problems.is_empty()
            || !cps.segments.problems.is_empty()
            || remote_bad;
        // Checkpoints nobody can check are not a pass.
        let unchecked = cps.checked > 0 && cps.unsigned_check.is_some();
        broken |= !report.is_intact()
            || !cps.problems.is_empty()
            || !cps.segments.problems.is_empty()
            || unchecked;
        match format {
            Format::Json => out.push(serde_json::json!({
                "log": label, "path": path,
                "intact": report.is_intact() && cps.problems.is_empty() && cps.segments.problems.is_empty() && !remote_bad,
                "tampered": tampered, "report": report, "checkpoints": cps, "archive": remote,
                "archive_complete": remote.as_ref().map(|r| r.pending.is_empty() && r.error.is_none()),
            })),
            Format::Text => {
                match &report.broken {
                    None => println!(
                        "{label}: intact ({} events, head {})",
                        report.verified,
                        &report.head[..16]
                    ),
                    Some(b) if b.torn_tail => println!(
                        "{label}: TORN TAIL at index {} ({}); the {} events before it verify (an interrupted write, not tampering)",
                        b.index, b.reason, report.verified
                    ),
                    Some(b) => println!("{label}: BROKEN at index {}: {}", b.index, b.reason),
                }
                match (&cps.unsigned_check, cps.checked) {
                    (_, 0) if report.verified > 0 => println!(
                        "  checkpoints: none: nothing in this log is signed (a crash before the first checkpoint, or checkpoints deleted)"
                    ),
                    (_, 0) => println!("  checkpoints: none"),
                    (Some(why), n) => println!(
                        "  checkpoints: {n}, NOT CHECKED ({why}; the public key belongs at {})",
                        public.display()
                    ),
                    (None, n) => println!(
                        "  checkpoints: {n}, signed up to event {}",
                        cps.covered_to.map_or("-".into(), |s| s.to_string())
                    ),
                }
                let after = cps
                    .covered_to
                    .map_or(0, |c| report.verified.saturating_sub(c + 1));
                if cps.checked > 0 && after > 0 {
                    println!("  unsigned: {after} events after the last checkpoint");
                }
                if cps.segments.sealed > 0 || !cps.segments.problems.is_empty() {
                    println!(
                        "  segments: {} sealed{}",
                        cps.segments.sealed,
                        if cps.segments.problems.is_empty() {
                            ", as the manifest lists them"
                        } else {
                            ""
                        }
                    );
                }
                for p in &cps.segments.problems {
                    println!("  SEGMENT {p}");
                }
                if let Some(r) = remote.as_ref().filter(|r| r.error.is_some()) {
                    println!(
                        "  ARCHIVE NOT CHECKED: {}",
                        r.error.as_deref().unwrap_or_default()
                    );
                } else if let Some(r) = &remote {
                    println!(
                        "  archive: {} of {} segments in {}, {}{}{}{}",
                        r.checked,
                        cps.segments.sealed,
                        r.bucket,
                        if r.locked > 0 {
                            format!("{} under object lock", r.locked)
                        } else if r.object_lock {
                            "none under object lock".to_string()
                        } else {
                            "no object lock on the bucket".to_string()
                        },
                        r.retained_until
                            .as_ref()
                            .map(|u| format!(" until {u}"))
                            .unwrap_or_default(),
                        if r.governance > 0 {
                            format!(
                                " ({} in governance mode: users allowed to bypass governance retention can remove them; compliance mode cannot be lifted)",
                                r.governance
                            )
                        } else {
                            String::new()
                        },
                        if r.expired > 0 {
                            format!(", {} whose retention has ended", r.expired)
                        } else {
                            String::new()
                        }
                    );
                    if !r.pending.is_empty() {
                        println!(
                            "  NOT ARCHIVED: {} sealed segments not in the bucket yet ({}); `aibox audit ship` uploads them",
                            r.pending.len(),
                            r.pending.join(", ")
                        );
                    }
                    for p in &r.problems {
                        println!("  ARCHIVE {p}");
                    }
                }
                for p in &cps.problems {
                    println!(
                        "  CHECKPOINT {}{}: {}",
                        p.line
                            .map_or("(last, kept beside the key)".into(), |l| format!(
                                "line {l}"
                            )),
                        p.seq.map(|s| format!(" (event {s})")).unwrap_or_default(),
                        p.reason
                    );
                }
            }
        }
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if broken { 1 } else { 0 })
}

fn ship(cli_config: Option<PathBuf>, name: Option<String>) -> Result<i32> {
    let (loaded, sources) = super::load_config(cli_config)?;
    let sinks = &loaded.config.audit.sinks;
    let archive = loaded.config.audit.archive();
    if sinks.is_empty() && archive.is_none() {
        bail!(
            "no sinks and no bucket are configured; add sinks under audit.sinks, or set audit.storage: s3 (see docs/audit.md)"
        );
    }
    let logs = match name {
        Some(n) => vec![(n.clone(), named_log(&loaded, &n)?)],
        None => all_logs(&loaded)?,
    };
    let state = loaded.data_dir().join("sinks");
    let mut failed = false;
    // (A running sandbox's supervisor ships and archives its own log.)
    let running = |label: &str| {
        aibox_supervisor::client::is_alive(&aibox_supervisor::paths::SandboxPaths::new(
            &loaded.runtime_dir(),
            &loaded.data_dir(),
            label,
        ))
    };
    for s in sinks {
        let mut d = aibox_siem::sink::open(s)
            .map_err(|e| anyhow::anyhow!("audit.sinks {}: {e}", s.name))?;
        for (label, path) in &logs {
            if running(label) {
                println!("{}: {label}: running, its supervisor ships it", s.name);
                continue;
            }
            let shipper = aibox_siem::sink::Shipper::new(path, &state, s);
            match shipper.ship(d.as_mut()) {
                Ok(n) => println!("{}: {label}: {n} events sent", s.name),
                Err(e) => {
                    failed = true;
                    eprintln!("aibox: {}: {label}: {e} (run this again to resume)", s.name);
                }
            }
        }
    }
    if let Some(c) = archive {
        let keys = super::auth::archive_keys(&loaded, &sources, &c).context("audit storage")?;
        let a = aibox_siem::archive::Archive::open_with(&c, keys.as_ref())
            .map_err(|e| anyhow::anyhow!("audit storage: {e}"))?;
        let state = loaded.data_dir().join("archive");
        for (label, path) in &logs {
            if running(label) {
                println!("archive: {label}: running, its supervisor archives it");
                continue;
            }
            match a.upload_pending(path, label, &state) {
                Ok(r) => {
                    println!("archive: {label}: {} segments uploaded", r.uploaded);
                    for e in &r.refused {
                        failed = true;
                        eprintln!("aibox: archive: {label}: {e}");
                    }
                }
                Err(e) => {
                    failed = true;
                    eprintln!("aibox: archive: {label}: {e} (run this again to resume)");
                }
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

/// Anchors (beside `key`) of logs in this data directory none of whose
/// files exist, with the sandbox each names.
fn anchored_without_files(
    loaded: &aibox_config::Loaded,
    key: &Path,
    listed: &[(String, PathBuf)],
) -> Vec<(String, aibox_audit::checkpoint::Checkpoint)> {
    let mut out = Vec::new();
    let dir = aibox_audit::checkpoint::anchor_path(key, Path::new("x"))
        .parent()
        .map(Path::to_path_buf);
    let Some(Ok(entries)) = dir.map(std::fs::read_dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Ok(cp) = serde_json::from_str::<aibox_audit::checkpoint::Checkpoint>(&text) else {
            continue;
        };
        if aibox_core::validate_name(&cp.sandbox).is_err()
            || listed.iter().any(|(n, _)| *n == cp.sandbox)
        {
            continue;
        }
        let log = aibox_supervisor::client::audit_log_path(&loaded.data_dir(), &cp.sandbox);
        // Only anchors of this data directory's logs.
        if aibox_audit::checkpoint::anchor_path(key, &log) == e.path() {
            out.push((cp.sandbox.clone(), cp));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whether `line` (an event) has one of `types` (all when empty).
fn wanted(line: &str, types: &[String]) -> bool {
    types.is_empty()
        || serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| {
                v["event_type"]
                    .as_str()
                    .map(|t| types.iter().any(|w| w == t))
            })
            .unwrap_or(false)
}

fn tail(
    cli_config: Option<PathBuf>,
    name: Option<String>,
    types: &[String],
    lines: usize,
    follow: bool,
) -> Result<i32> {
    let (loaded, _) = super::load_config(cli_config)?;
    for t in types {
        if serde_json::from_value::<aibox_audit::EventType>(serde_json::Value::String(t.clone()))
            .is_err()
        {
            bail!("--type {t:?} is not an event type (see docs/audit.md), e.g. network.deny");
        }
    }
    let name = match name {
        Some(n) => n,
        None => aibox_supervisor::client::resolve_name(
            &loaded.runtime_dir(),
            &loaded.data_dir(),
            &super::lifecycle::default_name(),
        )?,
    };
    let path = named_log(&loaded, &name)?;
    let mut last: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    // The sealed segments first (whole lines only), then the active file.
    for seg in aibox_audit::segments::files(&path)
        .into_iter()
        .filter(|p| *p != path)
    {
        let f = std::fs::File::open(&seg).with_context(|| format!("opening {}", seg.display()))?;
        for l in std::io::BufReader::new(f).lines() {
            let l = l?;
            if wanted(&l, types) {
                last.push_back(l);
                if last.len() > lines {
                    last.pop_front();
                }
            }
        }
    }
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = std::io::BufReader::new(f);
    let mut pending = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        if !line.ends_with('\n') {
            // A torn or still-being-written tail: wait for the rest.
            pending = line.clone();
            break;
        }
        if wanted(line.trim_end(), types) {
            last.push_back(line.trim_end().to_string());
            if last.len() > lines {
                last.pop_front();
            }
        }
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for l in &last {
        writeln!(out, "{l}")?;
    }
    out.flush()?;
    if !follow {
        return Ok(0);
    }
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            // Sealed at a stop: the log goes on in a new file of the same
            // name (what was left in the old one has been read).
            use std::os::unix::fs::MetadataExt;
            let now = std::fs::metadata(&path).map(|m| m.ino()).ok();
            let ours = reader.get_ref().metadata().map(|m| m.ino()).ok();
            if now.is_some() && now != ours {
                // What reached the old file before the switch comes first.
                let mut rest = String::new();
                std::io::Read::read_to_string(&mut reader, &mut rest)?;
                pending.push_str(&rest);
                for l in std::mem::take(&mut pending).split_inclusive('\n') {
                    if l.ends_with('\n') && wanted(l.trim_end(), types) {
                        writeln!(out, "{}", l.trim_end())?;
                    }
                }
                // Then any segment sealed after ours before we looked (two
                // seals between polls), whole: our file is a segment now,
                // found by its inode; what the manifest lists after it
                // came later.
                let files = aibox_audit::segments::files(&path);
                let at = files
                    .iter()
                    .position(|f| std::fs::metadata(f).map(|m| m.ino()).ok() == ours && *f != path);
                if let Some(at) = at {
                    for seg in files[at + 1..].iter().filter(|f| **f != path) {
                        let Ok(text) = std::fs::read_to_string(seg) else {
                            continue;
                        };
                        for l in text.lines() {
                            if wanted(l, types) {
                                writeln!(out, "{l}")?;
                            }
                        }
                    }
                }
                out.flush()?;
                if let Ok(f) = std::fs::File::open(&path) {
                    reader = std::io::BufReader::new(f);
                }
                continue;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        }
        pending.push_str(&line);
        if !pending.ends_with('\n') {
            continue;
        }
        let l = std::mem::take(&mut pending);
        if wanted(l.trim_end(), types) {
            writeln!(out, "{}", l.trim_end())?;
            out.flush()?;
        }
    }
}

fn export(
    cli_config: Option<PathBuf>,
    name: Option<String>,
    format: ExportFormat,
    output: Option<PathBuf>,
) -> Result<i32> {
    let (loaded, _) = super::load_config(cli_config)?;
    let logs = match name {
        Some(n) => {
            let p = named_log(&loaded, &n)?;
            vec![(n, p)]
        }
        None => all_logs(&loaded)?,
    };
    let mut sink: Box<dyn Write> = match &output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut count = 0u64;
    for (_, path) in logs {
        count += export_log(&path, format, &mut sink)?;
    }
    sink.flush()?;
    if let Some(p) = output {
        eprintln!("wrote {count} events to {}", p.display());
    }
    Ok(0)
}

/// Writes the complete events of `path` in `format`; a torn final line is
/// left out (it is not an event yet).
fn export_log(path: &Path, format: ExportFormat, out: &mut dyn Write) -> Result<u64> {
    if !path.exists() && aibox_audit::segments::files(path).is_empty() {
        bail!("{} does not exist", path.display());
    }
    // Sealed segments and the active file, as one chain.
    let f = aibox_audit::segments::ChainReader::new(path);
    let mut n = 0;
    for (i, line) in std::io::BufReader::new(f).split(b'\n').enumerate() {
        let line = line?;
        let Ok(text) = std::str::from_utf8(&line) else {
            bail!(
                "{}: line {i} is not UTF-8 (run `aibox audit verify`)",
                path.display()
            );
        };
        let event: aibox_audit::Event = match serde_json::from_str(text) {
            Ok(e) => e,
            Err(_) => continue,
        };
        match format {
            ExportFormat::Jsonl => writeln!(out, "{text}")?,
            ExportFormat::Ecs => writeln!(out, "{}", aibox_audit::export::ecs(&event))?,
            ExportFormat::Ocsf => writeln!(out, "{}", aibox_audit::export::ocsf(&event))?,
        }
        n += 1;
    }
    Ok(n)
}
