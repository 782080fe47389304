//! Command-line definitions (clap). No behaviour here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Hardened sandboxes for AI coding agents.
#[derive(Debug, Parser)]
#[command(name = "aibox", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file (default ~/.config/aibox/config.yaml).
    #[arg(long, global = true, env = "AIBOX_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// For programs.
    Json,
}

/// Backends selectable on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeArg {
    /// Embedded namespaces sandbox.
    Native,
    /// Podman.
    Podman,
    /// Docker.
    Docker,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a sandbox around a workspace.
    Start(StartArgs),
    /// Run a command in a running sandbox.
    Exec(ExecArgs),
    /// Open an interactive shell in a running sandbox.
    Shell(ShellArgs),
    /// Show a sandbox's state, limits and self-test.
    Status(StatusArgs),
    /// List sandboxes.
    List(FormatArg),
    /// Stop a sandbox (every process in it ends).
    Stop(NameArg),
    /// Start a sandbox, run one command in it, stop it; exits with the command's code.
    Run(RunArgs),
    /// Read and change the configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Check that this host can run aibox sandboxes.
    Doctor(DoctorArgs),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Recorded terminal sessions: list, play, export.
    #[command(subcommand)]
    Recording(RecordingCmd),
    /// Prometheus metrics computed from the audit logs.
    #[command(subcommand)]
    Metrics(MetricsCmd),
    /// Write SIEM artefacts: Prometheus alert rules, Grafana dashboards,
    /// Falco rules and a Vector pipeline, from `audit.detection`.
    #[command(subcommand)]
    Siem(SiemCmd),
    /// Check a running sandbox's network from inside.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Policy tiers: validate, show the merged policy, dry-run a command.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Credentials kept on the host (sandboxes never get them as such).
    #[command(subcommand)]
    Auth(AuthCmd),
    /// git pushes from sandboxes waiting for review: list, show, approve, cancel.
    #[command(subcommand)]
    Push(PushCmd),
    /// Build and list sandbox images (for the podman and docker backends).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Rebuild (local) or pull (registry) the configured image; prints old and new ids.
    Update {
        /// Engine (default: config `runtime` when it is an engine, else podman).
        #[arg(long, value_enum)]
        engine: Option<EngineArg>,
    },
    /// Repair aibox's own state.
    #[command(subcommand)]
    Repair(RepairCmd),
    /// Internal: the per-sandbox supervisor (started by `aibox start`).
    #[command(name = "__supervise", hide = true)]
    Supervise {
        /// Sandbox name (lets `stop` find a supervisor whose runtime directory vanished).
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCmd {
    /// Store a credential. The value is read from a hidden prompt, or
    /// from standard input when it is not a terminal; never from the
    /// command line.
    Add(AuthAddArgs),
    /// List stored credentials: name, type, host, source, created,
    /// expires (never their values).
    List(FormatArg),
    /// Remove a stored credential.
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PushCmd {
    /// List queued pushes: id, sandbox, status, commits, age, remote, refs.
    Status {
        /// Also pushes already approved, failed or cancelled.
        #[arg(long)]
        all: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Show a queued push: its updates, commits and diffstat (computed on
    /// the host from the pushed objects).
    Show {
        /// Push id (from `aibox push status`).
        id: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Push it from the host with the stored git token, leased on the
    /// remote refs the review saw; records who approved.
    Approve {
        /// Push id.
        id: String,
    },
    /// Drop it; nothing is pushed.
    Cancel {
        /// Push id.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct AuthAddArgs {
    /// `git-token`, `llm-api-key`, `mirror-token`, or a name of your own
    /// (which needs --host).
    pub name: String,
    /// The host the credential may be sent to, e.g. github.com.
    #[arg(long)]
    pub host: Option<String>,
    /// Stop handing it out after this long (e.g. 30d, 12h).
    #[arg(long, value_name = "DURATION")]
    pub expires_in: Option<String>,
    /// Replace a stored credential of the same name.
    #[arg(long)]
    pub replace: bool,
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// Sandbox name (default: the only running sandbox, or the one for the current directory).
    #[arg(long, short = 'n')]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Record this session (when audit.recording is optional).
    #[arg(long, conflicts_with = "no_record")]
    pub record: bool,
    /// Do not record this session (refused when recording is required).
    #[arg(long)]
    pub no_record: bool,
}

#[derive(Debug, Subcommand)]
pub enum RecordingCmd {
    /// List recordings (id, sandbox, start, size, command).
    List {
        /// Only this sandbox's recordings.
        #[arg(long, short = 'n')]
        name: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Play a recording in this terminal, decrypted in memory.
    Play {
        /// The recording's id.
        id: String,
        /// Playback speed (2 = twice as fast).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Start at this many seconds in (what came before is shown at once).
        #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
        from: f64,
        /// Cap pauses at this many seconds.
        #[arg(long, value_name = "SECONDS")]
        max_idle: Option<f64>,
    },
    /// Write a recording as a plain asciicast v2 `.cast` file.
    Export {
        /// The recording's id.
        id: String,
        /// Decrypt (required: the result holds everything the session showed).
        #[arg(long)]
        decrypt: bool,
        /// Write here (0600) instead of standard output.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct FormatArg {
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// Which policy files to use (default: the config's `policy.*` paths;
/// the project tier is `<workspace>/<policy.project_policy_path>`).
#[derive(Debug, Args, Clone, Default)]
pub struct TierArgs {
    /// Org tier file.
    #[arg(long, value_name = "FILE")]
    pub org: Option<PathBuf>,
    /// Team tier file.
    #[arg(long, value_name = "FILE")]
    pub team: Option<PathBuf>,
    /// Project tier file.
    #[arg(long, value_name = "FILE")]
    pub project: Option<PathBuf>,
    /// Workspace whose project tier to use (default: the current directory).
    #[arg(long, short = 'w', value_name = "PATH")]
    pub workspace: Option<PathBuf>,
}

/// YAML or JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DocFormat {
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Check the tiers and their merge. Exit 0: valid; 1: a schema error
    /// or a loosening; 2: a file cannot be read.
    Validate {
        #[command(flatten)]
        tiers: TierArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Print the merged policy, with its version and tiers.
    Show {
        #[command(flatten)]
        tiers: TierArgs,
        /// The merged policy (the only view so far).
        #[arg(long)]
        merged: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "yaml")]
        format: DocFormat,
    },
    /// Run the Rego unit tests (`test_` rules) of the org baseline and of
    /// every tier's modules. Exit 1 on any failure.
    Test {
        #[command(flatten)]
        tiers: TierArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Explain a logged decision of the exec gate: the inputs, the tier
    /// and rule that decided, the policy version, whether deciding again
    /// under that policy gives the same answer, and on a denial how to ask
    /// for an exception. Exit 1 when it does not reproduce.
    Explain {
        #[command(flatten)]
        name: NameArg,
        /// Entry number (the `--log-entry N` a denial prints).
        #[arg(long, value_name = "N")]
        log_entry: u64,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Dry-run the decision for a command (nothing runs).
    Check {
        #[command(flatten)]
        tiers: TierArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// From inside the sandbox: an allowed host is reachable through the
    /// proxy; a denied host, a raw IP, DNS for a denied name, DNS to a
    /// public resolver, UDP and ICMP go nowhere. Exits 1 if any check fails.
    Test {
        #[command(flatten)]
        name: NameArg,
        /// The allowed host to reach (default: the first single-host rule).
        #[arg(long, value_name = "HOST[:PORT]")]
        host: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Workspace directory (mounted read-write at /workspace).
    #[arg(long, short = 'w', value_name = "PATH")]
    pub workspace: Option<PathBuf>,
    /// Sandbox name (default aibox-<user>-<hash of the workspace path>).
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// Backend (default from config: native).
    #[arg(long, value_enum)]
    pub runtime: Option<RuntimeArg>,
}

#[derive(Debug, Args)]
pub struct ExecOpts {
    /// Allocate a terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Extra environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the sandbox (default: the current directory's place in /workspace).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub name: NameArg,
    #[command(flatten)]
    pub opts: ExecOpts,
    /// Command and arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub start: StartArgs,
    #[command(flatten)]
    pub opts: ExecOpts,
    /// Command and arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective value of a key.
    Get {
        /// Dotted key, e.g. resources.cpus.
        key: String,
    },
    /// Set a key in the user config file (lists comma-separated).
    Set {
        /// Dotted key.
        key: String,
        /// New value.
        value: String,
    },
    /// Check the configuration; non-zero exit on any error.
    Validate,
    /// Write a starting config file.
    Init {
        /// Template.
        #[arg(long, value_parser = ["minimal", "dev", "enterprise"], default_value = "minimal")]
        template: String,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Show every key with its effective value and where it came from.
    Show {
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Treat warnings as failures.
    #[arg(long)]
    pub strict: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Verify hash chains: reports intact, or the first broken index.
    Verify {
        /// Only this sandbox's log.
        #[arg(long, short = 'n', conflicts_with_all = ["all", "file"])]
        name: Option<String>,
        /// Every log (the default).
        #[arg(long)]
        all: bool,
        /// A log file at an explicit path.
        #[arg(long, value_name = "PATH", conflicts_with = "all")]
        file: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Do not compare the bucket's copies (`audit.storage: s3`).
        #[arg(long)]
        local: bool,
    },
    /// Print a sandbox's events (the last 20; --follow keeps printing new
    /// ones).
    Tail {
        /// The sandbox (default: the only running one, or the current
        /// directory's).
        #[arg(long, short = 'n')]
        name: Option<String>,
        /// Only events of this type (e.g. network.deny); repeatable.
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// How many past events to show first.
        #[arg(long, default_value_t = 20)]
        lines: usize,
        /// Keep printing events as they are appended.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Send what the configured sinks (`audit.sinks`) have not received
    /// yet — logs of stopped sandboxes, events written after a stop, and
    /// what a collector missed while it was down — and archive the sealed
    /// segments the bucket (`audit.storage: s3`) does not have yet.
    Ship {
        /// Only this sandbox's log (default: every log).
        #[arg(long, short = 'n')]
        name: Option<String>,
    },
    /// Write events for a SIEM: JSON lines as stored, Elastic Common
    /// Schema, or OCSF.
    Export {
        /// Only this sandbox's log (default: every log).
        #[arg(long, short = 'n')]
        name: Option<String>,
        /// `jsonl`, `ecs` or `ocsf`.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Write to this file instead of standard output.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MetricsCmd {
    /// Serve `/metrics` over HTTP for Prometheus to scrape.
    Serve {
        /// Address to listen on (loopback by default: the metrics name
        /// sandboxes and their activity).
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: String,
    },
    /// Print the metrics once (the text a scrape would get).
    Show,
}

#[derive(Debug, Subcommand)]
pub enum SiemCmd {
    /// Write the artefacts into a directory (created if needed; files of
    /// the same names are replaced).
    Export {
        /// The directory.
        #[arg(long, value_name = "DIR")]
        target: PathBuf,
    },
}

/// SIEM export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// The events as stored (canonical JSON lines).
    Jsonl,
    /// Elastic Common Schema.
    Ecs,
    /// Open Cybersecurity Schema Framework.
    Ocsf,
}

/// Container engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// podman.
    Podman,
    /// docker.
    Docker,
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build the base image from Debian packages (mmdebstrap) and import it.
    Build {
        /// Image name (default: config `image`).
        #[arg(long)]
        name: Option<String>,
        /// Debian suite.
        #[arg(long, default_value = "bookworm")]
        suite: String,
        /// Engine to import into (default: config `runtime` when it is an engine, else podman).
        #[arg(long, value_enum)]
        engine: Option<EngineArg>,
    },
    /// List the images aibox built (and the configured one).
    List {
        /// Engine (default as for build).
        #[arg(long, value_enum)]
        engine: Option<EngineArg>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
}

/// `aibox repair …`
#[derive(Debug, Subcommand)]
pub enum RepairCmd {
    /// Remove and recreate the build cache volumes (maven, gradle, npm,
    /// yarn, bazel, nuget); refused while a sandbox container runs. Homes
    /// and tool packs are kept.
    Cache {
        /// Engine (default: config `runtime` when it is an engine, else podman).
        #[arg(long, value_enum)]
        engine: Option<EngineArg>,
    },
}
