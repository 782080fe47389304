//! `aibox doctor`: checks the host, with a fix for every problem.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::args::{DoctorArgs, Format};

#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Finding {
    check: &'static str,
    status: Level,
    detail: String,
    fix: String,
}

fn read(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn on_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

pub fn run(cli_config: Option<PathBuf>, a: DoctorArgs) -> Result<i32> {
    let mut f: Vec<Finding> = Vec::new();
    let mut add = |check, status, detail: String, fix: &str| {
        f.push(Finding {
            check,
            status,
            detail,
            fix: fix.into(),
        })
    };

    let loaded = super::load_config(cli_config);
    match &loaded {
        Ok(_) => add(
            "config",
            Level::Ok,
            "configuration loads and validates".into(),
            "",
        ),
        Err(e) => add(
            "config",
            Level::Fail,
            format!("{e:#}"),
            "correct the config file named above",
        ),
    }

    // User namespaces: sysctls that distributions use to switch them off.
    let max = read("/proc/sys/user/max_user_namespaces")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let clone = read("/proc/sys/kernel/unprivileged_userns_clone");
    let aa = read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    if max == 0 {
        add(
            "user_namespaces",
            Level::Fail,
            "user.max_user_namespaces is 0".into(),
            "sysctl -w user.max_user_namespaces=15000 (and persist it in /etc/sysctl.d)",
        );
    } else if clone.as_deref() == Some("0") {
        add(
            "user_namespaces",
            Level::Fail,
            "kernel.unprivileged_userns_clone is 0".into(),
            "sysctl -w kernel.unprivileged_userns_clone=1 (and persist it in /etc/sysctl.d)",
        );
    } else if aa.as_deref() == Some("1") {
        add("user_namespaces", Level::Fail, "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1)".into(), "install an AppArmor profile granting `userns` to the aibox binary, or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0");
    } else {
        add(
            "user_namespaces",
            Level::Ok,
            format!("enabled (max {max})"),
            "",
        );
    }

    let actions = read("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
    if actions.split_whitespace().any(|x| x == "errno") {
        let notif = actions.split_whitespace().any(|x| x == "user_notif");
        add(
            "seccomp",
            Level::Ok,
            format!("filters available ({actions})"),
            "",
        );
        if !notif {
            add(
                "seccomp_notify",
                Level::Warn,
                "no SECCOMP_RET_USER_NOTIF: the exec gate cannot run".into(),
                "use Linux 5.5 or newer",
            );
        }
    } else {
        add(
            "seccomp",
            Level::Fail,
            "seccomp filters unavailable".into(),
            "use a kernel built with CONFIG_SECCOMP_FILTER",
        );
    }

    let abi = aibox_sandbox::landlock_rules::kernel_abi();
    let required = loaded
        .as_ref()
        .map(|(l, _)| l.config.sandbox.landlock == aibox_config::LandlockMode::Required)
        .unwrap_or(false);
    match (abi, required) {
        (0, true) => add(
            "landlock",
            Level::Fail,
            "no Landlock, but sandbox.landlock is required".into(),
            "boot with lsm=…,landlock (CONFIG_SECURITY_LANDLOCK), or set sandbox.landlock: best_effort",
        ),
        (0, false) => add(
            "landlock",
            Level::Warn,
            "no Landlock: write limits rest on read-only mounts alone".into(),
            "boot with lsm=…,landlock (CONFIG_SECURITY_LANDLOCK)",
        ),
        (n, _) if n < 6 => add(
            "landlock",
            Level::Info,
            format!("ABI {n}: enforced partially (aibox asks for ABI 6)"),
            "a newer kernel enforces signal and abstract-socket scoping too",
        ),
        (n, _) => add("landlock", Level::Ok, format!("ABI {n}"), ""),
    }

    let v1 = Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists()
        && Path::new("/sys/fs/cgroup/cpu/cgroup.procs").exists();
    if v1 && aibox_core::euid() == 0 {
        add("cgroups", Level::Ok, "cgroup v1 memory/cpu/pids controllers: cpus and memory are enforced for sandboxes started as root".into(), "");
    } else {
        let why = if aibox_core::euid() == 0 {
            "no cgroup v1 memory/cpu controllers (cgroup v2 is not managed yet)"
        } else {
            "no cgroup is delegated to this user"
        };
        add(
            "cgroups",
            Level::Warn,
            format!("{why}: cpus and memory are not enforced (status says so)"),
            "start sandboxes as root on a host with cgroup v1 controllers; cgroup v2 delegation and the podman backend are planned",
        );
    }

    if let Ok((l, _)) = &loaded {
        let nofile = l.config.resources.nofile;
        if let Ok((_, hard)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            if nofile > hard {
                add(
                    "nofile",
                    Level::Fail,
                    format!("resources.nofile {nofile} exceeds the hard limit {hard}"),
                    "aibox config set resources.nofile <= the hard limit",
                );
            } else {
                add(
                    "nofile",
                    Level::Ok,
                    format!("resources.nofile {nofile} <= hard limit {hard}"),
                    "",
                );
            }
        }
        let dir = l.data_dir();
        let mut probe = dir.as_path();
        while !probe.exists() {
            probe = probe.parent().unwrap_or(Path::new("/"));
        }
        if let Ok(st) = nix::sys::statvfs::statvfs(probe) {
            let free = st.blocks_available() * st.fragment_size();
            let gib = free as f64 / (1u64 << 30) as f64;
            let (lvl, fix) = if free < (100 << 20) {
                (
                    Level::Fail,
                    "free space on that filesystem, or set paths.data_dir elsewhere",
                )
            } else if free < (1 << 30) {
                (
                    Level::Warn,
                    "free space on that filesystem, or set paths.data_dir elsewhere",
                )
            } else {
                (Level::Ok, "")
            };
            add(
                "disk_space",
                lvl,
                format!("{gib:.1} GiB free for {}", dir.display()),
                fix,
            );
        }
        match probe_sandbox(l) {
            Ok(s) => add("sandbox", Level::Ok, s, ""),
            Err(e) => add(
                "sandbox",
                Level::Fail,
                e,
                "fix the layer named above; the checks before this one usually say how",
            ),
        }
    }

    let apparmor =
        read("/sys/module/apparmor/parameters/enabled").is_some_and(|v| v.starts_with('Y'));
    if apparmor {
        add(
            "apparmor",
            Level::Ok,
            "AppArmor is active: container sandboxes get configs/apparmor/aibox-default".into(),
            "",
        );
    } else {
        add(
            "apparmor",
            Level::Info,
            "this kernel has no AppArmor: container sandboxes run without the aibox-default profile (seccomp, dropped capabilities and the read-only root still apply; the native backend uses Landlock instead)".into(),
            "boot a kernel with AppArmor (security=apparmor) to add that layer",
        );
    }

    if aibox_core::euid() != 0 {
        let primary = nix::unistd::getegid();
        let extra: Vec<String> = nix::unistd::getgroups()
            .unwrap_or_default()
            .into_iter()
            .filter(|g| *g != primary)
            .map(|g| {
                nix::unistd::Group::from_gid(g)
                    .ok()
                    .flatten()
                    .map(|gr| gr.name)
                    .unwrap_or_else(|| g.to_string())
            })
            .collect();
        if extra.is_empty() {
            add("groups", Level::Ok, "no supplementary groups".into(), "");
        } else {
            add(
                "groups",
                Level::Warn,
                format!(
                    "rootless sandboxes keep your supplementary groups for file access: {}",
                    extra.join(", ")
                ),
                "files those groups may read in /etc and /usr stay readable inside; use an account without them, or start sandboxes as root",
            );
        }
    }

    // Container engines (needed only for `runtime: podman|docker`).
    let uses_engine = loaded
        .as_ref()
        .map(|(l, _)| l.config.runtime != aibox_config::Runtime::Native)
        .unwrap_or(false);
    let missing_level = if uses_engine {
        Level::Fail
    } else {
        Level::Info
    };
    for engine in [aibox_engine::Engine::Podman, aibox_engine::Engine::Docker] {
        let check = if engine == aibox_engine::Engine::Podman {
            "podman"
        } else {
            "docker"
        };
        match engine.version() {
            Ok(v) => add(check, Level::Ok, format!("{} {v}", engine.program()), ""),
            Err(e) => add(
                check,
                missing_level,
                first_line(&e.to_string()),
                &fix_of(&e.to_string()),
            ),
        }
    }
    match on_path("runsc") {
        Some(p) => {
            let v = std::process::Command::new(&p).arg("--version").output();
            let version = v.ok().map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            });
            add(
                "gvisor",
                Level::Ok,
                format!("{} ({})", p.display(), version.unwrap_or_default()),
                "",
            );
            // The configured platform, and what start falls back to.
            let wanted = loaded
                .as_ref()
                .ok()
                .map(|(l, _)| match l.config.gvisor.platform {
                    aibox_config::GvisorPlatform::Systrap => "systrap",
                    aibox_config::GvisorPlatform::Ptrace => "ptrace",
                });
            match (aibox_engine::runsc_platforms(&p), wanted) {
                (Ok(offered), Some(w)) if offered.iter().any(|o| o == w) => add(
                    "gvisor_platform",
                    Level::Ok,
                    format!(
                        "gvisor.platform {w} is offered (runsc offers: {})",
                        offered.join(", ")
                    ),
                    "",
                ),
                (Ok(offered), Some(w)) if offered.iter().any(|o| o == "ptrace") => add(
                    "gvisor_platform",
                    Level::Warn,
                    format!(
                        "gvisor.platform {w} is not offered by this runsc (it offers: {}); sandboxes fall back to ptrace",
                        offered.join(", ")
                    ),
                    "set gvisor.platform: ptrace, or install a newer runsc",
                ),
                (Ok(offered), None) => add(
                    "gvisor_platform",
                    Level::Info,
                    format!("runsc offers: {}", offered.join(", ")),
                    "",
                ),
                (Ok(offered), Some(_)) => add(
                    "gvisor_platform",
                    Level::Fail,
                    format!("runsc offers only: {}", offered.join(", ")),
                    "set gvisor.platform to one of those",
                ),
                (Err(e), _) => add(
                    "gvisor_platform",
                    Level::Warn,
                    e.to_string(),
                    "check `runsc flags`",
                ),
            }
        }
        None => add(
            "gvisor",
            if loaded.as_ref().is_ok_and(|(l, _)| l.config.gvisor.enabled) {
                Level::Fail
            } else {
                Level::Info
            },
            "runsc is not installed (needed for gvisor.enabled)".into(),
            "apt-get install runsc",
        ),
    }
    if aibox_core::euid() != 0 && on_path("podman").is_some() {
        let user = aibox_core::current_user();
        let has_range = |file: &str| {
            std::fs::read_to_string(file)
                .unwrap_or_default()
                .lines()
                .any(|l| l.split(':').next() == Some(user.as_str()))
        };
        let mapper = on_path("newuidmap").is_some() || Path::new("/usr/bin/newuidmap").exists();
        if has_range("/etc/subuid") && has_range("/etc/subgid") && mapper {
            add(
                "rootless_podman",
                Level::Ok,
                format!("subordinate ids and newuidmap present for {user}"),
                "",
            );
        } else {
            add(
                "rootless_podman",
                if uses_engine {
                    Level::Fail
                } else {
                    Level::Warn
                },
                format!("rootless podman is not set up for {user}"),
                &format!(
                    "apt-get install uidmap; add `{user}:100000:65536` to /etc/subuid and /etc/subgid; then `podman system migrate`"
                ),
            );
        }
    }
    if let Ok((l, _)) = &loaded
        && l.config.runtime != aibox_config::Runtime::Native
    {
        let engine = if l.config.runtime == aibox_config::Runtime::Docker {
            aibox_engine::Engine::Docker
        } else {
            aibox_engine::Engine::Podman
        };
        match aibox_engine::image::id(engine, &l.config.image) {
            Ok(Some(id)) => add(
                "image",
                Level::Ok,
                format!("{} present ({})", l.config.image, &id[..12.min(id.len())]),
                "",
            ),
            Ok(None) => add(
                "image",
                Level::Fail,
                format!("{} is not in {}", l.config.image, engine.program()),
                "aibox image build",
            ),
            Err(e) => add(
                "image",
                Level::Fail,
                first_line(&e.to_string()),
                &fix_of(&e.to_string()),
            ),
        }
    }

    // The audit bucket (`audit.storage: s3`): reachable with the keys
    // given, and whether it locks what aibox writes.
    if let Ok((l, sources)) = &loaded
        && let Some(c) = l.config.audit.archive()
    {
        let opened = super::auth::archive_keys(l, sources, &c)
            .map_err(|e| format!("{e:#}"))
            .and_then(|keys| {
                aibox_siem::archive::Archive::open_with(&c, keys.as_ref())
                    .map_err(|e| e.to_string())
            });
        match opened {
            Ok(arch) if arch.locks() => add(
                "audit_storage",
                Level::Ok,
                format!(
                    "{}: reachable, objects locked ({} mode, {})",
                    arch.label(),
                    match c.lock_mode {
                        aibox_siem::archive::LockMode::Compliance => "compliance",
                        aibox_siem::archive::LockMode::Governance => "governance",
                    },
                    c.retention
                ),
                "",
            ),
            Ok(arch) => add(
                "audit_storage",
                Level::Warn,
                format!("{}: reachable, but objects are not locked", arch.label()),
                "create the bucket with object lock enabled (and keep audit.s3.object_lock: auto or required)",
            ),
            Err(e) => {
                let fix = match fix_of(&e) {
                    f if f.is_empty() => {
                        "see docs/audit.md (S3 storage); sealed segments stay local until it works"
                            .to_string()
                    }
                    f => f,
                };
                add("audit_storage", Level::Fail, first_line(&e), &fix)
            }
        }
    }

    let failing = |lvl: Level| lvl == Level::Fail || (a.strict && lvl == Level::Warn);
    let bad = f.iter().any(|x| failing(x.status));
    match a.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&f)?),
        Format::Text => {
            for x in &f {
                let tag = match x.status {
                    Level::Ok => "[OK]  ",
                    Level::Info => "[INFO]",
                    Level::Warn => "[WARN]",
                    Level::Fail => "[FAIL]",
                };
                println!("{tag} {}: {}", x.check, x.detail);
                if !x.fix.is_empty() && x.status != Level::Ok {
                    println!("       fix: {}", x.fix);
                }
            }
        }
    }
    Ok(if bad { 1 } else { 0 })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

fn fix_of(s: &str) -> String {
    s.lines()
        .find_map(|l| l.trim().strip_prefix("fix: "))
        .unwrap_or_default()
        .to_string()
}

/// Builds a throw-away native sandbox and reports its self-test.
fn probe_sandbox(l: &aibox_config::Loaded) -> Result<String, String> {
    let Ok(tmp) = tempfile::Builder::new().prefix("aibox-doctor-").tempdir() else {
        return Err("could not create a temporary directory for the probe".into());
    };
    let ws = tmp.path().join("ws");
    let home = tmp.path().join("home");
    let root = tmp.path().join("root");
    for d in [&ws, &home, &root] {
        let _ = std::fs::create_dir(d);
    }
    let spec = aibox_sandbox::SandboxSpec {
        name: "aibox-doctor-probe".into(),
        workspace: ws,
        home,
        root_dir: root,
        rootfs: (!l.config.sandbox.rootfs.is_empty())
            .then(|| PathBuf::from(&l.config.sandbox.rootfs)),
        tmp_size: "16m".into(),
        pids: 64,
        nofile: 256.min(l.config.resources.nofile),
        landlock_required: l.config.sandbox.landlock == aibox_config::LandlockMode::Required,
        cgroup: None,
        workspace_id: None,
        net: None,
        aibox_binary: None,
        extra_ca_pem: None,
        read_only_in_workspace: Vec::new(),
        masked: Vec::new(),
        exec_gate: false,
        exec_blocked: Vec::new(),
        etc_extra: Vec::new(),
        gate_socket: None,
    };
    let t0 = std::time::Instant::now();
    match aibox_sandbox::launch(&spec) {
        Ok(s) => {
            let ms = t0.elapsed().as_millis();
            let _ = aibox_sandbox::ipc::send(&s.control, &aibox_sandbox::ToInit::Shutdown, &[]);
            let _ = nix::sys::wait::waitpid(s.intermediate, None);
            Ok(format!(
                "native sandbox starts and passes its self-test ({} checks, {ms} ms)",
                s.report.checks.len()
            ))
        }
        Err(e) => Err(format!("native sandbox failed: {e}")),
    }
}
