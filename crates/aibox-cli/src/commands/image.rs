//! `aibox image build | list`

use std::path::PathBuf;

use aibox_config::Runtime;
use aibox_engine::Engine;
use aibox_engine::image::{self, BuildOptions};
use anyhow::Result;

use crate::args::{EngineArg, Format, ImageCmd};

fn engine(choice: Option<EngineArg>, configured: Runtime) -> Engine {
    match (choice, configured) {
        (Some(EngineArg::Docker), _) | (None, Runtime::Docker) => Engine::Docker,
        _ => Engine::Podman,
    }
}

pub fn run(cli_config: Option<PathBuf>, cmd: ImageCmd) -> Result<i32> {
    let (loaded, _) = super::load_config(cli_config)?;
    match cmd {
        ImageCmd::Build {
            name,
            suite,
            engine: e,
        } => {
            let engine = engine(e, loaded.config.runtime);
            let opts = BuildOptions {
                name: name.unwrap_or_else(|| loaded.config.image.clone()),
                suite,
                packages: Vec::new(),
            };
            let info = image::build(engine, &opts, &mut |line| eprintln!("  {line}"))?;
            println!("{}", opts.name);
            eprintln!(
                "built {} ({}, {} MB)",
                opts.name,
                &info.id[..12.min(info.id.len())],
                info.size >> 20
            );
        }
        ImageCmd::List { engine: e, format } => {
            let engine = engine(e, loaded.config.runtime);
            let mut images = image::list(engine, true)?;
            let configured = &loaded.config.image;
            if !images
                .iter()
                .any(|i| i.names.iter().any(|n| n == configured))
            {
                images.extend(
                    image::list(engine, false)?
                        .into_iter()
                        .filter(|i| i.names.iter().any(|n| n == configured)),
                );
            }
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&images)?),
                Format::Text => {
                    if images.is_empty() {
                        eprintln!(
                            "no aibox images in {}; build one with `aibox image build`",
                            engine.program()
                        );
                    }
                    for i in &images {
                        let mark = if i.names.iter().any(|n| n == configured) {
                            "*"
                        } else {
                            " "
                        };
                        println!(
                            "{mark} {:<40} {:<14} {:>6} MB  {}",
                            i.names.first().map(String::as_str).unwrap_or("<none>"),
                            &i.id[..12.min(i.id.len())],
                            i.size >> 20,
                            i.created
                        );
                    }
                }
            }
        }
    }
    Ok(0)
}

fn short(id: Option<&str>) -> &str {
    id.map(|i| &i[..12.min(i.len())]).unwrap_or("(none)")
}

/// `aibox update`: rebuild a local image, or pull a registry image and,
/// with `registry.verify_signatures`, verify it with cosign.
pub fn update(cli_config: Option<PathBuf>, engine_arg: Option<EngineArg>) -> Result<i32> {
    let (loaded, _) = super::load_config(cli_config)?;
    let engine = engine(engine_arg, loaded.config.runtime);
    let name = loaded.config.image.clone();
    let local = name.starts_with("localhost/");
    let verify = loaded.config.registry.verify_signatures && !local;
    // Refuse before changing anything when verification cannot happen.
    if verify
        && std::process::Command::new("cosign")
            .arg("version")
            .output()
            .is_err()
    {
        anyhow::bail!(
            "registry.verify_signatures is on but cosign is not installed, so {name} cannot be verified\n  fix: install cosign, or set registry.verify_signatures: false"
        );
    }
    let old = image::id(engine, &name)?;
    if local {
        eprintln!("{name} is a local image: rebuilding it");
        let suite = image::label(engine, &name, "aibox.suite").unwrap_or_else(|| "bookworm".into());
        let opts = BuildOptions {
            name: name.clone(),
            suite,
            packages: Vec::new(),
        };
        image::build(engine, &opts, &mut |line| eprintln!("  {line}"))?;
    } else {
        eprintln!("pulling {name}");
        engine.run("pull", ["pull", name.as_str()])?;
        if verify {
            let o = std::process::Command::new("cosign")
                .args(["verify", name.as_str()])
                .output()?;
            if !o.status.success() {
                anyhow::bail!(
                    "the signature of {name} did not verify: {}\n  fix: do not use this image; remove it with `{} rmi {name}` and check the registry",
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .last()
                        .unwrap_or("cosign failed"),
                    engine.program()
                );
            }
            eprintln!("signature verified with cosign");
        }
    }
    let new = image::id(engine, &name)?;
    println!("old: {}", short(old.as_deref()));
    println!("new: {}", short(new.as_deref()));
    match (&old, &new) {
        (Some(o), Some(n)) if o == n => eprintln!("{name} is unchanged"),
        // The old image lost its name; drop it unless a container still uses it.
        (Some(o), Some(_)) if engine.run("rmi", ["rmi", o.as_str()]).is_ok() => {
            eprintln!("removed the old image {}", short(Some(o)));
        }
        _ => {}
    }
    Ok(0)
}

/// `aibox repair cache`
pub fn repair_cache(cli_config: Option<PathBuf>, engine_arg: Option<EngineArg>) -> Result<i32> {
    let (loaded, _) = super::load_config(cli_config)?;
    let engine = engine(engine_arg, loaded.config.runtime);
    let gvisor = loaded.config.gvisor.enabled;
    let removed = aibox_supervisor::container::repair_caches(engine, gvisor)
        .map_err(|e| anyhow::anyhow!("aibox repair cache: {e}"))?;
    eprintln!(
        "removed {} cache volume(s){}; created {} empty ones ({})",
        removed.len(),
        if removed.is_empty() {
            String::new()
        } else {
            format!(" ({})", removed.join(", "))
        },
        aibox_supervisor::container::CACHES.len(),
        engine.program()
    );
    Ok(0)
}
