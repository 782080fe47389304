//! Sealed segments. When a sandbox stops (and when its log passes
//! `audit.segment_max`), the supervisor seals the log: the file moves to
//! `<audit dir>/<name>.segments/<first seq>-<last seq>.jsonl`, read-only,
//! and one line is appended to `<audit dir>/<name>.manifest` naming it
//! with its byte count, SHA-256, first and last sequence numbers and the
//! chain hashes at both ends — signed with the checkpoint key. The chain
//! goes on in a fresh `<name>.jsonl`. A log is therefore its sealed
//! segments in manifest order followed by that active file; [`files`]
//! lists them and [`ChainReader`] reads them as one stream.
//!
//! `verify` checks each entry's signature, that the segments follow one
//! another without gap, and that every file is there with the bytes the
//! manifest recorded; a segment deleted, altered or slipped in is named.

use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::AuditError;
use crate::log::canonical_json;

/// One manifest line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    /// File name in the segments directory.
    pub segment: String,
    /// Sequence number of its first event.
    pub first_seq: u64,
    /// Sequence number of its last event.
    pub last_seq: u64,
    /// `prev_hash` of its first event.
    pub first_prev_hash: String,
    /// `hash` of its last event.
    pub last_hash: String,
    /// Its size.
    pub bytes: u64,
    /// SHA-256 (hex) of its bytes.
    pub sha256: String,
    /// When it was sealed (RFC 3339).
    pub sealed_at: String,
    /// `stop` or `rotation`.
    pub reason: String,
    /// The signing key's id, when signed.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Ed25519 signature (hex) over [`Segment::message`], when signed.
    #[serde(default)]
    pub signature: Option<String>,
}

impl Segment {
    /// What is signed: a domain tag and the canonical JSON of every field
    /// but the signature.
    pub fn message(&self, sandbox: &str) -> Vec<u8> {
        let v = serde_json::json!({
            "sandbox": sandbox, "segment": self.segment, "first_seq": self.first_seq,
            "last_seq": self.last_seq, "first_prev_hash": self.first_prev_hash,
            "last_hash": self.last_hash, "bytes": self.bytes, "sha256": self.sha256,
            "sealed_at": self.sealed_at, "reason": self.reason, "key_id": self.key_id,
        });
        let mut m = b"aibox-segment-v1\n".to_vec();
        m.extend_from_slice(canonical_json(&v).as_bytes());
        m
    }
}

fn stem(log: &Path) -> String {
    log.file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".jsonl").to_string())
        .unwrap_or_default()
}

/// The manifest of the log at `log` (`<name>.manifest` beside it).
pub fn manifest_path(log: &Path) -> PathBuf {
    log.with_file_name(format!("{}.manifest", stem(log)))
}

/// The directory of the log's sealed segments (`<name>.segments`).
pub fn segments_dir(log: &Path) -> PathBuf {
    log.with_file_name(format!("{}.segments", stem(log)))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A manifest line: the entry, or (line number, why it is not one).
pub type ManifestLine = Result<Segment, (u64, String)>;

/// Reads the manifest of `log` (empty when there is none).
pub fn read_manifest(log: &Path) -> Result<Vec<ManifestLine>, AuditError> {
    let p = manifest_path(log);
    let f = match File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&p)(e)),
    };
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io(&p))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| (i as u64, e.to_string())));
    }
    Ok(out)
}

/// The last sound manifest entry, if any.
pub fn last_sealed(log: &Path) -> Result<Option<Segment>, AuditError> {
    Ok(read_manifest(log)?
        .into_iter()
        .filter_map(Result::ok)
        .next_back())
}

/// The files of the log, oldest first: its sealed segments that exist
/// (in manifest order), then the active file if it exists.
pub fn files(log: &Path) -> Vec<PathBuf> {
    let dir = segments_dir(log);
    let mut out: Vec<PathBuf> = read_manifest(log)
        .unwrap_or_default()
        .into_iter()
        .filter_map(Result::ok)
        .map(|s| dir.join(s.segment))
        .filter(|p| p.is_file())
        .collect();
    if log.is_file() {
        out.push(log.to_path_buf());
    }
    out
}

/// The files of `log` read as one stream.
#[derive(Debug)]
pub struct ChainReader {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<File>,
}

impl ChainReader {
    /// Reads the segments and the active file of `log` in order.
    pub fn new(log: &Path) -> ChainReader {
        ChainReader {
            files: files(log).into_iter(),
            current: None,
        }
    }
}

impl Read for ChainReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if let Some(f) = &mut self.current {
                let n = f.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                self.current = None;
            }
            match self.files.next() {
                Some(p) => self.current = Some(File::open(&p)?),
                None => return Ok(0),
            }
        }
    }
}

/// The last `n` bytes (about) of the log across its files, starting at a
/// line boundary.
pub fn tail(log: &Path, n: u64) -> Vec<u8> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut have = 0u64;
    for p in files(log).iter().rev() {
        let Ok(mut f) = File::open(p) else { continue };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let take = len.min(n.saturating_sub(have));
        let mut buf = Vec::new();
        use std::io::Seek;
        if f.seek(std::io::SeekFrom::Start(len - take)).is_ok() {
            let _ = f.take(take).read_to_end(&mut buf);
        }
        let cut = take < len;
        have += buf.len() as u64;
        if cut {
            // Drop the partial first line.
            let start = buf
                .iter()
                .position(|b| *b == b'\n')
                .map_or(buf.len(), |i| i + 1);
            buf.drain(..start);
        }
        parts.push(buf);
        if have >= n {
            break;
        }
    }
    parts.into_iter().rev().flatten().collect()
}

/// SHA-256 (hex) and length of a file.
pub fn digest(path: &Path) -> Result<(String, u64), AuditError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(h.finalize()), len))
}

/// Appends `entry` to the manifest of `log` (0600, synced).
pub(crate) fn append_manifest(log: &Path, entry: &Segment) -> Result<(), AuditError> {
    let p = manifest_path(log);
    let mut line = serde_json::to_string(entry).map_err(|e| AuditError::Key {
        path: p.display().to_string(),
        reason: e.to_string(),
    })?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)
        .map_err(io(&p))?;
    f.write_all(line.as_bytes())
        .and_then(|()| f.sync_data())
        .map_err(io(&p))
}

/// Moves the active file to its segment name, read-only.
pub(crate) fn move_into_place(log: &Path, entry: &Segment) -> Result<(), AuditError> {
    let dir = segments_dir(log);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    let to = dir.join(&entry.segment);
    std::fs::rename(log, &to).map_err(io(&to))?;
    let _ = std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o400));
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// What the manifest and the segment files say about a log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SegmentReport {
    /// Sealed segments listed.
    pub sealed: u64,
    /// What does not hold: a missing, altered, unlisted or out-of-order
    /// segment, or a bad manifest entry.
    pub problems: Vec<String>,
}

/// Checks the manifest of `log` against its segment files, and the
/// entries' signatures against `trusted` (when given).
pub fn check(
    log: &Path,
    sandbox: &str,
    trusted: Option<&crate::checkpoint::Trusted>,
) -> Result<SegmentReport, AuditError> {
    let dir = segments_dir(log);
    let mut r = SegmentReport::default();
    let mut listed = std::collections::HashSet::new();
    let mut prev: Option<Segment> = None;
    for (i, e) in read_manifest(log)?.into_iter().enumerate() {
        let e = match e {
            Ok(e) => e,
            Err((line, why)) => {
                r.problems
                    .push(format!("manifest line {line}: not a segment entry: {why}"));
                continue;
            }
        };
        r.sealed += 1;
        listed.insert(e.segment.clone());
        let name = &e.segment;
        if name.contains('/') || name.starts_with('.') {
            r.problems.push(format!(
                "manifest entry {i}: {name:?} is not a segment file name"
            ));
            continue;
        }
        if let Some(t) = trusted {
            match (&e.key_id, &e.signature) {
                (Some(k), Some(s)) => {
                    if let Some(why) = t.check_bytes(k, s, &e.message(sandbox)) {
                        r.problems
                            .push(format!("segment {name}: manifest entry {why}"));
                    }
                }
                _ => r
                    .problems
                    .push(format!("segment {name}: manifest entry is not signed")),
            }
        }
        let (want_seq, want_prev) = prev
            .as_ref()
            .map_or((0, crate::log::GENESIS.to_string()), |p| {
                (p.last_seq + 1, p.last_hash.clone())
            });
        if e.first_seq != want_seq || e.first_prev_hash != want_prev {
            r.problems.push(format!(
                "segment {name}: starts at event {} but event {want_seq} was due (a segment before it is missing or out of order)",
                e.first_seq
            ));
        }
        match digest(&dir.join(name)) {
            Ok((sha, len)) if sha == e.sha256 && len == e.bytes => {}
            Ok((_, len)) => r.problems.push(format!(
                "segment {name}: its bytes changed since it was sealed ({len} bytes now, {} sealed)",
                e.bytes
            )),
            Err(_) => r
                .problems
                .push(format!("segment {name}: missing (deleted since it was sealed)")),
        }
        prev = Some(e);
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut extra: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !listed.contains(n))
            .collect();
        extra.sort();
        for n in extra {
            r.problems.push(format!(
                "segment {n}: not in the manifest (added, or its entry removed)"
            ));
        }
    }
    Ok(r)
}
