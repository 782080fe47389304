//! The supervisor process (`aibox __supervise`).
//!
//! Started detached by `aibox start`, with the [`SupervisorSpec`] on stdin
//! and a pipe on stdout on which it reports `ready <status JSON>` or
//! `error <message>`. It launches the sandbox while still single-threaded,
//! then serves the control socket with one thread per connection.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use aibox_audit::{AuditLog, EventType, Severity, Source};
use aibox_sandbox::{FromInit, SpawnRequest, ToInit, ipc, landlock_rules::LandlockState};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept, bind, listen, socket, sockopt,
};
use serde_json::{Map, Value, json};

use crate::container;
use crate::proto::{
    ContainerSpec, ContainerStatus, ExecRequest, Limit, Request, Response, Status, SupervisorSpec,
};

enum Event {
    Stop {
        reply: Option<OwnedFd>,
        reason: String,
    },
    SandboxGone,
}

type Waiter = Sender<(FromInit, Vec<OwnedFd>)>;

/// How the supervisor reaches the sandbox.
enum Link {
    /// The native init's control socket, and the intermediate process
    /// (our child) whose exit means the sandbox is gone.
    Native {
        init: OwnedFd,
        intermediate: nix::unistd::Pid,
    },
    /// A podman/docker container.
    Container {
        engine: aibox_engine::Engine,
        record: container::Record,
        /// One-shot sandboxes: everything prepared for the container that
        /// starts with the first command.
        pending: Mutex<Option<Box<container::Prepared>>>,
        /// The one-shot container ended and the engine removed it (`--rm`).
        auto_removed: AtomicBool,
    },
}

struct Shared {
    spec: SupervisorSpec,
    audit: Mutex<AuditLog>,
    link: Link,
    waiters: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    /// Sessions whose `session.end` is not written yet.
    active: AtomicUsize,
    status: Mutex<Status>,
    events: Sender<Event>,
    /// Taken by the main loop.
    events_rx: Mutex<Option<Receiver<Event>>>,
    /// The egress proxy, when the sandbox has one.
    egress: Option<crate::egress::Egress>,
    /// The exec gate, when the sandbox has one.
    gate: Option<Arc<crate::gate::Gate>>,
    /// Where the log is shipped.
    sinks: OnceLock<crate::sinks::Sinks>,
    archive: OnceLock<Arc<crate::sinks::Archiver>>,
}

fn details(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

impl Shared {
    /// Appends an event; failures are also written to the supervisor log.
    fn emit(&self, t: EventType, sev: Severity, d: Value) -> Result<(), String> {
        self.emit_from(Source::AiboxSupervisor, t, sev, d)
    }

    /// [`Shared::emit`] for an event another component decided.
    fn emit_from(
        &self,
        source: Source,
        t: EventType,
        sev: Severity,
        d: Value,
    ) -> Result<(), String> {
        let r = match self.audit.lock() {
            Ok(mut a) => a
                .append(t, source, sev, details(d))
                .map(drop)
                .map_err(|e| e.to_string()),
            Err(_) => Err("audit lock poisoned".to_string()),
        };
        match &r {
            Err(e) => {
                if !AUDIT_FAILING.swap(true, Ordering::SeqCst) {
                    log(&format!(
                        "audit write failed: {e}; network traffic is refused until events can be written again"
                    ));
                }
            }
            Ok(()) => {
                if AUDIT_FAILING.swap(false, Ordering::SeqCst) {
                    log("audit writes succeed again; network traffic flows again");
                }
            }
        }
        r
    }

    /// `<data dir>/<name>` (the audit log is `<data dir>/audit/<name>.jsonl`).
    fn data_subdir(&self, name: &str) -> Result<PathBuf, String> {
        self.spec
            .audit_log
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join(name))
            .ok_or_else(|| "the audit log has no data directory".to_string())
    }

    /// Starts shipping the log to the configured sinks; a sink that
    /// cannot be opened stops the sandbox (reported by the caller).
    fn start_sinks(&self) -> Result<(), String> {
        if self.spec.sinks.is_empty() {
            return Ok(());
        }
        let state = self.data_subdir("sinks")?;
        let s = crate::sinks::Sinks::start(&self.spec.audit_log, &state, &self.spec.sinks)?;
        let _ = self.sinks.set(s);
        Ok(())
    }

    /// Starts archiving sealed segments to the bucket of `audit.storage`.
    fn start_archive(&self) -> Result<(), String> {
        let Some(c) = &self.spec.archive else {
            return Ok(());
        };
        let state = self.data_subdir("archive")?;
        let a = crate::sinks::Archiver::start(
            &self.spec.audit_log,
            &state,
            &self.spec.sandbox.name,
            c,
            self.spec.archive_keys.as_ref(),
        )?;
        let _ = self.archive.set(a);
        Ok(())
    }
}

/// Set while the audit log cannot be written (one supervisor per process).
static AUDIT_FAILING: AtomicBool = AtomicBool::new(false);

/// Whether the last audit write failed.
pub(crate) fn audit_failing() -> bool {
    AUDIT_FAILING.load(Ordering::SeqCst)
}

/// Writes a line to the supervisor log (our stderr). Never panics: the log
/// may sit on a full filesystem, which is exactly when it must not.
pub(crate) fn log(message: &str) {
    let _ = writeln!(std::io::stderr(), "aibox supervisor: {message}");
}

fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Entry point of `aibox __supervise`; returns the process exit code.
pub fn run() -> i32 {
    let mut input = String::new();
    if std::io::stdin().read_to_string(&mut input).is_err() {
        report("error could not read the supervisor spec");
        return 2;
    }
    let spec: SupervisorSpec = match serde_json::from_str(&input) {
        Ok(s) => s,
        Err(e) => {
            report(&format!("error bad supervisor spec: {e}"));
            return 2;
        }
    };
    // Own session: the terminal's signals and hangups are not ours.
    let _ = nix::unistd::setsid();
    // The proxy holds two descriptors per sandbox connection (up to
    // aibox_net::proxy::MAX_CONNECTIONS): take the whole hard limit. The
    // sandbox sets its own, lower limit.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    match setup(spec) {
        Ok(code) => code,
        Err(message) => {
            report(&format!("error {}", message.replace('\n', "\n  ")));
            1
        }
    }
}

fn remove_run_dir(spec: &SupervisorSpec) {
    let _ = std::fs::remove_dir_all(&spec.run_dir);
}

fn setup(spec: SupervisorSpec) -> Result<i32, String> {
    let t0 = Instant::now();
    // The CLI handed us the sandbox's lock; it is ours for our whole life.
    // (Re-locking through the same open file description succeeds.)
    match aibox_sandbox::sys::ofd_lock(spec.lock_fd) {
        Ok(true) => {
            let fd = aibox_sandbox::sys::borrow_fd(spec.lock_fd);
            let _ = nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            // Our pid, for `stop` when the control socket is gone.
            let _ = nix::unistd::ftruncate(fd, 0);
            let _ = nix::sys::uio::pwrite(fd, format!("{}\n", std::process::id()).as_bytes(), 0);
        }
        _ => {
            return Err(format!(
                "sandbox `{}` is already running",
                spec.sandbox.name
            ));
        }
    }
    let mut chain_reset = None;
    let (mut audit, recovered) =
        AuditLog::open_recovering(&spec.audit_log, &spec.sandbox.name, &spec.user).map_err(
            |e| {
                remove_run_dir(&spec);
                e.to_string()
            },
        )?;
    if let Some((key, every, secs)) = &spec.audit_signing {
        let signer = aibox_audit::checkpoint::Signer::load_or_create(key).map_err(|e| {
            remove_run_dir(&spec);
            e.to_string()
        })?;
        audit.set_signer(signer, *every, std::time::Duration::from_secs(*secs));
        // Never extend a chain whose signed part was cut or rewritten.
        match audit.check_anchor(key) {
            Ok(aibox_audit::Anchored::Reset(cp)) => chain_reset = Some(cp),
            Ok(_) => {}
            Err(e) => {
                remove_run_dir(&spec);
                return Err(e.to_string());
            }
        }
    }
    if spec.segment_max > 0 {
        audit.set_segment_max(spec.segment_max);
    }
    if let Some(th) = &spec.detection {
        // The CLI checked these already; a spec that fails here was not
        // written by it, and detection is not silently dropped.
        let parsed = th.parse().map_err(|e| {
            remove_run_dir(&spec);
            e.to_string()
        })?;
        audit.set_detector(
            aibox_audit::detect::Detector::new(parsed),
            Source::AiboxSupervisor,
        );
    }
    let emit = |a: &mut AuditLog, t, d: Value| {
        a.append(t, Source::AiboxSupervisor, Severity::Info, details(d))
            .map(drop)
            .map_err(|e| e.to_string())
    };
    // A repaired crash or a chain started afresh deserves a look.
    let create_severity = if recovered.is_some() || chain_reset.is_some() {
        Severity::Warning
    } else {
        Severity::Info
    };
    audit
        .append(
            EventType::SandboxCreate,
            Source::AiboxSupervisor,
            create_severity,
            details(json!({
            "workspace": spec.sandbox.workspace, "runtime": spec.runtime,
            "rootless": aibox_core::euid() != 0, "pids": spec.sandbox.pids, "nofile": spec.sandbox.nofile,
            // A crash had cut the last write short: its bytes were kept.
            "audit_torn_tail": recovered.map(|r| json!({
                "offset": r.offset, "bytes": r.bytes, "kept": r.kept,
            })),
            // The log was empty although an earlier chain had been signed.
            "audit_chain_reset": chain_reset.map(|cp| json!({
                "previous_seq": cp.seq, "previous_head": cp.head, "signed": cp.time,
            })),
            })),
        )
        .map_err(|e| e.to_string())?;
    emit(
        &mut audit,
        EventType::SandboxConfig,
        json!({"config_sha256": spec.config_sha256, "policy_version": spec.policy_version}),
    )?;

    // The LLM gateway's CA must exist before the sandbox is built (the
    // sandbox trusts it). Nothing here starts a thread.
    let intercept = match spec.network.as_ref().map(crate::egress::intercept) {
        None => crate::egress::Intercept::default(),
        Some(Ok(i)) => i,
        Some(Err(e)) => {
            let _ = a_fail(&mut audit, &e);
            remove_run_dir(&spec);
            return Err(e);
        }
    };
    if let Some(c) = spec.container.clone() {
        return setup_container(spec, c, audit, t0, intercept);
    }
    // cpu/memory/pids cgroups where this host lets us create them; a
    // failure leaves the limits reported as not enforced, never claimed.
    let mut spec = spec;
    if spec.sandbox.net.is_some() {
        spec.sandbox.extra_ca_pem = intercept.ca_pem();
    }
    let cg_limits = aibox_sandbox::cgroup::CgroupLimits {
        cpus: spec.cpus,
        memory: spec.memory_bytes,
        pids: spec.sandbox.pids,
    };
    let cgroup_note = match aibox_sandbox::cgroup::Cgroup::create(&spec.sandbox.name, cg_limits) {
        Ok(cg) => {
            spec.sandbox.cgroup = cg;
            None
        }
        Err(e) => {
            log(&format!("cgroups unavailable: {e}"));
            Some(e.to_string())
        }
    };

    // The decision socket of the agents' hooks, mounted into the sandbox.
    let hooks = if spec.sandbox.exec_gate {
        match hook_listener(&spec) {
            Ok((l, path)) => {
                spec.sandbox.gate_socket = Some(path);
                Some(l)
            }
            Err(e) => {
                let _ = a_fail(&mut audit, &e);
                if let Some(cg) = &spec.sandbox.cgroup {
                    cg.remove();
                }
                remove_run_dir(&spec);
                return Err(e);
            }
        }
    } else {
        None
    };

    // Fork the sandbox while this process has exactly one thread.
    let launched = match aibox_sandbox::launch(&spec.sandbox) {
        Ok(l) => l,
        Err(e) => {
            let _ = a_fail(&mut audit, &e.to_string());
            if let Some(cg) = &spec.sandbox.cgroup {
                cg.remove();
            }
            remove_run_dir(&spec);
            return Err(e.to_string());
        }
    };
    let start_ms = t0.elapsed().as_millis() as u64;

    let listener = match listen_on(&spec.socket) {
        Ok(l) => l,
        Err(e) => {
            undo_native(
                &launched.control,
                launched.intermediate,
                &mut audit,
                &spec,
                &e,
            );
            return Err(e);
        }
    };

    let status = Status {
        name: spec.sandbox.name.clone(),
        state: "running".into(),
        runtime: spec.runtime.clone(),
        runtime_reason: spec.runtime_reason.clone(),
        workspace: spec.sandbox.workspace.clone(),
        supervisor_pid: std::process::id(),
        init_pid: launched.init_pid,
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        start_ms,
        rootless: launched.rootless,
        guest_host_uid: launched.guest_host_uid,
        sessions: 0,
        limits: limits(&spec, launched.rootless, cgroup_note.as_deref()),
        landlock: match launched.report.landlock {
            LandlockState::Full => format!("enforced (kernel ABI {})", launched.report.landlock_abi),
            LandlockState::Partial => format!("partially enforced (kernel ABI {})", launched.report.landlock_abi),
            LandlockState::Unavailable => "unavailable (kernel has no Landlock)".into(),
        },
        seccomp: "enforced: allowlist (default ENOSYS) + denylist (EPERM) from resources/seccomp/policy.yaml".into(),
        exec_gate: gate_summary(&spec, false),
        selftest: launched.report.checks.clone(),
        audit_log: spec.audit_log.clone(),
        container: None,
        network: None,
    };
    let state_json = serde_json::to_string_pretty(&status).unwrap_or_default();
    // Written whole: `status` and `list` read it at any moment.
    if let Err(e) = aibox_core::replace_file(&spec.state, state_json.as_bytes(), 0o644) {
        let _ = ipc::send(&launched.control, &ToInit::Shutdown, &[]);
        let _ = nix::sys::wait::waitpid(launched.intermediate, None);
        if let Some(cg) = &spec.sandbox.cgroup {
            cg.remove();
        }
        remove_run_dir(&spec);
        let message = format!("writing {}: {e}", spec.state.display());
        let _ = a_fail(&mut audit, &message);
        return Err(message);
    }
    emit(
        &mut audit,
        EventType::SandboxStart,
        json!({
            "init_pid": launched.init_pid, "duration_ms": start_ms,
            "landlock": status.landlock, "selftest": "passed", "exec_gate": status.exec_gate,
        }),
    )?;

    // The proxy's threads must not take the stop signals: block them now.
    block_stop_signals();
    let sink = Arc::new(OnceLock::<Weak<Shared>>::new());
    let egress = match &spec.network {
        Some(n) if !launched.net.is_empty() => {
            match crate::egress::Egress::start_native(
                n,
                launched.net,
                egress_emit(&sink),
                intercept,
            ) {
                Ok(e) => Some(e),
                Err(e) => {
                    undo_native(
                        &launched.control,
                        launched.intermediate,
                        &mut audit,
                        &spec,
                        &e,
                    );
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    // Asked for and not delivered is a failed start: never run ungated.
    let gate = match launched.gate {
        Some(listener) => start_gate(&spec, Some(listener), hooks, egress_emit(&sink)).map(Some),
        None if spec.sandbox.exec_gate => {
            Err("the sandbox did not hand over its exec gate".to_string())
        }
        None => Ok(None),
    };
    let gate = match gate {
        Ok(g) => g,
        Err(e) => {
            undo_native(
                &launched.control,
                launched.intermediate,
                &mut audit,
                &spec,
                &e,
            );
            return Err(e);
        }
    };
    let mut status = status;
    status.network = egress.as_ref().map(|e| e.status());
    let files = spec
        .file_events
        .then(|| crate::files::prepare(spec.sandbox.workspace.clone()));
    let shared = serve(
        spec,
        audit,
        Link::Native {
            init: launched.control,
            intermediate: launched.intermediate,
        },
        status,
        listener,
        egress,
        gate,
    );
    let _ = sink.set(Arc::downgrade(&shared));
    if let Some(f) = files {
        f.start(egress_emit(&sink));
    }
    Ok(main_loop(shared))
}

/// Starts the exec gate's threads: the policy's decider, the decision
/// log, and a snapshot of the policy for `aibox policy explain`.
fn start_gate(
    spec: &SupervisorSpec,
    listener: Option<OwnedFd>,
    hooks: Option<std::os::unix::net::UnixListener>,
    emit: crate::egress::Emit,
) -> Result<Arc<crate::gate::Gate>, String> {
    let merged = spec.policy.clone().unwrap_or_default();
    let decider =
        aibox_policy::Decider::new(&merged).map_err(|e| format!("the exec gate's policy: {e}"))?;
    let snapshot = crate::paths::policy_snapshot_for(&spec.audit_log, &merged.version);
    if let Some(dir) = snapshot.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let body = serde_json::to_vec_pretty(&merged).map_err(|e| e.to_string())?;
    // Written whole: `aibox policy explain` may read it while a restart
    // writes it again.
    aibox_core::replace_file(&snapshot, &body, 0o644)
        .map_err(|e| format!("writing {}: {e}", snapshot.display()))?;
    let log_path = crate::decisions::path_for(&spec.audit_log);
    crate::decisions::migrate_legacy(&spec.audit_log)
        .map_err(|e| format!("moving the old decision log to {}: {e}", log_path.display()))?;
    let log = crate::decisions::DecisionLog::open(&log_path, spec.decisions, emit)
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let gate = Arc::new(
        crate::gate::Gate::new(listener, spec, decider, log)
            .map_err(|e| format!("starting the exec gate: {e}"))?,
    );
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 4);
    gate.serve(workers)
        .map_err(|e| format!("starting the exec gate: {e}"))?;
    if let Some(h) = hooks {
        gate.serve_hooks(h)
            .map_err(|e| format!("starting the hook service: {e}"))?;
    }
    Ok(gate)
}

/// Listens on the exec gate's registration socket (seqpacket), where the
/// sessions of a container hand over their listeners. Anyone in the
/// container may connect (see `Gate::serve_joins`); the run directory
/// keeps everyone else out.
fn join_listener(spec: &SupervisorSpec) -> Result<OwnedFd, String> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
    };
    use std::os::unix::fs::PermissionsExt;
    let path = container::join_socket(spec);
    let _ = std::fs::remove_file(&path);
    let fail = |e: &dyn std::fmt::Display| format!("listening on {}: {e}", path.display());
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| fail(&e))?;
    let addr = UnixAddr::new(&path).map_err(|e| fail(&e))?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr).map_err(|e| fail(&e))?;
    listen(&sock, Backlog::new(16).map_err(|e| fail(&e))?).map_err(|e| fail(&e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("opening {} to the sandbox: {e}", path.display()))?;
    Ok(sock)
}

/// Listens on `<run_dir>/gate.sock` for the agents' hooks. Anyone in the
/// sandbox may connect (the guest's uid differs from ours when rootful);
/// the run directory keeps everyone else out.
fn hook_listener(
    spec: &SupervisorSpec,
) -> Result<(std::os::unix::net::UnixListener, PathBuf), String> {
    use std::os::unix::fs::PermissionsExt;
    let path = spec.run_dir.join("gate.sock");
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path)
        .map_err(|e| format!("listening on {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("opening {} to the sandbox: {e}", path.display()))?;
    Ok((l, path))
}

/// The egress's audit writer: events go to the supervisor's log once it
/// serves (`sink` is set right after `serve`).
fn egress_emit(sink: &Arc<OnceLock<Weak<Shared>>>) -> crate::egress::Emit {
    let sink = sink.clone();
    Arc::new(move |t, sev, d| match sink.get().and_then(Weak::upgrade) {
        Some(s) => drop(s.emit(t, sev, d)),
        None => log(&format!(
            "egress event before the supervisor was ready: {}",
            t.as_str()
        )),
    })
}

/// Undoes a native start that failed after the sandbox was launched.
fn undo_native(
    control: &OwnedFd,
    intermediate: nix::unistd::Pid,
    audit: &mut AuditLog,
    spec: &SupervisorSpec,
    message: &str,
) {
    let _ = ipc::send(control, &ToInit::Shutdown, &[]);
    let _ = nix::sys::wait::waitpid(intermediate, None);
    let _ = a_fail(audit, message);
    if let Some(cg) = &spec.sandbox.cgroup {
        cg.remove();
    }
    remove_run_dir(spec);
}

/// Runs a container sandbox until it stops. A one-shot sandbox
/// (`run_mode`, for `aibox run`) has no container until its first command
/// arrives: the container then starts with that command in one engine call.
fn setup_container(
    spec: SupervisorSpec,
    c: ContainerSpec,
    mut audit: AuditLog,
    t0: Instant,
    intercept: crate::egress::Intercept,
) -> Result<i32, String> {
    let engine = container::engine_of(&c.engine)?;
    // The egress serves before the container exists: its socket is one of
    // the container's mounts. (Its threads must not take the stop
    // signals.)
    block_stop_signals();
    let sink = Arc::new(OnceLock::<Weak<Shared>>::new());
    let egress = match spec
        .network
        .as_ref()
        .filter(|_| !aibox_sandbox::debug_skip("netns"))
    {
        Some(n) => {
            match container::write_ca_files(&spec, intercept.ca_pem().as_deref()).and_then(|()| {
                crate::egress::Egress::start_relay(
                    n,
                    &container::egress_socket(&spec),
                    egress_emit(&sink),
                    intercept,
                )
            }) {
                Ok(e) => Some(e),
                Err(e) => {
                    let _ = a_fail(&mut audit, &e);
                    remove_run_dir(&spec);
                    return Err(e);
                }
            }
        }
        None => None,
    };
    // The exec gate (runc: sessions hand their listeners to it) and the
    // agents' hook service serve before the container exists: their
    // sockets are among its mounts.
    let mut spec = spec;
    if spec.sandbox.exec_gate && c.gvisor.is_some() {
        // (The CLI never asks for it.) Never downgraded silently.
        let e = "the exec gate cannot run under gVisor, which delivers no seccomp notifications"
            .to_string();
        let _ = a_fail(&mut audit, &e);
        remove_run_dir(&spec);
        return Err(e);
    }
    let mut gate_handle = None;
    if spec.sandbox.exec_gate {
        let gate = (|| {
            let hooks = hook_listener(&spec)?;
            let joins = join_listener(&spec)?;
            container::write_etc_files(&spec)?;
            let gate = start_gate(&spec, None, Some(hooks.0), egress_emit(&sink))?;
            gate.serve_joins(joins)
                .map_err(|e| format!("starting the exec gate: {e}"))?;
            Ok::<_, String>((hooks.1, gate))
        })();
        match gate {
            Ok((path, g)) => {
                spec.sandbox.gate_socket = Some(path);
                gate_handle = Some(g);
            }
            Err(e) => {
                let _ = a_fail(&mut audit, &e);
                remove_run_dir(&spec);
                return Err(e);
            }
        }
    }
    let prepared = match container::prepare(&spec, &c) {
        Ok(p) => p,
        Err(e) => {
            let _ = a_fail(&mut audit, &e);
            remove_run_dir(&spec);
            return Err(e);
        }
    };
    let record = prepared.record().clone();
    let undo = |audit: &mut AuditLog, message: &str| {
        container::discard(&prepared);
        let _ = a_fail(audit, message);
        remove_run_dir(&spec);
    };
    let started = if c.run_mode {
        None
    } else {
        match container::launch(&prepared, None) {
            Ok(s) => Some(s),
            // (launch removed what it and prepare made.)
            Err(e) => {
                let _ = a_fail(&mut audit, &e);
                remove_run_dir(&spec);
                return Err(e);
            }
        }
    };
    let start_ms = t0.elapsed().as_millis() as u64;
    let listener = match listen_on(&spec.socket) {
        Ok(l) => l,
        Err(e) => {
            undo(&mut audit, &e);
            return Err(e);
        }
    };
    let mut status = container_status(&spec, &c, started.as_ref(), start_ms);
    status.network = egress.as_ref().map(|e| e.status());
    if let Err(message) = write_state(&spec, &status) {
        undo(&mut audit, &message);
        return Err(message);
    }
    if let Some(st) = &started
        && let Err(message) = emit_container_start(&mut audit, &status, st)
    {
        undo(&mut audit, &message);
        return Err(message);
    }
    let files = spec
        .file_events
        .then(|| crate::files::prepare(spec.sandbox.workspace.clone()));
    let shared = serve(
        spec,
        audit,
        Link::Container {
            engine,
            record,
            pending: Mutex::new(c.run_mode.then(|| Box::new(prepared))),
            auto_removed: AtomicBool::new(false),
        },
        status,
        listener,
        egress,
        gate_handle,
    );
    let _ = sink.set(Arc::downgrade(&shared));
    if let Some(f) = files {
        f.start(egress_emit(&sink));
    }
    if let Some(st) = started {
        watch_container(&shared, st.waiter);
    }
    Ok(main_loop(shared))
}

/// The container ending by itself (killed, OOM, engine trouble) stops
/// the sandbox.
fn watch_container(shared: &Arc<Shared>, mut waiter: std::process::Child) {
    let tx = shared.events.clone();
    std::thread::spawn(move || {
        let _ = waiter.wait();
        let _ = tx.send(Event::SandboxGone);
    });
}

fn write_state(spec: &SupervisorSpec, status: &Status) -> Result<(), String> {
    let state_json = serde_json::to_string_pretty(status).unwrap_or_default();
    aibox_core::replace_file(&spec.state, state_json.as_bytes(), 0o644)
        .map_err(|e| format!("writing {}: {e}", spec.state.display()))
}

fn emit_container_start(
    audit: &mut AuditLog,
    status: &Status,
    st: &container::Started,
) -> Result<(), String> {
    let c = status.container.as_ref();
    audit
        .append(
            EventType::SandboxStart,
            Source::AiboxSupervisor,
            Severity::Info,
            details(json!({
                "init_pid": st.init_pid,
                "container": c.map(|x| x.name.clone()), "container_id": st.id,
                "oci_runtime": c.map(|x| x.oci_runtime.clone()),
                "duration_ms": status.start_ms, "landlock": status.landlock, "selftest": "passed",
                "exec_gate": status.exec_gate,
            })),
        )
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Status of a container sandbox; `started` is None for a one-shot
/// sandbox whose container has not started yet.
/// The status line of the exec gate.
fn gate_summary(spec: &SupervisorSpec, gvisor: bool) -> String {
    if spec.sandbox.exec_gate {
        "on: every exec is decided by the policy and logged".into()
    } else if gvisor {
        "off: gVisor cannot host it, so the org baseline's command findings (rm -rf of the workspace, running from /tmp, reading credential stores) are not enforced".into()
    } else {
        "off (sandbox.exec_gate: false, allowed only without a policy)".into()
    }
}

fn container_status(
    spec: &SupervisorSpec,
    c: &ContainerSpec,
    started: Option<&container::Started>,
    start_ms: u64,
) -> Status {
    let oci_runtime = match &c.gvisor {
        Some(g) => format!("runsc (gVisor, platform {}{})", g.platform, g.note),
        None => "runc".to_string(),
    };
    let landlock = match (started.map(|s| (s.report.landlock, s.report.landlock_abi)), &c.gvisor) {
        (_, Some(_)) => "not applied: gVisor's own kernel does not offer Landlock (its user-space kernel is the boundary)".to_string(),
        (None, None) => "applied in every session by the session shim where the kernel has it".to_string(),
        (Some((LandlockState::Full, abi)), None) => {
            format!("enforced in every session by the session shim (kernel ABI {abi})")
        }
        (Some((LandlockState::Partial, abi)), None) => {
            format!("partially enforced in every session (kernel ABI {abi})")
        }
        (Some((LandlockState::Unavailable, _)), None) => {
            "unavailable (kernel has no Landlock)".to_string()
        }
    };
    let rootless = aibox_core::euid() != 0;
    Status {
        name: spec.sandbox.name.clone(),
        state: if started.is_some() {
            "running".into()
        } else {
            "prepared (one-shot: the container starts with its command)".into()
        },
        runtime: spec.runtime.clone(),
        runtime_reason: spec.runtime_reason.clone(),
        workspace: spec.sandbox.workspace.clone(),
        supervisor_pid: std::process::id(),
        init_pid: started.map_or(0, |s| s.init_pid),
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        start_ms,
        rootless,
        guest_host_uid: started.map_or(0, |s| s.guest_host_uid),
        sessions: 0,
        limits: container_limits(spec, rootless),
        landlock,
        seccomp: format!(
            "enforced by {}: profile generated from resources/seccomp/policy.yaml (conditional refusals answer ENOSYS)",
            if c.gvisor.is_some() {
                "gVisor (oci-seccomp and the session shim)"
            } else {
                "the OCI runtime"
            }
        ),
        exec_gate: gate_summary(spec, c.gvisor.is_some()),
        selftest: started.map(|s| s.report.checks.clone()).unwrap_or_default(),
        audit_log: spec.audit_log.clone(),
        container: Some(ContainerStatus {
            engine: c.engine.clone(),
            name: c.container_name.clone(),
            id: started.map(|s| s.id.clone()).unwrap_or_default(),
            oci_runtime,
            image: c.image.clone(),
            apparmor: c.apparmor_note.clone(),
        }),
        network: None,
    }
}

fn container_limits(spec: &SupervisorSpec, rootless: bool) -> Vec<Limit> {
    let engine = spec
        .container
        .as_ref()
        .map(|c| c.engine.clone())
        .unwrap_or_default();
    let cg = |what: &str| -> (bool, String) {
        if rootless {
            (
                false,
                "NOT ENFORCED: aibox sets no cgroup limits on rootless containers (podman needs a delegated cgroup v2 hierarchy for them)"
                    .to_string(),
            )
        } else {
            (true, format!("{engine} {what} (container cgroup)"))
        }
    };
    let eff = container::effective_cpus(spec.cpus);
    let (cpu_on, cpu_how) = if eff == spec.cpus {
        cg("--cpus")
    } else {
        cg(&format!("--cpus {eff} (clamped to the host's CPUs)"))
    };
    let (mem_on, mem_how) = cg("--memory");
    let gvisor = spec.container.as_ref().is_some_and(|c| c.gvisor.is_some());
    let pids_how = match (rootless, engine.as_str(), gvisor) {
        (true, _, _) => "RLIMIT_NPROC (--ulimit nproc, counted in the container's user namespace); no cgroup pids limit rootless".to_string(),
        (false, "podman", false) => "podman --pids-limit (cgroup pids.max) and RLIMIT_NPROC per user namespace".to_string(),
        (false, _, true) => "podman --pids-limit on the whole gVisor sandbox (with room for gVisor's own threads; see docs/security.md)".to_string(),
        _ => format!("{engine} --pids-limit (cgroup pids.max)"),
    };
    limit_list(
        spec,
        pids_how,
        "RLIMIT_NOFILE (--ulimit)",
        (cpu_on, cpu_how),
        (mem_on, mem_how),
    )
}

/// The five limits `status` reports, in a fixed order; pids, nofile and
/// tmp_size are enforced on every backend, cpus and memory as told.
fn limit_list(
    spec: &SupervisorSpec,
    pids_how: String,
    nofile_how: &str,
    cpus: (bool, String),
    memory: (bool, String),
) -> Vec<Limit> {
    let limit = |name: &str, value: String, (enforced, how): (bool, String)| Limit {
        name: name.into(),
        value,
        enforced,
        how,
    };
    vec![
        limit("pids", spec.sandbox.pids.to_string(), (true, pids_how)),
        limit(
            "nofile",
            spec.sandbox.nofile.to_string(),
            (true, nofile_how.to_string()),
        ),
        limit(
            "tmp_size",
            spec.sandbox.tmp_size.clone(),
            (true, "tmpfs size of /tmp and /var/tmp".to_string()),
        ),
        limit("cpus", spec.cpus.to_string(), cpus),
        limit("memory", spec.memory.clone(), memory),
    ]
}

/// Reports ready and starts the threads that serve the control socket.
fn serve(
    spec: SupervisorSpec,
    audit: AuditLog,
    link: Link,
    status: Status,
    listener: OwnedFd,
    egress: Option<crate::egress::Egress>,
    gate: Option<Arc<crate::gate::Gate>>,
) -> Arc<Shared> {
    let mask = block_stop_signals();

    let (events_tx, events_rx) = channel();
    let shared = Arc::new(Shared {
        spec,
        audit: Mutex::new(audit),
        link,
        waiters: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        active: AtomicUsize::new(0),
        status: Mutex::new(status.clone()),
        events: events_tx,
        events_rx: Mutex::new(Some(events_rx)),
        egress,
        gate,
        sinks: OnceLock::new(),
        archive: OnceLock::new(),
    });
    // (The CLI opened each sink before starting us: a failure here is a
    // collector that went away in between, retried by the next start or
    // `aibox audit ship`; the log itself holds every event.)
    if let Err(e) = shared.start_sinks() {
        log(&e);
    }
    if let Err(e) = shared.start_archive() {
        log(&e);
    }

    // (Before `ready`: no session can use a credential before its issue.)
    if shared.egress.is_some()
        && let Some(n) = &shared.spec.network
    {
        for (t, sev, d) in crate::egress::issue_events(n) {
            let _ = shared.emit(t, sev, d);
        }
    }
    report(&format!(
        "ready {}",
        serde_json::to_string(&status).unwrap_or_default()
    ));
    // Nobody reads stdout any more; keep the descriptor valid.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = aibox_sandbox::sys::dup2(null.as_raw_fd(), 1);
    }

    if matches!(shared.link, Link::Native { .. }) {
        let s = shared.clone();
        std::thread::spawn(move || init_reader(s));
    }
    {
        let tx = shared.events.clone();
        std::thread::spawn(move || {
            if let Ok(sig) = mask.wait() {
                let _ = tx.send(Event::Stop {
                    reply: None,
                    reason: format!("supervisor received {sig:?}"),
                });
            }
        });
    }
    {
        let s = shared.clone();
        std::thread::spawn(move || accept_loop(s, listener));
    }
    shared
}

/// Signals become stop requests: blocks them (in this thread, so in every
/// thread created after) and returns the set for `sigwait`.
fn block_stop_signals() -> SigSet {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None);
    mask
}

fn a_fail(audit: &mut AuditLog, message: &str) -> Result<(), String> {
    audit
        .append(
            EventType::SandboxDestroy,
            Source::AiboxSupervisor,
            Severity::Warning,
            details(json!({"reason": format!("start failed: {message}")})),
        )
        .map(drop)
        .map_err(|e| e.to_string())
}

fn limits(spec: &SupervisorSpec, rootless: bool, cgroup_error: Option<&str>) -> Vec<Limit> {
    let ns = if rootless {
        "the invoking user"
    } else {
        "the sandbox's own host uid"
    };
    let cg = spec.sandbox.cgroup.as_ref();
    let cg_how = |ctrl: &str, what: &str| -> (bool, String) {
        match cg.and_then(|c| c.dir(ctrl)) {
            Some(d) => (true, format!("cgroup v1 {what} ({})", d.display())),
            None => {
                let why = match (cgroup_error, rootless) {
                    (Some(e), _) => format!("cgroup setup failed: {e}"),
                    (None, true) => "no cgroup is delegated to this user".to_string(),
                    (None, false) => {
                        "this host has no cgroup v1 memory/cpu controllers aibox can use"
                            .to_string()
                    }
                };
                (false, format!("NOT ENFORCED: {why}"))
            }
        }
    };
    let cpu_what = match cg {
        Some(c) if c.cpu_millis > 0 && c.cpu_millis < u64::from(spec.cpus) * 1000 => format!(
            "cpu.cfs_quota_us, clamped to the parent cgroup's {}.{:03} CPUs",
            c.cpu_millis / 1000,
            c.cpu_millis % 1000
        ),
        _ => "cpu.cfs_quota_us".to_string(),
    };
    let mem_what = if cg.is_some_and(|c| c.memsw) {
        "memory.limit_in_bytes and memory.memsw.limit_in_bytes (RAM and swap)"
    } else {
        "memory.limit_in_bytes (RAM only: swap accounting is off on this host)"
    };
    let (cpu_on, cpu_how) = cg_how("cpu", &cpu_what);
    let (mem_on, mem_how) = cg_how("memory", mem_what);
    let pids_how = match cg.and_then(|c| c.dir("pids")) {
        Some(d) => format!(
            "RLIMIT_NPROC per user namespace ({ns}) and cgroup pids.max ({})",
            d.display()
        ),
        None => format!("RLIMIT_NPROC, counted per user namespace ({ns})"),
    };
    limit_list(
        spec,
        pids_how,
        "RLIMIT_NOFILE",
        (cpu_on, cpu_how),
        (mem_on, mem_how),
    )
}

fn listen_on(path: &Path) -> Result<OwnedFd, String> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("creating the control socket: {e}"))?;
    let addr =
        UnixAddr::new(path).map_err(|e| format!("control socket path {}: {e}", path.display()))?;
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let r = bind(sock.as_raw_fd(), &addr);
    nix::sys::stat::umask(old);
    r.map_err(|e| format!("binding {}: {e}", path.display()))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    listen(&sock, Backlog::new(64).map_err(|e| e.to_string())?)
        .map_err(|e| format!("listen: {e}"))?;
    Ok(sock)
}

fn accept_loop(shared: Arc<Shared>, listener: OwnedFd) {
    loop {
        match accept(listener.as_raw_fd()) {
            Ok(fd) => {
                let conn = aibox_sandbox::sys::own_fd(fd);
                let _ = nix::fcntl::fcntl(
                    &conn,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                let s = shared.clone();
                std::thread::spawn(move || handle_conn(s, conn));
            }
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            // Out of descriptors or memory: wait rather than stop answering.
            Err(
                nix::errno::Errno::EMFILE
                | nix::errno::Errno::ENFILE
                | nix::errno::Errno::ENOBUFS
                | nix::errno::Errno::ENOMEM,
            ) => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => {
                log(&format!("accept failed: {e}; stopping the sandbox"));
                let _ = shared.events.send(Event::Stop {
                    reply: None,
                    reason: format!("control socket failed: {e}"),
                });
                return;
            }
        }
    }
}

/// Hands a session event to the connection waiting for it.
fn deliver(shared: &Shared, msg: FromInit, fds: Vec<OwnedFd>) {
    let id = match &msg {
        FromInit::Spawned { id, .. }
        | FromInit::SpawnFailed { id, .. }
        | FromInit::Exited { id, .. } => *id,
        _ => return,
    };
    if let Ok(w) = shared.waiters.lock()
        && let Some(tx) = w.get(&id)
    {
        let _ = tx.send((msg, fds));
    }
}

fn init_reader(shared: Arc<Shared>) {
    let Link::Native { init, .. } = &shared.link else {
        return;
    };
    loop {
        match ipc::recv::<FromInit>(init) {
            Ok(Some((msg, fds))) => deliver(&shared, msg, fds),
            Ok(None) | Err(_) => {
                if let Ok(mut w) = shared.waiters.lock() {
                    w.clear();
                }
                let _ = shared.events.send(Event::SandboxGone);
                return;
            }
        }
    }
}

fn send(conn: &OwnedFd, r: &Response, fds: &[RawFd]) {
    let _ = ipc::send(conn, r, fds);
}

fn handle_conn(shared: Arc<Shared>, conn: OwnedFd) {
    // Only the owner (or root) may drive the sandbox, even if the socket's
    // 0600 mode were lost.
    let me = aibox_core::euid();
    match nix::sys::socket::getsockopt(&conn, sockopt::PeerCredentials) {
        Ok(c) if c.uid() == me || c.uid() == 0 => {}
        _ => return,
    }
    let Ok(Some((req, fds))) = ipc::recv::<Request>(&conn) else {
        return;
    };
    match req {
        Request::Status => {
            let st = shared.status.lock().map(|mut s| {
                s.sessions = shared.waiters.lock().map(|w| w.len()).unwrap_or(0);
                if let Some(e) = &shared.egress {
                    s.network = Some(e.status());
                }
                s.clone()
            });
            match st {
                Ok(s) => send(&conn, &Response::Status(Box::new(s)), &[]),
                Err(_) => send(
                    &conn,
                    &Response::Error {
                        message: "status unavailable".into(),
                        code: 1,
                    },
                    &[],
                ),
            }
        }
        Request::Stop => {
            let _ = shared.events.send(Event::Stop {
                reply: Some(conn),
                reason: "aibox stop".into(),
            });
        }
        Request::Rotate {
            name,
            hosts,
            value,
            expires_at_ms,
        } => {
            let r = match &shared.egress {
                Some(e) => e.rotate(&name, &hosts, value, expires_at_ms),
                None => Err("this sandbox has no network, so no credentials".into()),
            };
            match r {
                Ok(kind) => {
                    let _ = shared.emit(
                        EventType::CredentialRotate,
                        Severity::Info,
                        json!({
                            "credential": name, "credential_type": kind, "hosts": hosts,
                            "expires_at_ms": expires_at_ms,
                            "reason": "replaced on the host (aibox auth add --replace)",
                        }),
                    );
                    send(&conn, &Response::Done, &[]);
                }
                Err(message) => send(&conn, &Response::Error { message, code: 1 }, &[]),
            }
        }
        Request::Record {
            event,
            severity,
            details,
        } => {
            // Only the decisions the CLI makes for a sandbox (push review).
            let r = if matches!(
                event,
                EventType::ToolApprove | EventType::ToolDeny | EventType::CredentialUse
            ) {
                shared.emit_from(Source::AiboxCli, event, severity, details)
            } else {
                Err(format!(
                    "{} is not recorded on the CLI's behalf",
                    event.as_str()
                ))
            };
            match r {
                Ok(()) => send(&conn, &Response::Done, &[]),
                Err(message) => send(&conn, &Response::Error { message, code: 1 }, &[]),
            }
        }
        Request::Exec(e) => exec_session(shared, conn, e, fds),
        Request::Signal(_) => send(
            &conn,
            &Response::Error {
                message: "no command is running on this connection".into(),
                code: 2,
            },
            &[],
        ),
    }
}

fn guest_cwd(shared: &Shared, req: &ExecRequest) -> Result<String, String> {
    if let Some(c) = &req.cwd {
        if !c.starts_with('/') {
            return Err(format!(
                "working directory {c:?} must be an absolute path inside the sandbox"
            ));
        }
        return Ok(c.clone());
    }
    let ws = &shared.spec.sandbox.workspace;
    if let Some(rel) = req.host_cwd.as_ref().and_then(|h| h.strip_prefix(ws).ok()) {
        return Ok(PathBuf::from(aibox_core::guest::WORKSPACE)
            .join(rel)
            .to_string_lossy()
            .into_owned());
    }
    Ok(aibox_core::guest::WORKSPACE.to_string())
}

fn guest_env(shared: &Shared, req: &ExecRequest) -> Vec<String> {
    use aibox_core::guest;
    let shell = format!("/bin/{}", shared.spec.shell);
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), guest::PATH.into()),
        ("HOME".into(), guest::HOME.into()),
        ("USER".into(), guest::USER.into()),
        ("LOGNAME".into(), guest::USER.into()),
        ("SHELL".into(), shell),
        ("LANG".into(), "C.UTF-8".into()),
        ("HOSTNAME".into(), guest::HOSTNAME.into()),
        (aibox_core::env::IN_SANDBOX.into(), "1".into()),
        (
            aibox_core::env::SANDBOX_NAME.into(),
            shared.spec.sandbox.name.clone(),
        ),
    ];
    if req.tty.is_some() {
        env.push(("TERM".into(), "xterm-256color".into()));
    }
    if let (Some(_), Some(n)) = (&shared.egress, &shared.spec.network) {
        env.extend(crate::egress::sandbox_env(n));
    }
    for kv in &req.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

fn exec_session(shared: Arc<Shared>, conn: OwnedFd, req: ExecRequest, fds: Vec<OwnedFd>) {
    /// Counts the session as active until it is dropped, even on a panic.
    struct Active<'a>(&'a AtomicUsize);
    impl Drop for Active<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    shared.active.fetch_add(1, Ordering::SeqCst);
    let _active = Active(&shared.active);
    exec_inner(&shared, conn, req, fds);
}

fn exec_inner(shared: &Arc<Shared>, conn: OwnedFd, req: ExecRequest, fds: Vec<OwnedFd>) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let cwd = match guest_cwd(shared, &req) {
        Ok(c) => c,
        Err(message) => return send(&conn, &Response::Error { message, code: 2 }, &[]),
    };
    if req.tty.is_none() && fds.len() != 3 {
        return send(
            &conn,
            &Response::Error {
                message: "stdin/stdout/stderr were not attached".into(),
                code: 2,
            },
            &[],
        );
    }
    if req.tty.is_some() && shared.spec.recording_required && req.recording.is_none() {
        return send(
            &conn,
            &Response::Error {
                message: "terminal sessions are recorded here (audit.recording: required) and this one is not; start it with `aibox shell` or `aibox exec -t`".into(),
                code: 2,
            },
            &[],
        );
    }
    let (tx, rx): (Waiter, Receiver<_>) = channel();
    if let Ok(mut w) = shared.waiters.lock() {
        w.insert(id, tx);
    }
    let spawn = SpawnRequest {
        id,
        argv: req.argv.clone(),
        env: guest_env(shared, &req),
        cwd,
        tty: req.tty,
    };
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let t0 = Instant::now();
    let session = format!("{}-{id}", shared.spec.sandbox.name);
    // Recorded before it runs; nothing runs unrecorded.
    if let Err(e) = shared.emit(
        EventType::SessionStart,
        Severity::Info,
        json!({"session_id": session, "argv": req.argv, "tty": req.tty.is_some(), "recording": req.recording}),
    ) {
        remove_waiter(shared, id);
        let message = format!(
            "the audit log cannot be written ({e}); refusing to run the command unrecorded"
        );
        return send(&conn, &Response::Error { message, code: 125 }, &[]);
    }
    if let Err(e) = link_spawn(shared, spawn, fds, &raw) {
        remove_waiter(shared, id);
        return send(
            &conn,
            &Response::Error {
                message: format!("sandbox unreachable: {e}"),
                code: 125,
            },
            &[],
        );
    }
    // Failures of these after-the-fact records are reported in the
    // supervisor log by `emit`; the command has already run.
    let end = |code: i32, note: &str| {
        let _ = shared.emit(
            EventType::SessionEnd,
            Severity::Info,
            json!({
                "session_id": session, "exit_code": code,
                "duration_ms": t0.elapsed().as_millis() as u64, "note": note,
            }),
        );
    };
    match rx.recv() {
        Ok((FromInit::Spawned { pid, .. }, master)) => {
            let attach: Vec<RawFd> = master.iter().map(|m| m.as_raw_fd()).collect();
            send(&conn, &Response::Started { pid }, &attach);
        }
        Ok((FromInit::SpawnFailed { error, code, .. }, _)) => {
            remove_waiter(shared, id);
            end(code, &error);
            return send(
                &conn,
                &Response::Error {
                    message: error,
                    code,
                },
                &[],
            );
        }
        _ => {
            remove_waiter(shared, id);
            end(137, "sandbox stopped");
            return send(
                &conn,
                &Response::Error {
                    message: "the sandbox stopped".into(),
                    code: 137,
                },
                &[],
            );
        }
    }

    // Forward the client's signals; if the client goes away, so does the command.
    let conn = Arc::new(conn);
    let done = Arc::new(AtomicBool::new(false));
    {
        let (s, c, d) = (shared.clone(), conn.clone(), done.clone());
        std::thread::spawn(move || {
            loop {
                match ipc::recv::<Request>(c.as_fd()) {
                    Ok(Some((Request::Signal(sig), _))) => link_signal(&s, id, sig),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        if !d.load(Ordering::SeqCst) {
                            link_signal(&s, id, libc::SIGKILL);
                        }
                        return;
                    }
                }
            }
        });
    }
    let code = match rx.recv() {
        Ok((FromInit::Exited { code, .. }, _)) => {
            end(code, "");
            code
        }
        _ => {
            end(137, "sandbox stopped");
            137
        }
    };
    done.store(true, Ordering::SeqCst);
    remove_waiter(shared, id);
    send(&conn, &Response::Exited { code }, &[]);
}

/// Starts a session's command in the sandbox; its events arrive through
/// [`deliver`].
fn link_spawn(
    shared: &Arc<Shared>,
    spawn: SpawnRequest,
    fds: Vec<OwnedFd>,
    raw: &[RawFd],
) -> Result<(), String> {
    match &shared.link {
        Link::Native { init, .. } => {
            let r = ipc::send(init, &ToInit::Spawn(spawn), raw).map_err(|e| e.to_string());
            drop(fds);
            r
        }
        Link::Container {
            engine,
            record,
            pending,
            ..
        } => {
            let id = spawn.id;
            // The lock is held while the container starts, so that a stop
            // arriving meanwhile waits for it (and then removes it).
            if let Ok(mut guard) = pending.lock()
                && let Some(prepared) = guard.take()
            {
                first_spawn(shared, &prepared, spawn, fds);
                return Ok(());
            }
            let gvisor = shared
                .spec
                .container
                .as_ref()
                .and_then(|c| c.gvisor.as_ref());
            if spawn.tty.is_some() && gvisor.is_some_and(|g| !g.exec_tty) {
                spawn_failed(
                    shared,
                    id,
                    "terminal sessions are not available with this runsc: `runsc exec` has no --tty, which podman passes for `exec -t`\n  fix: run the command without -t, or install a newer runsc (or set gvisor.enabled: false)".into(),
                );
                return Ok(());
            }
            let flags = container::session_flags(&shared.spec, gvisor.is_some());
            let run_dir = &shared.spec.run_dir;
            match container::exec(
                *engine,
                &record.container_name,
                &flags,
                run_dir,
                id,
                &spawn,
                fds,
            ) {
                Err(error) => spawn_failed(shared, id, error),
                Ok(mut ex) => {
                    let pid = ex.child.id() as i32;
                    deliver(
                        shared,
                        FromInit::Spawned { id, pid },
                        ex.master.take().into_iter().collect(),
                    );
                    let s = shared.clone();
                    std::thread::spawn(move || {
                        let code = exit_code(ex.child.wait());
                        let _ = std::fs::remove_file(&ex.env_file);
                        deliver(&s, FromInit::Exited { id, code }, Vec::new());
                    });
                }
            }
            Ok(())
        }
    }
}

/// The first command of a one-shot sandbox: starts the container with it,
/// then reports like any session; the sandbox ends with it.
fn first_spawn(
    shared: &Arc<Shared>,
    prepared: &container::Prepared,
    spawn: SpawnRequest,
    fds: Vec<OwnedFd>,
) {
    let id = spawn.id;
    // The sandbox cannot outlive a failed start; its stop and destroy
    // records say why.
    let failed = |error: String| {
        let _ = shared.events.send(Event::Stop {
            reply: None,
            reason: format!("start failed: {error}"),
        });
        spawn_failed(shared, id, error);
    };
    let Ok(stdio) = <[OwnedFd; 3]>::try_from(fds) else {
        return failed("stdin/stdout/stderr were not attached".into());
    };
    let t0 = Instant::now();
    let started = match container::launch(
        prepared,
        Some(container::First {
            id,
            req: spawn,
            stdio,
        }),
    ) {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let Some(c) = &shared.spec.container else {
        return failed("internal error: no container spec".into());
    };
    let start_ms = shared.status.lock().map_or(0, |s| s.start_ms) + t0.elapsed().as_millis() as u64;
    let status = container_status(&shared.spec, c, Some(&started), start_ms);
    let _ = write_state(&shared.spec, &status);
    if let Ok(mut a) = shared.audit.lock() {
        let _ = emit_container_start(&mut a, &status, &started);
    }
    if let Ok(mut s) = shared.status.lock() {
        *s = status;
    }
    let mut waiter = started.waiter;
    let relays = started.relays;
    deliver(
        shared,
        FromInit::Spawned {
            id,
            pid: waiter.id() as i32,
        },
        Vec::new(),
    );
    let s = shared.clone();
    std::thread::spawn(move || {
        let code = exit_code(waiter.wait());
        if let Link::Container { auto_removed, .. } = &s.link {
            auto_removed.store(true, Ordering::SeqCst);
        }
        // All output reaches the client before its exit code does.
        for r in relays {
            let _ = r.join();
        }
        deliver(&s, FromInit::Exited { id, code }, Vec::new());
        let _ = s.events.send(Event::SandboxGone);
    });
}

/// Tells session `id` that its command could not be started (125).
fn spawn_failed(shared: &Shared, id: u64, error: String) {
    deliver(
        shared,
        FromInit::SpawnFailed {
            id,
            error,
            code: 125,
        },
        Vec::new(),
    );
}

/// An engine process's exit as a command's exit code (128 + signal when
/// killed, 125 when it could not be waited for).
fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(st) => st
            .code()
            .or_else(|| st.signal().map(|sig| 128 + sig))
            .unwrap_or(1),
        Err(_) => 125,
    }
}

/// Sends a signal to a session's process group.
fn link_signal(shared: &Arc<Shared>, id: u64, signal: i32) {
    match &shared.link {
        Link::Native { init, .. } => {
            let _ = ipc::send(init, &ToInit::Signal { id, signal }, &[]);
        }
        Link::Container { engine, record, .. } => {
            let (engine, name) = (*engine, record.container_name.clone());
            std::thread::spawn(move || container::signal(engine, &name, id, signal));
        }
    }
}

fn remove_waiter(shared: &Shared, id: u64) {
    if let Ok(mut w) = shared.waiters.lock() {
        w.remove(&id);
    }
}

fn main_loop(shared: Arc<Shared>) -> i32 {
    let events = shared.events_rx.lock().ok().and_then(|mut e| e.take());
    let (reply, reason, code) = match events.map(|e| e.recv()) {
        Some(Ok(Event::Stop { reply, reason })) => (reply, reason, 0),
        Some(Ok(Event::SandboxGone)) => {
            let one_shot = shared.spec.container.as_ref().is_some_and(|c| c.run_mode);
            let reason = if one_shot {
                "its one-shot command ended"
            } else {
                "the sandbox init exited"
            };
            (None, reason.to_string(), i32::from(!one_shot))
        }
        _ => (None, "supervisor internal error".to_string(), 1),
    };
    let exit = match &shared.link {
        Link::Native { init, intermediate } => native_shutdown(&shared, init, *intermediate),
        Link::Container {
            record,
            auto_removed,
            pending,
            ..
        } => {
            // Wait for a one-shot container still being started.
            let _starting = pending.lock();
            // A one-shot container that ended was removed by the engine
            // (`--rm`); only the host mounts remain.
            let r = if auto_removed.load(Ordering::SeqCst) {
                container::remove_mounts(&record.mounts_dir);
                Ok(())
            } else {
                container::remove(record)
            };
            if let Err(e) = &r {
                log(&format!("removing the container failed: {e}"));
            } else if let Some(c) = &shared.spec.container {
                let _ = std::fs::remove_file(&c.record);
            }
            i32::from(r.is_err())
        }
    };
    finish(shared, reply, reason, exit, code)
}

fn native_shutdown(shared: &Shared, init: &OwnedFd, intermediate: nix::unistd::Pid) -> i32 {
    let _ = ipc::send(init, &ToInit::Shutdown, &[]);
    // init kills everything and exits; if it has not within 10 s, kill it
    // (the kernel then kills the whole pid namespace).
    // Wait for the intermediate to exit, without polling: its pidfd becomes
    // readable at exit.
    let pidfd = aibox_sandbox::sys::pidfd_open(intermediate.as_raw());
    let exited = match &pidfd {
        Ok(fd) => {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(fd), PollFlags::POLLIN)];
            matches!(poll(&mut fds, PollTimeout::from(10_000u16)), Ok(n) if n > 0)
        }
        Err(_) => false,
    };
    if !exited && pidfd.is_ok() {
        let init = shared.status.lock().map(|s| s.init_pid).unwrap_or(0);
        log("init did not exit in time; killing it");
        if init > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), Signal::SIGKILL);
        }
        let _ = nix::sys::signal::kill(intermediate, Signal::SIGKILL);
    }
    loop {
        use nix::sys::wait::{WaitStatus, waitpid};
        match waitpid(intermediate, None) {
            Ok(WaitStatus::Exited(_, c)) => break c,
            Ok(WaitStatus::Signaled(_, s, _)) => break 128 + s as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break -1,
        }
    }
}

fn finish(
    shared: Arc<Shared>,
    reply: Option<OwnedFd>,
    reason: String,
    exit: i32,
    code: i32,
) -> i32 {
    // Let sessions cut short by the stop record their end first (under
    // load that can take a while; a session still going after 10 s is
    // said in the log, and its end is not in the audit log).
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let left = shared.active.load(Ordering::SeqCst);
    if left > 0 {
        log(&format!(
            "{left} sessions had not recorded their end 10 s into the stop"
        ));
    }
    if let Some(cg) = &shared.spec.sandbox.cgroup {
        cg.remove();
    }
    if let Some(e) = &shared.egress {
        e.revoke();
        e.drain();
        if let Some(n) = &shared.spec.network {
            for (t, sev, d) in crate::egress::revoke_events(n, &reason) {
                let _ = shared.emit(t, sev, d);
            }
        }
    }
    if let Some(v) = shared.spec.network.as_ref().and_then(|n| n.vault.as_ref()) {
        let r = crate::client::revoke_vault(v);
        let record = crate::paths::vault_record(
            shared.spec.run_dir.parent().unwrap_or(&shared.spec.run_dir),
            &shared.spec.sandbox.name,
        );
        if r.is_ok() {
            let _ = std::fs::remove_file(&record);
        }
        let _ = shared.emit(
            EventType::CredentialRevoke,
            if r.is_ok() {
                Severity::Info
            } else {
                Severity::High
            },
            json!({
                "credential_type": "vault-token", "login": v.method, "accessor": v.accessor,
                "leases": v.leases.len(), "revoked": r.is_ok(), "error": r.err(), "reason": reason,
            }),
        );
    }
    if let Some(g) = &shared.gate {
        g.flush_log();
    }
    let _ = shared.emit(
        EventType::SandboxStop,
        Severity::Info,
        json!({"reason": reason, "init_exit": exit}),
    );
    let _ = shared.emit(
        EventType::SandboxDestroy,
        Severity::Info,
        json!({"reason": reason}),
    );
    if let Ok(mut a) = shared.audit.lock() {
        let _ = a.checkpoint();
        let _ = a.sync();
        // The run's events become a sealed, read-only segment.
        if let Err(e) = a.seal("stop") {
            log(&format!("sealing the audit log: {e}"));
        }
    }
    if let Some(s) = shared.sinks.get() {
        s.flush();
    }
    if let Some(a) = shared.archive.get() {
        a.flush();
    }
    // The state first: its absence tells a `stop` that raced this one
    // that the stop was clean, even if the rest of the run directory
    // cannot be removed.
    let _ = std::fs::remove_file(&shared.spec.state);
    remove_run_dir(&shared.spec);
    if let Some(conn) = reply {
        send(&conn, &Response::Stopped, &[]);
    }
    code
}
