//! Terminal session recordings.
//!
//! A recording is an asciicast v2 document (what standard players read)
//! written as it happens, encrypted. The file starts with one plaintext
//! JSON header line naming the recording and carrying its session key,
//! itself encrypted (AES-256-GCM) under the recording key — a 32-byte key
//! kept on the host, outside the data directory and every sandbox. Then
//! come chunks, `u32 length (big endian) || AES-256-GCM ciphertext`, each
//! holding whole asciicast lines. Chunk *i* uses the nonce
//! `prefix (7 bytes) || i (u32 BE) || last (1 byte)` and the header line
//! as associated data, so chunks cannot be reordered, moved between
//! recordings or dropped from the middle unnoticed; only the final chunk
//! has `last = 1`, so a recording cut short (a crash) is told apart from a
//! complete one. A wrong key and a flipped byte are both errors, never
//! garbage.

#![warn(missing_docs)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The format tag in the header line.
pub const FORMAT: &str = "aibox-recording-v1";

/// File name suffix of recordings.
pub const SUFFIX: &str = ".cast.enc";

/// Plaintext held before a chunk is written.
const CHUNK: usize = 16 << 10;

/// Longest time output waits in memory before its chunk is written.
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Errors of recordings.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The recording key file cannot be used.
    #[error("recording key {path}: {reason}")]
    Key {
        /// The key file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The key given is not the one the recording was made with.
    #[error("{path}: {reason}")]
    WrongKey {
        /// The recording.
        path: String,
        /// What did not match.
        reason: String,
    },
    /// The file was altered or damaged.
    #[error("{path}: {reason} (the recording was altered or damaged)")]
    Corrupt {
        /// The recording.
        path: String,
        /// Where and what.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordingError + '_ {
    move |source| RecordingError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn random<const N: usize>() -> Result<[u8; N], RecordingError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| RecordingError::Key {
        path: String::new(),
        reason: format!("no randomness: {e}"),
    })?;
    Ok(b)
}

/// The recording key: 32 bytes (hex in a 0600 file).
pub struct RecordingKey {
    key: Zeroizing<[u8; 32]>,
    id: String,
}

impl std::fmt::Debug for RecordingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordingKey({})", self.id)
    }
}

impl RecordingKey {
    fn from_bytes(key: Zeroizing<[u8; 32]>) -> RecordingKey {
        use aes_gcm::aead::generic_array::GenericArray;
        // The id: a digest-like tag that reveals nothing of the key (an
        // encryption of zeros under it).
        let c = Aes256Gcm::new(GenericArray::from_slice(key.as_slice()));
        let tag = c
            .encrypt(
                Nonce::from_slice(&[0u8; 12]),
                b"aibox-recording-key-id".as_slice(),
            )
            .unwrap_or_default();
        RecordingKey {
            id: hex::encode(&tag[..8.min(tag.len())]),
            key,
        }
    }

    /// Reads the key at `path` (it must be 0600 and 64 hex digits).
    pub fn load(path: &Path) -> Result<RecordingKey, RecordingError> {
        let bad = |reason: String| RecordingError::Key {
            path: path.display().to_string(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(io(path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad("readable by others; chmod 600 it".into()));
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io(path))?);
        let raw =
            Zeroizing::new(hex::decode(text.trim()).map_err(|_| bad("not a hex key".into()))?);
        let mut key = Zeroizing::new([0u8; 32]);
        if raw.len() != 32 {
            return Err(bad("not a 32-byte key".into()));
        }
        key.copy_from_slice(&raw);
        Ok(Self::from_bytes(key))
    }

    /// [`RecordingKey::load`], creating the key first if there is none.
    pub fn load_or_create(path: &Path) -> Result<RecordingKey, RecordingError> {
        if !path.exists() {
            let key = Zeroizing::new(random::<32>()?);
            let text = Zeroizing::new(hex::encode(key.as_slice()));
            match aibox_core::create_private_file(path, text.as_bytes()) {
                // Another start made it a moment ago: that key it is.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                r => r.map_err(io(path))?,
            }
        }
        Self::load(path)
    }

    /// A short id of the key (safe to show and store).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.key.as_slice()))
    }
}

/// The plaintext header line of a recording file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// [`FORMAT`].
    pub format: String,
    /// The recording's id (also its file name).
    pub id: String,
    /// The sandbox.
    pub sandbox: String,
    /// The host user who ran the session.
    pub user: String,
    /// The command recorded.
    pub argv: Vec<String>,
    /// Start time (RFC 3339).
    pub started: String,
    /// Whether keystrokes were recorded too.
    pub input: bool,
    /// The recording key's id.
    pub key_id: String,
    /// Nonce (hex) of the wrapped session key.
    pub key_nonce: String,
    /// The session key encrypted under the recording key (hex).
    pub wrapped_key: String,
    /// Nonce prefix (hex, 7 bytes) of the chunks.
    pub chunk_prefix: String,
}

fn chunk_nonce(prefix: &[u8; 7], i: u32, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&i.to_be_bytes());
    n[11] = u8::from(last);
    n
}

fn wrap_aad(id: &str) -> Vec<u8> {
    format!("aibox-recording-key-v1\n{id}").into_bytes()
}

/// What a session is, for its recording.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The sandbox.
    pub sandbox: String,
    /// The host user.
    pub user: String,
    /// The command.
    pub argv: Vec<String>,
    /// Terminal size (columns, rows).
    pub size: (u16, u16),
    /// Record keystrokes too.
    pub input: bool,
    /// `TERM` and `SHELL` for the asciicast header.
    pub env: Vec<(String, String)>,
}

/// A recording being written.
pub struct Recorder {
    path: PathBuf,
    file: File,
    cipher: Aes256Gcm,
    prefix: [u8; 7],
    counter: u32,
    aad: Vec<u8>,
    buf: String,
    /// Output bytes that end inside a UTF-8 character.
    pending_out: Vec<u8>,
    pending_in: Vec<u8>,
    start: Instant,
    last_flush: Instant,
    input: bool,
    /// The first write error, reported at [`Recorder::finish`].
    failed: Option<std::io::Error>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recorder({})", self.path.display())
    }
}

/// A fresh recording id: `<sandbox>-<YYYYMMDD-HHMMSS>-<8 hex>`.
pub fn new_id(sandbox: &str) -> Result<String, RecordingError> {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let stamp: String = now
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect::<String>()
        .replace('T', "-");
    Ok(format!("{sandbox}-{stamp}-{}", hex::encode(random::<4>()?)))
}

impl Recorder {
    /// Starts a recording in `dir` (0700), encrypted under `key`.
    pub fn create(dir: &Path, key: &RecordingKey, meta: &Meta) -> Result<Recorder, RecordingError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let id = new_id(&meta.sandbox)?;
        let dek = Zeroizing::new(random::<32>()?);
        let key_nonce = random::<12>()?;
        let wrapped = key
            .cipher()
            .encrypt(
                Nonce::from_slice(&key_nonce),
                Payload {
                    msg: dek.as_slice(),
                    aad: &wrap_aad(&id),
                },
            )
            .map_err(|_| RecordingError::Key {
                path: String::new(),
                reason: "wrapping the session key failed".into(),
            })?;
        let prefix = random::<7>()?;
        let header = Header {
            format: FORMAT.into(),
            id: id.clone(),
            sandbox: meta.sandbox.clone(),
            user: meta.user.clone(),
            argv: meta.argv.clone(),
            started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            input: meta.input,
            key_id: key.id().to_string(),
            key_nonce: hex::encode(key_nonce),
            wrapped_key: hex::encode(wrapped),
            chunk_prefix: hex::encode(prefix),
        };
        let mut line = serde_json::to_string(&header).map_err(|e| RecordingError::Key {
            path: String::new(),
            reason: e.to_string(),
        })?;
        line.push('\n');
        let path = dir.join(format!("{id}{SUFFIX}"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io(&path))?;
        file.write_all(line.as_bytes()).map_err(io(&path))?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let env: serde_json::Map<String, serde_json::Value> = meta
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        let cast_header = serde_json::json!({
            "version": 2, "width": meta.size.0, "height": meta.size.1, "timestamp": now,
            "env": env, "title": format!("aibox {} ({})", meta.argv.join(" "), meta.sandbox),
        });
        let mut r = Recorder {
            path,
            file,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(dek.as_slice())),
            prefix,
            counter: 0,
            aad: line.into_bytes(),
            buf: format!("{cast_header}\n"),
            pending_out: Vec::new(),
            pending_in: Vec::new(),
            start: Instant::now(),
            last_flush: Instant::now(),
            input: meta.input,
            failed: None,
        };
        // The header chunk goes out at once: even a session killed at
        // once leaves a readable (if incomplete) recording.
        r.flush(false);
        Ok(r)
    }

    /// The recording's id.
    pub fn id(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(SUFFIX).to_string())
            .unwrap_or_default()
    }

    /// The recording's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn event(&mut self, code: &str, data: &str) {
        let t = self.start.elapsed().as_secs_f64();
        let data = serde_json::to_string(data).unwrap_or_else(|_| "\"\"".into());
        self.buf
            .push_str(&format!("[{t:.6}, \"{code}\", {data}]\n"));
        if self.buf.len() >= CHUNK || self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush(false);
        }
    }

    /// Takes the valid UTF-8 of `pending + data`, keeping an incomplete
    /// final character for the next call.
    fn text(pending: &mut Vec<u8>, data: &[u8]) -> String {
        pending.extend_from_slice(data);
        let valid = match std::str::from_utf8(pending) {
            Ok(_) => pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => pending.len(),
        };
        let out = String::from_utf8_lossy(&pending[..valid]).into_owned();
        pending.drain(..valid);
        out
    }

    /// Terminal output.
    pub fn output(&mut self, data: &[u8]) {
        let mut p = std::mem::take(&mut self.pending_out);
        let s = Self::text(&mut p, data);
        self.pending_out = p;
        if !s.is_empty() {
            self.event("o", &s);
        }
    }

    /// Keystrokes (kept only when the recording asked for input).
    pub fn input(&mut self, data: &[u8]) {
        if !self.input {
            return;
        }
        let mut p = std::mem::take(&mut self.pending_in);
        let s = Self::text(&mut p, data);
        self.pending_in = p;
        if !s.is_empty() {
            self.event("i", &s);
        }
    }

    /// A terminal resize.
    pub fn resize(&mut self, cols: u16, rows: u16) {
        self.event("r", &format!("{cols}x{rows}"));
    }

    /// The first write error, if the recording could not be written fully.
    pub fn failed(&self) -> Option<&std::io::Error> {
        self.failed.as_ref()
    }

    /// Writes what waited longer than a moment (called on a timer, so
    /// output followed by silence is on disk, not only in memory).
    pub fn tick(&mut self) {
        if !self.buf.is_empty() && self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush(false);
        }
    }

    fn flush(&mut self, last: bool) {
        if self.buf.is_empty() && !last {
            return;
        }
        if self.counter == u32::MAX {
            // No chunk number is ever used twice (it is part of the nonce).
            if self.failed.is_none() {
                self.failed = Some(std::io::Error::other(
                    "the recording reached its largest number of chunks",
                ));
            }
            self.buf.clear();
            return;
        }
        let nonce = chunk_nonce(&self.prefix, self.counter, last);
        let plain = std::mem::take(&mut self.buf);
        let sealed = self.cipher.encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plain.as_bytes(),
                aad: &self.aad,
            },
        );
        let r = match sealed {
            Ok(ct) => {
                let mut out = (ct.len() as u32).to_be_bytes().to_vec();
                out.extend_from_slice(&ct);
                self.file.write_all(&out)
            }
            Err(_) => Err(std::io::Error::other("encryption failed")),
        };
        if let Err(e) = r
            && self.failed.is_none()
        {
            self.failed = Some(e);
        }
        self.counter += 1;
        self.last_flush = Instant::now();
    }

    /// Writes the final chunk and syncs; an earlier write error is
    /// returned here.
    pub fn finish(mut self) -> Result<PathBuf, RecordingError> {
        let rest = std::mem::take(&mut self.pending_out);
        if !rest.is_empty() {
            let s = String::from_utf8_lossy(&rest).into_owned();
            self.event("o", &s);
        }
        self.flush(true);
        if let Some(e) = self.failed.take() {
            return Err(io(&self.path)(e));
        }
        self.file.sync_all().map_err(io(&self.path))?;
        Ok(self.path.clone())
    }
}

/// A decrypted recording.
#[derive(Debug, Clone)]
pub struct Opened {
    /// Its header.
    pub header: Header,
    /// The asciicast v2 text.
    pub cast: String,
    /// Whether the final chunk was found (false: the session was cut
    /// short, e.g. the client was killed).
    pub complete: bool,
}

/// Reads just the header of the recording at `path`.
pub fn read_header(path: &Path) -> Result<Header, RecordingError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut buf = vec![0u8; 8192];
    let n = f.read(&mut buf).map_err(io(path))?;
    let end = buf[..n]
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| RecordingError::Corrupt {
            path: path.display().to_string(),
            reason: "no header line".into(),
        })?;
    serde_json::from_slice(&buf[..end]).map_err(|e| RecordingError::Corrupt {
        path: path.display().to_string(),
        reason: format!("bad header: {e}"),
    })
}

/// Decrypts the recording at `path` with `key`, in memory.
pub fn open(path: &Path, key: &RecordingKey) -> Result<Opened, RecordingError> {
    let data = std::fs::read(path).map_err(io(path))?;
    let shown = path.display().to_string();
    let corrupt = |reason: String| RecordingError::Corrupt {
        path: shown.clone(),
        reason,
    };
    let end = data
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("no header line".into()))?;
    let aad = &data[..=end];
    let header: Header =
        serde_json::from_slice(&data[..end]).map_err(|e| corrupt(format!("bad header: {e}")))?;
    if header.format != FORMAT {
        return Err(corrupt(format!("unknown format {:?}", header.format)));
    }
    if header.key_id != key.id() {
        return Err(RecordingError::WrongKey {
            path: shown.clone(),
            reason: format!(
                "recorded under key {}, not this key ({})",
                header.key_id,
                key.id()
            ),
        });
    }
    let hexed = |s: &str, what: &str| hex::decode(s).map_err(|_| corrupt(format!("bad {what}")));
    let key_nonce = hexed(&header.key_nonce, "key nonce")?;
    let wrapped = hexed(&header.wrapped_key, "wrapped key")?;
    let prefix: [u8; 7] = hexed(&header.chunk_prefix, "chunk prefix")?
        .try_into()
        .map_err(|_| corrupt("bad chunk prefix".into()))?;
    if key_nonce.len() != 12 {
        return Err(corrupt("bad key nonce".into()));
    }
    let dek = Zeroizing::new(
        key.cipher()
            .decrypt(
                Nonce::from_slice(&key_nonce),
                Payload {
                    msg: &wrapped,
                    aad: &wrap_aad(&header.id),
                },
            )
            .map_err(|_| RecordingError::WrongKey {
                path: shown.clone(),
                reason: "the session key does not open with this recording key (a wrong key, or an altered header)".into(),
            })?,
    );
    if dek.len() != 32 {
        return Err(corrupt("bad session key".into()));
    }
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&dek));
    let mut cast = Vec::new();
    let mut at = end + 1;
    let mut i: u32 = 0;
    let mut complete = false;
    while at < data.len() {
        if complete {
            return Err(corrupt(format!("data after the final chunk at byte {at}")));
        }
        if data.len() - at < 4 {
            // A length cut by a crash: incomplete, not altered.
            break;
        }
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        if data.len() - at - 4 < len {
            break;
        }
        let ct = &data[at + 4..at + 4 + len];
        let try_open = |last: bool| {
            cipher.decrypt(
                Nonce::from_slice(&chunk_nonce(&prefix, i, last)),
                Payload { msg: ct, aad },
            )
        };
        let plain = match try_open(false) {
            Ok(p) => p,
            Err(_) => match try_open(true) {
                Ok(p) => {
                    complete = true;
                    p
                }
                Err(_) => {
                    return Err(corrupt(format!(
                        "chunk {i} at byte {at} does not authenticate"
                    )));
                }
            },
        };
        cast.extend_from_slice(&plain);
        at += 4 + len;
        i = i.wrapping_add(1);
    }
    let cast = String::from_utf8(cast).map_err(|_| corrupt("not UTF-8 text".into()))?;
    Ok(Opened {
        header,
        cast,
        complete,
    })
}

/// One asciicast event.
#[derive(Debug, Clone, PartialEq)]
pub struct CastEvent {
    /// Seconds since the start.
    pub time: f64,
    /// `o`, `i` or `r`.
    pub code: String,
    /// The data.
    pub data: String,
}

/// The events of an asciicast v2 text (its header line skipped).
pub fn events(cast: &str) -> Vec<CastEvent> {
    cast.lines()
        .skip(1)
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(CastEvent {
                time: v.get(0)?.as_f64()?,
                code: v.get(1)?.as_str()?.to_string(),
                data: v.get(2)?.as_str()?.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(input: bool) -> Meta {
        Meta {
            sandbox: "sb".into(),
            user: "u".into(),
            argv: vec!["bash".into(), "-l".into()],
            size: (80, 24),
            input,
            env: vec![("TERM".into(), "xterm".into())],
        }
    }

    #[test]
    fn starts_racing_to_create_the_key_share_it() {
        for _ in 0..20 {
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("recording.key");
            let ids: Vec<String> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| RecordingKey::load_or_create(&path).map(|k| k.id)))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
            });
            assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
        }
    }

    #[test]
    fn round_trip_wrong_key_flipped_byte_and_cut_short() {
        let d = tempfile::tempdir().unwrap();
        let key = RecordingKey::load_or_create(&d.path().join("k")).unwrap();
        let mut r = Recorder::create(&d.path().join("rec"), &key, &meta(true)).unwrap();
        r.input(b"ls\r");
        // A character split across two reads stays whole.
        r.output("h\u{e9}".as_bytes().split_at(2).0);
        r.output(&"h\u{e9}".as_bytes()[2..]);
        r.resize(100, 30);
        let path = r.finish().unwrap();
        let o = open(&path, &key).unwrap();
        assert!(o.complete);
        let ev = events(&o.cast);
        let codes: Vec<(&str, &str)> = ev
            .iter()
            .map(|e| (e.code.as_str(), e.data.as_str()))
            .collect();
        assert_eq!(
            codes,
            vec![("i", "ls\r"), ("o", "h"), ("o", "\u{e9}"), ("r", "100x30")]
        );
        let hdr: serde_json::Value = serde_json::from_str(o.cast.lines().next().unwrap()).unwrap();
        assert_eq!(
            (hdr["version"].as_u64(), hdr["width"].as_u64()),
            (Some(2), Some(80))
        );

        let other = RecordingKey::load_or_create(&d.path().join("k2")).unwrap();
        assert!(matches!(
            open(&path, &other),
            Err(RecordingError::WrongKey { .. })
        ));

        let bytes = std::fs::read(&path).unwrap();
        let body = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
        for at in [body + 6, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 1;
            std::fs::write(&path, &b).unwrap();
            assert!(
                matches!(open(&path, &key), Err(RecordingError::Corrupt { .. })),
                "{at}"
            );
        }
        // A header edit (the user, say) breaks every chunk's binding.
        let text = String::from_utf8_lossy(&bytes).replacen("\"user\":\"u\"", "\"user\":\"x\"", 1);
        let mut b = text.as_bytes()[..body].to_vec();
        b.extend_from_slice(&bytes[body..]);
        std::fs::write(&path, &b).unwrap();
        assert!(open(&path, &key).is_err());
        // Cut short: readable, not complete; the final chunk dropped is
        // seen the same way.
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let o = open(&path, &key).unwrap();
        assert!(!o.complete);
    }

    #[test]
    fn input_is_left_out_unless_asked() {
        let d = tempfile::tempdir().unwrap();
        let key = RecordingKey::load_or_create(&d.path().join("k")).unwrap();
        let mut r = Recorder::create(d.path(), &key, &meta(false)).unwrap();
        r.input(b"secret\r");
        r.output(b"ok");
        let o = open(&r.finish().unwrap(), &key).unwrap();
        assert!(!o.cast.contains("secret"));
        assert!(o.cast.contains("\"ok\""));
    }
}
