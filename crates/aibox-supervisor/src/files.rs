//! `file.read` / `file.write` events for the workspace, from inotify on
//! the host side of the workspace directory (every backend shares that
//! directory with its sandbox, so one watcher serves them all).
//!
//! inotify cannot say which process touched a file: an edit the host user
//! makes in the workspace while the sandbox runs is logged the same way
//! (the events say `observed: workspace`). Reads are files opened without
//! write access and closed again; writes are files closed after writing,
//! deletions and renames into place. A burst (a build, `git checkout`) is
//! thinned: the same path and kind at most once a second, and at most
//! [`PER_SECOND`] events a second, the rest counted into a summary event.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aibox_audit::{EventType, Severity};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use serde_json::json;

use crate::egress::Emit;

/// Most file events written per second; more are summarised.
const PER_SECOND: u32 = 100;

/// Most directories watched; a larger tree is watched in part (and says
/// so in the log).
const MAX_DIRS: usize = 50_000;

/// Where the workspace appears inside every sandbox.
const GUEST: &str = "/workspace";

/// The workspace watcher of a sandbox being started: its watches are set
/// up before the sandbox is reported ready, so nothing a session does
/// escapes them; events seen before [`Watching::start`] hands it the
/// audit log are held until then.
pub(crate) struct Watching {
    held: Arc<Mutex<Held>>,
}

/// Events waiting for the audit log, or where they go now.
enum Held {
    Waiting(Vec<(EventType, Severity, serde_json::Value)>),
    Started(Emit),
}

/// Most events held before the audit log is handed over (a start takes
/// moments; the rest would only be a host flood).
const MAX_HELD: usize = 10_000;

/// How long a start waits for the workspace walk. A slow or hung mount
/// in the workspace must not hold the start for ever: past this, the
/// sandbox starts while the walk goes on (and the supervisor log says so).
const WALK_WAIT: Duration = Duration::from_secs(5);

/// Starts watching every directory of `workspace` on a thread of its own
/// and waits (up to [`WALK_WAIT`]) until they all are.
pub(crate) fn prepare(workspace: PathBuf) -> Watching {
    let held = Arc::new(Mutex::new(Held::Waiting(Vec::new())));
    let h = held.clone();
    let emit: Emit = Arc::new(move |t, sev, d| {
        let Ok(mut g) = h.lock() else { return };
        match &mut *g {
            Held::Started(e) => {
                let e = e.clone();
                drop(g);
                e(t, sev, d);
            }
            Held::Waiting(v) if v.len() < MAX_HELD => v.push((t, sev, d)),
            Held::Waiting(_) => {}
        }
    });
    let (walked, walk_done) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("file-events".into())
        .spawn(move || {
            let watcher = Inotify::init(InitFlags::IN_CLOEXEC)
                .map_err(|e| format!("inotify: {e}"))
                .and_then(|fd| {
                    let mut w = Watcher {
                        fd,
                        dirs: HashMap::new(),
                        full: false,
                        missed: None,
                    };
                    w.add_tree(&workspace, PathBuf::new());
                    match w.dirs.is_empty() {
                        true => Err(format!(
                            "the workspace could not be watched ({})",
                            w.missed.as_deref().unwrap_or("no directory was watchable")
                        )),
                        false => Ok(w),
                    }
                });
            let _ = walked.send(());
            if let Err(e) = watcher.and_then(|w| run(w, &workspace, &emit)) {
                crate::supervisor::log(&format!("file events stopped: {e}"));
                emit(
                    EventType::FileWrite,
                    Severity::Warning,
                    json!({"path": GUEST, "op": "unwatched", "error": e}),
                );
            }
        });
    match spawned {
        Ok(_) => {
            if walk_done.recv_timeout(WALK_WAIT).is_err() {
                crate::supervisor::log(&format!(
                    "watching the workspace took over {} s; starting while it goes on",
                    WALK_WAIT.as_secs()
                ));
            }
        }
        Err(e) => {
            crate::supervisor::log(&format!("no file-event thread: {e}"));
            if let Ok(mut g) = held.lock() {
                *g = Held::Waiting(vec![(
                    EventType::FileWrite,
                    Severity::Warning,
                    json!({"path": GUEST, "op": "unwatched", "error": format!("no file-event thread: {e}")}),
                )]);
            }
        }
    }
    Watching { held }
}

impl Watching {
    /// Hands over the audit log: the events held so far go first, in
    /// order, then every new one as it comes.
    pub(crate) fn start(self, emit: Emit) {
        let Ok(mut g) = self.held.lock() else { return };
        // (Flushed under the lock, so no newer event overtakes them.)
        if let Held::Waiting(v) = std::mem::replace(&mut *g, Held::Started(emit.clone())) {
            for (t, sev, d) in v {
                emit(t, sev, d);
            }
        }
    }
}

struct Watcher {
    fd: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    full: bool,
    /// A directory that could not be watched for another reason than
    /// being gone or not a directory (said once in the log).
    missed: Option<String>,
}

/// Opens the directory `rel` beneath `root` with no link followed on the
/// way. Kernels before 5.6 lack `openat2`: there, one component at a
/// time, none of them a link.
fn open_beneath(root: &std::os::fd::OwnedFd, rel: &Path) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    match nix::fcntl::openat2(root, rel, how) {
        // (EPERM: a seccomp profile that refuses openat2, as container
        // engines' default profiles long did.)
        Err(nix::errno::Errno::ENOSYS | nix::errno::Errno::EPERM) => open_by_components(root, rel),
        r => r,
    }
}

/// [`open_beneath`] without `openat2`.
fn open_by_components(
    root: &std::os::fd::OwnedFd,
    rel: &Path,
) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::OFlag;
    let dir = OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let parts: Vec<_> = rel.components().collect();
    let mut cur = root.try_clone().map_err(|_| nix::errno::Errno::EBADF)?;
    for (i, c) in parts.iter().enumerate() {
        let std::path::Component::Normal(name) = c else {
            return Err(nix::errno::Errno::EXDEV);
        };
        // Directories on the way need only be searchable, as with openat2.
        let flags = if i + 1 == parts.len() {
            dir | OFlag::O_RDONLY
        } else {
            dir | OFlag::O_PATH
        };
        cur = nix::fcntl::openat(&cur, *name, flags, nix::sys::stat::Mode::empty())?;
    }
    Ok(cur)
}

/// Errors that only mean the directory went away or is no directory
/// (or, for `ELOOP`/`EXDEV`, was swapped for a link): nothing to report.
fn vanished(e: nix::errno::Errno) -> bool {
    use nix::errno::Errno;
    matches!(
        e,
        Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV
    )
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_CLOSE_NOWRITE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_ONLYDIR
}

impl Watcher {
    /// Watches `root/rel` and every directory below it.
    ///
    /// Each directory is opened beneath `root` with no link followed
    /// anywhere on the way (`openat2`), then watched and listed through
    /// that descriptor. The sandbox can swap a directory for a link to a
    /// host directory at any moment; a walk by path name would then
    /// watch, list and log that host directory as if it were workspace.
    fn add_tree(&mut self, root: &Path, rel: PathBuf) {
        use nix::fcntl::OFlag;
        use std::os::fd::AsRawFd;
        let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let root_fd = match nix::fcntl::open(root, dir_flags, nix::sys::stat::Mode::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                self.missed = Some(format!("opening {}: {e}", root.display()));
                return;
            }
        };
        let mut stack = vec![rel];
        while let Some(rel) = stack.pop() {
            if self.dirs.len() >= MAX_DIRS {
                self.full = true;
                return;
            }
            let dir = if rel.as_os_str().is_empty() {
                root_fd.try_clone().map_err(|_| nix::errno::Errno::EBADF)
            } else {
                open_beneath(&root_fd, &rel)
            };
            let dir = match dir {
                Ok(d) => d,
                Err(e) => {
                    if !vanished(e) || rel.as_os_str().is_empty() {
                        self.missed = Some(format!("{}: {e}", rel.display()));
                    }
                    continue;
                }
            };
            // The descriptor's own directory (a magic link, so no
            // IN_DONT_FOLLOW in `flags`).
            let own = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
            match self.fd.add_watch(&own, flags()) {
                Ok(wd) => {
                    self.dirs.insert(wd, rel.clone());
                }
                Err(nix::errno::Errno::ENOSPC) => {
                    self.full = true;
                    if rel.as_os_str().is_empty() {
                        self.missed = Some(
                            "no inotify watch left for this user (raise fs.inotify.max_user_watches)"
                                .into(),
                        );
                    }
                    return;
                }
                Err(e) => {
                    // (The workspace itself never counts as gone: /proc
                    // missing is ENOENT too.)
                    if !vanished(e) || rel.as_os_str().is_empty() {
                        self.missed = Some(format!("watching {}: {e}", rel.display()));
                    }
                    continue;
                }
            }
            let Ok(entries) = std::fs::read_dir(&own) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(rel.join(e.file_name()));
                }
            }
        }
    }
}

/// Paths whose writes are always recorded, whatever the budget: what an
/// agent would change to run code later outside its sandbox.
fn sensitive(rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    s.starts_with(".git/hooks/")
        || s == ".git/config"
        || s.starts_with(".github/workflows/")
        || s == ".gitlab-ci.yml"
        || s.starts_with(".vscode/")
        || s.starts_with(".devcontainer/")
        || s == ".envrc"
        || s.ends_with("/.envrc")
        || s == "Makefile"
        || s == "package.json"
}

/// Thins bursts: per (kind, path) once a second, and a budget a second
/// for each kind (reads cannot use up the writes' budget).
struct Thinner {
    last: HashMap<(EventType, PathBuf), Instant>,
    second: Instant,
    written: HashMap<EventType, u32>,
    suppressed: HashMap<EventType, u64>,
}

impl Thinner {
    fn admit(&mut self, kind: EventType, path: &Path, now: Instant) -> bool {
        if now.duration_since(self.second) >= Duration::from_secs(1) {
            self.second = now;
            self.written.clear();
            if self.last.len() > 10_000 {
                self.last.clear();
            }
        }
        let key = (kind, path.to_path_buf());
        let recent = self
            .last
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1));
        let spent = self.written.get(&kind).copied().unwrap_or(0);
        let over = spent >= PER_SECOND && !(kind == EventType::FileWrite && sensitive(path));
        if recent || over {
            *self.suppressed.entry(kind).or_default() += 1;
            return false;
        }
        self.last.insert(key, now);
        *self.written.entry(kind).or_default() += 1;
        true
    }

    /// Summary events for what was held back, once its second is over.
    fn flush(&mut self, emit: &Emit, now: Instant, force: bool) {
        if self.suppressed.is_empty()
            || (!force && now.duration_since(self.second) < Duration::from_secs(1))
        {
            return;
        }
        for (kind, n) in self.suppressed.drain() {
            emit(
                kind,
                Severity::Info,
                json!({"path": GUEST, "op": "summary", "suppressed": n, "observed": "workspace"}),
            );
        }
    }
}

fn guest_path(rel: &Path) -> String {
    let mut p = String::from(GUEST);
    for c in rel.components() {
        p.push('/');
        p.push_str(&String::from_utf8_lossy(c.as_os_str().as_bytes()));
    }
    p
}

fn run(mut w: Watcher, workspace: &Path, emit: &Emit) -> Result<(), String> {
    let mut warned = false;
    let mut warned_missed = false;
    let mut thin = Thinner {
        last: HashMap::new(),
        second: Instant::now(),
        written: HashMap::new(),
        suppressed: HashMap::new(),
    };
    let partially = |watched: usize, error: String| {
        emit(
            EventType::FileWrite,
            Severity::Warning,
            json!({"path": GUEST, "op": "partially-watched", "observed": "workspace",
                   "watched_dirs": watched, "error": error}),
        );
    };
    loop {
        if let Some(e) = w.missed.take()
            && !warned_missed
        {
            warned_missed = true;
            partially(
                w.dirs.len(),
                format!(
                    "a directory could not be watched, file events below it are not recorded: {e}"
                ),
            );
        }
        if w.full && !warned {
            warned = true;
            partially(
                w.dirs.len(),
                "too many directories for inotify: file events below the rest are not recorded"
                    .into(),
            );
        }
        // A summary is due even when nothing more happens.
        {
            use std::os::fd::AsFd;
            let mut fds = [nix::poll::PollFd::new(
                w.fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16)) {
                Ok(0) => {
                    thin.flush(emit, Instant::now(), true);
                    continue;
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("waiting for inotify events: {e}")),
            }
        }
        let events = match w.fd.read_events() {
            Ok(ev) => ev,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("reading inotify events: {e}")),
        };
        let now = Instant::now();
        thin.flush(emit, now, false);
        for ev in events {
            if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                emit(
                    EventType::FileWrite,
                    Severity::Warning,
                    json!({"path": GUEST, "op": "overflow", "observed": "workspace",
                           "error": "the kernel dropped file events (queue overflow)"}),
                );
                continue;
            }
            if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                w.dirs.remove(&ev.wd);
                continue;
            }
            let Some(dir) = w.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            let Some(name) = ev.name.as_deref() else {
                continue;
            };
            let rel = dir.join(OsStr::from_bytes(name.as_bytes()));
            let is_dir = ev.mask.contains(AddWatchFlags::IN_ISDIR);
            if is_dir {
                if ev
                    .mask
                    .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                {
                    w.add_tree(workspace, rel);
                }
                continue;
            }
            let (kind, op) = if ev.mask.contains(AddWatchFlags::IN_CLOSE_WRITE) {
                (EventType::FileWrite, "write")
            } else if ev.mask.contains(AddWatchFlags::IN_DELETE) {
                (EventType::FileWrite, "delete")
            } else if ev.mask.contains(AddWatchFlags::IN_MOVED_TO) {
                (EventType::FileWrite, "rename")
            } else if ev.mask.contains(AddWatchFlags::IN_CLOSE_NOWRITE) {
                (EventType::FileRead, "read")
            } else {
                continue;
            };
            if thin.admit(kind, &rel, now) {
                emit(
                    kind,
                    Severity::Info,
                    json!({"path": guest_path(&rel), "op": op, "observed": "workspace"}),
                );
            }
        }
        thin.flush(emit, Instant::now(), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reads_writes_deletes_and_new_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "x").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let emit: Emit = Arc::new(move |t, _, d| s.lock().unwrap().push((t, d)));
        let watching = prepare(dir.path().to_path_buf());
        // Set up before anything else: even a write made now is seen.
        std::fs::write(dir.path().join("early.txt"), "e").unwrap();
        // (Time for the thread to read it: it is held, then handed over.)
        std::thread::sleep(Duration::from_millis(300));
        watching.start(emit);
        let has = |t: EventType, p: &str, op: &str| {
            seen.lock()
                .unwrap()
                .iter()
                .any(|(et, d)| *et == t && d["path"] == p && d["op"] == op)
        };
        // Until `probe` in `d` is seen written: the watch there is live.
        // (No fixed sleeps: the watcher's thread may be slow to start.)
        let live = |d: &str| {
            let end = Instant::now() + Duration::from_secs(20);
            let at = if d.is_empty() {
                "/workspace".to_string()
            } else {
                format!("/workspace/{d}")
            };
            while !has(EventType::FileWrite, &format!("{at}/probe"), "write") {
                assert!(Instant::now() < end, "no watch on `{d}`");
                std::fs::write(dir.path().join(d).join("probe"), "p").unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        live("");
        assert!(has(EventType::FileWrite, "/workspace/early.txt", "write"));
        let _ = std::fs::read(dir.path().join("a.txt")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        live("sub");
        std::fs::write(dir.path().join("sub/b.txt"), "y").unwrap();
        std::fs::remove_file(dir.path().join("a.txt")).unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while !has(EventType::FileWrite, "/workspace/a.txt", "delete") && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let seen = seen.lock().unwrap().clone();
        assert!(
            has(EventType::FileRead, "/workspace/a.txt", "read"),
            "{seen:?}"
        );
        assert!(
            has(EventType::FileWrite, "/workspace/sub/b.txt", "write"),
            "{seen:?}"
        );
        assert!(
            has(EventType::FileWrite, "/workspace/a.txt", "delete"),
            "{seen:?}"
        );
    }

    #[test]
    fn links_in_the_tree_are_not_followed() {
        let ws = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("inner")).unwrap();
        std::fs::create_dir(ws.path().join("real")).unwrap();
        // What a sandbox leaves after swapping a directory for a link:
        // the walk is asked for `swapped/inner` (a directory it saw
        // created there a moment ago), and for `swapped` itself.
        std::os::unix::fs::symlink(host.path(), ws.path().join("swapped")).unwrap();
        let mut w = Watcher {
            fd: Inotify::init(InitFlags::IN_CLOEXEC).unwrap(),
            dirs: HashMap::new(),
            full: false,
            missed: None,
        };
        w.add_tree(ws.path(), PathBuf::new());
        w.add_tree(ws.path(), PathBuf::from("swapped/inner"));
        w.add_tree(ws.path(), PathBuf::from("swapped"));
        w.add_tree(ws.path(), PathBuf::from("../"));
        let mut watched: Vec<String> = w.dirs.values().map(|p| p.display().to_string()).collect();
        watched.sort();
        assert_eq!(watched, ["", "real"]);
        assert!(w.missed.is_none(), "{:?}", w.missed);
        // The walk kernels without openat2 get refuses the same.
        let root = nix::fcntl::open(
            ws.path(),
            nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        assert!(open_by_components(&root, Path::new("real")).is_ok());
        for bad in ["swapped", "swapped/inner", "../", "real/../../"] {
            assert!(
                open_by_components(&root, Path::new(bad)).is_err(),
                "{bad} opened"
            );
        }
        // Nothing in the host directory reaches the watch.
        std::fs::write(host.path().join("inner/secret"), "x").unwrap();
        std::fs::write(ws.path().join("real/file"), "x").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // (The walk's own listings show up as directory events.)
        let named: Vec<_> =
            w.fd.read_events()
                .unwrap()
                .into_iter()
                .filter(|ev| !ev.mask.contains(AddWatchFlags::IN_ISDIR))
                .collect();
        assert!(!named.is_empty());
        for ev in named {
            assert_eq!(w.dirs.get(&ev.wd).unwrap(), Path::new("real"), "{ev:?}");
            assert_eq!(ev.name.as_deref(), Some(OsStr::new("file")), "{ev:?}");
        }
    }

    #[test]
    fn bursts_are_thinned_and_counted() {
        let mut t = Thinner {
            last: HashMap::new(),
            second: Instant::now(),
            written: HashMap::new(),
            suppressed: HashMap::new(),
        };
        let now = Instant::now();
        let p = Path::new("x");
        assert!(t.admit(EventType::FileWrite, p, now));
        assert!(!t.admit(EventType::FileWrite, p, now));
        assert!(t.admit(EventType::FileRead, p, now));
        for i in 0..200 {
            t.admit(EventType::FileWrite, Path::new(&format!("f{i}")), now);
        }
        assert_eq!(t.written[&EventType::FileWrite], PER_SECOND);
        assert_eq!(t.suppressed[&EventType::FileWrite], 1 + 200 - 99);
        // Reads have their own budget; a hook written in a flood is kept.
        assert!(t.admit(EventType::FileRead, Path::new("r"), now));
        assert!(t.admit(
            EventType::FileWrite,
            Path::new(".git/hooks/post-checkout"),
            now
        ));
    }
}
