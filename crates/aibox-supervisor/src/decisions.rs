//! The decision log: every exec-gate and hook decision as one JSON line
//! in `<data>/decisions/<name>.jsonl`, mirrored as audit events.
//!
//! An exec loop inside the sandbox makes one decision per exec, so both
//! outputs are bounded:
//! - the file is rotated when it reaches a size (`<name>.jsonl.1` is the
//!   newest old file, `.K` the oldest kept); entry numbers run on across
//!   files, so `aibox policy explain --log-entry N` still finds entry N
//!   while its file is kept;
//! - the audit mirror is a token bucket (a rate per second, bursts of ten
//!   seconds' worth). Decisions over it are still written to the decision
//!   log; the audit log gets, at most once a second and at stop, one
//!   summary event per kind naming how many were held back and the range
//!   of their entry numbers.
//!
//! A decision that cannot be written is reported to the caller, which
//! denies (the gate never runs what it could not record).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aibox_audit::{EventType, Severity};
use aibox_policy::{Action, ExecInput, Risk};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::egress::Emit;

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
}

/// How far the decision log and its audit mirror may grow (config
/// `policy.decision_log_max_size`, `policy.decision_log_keep`,
/// `policy.audit_decisions_per_sec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Size at which the file is rotated.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
    /// Decisions mirrored to the audit log per second (bursts of ten
    /// times as many); 0 mirrors every one.
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

/// Moves a decision log kept by an earlier aibox beside the audit log
/// (`<data>/audit/<name>.decisions.jsonl`) to [`path_for`], unless one is
/// there already. Only a file whose first line is a decision moves: a
/// sandbox named `<name>.decisions` has an audit log of that name.
pub fn migrate_legacy(audit_log: &Path) -> std::io::Result<()> {
    use std::io::BufRead;
    let legacy = audit_log.with_extension("decisions.jsonl");
    let new = path_for(audit_log);
    let Ok(f) = File::open(&legacy) else {
        return Ok(());
    };
    let mut first = String::new();
    std::io::BufReader::new(f).read_line(&mut first)?;
    if new.exists() || serde_json::from_str::<LogEntry>(first.trim_end()).is_err() {
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

/// Entry number of the last decision in `path` (complete lines only;
/// a line torn by a crash is skipped), if any.
fn last_entry(path: &Path) -> std::io::Result<Option<u64>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // Lines can be long (argv up to 2 MiB): widen the window until it
    // holds a whole decision.
    let mut window = 64 * 1024u64;
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

/// Decisions held back from the audit log since the last summary.
#[derive(Debug, Clone, Default)]
struct Held {
    count: u64,
    first: u64,
    last: u64,
    /// How many per deciding rule (at most [`MAX_RULES`], the rest under
    /// `other`).
    rules: std::collections::BTreeMap<String, u64>,
    policy_version: String,
}

/// Rules named one by one in a summary.
const MAX_RULES: usize = 32;

/// The audit mirror's budget.
struct Throttle {
    per_sec: f64,
    tokens: f64,
    refilled: Instant,
    summarised: Instant,
    /// Allow, review, deny.
    held: [Option<Held>; 3],
}

impl Throttle {
    fn new(per_sec: u32, now: Instant) -> Throttle {
        let per_sec = f64::from(per_sec);
        Throttle {
            per_sec,
            tokens: per_sec * 10.0,
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
        self.tokens = (self.tokens + dt * self.per_sec).min(self.per_sec * 10.0);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        let h = self.held[kind(e.decision)].get_or_insert_with(|| Held {
            first: e.entry,
            ..Held::default()
        });
        h.count += 1;
        h.last = e.entry;
        h.policy_version.clone_from(&e.policy_version);
        let rule = if h.rules.len() < MAX_RULES || h.rules.contains_key(&e.rule) {
            e.rule.clone()
        } else {
            "other".to_string()
        };
        *h.rules.entry(rule).or_default() += 1;
        false
    }

    /// The held counts, if a summary is due (once a second, or `now`
    /// when `force`).
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
    /// its last entry (or the newest rotated file's).
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
        let last = match last_entry(path)? {
            Some(n) => Some(n),
            None => last_entry(&rotated(path, 1))?,
        };
        let limits = Limits {
            max_bytes: limits.max_bytes.max(1),
            keep: limits.keep.max(1),
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
    /// is not on record (the caller denies).
    pub fn record(&mut self, mut e: LogEntry) -> std::io::Result<u64> {
        e.entry = self.next;
        let mut line = serde_json::to_string(&e).map_err(std::io::Error::other)?;
        line.push('\n');
        if self.size > 0 && self.size + line.len() as u64 > self.limits.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.size += line.len() as u64;
        self.next += 1;
        let now = Instant::now();
        self.summarise(now, false);
        if self.throttle.admit(&e, now) {
            self.mirror(&e);
        }
        Ok(e.entry)
    }

    /// Writes the summaries still due (at stop).
    pub fn flush(&mut self) {
        self.summarise(Instant::now(), true);
        let _ = self.file.sync_data();
    }

    /// Shifts `.1`… up by one (the oldest kept falls off) and starts an
    /// empty current file.
    fn rotate(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        for i in (1..self.limits.keep).rev() {
            match std::fs::rename(rotated(&self.path, i), rotated(&self.path, i + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
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
                "policy_version": h.policy_version, "argv": [],
                "decision_log": self.path.display().to_string(),
                "reason": format!(
                    "{} decisions over the audit rate ({} a second) are summarised here; each is in the decision log",
                    h.count, self.limits.audit_per_sec
                ),
            });
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

    fn mirror(&self, e: &LogEntry) {
        let argv: Vec<String> = e.inputs.first().map(|i| i.argv.clone()).unwrap_or_default();
        let common = json!({
            "action": e.action, "argv": argv, "exe": e.target, "rule": e.rule,
            "tier": e.tier, "reason": e.reason, "risk_class": e.risk_class.as_str(),
            "policy_version": e.policy_version, "input_hash": e.input_hash,
            "decision_entry": e.entry, "duration_us": e.duration_us,
        });
        self.emit_as(e.decision, common);
    }
}

/// Why an entry could not be found.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    /// No decision log (or none readable).
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
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
/// first line says where it starts, so only one file is read through.
pub fn find(path: &Path, n: u64) -> Result<LogEntry, FindError> {
    use std::io::BufRead;
    let io = |path: &Path, source| FindError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut last = None;
    let mut oldest = None;
    for i in 0.. {
        let f = if i == 0 {
            path.to_path_buf()
        } else {
            rotated(path, i)
        };
        let file = match File::open(&f) {
            Ok(file) => file,
            // (Rotated files are numbered without gaps.)
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && i > 0 => break,
            Err(e) => return Err(io(&f, e)),
        };
        if last.is_none() {
            last = last_entry(&f).map_err(|e| io(&f, e))?;
        }
        let mut lines = std::io::BufReader::new(file).lines();
        let mut first = None;
        while let Some(line) = lines.next().transpose().map_err(|e| io(&f, e))? {
            let Ok(e) = serde_json::from_str::<LogEntry>(&line) else {
                continue;
            };
            if first.is_none() {
                first = Some(e.entry);
                if e.entry > n {
                    break;
                }
            }
            if e.entry == n {
                return Ok(e);
            }
        }
        if first.is_some() {
            oldest = first;
        }
        if first.is_some_and(|f| f <= n) {
            break;
        }
    }
    let oldest = oldest.unwrap_or(0);
    Err(FindError::Missing {
        path: path.to_path_buf(),
        n,
        first: oldest,
        last: last.unwrap_or(0),
        hint: if n < oldest {
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
        }
    }

    #[test]
    fn rotation_keeps_numbering_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions/s.jsonl");
        let limits = Limits {
            max_bytes: 2000,
            keep: 2,
            audit_per_sec: 0,
        };
        let (emit, _) = sink();
        let mut log = DecisionLog::open(&path, limits, emit.clone()).unwrap();
        let mut numbers = Vec::new();
        for _ in 0..40 {
            numbers.push(log.record(entry(Action::Allow)).unwrap());
        }
        assert_eq!(numbers, (1..=40).collect::<Vec<_>>());
        for f in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(std::fs::metadata(&f).unwrap().len() <= 2000, "{f:?}");
        }
        assert!(!rotated(&path, 3).exists());
        // The newest entries are found wherever they are; the oldest are
        // gone with a message that says so.
        assert_eq!(find(&path, 40).unwrap().entry, 40);
        let oldest_kept = std::fs::read_to_string(rotated(&path, 2)).unwrap();
        let first: LogEntry = serde_json::from_str(oldest_kept.lines().next().unwrap()).unwrap();
        assert_eq!(find(&path, first.entry).unwrap().entry, first.entry);
        assert!(first.entry > 1);
        let e = find(&path, 1).unwrap_err().to_string();
        assert!(e.contains("rotated away"), "{e}");
        assert!(find(&path, 41).is_err());
        // Reopened: numbering goes on, even from an empty current file.
        drop(log);
        std::fs::rename(&path, rotated(&path, 1)).unwrap();
        let mut log = DecisionLog::open(&path, limits, emit).unwrap();
        assert_eq!(log.record(entry(Action::Deny)).unwrap(), 41);
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
        // The burst (ten seconds' worth) passes, a little refill at most.
        let mirrored = single(EventType::PolicyAllow) + single(EventType::PolicyDeny);
        assert!((50..60).contains(&mirrored), "{mirrored}");
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
    }
}
