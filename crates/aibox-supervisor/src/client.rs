//! The CLI side of the control protocol.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use aibox_sandbox::{WinSize, ipc};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

use crate::paths::{SandboxPaths, ensure_private_dir};
use crate::proto::{ExecRequest, Request, Response, Status, SupervisorSpec};
use crate::{Error, paths};

/// Opens (creating) the lock file without close-on-exec, so that a
/// supervisor spawned afterwards inherits the same open file description.
fn open_lock(paths: &SandboxPaths) -> Result<OwnedFd, Error> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    nix::fcntl::open(
        &paths.lock,
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| Error::io(format!("opening {}", paths.lock.display()), e))
}

/// Starts a supervisor for `spec` and waits until the sandbox is ready
/// (or has failed, in which case nothing is left behind: a Vault token
/// logged in for it is revoked).
pub fn start(spec: &SupervisorSpec, paths: &SandboxPaths) -> Result<Status, Error> {
    start_inner(spec, paths).inspect_err(|_| {
        if let Some(v) = spec.network.as_ref().and_then(|n| n.vault.as_ref()) {
            let _ = revoke_vault(v);
        }
    })
}

fn start_inner(spec: &SupervisorSpec, paths: &SandboxPaths) -> Result<Status, Error> {
    let name = spec.sandbox.name.clone();
    if let Some(parent) = paths.run_dir.parent() {
        ensure_private_dir(parent)?;
    }
    // The lock decides who owns this name; whoever holds it may clean up.
    // (The run directory only after it: a `stop` cleaning up for a dead
    // supervisor removes a run directory it finds unlocked.)
    let lock = open_lock(paths)?;
    let vault = spec.network.as_ref().and_then(|n| n.vault.as_ref());
    let mut locked = aibox_sandbox::sys::ofd_lock(lock.as_raw_fd());
    // A supervisor killed a moment ago holds the lock until its last
    // thread is gone: wait for that rather than call it running.
    if matches!(locked, Ok(false)) {
        wait_if_dying(paths);
        locked = aibox_sandbox::sys::ofd_lock(lock.as_raw_fd());
    }
    if !matches!(locked, Ok(true)) {
        // This start's Vault token will never be used.
        if let Some(v) = vault {
            let _ = revoke_vault(v);
        }
        return match locked {
            Err(e) => Err(Error::io("locking the sandbox", e)),
            _ => Err(Error::AlreadyRunning(name)),
        };
    }
    // The dead supervisor's pid goes: until ours writes its own, a `stop`
    // or `start` must not take this start for a dying supervisor.
    let _ = nix::unistd::ftruncate(&lock, 0);
    ensure_private_dir(&paths.run_dir)?;
    if paths.state.exists()
        || paths.socket.exists()
        || paths.root.exists()
        || paths.container_record.exists()
        || has_vault_records(paths)
    {
        clear_stale(paths, &spec.audit_log, &spec.user);
    }
    if let Some(v) = vault
        && let Err(e) = write_vault_record(&paths.vault_record, v)
    {
        let _ = revoke_vault(v);
        return Err(e);
    }
    let created_home = std::cell::Cell::new(false);
    // Undo this start: the run directory and a home made for it (a failed
    // start leaves only its audit record, the supervisor log and the lock).
    let cleanup = || {
        let _ = std::fs::remove_dir_all(&paths.run_dir);
        if created_home.get() {
            let _ = std::fs::remove_dir(&paths.home);
        }
    };
    let prepare = || -> Result<std::fs::File, Error> {
        std::fs::create_dir(&paths.root)
            .map_err(|e| Error::io("creating the root mount point", e))?;
        for d in [
            paths.home.parent(),
            paths.audit_log.parent(),
            paths.supervisor_log.parent(),
        ]
        .into_iter()
        .flatten()
        {
            ensure_private_dir(d)?;
        }
        if !paths.home.exists() {
            created_home.set(true);
            std::fs::create_dir(&paths.home)
                .map_err(|e| Error::io(format!("creating {}", paths.home.display()), e))?;
        }
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&paths.supervisor_log)
            .map_err(|e| Error::io(format!("opening {}", paths.supervisor_log.display()), e))
    };
    let cleanup = || {
        cleanup();
        if let Some(v) = vault {
            let _ = revoke_vault(v);
            let _ = std::fs::remove_file(&paths.vault_record);
        }
    };
    let log = prepare().inspect_err(|_| cleanup())?;
    let exe = std::env::current_exe().map_err(|e| Error::io("locating the aibox binary", e))?;
    let mut spec = spec.clone();
    spec.lock_fd = lock.as_raw_fd();
    let mut cmd = Command::new(exe);
    for k in spec.network.iter().flat_map(|n| &n.key_env) {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .arg("__supervise")
        .arg(&name)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| {
            cleanup();
            Error::io("starting the supervisor", e)
        })?;
    // The supervisor holds the lock now (same open file description).
    drop(lock);
    let body = serde_json::to_vec(&spec)
        .map_err(|e| Error::io("encoding the spec", std::io::Error::other(e)))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body);
    }
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let mut reader = BufReader::new(out);
        let _ = reader.read_line(&mut line);
        // An error may span lines (cause, then "fix: …"); the supervisor
        // exits right after reporting it, so read to the end.
        if line.starts_with("error ") {
            let _ = reader.read_to_string(&mut line);
        }
    }
    let line = line.trim_end();
    if let Some(json) = line.strip_prefix("ready ") {
        return serde_json::from_str(json)
            .map_err(|e| Error::Remote(format!("bad ready message: {e}")));
    }
    let _ = child.wait();
    if created_home.get() {
        let _ = std::fs::remove_dir(&paths.home);
    }
    // The supervisor revokes on the way out once it has started; if it
    // failed before that, the token is still live.
    if let Some(v) = vault {
        let _ = revoke_vault(v);
        let _ = std::fs::remove_file(&paths.vault_record);
    }
    let message = match line.strip_prefix("error ") {
        Some(m) => m.to_string(),
        None => {
            // It died without a word: clean up behind it (once its
            // sandbox's init, ended by the parent-death signal, has let
            // the lock go).
            let _ = wait_gone(paths);
            let _ = reap_stale(paths, &spec.audit_log, &spec.user);
            format!(
                "the supervisor exited without reporting; see {}",
                paths.supervisor_log.display()
            )
        }
    };
    Err(Error::StartFailed { name, message })
}

/// True while the sandbox's supervisor is alive (it holds the lock).
pub fn is_alive(paths: &SandboxPaths) -> bool {
    match std::fs::File::open(&paths.lock) {
        Ok(f) => aibox_sandbox::sys::ofd_locked_by_other(f.as_raw_fd()).unwrap_or(true),
        Err(_) => false,
    }
}

fn connect_to(socket_path: &Path) -> Result<OwnedFd, Error> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("creating a socket", e))?;
    let addr = UnixAddr::new(socket_path).map_err(|e| Error::io("socket path", e))?;
    connect(sock.as_raw_fd(), &addr)
        .map_err(|e| Error::io(format!("connecting to {}", socket_path.display()), e))?;
    Ok(sock)
}

/// Writes the Vault session record (0600, written whole then renamed).
/// A record still there is one whose revocation failed: it is kept
/// under another name for the next try.
fn write_vault_record(path: &Path, v: &aibox_vault::Session) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let kept = path.with_extension(format!("{ms}.json"));
        let _ = std::fs::rename(path, kept);
    }
    let body = serde_json::to_vec(v)
        .map_err(|e| Error::io("encoding the Vault record", std::io::Error::other(e)))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&body).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(format!("writing {}", path.display()), e)
        })
}

/// The Vault records of `paths`' sandbox: the current one and any kept
/// after a failed revocation.
fn vault_records(paths: &SandboxPaths) -> Vec<std::path::PathBuf> {
    let Some(dir) = paths.vault_record.parent() else {
        return Vec::new();
    };
    let prefix = format!("{}.vault.", paths.name);
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a dead sandbox still has Vault tokens to revoke.
pub fn has_vault_records(paths: &SandboxPaths) -> bool {
    !vault_records(paths).is_empty()
}

/// Revokes a sandbox's Vault token and leases.
pub fn revoke_vault(v: &aibox_vault::Session) -> Result<(), String> {
    aibox_vault::Client::new(&v.addr, v.ca_file.as_deref())
        .and_then(|c| c.revoke(v))
        .map_err(|e| e.to_string())
}

/// Revokes what a dead supervisor's sandbox still holds in Vault. A
/// record whose revocation fails is kept for the next try.
fn recover_vault(paths: &SandboxPaths) -> Option<Result<String, String>> {
    let records = vault_records(paths);
    if records.is_empty() {
        return None;
    }
    let mut outcome = Ok(String::new());
    for r in records {
        let res = std::fs::read(&r)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                serde_json::from_slice::<aibox_vault::Session>(&t).map_err(|e| e.to_string())
            })
            .and_then(|v| revoke_vault(&v).map(|()| v.method));
        match res {
            Ok(m) => {
                let _ = std::fs::remove_file(&r);
                if let Ok(o) = &mut outcome {
                    *o = m;
                }
            }
            Err(e) => outcome = Err(format!("{}: {e}", r.display())),
        }
    }
    Some(outcome)
}

/// Removes what a dead supervisor left (caller holds the lock) and records
/// it in the audit log — no supervisor writes that log any more.
fn clear_stale(paths: &SandboxPaths, audit_log: &Path, user: &str) {
    let vault = recover_vault(paths);
    let had_state = paths.state.exists() || paths.container_record.exists() || vault.is_some();
    aibox_sandbox::cgroup::Cgroup::remove_leftovers(&paths.name);
    // A container backend's container and host mounts outlive a killed
    // supervisor; the record says which.
    match crate::container::read_record(&paths.container_record) {
        Some(rec) => {
            if crate::container::remove(&rec).is_ok() {
                let _ = std::fs::remove_file(&paths.container_record);
            }
        }
        None => crate::container::remove_mounts(&paths.mounts),
    }
    let _ = std::fs::remove_file(&paths.socket);
    let _ = std::fs::remove_file(&paths.state);
    let _ = std::fs::remove_dir(&paths.root);
    let _ = std::fs::remove_dir(paths.root.with_extension("proc"));
    if had_state
        && let Ok((mut log, _)) =
            aibox_audit::AuditLog::open_recovering(audit_log, &paths.name, user)
    {
        let mut d = serde_json::Map::new();
        d.insert(
            "reason".into(),
            "supervisor died; stale state removed by the CLI".into(),
        );
        let _ = log.append(
            aibox_audit::EventType::SandboxDestroy,
            aibox_audit::Source::AiboxCli,
            aibox_audit::Severity::Warning,
            d,
        );
        if let Some(r) = vault {
            let mut d = serde_json::Map::new();
            d.insert("credential_type".into(), "vault-token".into());
            d.insert(
                "reason".into(),
                "supervisor died; revoked by the CLI".into(),
            );
            let sev = match &r {
                Ok(method) => {
                    d.insert("login".into(), method.clone().into());
                    aibox_audit::Severity::Info
                }
                Err(e) => {
                    d.insert("error".into(), e.clone().into());
                    aibox_audit::Severity::High
                }
            };
            d.insert("revoked".into(), r.is_ok().into());
            let _ = log.append(
                aibox_audit::EventType::CredentialRevoke,
                aibox_audit::Source::AiboxCli,
                sev,
                d,
            );
        }
    }
}

/// If the sandbox's supervisor is dead and left something behind, removes
/// it (recording that in the audit log) and returns true; false if it
/// lives or another command cleaned up first.
pub fn reap_stale(paths: &SandboxPaths, audit_log: &Path, user: &str) -> Result<bool, Error> {
    let lock = open_lock(paths)?;
    if !aibox_sandbox::sys::ofd_lock(lock.as_raw_fd())
        .map_err(|e| Error::io("locking the sandbox", e))?
    {
        return Ok(false);
    }
    // (Looked at under the lock: two commands may race to clean up.)
    let left = paths.run_dir.exists()
        || has_vault_records(paths)
        || paths.container_record.exists()
        || paths.mounts.exists();
    if left {
        clear_stale(paths, audit_log, user);
        let _ = std::fs::remove_dir_all(&paths.run_dir);
    }
    Ok(left)
}

/// A sandbox found in the runtime directory.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its paths.
    pub paths: SandboxPaths,
    /// Its last known state (None if the state file is unreadable).
    pub status: Option<Status>,
    /// Whether its supervisor answers.
    pub alive: bool,
}

/// Every sandbox with a runtime directory.
pub fn list(runtime_dir: &Path, data_dir: &Path) -> Vec<Listed> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(runtime_dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if aibox_core::validate_name(&name).is_err() || !e.path().is_dir() {
            continue;
        }
        let paths = SandboxPaths::new(runtime_dir, data_dir, &name);
        let status = std::fs::read_to_string(&paths.state)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let alive = is_alive(&paths);
        out.push(Listed {
            paths,
            status,
            alive,
        });
    }
    // A live supervisor whose run directory was removed still holds its lock.
    if let Ok(entries) = std::fs::read_dir(runtime_dir) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".lock") else {
                continue;
            };
            if aibox_core::validate_name(name).is_err() || out.iter().any(|l| l.paths.name == name)
            {
                continue;
            }
            let paths = SandboxPaths::new(runtime_dir, data_dir, name);
            if is_alive(&paths) {
                out.push(Listed {
                    paths,
                    status: None,
                    alive: true,
                });
            }
        }
    }
    out.sort_by(|a, b| a.paths.name.cmp(&b.paths.name));
    out
}

/// Picks the sandbox a command without `--name` means: the only running
/// one, or the one whose default name matches `cwd_default`.
pub fn resolve_name(
    runtime_dir: &Path,
    data_dir: &Path,
    cwd_default: &str,
) -> Result<String, Error> {
    let running: Vec<String> = list(runtime_dir, data_dir)
        .into_iter()
        .filter(|l| l.alive)
        .map(|l| l.paths.name)
        .collect();
    match running.len() {
        0 => Err(Error::NotRunning {
            name: cwd_default.to_string(),
            hint: "\n  fix: start one with `aibox start -w PATH`".into(),
        }),
        1 => Ok(running[0].clone()),
        _ if running.iter().any(|n| n == cwd_default) => Ok(cwd_default.to_string()),
        _ => Err(Error::Ambiguous(running.join(", "))),
    }
}

/// Connects to a running sandbox, with a helpful error if it is not.
pub fn connect_named(
    paths: &SandboxPaths,
    runtime_dir: &Path,
    data_dir: &Path,
) -> Result<OwnedFd, Error> {
    connect_to(&paths.socket).map_err(|_| {
        let running: Vec<String> = list(runtime_dir, data_dir)
            .into_iter()
            .filter(|l| l.alive)
            .map(|l| l.paths.name)
            .collect();
        let hint = if running.is_empty() {
            "\n  fix: start it with `aibox start -w PATH --name NAME`".to_string()
        } else {
            format!("\n  running: {}", running.join(", "))
        };
        Error::NotRunning {
            name: paths.name.clone(),
            hint,
        }
    })
}

fn request(conn: &OwnedFd, req: &Request, fds: &[i32]) -> Result<(), Error> {
    ipc::send(conn, req, fds).map_err(|e| Error::io("talking to the supervisor", e))
}

fn response(conn: &OwnedFd) -> Result<(Response, Vec<OwnedFd>), Error> {
    ipc::recv::<Response>(conn)
        .map_err(|e| Error::io("reading from the supervisor", e))?
        .ok_or_else(|| Error::Remote("the supervisor closed the connection".into()))
}

/// Asks for the sandbox's status.
pub fn status(conn: OwnedFd) -> Result<Status, Error> {
    request(&conn, &Request::Status, &[])?;
    match response(&conn)?.0 {
        Response::Status(s) => Ok(*s),
        Response::Error { message, .. } => Err(Error::Remote(message)),
        other => Err(Error::Remote(format!("unexpected answer {other:?}"))),
    }
}

/// Sends `req` to the running sandbox's supervisor and waits for it to be
/// carried out.
fn ask(paths: &SandboxPaths, req: Request) -> Result<(), Error> {
    let conn = connect_to(&paths.socket)?;
    request(&conn, &req, &[])?;
    match response(&conn)?.0 {
        Response::Done => Ok(()),
        Response::Error { message, .. } => Err(Error::Remote(message)),
        other => Err(Error::Remote(format!("unexpected answer {other:?}"))),
    }
}

/// Has a running sandbox use a new value for credential `name` from now
/// on.
pub fn rotate(
    paths: &SandboxPaths,
    name: &str,
    hosts: Vec<String>,
    value: aibox_net::gateway::Secret,
    expires_at_ms: Option<u64>,
) -> Result<(), Error> {
    ask(
        paths,
        Request::Rotate {
            name: name.to_string(),
            hosts,
            value,
            expires_at_ms,
        },
    )
}

/// Has the running sandbox's supervisor append an event to its audit log.
pub fn record(
    paths: &SandboxPaths,
    event: aibox_audit::EventType,
    severity: aibox_audit::Severity,
    details: serde_json::Value,
) -> Result<(), Error> {
    ask(
        paths,
        Request::Record {
            event,
            severity,
            details,
        },
    )
}

/// Stops the sandbox and waits until its supervisor is gone. True when
/// the supervisor went without answering and without cleaning up (it was
/// dying as we asked), so this cleaned up for it as for a crash: its
/// Vault token revoked, its runtime directory removed, the audit log told.
pub fn stop(conn: OwnedFd, paths: &SandboxPaths) -> Result<bool, Error> {
    match request(&conn, &Request::Stop, &[]).and_then(|()| response(&conn)) {
        // The supervisor exits right after answering: wait for that (EOF).
        Ok((Response::Stopped, _)) => {
            while let Ok(Some(_)) = ipc::recv::<Response>(&conn) {}
            wait_gone(paths).map(|()| false)
        }
        Ok((Response::Error { message, .. }, _)) => Err(Error::Remote(message)),
        Ok((other, _)) => Err(Error::Remote(format!("unexpected answer {other:?}"))),
        // Either another `stop` got there first (and that supervisor
        // removes its state on the way out), or the supervisor
        // was killed while we connected: its last threads still held the
        // socket (our connection was queued, then reset) and the lock.
        Err(_) => {
            wait_gone(paths)?;
            // (A supervisor that stopped cleanly removed its state, even
            // if some of its run directory could not be removed.)
            if paths.state.exists() {
                reap_dead(paths)
            } else {
                Ok(false)
            }
        }
    }
}

/// Cleans up after a supervisor that died (see [`reap_stale`]), as the
/// user running this command.
fn reap_dead(paths: &SandboxPaths) -> Result<bool, Error> {
    reap_stale(paths, &paths.audit_log, &aibox_core::current_user())
}

/// Whether process `pid` has exited. A killed process can linger as a
/// zombie (and its threads a moment longer), which `kill(pid, 0)` still
/// calls alive; /proc says `Z` or `X` for it.
pub fn pid_exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| {
            matches!(rest.trim_start().as_bytes().first(), Some(b'Z' | b'X'))
        }),
        Err(_) => matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        ),
    }
}

/// Waits until the supervisor has released its lock: as long as it is
/// still at work (a stop flushes sinks and the archive and revokes
/// credentials, which can take a while) up to 2 minutes, else 30 s.
pub fn wait_gone(paths: &SandboxPaths) -> Result<(), Error> {
    use std::time::{Duration, Instant};
    let t0 = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if !is_alive(paths) {
            return Ok(());
        }
        let waited = t0.elapsed();
        let working = || supervisor_pid(paths).is_some_and(|p| !pid_exited(p));
        if waited > Duration::from_secs(120) || (waited > Duration::from_secs(30) && !working()) {
            return Err(Error::Remote(format!(
                "sandbox `{}` did not stop within {} s",
                paths.name,
                waited.as_secs()
            )));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// After `pid`, the supervisor named in the lock file, was seen exited:
/// waits (up to 30 s) for its last threads to let the lock go. True when
/// they did; false when the lock is someone else's now (a new start, or
/// another command cleaning up) or never came free.
fn wait_for_dying(paths: &SandboxPaths, pid: i32) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if !is_alive(paths) {
            return true;
        }
        if supervisor_pid(paths) != Some(pid) {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    false
}

/// Waits for a supervisor that was killed a moment ago to let its lock
/// go (see [`pid_exited`]); does nothing when the lock holder lives.
pub fn wait_if_dying(paths: &SandboxPaths) {
    if let Some(pid) = supervisor_pid(paths).filter(|p| pid_exited(*p)) {
        wait_for_dying(paths, pid);
    }
}

/// pid the live supervisor wrote into its lock file.
pub fn supervisor_pid(paths: &SandboxPaths) -> Option<i32> {
    std::fs::read_to_string(&paths.lock)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Stops a sandbox whose supervisor lives (holds the lock) but no longer
/// answers on its socket, e.g. because its runtime directory was removed:
/// SIGTERM to the pid in the lock file, after checking that it is our
/// supervisor of this name. True when it was dying instead (killed, its
/// last threads still holding the lock), and this cleaned up after it.
pub fn terminate_unreachable(paths: &SandboxPaths) -> Result<bool, Error> {
    use std::os::unix::fs::MetadataExt;
    let pid = supervisor_pid(paths).ok_or_else(|| {
        Error::Remote(format!(
            "sandbox `{}` is locked but its lock file names no supervisor",
            paths.name
        ))
    })?;
    if pid_exited(pid) {
        return match wait_for_dying(paths, pid) {
            true => reap_dead(paths),
            false => Err(Error::Remote(format!(
                "sandbox `{}`: its supervisor {pid} has exited but the lock is still held; try again",
                paths.name
            ))),
        };
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid())
        .ok()
        == Some(aibox_core::euid());
    if !ours
        || args.get(1) != Some(&&b"__supervise"[..])
        || args.get(2) != Some(&paths.name.as_bytes())
    {
        return Err(Error::Remote(format!(
            "sandbox `{}` holds its lock but pid {pid} is not its supervisor; stop it by hand",
            paths.name
        )));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM)
        .map_err(|e| Error::io(format!("signalling supervisor {pid}"), e))?;
    wait_gone(paths).map(|()| false)
}

/// Signals the client forwards to the command.
const FORWARDED: &[Signal] = &[
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Runs a command and returns its exit code. Without `tty` the caller's
/// stdin/stdout/stderr are handed to the command; with it a terminal is
/// allocated inside and relayed to ours (raw mode, resizes passed on).
pub fn exec(conn: OwnedFd, req: ExecRequest) -> Result<i32, Error> {
    exec_tapped(conn, req, None)
}

/// Sees a terminal session's traffic (session recording).
pub trait Tap: Send + Sync {
    /// What the session wrote to the terminal.
    fn output(&self, data: &[u8]);
    /// What was typed.
    fn input(&self, data: &[u8]);
    /// The terminal was resized.
    fn resize(&self, cols: u16, rows: u16);
    /// Why the session may not go on (a required recording that can no
    /// longer be written), checked as output is relayed: the session is
    /// then ended (the client goes, and the supervisor ends its command).
    fn broken(&self) -> Option<String> {
        None
    }
}

/// [`exec`], with `tap` seeing a terminal session's input, output and
/// resizes as they are relayed.
pub fn exec_tapped(
    conn: OwnedFd,
    mut req: ExecRequest,
    tap: Option<std::sync::Arc<dyn Tap>>,
) -> Result<i32, Error> {
    let tty = req.tty.is_some();
    if tty {
        let (rows, cols) = aibox_sandbox::sys::get_winsize(0).unwrap_or((24, 80));
        req.tty = Some(WinSize { rows, cols });
    }
    // Block forwarded signals in every thread; one thread takes them.
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(*s);
    }
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None);

    // Never hand the caller's terminal itself to the sandbox: a process
    // left running inside could read later keystrokes or change terminal
    // modes. Terminals are relayed through pipes instead.
    let mut sent: Vec<OwnedFd> = Vec::new();
    let mut stdio: Vec<i32> = Vec::new();
    let mut outputs: Vec<(OwnedFd, i32)> = Vec::new();
    if !tty {
        for fd in 0..3 {
            if !nix::unistd::isatty(aibox_sandbox::sys::borrow_fd(fd)).unwrap_or(false) {
                stdio.push(fd);
                continue;
            }
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| Error::io("pipe", e))?;
            if fd == 0 {
                stdio.push(r.as_raw_fd());
                sent.push(r);
                // Only a foreground job may read the terminal; in the
                // background (`aibox exec … &`) reading would stop us with
                // SIGTTIN, so the command gets an empty stdin instead.
                let stdin = std::io::stdin();
                let foreground =
                    nix::unistd::tcgetpgrp(stdin.as_fd()).ok() == Some(nix::unistd::getpgrp());
                if foreground {
                    std::thread::spawn(move || copy_fd(std::io::stdin().as_fd(), w.as_fd()));
                }
            } else {
                stdio.push(w.as_raw_fd());
                sent.push(w);
                outputs.push((r, fd));
            }
        }
    }
    request(&conn, &Request::Exec(req), &stdio)?;
    // Our copies of the sandbox's pipe ends must go, or no EOF ever comes.
    drop(sent);
    let (resp, fds) = response(&conn)?;
    let master = match resp {
        Response::Started { .. } => fds.into_iter().next(),
        Response::Error { message, code } => {
            eprintln!("aibox: {message}");
            return Ok(code);
        }
        other => return Err(Error::Remote(format!("unexpected answer {other:?}"))),
    };
    let conn = std::sync::Arc::new(conn);
    let master = master.map(std::sync::Arc::new);
    {
        let (c, m, t) = (conn.clone(), master.clone(), tap.clone());
        std::thread::spawn(move || {
            while let Ok(sig) = mask.wait() {
                if sig == Signal::SIGWINCH {
                    if let (Some(m), Ok((r, cl))) = (&m, aibox_sandbox::sys::get_winsize(0)) {
                        let _ = aibox_sandbox::sys::set_winsize(m.as_raw_fd(), r, cl);
                        if let Some(t) = &t {
                            t.resize(cl, r);
                        }
                    }
                    continue;
                }
                let _ = ipc::send(c.as_fd(), &Request::Signal(sig as i32), &[]);
            }
        });
    }
    match master {
        None if outputs.is_empty() => wait_exit(&conn),
        None => relay_outputs(&conn, outputs),
        Some(m) => relay(&conn, &m, tap),
    }
}

/// Copies `from` to `to` until EOF or an error.
fn copy_fd(from: std::os::fd::BorrowedFd<'_>, to: std::os::fd::BorrowedFd<'_>) {
    let mut buf = [0u8; 8192];
    loop {
        match nix::unistd::read(from, &mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if write_all_fd(to, &buf[..n]).is_err() {
                    return;
                }
            }
            // A terminal left non-blocking by another program: wait for input.
            Err(nix::errno::Errno::EAGAIN) => {
                let _ = poll(
                    &mut [PollFd::new(from, PollFlags::POLLIN)],
                    PollTimeout::NONE,
                );
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Writes all of `buf`, waiting when `to` is non-blocking and full, so no
/// output is lost on a terminal another program set to O_NONBLOCK.
fn write_all_fd(to: std::os::fd::BorrowedFd<'_>, buf: &[u8]) -> Result<(), nix::errno::Errno> {
    let mut off = 0;
    while off < buf.len() {
        match nix::unistd::write(to, &buf[off..]) {
            Ok(w) => off += w,
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                let _ = poll(
                    &mut [PollFd::new(to, PollFlags::POLLOUT)],
                    PollTimeout::NONE,
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits for the exit while copying the command's output pipes to our
/// terminal; after the exit, drains briefly (a background process may keep
/// a pipe open forever).
fn relay_outputs(conn: &OwnedFd, mut outputs: Vec<(OwnedFd, i32)>) -> Result<i32, Error> {
    let mut exit: Option<i32> = None;
    let mut buf = [0u8; 8192];
    loop {
        if outputs.is_empty() && exit.is_some() {
            break;
        }
        let timeout = if exit.is_some() {
            PollTimeout::from(50u8)
        } else {
            PollTimeout::NONE
        };
        let mut fds: Vec<PollFd> = outputs
            .iter()
            .map(|(r, _)| PollFd::new(r.as_fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(conn.as_fd(), PollFlags::POLLIN));
        let n = match poll(&mut fds, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::io("waiting for output", e)),
        };
        if n == 0 {
            break;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let conn_ready = ready.last().copied().unwrap_or(false);
        let mut closed = Vec::new();
        for (i, (r, target)) in outputs.iter().enumerate() {
            if !ready[i] {
                continue;
            }
            match nix::unistd::read(r.as_fd(), &mut buf) {
                Ok(0) | Err(_) => closed.push(i),
                Ok(k) => {
                    let _ = write_all_fd(aibox_sandbox::sys::borrow_fd(*target), &buf[..k]);
                }
            }
        }
        for i in closed.into_iter().rev() {
            outputs.remove(i);
        }
        if conn_ready && exit.is_none() {
            match response(conn)?.0 {
                Response::Exited { code } => exit = Some(code),
                Response::Error { message, code } => {
                    eprintln!("aibox: {message}");
                    return Ok(code);
                }
                _ => {}
            }
        }
    }
    Ok(exit.unwrap_or(1))
}

fn wait_exit(conn: &OwnedFd) -> Result<i32, Error> {
    loop {
        match response(conn)?.0 {
            Response::Exited { code } => return Ok(code),
            Response::Error { message, code } => {
                eprintln!("aibox: {message}");
                return Ok(code);
            }
            _ => continue,
        }
    }
}

/// Restores the terminal mode when dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> Self {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        match tcgetattr(stdin.as_fd()) {
            Ok(orig) => {
                let mut raw = orig.clone();
                cfmakeraw(&mut raw);
                let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
                RawMode(Some(orig))
            }
            Err(_) => RawMode(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(orig) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin().as_fd(),
                nix::sys::termios::SetArg::TCSANOW,
                orig,
            );
        }
    }
}

fn relay(
    conn: &OwnedFd,
    master: &std::sync::Arc<OwnedFd>,
    tap: Option<std::sync::Arc<dyn Tap>>,
) -> Result<i32, Error> {
    let _raw = RawMode::enter();
    {
        let (m, t) = (master.clone(), tap.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match nix::unistd::read(std::io::stdin().as_fd(), &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if let Some(t) = &t {
                            t.input(&buf[..n]);
                        }
                        if nix::unistd::write(m.as_fd(), &buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    let mut out = std::io::stdout();
    let mut buf = [0u8; 8192];
    let mut exit: Option<i32> = None;
    loop {
        // After the command exits, drain what is left, then stop even if a
        // background process keeps the terminal open.
        let timeout = if exit.is_some() {
            PollTimeout::from(50u8)
        } else {
            PollTimeout::NONE
        };
        let mut fds = [
            PollFd::new(master.as_fd(), PollFlags::POLLIN),
            PollFd::new(conn.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => break,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::io("waiting for the terminal", e)),
        }
        let m_ev = fds[0].revents().unwrap_or(PollFlags::empty());
        let c_ev = fds[1].revents().unwrap_or(PollFlags::empty());
        if !m_ev.is_empty() {
            match nix::unistd::read(master.as_fd(), &mut buf) {
                Ok(0) | Err(_) => {
                    if exit.is_some() {
                        break;
                    }
                    // Terminal closed; wait for the exit code.
                    return wait_exit(conn).map(|c| exit.unwrap_or(c));
                }
                Ok(n) => {
                    if let Some(t) = &tap {
                        t.output(&buf[..n]);
                        if let Some(why) = t.broken() {
                            drop(_raw);
                            eprintln!("\r\naibox: {why}: the session is ended");
                            return Ok(1);
                        }
                    }
                    let _ = out.flush();
                    let _ = write_all_fd(out.as_fd(), &buf[..n]);
                }
            }
        }
        if !c_ev.is_empty() && exit.is_none() {
            match response(conn)?.0 {
                Response::Exited { code } => exit = Some(code),
                Response::Error { message, code } => {
                    drop(_raw);
                    eprintln!("aibox: {message}");
                    return Ok(code);
                }
                _ => {}
            }
        }
    }
    Ok(exit.unwrap_or(1))
}

/// Paths helper re-exported for the CLI.
pub fn audit_log_path(data_dir: &Path, name: &str) -> PathBuf {
    paths::audit_log(data_dir, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_has_exited() {
        assert!(!pid_exited(std::process::id() as i32));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !pid_exited(pid) && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(pid_exited(pid), "an unreaped child is a zombie");
        // What the old check relied on: a zombie still takes signals.
        assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok());
        child.wait().unwrap();
        assert!(pid_exited(pid));
    }

    /// A sandbox as a supervisor leaves it: run directory, state, and the
    /// lock, held through the returned descriptor.
    fn left_by_a_supervisor() -> (tempfile::TempDir, SandboxPaths, OwnedFd) {
        let dir = tempfile::tempdir().unwrap();
        // (A name no real sandbox has: the cleanup looks for its cgroups.)
        let name = format!("client-test-{}", std::process::id());
        let paths = SandboxPaths::new(&dir.path().join("run"), &dir.path().join("data"), &name);
        std::fs::create_dir_all(&paths.run_dir).unwrap();
        std::fs::create_dir_all(paths.audit_log.parent().unwrap()).unwrap();
        std::fs::write(&paths.state, "{}").unwrap();
        let lock = open_lock(&paths).unwrap();
        assert!(aibox_sandbox::sys::ofd_lock(lock.as_raw_fd()).unwrap());
        (dir, paths, lock)
    }

    /// A supervisor killed while `stop` was connecting: its dying threads
    /// still held the socket (so the connection was queued) and the lock,
    /// then everything closed without an answer. `stop` must clean up as
    /// after a crash rather than take the silence for another `stop`.
    #[test]
    fn a_supervisor_that_dies_as_it_is_asked_to_stop_is_cleaned_up() {
        let (_dir, paths, lock) = left_by_a_supervisor();
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let addr = UnixAddr::new(&paths.socket).unwrap();
        nix::sys::socket::bind(listener.as_raw_fd(), &addr).unwrap();
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(4).unwrap()).unwrap();
        let conn = connect_to(&paths.socket).unwrap();
        assert!(is_alive(&paths));
        let dying = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(listener);
            drop(lock);
        });
        assert!(
            stop(conn, &paths).unwrap(),
            "cleaned up for the dead supervisor"
        );
        dying.join().unwrap();
        assert!(!paths.run_dir.exists());
        let log = std::fs::read_to_string(&paths.audit_log).unwrap();
        assert!(log.contains("supervisor died"), "{log}");
        // Nothing left (another command cleaned up first): nothing claimed.
        assert!(!reap_dead(&paths).unwrap());
        assert_eq!(std::fs::read_to_string(&paths.audit_log).unwrap(), log);
    }

    /// A supervisor found holding its lock with no socket may be one that
    /// was just killed (a zombie whose threads still hold the lock): that
    /// is cleaned up after, not refused as "not its supervisor".
    #[test]
    fn an_unreachable_supervisor_that_is_dying_is_cleaned_up() {
        let (_dir, paths, lock) = left_by_a_supervisor();
        let mut zombie = Command::new("true").spawn().unwrap();
        let pid = zombie.id() as i32;
        while !pid_exited(pid) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        nix::sys::uio::pwrite(&lock, format!("{pid}\n").as_bytes(), 0).unwrap();
        let dying = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(lock);
        });
        assert!(terminate_unreachable(&paths).unwrap());
        dying.join().unwrap();
        zombie.wait().unwrap();
        assert!(!paths.run_dir.exists());
        let log = std::fs::read_to_string(&paths.audit_log).unwrap();
        assert!(log.contains("supervisor died"), "{log}");
    }
}
