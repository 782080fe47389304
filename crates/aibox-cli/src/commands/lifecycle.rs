//! `aibox start | run | exec | shell | status | list | stop`

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use aibox_config::{Loaded, Runtime};
use aibox_sandbox::SandboxSpec;
use aibox_supervisor::SandboxPaths;
use aibox_supervisor::client;
use aibox_supervisor::proto::{
    ContainerSpec, ExecRequest, GvisorSpec, NetworkSpec, Status, SupervisorSpec,
};
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::args::{
    ExecArgs, ExecOpts, Format, FormatArg, NameArg, RunArgs, RuntimeArg, ShellArgs, StartArgs,
    StatusArgs,
};
use crate::workspace;

fn prepare(
    cli_config: Option<PathBuf>,
    a: &StartArgs,
) -> Result<(Loaded, SupervisorSpec, SandboxPaths)> {
    let (loaded, sources) = super::load_config(cli_config)?;
    let c = &loaded.config;
    let (runtime, reason) = match a.runtime {
        Some(RuntimeArg::Native) => (Runtime::Native, "--runtime flag".to_string()),
        Some(RuntimeArg::Podman) => (Runtime::Podman, "--runtime flag".to_string()),
        Some(RuntimeArg::Docker) => (Runtime::Docker, "--runtime flag".to_string()),
        None => (
            c.runtime,
            format!(
                "runtime from {}",
                loaded
                    .origins
                    .get("runtime")
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ),
        ),
    };
    let data_dir = loaded.data_dir();
    let runtime_dir = loaded.runtime_dir();
    let (_, credential_key) = super::auth::store_paths(&loaded, &sources)?;
    let raw_ws = a
        .workspace
        .clone()
        .unwrap_or_else(|| PathBuf::from(&c.workspace.default_path));
    let ws = workspace::validate(
        &raw_ws,
        c.workspace.validate_fs,
        &[
            ("data_dir", data_dir.clone()),
            ("runtime_dir", runtime_dir.clone()),
            // The sandbox must not rewrite the config of its next start,
            // nor the upper policy tiers.
            ("config file", sources.user_file.clone()),
            // Nor read the key of the credential store, nor choose the
            // CA that vouches for the hosts credentials go to.
            ("credential key file", credential_key),
            (
                "credentials.upstream_ca",
                PathBuf::from(&c.credentials.upstream_ca),
            ),
            // Nor the key that signs the audit checkpoints.
            (
                "audit signing key",
                super::audit::signing_key_path(&loaded, &sources)?,
            ),
            // Nor the files aibox logs in to Vault with.
            (
                "credentials.vault.secret_id_file",
                PathBuf::from(&c.credentials.vault.secret_id_file),
            ),
            (
                "credentials.vault.jwt_file",
                PathBuf::from(&c.credentials.vault.jwt_file),
            ),
            (
                "credentials.vault.ca_file",
                PathBuf::from(&c.credentials.vault.ca_file),
            ),
            ("org policy", PathBuf::from(&c.policy.org_baseline_path)),
            ("team policy", PathBuf::from(&c.policy.team_policy_path)),
            (
                "system org policy",
                PathBuf::from(super::policy::SYSTEM_ORG_POLICY),
            ),
        ],
    )?;
    // The project tier's path is checked (no symlinks, one link) before it
    // is read; then the policy tiers, before anything is created: a start
    // they refuse never begins.
    let read_only_in_workspace = project_policy_guard(c, &ws)?;
    let policy = super::policy::at_start(c, runtime, &ws)?;
    let user = aibox_core::current_user();
    let name = match &a.name {
        Some(n) => {
            aibox_core::validate_name(n).map_err(anyhow::Error::msg)?;
            n.clone()
        }
        None => aibox_core::default_sandbox_name(&user, &ws),
    };
    let paths = SandboxPaths::new(&runtime_dir, &data_dir, &name);
    let rootfs = (!c.sandbox.rootfs.is_empty()).then(|| PathBuf::from(&c.sandbox.rootfs));
    let config_json = serde_json::to_vec(&loaded.config)?;
    let container = match runtime {
        Runtime::Native => None,
        Runtime::Podman | Runtime::Docker => Some(container_spec(
            &loaded,
            runtime,
            &paths,
            &runtime_dir,
            &data_dir,
            &user,
        )?),
    };
    // (Before the network's credentials: a refusal here costs no Vault
    // login.)
    let archive_keys = match c.audit.archive() {
        Some(a) => super::auth::archive_keys(&loaded, &sources, &a)?,
        None => None,
    };
    let network = network_spec(&loaded, &sources, &policy, &ws, &name)?;
    // (Everything this start needs from the credential store is read.)
    super::auth::forget_passphrase();
    // Native: init opens the listeners inside the sandbox and hands them
    // to the supervisor. (A container's init opens them itself and relays
    // them to the supervisor's socket.)
    let net = match (&network, runtime) {
        (Some(n), Runtime::Native) => Some(aibox_sandbox::NetListen {
            proxy_port: n.proxy_port,
            dns_addr: n.dns_addr,
            transparent_ports: aibox_supervisor::egress::transparent_ports(n)
                .map_err(anyhow::Error::msg)?,
        }),
        _ => None,
    };
    // gVisor delivers no seccomp notifications: no gate there (a policy
    // with command rules refused such a start above).
    let exec_gate = c.sandbox.exec_gate && (runtime == Runtime::Native || !c.gvisor.enabled);
    let spec = SupervisorSpec {
        sandbox: SandboxSpec {
            name: name.clone(),
            workspace: ws.clone(),
            home: paths.home.clone(),
            root_dir: paths.root.clone(),
            rootfs,
            tmp_size: c.resources.tmp_size.clone(),
            pids: c.resources.pids,
            nofile: c.resources.nofile,
            landlock_required: c.sandbox.landlock == aibox_config::LandlockMode::Required,
            cgroup: None,
            workspace_id: Some(workspace::identity(&ws)?),
            net,
            aibox_binary: matches!(runtime, Runtime::Native)
                .then(std::env::current_exe)
                .transpose()
                .context("locating the aibox binary")?,
            // (Set by the supervisor, which creates the gateway's CA.)
            extra_ca_pem: None,
            read_only_in_workspace,
            masked: policy
                .policy
                .filesystem
                .as_ref()
                .and_then(|f| f.deny.clone())
                .unwrap_or_default(),
            exec_gate,
            exec_blocked: aibox_policy::blocked_programs(&policy.policy),
            // The agents' hooks ask the exec gate's decider.
            etc_extra: if exec_gate {
                vec![super::hook::claude_code_settings()]
            } else {
                Vec::new()
            },
            // (Set by the supervisor, which listens on it.)
            gate_socket: None,
        },
        user,
        runtime: runtime.as_str().into(),
        runtime_reason: reason,
        run_dir: paths.run_dir.clone(),
        socket: paths.socket.clone(),
        state: paths.state.clone(),
        lock_fd: -1,
        audit_log: paths.audit_log.clone(),
        audit_signing: Some(super::audit::signing(&loaded, &sources)?),
        detection: c.audit.detection.enabled.then(|| c.audit.detection.clone()),
        file_events: c.audit.file_events,
        recording_required: c.audit.recording_mode() == aibox_config::RecordingMode::Required,
        segment_max: aibox_config::parse_size(&c.audit.segment_max).unwrap_or(64 << 20),
        sinks: {
            // Opened here first: a sink that cannot work (an unset token,
            // an unreadable CA) stops the start with its name.
            for s in &c.audit.sinks {
                aibox_siem::sink::open(s)
                    .map_err(|e| anyhow::anyhow!("audit.sinks {}: {e}", s.name))?;
            }
            c.audit.sinks.clone()
        },
        archive: match c.audit.archive() {
            // Opened here first too: keys unset, a bucket that is not
            // there or refuses them, or one without the object lock that
            // is required, stop the start with what to fix.
            // A bucket that does not answer does not stop the start: the
            // log is kept here and the supervisor archives its segments
            // once the bucket answers (`verify` lists what is pending).
            Some(a) => match aibox_siem::archive::Archive::open_with(&a, archive_keys.as_ref()) {
                Ok(_) => Some(a),
                Err(aibox_siem::archive::ArchiveError::Unreachable(e)) => {
                    eprintln!(
                        "aibox: audit storage: {e}; starting anyway: sealed segments are archived once the bucket answers (or by `aibox audit ship`)"
                    );
                    Some(a)
                }
                Err(e) => bail!("audit storage: {e}"),
            },
            None => None,
        },
        archive_keys,
        config_sha256: hex::encode(Sha256::digest(&config_json)),
        shell: c.shell.program().into(),
        cpus: c.resources.cpus,
        memory: c.resources.memory.clone(),
        memory_bytes: aibox_config::parse_size(&c.resources.memory).unwrap_or(u64::MAX),
        container,
        network,
        policy_version: policy.version.clone(),
        policy: Some(policy.merged.clone()),
        decisions: aibox_supervisor::decisions::Limits {
            // (Validated with the config.)
            max_bytes: aibox_config::parse_size(&c.policy.decision_log_max_size)
                .unwrap_or(64 << 20),
            keep: c.policy.decision_log_keep,
            audit_per_sec: c.policy.audit_decisions_per_sec,
        },
    };
    Ok((loaded, spec, paths))
}

/// What to make read-only inside the workspace so that the sandbox cannot
/// change the project policy tier for its next start: the directory that
/// holds the file (renaming it away would otherwise get around a
/// read-only file), or the file itself when it sits at the workspace's
/// top. Nothing when there is no project policy file.
fn project_policy_guard(c: &aibox_config::Config, ws: &std::path::Path) -> Result<Vec<PathBuf>> {
    let rel = PathBuf::from(&c.policy.project_policy_path);
    if c.policy.project_policy_path.is_empty() {
        return Ok(Vec::new());
    }
    if rel.is_absolute() {
        bail!(
            "policy.project_policy_path `{}` must be relative to the workspace",
            rel.display()
        );
    }
    if rel
        .components()
        .any(|x| !matches!(x, std::path::Component::Normal(_)))
    {
        bail!(
            "policy.project_policy_path `{}` must be a plain relative path inside the workspace",
            rel.display()
        );
    }
    // Every component must be what it says: a symlink could make the
    // read-only mount cover something else.
    let mut at = ws.to_path_buf();
    let mut last = None;
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Err(_) => return Ok(Vec::new()),
            Ok(m) if m.file_type().is_symlink() => bail!(
                "{} is a symbolic link; the project policy and the directories above it must be real\n  fix: replace the link with the file itself",
                at.display()
            ),
            Ok(m) => last = Some(m),
        }
    }
    use std::os::unix::fs::MetadataExt;
    if let Some(m) = last {
        // Another name for the same file would stay writable.
        if !m.is_file() || m.nlink() != 1 {
            bail!(
                "{} must be a regular file with no other hard links\n  fix: replace it with a fresh copy (cp, then mv over it)",
                at.display()
            );
        }
    }
    // Read-only from its top directory down: renaming any directory on
    // the way would otherwise let a new file take its place.
    let first = rel
        .components()
        .next()
        .map(|c| PathBuf::from(c.as_os_str()));
    Ok(first.into_iter().collect())
}

/// The proxy's policy from `network.*` (already validated with the config),
/// with the LLM gateway's keys read from where the config says.
fn network_spec(
    loaded: &Loaded,
    sources: &aibox_config::Sources,
    policy: &super::policy::AtStart,
    ws: &std::path::Path,
    name: &str,
) -> Result<Option<NetworkSpec>> {
    let c = &loaded.config;
    if !c.network.enabled {
        return Ok(None);
    }
    // The policy's own destinations join the config's (which the policy
    // has already checked are inside it).
    let mut n = c.network.clone();
    n.allowed_domains.extend(policy.rules.iter().cloned());
    let n = &n;
    aibox_config::network_rules(n)
        .map_err(|(key, e)| anyhow::anyhow!("{key} (with the policy's network.allow): {e}"))?;
    let (mut gateway, placeholders) = gateway_spec(c)?;
    if let Some(g) = gateway.as_mut() {
        limit_gateway(g, &policy.policy);
    }
    let gateway_hosts: Vec<String> = c
        .network
        .llm_gateway
        .providers
        .iter()
        .map(|p| p.host.clone())
        .collect();
    let (credentials, issued, vault) = super::auth::for_sandbox(
        loaded,
        sources,
        &policy.policy,
        &placeholders,
        &gateway_hosts,
        name,
    )?;
    let push = super::push::spec(loaded, &policy.merged, ws, name)
        .and_then(|p| super::push::held(p, &issued));
    let push = match push {
        Ok(p) => p,
        Err(e) => {
            if let Some(v) = &vault {
                super::vault::revoke(v);
            }
            return Err(e);
        }
    };
    Ok(Some(NetworkSpec {
        allowed: aibox_config::all_rules(n),
        hosts: n.resolve.clone(),
        proxy_port: n.proxy_port,
        dns_addr: n.dns_addr.parse().context("network.dns_addr")?,
        gateway,
        placeholders,
        // The Vault token aibox logged in with goes no further either.
        key_env: n
            .llm_gateway
            .providers
            .iter()
            .filter_map(|p| p.api_key_env.clone())
            .chain(
                (vault.is_some() && c.credentials.vault.auth == aibox_config::VaultAuth::Token)
                    .then(|| c.credentials.vault.token_env.clone()),
            )
            .collect(),
        push: Some(push),
        credentials,
        issued,
        vault,
        audit_per_sec: c.audit.network_events_per_sec,
    }))
}

/// The policy's rate limits for the gateway's hosts (the strictest of
/// the config's and every policy entry naming such a host on 443).
fn limit_gateway(g: &mut aibox_net::gateway::GatewaySpec, p: &aibox_policy::PolicyFile) {
    let Some(allow) = p.network.as_ref().and_then(|n| n.allow.as_ref()) else {
        return;
    };
    let min = |cur: u64, new: Option<u64>| match (cur, new) {
        (_, None) => cur,
        (0, Some(n)) => n,
        (c, Some(n)) => c.min(n),
    };
    for prov in &g.providers {
        let Ok(h) = aibox_policy::hosts::parse_pattern(&prov.host) else {
            continue;
        };
        for e in allow.iter().filter(|e| e.ports.contains(&443)) {
            let covers = e.hosts.iter().any(|x| {
                aibox_policy::hosts::parse_pattern(x)
                    .is_ok_and(|x| aibox_policy::hosts::covers(&x, &h))
            });
            if let (true, Some(rl)) = (covers, e.rate_limit) {
                g.requests_per_minute = min(
                    u64::from(g.requests_per_minute),
                    rl.requests_per_min.map(u64::from),
                ) as u32;
                g.tokens_per_minute = min(g.tokens_per_minute, rl.tokens_per_min);
            }
        }
    }
}

/// `network.llm_gateway` with its keys, and the variables that get a
/// placeholder inside.
fn gateway_spec(
    c: &aibox_config::Config,
) -> Result<(Option<aibox_net::gateway::GatewaySpec>, Vec<String>)> {
    use aibox_net::gateway::{GatewaySpec, KeyStyle, LogMode, ProviderSpec, RouteSpec, Secret};
    let g = &c.network.llm_gateway;
    if g.providers.is_empty() {
        return Ok((None, Vec::new()));
    }
    let mut providers = Vec::new();
    let mut placeholders = Vec::new();
    for p in &g.providers {
        let who = format!("network.llm_gateway provider `{}`", p.name);
        let key = match (&p.api_key_env, &p.api_key_file) {
            (Some(var), _) => std::env::var(var).map_err(|_| {
                anyhow::anyhow!(
                    "{who}: the environment variable {var} is not set\n  fix: export {var}=<key> before `aibox start` (it stays outside the sandbox)"
                )
            })?,
            (None, Some(file)) => read_key_file(file).with_context(|| who.clone())?,
            (None, None) => bail!("{who}: no key source (set api_key_env or api_key_file)"),
        };
        let key = key.trim().to_string();
        if key.is_empty() {
            bail!("{who}: the API key is empty");
        }
        let upstream_ca_pem = match &p.upstream_ca {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("{who}: reading upstream_ca {}", f.display()))?,
            ),
            None => None,
        };
        let style = match p.style {
            aibox_config::LlmStyle::Anthropic => KeyStyle::Anthropic,
            aibox_config::LlmStyle::Openai => KeyStyle::Openai,
        };
        placeholders.extend(p.placeholder_env.clone().unwrap_or_else(|| {
            vec![match style {
                KeyStyle::Anthropic => "ANTHROPIC_API_KEY".to_string(),
                KeyStyle::Openai => "OPENAI_API_KEY".to_string(),
            }]
        }));
        providers.push(ProviderSpec {
            name: p.name.clone(),
            host: p.host.clone(),
            style,
            key: Secret::new(key),
            upstream: p
                .upstream
                .clone()
                .unwrap_or_else(|| format!("https://{}", p.host)),
            upstream_ca_pem,
        });
    }
    let spec = GatewaySpec {
        providers,
        routes: g
            .routes
            .iter()
            .map(|r| RouteSpec {
                model: r.model.clone(),
                provider: r.provider.clone(),
            })
            .collect(),
        requests_per_minute: g.requests_per_minute,
        tokens_per_minute: g.tokens_per_minute,
        max_body_bytes: aibox_config::parse_size(&g.max_body).unwrap_or(10 << 20),
        log: match c.audit.llm_logging_mode {
            aibox_config::LlmLoggingMode::Full => LogMode::Full,
            aibox_config::LlmLoggingMode::Hash => LogMode::Hash,
            aibox_config::LlmLoggingMode::MetadataOnly => LogMode::MetadataOnly,
        },
    };
    // Fail here, with the config's words, rather than in the supervisor.
    aibox_net::gateway::check(&spec).map_err(anyhow::Error::msg)?;
    placeholders.sort();
    placeholders.dedup();
    Ok((Some(spec), placeholders))
}

/// A key file: a regular file of ours, readable by nobody else.
fn read_key_file(path: &std::path::Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::open(path)
        .with_context(|| format!("opening the key file {}", path.display()))?;
    let m = f.metadata()?;
    if !m.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    if m.mode() & 0o077 != 0 {
        bail!(
            "{} is readable by others (mode {:o})\n  fix: chmod 600 {}",
            path.display(),
            m.mode() & 0o777,
            path.display()
        );
    }
    if m.uid() != aibox_core::euid() {
        bail!("{} belongs to another user", path.display());
    }
    let mut s = String::new();
    std::io::Read::read_to_string(&mut &f, &mut s)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(s)
}

/// Where the host has AppArmor enabled.
fn host_has_apparmor() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|v| v.trim() == "Y")
}

/// The AppArmor profile shipped in `configs/apparmor/`.
const APPARMOR_PROFILE: &str = include_str!("../../../../configs/apparmor/aibox-default");
/// Its name.
const APPARMOR_NAME: &str = "aibox-default";

/// Loads the profile (root) or checks that it is loaded (rootless).
fn apparmor(require: bool) -> Result<(Option<String>, String)> {
    if !host_has_apparmor() {
        if require {
            bail!(
                "gvisor.require_apparmor is on but this host has no AppArmor\n  fix: boot a kernel with AppArmor enabled, or set gvisor.require_apparmor: false"
            );
        }
        return Ok((
            None,
            "not applied: this host has no AppArmor (the kernel does not offer it)".into(),
        ));
    }
    let loaded = std::fs::read_to_string("/sys/kernel/security/apparmor/profiles").is_ok_and(|p| {
        p.lines()
            .any(|l| l.starts_with(&format!("{APPARMOR_NAME} ")))
    });
    if !loaded && aibox_core::euid() == 0 {
        use std::io::Write;
        let mut child = std::process::Command::new("apparmor_parser")
            .args(["-r", "-W"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("running apparmor_parser: {e}\n  fix: apt-get install apparmor")
            })?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(APPARMOR_PROFILE.as_bytes())?;
        }
        if !child.wait()?.success() {
            bail!("apparmor_parser could not load the aibox-default profile");
        }
    } else if !loaded {
        if require {
            bail!(
                "the AppArmor profile {APPARMOR_NAME} is not loaded\n  fix: as root, `apparmor_parser -r configs/apparmor/aibox-default`"
            );
        }
        return Ok((
            None,
            format!("not applied: profile {APPARMOR_NAME} is not loaded and loading needs root"),
        ));
    }
    Ok((
        Some(APPARMOR_NAME.to_string()),
        format!("enforced: profile {APPARMOR_NAME}"),
    ))
}

fn container_spec(
    loaded: &Loaded,
    runtime: Runtime,
    paths: &SandboxPaths,
    runtime_dir: &std::path::Path,
    data_dir: &std::path::Path,
    user: &str,
) -> Result<ContainerSpec> {
    let c = &loaded.config;
    if runtime == Runtime::Docker && aibox_core::euid() != 0 {
        bail!(
            "the docker backend needs root (aibox does not drive rootless docker)\n  fix: run as root, or use `--runtime podman` (rootless works there)"
        );
    }
    let gvisor = if c.gvisor.enabled {
        let runsc = aibox_engine::which("runsc").ok_or_else(|| {
            anyhow::anyhow!(
                "gvisor.enabled is on but runsc is not installed\n  fix: apt-get install runsc, or set gvisor.enabled: false"
            )
        })?;
        let offered = aibox_engine::runsc_platforms(&runsc)?;
        let wanted = match c.gvisor.platform {
            aibox_config::GvisorPlatform::Systrap => "systrap",
            aibox_config::GvisorPlatform::Ptrace => "ptrace",
        };
        let (platform, note) = if offered.iter().any(|p| p == wanted) {
            (wanted.to_string(), String::new())
        } else if offered.iter().any(|p| p == "ptrace") {
            eprintln!(
                "aibox: gvisor.platform `{wanted}` is not offered by the installed runsc ({}); using `ptrace`",
                offered.join(", ")
            );
            (
                "ptrace".to_string(),
                format!("; `{wanted}` is not offered by this runsc"),
            )
        } else {
            bail!(
                "gvisor.platform `{wanted}` is not offered by the installed runsc (it offers: {})\n  fix: set gvisor.platform to one of those",
                offered.join(", ")
            );
        };
        Some(GvisorSpec {
            exec_tty: aibox_engine::runsc_exec_has_tty(&runsc),
            runsc,
            platform,
            note,
        })
    } else {
        None
    };
    if gvisor.is_some() && runtime == Runtime::Docker {
        bail!(
            "gVisor with the docker backend needs runsc registered in the docker daemon, which aibox does not do\n  fix: use `--runtime podman`, or set gvisor.enabled: false"
        );
    }
    if runtime == Runtime::Docker
        && let Some(account) = aibox_core::passwd_name(aibox_core::guest::UID)
    {
        // docker has no per-container user namespace: the guest is host
        // uid 1000, and so is that account (see docs/security.md).
        eprintln!(
            "aibox: warning: host account `{account}` has uid {}, the uid docker sandboxes run as: it can reach this sandbox's processes and files (/proc/PID/root)\n  fix: use `--runtime podman` (a reserved uid range), or remove that account",
            aibox_core::guest::UID
        );
    }
    let (apparmor, apparmor_note) = apparmor(c.gvisor.require_apparmor)?;
    let exe = std::env::current_exe()?;
    Ok(ContainerSpec {
        engine: runtime.as_str().into(),
        // Unique per runtime directory and name, in the original's format.
        container_name: aibox_core::default_sandbox_name(user, &runtime_dir.join(&paths.name)),
        image: c.image.clone(),
        gvisor,
        aibox_binary: std::fs::canonicalize(&exe).unwrap_or(exe),
        mounts_dir: paths.mounts.clone(),
        record: paths.container_record.clone(),
        toolpacks: data_dir.join("toolpacks"),
        runtime_dir: runtime_dir.to_path_buf(),
        apparmor,
        apparmor_note,
        run_mode: false,
    })
}

pub fn start(cli_config: Option<PathBuf>, a: StartArgs) -> Result<i32> {
    let t0 = Instant::now();
    let (_, spec, paths) = prepare(cli_config, &a)?;
    // From here the start revokes the Vault token itself if it fails.
    super::vault::disarm();
    let st = client::start(&spec, &paths)?;
    println!("{}", st.name);
    eprintln!(
        "started sandbox {} ({} runtime, {}) in {} ms",
        st.name,
        st.runtime,
        if st.rootless { "rootless" } else { "rootful" },
        t0.elapsed().as_millis()
    );
    for l in st.limits.iter().filter(|l| !l.enforced) {
        eprintln!("warning: {} = {} is {}", l.name, l.value, l.how);
    }
    Ok(0)
}

fn exec_request(opts: &ExecOpts, argv: Vec<String>) -> Result<ExecRequest> {
    for kv in &opts.env {
        let ident = |k: &str| {
            !k.is_empty()
                && k.bytes().enumerate().all(|(i, b)| {
                    b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
                })
        };
        match kv.split_once('=') {
            Some((k, _)) if ident(k) => {}
            _ => bail!(
                "-e {kv:?}: expected KEY=VALUE with KEY made of letters, digits and _ (not starting with a digit)"
            ),
        }
    }
    if opts.tty && !std::io::stdin().is_terminal() {
        bail!("-t needs a terminal on stdin\n  fix: drop -t, or run from an interactive terminal");
    }
    Ok(ExecRequest {
        argv,
        env: opts.env.clone(),
        cwd: opts.cwd.clone(),
        host_cwd: std::env::current_dir()
            .ok()
            .and_then(|d| std::fs::canonicalize(d).ok()),
        tty: opts
            .tty
            .then_some(aibox_sandbox::WinSize { rows: 24, cols: 80 }),
        recording: None,
    })
}

pub fn run(cli_config: Option<PathBuf>, a: RunArgs) -> Result<i32> {
    let sources = aibox_config::Sources::standard(cli_config.clone());
    let req = exec_request(&a.opts, a.command.clone())?;
    let (loaded, mut spec, paths) = prepare(cli_config, &a.start)?;
    // Container backends: the container starts with the command, in one
    // engine call (a terminal session takes the ordinary path).
    if let Some(c) = spec.container.as_mut() {
        c.run_mode = req.tty.is_none();
    }
    super::vault::disarm();
    let rec = if req.tty.is_some() {
        super::recording::start(&loaded, &sources, &paths.name, &req.argv, false, false)?
    } else {
        None
    };
    let mut req = req;
    req.recording = rec.as_ref().map(|r| r.id.clone());
    if let Err(e) = client::start(&spec, &paths) {
        if let Some(r) = rec {
            let _ = r.finish();
        }
        return Err(e.into());
    }
    let (rt, data) = (loaded.runtime_dir(), loaded.data_dir());
    let tap = rec.as_ref().map(|r| r.tap());
    let result =
        client::connect_named(&paths, &rt, &data).and_then(|c| client::exec_tapped(c, req, tap));
    if let Some(r) = rec {
        r.finish()?;
    }
    // A one-shot sandbox ends with its command; it may be gone already.
    let stopped = match client::connect_named(&paths, &rt, &data) {
        Ok(c) => client::stop(c, &paths).map(drop),
        Err(_) => client::wait_gone(&paths),
    };
    let code = result?;
    stopped?;
    Ok(code)
}

/// The default sandbox name for the current directory.
pub(crate) fn default_name() -> String {
    let cwd = std::env::current_dir()
        .ok()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .unwrap_or_default();
    aibox_core::default_sandbox_name(&aibox_core::current_user(), &cwd)
}

/// Resolves `--name` (or the implicit choice) to paths of a running sandbox.
pub(crate) fn target(
    cli_config: Option<PathBuf>,
    name: &NameArg,
) -> Result<(Loaded, SandboxPaths)> {
    let (loaded, _) = super::load_config(cli_config)?;
    let (rt, data) = (loaded.runtime_dir(), loaded.data_dir());
    let name = match &name.name {
        Some(n) => {
            aibox_core::validate_name(n).map_err(anyhow::Error::msg)?;
            n.clone()
        }
        None => client::resolve_name(&rt, &data, &default_name())?,
    };
    let paths = SandboxPaths::new(&rt, &data, &name);
    Ok((loaded, paths))
}

pub(crate) fn connect(loaded: &Loaded, paths: &SandboxPaths) -> Result<std::os::fd::OwnedFd> {
    Ok(client::connect_named(
        paths,
        &loaded.runtime_dir(),
        &loaded.data_dir(),
    )?)
}

pub fn exec(cli_config: Option<PathBuf>, a: ExecArgs) -> Result<i32> {
    let sources = aibox_config::Sources::standard(cli_config.clone());
    let mut req = exec_request(&a.opts, a.command)?;
    let (loaded, paths) = target(cli_config, &a.name)?;
    let conn = connect(&loaded, &paths)?;
    // A terminal session is recorded when recording is required.
    let rec = if req.tty.is_some() {
        super::recording::start(&loaded, &sources, &paths.name, &req.argv, false, false)?
    } else {
        None
    };
    req.recording = rec.as_ref().map(|r| r.id.clone());
    let code = client::exec_tapped(conn, req, rec.as_ref().map(|r| r.tap()));
    if let Some(r) = rec {
        r.finish()?;
    }
    Ok(code?)
}

pub fn shell(cli_config: Option<PathBuf>, a: ShellArgs) -> Result<i32> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "aibox shell needs a terminal\n  fix: run it from an interactive terminal, or use `aibox exec -- CMD`"
        );
    }
    let sources = aibox_config::Sources::standard(cli_config.clone());
    let (loaded, paths) = target(cli_config, &a.name)?;
    let shell = loaded.config.shell.program().to_string();
    let opts = ExecOpts {
        tty: true,
        env: Vec::new(),
        cwd: None,
    };
    let mut req = exec_request(&opts, vec![shell, "-l".into()])?;
    let conn = connect(&loaded, &paths)?;
    let rec = super::recording::start(
        &loaded,
        &sources,
        &paths.name,
        &req.argv,
        a.record,
        a.no_record,
    )?;
    req.recording = rec.as_ref().map(|r| r.id.clone());
    let code = client::exec_tapped(conn, req, rec.as_ref().map(|r| r.tap()));
    if let Some(r) = rec {
        r.finish()?;
    }
    Ok(code?)
}

fn print_status(s: &Status) {
    println!("name:       {}", s.name);
    println!("state:      {}", s.state);
    println!("runtime:    {} ({})", s.runtime, s.runtime_reason);
    println!("workspace:  {}", s.workspace.display());
    println!("started:    {} (ready in {} ms)", s.started_at, s.start_ms);
    println!(
        "processes:  supervisor pid {}, sandbox init pid {}",
        s.supervisor_pid, s.init_pid
    );
    println!(
        "identity:   {} (guest uid/gid 1000 = host uid/gid {})",
        if s.rootless { "rootless" } else { "rootful" },
        s.guest_host_uid
    );
    println!("sessions:   {}", s.sessions);
    println!("landlock:   {}", s.landlock);
    println!("seccomp:    {}", s.seccomp);
    if !s.exec_gate.is_empty() {
        println!("exec gate:  {}", s.exec_gate);
    }
    println!("limits:");
    for l in &s.limits {
        println!(
            "  {:<9} {:<8} {}{}",
            l.name,
            l.value,
            if l.enforced { "enforced: " } else { "" },
            l.how
        );
    }
    println!("self-test:");
    for c in &s.selftest {
        println!(
            "  [{}] {:<15} {}",
            if c.ok { "ok" } else { "FAIL" },
            c.layer,
            c.detail
        );
    }
    if let Some(c) = &s.container {
        println!(
            "container:  {} ({}, id {})",
            c.name,
            c.engine,
            &c.id[..c.id.len().min(12)]
        );
        println!("  runtime:  {}", c.oci_runtime);
        println!("  image:    {}", c.image);
        println!("  apparmor: {}", c.apparmor);
    }
    match &s.network {
        None => println!("network:    none (network.enabled is false: no egress path at all)"),
        Some(n) => {
            println!("network:    {}", n.state);
            println!("  proxy:    {} (dns {})", n.proxy, n.dns);
            println!(
                "  allowed:  {}",
                if n.allowed.is_empty() {
                    "nothing (every destination is refused)".to_string()
                } else {
                    n.allowed.join(", ")
                }
            );
            if !n.llm_gateway.is_empty() {
                println!("  llm gateway: {}", n.llm_gateway.join(", "));
            }
            println!(
                "  counters: {} allowed, {} denied, {} DNS answers, {} DNS refusals",
                n.allow_count, n.deny_count, n.dns_resolved, n.dns_refused
            );
        }
    }
    println!("audit log:  {}", s.audit_log.display());
}

/// What is known about a sandbox whose supervisor is gone: its last
/// state and, for container backends, whether the engine still runs it.
fn dead_status(paths: &SandboxPaths, format: Format) -> Option<i32> {
    if client::is_alive(paths) {
        return None;
    }
    let last: Option<Status> = std::fs::read_to_string(&paths.state)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let record = aibox_supervisor::container::read_record(&paths.container_record);
    if last.is_none() && record.is_none() {
        return None;
    }
    let container = record.as_ref().map(|r| {
        let state = match aibox_supervisor::container::inspect_running(&r.engine, &r.container_name)
        {
            Some(true) => "running",
            Some(false) => "stopped",
            None => "gone",
        };
        (r.engine.clone(), r.container_name.clone(), state)
    });
    let fix = format!("`aibox stop --name {}` cleans up", paths.name);
    match format {
        Format::Json => {
            let v = serde_json::json!({
                "name": paths.name, "state": "dead",
                "reason": "its supervisor is gone",
                "container": container.as_ref().map(|(e, n, s)| serde_json::json!({"engine": e, "name": n, "state": s})),
                "last_status": last, "fix": fix,
            });
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        Format::Text => {
            println!("name:       {}", paths.name);
            println!("state:      dead (its supervisor is gone)");
            if let Some((e, n, s)) = &container {
                println!("container:  {n} ({e}): {s}");
            }
            println!("fix:        {fix}");
        }
    }
    Some(1)
}

pub fn status(cli_config: Option<PathBuf>, a: StatusArgs) -> Result<i32> {
    let (loaded, paths) = target(cli_config, &a.name)?;
    let conn = match connect(&loaded, &paths) {
        Ok(c) => c,
        Err(e) => return dead_status(&paths, a.format).ok_or(e),
    };
    let st = client::status(conn)?;
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&st)?),
        Format::Text => print_status(&st),
    }
    Ok(0)
}

pub fn list(cli_config: Option<PathBuf>, a: FormatArg) -> Result<i32> {
    let (loaded, _) = super::load_config(cli_config)?;
    let items = client::list(&loaded.runtime_dir(), &loaded.data_dir());
    match a.format {
        Format::Json => {
            let v: Vec<serde_json::Value> = items
                .iter()
                .map(|l| serde_json::json!({"name": l.paths.name, "alive": l.alive, "status": l.status}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Text => {
            if items.is_empty() {
                eprintln!("no sandboxes");
            } else {
                println!(
                    "{:<32} {:<8} {:<8} {:<22} WORKSPACE",
                    "NAME", "STATE", "RUNTIME", "STARTED"
                );
                for l in &items {
                    let (rt, started, ws) = l
                        .status
                        .as_ref()
                        .map(|s| {
                            (
                                s.runtime.clone(),
                                s.started_at.clone(),
                                s.workspace.display().to_string(),
                            )
                        })
                        .unwrap_or_default();
                    let state = if l.alive { "running" } else { "dead" };
                    println!(
                        "{:<32} {:<8} {:<8} {:<22} {}",
                        l.paths.name, state, rt, started, ws
                    );
                }
            }
        }
    }
    Ok(0)
}

pub fn stop(cli_config: Option<PathBuf>, a: NameArg) -> Result<i32> {
    let (loaded, paths) = target(cli_config, &a)?;
    let user = aibox_core::current_user();
    // A supervisor that just died holds the lock a moment longer (its
    // last threads, then its sandbox's init, which the parent-death signal
    // ends): wait for that, so the dead sandbox is cleaned up below rather
    // than taken for a live one that does not answer.
    client::wait_if_dying(&paths);
    if !client::is_alive(&paths)
        && (paths.run_dir.exists() || client::has_vault_records(&paths))
        && client::reap_stale(&paths, &paths.audit_log, &user)?
    {
        eprintln!(
            "sandbox {} was not running (its supervisor had died); cleaned up",
            paths.name
        );
        return Ok(0);
    }
    let reaped = match connect(&loaded, &paths) {
        Ok(conn) => client::stop(conn, &paths)?,
        // Alive (it holds the lock) but unreachable: its socket is gone.
        Err(_) if client::is_alive(&paths) => client::terminate_unreachable(&paths)?,
        Err(e) => return Err(e),
    };
    if reaped {
        eprintln!(
            "sandbox {} ended without cleaning up (its supervisor died as it was asked to stop); cleaned up",
            paths.name
        );
        return Ok(0);
    }
    eprintln!("stopped {}", paths.name);
    Ok(0)
}
