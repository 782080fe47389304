//! The native aibox sandbox: Linux namespaces, a read-only root assembled
//! with bind mounts and `pivot_root`, no capabilities, `no_new_privs`, a
//! seccomp filter compiled from `resources/seccomp/policy.yaml`, Landlock,
//! rlimits, and a small init as PID 1 that starts commands on request.
//!
//! No async runtime here: the sandbox is created by `fork`, which must
//! happen while the calling process is single-threaded.

#![warn(missing_docs)]

pub mod cgroup;
pub mod container;
mod init;
pub mod ipc;
pub mod landlock_rules;
mod launch;
pub mod notify;
mod rootfs;
pub mod seccomp;
pub mod selftest;
pub mod sys;

/// Why `path` cannot be a masked path (`filesystem.deny`), if it cannot:
/// it must be absolute and plain (no `.`, `..`, empty or trailing
/// components), valid for podman's `mask=` list (no `:` or `,`), and
/// outside what the sandbox needs or makes fresh at every start.
pub fn mask_path_problem(path: &str) -> Option<String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Some("must be an absolute path inside the sandbox".into());
    };
    if rest.is_empty() {
        return Some("`/` cannot be denied".into());
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Some("must be a plain path (no `.`, `..`, `//` or trailing `/`)".into());
    }
    if path.contains([':', ',']) || path.chars().any(char::is_control) {
        return Some("must not contain `:`, `,` or control characters".into());
    }
    for (top, why) in [
        (
            "/proc",
            "is the kernel's view of processes, which programs need",
        ),
        ("/sys", "is the kernel's view of devices"),
        ("/dev", "holds the device nodes the sandbox needs"),
        ("/aibox", "holds aibox's own files in the sandbox"),
        (
            "/tmp",
            "starts empty in every sandbox: there is nothing to deny",
        ),
        (
            "/var/tmp",
            "starts empty in every sandbox: there is nothing to deny",
        ),
        (
            "/run",
            "starts empty in every sandbox: there is nothing to deny",
        ),
    ] {
        if path == top || path.starts_with(&format!("{top}/")) {
            return Some(format!("{top} {why}; remove the entry"));
        }
    }
    if path == "/workspace" || path == "/home/dev" || path == "/home" {
        return Some("the sandbox's workspace and home cannot be denied as a whole".into());
    }
    None
}

/// Checks the masked paths that live in host directories (the workspace
/// and the sandbox's home) before a container start: each must exist
/// without a symbolic link on its way and, if a file, have one link.
/// (Inside a native sandbox `rootfs` checks the same; runc skips a
/// missing path silently, which would leave it creatable.)
pub fn check_host_masks(
    masked: &[String],
    workspace: &std::path::Path,
    home: &std::path::Path,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    for p in masked {
        let (base, rel) = if let Some(r) = p.strip_prefix("/workspace/") {
            (workspace, r)
        } else if let Some(r) = p.strip_prefix("/home/dev/") {
            (home, r)
        } else {
            continue;
        };
        let mut at = base.to_path_buf();
        for c in rel.split('/') {
            at.push(c);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "filesystem.deny: {p}: a symbolic link is on its path (it could point elsewhere later); name the link's target instead"
                    ));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!(
                        "filesystem.deny: {p}: does not exist, so it cannot be masked and the sandbox could create it; create it (an empty file or directory will do) or remove the entry"
                    ));
                }
                Err(e) => return Err(format!("filesystem.deny: {p}: {e}")),
            }
        }
        if let Ok(m) = std::fs::metadata(&at)
            && m.is_file()
            && m.nlink() > 1
        {
            return Err(format!(
                "filesystem.deny: {p}: has {} hard links, which would stay readable; remove the other links or deny them too",
                m.nlink()
            ));
        }
    }
    Ok(())
}

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use launch::{Launched, detach_mount, guest_host_uid, idmapped_bind, launch};
pub use selftest::SelfTestReport;

/// Errors of the native sandbox. Messages name the layer and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A system call failed while building the sandbox.
    #[error("{what}: {source}")]
    Sys {
        /// The step that failed.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The syscall policy file is invalid.
    #[error("{0}")]
    Policy(String),
    /// The sandbox started but a layer is not live.
    #[error("sandbox self-test failed: {0}")]
    SelfTest(String),
    /// The sandbox reported a setup error.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
}

impl SandboxError {
    pub(crate) fn sys(what: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        SandboxError::Sys {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// Everything needed to build one native sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Sandbox name (also decides the host uid of the guest under root).
    pub name: String,
    /// Host workspace directory, mounted read-write at `/workspace`.
    pub workspace: PathBuf,
    /// (device, inode) the workspace had when it was validated; the mount
    /// is refused if what got mounted is something else.
    #[serde(default)]
    pub workspace_id: Option<(u64, u64)>,
    /// Host directory mounted read-write at `/home/dev`.
    pub home: PathBuf,
    /// Empty host directory on which the new root is assembled.
    pub root_dir: PathBuf,
    /// Image root filesystem to take system directories from (default: `/`).
    pub rootfs: Option<PathBuf>,
    /// Size of each of `/tmp` and `/var/tmp`, e.g. `2g`.
    pub tmp_size: String,
    /// RLIMIT_NPROC inside.
    pub pids: u64,
    /// RLIMIT_NOFILE inside.
    pub nofile: u64,
    /// Refuse to start when the kernel has no Landlock.
    pub landlock_required: bool,
    /// cgroups the sandbox joins before it is built (cpu/memory/pids limits).
    #[serde(default)]
    pub cgroup: Option<cgroup::Cgroup>,
    /// Egress listeners to create inside the sandbox's network namespace
    /// and hand to the supervisor's proxy; None = no egress at all.
    #[serde(default)]
    pub net: Option<NetListen>,
    /// The aibox binary, mounted read-only at [`container::BINARY`] as in
    /// containers (the in-sandbox side of `aibox network test`).
    #[serde(default)]
    pub aibox_binary: Option<PathBuf>,
    /// A CA certificate (PEM) the sandbox trusts besides the system's: the
    /// LLM gateway's. Added to the system bundle and put at
    /// [`CA_PATH`].
    #[serde(default)]
    pub extra_ca_pem: Option<String>,
    /// Paths inside the workspace (relative, checked by the caller to be
    /// free of symlinks) mounted read-only over themselves: the project
    /// policy tier, which the sandbox must not be able to change for its
    /// next start.
    #[serde(default)]
    pub read_only_in_workspace: Vec<PathBuf>,
    /// Absolute paths inside the sandbox that no process may read or
    /// write (the policy's `filesystem.deny`): masked by an empty,
    /// read-only, mode-000 file or directory mounted over them.
    #[serde(default)]
    pub masked: Vec<String>,
    /// Hold every exec for a decision: init installs a seccomp
    /// user-notification filter and hands its listener to the caller
    /// ([`Launched::gate`]).
    #[serde(default)]
    pub exec_gate: bool,
    /// Program names the policy blocks outright: their files in the
    /// system's program directories get no Landlock execute right.
    #[serde(default)]
    pub exec_blocked: Vec<String>,
    /// Files added to `/etc` (path below /etc, contents) through a
    /// read-only overlay: the agents' managed settings (their hook
    /// configuration), which nothing in the sandbox can change.
    #[serde(default)]
    pub etc_extra: Vec<(String, String)>,
    /// The supervisor's decision socket, mounted at [`GATE_SOCKET`] (the
    /// agents' pre-tool hooks ask it).
    #[serde(default)]
    pub gate_socket: Option<PathBuf>,
}

/// Where the sandbox finds the supervisor's decision socket.
pub const GATE_SOCKET: &str = "/aibox/gate.sock";

/// Where the sandbox finds the LLM gateway's CA certificate alone (for
/// `NODE_EXTRA_CA_CERTS`).
pub const CA_PATH: &str = "/aibox/ca.pem";
/// The system CA bundle (Debian's path), which includes it.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The sockets init opens inside the sandbox's network namespace. The
/// supervisor receives them (in this order: proxy, DNS/UDP, DNS/TCP, then
/// one per transparent port) and serves them from outside, so no process
/// in the sandbox carries the egress path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetListen {
    /// `127.0.0.1:<proxy_port>`: the HTTP proxy (`HTTP_PROXY`).
    pub proxy_port: u16,
    /// Address of the DNS answerer (port 53, UDP and TCP).
    pub dns_addr: std::net::Ipv4Addr,
    /// Ports accepted on every address for transparent connections.
    pub transparent_ports: Vec<u16>,
}

/// Window size of a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A request to start a command inside the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// Session id chosen by the supervisor.
    pub id: u64,
    /// Program and arguments; the program is looked up in the `PATH` of `env`.
    pub argv: Vec<String>,
    /// Complete environment (`KEY=VALUE`).
    pub env: Vec<String>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// Allocate a terminal of this size (its master is sent back) instead
    /// of using the three attached descriptors as stdin/stdout/stderr.
    pub tty: Option<WinSize>,
}

/// Supervisor → init.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToInit {
    /// Start a command (with stdin/stdout/stderr attached unless `tty`).
    Spawn(SpawnRequest),
    /// Send a signal to a session's process group.
    Signal {
        /// Session id.
        id: u64,
        /// Signal number.
        signal: i32,
    },
    /// Kill everything and exit.
    Shutdown,
}

/// Init (or the intermediate process) → supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromInit {
    /// Host pid of the sandbox init.
    InitPid(i32),
    /// Setup finished; the self-test report.
    Ready(SelfTestReport),
    /// Setup failed.
    Failed(String),
    /// Setup reached this step (named in a start timeout's message).
    Stage(String),
    /// A session's process started (terminal master attached when a tty was asked for).
    Spawned {
        /// Session id.
        id: u64,
        /// pid inside the sandbox.
        pid: i32,
    },
    /// A session's process could not be started.
    SpawnFailed {
        /// Session id.
        id: u64,
        /// Why.
        error: String,
        /// Exit code to report (126 not executable, 127 not found).
        code: i32,
    },
    /// A session's process ended (code, or 128 + signal).
    Exited {
        /// Session id.
        id: u64,
        /// Exit code.
        code: i32,
    },
}

/// Fault injection for tests, compiled into debug builds only: the
/// comma-separated layers in `AIBOX_DEBUG_SKIP_LAYER` (`caps`, `seccomp`,
/// `landlock`, `readonly`, `netns`) are not applied, so the tests can prove that the
/// self-test notices a missing layer and that `start` then refuses.
#[cfg(debug_assertions)]
pub fn debug_skip(layer: &str) -> bool {
    std::env::var("AIBOX_DEBUG_SKIP_LAYER").is_ok_and(|v| v.split(',').any(|x| x == layer))
}

/// Release builds have no way to skip a layer.
#[cfg(not(debug_assertions))]
pub fn debug_skip(_layer: &str) -> bool {
    false
}

/// Directories that stay writable inside (also the Landlock write rules).
pub const WRITABLE: &[&str] = &["/workspace", "/home/dev", "/tmp", "/var/tmp", "/dev"];
