//! The LLM gateway: HTTPS to a configured LLM host is terminated here,
//! with a certificate from a per-sandbox CA that only this sandbox trusts
//! (and that may only sign the gateway's host names), so that
//!
//! - the real API key is added on the way out (`x-api-key` or
//!   `Authorization: Bearer`) and never enters the sandbox, which holds a
//!   placeholder;
//! - request size, requests per minute and tokens per minute are limited
//!   (413, 429 with `Retry-After`);
//! - each exchange is an `llm.request`/`llm.response` pair in the audit
//!   log, with bodies in full, as hashes, or not at all;
//! - the request's `model` can route it to another upstream.
//!
//! Responses stream back frame by frame (server-sent events arrive as
//! the upstream sends them).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::host::{Host, parse_host};
use crate::proxy::{Body, NetEvent, Proxy, Via, strip_hop_headers, text};
use crate::rules::Access;

/// How long a TLS handshake from the sandbox may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a body an event carries (`full` logging).
const LOG_CAP: usize = 1024 * 1024;
/// What is kept of a response's start and end to find its token counts.
const USAGE_KEEP: usize = 64 * 1024;
/// Requests the gateway handles at once for one sandbox.
const MAX_INFLIGHT: usize = 16;
/// How long reading a request body may take.
const BODY_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors building the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A provider or route is not usable.
    #[error("network.llm_gateway: {0}")]
    Config(String),
    /// Certificate generation failed.
    #[error("network.llm_gateway: creating the sandbox's CA: {0}")]
    Ca(String),
}

/// How the API key is presented upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStyle {
    /// `x-api-key: KEY` (Anthropic).
    Anthropic,
    /// `Authorization: Bearer KEY` (OpenAI and compatible).
    Openai,
}

/// What `llm.request`/`llm.response` events carry of the bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogMode {
    /// Sizes, model, status, tokens: no content.
    #[default]
    MetadataOnly,
    /// Also the SHA-256 of each body.
    Hash,
    /// Also the bodies themselves (responses up to 4 MiB).
    Full,
}

/// A secret string: never shown by `Debug`, overwritten when dropped.
#[derive(Clone, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    /// The value, for the places that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // (Best effort: copies made while building headers are not ours.)
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// One LLM provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderSpec {
    /// Name used in routes and events.
    pub name: String,
    /// The host name the sandbox connects to (port 443).
    pub host: String,
    /// How the key is sent.
    pub style: KeyStyle,
    /// The real key (held outside the sandbox only).
    pub key: Secret,
    /// Where requests go: `https://host[:port][/base-path]`.
    pub upstream: String,
    /// Extra CA certificates (PEM) to trust for the upstream, besides the
    /// host's system roots.
    #[serde(default)]
    pub upstream_ca_pem: Option<String>,
}

/// A model → provider route.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteSpec {
    /// Model name, or a prefix ending in `*`.
    pub model: String,
    /// Provider name.
    pub provider: String,
}

/// The gateway's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct GatewaySpec {
    /// Providers.
    pub providers: Vec<ProviderSpec>,
    /// Routes, first match wins; unrouted requests go to the provider
    /// whose host was connected to.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Requests per minute for the sandbox (0: unlimited).
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Tokens (prompt + completion, as the upstream reports them) per
    /// minute (0: unlimited).
    #[serde(default)]
    pub tokens_per_minute: u64,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
    /// Body logging.
    #[serde(default)]
    pub log: LogMode,
}

struct Upstream {
    host: Host,
    port: u16,
    base: String,
    client: Arc<rustls::ClientConfig>,
}

/// The running gateway of one sandbox.
pub struct Gateway {
    spec: GatewaySpec,
    upstreams: Vec<Upstream>,
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
    window: Mutex<Window>,
    /// Requests being handled at once (each may buffer `max_body_bytes`).
    inflight: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Window {
    requests: VecDeque<Instant>,
    /// (when, reservation id, tokens): a request's estimate until its
    /// response reports the real count.
    tokens: VecDeque<(Instant, u64, u64)>,
    next_id: u64,
}

const MINUTE: Duration = Duration::from_secs(60);

impl Window {
    fn prune(&mut self, now: Instant) {
        while self
            .requests
            .front()
            .is_some_and(|t| now.duration_since(*t) >= MINUTE)
        {
            self.requests.pop_front();
        }
        while self
            .tokens
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) >= MINUTE)
        {
            self.tokens.pop_front();
        }
    }
}

/// Seconds until `t` is a minute old (at least 1).
fn retry_after(now: Instant, t: Instant) -> u64 {
    MINUTE
        .saturating_sub(now.duration_since(t))
        .as_secs_f64()
        .ceil()
        .max(1.0) as u64
}

fn provider_err(p: &ProviderSpec, what: &str) -> GatewayError {
    GatewayError::Config(format!("provider `{}`: {what}", p.name))
}

/// `https://host[:port][/base]` → (host, port, base without a trailing /).
fn parse_upstream(p: &ProviderSpec) -> Result<(Host, u16, String), GatewayError> {
    let rest = p.upstream.strip_prefix("https://").ok_or_else(|| {
        provider_err(
            p,
            "upstream must start with https:// (keys never travel in clear)",
        )
    })?;
    let (authority, base) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let (h, port) = match crate::host::split_authority(authority) {
        Some((h, port)) => (h, port),
        None => (authority, 443),
    };
    let host = parse_host(h.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|e| provider_err(p, &format!("upstream host: {e}")))?;
    if base.contains(['?', '#', ' ']) {
        return Err(provider_err(p, "upstream path must be a plain path"));
    }
    Ok((host, port, base.to_string()))
}

/// Checks `spec` without building anything (no CA, no TLS setup), so
/// that a configuration can be refused early; returns the host names.
pub fn check(spec: &GatewaySpec) -> Result<Vec<String>, GatewayError> {
    if spec.providers.is_empty() {
        return Err(GatewayError::Config("no providers".into()));
    }
    let mut names = Vec::new();
    for p in &spec.providers {
        let host = match parse_host(&p.host) {
            Ok(Host::Name(n)) => n,
            _ => return Err(provider_err(p, "host must be a DNS name")),
        };
        if names.contains(&host) {
            return Err(provider_err(p, "two providers have the same host"));
        }
        if p.key.is_empty() {
            return Err(provider_err(p, "no API key"));
        }
        names.push(host);
        parse_upstream(p)?;
        upstream_cas(p)?;
    }
    for r in &spec.routes {
        if !spec.providers.iter().any(|p| p.name == r.provider) {
            return Err(GatewayError::Config(format!(
                "route for model `{}` names provider `{}`, which is not configured",
                r.model, r.provider
            )));
        }
    }
    Ok(names)
}

/// The extra CA certificates of `p`'s upstream.
fn upstream_cas(p: &ProviderSpec) -> Result<Vec<CertificateDer<'static>>, GatewayError> {
    let Some(pem) = &p.upstream_ca_pem else {
        return Ok(Vec::new());
    };
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| provider_err(p, &format!("upstream CA: {e}")))?;
    if certs.is_empty() {
        return Err(provider_err(p, "upstream CA: no certificate in the PEM"));
    }
    Ok(certs)
}

impl Gateway {
    /// Checks `spec` and creates the sandbox's CA and the certificate for
    /// the gateway's host names.
    pub fn new(spec: GatewaySpec) -> Result<Gateway, GatewayError> {
        let names = check(&spec)?;
        let native = rustls_native_certs::load_native_certs();
        let mut upstreams = Vec::new();
        for p in &spec.providers {
            let (host, port, base) = parse_upstream(p)?;
            let mut roots = rustls::RootCertStore::empty();
            for c in &native.certs {
                let _ = roots.add(c.clone());
            }
            for c in upstream_cas(p)? {
                roots
                    .add(c)
                    .map_err(|e| provider_err(p, &format!("upstream CA: {e}")))?;
            }
            let mut client = rustls::ClientConfig::builder_with_provider(crypto())
                .with_safe_default_protocol_versions()
                .map_err(|e| GatewayError::Ca(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            client.alpn_protocols = vec![b"http/1.1".to_vec()];
            upstreams.push(Upstream {
                host,
                port,
                base,
                client: Arc::new(client),
            });
        }
        let (ca_pem, server) = certificates(&names, "aibox sandbox LLM gateway CA")?;
        Ok(Gateway {
            spec,
            upstreams,
            ca_pem,
            server,
            window: Mutex::new(Window::default()),
            inflight: Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT)),
        })
    }

    /// The sandbox's CA certificate (PEM), to be trusted inside.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The host names the gateway answers for.
    pub fn hosts(&self) -> Vec<String> {
        self.spec.providers.iter().map(|p| p.host.clone()).collect()
    }

    /// The provider a connection to `host:port` is for, if any.
    pub(crate) fn provider_for(&self, host: &Host, port: u16) -> Option<usize> {
        if port != 443 {
            return None;
        }
        let Host::Name(n) = host else { return None };
        self.spec
            .providers
            .iter()
            .position(|p| parse_host(&p.host).is_ok_and(|h| h == Host::Name(n.clone())))
    }

    /// Serves one connection from the sandbox to provider `idx`'s host:
    /// TLS with the sandbox's CA, then HTTP/1.1 requests.
    pub(crate) async fn serve<S>(
        self: Arc<Self>,
        proxy: Arc<Proxy>,
        stream: S,
        idx: usize,
        via: Via,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(t)) => t,
            _ => return,
        };
        let me = self.clone();
        let svc = service_fn(move |req| {
            let (me, proxy) = (me.clone(), proxy.clone());
            async move { Ok::<_, std::convert::Infallible>(me.handle(proxy, req, idx, via).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(crate::proxy::HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(tls), svc)
            .await;
    }

    fn provider_name(&self, idx: usize) -> String {
        self.spec.providers[idx].name.clone()
    }

    /// Admits a request expected to use `estimate` tokens, or says which
    /// limit refuses it and when to retry. The estimate is reserved until
    /// [`Gateway::settle`] replaces it with what the upstream reported, so
    /// parallel requests and responses that report nothing still count.
    fn admit(&self, estimate: u64) -> Result<u64, (&'static str, u64)> {
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.prune(now);
        let rpm = self.spec.requests_per_minute as usize;
        if rpm > 0
            && w.requests.len() >= rpm
            && let Some(t) = w.requests.front()
        {
            return Err(("requests_per_minute", retry_after(now, *t)));
        }
        let tpm = self.spec.tokens_per_minute;
        if tpm > 0 {
            let used: u64 = w.tokens.iter().map(|(_, _, n)| n).sum();
            // (A request larger than the whole budget still runs alone.)
            if used >= tpm || (used > 0 && used.saturating_add(estimate) > tpm) {
                // Wait until enough of the window has expired: down to
                // below the budget, and to room for this request.
                let need = used
                    .saturating_add(estimate)
                    .saturating_sub(tpm)
                    .max(used.saturating_sub(tpm) + 1);
                let mut freed = 0u64;
                let mut at = now;
                for (t, _, n) in &w.tokens {
                    freed += n;
                    at = *t;
                    if freed >= need {
                        break;
                    }
                }
                return Err(("tokens_per_minute", retry_after(now, at)));
            }
        }
        w.requests.push_back(now);
        w.next_id += 1;
        let id = w.next_id;
        w.tokens.push_back((now, id, estimate));
        Ok(id)
    }

    /// Replaces reservation `id` with the tokens the upstream reported
    /// (without a report the estimate stands).
    fn settle(&self, id: u64, reported: Option<u64>) {
        let Some(n) = reported else { return };
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        // The tokens were used when the response ended: they count from
        // now (a generation longer than a minute must not escape the
        // window because its reservation expired).
        if let Some(at) = w.tokens.iter().position(|(_, i, _)| *i == id) {
            w.tokens.remove(at);
        }
        w.tokens.push_back((Instant::now(), id, n));
    }

    fn route(&self, model: Option<&str>, connected: usize) -> usize {
        let Some(m) = model else { return connected };
        for r in &self.spec.routes {
            let hit = match r.model.strip_suffix('*') {
                Some(prefix) => m.starts_with(prefix),
                None => m == r.model,
            };
            if hit
                && let Some(i) = self
                    .spec
                    .providers
                    .iter()
                    .position(|p| p.name == r.provider)
            {
                return i;
            }
        }
        connected
    }

    fn body_fields(&self, body: &[u8]) -> (Option<String>, Option<String>) {
        match self.spec.log {
            LogMode::MetadataOnly => (None, None),
            LogMode::Hash => (None, Some(hex::encode(Sha256::digest(body)))),
            LogMode::Full => (
                Some(self.redact(logged(body, body.len() as u64))),
                Some(hex::encode(Sha256::digest(body))),
            ),
        }
    }

    /// A logged body never carries a real key, whatever echoed it.
    fn redact(&self, mut text: String) -> String {
        for p in &self.spec.providers {
            if !p.key.is_empty() && text.contains(p.key.expose()) {
                text = text.replace(p.key.expose(), "[aibox: API key redacted]");
            }
        }
        text
    }

    async fn handle(
        self: Arc<Self>,
        proxy: Arc<Proxy>,
        req: Request<Incoming>,
        connected: usize,
        via: Via,
    ) -> Response<Body> {
        let started = Instant::now();
        let host = self.spec.providers[connected].host.clone();
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let refuse =
            |status: StatusCode, limit: &str, retry: Option<u64>, model: Option<String>| {
                proxy.record(NetEvent::LlmResponse {
                    provider: self.provider_name(connected),
                    host: host.clone(),
                    model,
                    status: status.as_u16(),
                    bytes: 0,
                    duration_ms: started.elapsed().as_millis() as u64,
                    input_tokens: None,
                    output_tokens: None,
                    limited: Some(limit.to_string()),
                    error: None,
                    body: None,
                    sha256: None,
                });
                let mut r = text(
                    status,
                    format!("aibox: LLM gateway limit `{limit}` reached\n"),
                );
                if let Some(s) = retry
                    && let Ok(v) = HeaderValue::from_str(&s.to_string())
                {
                    r.headers_mut().insert("retry-after", v);
                }
                r
            };
        // LLM APIs need no more; TRACE and friends could echo the key.
        if !matches!(method, Method::GET | Method::POST | Method::DELETE) {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, "method", None, None);
        }
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "concurrent_requests",
                Some(1),
                None,
            );
        };
        let max = self.spec.max_body_bytes;
        let declared = req
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "max_body_bytes", None, None);
        }
        let (mut parts, body) = req.into_parts();
        let body = match tokio::time::timeout(
            BODY_TIMEOUT,
            Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX)).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return refuse(StatusCode::PAYLOAD_TOO_LARGE, "max_body_bytes", None, None);
            }
            Ok(Err(e)) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("aibox: reading the request: {e}\n"),
                );
            }
            Err(_) => {
                return text(
                    StatusCode::REQUEST_TIMEOUT,
                    "aibox: the request body was too slow\n".into(),
                );
            }
        };
        // Only the fields needed, borrowed: the rest of the body is skipped
        // without building a tree of it.
        let fields = RequestFields::read(&body);
        let model = fields.model.as_deref().map(crate::proxy::clip);
        let estimate = fields
            .max_tokens
            .or(fields.max_completion_tokens)
            .unwrap_or(0)
            .saturating_add(body.len() as u64 / 4);
        let reservation = match self.admit(estimate) {
            Ok(id) => id,
            Err((limit, retry)) => {
                return refuse(StatusCode::TOO_MANY_REQUESTS, limit, Some(retry), model);
            }
        };
        let idx = self.route(model.as_deref(), connected);
        let provider = &self.spec.providers[idx];
        let (logged_body, digest) = self.body_fields(&body);
        proxy.record(NetEvent::LlmRequest {
            provider: provider.name.clone(),
            host: host.clone(),
            model: model.clone(),
            method: method.to_string(),
            path: crate::proxy::clip(&path),
            bytes: body.len() as u64,
            via,
            body: logged_body,
            sha256: digest,
        });

        let up = &self.upstreams[idx];
        // Whatever credential the sandbox sent (a placeholder) goes, and so
        // do headers that would pick another organisation or project to
        // bill; the real key is added for the provider the request goes to.
        strip_hop_headers(&mut parts.headers);
        for h in [
            "authorization",
            "x-api-key",
            "api-key",
            "cookie",
            "openai-organization",
            "openai-project",
        ] {
            parts.headers.remove(h);
        }
        let key = match provider.style {
            KeyStyle::Anthropic => ("x-api-key", provider.key.expose().to_string()),
            KeyStyle::Openai => ("authorization", format!("Bearer {}", provider.key.expose())),
        };
        match HeaderValue::from_str(&key.1) {
            Ok(mut v) => {
                v.set_sensitive(true);
                parts.headers.insert(key.0, v);
            }
            Err(_) => {
                return self.failed(
                    &proxy,
                    idx,
                    &host,
                    model,
                    started,
                    "the configured API key is not a valid header value",
                );
            }
        }
        let authority = if up.port == 443 {
            up.host.to_string()
        } else {
            format!("{}:{}", up.host, up.port)
        };
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert("host", v);
        }
        parts.uri = match format!("{}{}", up.base, path).parse() {
            Ok(u) => u,
            Err(_) => return text(StatusCode::BAD_REQUEST, "aibox: bad request path\n".into()),
        };
        parts.version = hyper::Version::HTTP_11;
        parts
            .headers
            .insert("content-length", HeaderValue::from(body.len()));
        let request = Request::from_parts(parts, Full::new(body).map_err(|e| match e {}).boxed());

        let resp = match self.send(&proxy, up, request).await {
            Ok(r) => r,
            Err(e) => return self.failed(&proxy, idx, &host, model, started, &e),
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_headers(&mut parts.headers);
        let status = parts.status.as_u16();
        let me = self.clone();
        let provider_name = provider.name.clone();
        let full = self.spec.log == LogMode::Full;
        let tap = Tap {
            inner: body,
            head: Vec::new(),
            head_cap: if full { LOG_CAP } else { USAGE_KEEP },
            tail: VecDeque::new(),
            hasher: Sha256::new(),
            bytes: 0,
            _permit: permit,
            done: Some(Box::new(move |seen: Seen, error: Option<String>| {
                let (input, output) = usage(&seen.head, &seen.tail);
                let reported = match (input, output) {
                    (None, None) => None,
                    (i, o) => Some(i.unwrap_or(0) + o.unwrap_or(0)),
                };
                me.settle(reservation, reported);
                let (body, sha256) = match me.spec.log {
                    LogMode::MetadataOnly => (None, None),
                    LogMode::Hash => (None, Some(seen.hash)),
                    LogMode::Full => (
                        Some(me.redact(logged(&seen.head, seen.bytes))),
                        Some(seen.hash),
                    ),
                };
                proxy.record(NetEvent::LlmResponse {
                    provider: provider_name,
                    host,
                    model,
                    status,
                    bytes: seen.bytes,
                    duration_ms: started.elapsed().as_millis() as u64,
                    input_tokens: input,
                    output_tokens: output,
                    limited: None,
                    error,
                    body,
                    sha256,
                });
            })),
        };
        Response::from_parts(parts, tap.boxed())
    }

    fn failed(
        &self,
        proxy: &Proxy,
        idx: usize,
        host: &str,
        model: Option<String>,
        started: Instant,
        e: &str,
    ) -> Response<Body> {
        proxy.record(NetEvent::LlmResponse {
            provider: self.provider_name(idx),
            host: host.to_string(),
            model,
            status: 502,
            bytes: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            input_tokens: None,
            output_tokens: None,
            limited: None,
            error: Some(crate::proxy::clip(e)),
            body: None,
            sha256: None,
        });
        text(
            StatusCode::BAD_GATEWAY,
            format!("aibox: LLM upstream: {e}\n"),
        )
    }

    /// Connects to the upstream (address checked like any destination)
    /// over TLS and sends one request.
    async fn send(
        &self,
        proxy: &Proxy,
        up: &Upstream,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, String> {
        let t = proxy
            .resolve_checked(
                up.host.clone(),
                up.port,
                Access::Tunnel,
                "network.llm_gateway".into(),
            )
            .await
            .map_err(|d| format!("{}:{}: {}", d.host, d.port, d.reason))?;
        let mut sender = tls_http1(proxy, &t, &up.client).await?;
        sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())
    }
}

/// An HTTP/1.1 connection over verified TLS (`client`) to the approved
/// destination `t`, for the gateway and the credential injector.
pub(crate) async fn tls_http1<B>(
    proxy: &Proxy,
    t: &crate::proxy::Target,
    client: &Arc<rustls::ClientConfig>,
) -> Result<hyper::client::conn::http1::SendRequest<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = proxy
        .connect(t)
        .await
        .map_err(|e| format!("connecting to {}: {e}", t.addr))?;
    let name = ServerName::try_from(t.host.to_string()).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsConnector::from(client.clone()).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS with {}: {e}", t.host))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The fields of a request body the gateway reads. Lenient like the
/// usual JSON readers (the last of duplicate keys wins; a field of
/// another type is ignored, not fatal), and without building the rest of
/// the body: other values are skipped, the read ones are borrowed raw.
#[derive(Default)]
struct RequestFields {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
}

impl RequestFields {
    fn read(body: &[u8]) -> RequestFields {
        serde_json::from_slice::<RequestFields>(body).unwrap_or_default()
    }
}

impl<'de> Deserialize<'de> for RequestFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RequestFields;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RequestFields, A::Error> {
                let mut out = RequestFields::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "model" | "max_tokens" | "max_completion_tokens" => {
                            let raw: &'de serde_json::value::RawValue = map.next_value()?;
                            let text = raw.get();
                            match key.as_ref() {
                                "model" => {
                                    out.model = serde_json::from_str::<String>(text).ok();
                                }
                                "max_tokens" => {
                                    out.max_tokens = serde_json::from_str::<u64>(text).ok();
                                }
                                _ => {
                                    out.max_completion_tokens =
                                        serde_json::from_str::<u64>(text).ok();
                                }
                            }
                        }
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// At most [`LOG_CAP`] bytes of a body as text, marked when cut.
fn logged(kept: &[u8], total: u64) -> String {
    let shown = kept.len().min(LOG_CAP);
    let mut t = String::from_utf8_lossy(&kept[..shown]).into_owned();
    if total > shown as u64 {
        t.push_str(&format!("…[aibox: {total} bytes in all, cut at {LOG_CAP}]"));
    }
    t
}

/// What a response's tap saw.
struct Seen {
    head: Vec<u8>,
    tail: Vec<u8>,
    hash: String,
    bytes: u64,
}

type Done = Box<dyn FnOnce(Seen, Option<String>) + Send + Sync>;

/// Passes a response through frame by frame while keeping its start
/// (for `full` logging, or enough for token counts) and its end (where
/// totals are reported); reports once at the end.
struct Tap {
    inner: Incoming,
    head: Vec<u8>,
    head_cap: usize,
    tail: VecDeque<u8>,
    hasher: Sha256,
    bytes: u64,
    /// Held until the response is done (the gateway's concurrency bound).
    _permit: tokio::sync::OwnedSemaphorePermit,
    done: Option<Done>,
}

impl Tap {
    fn keep(&mut self, d: &[u8]) {
        self.bytes += d.len() as u64;
        self.hasher.update(d);
        let room = self.head_cap.saturating_sub(self.head.len());
        let (h, rest) = d.split_at(d.len().min(room));
        self.head.extend_from_slice(h);
        self.tail.extend(rest);
        let over = self.tail.len().saturating_sub(USAGE_KEEP);
        self.tail.drain(..over);
    }

    fn finish(&mut self, error: Option<String>) {
        if let Some(f) = self.done.take() {
            let seen = Seen {
                head: std::mem::take(&mut self.head),
                tail: std::mem::take(&mut self.tail).into(),
                hash: hex::encode(std::mem::take(&mut self.hasher).finalize()),
                bytes: self.bytes,
            };
            f(seen, error);
        }
    }
}

impl hyper::body::Body for Tap {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let d = d.clone();
                    self.keep(&d);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let e = e.to_string();
                self.finish(Some(e));
            }
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if self.done.is_some() {
            let e = (!hyper::body::Body::is_end_stream(&self.inner))
                .then(|| "the sandbox stopped reading the response".to_string());
            self.finish(e);
        }
    }
}

/// Token counts in a response, from its kept start and end: the largest
/// value of each usage key found (Anthropic streams report input tokens
/// at the start and output tokens at the end; OpenAI in a final `usage`
/// object or chunk). Read as text, so that a body cut in the middle
/// still counts.
fn usage(head: &[u8], tail: &[u8]) -> (Option<u64>, Option<u64>) {
    let mut input = None;
    let mut output = None;
    for part in [head, tail] {
        let text = String::from_utf8_lossy(part);
        for (keys, slot) in [
            (["\"input_tokens\"", "\"prompt_tokens\""], &mut input),
            (["\"output_tokens\"", "\"completion_tokens\""], &mut output),
        ] {
            for key in keys {
                let mut rest: &str = &text;
                while let Some(at) = rest.find(key) {
                    rest = &rest[at + key.len()..];
                    let v = rest.trim_start().strip_prefix(':').map(str::trim_start);
                    let digits: String = v
                        .unwrap_or("")
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .take(18)
                        .collect();
                    if let Ok(n) = digits.parse::<u64>() {
                        *slot = Some(slot.map_or(n, |x: u64| x.max(n)));
                    }
                }
            }
        }
    }
    (input, output)
}

pub(crate) fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA that may only sign `names` (name constraints), and a certificate
/// for all of them; the CA's key exists only in this process.
pub(crate) fn certificates(
    names: &[String],
    common_name: &str,
) -> Result<(String, Arc<rustls::ServerConfig>), GatewayError> {
    let err = |e: rcgen::Error| GatewayError::Ca(e.to_string());
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: names
            .iter()
            .map(|n| rcgen::GeneralSubtree::DnsName(n.clone()))
            .collect(),
        excluded_subtrees: Vec::new(),
    });
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).map_err(err)?;
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut leaf = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    leaf.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &ca).map_err(err)?;
    let mut server = rustls::ServerConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Ca(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), ca.der().clone()],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                .map_err(|e| GatewayError::Ca(e.to_string()))?,
        )
        .map_err(|e| GatewayError::Ca(e.to_string()))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca.pem(), Arc::new(server)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rpm: u32, tpm: u64) -> GatewaySpec {
        GatewaySpec {
            providers: vec![
                ProviderSpec {
                    name: "a".into(),
                    host: "llm.test".into(),
                    style: KeyStyle::Anthropic,
                    key: Secret::new("sk-real-a".into()),
                    upstream: "https://llm.test".into(),
                    upstream_ca_pem: None,
                },
                ProviderSpec {
                    name: "b".into(),
                    host: "other.test".into(),
                    style: KeyStyle::Openai,
                    key: Secret::new("sk-real-b".into()),
                    upstream: "https://up.test:8443/v1/".into(),
                    upstream_ca_pem: None,
                },
            ],
            routes: vec![RouteSpec {
                model: "gpt-*".into(),
                provider: "b".into(),
            }],
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_body_bytes: 1024,
            log: LogMode::Full,
        }
    }

    #[test]
    fn usage_from_json_and_streams() {
        let u = |b: &[u8]| usage(b, b"");
        assert_eq!(
            u(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#),
            (Some(3), Some(4))
        );
        assert_eq!(
            u(br#"{"usage": {"prompt_tokens" : 5, "completion_tokens":6}}"#),
            (Some(5), Some(6))
        );
        let sse = b"event: message_start\ndata: {\"message\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"usage\":{\"output_tokens\":40}}\n\ndata: [DONE]\n";
        assert_eq!(u(sse), (Some(9), Some(40)));
        assert_eq!(u(b"not json"), (None, None));
        // A long body cut in the middle: the counts at its end still count.
        assert_eq!(
            usage(
                br#"{"id":"x","content":"aaaa"#,
                br#"aaaa"}],"usage":{"input_tokens":12,"output_tokens":34}}"#
            ),
            (Some(12), Some(34))
        );
    }

    #[test]
    fn limits_per_minute() {
        let g = Gateway::new(spec(2, 0)).unwrap();
        assert!(g.admit(0).is_ok());
        assert!(g.admit(0).is_ok());
        let (limit, retry) = g.admit(0).unwrap_err();
        assert_eq!(limit, "requests_per_minute");
        assert!((1..=60).contains(&retry));

        // Tokens: reported counts replace the reservation.
        let g = Gateway::new(spec(0, 100)).unwrap();
        let a = g.admit(10).unwrap();
        g.settle(a, Some(60));
        let b = g.admit(10).unwrap();
        g.settle(b, Some(50));
        let (limit, retry) = g.admit(1).unwrap_err();
        assert_eq!(limit, "tokens_per_minute");
        assert!((1..=60).contains(&retry));
        // Reservations count before any response reports: parallel
        // requests cannot all get in, and a response that reports nothing
        // keeps its estimate.
        let g = Gateway::new(spec(0, 100)).unwrap();
        let _a = g.admit(70).unwrap();
        assert_eq!(g.admit(40).unwrap_err().0, "tokens_per_minute");
        assert!(g.admit(30).is_ok());
        // Tokens reported at the end count from the end.
        let g = Gateway::new(spec(0, 100)).unwrap();
        let a = g.admit(10).unwrap();
        {
            let mut w = g.window.lock().unwrap();
            for e in w.tokens.iter_mut() {
                e.0 = e.0.checked_sub(Duration::from_secs(61)).unwrap();
            }
        }
        g.settle(a, Some(100));
        assert_eq!(g.admit(1).unwrap_err().0, "tokens_per_minute");
        // One request bigger than the budget still runs alone.
        let g = Gateway::new(spec(0, 100)).unwrap();
        assert!(g.admit(500).is_ok());
        assert!(g.admit(1).is_err());
    }

    #[test]
    fn request_fields_are_read_leniently() {
        let f = RequestFields::read(
            br#"{"messages":[{"a":[1,2,3]}],"model":"first","max_tokens":"100","model":"second","max_completion_tokens":64}"#,
        );
        assert_eq!(f.model.as_deref(), Some("second"));
        assert_eq!(f.max_tokens, None);
        assert_eq!(f.max_completion_tokens, Some(64));
        let f = RequestFields::read(br#"{"model":["not","a","string"],"max_tokens":1.5}"#);
        assert_eq!((f.model, f.max_tokens), (None, None));
        assert!(RequestFields::read(b"not json").model.is_none());
        let f = RequestFields::read(br#"{"model":"caf\u00e9"}"#);
        assert_eq!(f.model.as_deref(), Some("café"));
    }

    #[test]
    fn logged_bodies_are_cut_and_marked() {
        let big = vec![b'a'; LOG_CAP + 10];
        let t = logged(&big, big.len() as u64);
        assert!(t.ends_with(&format!(
            "…[aibox: {} bytes in all, cut at {LOG_CAP}]",
            LOG_CAP + 10
        )));
        assert_eq!(logged(b"abc", 3), "abc");
    }

    #[test]
    fn routes_and_upstreams() {
        let g = Gateway::new(spec(0, 0)).unwrap();
        assert_eq!(g.route(Some("gpt-4o"), 0), 1);
        assert_eq!(g.route(Some("claude-3"), 0), 0);
        assert_eq!(g.route(None, 1), 1);
        assert_eq!(g.upstreams[1].port, 8443);
        assert_eq!(g.upstreams[1].base, "/v1");
        assert_eq!(g.provider_for(&Host::Name("llm.test".into()), 443), Some(0));
        assert_eq!(g.provider_for(&Host::Name("llm.test".into()), 8443), None);
        assert_eq!(g.provider_for(&Host::Name("evil.test".into()), 443), None);
        assert!(g.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn keys_never_reach_a_logged_body() {
        let g = Gateway::new(spec(0, 0)).unwrap();
        let (body, hash) = g.body_fields(br#"{"echo":"sk-real-a and sk-real-b"}"#);
        let body = body.unwrap();
        assert!(!body.contains("sk-real"), "{body}");
        assert_eq!(hash.map(|h| h.len()), Some(64));
        assert_eq!(format!("{:?}", Secret::new("sk-x".into())), "Secret(…)");
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec(0, 0);
        s.providers[0].upstream = "http://llm.test".into();
        assert!(
            Gateway::new(s)
                .unwrap_err()
                .to_string()
                .contains("https://")
        );
        let mut s = spec(0, 0);
        s.routes[0].provider = "nope".into();
        assert!(
            Gateway::new(s)
                .unwrap_err()
                .to_string()
                .contains("not configured")
        );
        let mut s = spec(0, 0);
        s.providers[1].host = "llm.test".into();
        assert!(
            Gateway::new(s)
                .unwrap_err()
                .to_string()
                .contains("same host")
        );
        let mut s = spec(0, 0);
        s.providers[0].key = Secret::default();
        assert!(
            Gateway::new(s)
                .unwrap_err()
                .to_string()
                .contains("no API key")
        );
    }
}
