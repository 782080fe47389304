//! Names, paths and environment variables shared by every aibox crate.
//!
//! This crate does no I/O beyond reading the process environment and the
//! password database; it exists so that every other crate agrees on how a
//! sandbox is named and where its files live.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Every environment variable aibox reads on the host, defined once.
pub mod env {
    /// Path of the user config file (overrides `~/.config/aibox/config.yaml`).
    pub const CONFIG: &str = "AIBOX_CONFIG";
    /// Prefix of the per-key config overrides (`AIBOX_<SECTION>_<KEY>`).
    pub const PREFIX: &str = "AIBOX_";
    /// Marker set inside every sandbox (value `1`).
    pub const IN_SANDBOX: &str = "AIBOX";
    /// Name of the sandbox, set inside it.
    pub const SANDBOX_NAME: &str = "AIBOX_SANDBOX";
}

/// The fixed identity of the user inside every sandbox.
pub mod guest {
    /// Login name inside the sandbox.
    pub const USER: &str = "dev";
    /// uid inside the sandbox.
    pub const UID: u32 = 1000;
    /// gid inside the sandbox.
    pub const GID: u32 = 1000;
    /// Home directory inside the sandbox.
    pub const HOME: &str = "/home/dev";
    /// Workspace mount point inside the sandbox.
    pub const WORKSPACE: &str = "/workspace";
    /// Hostname inside the sandbox.
    pub const HOSTNAME: &str = "aibox";
    /// `PATH` given to every process started inside.
    pub const PATH: &str =
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/aibox/bin";
}

/// Effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// Effective gid of this process.
pub fn egid() -> u32 {
    // SAFETY: getegid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::getegid()
    }
}

/// Login name of the invoking user: `$USER` when it matches the effective
/// uid's password entry, otherwise the entry's name, otherwise `uid<N>`.
pub fn current_user() -> String {
    let uid = euid();
    let from_db = passwd_name(uid);
    match (std::env::var("USER").ok(), from_db) {
        (_, Some(name)) => name,
        (Some(user), None) if !user.is_empty() => user,
        _ => format!("uid{uid}"),
    }
}

/// Name of the account with `uid` in `/etc/passwd`, if any.
pub fn passwd_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let _pw = fields.next()?;
        let id: u32 = fields.next()?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

/// Home directory of the invoking user (`$HOME`, else the password entry).
pub fn home_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home));
    }
    let uid = euid();
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        let id: u32 = fields.get(2)?.parse().ok()?;
        if id == uid {
            fields.get(5).map(PathBuf::from)
        } else {
            None
        }
    })
}

/// Default sandbox name: `aibox-<user>-<first 8 hex of SHA-256(absolute workspace path)>`.
pub fn default_sandbox_name(user: &str, workspace_abs: &Path) -> String {
    let digest = Sha256::digest(workspace_abs.as_os_str().as_encoded_bytes());
    let short = hex::encode(&digest[..4]);
    let user: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("aibox-{user}-{short}")
}

/// Checks a sandbox name: 1–63 characters of `[A-Za-z0-9_.-]`, starting
/// with a letter or digit. Names become directory and file names, so
/// anything else (slashes, `..`, spaces) is refused.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_len = !name.is_empty() && name.len() <= 63;
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok_len && ok_first && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "invalid sandbox name {name:?}: use 1-63 characters from A-Z a-z 0-9 _ . -, starting with a letter or digit"
        ))
    }
}

/// Default data directory: `/var/lib/aibox` for root, otherwise
/// `$XDG_DATA_HOME/aibox` or `~/.local/share/aibox`.
pub fn default_data_dir() -> PathBuf {
    if euid() == 0 {
        return PathBuf::from("/var/lib/aibox");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("aibox");
    }
    home_dir()
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(".local/share/aibox")
}

/// Default runtime directory: `/run/aibox` for root, otherwise
/// `$XDG_RUNTIME_DIR/aibox` or `/tmp/aibox-<uid>`.
pub fn default_runtime_dir() -> PathBuf {
    let uid = euid();
    if uid == 0 {
        return PathBuf::from("/run/aibox");
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("aibox");
    }
    PathBuf::from(format!("/tmp/aibox-{uid}"))
}

/// Default user config file: `$XDG_CONFIG_HOME/aibox/config.yaml` or
/// `~/.config/aibox/config.yaml`.
pub fn default_user_config() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("aibox/config.yaml");
    }
    home_dir()
        .unwrap_or_else(|| PathBuf::from("/"))
        .join(".config/aibox/config.yaml")
}

/// System-wide config file, below the user's.
pub const SYSTEM_CONFIG: &str = "/etc/aibox/config.yaml";

/// A temporary name beside `path` that no other writer picks: pid and a
/// counter are not enough (pids repeat across pid namespaces, and a
/// config directory can be shared by several hosts), so a per-process
/// random value goes in too.
fn beside(path: &Path, what: &str) -> PathBuf {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // RandomState's keys come from the OS's random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(
        ".{what}.{}.{n}.{:016x}",
        std::process::id(),
        h.finish()
    ));
    PathBuf::from(name)
}

/// A new file at the unused name `tmp` (mode `mode`, never through a
/// link) holding `contents`, synced. A name already taken is reported as
/// an ordinary error, not `AlreadyExists`, which callers read as "the
/// target exists".
fn write_new(tmp: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                std::io::Error::other(format!("{} is taken", tmp.display()))
            } else {
                e
            }
        })?;
    // (The umask may have narrowed the mode asked for.)
    let written = f
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| f.write_all(contents))
        .and_then(|()| f.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// Replaces `path` with `contents` atomically (a temporary file beside it,
/// then a rename), readable by its owner only, synced. Neither the
/// temporary file nor `path` is ever written through a symbolic link (a
/// link at `path` is replaced, not followed).
pub fn replace_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    replace_file(path, contents, 0o600)
}

/// [`replace_private_file`] with mode `mode` (e.g. 0644 for a public key):
/// the file has its mode before it appears.
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = beside(path, "tmp");
    write_new(&tmp, contents, mode)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Creates `path` (which must not exist) readable by its owner only,
/// with `contents`, synced: how aibox writes the keys it makes. The file
/// appears whole (written beside it, then hard-linked into place), so a
/// process starting at the same moment never reads it half-written; when
/// another one created it first the error is `AlreadyExists` and its file
/// stays. Never through a symbolic link.
pub fn create_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = beside(path, "new");
    write_new(&tmp, contents, 0o600)?;
    // link(2) fails on an existing name, a link there included.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        // Filesystems without hard links (vfat, some FUSE and CIFS
        // mounts): the file is made in place, exclusively; a start at the
        // same moment may then read it before it is whole.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS | libc::EMLINK)
            ) =>
        {
            write_new(path, contents, 0o600).map_err(|e2| {
                if std::fs::symlink_metadata(path).is_ok() {
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists)
                } else {
                    e2
                }
            })
        }
        r => r,
    }
}

/// Holds an exclusive `flock` on `path` (created, owner-only, never
/// through a symbolic link) until the returned value is dropped: how aibox
/// keeps two of its own processes from writing one record at once. Blocks
/// while another holder has it.
pub fn lock_private_file(path: &Path) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::from(e))
}

/// Resolves `netloc` (`host:port`) to addresses, giving up after `within`.
/// The HTTP client aibox uses (ureq 2) puts no deadline on name lookups,
/// so a resolver that never answers would stall a start, a sink or a
/// Vault call for as long as the system's resolver retries.
pub fn resolve_within(
    netloc: &str,
    within: std::time::Duration,
) -> std::io::Result<Vec<std::net::SocketAddr>> {
    resolve_with(netloc, within, |n| {
        std::net::ToSocketAddrs::to_socket_addrs(n).map(Iterator::collect)
    })
}

/// [`resolve_within`] over a given lookup (so tests can stand in a slow one).
fn resolve_with(
    netloc: &str,
    within: std::time::Duration,
    lookup: fn(&str) -> std::io::Result<Vec<std::net::SocketAddr>>,
) -> std::io::Result<Vec<std::net::SocketAddr>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// Lookups still running (answered or not); past the cap a resolver
    /// that hangs for good would leave a thread behind per retry.
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    const MAX_IN_FLIGHT: usize = 32;
    // An address needs no lookup (and no thread).
    if let Ok(a) = netloc.parse::<std::net::SocketAddr>() {
        return Ok(vec![a]);
    }
    /// Gives the slot back however the lookup ends (a panic included).
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
    }
    if IN_FLIGHT.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
        drop(Slot);
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no DNS lookup for {netloc}: {MAX_IN_FLIGHT} earlier lookups are still unanswered (the system's resolver is not answering)"
            ),
        ));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = netloc.to_string();
    // The lookup cannot be cancelled: a thread that outlives the deadline
    // ends when the system's resolver gives up, and its answer is dropped.
    let slot = Slot;
    // (A thread that cannot be spawned drops the closure, and the slot
    // with it.)
    std::thread::Builder::new()
        .name("aibox-dns".into())
        .spawn(move || {
            let _slot = slot;
            let _ = tx.send(lookup(&name));
        })?;
    match rx.recv_timeout(within) {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no DNS answer for {netloc} within {} s",
                within.as_secs_f32()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_name_is_stable_and_short() {
        let n = default_sandbox_name("alice", Path::new("/home/alice/proj"));
        assert!(n.starts_with("aibox-alice-"));
        assert_eq!(n.len(), "aibox-alice-".len() + 8);
        assert_eq!(
            n,
            default_sandbox_name("alice", Path::new("/home/alice/proj"))
        );
        assert_ne!(
            n,
            default_sandbox_name("alice", Path::new("/home/alice/other"))
        );
        assert!(validate_name(&n).is_ok());
    }

    #[test]
    fn a_private_lock_excludes_and_refuses_links() {
        let dir = std::env::temp_dir().join(format!("aibox-core-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.lock");
        let held = lock_private_file(&p).unwrap();
        // A second open file description must not get the lock while held.
        let other = std::fs::File::open(&p).unwrap();
        let again = nix::fcntl::Flock::lock(other, nix::fcntl::FlockArg::LockExclusiveNonblock);
        assert!(again.is_err(), "a second holder got the lock");
        drop(held);
        let other = std::fs::File::open(&p).unwrap();
        assert!(
            nix::fcntl::Flock::lock(other, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
        );
        let link = dir.join("link.lock");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(lock_private_file(&link).is_err(), "followed a link");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lookup_that_hangs_is_given_up() {
        let t0 = std::time::Instant::now();
        let e = resolve_with(
            "hang.invalid:443",
            std::time::Duration::from_millis(200),
            |_| {
                std::thread::sleep(std::time::Duration::from_secs(30));
                Ok(Vec::new())
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("hang.invalid:443"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
        // Answers within the deadline, and literal addresses, come through.
        let ok = resolve_with("quick.test:80", std::time::Duration::from_secs(5), |_| {
            Ok(vec!["192.0.2.7:80".parse().unwrap()])
        })
        .unwrap();
        assert_eq!(ok, vec!["192.0.2.7:80".parse().unwrap()]);
        let lit = resolve_within("[::1]:9", std::time::Duration::from_millis(1)).unwrap();
        assert_eq!(lit, vec!["[::1]:9".parse().unwrap()]);
        assert!(resolve_within("localhost:80", std::time::Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn lookups_left_hanging_are_capped_and_given_back() {
        let slow = |_: &str| -> std::io::Result<Vec<std::net::SocketAddr>> {
            std::thread::sleep(std::time::Duration::from_secs(2));
            Ok(Vec::new())
        };
        let quick = |_: &str| -> std::io::Result<Vec<std::net::SocketAddr>> {
            Ok(vec!["192.0.2.1:1".parse().unwrap()])
        };
        let short = std::time::Duration::from_millis(5);
        let mut capped = 0;
        for i in 0..40 {
            let e = resolve_with(&format!("h{i}.invalid:1"), short, slow).unwrap_err();
            if e.to_string().contains("still unanswered") {
                capped += 1;
            }
        }
        // (nextest runs each test in a process of its own: the 32 slots
        // are this test's.)
        assert_eq!(capped, 8);
        assert!(
            resolve_with("q.invalid:1", short, quick)
                .unwrap_err()
                .to_string()
                .contains("still unanswered")
        );
        // Once the hung lookups end, their slots are free again.
        std::thread::sleep(std::time::Duration::from_secs(3));
        assert!(resolve_with("q.invalid:1", std::time::Duration::from_secs(5), quick).is_ok());
    }

    #[test]
    fn keys_appear_whole_and_once() {
        let dir = std::env::temp_dir().join(format!("aibox-core-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("sub/k");
        let results: Vec<std::io::Result<()>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8u8)
                .map(|i| {
                    let p = &p;
                    s.spawn(move || create_private_file(p, &[b'a' + i; 4096]))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{results:?}");
        for r in &results {
            if let Err(e) = r {
                assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
            }
        }
        let body = std::fs::read(&p).unwrap();
        assert_eq!(body.len(), 4096);
        assert!(body.iter().all(|b| *b == body[0]));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(dir.join("sub")).unwrap().count(), 1);
        // A public file gets its mode before it appears.
        let public = dir.join("sub/k.pub");
        replace_file(&public, b"pub", 0o644).unwrap();
        assert_eq!(
            std::fs::metadata(&public).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
