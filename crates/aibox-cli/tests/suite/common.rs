//! Test context: an isolated config, data and runtime directory per test,
//! and the choice of running aibox as root or as an ordinary user.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The unprivileged account the rootless tests run as when the suite runs as root.
pub const TEST_USER: &str = "aibox-test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// aibox runs as root.
    Root,
    /// aibox runs as an ordinary user.
    Rootless,
}

/// Which sandbox backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded namespaces/seccomp/Landlock sandbox.
    Native,
    /// podman with runc.
    Podman,
    /// podman with gVisor's runsc.
    Runsc,
    /// docker with runc.
    Docker,
}

impl Backend {
    /// A container engine backend.
    pub fn is_container(self) -> bool {
        self != Backend::Native
    }
}

/// The image the container backends use (aibox's default).
pub const IMAGE: &str = "localhost/aibox/base:bookworm";

fn run_ok(cmd: &mut Command, what: &str) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `prog` run as (uid, gid) with that account's groups and a clean environment.
fn setpriv(uid: u32, gid: u32, prog: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        &uid.to_string(),
        "--regid",
        &gid.to_string(),
        "--init-groups",
        "--reset-env",
        prog,
    ]);
    c
}

/// `prog` run as the rootless test account, with a clean environment.
pub fn as_test_user(prog: &str) -> Command {
    let (uid, gid) = test_user();
    let mut c = setpriv(uid, gid, prog);
    c.current_dir("/");
    c
}

/// Makes sure the engine of `backend` has the base image (built once with
/// `aibox image build`, then copied to the rootless user's and docker's
/// stores). A missing engine fails the test: CI installs all of them.
fn ensure_image(backend: Backend, mode: Mode) {
    let _lock = nix::fcntl::Flock::lock(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("aibox-test-image.lock"))
            .unwrap(),
        nix::fcntl::FlockArg::LockExclusive,
    )
    .unwrap_or_else(|(_, e)| panic!("locking the image lock: {e}"));
    let exists = |c: &mut Command| c.output().is_ok_and(|o| o.status.success());
    if !exists(Command::new("podman").args(["image", "exists", IMAGE])) {
        run_ok(
            Command::new(bin("aibox")).args(["image", "build"]),
            "aibox image build",
        );
    }
    let save_into = |mut load: Command, what: &str| {
        let mut save = Command::new("podman")
            .args(["save", IMAGE])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        load.stdin(save.stdout.take().unwrap());
        run_ok(&mut load, what);
        assert!(save.wait().unwrap().success(), "podman save failed");
    };
    match (backend, mode) {
        (Backend::Podman, Mode::Rootless)
            if !exists(as_test_user("podman").args(["image", "exists", IMAGE])) =>
        {
            let mut load = as_test_user("podman");
            load.args(["load", "-q"]);
            save_into(load, "podman load (rootless)");
        }
        (Backend::Docker, _) => {
            assert!(
                exists(Command::new("docker").args(["info"])),
                "the docker engine is not running: start it with `dockerd --iptables=false --bridge=none &` (scripts/test.sh does)"
            );
            if !exists(Command::new("docker").args(["image", "inspect", IMAGE])) {
                let mut load = Command::new("docker");
                load.args(["load", "-q"]);
                save_into(load, "docker load");
            }
        }
        _ => {}
    }
}

pub struct Ctx {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pub ws: PathBuf,
    pub config: PathBuf,
    pub data: PathBuf,
    pub runtime: PathBuf,
    /// (uid, gid) to run as; None = as this process.
    pub as_user: Option<(u32, u32)>,
    pub mode: Mode,
    extra_env: Vec<(String, String)>,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn ids_of(user: &str) -> Option<(u32, u32)> {
    let out = Command::new("id").args(["-u", user]).output().ok()?;
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    let out = Command::new("id").args(["-g", user]).output().ok()?;
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some((uid, gid))
}

/// Creates the test user once (the CI script creates it too; useradd
/// races between parallel test processes are retried).
fn test_user() -> (u32, u32) {
    for _ in 0..20 {
        if let Some(ids) = ids_of(TEST_USER) {
            return ids;
        }
        let _ = Command::new("useradd")
            .args(["-m", "-s", "/bin/sh", TEST_USER])
            .status();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("could not create the test user {TEST_USER}");
}

/// The binaries, copied where an unprivileged user can execute them (the
/// build tree may sit under a private home such as /root). One copy per
/// build, shared by every test process (nextest runs each test in its own).
pub fn bin(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        let sources = [
            ("aibox", env!("CARGO_BIN_EXE_aibox")),
            ("aibox-attack", env!("CARGO_BIN_EXE_aibox-attack")),
        ];
        let key: Vec<String> = sources
            .iter()
            .map(|(_, s)| {
                let m = std::fs::metadata(s).unwrap();
                format!("{}-{}", m.size(), m.mtime_nsec() ^ m.mtime())
            })
            .collect();
        let d = std::env::temp_dir().join(format!("aibox-test-bin-{}", key.join("-")));
        if !d.join("aibox-attack").exists() {
            // Copies of earlier builds (200 MB each) would fill /tmp over
            // many runs: drop those untouched for an hour.
            let stale = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
            for e in std::fs::read_dir(std::env::temp_dir())
                .into_iter()
                .flatten()
                .flatten()
            {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < stale);
                if old
                    && e.file_name()
                        .to_string_lossy()
                        .starts_with("aibox-test-bin-")
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
            let tmp = tempfile::Builder::new()
                .prefix("aibox-test-bin-tmp")
                .tempdir()
                .unwrap();
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            for (n, src) in sources {
                let dst = tmp.path().join(n);
                std::fs::copy(src, &dst).unwrap();
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            // Another test process may have won the race; either copy will do.
            let tmp = tmp.keep();
            if std::fs::rename(&tmp, &d).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        d
    });
    dir.join(name)
}

impl Ctx {
    /// A context for `mode`, or None when the mode cannot run here (root
    /// mode needs root). CI runs as root, so both modes run there.
    pub fn new(mode: Mode) -> Option<Ctx> {
        Ctx::on(Backend::Native, mode)
    }

    /// A context running sandboxes on `backend`.
    pub fn on(backend: Backend, mode: Mode) -> Option<Ctx> {
        if backend.is_container() && !is_root() {
            eprintln!("SKIPPED: container backend tests need root to set up");
            return None;
        }
        if mode == Mode::Root && !is_root() {
            eprintln!("SKIPPED: root mode needs root");
            return None;
        }
        let as_user = (mode == Mode::Rootless && is_root()).then(test_user);
        let dir = tempfile::Builder::new()
            .prefix("aibox-it-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ws = dir.path().join("ws");
        let data = dir.path().join("data");
        let runtime = dir.path().join("rt");
        let config = dir.path().join("config.yaml");
        std::fs::create_dir(&ws).unwrap();
        let runtime_line = match backend {
            Backend::Native => "runtime: native\n",
            Backend::Podman => "runtime: podman\n",
            Backend::Runsc => "runtime: podman\ngvisor:\n  enabled: true\n  platform: ptrace\n",
            Backend::Docker => "runtime: docker\n",
        };
        if backend.is_container() {
            ensure_image(backend, mode);
        }
        std::fs::write(
            &config,
            format!("{runtime_line}resources:\n  pids: 256\n  nofile: 1024\n  tmp_size: 64m\n"),
        )
        .unwrap();
        if let Some((uid, gid)) = as_user {
            for p in [dir.path(), &ws, &config] {
                nix::unistd::chown(p, Some(uid.into()), Some(gid.into())).unwrap();
            }
        }
        Some(Ctx {
            backend,
            dir,
            ws,
            config,
            data,
            runtime,
            as_user,
            mode,
            extra_env: Vec::new(),
        })
    }

    /// Appends YAML to this context's config file.
    pub fn add_config(&self, yaml: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .unwrap();
        f.write_all(yaml.as_bytes()).unwrap();
    }

    /// Adds an environment variable to every aibox invocation.
    pub fn env(&mut self, k: &str, v: &str) {
        self.extra_env.push((k.into(), v.into()));
    }

    /// Drops the variables added with [`Ctx::env`].
    pub fn clear_env(&mut self) {
        self.extra_env.clear();
    }

    /// uid that should own files the sandbox writes to the workspace.
    pub fn invoker_uid(&self) -> u32 {
        self.as_user
            .map(|(u, _)| u)
            .unwrap_or_else(|| nix::unistd::geteuid().as_raw())
    }

    /// The variables every aibox invocation of this context gets.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("AIBOX_CONFIG".into(), self.config.display().to_string()),
            (
                "AIBOX_PATHS_DATA_DIR".into(),
                self.data.display().to_string(),
            ),
            (
                "AIBOX_PATHS_RUNTIME_DIR".into(),
                self.runtime.display().to_string(),
            ),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// An `aibox` command with this context's config and directories.
    pub fn aibox(&self, args: &[&str]) -> Command {
        let env = self.env_pairs();
        let mut cmd = match self.as_user {
            Some((uid, gid)) => {
                let mut c = setpriv(uid, gid, "env");
                for (k, v) in &env {
                    c.arg(format!("{k}={v}"));
                }
                c.arg(bin("aibox"));
                c
            }
            None => {
                let mut c = Command::new(bin("aibox"));
                c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                c
            }
        };
        cmd.args(args).current_dir(&self.ws);
        cmd
    }

    /// Runs aibox to completion with empty stdin.
    pub fn out(&self, args: &[&str]) -> Output {
        self.aibox(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `aibox ARGS` started with `input` on its standard input (then
    /// closed), its output captured.
    pub fn spawn_with_input(&self, args: &[&str], input: &[u8]) -> std::process::Child {
        use std::io::Write;
        let mut child = self
            .aibox(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child
    }

    /// The same, waited for.
    pub fn out_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        self.spawn_with_input(args, input)
            .wait_with_output()
            .unwrap()
    }

    /// `aibox run -w WS -- sh -c SCRIPT`.
    pub fn sh(&self, script: &str) -> Output {
        let ws = self.ws.display().to_string();
        self.out(&["run", "-w", &ws, "--", "sh", "-c", script])
    }

    /// Copies the attack helper into the workspace.
    pub fn install_attack(&self) {
        let dst = self.ws.join("aibox-attack");
        std::fs::copy(bin("aibox-attack"), &dst).unwrap();
        if let Some((uid, gid)) = self.as_user {
            nix::unistd::chown(&dst, Some(uid.into()), Some(gid.into())).unwrap();
        }
    }

    /// Entries left in the runtime directory (the per-name lock files are
    /// permanent by design and not counted).
    pub fn runtime_entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.runtime)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.ends_with(".lock"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

pub fn owner(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().uid()
}

/// Host pids whose command line contains `needle`.
pub fn host_pids_with(needle: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            v.push(pid);
        }
    }
    v
}

/// A number unique to this test process, to tell its sandboxed processes
/// from those of tests running in parallel (`sleep <token>`).
pub fn token() -> String {
    // Unique per process (nextest) and per call (`cargo test` runs many
    // tests as threads of one process).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("9{}{n:03}", std::process::id())
}

/// Waits (up to 5 s) until some host process matches `needle`.
pub fn wait_for(needle: &str) {
    for _ in 0..100 {
        if !host_pids_with(needle).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no process matching {needle:?} appeared");
}

/// Waits until no host process matches `needle` (or fails after 5 s).
pub fn assert_gone(needle: &str) {
    for _ in 0..100 {
        if host_pids_with(needle).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("processes survived: {:?}", host_pids_with(needle));
}

/// One `#[test] fn $test` running `f(ctx)` on `backend` in `mode` (a no-op
/// where that combination cannot run, see [`Ctx::on`]).
macro_rules! backend_test {
    ($test:ident, $backend:expr, $mode:expr, $f:expr) => {
        #[test]
        fn $test() {
            if let Some(c) = Ctx::on($backend, $mode) {
                ($f)(c)
            }
        }
    };
}
pub(crate) use backend_test;

/// Defines `<name>::root` and `<name>::rootless` tests (native backend).
macro_rules! both_modes {
    ($name:ident, $f:expr) => {
        mod $name {
            use super::*;
            backend_test!(root, Backend::Native, Mode::Root, $f);
            backend_test!(rootless, Backend::Native, Mode::Rootless, $f);
        }
    };
}
pub(crate) use both_modes;

/// Defines one test per container backend (podman+runc root and rootless,
/// podman+runsc, docker+runc), for what exists only in containers.
macro_rules! container_backends {
    ($name:ident, $f:expr) => {
        mod $name {
            use super::*;
            backend_test!(podman_root, Backend::Podman, Mode::Root, $f);
            backend_test!(podman_rootless, Backend::Podman, Mode::Rootless, $f);
            backend_test!(podman_runsc, Backend::Runsc, Mode::Root, $f);
            backend_test!(docker_root, Backend::Docker, Mode::Root, $f);
        }
    };
}
pub(crate) use container_backends;

/// Defines one test per backend that hosts the exec gate (every one but
/// gVisor, which delivers no seccomp notifications).
macro_rules! gated_backends {
    ($name:ident, $f:expr) => {
        mod $name {
            use super::*;
            backend_test!(native_root, Backend::Native, Mode::Root, $f);
            backend_test!(native_rootless, Backend::Native, Mode::Rootless, $f);
            backend_test!(podman_root, Backend::Podman, Mode::Root, $f);
            backend_test!(podman_rootless, Backend::Podman, Mode::Rootless, $f);
            backend_test!(docker_root, Backend::Docker, Mode::Root, $f);
        }
    };
}
pub(crate) use gated_backends;

/// Defines one test per backend and mode: native as root and rootless,
/// podman+runc as root and rootless, podman+runsc and docker+runc as root.
macro_rules! all_backends {
    ($name:ident, $f:expr) => {
        mod $name {
            use super::*;
            backend_test!(native_root, Backend::Native, Mode::Root, $f);
            backend_test!(native_rootless, Backend::Native, Mode::Rootless, $f);
            backend_test!(podman_root, Backend::Podman, Mode::Root, $f);
            backend_test!(podman_rootless, Backend::Podman, Mode::Rootless, $f);
            backend_test!(podman_runsc, Backend::Runsc, Mode::Root, $f);
            backend_test!(docker_root, Backend::Docker, Mode::Root, $f);
        }
    };
}
pub(crate) use all_backends;

/// True once `pid` has exited (gone, or a zombie awaiting its reaper).
pub fn process_gone(pid: i32) -> bool {
    process_gone_within(pid, std::time::Duration::from_secs(10))
}

/// [`process_gone`] with a chosen deadline, for exits that wait on an
/// engine (a rootless podman's cleanup takes seconds under load).
pub fn process_gone_within(pid: i32, limit: std::time::Duration) -> bool {
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return true;
            }
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    false
}

/// True when this host has cgroup v1 memory and cpu controllers (where
/// rootful sandboxes get enforced cpu/memory limits).
pub fn cgroup_v1() -> bool {
    std::path::Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists()
        && std::path::Path::new("/sys/fs/cgroup/cpu/cgroup.procs").exists()
}

/// A CA and a server config for `names`; returns (CA PEM, config).
pub fn tls_server(names: &[&str]) -> (String, std::sync::Arc<rustls::ServerConfig>) {
    let (ca, cert, key) = tls_material(names);
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (ca, std::sync::Arc::new(config))
}

/// A CA and a certificate for `names`, as PEM for servers that read
/// files: (CA, certificate, key).
pub fn tls_files(names: &[&str]) -> (String, String, String) {
    let (ca, cert, key) = tls_material(names);
    (ca, cert.pem(), key.serialize_pem())
}

fn tls_material(names: &[&str]) -> (String, rcgen::Certificate, rcgen::KeyPair) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "aibox test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    let cert = leaf.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert, key)
}

/// The whole audit log of the context's only sandbox (whatever its name).
pub fn only_audit_text(c: &Ctx) -> String {
    let log = std::fs::read_dir(c.data.join("audit"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    log_text(&log)
}

/// The text of the log at `log`: its sealed segments in manifest order,
/// then the active file.
pub fn log_text(log: &std::path::Path) -> String {
    aibox_audit::segments::files(log)
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// The whole audit log of sandbox `name`.
pub fn audit_text(c: &Ctx, name: &str) -> String {
    log_text(&c.data.join(format!("audit/{name}.jsonl")))
}

/// A pid from sandbox `name`'s state file (`supervisor_pid`, …).
pub fn state_pid(c: &Ctx, name: &str, key: &str) -> i32 {
    let text = std::fs::read_to_string(c.runtime.join(name).join("state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[key].as_i64().unwrap() as i32
}

/// Kills sandbox `name`'s supervisor with SIGKILL (a crash) and waits
/// until it is gone; its pid.
pub fn kill_supervisor(c: &Ctx, name: &str) -> i32 {
    let pid = state_pid(c, name, "supervisor_pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(process_gone_within(pid, std::time::Duration::from_secs(10)));
    pid
}

/// The audit events of sandbox `name`, parsed (across sealed segments).
pub fn audit_events(c: &Ctx, name: &str) -> Vec<serde_json::Value> {
    audit_text(c, name)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs aibox on a terminal of our own (we hold the master), so the test
/// can type, read, and resize it.
pub struct Pty {
    pub master: std::fs::File,
    pub child: std::process::Child,
}

impl Pty {
    #[allow(unsafe_code)]
    pub fn spawn(mut cmd: std::process::Command, rows: u16, cols: u16) -> Pty {
        use std::os::fd::OwnedFd;
        use std::os::unix::process::CommandExt;
        let ws = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).unwrap();
        let slave: OwnedFd = pty.slave;
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave);
        // SAFETY: only async-signal-safe calls between fork and exec; the
        // terminal is already on stdin when the closure runs.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        Pty {
            master: std::fs::File::from(pty.master),
            child,
        }
    }

    /// Reads until `needle` has been seen (or 10 s pass); returns all output.
    pub fn read_until(&mut self, needle: &str) -> String {
        use std::io::Read;
        use std::os::fd::AsFd;
        let mut out = String::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !out.contains(needle) && std::time::Instant::now() < deadline {
            let mut fds = [nix::poll::PollFd::new(
                self.master.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u8)).unwrap_or(0) == 0 {
                continue;
            }
            let mut buf = [0u8; 4096];
            match self.master.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        out
    }

    #[allow(unsafe_code)]
    pub fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the winsize we own.
        unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    }
}

/// A loopback TCP port nothing listens on (free a moment ago).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tmpfs mounted over a directory for a test (root only), unmounted
/// when dropped: a small disk that fills up.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs with `options` (e.g. `size=256k`) on `dir`
    /// (created).
    pub fn mount(dir: &std::path::Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
