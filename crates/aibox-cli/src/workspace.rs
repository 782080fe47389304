//! Workspace validation: refuse paths that would expose too much of the
//! host, or that live on filesystems that break sandbox semantics.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Filesystems refused as workspaces (WSL drvfs/9p and NTFS: no POSIX
/// ownership or modes, so the sandbox's permission model does not hold).
const BAD_FS: &[&str] = &["9p", "drvfs", "ntfs", "ntfs3", "fuseblk", "v9fs"];

/// System trees that must never be a workspace (or contain one).
const SYSTEM: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/boot",
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/var/run",
    "/var/lib",
    "/var/spool",
    "/var/log",
    "/var/cache",
    "/var/backups",
    "/var/mail",
];

/// Shared directories refused as a whole (their subdirectories are fine).
const SHARED: &[&str] = &[
    "/var", "/home", "/srv", "/opt", "/mnt", "/media", "/tmp", "/var/tmp",
];

/// Resolves and checks a workspace path; returns the canonical path.
pub fn validate(raw: &Path, check_fs: bool, protected: &[(&str, PathBuf)]) -> Result<PathBuf> {
    let shown = raw.display();
    let meta = match std::fs::metadata(raw) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "workspace {shown} does not exist\n  fix: create it (mkdir -p {shown}) or pass an existing directory with -w"
            )
        }
        Err(e) => bail!("workspace {shown}: {e}\n  fix: pass a directory you can read with -w"),
    };
    if !meta.is_dir() {
        bail!(
            "workspace {shown} is not a directory\n  fix: pass the project directory that contains it with -w"
        );
    }
    let abs = std::fs::canonicalize(raw)?;
    if abs == Path::new("/") {
        bail!(
            "refusing / as the workspace: it would put the whole host inside the sandbox\n  fix: pass your project directory with -w"
        );
    }
    if let Some(home) = aibox_core::home_dir().and_then(|h| std::fs::canonicalize(h).ok())
        && (abs == home || home.starts_with(&abs))
    {
        {
            bail!(
                "refusing {} as the workspace: it is (or contains) your home directory {}, with your SSH keys and credentials\n  fix: pass a project directory below it with -w",
                abs.display(),
                home.display()
            );
        }
    }
    if SHARED.iter().any(|s| abs == Path::new(s)) {
        bail!(
            "refusing {} as the workspace: it is shared by other users and services\n  fix: pass a project directory below it with -w",
            abs.display()
        );
    }
    for (user, home) in account_homes() {
        if abs == home || home.starts_with(&abs) {
            bail!(
                "refusing {} as the workspace: it is (or contains) the home directory of {user} ({})\n  fix: pass a project directory below it with -w",
                abs.display(),
                home.display()
            );
        }
    }
    // Dot-directories of a home hold credentials and configuration that
    // host programs trust (~/.ssh, ~/.aws, ~/.config with aibox's own
    // config, ~/.gnupg): never hand them to the sandbox to rewrite.
    for (user, home) in account_homes() {
        if let Ok(rest) = abs.strip_prefix(&home)
            && rest
                .components()
                .next()
                .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        {
            bail!(
                "refusing {} as the workspace: it is inside a hidden directory of {user}'s home ({}), where credentials and configuration live\n  fix: keep projects in a plain directory such as ~/src/PROJECT",
                abs.display(),
                home.display()
            );
        }
    }
    for sys in SYSTEM {
        if abs.starts_with(sys) {
            bail!(
                "refusing {} as the workspace: it is a system directory\n  fix: pass your project directory with -w",
                abs.display()
            );
        }
    }
    for (what, p) in protected {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        // Directories must not overlap either way; a file only must not be inside.
        let overlaps = p.starts_with(&abs) || (p.is_dir() && abs.starts_with(&p));
        if overlaps {
            bail!(
                "refusing {} as the workspace: it overlaps the aibox {what} {}, which the sandbox must never reach\n  fix: choose another workspace, or move the {what} elsewhere",
                abs.display(),
                p.display()
            );
        }
    }
    if check_fs {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        check_filesystem(&abs, &info)?;
    }
    Ok(abs)
}

/// Refuses WSL drive paths and foreign filesystems (`mountinfo` is the text
/// of /proc/self/mountinfo).
fn check_filesystem(abs: &Path, mountinfo: &str) -> Result<()> {
    let s = abs.to_string_lossy();
    if is_wsl_drive(abs) {
        bail!(
            "refusing {s}: /mnt/<drive> is a Windows drive under WSL\n  fix: keep the project in the Linux filesystem (e.g. ~/src), or set workspace.validate_fs: false"
        );
    }
    if let Some(fs) = fs_type_in(mountinfo, abs)
        && BAD_FS.contains(&fs.as_str())
    {
        bail!(
            "refusing {s}: it is on a {fs} filesystem, which lacks POSIX ownership and permissions\n  fix: move the project to a Linux filesystem (ext4, xfs, btrfs), or set workspace.validate_fs: false"
        );
    }
    Ok(())
}

/// `/mnt/<one lowercase letter>` or below: a Windows drive under WSL.
fn is_wsl_drive(abs: &Path) -> bool {
    let mut parts = abs.components().skip(1);
    parts.next().is_some_and(|c| c.as_os_str() == "mnt")
        && parts.next().is_some_and(|c| {
            let b = c.as_os_str().as_encoded_bytes();
            b.len() == 1 && b[0].is_ascii_lowercase()
        })
}

/// Home directories of the accounts in /etc/passwd (those that exist), so
/// that no user's home — not only the caller's — becomes a workspace.
fn account_homes() -> Vec<(String, PathBuf)> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let (user, home) = (f.first()?, f.get(5)?);
            let home = std::fs::canonicalize(home).ok()?;
            (home != Path::new("/")).then(|| (user.to_string(), home))
        })
        .collect()
}

/// (device, inode) of a directory, recorded at validation and checked
/// again after the sandbox has mounted it, so that swapping a path
/// component for a symlink in between cannot redirect the mount.
pub fn identity(p: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p)?;
    Ok((m.dev(), m.ino()))
}

/// Filesystem type of the mount holding `path` (longest mount-point prefix
/// in /proc/self/mountinfo).
#[cfg(test)]
fn fs_type(path: &Path) -> Option<String> {
    fs_type_in(&std::fs::read_to_string("/proc/self/mountinfo").ok()?, path)
}

fn fs_type_in(info: &str, path: &Path) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let mount_point = fields.get(4)?.replace("\\040", " ");
        let sep = fields.iter().position(|f| *f == "-")?;
        let fstype = fields.get(sep + 1)?.to_string();
        if path.starts_with(&mount_point)
            && best.as_ref().is_none_or(|(l, _)| mount_point.len() >= *l)
        {
            best = Some((mount_point.len(), fstype));
        }
    }
    best.map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals() {
        assert!(validate(Path::new("/"), true, &[]).is_err());
        assert!(validate(Path::new("/definitely/missing"), true, &[]).is_err());
        assert!(validate(Path::new("/etc/passwd"), true, &[]).is_err());
        assert!(validate(Path::new("/proc"), true, &[]).is_err());
        for shared in ["/tmp", "/home", "/var", "/var/lib/dpkg"] {
            assert!(validate(Path::new(shared), true, &[]).is_err(), "{shared}");
        }
        let d = tempfile::tempdir().unwrap();
        assert!(validate(d.path(), true, &[]).is_ok());
        let inner = d.path().join("data");
        std::fs::create_dir(&inner).unwrap();
        assert!(validate(d.path(), true, &[("data_dir", inner)]).is_err());
        if let Some(home) = aibox_core::home_dir() {
            let hidden = home.join(".aibox-workspace-test");
            if std::fs::create_dir_all(&hidden).is_ok() {
                let r = validate(&hidden, true, &[]);
                let _ = std::fs::remove_dir(&hidden);
                assert!(r.is_err(), "hidden home directory accepted");
            }
        }
    }

    #[test]
    fn foreign_filesystems_are_recognised() {
        let info = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    90 22 0:50 / /mnt/c rw,noatime - 9p drvfs rw,dirsync,aname=drvfs;path=C:\\\n\
                    91 22 0:51 / /data/win rw - ntfs3 /dev/sdb1 rw\n\
                    92 22 0:52 / /home/u/my\\040drive rw - fuseblk /dev/sdc1 rw\n";
        assert_eq!(
            fs_type_in(info, Path::new("/mnt/c/Users/x")).as_deref(),
            Some("9p")
        );
        assert_eq!(
            fs_type_in(info, Path::new("/data/win/proj")).as_deref(),
            Some("ntfs3")
        );
        assert_eq!(
            fs_type_in(info, Path::new("/home/u/my drive/p")).as_deref(),
            Some("fuseblk")
        );
        assert_eq!(
            fs_type_in(info, Path::new("/home/u/proj")).as_deref(),
            Some("ext4")
        );
        for t in ["9p", "ntfs3", "fuseblk", "drvfs", "ntfs"] {
            assert!(BAD_FS.contains(&t));
        }
    }

    #[test]
    fn foreign_and_wsl_workspaces_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let abs = std::fs::canonicalize(d.path()).unwrap();
        let on = |fs: &str| {
            format!(
                "22 1 254:0 / / rw - ext4 /dev/vda rw\n30 22 0:9 / {} rw - {fs} x rw\n",
                abs.display()
            )
        };
        for bad in ["9p", "drvfs", "ntfs", "ntfs3", "fuseblk"] {
            let e = check_filesystem(&abs, &on(bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("on a {bad} filesystem")), "{e}");
        }
        check_filesystem(&abs, &on("ext4")).unwrap();
        assert!(is_wsl_drive(Path::new("/mnt/c")));
        assert!(is_wsl_drive(Path::new("/mnt/d/src/proj")));
        assert!(!is_wsl_drive(Path::new("/mnt/data/proj")));
        assert!(!is_wsl_drive(Path::new("/home/mnt/c")));
        assert!(check_filesystem(Path::new("/mnt/c/proj"), "").is_err());
    }

    #[test]
    fn fs_type_of_proc() {
        assert_eq!(fs_type(Path::new("/proc/self")).as_deref(), Some("proc"));
    }
}
