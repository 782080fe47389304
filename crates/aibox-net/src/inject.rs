//! Secretless credential injection: the sandbox holds a per-sandbox
//! placeholder (`aibox-cred-<name>-<32 hex>`) where a tool expects a
//! token, and the proxy puts the real value in its place only
//!
//! - in a request header (plain, or inside `Authorization: Basic`),
//! - of a request over TLS to a host the credential is bound to, which
//!   the proxy terminates with a CA only this sandbox trusts (name
//!   constraints limit it to the bound hosts),
//! - after that connection passed the network policy,
//! - while the credential is neither expired nor revoked.
//!
//! A placeholder anywhere else the proxy can read (a URL, a body, a
//! header to another host, plain HTTP) refuses the request and is
//! reported as misuse. Responses from bound hosts have the real value
//! (raw or base64) masked, so an endpoint that echoes headers cannot hand
//! it back. Connections to other hosts stay end-to-end TLS: the proxy
//! cannot read them, and never substitutes anything in them.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::gateway::Secret;
use crate::host::{Host, parse_host, split_authority};
use crate::proxy::{Body, NetEvent, Proxy, Target, Via, strip_hop_headers, text};

/// What every placeholder starts with: any header, URL or body the proxy
/// reads that contains it is checked.
pub const MARKER: &str = "aibox-cred-";
/// Bodies up to this size are read whole and checked before anything is
/// sent; longer ones are checked as they stream, and cut off.
const SCAN_WHOLE: u64 = 1024 * 1024;
/// The headers a placeholder is replaced in: the ones services read
/// credentials from. Elsewhere (a `User-Agent`, a `Cookie`, a custom
/// header a service might store and show) it is refused: a header a
/// service keeps would hand the value to whoever can read it there.
pub const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "private-token",
    "job-token",
    "deploy-token",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-access-token",
    "x-goog-api-key",
];
/// How long a TLS handshake from the sandbox may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading a checked-whole body may take.
const BODY_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors building the injector.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A credential is not usable as given.
    #[error("credential `{0}`: {1}")]
    Credential(String, String),
    /// The extra upstream CA is not usable.
    #[error("credentials.upstream_ca: {0}")]
    UpstreamCa(String),
    /// Certificate generation failed.
    #[error("creating the sandbox's credential CA: {0}")]
    Ca(String),
}

/// One credential handed to a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialSpec {
    /// Its name in the store.
    pub name: String,
    /// `git-token`, `llm-api-key`, `mirror-token` or `custom`.
    pub kind: String,
    /// Where the real value may go: `host` (port 443) or `host:port`.
    pub hosts: Vec<String>,
    /// What the sandbox holds instead (see [`MARKER`]).
    pub placeholder: String,
    /// The real value (travels over the supervisor's stdin only).
    pub secret: Secret,
    /// When it stops being substituted (Unix milliseconds), if ever.
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
}

/// Everything the injector of one sandbox needs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InjectSpec {
    /// The credentials.
    pub credentials: Vec<CredentialSpec>,
    /// Extra CA certificates (PEM) trusted for the bound hosts, besides the
    /// host's system roots.
    #[serde(default)]
    pub upstream_ca_pem: Option<String>,
}

struct Cred {
    spec: CredentialSpec,
    bound: Vec<(Host, u16)>,
}

/// Finds the real values of the credentials bound to one host in its
/// responses, in the forms an echo could take (see [`forms`]).
struct Masker {
    matcher: aho_corasick::AhoCorasick,
    /// Every proper prefix of every form: how much of a frame's end must
    /// wait for the next frame (only what could start a form).
    prefixes: std::collections::HashSet<Vec<u8>>,
    longest: usize,
}

impl Masker {
    fn new(secrets: &[&[u8]]) -> Result<Masker, String> {
        let mut all: Vec<Vec<u8>> = secrets.iter().flat_map(|s| forms(s)).collect();
        all.sort();
        all.dedup();
        let matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::Standard)
            .build(&all)
            .map_err(|e| e.to_string())?;
        let prefixes = all
            .iter()
            .flat_map(|f| (1..f.len()).map(move |n| f[..n].to_vec()))
            .collect();
        let longest = all.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Masker {
            matcher,
            prefixes,
            longest,
        })
    }

    /// Overwrites every form found in `b` with `*`s (the length stays, so
    /// a `content-length` stays true). Returns how many.
    fn mask(&self, b: &mut [u8]) -> usize {
        let spans: Vec<(usize, usize)> = self
            .matcher
            .find_overlapping_iter(&*b)
            .map(|m| (m.start(), m.end()))
            .collect();
        for &(a, z) in &spans {
            b[a..z].fill(b'*');
        }
        spans.len()
    }

    /// How many bytes at the end of `b` could be the start of a form.
    fn held(&self, b: &[u8]) -> usize {
        let most = self.longest.saturating_sub(1).min(b.len());
        (1..=most)
            .rev()
            .find(|&k| self.prefixes.contains(&b[b.len() - k..]))
            .unwrap_or(0)
    }
}

/// The running injector of one sandbox.
pub struct Injector {
    creds: Vec<Cred>,
    /// The value each credential has now (it may be rotated), and every
    /// value it has had (all are masked: an old one may still work).
    values: Vec<RwLock<(Secret, Option<u64>)>>,
    history: Mutex<Vec<Vec<Secret>>>,
    /// One masker per bound host and port.
    maskers: RwLock<Maskers>,
    client: Arc<rustls::ClientConfig>,
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
    revoked: AtomicBool,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector").finish_non_exhaustive()
    }
}

/// Where a placeholder was found where it must not be, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Misuse {
    /// The credential it belongs to (`None`: no credential of this sandbox).
    pub(crate) cred: Option<usize>,
    /// `header`, `url` or `body`.
    pub(crate) place: &'static str,
    pub(crate) reason: String,
}

/// Where a request goes.
#[derive(Clone, Copy)]
pub(crate) enum Dest<'a> {
    /// Over TLS the proxy terminates, to this host and port.
    Tls(&'a Host, u16),
    /// Plain HTTP (never substituted into).
    Plain,
}

/// `host` or `host:port` (port 443 when absent).
/// The masker of each bound host and port.
type Maskers = Vec<((Host, u16), Arc<Masker>)>;

/// Why `v` cannot be a credential's value, if it cannot.
fn check_value(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || HeaderValue::from_str(v).is_err() {
        return Err("the value is empty or has characters a header cannot carry");
    }
    if v.contains(MARKER) {
        return Err("the value looks like a placeholder");
    }
    Ok(())
}

/// One masker per bound host and port, over every value (`history`) of
/// every credential bound there.
fn maskers_for(creds: &[Cred], history: &[Vec<Secret>]) -> Result<Maskers, String> {
    let mut maskers: Maskers = Vec::new();
    for c in creds {
        for b in &c.bound {
            if maskers.iter().any(|(k, _)| k == b) {
                continue;
            }
            let secrets: Vec<&[u8]> = creds
                .iter()
                .zip(history)
                .filter(|(o, _)| o.bound.contains(b))
                .flat_map(|(_, h)| h.iter().map(|s| s.expose().as_bytes()))
                .collect();
            maskers.push((b.clone(), Arc::new(Masker::new(&secrets)?)));
        }
    }
    Ok(maskers)
}

fn parse_binding(s: &str) -> Option<(Host, u16)> {
    let (h, p) = split_authority(s).unwrap_or((s, 443));
    match parse_host(h).ok()? {
        h @ Host::Name(_) if p > 0 => Some((h, p)),
        _ => None,
    }
}

/// Shortest piece of a value that is masked on its own: an echo cut
/// short (or read piece by piece from different offsets) still shows
/// nothing of 12 or more characters in a row.
const PIECE: usize = 12;

/// The forms in which the real value could come back: every run of
/// [`PIECE`] characters of it (all of it when shorter), and, whole, its
/// base64 and base64url at each of the three alignments (as inside
/// `Basic` headers, without the characters that depend on neighbouring
/// bytes), percent-encoded, hex and JSON-escaped.
fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = if secret.len() <= PIECE {
        vec![secret.to_vec()]
    } else {
        secret.windows(PIECE).map(<[u8]>::to_vec).collect()
    };
    if secret.len() >= 8 {
        for engine in [
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            for k in 0..3usize {
                let mut input = vec![0u8; k];
                input.extend_from_slice(secret);
                let enc = engine.encode(&input);
                let start = (k * 8).div_ceil(6);
                let end = (input.len() * 8) / 6;
                if let Some(part) = enc.as_bytes().get(start..end) {
                    out.push(part.to_vec());
                }
            }
        }
    }
    let mut pct_upper = Vec::new();
    let mut pct_lower = Vec::new();
    let mut json = Vec::new();
    for &b in secret {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            pct_upper.push(b);
            pct_lower.push(b);
        } else {
            pct_upper.extend_from_slice(format!("%{b:02X}").as_bytes());
            pct_lower.extend_from_slice(format!("%{b:02x}").as_bytes());
        }
        match b {
            b'/' | b'"' | b'\\' => json.extend_from_slice(&[b'\\', b]),
            _ => json.push(b),
        }
    }
    out.extend([pct_upper, pct_lower, json]);
    out.push(hex::encode(secret).into_bytes());
    out.push(hex::encode_upper(secret).into_bytes());
    out.retain(|f| !f.is_empty());
    out.sort();
    out.dedup();
    out
}

/// The decoded bytes of a `Basic` credential in `raw`, if it is one.
fn base64_inside(raw: &[u8]) -> Option<Vec<u8>> {
    let rest = raw
        .get(..6)?
        .eq_ignore_ascii_case(b"basic ")
        .then(|| &raw[6..])?;
    base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where `needle` starts in `hay`, from `from` on.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

impl Injector {
    /// Checks `spec` and creates the CA for the bound hosts.
    pub fn new(spec: InjectSpec) -> Result<Injector, InjectError> {
        let mut creds: Vec<Cred> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        for c in spec.credentials {
            let err = |m: &str| InjectError::Credential(c.name.clone(), m.to_string());
            let ph = &c.placeholder;
            if !ph.starts_with(MARKER)
                || ph.len() < MARKER.len() + 32
                || !ph
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(err("malformed placeholder"));
            }
            if creds.iter().any(|o| {
                o.spec.name == c.name
                    || o.spec.placeholder.contains(ph.as_str())
                    || ph.contains(o.spec.placeholder.as_str())
            }) {
                return Err(err("listed twice"));
            }
            check_value(c.secret.expose()).map_err(err)?;
            let mut bound = Vec::new();
            for h in &c.hosts {
                let b = parse_binding(h).ok_or_else(|| {
                    err(&format!("`{h}` is not a host name with an optional port"))
                })?;
                if let Host::Name(n) = &b.0
                    && !names.contains(n)
                {
                    names.push(n.clone());
                }
                bound.push(b);
            }
            if bound.is_empty() {
                return Err(err("bound to no host"));
            }
            creds.push(Cred { spec: c, bound });
        }
        let native = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        for c in &native.certs {
            let _ = roots.add(c.clone());
        }
        if let Some(pem) = &spec.upstream_ca_pem {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| InjectError::UpstreamCa(e.to_string()))?;
            if certs.is_empty() {
                return Err(InjectError::UpstreamCa("no certificate in the PEM".into()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| InjectError::UpstreamCa(e.to_string()))?;
            }
        }
        let mut client = rustls::ClientConfig::builder_with_provider(crate::gateway::crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| InjectError::Ca(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (ca_pem, server) = crate::gateway::certificates(&names, "aibox sandbox credential CA")
            .map_err(|e| InjectError::Ca(e.to_string()))?;
        let history: Vec<Vec<Secret>> = creds.iter().map(|c| vec![c.spec.secret.clone()]).collect();
        let maskers = maskers_for(&creds, &history).map_err(InjectError::Ca)?;
        Ok(Injector {
            values: creds
                .iter()
                .map(|c| RwLock::new((c.spec.secret.clone(), c.spec.expires_at_ms)))
                .collect(),
            history: Mutex::new(history),
            creds,
            maskers: RwLock::new(maskers),
            client: Arc::new(client),
            ca_pem,
            server,
            revoked: AtomicBool::new(false),
        })
    }

    /// The CA certificate (PEM) the sandbox must trust for the bound hosts.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// (name, kind) of each credential.
    pub fn credentials(&self) -> Vec<(String, String)> {
        self.creds
            .iter()
            .map(|c| (c.spec.name.clone(), c.spec.kind.clone()))
            .collect()
    }

    /// Replaces credential `name`'s value while the sandbox runs (the
    /// placeholder stays; the old value stays masked in responses).
    /// `hosts` must be what it is bound to now: another binding needs a
    /// new CA, so a restart. The lifetime can only get shorter (the
    /// policy's TTL still holds). Returns its kind.
    pub fn rotate(
        &self,
        name: &str,
        hosts: &[String],
        value: Secret,
        expires_at_ms: Option<u64>,
    ) -> Result<String, String> {
        let i = self
            .creds
            .iter()
            .position(|c| c.spec.name == name)
            .ok_or_else(|| format!("this sandbox holds no placeholder for `{name}`"))?;
        let c = &self.creds[i];
        if c.spec.hosts != hosts {
            return Err(format!(
                "`{name}` is bound to {} in this sandbox and to {} now; restart the sandbox to use the new binding",
                c.spec.hosts.join(", "),
                hosts.join(", ")
            ));
        }
        check_value(value.expose()).map_err(str::to_string)?;
        let mut history = self.history.lock().map_err(|_| "poisoned".to_string())?;
        history[i].push(value.clone());
        let maskers = maskers_for(&self.creds, &history)?;
        *self.maskers.write().map_err(|_| "poisoned".to_string())? = maskers;
        let mut v = self.values[i].write().map_err(|_| "poisoned".to_string())?;
        let expires = match (v.1, expires_at_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        *v = (value, expires);
        Ok(c.spec.kind.clone())
    }

    /// Ends every substitution (the sandbox is stopping): from now on a
    /// placeholder is refused like an unknown one.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    /// Whether connections to `host:port` are terminated here.
    pub(crate) fn binds(&self, host: &Host, port: u16) -> bool {
        self.creds
            .iter()
            .any(|c| c.bound.iter().any(|(h, p)| h == host && *p == port))
    }

    /// The credential of the placeholder starting at `at` in `text`.
    fn which(&self, text: &[u8], at: usize) -> Option<usize> {
        self.creds
            .iter()
            .position(|c| text[at..].starts_with(c.spec.placeholder.as_bytes()))
    }

    /// The first placeholder-like string in `text`, if any.
    pub(crate) fn first(&self, text: &[u8]) -> Option<Option<usize>> {
        find(text, MARKER.as_bytes(), 0).map(|at| self.which(text, at))
    }

    /// Why credential `i` may not be put into a request to `dest`, if it
    /// may not.
    fn refusal(&self, i: Option<usize>, dest: Dest<'_>) -> Option<String> {
        let Some(i) = i else {
            return Some("a placeholder of no credential of this sandbox (from another or a stopped sandbox, or made up)".into());
        };
        if self.revoked.load(Ordering::SeqCst) {
            return Some("the sandbox's credentials are revoked (it is stopping)".into());
        }
        let c = &self.creds[i];
        let expires = self.values[i].read().map_or(Some(0), |v| v.1);
        if expires.is_some_and(|e| e <= now_ms()) {
            return Some(format!(
                "credential `{}` has expired for this sandbox; restart it to get a fresh one",
                c.spec.name
            ));
        }
        match dest {
            Dest::Plain => Some("credentials are only added over HTTPS".into()),
            Dest::Tls(h, p) if !c.bound.iter().any(|(bh, bp)| bh == h && *bp == p) => {
                Some(format!(
                    "credential `{}` is bound to {}, not {h}:{p}",
                    c.spec.name,
                    c.spec.hosts.join(", ")
                ))
            }
            Dest::Tls(..) => None,
        }
    }

    /// Replaces every placeholder in `text` (all of which must be usable
    /// for `dest`), noting the credentials used.
    fn substitute(
        &self,
        text: &[u8],
        dest: Dest<'_>,
        used: &mut Vec<usize>,
    ) -> Result<Vec<u8>, Misuse> {
        let mut out = Vec::with_capacity(text.len());
        let mut from = 0;
        while let Some(at) = find(text, MARKER.as_bytes(), from) {
            let w = self.which(text, at);
            let i = match (w, self.refusal(w, dest)) {
                (Some(i), None) => i,
                (i, reason) => {
                    return Err(Misuse {
                        cred: i,
                        place: "header",
                        reason: reason.unwrap_or_default(),
                    });
                }
            };
            let c = &self.creds[i];
            out.extend_from_slice(&text[from..at]);
            match self.values[i].read() {
                Ok(v) => out.extend_from_slice(v.0.expose().as_bytes()),
                Err(_) => {
                    return Err(Misuse {
                        cred: Some(i),
                        place: "header",
                        reason: "the credential's value is unavailable".into(),
                    });
                }
            }
            from = at + c.spec.placeholder.len();
            if !used.contains(&i) {
                used.push(i);
            }
        }
        out.extend_from_slice(&text[from..]);
        Ok(out)
    }

    /// Checks a request's URL and headers for placeholders and puts the
    /// real values in the headers where that is allowed. Returns the
    /// credentials used; on misuse nothing may be sent.
    pub(crate) fn check_head(
        &self,
        uri: &hyper::Uri,
        headers: &mut HeaderMap,
        dest: Dest<'_>,
    ) -> Result<Vec<usize>, Misuse> {
        let target = uri.to_string();
        if let Some(i) = self.first(target.as_bytes()) {
            return Err(Misuse {
                cred: i,
                place: "url",
                reason: "a credential placeholder in a URL (credentials only go in headers)".into(),
            });
        }
        let mut used = Vec::new();
        for (name, v) in headers.iter_mut() {
            let raw = v.as_bytes();
            if !CREDENTIAL_HEADERS.contains(&name.as_str()) {
                let decoded = base64_inside(raw);
                let hit = self
                    .first(raw)
                    .or_else(|| decoded.as_deref().and_then(|d| self.first(d)));
                if let Some(i) = hit {
                    return Err(Misuse {
                        cred: i,
                        place: "header",
                        reason: format!(
                            "a credential placeholder in the `{name}` header (credentials go in {} only)",
                            CREDENTIAL_HEADERS.join(", ")
                        ),
                    });
                }
                continue;
            }
            let new = match base64_inside(raw) {
                Some(d) if find(&d, MARKER.as_bytes(), 0).is_some() => {
                    let inner = self.substitute(&d, dest, &mut used)?;
                    let mut s = b"Basic ".to_vec();
                    s.extend_from_slice(
                        base64::engine::general_purpose::STANDARD
                            .encode(&inner)
                            .as_bytes(),
                    );
                    s
                }
                _ if find(raw, MARKER.as_bytes(), 0).is_some() => {
                    self.substitute(raw, dest, &mut used)?
                }
                _ => continue,
            };
            let mut nv = HeaderValue::from_bytes(&new).map_err(|_| Misuse {
                cred: None,
                place: "header",
                reason: "the header cannot carry the credential".into(),
            })?;
            nv.set_sensitive(true);
            *v = nv;
        }
        Ok(used)
    }

    /// The masker of `host:port`.
    fn masker(&self, host: &Host, port: u16) -> Option<Arc<Masker>> {
        self.maskers
            .read()
            .ok()?
            .iter()
            .find(|((h, p), _)| h == host && *p == port)
            .map(|(_, m)| m.clone())
    }

    /// Reports misuse (a `credential.use` refusal) and answers 403.
    pub(crate) fn refuse(
        &self,
        proxy: &Proxy,
        m: &Misuse,
        host: &str,
        port: u16,
        method: &str,
        via: Via,
    ) -> Response<Body> {
        self.report_misuse(proxy, m, host, port, method, via);
        let mut r = text(
            StatusCode::FORBIDDEN,
            format!(
                "aibox: request to {host}:{port} refused: {} ({})\n",
                m.reason, m.place
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&m.reason) {
            r.headers_mut().insert("x-aibox-denied", v);
        }
        r
    }

    pub(crate) fn report_misuse(
        &self,
        proxy: &Proxy,
        m: &Misuse,
        host: &str,
        port: u16,
        method: &str,
        via: Via,
    ) {
        proxy.counters.denied.fetch_add(1, Ordering::Relaxed);
        let (name, kind) = match m.cred {
            Some(i) => (
                self.creds[i].spec.name.clone(),
                self.creds[i].spec.kind.clone(),
            ),
            None => ("unknown".into(), "unknown".into()),
        };
        proxy.record(NetEvent::Credential {
            credential: name,
            kind,
            host: crate::proxy::clip(host),
            port,
            method: crate::proxy::clip(method),
            allowed: false,
            place: m.place.into(),
            reason: Some(m.reason.clone()),
            via,
        });
    }

    /// Serves one connection from the sandbox to the bound host `t`
    /// (already allowed by policy): TLS with the sandbox's credential CA,
    /// then HTTP/1.1 requests, each checked and sent on over TLS.
    pub(crate) async fn serve<S>(self: Arc<Self>, proxy: Arc<Proxy>, stream: S, t: Target, via: Via)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(t)) => t,
            _ => return,
        };
        let upstream: UpPool = Arc::new(tokio::sync::Mutex::new(None));
        let t = Arc::new(t);
        let me = self.clone();
        let svc = service_fn(move |req| {
            let (me, proxy, t, upstream) = (me.clone(), proxy.clone(), t.clone(), upstream.clone());
            async move {
                Ok::<_, std::convert::Infallible>(me.handle(proxy, req, &t, via, &upstream).await)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(crate::proxy::HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(tls), svc)
            .await;
    }

    async fn handle(
        self: Arc<Self>,
        proxy: Arc<Proxy>,
        req: Request<Incoming>,
        t: &Target,
        via: Via,
        upstream: &UpPool,
    ) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().to_string();
        let host = t.host.to_string();
        // Every request on the connection must be for the host connected to.
        let named = req
            .headers()
            .get("host")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (h, p) = split_authority(named).unwrap_or((named, 443));
        if p != t.port || parse_host(h).ok().as_ref() != Some(&t.host) {
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "aibox: this connection is for {host}:{}; the Host header says {}\n",
                    t.port,
                    named.escape_debug()
                ),
            );
        }
        if let Some(r) = proxy.push_refusal("https", &t.host, t.port, req.uri()) {
            return proxy.refuse_push(r, &method, via);
        }
        let (mut parts, body) = req.into_parts();
        let dest = Dest::Tls(&t.host, t.port);
        let used = match self.check_head(&parts.uri, &mut parts.headers, dest) {
            Ok(u) => u,
            Err(m) => return self.refuse(&proxy, &m, &host, t.port, &method, via),
        };
        // While pushes are reviewed or blocked, a git token only reads: a
        // hosting API on the same host could otherwise commit without git.
        if used.iter().any(|&i| self.creds[i].spec.kind == "git-token")
            && let Some(r) = proxy.git_write_refusal(&parts.method, &parts.uri, &t.host, t.port)
        {
            return proxy.refuse_push(r, &method, via);
        }
        // The body: read whole and checked when small, else checked as it
        // streams (a placeholder cuts the upload off).
        let declared = parts
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let sent = Arc::new(AtomicU64::new(0));
        let body: UpBody = match declared {
            Some(n) if n <= SCAN_WHOLE => {
                let read = tokio::time::timeout(
                    BODY_TIMEOUT,
                    Limited::new(body, SCAN_WHOLE as usize).collect(),
                )
                .await;
                let bytes = match read {
                    Ok(Ok(b)) => b.to_bytes(),
                    _ => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            "aibox: the request body could not be read\n".into(),
                        );
                    }
                };
                if let Some(i) = self.first(&bytes) {
                    let m = Misuse {
                        cred: i,
                        place: "body",
                        reason: "a credential placeholder in a request body (credentials only go in headers)".into(),
                    };
                    return self.refuse(&proxy, &m, &host, t.port, &method, via);
                }
                sent.store(bytes.len() as u64, Ordering::Relaxed);
                http_body_util::Full::new(bytes)
                    .map_err(|e| match e {})
                    .boxed()
            }
            _ => Scanned {
                inner: body,
                carry: Vec::new(),
                injector: self.clone(),
                proxy: proxy.clone(),
                host: host.clone(),
                port: t.port,
                method: method.clone(),
                via,
                sent: sent.clone(),
                stopped: false,
            }
            .boxed(),
        };
        strip_hop_headers(&mut parts.headers);
        let authority = if t.port == 443 {
            host.clone()
        } else {
            format!("{host}:{}", t.port)
        };
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert("host", v);
        }
        parts
            .headers
            .insert("accept-encoding", HeaderValue::from_static("identity"));
        if declared.is_none() && parts.headers.contains_key("content-length") {
            parts.headers.remove("content-length");
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        parts.uri = match path.parse() {
            Ok(u) => u,
            Err(_) => return text(StatusCode::BAD_REQUEST, "aibox: bad request path\n".into()),
        };
        parts.version = hyper::Version::HTTP_11;
        for &i in &used {
            let c = &self.creds[i].spec;
            proxy.record(NetEvent::Credential {
                credential: c.name.clone(),
                kind: c.kind.clone(),
                host: host.clone(),
                port: t.port,
                method: crate::proxy::clip(&method),
                allowed: true,
                place: "header".into(),
                reason: None,
                via,
            });
        }
        let resp = match self
            .send(&proxy, t, upstream, Request::from_parts(parts, body))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                proxy.allowed(t, &method, via, (0, 0), started, Some(e.clone()));
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("aibox: upstream {host}:{}: {e}\n", t.port),
                );
            }
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_headers(&mut parts.headers);
        // Masking needs the bytes as sent: identity was asked for, and
        // anything else (which would hide an echo) is not passed on.
        if let Some(enc) = parts.headers.get("content-encoding")
            && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
        {
            let e = format!(
                "the response is encoded ({}) although identity was asked for; aibox must read it to keep the credential out",
                String::from_utf8_lossy(enc.as_bytes()).escape_debug()
            );
            proxy.allowed(t, &method, via, (0, 0), started, Some(e.clone()));
            return text(
                StatusCode::BAD_GATEWAY,
                format!("aibox: upstream {host}:{}: {e}\n", t.port),
            );
        }
        let Some(masker) = self.masker(&t.host, t.port) else {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "aibox: no masker for this host\n".into(),
            );
        };
        for (_, v) in parts.headers.iter_mut() {
            let mut b = v.as_bytes().to_vec();
            if masker.mask(&mut b) > 0
                && let Ok(nv) = HeaderValue::from_bytes(&b)
            {
                *v = nv;
            }
        }
        let (proxy2, t2) = (proxy.clone(), t.clone());
        let done = move |down: u64, error: Option<String>| {
            proxy2.allowed(
                &t2,
                &method,
                via,
                (sent.load(Ordering::Relaxed), down),
                started,
                error,
            );
        };
        Response::from_parts(
            parts,
            Masked {
                inner: body,
                masker,
                carry: Vec::new(),
                down: 0,
                done: Some(Box::new(done)),
            }
            .boxed(),
        )
    }

    /// Sends `req` on the connection's upstream connection (opened on
    /// first use to the address policy approved, over verified TLS).
    async fn send(
        &self,
        proxy: &Proxy,
        t: &Target,
        pool: &UpPool,
        req: Request<UpBody>,
    ) -> Result<Response<Incoming>, String> {
        let mut slot = pool.lock().await;
        let mut req = req;
        for fresh in [false, true] {
            if fresh || slot.as_ref().is_none_or(|s| s.is_closed()) {
                *slot = Some(crate::gateway::tls_http1(proxy, t, &self.client).await?);
            }
            let Some(sender) = slot.as_mut() else {
                return Err("no upstream connection".into());
            };
            if sender.ready().await.is_err() {
                *slot = None;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(r) => return Ok(r),
                Err(mut e) => match e.take_message() {
                    // Not sent (a kept connection had closed): once more.
                    Some(back) if !fresh => {
                        req = back;
                        *slot = None;
                    }
                    _ => return Err(e.into_error().to_string()),
                },
            }
        }
        Err("the upstream closed the connection".into())
    }
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
type UpPool = Arc<tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<UpBody>>>>;

/// A request body checked for placeholders as it streams to the
/// upstream; one ends the upload with an error (and a report).
struct Scanned {
    inner: Incoming,
    /// The end of the previous frame, in case a placeholder spans frames.
    carry: Vec<u8>,
    injector: Arc<Injector>,
    proxy: Arc<Proxy>,
    host: String,
    port: u16,
    method: String,
    via: Via,
    sent: Arc<AtomicU64>,
    stopped: bool,
}

impl hyper::body::Body for Scanned {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.stopped {
            return Poll::Ready(None);
        }
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match r {
            Poll::Ready(Some(Ok(f))) => {
                let Some(data) = f.data_ref() else {
                    return Poll::Ready(Some(Ok(f)));
                };
                let mut window = std::mem::take(&mut self.carry);
                window.extend_from_slice(data);
                if let Some(i) = self.injector.first(&window) {
                    self.stopped = true;
                    let m = Misuse {
                        cred: i,
                        place: "body",
                        reason: "a credential placeholder in a request body (credentials only go in headers); the upload was cut off".into(),
                    };
                    self.injector.report_misuse(
                        &self.proxy,
                        &m,
                        &self.host,
                        self.port,
                        &self.method,
                        self.via,
                    );
                    return Poll::Ready(Some(Err(std::io::Error::other(m.reason))));
                }
                let keep = MARKER.len() - 1;
                self.carry = window[window.len().saturating_sub(keep)..].to_vec();
                self.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stopped || self.inner.is_end_stream()
    }
}

type Done = Box<dyn FnOnce(u64, Option<String>) + Send + Sync>;

/// A response body from a bound host with the real values masked; a
/// mask that spans frames is caught by holding back the last bytes of
/// each frame until the next arrives.
struct Masked {
    inner: Incoming,
    masker: Arc<Masker>,
    /// The end of the previous frame that could start a form.
    carry: Vec<u8>,
    down: u64,
    done: Option<Done>,
}

impl hyper::body::Body for Masked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            let r = Pin::new(&mut self.inner).poll_frame(cx);
            return match r {
                Poll::Ready(Some(Ok(f))) => {
                    // (Trailers are dropped: they would pass unmasked.)
                    let Ok(f) = f.into_data() else { continue };
                    let mut window = std::mem::take(&mut self.carry);
                    window.extend_from_slice(&f);
                    self.masker.mask(&mut window);
                    let cut = window.len() - self.masker.held(&window);
                    self.carry = window.split_off(cut);
                    if window.is_empty() {
                        continue;
                    }
                    self.down += window.len() as u64;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(window)))))
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(d) = self.done.take() {
                        d(self.down, Some(e.to_string()));
                    }
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    let rest = std::mem::take(&mut self.carry);
                    if !rest.is_empty() {
                        self.down += rest.len() as u64;
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                    }
                    if let Some(d) = self.done.take() {
                        d(self.down, None);
                    }
                    Poll::Ready(None)
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.carry.is_empty() && self.inner.is_end_stream()
    }
}

impl Drop for Masked {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            d(
                self.down,
                Some("the client stopped reading the response".into()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PH: &str = "aibox-cred-git-token-0123456789abcdef0123456789abcdef";
    const REAL: &str = "ghp_REALVALUE1234567890";

    fn injector(expires: Option<u64>) -> Injector {
        Injector::new(InjectSpec {
            credentials: vec![CredentialSpec {
                name: "git-token".into(),
                kind: "git-token".into(),
                hosts: vec!["forge.test:8443".into()],
                placeholder: PH.into(),
                secret: Secret::new(REAL.into()),
                expires_at_ms: expires,
            }],
            upstream_ca_pem: None,
        })
        .unwrap()
    }

    fn head(h: &[(&str, String)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in h {
            m.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn a_rotated_value_is_put_in_and_both_values_are_masked() {
        let inj = injector(None);
        let forge = Host::Name("forge.test".into());
        let uri: hyper::Uri = "/x".parse().unwrap();
        let hosts = vec!["forge.test:8443".to_string()];
        const NEW: &str = "ghp_ROTATEDvalue987654321";
        assert!(
            inj.rotate("other", &hosts, Secret::new(NEW.into()), None)
                .is_err()
        );
        assert!(
            inj.rotate(
                "git-token",
                &["elsewhere.test".to_string()],
                Secret::new(NEW.into()),
                None
            )
            .unwrap_err()
            .contains("restart")
        );
        assert!(
            inj.rotate("git-token", &hosts, Secret::new(format!("{MARKER}x")), None)
                .is_err()
        );
        assert_eq!(
            inj.rotate("git-token", &hosts, Secret::new(NEW.into()), None)
                .unwrap(),
            "git-token"
        );
        let mut h = head(&[("authorization", format!("Bearer {PH}"))]);
        inj.check_head(&uri, &mut h, Dest::Tls(&forge, 8443))
            .unwrap();
        assert_eq!(h["authorization"], format!("Bearer {NEW}").as_str());
        let m = inj.masker(&forge, 8443).unwrap();
        for v in [REAL, NEW] {
            let mut body = format!("echo {v} echo").into_bytes();
            m.mask(&mut body);
            assert!(!String::from_utf8_lossy(&body).contains(&v[..12]), "{v}");
        }
        // A rotation can end substitution too (an earlier expiry).
        inj.rotate("git-token", &hosts, Secret::new(NEW.into()), Some(1))
            .unwrap();
        let mut h = head(&[("authorization", format!("Bearer {PH}"))]);
        assert!(
            inj.check_head(&uri, &mut h, Dest::Tls(&forge, 8443))
                .is_err()
        );
    }

    #[test]
    fn substituted_only_in_headers_to_the_bound_host() {
        let inj = injector(None);
        let forge = Host::Name("forge.test".into());
        let other = Host::Name("other.test".into());
        let uri: hyper::Uri = "/repo.git/info/refs".parse().unwrap();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("x:{PH}"));
        let mut h = head(&[
            ("authorization", format!("Basic {basic}")),
            ("private-token", format!("t {PH} t")),
        ]);
        let used = inj
            .check_head(&uri, &mut h, Dest::Tls(&forge, 8443))
            .unwrap();
        assert_eq!(used, vec![0]);
        let want = base64::engine::general_purpose::STANDARD.encode(format!("x:{REAL}"));
        assert_eq!(h["authorization"], format!("Basic {want}").as_str());
        assert_eq!(h["private-token"], format!("t {REAL} t").as_str());
        // Another host, another port, plain HTTP, a URL: refused.
        for (dest, why) in [
            (Dest::Tls(&other, 8443), "bound to"),
            (Dest::Tls(&forge, 443), "bound to"),
            (Dest::Plain, "HTTPS"),
        ] {
            let mut h = head(&[("authorization", format!("Bearer {PH}"))]);
            let m = inj.check_head(&uri, &mut h, dest).unwrap_err();
            assert!(m.reason.contains(why), "{m:?}");
            assert_eq!(m.cred, Some(0));
            assert_eq!(h["authorization"], format!("Bearer {PH}").as_str());
        }
        let uri: hyper::Uri = format!("/x?token={PH}").parse().unwrap();
        let m = inj
            .check_head(&uri, &mut HeaderMap::new(), Dest::Tls(&forge, 8443))
            .unwrap_err();
        assert_eq!(m.place, "url");
        // An unknown placeholder (another sandbox's) is refused too.
        let uri: hyper::Uri = "/".parse().unwrap();
        let mut h = head(&[(
            "authorization",
            "Bearer aibox-cred-git-token-ffffffffffffffffffffffffffffffff".into(),
        )]);
        let m = inj
            .check_head(&uri, &mut h, Dest::Tls(&forge, 8443))
            .unwrap_err();
        assert_eq!(m.cred, None);
        // Not in a header services may keep and show.
        let mut h = head(&[("user-agent", format!("x {PH}"))]);
        let m = inj
            .check_head(&uri, &mut h, Dest::Tls(&forge, 8443))
            .unwrap_err();
        assert!(m.reason.contains("user-agent"), "{m:?}");
        let mut h = head(&[("cookie", format!("Basic {basic}"))]);
        assert!(
            inj.check_head(&uri, &mut h, Dest::Tls(&forge, 8443))
                .is_err()
        );
        // Nothing to do without a placeholder.
        let mut h = head(&[("authorization", "Bearer mine".into())]);
        assert!(
            inj.check_head(&uri, &mut h, Dest::Plain)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn expiry_and_revocation_end_substitution() {
        let forge = Host::Name("forge.test".into());
        let uri: hyper::Uri = "/".parse().unwrap();
        let inj = injector(Some(now_ms() - 1));
        let mut h = head(&[("authorization", format!("Bearer {PH}"))]);
        let m = inj
            .check_head(&uri, &mut h, Dest::Tls(&forge, 8443))
            .unwrap_err();
        assert!(m.reason.contains("expired"), "{m:?}");
        let inj = injector(Some(now_ms() + 60_000));
        inj.revoke();
        let m = inj
            .check_head(&uri, &mut h, Dest::Tls(&forge, 8443))
            .unwrap_err();
        assert!(m.reason.contains("revoked"), "{m:?}");
    }

    #[test]
    fn masks_catch_echoes_in_any_form() {
        let secret = "ghp_REAL/value+1234567890=";
        let m = Masker::new(&[secret.as_bytes()]).unwrap();
        let mut echoes = vec![secret.to_string(), secret[3..20].to_string()];
        for prefix in ["", "x", "xy", "x-access-token:"] {
            let text = format!("{prefix}{secret}");
            echoes.push(base64::engine::general_purpose::STANDARD.encode(&text));
            echoes.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&text));
        }
        echoes.push(
            secret
                .replace('/', "%2F")
                .replace('+', "%2B")
                .replace('=', "%3D"),
        );
        echoes.push(
            secret
                .replace('/', "%2f")
                .replace('+', "%2b")
                .replace('=', "%3d"),
        );
        echoes.push(secret.replace('/', "\\/"));
        echoes.push(hex::encode(secret));
        for e in &echoes {
            let mut b = format!("echo: <{e}>").into_bytes();
            assert!(m.mask(&mut b) >= 1, "{e}");
            let s = String::from_utf8(b).unwrap();
            assert!(!s.contains(e.as_str()), "{e} survived: {s}");
            assert!(s.starts_with("echo: <") && s.ends_with('>'), "{s}");
        }
        // Only what could start a form waits for the next frame.
        assert_eq!(m.held(b"data: done\n\n"), 0);
        assert_eq!(m.held(b"data: ghp_RE"), 6);
    }

    #[test]
    fn bad_specs_are_refused() {
        let spec = |ph: &str, secret: &str, hosts: Vec<&str>| InjectSpec {
            credentials: vec![CredentialSpec {
                name: "c".into(),
                kind: "custom".into(),
                hosts: hosts.into_iter().map(String::from).collect(),
                placeholder: ph.into(),
                secret: Secret::new(secret.into()),
                expires_at_ms: None,
            }],
            upstream_ca_pem: None,
        };
        for s in [
            spec("short", REAL, vec!["a.test"]),
            spec(PH, "", vec!["a.test"]),
            spec(PH, "a\r\nb", vec!["a.test"]),
            spec(PH, PH, vec!["a.test"]),
            spec(PH, REAL, vec![]),
            spec(PH, REAL, vec!["10.0.0.1"]),
            spec(PH, REAL, vec!["a.test:0"]),
        ] {
            assert!(Injector::new(s).is_err());
        }
    }
}
