//! `aibox config …`

use std::path::PathBuf;

use anyhow::Result;

use crate::args::{ConfigCmd, Format};

pub fn run(cli_config: Option<PathBuf>, cmd: ConfigCmd) -> Result<i32> {
    let sources = aibox_config::Sources::standard(cli_config);
    match cmd {
        ConfigCmd::Get { key } => {
            let loaded = aibox_config::load(&sources)?;
            println!("{}", aibox_config::get(&loaded, &key)?);
        }
        ConfigCmd::Set { key, value } => {
            aibox_config::set(&sources, &key, &value)?;
            eprintln!("set {key} in {}", sources.user_file.display());
        }
        ConfigCmd::Validate => {
            let loaded = aibox_config::load(&sources)?;
            let files: Vec<String> = loaded
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            if files.is_empty() {
                println!("config OK (no files; built-in defaults and environment)");
            } else {
                println!("config OK ({})", files.join(", "));
            }
        }
        ConfigCmd::Init { template, force } => {
            let path = aibox_config::init(&sources, &template, force)?;
            println!("wrote {} (template {template})", path.display());
        }
        ConfigCmd::Show { format } => {
            let loaded = aibox_config::load(&sources)?;
            match format {
                Format::Json => {
                    let map: serde_json::Map<String, serde_json::Value> = loaded
                        .values
                        .iter()
                        .map(|(k, v)| {
                            let origin = loaded
                                .origins
                                .get(k)
                                .map(ToString::to_string)
                                .unwrap_or_default();
                            (k.clone(), serde_json::json!({"value": v, "source": origin}))
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&map)?);
                }
                Format::Text => {
                    let width = loaded.values.keys().map(String::len).max().unwrap_or(0);
                    for (k, v) in &loaded.values {
                        let origin = loaded
                            .origins
                            .get(k)
                            .map(ToString::to_string)
                            .unwrap_or_default();
                        println!(
                            "{k:width$}  {:<30}  ({origin})",
                            aibox_config::format_value(v)
                        );
                    }
                }
            }
        }
    }
    Ok(0)
}
