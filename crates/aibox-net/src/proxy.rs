//! The egress proxy that runs in the supervisor. Every byte a sandbox
//! sends to the outside passes here: HTTP/1.1 forward proxying
//! (absolute-form), CONNECT tunnels, transparent connections to synthetic
//! addresses, and DNS. It decides with the allowlist, resolves names
//! itself, refuses non-public addresses unless a rule names them, connects
//! to exactly the address it checked, and reports every decision.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixListener};

use crate::dns::{self, SYNTHETIC_PREFIX, Synthetic};
use crate::host::{Host, parse_host, split_authority};
use crate::rules::{Access, Allowlist};
use crate::tls::{self, Hello};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a tunnel may stay open before the sandbox sent its first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(120);

/// How a connection reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through the proxy port (`HTTP_PROXY`).
    Proxy,
    /// Through a synthetic address handed out by the DNS answerer.
    Transparent,
}

impl Via {
    /// Name used in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Proxy => "proxy",
            Via::Transparent => "transparent",
        }
    }
}

/// What the proxy reports to the audit log.
#[derive(Debug, Clone, PartialEq)]
pub enum NetEvent {
    /// A connection or request that policy allowed, reported when it ends.
    Allow {
        /// Canonical host.
        host: String,
        /// Destination port.
        port: u16,
        /// HTTP method, or `CONNECT` for tunnels.
        method: String,
        /// The address actually connected to.
        address: String,
        /// The rule that allowed it.
        rule: String,
        /// Bytes sent by the sandbox.
        bytes_up: u64,
        /// Bytes received by the sandbox.
        bytes_down: u64,
        /// Connection lifetime.
        duration_ms: u64,
        /// Proxy port or transparent.
        via: Via,
        /// Why it failed after being allowed (upstream unreachable...).
        error: Option<String>,
    },
    /// A refused connection or request.
    Deny {
        /// Host as requested (canonical when it parsed).
        host: String,
        /// Destination port (0 when unknown).
        port: u16,
        /// HTTP method, or `CONNECT`.
        method: String,
        /// Why.
        reason: String,
        /// Proxy port or transparent.
        via: Via,
    },
    /// A DNS query from inside.
    DnsQuery {
        /// The queried name.
        name: String,
        /// Query type.
        qtype: String,
    },
    /// The answer to it.
    DnsResponse {
        /// The queried name.
        name: String,
        /// Query type.
        qtype: String,
        /// Response code.
        rcode: String,
        /// Synthetic address given, if any.
        address: Option<Ipv4Addr>,
    },
    /// A request the LLM gateway received (and will send on).
    LlmRequest {
        /// Provider the request goes to (after routing).
        provider: String,
        /// Host the sandbox connected to.
        host: String,
        /// `model` from the JSON body, if any.
        model: Option<String>,
        /// HTTP method.
        method: String,
        /// Path and query.
        path: String,
        /// Body size.
        bytes: u64,
        /// Proxy port or transparent.
        via: Via,
        /// The body (`full` logging).
        body: Option<String>,
        /// SHA-256 of the body (`hash` and `full` logging).
        sha256: Option<String>,
    },
    /// The gateway's answer: the upstream's, or its own refusal.
    LlmResponse {
        /// Provider.
        provider: String,
        /// Host the sandbox connected to.
        host: String,
        /// `model` of the request.
        model: Option<String>,
        /// HTTP status sent to the sandbox.
        status: u16,
        /// Response body size.
        bytes: u64,
        /// From request to the end of the response.
        duration_ms: u64,
        /// Prompt tokens the upstream reported.
        input_tokens: Option<u64>,
        /// Completion tokens the upstream reported.
        output_tokens: Option<u64>,
        /// The gateway limit that refused the request, if one did.
        limited: Option<String>,
        /// What went wrong, if something did.
        error: Option<String>,
        /// The body (`full` logging; up to 4 MiB).
        body: Option<String>,
        /// SHA-256 of the whole body (`hash` and `full` logging).
        sha256: Option<String>,
    },
    /// A git push the proxy refused: to a remote that is not one of the
    /// workspace's, or straight to a remote whose pushes are reviewed or
    /// blocked.
    Push {
        /// The remote (normalized URL).
        url: String,
        /// HTTP method.
        method: String,
        /// The remote is not one of the workspace's.
        foreign: bool,
        /// Why.
        reason: String,
        /// Proxy port or transparent.
        via: Via,
    },
    /// A credential placeholder the proxy saw: put in (allowed) or
    /// refused as misuse.
    Credential {
        /// The credential's name (`unknown` for a placeholder of none).
        credential: String,
        /// Its type.
        kind: String,
        /// Host the request went to.
        host: String,
        /// Its port.
        port: u16,
        /// HTTP method.
        method: String,
        /// Whether the real value was put in.
        allowed: bool,
        /// `header`, `url` or `body`.
        place: String,
        /// Why it was refused.
        reason: Option<String>,
        /// Proxy port or transparent.
        via: Via,
    },
}

/// Receives the proxy's events (the supervisor writes them to the audit log).
pub trait Sink: Send + Sync {
    /// Records one event.
    fn record(&self, event: NetEvent);

    /// Whether events are being recorded. While they are not (the audit
    /// log cannot be written), the proxy lets nothing through and the DNS
    /// answers nothing: no traffic goes unrecorded.
    fn healthy(&self) -> bool {
        true
    }
}

/// Running totals, shown by `status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Allowed connections and requests.
    pub allowed: AtomicU64,
    /// Denied connections and requests.
    pub denied: AtomicU64,
    /// DNS queries answered with an address.
    pub dns_resolved: AtomicU64,
    /// DNS queries refused (NXDOMAIN and errors).
    pub dns_refused: AtomicU64,
}

/// The proxy of one sandbox.
pub struct Proxy {
    allow: Allowlist,
    synth: Mutex<Synthetic>,
    sink: Arc<dyn Sink>,
    /// Totals for `status`.
    pub counters: Counters,
    /// Bounds the connections served at once, so a sandbox cannot exhaust
    /// the supervisor's descriptors or memory: beyond it, new connections
    /// wait in the kernel's backlog.
    slots: Arc<tokio::sync::Semaphore>,
    /// The LLM gateway, which terminates connections to its hosts.
    gateway: Option<Arc<crate::gateway::Gateway>>,
    /// The credential injector, which terminates connections to the
    /// hosts its credentials are bound to.
    injector: Option<Arc<crate::inject::Injector>>,
    /// The git push rules and broker.
    push: Option<Arc<PushGuard>>,
    /// One broker request at a time (each spools a bundle to disk).
    broker_slot: Arc<tokio::sync::Semaphore>,
}

/// aibox's own service behind the proxy at `http://aibox.internal/`: the
/// git push broker.
pub trait Broker: Send + Sync {
    /// A new file to spool a request body into, and the most bytes taken.
    fn spool(&self) -> Result<(std::path::PathBuf, u64), String>;
    /// Handles one request whose body is in `body` (blocking: it runs
    /// git). Returns the status and the answer's body.
    fn handle(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: &std::path::Path,
    ) -> (StatusCode, String);
}

/// What the proxy enforces about git pushes it can see (plain HTTP, and
/// HTTPS to hosts the injector terminates).
pub struct PushGuard {
    /// The workspace's remotes (normalized, see [`aibox_push::normalize`]):
    /// pushes anywhere else are refused.
    pub remotes: Vec<String>,
    /// Whether pushes to them may go straight through (`git push` is
    /// `safe`); otherwise only the broker's queue takes them.
    pub direct: bool,
    /// The push broker.
    pub broker: Option<Arc<dyn Broker>>,
}

impl PushGuard {
    /// Why a push may not go out directly.
    fn not_direct(&self) -> &'static str {
        if self.broker.is_some() {
            "pushes from this sandbox are reviewed: push with git as usual (aibox queues it), not around the queue"
        } else {
            "the policy blocks git push from this sandbox"
        }
    }
}

impl std::fmt::Debug for PushGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushGuard")
            .field("remotes", &self.remotes)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

/// How long the broker waits for each part of a pushed bundle.
const BROKER_BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections (and DNS-over-TCP streams) one sandbox may have open at once.
pub const MAX_CONNECTIONS: usize = 512;

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// A client connection's kept upstream connection (see `http_conn`).
type Pool = Arc<tokio::sync::Mutex<Option<Upstream>>>;

/// An upstream HTTP/1 connection and what it was opened for.
struct Upstream {
    addr: SocketAddr,
    host: Host,
    port: u16,
    sender: hyper::client::conn::http1::SendRequest<Incoming>,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

/// A response body that reports once when it ends: fully sent (no
/// error), failed, or dropped early (the client went away).
struct Finished {
    inner: Incoming,
    done: Option<Box<dyn FnOnce(Option<String>) + Send + Sync>>,
}

impl hyper::body::Body for Finished {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => {
                if let Some(f) = self.done.take() {
                    f(None)
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let e = e.to_string();
                if let Some(f) = self.done.take() {
                    f(Some(e))
                }
            }
            _ => {}
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

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(f) = self.done.take() {
            f(if hyper::body::Body::is_end_stream(&self.inner) {
                None
            } else {
                Some("the client stopped reading the response".into())
            })
        }
    }
}

/// An approved destination.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) host: Host,
    pub(crate) port: u16,
    pub(crate) addr: SocketAddr,
    rule: String,
}

/// A refusal, with the fix to offer.
#[derive(Debug, Clone)]
pub(crate) struct Denial {
    pub(crate) status: StatusCode,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) reason: String,
    pub(crate) fix: String,
}

pub(crate) fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Counts bytes in each direction of a stream.
struct Counted<S> {
    inner: S,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.down
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.up.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream whose first bytes were already read: they are replayed first.
struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The accepted connection, or None after a pause: errors such as EMFILE
/// would otherwise repeat at once and spin.
async fn accepted<T>(r: std::io::Result<T>) -> Option<T> {
    match r {
        Ok(x) => Some(x),
        Err(_) => {
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// Runs `fut` as a task that holds `slot` (a connection's place under
/// [`MAX_CONNECTIONS`]) until it ends.
fn spawn_holding<F>(slot: Option<tokio::sync::OwnedSemaphorePermit>, fut: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        fut.await;
        drop(slot);
    });
}

/// At most 256 characters of `s`, marked when cut.
pub(crate) fn clip(s: &str) -> String {
    match s.char_indices().nth(256) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Whether the first bytes of a tunnel are an HTTP request.
#[derive(Debug, PartialEq, Eq)]
enum PlainHttp {
    Yes,
    No,
    NeedMore,
}

/// The longest request line waited for before a tunnel is judged.
const MAX_REQUEST_LINE: usize = 8192;

/// Judges the first bytes of a tunnel: an HTTP/1 request line (any
/// token as method, after any number of leading empty lines, which servers
/// skip) or the HTTP/2 preface is plain HTTP, whose `Host` could name any
/// site behind the approved address. A first line that does not mention
/// `HTTP/` (SMTP's `EHLO x`, RTSP, SIP) or that carries a NUL (git's
/// pkt-lines) is not. Fails closed: a buffer that could still become a
/// request line when the limit is reached counts as one.
fn plain_http(first: &[u8]) -> PlainHttp {
    let full = first.len() >= MAX_REQUEST_LINE;
    let undecided = || {
        if full {
            PlainHttp::Yes
        } else {
            PlainHttp::NeedMore
        }
    };
    let start = first
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n' | b' ' | b'\t'))
        .unwrap_or(first.len());
    let rest = &first[start..];
    if rest.is_empty() {
        return undecided();
    }
    const H2: &[u8] = b"PRI * HTTP/2";
    let n = H2.len().min(rest.len());
    if rest[..n] == H2[..n] {
        return if n == H2.len() {
            PlainHttp::Yes
        } else {
            undecided()
        };
    }
    let line_end = rest.iter().position(|b| *b == b'\n');
    let line = &rest[..line_end.unwrap_or(rest.len())];
    if line.contains(&0) {
        return PlainHttp::No;
    }
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let token = line.iter().take_while(|b| tchar(b)).count();
    if token == 0 || token > 32 {
        return PlainHttp::No;
    }
    match line.get(token) {
        None if line_end.is_none() => return undecided(),
        Some(b' ') => {}
        _ => return PlainHttp::No,
    }
    let mentions_http = line.windows(5).any(|w| w.eq_ignore_ascii_case(b"HTTP/"));
    match (mentions_http, line_end) {
        (true, _) => PlainHttp::Yes,
        (false, Some(_)) => PlainHttp::No,
        (false, None) => undecided(),
    }
}

/// Headers that belong to one hop and are never forwarded.
pub(crate) fn strip_hop_headers(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

impl Proxy {
    /// A proxy deciding with `allow` and reporting to `sink`.
    pub fn new(allow: Allowlist, sink: Arc<dyn Sink>) -> Arc<Proxy> {
        Proxy::with_gateway(allow, sink, None)
    }

    /// A proxy whose connections to `gateway`'s hosts (port 443) go to the
    /// gateway instead of being tunnelled. The allowlist must allow those
    /// hosts, so that the DNS answers for them.
    pub fn with_gateway(
        allow: Allowlist,
        sink: Arc<dyn Sink>,
        gateway: Option<Arc<crate::gateway::Gateway>>,
    ) -> Arc<Proxy> {
        Proxy::with_intercept(allow, sink, gateway, None, None)
    }

    /// A proxy with the LLM gateway and the credential injector (each
    /// optional): connections to their hosts are terminated and served
    /// by them rather than tunnelled. `push` adds the git push rules and
    /// the broker.
    pub fn with_intercept(
        allow: Allowlist,
        sink: Arc<dyn Sink>,
        gateway: Option<Arc<crate::gateway::Gateway>>,
        injector: Option<Arc<crate::inject::Injector>>,
        push: Option<PushGuard>,
    ) -> Arc<Proxy> {
        Arc::new(Proxy {
            allow,
            synth: Mutex::new(Synthetic::default()),
            sink,
            counters: Counters::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            gateway,
            injector,
            push: push.map(Arc::new),
            broker_slot: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    /// Why a request for `path?query` on `scheme://host:port` may not go
    /// out, when it is a git push (smart HTTP) this sandbox may not send
    /// directly: `(foreign, url, reason)`.
    pub(crate) fn push_refusal(
        &self,
        scheme: &str,
        host: &Host,
        port: u16,
        uri: &hyper::Uri,
    ) -> Option<(bool, String, String)> {
        let guard = self.push.as_ref()?;
        let repo = aibox_push::receive_pack_repo(uri.path(), uri.query())?;
        let raw = format!("{scheme}://{host}:{port}{repo}");
        let url = aibox_push::normalize(&raw).unwrap_or(raw);
        if !guard.remotes.contains(&url) {
            return Some((
                true,
                url,
                "a git push to a remote that is not one of the workspace's remotes".into(),
            ));
        }
        if !guard.direct {
            return Some((false, url, guard.not_direct().into()));
        }
        None
    }

    /// Why a request carrying a git token may not go out while pushes
    /// are not direct: anything but a read (`GET`/`HEAD`, and git's
    /// fetch, `POST …/git-upload-pack`).
    pub(crate) fn git_write_refusal(
        &self,
        method: &Method,
        uri: &hyper::Uri,
        host: &Host,
        port: u16,
    ) -> Option<(bool, String, String)> {
        let guard = self.push.as_ref()?;
        if guard.direct || method == Method::GET || method == Method::HEAD {
            return None;
        }
        if method == Method::POST && aibox_push::upload_pack_repo(uri.path()).is_some() {
            return None;
        }
        Some((
            false,
            format!("https://{host}:{port}{}", uri.path()),
            format!(
                "{}; with a git token, only reads (GET, HEAD, git fetch) go to this host",
                guard.not_direct()
            ),
        ))
    }

    /// Refuses a push (see [`Proxy::push_refusal`]).
    pub(crate) fn refuse_push(
        &self,
        (foreign, url, reason): (bool, String, String),
        method: &str,
        via: Via,
    ) -> Response<Body> {
        self.record(NetEvent::Push {
            url: url.clone(),
            method: method.to_string(),
            foreign,
            reason: reason.clone(),
            via,
        });
        text(
            StatusCode::FORBIDDEN,
            format!("aibox: push to {url} refused: {reason}\n"),
        )
    }

    /// Serves `http://aibox.internal/`: spools the body to disk and hands
    /// it to the broker.
    async fn broker(&self, req: Request<Incoming>) -> Response<Body> {
        use std::io::Write as _;
        let Some(b) = self.push.as_ref().and_then(|p| p.broker.clone()) else {
            return text(
                StatusCode::NOT_FOUND,
                "aibox: pushes from this sandbox are not brokered (no push review)\n".into(),
            );
        };
        if req.method() != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "aibox: POST only\n".into());
        }
        let Ok(_one) = self.broker_slot.clone().acquire_owned().await else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "aibox: stopping\n".into());
        };
        let (path, max) = match b.spool() {
            Ok(x) => x,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("aibox: {e}\n")),
        };
        let (parts, mut body) = req.into_parts();
        let fail = |status, msg: &str| {
            let _ = std::fs::remove_file(&path);
            text(status, format!("aibox: {msg}\n"))
        };
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                return fail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("spooling the push: {e}"),
                );
            }
        };
        let mut n: u64 = 0;
        loop {
            match tokio::time::timeout(BROKER_BODY_TIMEOUT, body.frame()).await {
                Ok(None) => break,
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        n += data.len() as u64;
                        if n > max {
                            return fail(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                &format!("the push is larger than {max} bytes"),
                            );
                        }
                        if let Err(e) = file.write_all(&data) {
                            return fail(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                &format!("spooling the push: {e}"),
                            );
                        }
                    }
                }
                _ => return fail(StatusCode::BAD_REQUEST, "the push could not be read"),
            }
        }
        drop(file);
        let p = path.clone();
        let uri_path = parts.uri.path().to_string();
        let answer =
            tokio::task::spawn_blocking(move || b.handle(&uri_path, &parts.headers, &p)).await;
        let _ = std::fs::remove_file(&path);
        match answer {
            Ok((status, body)) => text(status, body),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "aibox: the push broker failed\n".into(),
            ),
        }
    }

    /// The injector, when `t` is a host its credentials are bound to.
    fn injector_for(&self, t: &Target) -> Option<Arc<crate::inject::Injector>> {
        self.injector
            .as_ref()
            .filter(|i| i.binds(&t.host, t.port))
            .cloned()
    }

    /// The gateway provider `host:port` belongs to.
    fn gateway_for(&self, host: &str, port: u16) -> Option<(Arc<crate::gateway::Gateway>, usize)> {
        let g = self.gateway.as_ref()?;
        let h = parse_host(host).ok()?;
        g.provider_for(&h, port).map(|i| (g.clone(), i))
    }

    /// Reports one event to the sink.
    pub(crate) fn record(&self, e: NetEvent) {
        self.sink.record(e);
    }

    /// The ports the transparent listeners should accept on.
    pub fn transparent_ports(&self) -> Vec<u16> {
        self.allow.transparent_ports()
    }

    fn deny(&self, d: &Denial, method: &str, via: Via) -> Response<Body> {
        self.counters.denied.fetch_add(1, Ordering::Relaxed);
        // Attacker-chosen strings are cut short: one refusal must not be
        // able to write a huge audit record.
        self.sink.record(NetEvent::Deny {
            host: clip(&d.host),
            port: d.port,
            method: clip(method),
            reason: clip(&d.reason),
            via,
        });
        let mut r = text(
            d.status,
            format!(
                "aibox: {}:{} blocked: {}\n{}\n",
                d.host, d.port, d.reason, d.fix
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&d.reason.replace(['\r', '\n'], " ")) {
            r.headers_mut().insert("x-aibox-denied", v);
        }
        r
    }

    /// Checks `host:port` against policy and resolves it to one address
    /// that is allowed; the caller connects to exactly that address.
    async fn decide(&self, raw_host: &str, port: u16, access: Access) -> Result<Target, Denial> {
        let deny = |status, host: &str, reason: String, fix: String| Denial {
            status,
            host: host.to_string(),
            port,
            reason,
            fix,
        };
        if !self.sink.healthy() {
            // (The refusal is recorded too: when that write succeeds again,
            // traffic flows again.)
            return Err(deny(
                StatusCode::SERVICE_UNAVAILABLE,
                &clip(raw_host),
                "the audit log cannot be written; aibox lets no traffic through that it cannot record".into(),
                "free space where aibox keeps its data (see the supervisor log)".into(),
            ));
        }
        let host = parse_host(raw_host).map_err(|e| {
            deny(
                StatusCode::BAD_REQUEST,
                &raw_host.escape_debug().to_string(),
                format!("malformed host: {e}"),
                "use a plain host name".into(),
            )
        })?;
        let shown = host.to_string();
        let Some(rule) = self.allow.rule_for(&host, port, access) else {
            let entry = match (&host, port, access) {
                (Host::Name(n), 443, _) => n.clone(),
                (Host::Name(n), 80, Access::Http) => n.clone(),
                _ => format!("{shown}:{port}"),
            };
            let why = match host {
                Host::Ip(_) => "no rule names this address (name rules never match IP literals)",
                Host::Name(_) => "no network rule allows this host and port",
            };
            return Err(deny(
                StatusCode::FORBIDDEN,
                &shown,
                why.into(),
                format!(
                    "to allow it, add `{entry}` to network.allowed_domains in the aibox config or policy"
                ),
            ));
        };
        let rule = rule.text.clone();
        self.resolve_checked(host, port, access, rule).await
    }

    /// Resolves an approved `host` to one address that is public or that
    /// a rule names (`rule` is what approved it, for the record).
    pub(crate) async fn resolve_checked(
        &self,
        host: Host,
        port: u16,
        access: Access,
        rule: String,
    ) -> Result<Target, Denial> {
        let shown = host.to_string();
        let deny = |status, host: &str, reason: String, fix: String| Denial {
            status,
            host: host.to_string(),
            port,
            reason,
            fix,
        };
        let candidates: Vec<IpAddr> = match &host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(n) => match self.allow.static_address(n) {
                Some(ip) => vec![ip],
                None => {
                    let lookup = tokio::time::timeout(
                        RESOLVE_TIMEOUT,
                        // Fully qualified: the host's search domains must
                        // not turn the name into another one.
                        tokio::net::lookup_host((format!("{n}."), port)),
                    )
                    .await;
                    match lookup {
                        Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                        Ok(Err(e)) => {
                            return Err(deny(
                                StatusCode::BAD_GATEWAY,
                                &shown,
                                format!("the name does not resolve: {e}"),
                                "check the host name".into(),
                            ));
                        }
                        Err(_) => {
                            return Err(deny(
                                StatusCode::GATEWAY_TIMEOUT,
                                &shown,
                                "resolving the name timed out".into(),
                                "retry later".into(),
                            ));
                        }
                    }
                }
            },
        };
        let mut refused = None;
        for ip in candidates {
            let ip = ip.to_canonical();
            match crate::addr::restricted(ip) {
                Some(why) if !self.allow.names_address(ip, port, access) => {
                    refused.get_or_insert((ip, why));
                }
                _ => {
                    return Ok(Target {
                        host,
                        port,
                        addr: SocketAddr::new(ip, port),
                        rule,
                    });
                }
            }
        }
        let (ip, why) = refused.unwrap_or((IpAddr::V4(Ipv4Addr::UNSPECIFIED), "no address"));
        Err(deny(
            StatusCode::FORBIDDEN,
            &shown,
            format!("resolves to {ip}, a {why} address"),
            format!(
                "only a rule naming the address may reach it: add `{ip}:{port}` to network.allowed_domains if the sandbox really must"
            ),
        ))
    }

    pub(crate) async fn connect(&self, t: &Target) -> std::io::Result<TcpStream> {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(t.addr)).await {
            Ok(r) => r.inspect(|s| drop(s.set_nodelay(true))),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )),
        }
    }

    pub(crate) fn allowed(
        &self,
        t: &Target,
        method: &str,
        via: Via,
        (up, down): (u64, u64),
        started: Instant,
        error: Option<String>,
    ) {
        self.counters.allowed.fetch_add(1, Ordering::Relaxed);
        self.sink.record(NetEvent::Allow {
            host: t.host.to_string(),
            port: t.port,
            method: clip(method),
            address: t.addr.to_string(),
            rule: t.rule.clone(),
            bytes_up: up,
            bytes_down: down,
            duration_ms: started.elapsed().as_millis() as u64,
            via,
            error,
        });
    }

    /// Serves the proxy port (HTTP proxy protocol).
    pub async fn serve_proxy(self: Arc<Self>, listener: TcpListener) {
        loop {
            let slot = self.slot().await;
            if let Some((s, _)) = accepted(listener.accept().await).await {
                // Proxied exchanges are small and latency-bound.
                let _ = s.set_nodelay(true);
                spawn_holding(slot, self.clone().http_conn(s, None));
            }
        }
    }

    async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    /// Serves transparent connections to synthetic addresses.
    pub async fn serve_transparent(self: Arc<Self>, listener: TcpListener) {
        loop {
            let slot = self.slot().await;
            if let Some((s, _)) = accepted(listener.accept().await).await
                && let Ok(local) = s.local_addr()
            {
                let _ = s.set_nodelay(true);
                spawn_holding(slot, self.clone().transparent(s, local));
            }
        }
    }

    /// Serves DNS over UDP.
    pub async fn serve_dns_udp(self: Arc<Self>, socket: UdpSocket) {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            if let Some(reply) = self.dns_message(&buf[..n]) {
                let _ = socket.send_to(&reply, from).await;
            }
        }
    }

    /// Serves DNS over TCP (length-prefixed messages).
    pub async fn serve_dns_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let slot = self.slot().await;
            if let Some((s, _)) = accepted(listener.accept().await).await {
                spawn_holding(slot, self.clone().dns_stream(s));
            }
        }
    }

    /// Serves relayed connections from an in-sandbox forwarder (container
    /// backends). Each connection starts with one line saying what it is:
    /// `PROXY`, `TRANSPARENT a.b.c.d:port` or `DNS`. The line grants
    /// nothing: whatever follows is decided exactly as if it had arrived on
    /// the matching listener.
    pub async fn serve_relay(self: Arc<Self>, listener: UnixListener) {
        loop {
            let slot = self.slot().await;
            if let Some((s, _)) = accepted(listener.accept().await).await {
                spawn_holding(slot, self.clone().relayed(s));
            }
        }
    }

    async fn relayed(self: Arc<Self>, mut s: tokio::net::UnixStream) {
        let mut line = Vec::new();
        let read = tokio::time::timeout(HEADER_TIMEOUT, async {
            loop {
                let b = s.read_u8().await?;
                if b == b'\n' {
                    return Ok::<_, std::io::Error>(true);
                }
                line.push(b);
                if line.len() > 64 {
                    return Ok(false);
                }
            }
        })
        .await;
        if !matches!(read, Ok(Ok(true))) {
            return;
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        match line.split_once(' ') {
            None if line == "PROXY" => self.http_conn(s, None).await,
            None if line == "DNS" => self.dns_stream(s).await,
            Some(("TRANSPARENT", addr)) => {
                if let Ok(local) = addr.parse::<SocketAddr>() {
                    self.transparent(s, local).await;
                }
            }
            _ => {}
        }
    }

    fn dns_message(&self, query: &[u8]) -> Option<Vec<u8>> {
        if !self.sink.healthy() {
            // Unrecorded, unanswered (the next healthy query is answered).
            return None;
        }
        let a = {
            let mut synth = self.synth.lock().unwrap_or_else(|e| e.into_inner());
            dns::answer(query, &self.allow, &mut synth)
        };
        self.sink.record(NetEvent::DnsQuery {
            name: a.name.clone(),
            qtype: a.qtype.clone(),
        });
        if a.address.is_some() {
            self.counters.dns_resolved.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.dns_refused.fetch_add(1, Ordering::Relaxed);
        }
        self.sink.record(NetEvent::DnsResponse {
            name: a.name,
            qtype: a.qtype,
            rcode: a.rcode,
            address: a.address,
        });
        a.reply
    }

    async fn dns_stream<S: AsyncRead + AsyncWrite + Unpin>(self: Arc<Self>, mut s: S) {
        loop {
            let Ok(Ok(len)) = tokio::time::timeout(HEADER_TIMEOUT, s.read_u16()).await else {
                return;
            };
            let mut q = vec![0u8; len as usize];
            if !matches!(
                tokio::time::timeout(HEADER_TIMEOUT, s.read_exact(&mut q)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let Some(reply) = self.dns_message(&q) else {
                return;
            };
            let Ok(n) = u16::try_from(reply.len()) else {
                return;
            };
            if s.write_u16(n).await.is_err() || s.write_all(&reply).await.is_err() {
                return;
            }
        }
    }

    async fn transparent<S>(self: Arc<Self>, s: S, local: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let port = local.port();
        let name = match local.ip() {
            IpAddr::V4(a) if a.octets()[..2] == SYNTHETIC_PREFIX => {
                let synth = self.synth.lock().unwrap_or_else(|e| e.into_inner());
                synth.name(a).map(str::to_string)
            }
            _ => None,
        };
        let Some(name) = name else {
            let d = Denial {
                status: StatusCode::FORBIDDEN,
                host: local.ip().to_string(),
                port,
                reason: "connection to an address the aibox DNS did not hand out".into(),
                fix: "connect by host name, through the proxy".into(),
            };
            let _ = self.deny(&d, "CONNECT", Via::Transparent);
            return;
        };
        if let Some((g, idx)) = self.gateway_for(&name, port) {
            self.counters.allowed.fetch_add(1, Ordering::Relaxed);
            g.serve(self.clone(), s, idx, Via::Transparent).await;
            return;
        }
        // Plain HTTP (on any port) is served request by request, so that
        // every Host header is checked; anything else is a tunnel.
        let mut s = s;
        let mut first = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + FIRST_BYTES_TIMEOUT;
        let is_http = loop {
            // (Closed, or not decidable in time: nothing is forwarded.)
            let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut chunk)).await else {
                return;
            };
            if n == 0 {
                return;
            }
            first.extend_from_slice(&chunk[..n]);
            match plain_http(&first) {
                PlainHttp::Yes => break true,
                PlainHttp::No => break false,
                PlainHttp::NeedMore => {}
            }
        };
        let s = Prefixed {
            prefix: first,
            at: 0,
            inner: s,
        };
        if is_http {
            return self.http_conn(s, Some((name, port))).await;
        }
        let started = Instant::now();
        match self.decide(&name, port, Access::Tunnel).await {
            Ok(t) if self.injector_for(&t).is_some() => {
                if let Some(inj) = self.injector_for(&t) {
                    inj.serve(self.clone(), s, t, Via::Transparent).await;
                }
            }
            Ok(t) => match self.connect(&t).await {
                Ok(up) => {
                    self.tunnel(s, up, t, "CONNECT", Via::Transparent, started)
                        .await
                }
                Err(e) => self.allowed(
                    &t,
                    "CONNECT",
                    Via::Transparent,
                    (0, 0),
                    started,
                    Some(e.to_string()),
                ),
            },
            Err(d) => {
                let _ = self.deny(&d, "CONNECT", Via::Transparent);
            }
        }
    }

    /// Serves HTTP/1.1 on one connection: proxy requests, or (with
    /// `transparent_name`) origin requests that must be for that name.
    async fn http_conn<S>(self: Arc<Self>, s: S, transparent_name: Option<(String, u16)>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let me = self.clone();
        let name = Arc::new(transparent_name);
        // This client connection's upstream connection, kept for its next
        // request to the same checked destination (never shared between
        // client connections).
        let pool: Pool = Arc::new(tokio::sync::Mutex::new(None));
        let svc = service_fn(move |req| {
            let me = me.clone();
            let name = name.clone();
            let pool = pool.clone();
            async move {
                let target = name.as_ref().as_ref().map(|(n, p)| (n.as_str(), *p));
                Ok::<_, Infallible>(me.request(req, target, &pool).await)
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(s), svc)
            .with_upgrades()
            .await;
    }

    async fn request(
        self: Arc<Self>,
        req: Request<Incoming>,
        transparent: Option<(&str, u16)>,
        pool: &Pool,
    ) -> Response<Body> {
        let method = req.method().to_string();
        let via = if transparent.is_some() {
            Via::Transparent
        } else {
            Via::Proxy
        };
        let bad = |reason: &str, host: String, port: u16| Denial {
            status: StatusCode::BAD_REQUEST,
            host,
            port,
            reason: reason.into(),
            fix: "send proxy requests as `CONNECT host:port` or with an absolute http:// URI"
                .into(),
        };
        if let Some((name, port)) = transparent {
            // The connection was for `name`: every request on it must say so.
            let host = req
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let (h, p) = split_authority(host).unwrap_or((host, 80));
            if p != port || parse_host(h) != Ok(Host::Name(name.to_string())) {
                let d = Denial {
                    status: StatusCode::FORBIDDEN,
                    host: name.to_string(),
                    port,
                    reason: format!(
                        "the Host header ({}) differs from the host connected to",
                        host.escape_debug()
                    ),
                    fix: "send each request to the host it names".into(),
                };
                return self.deny(&d, &method, via);
            }
            return self.forward(req, name.to_string(), port, via, pool).await;
        }
        if req.method() == Method::CONNECT {
            let authority = req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .unwrap_or_default();
            let Some((host, port)) = split_authority(&authority) else {
                return self.deny(
                    &bad("CONNECT needs host:port", authority.clone(), 0),
                    &method,
                    via,
                );
            };
            // The tunnel outlives this HTTP connection: it needs its own slot.
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("aibox: more than {MAX_CONNECTIONS} connections open; close some\n"),
                );
            };
            if let Some((g, idx)) = self.gateway_for(host, port) {
                self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                let me = self.clone();
                tokio::spawn(async move {
                    if let Ok(up) = hyper::upgrade::on(req).await {
                        g.serve(me, TokioIo::new(up), idx, via).await;
                    }
                    drop(slot);
                });
                return Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
            }
            let started = Instant::now();
            let t = match self.decide(host, port, Access::Tunnel).await {
                Ok(t) => t,
                Err(d) => return self.deny(&d, &method, via),
            };
            if let Some(inj) = self.injector_for(&t) {
                let me = self.clone();
                tokio::spawn(async move {
                    if let Ok(up) = hyper::upgrade::on(req).await {
                        inj.serve(me, TokioIo::new(up), t, via).await;
                    }
                    drop(slot);
                });
                return Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
            }
            let upstream = match self.connect(&t).await {
                Ok(u) => u,
                Err(e) => {
                    self.allowed(&t, &method, via, (0, 0), started, Some(e.to_string()));
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!("aibox: cannot reach {}: {e}\n", t.addr),
                    );
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(up) => {
                        me.tunnel(TokioIo::new(up), upstream, t, "CONNECT", via, started)
                            .await
                    }
                    Err(e) => me.allowed(&t, "CONNECT", via, (0, 0), started, Some(e.to_string())),
                }
                drop(slot);
            });
            return Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
        }
        let uri = req.uri();
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => {
                return self.deny(
                    &bad("only http:// URIs are proxied in absolute form (https goes through CONNECT)", uri.to_string(), 0),
                    &method,
                    via,
                );
            }
            None => {
                return self.deny(
                    &bad("not a proxy request (no absolute URI)", String::new(), 0),
                    &method,
                    via,
                );
            }
        }
        let Some(authority) = uri.authority() else {
            return self.deny(
                &bad("the URI has no host", uri.to_string(), 0),
                &method,
                via,
            );
        };
        let auth = authority.as_str().to_string();
        let (host, port) = split_authority(&auth).unwrap_or((auth.as_str(), 80));
        // A Host header naming another host is domain fronting: refuse.
        if let Some(h) = req.headers().get("host") {
            let h = h.to_str().unwrap_or("\u{0}");
            let (hh, hp) = split_authority(h).unwrap_or((h, 80));
            if hp != port || parse_host(hh).ok() != parse_host(host).ok() {
                let d = Denial {
                    status: StatusCode::FORBIDDEN,
                    host: host.to_string(),
                    port,
                    reason: format!(
                        "the Host header ({}) differs from the request URI",
                        h.escape_debug()
                    ),
                    fix: "send each request to the host it names".into(),
                };
                return self.deny(&d, &method, via);
            }
        }
        let (host, port) = (host.to_string(), port);
        self.forward(req, host, port, via, pool).await
    }

    /// Forwards one plain-HTTP request to `host:port` after checking it.
    /// An upstream connection for `t`: the client connection's previous
    /// one when it went to the same checked address for the same host and
    /// is still usable, else a new one.
    async fn upstream(&self, t: &Target, pool: &Pool, reuse: bool) -> Result<Upstream, String> {
        if let Some(mut u) = pool.lock().await.take()
            && reuse
            && u.addr == t.addr
            && u.host == t.host
            && u.port == t.port
            && !u.sender.is_closed()
            // (An upstream that stopped reading must not hang the client.)
            && matches!(
                tokio::time::timeout(CONNECT_TIMEOUT, u.sender.ready()).await,
                Ok(Ok(()))
            )
        {
            return Ok(u);
        }
        let stream = self.connect(t).await.map_err(|e| e.to_string())?;
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counted = Counted {
            inner: stream,
            up: up.clone(),
            down: down.clone(),
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(counted))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Upstream {
            addr: t.addr,
            host: t.host.clone(),
            port: t.port,
            sender,
            up,
            down,
        })
    }

    async fn forward(
        self: Arc<Self>,
        req: Request<Incoming>,
        host: String,
        port: u16,
        via: Via,
        pool: &Pool,
    ) -> Response<Body> {
        let method = req.method().to_string();
        let started = Instant::now();
        if via == Via::Proxy && host.eq_ignore_ascii_case(aibox_push::BROKER_HOST) && port == 80 {
            return self.broker(req).await;
        }
        if let Ok(h) = parse_host(&host)
            && let Some(r) = self.push_refusal("http", &h, port, req.uri())
        {
            return self.refuse_push(r, &method, via);
        }
        // (Any port: the key is only ever added over TLS.)
        if self.gateway_for(&host, 443).is_some() {
            let d = Denial {
                status: StatusCode::FORBIDDEN,
                host,
                port,
                reason: "LLM hosts are reached over HTTPS only, through the aibox LLM gateway"
                    .into(),
                fix: "use https://".into(),
            };
            return self.deny(&d, &method, via);
        }
        let (mut parts, body) = req.into_parts();
        // Placeholders are never put into plain HTTP; one here is misuse
        // (whether or not the destination is allowed).
        if let Some(inj) = &self.injector
            && let Err(m) =
                inj.check_head(&parts.uri, &mut parts.headers, crate::inject::Dest::Plain)
        {
            return inj.refuse(&self, &m, &host, port, &method, via);
        }
        let t = match self.decide(&host, port, Access::Http).await {
            Ok(t) => t,
            Err(d) => return self.deny(&d, &method, via),
        };
        let mut u = match self.upstream(&t, pool, true).await {
            Ok(u) => u,
            Err(e) => {
                self.allowed(&t, &method, via, (0, 0), started, Some(e.clone()));
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("aibox: cannot reach {}: {e}\n", t.addr),
                );
            }
        };
        strip_hop_headers(&mut parts.headers);
        let authority = if port == 80 {
            t.host.to_string()
        } else {
            format!("{}:{port}", t.host)
        };
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert("host", v);
        }
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match path.parse() {
            Ok(u) => u,
            Err(_) => return text(StatusCode::BAD_REQUEST, "aibox: bad request path\n".into()),
        };
        parts.version = hyper::Version::HTTP_11;
        // Bytes are counted on the upstream connection; requests on it are
        // sequential, so the difference is this request's.
        let mut base = (u.up.load(Ordering::Relaxed), u.down.load(Ordering::Relaxed));
        let mut sent = u
            .sender
            .try_send_request(Request::from_parts(parts, body))
            .await;
        if let Err(e) = &mut sent
            && let Some(req) = e.take_message()
        {
            // A kept connection the upstream had closed: the request was
            // not sent, so it goes once more on a fresh connection.
            u = match self.upstream(&t, pool, false).await {
                Ok(u) => u,
                Err(e) => {
                    self.allowed(&t, &method, via, (0, 0), started, Some(e.clone()));
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!("aibox: cannot reach {}: {e}\n", t.addr),
                    );
                }
            };
            base = (0, 0);
            sent = u.sender.try_send_request(req).await;
        }
        match sent.map_err(|e| e.into_error()) {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_headers(&mut parts.headers);
                let (up, down) = (u.up.clone(), u.down.clone());
                *pool.lock().await = Some(u);
                let me = self.clone();
                let done = move |error: Option<String>| {
                    me.allowed(
                        &t,
                        &method,
                        via,
                        (
                            up.load(Ordering::Relaxed).saturating_sub(base.0),
                            down.load(Ordering::Relaxed).saturating_sub(base.1),
                        ),
                        started,
                        error,
                    )
                };
                Response::from_parts(
                    parts,
                    Finished {
                        inner: body,
                        done: Some(Box::new(done)),
                    }
                    .boxed(),
                )
            }
            Err(e) => {
                self.allowed(&t, &method, via, (0, 0), started, Some(e.to_string()));
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("aibox: upstream error: {e}\n"),
                )
            }
        }
    }

    /// Relays a tunnel. The first bytes the sandbox sends are inspected: a
    /// TLS ClientHello must name the approved host (or none); an encrypted
    /// or malformed one ends the tunnel. Server-first protocols (SSH) work:
    /// the upstream's bytes flow while we wait.
    async fn tunnel<C>(
        self: Arc<Self>,
        client: C,
        upstream: TcpStream,
        t: Target,
        method: &str,
        via: Via,
        started: Instant,
    ) where
        C: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut ur, mut uw) = upstream.into_split();
        let down = tokio::spawn(async move {
            let n = tokio::io::copy(&mut ur, &mut cw).await.unwrap_or(0);
            let _ = cw.shutdown().await;
            n
        });
        let mut first = Vec::with_capacity(1024);
        let mut chunk = vec![0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + FIRST_BYTES_TIMEOUT;
        let verdict = loop {
            let n = match tokio::time::timeout_at(deadline, cr.read(&mut chunk)).await {
                // Closed before anything could be judged: forward nothing.
                Ok(Ok(0)) | Ok(Err(_)) => break Err(String::new()),
                Ok(Ok(n)) => n,
                Err(_) => break Err("the client sent nothing it could be judged by in time".into()),
            };
            first.extend_from_slice(&chunk[..n]);
            match tls::client_hello(&first) {
                Hello::Incomplete if first.len() < tls::MAX_HELLO => continue,
                Hello::Incomplete | Hello::Malformed => {
                    break Err("malformed TLS ClientHello".to_string());
                }
                Hello::Encrypted => {
                    break Err("Encrypted ClientHello hides the server name".to_string());
                }
                Hello::NotTls => match plain_http(&first) {
                    PlainHttp::Yes => {
                        break Err("plain HTTP inside a tunnel (its Host header is not checked there); send it through the proxy as http://host/…".to_string());
                    }
                    PlainHttp::NeedMore => continue,
                    PlainHttp::No => break Ok(()),
                },
                Hello::Sni(None) => break Ok(()),
                Hello::Sni(Some(sni)) => match (parse_host(&sni), &t.host) {
                    (_, Host::Ip(_)) => break Ok(()),
                    (Ok(h), want) if &h == want => break Ok(()),
                    _ => {
                        break Err(format!(
                            "TLS server name `{}` differs from the approved host",
                            sni.escape_debug()
                        ));
                    }
                },
            }
        };
        if let Err(reason) = verdict {
            down.abort();
            if reason.is_empty() {
                return;
            }
            let d = Denial {
                status: StatusCode::FORBIDDEN,
                host: t.host.to_string(),
                port: t.port,
                reason,
                fix: "connect to the host the TLS connection names".into(),
            };
            let _ = self.deny(&d, method, via);
            return;
        }
        let mut up = first.len() as u64;
        let mut down = down;
        // Ends when the sandbox is done sending, or when the upstream closed
        // (a client that never closes must not pin the connection).
        let finished = tokio::select! {
            n = async {
                if uw.write_all(&first).await.is_ok() {
                    up += tokio::io::copy(&mut cr, &mut uw).await.unwrap_or(0);
                }
                let _ = uw.shutdown().await;
            } => {
                let () = n;
                None
            }
            d = &mut down => Some(d.unwrap_or(0)),
        };
        let down = match finished {
            Some(d) => d,
            None => down.await.unwrap_or(0),
        };
        self.allowed(&t, method, via, (up, down), started, None);
    }
}

#[cfg(test)]
mod tests;
