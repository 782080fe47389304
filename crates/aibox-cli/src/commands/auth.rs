//! `aibox auth`: the host's credential store (add, list, remove).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use aibox_config::PassphraseSource;
use aibox_secrets::file::FileStore;
use aibox_secrets::{Meta, Secret, Store};
use anyhow::{Context, Result, bail};
use zeroize::Zeroizing;

use crate::args::{AuthAddArgs, AuthCmd, Format};

/// Longest value accepted (tokens and keys are far shorter).
const MAX_SECRET: u64 = 64 * 1024;

/// The passphrase typed at this command's prompt: a command that reads
/// the store more than once (a start reads the audit bucket's keys, then
/// the sandbox's credentials) asks only once.
static TYPED: std::sync::Mutex<Option<Zeroizing<String>>> = std::sync::Mutex::new(None);

/// Forgets (and zeroises) the passphrase typed at this command's prompt,
/// once the command has read what it needs from the store (`aibox run`
/// goes on for as long as its session).
pub(crate) fn forget_passphrase() {
    if let Ok(mut t) = TYPED.lock() {
        *t = None;
    }
}

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
            println!("removed `{name}` from {}", store.describe());
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
    let copy = aibox_net::gateway::Secret::new(secret.expose().to_string());
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
    let host = meta.host.clone();
    let until = meta
        .expires
        .as_deref()
        .and_then(|e| humantime::parse_rfc3339(e).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    store.put(meta, secret, a.replace)?;
    println!("stored `{}` in {}", a.name, store.describe());
    if a.name == loaded.config.audit.s3.credential && a.replace {
        println!(
            "running sandboxes archive with the bucket keys they started with; restart them (or run `aibox audit ship` after they stop) to use the new ones"
        );
    }
    if let (true, Some(h)) = (a.replace, host) {
        rotate_running(loaded, &a.name, &h, &copy, until);
    }
    Ok(0)
}

/// Gives running sandboxes that hold a placeholder for `name` its new
/// value (`credential.rotate` in their audit logs).
fn rotate_running(
    loaded: &aibox_config::Loaded,
    name: &str,
    host: &str,
    value: &aibox_net::gateway::Secret,
    until: Option<u64>,
) {
    let (rt, data) = (loaded.runtime_dir(), loaded.data_dir());
    for l in aibox_supervisor::client::list(&rt, &data) {
        if !l.alive {
            continue;
        }
        match aibox_supervisor::client::rotate(
            &l.paths,
            name,
            vec![host.to_string()],
            value.clone(),
            until,
        ) {
            Ok(()) => println!("sandbox {} uses the new value from now on", l.paths.name),
            Err(e) if e.to_string().contains("holds no placeholder") => {}
            Err(e) => eprintln!("aibox: sandbox {} keeps the old value: {e}", l.paths.name),
        }
    }
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
                println!("no credentials stored ({})", store.describe());
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

/// The store's file and its key file: `<data>/credentials/store.enc`,
/// the key at `credentials.key_path` (default: beside the user config
/// file).
pub(crate) fn store_paths(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
) -> Result<(PathBuf, PathBuf)> {
    let c = &loaded.config.credentials;
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
    Ok((store, key))
}

/// The local store `credentials.store` picks: the OS keyring, or the
/// encrypted file (see [`open_file`]). `auto` takes the keyring when a
/// Secret Service answers and no encrypted file exists yet, so that
/// credentials already in a file stay where they are.
fn open(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    creating: bool,
) -> Result<Store> {
    use aibox_config::StoreBackend;
    let c = &loaded.config.credentials;
    if c.mode == aibox_config::CredentialMode::Vault {
        bail!(
            "credentials.mode is vault: credentials come from Vault ({}), not from the local store; set credentials.mode: fallback to use `aibox auth`",
            c.vault_addr
        );
    }
    let keyring = || aibox_secrets::keyring::KeyringStore::connect().map(Store::Keyring);
    match c.store {
        StoreBackend::File => Ok(Store::File(open_file(loaded, sources, creating)?)),
        StoreBackend::Keyring => Ok(keyring().context(
            "credentials.store is keyring\n  fix: start a Secret Service (e.g. gnome-keyring-daemon) in this session, or set credentials.store: file",
        )?),
        StoreBackend::Auto => {
            let (file, _) = store_paths(loaded, sources)?;
            if std::fs::symlink_metadata(&file).is_err()
                && let Ok(k) = keyring()
            {
                return Ok(k);
            }
            Ok(Store::File(open_file(loaded, sources, creating)?))
        }
    }
}

/// The local store if it holds anything (no passphrase is asked for an
/// encrypted file that does not exist).
fn open_existing(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
) -> Result<Option<Store>> {
    use aibox_config::StoreBackend;
    let (file, _) = store_paths(loaded, sources)?;
    let file_exists = std::fs::symlink_metadata(&file).is_ok();
    match loaded.config.credentials.store {
        StoreBackend::File if !file_exists => Ok(None),
        StoreBackend::Auto if !file_exists => Ok(aibox_secrets::keyring::KeyringStore::connect()
            .ok()
            .map(Store::Keyring)),
        _ => open(loaded, sources, false).map(Some),
    }
}

/// The encrypted-file store (see [`store_paths`]). The two files must not
/// share a directory.
fn open_file(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    creating: bool,
) -> Result<FileStore> {
    let c = &loaded.config.credentials;
    let (store, key) = store_paths(loaded, sources)?;
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
            let typed = TYPED
                .lock()
                .ok()
                .and_then(|t| t.as_ref().map(|p| Secret::new(p.to_string())));
            if typed.is_some() {
                typed
            } else {
                let new = creating && probe.key_protected()?.is_none();
                let p = prompt_passphrase(new)?;
                if let Ok(mut t) = TYPED.lock() {
                    *t = Some(Zeroizing::new(p.expose().to_string()));
                }
                Some(p)
            }
        }
    };
    Ok(FileStore::new(store, key, passphrase))
}

/// The stored git token bound to `host:port` (for a push approved from
/// the host), if there is one that has not expired.
pub(crate) fn git_token_for(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    host: &str,
    port: u16,
) -> Result<Option<zeroize::Zeroizing<String>>> {
    if loaded.config.credentials.mode == aibox_config::CredentialMode::Vault {
        return super::vault::git_token_for(loaded, host, port);
    }
    let Some(store) = open_existing(loaded, sources).context("reading the credential store")?
    else {
        return Ok(None);
    };
    let now = std::time::SystemTime::now();
    let want = aibox_net::parse_host(host).ok();
    for (meta, secret) in store.entries().context("reading the credential store")? {
        let Some(bound) = &meta.host else { continue };
        let (h, p) = aibox_net::host::split_authority(bound).unwrap_or((bound.as_str(), 443));
        if meta.kind == "git-token"
            && !meta.expired(now)
            && p == port
            && aibox_net::parse_host(h).ok() == want
        {
            return Ok(Some(zeroize::Zeroizing::new(secret.expose().to_string())));
        }
    }
    Ok(None)
}

/// The variables a credential of type `kind` named `name` appears in.
fn variables(name: &str, kind: &str) -> Vec<String> {
    match kind {
        "git-token" => vec!["AIBOX_GIT_TOKEN".into()],
        "llm-api-key" => vec![
            "AIBOX_LLM_API_KEY".into(),
            "ANTHROPIC_API_KEY".into(),
            "OPENAI_API_KEY".into(),
        ],
        "mirror-token" => vec!["AIBOX_MIRROR_TOKEN".into()],
        _ => vec![format!(
            "AIBOX_CRED_{}",
            name.to_ascii_uppercase().replace('-', "_")
        )],
    }
}

/// The credentials a sandbox gets: every stored one that is bound to a
/// host (as a placeholder the proxy replaces for that host) or that the
/// policy exposes (as its value), with lifetimes from the policy. None
/// when nothing is stored (no passphrase is asked then). `taken`: the
/// variables the LLM gateway already fills, and hosts it terminates.
pub(crate) fn for_sandbox(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    policy: &aibox_policy::PolicyFile,
    taken_env: &[String],
    gateway_hosts: &[String],
    sandbox: &str,
) -> Result<ForSandbox> {
    let c = &loaded.config.credentials;
    if c.mode == aibox_config::CredentialMode::Vault {
        // Vault mode: a token of the sandbox's own reads the configured
        // secrets; it is revoked if anything below fails.
        let (client, mut session) = super::vault::login(loaded, sandbox, None)?;
        super::vault::arm(&session);
        let r = super::vault::entries(loaded, &client, &mut session)
            .and_then(|entries| hand_out(loaded, policy, taken_env, gateway_hosts, entries));
        return match r {
            Ok((spec, issued)) => Ok((spec, issued, Some(session))),
            Err(e) => {
                super::vault::disarm();
                super::vault::revoke(&session);
                Err(e)
            }
        };
    }
    let Some(store) =
        open_existing(loaded, sources).context("reading the credential store for the sandbox")?
    else {
        return Ok((None, Vec::new(), None));
    };
    let entries = store
        .entries()
        .context("reading the credential store for the sandbox")?;
    let (spec, issued) = hand_out(loaded, policy, taken_env, gateway_hosts, entries)?;
    Ok((spec, issued, None))
}

/// The audit bucket's keys from the credential store, when
/// `audit.s3.credential` names them (else `None`: the environment's). The
/// credential must be bound to the bucket's endpoint host, unexpired, and
/// hold `ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]`.
pub(crate) fn archive_keys(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    c: &aibox_siem::archive::S3Config,
) -> Result<Option<aibox_siem::archive::S3Keys>> {
    let name = &c.credential;
    if name.is_empty() {
        return Ok(None);
    }
    let add = format!(
        "aibox auth add {name} --host {}",
        aibox_siem::archive::Archive::endpoint_host(c).unwrap_or_else(|| "<endpoint host>".into())
    );
    if loaded.config.credentials.mode == aibox_config::CredentialMode::Vault {
        bail!(
            "audit.s3.credential `{name}` is read from the local credential store, but credentials.mode is vault\n  fix: remove audit.s3.credential and give the keys in audit.s3.access_key_env / secret_key_env"
        );
    }
    let Some(store) = open_existing(loaded, sources)
        .with_context(|| format!("audit.s3.credential `{name}`: reading the credential store"))?
    else {
        bail!(
            "audit.s3.credential `{name}` is not stored (no credential store holds anything yet)\n  fix: {add}"
        );
    };
    let entries = store
        .entries()
        .with_context(|| format!("audit.s3.credential `{name}`: reading the credential store"))?;
    let Some((meta, secret)) = entries.into_iter().find(|(m, _)| &m.name == name) else {
        bail!(
            "audit.s3.credential `{name}` is not in the credential store ({})\n  fix: {add}",
            store.describe()
        );
    };
    if meta.expired(std::time::SystemTime::now()) {
        bail!(
            "audit.s3.credential `{name}` expired at {}\n  fix: {add} --replace",
            meta.expires.as_deref().unwrap_or("?")
        );
    }
    let want = aibox_siem::archive::Archive::endpoint_host(c);
    if !aibox_siem::archive::Archive::bound_to(c, meta.host.as_deref()) {
        bail!(
            "audit.s3.credential `{name}` is bound to {}, not to the bucket's endpoint {}: keys go only to the host they were stored for\n  fix: {add} --replace",
            meta.host.as_deref().unwrap_or("no host"),
            want.as_deref().unwrap_or("?")
        );
    }
    aibox_siem::archive::S3Keys::parse(secret.expose())
        .map(Some)
        .map_err(|e| anyhow::anyhow!("audit.s3.credential `{name}`: {e}\n  fix: {add} --replace"))
}

/// What a sandbox gets: the injector's credentials, how each appears
/// inside, and the Vault session to revoke at stop.
type ForSandbox = (
    Option<aibox_net::inject::InjectSpec>,
    Vec<aibox_supervisor::proto::IssuedCredential>,
    Option<aibox_vault::Session>,
);

/// Turns credentials (from the store or Vault) into placeholders and
/// exposed values, as [`for_sandbox`] describes.
fn hand_out(
    loaded: &aibox_config::Loaded,
    policy: &aibox_policy::PolicyFile,
    taken_env: &[String],
    gateway_hosts: &[String],
    entries: Vec<(aibox_secrets::Meta, Secret)>,
) -> Result<(
    Option<aibox_net::inject::InjectSpec>,
    Vec<aibox_supervisor::proto::IssuedCredential>,
)> {
    use aibox_net::gateway::Secret as Held;
    use aibox_net::inject::{CredentialSpec, InjectSpec};
    let c = &loaded.config.credentials;
    let upstream_ca_pem = if c.upstream_ca.is_empty() {
        None
    } else {
        Some(
            std::fs::read_to_string(&c.upstream_ca)
                .with_context(|| format!("credentials.upstream_ca: reading {}", c.upstream_ca))?,
        )
    };
    let cp = policy.credentials.clone().unwrap_or_default();
    let exposed_names = cp.expose.clone().unwrap_or_default();
    let now = std::time::SystemTime::now();
    let mut spec = InjectSpec {
        credentials: Vec::new(),
        upstream_ca_pem,
    };
    let mut issued = Vec::new();
    // The audit bucket's keys stay on the host: a sandbox must never be
    // able to write (or probe) the archive that records it. (Whatever
    // `audit.storage` says: the name is reserved as soon as it is set.)
    let archive_credential =
        Some(loaded.config.audit.s3.credential.clone()).filter(|n| !n.is_empty());
    for (meta, secret) in entries {
        if archive_credential.as_deref() == Some(meta.name.as_str()) {
            continue;
        }
        if meta.expired(now) {
            eprintln!(
                "aibox: credential `{}` expired at {}; not handed to the sandbox (aibox auth add {} --replace)",
                meta.name,
                meta.expires.as_deref().unwrap_or("?"),
                meta.name
            );
            continue;
        }
        let exposed = exposed_names.contains(&meta.name);
        let host = match (&meta.host, exposed) {
            (Some(h), _) => h.clone(),
            (None, true) => String::new(),
            (None, false) => {
                eprintln!(
                    "aibox: credential `{}` is bound to no host, so no sandbox gets it (aibox auth add {} --host HOST --replace)",
                    meta.name, meta.name
                );
                continue;
            }
        };
        let (h, p) = aibox_net::host::split_authority(&host).unwrap_or((host.as_str(), 443));
        let h = aibox_net::parse_host(h).ok();
        if !exposed
            && p == 443
            && gateway_hosts
                .iter()
                .any(|g| aibox_net::parse_host(g).ok() == h)
        {
            bail!(
                "credential `{}` is bound to {host}, which the LLM gateway serves\n  fix: give the key to the gateway (network.llm_gateway providers' api_key_env/api_key_file), or bind the credential elsewhere",
                meta.name
            );
        }
        let ttl = match meta.kind.as_str() {
            "git-token" => cp.git_token_ttl.as_deref(),
            "llm-api-key" => cp.llm_api_key_ttl.as_deref(),
            "mirror-token" => cp.mirror_token_ttl.as_deref(),
            _ => None,
        }
        .and_then(aibox_policy::load::parse_ttl)
        .and_then(|d| now.checked_add(d));
        let stored = meta
            .expires
            .as_deref()
            .and_then(|e| humantime::parse_rfc3339(e).ok());
        let until = match (ttl, stored) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // One unusable value must not stop every sandbox from starting.
        if !exposed && header_safe(secret.expose()).is_err() {
            eprintln!(
                "aibox: credential `{}` has characters an HTTP header cannot carry, so no sandbox gets it",
                meta.name
            );
            continue;
        }
        let env: Vec<String> = variables(&meta.name, &meta.kind)
            .into_iter()
            .filter(|v| !taken_env.contains(v))
            .collect();
        let value = if exposed {
            secret.expose().to_string()
        } else {
            aibox_secrets::placeholder(&meta.name).map_err(anyhow::Error::msg)?
        };
        if !exposed {
            spec.credentials.push(CredentialSpec {
                name: meta.name.clone(),
                kind: meta.kind.clone(),
                hosts: vec![host.clone()],
                placeholder: value.clone(),
                secret: Held::new(secret.expose().to_string()),
                expires_at_ms: until.map(|t| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                }),
            });
        }
        issued.push(aibox_supervisor::proto::IssuedCredential {
            name: meta.name.clone(),
            kind: meta.kind.clone(),
            hosts: if exposed { Vec::new() } else { vec![host] },
            env,
            value: Held::new(value),
            exposed,
            expires: until.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        });
    }
    let spec = (!spec.credentials.is_empty()).then_some(spec);
    Ok((spec, issued))
}

/// Whether `v` can be sent as an HTTP header value (visible ASCII,
/// spaces and tabs).
fn header_safe(v: &str) -> Result<(), ()> {
    if !v.is_empty() && v.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        Ok(())
    } else {
        Err(())
    }
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
