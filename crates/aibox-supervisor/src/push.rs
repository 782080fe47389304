//! The git push broker of one sandbox: takes the remote helper's pushes
//! (through the proxy, see `aibox_push::helper`), refuses pushes to
//! remotes that are not the workspace's, and queues the rest for review.

use std::path::{Path, PathBuf};

use aibox_audit::{EventType, Severity};
use aibox_net::gateway::Secret;
use aibox_net::proxy::{Broker, PushGuard};
use aibox_net::{Access, Allowlist, Host};
use aibox_push::queue::Queue;
use aibox_push::{PushAsk, PushError, Queued};
use hyper::StatusCode;
use hyper::header::HeaderMap;
use serde_json::json;

use crate::egress::Emit;
use crate::proto::{NetworkSpec, PushMode, PushSpec};

/// The broker.
pub(crate) struct PushBroker {
    queue: Queue,
    sandbox: String,
    /// (normalized, as configured) for each workspace remote.
    remotes: Vec<(String, String)>,
    /// git tokens and the `host:port`s they are bound to.
    tokens: Vec<(Vec<String>, Secret, Option<u64>)>,
    /// The sandbox's network rules: host git reaches only what the
    /// sandbox itself may reach.
    allow: Allowlist,
    ca_file: Option<PathBuf>,
    emit: Emit,
}

/// The workspace's remotes that can be brokered, normalized, with their
/// configured spelling.
fn remotes(p: &PushSpec) -> Vec<(String, String)> {
    p.remotes
        .iter()
        .filter_map(|u| aibox_push::normalize(u).ok().map(|k| (k, u.clone())))
        .collect()
}

/// The proxy's push rules for `spec` (with the broker when pushes are
/// reviewed).
pub(crate) fn guard(spec: &NetworkSpec, emit: &Emit, allow: &Allowlist) -> Option<PushGuard> {
    let p = spec.push.as_ref()?;
    let allow = allow.clone();
    let broker: Option<std::sync::Arc<dyn Broker>> = (p.mode == PushMode::Review).then(|| {
        std::sync::Arc::new(PushBroker {
            queue: Queue::new(&p.queue),
            sandbox: p.sandbox.clone(),
            remotes: remotes(p),
            tokens: spec
                .credentials
                .iter()
                .flat_map(|c| c.credentials.iter())
                .filter(|c| c.kind == "git-token")
                .map(|c| (c.hosts.clone(), c.secret.clone(), c.expires_at_ms))
                .collect(),
            allow,
            ca_file: p.ca_file.clone(),
            emit: emit.clone(),
        }) as std::sync::Arc<dyn Broker>
    });
    Some(PushGuard {
        remotes: remotes(p).into_iter().map(|(k, _)| k).collect(),
        direct: p.mode == PushMode::Direct,
        broker,
    })
}

/// The address host git may connect to for `host:port`: the network
/// rules must allow it, and it must be public or named by a rule (as for
/// the proxy), resolved here once and pinned.
fn admit(
    allow: &Allowlist,
    host: &str,
    port: u16,
    access: Access,
) -> Result<std::net::IpAddr, String> {
    use std::net::ToSocketAddrs;
    let h = aibox_net::parse_host(host).map_err(|e| format!("the remote's host {host:?}: {e}"))?;
    if allow.rule_for(&h, port, access).is_none() {
        return Err(format!(
            "the network policy does not allow {host}:{port}, so aibox does not contact it either"
        ));
    }
    let candidates: Vec<std::net::IpAddr> = match &h {
        Host::Ip(ip) => vec![*ip],
        Host::Name(n) => match allow.static_address(n) {
            Some(ip) => vec![ip],
            None => (format!("{n}."), port)
                .to_socket_addrs()
                .map_err(|e| format!("{host} does not resolve: {e}"))?
                .map(|a| a.ip())
                .collect(),
        },
    };
    candidates
        .into_iter()
        .find(|ip| {
            aibox_net::addr::restricted(*ip).is_none() || allow.names_address(*ip, port, access)
        })
        .ok_or_else(|| format!("{host} resolves only to addresses no rule allows"))
}

/// `host` and `port` of a normalized URL.
fn host_port(key: &str) -> Option<(String, u16)> {
    let rest = key.split_once("://")?.1;
    let auth = rest.split('/').next()?;
    let (h, p) = auth.rsplit_once(':')?;
    Some((h.to_string(), p.parse().ok()?))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl PushBroker {
    fn argv(ask: &PushAsk) -> Vec<String> {
        let mut argv = vec!["git".to_string(), "push".into(), ask.url.clone()];
        argv.extend(ask.updates.iter().map(|u| {
            format!(
                "{}{}:{}",
                if u.force { "+" } else { "" },
                u.new.as_deref().unwrap_or(""),
                u.dst
            )
        }));
        argv
    }

    fn refuse(&self, ask: &PushAsk, rule: &str, reason: &str, foreign: bool) {
        let argv = Self::argv(ask);
        (self.emit)(
            EventType::ToolDeny,
            if foreign {
                Severity::High
            } else {
                Severity::Warning
            },
            json!({"argv": argv, "rule": rule, "reason": reason, "remote": ask.url}),
        );
        // aibox-010 is raised by the detector from this event.
    }

    /// The token bound to the remote's `host:port`, if any is still valid.
    fn token(&self, host: &str, port: u16) -> Option<zeroize::Zeroizing<String>> {
        let bound = |b: &String| {
            let (h, p) = match b.rsplit_once(':') {
                Some((h, p)) if p.bytes().all(|c| c.is_ascii_digit()) => {
                    (h, p.parse().unwrap_or(0))
                }
                _ => (b.as_str(), 443),
            };
            h.eq_ignore_ascii_case(host) && p == port
        };
        self.tokens
            .iter()
            .find(|(hosts, _, exp)| hosts.iter().any(bound) && exp.is_none_or(|e| now_ms() < e))
            .map(|(_, s, _)| zeroize::Zeroizing::new(s.expose().to_string()))
    }

    fn take(&self, headers: &HeaderMap, body: &Path) -> (StatusCode, String) {
        let ask: PushAsk = match headers
            .get(aibox_push::ASK_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(serde_json::from_str)
        {
            Some(Ok(a)) => a,
            _ => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!(
                        "aibox: a push needs a JSON {} header\n",
                        aibox_push::ASK_HEADER
                    ),
                );
            }
        };
        let key = match aibox_push::normalize(&ask.url) {
            Ok(k) => k,
            Err(e) => {
                let reason = e.to_string();
                self.refuse(&ask, "git-push-remote", &reason, false);
                return (StatusCode::BAD_REQUEST, format!("aibox: {reason}\n"));
            }
        };
        let Some((_, configured)) = self.remotes.iter().find(|(k, _)| *k == key) else {
            let known: Vec<&str> = self.remotes.iter().map(|(_, u)| u.as_str()).collect();
            let reason = format!(
                "{} is not one of the workspace's remotes ({}); pushes go only to those",
                ask.url,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
            self.refuse(&ask, "git-push-foreign-remote", &reason, true);
            return (StatusCode::FORBIDDEN, format!("aibox: {reason}\n"));
        };
        let Some((host, port)) = host_port(&key) else {
            return (StatusCode::BAD_REQUEST, "aibox: bad remote\n".into());
        };
        let access = if key.starts_with("https:") {
            Access::Tunnel
        } else {
            Access::Http
        };
        let ip = match admit(&self.allow, &host, port, access) {
            Ok(ip) => ip,
            Err(reason) => {
                self.refuse(&ask, "git-push-review", &reason, false);
                return (StatusCode::FORBIDDEN, format!("aibox: {reason}\n"));
            }
        };
        let pinned = match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        let remote = aibox_push::host::Remote {
            resolve: vec![format!("{}:{port}:{pinned}", host.trim_matches(['[', ']']))],
            ca_file: self.ca_file.clone(),
            token: self.token(&host, port),
        };
        let mut ask = ask;
        // git on the host uses the workspace's own spelling of the URL.
        ask.url = configured.clone();
        let id = match self.queue.new_id() {
            Ok(id) => id,
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("aibox: {e}\n")),
        };
        match aibox_push::host::import(&self.queue, &id, &self.sandbox, &key, &ask, body, &remote) {
            Ok(req) => {
                (self.emit)(
                    EventType::ToolInvoke,
                    Severity::Warning,
                    json!({
                        "argv": Self::argv(&ask), "push_id": id, "status": "queued",
                        "remote": req.url, "commits": req.commits_total,
                        "updates": req.updates,
                    }),
                );
                let q = Queued {
                    id: id.clone(),
                    message: format!(
                        "push {id} to {} queued for review ({} new commit{}); a reviewer runs `aibox push show {id}`, then `aibox push approve {id}` or `aibox push cancel {id}`",
                        req.url,
                        req.commits_total,
                        if req.commits_total == 1 { "" } else { "s" }
                    ),
                };
                match serde_json::to_string(&q) {
                    Ok(body) => (StatusCode::OK, body),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("aibox: {e}\n")),
                }
            }
            Err(e) => {
                let reason = e.to_string();
                self.refuse(&ask, "git-push-review", &reason, false);
                let status = match e {
                    PushError::Refused(_) => StatusCode::CONFLICT,
                    _ => StatusCode::BAD_GATEWAY,
                };
                (status, format!("aibox: {reason}\n"))
            }
        }
    }
}

impl Broker for PushBroker {
    fn spool(&self) -> Result<(PathBuf, u64), String> {
        self.queue.create().map_err(|e| e.to_string())?;
        let id = self.queue.new_id().map_err(|e| e.to_string())?;
        Ok((self.queue.spool(&id), aibox_push::MAX_BUNDLE))
    }

    fn handle(&self, path: &str, headers: &HeaderMap, body: &Path) -> (StatusCode, String) {
        if path != aibox_push::BROKER_PATH {
            return (
                StatusCode::NOT_FOUND,
                "aibox: no such aibox service\n".into(),
            );
        }
        self.take(headers, body)
    }
}
