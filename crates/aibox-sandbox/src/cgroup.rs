//! cpu, memory and pids limits through cgroup v1 controllers, for rootful
//! starts on hosts where aibox can create cgroups (it nests them under its
//! own cgroup in each hierarchy, so limits of the caller still apply).
//! Rootless starts and pure cgroup-v2 hosts without delegation get `None`,
//! and `status` reports cpus/memory as not enforced.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::SandboxError;

/// Limits to apply.
#[derive(Debug, Clone, Copy)]
pub struct CgroupLimits {
    /// CPUs (CFS quota = cpus × period).
    pub cpus: u32,
    /// Memory in bytes (RAM and RAM+swap).
    pub memory: u64,
    /// Processes.
    pub pids: u64,
}

/// Created cgroups (one per controller).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cgroup {
    /// Directories, one per controller.
    pub dirs: Vec<PathBuf>,
    /// Controllers in the order of `dirs`.
    pub controllers: Vec<String>,
    /// True when swap is limited too (`memory.memsw.limit_in_bytes` exists
    /// only with swap accounting on).
    #[serde(default)]
    pub memsw: bool,
    /// CPU quota actually set (clamped to a limited parent's), in CPUs × 1000.
    #[serde(default)]
    pub cpu_millis: u64,
}

const ROOT: &str = "/sys/fs/cgroup";
const CFS_PERIOD_US: u64 = 100_000;

/// This process's path in the v1 hierarchy of `controller`.
fn own_path(controller: &str) -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let _id = f.next()?;
        let ctrls = f.next()?;
        let path = f.next()?;
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), SandboxError> {
    fs::write(dir.join(file), value).map_err(|e| {
        SandboxError::sys(
            format!("writing {value} to {}", dir.join(file).display()),
            e,
        )
    })
}

impl Cgroup {
    /// Creates `aibox-<name>` cgroups with `limits`. `Ok(None)` when this
    /// host gives us no cgroup to manage (not root, or no v1 controllers).
    pub fn create(name: &str, limits: CgroupLimits) -> Result<Option<Cgroup>, SandboxError> {
        if aibox_core::euid() != 0 {
            return Ok(None);
        }
        let mut cg = Cgroup {
            dirs: Vec::new(),
            controllers: Vec::new(),
            memsw: false,
            cpu_millis: 0,
        };
        for ctrl in ["memory", "cpu", "pids"] {
            let base = Path::new(ROOT).join(ctrl);
            let Some(own) = own_path(ctrl) else { continue };
            if !base.join("cgroup.procs").exists() {
                continue;
            }
            let dir = base
                .join(own.trim_start_matches('/'))
                .join(format!("aibox-{name}"));
            // A leftover of a crashed supervisor is empty once its processes died.
            let _ = fs::remove_dir(&dir);
            if let Err(e) = fs::create_dir(&dir) {
                cg.remove();
                return Err(SandboxError::sys(
                    format!("creating cgroup {}", dir.display()),
                    e,
                ));
            }
            cg.dirs.push(dir.clone());
            cg.controllers.push(ctrl.into());
            let r = match ctrl {
                "memory" => {
                    let mem = limits.memory.to_string();
                    let r = write(&dir, "memory.limit_in_bytes", &mem);
                    // Without this, the sandbox could swap its way past the limit.
                    if r.is_ok() && dir.join("memory.memsw.limit_in_bytes").exists() {
                        cg.memsw = true;
                        write(&dir, "memory.memsw.limit_in_bytes", &mem)
                    } else {
                        r
                    }
                }
                "cpu" => {
                    // A child quota above a limited parent's is refused
                    // (EINVAL); the parent's is the effective ceiling anyway.
                    let mut quota = u64::from(limits.cpus) * CFS_PERIOD_US;
                    let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
                    let read = |f: &str| {
                        fs::read_to_string(parent.join(f))
                            .ok()
                            .and_then(|v| v.trim().parse::<i64>().ok())
                    };
                    if let (Some(pq), Some(pp)) =
                        (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us"))
                        && pq > 0
                        && pp > 0
                    {
                        quota = quota.min(pq as u64 * CFS_PERIOD_US / pp as u64);
                    }
                    cg.cpu_millis = quota * 1000 / CFS_PERIOD_US;
                    write(&dir, "cpu.cfs_period_us", &CFS_PERIOD_US.to_string())
                        .and_then(|()| write(&dir, "cpu.cfs_quota_us", &quota.to_string()))
                }
                _ => write(&dir, "pids.max", &limits.pids.to_string()),
            };
            if let Err(e) = r {
                cg.remove();
                return Err(e);
            }
        }
        if cg.controllers.iter().any(|c| c == "memory") && cg.controllers.iter().any(|c| c == "cpu")
        {
            Ok(Some(cg))
        } else {
            cg.remove();
            Ok(None)
        }
    }

    /// Removes `aibox-<name>` cgroups a dead sandbox left behind (they are
    /// empty once its processes are gone); a no-op when not root.
    pub fn remove_leftovers(name: &str) {
        if aibox_core::euid() != 0 {
            return;
        }
        for ctrl in ["memory", "cpu", "pids"] {
            if let Some(own) = own_path(ctrl) {
                let dir = Path::new(ROOT)
                    .join(ctrl)
                    .join(own.trim_start_matches('/'))
                    .join(format!("aibox-{name}"));
                let _ = fs::remove_dir(dir);
            }
        }
    }

    /// Moves the calling process into every cgroup.
    pub fn join_self(&self) -> Result<(), SandboxError> {
        for d in &self.dirs {
            write(d, "cgroup.procs", "0")?;
        }
        Ok(())
    }

    /// Removes the cgroups (they must be empty).
    pub fn remove(&self) {
        for d in &self.dirs {
            for _ in 0..50 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    /// Directory of `controller`.
    pub fn dir(&self, controller: &str) -> Option<&Path> {
        self.controllers
            .iter()
            .position(|c| c == controller)
            .map(|i| self.dirs[i].as_path())
    }
}
