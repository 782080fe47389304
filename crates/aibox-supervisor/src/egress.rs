//! Runs a sandbox's egress: aibox-net's proxy and DNS answerer, on the
//! listeners init opened inside the sandbox (native) or behind the unix
//! socket a container's forwarder relays to, with every decision written
//! to the audit log.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use aibox_audit::{EventType, Severity};
use aibox_net::gateway::Gateway;
use aibox_net::inject::Injector;
use aibox_net::{Allowlist, NetEvent, Proxy, Sink};
use serde_json::{Value, json};

use crate::proto::{NetworkSpec, NetworkStatus};

/// Writes one audit event (the supervisor's `Shared::emit`).
pub(crate) type Emit = Arc<dyn Fn(EventType, Severity, Value) + Send + Sync>;

/// Hands the proxy's events to a writer thread: appending to the audit log
/// (hashing, a write) must not stall the proxy's async workers. The queue
/// is bounded and a full queue makes the proxy wait: events are never
/// dropped.
#[derive(Clone)]
struct AuditSink {
    tx: std::sync::mpsc::SyncSender<Msg>,
    /// When the writer last wrote an event.
    last: Arc<std::sync::Mutex<std::time::Instant>>,
}

enum Msg {
    Event(Box<NetEvent>),
    /// Answered once every event queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

impl AuditSink {
    fn new(emit: Emit, per_sec: u32) -> Result<AuditSink, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(4096);
        let last = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
        let last2 = last.clone();
        std::thread::Builder::new()
            .name("aibox-egress-audit".into())
            .spawn(move || {
                let mut thin = Thinner::new(per_sec);
                loop {
                    // (Woken at least once a second, so a summary of what
                    // was held back goes out after a burst ends too.)
                    let m = rx.recv_timeout(std::time::Duration::from_secs(1));
                    thin.summarise(&emit, false);
                    match m {
                        Ok(Msg::Event(e)) => {
                            write_event(&emit, &mut thin, *e);
                            if let Ok(mut l) = last2.lock() {
                                *l = std::time::Instant::now();
                            }
                        }
                        Ok(Msg::Flush(done)) => {
                            thin.summarise(&emit, true);
                            let _ = done.send(());
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            thin.summarise(&emit, true);
                            return;
                        }
                    }
                }
            })
            .map_err(|e| format!("starting the egress audit writer: {e}"))?;
        Ok(AuditSink { tx, last })
    }

    /// Waits (at most `max`) until the queue is written and no event has
    /// come for a moment: connections of a sandbox that just died report
    /// their end a little after it.
    fn drain(&self, max: std::time::Duration) -> bool {
        let quiet = std::time::Duration::from_millis(100);
        let deadline = std::time::Instant::now() + max;
        loop {
            let (done, wait) = std::sync::mpsc::channel();
            if self.tx.send(Msg::Flush(done)).is_err() {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if wait.recv_timeout(left).is_err() {
                return false;
            }
            let since = self.last.lock().map(|l| l.elapsed()).unwrap_or(quiet);
            if since >= quiet {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(quiet - since);
        }
    }
}

impl Sink for AuditSink {
    fn record(&self, e: NetEvent) {
        let _ = self.tx.send(Msg::Event(Box::new(e)));
    }

    fn healthy(&self) -> bool {
        !crate::supervisor::audit_failing()
    }
}

/// The kinds of events a sandbox can make in floods (each DNS query and
/// connection is its own): bounded per second, the rest summarised.
const THINNED: [EventType; 4] = [
    EventType::DnsQuery,
    EventType::DnsResponse,
    EventType::NetworkAllow,
    EventType::NetworkDeny,
];

/// Most names counted one by one in a summary (the rest as `other`).
const MAX_NAMED: usize = 20;

/// What a summary stands for.
#[derive(Default)]
struct HeldNet {
    count: u64,
    bytes_up: u64,
    bytes_down: u64,
    /// Per name or host (at most [`MAX_NAMED`]).
    names: std::collections::BTreeMap<String, u64>,
    /// Per rcode (responses) or port.
    kinds: std::collections::BTreeMap<String, u64>,
}

/// A token bucket per kind of event (a flood of DNS queries cannot use up
/// the budget of denials), at `per_sec` with bursts of ten seconds' worth.
/// Info and warning events over it are counted into a summary written
/// once a second; higher severities always go through.
struct Thinner {
    per_sec: f64,
    tokens: [f64; 4],
    refilled: std::time::Instant,
    held: [Option<HeldNet>; 4],
    summarised: std::time::Instant,
}

impl Thinner {
    fn new(per_sec: u32) -> Thinner {
        let per_sec = f64::from(per_sec);
        Thinner {
            per_sec,
            tokens: [per_sec * 10.0; 4],
            refilled: std::time::Instant::now(),
            held: Default::default(),
            summarised: std::time::Instant::now(),
        }
    }

    /// Whether the event may be written now; if not, it is counted.
    fn admit(&mut self, t: EventType, sev: Severity, d: &Value) -> bool {
        let Some(k) = THINNED.iter().position(|x| *x == t) else {
            return true;
        };
        if self.per_sec == 0.0 || !matches!(sev, Severity::Info | Severity::Warning) {
            return true;
        }
        let now = std::time::Instant::now();
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        for x in &mut self.tokens {
            *x = (*x + dt * self.per_sec).min(self.per_sec * 10.0);
        }
        self.refilled = now;
        if self.tokens[k] >= 1.0 {
            self.tokens[k] -= 1.0;
            return true;
        }
        let h = self.held[k].get_or_insert_with(HeldNet::default);
        h.count += 1;
        h.bytes_up += d["bytes_up"].as_u64().unwrap_or(0);
        h.bytes_down += d["bytes_down"].as_u64().unwrap_or(0);
        let name = d["name"]
            .as_str()
            .or_else(|| d["host"].as_str())
            .unwrap_or("")
            .chars()
            .take(256)
            .collect::<String>();
        let count = |m: &mut std::collections::BTreeMap<String, u64>, key: String| {
            let key = if m.len() >= MAX_NAMED && !m.contains_key(&key) {
                "other".to_string()
            } else {
                key
            };
            *m.entry(key).or_default() += 1;
        };
        count(&mut h.names, name);
        let kind = match &d["rcode"] {
            Value::String(r) => r.chars().take(32).collect(),
            _ => d["port"]
                .as_u64()
                .map(|p| p.to_string())
                .unwrap_or_default(),
        };
        count(&mut h.kinds, kind);
        false
    }

    /// Writes one summary per kind with events held back, once a second
    /// (or now, with `force`: at stop).
    fn summarise(&mut self, emit: &Emit, force: bool) {
        let now = std::time::Instant::now();
        if !force && now.saturating_duration_since(self.summarised).as_secs() < 1 {
            return;
        }
        self.summarised = now;
        for (k, t) in THINNED.iter().enumerate() {
            let Some(h) = self.held[k].take() else {
                continue;
            };
            let top = |m: &std::collections::BTreeMap<String, u64>| {
                m.iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(s, _)| s.clone())
                    .unwrap_or_default()
            };
            let reason = format!(
                "{} {} events over the audit rate ({} a second) are counted here, not written one by one",
                h.count,
                t.as_str(),
                self.per_sec
            );
            // (The fields each type requires: its commonest name, host,
            // rcode or port.)
            let d = json!({
                "summary": true, "held_back": h.count, "reason": reason,
                "name": top(&h.names), "host": top(&h.names), "names": h.names,
                "qtype": "summary", "rcode": top(&h.kinds), "port": top(&h.kinds).parse::<u64>().unwrap_or(0),
                "kinds": h.kinds, "bytes_up": h.bytes_up, "bytes_down": h.bytes_down,
                "method": "summary", "rule": "summary",
            });
            emit(*t, Severity::Info, d);
        }
    }
}

fn write_event(emit: &Emit, thin: &mut Thinner, e: NetEvent) {
    {
        let (t, sev, d) = match e {
            NetEvent::Allow {
                host,
                port,
                method,
                address,
                rule,
                bytes_up,
                bytes_down,
                duration_ms,
                via,
                error,
            } => (
                EventType::NetworkAllow,
                if error.is_some() {
                    Severity::Warning
                } else {
                    Severity::Info
                },
                json!({
                    "host": host, "port": port, "method": method, "address": address,
                    "rule": rule, "bytes_up": bytes_up, "bytes_down": bytes_down,
                    "duration_ms": duration_ms, "via": via.as_str(), "error": error,
                }),
            ),
            NetEvent::Deny {
                host,
                port,
                method,
                reason,
                via,
            } => {
                let d = json!({"host": host, "port": port, "method": method, "reason": reason, "via": via.as_str()});
                // By name or by what the name resolved to (the proxy's
                // refusal says `resolves to ADDRESS, …`).
                let resolved = reason
                    .split("resolves to ")
                    .nth(1)
                    .and_then(|r| r.split([',', ' ']).next())
                    .unwrap_or("");
                if !is_cloud_metadata(&host) && !is_cloud_metadata(resolved) {
                    (EventType::NetworkDeny, Severity::Warning, d)
                } else {
                    // Reaching for the cloud's instance metadata is how a
                    // workload steals the host's cloud credentials: a
                    // critical runtime alert (aibox-006 follows from it).
                    emit(EventType::NetworkDeny, Severity::High, d);
                    (
                        EventType::FalcoAlert,
                        Severity::Critical,
                        json!({
                            "rule_id": "aibox-cloud-metadata", "mitre": "T1552.005",
                            "title": "sandbox reached for the cloud instance metadata service",
                            "host": host, "port": port, "via": via.as_str(),
                        }),
                    )
                }
            }
            NetEvent::DnsQuery { name, qtype } => (
                EventType::DnsQuery,
                Severity::Info,
                json!({"name": name, "qtype": qtype}),
            ),
            NetEvent::DnsResponse {
                name,
                qtype,
                rcode,
                address,
            } => (
                EventType::DnsResponse,
                Severity::Info,
                json!({"name": name, "qtype": qtype, "rcode": rcode,
                       "address": address.map(|a| a.to_string())}),
            ),
            NetEvent::LlmRequest {
                provider,
                host,
                model,
                method,
                path,
                bytes,
                via,
                body,
                sha256,
            } => {
                let mut d = json!({
                    "provider": provider, "host": host, "model": model.unwrap_or_default(),
                    "method": method, "path": path, "bytes": bytes, "via": via.as_str(),
                });
                with_bodies(&mut d, sha256, body);
                (EventType::LlmRequest, Severity::Info, d)
            }
            NetEvent::LlmResponse {
                provider,
                host,
                model,
                status,
                bytes,
                duration_ms,
                input_tokens,
                output_tokens,
                limited,
                error,
                body,
                sha256,
            } => {
                let mut d = json!({
                    "provider": provider, "host": host, "model": model.unwrap_or_default(),
                    "status": status, "bytes": bytes, "duration_ms": duration_ms,
                    "input_tokens": input_tokens, "output_tokens": output_tokens,
                    "limited": limited, "error": error,
                });
                with_bodies(&mut d, sha256, body);
                let sev = if limited.is_some() || error.is_some() || status >= 400 {
                    Severity::Warning
                } else {
                    Severity::Info
                };
                (EventType::LlmResponse, sev, d)
            }
            NetEvent::Push {
                url,
                method,
                foreign,
                reason,
                via,
            } => {
                let d = json!({
                    "argv": ["git", "push", url], "remote": url, "method": method,
                    "rule": if foreign { "git-push-foreign-remote" } else { "git-push-review" },
                    "reason": reason, "via": via.as_str(),
                });
                // A foreign remote raises aibox-010 in the detector.
                (EventType::ToolDeny, Severity::High, d)
            }
            NetEvent::Credential {
                credential,
                kind,
                host,
                port,
                method,
                allowed,
                place,
                reason,
                via,
            } => {
                let d = json!({
                    "credential": credential, "credential_type": kind, "host": host,
                    "port": port, "method": method,
                    "decision": if allowed { "allow" } else { "deny" },
                    "where": place, "reason": reason, "via": via.as_str(),
                });
                if allowed {
                    (EventType::CredentialUse, Severity::Info, d)
                } else {
                    // A placeholder where it must not be is an attempt to
                    // move a credential: an alert, not just a refusal.
                    emit(EventType::CredentialUse, Severity::High, d.clone());
                    (
                        EventType::FalcoAlert,
                        Severity::High,
                        json!({
                            "rule_id": "aibox-credential-misuse",
                            "mitre": "T1528",
                            "title": "credential placeholder sent where it may not go",
                            "credential": credential, "host": host, "port": port,
                            "where": place, "reason": reason,
                        }),
                    )
                }
            }
        };
        if thin.admit(t, sev, &d) {
            emit(t, sev, d)
        }
    }
}

/// Whether `host` (a name or an address, as the proxy saw it) is a cloud
/// provider's instance metadata service.
fn is_cloud_metadata(host: &str) -> bool {
    let h = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if let Ok(ip) = h.parse::<std::net::IpAddr>() {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(std::net::IpAddr::V6(v6)),
            v4 => v4,
        };
        // NAT64 (64:ff9b::/96) and IPv4-compatible forms of an IPv4 address.
        let ip = match ip {
            std::net::IpAddr::V6(v6) => {
                let s = v6.segments();
                if (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]) || s[..6] == [0; 6] {
                    let o = v6.octets();
                    std::net::IpAddr::V4(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]))
                } else {
                    ip
                }
            }
            v4 => v4,
        };
        return [
            "169.254.169.254", // AWS, GCP, Azure, OpenStack, DigitalOcean
            "169.254.170.2",   // AWS ECS task credentials
            "168.63.129.16",   // Azure wire server
            "192.0.0.192",     // Oracle Cloud
            "100.100.100.200", // Alibaba Cloud
            "fd00:ec2::254",   // AWS over IPv6
        ]
        .iter()
        .any(|m| m.parse::<std::net::IpAddr>().is_ok_and(|m| m == ip));
    }
    matches!(
        h.as_str(),
        "metadata.google.internal" | "metadata.goog" | "instance-data.ec2.internal"
    )
}

/// Adds what the logging mode kept of a body (absent fields stay absent,
/// so `metadata_only` events carry neither).
fn with_bodies(d: &mut Value, sha256: Option<String>, body: Option<String>) {
    if let Some(h) = sha256 {
        d["sha256"] = json!(h);
    }
    if let Some(b) = body {
        d["body"] = json!(b);
    }
}

/// The running egress of one sandbox.
pub(crate) struct Egress {
    /// Keeps the proxy's threads alive.
    _rt: tokio::runtime::Runtime,
    proxy: Arc<Proxy>,
    spec: NetworkSpec,
    sink: AuditSink,
    injector: Option<Arc<Injector>>,
}

/// What the proxy terminates: the LLM gateway and the credential
/// injector, each with its own CA (both trusted inside).
#[derive(Clone, Default)]
pub(crate) struct Intercept {
    pub(crate) gateway: Option<Arc<Gateway>>,
    pub(crate) injector: Option<Arc<Injector>>,
}

impl Intercept {
    /// The CA certificates the sandbox must trust, if any.
    pub(crate) fn ca_pem(&self) -> Option<String> {
        let pems: Vec<&str> = self
            .gateway
            .iter()
            .map(|g| g.ca_pem())
            .chain(self.injector.iter().map(|i| i.ca_pem()))
            .collect();
        (!pems.is_empty()).then(|| pems.join("\n"))
    }
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress").finish_non_exhaustive()
    }
}

pub(crate) fn allowlist(spec: &NetworkSpec) -> Result<Allowlist, String> {
    Allowlist::parse(&spec.allowed, &spec.hosts).map_err(|e| e.to_string())
}

/// What [`proxy_of`] builds.
type ProxyParts = (AuditSink, Arc<Proxy>, Option<Arc<Injector>>);

/// The proxy for `spec` with its audit writer (and the injector, kept to
/// revoke at stop).
fn proxy_of(spec: &NetworkSpec, emit: Emit, intercept: Intercept) -> Result<ProxyParts, String> {
    let allow = allowlist(spec)?;
    let push = crate::push::guard(spec, &emit, &allow);
    let sink = AuditSink::new(emit, spec.audit_per_sec)?;
    let injector = intercept.injector.clone();
    let proxy = Proxy::with_intercept(
        allow,
        Arc::new(sink.clone()),
        intercept.gateway,
        intercept.injector,
        push,
    );
    Ok((sink, proxy, injector))
}

/// The transparent ports for `spec` (what init must listen on).
pub fn transparent_ports(spec: &NetworkSpec) -> Result<Vec<u16>, String> {
    Ok(allowlist(spec)?.transparent_ports())
}

/// Proxy worker threads: half the host's CPUs, 1 to 4. The proxy shares
/// the machine with the very programs it serves; on 2 CPUs one worker
/// gave both more throughput and a lower p99 than two (docs/benchmarks.md).
fn workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() / 2)
        .clamp(1, 4)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers())
        .thread_name("aibox-egress")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the egress proxy: {e}"))
}

impl Egress {
    /// Serves the listeners init opened (proxy, DNS/UDP, DNS/TCP, then the
    /// transparent ports, see `aibox_sandbox::NetListen`).
    pub(crate) fn start_native(
        spec: &NetworkSpec,
        fds: Vec<OwnedFd>,
        emit: Emit,
        intercept: Intercept,
    ) -> Result<Egress, String> {
        let (sink, proxy, injector) = proxy_of(spec, emit, intercept)?;
        let rt = runtime()?;
        let _guard = rt.enter();
        let tcp = |fd: OwnedFd| {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(l))
                .map_err(|e| format!("serving an egress listener: {e}"))
        };
        let mut fds = fds.into_iter();
        let (Some(p), Some(u), Some(d)) = (fds.next(), fds.next(), fds.next()) else {
            return Err("the sandbox did not hand over its egress listeners".into());
        };
        rt.spawn(proxy.clone().serve_proxy(tcp(p)?));
        let udp = std::net::UdpSocket::from(u);
        let udp = udp
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UdpSocket::from_std(udp))
            .map_err(|e| format!("serving the DNS socket: {e}"))?;
        rt.spawn(proxy.clone().serve_dns_udp(udp));
        rt.spawn(proxy.clone().serve_dns_tcp(tcp(d)?));
        for t in fds {
            rt.spawn(proxy.clone().serve_transparent(tcp(t)?));
        }
        drop(_guard);
        Ok(Egress {
            _rt: rt,
            proxy,
            spec: spec.clone(),
            sink,
            injector,
        })
    }

    /// Serves a container's egress: binds the unix socket at `socket`
    /// (which the container gets mounted at
    /// `aibox_sandbox::container::EGRESS_SOCKET`) and decides whatever the
    /// in-container forwarder relays through it.
    pub(crate) fn start_relay(
        spec: &NetworkSpec,
        socket: &std::path::Path,
        emit: Emit,
        intercept: Intercept,
    ) -> Result<Egress, String> {
        use std::os::unix::fs::PermissionsExt;
        let (sink, proxy, injector) = proxy_of(spec, emit, intercept)?;
        let _ = std::fs::remove_file(socket);
        let l = std::os::unix::net::UnixListener::bind(socket)
            .map_err(|e| format!("creating the egress socket {}: {e}", socket.display()))?;
        // The guest's uid differs from ours on most backends; the directory
        // around the socket (the sandbox's run directory, 0700) is what
        // keeps everyone else on the host out.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("opening the egress socket to the sandbox: {e}"))?;
        let rt = runtime()?;
        let _guard = rt.enter();
        let l = l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(l))
            .map_err(|e| format!("serving the egress socket: {e}"))?;
        rt.spawn(proxy.clone().serve_relay(l));
        drop(_guard);
        Ok(Egress {
            _rt: rt,
            proxy,
            spec: spec.clone(),
            sink,
            injector,
        })
    }

    /// Ends every credential substitution (the sandbox is stopping).
    pub(crate) fn revoke(&self) {
        if let Some(i) = &self.injector {
            i.revoke();
        }
    }

    /// Replaces a credential's value (see `Injector::rotate`); its kind.
    pub(crate) fn rotate(
        &self,
        name: &str,
        hosts: &[String],
        value: aibox_net::gateway::Secret,
        expires_at_ms: Option<u64>,
    ) -> Result<String, String> {
        match &self.injector {
            Some(i) => i.rotate(name, hosts, value, expires_at_ms),
            None => Err(format!("this sandbox holds no placeholder for `{name}`")),
        }
    }

    /// Writes out the events still queued (see `AuditSink::drain`); for
    /// the stop, before its own events.
    pub(crate) fn drain(&self) {
        // (Generous: under load the writer can lag; a cut-off here loses
        // the last network events of the run.)
        if !self.sink.drain(std::time::Duration::from_secs(10)) {
            crate::supervisor::log(
                "network events were still arriving 10 s into the stop; later ones may be missing",
            );
        }
    }

    /// The live counters, for `status`.
    pub(crate) fn status(&self) -> NetworkStatus {
        let c = &self.proxy.counters;
        NetworkStatus {
            state: "enforced: default-deny through the aibox proxy".into(),
            proxy: format!("127.0.0.1:{}", self.spec.proxy_port),
            dns: self.spec.dns_addr.to_string(),
            allowed: self.spec.allowed.clone(),
            allow_count: c.allowed.load(Ordering::Relaxed),
            deny_count: c.denied.load(Ordering::Relaxed),
            dns_resolved: c.dns_resolved.load(Ordering::Relaxed),
            dns_refused: c.dns_refused.load(Ordering::Relaxed),
            llm_gateway: self
                .spec
                .gateway
                .iter()
                .flat_map(|g| {
                    g.providers
                        .iter()
                        .map(|p| format!("{} ({})", p.host, p.name))
                })
                .collect(),
            credentials: self
                .spec
                .issued
                .iter()
                .map(|c| {
                    if c.exposed {
                        format!("{} ({}): exposed in {}", c.name, c.kind, c.env.join(", "))
                    } else {
                        format!(
                            "{} ({}) → {}: placeholder in {}",
                            c.name,
                            c.kind,
                            c.hosts.join(", "),
                            c.env.join(", ")
                        )
                    }
                })
                .collect(),
        }
    }
}

/// Builds the sandbox's LLM gateway and credential injector (and with
/// them the CAs the sandbox is to trust), as the spec asks.
pub(crate) fn intercept(spec: &NetworkSpec) -> Result<Intercept, String> {
    let gateway = match &spec.gateway {
        None => None,
        Some(g) => Some(Arc::new(
            Gateway::new(g.clone()).map_err(|e| e.to_string())?,
        )),
    };
    let injector = match &spec.credentials {
        Some(c) if !c.credentials.is_empty() => Some(Arc::new(
            Injector::new(c.clone()).map_err(|e| e.to_string())?,
        )),
        _ => None,
    };
    Ok(Intercept { gateway, injector })
}

/// `credential.issue` for each credential handed to the sandbox.
pub(crate) fn issue_events(spec: &NetworkSpec) -> Vec<(EventType, Severity, Value)> {
    spec.issued
        .iter()
        .map(|c| {
            (
                EventType::CredentialIssue,
                // The real value inside the sandbox is worth a second look.
                if c.exposed {
                    Severity::Warning
                } else {
                    Severity::Info
                },
                json!({
                    "credential": c.name, "credential_type": c.kind, "hosts": c.hosts,
                    "env": c.env, "exposed": c.exposed, "expires": c.expires,
                    "mode": if c.exposed { "exposed" } else { "placeholder" },
                }),
            )
        })
        .collect()
}

/// `credential.revoke` for each credential, when the sandbox stops.
pub(crate) fn revoke_events(spec: &NetworkSpec, reason: &str) -> Vec<(EventType, Severity, Value)> {
    spec.issued
        .iter()
        .map(|c| {
            (
                EventType::CredentialRevoke,
                Severity::Info,
                json!({
                    "credential": c.name, "credential_type": c.kind,
                    "reason": reason, "exposed": c.exposed,
                }),
            )
        })
        .collect()
}

/// The environment of a session: the proxy variables, the CA bundle
/// variables when the proxy terminates TLS for some hosts, placeholders
/// (or exposed values) where tools look for keys and tokens, and git's
/// settings (proxy, and a credential helper for the hosts a git token is
/// bound to).
pub(crate) fn sandbox_env(spec: &NetworkSpec) -> Vec<(String, String)> {
    let mut env = proxy_env(spec.proxy_port);
    let mut git = vec![(
        "http.proxy".to_string(),
        format!("http://127.0.0.1:{}", spec.proxy_port),
    )];
    env.extend(gateway_env(spec));
    for c in &spec.issued {
        for v in &c.env {
            env.retain(|(k, _)| k != v);
            env.push((v.clone(), c.value.expose().to_string()));
        }
        if c.kind == "git-token" && !c.exposed {
            for h in &c.hosts {
                git.push((
                    format!("credential.https://{h}.helper"),
                    // The placeholder itself (not a secret: the proxy
                    // replaces it for this host only), so that git works
                    // whatever the session did to its environment.
                    format!(
                        "!f() {{ test \"$1\" = get && printf 'username=x-access-token\\npassword=%s\\n' '{}'; }}; f",
                        c.value.expose()
                    ),
                ));
            }
        }
    }
    if spec
        .push
        .as_ref()
        .is_some_and(|p| p.mode == crate::proto::PushMode::Review)
    {
        // Pushes go to the broker through aibox's remote helper; the
        // proxy refuses any that goes around it.
        for scheme in ["https://", "http://"] {
            git.push((
                format!("url.aibox::{scheme}.pushInsteadOf"),
                scheme.to_string(),
            ));
        }
        env.push((
            aibox_push::helper::BROKER_ENV.to_string(),
            format!("127.0.0.1:{}", spec.proxy_port),
        ));
    }
    env.push(("GIT_CONFIG_COUNT".into(), git.len().to_string()));
    for (i, (k, v)) in git.into_iter().enumerate() {
        env.push((format!("GIT_CONFIG_KEY_{i}"), k));
        env.push((format!("GIT_CONFIG_VALUE_{i}"), v));
    }
    env
}

/// Environment for the LLM gateway and the credential injector: the CA
/// bundle variables of the usual tools, and placeholders where agents
/// look for their API keys.
fn gateway_env(spec: &NetworkSpec) -> Vec<(String, String)> {
    let injecting = spec
        .credentials
        .as_ref()
        .is_some_and(|c| !c.credentials.is_empty());
    if spec.gateway.is_none() && !injecting {
        return Vec::new();
    }
    let bundle = aibox_sandbox::CA_BUNDLE.to_string();
    let mut env = vec![
        ("SSL_CERT_FILE".to_string(), bundle.clone()),
        ("REQUESTS_CA_BUNDLE".to_string(), bundle.clone()),
        ("CURL_CA_BUNDLE".to_string(), bundle.clone()),
        ("GIT_SSL_CAINFO".to_string(), bundle),
        (
            "NODE_EXTRA_CA_CERTS".to_string(),
            aibox_sandbox::CA_PATH.to_string(),
        ),
    ];
    for v in &spec.placeholders {
        env.push((v.clone(), PLACEHOLDER.to_string()));
    }
    env
}

/// What the sandbox holds instead of an API key. Not a secret: the
/// gateway replaces whatever key a request carries.
pub const PLACEHOLDER: &str = "aibox-placeholder-the-llm-gateway-adds-the-real-key";

/// Environment that points tools inside the sandbox at the proxy: the
/// usual variables (curl, git, pip, Go, Node's fetch with undici's env
/// support), plus the tool-specific ones npm, cargo, git and the JVM read.
pub(crate) fn proxy_env(port: u16) -> Vec<(String, String)> {
    let url = format!("http://127.0.0.1:{port}");
    let no_proxy = "localhost,127.0.0.1,::1";
    let mut env: Vec<(String, String)> = Vec::new();
    for k in ["http_proxy", "https_proxy", "all_proxy"] {
        env.push((k.into(), url.clone()));
        env.push((k.to_ascii_uppercase(), url.clone()));
    }
    env.push(("no_proxy".into(), no_proxy.into()));
    env.push(("NO_PROXY".into(), no_proxy.into()));
    env.push(("npm_config_proxy".into(), url.clone()));
    env.push(("npm_config_https_proxy".into(), url.clone()));
    env.push(("PIP_PROXY".into(), url.clone()));
    env.push(("CARGO_HTTP_PROXY".into(), url));
    env.push((
        "JAVA_TOOL_OPTIONS".into(),
        format!(
            "-Dhttp.proxyHost=127.0.0.1 -Dhttp.proxyPort={port} -Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort={port} -Dhttp.nonProxyHosts=localhost|127.0.0.1"
        ),
    ));
    env
}

#[cfg(test)]
mod tests {
    #[test]
    fn cloud_metadata_hosts() {
        for h in [
            "169.254.169.254",
            "[fd00:ec2::254]",
            "::ffff:169.254.169.254",
            "::a9fe:a9fe",
            "64:ff9b::a9fe:a9fe",
            "168.63.129.16",
            "metadata.google.internal.",
            "METADATA.GOOGLE.INTERNAL",
        ] {
            assert!(super::is_cloud_metadata(h), "{h}");
        }
        for h in ["169.254.169.253", "example.com", "metadata", "10.0.0.1"] {
            assert!(!super::is_cloud_metadata(h), "{h}");
        }
    }
}
