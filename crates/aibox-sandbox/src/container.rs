//! The parts of aibox that run inside a podman/docker container, where the
//! engine (runc or runsc) built the namespaces, dropped the capabilities
//! and installed the seccomp profile. The aibox binary is bind-mounted
//! read-only at [`BINARY`] and provides:
//!
//! - `__container-init [--net JSON] [--first ID -- ARGV…]`: PID 1. First
//!   runs the self-test in a child hardened like a session and prints its
//!   report as one JSON line on stdout (the supervisor reads it from the
//!   attached engine); then reaps orphans, and on SIGTERM kills every
//!   process of the container and exits. With `--first` (one-shot
//!   sandboxes, `aibox run`) it then runs ARGV as session ID, only if the
//!   self-test passed, and ends the container with that command's code.
//! - `__container-session ID [--seccomp] [--gate] [--blocked NAMES] -- ARGV…`:
//!   the first program of every `podman exec`. Records its pid (so a later
//!   `__container-signal` can reach it, since the engines do not forward
//!   signals to exec'd processes), becomes a process-group leader, applies
//!   the same Landlock ruleset as the native sandbox where the kernel has
//!   Landlock (NAMES, comma-separated: programs that get no execute or
//!   read right), and `execve`s the command in place (same pid, no extra
//!   process). With `--seccomp` it also installs the native seccomp
//!   filters: runsc applies the OCI profile to the container's first
//!   process only, not to processes started with `exec`. With `--gate` it
//!   installs the exec gate's filter and hands the listener to the
//!   supervisor over [`GATE_SOCKET`] before its own `execve` (which is
//!   then the first exec the supervisor decides).
//! - `__container-signal ID SIG`: sends SIG to a session's process group.

use std::ffi::CString;
use std::path::Path;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::landlock_rules::{self, LandlockState};
use crate::{SandboxError, sys};

/// Where the aibox binary is mounted inside containers.
pub const BINARY: &str = "/aibox/aibox";
/// The aibox binary again, as git's remote helper for `aibox::` URLs
/// (git finds it by this name in `PATH`, see `aibox_push::helper`).
pub const PUSH_HELPER: &str = "/aibox/bin/git-remote-aibox";
/// First argument of the container init.
pub const INIT_ARG: &str = "__container-init";
/// First argument of the session shim.
pub const SESSION_ARG: &str = "__container-session";
/// First argument of the signal helper.
pub const SIGNAL_ARG: &str = "__container-signal";
/// Prefix under which the supervisor passes the guest's variables that the
/// dynamic loader or libc read at startup; the shim restores their names
/// for the command alone (see [`held`]).
pub const HELD_PREFIX: &str = "AIBOX_HELD_";

/// Variables held back from the aibox binary itself: the loader's and
/// libc's (glibc's list of variables it ignores for set-id programs).
pub fn held(name: &str) -> bool {
    name.starts_with("LD_")
        || name.starts_with("MALLOC_")
        || matches!(
            name,
            "GCONV_PATH"
                | "GETCONF_DIR"
                | "HOSTALIASES"
                | "LOCALDOMAIN"
                | "LOCPATH"
                | "NIS_PATH"
                | "NLSPATH"
                | "RESOLV_HOST_CONF"
                | "RES_OPTIONS"
                | "TZDIR"
        )
}

/// Set by the supervisor: the Landlock ABI of the host kernel, so that a
/// container whose seccomp profile hid Landlock is not taken for a kernel
/// without it.
pub const HOST_LANDLOCK_ENV: &str = "AIBOX_HOST_LANDLOCK_ABI";

/// Gives the init a first command (see the module docs).
pub const FIRST_FLAG: &str = "--first";
/// Gives the init the egress listeners to open (JSON of a
/// [`crate::NetListen`]).
pub const NET_FLAG: &str = "--net";
/// Where the supervisor's egress socket is mounted inside containers.
pub const EGRESS_SOCKET: &str = "/aibox/egress.sock";
/// Asks the shim and self-test to install the seccomp filters themselves.
pub const SECCOMP_FLAG: &str = "--seccomp";
/// Asks the shim to put the command under the exec gate.
pub const GATE_FLAG: &str = "--gate";
/// Gives the shim the programs Landlock must keep from running.
pub const BLOCKED_FLAG: &str = "--blocked";
/// Where the supervisor's exec-gate registration socket (seqpacket) is
/// mounted inside containers.
pub const GATE_SOCKET: &str = "/aibox/exec-gate.sock";

/// A session shim's request to the supervisor: decide the execs of
/// session `session`; the seccomp listener is attached.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct GateJoin {
    /// The session id.
    pub session: String,
}

/// The supervisor's answer to a [`GateJoin`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct GateJoined {
    /// Why the listener was not taken (the shim then refuses to run).
    pub error: Option<String>,
}
/// Directory of session pid files (`/dev/shm` is a world-writable tmpfs
/// under every engine; podman forces `/run` to mode 0755).
const SESSIONS: &str = "/dev/shm/.aibox-sessions";

/// Runs one of the in-container entry points if `args[1]` names one;
/// returns its exit code, or None for any other command line.
pub fn dispatch(args: &[String]) -> Option<i32> {
    let rest = args.get(2..).unwrap_or(&[]);
    Some(match args.get(1).map(String::as_str)? {
        INIT_ARG => init(rest),
        SESSION_ARG => session(rest),
        SIGNAL_ARG => signal(rest),
        _ => return None,
    })
}

fn fail(msg: &str, code: i32) -> i32 {
    eprintln!("aibox: {msg}");
    code
}

/// PID 1: self-test, then wait for children and the engine's stop signal.
/// Makes this process non-dumpable: sessions run as the same uid, and
/// where neither Landlock's scoping nor Yama stops them, a dumpable
/// process of aibox's (ungated, outside Landlock) could be written to
/// through /proc/PID/mem. The supervisor, root or the owner of the
/// container's user namespace, can still read it.
fn undumpable() -> Result<(), String> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("PR_SET_DUMPABLE: {e}"))
}

fn init(rest: &[String]) -> i32 {
    if std::process::id() != 1 {
        return fail("the container init must run as PID 1", 2);
    }
    if let Err(e) = undumpable() {
        return fail(&e, 1);
    }
    // `--first ID [--seccomp] -- ARGV…` is the session shim's command
    // line. The init's children inherit the engine's seccomp filter; under
    // gVisor the supervisor still asks for the native one on top (see
    // `aibox_supervisor::container`).
    // `--net JSON` (a [`crate::NetListen`]): open the egress listeners and
    // relay them to the supervisor's socket at [`EGRESS_SOCKET`].
    let (net, rest) = match rest.first().map(String::as_str) {
        Some(NET_FLAG) => match rest
            .get(1)
            .map(|j| serde_json::from_str::<crate::NetListen>(j))
        {
            Some(Ok(n)) => (Some(n), &rest[2..]),
            _ => {
                return fail(
                    "usage: __container-init [--net JSON] [--first ID -- PROGRAM [ARGS…]]",
                    2,
                );
            }
        },
        _ => (None, rest),
    };
    // Opened before anything forks, so that a failure stops the start and
    // the self-test child can see them.
    let listeners = match &net {
        Some(n) => match crate::launch::net_listeners(n) {
            Ok(l) => Some(l),
            Err(e) => return fail(&format!("egress: {e}"), 1),
        },
        None => None,
    };
    let first: Option<&[String]> = match rest.first().map(String::as_str) {
        None => None,
        // (The session shim checks the rest: `ID [--seccomp] -- ARGV…`.)
        Some(FIRST_FLAG) if rest.len() >= 4 => Some(&rest[1..]),
        Some(_) => {
            return fail(
                "usage: __container-init [--net JSON] [--first ID [--seccomp] -- PROGRAM [ARGS…]]",
                2,
            );
        }
    };
    // (Until the mask below, signals without a handler are ignored: we are
    // PID 1 of a pid namespace.)
    let report = match selftest() {
        Ok(r) => r,
        Err(e) => return fail(&format!("self-test: {e}"), 1),
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout();
        if writeln!(out, "{report}").and_then(|_| out.flush()).is_err() {
            return fail("could not report the self-test", 1);
        }
    }
    let passed =
        serde_json::from_str::<crate::SelfTestReport>(&report).is_ok_and(|r| r.failure().is_none());
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).is_err() {
        return fail("blocking signals failed", 1);
    }
    let first_pid = match first {
        None => None,
        // Fail closed: the command never runs in a sandbox that failed.
        Some(_) if !passed => return 125,
        Some(args) => match sys::fork() {
            Ok(nix::unistd::ForkResult::Child) => {
                let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
                sys::exit_now(session(args))
            }
            Ok(nix::unistd::ForkResult::Parent { child }) => Some(child),
            Err(e) => return fail(&format!("starting the command: {e}"), 125),
        },
    };
    let mut forwarder = Forwarder {
        listeners,
        pid: None,
        starts: 0,
        mask,
        given_up: false,
    };
    forwarder.start();
    loop {
        match mask.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {
                let (code, forwarder_ended) = reap_all(first_pid, forwarder.pid);
                if let Some(code) = code {
                    return end_all(code);
                }
                if forwarder_ended {
                    forwarder.pid = None;
                    forwarder.start();
                }
            }
            // Stopped: a one-shot command that was still running ends
            // as killed by that signal, not as a success.
            Ok(sig) => {
                return end_all(if first_pid.is_some() {
                    128 + sig as i32
                } else {
                    0
                });
            }
        }
    }
}

/// Kills every other process of the container (as PID 1, kill(-1)
/// reaches them all), reaps them, and returns `code`.
fn end_all(code: i32) -> i32 {
    let _ = sys::kill_raw(-1, libc::SIGKILL);
    while let Ok(_) | Err(nix::errno::Errno::EINTR) = waitpid(None::<Pid>, None) {}
    code
}

/// Reaps every exited child; returns the exit code (or 128 + signal) of
/// `first` if it was among them, and whether `forwarder` was.
fn reap_all(first: Option<Pid>, forwarder: Option<Pid>) -> (Option<i32>, bool) {
    let (mut code, mut fwd) = (None, false);
    loop {
        let (pid, c) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, c)) => (p, c),
            Ok(WaitStatus::Signaled(p, s, _)) => (p, 128 + s as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return (code, fwd),
            Ok(_) => continue,
        };
        if Some(pid) == first {
            code = Some(c);
        }
        fwd |= Some(pid) == forwarder;
    }
}

/// The egress forwarder: a child of init relaying the listeners init
/// holds (a process of its own, since init may not be able to start
/// threads; see `aibox_net::forward::run`). Landlock's signal scoping
/// keeps sessions from killing it; where there is no Landlock (gVisor) a
/// session can, which only cuts its own network: init starts it again, on
/// the same listeners, a bounded number of times.
struct Forwarder {
    listeners: Option<Vec<std::os::fd::OwnedFd>>,
    pid: Option<Pid>,
    starts: u32,
    mask: SigSet,
    /// Gave up restarting (the listeners stay open, so that no sandbox
    /// process can take the ports over).
    given_up: bool,
}

impl Forwarder {
    const MAX_STARTS: u32 = 100;

    fn start(&mut self) {
        let Some(fds) = &self.listeners else {
            return;
        };
        if self.given_up {
            return;
        }
        if self.starts >= Self::MAX_STARTS {
            eprintln!("aibox: the egress forwarder keeps dying; the sandbox has no network now");
            self.given_up = true;
            // Keep the ports bound (no sandbox process may take them), but
            // stop listening, so that connections are refused instead of
            // waiting in a backlog nobody accepts from.
            for fd in fds {
                let _ = nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(fd),
                    nix::sys::socket::Shutdown::Read,
                );
            }
            return;
        }
        if self.starts > 0 {
            // A forwarder killed in a loop must not make init spin.
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        self.starts += 1;
        match sys::fork() {
            Ok(nix::unistd::ForkResult::Child) => {
                let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&self.mask), None);
                let code = match fds
                    .iter()
                    .map(|f| f.try_clone())
                    .collect::<Result<Vec<_>, _>>()
                    .and_then(aibox_net::forward::Listeners::from_fds)
                    .and_then(|l| aibox_net::forward::run(l, EGRESS_SOCKET.into()))
                {
                    Ok(()) => 0,
                    Err(e) => fail(&format!("the egress forwarder stopped: {e}"), 1),
                };
                sys::exit_now(code)
            }
            Ok(nix::unistd::ForkResult::Parent { child }) => self.pid = Some(child),
            Err(e) => eprintln!("aibox: starting the egress forwarder: {e}"),
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit())
}

/// Applies the native sandbox's Landlock ruleset where the kernel has
/// one (with `blocked` programs neither executable nor readable), then
/// (when asked) the native seccomp filters.
fn harden(seccomp: bool, blocked: &[String]) -> Result<Option<LandlockState>, SandboxError> {
    let host_abi: i32 = std::env::var(HOST_LANDLOCK_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let landlock = if landlock_rules::kernel_abi() <= 0 {
        // The host has it but it cannot be reached from here: not enforced.
        (host_abi > 0).then_some(LandlockState::Unavailable)
    } else if crate::debug_skip("landlock") {
        // The kernel has it but it is not applied: the self-test must fail.
        Some(LandlockState::Unavailable)
    } else {
        Some(landlock_rules::apply(
            crate::WRITABLE,
            &landlock_rules::blocked_files(blocked),
        )?)
    };
    if seccomp && !crate::debug_skip("seccomp") {
        let filters = crate::seccomp::SyscallPolicy::embedded()?.compile()?;
        crate::seccomp::install(&filters)?;
    }
    Ok(landlock)
}

/// The session shim's options (see the module docs).
#[derive(Default)]
struct SessionOptions {
    seccomp: bool,
    gate: bool,
    blocked: Vec<String>,
}

/// Splits `ID [OPTIONS] -- ARGV…`.
fn session_args(rest: &[String]) -> Option<(&str, SessionOptions, &[String])> {
    let id = rest.first()?;
    let mut o = SessionOptions::default();
    let mut i = 1;
    loop {
        match rest.get(i).map(String::as_str)? {
            "--" => break,
            SECCOMP_FLAG if !o.seccomp => o.seccomp = true,
            GATE_FLAG if !o.gate => o.gate = true,
            BLOCKED_FLAG if o.blocked.is_empty() => {
                i += 1;
                o.blocked = rest
                    .get(i)?
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            _ => return None,
        }
        i += 1;
    }
    let argv = &rest[i + 1..];
    (valid_id(id) && !argv.is_empty()).then_some((id.as_str(), o, argv))
}

/// Puts this process (and so everything it will run) under the exec
/// gate: installs the filter, hands the listener to the supervisor and
/// waits until it has taken it. Any failure refuses the command: an
/// exec under a filter nobody listens on fails anyway (ENOSYS), and the
/// message here says why.
fn join_gate(id: &str) -> Result<(), String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, UnixAddr, connect, setsockopt, socket, sockopt,
    };
    crate::notify::check_sizes().map_err(|e| format!("the exec gate: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("the exec gate's socket: {e}"))?;
    let addr = UnixAddr::new(GATE_SOCKET).map_err(|e| format!("{GATE_SOCKET}: {e}"))?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr)
        .map_err(|e| format!("connecting to the exec gate at {GATE_SOCKET}: {e}"))?;
    let limit = nix::sys::time::TimeVal::new(10, 0);
    setsockopt(&sock, sockopt::ReceiveTimeout, &limit)
        .map_err(|e| format!("the exec gate's socket: {e}"))?;
    let listener = crate::notify::install_exec_filter()
        .map_err(|e| format!("installing the exec gate's seccomp filter: {e}"))?;
    let join = GateJoin {
        session: id.to_string(),
    };
    crate::ipc::send(&sock, &join, &[std::os::fd::AsRawFd::as_raw_fd(&listener)])
        .map_err(|e| format!("handing the exec gate to the supervisor: {e}"))?;
    // Ours must not keep the filter's listener alive.
    drop(listener);
    match crate::ipc::recv::<GateJoined>(&sock) {
        Ok(Some((GateJoined { error: None }, _))) => Ok(()),
        Ok(Some((GateJoined { error: Some(e) }, _))) => {
            Err(format!("the supervisor refused the exec gate: {e}"))
        }
        Ok(None) => Err("the supervisor closed the exec gate's socket".into()),
        Err(e) => Err(format!("no answer from the exec gate: {e}")),
    }
}

fn session(rest: &[String]) -> i32 {
    let usage =
        "usage: __container-session ID [--seccomp] [--gate] [--blocked NAMES] -- PROGRAM [ARGS…]";
    let Some((id, opts, argv)) = session_args(rest) else {
        return fail(usage, 2);
    };
    // Dumpable again only for its own execve (which resets it anyway).
    if let Err(e) = undumpable() {
        return fail(&e, 125);
    }
    // Own process group, so a signal reaches the command's children too
    // (a terminal session already made us a session leader).
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    if let Err(e) = record_session(id) {
        return fail(&format!("recording the session pid: {e}"), 125);
    }
    if let Err(e) = harden(opts.seccomp, &opts.blocked) {
        return fail(&format!("{e}"), 125);
    }
    // Fail closed: the engine's layers must be on this very process.
    if let Err(e) = crate::selftest::session_layers() {
        return fail(&format!("refusing to run the command: {e}"), 125);
    }
    if opts.gate
        && let Err(e) = join_gate(id)
    {
        return fail(&format!("refusing to run the command: {e}"), 125);
    }
    // Some engines (docker with an older daemon) size the terminal only
    // after the process started: give them a moment, so the command does
    // not begin on a 0x0 terminal.
    if nix::unistd::isatty(std::io::stdin()).unwrap_or(false) {
        for _ in 0..50 {
            if !matches!(sys::get_winsize(0), Ok((0, 0))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let Ok(cargs) = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
    else {
        return fail("arguments must not contain NUL bytes", 2);
    };
    // The environment with the held variables under their own names again.
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            use std::os::unix::ffi::OsStrExt;
            let k = k.as_bytes();
            let k = k.strip_prefix(HELD_PREFIX.as_bytes()).unwrap_or(k);
            let mut kv = k.to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    // The gate reads the exec's arguments from our memory; a supervisor
    // without CAP_SYS_PTRACE over this memory's namespace needs us
    // dumpable (as the native spawn child is).
    let _ = nix::sys::prctl::set_dumpable(true);
    let err = nix::unistd::execvpe(&cargs[0], &cargs, &env).unwrap_err();
    let code = if err == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    };
    // Worded as the native sandbox words it.
    if code == 127 {
        return fail(&format!("{}: command not found", argv[0]), code);
    }
    fail(&format!("cannot run `{}`: {}", argv[0], err.desc()), code)
}

/// Start time of `pid` (field 22 of /proc/PID/stat), to tell a process
/// from a later one with the same pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: count from
    // the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Writes `<pid> <start time>` for session `id`, refusing to follow or
/// reuse anything already there.
fn record_session(id: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(SESSIONS) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let me = std::process::id() as i32;
    let start = start_time(me).ok_or_else(|| std::io::Error::other("no start time"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(Path::new(SESSIONS).join(format!("{id}.pid")))?
        .write_all(format!("{me} {start}").as_bytes())
}

fn signal(rest: &[String]) -> i32 {
    let (Some(id), Some(sig)) = (rest.first(), rest.get(1)) else {
        return fail("usage: __container-signal ID SIGNAL", 2);
    };
    if let Err(e) = undumpable() {
        return fail(&e, 1);
    }
    let Ok(sig) = sig.parse::<i32>() else {
        return fail("SIGNAL must be a number", 2);
    };
    if !valid_id(id) {
        return fail("bad session id", 2);
    }
    let Ok(text) = std::fs::read_to_string(Path::new(SESSIONS).join(format!("{id}.pid"))) else {
        // Not started yet (the caller retries on 3) or never will be.
        return 3;
    };
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(start))) = (it.next(), it.next()) else {
        return fail("corrupt session pid file", 1);
    };
    let Ok(pid) = i32::try_from(pid) else {
        return fail("corrupt session pid file", 1);
    };
    // A pid that now belongs to another process (the session ended and the
    // number was reused) gets nothing.
    if pid <= 1 || start_time(pid) != Some(start) {
        return 0;
    }
    if sys::kill_raw(-pid, sig).is_err() {
        let _ = sys::kill_raw(pid, sig);
    }
    0
}

/// Runs the self-test in a child hardened as the init's own children are
/// (the hardening is irreversible, and init itself must stay able to kill
/// everything), and returns its report as JSON.
fn selftest() -> Result<String, String> {
    use std::io::{Read, Write};
    let (r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    match sys::fork().map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Child => {
            drop(r);
            let abi = landlock_rules::kernel_abi();
            let json = match harden(false, &[]) {
                Ok(state) => serde_json::to_string(&crate::selftest::run_container(abi, state))
                    .unwrap_or_default(),
                Err(e) => format!("error: {e}"),
            };
            let mut w = std::fs::File::from(w);
            let _ = w.write_all(json.as_bytes());
            sys::exit_now(0)
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut json = String::new();
            let read = std::fs::File::from(r).read_to_string(&mut json);
            let _ = waitpid(child, None);
            read.map_err(|e| format!("reading the report: {e}"))?;
            match json.strip_prefix("error: ") {
                Some(e) => Err(e.to_string()),
                None if json.is_empty() => Err("the self-test child died".into()),
                None => Ok(json),
            }
        }
    }
}
