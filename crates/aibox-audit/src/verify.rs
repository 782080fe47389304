//! Chain verification.

use std::io::{BufReader, Read};
use std::path::Path;

use serde::Serialize;

use sha2::Digest;

use crate::log::GENESIS;
use crate::{AuditError, Event};

/// Where and why a log stopped verifying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Break {
    /// 0-based index of the first bad line.
    pub index: u64,
    /// What is wrong with it.
    pub reason: String,
    /// True when the only problem is an incomplete final line (an
    /// interrupted write), which is damage but not evidence of tampering.
    pub torn_tail: bool,
}

/// Result of verifying one log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Events that verified before the first break (all of them if intact).
    pub verified: u64,
    /// Hash of the last verified event (the chain head).
    pub head: String,
    /// The first break, if any.
    pub broken: Option<Break>,
}

impl VerifyReport {
    /// True when every line verified.
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
    }
}

/// Verifies the log file at `path`.
pub fn verify_file(path: &Path) -> Result<VerifyReport, AuditError> {
    let file = std::fs::File::open(path).map_err(|source| AuditError::Io {
        path: path.display().to_string(),
        source,
    })?;
    verify_reader(file).map_err(|source| AuditError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Verifies a log read from `reader`: each line must be the canonical form
/// of an event whose hash matches its content, whose `prev_hash` is the
/// previous event's hash, and whose `seq` is the previous `seq` + 1.
/// A modified byte breaks the line it is in; a deleted or inserted line
/// breaks the chain at the line after the gap; swapped lines break at the
/// first of the two.
pub fn verify_reader<R: Read>(reader: R) -> std::io::Result<VerifyReport> {
    verify_reader_with(reader, |_, _| {})
}

/// [`verify_reader`], calling `on_event(seq, hash)` for each event that
/// verified.
///
/// Lines are read in blocks; each block's lines are parsed and hashed on
/// all cores, then linked in order (sequence numbers and `prev_hash`), so
/// the report is the same as a line-by-line pass.
pub fn verify_reader_with<R: Read>(
    reader: R,
    mut on_event: impl FnMut(u64, &str),
) -> std::io::Result<VerifyReport> {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let mut expected_prev = GENESIS.to_string();
    let mut expected_seq = 0u64;
    let mut index = 0u64;
    // Whole lines of the current block; the next block is read while the
    // current one is checked.
    let (mut block, mut rest, mut eof) = next_block(&mut reader, &[], Vec::new())?;
    // The buffer of the block before, refilled while the current one is
    // checked: two buffers in turn, not a fresh allocation (and a fresh
    // set of page faults) per block.
    let mut spare = Vec::new();
    loop {
        let (checked, next) = std::thread::scope(|s| {
            let lines: Vec<&[u8]> = if block.is_empty() {
                Vec::new()
            } else {
                let mut lines = Vec::with_capacity(block.len() / 256);
                let mut start = 0;
                for nl in memchr::memchr_iter(b'\n', &block) {
                    lines.push(&block[start..nl]);
                    start = nl + 1;
                }
                lines
            };
            let work = s.spawn(move || check_lines(&lines, threads));
            let next = if eof {
                None
            } else {
                Some(next_block(&mut reader, &rest, std::mem::take(&mut spare)))
            };
            let checked = work
                .join()
                .unwrap_or_else(|_| vec![Err("verification thread failed".to_string())]);
            (checked, next)
        });
        for r in checked {
            let fail = |reason: String| VerifyReport {
                verified: index,
                head: expected_prev.clone(),
                broken: Some(Break {
                    index,
                    reason,
                    torn_tail: false,
                }),
            };
            let c = match r {
                Ok(c) => c,
                Err(why) => return Ok(fail(why)),
            };
            if c.prev.as_ref().map(|p| &p[..]) != Some(expected_prev.as_bytes()) {
                return Ok(fail(
                    "prev_hash does not match the previous event (line deleted, inserted or reordered)"
                        .into(),
                ));
            }
            if c.seq != expected_seq {
                return Ok(fail(format!(
                    "seq {} where {} was expected",
                    c.seq, expected_seq
                )));
            }
            let hash = std::str::from_utf8(&c.hash).unwrap_or_default();
            on_event(c.seq, hash);
            expected_prev.clear();
            expected_prev.push_str(hash);
            expected_seq += 1;
            index += 1;
        }
        match next {
            Some(n) => {
                let (b, r, e) = n?;
                spare = std::mem::replace(&mut block, b);
                (rest, eof) = (r, e);
            }
            None => break,
        }
    }
    if !rest.is_empty() {
        // Only the final line can lack a newline.
        let parses = serde_json::from_slice::<Event>(&rest).is_ok();
        let reason = if parses {
            "final line has no newline".to_string()
        } else {
            "final line is incomplete (interrupted write)".to_string()
        };
        return Ok(VerifyReport {
            verified: index,
            head: expected_prev,
            broken: Some(Break {
                index,
                reason,
                torn_tail: true,
            }),
        });
    }
    Ok(VerifyReport {
        verified: index,
        head: expected_prev,
        broken: None,
    })
}

/// Reads on from `carry` (the unfinished line of the last block) to the
/// next block of whole lines, into `buf`: (those lines, ending in a newline
/// or empty; what follows the last newline; whether the input ended).
fn next_block<R: Read>(
    reader: &mut R,
    carry: &[u8],
    mut buf: Vec<u8>,
) -> std::io::Result<(Vec<u8>, Vec<u8>, bool)> {
    const BLOCK: u64 = 16 << 20;
    buf.clear();
    buf.extend_from_slice(carry);
    let mut block = buf;
    loop {
        // Room for the whole read up front: no regrowing and copying.
        block.reserve(BLOCK as usize);
        let n = reader.take(BLOCK).read_to_end(&mut block)?;
        let eof = n == 0;
        let cut = memchr::memrchr(b'\n', &block).map_or(0, |p| p + 1);
        if cut == 0 && !eof {
            continue;
        }
        let rest = block.split_off(cut);
        return Ok((block, rest, eof));
    }
}

/// What linking needs of a line whose own hash held.
struct Checked {
    seq: u64,
    hash: [u8; 64],
    /// `None` when it is not 64 characters (it then links to nothing).
    prev: Option<[u8; 64]>,
}

/// `digest` as lowercase hex, the form a line carries.
fn hex_lower(digest: &[u8]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in digest.iter().take(32).enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

/// Checks one line without a JSON parser. In the canonical line the
/// top-level fields after `details` come in a fixed order:
/// `…,"event_type":"T","hash":"H","prev_hash":"P","sandbox_id":"N","seq":S,"severity":"V","source":"O",…`.
/// `prev_hash` is found from the end (after it only those fixed fields
/// follow, and no string holds an unescaped quote, so its last occurrence
/// is the top-level one); the rest is read forward from there and the type
/// backward from the hash. The hash is checked over the line's bytes
/// minus its hash field. A line this does not accept goes to the parser,
/// which names what is wrong.
fn check_fast(line: &[u8]) -> Option<Checked> {
    const HASH: &[u8] = b",\"hash\":\"";
    const PREV: &[u8] = b",\"prev_hash\":\"";
    const TYPE: &[u8] = b",\"event_type\":\"";
    const SOURCES: &[&[u8]] = &[
        b"aibox-cli",
        b"aibox-supervisor",
        b"aibox-agent",
        b"aibox-llm-proxy",
        b"squid",
        b"coredns",
        b"opa",
        b"vault",
        b"falco",
        b"auditd",
        b"session-recorder",
    ];
    if !line.starts_with(b"{\"details\":") || line.last() != Some(&b'}') {
        return None;
    }
    static PREV_FINDER: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(PREV));
    let p = PREV_FINDER.rfind(line)?;
    // Forward from prev_hash.
    let mut at = p + PREV.len();
    let prev: [u8; 64] = line.get(at..at + 64)?.try_into().ok()?;
    at += 64;
    let expect = |at: &mut usize, lit: &[u8]| -> Option<()> {
        (line.get(*at..*at + lit.len())? == lit).then(|| *at += lit.len())
    };
    let string = |at: &mut usize| -> Option<&[u8]> {
        let len = memchr::memchr(b'"', line.get(*at..)?)?;
        let v = &line[*at..*at + len];
        *at += len + 1;
        Some(v)
    };
    expect(&mut at, b"\",\"sandbox_id\":\"")?;
    string(&mut at)?;
    expect(&mut at, b",\"seq\":")?;
    let n = line.get(at..)?.iter().position(|b| !b.is_ascii_digit())?;
    let seq: u64 = std::str::from_utf8(&line[at..at + n]).ok()?.parse().ok()?;
    at += n;
    expect(&mut at, b",\"severity\":\"")?;
    if !matches!(
        string(&mut at)?,
        b"info" | b"warning" | b"high" | b"critical"
    ) {
        return None;
    }
    expect(&mut at, b",\"source\":\"")?;
    let src = string(&mut at)?;
    if !SOURCES.contains(&src) {
        return None;
    }
    // Backward from prev_hash: the hash, then the type.
    let hs = p.checked_sub(HASH.len() + 64 + 1)?;
    if &line[hs..hs + HASH.len()] != HASH || line[hs + HASH.len() + 64] != b'"' {
        return None;
    }
    let hash: [u8; 64] = line[hs + HASH.len()..hs + HASH.len() + 64]
        .try_into()
        .ok()?;
    let t_end = hs.checked_sub(1)?;
    if line[t_end] != b'"' {
        return None;
    }
    let t_start = memchr::memrchr(b'"', &line[..t_end])? + 1;
    if line.get(t_start.checked_sub(TYPE.len())?..t_start)? != TYPE {
        return None;
    }
    let t = std::str::from_utf8(&line[t_start..t_end]).ok()?;
    crate::EventType::ALL.iter().find(|e| e.as_str() == t)?;
    let mut h = sha2::Sha256::new();
    h.update(crate::log::HASH_DOMAIN);
    h.update(&line[..hs]);
    h.update(&line[hs + HASH.len() + 65..]);
    // Comparing hex to hex also refuses a hash that is not lowercase hex.
    (hex_lower(&h.finalize()) == hash).then_some(Checked {
        seq,
        hash,
        prev: Some(prev),
    })
}

/// Parses and hashes one line.
fn check_one(line: &[u8]) -> Result<Checked, String> {
    if let Some(c) = check_fast(line) {
        return Ok(c);
    }
    let event: Lite<'_> =
        serde_json::from_slice(line).map_err(|e| format!("not a valid event: {e}"))?;
    check_line(line, &event).map_err(str::to_string)?;
    let hash: [u8; 64] = event
        .hash
        .as_bytes()
        .try_into()
        .map_err(|_| "content does not match its hash (modified)".to_string())?;
    Ok(Checked {
        seq: event.seq,
        hash,
        prev: event.prev_hash.as_bytes().try_into().ok(),
    })
}

/// [`check_one`] for every line, in order, spread over `threads`.
fn check_lines(lines: &[&[u8]], threads: usize) -> Vec<Result<Checked, String>> {
    if threads <= 1 || lines.len() < 4096 {
        return lines.iter().map(|l| check_one(l)).collect();
    }
    let per = lines.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = lines
            .chunks(per)
            .map(|part| s.spawn(move || part.iter().map(|l| check_one(l)).collect::<Vec<_>>()))
            .collect();
        let mut out = Vec::with_capacity(lines.len());
        for h in parts {
            match h.join() {
                Ok(mut v) => out.append(&mut v),
                Err(_) => out.push(Err("verification thread failed".to_string())),
            }
        }
        out
    })
}

/// What verification reads of a line: the chain fields, the enums (so
/// that a line with an unknown type or severity is refused), and the
/// details left unparsed. Strings are borrowed: verification allocates
/// nothing per line.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Lite<'a> {
    #[serde(borrow)]
    details: &'a serde_json::value::RawValue,
    #[allow(dead_code)]
    event_type: crate::EventType,
    hash: &'a str,
    prev_hash: &'a str,
    #[serde(borrow)]
    #[allow(dead_code)]
    sandbox_id: &'a serde_json::value::RawValue,
    seq: u64,
    #[allow(dead_code)]
    severity: crate::Severity,
    #[allow(dead_code)]
    source: crate::Source,
    #[serde(borrow)]
    #[allow(dead_code)]
    timestamp: &'a serde_json::value::RawValue,
    #[serde(borrow)]
    #[allow(dead_code)]
    user_id: &'a serde_json::value::RawValue,
}

/// Checks a line's hash against its bytes. A line is the canonical form of
/// the event with `hash`, whose keys are sorted, so `hash` is the third
/// key after `details` and `event_type`: the hashed form is the line with
/// `,"hash":"<hex>"` taken out. Any other byte change (even one that would
/// parse to the same value) changes what is hashed.
fn check_line(line: &[u8], e: &Lite<'_>) -> Result<(), &'static str> {
    const MODIFIED: &str = "content does not match its hash (modified)";
    let mut want = [0u8; 32];
    hex::decode_to_slice(e.hash, &mut want).map_err(|_| MODIFIED)?;
    if e.hash.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(MODIFIED);
    }
    let details = e.details.get().as_bytes();
    let after = (details.as_ptr() as usize)
        .checked_sub(line.as_ptr() as usize)
        .map(|o| o + details.len())
        .filter(|o| *o <= line.len())
        .ok_or(MODIFIED)?;
    const KEY: &[u8] = b",\"hash\":\"";
    let at = line[after..]
        .windows(KEY.len())
        .position(|w| w == KEY)
        .map(|p| after + p)
        .ok_or("line is not in canonical form (modified)")?;
    let end = at + KEY.len() + 64;
    if line.get(at + KEY.len()..end) != Some(e.hash.as_bytes()) || line.get(end) != Some(&b'"') {
        return Err("line is not in canonical form (modified)");
    }
    let mut h = sha2::Sha256::new();
    h.update(crate::log::HASH_DOMAIN);
    h.update(&line[..at]);
    h.update(&line[end + 1..]);
    if h.finalize().as_slice() != want {
        return Err(MODIFIED);
    }
    Ok(())
}

/// A checkpoint that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointProblem {
    /// 0-based line in the checkpoint file (none for the anchored
    /// checkpoint kept beside the key).
    pub line: Option<u64>,
    /// The sequence number it claims, if it parsed.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// What the checkpoints of a log say about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointReport {
    /// Checkpoints found.
    pub checked: u64,
    /// The highest sequence number a sound checkpoint covers.
    pub covered_to: Option<u64>,
    /// Checkpoints that do not hold (tampering).
    pub problems: Vec<CheckpointProblem>,
    /// Why signatures could not be checked (no public key), if so.
    pub unsigned_check: Option<String>,
    /// The sealed segments and their manifest.
    pub segments: crate::segments::SegmentReport,
}

/// Verifies the log at `path` (sandbox `sandbox`) and its checkpoints:
/// each must carry a good signature from `trusted` (when given), and the
/// log must hold, at the checkpoint's sequence number, the head it signed.
/// A rewritten history (chain recomputed) differs there; lines cut off
/// after a checkpoint leave the log shorter than it.
///
/// `anchor` is the log's last checkpoint as kept beside the signing key
/// (see [`crate::checkpoint::anchor_path`]): when given, the checkpoint
/// file must still hold it, which catches a deleted or cut-back
/// checkpoint file.
pub fn verify_with_checkpoints(
    path: &Path,
    sandbox: &str,
    trusted: Option<&crate::checkpoint::Trusted>,
    anchor: Option<&crate::checkpoint::Checkpoint>,
) -> Result<(VerifyReport, CheckpointReport), AuditError> {
    let cps = crate::checkpoint::read_checkpoints(&crate::checkpoint::checkpoints_path(path))?;
    let sealed: Vec<u64> = crate::segments::read_manifest(path)?
        .into_iter()
        .filter_map(|e| e.ok().map(|e| e.last_seq))
        .collect();
    let wanted: std::collections::HashSet<u64> = cps
        .iter()
        .filter_map(|c| c.as_ref().ok().map(|c| c.seq))
        .chain(anchor.map(|a| a.seq))
        .chain(sealed)
        .collect();
    let mut heads = std::collections::HashMap::new();
    if !path.exists() && crate::segments::files(path).is_empty() {
        return Err(AuditError::Io {
            path: path.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    // The sealed segments, then the active file, as one chain.
    let file = crate::segments::ChainReader::new(path);
    // The signatures are checked beside the chain.
    let (report, sigs) = std::thread::scope(|s| {
        let sigs = s.spawn(|| {
            cps.iter()
                .map(|cp| match (cp, trusted) {
                    (Ok(cp), Some(t)) => t.check(cp, sandbox),
                    _ => None,
                })
                .collect::<Vec<Option<String>>>()
        });
        let report = verify_reader_with(file, |seq, hash| {
            if wanted.contains(&seq) {
                heads.insert(seq, hash.to_string());
            }
        });
        (report, sigs.join().unwrap_or_default())
    });
    let report = report.map_err(|source| AuditError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let segments = crate::segments::check_with(path, sandbox, trusted, Some(&heads))?;
    let mut out = CheckpointReport {
        checked: cps.len() as u64,
        covered_to: None,
        problems: Vec::new(),
        unsigned_check: trusted
            .is_none()
            .then(|| "no public key to check signatures with".to_string()),
        segments,
    };
    for (i, cp) in cps.iter().enumerate() {
        let line = i as u64;
        let cp = match cp {
            Ok(c) => c,
            Err((_, e)) => {
                out.problems.push(CheckpointProblem {
                    line: Some(line),
                    seq: None,
                    reason: format!("not a checkpoint: {e}"),
                });
                continue;
            }
        };
        let problem = |reason: String| CheckpointProblem {
            line: Some(line),
            seq: Some(cp.seq),
            reason,
        };
        if let Some(why) = sigs.get(i).cloned().flatten() {
            out.problems.push(problem(why));
            continue;
        }
        match heads.get(&cp.seq) {
            Some(h) if *h == cp.head => {
                out.covered_to = Some(out.covered_to.map_or(cp.seq, |c| c.max(cp.seq)));
            }
            Some(_) => out.problems.push(problem(format!(
                "the log's event {} is not the one this checkpoint signed (history rewritten)",
                cp.seq
            ))),
            None if cp.seq >= report.verified && report.broken.is_none() => {
                out.problems.push(problem(format!(
                    "the log ends at event {} but this checkpoint signed event {}: events were cut off (truncated)",
                    report.verified.saturating_sub(1),
                    cp.seq
                )))
            }
            None if cp.seq >= report.verified => out.problems.push(problem(format!(
                "event {} this checkpoint signed is past the break at index {}",
                cp.seq,
                report.broken.as_ref().map_or(0, |b| b.index)
            ))),
            None => out.problems.push(problem(format!("event {} is missing", cp.seq))),
        }
    }
    if let Some(a) = anchor {
        let problem = |reason: String| CheckpointProblem {
            line: None,
            seq: Some(a.seq),
            reason,
        };
        if let Some(why) = trusted.and_then(|t| t.check(a, sandbox)) {
            out.problems
                .push(problem(format!("the anchored checkpoint: {why}")));
        } else if !cps.iter().any(|c| c.as_ref() == Ok(a)) {
            out.problems.push(problem(format!(
                "the last checkpoint (event {}, signed {}), kept beside the signing key, is not in the checkpoint file: checkpoints were deleted",
                a.seq, a.time
            )));
        }
        // (Whether the log still holds the event is checked above for the
        // checkpoint lines; an anchor missing from the file also needs it.)
        if !cps.iter().any(|c| c.as_ref() == Ok(a)) {
            match heads.get(&a.seq) {
                Some(h) if *h == a.head => {}
                Some(_) => out.problems.push(problem(format!(
                    "the log's event {} is not the one the last checkpoint signed (history rewritten)",
                    a.seq
                ))),
                None => out.problems.push(problem(format!(
                    "the log does not reach event {}, which the last checkpoint signed (truncated)",
                    a.seq
                ))),
            }
        }
    }
    Ok((report, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditLog, EventType, Severity, Source};

    fn sample(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let mut log = AuditLog::open(&path, "sb", "u").unwrap();
        for i in 0..n {
            let mut d = serde_json::Map::new();
            d.insert("reason".into(), format!("r{i}").into());
            log.append(EventType::SandboxStop, Source::AiboxCli, Severity::Info, d)
                .unwrap();
        }
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn verify_lines(lines: &[String]) -> VerifyReport {
        let mut text = lines.join("\n");
        text.push('\n');
        verify_reader(text.as_bytes()).unwrap()
    }

    #[test]
    fn intact_log_verifies() {
        let (_d, path) = sample(10);
        let r = verify_file(&path).unwrap();
        assert!(r.is_intact());
        assert_eq!(r.verified, 10);
    }

    #[test]
    fn modified_byte_breaks_that_line() {
        let (_d, path) = sample(10);
        let mut l = lines(&path);
        l[4] = l[4].replace("r4", "r5");
        let r = verify_lines(&l);
        assert_eq!(r.broken.unwrap().index, 4);
    }

    #[test]
    fn whitespace_edit_is_detected() {
        let (_d, path) = sample(5);
        let mut l = lines(&path);
        l[2] = l[2].replacen(':', ": ", 1);
        assert_eq!(verify_lines(&l).broken.unwrap().index, 2);
    }

    #[test]
    fn deleted_line_breaks_at_next() {
        let (_d, path) = sample(10);
        let mut l = lines(&path);
        l.remove(3);
        assert_eq!(verify_lines(&l).broken.unwrap().index, 3);
    }

    #[test]
    fn swapped_lines_break_at_first() {
        let (_d, path) = sample(10);
        let mut l = lines(&path);
        l.swap(6, 7);
        assert_eq!(verify_lines(&l).broken.unwrap().index, 6);
    }

    #[test]
    fn torn_tail_is_reported_as_such() {
        let (_d, path) = sample(3);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"seq\":3,\"time");
        let r = verify_reader(text.as_bytes()).unwrap();
        let b = r.broken.unwrap();
        assert_eq!(b.index, 3);
        assert!(b.torn_tail);
    }

    #[test]
    fn checkpoints_catch_rewrites_truncation_and_forgeries() {
        use crate::checkpoint::{Signer, Trusted, checkpoints_path, public_key_path};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sb.jsonl");
        let key = dir.path().join("k");
        let mut log = AuditLog::open(&path, "sb", "u").unwrap();
        log.set_signer(
            Signer::load_or_create(&key).unwrap(),
            5,
            std::time::Duration::from_secs(3600),
        );
        for i in 0..12 {
            let mut d = serde_json::Map::new();
            d.insert("reason".into(), format!("r{i}").into());
            log.append(EventType::SandboxStop, Source::AiboxCli, Severity::Info, d)
                .unwrap();
        }
        log.checkpoint().unwrap();
        drop(log);
        let trusted = Trusted::load(&public_key_path(&key)).unwrap();
        let (r, c) = verify_with_checkpoints(&path, "sb", Some(&trusted), None).unwrap();
        assert!(r.is_intact() && c.problems.is_empty(), "{c:?}");
        assert_eq!((c.checked, c.covered_to), (3, Some(11)));

        // A rewritten history: every hash recomputed, so the chain holds.
        let original = std::fs::read_to_string(&path).unwrap();
        let mut prev = crate::log::GENESIS.to_string();
        let mut out = String::new();
        for l in original.lines() {
            let mut e: Event = serde_json::from_str(l).unwrap();
            if e.seq == 2 {
                e.details.insert("reason".into(), "rewritten".into());
            }
            e.prev_hash = prev.clone();
            out.push_str(&crate::log::seal(&mut e));
            out.push('\n');
            prev = e.hash.clone();
        }
        std::fs::write(&path, &out).unwrap();
        let (r, c) = verify_with_checkpoints(&path, "sb", Some(&trusted), None).unwrap();
        assert!(r.is_intact());
        assert!(
            c.problems.iter().any(|p| p.reason.contains("rewritten")),
            "{c:?}"
        );

        // Cut off after a checkpoint: whole lines gone, chain intact.
        let kept: String = original.lines().take(8).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, kept).unwrap();
        let (r, c) = verify_with_checkpoints(&path, "sb", Some(&trusted), None).unwrap();
        assert!(r.is_intact());
        assert!(
            c.problems.iter().any(|p| p.reason.contains("truncated")),
            "{c:?}"
        );

        // A forged checkpoint (its head edited) and another log's.
        std::fs::write(&path, &original).unwrap();
        let cps = std::fs::read_to_string(checkpoints_path(&path)).unwrap();
        let forged = cps.replacen("\"seq\":4", "\"seq\":3", 1);
        std::fs::write(checkpoints_path(&path), forged).unwrap();
        let (_, c) = verify_with_checkpoints(&path, "sb", Some(&trusted), None).unwrap();
        assert!(
            c.problems
                .iter()
                .any(|p| p.reason.contains("bad signature")),
            "{c:?}"
        );
        std::fs::write(checkpoints_path(&path), &cps).unwrap();
        let (_, c) = verify_with_checkpoints(&path, "other", Some(&trusted), None).unwrap();
        assert!(!c.problems.is_empty());
        // Another key's checkpoints are not trusted.
        let other = dir.path().join("k2");
        Signer::load_or_create(&other).unwrap();
        let t2 = Trusted::load(&public_key_path(&other)).unwrap();
        let (_, c) = verify_with_checkpoints(&path, "sb", Some(&t2), None).unwrap();
        assert_eq!(c.problems.len(), 3);
    }
}
