//! Assembles the sandbox's root filesystem and switches to it.
//!
//! Runs in the sandbox's own mount namespace with CAP_SYS_ADMIN over it
//! (real root for a rootful start, the namespace's owner for a rootless
//! one). Nothing here is visible to the host.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::sys::{self, MOUNT_ATTR_IDMAP, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};
use crate::{SandboxError, SandboxSpec};

/// Host system directories bound read-only (those that exist).
const SYSTEM_DIRS: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc",
];
/// Device nodes bound from the host.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

fn err(what: String) -> impl FnOnce(nix::errno::Errno) -> SandboxError {
    move |e| SandboxError::sys(what, e)
}

fn ioerr(what: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |e| SandboxError::sys(what, e)
}

fn bind(src: &Path, dst: &Path, recursive: bool) -> Result<(), SandboxError> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(src), dst, None::<&str>, flags, None::<&str>).map_err(err(format!(
        "bind-mounting {} on {}",
        src.display(),
        dst.display()
    )))
}

fn tmpfs(dst: &Path, flags: MsFlags, opts: &str) -> Result<(), SandboxError> {
    mount(Some("tmpfs"), dst, Some("tmpfs"), flags, Some(opts))
        .map_err(err(format!("mounting a tmpfs on {}", dst.display())))
}

fn mkdir(p: &Path) -> Result<(), SandboxError> {
    fs::create_dir_all(p).map_err(ioerr(format!("creating {}", p.display())))
}

/// Where a path the sandbox may create files lives: a denied path that
/// does not exist there cannot be masked, and would not stay denied.
pub const WRITABLE_PLACES: &[&str] = &["/workspace", "/home/dev", "/tmp", "/var/tmp", "/dev/shm"];

/// Masks each of `paths` (absolute, inside the new root, which is `/`
/// now): a directory gets an empty read-only tmpfs of mode 000, anything
/// else an empty mode-000 file bound read-only over it. The mount goes
/// on the object opened without following symbolic links (through its
/// /proc/self/fd name), so nothing can redirect it. Refused: a symbolic
/// link on the way (the link could later point elsewhere; name its
/// target), a file with other hard links (they would stay readable), and
/// a missing path where the sandbox could create it.
fn mask(paths: &[String]) -> Result<(), SandboxError> {
    if paths.is_empty() || crate::debug_skip("mask") {
        return Ok(());
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = fs::File::open("/").map_err(ioerr("opening the new root".into()))?;
    let blank = Path::new("/run/aibox/masked");
    if let Some(d) = blank.parent() {
        mkdir(d)?;
    }
    touch(blank)?;
    fs::set_permissions(blank, fs::Permissions::from_mode(0o000))
        .map_err(ioerr("making the mask file unreadable".into()))?;
    for p in paths {
        let refuse = |why: String| SandboxError::Setup(format!("filesystem.deny: {p}: {why}"));
        let fd = match crate::notify::open_no_symlinks(
            std::os::fd::AsFd::as_fd(&root),
            p.as_bytes(),
        ) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if WRITABLE_PLACES
                    .iter()
                    .any(|w| p == w || p.starts_with(&format!("{w}/")))
                {
                    return Err(refuse(
                        "does not exist, so it cannot be masked and the sandbox could create it; create it (an empty file or directory will do) or remove the entry".into(),
                    ));
                }
                // Not there, and nothing in the sandbox can create it.
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(refuse(
                    "a symbolic link is on its path (it could point elsewhere later); name the link's target instead".into(),
                ));
            }
            Err(e) => return Err(refuse(e.to_string())),
        };
        let target = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let meta = fs::metadata(&target).map_err(ioerr(format!("filesystem.deny: {p}")))?;
        if meta.is_dir() {
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=000,size=4k,nr_inodes=1"),
            )
            .map_err(err(format!("masking {p}")))?;
        } else {
            if meta.is_file() && meta.nlink() > 1 {
                return Err(refuse(format!(
                    "has {} hard links, which would stay readable; remove the other links or deny them too",
                    meta.nlink()
                )));
            }
            bind(blank, &target, false)?;
            // A bind mount takes read-only only on a remount, which must
            // name the new mount (the descriptor still names the file
            // under it). No sandbox process exists yet to swap the path.
            mount(
                None::<&str>,
                Path::new(p),
                None::<&str>,
                MsFlags::MS_REMOUNT
                    | MsFlags::MS_BIND
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV
                    | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(err(format!("making the mask of {p} read-only")))?;
        }
    }
    Ok(())
}

fn touch(p: &Path) -> Result<(), SandboxError> {
    fs::write(p, b"").map_err(ioerr(format!("creating {}", p.display())))
}

fn setattr(path: &Path, set: u64, clear: u64, recursive: bool) -> Result<(), SandboxError> {
    sys::mount_setattr(None, path, set, clear, recursive, None).map_err(ioerr(format!(
        "setting mount attributes on {}",
        path.display()
    )))
}

/// Mounts `src` at `dst` for the guest: an idmapped mount (rootful: the
/// guest's host uid writes files as the invoking user) or a plain bind
/// (rootless: the user namespace already maps the guest to the user).
fn guest_mount(src: &Path, dst: &Path, idmap: Option<&OwnedFd>) -> Result<(), SandboxError> {
    match idmap {
        Some(userns) => idmapped_attach(src, dst, userns),
        None => {
            bind(src, dst, false)?;
            setattr(dst, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, false)
        }
    }
}

/// Attaches an idmapped (through `userns`), nosuid, nodev copy of the mount
/// at `src` on `dst`.
pub(crate) fn idmapped_attach(
    src: &Path,
    dst: &Path,
    userns: &OwnedFd,
) -> Result<(), SandboxError> {
    let tree = sys::open_tree_clone(src)
        .map_err(ioerr(format!("cloning the mount of {}", src.display())))?;
    sys::mount_setattr(
        Some(tree.as_raw_fd()),
        Path::new(""),
        MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        0,
        false,
        Some(userns.as_raw_fd()),
    )
    .map_err(|e| SandboxError::Sys {
        what: format!(
            "idmapping {} (its filesystem must support idmapped mounts: ext4, xfs, btrfs, tmpfs on Linux 6.3+; \
             or run aibox as an ordinary user)",
            src.display()
        ),
        source: e,
    })?;
    sys::move_mount_to(&tree, dst).map_err(ioerr(format!("attaching {}", dst.display())))
}

/// Generated `/etc` files: (path under /etc, contents).
fn etc_files(spec: &SandboxSpec) -> Vec<(&'static str, String)> {
    let dns = spec
        .net
        .as_ref()
        .map_or(std::net::Ipv4Addr::new(127, 0, 0, 53), |n| n.dns_addr);
    use aibox_core::guest;
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    vec![
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n{user}:x:{uid}:{gid}:aibox developer:{home}:{shell}\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
                user = guest::USER,
                uid = guest::UID,
                gid = guest::GID,
                home = guest::HOME,
            ),
        ),
        (
            "group",
            format!(
                "root:x:0:\n{}:x:{}:\nnogroup:x:65534:\n",
                guest::USER,
                guest::GID
            ),
        ),
        ("hostname", format!("{}\n", guest::HOSTNAME)),
        (
            "hosts",
            format!(
                "127.0.0.1\tlocalhost {h}\n::1\tlocalhost ip6-localhost {h}\n",
                h = guest::HOSTNAME
            ),
        ),
        // The aibox DNS answerer (served by the supervisor when the
        // sandbox has egress; nothing answers otherwise).
        (
            "resolv.conf",
            format!("nameserver {dns}\noptions edns0 attempts:1 timeout:2\n"),
        ),
    ]
}

/// Builds the new root at `spec.root_dir`, pivots into it and makes
/// everything but the writable mounts read-only. `idmap` is the user
/// namespace for idmapped guest mounts (rootful starts only).
pub(crate) fn build(spec: &SandboxSpec, idmap: Option<&OwnedFd>) -> Result<(), SandboxError> {
    let root = spec.root_dir.as_path();
    let base: PathBuf = spec.rootfs.clone().unwrap_or_else(|| PathBuf::from("/"));

    // Nothing we mount may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err("making the mount namespace private".into()))?;
    tmpfs(
        root,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=0755,size=16m",
    )?;

    let mut system_mounts = Vec::new();
    for d in SYSTEM_DIRS {
        let src = base.join(d);
        let dst = root.join(d);
        match fs::symlink_metadata(&src) {
            Ok(m) if m.file_type().is_symlink() => {
                let target =
                    fs::read_link(&src).map_err(ioerr(format!("reading {}", src.display())))?;
                symlink(&target, &dst).map_err(ioerr(format!("creating {}", dst.display())))?;
            }
            Ok(m) if m.is_dir() => {
                mkdir(&dst)?;
                bind(&src, &dst, true)?;
                system_mounts.push(Path::new("/").join(d));
            }
            _ => {}
        }
    }
    if !root.join("etc").is_dir() || !root.join("usr").is_dir() {
        return Err(SandboxError::Setup(format!(
            "{} has no usr/ and etc/ directories; set sandbox.rootfs to a root filesystem directory (or leave it empty for the host's)",
            base.display()
        )));
    }

    // Files added to /etc: a read-only overlay with them above the
    // system's /etc (it has no mount points for new files).
    if !spec.etc_extra.is_empty() {
        let extra = root.join("run/aibox/etc-extra");
        for (rel, body) in &spec.etc_extra {
            let rel = Path::new(rel);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(SandboxError::Setup(format!(
                    "{} is not a plain path below /etc",
                    rel.display()
                )));
            }
            let p = extra.join(rel);
            if let Some(d) = p.parent() {
                mkdir(d)?;
            }
            fs::write(&p, body).map_err(ioerr(format!("writing {}", p.display())))?;
        }
        let etc = root.join("etc");
        let (a, b) = (extra.display().to_string(), etc.display().to_string());
        if [&a, &b].iter().any(|x| x.contains([',', ':', '\\'])) {
            return Err(SandboxError::Setup(format!(
                "the runtime directory path {} contains `,`, `:` or `\\`, which an overlay mount cannot name; set paths.runtime_dir to a plain path",
                root.display()
            )));
        }
        mount(
            Some("overlay"),
            &etc,
            Some("overlay"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("lowerdir={a}:{b}").as_str()),
        )
        .map_err(err("mounting the /etc overlay (agent settings)".into()))?;
    }

    // Identity and name files, shadowing the system ones.
    let gen_dir = root.join("run/aibox/etc");
    mkdir(&gen_dir)?;
    let mut etc_binds = Vec::new();
    for (name, body) in etc_files(spec) {
        let generated = gen_dir.join(name);
        fs::write(&generated, body).map_err(ioerr(format!("writing {}", generated.display())))?;
        let target = root.join("etc").join(name);
        let is_file = fs::symlink_metadata(&target)
            .map(|m| m.is_file())
            .unwrap_or(false);
        if is_file {
            bind(&generated, &target, false)?;
            etc_binds.push(Path::new("/etc").join(name));
        } else if matches!(name, "passwd" | "group") {
            return Err(SandboxError::Setup(format!(
                "{}/etc/{name} is not a regular file, so the sandbox user cannot be defined",
                base.display()
            )));
        }
    }

    // The LLM gateway's CA: alone at CA_PATH, and appended to a copy of
    // the system bundle that shadows it.
    if let Some(ca) = &spec.extra_ca_pem {
        let aibox_dir = root.join("aibox");
        mkdir(&aibox_dir)?;
        let alone = root.join(crate::CA_PATH.trim_start_matches('/'));
        fs::write(&alone, ca).map_err(ioerr(format!("writing {}", alone.display())))?;
        let bundle = root.join(crate::CA_BUNDLE.trim_start_matches('/'));
        if bundle.is_file() {
            let mut text = fs::read_to_string(&bundle)
                .map_err(ioerr(format!("reading {}", bundle.display())))?;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(ca);
            let generated = gen_dir.join("ca-certificates.crt");
            fs::write(&generated, text)
                .map_err(ioerr(format!("writing {}", generated.display())))?;
            bind(&generated, &bundle, false)?;
            etc_binds.push(PathBuf::from(crate::CA_BUNDLE));
        }
    }

    // The aibox binary, for aibox's own in-sandbox commands.
    if let Some(bin) = &spec.aibox_binary {
        let dst = root.join(crate::container::BINARY.trim_start_matches('/'));
        if let Some(dir) = dst.parent() {
            mkdir(dir)?;
        }
        touch(&dst)?;
        bind(bin, &dst, false)?;
        system_mounts.push(PathBuf::from(crate::container::BINARY));
        let helper = root.join(crate::container::PUSH_HELPER.trim_start_matches('/'));
        if let Some(dir) = helper.parent() {
            mkdir(dir)?;
        }
        touch(&helper)?;
        bind(bin, &helper, false)?;
        system_mounts.push(PathBuf::from(crate::container::PUSH_HELPER));
    }

    // The supervisor's decision socket.
    if let Some(sock) = &spec.gate_socket {
        let dst = root.join(crate::GATE_SOCKET.trim_start_matches('/'));
        if let Some(dir) = dst.parent() {
            mkdir(dir)?;
        }
        touch(&dst)?;
        bind(sock, &dst, false)?;
    }

    // Writable places.
    let ws = root.join("workspace");
    mkdir(&ws)?;
    guest_mount(&spec.workspace, &ws, idmap)?;
    if let Some((dev, ino)) = spec.workspace_id {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&ws).map_err(ioerr("checking the mounted workspace".into()))?;
        if (m.dev(), m.ino()) != (dev, ino) {
            return Err(SandboxError::Setup(format!(
                "the workspace {} changed between validation and mounting (a path component was replaced); refusing to start",
                spec.workspace.display()
            )));
        }
    }
    for rel in &spec.read_only_in_workspace {
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(SandboxError::Setup(format!(
                "{} is not a plain path inside the workspace",
                rel.display()
            )));
        }
        let p = ws.join(rel);
        // (A symlink planted since the caller's check is refused, not
        // followed out of the workspace.)
        if fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(SandboxError::Setup(format!(
                "{} is a symbolic link; refusing to start",
                p.display()
            )));
        }
        bind(&p, &p, false)?;
        system_mounts.push(Path::new("/workspace").join(rel));
    }
    let home = root.join("home/dev");
    mkdir(&home)?;
    guest_mount(&spec.home, &home, idmap)?;
    let tmp_opts = format!("mode=1777,size={}", spec.tmp_size);
    for t in ["tmp", "var/tmp"] {
        let p = root.join(t);
        mkdir(&p)?;
        tmpfs(&p, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, &tmp_opts)?;
    }

    // A /proc of our own pid namespace.
    let proc_dir = root.join("proc");
    mkdir(&proc_dir)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(err("mounting /proc".into()))?;

    // A minimal /dev.
    let dev = root.join("dev");
    mkdir(&dev)?;
    tmpfs(
        &dev,
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=64k",
    )?;
    for d in DEVICES {
        let dst = dev.join(d);
        touch(&dst)?;
        bind(&Path::new("/dev").join(d), &dst, false)?;
    }
    let pts = dev.join("pts");
    mkdir(&pts)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(err("mounting /dev/pts".into()))?;
    let shm = dev.join("shm");
    mkdir(&shm)?;
    tmpfs(
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "mode=1777,size=64m",
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, dev.join(link)).map_err(ioerr(format!("creating /dev/{link}")))?;
    }

    // Switch roots: stack the old root under the new one and detach it.
    nix::unistd::chdir(root).map_err(err("entering the new root".into()))?;
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root".into()))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detaching the old root".into()))?;
    nix::unistd::chdir("/").map_err(err("entering /".into()))?;

    mask(&spec.masked)?;

    // Read-only everything that is not meant to be written.
    if crate::debug_skip("readonly") {
        return Ok(());
    }
    setattr(
        Path::new("/"),
        MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
        0,
        false,
    )?;
    for m in system_mounts.iter().chain(&etc_binds) {
        setattr(
            m,
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            0,
            true,
        )?;
    }
    setattr(Path::new("/dev"), MOUNT_ATTR_RDONLY, 0, false)?;
    Ok(())
}
