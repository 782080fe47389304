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
