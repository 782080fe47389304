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

/// Whether `name` is a segment file name aibox writes
/// (`<12 digits>-<12 digits>.jsonl`): anything else in a manifest (a path,
/// `..`) is refused before it is used as one.
pub fn valid_segment_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 31
        && b[..12].iter().all(u8::is_ascii_digit)
        && b[12] == b'-'
        && b[13..25].iter().all(u8::is_ascii_digit)
        && &b[25..] == b".jsonl"
}

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
        out.push(
            serde_json::from_str::<Segment>(&line)
                .map_err(|e| (i as u64, e.to_string()))
                .and_then(|s| {
                    if valid_segment_name(&s.segment) {
                        Ok(s)
                    } else {
                        Err((
                            i as u64,
                            format!("{:?} is not a segment file name", s.segment),
                        ))
                    }
                }),
        );
    }
    Ok(out)
}

/// Refuses a segments directory that is not a plain directory (a symbolic
/// link planted there would send sealed files, and a chmod, elsewhere).
fn plain_dir(dir: &Path) -> Result<(), AuditError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(AuditError::Tampered {
            path: dir.display().to_string(),
            reason: "the segments directory is not a plain directory".into(),
        }),
        Err(e) => Err(io(dir)(e)),
    }
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

/// Appends one line to a small append-only file (0600, never through a
/// link), synced. A write cut short is taken back, and a file left ending
/// mid-line by a crash gets its newline first, so one bad write never
/// spoils the lines after it. Returns the length before the append.
pub(crate) fn append_line(p: &Path, line: &str) -> Result<u64, AuditError> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .map_err(io(p))?;
    let len = f.metadata().map_err(io(p))?.len();
    let mut out = Vec::with_capacity(line.len() + 2);
    if len > 0 {
        use std::os::unix::fs::FileExt;
        let mut last = [0u8; 1];
        f.read_exact_at(&mut last, len - 1).map_err(io(p))?;
        if last[0] != b'\n' {
            out.push(b'\n');
        }
    }
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
    if let Err(e) = f.write_all(&out).and_then(|()| f.sync_data()) {
        let _ = f.set_len(len);
        return Err(io(p)(e));
    }
    Ok(len)
}

/// Appends `entry` to the manifest of `log`; returns the manifest's
/// length before, to take the entry back with.
pub(crate) fn append_manifest(log: &Path, entry: &Segment) -> Result<u64, AuditError> {
    let p = manifest_path(log);
    let line = serde_json::to_string(entry).map_err(|e| AuditError::Key {
        path: p.display().to_string(),
        reason: e.to_string(),
    })?;
    append_line(&p, &line)
}

/// Takes the manifest back to `len` (a seal that could not finish).
pub(crate) fn truncate_manifest(log: &Path, len: u64) {
    if let Ok(f) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(manifest_path(log))
    {
        let _ = f.set_len(len).and_then(|()| f.sync_data());
    }
}

/// Moves the active file to its segment name, read-only, never replacing
/// a file already there.
pub(crate) fn move_into_place(log: &Path, entry: &Segment) -> Result<(), AuditError> {
    let dir = segments_dir(log);
    if !valid_segment_name(&entry.segment) {
        return Err(AuditError::Tampered {
            path: manifest_path(log).display().to_string(),
            reason: format!("{:?} is not a segment file name", entry.segment),
        });
    }
    if std::fs::symlink_metadata(&dir).is_err() {
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
    }
    plain_dir(&dir)?;
    let to = dir.join(&entry.segment);
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        log,
        nix::fcntl::AT_FDCWD,
        &to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| io(&to)(std::io::Error::from(e)))?;
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
    check_with(log, sandbox, trusted, None)
}

/// [`check`], given the chain hashes a verification of the whole log
/// found at each segment's last event (`heads`): a segment whose size is
/// as sealed and whose last event is, in a chain that verified up to
/// there, the one the signed entry names holds exactly the sealed bytes
/// (every byte is under a line hash, every line under the chain), so it
/// is not hashed a second time. Any other segment is hashed.
pub fn check_with(
    log: &Path,
    sandbox: &str,
    trusted: Option<&crate::checkpoint::Trusted>,
    heads: Option<&std::collections::HashMap<u64, String>>,
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
        if !valid_segment_name(name) {
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
        let file = dir.join(name);
        let vouched = heads.and_then(|h| h.get(&e.last_seq)) == Some(&e.last_hash)
            && std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file() && m.len() == e.bytes);
        let measured = if vouched {
            Ok((e.sha256.clone(), e.bytes))
        } else {
            digest(&file)
        };
        match measured {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_are_file_names_only() {
        assert!(valid_segment_name("000000000000-000000000011.jsonl"));
        for bad in [
            "../../x",
            "/etc/passwd",
            "a.jsonl",
            "000000000000-00000000001x.jsonl",
            "",
        ] {
            assert!(!valid_segment_name(bad), "{bad}");
        }
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("s.jsonl");
        std::fs::write(
            manifest_path(&log),
            "{\"segment\":\"../../evil\",\"first_seq\":0,\"last_seq\":0,\"first_prev_hash\":\"\",\"last_hash\":\"\",\"bytes\":0,\"sha256\":\"\",\"sealed_at\":\"\",\"reason\":\"stop\"}\n",
        )
        .unwrap();
        assert!(read_manifest(&log).unwrap()[0].is_err());
        assert!(files(&log).is_empty());
    }

    #[test]
    fn a_torn_line_does_not_spoil_the_next() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        std::fs::write(&p, "{\"a\":1}\n{\"tor").unwrap();
        append_line(&p, "{\"b\":2}").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().last(), Some("{\"b\":2}"));
    }
}
