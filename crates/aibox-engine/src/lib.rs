//! Driving the podman and docker command-line tools: running them with
//! their JSON output parsed (never screen-scraped), turning their failures
//! into one message with a fix, and building aibox's base image.

#![warn(missing_docs)]

pub mod image;

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

/// A container engine CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// podman.
    Podman,
    /// docker (or a compatible CLI).
    Docker,
}

impl Engine {
    /// The program name.
    pub fn program(self) -> &'static str {
        match self {
            Engine::Podman => "podman",
            Engine::Docker => "docker",
        }
    }

    /// Package(s) that provide the engine on Debian.
    fn packages(self) -> &'static str {
        match self {
            Engine::Podman => "podman runc uidmap slirp4netns fuse-overlayfs",
            Engine::Docker => "docker.io",
        }
    }
}

/// Engine failures, each with what happened and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine is not installed.
    #[error(
        "{engine} is not installed\n  fix: apt-get install {packages}, or choose another runtime (`--runtime native`)"
    )]
    NotInstalled {
        /// Engine name.
        engine: &'static str,
        /// Packages to install.
        packages: &'static str,
    },
    /// The engine ran but failed; `message` is its error reduced to one line
    /// plus a fix when the cause is known.
    #[error("{engine} {action} failed: {message}")]
    Failed {
        /// Engine name.
        engine: &'static str,
        /// What aibox asked it to do.
        action: String,
        /// The explanation.
        message: String,
    },
    /// The engine's JSON output could not be read.
    #[error("{engine} printed output aibox cannot read ({detail})")]
    BadOutput {
        /// Engine name.
        engine: &'static str,
        /// Parser message.
        detail: String,
    },
    /// Image building failed.
    #[error("{0}")]
    Build(String),
}

/// Known engine failure texts and the fix to show for them.
const KNOWN: &[(&str, &str)] = &[
    (
        "cannot find",
        "the image is not present: build it with `aibox image build`, or pull it",
    ),
    (
        "image not known",
        "the image is not present: build it with `aibox image build`, or pull it",
    ),
    (
        "no such image",
        "the image is not present: build it with `aibox image build`, or pull it",
    ),
    (
        "cgroups in hybrid mode",
        "this host's cgroups are hybrid: set `runtime = \"runc\"` and `cgroup_manager = \"cgroupfs\"` in /etc/containers/containers.conf",
    ),
    (
        "cgroupv2 manager is set to systemd",
        "no systemd session: set `cgroup_manager = \"cgroupfs\"` in containers.conf",
    ),
    (
        "RLIMIT_NOFILE",
        "the engine's default ulimits exceed this host's hard limit: set `default_ulimits` below it in containers.conf (see `ulimit -Hn`)",
    ),
    (
        "not enough ids",
        "rootless podman needs subordinate ids: add `USER:100000:65536` to /etc/subuid and /etc/subgid, then `podman system migrate`",
    ),
    (
        "newuidmap",
        "rootless podman needs newuidmap/newgidmap (apt-get install uidmap) and /etc/subuid, /etc/subgid entries for the user",
    ),
    (
        "invalid internal status",
        "rootless podman's pause process is gone while its state says it runs (typical after a reboot when its run directory is not on tmpfs): run `podman system migrate` as this user (it stops the user's running containers)",
    ),
    (
        "GLIBC_",
        "the image's C library is older than the host's, and aibox's own binary runs inside the container: use an image of the host's Debian release (`aibox image build`)",
    ),
    (
        "permission denied while trying to connect to the Docker daemon",
        "only root (or members of the docker group, which is root-equivalent) may use the docker engine: run as root, or use podman (rootless works)",
    ),
    (
        "Cannot connect to the Docker daemon",
        "the docker engine is not running: start dockerd (e.g. `dockerd --iptables=false --bridge=none &`)",
    ),
];

/// Reduces an engine's stderr to one line and adds a fix for known causes.
pub fn explain(stderr: &str) -> String {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("(no message)")
        .trim()
        .trim_start_matches("Error: ")
        .trim_start_matches("Error response from daemon: ")
        .to_string();
    let lower = stderr.to_ascii_lowercase();
    match KNOWN
        .iter()
        .find(|(needle, _)| lower.contains(&needle.to_ascii_lowercase()))
    {
        Some((_, fix)) => format!("{line}\n  fix: {fix}"),
        None => line,
    }
}

impl Engine {
    /// A command for this engine.
    pub fn command<I, S>(self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new(self.program());
        c.args(args);
        c
    }

    /// Runs the engine with `args` and returns its output, or one clear error.
    pub fn run<I, S>(self, action: &str, args: I) -> Result<Output, EngineError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self
            .command(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(e))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(EngineError::Failed {
                engine: self.program(),
                action: action.to_string(),
                message: explain(&String::from_utf8_lossy(&out.stderr)),
            })
        }
    }

    /// Maps a failure to start the engine binary.
    pub fn spawn_error(self, e: std::io::Error) -> EngineError {
        if e.kind() == std::io::ErrorKind::NotFound {
            EngineError::NotInstalled {
                engine: self.program(),
                packages: self.packages(),
            }
        } else {
            EngineError::Failed {
                engine: self.program(),
                action: "start".into(),
                message: e.to_string(),
            }
        }
    }

    /// Runs the engine and parses its standard output as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(
        self,
        action: &str,
        args: &[&str],
    ) -> Result<T, EngineError> {
        let out = self.run(action, args)?;
        serde_json::from_slice(&out.stdout).map_err(|e| EngineError::BadOutput {
            engine: self.program(),
            detail: e.to_string(),
        })
    }

    /// Runs a listing command whose output is JSON: an array (podman) or
    /// one object per line (docker's `{{json .}}`).
    pub fn json_list(
        self,
        action: &str,
        args: &[&str],
    ) -> Result<Vec<serde_json::Value>, EngineError> {
        let out = self.run(action, args)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let bad = |e: serde_json::Error| EngineError::BadOutput {
            engine: self.program(),
            detail: e.to_string(),
        };
        if text.trim_start().starts_with('[') {
            return serde_json::from_str(&text).map_err(bad);
        }
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(bad))
            .collect()
    }

    /// Names of the volumes carrying `label` (`key=value`).
    pub fn volumes_labelled(self, label: &str) -> Result<Vec<String>, EngineError> {
        let filter = format!("label={label}");
        let format = match self {
            Engine::Podman => "json",
            Engine::Docker => "{{json .}}",
        };
        let list = self.json_list(
            "volume ls",
            &["volume", "ls", "--filter", &filter, "--format", format],
        )?;
        Ok(list
            .iter()
            .filter_map(|v| v.get("Name").and_then(|n| n.as_str()).map(String::from))
            .collect())
    }

    /// The engine's version, from its JSON output.
    pub fn version(self) -> Result<String, EngineError> {
        let v: serde_json::Value = self.json("version", &["version", "--format", "json"])?;
        let version = v["Client"]["Version"]
            .as_str()
            .or_else(|| v["Version"].as_str())
            .unwrap_or("unknown");
        Ok(version.to_string())
    }
}

/// Finds `prog` in `PATH`.
pub fn which(prog: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// The platforms the installed `runsc` offers, read from `runsc flags`
/// (e.g. "specifies which platform to use: ptrace (default), kvm.").
pub fn runsc_platforms(runsc: &std::path::Path) -> Result<Vec<String>, EngineError> {
    let out = Command::new(runsc)
        .arg("flags")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| EngineError::Failed {
            engine: "runsc",
            action: "flags".into(),
            message: e.to_string(),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_platforms(&text).ok_or_else(|| EngineError::BadOutput {
        engine: "runsc",
        detail: "no platform list in `runsc flags`".into(),
    })
}

/// Whether `runsc exec` takes `--tty`, which podman's conmon passes for
/// `podman exec -t` (runsc builds from 2022 lack it).
pub fn runsc_exec_has_tty(runsc: &std::path::Path) -> bool {
    Command::new(runsc)
        .args(["help", "exec"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().any(|l| l.trim_start().starts_with("-tty"))
        })
}

fn parse_platforms(text: &str) -> Option<Vec<String>> {
    let line = text
        .lines()
        .find(|l| l.contains("specifies which platform to use:"))?;
    let list = line.split_once("use:")?.1;
    let list = list.split_once('.').map_or(list, |(l, _)| l);
    let v: Vec<String> = list
        .split(',')
        .map(|p| p.replace("(default)", "").trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    (!v.is_empty()).then_some(v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn runsc_platform_lists() {
        let old = "  -platform string\n    \tspecifies which platform to use: ptrace (default), kvm. (default \"ptrace\")\n";
        assert_eq!(super::parse_platforms(old).unwrap(), ["ptrace", "kvm"]);
        let new = "\tspecifies which platform to use: systrap (default), ptrace, kvm. (default \"systrap\")";
        assert_eq!(
            super::parse_platforms(new).unwrap(),
            ["systrap", "ptrace", "kvm"]
        );
        assert!(super::parse_platforms("nothing").is_none());
    }

    use super::*;

    #[test]
    fn explanations_are_one_line_plus_fix() {
        let e = explain(
            "time=\"x\" level=warning msg=\"foo\"\nError: localhost/nope: image not known\n",
        );
        assert_eq!(
            e,
            "localhost/nope: image not known\n  fix: the image is not present: build it with `aibox image build`, or pull it"
        );
        let e = explain(
            "Error: crun: cgroups in hybrid mode not supported, drop all controllers from cgroupv2: OCI runtime error\n",
        );
        assert!(e.contains("fix: this host's cgroups are hybrid"), "{e}");
        // Seen on a restored machine: the state file outlived the pause process.
        let e = explain(
            "time=\"x\" level=error msg=\"invalid internal status, try resetting the pause process with \\\"podman system migrate\\\": could not find any running process: no such process\"\n",
        );
        assert!(
            e.contains("fix: rootless podman's pause process is gone"),
            "{e}"
        );
        assert_eq!(explain("something odd\n"), "something odd");
    }

    #[test]
    fn missing_engine_is_not_installed() {
        let e = Engine::Podman.spawn_error(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(e.to_string().contains("apt-get install podman"), "{e}");
    }
}
