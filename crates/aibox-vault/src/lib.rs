//! aibox's Vault client. `aibox start` logs in (token, AppRole, or JWT
//! such as a SPIFFE JWT-SVID), reads the configured KV v2 secrets with a
//! token of its own for that sandbox, and hands the token to the
//! supervisor, which revokes it (and any lease) when the sandbox stops;
//! the CLI revokes it when it finds a crashed supervisor's record.
//!
//! Values stay in [`zeroize::Zeroizing`] strings; the token is sent in
//! the `X-Vault-Token` header only, never in a URL.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use zeroize::Zeroizing;

/// A secret string.
pub type Secret = Zeroizing<String>;

/// Errors talking to Vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
    /// Vault could not be reached.
    #[error("cannot reach Vault at {addr}: {detail}")]
    Unreachable {
        /// The address.
        addr: String,
        /// Why.
        detail: String,
    },
    /// Vault answered with an error.
    #[error("Vault refused {what} ({status}): {detail}")]
    Refused {
        /// What was asked.
        what: String,
        /// HTTP status.
        status: u16,
        /// Vault's `errors`.
        detail: String,
    },
    /// Vault's answer lacks what was asked for.
    #[error("Vault's answer to {what} has no {missing}")]
    Missing {
        /// What was asked.
        what: String,
        /// The missing part.
        missing: String,
    },
}

/// How aibox logs in.
pub enum Login {
    /// A token (from the environment): aibox creates a child token for
    /// the sandbox with it, so revoking the sandbox's leaves it alone.
    Token {
        /// The token.
        token: Secret,
        /// Policies of the child token (empty: the parent's).
        policies: Vec<String>,
    },
    /// AppRole at `auth/<mount>/login`.
    AppRole {
        /// Auth mount (`approle`).
        mount: String,
        /// Role id.
        role_id: String,
        /// Secret id.
        secret_id: Secret,
    },
    /// JWT (e.g. a SPIFFE JWT-SVID) at `auth/<mount>/login`.
    Jwt {
        /// Auth mount (`jwt`).
        mount: String,
        /// Vault role.
        role: String,
        /// The token.
        jwt: Secret,
    },
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.method())
    }
}

impl Login {
    /// `token`, `approle` or `jwt`.
    pub fn method(&self) -> &'static str {
        match self {
            Login::Token { .. } => "token",
            Login::AppRole { .. } => "approle",
            Login::Jwt { .. } => "jwt",
        }
    }
}

/// What a sandbox was given by Vault, to revoke when it ends. Travels
/// to the supervisor over its stdin and is kept (0600) in the runtime
/// directory for crash recovery.
#[derive(Clone, Serialize, Deserialize)]
pub struct Session {
    /// Vault's address.
    pub addr: String,
    /// CA bundle for Vault's certificate, if not the system's.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// The sandbox's token.
    pub token: Secret,
    /// Its accessor (for the record; it cannot read secrets).
    #[serde(default)]
    pub accessor: Option<String>,
    /// How aibox logged in.
    pub method: String,
    /// Leases of the secrets read.
    #[serde(default)]
    pub leases: Vec<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("addr", &self.addr)
            .field("accessor", &self.accessor)
            .field("method", &self.method)
            .field("leases", &self.leases)
            .finish_non_exhaustive()
    }
}

/// A Vault client.
pub struct Client {
    agent: ureq::Agent,
    addr: String,
    ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).finish()
    }
}

const TIMEOUT: Duration = Duration::from_secs(15);

fn tls(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, VaultError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(f) = ca_file {
        let pem = std::fs::read(f).map_err(|e| {
            VaultError::Config(format!("reading Vault's CA file {}: {e}", f.display()))
        })?;
        let mut added = 0;
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let c: rustls::pki_types::CertificateDer<'static> =
                c.map_err(|e| VaultError::Config(format!("Vault's CA file {}: {e}", f.display())))?;
            roots
                .add(c)
                .map_err(|e| VaultError::Config(format!("Vault's CA file {}: {e}", f.display())))?;
            added += 1;
        }
        if added == 0 {
            return Err(VaultError::Config(format!(
                "Vault's CA file {} holds no certificate",
                f.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| VaultError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The `errors` of a Vault error answer, joined.
fn errors(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| {
            v["errors"].as_array().map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        })
        .or_else(|| {
            serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| body.chars().take(200).collect())
}

impl Client {
    /// A client for Vault at `addr` (`http(s)://host:port`), trusting the
    /// system's CAs and `ca_file`.
    pub fn new(addr: &str, ca_file: Option<&Path>) -> Result<Client, VaultError> {
        let addr = addr.trim_end_matches('/').to_string();
        if !(addr.starts_with("https://") || addr.starts_with("http://")) {
            return Err(VaultError::Config(format!(
                "credentials.vault_addr {addr:?} must be an http:// or https:// URL"
            )));
        }
        let agent = ureq::AgentBuilder::new()
            .tls_config(tls(ca_file)?)
            .timeout(TIMEOUT)
            .redirects(0)
            .build();
        Ok(Client {
            agent,
            addr,
            ca_file: ca_file.map(Path::to_path_buf),
        })
    }

    /// Calls `method /v1/<path>` with `token` and `body`; the JSON answer.
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<Value, VaultError> {
        let url = format!("{}/v1/{path}", self.addr);
        let mut req = self.agent.request(method, &url);
        if let Some(t) = token {
            req = req.set("X-Vault-Token", t);
        }
        let what = format!("{method} {path}");
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => {
                let text = r.into_string().map_err(|e| VaultError::Unreachable {
                    addr: self.addr.clone(),
                    detail: e.to_string(),
                })?;
                if text.trim().is_empty() {
                    return Ok(Value::Null);
                }
                serde_json::from_str(&text).map_err(|_| VaultError::Missing {
                    what,
                    missing: "JSON body".into(),
                })
            }
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                Err(VaultError::Refused {
                    what,
                    status,
                    detail: errors(&text),
                })
            }
            Err(e) => Err(VaultError::Unreachable {
                addr: self.addr.clone(),
                detail: e.to_string(),
            }),
        }
    }

    /// Logs in and returns the sandbox's own token (see [`Login`]); with
    /// token login, a child token lasting `ttl`.
    pub fn login(
        &self,
        login: &Login,
        ttl: Duration,
        sandbox: &str,
    ) -> Result<Session, VaultError> {
        let answer = match login {
            Login::Token { token, policies } => {
                let mut body = json!({
                    "ttl": format!("{}s", ttl.as_secs().max(1)),
                    "display_name": format!("aibox-{sandbox}"),
                    "renewable": false,
                    "meta": {"sandbox": sandbox},
                });
                if !policies.is_empty() {
                    body["policies"] = json!(policies);
                }
                self.call(
                    "POST",
                    "auth/token/create",
                    Some(token.as_str()),
                    Some(body),
                )?
            }
            Login::AppRole {
                mount,
                role_id,
                secret_id,
            } => self.call(
                "POST",
                &format!("auth/{mount}/login"),
                None,
                Some(json!({"role_id": role_id, "secret_id": secret_id.as_str()})),
            )?,
            Login::Jwt { mount, role, jwt } => self.call(
                "POST",
                &format!("auth/{mount}/login"),
                None,
                Some(json!({"role": role, "jwt": jwt.as_str()})),
            )?,
        };
        let auth = &answer["auth"];
        let token = auth["client_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| VaultError::Missing {
                what: format!("the {} login", login.method()),
                missing: "auth.client_token".into(),
            })?;
        Ok(Session {
            addr: self.addr.clone(),
            ca_file: self.ca_file.clone(),
            token: Zeroizing::new(token.to_string()),
            accessor: auth["accessor"].as_str().map(str::to_string),
            method: login.method().into(),
            leases: Vec::new(),
        })
    }

    /// Reads `field` of the KV v2 secret `path` in `mount`
    /// (`GET /v1/<mount>/data/<path>`), noting its lease in `session`.
    pub fn read_kv2(
        &self,
        session: &mut Session,
        mount: &str,
        path: &str,
        field: &str,
    ) -> Result<Secret, VaultError> {
        let p = format!(
            "{}/data/{}",
            mount.trim_matches('/'),
            path.trim_matches('/')
        );
        let answer = self.call("GET", &p, Some(session.token.as_str()), None)?;
        if let Some(l) = answer["lease_id"].as_str().filter(|l| !l.is_empty()) {
            session.leases.push(l.to_string());
        }
        let value = answer["data"]["data"][field]
            .as_str()
            .ok_or_else(|| VaultError::Missing {
                what: format!("the read of {p}"),
                missing: format!("string field `{field}` (in data.data)"),
            })?;
        Ok(Zeroizing::new(value.to_string()))
    }

    /// Whether `token` is still valid (`auth/token/lookup-self`).
    pub fn token_valid(&self, token: &str) -> Result<bool, VaultError> {
        match self.call("GET", "auth/token/lookup-self", Some(token), None) {
            Ok(_) => Ok(true),
            Err(VaultError::Refused {
                status: 400 | 403, ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Revokes the session's leases, then its token (with every token
    /// and lease made from it). A token that is already invalid counts
    /// as revoked.
    pub fn revoke(&self, session: &Session) -> Result<(), VaultError> {
        let t = session.token.as_str();
        let mut first_err = None;
        for l in &session.leases {
            let r = self
                .call(
                    "PUT",
                    "sys/leases/revoke",
                    Some(t),
                    Some(json!({"lease_id": l})),
                )
                .or_else(|_| self.call("PUT", &format!("sys/revoke/{l}"), Some(t), None));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        // Vault's own endpoint; servers without it (rusty_vault) take the
        // token in the path instead.
        let r = self
            .call("POST", "auth/token/revoke-self", Some(t), None)
            .or_else(|_| self.call("POST", &format!("auth/token/revoke/{t}"), Some(t), None));
        match r {
            Ok(_) => {}
            Err(e) => {
                if self.token_valid(t).unwrap_or(true) {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Reads a secret from a file (trailing newline dropped); refuses files
/// others can read.
pub fn read_secret_file(what: &str, path: &Path) -> Result<Secret, VaultError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| VaultError::Config(format!("{what}: {}: {e}", path.display())))?;
    if meta.mode() & 0o077 != 0 {
        return Err(VaultError::Config(format!(
            "{what}: {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| VaultError::Config(format!("{what}: {}: {e}", path.display())))?;
    let v = text.trim_end_matches(['\n', '\r']).to_string();
    if v.is_empty() {
        return Err(VaultError::Config(format!(
            "{what}: {} is empty",
            path.display()
        )));
    }
    Ok(Zeroizing::new(v))
}
