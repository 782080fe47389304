//! The podman and docker backends: a hardened container whose PID 1 is the
//! aibox binary (bind-mounted read-only), started by an attached
//! `ENGINE run` that reads the init's self-test report and ends with the
//! container; commands run through `ENGINE exec` and the in-container
//! session shim (`aibox_sandbox::container`). A one-shot sandbox
//! (`aibox run`) starts the container together with its command.
//!
//! Ownership of workspace files: rootful containers run in a user
//! namespace whose ids 0–65535 are the reserved host range starting at
//! [`GUEST_BASE`] (podman with runc), or as host uid 1000 (docker, which
//! has no per-container user namespaces, and gVisor, whose user-space
//! kernel owns the guest's processes and whose file server writes files
//! as uid 1000). The workspace and home are host-side idmapped mounts
//! that store the guest's files as the invoking user. Rootless podman uses
//! `--userns=keep-id:uid=1000,gid=1000`, which maps the guest to the
//! invoking user directly.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use aibox_engine::Engine;
use aibox_sandbox::SelfTestReport;
use serde::{Deserialize, Serialize};

use crate::proto::{ContainerSpec, SupervisorSpec};

/// First host id of the user namespace of rootful podman sandboxes: guest
/// uid 1000 is host uid `GUEST_BASE + 1000`, a reserved, unnamed id (the
/// native backend's reserved ids start at 0x7F000000, above this range).
pub const GUEST_BASE: u32 = 0x7E00_0000;

/// The six build caches of the original AI-Box: (volume suffix, path
/// inside the sandbox). Volumes are shared by every sandbox of an engine.
pub const CACHES: &[(&str, &str)] = &[
    ("maven", "/home/dev/.m2/repository"),
    ("gradle", "/home/dev/.gradle/caches"),
    ("npm", "/home/dev/.npm"),
    ("yarn", "/home/dev/.yarn/cache"),
    ("bazel", "/home/dev/.cache/bazel"),
    ("nuget", "/home/dev/.nuget/packages"),
];

/// Name of the volume holding cache `kind`. gVisor sandboxes, whose files
/// belong to a different host uid than runc's, get their own set.
pub fn cache_volume(kind: &str, gvisor: bool) -> String {
    if gvisor {
        format!("aibox-gvisor-cache-{kind}")
    } else {
        format!("aibox-cache-{kind}")
    }
}

/// `resources.cpus` clamped to the host's CPUs (docker refuses more).
pub fn effective_cpus(cpus: u32) -> u32 {
    let host = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    cpus.clamp(1, host.max(1))
}

/// Host uid/gid of guest uid 1000 for a rootful sandbox.
fn rootful_guest(engine: Engine, gvisor: bool) -> (u32, u32) {
    match (engine, gvisor) {
        (Engine::Podman, false) => (GUEST_BASE + 1000, GUEST_BASE + 1000),
        _ => (aibox_core::guest::UID, aibox_core::guest::GID),
    }
}

/// What is recorded about a container before it is created, so that it
/// can be removed even if its supervisor dies at any point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// `podman` or `docker`.
    pub engine: String,
    /// Container name.
    pub container_name: String,
    /// Host-side mount directory.
    pub mounts_dir: PathBuf,
}

/// Parses an engine name.
pub fn engine_of(name: &str) -> Result<Engine, String> {
    match name {
        "podman" => Ok(Engine::Podman),
        "docker" => Ok(Engine::Docker),
        other => Err(format!("unknown container engine `{other}`")),
    }
}

/// A started container.
#[derive(Debug)]
pub struct Started {
    /// Container id.
    pub id: String,
    /// Host pid of the container's init (as the engine reports it).
    pub init_pid: i32,
    /// Self-test run inside.
    pub report: SelfTestReport,
    /// Host uid of guest uid 1000.
    pub guest_host_uid: u32,
    /// Started without root.
    pub rootless: bool,
    /// The attached `ENGINE run`: exits when the container does.
    pub waiter: Child,
    /// Threads copying the engine's output (to the client, for a one-shot
    /// command); they end when the engine does.
    pub relays: Vec<std::thread::JoinHandle<()>>,
}

/// The session shim's options for `spec`'s sessions (the first command's
/// included): the native seccomp filters under gVisor (this runsc answers
/// every refusal of its OCI profile with EPERM, ignoring errnoRet, so
/// clone3 would not fall back to clone and no thread could start; the
/// native filter, stacked on top, answers ENOSYS as exec'd sessions get
/// it); otherwise the exec gate when it is on, and the programs Landlock
/// keeps from running.
pub fn session_flags(spec: &SupervisorSpec, gvisor: bool) -> Vec<String> {
    use aibox_sandbox::container::{BLOCKED_FLAG, GATE_FLAG, SECCOMP_FLAG};
    let mut f = Vec::new();
    if gvisor {
        f.push(SECCOMP_FLAG.to_string());
        return f;
    }
    if spec.sandbox.exec_gate {
        f.push(GATE_FLAG.to_string());
    }
    let names: Vec<&str> = spec
        .sandbox
        .exec_blocked
        .iter()
        .map(String::as_str)
        .filter(|n| !n.is_empty() && !n.contains([',', '/']))
        .collect();
    if !names.is_empty() {
        f.push(BLOCKED_FLAG.to_string());
        f.push(names.join(","));
    }
    f
}

/// Where the exec gate's registration socket is (mounted at
/// `aibox_sandbox::container::GATE_SOCKET`).
pub(crate) fn join_socket(spec: &SupervisorSpec) -> PathBuf {
    spec.run_dir.join("exec-gate.sock")
}

/// The files added to the container's /etc (the agents' managed
/// settings): (host file under the run directory, path inside, body).
fn etc_paths(spec: &SupervisorSpec) -> Vec<(PathBuf, String, &str)> {
    spec.sandbox
        .etc_extra
        .iter()
        .map(|(rel, body)| {
            (
                spec.run_dir.join("etc").join(rel),
                format!("/etc/{rel}"),
                body.as_str(),
            )
        })
        .collect()
}

/// Writes the files of [`etc_paths`] (before the container is run).
pub(crate) fn write_etc_files(spec: &SupervisorSpec) -> Result<(), String> {
    for (rel, _) in &spec.sandbox.etc_extra {
        let r = Path::new(rel);
        if r.is_absolute()
            || r.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!("{rel} is not a plain path below /etc"));
        }
    }
    for (host, _, body) in etc_paths(spec) {
        if let Some(d) = host.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        std::fs::write(&host, body).map_err(|e| format!("writing {}: {e}", host.display()))?;
        // Read by the guest, whose uid is not ours when rootful.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| format!("opening {} to the sandbox: {e}", host.display()))?;
    }
    Ok(())
}

/// Unmounts and removes the host-side mounts of a container sandbox.
/// Only empty directories are removed (`remove_dir`), so a mount that
/// could not be detached is never descended into.
pub fn remove_mounts(dir: &Path) {
    for which in ["workspace", "home"] {
        let p = dir.join(which);
        // A mount may be stacked more than once after a crash mid-start.
        while aibox_sandbox::detach_mount(&p) {}
        let _ = std::fs::remove_dir(&p);
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes the cache mount points made in `home` for a start that failed,
/// deepest first; only empty directories go, so nothing of the user's does.
fn remove_cache_points(home: &Path) {
    for (_, dst) in CACHES {
        let Some(rel) = dst.strip_prefix("/home/dev/") else {
            continue;
        };
        // Relative to directories opened without following symlinks.
        let Ok(chain) = open_beneath(home, rel, false) else {
            continue;
        };
        let comps: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
        for (i, comp) in comps.iter().enumerate().rev() {
            if nix::unistd::unlinkat(&chain[i], *comp, nix::unistd::UnlinkatFlags::RemoveDir)
                .is_err()
            {
                break;
            }
        }
    }
}

/// Removes the container named in `record` and its mounts; used by
/// `stop` and by stale-state cleanup when the supervisor is gone.
pub fn remove(record: &Record) -> Result<(), String> {
    let r = remove_container(&record.engine, &record.container_name);
    remove_mounts(&record.mounts_dir);
    r
}

/// True when the engine says it has no container of that name (an engine
/// that cannot be asked is not taken for "gone").
fn container_gone(engine: Engine, name: &str) -> bool {
    engine
        .command(["container", "inspect", name])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| {
            let err = String::from_utf8_lossy(&o.stderr).to_ascii_lowercase();
            !o.status.success()
                && (err.contains("no such container") || err.contains("no such object"))
        })
}

/// Force-removes one container (stopping it first with SIGTERM).
fn remove_container(engine: &str, name: &str) -> Result<(), String> {
    let engine = engine_of(engine)?;
    // podman stops with SIGTERM first (the aibox init then kills
    // everything at once); docker's rm has no timeout and kills at once.
    let args: &[&str] = match engine {
        Engine::Podman => &["rm", "-f", "-t", "5"],
        Engine::Docker => &["rm", "-f"],
    };
    let out = engine
        .command(args.iter().chain([&name]))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| engine.spawn_error(e).to_string())?;
    // Success is the container being gone, whatever rm printed (it may
    // report the stop timeout, or a race with the engine's own cleanup).
    if out.status.success() || container_gone(engine, name) {
        Ok(())
    } else {
        Err(aibox_engine::explain(&String::from_utf8_lossy(&out.stderr)))
    }
}

/// Reads a container record.
pub fn read_record(path: &Path) -> Option<Record> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
}

/// Engine view of a container: running or not (None when it does not exist).
pub fn inspect_running(engine: &str, name: &str) -> Option<bool> {
    let engine = engine_of(engine).ok()?;
    let v: serde_json::Value = engine
        .json("inspect", &["container", "inspect", name])
        .ok()?;
    v.get(0)?.get("State")?.get("Running")?.as_bool()
}

fn ensure_dir(p: &Path) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()))
}

/// Opens each component of `rel` beneath `base` without following
/// symlinks, creating missing directories when `create`. The home is
/// written by the sandbox: a symlink planted there must not steer what the
/// (possibly root) supervisor creates or removes on the host.
fn open_beneath(base: &Path, rel: &str, create: bool) -> Result<Vec<OwnedFd>, String> {
    use nix::fcntl::{OFlag, open, openat};
    use nix::sys::stat::Mode;
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    let root =
        open(base, flags, Mode::empty()).map_err(|e| format!("opening {}: {e}", base.display()))?;
    let mut chain = vec![root];
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        let parent = chain.last().ok_or("empty path")?;
        if create {
            match nix::sys::stat::mkdirat(parent, comp, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(format!("creating {rel} in {}: {e}", base.display())),
            }
        }
        let next = openat(parent, comp, flags, Mode::empty()).map_err(|e| {
            format!(
                "{rel} in {} is not a plain directory ({e}); remove it",
                base.display()
            )
        })?;
        chain.push(next);
    }
    Ok(chain)
}

/// `aibox repair cache`: removes every aibox cache volume of `engine` and
/// creates the set for the configured kind of sandbox (runc or gVisor)
/// afresh. Refuses while any aibox container of that engine runs, since
/// it would pull the caches from under it. Returns the volumes removed.
pub fn repair_caches(engine: Engine, gvisor: bool) -> Result<Vec<String>, String> {
    let format = match engine {
        Engine::Podman => "json",
        Engine::Docker => "{{json .}}",
    };
    let running = engine
        .json_list(
            "ps",
            &["ps", "--filter", "label=aibox=true", "--format", format],
        )
        .map_err(|e| e.to_string())?;
    let names: Vec<String> = running
        .iter()
        .filter_map(|c| match c.get("Names") {
            Some(serde_json::Value::Array(a)) => {
                a.first().and_then(|n| n.as_str()).map(String::from)
            }
            Some(serde_json::Value::String(n)) => Some(n.clone()),
            _ => None,
        })
        .collect();
    if !running.is_empty() {
        return Err(format!(
            "{} aibox sandbox container(s) are running and use the caches ({})\n  fix: stop them first (`aibox list`, then `aibox stop --name …`)",
            running.len(),
            names.join(", ")
        ));
    }
    let old = engine
        .volumes_labelled("aibox.cache=true")
        .map_err(|e| e.to_string())?;
    for v in &old {
        engine
            .run("volume rm", ["volume", "rm", v.as_str()])
            .map_err(|e| e.to_string())?;
    }
    let rootless = aibox_core::euid() != 0;
    let guest = if rootless {
        (aibox_core::euid(), nix::unistd::getegid().as_raw())
    } else {
        rootful_guest(engine, gvisor)
    };
    ensure_caches(engine, guest, rootless, gvisor)?;
    Ok(old)
}

/// Creates the cache volumes that are missing, owned by the guest.
fn ensure_caches(
    engine: Engine,
    guest: (u32, u32),
    rootless: bool,
    gvisor: bool,
) -> Result<(), String> {
    // One listing instead of a probe per volume: this is on the start path.
    let existing = engine
        .volumes_labelled("aibox.cache=true")
        .map_err(|e| e.to_string())?;
    for (kind, _) in CACHES {
        let vol = cache_volume(kind, gvisor);
        if existing.contains(&vol) {
            continue;
        }
        let created = engine.run(
            "volume create",
            [
                "volume",
                "create",
                "--label",
                "aibox=true",
                "--label",
                "aibox.cache=true",
                &vol,
            ],
        );
        // Another sandbox starting at the same moment may have made it.
        if let Err(e) = created
            && !e.to_string().contains("already exists")
        {
            return Err(e.to_string());
        }
        if rootless {
            // keep-id maps the guest to the user, who owns the new volume.
            continue;
        }
        let v: serde_json::Value = engine
            .json("volume inspect", &["volume", "inspect", &vol])
            .map_err(|e| e.to_string())?;
        let mp = v
            .get(0)
            .and_then(|x| x.get("Mountpoint"))
            .and_then(|m| m.as_str())
            .ok_or_else(|| format!("{} volume inspect {vol}: no Mountpoint", engine.program()))?;
        nix::unistd::chown(Path::new(mp), Some(guest.0.into()), Some(guest.1.into()))
            .map_err(|e| format!("giving cache volume {vol} to the guest: {e}"))?;
    }
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    f.write_all(data)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Where the generated seccomp profile is written for the engine.
fn seccomp_path(spec: &SupervisorSpec) -> PathBuf {
    spec.run_dir.join("seccomp.json")
}

/// The supervisor's end of the container's egress (mounted at
/// `aibox_sandbox::container::EGRESS_SOCKET`).
pub(crate) fn egress_socket(spec: &SupervisorSpec) -> PathBuf {
    spec.run_dir.join("egress.sock")
}

/// The LLM gateway's CA certificate, alone and appended to the host's
/// system bundle (containers get both mounted, see [`write_ca_files`]).
fn ca_paths(spec: &SupervisorSpec) -> (PathBuf, PathBuf) {
    (
        spec.run_dir.join("aibox-ca.pem"),
        spec.run_dir.join("ca-bundle.pem"),
    )
}

/// Writes the files of [`ca_paths`] for the sandbox's CAs (`ca_pem`:
/// the LLM gateway's and the credential injector's; readable by the
/// guest, whose uid is not ours; a CA certificate is public).
pub(crate) fn write_ca_files(spec: &SupervisorSpec, ca_pem: Option<&str>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let Some(ca_pem) = ca_pem else { return Ok(()) };
    let (alone, bundle) = ca_paths(spec);
    // Without the system roots every other HTTPS connection in the
    // sandbox would fail: refuse instead.
    const BUNDLES: [&str; 3] = [
        aibox_sandbox::CA_BUNDLE,
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ];
    let mut text = BUNDLES
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find(|t| t.contains("-----BEGIN CERTIFICATE-----"))
        .ok_or_else(|| {
            format!(
                "the LLM gateway and credential injection need the host's system CA bundle (looked for {}) to build the sandbox's: the system roots plus the sandbox's CAs",
                BUNDLES.join(", ")
            )
        })?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(ca_pem);
    for (path, body) in [(&alone, ca_pem), (&bundle, text.as_str())] {
        write_private(path, body.as_bytes())?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The sandbox's `/etc/resolv.conf`: the aibox DNS answerer only.
fn resolv_path(spec: &SupervisorSpec) -> PathBuf {
    spec.run_dir.join("resolv.conf")
}

/// Where the engine writes the container id (`--cidfile`).
fn cid_path(spec: &SupervisorSpec) -> PathBuf {
    spec.run_dir.join("container.id")
}

/// The listeners the container's init opens and relays, when the
/// sandbox has egress.
fn net_listen(spec: &SupervisorSpec) -> Option<aibox_sandbox::NetListen> {
    let n = spec.network.as_ref()?;
    if aibox_sandbox::debug_skip("netns") {
        return None;
    }
    // (The config was validated before the supervisor started.)
    let ports = crate::egress::transparent_ports(n).ok()?;
    Some(aibox_sandbox::NetListen {
        proxy_port: n.proxy_port,
        dns_addr: n.dns_addr,
        transparent_ports: ports,
    })
}

/// The `ENGINE run` arguments of a sandbox: options, then (second) the
/// image and the init's command line.
fn run_args(
    spec: &SupervisorSpec,
    c: &ContainerSpec,
    engine: Engine,
    rootless: bool,
    ws: &Path,
    home: &Path,
) -> (Vec<String>, Vec<String>) {
    let sb = &spec.sandbox;
    let (seccomp, cidfile) = (seccomp_path(spec), cid_path(spec));
    // Attached (no -d): the init's first stdout line is the self-test
    // report, and this engine process ends when the container does.
    let mut a: Vec<String> = vec!["run".into()];
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[
        "--name",
        &c.container_name,
        "--hostname",
        aibox_core::guest::HOSTNAME,
    ]);
    push(&["--label", "aibox=true"]);
    push(&["--label", &format!("aibox.name={}", sb.name)]);
    push(&["--label", &format!("aibox.owner={}", spec.user)]);
    push(&[
        "--label",
        &format!("aibox.runtime_dir={}", c.runtime_dir.display()),
    ]);
    push(&["--cidfile", &cidfile.display().to_string()]);
    // Debug builds can leave a layer out (AIBOX_DEBUG_SKIP_LAYER) so the
    // tests can prove the self-test notices; release builds cannot.
    let skip = aibox_sandbox::debug_skip;
    push(&["--user", "1000:1000"]);
    if !skip("caps") {
        push(&["--cap-drop=ALL"]);
    }
    push(&["--security-opt", "no-new-privileges"]);
    let seccomp_opt = if skip("seccomp") {
        "seccomp=unconfined".to_string()
    } else {
        format!("seccomp={}", seccomp.display())
    };
    push(&["--security-opt", &seccomp_opt]);
    if let Some(p) = &c.apparmor {
        push(&["--security-opt", &format!("apparmor={p}")]);
    }
    if !skip("readonly") {
        push(&["--read-only"]);
    }
    push(&[if skip("netns") {
        "--network=host"
    } else {
        "--network=none"
    }]);
    let net = net_listen(spec);
    if net.is_some() {
        // The forwarder runs as the guest and must bind 53, 80 and 443 in
        // the container's own network namespace (nowhere else).
        push(&["--sysctl", "net.ipv4.ip_unprivileged_port_start=0"]);
    }
    if c.gvisor.is_none() {
        let abi = aibox_sandbox::landlock_rules::kernel_abi();
        push(&[
            "--env",
            &format!("{}={abi}", aibox_sandbox::container::HOST_LANDLOCK_ENV),
        ]);
    }
    if let Ok(layers) = std::env::var("AIBOX_DEBUG_SKIP_LAYER")
        && cfg!(debug_assertions)
    {
        // The init's self-test and the session shim apply Landlock and
        // (gVisor) seccomp themselves.
        push(&["--env", &format!("AIBOX_DEBUG_SKIP_LAYER={layers}")]);
    }
    // Under gVisor the host cgroup also counts the user-space kernel's own
    // threads: leave it headroom, and let its RLIMIT_NPROC (below) bound
    // the guest's processes.
    let pids_cgroup = if c.gvisor.is_some() {
        sb.pids + 1024
    } else {
        sb.pids
    };
    push(&["--pids-limit", &pids_cgroup.to_string()]);
    push(&["--ulimit", &format!("nofile={0}:{0}", sb.nofile)]);
    if engine == Engine::Podman {
        // Counted per user namespace, so per sandbox. (Without it podman
        // asks for the host's maximum, which the runtime may not raise.)
        push(&["--ulimit", &format!("nproc={0}:{0}", sb.pids)]);
    }
    if !rootless {
        // Rootless podman on cgroup v1 cannot set cpu/memory limits; the
        // status reports that instead of failing the start.
        push(&["--memory", &spec.memory_bytes.to_string()]);
        push(&["--cpus", &effective_cpus(spec.cpus).to_string()]);
    }
    // podman would copy the image's /run (root-owned, 0755) into the
    // tmpfs and its mode with it.
    let copyup = if engine == Engine::Podman {
        ",notmpcopyup"
    } else {
        ""
    };
    let tmpfs = |dst: &str, size: &str| {
        format!("{dst}:rw,noexec,nosuid,nodev,size={size},mode=1777{copyup}")
    };
    push(&["--tmpfs", &tmpfs("/tmp", &sb.tmp_size)]);
    push(&["--tmpfs", &tmpfs("/var/tmp", &sb.tmp_size)]);
    push(&["--tmpfs", &tmpfs("/run", "64m")]);
    match (engine, rootless) {
        (Engine::Podman, false) if c.gvisor.is_none() => {
            let range = format!("0:{GUEST_BASE}:65536");
            push(&["--uidmap", &range, "--gidmap", &range]);
        }
        (Engine::Podman, true) => push(&["--userns=keep-id:uid=1000,gid=1000"]),
        _ => {}
    }
    let vol = |src: &Path, dst: &str, opts: &str| match engine {
        Engine::Podman => format!("{}:{dst}:{opts}", src.display()),
        // docker's -v takes no nosuid/nodev (no_new_privs already makes
        // set-id bits inert).
        Engine::Docker => format!(
            "{}:{dst}{}",
            src.display(),
            if opts.starts_with("ro") { ":ro" } else { "" }
        ),
    };
    push(&["-v", &vol(ws, "/workspace", "rw,nosuid,nodev")]);
    // The project policy tier, read-only over the workspace's own (the
    // engine orders nested mounts after their parent).
    for rel in &sb.read_only_in_workspace {
        push(&[
            "-v",
            &vol(
                &ws.join(rel),
                &Path::new("/workspace").join(rel).display().to_string(),
                "ro,nosuid,nodev",
            ),
        ]);
    }
    push(&["-v", &vol(home, "/home/dev", "rw,nosuid,nodev")]);
    push(&[
        "-v",
        &vol(&c.toolpacks, "/opt/toolpacks", "ro,nosuid,nodev"),
    ]);
    push(&[
        "-v",
        &vol(&c.aibox_binary, aibox_sandbox::container::BINARY, "ro"),
    ]);
    push(&[
        "-v",
        &vol(&c.aibox_binary, aibox_sandbox::container::PUSH_HELPER, "ro"),
    ]);
    if !sb.masked.is_empty() {
        // runc masks as aibox does natively: /dev/null over a file, an
        // empty read-only tmpfs over a directory (checked beforehand in
        // `prepare`; the CLI refuses docker and gVisor).
        push(&["--security-opt", &format!("mask={}", sb.masked.join(":"))]);
    }
    if sb.exec_gate && c.gvisor.is_none() {
        push(&[
            "-v",
            &vol(
                &join_socket(spec),
                aibox_sandbox::container::GATE_SOCKET,
                "rw",
            ),
        ]);
    }
    if let Some(hooks) = &sb.gate_socket {
        push(&["-v", &vol(hooks, "/aibox/gate.sock", "rw")]);
        for (host, inside, _) in etc_paths(spec) {
            push(&["-v", &vol(&host, &inside, "ro")]);
        }
    }
    if net.is_some() {
        push(&[
            "-v",
            &vol(
                &egress_socket(spec),
                aibox_sandbox::container::EGRESS_SOCKET,
                "rw",
            ),
        ]);
        push(&["-v", &vol(&resolv_path(spec), "/etc/resolv.conf", "ro")]);
        if spec.network.as_ref().is_some_and(|n| {
            n.gateway.is_some()
                || n.credentials
                    .as_ref()
                    .is_some_and(|c| !c.credentials.is_empty())
        }) {
            let (alone, bundle) = ca_paths(spec);
            push(&["-v", &vol(&alone, aibox_sandbox::CA_PATH, "ro")]);
            push(&["-v", &vol(&bundle, aibox_sandbox::CA_BUNDLE, "ro")]);
        }
    }
    for (kind, dst) in CACHES {
        let volume = cache_volume(kind, c.gvisor.is_some());
        push(&["-v", &vol(Path::new(&volume), dst, "rw,nosuid,nodev")]);
    }
    if let Some(g) = &c.gvisor {
        push(&["--runtime", &g.runsc.display().to_string()]);
        if engine == Engine::Podman {
            let mut flags = vec![
                "network=none".to_string(),
                format!("platform={}", g.platform),
            ];
            if !skip("seccomp") {
                flags.push("oci-seccomp".into());
            }
            if net.is_some() {
                // Lets the sandbox connect to the one host socket it is
                // given (the egress); it still cannot create any.
                flags.push("host-uds=open".into());
            }
            for f in &flags {
                push(&["--runtime-flag", f]);
            }
        }
    }
    if c.image.starts_with("localhost/") {
        // A local image is built, never pulled: a missing one is an
        // "image not known" with the fix, not a failed pull from localhost.
        push(&["--pull=never"]);
    }
    let mut tail: Vec<String> = vec![
        c.image.clone(),
        aibox_sandbox::container::BINARY.into(),
        aibox_sandbox::container::INIT_ARG.into(),
    ];
    if let Some(n) = net {
        tail.push(aibox_sandbox::container::NET_FLAG.into());
        tail.push(serde_json::to_string(&n).unwrap_or_default());
    }
    (a, tail)
}

/// Everything of a container sandbox but the container: mounts, cache
/// volumes, the seccomp profile, the record, and the `ENGINE run` command.
#[derive(Debug)]
pub struct Prepared {
    engine: Engine,
    rootless: bool,
    gvisor: bool,
    guest: (u32, u32),
    head: Vec<String>,
    tail: Vec<String>,
    cidfile: PathBuf,
    run_dir: PathBuf,
    record: Record,
    record_path: PathBuf,
    home: PathBuf,
    /// The session shim's options (see [`session_flags`]).
    session_flags: Vec<String>,
}

/// The first command of a one-shot sandbox (`aibox run`): it starts with
/// the container, in one engine call, and the container ends with it.
#[derive(Debug)]
pub struct First {
    /// Session id.
    pub id: u64,
    /// The command.
    pub req: aibox_sandbox::SpawnRequest,
    /// The client's stdin, stdout and stderr.
    pub stdio: [OwnedFd; 3],
}

impl Prepared {
    /// Which container and mounts belong to the sandbox.
    pub fn record(&self) -> &Record {
        &self.record
    }
}

/// Sets up everything but the container; on failure nothing is left.
/// (`aibox start` refuses docker without root before it gets here.)
pub fn prepare(spec: &SupervisorSpec, c: &ContainerSpec) -> Result<Prepared, String> {
    let engine = engine_of(&c.engine)?;
    let rootless = aibox_core::euid() != 0;
    let record = Record {
        engine: c.engine.clone(),
        container_name: c.container_name.clone(),
        mounts_dir: c.mounts_dir.clone(),
    };
    write_private(
        &c.record,
        serde_json::to_string(&record)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let guest = if rootless {
        (aibox_core::euid(), nix::unistd::getegid().as_raw())
    } else {
        rootful_guest(engine, c.gvisor.is_some())
    };
    let p = Prepared {
        engine,
        rootless,
        gvisor: c.gvisor.is_some(),
        guest,
        head: Vec::new(),
        tail: Vec::new(),
        cidfile: cid_path(spec),
        run_dir: spec.run_dir.clone(),
        record,
        record_path: c.record.clone(),
        home: spec.sandbox.home.clone(),
        session_flags: session_flags(spec, c.gvisor.is_some()),
    };
    let mut p = p;
    match prepare_inner(spec, c, &mut p) {
        Ok(()) => Ok(p),
        Err(e) => {
            undo(&p);
            Err(e)
        }
    }
}

/// Removes what a failed start made (container, mounts, record, the cache
/// mount points in the home).
pub fn discard(p: &Prepared) {
    undo(p)
}

fn undo(p: &Prepared) {
    let _ = remove(&p.record);
    let _ = std::fs::remove_file(&p.record_path);
    remove_cache_points(&p.home);
    // A home left empty goes too (a one-shot start fails after the client
    // made it; an empty home is recreated by the next start anyway).
    let _ = std::fs::remove_dir(&p.home);
}

fn prepare_inner(spec: &SupervisorSpec, c: &ContainerSpec, p: &mut Prepared) -> Result<(), String> {
    let sb = &spec.sandbox;
    if !sb.masked.is_empty() {
        if p.engine != Engine::Podman || p.gvisor {
            return Err(
                "filesystem.deny is enforced on podman with runc only (and natively)".into(),
            );
        }
        aibox_sandbox::check_host_masks(&sb.masked, &sb.workspace, &sb.home)?;
    }
    let invoker = (aibox_core::euid(), nix::unistd::getegid().as_raw());
    let mounts = (|| -> Result<(PathBuf, PathBuf), String> {
        // Mount points of the caches inside the home must exist beforehand:
        // the runtime cannot create them through an idmapped mount.
        for (_, dst) in CACHES {
            if let Some(rel) = dst.strip_prefix("/home/dev/") {
                open_beneath(&sb.home, rel, true)?;
            }
        }
        ensure_dir(&c.toolpacks)?;
        ensure_caches(p.engine, p.guest, p.rootless, p.gvisor)?;

        let seccomp = seccomp_path(spec);
        let profile = aibox_sandbox::seccomp::SyscallPolicy::embedded()
            .and_then(|p| p.oci_profile())
            .map_err(|e| e.to_string())?;
        write_private(
            &seccomp,
            serde_json::to_string_pretty(&profile)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        // Readable by the runtime inside the user namespace (rootful podman).
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&seccomp, std::fs::Permissions::from_mode(0o644));
        if let Some(n) = &spec.network {
            let resolv = resolv_path(spec);
            write_private(
                &resolv,
                format!(
                    "nameserver {}\noptions edns0 attempts:1 timeout:2\n",
                    n.dns_addr
                )
                .as_bytes(),
            )?;
            // Read by the guest, whose uid is not ours.
            std::fs::set_permissions(&resolv, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| format!("writing the sandbox's resolv.conf: {e}"))?;
        }

        if p.rootless {
            return Ok((sb.workspace.clone(), sb.home.clone()));
        }
        ensure_dir(&c.mounts_dir)?;
        let ws = c.mounts_dir.join("workspace");
        let home = c.mounts_dir.join("home");
        for (src, dst) in [(&sb.workspace, &ws), (&sb.home, &home)] {
            ensure_dir(dst)?;
            // gVisor's gofer (host root) creates files before chowning
            // them to the guest: root writes land as the overflow id.
            let spare = c.gvisor.as_ref().map(|_| (65534, 0));
            aibox_sandbox::idmapped_bind(src, dst, invoker, p.guest, spare)
                .map_err(|e| e.to_string())?;
        }
        // The workspace that got mounted must be the one validated.
        if let Some((dev, ino)) = sb.workspace_id {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&ws).map_err(|e| format!("checking the workspace: {e}"))?;
            if (m.dev(), m.ino()) != (dev, ino) {
                return Err("the workspace changed while it was being mounted; try again".into());
            }
        }
        Ok((ws, home))
    })();
    let (ws, home) = mounts?;
    (p.head, p.tail) = run_args(spec, c, p.engine, p.rootless, &ws, &home);
    Ok(())
}

/// Creates and starts the container (with `first` as its one command,
/// if given) and returns once the init's self-test passed. On failure
/// nothing is left behind.
pub fn launch(p: &Prepared, first: Option<First>) -> Result<Started, String> {
    let r = launch_inner(p, first);
    if r.is_err() {
        undo(p);
    }
    r
}

fn launch_inner(p: &Prepared, first: Option<First>) -> Result<Started, String> {
    let engine = p.engine;
    let mut cmd = engine.command(&p.head);
    let (mut stdin, mut stdout, mut stderr) = (None, None, None);
    let mut tail = p.tail.clone();
    let one_shot = first.is_some();
    let mut env_path = None;
    if let Some(f) = first {
        // One call does it all: podman removes the container when the
        // command (and with it the init) ends.
        let env = env_file(&p.run_dir, f.id, &f.req)?;
        cmd.args(["-i", "--rm", "-w", &f.req.cwd, "--env-file"])
            .arg(&env);
        env_path = Some(env);
        tail.extend([
            aibox_sandbox::container::FIRST_FLAG.to_string(),
            f.id.to_string(),
        ]);
        tail.extend(p.session_flags.iter().cloned());
        tail.push("--".to_string());
        tail.extend(f.req.argv.iter().cloned());
        let [i, o, e] = f.stdio;
        (stdin, stdout, stderr) = (Some(i), Some(o), Some(e));
    }
    cmd.args(&tail);
    // The exact command, for the supervisor log (no secrets are in it:
    // environment values are passed by name).
    eprintln!(
        "aibox supervisor: {} {} {}",
        engine.program(),
        p.head.join(" "),
        tail.join(" ")
    );
    cmd.stdin(stdin.map_or_else(Stdio::null, Stdio::from))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // No PR_SET_PDEATHSIG here: killing a rootless podman client takes its
    // container with it, and the container must outlive a dead supervisor
    // (this client then ends with the container).
    let run = |cmd: &mut Command| -> Result<(Child, SelfTestReport), String> {
        // The engines refuse an existing id file (one may be left by a
        // supervisor that died).
        let _ = std::fs::remove_file(&p.cidfile);
        let mut child = cmd.spawn().map_err(|e| engine.spawn_error(e).to_string())?;
        let report = read_report(engine, &mut child)?;
        Ok((child, report))
    };
    // A container of this name without a record (the record is how stale
    // ones are normally found and removed before a start) is removed and
    // the start tried once more; no probe on the common path.
    let result = match run(&mut cmd) {
        Err(e) if e.contains("already in use") => {
            // (Only the container: the mounts it would use are ours.)
            let _ = remove_container(&p.record.engine, &p.record.container_name);
            run(&mut cmd)
        }
        r => r,
    };
    // The engine has read the environment file by the time the init spoke.
    if let Some(env) = env_path {
        let _ = std::fs::remove_file(env);
    }
    let (mut waiter, report) = result?;
    if let Some(f) = report.failure() {
        let _ = waiter.kill();
        let _ = waiter.wait();
        return Err(format!("sandbox self-test failed: {f}"));
    }
    // A persistent container's later messages (why it died, say) go to
    // the supervisor log, which is our stderr.
    let stderr = stderr.or_else(|| std::io::stderr().as_fd().try_clone_to_owned().ok());
    let relays = [
        relay(waiter.stdout.take(), stdout),
        relay(waiter.stderr.take(), stderr),
    ]
    .into_iter()
    .flatten()
    .collect();
    let id = std::fs::read_to_string(&p.cidfile)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("reading {}: {e}", p.cidfile.display()))?;
    // Informational (status, audit), and not looked up for a one-shot
    // container: it may be gone already, and the lookup would compete
    // with its command. 0 = unknown.
    let init_pid = if one_shot {
        0
    } else {
        engine
            .json::<serde_json::Value>("inspect", &["container", "inspect", &id])
            .ok()
            .and_then(|info| info.get(0)?.get("State")?.get("Pid")?.as_i64())
            .unwrap_or(0) as i32
    };
    Ok(Started {
        id,
        init_pid,
        report,
        guest_host_uid: p.guest.0,
        rootless: p.rootless,
        waiter,
        relays,
    })
}

/// Copies what the engine still writes to `to` (the client's descriptor
/// of a one-shot command) or nowhere, on a thread that takes no signals
/// (the supervisor turns signals into stop requests on another thread).
/// The pipe is drained to the end: closing it would end the engine.
fn relay<R: std::io::Read + Send + 'static>(
    from: Option<R>,
    to: Option<OwnedFd>,
) -> Option<std::thread::JoinHandle<()>> {
    let mut from = from?;
    Some(std::thread::spawn(move || {
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&nix::sys::signal::SigSet::all()),
            None,
        );
        match to {
            Some(fd) => {
                let mut f = std::fs::File::from(fd);
                let _ = std::io::copy(&mut from, &mut f);
                // A closed client stops mattering; keep draining.
                let _ = std::io::copy(&mut from, &mut std::io::sink());
            }
            None => {
                let _ = std::io::copy(&mut from, &mut std::io::sink());
            }
        }
    }))
}

/// Reads the self-test report the container init prints first. If the
/// engine ends without one, its error output (read to the end, the engine
/// has exited) explains why.
fn read_report(engine: Engine, run: &mut Child) -> Result<SelfTestReport, String> {
    use std::io::Read;
    let mut line = Vec::new();
    if let Some(out) = run.stdout.as_mut() {
        // Byte by byte: nothing after the report line may be consumed
        // here (it is the one-shot command's output).
        let mut b = [0u8; 1];
        while let Ok(1) = out.read(&mut b) {
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        let mut err = String::new();
        if let Some(mut e) = run.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = run.wait();
        return Err(format!(
            "{} run failed: {}",
            engine.program(),
            aibox_engine::explain(&err)
        ));
    }
    serde_json::from_slice(&line).map_err(|e| {
        format!(
            "the container init printed something unreadable ({e}): {}",
            String::from_utf8_lossy(&line)
        )
    })
}

/// One `ENGINE exec` session.
#[derive(Debug)]
pub struct Exec {
    /// The engine process.
    pub child: Child,
    /// Terminal master (tty sessions).
    pub master: Option<OwnedFd>,
    /// The environment file; remove it once the engine process ended.
    pub env_file: PathBuf,
}

/// Writes the request's environment to a private file for the engine's
/// `--env-file` (so values never reach the host's process list or the
/// engine's own environment) and returns its path; the caller removes it
/// once the engine has started the process. Names must be plain
/// identifiers (the engines read `*` as a pattern over their own
/// environment) and values one line. Variables the dynamic loader reads
/// are held under [`aibox_sandbox::container::HELD_PREFIX`] and restored
/// by the session shim for the command alone, so they cannot act on the
/// aibox binary inside before it has applied its layers.
fn env_file(run_dir: &Path, id: u64, req: &aibox_sandbox::SpawnRequest) -> Result<PathBuf, String> {
    let mut text = String::new();
    for kv in &req.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        let ident = k
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
        if k.is_empty() || !ident {
            return Err(format!(
                "environment variable name {k:?} is not a plain identifier (letters, digits, _)"
            ));
        }
        if v.contains(['\n', '\0']) {
            return Err(format!(
                "the value of {k} contains a newline or NUL, which the container engines cannot pass"
            ));
        }
        let name = if aibox_sandbox::container::held(k) {
            format!("{}{k}", aibox_sandbox::container::HELD_PREFIX)
        } else {
            k.to_string()
        };
        text.push_str(&format!("{name}={v}\n"));
    }
    let path = run_dir.join(format!("env-{id}"));
    write_private(&path, text.as_bytes())?;
    Ok(path)
}

/// Starts `argv` in the container through the session shim.
pub fn exec(
    engine: Engine,
    name: &str,
    flags: &[String],
    run_dir: &Path,
    id: u64,
    req: &aibox_sandbox::SpawnRequest,
    fds: Vec<OwnedFd>,
) -> Result<Exec, String> {
    let mut args: Vec<String> = vec!["exec".into(), "-i".into()];
    if req.tty.is_some() {
        args.push("-t".into());
    }
    args.extend([
        "--user".into(),
        "1000:1000".into(),
        "-w".into(),
        req.cwd.clone(),
    ]);
    let env = env_file(run_dir, id, req)?;
    args.extend(["--env-file".into(), env.display().to_string()]);
    let mut cmd = engine.command(&[] as &[&str]);
    args.extend([
        name.to_string(),
        aibox_sandbox::container::BINARY.to_string(),
        aibox_sandbox::container::SESSION_ARG.to_string(),
        id.to_string(),
    ]);
    args.extend(flags.iter().cloned());
    args.push("--".to_string());
    args.extend(req.argv.iter().cloned());
    cmd.args(&args);
    let master = match req.tty {
        Some(ws) => {
            let size = nix::pty::Winsize {
                ws_row: ws.rows,
                ws_col: ws.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&size), None)
                .map_err(|e| format!("allocating a terminal: {e}"))?;
            // Not inherited by engine processes other threads spawn.
            for fd in [&pty.master, &pty.slave] {
                let _ = nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
            }
            let slave = pty.slave;
            cmd.stdin(Stdio::from(
                slave.try_clone().map_err(|e| format!("terminal: {e}"))?,
            ))
            .stdout(Stdio::from(
                slave.try_clone().map_err(|e| format!("terminal: {e}"))?,
            ))
            .stderr(Stdio::from(slave));
            // The engine owns the terminal and gets its SIGWINCH.
            aibox_sandbox::sys::new_session_with_tty_on_exec(&mut cmd);
            Some(pty.master)
        }
        None => {
            let mut it = fds.into_iter();
            let (Some(i), Some(o), Some(e)) = (it.next(), it.next(), it.next()) else {
                return Err("stdin/stdout/stderr were not attached".into());
            };
            cmd.stdin(Stdio::from(i))
                .stdout(Stdio::from(o))
                .stderr(Stdio::from(e));
            // Own process group: the terminal's signals are the client's business.
            cmd.process_group(0);
            None
        }
    };
    let child = cmd.spawn().map_err(|e| {
        let _ = std::fs::remove_file(&env);
        engine.spawn_error(e).to_string()
    })?;
    Ok(Exec {
        child,
        master,
        env_file: env,
    })
}

/// Sends `signal` to session `id` (through the in-container helper, since
/// the engines do not forward signals to exec'd processes). Retries while
/// the session has not recorded its pid yet.
pub fn signal(engine: Engine, name: &str, id: u64, signal: i32) {
    for _ in 0..20 {
        let st = engine
            .command([
                "exec",
                "--user",
                "1000:1000",
                name,
                aibox_sandbox::container::BINARY,
                aibox_sandbox::container::SIGNAL_ARG,
                &id.to_string(),
                &signal.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match st.ok().and_then(|s| s.code()) {
            Some(3) => std::thread::sleep(std::time::Duration::from_millis(50)),
            _ => return,
        }
    }
}
