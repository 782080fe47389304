//! Vault mode (`credentials.mode: vault`): logging in and reading the
//! configured secrets for a sandbox, and the crash-recovery record.

use std::path::Path;

use aibox_vault::{Client, Login, Session};
use anyhow::{Context, Result, bail};

/// A sandbox's Vault session from login until the supervisor holds it:
/// revoked by the CLI on any way out before that (see [`arm`]).
static PENDING: std::sync::Mutex<Option<Session>> = std::sync::Mutex::new(None);

/// Keeps `s` to revoke if this command ends before the supervisor has it.
pub(crate) fn arm(s: &Session) {
    if let Ok(mut p) = PENDING.lock() {
        *p = Some(s.clone());
    }
}

/// The supervisor start (which revokes on its own failures) has it now.
pub(crate) fn disarm() {
    if let Ok(mut p) = PENDING.lock() {
        *p = None;
    }
}

/// Revokes a session still armed (the command failed on the way).
pub(crate) fn revoke_pending() {
    let s = PENDING.lock().ok().and_then(|mut p| p.take());
    if let Some(s) = s {
        revoke(&s);
    }
}

/// Checks the configured secrets before anything is asked of Vault.
fn check_secrets(loaded: &aibox_config::Loaded) -> Result<()> {
    let mut seen = Vec::new();
    for s in &loaded.config.credentials.vault.secrets {
        let at = format!("credentials.vault.secrets `{}`", s.name);
        aibox_secrets::validate_name(&s.name).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        aibox_secrets::validate_host(&s.host).map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        aibox_vault::check_path(&format!("{at}: mount"), &s.mount)?;
        aibox_vault::check_path(&format!("{at}: path"), &s.path)?;
        if s.field.is_empty() || s.field.bytes().any(|b| b < 0x20 || b == 0x7f) {
            bail!("{at}: field {:?} is not a field name", s.field);
        }
        if seen.contains(&s.name) {
            bail!("{at} is listed twice");
        }
        seen.push(s.name.clone());
    }
    Ok(())
}

/// Logs in to Vault as the config says; with token login, the child
/// token lasts `ttl` (default: `credentials.vault.token_ttl`).
pub(crate) fn login(
    loaded: &aibox_config::Loaded,
    sandbox: &str,
    ttl: Option<std::time::Duration>,
) -> Result<(Client, Session)> {
    use aibox_config::VaultAuth;
    let c = &loaded.config.credentials;
    let v = &c.vault;
    check_secrets(loaded)?;
    if !v.mount.is_empty() {
        aibox_vault::check_path("credentials.vault.mount", &v.mount)?;
    }
    let ca = (!v.ca_file.is_empty()).then(|| Path::new(&v.ca_file));
    let client = Client::new(&c.vault_addr, ca)?;
    let mount = |default: &str| {
        if v.mount.is_empty() {
            default.to_string()
        } else {
            v.mount.trim_matches('/').to_string()
        }
    };
    let how = match v.auth {
        VaultAuth::Token => {
            let t = std::env::var(&v.token_env)
                .ok()
                .filter(|t| !t.is_empty())
                .with_context(|| {
                    format!(
                        "credentials.vault.auth is token but {} is not set\n  fix: export {}=<a Vault token>, or log in with approle or jwt",
                        v.token_env, v.token_env
                    )
                })?;
            Login::Token {
                token: zeroize::Zeroizing::new(t),
                policies: v.token_policies.clone(),
            }
        }
        VaultAuth::Approle => {
            if v.role_id.is_empty() || v.secret_id_file.is_empty() {
                bail!(
                    "credentials.vault.auth is approle but role_id or secret_id_file is not set\n  fix: set credentials.vault.role_id and credentials.vault.secret_id_file (a 0600 file holding the secret id)"
                );
            }
            Login::AppRole {
                mount: mount("approle"),
                role_id: v.role_id.clone(),
                secret_id: aibox_vault::read_secret_file(
                    "credentials.vault.secret_id_file",
                    Path::new(&v.secret_id_file),
                )?,
            }
        }
        VaultAuth::Jwt => {
            if v.role.is_empty() {
                bail!("credentials.vault.auth is jwt but credentials.vault.role is not set");
            }
            if v.jwt_file.is_empty() {
                if !c.spiffe_socket_path.is_empty() {
                    bail!(
                        "reading a JWT-SVID from the SPIFFE workload API ({}) is not supported yet\n  fix: have spiffe-helper write the JWT-SVID to a file and set credentials.vault.jwt_file",
                        c.spiffe_socket_path
                    );
                }
                bail!(
                    "credentials.vault.auth is jwt but credentials.vault.jwt_file is not set\n  fix: point it at the file holding the JWT (e.g. a SPIFFE JWT-SVID)"
                );
            }
            Login::Jwt {
                mount: mount("jwt"),
                role: v.role.clone(),
                jwt: aibox_vault::read_secret_file(
                    "credentials.vault.jwt_file",
                    Path::new(&v.jwt_file),
                )?,
            }
        }
    };
    let ttl = ttl.unwrap_or_else(|| {
        humantime::parse_duration(&v.token_ttl).unwrap_or(std::time::Duration::from_secs(8 * 3600))
    });
    let session = client
        .login(&how, ttl, sandbox)
        .with_context(|| format!("logging in to Vault at {} ({})", c.vault_addr, how.method()))?;
    Ok((client, session))
}

/// The configured secrets, read with `session`'s token, as store entries.
pub(crate) fn entries(
    loaded: &aibox_config::Loaded,
    client: &Client,
    session: &mut Session,
) -> Result<Vec<(aibox_secrets::Meta, aibox_secrets::Secret)>> {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut out = Vec::new();
    for s in &loaded.config.credentials.vault.secrets {
        let value = client
            .read_kv2(session, &s.mount, &s.path, &s.field)
            .with_context(|| format!("credentials.vault.secrets `{}`", s.name))?;
        let kind = match s.name.as_str() {
            "git-token" | "llm-api-key" | "mirror-token" => s.name.clone(),
            _ => "custom".into(),
        };
        out.push((
            aibox_secrets::Meta {
                name: s.name.clone(),
                kind,
                host: Some(s.host.clone()),
                created: now.clone(),
                expires: None,
                source: "vault".into(),
            },
            aibox_secrets::Secret::new(value.to_string()),
        ));
    }
    Ok(out)
}

/// Revokes `session`, saying so on stderr when Vault would not.
pub(crate) fn revoke(session: &Session) {
    let r = Client::new(&session.addr, session.ca_file.as_deref()).and_then(|c| c.revoke(session));
    if let Err(e) = r {
        eprintln!(
            "aibox: warning: the Vault token given to the sandbox could not be revoked: {e} (it expires at the end of its TTL)"
        );
    }
}

/// The git token for `host:port` from Vault (for a push approved from
/// the host); the token used to read it is revoked at once.
pub(crate) fn git_token_for(
    loaded: &aibox_config::Loaded,
    host: &str,
    port: u16,
) -> Result<Option<zeroize::Zeroizing<String>>> {
    let (client, mut session) = login(
        loaded,
        "aibox-push-approval",
        Some(std::time::Duration::from_secs(300)),
    )?;
    let found = entries(loaded, &client, &mut session).map(|es| {
        es.into_iter().find_map(|(m, s)| {
            let bound = m.host.as_deref().unwrap_or("");
            let (h, p) = aibox_net::host::split_authority(bound).unwrap_or((bound, 443));
            let want = aibox_net::parse_host(host).ok();
            (m.kind == "git-token"
                && p == port
                && want.is_some()
                && aibox_net::parse_host(h).ok() == want)
                .then(|| zeroize::Zeroizing::new(s.expose().to_string()))
        })
    });
    revoke(&session);
    found
}
