//! Creating the sandbox: the intermediate process, namespaces, id maps and
//! the hardening sequence of init.
//!
//! Process tree: supervisor → intermediate (in the supervisor's pid
//! namespace; holds nothing, waits) → init (PID 1 of the sandbox). Both
//! children die with their parent (`PR_SET_PDEATHSIG`), and when init dies
//! the kernel kills every process of its pid namespace, so a `kill -9` of
//! the supervisor ends the whole sandbox.
//!
//! Rootless (`euid != 0`): the intermediate creates the user namespace
//! first, mapping guest uid/gid 1000 to the invoking user, then the other
//! namespaces; init builds the root with the namespace's capabilities.
//!
//! Rootful (`euid == 0`): the other namespaces are created first and init
//! builds the root as real root; it then enters a user namespace in which
//! guest uid/gid 1000 is an otherwise unused host id (see
//! [`guest_host_uid`]). Running the guest as host root would make every
//! root-owned host file (e.g. `/etc/shadow`) the guest's own. The workspace
//! and home are idmapped mounts, so files the guest writes there belong to
//! the invoking user on the host.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::sched::{CloneFlags, unshare};
use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid};
use sha2::{Digest, Sha256};

use crate::selftest::{self, SelfTestReport};
use crate::{
    FromInit, SandboxError, SandboxSpec, WRITABLE, init, ipc, landlock_rules, rootfs, seccomp, sys,
};

/// A running sandbox, as seen by the supervisor.
#[derive(Debug)]
pub struct Launched {
    /// The intermediate process (reap it to learn that the sandbox ended).
    pub intermediate: Pid,
    /// Host pid of the sandbox init.
    pub init_pid: i32,
    /// Control socket to init.
    pub control: OwnedFd,
    /// What the in-sandbox self-test found.
    pub report: SelfTestReport,
    /// True when started without root.
    pub rootless: bool,
    /// Host uid (and gid) that the guest's uid 1000 maps to.
    pub guest_host_uid: u32,
    /// The egress listeners of `spec.net`, in its order (empty without).
    pub net: Vec<OwnedFd>,
    /// The exec gate's seccomp listener (`spec.exec_gate`): every exec in
    /// the sandbox waits for an answer on it.
    pub gate: Option<OwnedFd>,
}

/// Host uid/gid used for the guest under a rootful start: 0x7F00_0000 plus
/// 24 bits of SHA-256(name). That range (≥ 2 130 706 432) sits far above
/// account ranges and typical `/etc/subuid` allocations; ids that do appear
/// in the password, group or subordinate-id files are skipped. Distinct per
/// sandbox, so process-count limits are not shared and no other process on
/// the host runs as the guest.
pub fn guest_host_uid(name: &str) -> u32 {
    const BASE: u32 = 0x7F00_0000;
    const SPAN: u32 = 1 << 24;
    let d = Sha256::digest(name.as_bytes());
    let start = u32::from_be_bytes([0, d[0], d[1], d[2]]);
    let taken = taken_ids();
    (0..64)
        .map(|i| BASE + (start + i) % SPAN)
        .find(|id| !taken.iter().any(|(lo, n)| *id >= *lo && *id - *lo < *n))
        .unwrap_or(BASE + start)
}

/// (first id, count) ranges used on this host.
fn taken_ids() -> Vec<(u32, u32)> {
    let mut v = Vec::new();
    for file in ["/etc/passwd", "/etc/group"] {
        for line in fs::read_to_string(file).unwrap_or_default().lines() {
            if let Some(id) = line.split(':').nth(2).and_then(|x| x.parse().ok()) {
                v.push((id, 1));
            }
        }
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        for line in fs::read_to_string(file).unwrap_or_default().lines() {
            let f: Vec<&str> = line.split(':').collect();
            if let (Some(lo), Some(n)) = (
                f.get(1).and_then(|x| x.parse().ok()),
                f.get(2).and_then(|x| x.parse().ok()),
            ) {
                v.push((lo, n));
            }
        }
    }
    v
}

const NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWNS
    .union(CloneFlags::CLONE_NEWPID)
    .union(CloneFlags::CLONE_NEWNET)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWUTS)
    .union(CloneFlags::CLONE_NEWCGROUP);

/// Time allowed for the sandbox to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Creates the sandbox and waits for its self-test. Must be called while
/// the process is single-threaded.
pub fn launch(spec: &SandboxSpec) -> Result<Launched, SandboxError> {
    let filters = seccomp::SyscallPolicy::embedded()?.compile()?;
    let uid = aibox_core::euid();
    let gid = aibox_core::egid();
    let rootless = uid != 0;
    let guest_host = if rootless {
        uid
    } else {
        guest_host_uid(&spec.name)
    };
    let supervisor = sys::getpid();
    let (ours, theirs) =
        ipc::pair().map_err(|e| SandboxError::sys("creating the control socket", e))?;

    match sys::fork().map_err(|e| SandboxError::sys("forking the sandbox", e))? {
        ForkResult::Child => {
            drop(ours);
            let code = match intermediate(
                spec, &theirs, &filters, rootless, uid, gid, guest_host, supervisor,
            ) {
                Ok(code) => code,
                Err(e) => {
                    let _ = ipc::send(&theirs, &FromInit::Failed(e.to_string()), &[]);
                    1
                }
            };
            sys::exit_now(code)
        }
        ForkResult::Parent { child } => {
            drop(theirs);
            match wait_ready(&ours) {
                Ok((init_pid, report, mut net)) => {
                    // The gate's listener comes first (see `init_setup`).
                    let gate = (spec.exec_gate && !net.is_empty()).then(|| net.remove(0));
                    Ok(Launched {
                        intermediate: child,
                        init_pid,
                        control: ours,
                        report,
                        rootless,
                        guest_host_uid: guest_host,
                        net,
                        gate,
                    })
                }
                Err(e) => {
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    let _ = waitpid(child, None);
                    Err(e)
                }
            }
        }
    }
}

fn wait_ready(sock: &OwnedFd) -> Result<(i32, SelfTestReport, Vec<OwnedFd>), SandboxError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    let mut init_pid = None;
    // The intermediate (InitPid) and init (Ready) write to the socket
    // independently: under load init's Ready can come first.
    let mut ready: Option<(SelfTestReport, Vec<OwnedFd>)> = None;
    let mut stage = String::from("forking");
    loop {
        // (Taken only when both came: a Ready that comes before the pid
        // must wait for it, not be dropped.)
        if let Some(pid) = init_pid
            && let Some((report, fds)) = ready.take()
        {
            if let Some(failure) = report.failure() {
                return Err(SandboxError::SelfTest(failure));
            }
            return Ok((pid, report, fds));
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as u32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(sock),
            PollFlags::POLLIN,
        )];
        let n = poll(&mut fds, ms).map_err(|e| SandboxError::sys("waiting for the sandbox", e))?;
        if n == 0 {
            // (Which of the two reports came tells a hung init from a
            // hung intermediate.)
            return Err(SandboxError::Setup(format!(
                "the sandbox did not become ready within {}s (its last step: {stage}; init's pid {}, its ready report {})",
                READY_TIMEOUT.as_secs(),
                if init_pid.is_some() {
                    "came"
                } else {
                    "did not come"
                },
                if ready.is_some() {
                    "came"
                } else {
                    "did not come"
                },
            )));
        }
        let msg = ipc::recv::<FromInit>(sock)
            .map_err(|e| SandboxError::sys("reading from the sandbox", e))?;
        match msg {
            None => {
                return Err(SandboxError::Setup(
                    "the sandbox exited during setup".into(),
                ));
            }
            Some((FromInit::InitPid(p), _)) => init_pid = Some(p),
            Some((FromInit::Failed(m), _)) => return Err(SandboxError::Setup(m)),
            Some((FromInit::Stage(s), _)) => stage = s,
            Some((FromInit::Ready(report), fds)) => ready = Some((report, fds)),
            Some((other, _)) => {
                return Err(SandboxError::Setup(format!(
                    "unexpected message during setup: {other:?}"
                )));
            }
        }
    }
}

/// Tells the supervisor which setup step comes next, so a start that
/// times out names where it stopped. Best effort: a lost report only
/// makes that message less precise.
fn stage(sock: &OwnedFd, what: &str) {
    let _ = ipc::send(sock, &FromInit::Stage(what.to_string()), &[]);
}

fn write(path: &str, body: &str) -> Result<(), SandboxError> {
    fs::write(path, body).map_err(|e| SandboxError::sys(format!("writing {path}"), e))
}

fn die_with_parent(expected_parent: Option<Pid>) -> Result<(), SandboxError> {
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| SandboxError::sys("PR_SET_PDEATHSIG", e))?;
    if let Some(p) = expected_parent
        && nix::unistd::getppid() != p
    {
        return Err(SandboxError::Setup(
            "the supervisor exited during setup".into(),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn intermediate(
    spec: &SandboxSpec,
    sock: &OwnedFd,
    filters: &[seccompiler::BpfProgram],
    rootless: bool,
    uid: u32,
    gid: u32,
    guest_host: u32,
    supervisor: Pid,
) -> Result<i32, SandboxError> {
    die_with_parent(Some(supervisor))?;
    // Join the limits first, so every descendant is born inside them.
    if let Some(cg) = &spec.cgroup {
        cg.join_self()?;
    }
    // Inherit nothing of the supervisor but the control socket; keep
    // 0/1/2 pointing at /dev/null so later descriptors never land there.
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| SandboxError::sys("opening /dev/null", e))?;
    for fd in 0..3 {
        sys::dup2(null.as_raw_fd(), fd).map_err(|e| SandboxError::sys("redirecting stdio", e))?;
    }
    drop(null);
    sys::close_all_except(&[0, 1, 2, sock.as_raw_fd()])
        .map_err(|e| SandboxError::sys("closing inherited descriptors", e))?;

    if rootless {
        stage(sock, "creating the user namespace");
        unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| {
            SandboxError::sys(
                "creating a user namespace (check `aibox doctor`: unprivileged user namespaces may be disabled)",
                e,
            )
        })?;
        write("/proc/self/setgroups", "deny")?;
        write(
            "/proc/self/uid_map",
            &format!("{} {uid} 1", aibox_core::guest::UID),
        )?;
        write(
            "/proc/self/gid_map",
            &format!("{} {gid} 1", aibox_core::guest::GID),
        )?;
        // Changing credentials clears the parent-death signal.
        die_with_parent(Some(supervisor))?;
    }
    let namespaces = if crate::debug_skip("netns") {
        NAMESPACES.difference(CloneFlags::CLONE_NEWNET)
    } else {
        NAMESPACES
    };
    stage(sock, "creating namespaces");
    unshare(namespaces)
        .map_err(|e| SandboxError::sys("creating mount/pid/net/ipc/uts/cgroup namespaces", e))?;
    stage(sock, "forking init");

    match sys::fork().map_err(|e| SandboxError::sys("forking init", e))? {
        ForkResult::Child => {
            let code = match init_setup(spec, sock, filters, rootless, guest_host) {
                Ok((report, net)) => {
                    let failed = report.failure().is_some();
                    let raw: Vec<i32> = net.iter().map(|f| f.as_raw_fd()).collect();
                    let sent = ipc::send(sock, &FromInit::Ready(report), &raw);
                    // The supervisor serves them; no sandbox process may.
                    drop(net);
                    if sent.is_err() || failed {
                        1
                    } else {
                        init::run(sock)
                    }
                }
                Err(e) => {
                    let _ = ipc::send(sock, &FromInit::Failed(e.to_string()), &[]);
                    1
                }
            };
            sys::exit_now(code)
        }
        ForkResult::Parent { child } => {
            ipc::send(sock, &FromInit::InitPid(child.as_raw()), &[])
                .map_err(|e| SandboxError::sys("reporting the init pid", e))?;
            // Only init keeps the control socket, so its exit is seen as EOF.
            sys::close_all_except(&[0, 1, 2])
                .map_err(|e| SandboxError::sys("closing descriptors", e))?;
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, c)) => return Ok(c),
                    Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return Ok(1),
                }
            }
        }
    }
}

/// Forks a helper that waits in a new user namespace so that we (real root)
/// can give that namespace `uid_line`/`gid_line` as maps; returns a
/// descriptor of the namespace.
fn mapped_userns(
    proc_root: &Path,
    uid_line: &str,
    gid_line: &str,
) -> Result<OwnedFd, SandboxError> {
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| SandboxError::sys("pipe", e))?;
    let (go_r, go_w) = nix::unistd::pipe().map_err(|e| SandboxError::sys("pipe", e))?;
    match sys::fork().map_err(|e| SandboxError::sys("forking the idmap helper", e))? {
        ForkResult::Child => {
            drop(ready_r);
            drop(go_w);
            let ok = unshare(CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = nix::unistd::write(&ready_w, if ok { b"1" } else { b"0" });
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(&go_r, &mut b);
            sys::exit_now(0)
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(go_r);
            let mut b = [0u8; 1];
            let n = nix::unistd::read(&ready_r, &mut b).unwrap_or(0);
            let result = (|| {
                if n != 1 || b[0] != b'1' {
                    return Err(SandboxError::Setup(
                        "the idmap helper could not create a user namespace".into(),
                    ));
                }
                let dir = proc_root.join(child.as_raw().to_string());
                fs::write(dir.join("uid_map"), uid_line)
                    .map_err(|e| SandboxError::sys("writing the idmap uid_map", e))?;
                fs::write(dir.join("gid_map"), gid_line)
                    .map_err(|e| SandboxError::sys("writing the idmap gid_map", e))?;
                fs::File::open(dir.join("ns/user"))
                    .map(OwnedFd::from)
                    .map_err(|e| SandboxError::sys("opening the idmap namespace", e))
            })();
            drop(go_w);
            let _ = waitpid(child, None);
            result
        }
    }
}

/// Everything init does before it serves requests; returns the self-test.
fn init_setup(
    spec: &SandboxSpec,
    sock: &OwnedFd,
    filters: &[seccompiler::BpfProgram],
    rootless: bool,
    guest_host: u32,
) -> Result<(SelfTestReport, Vec<OwnedFd>), SandboxError> {
    // Our parent is the intermediate process; if it dies, so do we (and with
    // us, as PID 1, the whole pid namespace).
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| SandboxError::sys("PR_SET_PDEATHSIG", e))?;
    let guest_uid = aibox_core::guest::UID;
    let guest_gid = aibox_core::guest::GID;
    // Nothing we mount may propagate back to the host.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| SandboxError::sys("making the mount namespace private", e))?;

    // Rootful: a user namespace describing the idmapped mounts (host files
    // of the invoking user, root, appear as the guest's host id).
    let idmap = if rootless {
        None
    } else {
        stage(sock, "preparing the idmapped mounts");
        // Our own pid namespace's /proc is needed to address the helper.
        let proc_tmp = spec.root_dir.with_extension("proc");
        fs::create_dir_all(&proc_tmp)
            .map_err(|e| SandboxError::sys("creating a proc mount point", e))?;
        nix::mount::mount(
            Some("proc"),
            &proc_tmp,
            Some("proc"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| SandboxError::sys("mounting a private /proc", e))?;
        let ns = mapped_userns(
            &proc_tmp,
            &format!("0 {guest_host} 1"),
            &format!("0 {guest_host} 1"),
        );
        let _ = nix::mount::umount2(&proc_tmp, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&proc_tmp);
        Some(ns?)
    };

    stage(sock, "building the root filesystem");
    rootfs::build(spec, idmap.as_ref())?;
    drop(idmap);
    nix::unistd::sethostname(aibox_core::guest::HOSTNAME)
        .map_err(|e| SandboxError::sys("sethostname", e))?;
    if !crate::debug_skip("netns") {
        sys::loopback_up().map_err(|e| SandboxError::sys("bringing up lo", e))?;
    }
    // Bound while we may still use privileged ports in this namespace.
    // (Without the netns layer, as in the fail-closed test, the self-test
    // refuses the sandbox; binding the host's ports would only obscure that.)
    let net = match &spec.net {
        Some(n) if !crate::debug_skip("netns") => net_listeners(n)?,
        _ => Vec::new(),
    };

    stage(sock, "switching to the guest's credentials");
    if !rootless {
        nix::unistd::setgroups(&[])
            .map_err(|e| SandboxError::sys("clearing supplementary groups", e))?;
        mapped_self(guest_host)?;
        let g = Gid::from_raw(guest_gid);
        let u = Uid::from_raw(guest_uid);
        nix::unistd::setresgid(g, g, g).map_err(|e| SandboxError::sys("setresgid", e))?;
        nix::unistd::setresuid(u, u, u).map_err(|e| SandboxError::sys("setresuid", e))?;
    }

    stage(sock, "hardening and self-test");
    let report = harden(spec, filters)?;
    // Installed last, after the self-test, so nothing of init's own setup
    // waits for a listener that is not there yet. Asked for and not
    // available is a failed start, never an ungated sandbox.
    let mut fds = Vec::with_capacity(net.len() + 1);
    if spec.exec_gate {
        stage(sock, "installing the exec gate");
        crate::notify::check_sizes().map_err(|e| SandboxError::sys("the exec gate", e))?;
        fds.push(
            crate::notify::install_exec_filter()
                .map_err(|e| SandboxError::sys("installing the exec gate's seccomp filter", e))?,
        );
    }
    fds.extend(net);
    Ok((report, fds))
}

/// Opens the egress listeners of `n` in the current network namespace.
pub(crate) fn net_listeners(n: &crate::NetListen) -> Result<Vec<OwnedFd>, SandboxError> {
    use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
    let tcp = |ip: Ipv4Addr, port: u16| {
        TcpListener::bind(SocketAddrV4::new(ip, port))
            .map(OwnedFd::from)
            .map_err(|e| {
                SandboxError::sys(format!("listening on {ip}:{port} inside the sandbox"), e)
            })
    };
    let mut fds = vec![tcp(Ipv4Addr::LOCALHOST, n.proxy_port)?];
    fds.push(
        UdpSocket::bind(SocketAddrV4::new(n.dns_addr, 53))
            .map(OwnedFd::from)
            .map_err(|e| SandboxError::sys("binding the DNS socket inside the sandbox", e))?,
    );
    fds.push(tcp(n.dns_addr, 53)?);
    for p in &n.transparent_ports {
        fds.push(tcp(Ipv4Addr::UNSPECIFIED, *p)?);
    }
    Ok(fds)
}

/// Rootful only: moves init into a new user namespace whose only ids are
/// the guest's (1000 ↔ `guest_host`). A helper that stays in the initial
/// namespace writes the maps, since after `unshare` we no longer can.
fn mapped_self(guest_host: u32) -> Result<(), SandboxError> {
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| SandboxError::sys("pipe", e))?;
    let (done_r, done_w) = nix::unistd::pipe().map_err(|e| SandboxError::sys("pipe", e))?;
    let target = sys::getpid();
    match sys::fork().map_err(|e| SandboxError::sys("forking the map helper", e))? {
        ForkResult::Child => {
            drop(ready_w);
            drop(done_r);
            let mut b = [0u8; 1];
            let ok = nix::unistd::read(&ready_r, &mut b).unwrap_or(0) == 1
                && (|| {
                    let dir = format!("/proc/{}", target.as_raw());
                    fs::write(
                        format!("{dir}/uid_map"),
                        format!("{} {guest_host} 1", aibox_core::guest::UID),
                    )?;
                    fs::write(
                        format!("{dir}/gid_map"),
                        format!("{} {guest_host} 1", aibox_core::guest::GID),
                    )
                })()
                .is_ok();
            let _ = nix::unistd::write(&done_w, if ok { b"1" } else { b"0" });
            sys::exit_now(0)
        }
        ForkResult::Parent { child } => {
            drop(ready_r);
            drop(done_w);
            let r = unshare(CloneFlags::CLONE_NEWUSER);
            let _ = nix::unistd::write(&ready_w, b"1");
            let mut b = [0u8; 1];
            let n = nix::unistd::read(&done_r, &mut b).unwrap_or(0);
            let _ = waitpid(child, None);
            r.map_err(|e| SandboxError::sys("creating the guest user namespace", e))?;
            if n != 1 || b[0] != b'1' {
                return Err(SandboxError::Setup(
                    "writing the guest uid/gid maps failed".into(),
                ));
            }
            Ok(())
        }
    }
}

fn harden(
    spec: &SandboxSpec,
    filters: &[seccompiler::BpfProgram],
) -> Result<SelfTestReport, SandboxError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| SandboxError::sys("getrlimit", e))?;
    if spec.nofile > hard {
        return Err(SandboxError::Setup(format!(
            "resources.nofile = {} exceeds this host's hard limit of {hard}; set resources.nofile to {hard} or less",
            spec.nofile
        )));
    }
    setrlimit(Resource::RLIMIT_NOFILE, spec.nofile, spec.nofile)
        .map_err(|e| SandboxError::sys("setting RLIMIT_NOFILE", e))?;
    setrlimit(Resource::RLIMIT_NPROC, spec.pids, spec.pids)
        .map_err(|e| SandboxError::sys("setting RLIMIT_NPROC", e))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| SandboxError::sys("setting RLIMIT_CORE", e))?;

    // Capabilities: bounding set first (needs CAP_SETPCAP), then the rest.
    use caps::CapSet;
    let sets: &[CapSet] = if crate::debug_skip("caps") {
        &[]
    } else {
        &[
            CapSet::Bounding,
            CapSet::Ambient,
            CapSet::Inheritable,
            CapSet::Effective,
            CapSet::Permitted,
        ]
    };
    for &set in sets {
        caps::clear(None, set).map_err(|e| {
            SandboxError::sys(
                format!("dropping {set:?} capabilities"),
                std::io::Error::other(e.to_string()),
            )
        })?;
    }
    prctl::set_no_new_privs().map_err(|e| SandboxError::sys("PR_SET_NO_NEW_PRIVS", e))?;

    let kernel_abi = landlock_rules::kernel_abi();
    let landlock = if crate::debug_skip("landlock") {
        None
    } else if kernel_abi > 0 {
        Some(landlock_rules::apply(
            WRITABLE,
            &landlock_rules::blocked_files(&spec.exec_blocked),
        )?)
    } else if spec.landlock_required {
        return Err(SandboxError::Setup(
            "Landlock is required (sandbox.landlock: required) but this kernel has none; boot a kernel with CONFIG_SECURITY_LANDLOCK and lsm=landlock, or set sandbox.landlock: best_effort".into(),
        ));
    } else {
        None
    };

    if !crate::debug_skip("seccomp") {
        seccomp::install(filters)?;
    }
    // Non-dumpable: sandbox processes (same uid) cannot open /proc/1/fd or
    // /proc/1/mem of init.
    prctl::set_dumpable(false).map_err(|e| SandboxError::sys("PR_SET_DUMPABLE", e))?;
    // Credential changes above cleared the parent-death signal.
    prctl::set_pdeathsig(Signal::SIGKILL).map_err(|e| SandboxError::sys("PR_SET_PDEATHSIG", e))?;

    // A kernel with Landlock must have it enforced: report a skipped
    // ruleset as not enforced rather than as absent.
    let landlock = match landlock {
        None if kernel_abi > 0 => Some(landlock_rules::LandlockState::Unavailable),
        other => other,
    };
    Ok(selftest::run(kernel_abi, landlock))
}

/// Bind-mounts `src` at `dst` in the caller's mount namespace as an
/// idmapped mount: files owned by `disk` (uid, gid) on disk appear as owned
/// by host ids `kernel`, and files created by `kernel` are stored as owned
/// by `disk`. The container backends use this so that the guest (a
/// reserved host uid) writes workspace files as the invoking user. Needs
/// root, and a single-threaded caller (it forks a helper).
///
/// `spare`: a second pair, mapping on-disk ids `spare.0` to kernel ids
/// `spare.1` — gVisor's file server creates files as host root and only
/// then gives them to the guest, so root must be able to write through
/// the mount too (its files are stored as `spare.0` until chowned).
pub fn idmapped_bind(
    src: &Path,
    dst: &Path,
    disk: (u32, u32),
    kernel: (u32, u32),
    spare: Option<(u32, u32)>,
) -> Result<(), SandboxError> {
    let extra = spare.map_or(String::new(), |(d, k)| format!("\n{d} {k} 1"));
    let ns = mapped_userns(
        Path::new("/proc"),
        &format!("{} {} 1{extra}", disk.0, kernel.0),
        &format!("{} {} 1{extra}", disk.1, kernel.1),
    )?;
    rootfs::idmapped_attach(src, dst, &ns)
}

/// Lazily unmounts `path` (a mount made by [`idmapped_bind`]); true if
/// something was mounted there.
pub fn detach_mount(path: &Path) -> bool {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> SelfTestReport {
        SelfTestReport {
            checks: Vec::new(),
            landlock_abi: 0,
            landlock: crate::landlock_rules::LandlockState::Unavailable,
        }
    }

    #[test]
    fn ready_before_the_init_pid_is_kept() {
        // Under load init's Ready can come before the intermediate's pid:
        // the start must still complete, in either order.
        for ready_first in [true, false] {
            let (ours, theirs) = ipc::pair().unwrap();
            let msgs = if ready_first {
                [FromInit::Ready(report()), FromInit::InitPid(42)]
            } else {
                [FromInit::InitPid(42), FromInit::Ready(report())]
            };
            ipc::send(
                &theirs,
                &FromInit::Stage("installing the exec gate".into()),
                &[],
            )
            .unwrap();
            for m in &msgs {
                ipc::send(&theirs, m, &[]).unwrap();
            }
            let (pid, r, fds) = wait_ready(&ours).unwrap();
            assert_eq!((pid, r, fds.len()), (42, report(), 0));
        }
    }
}
