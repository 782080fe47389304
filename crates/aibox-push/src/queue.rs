//! The review queue on the host: one JSON record per push under the
//! queue directory (never mounted into a sandbox), next to the host-side
//! repositories that hold the pushed objects.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::PushError;

/// Where a queued push stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Waiting for a reviewer.
    Pending,
    /// Approved and pushed.
    Pushed,
    /// Approved, but the push from the host failed (see `outcome`).
    Failed,
    /// Dropped by a reviewer.
    Cancelled,
}

impl Status {
    /// The name shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Pushed => "pushed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// One ref update of a queued push, as the host verified it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefUpdate {
    /// The remote ref.
    pub dst: String,
    /// What the remote had when the push was queued (`None`: no such ref).
    /// The approved push is leased on it.
    pub old: Option<String>,
    /// What it will point to (`None`: deleted).
    pub new: Option<String>,
    /// Forced (not a fast-forward).
    pub force: bool,
}

/// A commit that the push brings to the remote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Object id.
    pub oid: String,
    /// `Name <email>`.
    pub author: String,
    /// First line of the message.
    pub subject: String,
}

/// A queued push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRequest {
    /// Queue id (8 hex digits).
    pub id: String,
    /// The sandbox it came from.
    pub sandbox: String,
    /// The remote URL, as the workspace configures it.
    pub url: String,
    /// The updates.
    pub updates: Vec<RefUpdate>,
    /// The commits new to the remote (at most [`MAX_LISTED`]).
    pub commits: Vec<Commit>,
    /// How many commits are new to the remote in all.
    pub commits_total: u64,
    /// `git diff --stat` of each update.
    pub diffstat: String,
    /// When it was queued (RFC 3339).
    pub created: String,
    /// Where it stands.
    pub status: Status,
    /// Who approved or cancelled it.
    #[serde(default)]
    pub decided_by: Option<String>,
    /// When.
    #[serde(default)]
    pub decided_at: Option<String>,
    /// git's report of the approved push, or why it failed.
    #[serde(default)]
    pub outcome: Option<String>,
    /// The host-side repository holding the objects.
    pub repo: PathBuf,
    /// Static name resolution for the push (`host:port:address`, as the
    /// sandbox's `network.resolve` had it).
    #[serde(default)]
    pub resolve: Vec<String>,
    /// CA bundle the remote's certificate is checked against
    /// (`credentials.upstream_ca`), if not the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Commits listed per push at most (the total is always given).
pub const MAX_LISTED: usize = 200;

/// The queue directory.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PushError + '_ {
    move |source| PushError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Checks a queue id given on the command line (it names a file).
pub fn check_id(id: &str) -> Result<(), PushError> {
    if id.len() == 8 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(PushError::Refused(format!(
            "{id:?} is not a push id (8 hex digits, as `aibox push status` shows them)"
        )))
    }
}

impl Queue {
    /// The queue at `dir` (`<data>/pushes`).
    pub fn new(dir: &Path) -> Queue {
        Queue {
            dir: dir.to_path_buf(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates the directory (0700).
    pub fn create(&self) -> Result<(), PushError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.dir.join("repos"))
            .map_err(io(&self.dir))
    }

    fn record(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Where an incoming bundle is spooled.
    pub fn spool(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.bundle"))
    }

    /// The host-side repository of the remote `key` (a normalized URL).
    pub fn repo_for(&self, key: &str) -> PathBuf {
        let h = hex::encode(Sha256::digest(key.as_bytes()));
        self.dir.join("repos").join(format!("{}.git", &h[..16]))
    }

    /// A fresh id.
    pub fn new_id(&self) -> Result<String, PushError> {
        for _ in 0..16 {
            let mut b = [0u8; 4];
            getrandom::getrandom(&mut b).map_err(|e| PushError::Io {
                path: "the system's random source".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let id = hex::encode(b);
            if !self.record(&id).exists() && !self.spool(&id).exists() {
                return Ok(id);
            }
        }
        Err(PushError::Refused("no free push id".into()))
    }

    /// Writes `r` (atomically, 0600).
    pub fn save(&self, r: &PushRequest) -> Result<(), PushError> {
        check_id(&r.id)?;
        let path = self.record(&r.id);
        let tmp = self.dir.join(format!(".{}.json.tmp", r.id));
        let body = serde_json::to_vec_pretty(r).map_err(|e| PushError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(&body).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Reads the push `id`.
    pub fn load(&self, id: &str) -> Result<PushRequest, PushError> {
        check_id(id)?;
        let path = self.record(id);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PushError::NotFound(id.to_string()));
            }
            Err(e) => return Err(io(&path)(e)),
        };
        serde_json::from_slice(&text).map_err(|e| PushError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(format!("not a push record: {e}")),
        })
    }

    /// Every push, oldest first.
    pub fn list(&self) -> Result<Vec<PushRequest>, PushError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".json")
                && check_id(id).is_ok()
            {
                out.push(self.load(id)?);
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Holds the push `id` for a decision: two reviewers acting at once
    /// must not both push.
    pub fn lock(&self, id: &str) -> Result<nix::fcntl::Flock<fs::File>, PushError> {
        check_id(id)?;
        let path = self.dir.join(format!("{id}.lock"));
        aibox_core::lock_private_file(&path).map_err(io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_ids_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path());
        q.create().unwrap();
        let id = q.new_id().unwrap();
        let r = PushRequest {
            id: id.clone(),
            sandbox: "sb".into(),
            url: "https://h/r.git".into(),
            updates: vec![],
            commits: vec![],
            commits_total: 0,
            diffstat: String::new(),
            created: "2026-01-01T00:00:00Z".into(),
            status: Status::Pending,
            decided_by: None,
            decided_at: None,
            outcome: None,
            repo: q.repo_for("https://h:443/r"),
            resolve: vec![],
            ca_file: None,
        };
        q.save(&r).unwrap();
        assert_eq!(q.load(&id).unwrap(), r);
        assert_eq!(q.list().unwrap(), vec![r]);
        assert!(matches!(q.load("00000000"), Err(PushError::NotFound(_))));
        for bad in ["../x", "ABCDEF01", "1234567", "12345678/"] {
            assert!(matches!(q.load(bad), Err(PushError::Refused(_))), "{bad}");
        }
        let _l = q.lock(&id).unwrap();
    }
}
