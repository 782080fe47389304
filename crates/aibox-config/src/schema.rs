//! The typed configuration: every key, its type and its default.
//!
//! Keys and defaults follow the original AI-Box (`config_version`, `image`,
//! `gvisor.*`, `resources.*`, …) with aibox's additions: `runtime: native`
//! as the default, `resources.pids`/`resources.nofile`, `sandbox.*` and
//! `paths.*`.

use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Schema version of the file.
    pub config_version: u32,
    /// Sandbox backend.
    pub runtime: Runtime,
    /// Container image for the podman/docker backends.
    pub image: String,
    /// Shell started by `aibox shell`.
    pub shell: Shell,
    /// gVisor settings (container backends).
    pub gvisor: Gvisor,
    /// Resource limits of every sandbox.
    pub resources: Resources,
    /// Workspace handling.
    pub workspace: Workspace,
    /// Image registry.
    pub registry: Registry,
    /// Network (proxy, DNS, LLM gateway).
    pub network: Network,
    /// Policy file locations.
    pub policy: Policy,
    /// Credential store.
    pub credentials: Credentials,
    /// Host-side logging of aibox itself.
    pub logging: Logging,
    /// IDE access.
    pub ide: Ide,
    /// Dotfiles sync.
    pub dotfiles: Dotfiles,
    /// Audit settings.
    pub audit: Audit,
    /// Native sandbox settings.
    pub sandbox: Sandbox,
    /// Where aibox keeps its files.
    pub paths: Paths,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            config_version: 1,
            runtime: Runtime::Native,
            image: "localhost/aibox/base:bookworm".into(),
            shell: Shell::Bash,
            gvisor: Gvisor::default(),
            resources: Resources::default(),
            workspace: Workspace::default(),
            registry: Registry::default(),
            network: Network::default(),
            policy: Policy::default(),
            credentials: Credentials::default(),
            logging: Logging::default(),
            ide: Ide::default(),
            dotfiles: Dotfiles::default(),
            audit: Audit::default(),
            sandbox: Sandbox::default(),
            paths: Paths::default(),
        }
    }
}

/// Sandbox backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Embedded namespaces + seccomp + Landlock sandbox (no daemon, no image).
    Native,
    /// Podman CLI.
    Podman,
    /// Docker CLI.
    Docker,
}

impl Runtime {
    /// Name as written in config.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Native => "native",
            Runtime::Podman => "podman",
            Runtime::Docker => "docker",
        }
    }
}

/// Shells `aibox shell` may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shell {
    /// `/bin/bash -l`
    Bash,
    /// `zsh -l`
    Zsh,
    /// PowerShell.
    Pwsh,
}

impl Shell {
    /// Program name.
    pub fn program(self) -> &'static str {
        match self {
            Shell::Bash => "bash",
            Shell::Zsh => "zsh",
            Shell::Pwsh => "pwsh",
        }
    }
}

/// gVisor settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gvisor {
    /// Run container sandboxes under runsc.
    pub enabled: bool,
    /// runsc platform.
    pub platform: GvisorPlatform,
    /// Refuse to start without AppArmor.
    pub require_apparmor: bool,
}

impl Default for Gvisor {
    fn default() -> Self {
        Self {
            enabled: false,
            platform: GvisorPlatform::Systrap,
            require_apparmor: false,
        }
    }
}

/// runsc platforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GvisorPlatform {
    /// seccomp-trap based (newer runsc).
    Systrap,
    /// ptrace based.
    Ptrace,
}

/// Resource limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resources {
    /// CPUs (cgroup; reported as not enforced without a delegated cgroup).
    pub cpus: u32,
    /// Memory, e.g. `8g` (cgroup; same caveat).
    pub memory: String,
    /// Size of each of `/tmp` and `/var/tmp`.
    pub tmp_size: String,
    /// Maximum processes inside (RLIMIT_NPROC in the sandbox's user namespace).
    pub pids: u64,
    /// Maximum open files per process (RLIMIT_NOFILE).
    pub nofile: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Self {
            cpus: 4,
            memory: "8g".into(),
            tmp_size: "2g".into(),
            pids: 4096,
            nofile: 4096,
        }
    }
}

/// Workspace handling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workspace {
    /// Workspace used when `-w` is not given.
    pub default_path: String,
    /// Refuse workspaces on 9p/drvfs/NTFS mounts.
    pub validate_fs: bool,
}

impl Default for Workspace {
    fn default() -> Self {
        Self {
            default_path: ".".into(),
            validate_fs: true,
        }
    }
}

/// Image registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Registry {
    /// Registry base URL.
    pub url: String,
    /// Verify image signatures with cosign.
    pub verify_signatures: bool,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            url: "ghcr.io/krukkeniels/aibox".into(),
            verify_signatures: false,
        }
    }
}

/// Network settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Give the sandbox egress through the aibox proxy and DNS answerer
    /// (default on; with an empty allowlist every destination is refused
    /// with a message naming the rule to add). Off: no egress path at all.
    pub enabled: bool,
    /// In-sandbox proxy address.
    pub proxy_addr: String,
    /// In-sandbox proxy port.
    pub proxy_port: u16,
    /// In-sandbox DNS address.
    pub dns_addr: String,
    /// In-sandbox DNS port.
    pub dns_port: u16,
    /// Destinations the proxy allows (merged with policy): `host`,
    /// `host:port`, `*.domain[:port]`, `ip[:port]`.
    pub allowed_domains: Vec<String>,
    /// Name → address overrides for the proxy's resolver (air-gapped and
    /// internal hosts, tests). They decide where a name goes, not whether
    /// it may: the name still needs a rule, and a private address a rule
    /// naming that address.
    pub resolve: std::collections::BTreeMap<String, String>,
    /// The LLM gateway: HTTPS to these providers' hosts is terminated by
    /// aibox, which adds the real API key (see docs/network.md).
    pub llm_gateway: LlmGateway,
}

/// `network.llm_gateway`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmGateway {
    /// The providers (none: no gateway).
    pub providers: Vec<LlmProvider>,
    /// Model → provider routes, first match wins.
    pub routes: Vec<LlmRoute>,
    /// Requests per minute for the sandbox (0: unlimited).
    pub requests_per_minute: u32,
    /// Prompt + completion tokens per minute (0: unlimited).
    pub tokens_per_minute: u64,
    /// Largest request body, e.g. `10m`.
    pub max_body: String,
}

impl Default for LlmGateway {
    fn default() -> Self {
        Self {
            providers: Vec::new(),
            routes: Vec::new(),
            requests_per_minute: 0,
            tokens_per_minute: 0,
            max_body: "10m".into(),
        }
    }
}

/// One LLM provider behind the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmProvider {
    /// Name used in routes and audit events.
    pub name: String,
    /// Host name the sandbox's tools connect to (HTTPS, port 443).
    pub host: String,
    /// `anthropic` (`x-api-key`) or `openai` (`Authorization: Bearer`).
    pub style: LlmStyle,
    /// Host environment variable holding the key, read by `aibox start`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// File holding the key (mode 0600, owned by the invoking user).
    #[serde(default)]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Where requests go (default `https://<host>`).
    #[serde(default)]
    pub upstream: Option<String>,
    /// Extra CA certificates (PEM file) for the upstream.
    #[serde(default)]
    pub upstream_ca: Option<std::path::PathBuf>,
    /// Variables set inside the sandbox to a placeholder (default:
    /// `ANTHROPIC_API_KEY` or `OPENAI_API_KEY` by style).
    #[serde(default)]
    pub placeholder_env: Option<Vec<String>>,
}

/// Key style of an LLM provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmStyle {
    /// `x-api-key: KEY`.
    Anthropic,
    /// `Authorization: Bearer KEY`.
    Openai,
}

/// A model → provider route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmRoute {
    /// Model name, or a prefix ending in `*`.
    pub model: String,
    /// Provider name.
    pub provider: String,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            enabled: true,
            proxy_addr: "127.0.0.1".into(),
            proxy_port: 3128,
            dns_addr: "127.0.0.53".into(),
            dns_port: 53,
            allowed_domains: Vec::new(),
            resolve: Default::default(),
            llm_gateway: LlmGateway::default(),
        }
    }
}

/// Policy file locations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Org baseline.
    pub org_baseline_path: String,
    /// Team tier.
    pub team_policy_path: String,
    /// Project tier, relative to the workspace.
    pub project_policy_path: String,
    /// The original's single decision log. aibox keeps one per sandbox
    /// (`<data>/decisions/<name>.jsonl`); only the default is accepted.
    pub decision_log_path: String,
    /// The original's reload interval; only 0 is accepted (policy changes
    /// apply at the next start).
    pub hot_reload_secs: u32,
    /// Size at which a sandbox's decision log is rotated (e.g. `64m`).
    pub decision_log_max_size: String,
    /// Rotated decision-log files kept per sandbox.
    pub decision_log_keep: u32,
    /// Decisions mirrored to the audit log per second (bursts of ten
    /// times as many; the rest are summarised); 0 mirrors every one.
    pub audit_decisions_per_sec: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            org_baseline_path: "/etc/aibox/org-policy.yaml".into(),
            team_policy_path: String::new(),
            project_policy_path: "aibox/policy.yaml".into(),
            decision_log_path: "/var/log/aibox/decisions.jsonl".into(),
            hot_reload_secs: 0,
            decision_log_max_size: "64m".into(),
            decision_log_keep: 8,
            audit_decisions_per_sec: 200,
        }
    }
}

/// Credential store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Credentials {
    /// `fallback` (keyring or encrypted file) or `vault`.
    pub mode: CredentialMode,
    /// Vault address.
    pub vault_addr: String,
    /// SPIFFE trust domain.
    pub spiffe_trust_domain: String,
    /// SPIFFE workload API socket.
    pub spiffe_socket_path: String,
    /// Whether the encrypted file's key is wrapped by a passphrase, and
    /// where it comes from: `none`, `prompt` (the terminal) or `env`
    /// (`AIBOX_PASSPHRASE`).
    pub passphrase: PassphraseSource,
    /// The encrypted file's key file (default: `credentials.key` beside
    /// the user config file; never in the data directory with the store).
    pub key_path: String,
    /// Extra CA certificates (a PEM file) trusted for the hosts
    /// credentials are bound to, besides the system roots (an internal
    /// git server, tests).
    pub upstream_ca: String,
    /// Remotes (http(s) URLs) sandboxes may push to besides those the
    /// workspace had when aibox first started a sandbox on it.
    pub push_remotes: Vec<String>,
    /// Vault mode: how aibox logs in and which secrets sandboxes get.
    pub vault: VaultSettings,
    /// Where `aibox auth` keeps credentials (fallback mode): `auto` (the
    /// OS keyring when one answers and no encrypted file exists yet, else
    /// the file), `keyring` or `file`.
    pub store: StoreBackend,
}

/// Which local credential store `aibox auth` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The keyring when a Secret Service answers (and no file store
    /// exists), else the encrypted file.
    Auto,
    /// The OS keyring (Secret Service); an error when none answers.
    Keyring,
    /// The encrypted file.
    File,
}

/// How aibox logs in to Vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VaultAuth {
    /// A token from the environment (`token_env`); each sandbox gets a
    /// child token of it.
    Token,
    /// AppRole: `role_id` and the secret id in `secret_id_file`.
    Approle,
    /// JWT (a SPIFFE JWT-SVID) from `jwt_file`, for `role`.
    Jwt,
}

/// Vault settings (`credentials.vault`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultSettings {
    /// `token`, `approle` or `jwt`.
    pub auth: VaultAuth,
    /// Token login: the environment variable holding the token.
    pub token_env: String,
    /// Auth mount for AppRole and JWT (default `approle` / `jwt`).
    pub mount: String,
    /// AppRole role id.
    pub role_id: String,
    /// AppRole: file (0600) holding the secret id.
    pub secret_id_file: String,
    /// JWT: the Vault role.
    pub role: String,
    /// JWT: file holding the token (a SPIFFE JWT-SVID, as spiffe-helper
    /// writes it).
    pub jwt_file: String,
    /// CA certificates (PEM) for Vault's TLS certificate, besides the
    /// system's.
    pub ca_file: String,
    /// Lifetime of a sandbox's child token with token login.
    pub token_ttl: String,
    /// Policies of a sandbox's child token with token login (empty: the
    /// logged-in token's own).
    pub token_policies: Vec<String>,
    /// KV v2 secrets handed to sandboxes (as placeholders, like stored
    /// credentials).
    pub secrets: Vec<VaultSecret>,
}

impl Default for VaultSettings {
    fn default() -> Self {
        Self {
            auth: VaultAuth::Token,
            token_env: "VAULT_TOKEN".into(),
            mount: String::new(),
            role_id: String::new(),
            secret_id_file: String::new(),
            role: String::new(),
            jwt_file: String::new(),
            ca_file: String::new(),
            token_ttl: "8h".into(),
            token_policies: Vec::new(),
            secrets: Vec::new(),
        }
    }
}

/// One KV v2 secret for sandboxes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultSecret {
    /// Its name (`git-token`, `llm-api-key`, `mirror-token`, or your own).
    pub name: String,
    /// The KV v2 mount.
    #[serde(default = "default_kv_mount")]
    pub mount: String,
    /// Path of the secret under the mount.
    pub path: String,
    /// Field of the secret holding the value.
    #[serde(default = "default_kv_field")]
    pub field: String,
    /// The host (or host:port) the value may be sent to.
    pub host: String,
}

fn default_kv_mount() -> String {
    "secret".into()
}

fn default_kv_field() -> String {
    "value".into()
}

impl Default for Credentials {
    fn default() -> Self {
        Self {
            mode: CredentialMode::Fallback,
            vault_addr: String::new(),
            spiffe_trust_domain: String::new(),
            spiffe_socket_path: String::new(),
            passphrase: PassphraseSource::None,
            key_path: String::new(),
            upstream_ca: String::new(),
            push_remotes: Vec::new(),
            vault: VaultSettings::default(),
            store: StoreBackend::Auto,
        }
    }
}

/// Where the credential store's passphrase comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PassphraseSource {
    /// The key is not wrapped.
    None,
    /// Asked on the terminal.
    Prompt,
    /// The `AIBOX_PASSPHRASE` environment variable.
    Env,
}

/// Credential modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialMode {
    /// OS keyring, else encrypted file.
    Fallback,
    /// HashiCorp Vault API.
    Vault,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Logging {
    /// `text` or `json`.
    pub format: LogFormat,
    /// `debug`, `info`, `warn` or `error`.
    pub level: LogLevel,
}

impl Default for Logging {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: LogLevel::Info,
        }
    }
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything.
    Debug,
    /// Normal.
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
}

/// IDE access.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ide {
    /// SSH port for IDE connections.
    pub ssh_port: u16,
}

impl Default for Ide {
    fn default() -> Self {
        Self { ssh_port: 2222 }
    }
}

/// Dotfiles.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dotfiles {
    /// Git repository with dotfiles.
    pub repo: String,
}

/// Audit settings (the original's keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// Ship events to the configured backends (the local hash-chained log is always written).
    pub enabled: bool,
    /// Where sealed segments are also kept: `local` (only the data
    /// directory) or `s3` / `minio` (an S3-compatible bucket, `audit.s3`).
    /// Unset: the original's `storage_backend`.
    pub storage: Option<StorageBackend>,
    /// The bucket sealed segments are archived to when `storage` is `s3`.
    pub s3: aibox_siem::archive::S3Config,
    /// `local`, `minio` or `s3` (the original's key; `storage` wins).
    pub storage_backend: StorageBackend,
    /// Object store endpoint.
    pub storage_endpoint: String,
    /// Object store bucket.
    pub storage_bucket: String,
    /// Aggregated log path (the per-sandbox chains live under the data dir).
    pub log_path: String,
    /// Vector pipeline config.
    pub vector_config_path: String,
    /// Falco integration.
    pub falco_enabled: bool,
    /// Session recording on.
    pub recording_enabled: bool,
    /// `required`, `optional` or `disabled`.
    pub recording_policy: RecordingPolicy,
    /// Notice shown when recording.
    pub recording_notice_text: String,
    /// Retention of tier-1 events.
    pub retention_tier1: String,
    /// Retention of tier-2 events.
    pub retention_tier2: String,
    /// Refuse to roll out without audit.
    pub required_for_rollout: bool,
    /// `standard` or `classified`.
    pub classification_level: Classification,
    /// `full`, `hash` or `metadata_only`.
    pub llm_logging_mode: LlmLoggingMode,
    /// `falco`, `auditd` or `none`.
    pub runtime_backend: RuntimeBackend,
    /// The Ed25519 key that signs audit checkpoints (default:
    /// `audit-signing.key` beside the user config file; never in the data
    /// directory with the logs it vouches for). Its public half is
    /// `<path>.pub`.
    pub signing_key_path: String,
    /// A checkpoint after this many events…
    pub checkpoint_every: u64,
    /// …or this long since the last one (and always at stop).
    pub checkpoint_interval: String,
    /// The detection rules' thresholds: used live by the supervisor and
    /// by every exported rule set (`aibox siem export`).
    pub detection: aibox_audit::detect::Thresholds,
    /// Record reads and writes of workspace files (`file.read`,
    /// `file.write`), thinned to one per path and second.
    pub file_events: bool,
    /// DNS and network events of each kind (query, response, allow,
    /// deny) written per second, with bursts of ten seconds' worth; over
    /// it, one summary a second carrying the counts (detection and
    /// metrics count what it stands for). 0 writes every one.
    pub network_events_per_sec: u32,
    /// Where every event is also sent: syslog (RFC 5424, UDP/TCP/TLS)
    /// and HTTP (JSON batches), from the log itself as a disk buffer.
    pub sinks: Vec<aibox_siem::sink::SinkConfig>,
    /// Terminal session recording: `off`, `optional` (with `aibox shell
    /// --record`) or `required` (every `aibox shell`, with a notice).
    pub recording: RecordingMode,
    /// Seal the log into a segment once it is this large (and always at
    /// stop), e.g. `64m`.
    pub segment_max: String,
    /// Record keystrokes too (they may hold passwords typed at prompts).
    pub recording_input: bool,
    /// The key recordings are encrypted under (default: `recording.key`
    /// beside the user config file; never in the data directory).
    pub recording_key_path: String,
}

impl Audit {
    /// The bucket sealed segments go to, when storage is `s3` or `minio`:
    /// `audit.s3` with the original's keys (`storage_endpoint`,
    /// `storage_bucket`, `retention_tier1`) filling what it leaves empty.
    pub fn archive(&self) -> Option<aibox_siem::archive::S3Config> {
        let backend = self.storage.unwrap_or(self.storage_backend);
        if backend == StorageBackend::Local {
            return None;
        }
        let mut c = self.s3.clone();
        if c.endpoint.is_empty() {
            c.endpoint = if !self.storage_endpoint.is_empty() {
                self.storage_endpoint.clone()
            } else if backend == StorageBackend::S3 {
                format!("https://s3.{}.amazonaws.com", c.region)
            } else {
                // (MinIO has no default address: refused by the check.)
                String::new()
            };
        }
        if c.bucket.is_empty() {
            c.bucket = self.storage_bucket.clone();
        }
        if c.retention.is_empty() {
            c.retention = self.retention_tier1.clone();
        }
        Some(c)
    }

    /// The recording mode in effect: `recording`, or the original's
    /// `recording_policy` / `recording_enabled` when only those are set.
    pub fn recording_mode(&self) -> RecordingMode {
        match (
            self.recording,
            self.recording_policy,
            self.recording_enabled,
        ) {
            (RecordingMode::Off, RecordingPolicy::Required, _) => RecordingMode::Required,
            (RecordingMode::Off, RecordingPolicy::Optional, _) => RecordingMode::Optional,
            (RecordingMode::Off, RecordingPolicy::Disabled, true) => RecordingMode::Optional,
            (m, _, _) => m,
        }
    }
}

/// When terminal sessions are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordingMode {
    /// Never.
    Off,
    /// When asked for (`aibox shell --record`).
    Optional,
    /// Always; `--no-record` is refused and a notice is shown.
    Required,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            enabled: false,
            storage: None,
            s3: aibox_siem::archive::S3Config::default(),
            storage_backend: StorageBackend::Local,
            storage_endpoint: String::new(),
            storage_bucket: "aibox-audit".into(),
            log_path: "/var/log/aibox/audit.jsonl".into(),
            vector_config_path: "/etc/aibox/vector.toml".into(),
            falco_enabled: false,
            recording_enabled: false,
            recording_policy: RecordingPolicy::Disabled,
            recording_notice_text:
                "This session is being recorded for security and compliance purposes.".into(),
            retention_tier1: "730d".into(),
            retention_tier2: "365d".into(),
            required_for_rollout: false,
            classification_level: Classification::Standard,
            llm_logging_mode: LlmLoggingMode::Hash,
            runtime_backend: RuntimeBackend::None,
            signing_key_path: String::new(),
            checkpoint_every: 1000,
            checkpoint_interval: "60s".into(),
            detection: aibox_audit::detect::Thresholds::default(),
            file_events: true,
            network_events_per_sec: 200,
            sinks: Vec::new(),
            recording: RecordingMode::Off,
            recording_input: false,
            segment_max: "64m".into(),
            recording_key_path: String::new(),
        }
    }
}

/// Audit storage backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// Local files.
    Local,
    /// MinIO.
    Minio,
    /// S3.
    S3,
}

/// Recording policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordingPolicy {
    /// Always recorded.
    Required,
    /// Recorded on request.
    Optional,
    /// Never recorded.
    Disabled,
}

/// Classification levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Classification {
    /// Normal.
    Standard,
    /// Classified.
    Classified,
}

/// LLM body logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LlmLoggingMode {
    /// Bodies in full.
    Full,
    /// Body hashes.
    Hash,
    /// Sizes and timings only.
    MetadataOnly,
}

/// Runtime detection backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeBackend {
    /// Falco.
    Falco,
    /// auditd.
    Auditd,
    /// None.
    None,
}

/// Native sandbox settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sandbox {
    /// Directory holding an image root filesystem; empty = bind the host's
    /// system directories read-only.
    pub rootfs: String,
    /// `required`: refuse to start when Landlock is unavailable;
    /// `best_effort`: use it where the kernel has it (a kernel that has it
    /// but fails to enforce it is always an error).
    pub landlock: LandlockMode,
    /// Hold every exec in a native sandbox for the policy's decision
    /// (default). `false` is refused whenever a policy tier exists: the
    /// gate is what enforces its tool rules.
    pub exec_gate: bool,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self {
            rootfs: String::new(),
            landlock: LandlockMode::BestEffort,
            exec_gate: true,
        }
    }
}

/// Landlock requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockMode {
    /// Refuse to start without it.
    Required,
    /// Use it when the kernel has it.
    BestEffort,
}

/// Directories.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    /// Data directory (homes, audit logs, supervisor logs); empty = default
    /// (`/var/lib/aibox` for root, `~/.local/share/aibox` otherwise).
    pub data_dir: String,
    /// Runtime directory (control sockets, state); empty = default
    /// (`/run/aibox` for root, `$XDG_RUNTIME_DIR/aibox` or `/tmp/aibox-<uid>`).
    pub runtime_dir: String,
}
