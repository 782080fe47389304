//! The control protocol between the CLI and a supervisor (seqpacket JSON,
//! see `aibox_sandbox::ipc`), the spec handed to a new supervisor, and the
//! state file it keeps.

use std::path::PathBuf;

use aibox_sandbox::selftest::Check;
use aibox_sandbox::{SandboxSpec, WinSize};
use serde::{Deserialize, Serialize};

/// CLI → supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Run a command (stdin/stdout/stderr attached unless `tty`).
    Exec(ExecRequest),
    /// Forward a signal to the running command of this connection.
    Signal(i32),
    /// Describe the sandbox.
    Status,
    /// Stop the sandbox.
    Stop,
    /// Replace a credential's value while the sandbox runs (the
    /// placeholder inside stays the same).
    Rotate {
        /// The credential's name.
        name: String,
        /// The host(s) it is bound to now.
        hosts: Vec<String>,
        /// Its new value.
        value: aibox_net::gateway::Secret,
        /// When substitution of the new value ends (Unix ms), if ever.
        expires_at_ms: Option<u64>,
    },
    /// Append an event to the sandbox's audit log (the CLI acting on the
    /// sandbox's behalf, e.g. a push approved from the host): the
    /// supervisor owns the log's chain while it runs.
    Record {
        /// Event type.
        event: aibox_audit::EventType,
        /// Severity.
        severity: aibox_audit::Severity,
        /// Details.
        details: serde_json::Value,
    },
}

/// A command to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment (`KEY=VALUE`) on top of the sandbox defaults.
    pub env: Vec<String>,
    /// Working directory inside the sandbox (absolute); `None` for the
    /// directory matching `host_cwd`, else `/workspace`.
    pub cwd: Option<String>,
    /// The caller's host working directory; used for the default working
    /// directory when it lies inside the workspace.
    pub host_cwd: Option<PathBuf>,
    /// Allocate a terminal of this size.
    pub tty: Option<WinSize>,
    /// The recording of this session, if it is recorded (logged with
    /// `session.start`).
    #[serde(default)]
    pub recording: Option<String>,
}

/// Supervisor → CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// The command runs (terminal master attached in tty mode).
    Started {
        /// pid inside the sandbox.
        pid: i32,
    },
    /// The command ended.
    Exited {
        /// Exit code, or 128 + signal.
        code: i32,
    },
    /// The request failed.
    Error {
        /// Message for the user.
        message: String,
        /// Exit code the CLI should use.
        code: i32,
    },
    /// Answer to `Status`.
    Status(Box<Status>),
    /// The sandbox is gone.
    Stopped,
    /// The request was carried out.
    Done,
}

/// What a new supervisor needs; sent on its stdin as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisorSpec {
    /// The sandbox.
    pub sandbox: SandboxSpec,
    /// Host user name.
    pub user: String,
    /// Runtime name.
    pub runtime: String,
    /// Why this runtime (e.g. "config file …" or "--runtime").
    pub runtime_reason: String,
    /// Runtime directory of this sandbox.
    pub run_dir: PathBuf,
    /// Control socket path.
    pub socket: PathBuf,
    /// State file path.
    pub state: PathBuf,
    /// Inherited descriptor holding the sandbox's lock (see `SandboxPaths::lock`).
    pub lock_fd: i32,
    /// Audit log path.
    pub audit_log: PathBuf,
    /// Checkpoint signing: the key file, events and seconds between
    /// checkpoints.
    #[serde(default)]
    pub audit_signing: Option<(PathBuf, u64, u64)>,
    /// Detection thresholds, when the rules run live (`audit.detection`).
    #[serde(default)]
    pub detection: Option<aibox_audit::detect::Thresholds>,
    /// Record `file.read`/`file.write` for the workspace (`audit.file_events`).
    #[serde(default)]
    pub file_events: bool,
    /// Seal the audit log into a segment past this many bytes (0: only at
    /// stop).
    #[serde(default)]
    pub segment_max: u64,
    /// Terminal sessions must name their recording (`audit.recording:
    /// required`).
    #[serde(default)]
    pub recording_required: bool,
    /// Where the audit log is shipped (`audit.sinks`).
    #[serde(default)]
    pub sinks: Vec<aibox_siem::sink::SinkConfig>,
    /// The bucket sealed segments are archived to (`audit.storage: s3`).
    #[serde(default)]
    pub archive: Option<aibox_siem::archive::S3Config>,
    /// The bucket's keys when they come from the credential store
    /// (`audit.s3.credential`), read by the CLI.
    #[serde(default)]
    pub archive_keys: Option<aibox_siem::archive::S3Keys>,
    /// SHA-256 of the effective config.
    pub config_sha256: String,
    /// Shell program for `aibox shell`.
    pub shell: String,
    /// Configured cpus (reported, see `limits`).
    pub cpus: u32,
    /// Configured memory (reported, see `limits`).
    pub memory: String,
    /// The same in bytes.
    pub memory_bytes: u64,
    /// Set for the podman/docker backends.
    #[serde(default)]
    pub container: Option<ContainerSpec>,
    /// Egress policy; None = the sandbox has no egress path at all.
    #[serde(default)]
    pub network: Option<NetworkSpec>,
    /// `sha256:…` of the merged policy the start was checked against
    /// (empty: no policy files).
    #[serde(default)]
    pub policy_version: String,
    /// The merged policy the exec gate decides with (native backend).
    #[serde(default)]
    pub policy: Option<aibox_policy::Merged>,
    /// Bounds of the decision log and its audit mirror.
    #[serde(default)]
    pub decisions: crate::decisions::Limits,
}

/// What the supervisor's proxy enforces.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Allowlist entries (validated by the CLI).
    pub allowed: Vec<String>,
    /// Static resolution, name → address.
    pub hosts: std::collections::BTreeMap<String, String>,
    /// In-sandbox proxy port.
    pub proxy_port: u16,
    /// In-sandbox DNS address.
    pub dns_addr: std::net::Ipv4Addr,
    /// The LLM gateway (with the real keys: this spec travels over the
    /// supervisor's stdin only and is never written down).
    #[serde(default)]
    pub gateway: Option<aibox_net::gateway::GatewaySpec>,
    /// Variables set inside the sandbox to a placeholder instead of a key.
    #[serde(default)]
    pub placeholders: Vec<String>,
    /// Host environment variables the keys were read from: removed from
    /// the supervisor's environment (the keys reach it over stdin only),
    /// so that neither it nor the engines it runs carry them.
    #[serde(default)]
    pub key_env: Vec<String>,
    /// The credential injector's credentials, with their real values
    /// (like the gateway's keys: over stdin only, never written down).
    #[serde(default)]
    pub credentials: Option<aibox_net::inject::InjectSpec>,
    /// Every credential handed to the sandbox and how it appears inside.
    #[serde(default)]
    pub issued: Vec<IssuedCredential>,
    /// git push review: the workspace's remotes and what `git push` may do.
    #[serde(default)]
    pub push: Option<PushSpec>,
    /// Vault mode: the sandbox's Vault token and leases, revoked at stop.
    #[serde(default)]
    pub vault: Option<aibox_vault::Session>,
    /// DNS and network events of each kind written per second (bursts of
    /// ten seconds' worth); over it, one summary a second with the counts
    /// (`audit.network_events_per_sec`; 0: every one).
    #[serde(default = "default_net_events_per_sec")]
    pub audit_per_sec: u32,
}

fn default_net_events_per_sec() -> u32 {
    200
}

/// What `git push` may do from the sandbox (the policy's class of
/// `git push`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PushMode {
    /// `safe`: pushes to the workspace's remotes go straight out.
    Direct,
    /// `review-required`: pushes are queued until a human approves them.
    Review,
    /// `blocked-by-default`: no push leaves.
    Blocked,
}

/// git push rules of a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushSpec {
    /// The sandbox's name (recorded with each queued push).
    pub sandbox: String,
    /// The workspace's remote URLs at start (HTTP(S) ones; others cannot
    /// be pushed to through the proxy).
    pub remotes: Vec<String>,
    /// What a push may do.
    pub mode: PushMode,
    /// The review queue directory (`<data>/pushes`).
    pub queue: PathBuf,
    /// CA bundle for the host-side git (`credentials.upstream_ca`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// A credential as the sandbox sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedCredential {
    /// Its name in the store.
    pub name: String,
    /// Its type.
    pub kind: String,
    /// Where the proxy puts its value (empty when exposed).
    pub hosts: Vec<String>,
    /// Variables set to `value` inside.
    pub env: Vec<String>,
    /// The placeholder, or (exposed) the real value.
    pub value: aibox_net::gateway::Secret,
    /// Whether the sandbox holds the real value (policy `credentials.expose`).
    pub exposed: bool,
    /// When substitution ends (RFC 3339), if it does.
    pub expires: Option<String>,
}

/// Egress state shown by `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetworkStatus {
    /// `enforced`, or why there is no egress.
    pub state: String,
    /// In-sandbox proxy address (`HTTP_PROXY`).
    pub proxy: String,
    /// In-sandbox DNS answerer.
    pub dns: String,
    /// Allowlist entries.
    pub allowed: Vec<String>,
    /// Connections and requests allowed so far.
    pub allow_count: u64,
    /// Connections and requests denied so far.
    pub deny_count: u64,
    /// DNS queries answered with an address.
    pub dns_resolved: u64,
    /// DNS queries refused.
    pub dns_refused: u64,
    /// Hosts the LLM gateway answers for.
    #[serde(default)]
    pub llm_gateway: Vec<String>,
    /// Credentials handed to the sandbox: `name (type) → hosts`.
    #[serde(default)]
    pub credentials: Vec<String>,
}

/// How to run a sandbox as a podman/docker container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// `podman` or `docker`.
    pub engine: String,
    /// Container name (`aibox-<user>-<8 hex>`).
    pub container_name: String,
    /// Image reference.
    pub image: String,
    /// Run under gVisor.
    pub gvisor: Option<GvisorSpec>,
    /// The aibox binary, bind-mounted read-only as the container's init.
    pub aibox_binary: PathBuf,
    /// Host-side mount directory (see `SandboxPaths::mounts`).
    pub mounts_dir: PathBuf,
    /// Record file (see `SandboxPaths::container_record`).
    pub record: PathBuf,
    /// Tool packs directory mounted read-only at `/opt/toolpacks`.
    pub toolpacks: PathBuf,
    /// Runtime directory (a label, so containers of different aibox
    /// installations never get confused).
    pub runtime_dir: PathBuf,
    /// AppArmor profile to apply, when the host has AppArmor.
    pub apparmor: Option<String>,
    /// What happened about AppArmor (for `status`).
    pub apparmor_note: String,
    /// One-shot sandbox (`aibox run`): the container starts with the first
    /// command, in one engine call, and ends with it.
    #[serde(default)]
    pub run_mode: bool,
}

/// gVisor settings of a container sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GvisorSpec {
    /// Path of `runsc`.
    pub runsc: PathBuf,
    /// Platform actually used.
    pub platform: String,
    /// Why this platform (e.g. a fallback).
    pub note: String,
    /// `runsc exec` takes `--tty` (needed for terminal sessions).
    #[serde(default)]
    pub exec_tty: bool,
}

/// The container of a container-backed sandbox, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerStatus {
    /// `podman` or `docker`.
    pub engine: String,
    /// Container name.
    pub name: String,
    /// Container id.
    pub id: String,
    /// OCI runtime (`runc`, `runsc (platform ptrace)`).
    pub oci_runtime: String,
    /// Image reference.
    pub image: String,
    /// AppArmor state.
    pub apparmor: String,
}

/// One resource limit and whether it is enforced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limit {
    /// `pids`, `nofile`, `tmp_size`, `cpus`, `memory`.
    pub name: String,
    /// Configured value.
    pub value: String,
    /// True when the kernel enforces it.
    pub enforced: bool,
    /// How (or why not).
    pub how: String,
}

/// State of a running sandbox (also written to `state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Name.
    pub name: String,
    /// `running`.
    pub state: String,
    /// Backend.
    pub runtime: String,
    /// Why this backend.
    pub runtime_reason: String,
    /// Host workspace.
    pub workspace: PathBuf,
    /// Supervisor pid.
    pub supervisor_pid: u32,
    /// Host pid of the sandbox init.
    pub init_pid: i32,
    /// RFC 3339 start time.
    pub started_at: String,
    /// Milliseconds from supervisor start to ready.
    pub start_ms: u64,
    /// Started without root.
    pub rootless: bool,
    /// Host uid the guest runs as.
    pub guest_host_uid: u32,
    /// Running exec/shell sessions.
    pub sessions: usize,
    /// Resource limits.
    pub limits: Vec<Limit>,
    /// Landlock ABI and state.
    pub landlock: String,
    /// Seccomp summary.
    pub seccomp: String,
    /// Whether every exec is decided by the policy, and if not why.
    #[serde(default)]
    pub exec_gate: String,
    /// Self-test results.
    pub selftest: Vec<Check>,
    /// Audit log path.
    pub audit_log: PathBuf,
    /// The container, for the podman/docker backends.
    #[serde(default)]
    pub container: Option<ContainerStatus>,
    /// Egress (None: no egress path).
    #[serde(default)]
    pub network: Option<NetworkStatus>,
}
