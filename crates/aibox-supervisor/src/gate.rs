//! The exec gate's decision side. Every `execve`/`execveat` in a native
//! sandbox, or in a container whose runtime delivers seccomp
//! notifications (runc), waits on a seccomp listener
//! (`aibox_sandbox::notify`): a native sandbox has one, handed over by
//! its init; a container has one per session, each handed over by the
//! session shim through the registration socket. Here the
//! supervisor reads what the caller asked for, finds the file the kernel
//! would run inside the sandbox's root, asks the policy
//! ([`aibox_policy::Decider`]) and answers: run, or fail with `EPERM`
//! after a one-line reason on the caller's stderr.
//!
//! The program is judged by the file executed (its path, its SHA-256, and
//! the other names of that file in the system's program directories), not
//! by argv[0]; a script is judged with its interpreter, and the dynamic
//! loader (`ld-linux-x86-64.so.2 /usr/bin/x`) by the program it is given.
//! Every decision is appended to the decision log and mirrored as audit
//! events before the answer is sent.
//!
//! Limits (also in docs/security.md): after "run", the kernel reads the
//! path and arguments again, so another thread of the caller can change
//! them in between; denials are exact, allows are best effort plus audit.
//! Programs the policy blocks by name are also denied by Landlock, which
//! has no such window.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use aibox_policy::{Action, Decider, Decision, ExecInput, Risk};
use aibox_sandbox::notify::{self, Notification, Verdict};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::decisions::{DecisionLog, LogEntry};

/// Longest path read from a caller.
const PATH_MAX: usize = 4096;
/// Most argv/envp strings read (Linux allows more; such a command is
/// refused with E2BIG rather than decided on part of its arguments).
const MAX_ARGS: usize = 65_536;
/// Most argv/envp bytes read (the kernel's usual limit is a quarter of an
/// 8 MiB stack).
const MAX_ARG_BYTES: usize = 2 * 1024 * 1024;
/// Files decided on per exec: the program and up to four interpreters
/// (the kernel's own limit of nested interpreters is 4).
const MAX_DEPTH: usize = 5;
/// Largest file the gate hashes (a sparse file could otherwise hold a
/// worker for ever).
const MAX_HASHED: u64 = 2 << 30;
/// Most listeners a sandbox may have at once (one per container session).
const MAX_LISTENERS: usize = 256;
/// Registrations served at once (the rest wait in the backlog).
const MAX_JOIN_CONNS: usize = 8;

/// Identity of a file's content as far as the cache cares.
type FileKey = (u64, u64, u64, i64, i64, i64, i64);

fn key_of(m: &std::fs::Metadata) -> FileKey {
    (
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// The system's program directories, as the sandbox sees them: which
/// names each file goes by, and which files have which size (to find
/// copies by hash).
#[derive(Default)]
struct ProgramIndex {
    by_inode: HashMap<(u64, u64), Vec<String>>,
    by_size: HashMap<u64, Vec<(String, PathBuf)>>,
}

/// What the gate shares between its threads.
#[allow(missing_debug_implementations)]
pub struct Gate {
    /// The seccomp listeners answered (each shared with the requests
    /// taken from it, which are answered on it).
    listeners: Mutex<Vec<Arc<OwnedFd>>>,
    /// A pipe whose write end tells the dispatcher the set changed.
    wake: (OwnedFd, OwnedFd),
    /// The dispatcher stopped: no listener is taken any more.
    dead: std::sync::atomic::AtomicBool,
    sandbox: String,
    user: String,
    workspace: String,
    decider: Mutex<Decider>,
    hashes: Mutex<HashMap<FileKey, String>>,
    index: OnceLock<ProgramIndex>,
    loaders: OnceLock<Vec<String>>,
    log: Mutex<DecisionLog>,
    /// The last denial told to a process: a shell that tries each `PATH`
    /// directory in turn hears the reason once.
    last_told: Mutex<Option<(u32, String)>>,
}

/// What the caller asked for, read from its memory.
struct Request {
    dirfd: i32,
    path: Vec<u8>,
    flags: u64,
    argv: Vec<String>,
    /// Every argument was valid UTF-8 (so `argv` is exactly what the
    /// program receives).
    argv_exact: bool,
    env_names: Vec<String>,
}

/// The caller's /proc directories, opened before the request is checked
/// to be live, so that every later look goes to this process even if its
/// pid is reused meanwhile.
struct Caller {
    /// `/proc/<tid>` (its cwd and descriptor table are the ones the
    /// kernel uses for this exec).
    thread: OwnedFd,
    /// `/proc/<tgid>` (what `/proc/self` means to the kernel).
    process: OwnedFd,
    /// The process id and a pidfd of it, for the denial notice.
    pidfd: Option<(u32, OwnedFd)>,
}

impl Caller {
    fn open(tid: u32) -> Result<Caller, Unresolved> {
        let thread = open_dir(&format!("/proc/{tid}"))?;
        let status = std::fs::read_to_string(format!("{}/status", fd_path(&thread)))
            .map_err(|e| errno_of(&e))?;
        let tgid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or(Unresolved::Errno(libc::ESRCH))?;
        let process = open_dir(&format!("/proc/{tgid}"))?;
        let pidfd = aibox_sandbox::sys::pidfd_open(tgid as i32)
            .ok()
            .map(|p| (tgid, p));
        Ok(Caller {
            thread,
            process,
            pidfd,
        })
    }

    fn thread(&self) -> String {
        fd_path(&self.thread)
    }

    fn process(&self) -> String {
        fd_path(&self.process)
    }
}

/// A path naming `fd` itself (through our own descriptor table).
fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// A file found inside the sandbox.
struct Found {
    fd: OwnedFd,
    /// Its path inside the sandbox.
    path: String,
}

impl Gate {
    /// A gate answering on `listener` (a native sandbox's), and on the
    /// listeners added later (a container's sessions').
    pub fn new(
        listener: Option<OwnedFd>,
        spec: &crate::proto::SupervisorSpec,
        decider: Decider,
        log: DecisionLog,
    ) -> std::io::Result<Gate> {
        let wake = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(std::io::Error::from)?;
        Ok(Gate {
            listeners: Mutex::new(listener.into_iter().map(Arc::new).collect()),
            wake,
            dead: std::sync::atomic::AtomicBool::new(false),
            sandbox: spec.sandbox.name.clone(),
            user: spec.user.clone(),
            workspace: spec.sandbox.workspace.display().to_string(),
            decider: Mutex::new(decider),
            hashes: Mutex::new(HashMap::new()),
            index: OnceLock::new(),
            loaders: OnceLock::new(),
            log: Mutex::new(log),
            last_told: Mutex::new(None),
        })
    }

    /// Writes the decision log's pending audit summaries and syncs it
    /// (at stop).
    pub fn flush_log(&self) {
        if let Ok(mut l) = self.log.lock() {
            l.flush();
        }
    }

    /// Starts the dispatcher, which takes held execs off the listeners,
    /// and `workers` threads deciding them.
    pub fn serve(self: &Arc<Self>, workers: usize) -> std::io::Result<()> {
        // Summaries of decisions held back from the audit log go out
        // within a second, not only when the next decision comes.
        let g = self.clone();
        std::thread::Builder::new()
            .name("exec-gate-summaries".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    if let Ok(mut l) = g.log.lock() {
                        l.tick();
                    }
                }
            })?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<(Arc<OwnedFd>, Notification)>(64);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers.max(1) {
            let (g, rx) = (self.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("exec-gate-{i}"))
                .spawn(move || {
                    loop {
                        // (The lock is held only while waiting for work.)
                        let next = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        let Ok((listener, n)) = next else { return };
                        if let Some(v) = g.handle(&listener, n) {
                            // ENOENT: the caller died while we decided.
                            let _ = notify::answer(listener.as_fd(), n.id, v);
                        }
                    }
                })?;
        }
        let g = self.clone();
        std::thread::Builder::new()
            .name("exec-gate".into())
            .spawn(move || g.dispatch(tx))?;
        Ok(())
    }

    /// Adds a session's listener (see [`Gate::serve_joins`]).
    fn add_listener(&self, fd: OwnedFd) -> Result<(), String> {
        if self.dead.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("the exec gate has stopped; stop and start the sandbox".into());
        }
        let mut set = self
            .listeners
            .lock()
            .map_err(|_| "the exec gate failed".to_string())?;
        if set.len() >= MAX_LISTENERS {
            return Err(format!(
                "this sandbox already has {MAX_LISTENERS} gated sessions; end some"
            ));
        }
        set.push(Arc::new(fd));
        drop(set);
        let _ = nix::unistd::write(&self.wake.1, b"x");
        Ok(())
    }

    /// Polls every listener; hands each held exec to a worker and drops a
    /// listener once all its processes are gone (POLLHUP). The only
    /// thread that receives, so a readable listener has a request for it.
    fn dispatch(&self, tx: std::sync::mpsc::SyncSender<(Arc<OwnedFd>, Notification)>) {
        let why = self.dispatch_loop(tx);
        // Fail closed and at once: with every listener closed, held and
        // future execs fail (ENOSYS) instead of waiting for ever, and no
        // session can join.
        self.dead.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut s) = self.listeners.lock() {
            s.clear();
        }
        crate::supervisor::log(&format!(
            "the exec gate stopped ({why}); every exec in the sandbox now fails"
        ));
    }

    fn dispatch_loop(
        &self,
        tx: std::sync::mpsc::SyncSender<(Arc<OwnedFd>, Notification)>,
    ) -> String {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut failures = 0u32;
        loop {
            let set: Vec<Arc<OwnedFd>> = match self.listeners.lock() {
                Ok(s) => s.clone(),
                Err(_) => return "its listener list was poisoned".into(),
            };
            let mut fds = Vec::with_capacity(set.len() + 1);
            fds.push(PollFd::new(self.wake.0.as_fd(), PollFlags::POLLIN));
            fds.extend(
                set.iter()
                    .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
            );
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => failures = 0,
                Err(nix::errno::Errno::EINTR) => continue,
                // (ENOMEM and the like may pass.)
                Err(_) if failures < 50 => {
                    failures += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    continue;
                }
                Err(e) => return format!("poll: {e}"),
            }
            let revents: Vec<PollFlags> = fds
                .iter()
                .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                .collect();
            drop(fds);
            if revents[0].contains(PollFlags::POLLIN) {
                let mut buf = [0u8; 64];
                while matches!(nix::unistd::read(&self.wake.0, &mut buf), Ok(n) if n > 0) {}
            }
            let mut gone = Vec::new();
            for (l, r) in set.iter().zip(&revents[1..]) {
                if r.contains(PollFlags::POLLIN) {
                    match notify::receive(l.as_fd()) {
                        Ok(n) => {
                            if tx.send((l.clone(), n)).is_err() {
                                return "its workers are gone".into();
                            }
                        }
                        // The caller died first.
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENOENT)) => {}
                        Err(_) => gone.push(l.clone()),
                    }
                } else if r
                    .intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL)
                {
                    // Every process under this filter is gone.
                    gone.push(l.clone());
                }
            }
            if !gone.is_empty()
                && let Ok(mut s) = self.listeners.lock()
            {
                s.retain(|l| !gone.iter().any(|g| Arc::ptr_eq(g, l)));
            }
        }
    }

    /// The answer to one held exec (None: the caller is gone).
    fn handle(&self, listener: &OwnedFd, n: Notification) -> Option<Verdict> {
        let t0 = Instant::now();
        let caller_pidfd;
        let req = match self.read_request(&n) {
            Ok(r) => r,
            Err(errno) => {
                return notify::still_valid(listener.as_fd(), n.id).then_some(Verdict::Fail(errno));
            }
        };
        let caller = Caller::open(n.pid);
        // What we read and opened is only the caller's if the request is
        // still live (the pid could otherwise have been reused).
        if !notify::still_valid(listener.as_fd(), n.id) {
            return None;
        }
        let inputs = match caller.and_then(|c| self.inputs_for(&req, &c).map(|i| (i, c))) {
            Ok((i, c)) => {
                caller_pidfd = c.pidfd;
                i
            }
            // The kernel would fail the same way (a missing file): no
            // decision to record, and execvp goes on down its PATH.
            Err(Unresolved::Errno(e)) => return Some(Verdict::Fail(e)),
            Err(Unresolved::Refused(why)) => {
                let d = Decision {
                    action: Action::Deny,
                    risk: Risk::BlockedByDefault,
                    rule: "gate".into(),
                    reason: why,
                    policy_version: self.policy_version(),
                    input_hash: String::new(),
                    tier: "aibox".into(),
                };
                let input = ExecInput {
                    argv: req.argv.clone(),
                    exe: String::from_utf8_lossy(&req.path).into_owned(),
                    sandbox: self.sandbox.clone(),
                    ..ExecInput::default()
                };
                return Some(self.conclude(&req, d, vec![input], t0, None));
            }
        };
        let mut decisions = Vec::with_capacity(inputs.len());
        if let Ok(mut d) = self.decider.lock() {
            for i in &inputs {
                decisions.push(d.decide(i));
            }
        }
        // The strictest decision stands; the first (the file itself) on a tie.
        let Some(worst) =
            aibox_policy::strictest(&decisions).and_then(|i| Some((i, decisions.get(i)?.clone())))
        else {
            return Some(Verdict::Fail(libc::EPERM));
        };
        let (at, decision) = worst;
        let mut ordered = inputs;
        // The deciding input goes first in the log entry.
        let first = ordered.remove(at);
        ordered.insert(0, first);
        Some(self.conclude(&req, decision, ordered, t0, caller_pidfd))
    }

    /// A decision log entry (numbered when recorded).
    fn entry(
        &self,
        action: String,
        command: String,
        d: &Decision,
        inputs: Vec<ExecInput>,
        t0: Instant,
    ) -> LogEntry {
        LogEntry {
            entry: 0,
            timestamp: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            policy_version: d.policy_version.clone(),
            input_hash: d.input_hash.clone(),
            action,
            command,
            target: inputs.first().map(|i| i.exe.clone()).unwrap_or_default(),
            user: self.user.clone(),
            workspace: self.workspace.clone(),
            sandbox_id: self.sandbox.clone(),
            decision: d.action,
            risk_class: d.risk,
            rule: d.rule.clone(),
            tier: d.tier.clone(),
            reason: d.reason.clone(),
            duration_us: t0.elapsed().as_micros() as u64,
            inputs,
            truncated: false,
            base64_run: 0,
        }
    }

    fn policy_version(&self) -> String {
        self.decider
            .lock()
            .map(|d| d.policy_version().to_string())
            .unwrap_or_default()
    }

    /// Records `entry` (decided as `d`). A decision that cannot be
    /// recorded becomes a denial: nothing runs off the record.
    fn record(&self, entry: LogEntry, d: Decision) -> (Decision, u64) {
        let r = match self.log.lock() {
            Ok(mut l) => l.record(entry),
            Err(_) => Err(std::io::Error::other("its lock is poisoned")),
        };
        match r {
            Ok(n) => (d, n),
            Err(e) => (
                Decision {
                    action: Action::Deny,
                    risk: Risk::BlockedByDefault,
                    rule: "gate".into(),
                    tier: "aibox".into(),
                    reason: format!(
                        "the decision log cannot be written ({e}); nothing runs unrecorded. Free space under the data directory or restart the sandbox"
                    ),
                    ..d
                },
                0,
            ),
        }
    }

    /// Logs the decision and turns it into an answer.
    fn conclude(
        &self,
        req: &Request,
        d: Decision,
        inputs: Vec<ExecInput>,
        t0: Instant,
        pidfd: Option<(u32, OwnedFd)>,
    ) -> Verdict {
        let entry = self.entry("exec".into(), shell_words(&req.argv), &d, inputs, t0);
        let target = entry.target.clone();
        let (d, number) = self.record(entry, d);
        match d.action {
            Action::Allow | Action::Review => Verdict::Continue,
            // Test builds only: lets a test show what the Landlock layer
            // does on its own.
            Action::Deny if aibox_sandbox::debug_skip("exec-gate") => Verdict::Continue,
            Action::Deny => {
                let mut line = format!(
                    "aibox: `{}` blocked by policy rule {} ({} tier): {}\n",
                    target, d.rule, d.tier, d.reason
                );
                if number > 0 {
                    line.push_str(&format!(
                        "aibox: details and how to ask for an exception: aibox policy explain --log-entry {number} --name {}\n",
                        self.sandbox
                    ));
                }
                let told = (pidfd.as_ref().map(|p| p.0).unwrap_or_default(), target);
                let repeat = self
                    .last_told
                    .lock()
                    .map(|mut l| l.replace(told.clone()).as_ref() == Some(&told))
                    .unwrap_or(false);
                if !repeat && let Some((_, p)) = pidfd {
                    tell(p, line);
                }
                Verdict::Fail(libc::EPERM)
            }
        }
    }

    fn read_request(&self, n: &Notification) -> Result<Request, i32> {
        let (dirfd, path, argv, envp, flags) = match n.nr {
            notify::NR_EXECVE => (notify::AT_FDCWD, n.args[0], n.args[1], n.args[2], 0),
            notify::NR_EXECVEAT => (n.args[0] as i32, n.args[1], n.args[2], n.args[3], n.args[4]),
            _ => return Err(libc::ENOSYS),
        };
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EFAULT);
        let path = notify::read_cstring(n.pid, path, PATH_MAX).map_err(errno)?;
        let raw = notify::read_string_array(n.pid, argv, MAX_ARGS, MAX_ARG_BYTES).map_err(errno)?;
        let argv_exact = raw.iter().all(|a| std::str::from_utf8(a).is_ok());
        let argv = raw
            .into_iter()
            .map(|a| String::from_utf8_lossy(&a).into_owned())
            .collect();
        let env_names = notify::read_string_array(n.pid, envp, MAX_ARGS, MAX_ARG_BYTES)
            .map_err(errno)?
            .into_iter()
            .map(|e| {
                let name = e.split(|b| *b == b'=').next().unwrap_or_default();
                String::from_utf8_lossy(name).into_owned()
            })
            .collect();
        Ok(Request {
            dirfd,
            path,
            flags,
            argv,
            argv_exact,
            env_names,
        })
    }

    /// Every input to decide for this exec: the file, each interpreter of
    /// a script, the program a loader was asked to run.
    fn inputs_for(&self, req: &Request, caller: &Caller) -> Result<Vec<ExecInput>, Unresolved> {
        // The caller's root is every sandbox process's root (none can
        // chroot). Not init's: in a rootless sandbox init is not dumpable,
        // and its /proc links are closed to us.
        let root = open_dir(&format!("{}/root", caller.thread()))?;
        // Names are compared as text: a path that is not UTF-8 could name
        // one file to us and another to the kernel, so it is refused.
        let path = String::from_utf8(req.path.clone())
            .map_err(|_| Unresolved::Refused("the program's path is not valid UTF-8".into()))?;
        // (Read only when needed: a deleted cwd does not stop absolute execs.)
        let cwd_of = || proc_link(&caller.thread(), "cwd");
        let found = if path.is_empty() {
            if req.flags & notify::AT_EMPTY_PATH == 0 {
                return Err(Unresolved::Errno(libc::ENOENT));
            }
            self.open_proc(&caller.thread(), &format!("fd/{}", req.dirfd))?
        } else if path.starts_with('/') {
            self.resolve(root.as_fd(), caller, "/", &path)?
        } else if req.dirfd == notify::AT_FDCWD {
            self.resolve(root.as_fd(), caller, &cwd_of()?, &path)?
        } else {
            let base = proc_link(&caller.thread(), &format!("fd/{}", req.dirfd))?;
            self.resolve(root.as_fd(), caller, &base, &path)?
        };
        let cwd = cwd_of().unwrap_or_default();
        let parent = parent_comm(&caller.process());
        let mut out = Vec::new();
        let mut argv = req.argv.clone();
        let mut file = found;
        for _ in 0..MAX_DEPTH {
            let meta = meta_of(&file.fd)?;
            // What the kernel would refuse anyway is not read: not a
            // regular file, no execute bit, a noexec mount. (Stricter than
            // the kernel for a loader's program without an execute bit.)
            if !meta.is_file() || meta.mode() & 0o111 == 0 {
                return Err(Unresolved::Errno(libc::EACCES));
            }
            let vfs =
                nix::sys::statvfs::fstatvfs(&file.fd).map_err(|e| Unresolved::Errno(e as i32))?;
            if vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC) {
                return Err(Unresolved::Errno(libc::EACCES));
            }
            if meta.size() > MAX_HASHED {
                return Err(Unresolved::Refused(format!(
                    "{} is larger than the {} GiB the gate identifies",
                    file.path,
                    MAX_HASHED >> 30
                )));
            }
            // Content on a writable mount can change without its times
            // changing (a shared mapping): hashed every time.
            let cacheable = vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY);
            let (sha, head) = self.hash_and_head(&file.fd, &meta, cacheable)?;
            let aliases = self.aliases(root.as_fd(), &file.path, &meta, &sha);
            out.push(ExecInput {
                argv: argv.clone(),
                exe: file.path.clone(),
                exe_sha256: sha.clone(),
                cwd: cwd.clone(),
                uid: aibox_core::guest::UID,
                env_names: req.env_names.clone(),
                sandbox: self.sandbox.clone(),
                exe_aliases: aliases,
                parent: parent.clone(),
            });
            if let Some(sb) = shebang(&head) {
                let (interp, arg) = sb.ok_or_else(|| {
                    Unresolved::Refused(format!("{}: its #! line is not valid UTF-8", file.path))
                })?;
                // The kernel runs `interp [arg] script args…`.
                let mut next = vec![interp.clone()];
                next.extend(arg);
                next.push(file.path.clone());
                next.extend(argv.iter().skip(1).cloned());
                argv = next;
                file = self.resolve(root.as_fd(), caller, &cwd_of()?, &interp)?;
                continue;
            }
            if self.is_loader(root.as_fd(), &file.path, &sha)
                && let Some((prog, rest)) = loader_target(&argv)
            {
                if !req.argv_exact {
                    return Err(Unresolved::Refused(
                        "the loader's arguments are not valid UTF-8".into(),
                    ));
                }
                let mut next = vec![prog.clone()];
                next.extend(rest);
                argv = next;
                file = self.resolve(root.as_fd(), caller, &cwd_of()?, &prog)?;
                continue;
            }
            return Ok(out);
        }
        Err(Unresolved::Refused(format!(
            "more than {MAX_DEPTH} levels of interpreters"
        )))
    }

    /// Opens `path` (relative to `base`) as the caller would, inside the
    /// sandbox's root. `/proc/<pid>/{root,cwd,exe,fd/N}` spellings are
    /// followed by hand (the scoped lookup refuses magic links).
    fn resolve(
        &self,
        root: BorrowedFd<'_>,
        caller: &Caller,
        base: &str,
        path: &str,
    ) -> Result<Found, Unresolved> {
        let mut text = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("{}/{path}", base.trim_end_matches('/'))
        };
        for _ in 0..8 {
            match proc_magic(&text) {
                None => {
                    let fd = notify::open_in_root(root, text.as_bytes()).map_err(|e| {
                        match e.raw_os_error() {
                            Some(libc::EXDEV | libc::ELOOP) => Unresolved::Refused(format!(
                                "{path}: its path leads through /proc links the gate cannot follow"
                            )),
                            Some(e) => Unresolved::Errno(e),
                            None => Unresolved::Errno(libc::EACCES),
                        }
                    })?;
                    let real = self.inside_path(&fd).ok_or_else(|| {
                        Unresolved::Refused(format!(
                            "{path}: the file's own name is not valid UTF-8"
                        ))
                    })?;
                    return Ok(Found { fd, path: real });
                }
                Some((who, what, rest)) => {
                    // `self` is the process (its leader's descriptors and
                    // cwd), `thread-self` the calling thread.
                    let dir = match who.as_str() {
                        "self" => caller.process(),
                        "thread-self" => caller.thread(),
                        _ => format!("/proc/{}", self.host_pid_of(caller, &who)?),
                    };
                    match (what.as_str(), rest.is_empty()) {
                        ("root", _) => text = format!("/{rest}"),
                        ("cwd", _) => text = format!("{}/{rest}", proc_link(&dir, "cwd")?),
                        ("exe", true) => return self.open_proc(&dir, "exe"),
                        (fd, true) if fd.starts_with("fd/") => return self.open_proc(&dir, fd),
                        (fd, false) if fd.starts_with("fd/") => {
                            text = format!("{}/{rest}", proc_link(&dir, fd)?)
                        }
                        _ => return Err(Unresolved::Errno(libc::ENOTDIR)),
                    }
                }
            }
        }
        Err(Unresolved::Errno(libc::ELOOP))
    }

    /// The host pid of sandbox process `who` (a number in the pid
    /// namespace of `caller`, which no sandbox process can leave).
    fn host_pid_of(&self, caller: &Caller, who: &str) -> Result<u32, Unresolved> {
        let inner: u32 = who.parse().map_err(|_| Unresolved::Errno(libc::ENOENT))?;
        // Rare spelling: find the host process in the sandbox's pid
        // namespace whose innermost pid is `inner`.
        let ns =
            std::fs::read_link(format!("{}/ns/pid", caller.process())).map_err(|e| errno_of(&e))?;
        for e in std::fs::read_dir("/proc")
            .map_err(|e| errno_of(&e))?
            .flatten()
        {
            let Some(host) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{host}/ns/pid"))
                .ok()
                .as_ref()
                != Some(&ns)
            {
                continue;
            }
            let Ok(status) = std::fs::read_to_string(format!("/proc/{host}/status")) else {
                continue;
            };
            let last = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last()?.parse::<u32>().ok());
            if last == Some(inner) {
                return Ok(host);
            }
        }
        Err(Unresolved::Errno(libc::ENOENT))
    }

    /// Opens `<dir>/<what>` (a /proc link of a sandbox process), the
    /// object itself.
    fn open_proc(&self, dir: &str, what: &str) -> Result<Found, Unresolved> {
        let p = format!("{dir}/{what}");
        let fd = open_path(&p)?;
        let path = self.inside_path(&fd).ok_or_else(|| {
            Unresolved::Refused(format!("{what}: the file's name is not valid UTF-8"))
        })?;
        Ok(Found { fd, path })
    }

    /// The path of an opened file as the sandbox sees it.
    fn inside_path(&self, fd: &OwnedFd) -> Option<String> {
        let link = std::fs::read_link(fd_path(fd)).ok()?;
        let s = link.into_os_string().into_string().ok()?;
        s.starts_with('/').then_some(s)
    }

    /// SHA-256 (cached by inode, size and times) and the first 256 bytes.
    fn hash_and_head(
        &self,
        fd: &OwnedFd,
        meta: &std::fs::Metadata,
        cacheable: bool,
    ) -> Result<(String, Vec<u8>), Unresolved> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fd_path(fd))
            .map_err(|e| Unresolved::Errno(e.raw_os_error().unwrap_or(libc::EACCES)))?;
        let mut head = vec![0u8; 256];
        let n = read_full(&mut f, &mut head);
        head.truncate(n);
        let key = key_of(meta);
        if cacheable && let Some(h) = self.hashes.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok((h, head));
        }
        let mut hasher = Sha256::new();
        hasher.update(&head);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(Unresolved::Errno(libc::EIO)),
            }
        }
        let h = hex::encode(hasher.finalize());
        if cacheable && let Ok(mut c) = self.hashes.lock() {
            if c.len() > 65_536 {
                c.clear();
            }
            c.insert(key, h.clone());
        }
        Ok((h, head))
    }

    fn hash_path(&self, root: BorrowedFd<'_>, path: &Path) -> Option<String> {
        let fd = notify::open_in_root(root, path.as_os_str().as_encoded_bytes()).ok()?;
        let meta = meta_of(&fd).ok()?;
        // (Never open a FIFO or a device for reading: it could block.)
        if !meta.is_file() || meta.size() > MAX_HASHED {
            return None;
        }
        let cacheable = nix::sys::statvfs::fstatvfs(&fd)
            .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
        self.hash_and_head(&fd, &meta, cacheable)
            .ok()
            .map(|(h, _)| h)
    }

    /// Other names of this file in the program directories: the same
    /// inode (hard links, and the links pointing at it), or the same
    /// content (a copy).
    fn aliases(
        &self,
        root: BorrowedFd<'_>,
        path: &str,
        meta: &std::fs::Metadata,
        sha: &str,
    ) -> Vec<String> {
        let index = self.index.get_or_init(|| build_index(root));
        let own = path.rsplit('/').next().unwrap_or(path);
        let mut out: Vec<String> = index
            .by_inode
            .get(&(meta.dev(), meta.ino()))
            .into_iter()
            .flatten()
            .filter(|n| n.as_str() != own)
            .cloned()
            .collect();
        for (name, p) in index.by_size.get(&meta.size()).into_iter().flatten() {
            if name == own || out.contains(name) {
                continue;
            }
            if self.hash_path(root, p).as_deref() == Some(sha) {
                out.push(name.clone());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether the file is the dynamic loader (by name, or by the content
    /// of the sandbox's own loaders: a renamed copy is still one).
    fn is_loader(&self, root: BorrowedFd<'_>, path: &str, sha: &str) -> bool {
        let base = path.rsplit('/').next().unwrap_or(path);
        if base.starts_with("ld-linux") || base.starts_with("ld.so") || base.starts_with("ld-musl")
        {
            return true;
        }
        let loaders = self.loaders.get_or_init(|| {
            [
                "/lib64/ld-linux-x86-64.so.2",
                "/usr/lib64/ld-linux-x86-64.so.2",
                "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "/lib/ld-musl-x86_64.so.1",
            ]
            .iter()
            .filter_map(|p| self.hash_path(root, Path::new(p)))
            .collect()
        });
        loaders.iter().any(|h| h == sha)
    }
}

/// What an agent's pre-tool hook asks (one JSON line on
/// [`aibox_sandbox::GATE_SOCKET`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookRequest {
    /// The agent (`claude-code`).
    pub agent: String,
    /// Its tool (`Bash`).
    pub tool: String,
    /// The command line the tool would run.
    pub command: String,
    /// The directory it would run in.
    #[serde(default)]
    pub cwd: String,
}

/// The answer to a hook.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HookReply {
    /// The strictest decision over the line's commands.
    pub decision: Action,
    /// Its rule.
    pub rule: String,
    /// The rule's tier.
    pub tier: String,
    /// Why.
    pub reason: String,
    /// The simple command that decided.
    pub command: String,
    /// Its decision log entry.
    pub entry: u64,
}

/// Longest hook request read.
const MAX_HOOK_REQUEST: u64 = 256 * 1024;
/// Hook connections served at once (the rest wait in the backlog).
const MAX_HOOK_CONNS: usize = 8;

impl Gate {
    /// Serves hook requests on `listener` (one request per connection).
    pub fn serve_hooks(
        self: &Arc<Self>,
        listener: std::os::unix::net::UnixListener,
    ) -> std::io::Result<()> {
        let g = self.clone();
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("exec-gate-hooks".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let g = g.clone();
                    run_bounded(&busy, MAX_HOOK_CONNS, "exec-gate-hook", move || {
                        g.hook_conn(conn)
                    });
                }
            })?;
        Ok(())
    }

    /// Takes the listeners of container sessions on `sock` (a listening
    /// seqpacket socket, mounted into the container): one
    /// [`aibox_sandbox::container::GateJoin`] with one descriptor per
    /// connection, answered once the listener is served. Only a seccomp
    /// listener is taken; a sandbox process that sends one can only add
    /// gating (its own processes are under the gate already, so it cannot
    /// make a listener of its own: the kernel refuses a second one).
    pub fn serve_joins(self: &Arc<Self>, sock: OwnedFd) -> std::io::Result<()> {
        let g = self.clone();
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("exec-gate-joins".into())
            .spawn(move || {
                loop {
                    let conn = match nix::sys::socket::accept4(
                        sock.as_raw_fd(),
                        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                    ) {
                        Ok(fd) => aibox_sandbox::sys::own_fd(fd),
                        Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => {
                            continue;
                        }
                        Err(e) => {
                            crate::supervisor::log(&format!("the exec gate's joins stopped: {e}"));
                            return;
                        }
                    };
                    let g = g.clone();
                    run_bounded(&busy, MAX_JOIN_CONNS, "exec-gate-join", move || {
                        g.join_conn(conn)
                    });
                }
            })?;
        Ok(())
    }

    fn join_conn(&self, conn: OwnedFd) {
        use aibox_sandbox::container::{GateJoin, GateJoined};
        use nix::sys::socket::{setsockopt, sockopt};
        let limit = nix::sys::time::TimeVal::new(5, 0);
        let _ = setsockopt(&conn, sockopt::ReceiveTimeout, &limit);
        let _ = setsockopt(&conn, sockopt::SendTimeout, &limit);
        let result = match aibox_sandbox::ipc::recv::<GateJoin>(&conn) {
            Ok(Some((_, mut fds))) if fds.len() == 1 => match fds.pop() {
                Some(fd) if is_seccomp_listener(&fd) => self.add_listener(fd),
                _ => Err("the descriptor is not a seccomp listener".into()),
            },
            Ok(Some(_)) => Err("exactly one descriptor must come with the request".into()),
            Ok(None) => return,
            Err(e) => Err(format!("bad request: {e}")),
        };
        let reply = GateJoined {
            error: result.err(),
        };
        let _ = aibox_sandbox::ipc::send(&conn, &reply, &[]);
    }

    fn hook_conn(&self, conn: std::os::unix::net::UnixStream) {
        use std::io::BufRead;
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let _ = conn.set_write_timeout(Some(std::time::Duration::from_secs(5)));
        let Ok(cred) =
            nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        else {
            return;
        };
        let mut line = String::new();
        let Ok(reader) = conn.try_clone() else { return };
        let mut reader = std::io::BufReader::new(reader.take(MAX_HOOK_REQUEST));
        // The whole request within the deadline, not each read: a slow
        // writer cannot hold a slot for long.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || conn.set_read_timeout(Some(left)).is_err() {
                return;
            }
            let mut chunk = Vec::new();
            match reader.read_until(b'\n', &mut chunk) {
                Ok(0) => break,
                Ok(_) => {
                    line.push_str(&String::from_utf8_lossy(&chunk));
                    if line.ends_with('\n') {
                        break;
                    }
                }
                Err(_) => return,
            }
        }
        let reply = match serde_json::from_str::<HookRequest>(&line) {
            // Only the hooks aibox registers (a request names what the
            // decision log will say it was).
            Ok(req) if req.agent == "claude-code" && req.tool == "Bash" => {
                self.hook(cred.pid() as u32, &req)
            }
            Ok(req) => HookReply {
                decision: Action::Deny,
                rule: "gate".into(),
                tier: "aibox".into(),
                reason: format!("no hook for agent `{}`, tool `{}`", req.agent, req.tool),
                command: String::new(),
                entry: 0,
            },
            Err(e) => HookReply {
                decision: Action::Deny,
                rule: "gate".into(),
                tier: "aibox".into(),
                reason: format!("the hook's request is not valid: {e}"),
                command: String::new(),
                entry: 0,
            },
        };
        if let Ok(mut text) = serde_json::to_string(&reply) {
            text.push('\n');
            let mut w = &conn;
            let _ = w.write_all(text.as_bytes());
        }
    }

    /// The decision for a hook: every simple command of the line, the
    /// strictest standing, logged as one `hook` entry.
    pub fn hook(&self, pid: u32, req: &HookRequest) -> HookReply {
        let t0 = Instant::now();
        let cwd = if req.cwd.starts_with('/') {
            req.cwd.clone()
        } else {
            "/workspace".to_string()
        };
        let caller = Caller::open(pid).ok();
        let root = caller
            .as_ref()
            .and_then(|c| open_dir(&format!("{}/root", c.thread())).ok());
        let mut inputs = Vec::new();
        for argv in aibox_policy::shell::split_commands(&req.command) {
            inputs.push(self.hook_input(root.as_ref().zip(caller.as_ref()), &cwd, argv));
        }
        if inputs.is_empty() {
            inputs.push(ExecInput {
                argv: vec![String::new()],
                cwd: cwd.clone(),
                sandbox: self.sandbox.clone(),
                ..ExecInput::default()
            });
        }
        let mut decisions = Vec::new();
        if let Ok(mut d) = self.decider.lock() {
            for i in &inputs {
                decisions.push(d.decide(i));
            }
        }
        let at = aibox_policy::strictest(&decisions).unwrap_or(0);
        let Some(d) = decisions.get(at).cloned() else {
            return HookReply {
                decision: Action::Deny,
                rule: "gate".into(),
                tier: "aibox".into(),
                reason: "the policy could not be consulted".into(),
                command: req.command.clone(),
                entry: 0,
            };
        };
        let deciding = shell_words(&inputs[at].argv);
        let first = inputs.remove(at);
        inputs.insert(0, first);
        let entry = self.entry(
            format!("hook:{}:{}", req.agent, req.tool),
            req.command.clone(),
            &d,
            inputs,
            t0,
        );
        let (d, number) = self.record(entry, d);
        HookReply {
            decision: d.action,
            rule: d.rule,
            tier: d.tier,
            reason: d.reason,
            command: deciding,
            entry: number,
        }
    }

    /// The input for one simple command of a hook: its program found as
    /// the shell would (a path, or the guest's PATH), else by name only
    /// (a builtin or a missing program).
    fn hook_input(
        &self,
        ctx: Option<(&OwnedFd, &Caller)>,
        cwd: &str,
        argv: Vec<String>,
    ) -> ExecInput {
        let mut input = ExecInput {
            exe: argv.first().cloned().unwrap_or_default(),
            argv,
            cwd: cwd.to_string(),
            uid: aibox_core::guest::UID,
            sandbox: self.sandbox.clone(),
            ..ExecInput::default()
        };
        let Some((root, caller)) = ctx else {
            return input;
        };
        let prog = input.exe.clone();
        let candidates: Vec<String> = if prog.contains('/') {
            vec![prog]
        } else {
            aibox_core::guest::PATH
                .split(':')
                .map(|d| format!("{d}/{prog}"))
                .collect()
        };
        for c in candidates {
            let Ok(found) = self.resolve(root.as_fd(), caller, cwd, &c) else {
                continue;
            };
            let Ok(meta) = meta_of(&found.fd) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if meta.size() <= MAX_HASHED
                && let Ok((sha, _)) = self.hash_and_head(&found.fd, &meta, false)
            {
                input.exe_aliases = self.aliases(root.as_fd(), &found.path, &meta, &sha);
                input.exe_sha256 = sha;
            }
            input.exe = found.path;
            break;
        }
        input
    }
}

/// Why a path could not be decided.
enum Unresolved {
    /// The exec would fail anyway with this errno.
    Errno(i32),
    /// The gate refuses to guess (recorded as a denial).
    Refused(String),
}

/// Runs `work` on a thread of its own, counted in `busy`, and returns once
/// fewer than `max` such threads run, so that further connections wait
/// in the listening socket's backlog (a full backlog makes them fail).
fn run_bounded(
    busy: &Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
    name: &str,
    work: impl FnOnce() + Send + 'static,
) {
    use std::sync::atomic::Ordering;
    busy.fetch_add(1, Ordering::SeqCst);
    let done = busy.clone();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            work();
            done.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        // (The closure, and its decrement, never ran.)
        busy.fetch_sub(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    while busy.load(Ordering::SeqCst) >= max {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// True if `fd` is a seccomp user-notification listener.
fn is_seccomp_listener(fd: &OwnedFd) -> bool {
    std::fs::read_link(fd_path(fd)).is_ok_and(|l| l.as_os_str() == "anon_inode:seccomp notify")
}

fn errno_of(e: &std::io::Error) -> Unresolved {
    Unresolved::Errno(e.raw_os_error().unwrap_or(libc::EACCES))
}

fn open_path(p: &str) -> Result<OwnedFd, Unresolved> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(p)
        .map(OwnedFd::from)
        .map_err(|e| errno_of(&e))
}

fn open_dir(p: &str) -> Result<OwnedFd, Unresolved> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(p)
        .map(OwnedFd::from)
        .map_err(|_| Unresolved::Refused("the sandbox's root could not be opened".into()))
}

fn meta_of(fd: &OwnedFd) -> Result<std::fs::Metadata, Unresolved> {
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|e| errno_of(&e))
}

/// A `/proc/<pid>/…` link of a sandbox process as the sandbox sees it.
/// (Read from outside, the kernel prints the path relative to the
/// sandbox's root: it is not reachable from ours.)
fn proc_link(dir: &str, what: &str) -> Result<String, Unresolved> {
    let l = std::fs::read_link(format!("{dir}/{what}")).map_err(|e| errno_of(&e))?;
    let s = l
        .into_os_string()
        .into_string()
        .map_err(|_| Unresolved::Refused(format!("the process's {what} is not valid UTF-8")))?;
    if !s.starts_with('/') || s.ends_with(" (deleted)") {
        return Err(Unresolved::Refused(format!(
            "the process's {what} is not a directory the gate can name ({s})"
        )));
    }
    Ok(s)
}

fn parent_comm(dir: &str) -> String {
    let Ok(status) = std::fs::read_to_string(format!("{dir}/status")) else {
        return String::new();
    };
    let Some(ppid) = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .map(str::trim)
    else {
        return String::new();
    };
    std::fs::read_to_string(format!("/proc/{ppid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Splits `/proc/<who>/<what>[/rest]` with what ∈ root, cwd, exe, fd/N.
fn proc_magic(path: &str) -> Option<(String, String, String)> {
    let mut parts = path.trim_start_matches('/').splitn(4, '/');
    if parts.next()? != "proc" {
        return None;
    }
    let who = parts.next()?.to_string();
    if !(who == "self" || who == "thread-self" || who.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let what = parts.next()?.to_string();
    let rest = parts.next().unwrap_or_default().to_string();
    match what.as_str() {
        "root" | "cwd" | "exe" => Some((who, what, rest)),
        "fd" => {
            let mut r = rest.splitn(2, '/');
            let n = r.next()?.to_string();
            n.bytes().all(|b| b.is_ascii_digit()).then(|| {
                (
                    who,
                    format!("fd/{n}"),
                    r.next().unwrap_or_default().to_string(),
                )
            })
        }
        // `task/<tid>/…` names one thread's view: not followed (the
        // scoped lookup then refuses the path).
        _ => None,
    }
}

/// `#!interp [arg]` of a script, as the kernel parses it.
/// (None when the file is no script; Some(None) when its line is not
/// UTF-8.)
#[allow(clippy::type_complexity)]
fn shebang(head: &[u8]) -> Option<Option<(String, Option<String>)>> {
    let rest = head.strip_prefix(b"#!")?;
    let line = rest.split(|b| *b == b'\n').next()?;
    let Ok(line) = std::str::from_utf8(line) else {
        return Some(None);
    };
    let line = line.trim_matches(|c| c == ' ' || c == '\t');
    let (interp, arg) = match line.find([' ', '\t']) {
        Some(i) => (&line[..i], Some(line[i..].trim().to_string())),
        None => (line, None),
    };
    (!interp.is_empty()).then(|| Some((interp.to_string(), arg.filter(|a| !a.is_empty()))))
}

/// The program the dynamic loader is asked to run, and its arguments.
fn loader_target(argv: &[String]) -> Option<(String, Vec<String>)> {
    const WITH_VALUE: &[&str] = &[
        "--library-path",
        "--inhibit-rpath",
        "--audit",
        "--preload",
        "--argv0",
        "--glibc-hwcaps-prefix",
        "--glibc-hwcaps-mask",
    ];
    let mut i = 1;
    while i < argv.len() {
        let a = &argv[i];
        if WITH_VALUE.contains(&a.as_str()) {
            i += 2;
        } else if a == "--" {
            i += 1;
            break;
        } else if a.starts_with("--") {
            i += 1;
        } else {
            break;
        }
    }
    let prog = argv.get(i)?.clone();
    Some((prog, argv[i + 1..].to_vec()))
}

fn build_index(root: BorrowedFd<'_>) -> ProgramIndex {
    let mut idx = ProgramIndex::default();
    for dir in aibox_sandbox::landlock_rules::PROGRAM_DIRS {
        // (Opened inside the root: a link such as /bin -> /usr/bin must
        // not be followed on the host.)
        let Ok(d) = notify::open_in_root(root, dir.as_bytes()) else {
            continue;
        };
        let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", d.as_raw_fd())) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let inside = Path::new(dir).join(&name);
            let Ok(fd) = notify::open_in_root(root, inside.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            let Ok(m) = meta_of(&fd) else { continue };
            if !m.is_file() {
                continue;
            }
            let names = idx.by_inode.entry((m.dev(), m.ino())).or_default();
            if !names.contains(&name) {
                names.push(name.clone());
            }
            idx.by_size
                .entry(m.size())
                .or_default()
                .push((name, inside));
        }
    }
    idx
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    n
}

fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `line` to the caller's stderr (a duplicate of its descriptor 2,
/// so with its own access mode: nothing it could not write itself). On a
/// thread of its own: a full pipe must not hold the gate.
fn tell(pidfd: OwnedFd, line: String) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A stderr that is a full pipe blocks its writer: at most a few such
    // writes wait at once, the rest are skipped (the log has them all).
    static TELLING: AtomicUsize = AtomicUsize::new(0);
    if TELLING.fetch_add(1, Ordering::SeqCst) >= 4 {
        TELLING.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let done = || {
        TELLING.fetch_sub(1, Ordering::SeqCst);
    };
    let Ok(fd) = notify::pidfd_getfd(pidfd.as_fd(), 2) else {
        done();
        return;
    };
    // Written before the answer when that cannot block (a pipe with room
    // takes up to PIPE_BUF bytes at once), so the line comes before the
    // caller's own error and before its session ends.
    {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
        let ready = poll(&mut p, PollTimeout::ZERO).is_ok_and(|n| n > 0)
            && p[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLOUT));
        if ready && line.len() <= libc::PIPE_BUF {
            let mut f = File::from(fd);
            let _ = f.write_all(line.as_bytes());
            done();
            return;
        }
    }
    let spawned = std::thread::Builder::new()
        .name("exec-gate-tell".into())
        .spawn(move || {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            // Room for one line (a pipe reports POLLOUT with PIPE_BUF
            // bytes free), or give up after a second.
            let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
            if poll(&mut p, PollTimeout::from(1000u16)).is_ok_and(|n| n > 0) {
                let mut f = File::from(fd);
                let _ = f.write_all(line.as_bytes());
            }
            TELLING.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_spellings_are_split() {
        let s = |a: &str, b: &str, c: &str| Some((a.to_string(), b.to_string(), c.to_string()));
        assert_eq!(
            proc_magic("/proc/self/root/usr/bin/curl"),
            s("self", "root", "usr/bin/curl")
        );
        assert_eq!(proc_magic("/proc/12/cwd/x"), s("12", "cwd", "x"));
        assert_eq!(proc_magic("/proc/self/fd/3"), s("self", "fd/3", ""));
        assert_eq!(
            proc_magic("/proc/thread-self/exe"),
            s("thread-self", "exe", "")
        );
        assert_eq!(proc_magic("/proc/self/task/7/root/bin/sh"), None);
        assert_eq!(proc_magic("/proc/cpuinfo"), None);
        assert_eq!(proc_magic("/usr/bin/curl"), None);
    }

    #[test]
    fn shebang_lines_parse_like_the_kernel() {
        assert_eq!(
            shebang(b"#!/bin/sh\necho"),
            Some(Some(("/bin/sh".into(), None)))
        );
        assert_eq!(shebang(b"#!/bin/\xffsh\n"), Some(None));
        assert_eq!(
            shebang(b"#! /usr/bin/env  python3 -u\n"),
            Some(Some(("/usr/bin/env".into(), Some("python3 -u".into()))))
        );
        assert_eq!(shebang(b"\x7fELF"), None);
        assert_eq!(shebang(b"#!\n"), None);
    }

    #[test]
    fn the_loader_target_skips_options() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            loader_target(&v(&[
                "ld.so",
                "--library-path",
                "/x",
                "/usr/bin/curl",
                "-s"
            ])),
            Some(("/usr/bin/curl".into(), v(&["-s"])))
        );
        assert_eq!(loader_target(&v(&["ld.so", "--list"])), None);
    }
}
