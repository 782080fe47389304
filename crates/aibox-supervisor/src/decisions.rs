//! The decision log: every exec-gate and hook decision as one JSON line
//! in `<data>/decisions/<name>.jsonl`, mirrored as audit events.
//!
//! An exec loop inside the sandbox makes one decision per exec, and the
//! sandbox chooses the arguments, so both outputs are bounded:
//! - a line is at most [`MAX_LINE`] bytes: longer arguments are
//!   shortened (and the entry marked `truncated`);
//! - the file is rotated before it passes a size (`<name>.jsonl.1` is
//!   the newest old file, `.K` the oldest kept); entry numbers run on
//!   across files, so `aibox policy explain --log-entry N` finds entry N
//!   while its file is kept;
//! - the audit mirror is a token bucket per kind of decision (allow,
//!   review, deny: a flood of allowed execs cannot use up the budget of
//!   denials), at a rate per second with bursts of ten seconds' worth.
//!   Decisions over it are still written to the decision log; the audit
//!   log gets, once a second and at stop, one summary per kind with how
//!   many were held back, their entry numbers, and counts per rule and
//!   per program.
//!
//! A decision that cannot be written is reported to the caller, which
//! denies (the gate never runs what it could not record), and to the
//! audit log.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aibox_audit::{EventType, Severity};
use aibox_policy::{Action, ExecInput, Risk};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::egress::Emit;

/// Longest line written (a decision with longer arguments is shortened).
pub const MAX_LINE: usize = 64 * 1024;
/// Most rotated files kept (config `policy.decision_log_keep`).
pub const MAX_KEEP: u32 = 1000;
/// Rules and programs named one by one in a summary.
const MAX_NAMED: usize = 32;

/// One line of the decision log. Entry numbers start at 1 and never
/// repeat within a sandbox's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    /// Entry number (kept first: the log's tail is read for it).
    pub entry: u64,
    /// RFC 3339 time.
    pub timestamp: String,
    /// Policy version decided under.
    pub policy_version: String,
    /// Hash of the deciding input.
    pub input_hash: String,
    /// What was asked: `exec`, or `hook:<agent>:<tool>` for an agent's
    /// pre-tool check.
    pub action: String,
    /// The command line, joined.
    pub command: String,
    /// The file decided on.
    pub target: String,
    /// Host user.
    pub user: String,
    /// Workspace (host path).
    pub workspace: String,
    /// Sandbox name.
    pub sandbox_id: String,
    /// `allow`, `review` or `deny`.
    pub decision: Action,
    /// Risk class.
    pub risk_class: Risk,
    /// Deciding rule.
    pub rule: String,
    /// Tier of the deciding rule.
    #[serde(default)]
    pub tier: String,
    /// Why.
    pub reason: String,
    /// Time to decide, in microseconds.
    pub duration_us: u64,
    /// Every input decided on for this exec (the file, its interpreter,
    /// the program a loader was given), for `aibox policy explain`.
    pub inputs: Vec<ExecInput>,
    /// Arguments, environment names or paths were shortened to fit
    /// [`MAX_LINE`] (the decision was made on the whole of them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// The longest run of base64 in the command and arguments, measured
    /// before they were shortened (detection rule aibox-009 reads it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub base64_run: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How far the decision log and its audit mirror may grow (config
/// `policy.decision_log_max_size`, `policy.decision_log_keep`,
/// `policy.audit_decisions_per_sec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Size the file is rotated before passing.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
    /// Decisions of each kind mirrored to the audit log per second
    /// (bursts of ten times as many); 0 mirrors every one.
    pub audit_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 20,
            keep: 8,
            audit_per_sec: 200,
        }
    }
}

/// The decision log of a sandbox whose audit log is
/// `<data>/audit/<name>.jsonl`: `<data>/decisions/<name>.jsonl`. (A
/// directory of its own, so that no sandbox name makes an audit log look
/// like another's decision log.)
pub fn path_for(audit_log: &Path) -> PathBuf {
    let data = audit_log
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let name = audit_log.file_name().unwrap_or_default();
    data.join("decisions").join(name)
}

/// Whether the file at `path` starts with a decision (a decision log,
/// not an audit log).
pub fn is_decision_log(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    let mut first = Vec::new();
    let _ = std::io::BufReader::new(f)
        .take(MAX_LINE as u64 * 8)
        .read_until(b'\n', &mut first);
    serde_json::from_slice::<LogEntry>(first.trim_ascii_end()).is_ok()
}

/// Moves a decision log kept by an earlier aibox beside the audit log
/// (`<data>/audit/<name>.decisions.jsonl`) to [`path_for`], unless one is
/// there already. Only a file whose first line is a decision moves: a
/// sandbox named `<name>.decisions` has an audit log of that name.
pub fn migrate_legacy(audit_log: &Path) -> std::io::Result<()> {
    let legacy = audit_log.with_extension("decisions.jsonl");
    let new = path_for(audit_log);
    if new.exists() || !is_decision_log(&legacy) {
        return Ok(());
    }
    if let Some(dir) = new.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    std::fs::rename(legacy, new)
}

/// Rotated file `i` (1 = newest) of the log at `path`.
fn rotated(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// The rotated files of the log at `path` that exist, newest first (a
/// listing, so a gap left by a crash mid-rotation hides nothing).
fn rotated_files(path: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut v = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(i) = n
            .strip_prefix(&prefix)
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|i| *i >= 1)
        {
            v.push((i, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Entry number of the last decision in `path` (complete lines only;
/// a line torn by a crash is skipped), if any.
fn last_entry(path: &Path) -> std::io::Result<Option<u64>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // Widen the window until it holds a whole decision.
    let mut window = 2 * MAX_LINE as u64;
    loop {
        let from = len.saturating_sub(window);
        f.seek(SeekFrom::Start(from))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let end = buf.iter().rposition(|b| *b == b'\n').unwrap_or(0);
        let mut lines: Vec<&[u8]> = buf[..end].split(|b| *b == b'\n').collect();
        // (The window's first line may start mid-line.)
        if from > 0 {
            lines.remove(0);
        }
        for line in lines.iter().rev() {
            if let Ok(e) = serde_json::from_slice::<LogEntry>(line) {
                return Ok(Some(e.entry));
            }
        }
        if from == 0 {
            return Ok(None);
        }
        window = window.saturating_mul(4);
    }
}

/// The first decision in `path`, if any.
fn first_entry(path: &Path) -> std::io::Result<Option<u64>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for line in std::io::BufReader::new(f).split(b'\n') {
        if let Ok(e) = serde_json::from_slice::<LogEntry>(&line?) {
            return Ok(Some(e.entry));
        }
    }
    Ok(None)
}

/// Shortens `s` to at most `max` bytes (on a character boundary, marked
/// with `…`); whether it did.
fn cut(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut at = max.saturating_sub(3);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    s.truncate(at);
    s.push('…');
    true
}

/// Shortens each string of `v` to `each` bytes and the list to `total`
/// bytes, counting each item's quotes and comma (the rest replaced by
/// one `…(N more)`, counts from an earlier cut carried on); whether it
/// did.
fn cut_list(v: &mut Vec<String>, each: usize, total: usize) -> bool {
    let earlier = v
        .last()
        .and_then(|s| s.strip_prefix("…("))
        .and_then(|s| s.strip_suffix(" more)"))
        .and_then(|n| n.parse::<usize>().ok());
    if earlier.is_some() {
        v.pop();
    }
    let mut changed = false;
    let mut used = 0;
    let mut cut_at = None;
    for (i, s) in v.iter_mut().enumerate() {
        changed |= cut(s, each);
        used += s.len() + 4;
        if used > total {
            cut_at = Some(i);
            break;
        }
    }
    let more = match cut_at {
        Some(i) => {
            let more = v.len() - i;
            v.truncate(i);
            more
        }
        None => 0,
    } + earlier.unwrap_or(0);
    if more > 0 {
        v.push(format!("…({more} more)"));
    }
    changed || cut_at.is_some()
}

/// `e` as one line of at most [`MAX_LINE`] bytes (newline included),
/// shortening what the sandbox chose (arguments, environment names,
/// paths) until it fits.
fn line_of(e: &mut LogEntry) -> std::io::Result<String> {
    // Measured on what the sandbox passed, before any of it is cut.
    e.base64_run = std::iter::once(&e.command)
        .chain(e.inputs.iter().flat_map(|i| i.argv.iter()))
        .map(|s| aibox_audit::detect::base64_run(s))
        .max()
        .unwrap_or(0)
        .max(e.base64_run);
    // (Per string, per list; the last step also cuts paths.)
    const STEPS: [(usize, usize); 4] = [(4096, 16384), (512, 4096), (64, 512), (16, 64)];
    // (Raw text far over the limit is cut once before it is serialised:
    // the sandbox may pass megabytes.)
    let raw: usize = e.command.len()
        + e.inputs
            .iter()
            .flat_map(|i| i.argv.iter().chain(&i.env_names).chain(&i.exe_aliases))
            .map(String::len)
            .sum::<usize>();
    let mut line = if raw > 4 * MAX_LINE {
        String::new()
    } else {
        serde_json::to_string(&*e).map_err(std::io::Error::other)?
    };
    for (step, (each, total)) in STEPS.into_iter().enumerate() {
        if !line.is_empty() && line.len() < MAX_LINE {
            break;
        }
        let mut changed = cut(&mut e.command, total);
        changed |= cut(&mut e.reason, total);
        changed |= cut(&mut e.rule, each);
        for i in &mut e.inputs {
            changed |= cut_list(&mut i.argv, each, total);
            changed |= cut_list(&mut i.env_names, each, total);
            changed |= cut_list(&mut i.exe_aliases, each, total);
            if step == STEPS.len() - 1 {
                for s in [&mut i.exe, &mut i.cwd, &mut i.parent] {
                    changed |= cut(s, 256);
                }
            }
        }
        if step == STEPS.len() - 1 {
            changed |= cut(&mut e.target, 256);
            e.inputs.truncate(1);
        }
        e.truncated |= changed;
        line = serde_json::to_string(&*e).map_err(std::io::Error::other)?;
    }
    if line.len() >= MAX_LINE {
        return Err(std::io::Error::other(
            "the decision does not fit in a log line",
        ));
    }
    line.push('\n');
    Ok(line)
}

/// Decisions held back from the audit log since the last summary.
#[derive(Debug, Clone, Default)]
struct Held {
    count: u64,
    first: u64,
    last: u64,
    /// How many per deciding rule and per program (at most
    /// [`MAX_NAMED`] each, the rest under `other`).
    rules: BTreeMap<String, u64>,
    targets: BTreeMap<String, u64>,
    policy_version: String,
    /// The longest base64 run among them (aibox-009 sees it).
    base64_run: u64,
}

fn count_in(m: &mut BTreeMap<String, u64>, key: &str) {
    let mut key = key.to_string();
    cut(&mut key, 256);
    if m.len() >= MAX_NAMED && !m.contains_key(&key) {
        key = "other".to_string();
    }
    *m.entry(key).or_default() += 1;
}

/// The audit mirror's budget: a bucket per kind of decision.
struct Throttle {
    per_sec: f64,
    /// Allow, review, deny.
    tokens: [f64; 3],
    refilled: Instant,
    summarised: Instant,
    held: [Option<Held>; 3],
}

impl Throttle {
    fn new(per_sec: u32, now: Instant) -> Throttle {
        let per_sec = f64::from(per_sec);
        Throttle {
            per_sec,
            tokens: [per_sec * 10.0; 3],
            refilled: now,
            summarised: now,
            held: [None, None, None],
        }
    }

    /// Whether entry `e` may be mirrored now; if not, it is counted.
    fn admit(&mut self, e: &LogEntry, now: Instant) -> bool {
        if self.per_sec == 0.0 {
            return true;
        }
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        for t in &mut self.tokens {
            *t = (*t + dt * self.per_sec).min(self.per_sec * 10.0);
        }
        self.refilled = now;
        let k = kind(e.decision);
        if self.tokens[k] >= 1.0 {
            self.tokens[k] -= 1.0;
            return true;
        }
        let h = self.held[k].get_or_insert_with(|| Held {
            first: e.entry,
            ..Held::default()
        });
        h.count += 1;
        h.last = e.entry;
        h.base64_run = h.base64_run.max(e.base64_run);
        h.policy_version.clone_from(&e.policy_version);
        count_in(&mut h.rules, &e.rule);
        count_in(&mut h.targets, &e.target);
        false
    }

    /// The held counts, if a summary is due (once a second, or now when
    /// `force`).
    fn due(&mut self, now: Instant, force: bool) -> Vec<(Action, Held)> {
        if !force && now.saturating_duration_since(self.summarised) < Duration::from_secs(1) {
            return Vec::new();
        }
        self.summarised = now;
        [Action::Allow, Action::Review, Action::Deny]
            .into_iter()
            .filter_map(|a| self.held[kind(a)].take().map(|h| (a, h)))
            .collect()
    }
}

fn kind(a: Action) -> usize {
    match a {
        Action::Allow => 0,
        Action::Review => 1,
        Action::Deny => 2,
    }
}

/// Where decisions go: the decision log, the audit log.
#[allow(missing_debug_implementations)]
pub struct DecisionLog {
    path: PathBuf,
    file: File,
    size: u64,
    next: u64,
    limits: Limits,
    throttle: Throttle,
    emit: Emit,
}

impl DecisionLog {
    /// Opens (appends to) the decision log at `path`, numbering on from
    /// the last entry in it or its rotated files.
    pub fn open(path: &Path, limits: Limits, emit: Emit) -> std::io::Result<DecisionLog> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(path)?;
        let mut size = file.metadata()?.len();
        // A line torn by a crash is ended, so the next record starts on a
        // line of its own.
        if size > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::Start(size - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                size += 1;
            }
        }
        let mut last = last_entry(path)?;
        for (_, f) in rotated_files(path)? {
            last = last.max(last_entry(&f)?);
        }
        let limits = Limits {
            max_bytes: limits.max_bytes.max(MAX_LINE as u64),
            keep: limits.keep.clamp(1, MAX_KEEP),
            ..limits
        };
        Ok(DecisionLog {
            path: path.to_path_buf(),
            file,
            size,
            next: last.unwrap_or(0) + 1,
            limits,
            throttle: Throttle::new(limits.audit_per_sec, Instant::now()),
            emit,
        })
    }

    /// Writes `e` (numbering it) and mirrors it as audit events within
    /// the rate; returns its entry number. An error means the decision
    /// is not on record: the caller denies, and the audit log is told.
    pub fn record(&mut self, mut e: LogEntry) -> std::io::Result<u64> {
        e.entry = self.next;
        let r = self.write(&mut e);
        if let Err(err) = &r {
            // (No entry number: none was used. The denial goes through the
            // denials' budget, its arguments cut like a logged line's.)
            e.entry = 0;
            if let Some(i) = e.inputs.first_mut() {
                cut_list(&mut i.argv, 512, 4096);
            }
            let mut v = self.details(&e);
            v["unrecorded"] = json!(true);
            v["decision_entry"] = serde_json::Value::Null;
            v["reason"] = json!(format!(
                "denied: the decision log cannot be written ({err}); it would have been {} ({})",
                json!(e.decision),
                e.reason
            ));
            let (now, denied) = (
                Instant::now(),
                LogEntry {
                    decision: Action::Deny,
                    ..e
                },
            );
            if self.throttle.admit(&denied, now) {
                self.emit_as(Action::Deny, v);
            }
            return Err(std::io::Error::new(err.kind(), err.to_string()));
        }
        self.next += 1;
        let now = Instant::now();
        self.summarise(now, false);
        if self.throttle.admit(&e, now) {
            self.emit_as(e.decision, self.details(&e));
        }
        Ok(e.entry)
    }

    fn write(&mut self, e: &mut LogEntry) -> std::io::Result<()> {
        let line = line_of(e)?;
        if self.size > 0 && self.size + line.len() as u64 > self.limits.max_bytes {
            self.rotate()?;
        }
        if let Err(err) = self.file.write_all(line.as_bytes()) {
            // No fragment stays for the next line to be glued to.
            let _ = self.file.set_len(self.size);
            return Err(err);
        }
        self.size += line.len() as u64;
        Ok(())
    }

    /// Writes the summaries due (called once a second).
    pub fn tick(&mut self) {
        self.summarise(Instant::now(), false);
    }

    /// Writes the summaries still held (at stop).
    pub fn flush(&mut self) {
        self.summarise(Instant::now(), true);
        let _ = self.file.sync_data();
    }

    /// Shifts the rotated files up by one, dropping those beyond `keep`,
    /// and starts an empty current file.
    fn rotate(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if !self.path.exists() {
            // (An earlier rotation renamed it and could not make a new
            // one: nothing to shift.)
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .mode(0o600)
                .open(&self.path)?;
            self.size = 0;
            return Ok(());
        }
        for (i, f) in rotated_files(&self.path)?.into_iter().rev() {
            if i >= self.limits.keep {
                std::fs::remove_file(f)?;
            } else {
                std::fs::rename(f, rotated(&self.path, i + 1))?;
            }
        }
        // (A rotation cut short after this rename left no current file:
        // the next one just makes it.)
        match std::fs::rename(&self.path, rotated(&self.path, 1)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .mode(0o600)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }

    fn summarise(&mut self, now: Instant, force: bool) {
        for (a, h) in self.throttle.due(now, force) {
            // (The fields every policy/tool event carries; `rule` is the
            // commonest, `rules` has them all.)
            let top = h
                .rules
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(r, _)| r.clone())
                .unwrap_or_default();
            let details = json!({
                "summary": true, "action": "summary", "decision": a, "held_back": h.count,
                "first_entry": h.first, "last_entry": h.last, "rule": top, "rules": h.rules,
                "targets": h.targets, "policy_version": h.policy_version, "argv": [],
                "decision_log": self.path.display().to_string(),
                "reason": format!(
                    "{} decisions over the audit rate ({} a second) are summarised here; each is in the decision log",
                    h.count, self.limits.audit_per_sec
                ),
            });
            let mut details = details;
            details[aibox_audit::detect::BASE64_RUN_FIELD] = json!(h.base64_run);
            self.emit_as(a, details);
        }
    }

    /// Emits `v` as the events a decision `a` makes: policy.allow;
    /// policy.allow and tool.invoke awaiting review; policy.deny and
    /// tool.deny.
    fn emit_as(&self, a: Action, v: serde_json::Value) {
        match a {
            Action::Allow => (self.emit)(EventType::PolicyAllow, Severity::Info, v),
            Action::Review => {
                (self.emit)(EventType::PolicyAllow, Severity::Warning, v.clone());
                let mut v = v;
                v["awaiting_review"] = json!(true);
                (self.emit)(EventType::ToolInvoke, Severity::Warning, v);
            }
            Action::Deny => {
                (self.emit)(EventType::PolicyDeny, Severity::Warning, v.clone());
                (self.emit)(EventType::ToolDeny, Severity::Warning, v);
            }
        }
    }

    /// The audit details of `e` (its first input's arguments, as logged).
    fn details(&self, e: &LogEntry) -> serde_json::Value {
        let argv: Vec<String> = e.inputs.first().map(|i| i.argv.clone()).unwrap_or_default();
        json!({
            "action": e.action, "argv": argv, "exe": e.target, "rule": e.rule,
            "tier": e.tier, "reason": e.reason, "risk_class": e.risk_class.as_str(),
            "policy_version": e.policy_version, "input_hash": e.input_hash,
            "decision_entry": e.entry, "duration_us": e.duration_us,
            "truncated": e.truncated, "base64_run": e.base64_run,
        })
    }
}

/// Why an entry could not be found.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// A file of the log could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The log has no entries.
    #[error("{path} has no decisions (nor has any rotated file beside it)")]
    Empty {
        /// The current file.
        path: PathBuf,
    },
    /// The number is outside what the kept files hold.
    #[error(
        "{path} and its rotated files hold entries {first} to {last}; --log-entry {n} is not one of them{hint}"
    )]
    Missing {
        /// The current file.
        path: PathBuf,
        /// The asked-for entry.
        n: u64,
        /// Oldest kept.
        first: u64,
        /// Newest.
        last: u64,
        /// Said when the entry was rotated away.
        hint: &'static str,
    },
}

/// Entry `n` of the log at `path` or of its rotated files. Each file's
/// first entry says where it starts, so only one file is read through.
pub fn find(path: &Path, n: u64) -> Result<LogEntry, FindError> {
    let io = |path: &Path, source| FindError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    files.extend(
        rotated_files(path)
            .map_err(|e| io(path, e))?
            .into_iter()
            .map(|(_, f)| f),
    );
    if files.is_empty() {
        return Err(io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    // Newest file first: the first one starting at or before n is the
    // only one that can hold it (the others' first lines are still read
    // for the message).
    let (mut first, mut last) = (None, None);
    let mut searched = false;
    for f in &files {
        let start = first_entry(f).map_err(|e| io(f, e))?;
        if last.is_none() {
            last = last_entry(f).map_err(|e| io(f, e))?;
        }
        if start.is_some() {
            first = start;
        }
        let candidate = start.is_some_and(|s| s <= n) && last.is_some_and(|l| n <= l);
        if candidate && !searched {
            searched = true;
            let file = File::open(f).map_err(|e| io(f, e))?;
            for line in std::io::BufReader::new(file).split(b'\n') {
                let line = line.map_err(|e| io(f, e))?;
                if let Ok(e) = serde_json::from_slice::<LogEntry>(&line)
                    && e.entry == n
                {
                    return Ok(e);
                }
            }
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        return Err(FindError::Empty {
            path: path.to_path_buf(),
        });
    };
    Err(FindError::Missing {
        path: path.to_path_buf(),
        n,
        first,
        last,
        hint: if n >= 1 && n < first {
            " (older entries were rotated away; see policy.decision_log_keep)"
        } else {
            ""
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(EventType, serde_json::Value)>>>;

    /// Collects events, refusing any the audit log would refuse.
    fn sink() -> (Emit, Seen) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        let emit: Emit = Arc::new(move |t, _, v| {
            for f in t.required_details() {
                assert!(v.get(*f).is_some(), "{} without {f}: {v}", t.as_str());
            }
            s.lock().unwrap().push((t, v))
        });
        (emit, seen)
    }

    fn entry(a: Action) -> LogEntry {
        LogEntry {
            entry: 0,
            timestamp: "2026-11-29T00:00:00Z".into(),
            policy_version: "sha256:00".into(),
            input_hash: "sha256:11".into(),
            action: "exec".into(),
            command: "/bin/true".into(),
            target: "/usr/bin/true".into(),
            user: "u".into(),
            workspace: "/w".into(),
            sandbox_id: "s".into(),
            decision: a,
            risk_class: Risk::Safe,
            rule: "default".into(),
            tier: "org baseline".into(),
            reason: "r".into(),
            duration_us: 1,
            inputs: vec![ExecInput::default()],
            truncated: false,
            base64_run: 0,
        }
    }

    #[test]
    fn rotation_keeps_numbering_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions/s.jsonl");
        let limits = Limits {
            max_bytes: MAX_LINE as u64,
            keep: 2,
            audit_per_sec: 0,
        };
        let (emit, _) = sink();
        let mut log = DecisionLog::open(&path, limits, emit.clone()).unwrap();
        let mut numbers = Vec::new();
        for _ in 0..600 {
            numbers.push(log.record(entry(Action::Allow)).unwrap());
        }
        assert_eq!(numbers, (1..=600).collect::<Vec<_>>());
        for f in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(
                std::fs::metadata(&f).unwrap().len() <= MAX_LINE as u64,
                "{f:?}"
            );
        }
        assert!(!rotated(&path, 3).exists());
        // The newest entries are found wherever they are; the oldest are
        // gone with a message that says so.
        assert_eq!(find(&path, 600).unwrap().entry, 600);
        let first = first_entry(&rotated(&path, 2)).unwrap().unwrap();
        assert!(first > 1);
        assert_eq!(find(&path, first).unwrap().entry, first);
        let e = find(&path, 1).unwrap_err().to_string();
        assert!(e.contains("rotated away"), "{e}");
        assert!(e.contains(&format!("entries {first} to 600")), "{e}");
        assert!(find(&path, 601).is_err());
        // Reopened: numbering goes on, even from an empty current file.
        drop(log);
        std::fs::rename(&path, rotated(&path, 1)).unwrap();
        let mut log = DecisionLog::open(&path, limits, emit).unwrap();
        assert_eq!(log.record(entry(Action::Deny)).unwrap(), 601);
    }

    #[test]
    fn a_torn_line_is_ended_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let (emit, _) = sink();
        let mut log = DecisionLog::open(&path, Limits::default(), emit.clone()).unwrap();
        log.record(entry(Action::Allow)).unwrap();
        log.record(entry(Action::Allow)).unwrap();
        drop(log);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(br#"{"entry":3,"timest"#).unwrap();
        let mut log = DecisionLog::open(&path, Limits::default(), emit).unwrap();
        assert_eq!(log.record(entry(Action::Allow)).unwrap(), 3);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert_eq!(find(&path, 3).unwrap().decision, Action::Allow);
    }

    #[test]
    fn a_flood_is_summarised_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let limits = Limits {
            audit_per_sec: 5,
            ..Limits::default()
        };
        let (emit, seen) = sink();
        let mut log = DecisionLog::open(&path, limits, emit).unwrap();
        for i in 0..500 {
            let a = if i % 2 == 0 {
                Action::Allow
            } else {
                Action::Deny
            };
            log.record(entry(a)).unwrap();
        }
        log.flush();
        let seen = seen.lock().unwrap();
        let single = |t| {
            seen.iter()
                .filter(|(x, v)| *x == t && v.get("summary").is_none())
                .count() as u64
        };
        let held = |t| {
            seen.iter()
                .filter(|(x, v)| *x == t && v["summary"] == true)
                .map(|(_, v)| v["held_back"].as_u64().unwrap())
                .sum::<u64>()
        };
        // Each kind's burst (ten seconds' worth) passes, a little refill
        // at most.
        for t in [EventType::PolicyAllow, EventType::PolicyDeny] {
            assert!((50..55).contains(&single(t)), "{}", single(t));
        }
        // Every decision is accounted for: mirrored or summarised.
        assert_eq!(
            single(EventType::PolicyAllow) + held(EventType::PolicyAllow),
            250
        );
        assert_eq!(
            single(EventType::PolicyDeny) + held(EventType::PolicyDeny),
            250
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 500);
        let summary = seen
            .iter()
            .find(|(t, v)| *t == EventType::PolicyDeny && v["summary"] == true)
            .unwrap();
        assert_eq!(
            summary.1["targets"]["/usr/bin/true"],
            held(EventType::PolicyDeny)
        );
    }

    #[test]
    fn an_allow_flood_leaves_the_denials_budget_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let limits = Limits {
            audit_per_sec: 5,
            ..Limits::default()
        };
        let (emit, seen) = sink();
        let mut log = DecisionLog::open(&path, limits, emit).unwrap();
        for _ in 0..1000 {
            log.record(entry(Action::Allow)).unwrap();
        }
        let n = log.record(entry(Action::Deny)).unwrap();
        let seen = seen.lock().unwrap();
        assert!(
            seen.iter()
                .any(|(t, v)| *t == EventType::PolicyDeny && v["decision_entry"] == n),
            "the denial after the flood was not mirrored"
        );
    }

    #[test]
    fn lines_are_bounded_whatever_the_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let limits = Limits {
            max_bytes: 1 << 20,
            ..Limits::default()
        };
        let (emit, seen) = sink();
        let mut log = DecisionLog::open(&path, limits, emit).unwrap();
        // Control characters take six bytes each in JSON.
        let big = "\u{1}".repeat(100_000);
        for _ in 0..3 {
            let mut e = entry(Action::Deny);
            e.command = big.clone();
            e.target = big.clone();
            for i in 0..5 {
                e.inputs.push(ExecInput {
                    argv: vec![big.clone(); 4],
                    env_names: vec![format!("V{i}"); 20_000],
                    exe: big.clone(),
                    cwd: big.clone(),
                    ..ExecInput::default()
                });
            }
            log.record(e).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().all(|l| l.len() < MAX_LINE));
        let e = find(&path, 2).unwrap();
        assert!(e.truncated);
        // The audit details are bounded too.
        let seen = seen.lock().unwrap();
        assert!(seen.iter().all(|(_, v)| v.to_string().len() < MAX_LINE));
    }

    #[test]
    fn a_payload_cut_from_the_line_still_reaches_detection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let (emit, seen) = sink();
        let limits = Limits {
            audit_per_sec: 1,
            ..Limits::default()
        };
        let mut log = DecisionLog::open(&path, limits, emit).unwrap();
        // 20 KiB of base64 in one argument, with enough other arguments
        // that the line must be shortened.
        let payload = "QUJD".repeat(5120);
        let mut e = entry(Action::Allow);
        e.inputs = vec![ExecInput {
            argv: std::iter::once(payload.clone())
                .chain((0..40).map(|i| format!("{i}").repeat(2000)))
                .collect(),
            ..ExecInput::default()
        }];
        let n = log.record(e.clone()).unwrap();
        let logged = find(&path, n).unwrap();
        assert!(logged.truncated);
        assert!(
            logged.inputs[0]
                .argv
                .first()
                .is_none_or(|a| a.len() < payload.len())
        );
        assert_eq!(logged.base64_run, 20480);
        // Mirrored, and summarised when over the rate: the measured run
        // goes along.
        for _ in 0..30 {
            log.record(e.clone()).unwrap();
        }
        log.flush();
        let seen = seen.lock().unwrap();
        let runs: Vec<u64> = seen
            .iter()
            .map(|(_, v)| aibox_audit::detect::longest_base64_run(v.as_object().unwrap()))
            .collect();
        assert!(runs.iter().all(|r| *r >= 20480), "{runs:?}");
        assert!(seen.iter().any(|(_, v)| v["summary"] == true));
    }

    #[test]
    fn many_empty_arguments_fit_and_are_counted() {
        let mut e = entry(Action::Allow);
        e.inputs[0].argv = vec![String::new(); 100_000];
        let line = line_of(&mut e).unwrap();
        assert!(line.len() <= MAX_LINE);
        let argv = &e.inputs[0].argv;
        let more: usize = argv
            .last()
            .and_then(|s| s.strip_prefix("…("))
            .and_then(|s| s.strip_suffix(" more)"))
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert_eq!(argv.len() - 1 + more, 100_000);
        assert!(e.truncated);
    }

    #[test]
    fn gaps_and_a_lowered_keep_are_handled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let limits = Limits {
            max_bytes: MAX_LINE as u64,
            keep: 5,
            audit_per_sec: 0,
        };
        let (emit, _) = sink();
        let mut log = DecisionLog::open(&path, limits, emit.clone()).unwrap();
        for _ in 0..1100 {
            log.record(entry(Action::Allow)).unwrap();
        }
        drop(log);
        assert!(rotated(&path, 5).exists());
        // A crash mid-rotation left a gap, and the newest entries in a
        // rotated file: the numbering still goes on from the highest, and
        // entries beyond the gap are found.
        std::fs::remove_file(rotated(&path, 2)).unwrap();
        std::fs::rename(&path, rotated(&path, 6)).unwrap();
        std::fs::write(&path, "").unwrap();
        let kept = first_entry(&rotated(&path, 3)).unwrap().unwrap();
        assert_eq!(find(&path, kept).unwrap().entry, kept);
        let keep2 = Limits { keep: 2, ..limits };
        let mut log = DecisionLog::open(&path, keep2, emit).unwrap();
        assert_eq!(log.record(entry(Action::Allow)).unwrap(), 1101);
        // Lowered keep: the next rotation drops every file beyond it.
        for _ in 0..200 {
            log.record(entry(Action::Allow)).unwrap();
        }
        let left: Vec<u32> = rotated_files(&path)
            .unwrap()
            .iter()
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(left, vec![1, 2]);
        assert!(!rotated(&path, 6).exists());
        assert!(matches!(
            find(&path, 0),
            Err(FindError::Missing { hint: "", .. })
        ));
    }

    #[test]
    fn an_unwritable_log_denies_and_tells_the_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        // Rotation will fail: the old file's place is a directory.
        std::fs::create_dir_all(rotated(&path, 1).join("x")).unwrap();
        let limits = Limits {
            max_bytes: MAX_LINE as u64,
            keep: 1,
            audit_per_sec: 0,
        };
        let (emit, seen) = sink();
        let mut log = DecisionLog::open(&path, limits, emit).unwrap();
        let failed = (0..1000)
            .map(|_| log.record(entry(Action::Allow)))
            .position(|r| r.is_err())
            .expect("the rotation never failed");
        let seen = seen.lock().unwrap();
        let (t, v) = &seen[seen.len() - 2];
        assert_eq!(*t, EventType::PolicyDeny);
        assert_eq!(v["unrecorded"], true);
        assert!(v["decision_entry"].is_null());
        drop(seen);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with('\n'));
        // Once the obstacle is gone, numbering goes on without a hole or
        // a repeat.
        std::fs::remove_dir_all(rotated(&path, 1)).unwrap();
        assert_eq!(log.record(entry(Action::Allow)).unwrap(), failed as u64 + 1);
    }
}
