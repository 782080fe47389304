//! Chain verification.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::Serialize;

use crate::log::{GENESIS, seal};
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
    let mut reader = BufReader::new(reader);
    let mut expected_prev = GENESIS.to_string();
    let mut expected_seq = 0u64;
    let mut index = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        let complete = buf.last() == Some(&b'\n');
        let line = if complete {
            &buf[..buf.len() - 1]
        } else {
            &buf[..]
        };
        let fail = |reason: String, torn_tail: bool| VerifyReport {
            verified: index,
            head: expected_prev.clone(),
            broken: Some(Break {
                index,
                reason,
                torn_tail,
            }),
        };
        if !complete {
            // Only the final line can lack a newline.
            let parses = serde_json::from_slice::<Event>(line).is_ok();
            let reason = if parses {
                "final line has no newline".to_string()
            } else {
                "final line is incomplete (interrupted write)".to_string()
            };
            return Ok(fail(reason, true));
        }
        let event: Event = match serde_json::from_slice(line) {
            Ok(e) => e,
            Err(e) => return Ok(fail(format!("not a valid event: {e}"), false)),
        };
        let mut check = event.clone();
        let canon = seal(&mut check);
        if check.hash != event.hash {
            return Ok(fail(
                "content does not match its hash (modified)".into(),
                false,
            ));
        }
        if canon.as_bytes() != line {
            return Ok(fail(
                "line is not in canonical form (modified)".into(),
                false,
            ));
        }
        if event.prev_hash != expected_prev {
            return Ok(fail(
                "prev_hash does not match the previous event (line deleted, inserted or reordered)"
                    .into(),
                false,
            ));
        }
        if event.seq != expected_seq {
            return Ok(fail(
                format!("seq {} where {} was expected", event.seq, expected_seq),
                false,
            ));
        }
        expected_prev = event.hash;
        expected_seq += 1;
        index += 1;
    }
    Ok(VerifyReport {
        verified: index,
        head: expected_prev,
        broken: None,
    })
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
}
