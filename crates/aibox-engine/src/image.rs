//! Building aibox's base image from the distribution's packages and
//! listing the images aibox built.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::{Engine, EngineError};

/// Label every aibox-built image carries.
pub const LABEL: &str = "aibox.image";

/// Packages in every base image (on top of Debian's minbase).
pub const BASE_PACKAGES: &[&str] = &["bash", "git", "ca-certificates", "curl", "less", "procps"];

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Image name, e.g. `localhost/aibox/base:bookworm`.
    pub name: String,
    /// Debian suite.
    pub suite: String,
    /// Extra packages.
    pub packages: Vec<String>,
}

/// An image as the engine reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Names (repository:tag).
    pub names: Vec<String>,
    /// Image id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Creation time (RFC 3339).
    pub created: String,
    /// aibox's label value (`base`), if any.
    pub aibox: Option<String>,
}

#[derive(Deserialize)]
struct PodmanImage {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Names", default)]
    names: Option<Vec<String>>,
    #[serde(rename = "Size", default)]
    size: u64,
    #[serde(rename = "CreatedAt", default)]
    created_at: String,
    #[serde(rename = "Labels", default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
}

/// Images known to the engine; `only_aibox` keeps those aibox built.
pub fn list(engine: Engine, only_aibox: bool) -> Result<Vec<ImageInfo>, EngineError> {
    let images: Vec<ImageInfo> = match engine {
        Engine::Podman => {
            let raw: Vec<PodmanImage> = engine.json("images", &["images", "--format", "json"])?;
            raw.into_iter()
                .map(|i| ImageInfo {
                    names: i.names.unwrap_or_default(),
                    id: i.id,
                    size: i.size,
                    created: i.created_at,
                    aibox: i.labels.and_then(|l| l.get(LABEL).cloned()),
                })
                .collect()
        }
        Engine::Docker => {
            // docker prints one JSON object per line.
            let out = engine.run(
                "images",
                ["image", "ls", "--no-trunc", "--format", "{{json .}}"],
            )?;
            let mut v = Vec::new();
            for line in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                let o: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| EngineError::BadOutput {
                        engine: engine.program(),
                        detail: e.to_string(),
                    })?;
                let s = |k: &str| o[k].as_str().unwrap_or_default().to_string();
                v.push(ImageInfo {
                    names: vec![format!("{}:{}", s("Repository"), s("Tag"))],
                    id: s("ID"),
                    size: 0,
                    created: s("CreatedAt"),
                    aibox: None,
                });
            }
            v
        }
    };
    Ok(images
        .into_iter()
        .filter(|i| {
            !only_aibox || i.aibox.is_some() || i.names.iter().any(|n| n.contains("/aibox"))
        })
        .collect())
}

/// The id of image `name`, if the engine has it.
pub fn id(engine: Engine, name: &str) -> Result<Option<String>, EngineError> {
    let out = engine
        .command(["image", "inspect", "--format", "{{.Id}}", name])
        .stdin(Stdio::null())
        .output();
    match out {
        Err(e) => Err(engine.spawn_error(e)),
        Ok(o) if o.status.success() => {
            Ok(Some(String::from_utf8_lossy(&o.stdout).trim().to_string()))
        }
        Ok(_) => Ok(None),
    }
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(program).is_file()
}

/// Builds the base image: a Debian root filesystem made by mmdebstrap (no
/// root needed, it uses a user namespace) with the `dev` user (uid/gid
/// 1000) and the directories aibox mounts over, imported into the engine.
/// `progress` receives one line at a time while it runs.
pub fn build(
    engine: Engine,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ImageInfo, EngineError> {
    if !have("mmdebstrap") {
        return Err(EngineError::Build(
            "mmdebstrap is not installed\n  fix: apt-get install mmdebstrap uidmap".into(),
        ));
    }
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("aibox-image-")
        .tempdir()
        .map_err(|e| EngineError::Build(format!("creating a temporary directory: {e}")))?;
    let tar = dir.path().join("rootfs.tar");
    let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|s| s.to_string()).collect();
    packages.extend(opts.packages.iter().cloned());
    let hook = [
        "chroot \"$1\" groupadd -g 1000 dev",
        "chroot \"$1\" useradd -m -u 1000 -g 1000 -s /bin/bash dev",
        "mkdir -p \"$1/workspace\" \"$1/opt/toolpacks\" \"$1/aibox\"",
        "chown 1000:1000 \"$1/workspace\"",
        "printf 'aibox base image\\n' > \"$1/etc/aibox-image\"",
    ]
    .join(" && ");
    progress(&format!(
        "building {} from Debian {} with mmdebstrap",
        opts.name, opts.suite
    ));
    let mut child = Command::new("mmdebstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", packages.join(",")))
        .arg(format!("--customize-hook={hook}"))
        .arg(&opts.suite)
        .arg(&tar)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| EngineError::Build(format!("running mmdebstrap: {e}")))?;
    let mut tail = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(msg) = line.strip_prefix("I: ") {
                progress(&format!("[{:>3}s] {msg}", t0.elapsed().as_secs()));
            }
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| EngineError::Build(format!("waiting for mmdebstrap: {e}")))?;
    if !status.success() {
        return Err(EngineError::Build(format!(
            "mmdebstrap failed ({status}):\n  {}\n  fix: check that the Debian mirror is reachable and the suite name is right",
            tail.join("\n  ")
        )));
    }
    progress(&format!(
        "[{:>3}s] importing into {}",
        t0.elapsed().as_secs(),
        engine.program()
    ));
    let changes = [
        format!("LABEL {LABEL}=base"),
        format!("LABEL aibox.suite={}", opts.suite),
        "USER 1000:1000".to_string(),
        "WORKDIR /workspace".to_string(),
        "ENV HOME=/home/dev".to_string(),
        "CMD [\"/bin/bash\"]".to_string(),
    ];
    let mut args: Vec<String> = vec!["import".into()];
    for c in &changes {
        args.push("--change".into());
        args.push(c.clone());
    }
    args.push(tar.display().to_string());
    args.push(opts.name.clone());
    engine.run("import", &args)?;
    progress(&format!("[{:>3}s] done", t0.elapsed().as_secs()));
    list(engine, false)?
        .into_iter()
        .find(|i| i.names.iter().any(|n| n == &opts.name))
        .ok_or_else(|| {
            EngineError::Build(format!(
                "{} imported but not listed by {}",
                opts.name,
                engine.program()
            ))
        })
}

/// The value of label `key` on image `name`, if the engine has both.
pub fn label(engine: Engine, name: &str, key: &str) -> Option<String> {
    let format = format!("{{{{index .Labels \"{key}\"}}}}");
    let o = engine
        .command(["image", "inspect", "--format", format.as_str(), name])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
    (o.status.success() && !v.is_empty() && v != "<no value>").then_some(v)
}
