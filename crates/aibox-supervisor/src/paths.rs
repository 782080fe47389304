//! Where a sandbox's files live.
//!
//! Runtime (`/run/aibox` or `$XDG_RUNTIME_DIR/aibox`): `<name>/control.sock`,
//! `<name>/state.json`, `<name>/root` (mount point of the new root).
//! Data (`/var/lib/aibox` or `~/.local/share/aibox`): `homes/<name>`
//! (mounted at /home/dev), `audit/<name>.jsonl`, `logs/<name>.log`.
//! Neither directory is ever mounted into a sandbox.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

/// Paths of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    /// Sandbox name.
    pub name: String,
    /// `<runtime>/<name>`.
    pub run_dir: PathBuf,
    /// Control socket.
    pub socket: PathBuf,
    /// Lock file `<runtime>/<name>.lock`: its open-file-description lock is
    /// held by the live supervisor (which writes its pid into it) and is the
    /// test of whether the sandbox is running. It lives outside the run
    /// directory and is never deleted, so that two processes can never hold
    /// "the" lock on two different files.
    pub lock: PathBuf,
    /// State file.
    pub state: PathBuf,
    /// Container backends: the host-side idmapped mounts of the workspace
    /// and home (`<runtime>/<name>.mnt/…`). Outside `run_dir` on purpose:
    /// `run_dir` is removed recursively, which must never reach into a
    /// mounted workspace.
    pub mounts: PathBuf,
    /// Container backends: which container belongs to this sandbox,
    /// written before the container is created so a crashed supervisor's
    /// container can always be found and removed.
    pub container_record: PathBuf,
    /// Mount point for the new root.
    pub root: PathBuf,
    /// Persistent home.
    pub home: PathBuf,
    /// Audit log.
    pub audit_log: PathBuf,
    /// Supervisor log.
    pub supervisor_log: PathBuf,
    /// Vault mode: the sandbox's Vault token and leases (0600), kept
    /// while it runs so that a crashed supervisor's are revoked by the
    /// next command that finds it dead.
    pub vault_record: PathBuf,
}

impl SandboxPaths {
    /// Paths of sandbox `name` under the given directories.
    pub fn new(runtime_dir: &Path, data_dir: &Path, name: &str) -> Self {
        let run_dir = runtime_dir.join(name);
        Self {
            name: name.to_string(),
            socket: run_dir.join("control.sock"),
            lock: runtime_dir.join(format!("{name}.lock")),
            mounts: runtime_dir.join(format!("{name}.mnt")),
            container_record: runtime_dir.join(format!("{name}.container.json")),
            vault_record: vault_record(runtime_dir, name),
            state: run_dir.join("state.json"),
            root: run_dir.join("root"),
            run_dir,
            home: data_dir.join("homes").join(name),
            audit_log: audit_log(data_dir, name),
            supervisor_log: data_dir.join("logs").join(format!("{name}.log")),
        }
    }
}

/// Where sandbox `name`'s Vault session is recorded (see
/// [`SandboxPaths::vault_record`]).
pub fn vault_record(runtime_dir: &Path, name: &str) -> PathBuf {
    runtime_dir.join(format!("{name}.vault.json"))
}

/// Audit log of sandbox `name`.
pub fn audit_log(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("audit").join(format!("{name}.jsonl"))
}

/// Where the merged policy of version `version` (`sha256:<hex>`) is kept
/// for `aibox policy explain`: `<name>.policies/<hex>.json` beside the
/// audit log.
pub fn policy_snapshot_for(audit_log: &Path, version: &str) -> PathBuf {
    let hex = version.strip_prefix("sha256:").unwrap_or(version);
    let hex = if hex.is_empty() { "none" } else { hex };
    audit_log
        .with_extension("policies")
        .join(format!("{hex}.json"))
}

/// Creates `dir` (0700) if needed and refuses one that another user owns
/// or others can write: a planted runtime directory in /tmp would let
/// someone else read our control sockets or swap our mount points.
pub fn ensure_private_dir(dir: &Path) -> Result<(), Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("checking {}", dir.display()), e))?;
    let me = aibox_core::euid();
    if !meta.is_dir() || meta.uid() != me {
        return Err(Error::UnsafeDir(format!(
            "{} is not a directory owned by uid {me}\n  fix: remove it, or set paths.runtime_dir / paths.data_dir to a directory you own",
            dir.display()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("restricting {}", dir.display()), e))?;
    }
    Ok(())
}
