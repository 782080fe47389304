//! The in-sandbox self-test: run by init after hardening, from inside the
//! sandbox, to prove each layer is live before `aibox start` reports ready.

use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};

use crate::landlock_rules::LandlockState;

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Layer name (`uid`, `capabilities`, `seccomp`, …).
    pub layer: String,
    /// Passed?
    pub ok: bool,
    /// What was observed.
    pub detail: String,
    /// How to fix a failure.
    pub fix: String,
}

/// All checks, plus the Landlock facts the status command shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTestReport {
    /// Checks in order.
    pub checks: Vec<Check>,
    /// Landlock ABI of the kernel (0 = none).
    pub landlock_abi: i32,
    /// Landlock enforcement.
    pub landlock: LandlockState,
}

impl SelfTestReport {
    /// First failed check as a message naming the layer and the fix.
    pub fn failure(&self) -> Option<String> {
        self.checks.iter().find(|c| !c.ok).map(|c| {
            format!(
                "layer `{}` is not live: {}; fix: {}",
                c.layer, c.detail, c.fix
            )
        })
    }
}

fn status_fields() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        })
        .collect()
}

fn field(fields: &[(String, String)], name: &str) -> String {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Checks, in a session process about to run its command, that the
/// engine's layers are on it: a seccomp filter, no_new_privs, and no
/// capabilities.
pub fn session_layers() -> Result<(), String> {
    let st = status_fields();
    if field(&st, "Seccomp") != "2" {
        return Err(format!(
            "no seccomp filter (Seccomp={})",
            field(&st, "Seccomp")
        ));
    }
    if nix::sys::prctl::get_no_new_privs() != Ok(true) {
        return Err("no_new_privs is not set".into());
    }
    for cap in ["CapEff", "CapPrm"] {
        let v = field(&st, cap);
        if v.is_empty() || v.chars().any(|c| c != '0') {
            return Err(format!("capabilities present ({cap}={v})"));
        }
    }
    Ok(())
}

/// True when the mount holding `dir` (longest mount-point prefix in
/// `/proc/self/mounts`) is read-only.
fn mount_is_ro(dir: &str) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, bool)> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(mp), Some(opts)) = (f.get(1), f.get(3)) else {
            continue;
        };
        let covers =
            *mp == "/" || dir == *mp || dir.strip_prefix(mp).is_some_and(|r| r.starts_with('/'));
        if covers && best.is_none_or(|(len, _)| mp.len() >= len) {
            best = Some((mp.len(), opts.split(',').any(|o| o == "ro")));
        }
    }
    best.is_some_and(|(_, ro)| ro)
}

/// Runs every check in the calling (sandboxed) process: the native init.
pub fn run(landlock_abi: i32, landlock: Option<LandlockState>) -> SelfTestReport {
    run_inner(landlock_abi, landlock, false)
}

/// The same checks for a process `podman exec`/`docker exec` started in a
/// container: PID 1 is then the aibox container init, not the caller.
pub fn run_container(landlock_abi: i32, landlock: Option<LandlockState>) -> SelfTestReport {
    run_inner(landlock_abi, landlock, true)
}

fn run_inner(
    landlock_abi: i32,
    landlock: Option<LandlockState>,
    container: bool,
) -> SelfTestReport {
    let mut checks = Vec::new();
    let mut add = |layer: &str, ok: bool, detail: String, fix: &str| {
        checks.push(Check {
            layer: layer.into(),
            ok,
            detail,
            fix: fix.into(),
        })
    };

    let (uid, gid) = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let euid = nix::unistd::geteuid().as_raw();
    add(
        "uid",
        uid == 1000 && euid == 1000 && gid == 1000,
        format!("uid={uid} euid={euid} gid={gid}"),
        "report a bug: the user namespace maps must give uid/gid 1000",
    );

    let st = status_fields();
    // gVisor's /proc has no CapAmb line; the other four must be there.
    let caps: Vec<(String, String)> = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
        .iter()
        .map(|k| (k.to_string(), field(&st, k)))
        .filter(|(k, v)| k != "CapAmb" || !v.is_empty())
        .collect();
    let caps_zero = caps.len() >= 4
        && caps
            .iter()
            .all(|(_, v)| !v.is_empty() && v.chars().all(|c| c == '0'));
    add(
        "capabilities",
        caps_zero,
        caps.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        "report a bug: every capability set must be empty",
    );
    // Asked of the kernel, not /proc (gVisor's status file lacks the line).
    let nnp = nix::sys::prctl::get_no_new_privs();
    add(
        "no_new_privs",
        nnp == Ok(true),
        format!("PR_GET_NO_NEW_PRIVS -> {nnp:?}"),
        "report a bug: PR_SET_NO_NEW_PRIVS must be set",
    );

    // A filter must be installed and must actually refuse a denied call.
    let mode = field(&st, "Seccomp");
    let unshare = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER);
    add(
        "seccomp",
        mode == "2" && unshare == Err(nix::errno::Errno::EPERM),
        format!("Seccomp={mode}, unshare(CLONE_NEWUSER) -> {unshare:?}"),
        "the kernel must support seccomp filters (CONFIG_SECCOMP_FILTER); see `aibox doctor`",
    );

    let ifaces: Vec<String> = std::fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_string()))
        .collect();
    add(
        "network",
        ifaces == ["lo"],
        format!("interfaces: {}", ifaces.join(",")),
        "report a bug: the network namespace must hold only lo",
    );

    let mut ro_detail = Vec::new();
    let mut ro_ok = true;
    // The mounts themselves must be read-only (Landlock alone would also
    // refuse the writes below, hiding a missing remount).
    for dir in ["/", "/usr", "/etc"] {
        match nix::sys::statvfs::statvfs(dir) {
            Ok(st) if st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) => {}
            // gVisor's statfs reports no flags; its mount table is the truth.
            Ok(_) if container && mount_is_ro(dir) => {}
            Ok(_) => {
                ro_ok = false;
                ro_detail.push(format!("{dir} is mounted read-write"));
            }
            Err(e) => {
                ro_ok = false;
                ro_detail.push(format!("statvfs {dir}: {e}"));
            }
        }
    }
    for probe in ["/.aibox-probe", "/usr/.aibox-probe", "/etc/.aibox-probe"] {
        let r = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(probe);
        match r {
            Ok(_) => {
                ro_ok = false;
                let _ = std::fs::remove_file(probe);
                ro_detail.push(format!("{probe} writable"));
            }
            Err(e) => ro_detail.push(format!("{probe}: {e}")),
        }
    }
    add(
        "read_only_root",
        ro_ok,
        ro_detail.join("; "),
        "report a bug: the root must be mounted read-only",
    );

    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    add(
        "uts",
        host == aibox_core::guest::HOSTNAME,
        format!("hostname={host}"),
        "report a bug",
    );
    if container {
        let cmdline = std::fs::read("/proc/1/cmdline").unwrap_or_default();
        let want = format!(
            "{}\0{}\0",
            crate::container::BINARY,
            crate::container::INIT_ARG
        );
        add(
            "pid_namespace",
            cmdline.starts_with(want.as_bytes()),
            format!(
                "PID 1 is {:?}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ").trim()
            ),
            "report a bug: the aibox init must be PID 1 of the container",
        );
    } else {
        let pid = std::process::id();
        add(
            "pid_namespace",
            pid == 1,
            format!("init pid={pid}"),
            "report a bug",
        );
    }

    // Landlock: where the kernel has it, it must be enforced, and a write
    // that only Landlock forbids (procfs is mounted read-write) must fail.
    let (ok, detail) = match landlock {
        None => (true, "kernel has no Landlock (ABI 0)".to_string()),
        Some(LandlockState::Unavailable) => (
            false,
            format!("kernel ABI {landlock_abi} but the ruleset is not enforced"),
        ),
        Some(state) => {
            let probe = std::fs::OpenOptions::new()
                .write(true)
                .open("/proc/self/comm");
            let denied = matches!(&probe, Err(e) if e.raw_os_error() == Some(libc::EACCES));
            (
                denied,
                format!(
                    "ABI {landlock_abi}, {state:?}, write /proc/self/comm -> {:?}",
                    probe.map(|_| "allowed")
                ),
            )
        }
    };
    add(
        "landlock",
        ok,
        detail,
        "boot with lsm=...,landlock, or set sandbox.landlock: best_effort on kernels without it",
    );

    SelfTestReport {
        checks,
        landlock_abi,
        landlock: landlock.unwrap_or(LandlockState::Unavailable),
    }
}
