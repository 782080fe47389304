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
    /// The same with short timeouts, for revocation.
    revoker: ureq::Agent,
    addr: String,
    ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).finish()
    }
}

const TIMEOUT: Duration = Duration::from_secs(15);
/// Revocation runs while a sandbox stops: it must not hold the stop up.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `s` can go into a Vault path or header as is (tokens, lease
/// ids and accessors Vault hands out look like this).
fn plain_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        && !s.contains("..")
}

/// Checks a mount or path from the config: plain segments only (no
/// `..`, `.`, empty segments, spaces, queries or escapes), so that it
/// names what it says.
pub fn check_path(what: &str, p: &str) -> Result<(), VaultError> {
    let t = p.trim_matches('/');
    let ok = !t.is_empty()
        && t.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
        && !t
            .bytes()
            .any(|b| b <= 0x20 || b >= 0x7f || matches!(b, b'?' | b'#' | b'%' | b'\\'));
    if ok {
        Ok(())
    } else {
        Err(VaultError::Config(format!(
            "{what} {p:?} must be plain path segments (no `..`, `.`, empty segments, spaces, ?, #, %)"
        )))
    }
}

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
        if let Some(rest) = addr.strip_prefix("http://") {
            // Tokens and secrets in clear text only on this machine.
            let host = rest.split('/').next().unwrap_or("");
            let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
            if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
                return Err(VaultError::Config(format!(
                    "credentials.vault_addr {addr:?} is plain http to another machine: tokens and secrets would cross the network in clear text; use https://"
                )));
            }
        } else if !addr.starts_with("https://") {
            return Err(VaultError::Config(format!(
                "credentials.vault_addr {addr:?} must be an https:// URL"
            )));
        }
        let tls = tls(ca_file)?;
        let build = |t: Duration| {
            ureq::AgentBuilder::new()
                .tls_config(tls.clone())
                .timeout(t)
                .resolver(move |n: &str| aibox_core::resolve_within(n, t))
                .redirects(0)
                .build()
        };
        Ok(Client {
            agent: build(TIMEOUT),
            revoker: build(REVOKE_TIMEOUT),
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
        let what = format!("{method} {path}");
        self.call_with(&self.agent, method, path, &what, token, body)
    }

    /// [`Client::call`] with `agent`; `what` names the call in errors
    /// (never the path, which may hold a token).
    fn call_with(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        what: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<Value, VaultError> {
        let url = format!("{}/v1/{path}", self.addr);
        let mut req = agent.request(method, &url);
        if let Some(t) = token {
            req = req.set("X-Vault-Token", t);
        }
        let what = what.to_string();
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) if !(200..300).contains(&r.status()) => Err(VaultError::Refused {
                what,
                status: r.status(),
                detail: "not a success (a redirect?); point vault_addr at the active node".into(),
            }),
            Ok(r) => {
                // (Errors name only their kind: their text names the URL.)
                let text = r.into_string().map_err(|e| VaultError::Unreachable {
                    addr: self.addr.clone(),
                    detail: e.kind().to_string(),
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
                detail: e.kind().to_string(),
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
            .filter(|t| plain_id(t))
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
            if !plain_id(l) {
                return Err(VaultError::Missing {
                    what: format!("the read of {p}"),
                    missing: "a well-formed lease id".into(),
                });
            }
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
    /// and lease made from it). Only a success answer counts: a token the
    /// server will not revoke is reported, never assumed gone.
    pub fn revoke(&self, session: &Session) -> Result<(), VaultError> {
        let t = session.token.as_str();
        if !plain_id(t) {
            return Err(VaultError::Config("the recorded token is malformed".into()));
        }
        let r = &self.revoker;
        let mut first_err = None;
        for l in session.leases.iter().filter(|l| plain_id(l)) {
            let body = Some(json!({"lease_id": l}));
            let done = self
                .call_with(
                    r,
                    "PUT",
                    "sys/leases/revoke",
                    "lease revocation",
                    Some(t),
                    body,
                )
                .or_else(|e| match unsupported(&e) {
                    true => {
                        let path = format!("sys/revoke/{l}");
                        self.call_with(r, "PUT", &path, "lease revocation", Some(t), None)
                    }
                    false => Err(e),
                });
            if let Err(e) = done {
                first_err.get_or_insert(e);
            }
        }
        // Vault's own endpoint. Servers that do not have it (rusty_vault
        // answers "path not supported") take the token in the path; only
        // then, so that a failure never puts it into a URL.
        let done = self
            .call_with(
                r,
                "POST",
                "auth/token/revoke-self",
                "token revocation",
                Some(t),
                None,
            )
            .or_else(|e| match unsupported(&e) {
                true => {
                    let path = format!("auth/token/revoke/{t}");
                    self.call_with(r, "POST", &path, "token revocation", Some(t), None)
                }
                false => Err(e),
            });
        if let Err(e) = done {
            first_err.get_or_insert(e);
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Whether Vault said it has no such endpoint (404, 405, or rusty_vault's
/// "not supported").
fn unsupported(e: &VaultError) -> bool {
    match e {
        VaultError::Refused {
            status: 404 | 405, ..
        } => true,
        VaultError::Refused {
            status: 500,
            detail,
            ..
        } => detail.contains("not supported"),
        _ => false,
    }
}

/// Reads a secret from a file (trailing newline dropped): opened once
/// without following a symbolic link, and refused unless it belongs to
/// this user and nobody else can read it.
pub fn read_secret_file(what: &str, path: &Path) -> Result<Secret, VaultError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let bad = |e: String| VaultError::Config(format!("{what}: {}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    let meta = f.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(bad(format!(
            "belongs to uid {}, not to you; a secret must be your own file",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(VaultError::Config(format!(
            "{what}: {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    let mut text = Zeroizing::new(String::new());
    f.read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    let v = text.trim_end_matches(['\n', '\r']).to_string();
    if v.is_empty() {
        return Err(VaultError::Config(format!(
            "{what}: {} is empty",
            path.display()
        )));
    }
    Ok(Zeroizing::new(v))
}
