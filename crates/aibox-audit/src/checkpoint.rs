//! Signed checkpoints: every so often, and when a sandbox stops, the
//! supervisor signs (Ed25519) the log's sequence number and chain head at
//! that point and appends the signature to `<log>.checkpoints`. A chain
//! can be recomputed by anyone who rewrites the log; a checkpoint cannot
//! be, without the signing key, which lives outside the sandbox and
//! outside the data directory. `verify` then finds a rewritten history
//! (the head at a checkpoint differs), lines cut off after a checkpoint
//! (the log ends before it), and forged checkpoints (bad signature).

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::AuditError;
use crate::log::canonical_json;

/// One checkpoint line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The log's sandbox.
    pub sandbox: String,
    /// Sequence number of the last event covered.
    pub seq: u64,
    /// That event's hash (the chain head then).
    pub head: String,
    /// When it was signed (RFC 3339).
    pub time: String,
    /// First 16 hex digits of SHA-256 of the public key.
    pub key_id: String,
    /// Ed25519 signature (hex) over [`Checkpoint::message`].
    pub signature: String,
}

impl Checkpoint {
    /// What is signed: a domain tag and the canonical JSON of everything
    /// but the signature.
    pub fn message(&self) -> Vec<u8> {
        let v = serde_json::json!({
            "sandbox": self.sandbox, "seq": self.seq, "head": self.head,
            "time": self.time, "key_id": self.key_id,
        });
        let mut m = b"aibox-checkpoint-v1\n".to_vec();
        m.extend_from_slice(canonical_json(&v).as_bytes());
        m
    }
}

/// Where the last checkpoint of the log at `log` is kept beside the
/// signing key `key`: `<key>.anchors/<32 hex of SHA-256 of the log's
/// path>.json`. It is out of the data directory (like the key), so
/// deleting or cutting back a log's checkpoint file is seen: the anchor
/// still names a checkpoint the file must hold.
pub fn anchor_path(key: &Path, log: &Path) -> PathBuf {
    let mut dir = key.as_os_str().to_owned();
    dir.push(".anchors");
    // The directory resolved (links, `..`), so a log reached through
    // another path to the same directory has the same anchor.
    let log = match (log.parent().map(std::fs::canonicalize), log.file_name()) {
        (Some(Ok(dir)), Some(name)) => dir.join(name),
        _ => std::path::absolute(log).unwrap_or_else(|_| log.to_path_buf()),
    };
    let id = hex::encode(Sha256::digest(log.as_os_str().as_encoded_bytes()));
    PathBuf::from(dir).join(format!("{}.json", &id[..32]))
}

/// The anchored (last) checkpoint of the log at `log`, if any.
pub fn read_anchor(key: &Path, log: &Path) -> Result<Option<Checkpoint>, AuditError> {
    let p = anchor_path(key, log);
    match std::fs::read_to_string(&p) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| AuditError::Key {
                path: p.display().to_string(),
                reason: format!("not a checkpoint anchor: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&p)(e)),
    }
}

/// Replaces the anchor of the log at `log` with `cp` (atomically).
pub fn write_anchor(key: &Path, log: &Path, cp: &Checkpoint) -> Result<(), AuditError> {
    let p = anchor_path(key, log);
    let dir = p.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let text = serde_json::to_string(cp).map_err(|e| AuditError::Key {
        path: p.display().to_string(),
        reason: e.to_string(),
    })?;
    aibox_core::replace_private_file(&p, text.as_bytes()).map_err(io(&p))
}

/// The checkpoint file of the log at `log`.
pub fn checkpoints_path(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".checkpoints");
    PathBuf::from(s)
}

fn key_id(v: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(v.as_bytes()))[..16].to_string()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The signing key (Ed25519): `path` holds the 32-byte secret in hex
/// (0600); `path.pub` the public key in hex, for verifiers.
pub struct Signer {
    key: SigningKey,
    key_id: String,
    path: PathBuf,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// Where the public half of the key at `path` is kept.
pub fn public_key_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

impl Signer {
    /// Loads the key at `path`, creating it (and its public half) if it
    /// does not exist. The file must be 0600. Starts racing to create it
    /// end up with the same key.
    pub fn load_or_create(path: &Path) -> Result<Signer, AuditError> {
        let bad = |reason: String| AuditError::Key {
            path: path.display().to_string(),
            reason,
        };
        // Twice at most: a start beside this one may create the key first.
        let mut tries = 0;
        let key = loop {
            tries += 1;
            break match std::fs::read_to_string(path) {
                Ok(text) => {
                    let meta = std::fs::metadata(path).map_err(io(path))?;
                    if meta.permissions().mode() & 0o077 != 0 {
                        return Err(bad("readable by others; chmod 600 it".into()));
                    }
                    let raw = hex::decode(text.trim()).map_err(|_| bad("not a hex key".into()))?;
                    let seed: [u8; 32] = raw
                        .as_slice()
                        .try_into()
                        .map_err(|_| bad("not a 32-byte key".into()))?;
                    SigningKey::from_bytes(&seed)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
                    getrandom::getrandom(seed.as_mut_slice())
                        .map_err(|e| bad(format!("no randomness: {e}")))?;
                    let text = zeroize::Zeroizing::new(hex::encode(seed.as_slice()));
                    match aibox_core::create_private_file(path, text.as_bytes()) {
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 2 => {
                            continue;
                        }
                        r => r.map_err(io(path))?,
                    }
                    SigningKey::from_bytes(&seed)
                }
                Err(e) => return Err(io(path)(e)),
            };
        };
        let public = public_key_path(path);
        let want = hex::encode(key.verifying_key().as_bytes());
        match std::fs::read_to_string(&public) {
            Ok(have) if have.trim() == want => {}
            // Never silently: a changed public key is what someone who
            // wants their own signatures trusted would leave behind.
            Ok(_) => {
                return Err(bad(format!(
                    "its public half {} belongs to another key; remove that file to have it written again",
                    public.display()
                )));
            }
            Err(_) => {
                // Written whole (beside it, then renamed): a start beside
                // this one reads it at the same moment.
                aibox_core::replace_file(&public, want.as_bytes(), 0o644).map_err(io(&public))?;
            }
        }
        let key_id = key_id(&key.verifying_key());
        Ok(Signer {
            key,
            key_id,
            path: path.to_path_buf(),
        })
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs `message`: (key id, signature in hex).
    pub fn sign_bytes(&self, message: &[u8]) -> (String, String) {
        (
            self.key_id.clone(),
            hex::encode(self.key.sign(message).to_bytes()),
        )
    }

    /// Signs the head `head` at `seq` of sandbox `sandbox`'s log and
    /// appends the checkpoint to `file`.
    pub fn checkpoint(
        &self,
        file: &Path,
        sandbox: &str,
        seq: u64,
        head: &str,
    ) -> Result<Checkpoint, AuditError> {
        let mut cp = Checkpoint {
            sandbox: sandbox.to_string(),
            seq,
            head: head.to_string(),
            time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            key_id: self.key_id.clone(),
            signature: String::new(),
        };
        cp.signature = hex::encode(self.key.sign(&cp.message()).to_bytes());
        let line = serde_json::to_string(&cp).map_err(|e| AuditError::Key {
            path: file.display().to_string(),
            reason: e.to_string(),
        })?;
        crate::segments::append_line(file, &line)?;
        Ok(cp)
    }
}

/// The public key of the signing key at `path`, when that is readable
/// (the verifier then needs no separate public key file).
pub fn trusted_from_secret(path: &Path) -> Option<Trusted> {
    let text = std::fs::read_to_string(path).ok()?;
    let raw = hex::decode(text.trim()).ok()?;
    let seed: [u8; 32] = raw.as_slice().try_into().ok()?;
    let key = SigningKey::from_bytes(&seed).verifying_key();
    Some(Trusted {
        key_id: key_id(&key),
        key,
    })
}

/// A public key to check checkpoints with.
#[derive(Debug, Clone)]
pub struct Trusted {
    key: VerifyingKey,
    key_id: String,
}

impl Trusted {
    /// The key's id (first 16 hex of SHA-256 of the public key).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Reads a public key file (hex).
    pub fn load(path: &Path) -> Result<Trusted, AuditError> {
        let bad = |reason: String| AuditError::Key {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let raw = hex::decode(text.trim()).map_err(|_| bad("not a hex key".into()))?;
        let bytes: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| bad("not a 32-byte key".into()))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        Ok(Trusted {
            key_id: key_id(&key),
            key,
        })
    }

    /// Why `signature` (hex, by key `key_id`) over `message` does not
    /// hold, if it does not.
    pub fn check_bytes(&self, key_id: &str, signature: &str, message: &[u8]) -> Option<String> {
        if key_id != self.key_id {
            return Some(format!(
                "signed by key {key_id} where {} was expected",
                self.key_id
            ));
        }
        let Some(sig) = hex::decode(signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .map(|b| ed25519_dalek::Signature::from_bytes(&b))
        else {
            return Some("malformed signature".into());
        };
        self.key
            .verify(message, &sig)
            .is_err()
            .then(|| "bad signature (forged or altered)".into())
    }

    /// Why `cp` is not a genuine checkpoint of sandbox `sandbox`, if it
    /// is not.
    pub fn check(&self, cp: &Checkpoint, sandbox: &str) -> Option<String> {
        if cp.key_id != self.key_id {
            return Some(format!(
                "signed by key {} where {} was expected",
                cp.key_id, self.key_id
            ));
        }
        let Ok(sig) = hex::decode(&cp.signature)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .map(|b| ed25519_dalek::Signature::from_bytes(&b))
            .ok_or(())
        else {
            return Some("malformed signature".into());
        };
        if self.key.verify(&cp.message(), &sig).is_err() {
            return Some("bad signature (forged or altered checkpoint)".into());
        }
        if cp.sandbox != sandbox {
            return Some(format!(
                "a checkpoint of sandbox {:?}, not {sandbox:?}",
                cp.sandbox
            ));
        }
        None
    }
}

/// A checkpoint line: the checkpoint, or (line number, why it is not one).
pub type CheckpointLine = Result<Checkpoint, (u64, String)>;

/// Reads a checkpoint file; a line that does not parse is reported as
/// `Err((line number, reason))` in its place.
pub fn read_checkpoints(path: &Path) -> Result<Vec<CheckpointLine>, AuditError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| (i as u64, e.to_string())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_racing_to_create_the_key_share_it() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("cfg/audit-signing.key");
            let ids: Vec<String> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| Signer::load_or_create(&path).map(|k| k.key_id)))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
            });
            assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
            let again = Signer::load_or_create(&path).unwrap();
            assert_eq!(again.key_id, ids[0]);
            // Nothing left beside them.
            let names: Vec<String> = std::fs::read_dir(dir.path().join("cfg"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");
        }
    }
}
