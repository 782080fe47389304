//! `aibox auth`: the host's credential store (add, list, remove).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use aibox_config::PassphraseSource;
use aibox_secrets::file::FileStore;
use aibox_secrets::{Meta, Secret};
use anyhow::{Context, Result, bail};
use zeroize::Zeroizing;

use crate::args::{AuthAddArgs, AuthCmd, Format};

/// Longest value accepted (tokens and keys are far shorter).
const MAX_SECRET: u64 = 64 * 1024;
/// Environment variable holding the passphrase (`credentials.passphrase: env`).
pub const PASSPHRASE_ENV: &str = "AIBOX_PASSPHRASE";

/// Runs an `aibox auth` subcommand.
pub fn run(cli_config: Option<PathBuf>, cmd: AuthCmd) -> Result<i32> {
    let (loaded, sources) = super::load_config(cli_config)?;
    match cmd {
        AuthCmd::Add(a) => add(&loaded, &sources, a),
        AuthCmd::List(f) => list(&loaded, &sources, f.format),
        AuthCmd::Remove { name } => {
            aibox_secrets::validate_name(&name).map_err(anyhow::Error::msg)?;
            let store = open(&loaded, &sources, false)?;
            if !store.remove(&name)? {
                bail!("no credential named `{name}` is stored (see `aibox auth list`)");
            }
            println!("removed `{name}` from {}", store.store_path().display());
            Ok(0)
        }
    }
}

fn add(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    a: AuthAddArgs,
) -> Result<i32> {
    aibox_secrets::validate_name(&a.name).map_err(anyhow::Error::msg)?;
    let builtin = aibox_secrets::BUILTIN.contains(&a.name.as_str());
    if let Some(h) = &a.host {
        aibox_secrets::validate_host(h).map_err(anyhow::Error::msg)?;
    } else if !builtin {
        bail!(
            "`{}` is a credential of your own: bind it to the host it is for with --host HOST (built-in types: {})",
            a.name,
            aibox_secrets::BUILTIN.join(", ")
        );
    }
    let now = std::time::SystemTime::now();
    let expires = a
        .expires_in
        .as_deref()
        .map(|d| {
            humantime::parse_duration(d)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| {
                    format!("--expires-in `{d}` is not a duration: write e.g. 30d, 12h or 90m")
                })
                .and_then(|d| {
                    now.checked_add(d)
                        .context("--expires-in is too far in the future")
                })
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        })
        .transpose()?;
    // Everything about the command is checked before the value is asked
    // for, and the store is opened (passphrase included) before that too.
    let store = open(loaded, sources, true)?;
    // (Read even with --replace: a wrong passphrase or a damaged store
    // shows before the value is typed.)
    let stored = store.list()?;
    if !a.replace && stored.iter().any(|m| m.name == a.name) {
        bail!(
            "a credential named `{}` is stored already; pass --replace to replace it",
            a.name
        );
    }
    let secret = read_secret(&a.name)?;
    let meta = Meta {
        name: a.name.clone(),
        kind: if builtin {
            a.name.clone()
        } else {
            "custom".into()
        },
        host: a.host,
        created: humantime::format_rfc3339_seconds(now).to_string(),
        expires,
        source: "file".into(),
    };
    store.put(meta, secret, a.replace)?;
    println!(
        "stored `{}` in {} (key: {})",
        a.name,
        store.store_path().display(),
        store.key_path().display()
    );
    Ok(0)
}

fn list(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    format: Format,
) -> Result<i32> {
    let store = open(loaded, sources, false)?;
    let items = store.list()?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&items)?),
        Format::Text => {
            if items.is_empty() {
                println!("no credentials stored ({})", store.store_path().display());
                return Ok(0);
            }
            let now = std::time::SystemTime::now();
            println!(
                "{:<20} {:<13} {:<28} {:<7} {:<21} EXPIRES",
                "NAME", "TYPE", "HOST", "SOURCE", "CREATED"
            );
            for m in &items {
                let expires = match &m.expires {
                    Some(e) if m.expired(now) => format!("{e} (expired)"),
                    Some(e) => e.clone(),
                    None => "-".into(),
                };
                println!(
                    "{:<20} {:<13} {:<28} {:<7} {:<21} {expires}",
                    m.name,
                    m.kind,
                    m.host.as_deref().unwrap_or("-"),
                    m.source,
                    m.created
                );
            }
        }
    }
    Ok(0)
}

/// The store: `<data>/credentials/store.enc`, its key at
/// `credentials.key_path` (default: beside the user config file). The
/// two must not share a directory.
fn open(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    creating: bool,
) -> Result<FileStore> {
    let c = &loaded.config.credentials;
    if c.mode == aibox_config::CredentialMode::Vault {
        bail!(
            "credentials.mode is vault: credentials come from Vault ({}), not from the local store; set credentials.mode: fallback to use `aibox auth`",
            c.vault_addr
        );
    }
    let store = loaded.data_dir().join("credentials").join("store.enc");
    let key = if c.key_path.is_empty() {
        sources
            .user_file
            .parent()
            .map(|d| d.join("credentials.key"))
            .context("the user config file has no directory to keep the key in; set credentials.key_path")?
    } else {
        PathBuf::from(&c.key_path)
    };
    // The key must not live with what it encrypts: nowhere under the
    // data directory (compared after resolving `..` and symbolic links
    // of the parts that exist).
    let data = normalise(&loaded.data_dir());
    if normalise(&key).starts_with(&data) {
        bail!(
            "the credential key file {} would be kept in the data directory {} with the store it encrypts; set credentials.key_path to a file outside it",
            key.display(),
            data.display()
        );
    }
    let probe = FileStore::new(store.clone(), key.clone(), None);
    let passphrase = match c.passphrase {
        PassphraseSource::None => None,
        PassphraseSource::Env => {
            let p = std::env::var(PASSPHRASE_ENV).ok().filter(|p| !p.is_empty());
            Some(Secret::new(p.with_context(|| {
                format!("credentials.passphrase is env but {PASSPHRASE_ENV} is not set")
            })?))
        }
        PassphraseSource::Prompt => {
            let new = creating && probe.key_protected()?.is_none();
            Some(prompt_passphrase(new)?)
        }
    };
    Ok(FileStore::new(store, key, passphrase))
}

/// `p` made absolute with `..` and `.` resolved, through the symbolic
/// links of its longest existing prefix.
fn normalise(p: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    // Resolve the longest prefix that exists.
    let mut rest = Vec::new();
    let mut head = out.clone();
    loop {
        if let Ok(real) = std::fs::canonicalize(&head) {
            let mut r = real;
            for part in rest.iter().rev() {
                r.push(part);
            }
            return r;
        }
        match (head.file_name().map(|f| f.to_os_string()), head.parent()) {
            (Some(f), Some(parent)) => {
                rest.push(f);
                head = parent.to_path_buf();
            }
            _ => return out,
        }
    }
}

fn prompt_passphrase(new: bool) -> Result<Secret> {
    let ask = |p: &str| {
        rpassword::prompt_password(p).context(
            "credentials.passphrase is prompt but there is no terminal to ask on; use credentials.passphrase: env with AIBOX_PASSPHRASE",
        )
    };
    let first = Zeroizing::new(ask("passphrase for the aibox credential store: ")?);
    if first.is_empty() {
        bail!("the passphrase is empty");
    }
    if new {
        let again = Zeroizing::new(ask("the same passphrase again: ")?);
        if *again != *first {
            bail!("the passphrases differ; nothing was stored");
        }
    }
    Ok(Secret::new(first.to_string()))
}

/// The value: a hidden prompt on a terminal, else all of standard input
/// (one trailing newline dropped).
fn read_secret(name: &str) -> Result<Secret> {
    // (Sized up front: a growing buffer would leave copies behind.)
    let mut value = Zeroizing::new(String::with_capacity(MAX_SECRET as usize + 2));
    if std::io::stdin().is_terminal() {
        *value = rpassword::prompt_password(format!("value for `{name}` (not shown): "))
            .context("reading the value from the terminal")?;
    } else {
        std::io::stdin()
            .take(MAX_SECRET + 1)
            .read_to_string(&mut value)
            .context("reading the value from standard input")?;
        if value.len() as u64 > MAX_SECRET {
            bail!("the value on standard input is over {MAX_SECRET} bytes; is it the right input?");
        }
        if value.ends_with('\n') {
            value.pop();
            if value.ends_with('\r') {
                value.pop();
            }
        }
    }
    if value.is_empty() {
        bail!("the value is empty; give it on standard input or at the prompt");
    }
    if value.chars().any(char::is_control) {
        bail!("the value contains control characters (a second line?); give exactly one line");
    }
    Ok(Secret::new(std::mem::take(&mut *value)))
}
