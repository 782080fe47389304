//! The append-only writer.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::{AuditError, Event, EventType, Severity, Source};

/// Domain-separation prefix of every event hash.
pub(crate) const HASH_DOMAIN: &[u8] = b"aibox-audit-v1\n";
/// `prev_hash` of the first event of a log.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Serialises a JSON value in aibox's canonical form (sorted keys, compact).
///
/// `serde_json::Map` is a `BTreeMap` (the `preserve_order` feature is not
/// enabled anywhere in the workspace), so object keys come out sorted.
pub fn canonical_json(value: &Value) -> String {
    // Serialising a `Value` cannot fail: its keys are strings and it holds
    // no foreign types.
    serde_json::to_string(value).unwrap_or_default()
}

/// Computes an event's hash over its canonical form without `hash`.
pub fn event_hash(event_without_hash: &Value) -> String {
    let mut h = Sha256::new();
    h.update(HASH_DOMAIN);
    h.update(canonical_json(event_without_hash).as_bytes());
    hex::encode(h.finalize())
}

/// Turns an event into its chained on-disk line (without the newline).
pub(crate) fn seal(event: &mut Event) -> String {
    event.hash.clear();
    let mut value = serde_json::to_value(&*event).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.remove("hash");
    }
    let hash = event_hash(&value);
    if let Value::Object(map) = &mut value {
        map.insert("hash".into(), Value::String(hash.clone()));
    }
    event.hash = hash;
    canonical_json(&value)
}

/// An open audit log. Only the host side (the supervisor, or the CLI when it
/// cleans up after a dead supervisor) ever holds one; the file lives under
/// the data directory, which is never mounted into a sandbox.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    next_seq: u64,
    head: String,
    /// Length of the file after the last complete event.
    len: u64,
    sandbox_id: String,
    user_id: String,
    /// Signs checkpoints, when set.
    signer: Option<Checkpointing>,
    /// Evaluates the detection rules on each event, when set; alerts are
    /// written with this source.
    detector: Option<(crate::detect::Detector, Source)>,
    /// Seal the log into a segment once it is this large.
    segment_max: Option<u64>,
}

/// When and with what [`AuditLog`] writes checkpoints.
#[derive(Debug)]
struct Checkpointing {
    signer: crate::checkpoint::Signer,
    every: u64,
    interval: std::time::Duration,
    since: u64,
    last: std::time::Instant,
    file: PathBuf,
}

impl AuditLog {
    /// Opens (creating 0600) the log at `path` and recovers the chain head
    /// from its last line.
    pub fn open(path: &Path, sandbox_id: &str, user_id: &str) -> Result<Self, AuditError> {
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        complete_pending_seal(path)?;
        check_segments_present(path)?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        let (mut next_seq, mut head) = recover_head(&mut file, path)?;
        let len = file.seek(SeekFrom::End(0)).map_err(io)?;
        if len == 0
            && let Some(last) = crate::segments::last_sealed(path)?
        {
            // A fresh file after a seal: the chain goes on from there.
            next_seq = last.last_seq + 1;
            head = last.last_hash;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            next_seq,
            head,
            len,
            sandbox_id: sandbox_id.to_string(),
            user_id: user_id.to_string(),
            signer: None,
            detector: None,
            segment_max: None,
        })
    }

    /// Seals the log into a segment whenever it grows past `bytes`.
    pub fn set_segment_max(&mut self, bytes: u64) {
        self.segment_max = Some(bytes.max(1));
    }

    /// Seals what the active file holds into a read-only segment listed in
    /// the manifest (signed when a signer is set), and goes on in a fresh
    /// file. Nothing to seal is not an error.
    pub fn seal(&mut self, reason: &str) -> Result<Option<crate::segments::Segment>, AuditError> {
        if self.len == 0 {
            return Ok(None);
        }
        let io = |source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        };
        self.file.sync_data().map_err(io)?;
        // Through our own handle, never the name: what is sealed is what
        // we wrote.
        let (sha256, bytes, first) = {
            use std::os::unix::fs::FileExt;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut first = Vec::new();
            let mut at = 0u64;
            while at < self.len {
                let want = buf.len().min((self.len - at) as usize);
                let n = self.file.read_at(&mut buf[..want], at).map_err(io)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                if first.last() != Some(&b'\n') {
                    let end = buf[..n]
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(n, |p| p + 1);
                    first.extend_from_slice(&buf[..end]);
                }
                at += n as u64;
            }
            (hex::encode(h.finalize()), at, first)
        };
        {
            use std::os::unix::fs::MetadataExt;
            let ours = self.file.metadata().map_err(io)?.ino();
            let named = std::fs::symlink_metadata(&self.path).map_err(io)?.ino();
            if ours != named || bytes != self.len {
                return Err(AuditError::Tampered {
                    path: self.path.display().to_string(),
                    reason: "the log file was replaced or changed under the writer".into(),
                });
            }
        }
        let first: Event =
            serde_json::from_slice(first.trim_ascii_end()).map_err(|e| AuditError::BadTail {
                path: self.path.display().to_string(),
                reason: format!("first line: {e}"),
            })?;
        let last_seq = self.next_seq.saturating_sub(1);
        let mut entry = crate::segments::Segment {
            segment: format!("{:012}-{:012}.jsonl", first.seq, last_seq),
            first_seq: first.seq,
            last_seq,
            first_prev_hash: first.prev_hash,
            last_hash: self.head.clone(),
            bytes,
            sha256,
            sealed_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            reason: reason.to_string(),
            key_id: None,
            signature: None,
        };
        if let Some(c) = &self.signer {
            entry.key_id = Some(c.signer.key_id().to_string());
            let (_, sig) = c.signer.sign_bytes(&entry.message(&self.sandbox_id));
            entry.signature = Some(sig);
        }
        // Listed first, then moved: a crash in between is completed by
        // the next open (the file still matches its entry).
        let before = crate::segments::append_manifest(&self.path, &entry)?;
        if let Err(e) = crate::segments::move_into_place(&self.path, &entry) {
            // Not moved: the entry goes, the file stays active.
            crate::segments::truncate_manifest(&self.path, before);
            return Err(e);
        }
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
            .map_err(|source| AuditError::Io {
                path: self.path.display().to_string(),
                source,
            })?;
        self.len = 0;
        Ok(Some(entry))
    }

    /// Evaluates the detection rules on every event appended from now on,
    /// writing their alerts as `falco.alert` events from `source`. The
    /// detector first reads the log's recent events (its last 16 MiB), so
    /// windows and a stopped sandbox carry over a restart; alerts those
    /// events raised were written when they happened and are not repeated.
    pub fn set_detector(&mut self, mut detector: crate::detect::Detector, source: Source) {
        const TAIL: u64 = 16 << 20;
        // Across the sealed segments too: a sandbox that stopped sealed
        // its file, and what came before the stop still counts.
        let buf = crate::segments::tail(&self.path, TAIL);
        for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(e) = serde_json::from_slice::<Event>(line) {
                detector.observe(&e);
            }
        }
        self.detector = Some((detector, source));
    }

    /// Signs a checkpoint after every `every` events or `interval`,
    /// whichever comes first (checked at each append), and when
    /// [`AuditLog::checkpoint`] is called.
    pub fn set_signer(
        &mut self,
        signer: crate::checkpoint::Signer,
        every: u64,
        interval: std::time::Duration,
    ) {
        self.signer = Some(Checkpointing {
            signer,
            every: every.max(1),
            interval,
            since: 0,
            last: std::time::Instant::now(),
            file: crate::checkpoint::checkpoints_path(&self.path),
        });
    }

    /// Signs the current head (after syncing the log), unless nothing was
    /// appended since the last checkpoint.
    pub fn checkpoint(&mut self) -> Result<(), AuditError> {
        let Some(c) = &self.signer else {
            return Ok(());
        };
        if c.since == 0 || self.next_seq == 0 {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        let cp = c
            .signer
            .checkpoint(&c.file, &self.sandbox_id, self.next_seq - 1, &self.head)?;
        crate::checkpoint::write_anchor(c.signer.path(), &self.path, &cp)?;
        if let Some(c) = &mut self.signer {
            c.since = 0;
            c.last = std::time::Instant::now();
        }
        Ok(())
    }

    /// Appends one event. The whole line goes out in a single `write(2)` on
    /// an `O_APPEND` descriptor, so a crash leaves at most one torn line.
    /// Detection alerts it raises follow it (a failure to write one is
    /// not this event's failure: it is written already).
    pub fn append(
        &mut self,
        event_type: EventType,
        source: Source,
        severity: Severity,
        details: Map<String, Value>,
    ) -> Result<Event, AuditError> {
        let event = self.append_one(event_type, source, severity, details)?;
        if let Some((d, alert_source)) = &mut self.detector {
            let alert_source = *alert_source;
            let alerts = d.observe(&event);
            for a in alerts {
                let _ = self.append_one(
                    EventType::FalcoAlert,
                    alert_source,
                    a.rule.audit_severity(),
                    a.details(),
                );
            }
        }
        Ok(event)
    }

    fn append_one(
        &mut self,
        event_type: EventType,
        source: Source,
        severity: Severity,
        details: Map<String, Value>,
    ) -> Result<Event, AuditError> {
        let mut event = Event {
            seq: self.next_seq,
            timestamp: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
            event_type,
            sandbox_id: self.sandbox_id.clone(),
            user_id: self.user_id.clone(),
            source,
            severity,
            details,
            prev_hash: self.head.clone(),
            hash: String::new(),
        };
        event
            .validate()
            .map_err(|reason| AuditError::InvalidEvent {
                event_type: event_type.as_str().to_string(),
                reason,
            })?;
        let mut line = seal(&mut event);
        line.push('\n');
        if let Err(source) = self.file.write_all(line.as_bytes()) {
            // Take back a partial line (e.g. on ENOSPC) so the chain stays
            // intact for the next event.
            let _ = self.file.set_len(self.len);
            return Err(AuditError::Io {
                path: self.path.display().to_string(),
                source,
            });
        }
        self.len += line.len() as u64;
        self.next_seq += 1;
        self.head = event.hash.clone();
        if let Some(c) = &mut self.signer {
            c.since += 1;
            if c.since >= c.every || c.last.elapsed() >= c.interval {
                // (The event is written; a failed checkpoint is retried
                // with the next one.)
                let _ = self.checkpoint();
            }
        }
        if self.segment_max.is_some_and(|m| self.len >= m) {
            // Signed up to here first, then sealed; a failure leaves the
            // file active and is tried again at the next event.
            let _ = self.checkpoint();
            let _ = self.seal("rotation");
        }
        Ok(event)
    }

    /// Flushes the file to stable storage.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.file.sync_data().map_err(|source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What [`AuditLog::open_recovering`] did with a torn final line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Where the torn line began.
    pub offset: u64,
    /// Its length.
    pub bytes: u64,
    /// The file it was moved to (kept as evidence).
    pub kept: PathBuf,
}

impl AuditLog {
    /// [`AuditLog::open`], but a log ending in a torn line (a write cut
    /// short by a crash) is repaired first: the partial line is moved to
    /// `<log>.torn.<offset>` and the chain continues from the last whole
    /// event. Anything else wrong with the log is still an error.
    pub fn open_recovering(
        path: &Path,
        sandbox_id: &str,
        user_id: &str,
    ) -> Result<(Self, Option<Recovered>), AuditError> {
        match AuditLog::open(path, sandbox_id, user_id) {
            Err(AuditError::TornTail { .. }) => {}
            other => return other.map(|l| (l, None)),
        }
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        // By handle, never following a link: the log's directory is not
        // the place to trust names in.
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map_err(io)?;
        let cut = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        let mut kept = None;
        for n in 0..100 {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".torn.{cut}"));
            if n > 0 {
                name.push(format!(".{n}"));
            }
            let candidate = PathBuf::from(name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&candidate)
            {
                Ok(mut t) => {
                    t.write_all(&bytes[cut..])
                        .and_then(|()| t.sync_all())
                        .map_err(io)?;
                    kept = Some(candidate);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(e)),
            }
        }
        let kept = kept.ok_or_else(|| {
            io(std::io::Error::other(
                "no free name to keep the torn line under",
            ))
        })?;
        f.set_len(cut as u64)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        drop(f);
        let log = AuditLog::open(path, sandbox_id, user_id)?;
        Ok((
            log,
            Some(Recovered {
                offset: cut as u64,
                bytes: (bytes.len() - cut) as u64,
                kept,
            }),
        ))
    }
}

/// What [`AuditLog::check_anchor`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anchored {
    /// No checkpoint of this log was ever anchored.
    None,
    /// The log and its checkpoint file hold the anchored checkpoint.
    Holds(crate::checkpoint::Checkpoint),
    /// The log is empty although a checkpoint was anchored: a new chain
    /// starts (the old log was moved aside, or deleted), and says so.
    Reset(crate::checkpoint::Checkpoint),
}

impl AuditLog {
    /// Checks this log against its last checkpoint kept beside the signing
    /// key `key`: the checkpoint file must still hold that checkpoint, and
    /// the log the event it signed. A log cut back or rewritten, or a
    /// checkpoint file deleted or cut back, is [`AuditError::Tampered`].
    pub fn check_anchor(&mut self, key: &Path) -> Result<Anchored, AuditError> {
        let Some(anchor) = crate::checkpoint::read_anchor(key, &self.path)? else {
            return Ok(Anchored::None);
        };
        if self.next_seq == 0 {
            return Ok(Anchored::Reset(anchor));
        }
        let shown = self.path.display().to_string();
        let tampered = |reason: String| AuditError::Tampered {
            path: shown.clone(),
            reason,
        };
        let cps =
            crate::checkpoint::read_checkpoints(&crate::checkpoint::checkpoints_path(&self.path))?;
        if !cps.iter().any(|c| c.as_ref() == Ok(&anchor)) {
            return Err(tampered(format!(
                "its checkpoint file no longer holds the last checkpoint (event {}, signed {}): checkpoints were deleted",
                anchor.seq, anchor.time
            )));
        }
        if anchor.seq >= self.next_seq {
            return Err(tampered(format!(
                "it ends at event {} but event {} was signed: events were cut off",
                self.next_seq.saturating_sub(1),
                anchor.seq
            )));
        }
        let head = if anchor.seq + 1 == self.next_seq {
            Some(self.head.clone())
        } else {
            self.hash_at(anchor.seq)?
        };
        if head.as_deref() != Some(anchor.head.as_str()) {
            return Err(tampered(format!(
                "its event {} is not the one signed {}: history was rewritten",
                anchor.seq, anchor.time
            )));
        }
        Ok(Anchored::Holds(anchor))
    }

    /// The hash of event `seq`, reading the file from the start.
    fn hash_at(&self, seq: u64) -> Result<Option<String>, AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.display().to_string(),
            source,
        };
        let r = std::io::BufReader::new(crate::segments::ChainReader::new(&self.path));
        for line in std::io::BufRead::split(r, b'\n') {
            let line = line.map_err(io)?;
            if let Ok((next, hash)) = parse_tail(&line, &self.path)
                && next == seq + 1
            {
                return Ok(Some(hash));
            }
        }
        Ok(None)
    }
}

/// Completes a seal a crash interrupted: the manifest lists a segment
/// whose file is missing while the active file is exactly that segment.
fn complete_pending_seal(path: &Path) -> Result<(), AuditError> {
    let Some(last) = crate::segments::last_sealed(path)? else {
        return Ok(());
    };
    let seg = crate::segments::segments_dir(path).join(&last.segment);
    if seg.exists() || !path.exists() {
        return Ok(());
    }
    match crate::segments::digest(path) {
        Ok((sha, len)) if sha == last.sha256 && len == last.bytes => {
            crate::segments::move_into_place(path, &last)
        }
        _ => Ok(()),
    }
}

/// Refuses a log whose sealed segments are not all there at the size the
/// manifest recorded (a quick look: `verify` hashes them).
fn check_segments_present(path: &Path) -> Result<(), AuditError> {
    let dir = crate::segments::segments_dir(path);
    for e in crate::segments::read_manifest(path)?.into_iter().flatten() {
        let len = std::fs::symlink_metadata(dir.join(&e.segment))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        if len != Some(e.bytes) {
            return Err(AuditError::Tampered {
                path: path.display().to_string(),
                reason: format!(
                    "its sealed segment {} (events {} to {}) is missing or changed",
                    e.segment, e.first_seq, e.last_seq
                ),
            });
        }
    }
    Ok(())
}

/// Reads the last line of the file and returns (next seq, head hash).
fn recover_head(file: &mut File, path: &Path) -> Result<(u64, String), AuditError> {
    let io = |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let len = file.seek(SeekFrom::End(0)).map_err(io)?;
    if len == 0 {
        return Ok((0, GENESIS.to_string()));
    }
    // Read backwards in growing windows until we hold the whole last line.
    let mut window = 4096u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(io)?;
        if buf.last() != Some(&b'\n') {
            return Err(AuditError::TornTail {
                path: path.display().to_string(),
            });
        }
        let body = &buf[..buf.len() - 1];
        match body.iter().rposition(|b| *b == b'\n') {
            Some(pos) => return parse_tail(&body[pos + 1..], path),
            None if start == 0 => return parse_tail(body, path),
            None => window *= 4,
        }
    }
}

fn parse_tail(line: &[u8], path: &Path) -> Result<(u64, String), AuditError> {
    let bad = |reason: String| AuditError::BadTail {
        path: path.display().to_string(),
        reason,
    };
    let event: Event = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
    let mut check = event.clone();
    let canon = seal(&mut check);
    if canon.as_bytes() != line || check.hash != event.hash {
        return Err(bad("hash does not match content".into()));
    }
    Ok((event.seq + 1, event.hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn chain_continues_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut log = AuditLog::open(&path, "sb", "alice").unwrap();
        let first = log
            .append(
                EventType::SandboxStop,
                Source::AiboxSupervisor,
                Severity::Info,
                details(&[("reason", "test".into())]),
            )
            .unwrap();
        assert_eq!(first.prev_hash, GENESIS);
        drop(log);
        let mut log = AuditLog::open(&path, "sb", "alice").unwrap();
        let second = log
            .append(
                EventType::SandboxDestroy,
                Source::AiboxSupervisor,
                Severity::Info,
                details(&[("reason", "test".into())]),
            )
            .unwrap();
        assert_eq!(second.seq, 1);
        assert_eq!(second.prev_hash, first.hash);
        let report = crate::verify_file(&path).unwrap();
        assert!(report.is_intact(), "{report:?}");
    }

    #[test]
    fn floats_and_missing_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(&dir.path().join("a.jsonl"), "sb", "u").unwrap();
        assert!(
            log.append(
                EventType::SandboxStop,
                Source::AiboxCli,
                Severity::Info,
                Map::new()
            )
            .is_err()
        );
        assert!(
            log.append(
                EventType::SandboxStop,
                Source::AiboxCli,
                Severity::Info,
                details(&[("reason", "x".into()), ("t", serde_json::json!(1.5))]),
            )
            .is_err()
        );
    }

    #[test]
    fn torn_tail_is_refused_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, b"{\"seq\":0").unwrap();
        assert!(matches!(
            AuditLog::open(&path, "sb", "u"),
            Err(AuditError::TornTail { .. })
        ));
    }
}
