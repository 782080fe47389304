//! Live detection: the original AI-Box's ten SIEM rules (aibox-001 …
//! aibox-010), evaluated on each sandbox's own event stream as events are
//! appended. One [`Thresholds`] value (config `audit.detection`) drives both
//! this detector and every exported rule set, so the numbers cannot drift
//! apart the way the original's did.
//!
//! Every count rule fires when its count inside the sliding window
//! *reaches* the threshold, then starts counting afresh: N−1 matching
//! events never fire, the N-th fires exactly once, and the next alert
//! needs another N.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::event::{Event, EventType, Severity};

/// Detection thresholds, shared by the live detector and the exporters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Thresholds {
    /// Evaluate the rules live in the supervisor.
    pub enabled: bool,
    /// aibox-001: bytes sent out through the proxy…
    pub outbound_bytes: u64,
    /// …within this window.
    pub outbound_window: String,
    /// aibox-002: DNS queries…
    pub dns_queries: u64,
    /// …within this window.
    pub dns_window: String,
    /// aibox-003: credentials issued outside these hours (`HH:MM-HH:MM`)…
    pub business_hours: String,
    /// …in this offset from UTC (`+HH:MM` / `-HH:MM`).
    pub business_hours_utc_offset: String,
    /// aibox-004: refused network connections…
    pub blocked_network: u64,
    /// …within this window.
    pub blocked_network_window: String,
    /// aibox-005: an LLM request of at least this many bytes…
    pub llm_request_bytes: u64,
    /// …that is also more than this many times the p95 of the requests…
    pub llm_p95_factor: u64,
    /// …within this window (the p95 applies once 20 earlier requests are
    /// in the window).
    pub llm_window: String,
    /// aibox-007: policy denials…
    pub policy_denials: u64,
    /// …within this window.
    pub policy_denials_window: String,
    /// aibox-008: a credential used this long after the sandbox stopped.
    pub credential_after_stop_window: String,
    /// aibox-009: a run of base64 of at least this many bytes in a
    /// non-content field.
    pub base64_bytes: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            enabled: true,
            outbound_bytes: 100 << 20,
            outbound_window: "30m".into(),
            dns_queries: 100,
            dns_window: "1m".into(),
            business_hours: "06:00-22:00".into(),
            business_hours_utc_offset: "+00:00".into(),
            blocked_network: 20,
            blocked_network_window: "10m".into(),
            llm_request_bytes: 1 << 20,
            llm_p95_factor: 3,
            llm_window: "60m".into(),
            policy_denials: 15,
            policy_denials_window: "5m".into(),
            credential_after_stop_window: "60m".into(),
            base64_bytes: 10 << 10,
        }
    }
}

/// A threshold that cannot be used: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit.detection.{field}: {reason}")]
pub struct ThresholdError {
    /// The field under `audit.detection`.
    pub field: &'static str,
    /// What is wrong, and what to write instead.
    pub reason: String,
}

/// Thresholds with their durations and hours parsed.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The thresholds as configured.
    pub raw: Thresholds,
    /// aibox-001 window.
    pub outbound_window: Duration,
    /// aibox-002 window.
    pub dns_window: Duration,
    /// aibox-003 business hours as minutes after local midnight
    /// (start inclusive, end exclusive).
    pub hours: (u32, u32),
    /// aibox-003 offset from UTC in minutes.
    pub utc_offset_minutes: i32,
    /// aibox-004 window.
    pub blocked_network_window: Duration,
    /// aibox-005 window.
    pub llm_window: Duration,
    /// aibox-007 window.
    pub policy_denials_window: Duration,
    /// aibox-008 window.
    pub credential_after_stop_window: Duration,
}

impl Thresholds {
    /// Checks every field; the first unusable one is the error.
    pub fn parse(&self) -> Result<Parsed, ThresholdError> {
        fn window(field: &'static str, v: &str) -> Result<Duration, ThresholdError> {
            match humantime::parse_duration(v) {
                Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(7 * 86400) => {
                    Ok(d)
                }
                _ => Err(ThresholdError {
                    field,
                    reason: format!("{v:?} is not a window from 1s to 7d (write e.g. 5m or 1h)"),
                }),
            }
        }
        fn at_least_one(field: &'static str, v: u64) -> Result<(), ThresholdError> {
            if v == 0 {
                return Err(ThresholdError {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
            Ok(())
        }
        at_least_one("outbound_bytes", self.outbound_bytes)?;
        at_least_one("dns_queries", self.dns_queries)?;
        at_least_one("blocked_network", self.blocked_network)?;
        at_least_one("llm_request_bytes", self.llm_request_bytes)?;
        at_least_one("llm_p95_factor", self.llm_p95_factor)?;
        at_least_one("policy_denials", self.policy_denials)?;
        at_least_one("base64_bytes", self.base64_bytes)?;
        let hours = parse_hours(&self.business_hours).ok_or_else(|| ThresholdError {
            field: "business_hours",
            reason: format!(
                "{:?} is not a range of day times (write e.g. 06:00-22:00; 22:00-06:00 wraps midnight)",
                self.business_hours
            ),
        })?;
        let utc_offset_minutes =
            parse_offset(&self.business_hours_utc_offset).ok_or_else(|| ThresholdError {
                field: "business_hours_utc_offset",
                reason: format!(
                    "{:?} is not an offset from UTC (write e.g. +00:00 or -05:00)",
                    self.business_hours_utc_offset
                ),
            })?;
        Ok(Parsed {
            outbound_window: window("outbound_window", &self.outbound_window)?,
            dns_window: window("dns_window", &self.dns_window)?,
            hours,
            utc_offset_minutes,
            blocked_network_window: window("blocked_network_window", &self.blocked_network_window)?,
            llm_window: window("llm_window", &self.llm_window)?,
            policy_denials_window: window("policy_denials_window", &self.policy_denials_window)?,
            credential_after_stop_window: window(
                "credential_after_stop_window",
                &self.credential_after_stop_window,
            )?,
            raw: self.clone(),
        })
    }
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    // 24:00 is allowed as the end of a day.
    ((h < 24 && m < 60) || (h == 24 && m == 0)).then_some(h * 60 + m)
}

fn parse_hours(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('-')?;
    let (a, b) = (parse_hhmm(a.trim())?, parse_hhmm(b.trim())?);
    (a != b && a < 1440).then_some((a, b))
}

fn parse_offset(s: &str) -> Option<i32> {
    let sign = match s.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let m = parse_hhmm(&s[1..])?;
    (m <= 14 * 60).then_some(sign * m as i32)
}

/// One of the ten rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// `aibox-001` … `aibox-010`.
    pub id: &'static str,
    /// The original's name.
    pub name: &'static str,
    /// The original's severity (`critical`, `high`, `medium`).
    pub severity: &'static str,
    /// MITRE ATT&CK technique, where the original gave one.
    pub mitre: Option<&'static str>,
}

/// The ten rules, as in the original (seed-analysis §8).
pub const RULES: [Rule; 10] = [
    Rule {
        id: "aibox-001",
        name: "Anomalous Outbound Data Volume",
        severity: "high",
        mitre: Some("T1041"),
    },
    Rule {
        id: "aibox-002",
        name: "DNS Query Spike",
        severity: "medium",
        mitre: Some("T1071.004"),
    },
    Rule {
        id: "aibox-003",
        name: "Off-Hours Credential Access",
        severity: "medium",
        mitre: None,
    },
    Rule {
        id: "aibox-004",
        name: "Repeated Blocked Network Attempts",
        severity: "high",
        mitre: Some("T1090"),
    },
    Rule {
        id: "aibox-005",
        name: "LLM Payload Size Anomaly",
        severity: "medium",
        mitre: Some("T1567"),
    },
    Rule {
        id: "aibox-006",
        name: "Container Escape Indicator",
        severity: "critical",
        mitre: Some("T1611"),
    },
    Rule {
        id: "aibox-007",
        name: "Policy Violation Burst",
        severity: "high",
        mitre: None,
    },
    Rule {
        id: "aibox-008",
        name: "Credential Access After Sandbox Stop",
        severity: "critical",
        mitre: Some("T1528"),
    },
    Rule {
        id: "aibox-009",
        name: "Base64 Payload Anomaly",
        severity: "medium",
        mitre: Some("T1132.001"),
    },
    Rule {
        id: "aibox-010",
        name: "Git Push to Unexpected Remote",
        severity: "high",
        mitre: Some("T1567.001"),
    },
];

impl Rule {
    /// The audit severity of this rule's alerts.
    pub fn audit_severity(&self) -> Severity {
        match self.severity {
            "critical" => Severity::Critical,
            "high" => Severity::High,
            _ => Severity::Warning,
        }
    }
}

/// The rule with `id` (the first rule for an unknown id; this crate and
/// the exporters pass only ids of [`RULES`]).
pub fn rule(id: &str) -> Rule {
    RULES
        .iter()
        .copied()
        .find(|r| r.id == id)
        .unwrap_or(RULES[0])
}

/// Whether `rule_id` names one of the ten detection rules (whose alerts do
/// not feed aibox-006 again).
pub fn is_detection_rule(rule_id: &str) -> bool {
    RULES.iter().any(|r| r.id == rule_id)
}

/// An alert the detector raised: written as a `falco.alert` event.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// The rule that fired.
    pub rule: Rule,
    /// Sequence numbers of the events that made it fire (the last 100).
    pub evidence: Vec<u64>,
    /// How many events were evidence in all.
    pub evidence_total: u64,
    /// The measured value (count or bytes).
    pub observed: u64,
    /// The threshold it reached.
    pub threshold: u64,
    /// The window, as configured (empty for single-event rules).
    pub window: String,
}

impl Alert {
    /// The `falco.alert` details of this alert.
    pub fn details(&self) -> Map<String, Value> {
        let v = json!({
            "rule_id": self.rule.id,
            "mitre": self.rule.mitre,
            "title": self.rule.name,
            "rule_severity": self.rule.severity,
            "evidence_seqs": self.evidence,
            "evidence_total": self.evidence_total,
            "observed": self.observed,
            "threshold": self.threshold,
            "window": self.window,
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

/// Most evidence sequence numbers an alert lists.
const MAX_EVIDENCE: usize = 100;

/// Earlier LLM requests needed before the p95 comparison applies.
const P95_MIN_SAMPLES: usize = 20;

/// Most items a window keeps; beyond it the oldest two are merged (their
/// amounts kept, the later time taken), so memory stays bounded and a
/// sum never shrinks early.
const MAX_ITEMS: usize = 20_000;

/// A sliding window of (time, seq, amount).
#[derive(Debug, Default)]
struct Window {
    items: VecDeque<(SystemTime, u64, u64)>,
    sum: u64,
}

impl Window {
    fn push(&mut self, at: SystemTime, seq: u64, amount: u64, span: Duration) {
        self.items.push_back((at, seq, amount));
        self.sum = self.sum.saturating_add(amount);
        if self.items.len() > MAX_ITEMS
            && let Some((_, _, a)) = self.items.pop_front()
            && let Some(next) = self.items.front_mut()
        {
            next.2 = next.2.saturating_add(a);
        }
        while let Some(&(t, _, a)) = self.items.front() {
            // Events older than the window fall out; a clock that went
            // backwards keeps them (never fewer alerts than due).
            if at.duration_since(t).is_ok_and(|age| age > span) {
                self.items.pop_front();
                self.sum = self.sum.saturating_sub(a);
            } else {
                break;
            }
        }
    }

    /// Takes the window's evidence and starts afresh.
    fn take(&mut self) -> (Vec<u64>, u64) {
        let total = self.items.len() as u64;
        let skip = self.items.len().saturating_sub(MAX_EVIDENCE);
        let seqs = self.items.iter().skip(skip).map(|&(_, s, _)| s).collect();
        self.items.clear();
        self.sum = 0;
        (seqs, total)
    }
}

/// The live detector of one sandbox's log.
#[derive(Debug)]
pub struct Detector {
    th: Parsed,
    outbound: Window,
    dns: Window,
    blocked: Window,
    denials: Window,
    llm: Window,
    /// When the sandbox last stopped, and not started since.
    stopped_at: Option<SystemTime>,
}

impl Detector {
    /// A detector with these thresholds.
    pub fn new(th: Parsed) -> Self {
        Self {
            th,
            outbound: Window::default(),
            dns: Window::default(),
            blocked: Window::default(),
            denials: Window::default(),
            llm: Window::default(),
            stopped_at: None,
        }
    }

    /// Feeds one appended event; returns the alerts it raises.
    pub fn observe(&mut self, e: &Event) -> Vec<Alert> {
        let at = humantime::parse_rfc3339(&e.timestamp).unwrap_or_else(|_| SystemTime::now());
        let mut out = Vec::new();
        let num = |k: &str| e.details.get(k).and_then(Value::as_u64).unwrap_or(0);
        // A summary of events held back over a rate (`summary: true`,
        // `held_back: N`) counts as the N events it stands for.
        let weight = if e.details.get("summary") == Some(&Value::Bool(true)) {
            num("held_back").max(1)
        } else {
            1
        };
        let th = &self.th;
        let raw = &th.raw;
        match e.event_type {
            EventType::NetworkAllow => {
                let up = num("bytes_up");
                if up > 0 {
                    self.outbound.push(at, e.seq, up, th.outbound_window);
                    if self.outbound.sum >= raw.outbound_bytes {
                        let observed = self.outbound.sum;
                        let (evidence, total) = self.outbound.take();
                        out.push(Alert {
                            rule: rule("aibox-001"),
                            evidence,
                            evidence_total: total,
                            observed,
                            threshold: raw.outbound_bytes,
                            window: raw.outbound_window.clone(),
                        });
                    }
                }
            }
            EventType::DnsQuery => {
                self.dns.push(at, e.seq, weight, th.dns_window);
                if self.dns.sum >= raw.dns_queries {
                    let observed = self.dns.sum;
                    let (evidence, total) = self.dns.take();
                    out.push(Alert {
                        rule: rule("aibox-002"),
                        evidence,
                        evidence_total: total,
                        observed,
                        threshold: raw.dns_queries,
                        window: raw.dns_window.clone(),
                    });
                }
            }
            EventType::CredentialIssue if off_hours(at, th) => out.push(Alert {
                rule: rule("aibox-003"),
                evidence: vec![e.seq],
                evidence_total: 1,
                observed: 1,
                threshold: 1,
                window: String::new(),
            }),
            EventType::NetworkDeny => {
                self.blocked
                    .push(at, e.seq, weight, th.blocked_network_window);
                if self.blocked.sum >= raw.blocked_network {
                    let observed = self.blocked.sum;
                    let (evidence, total) = self.blocked.take();
                    out.push(Alert {
                        rule: rule("aibox-004"),
                        evidence,
                        evidence_total: total,
                        observed,
                        threshold: raw.blocked_network,
                        window: raw.blocked_network_window.clone(),
                    });
                }
            }
            EventType::LlmRequest => {
                let bytes = num("bytes");
                // The p95 of the (last 1000) requests before this one.
                let p95 = (self.llm.items.len() >= P95_MIN_SAMPLES).then(|| {
                    let skip = self.llm.items.len().saturating_sub(1000);
                    let mut sizes: Vec<u64> = self
                        .llm
                        .items
                        .iter()
                        .skip(skip)
                        .map(|&(_, _, b)| b)
                        .collect();
                    sizes.sort_unstable();
                    let i = (sizes.len() * 95).div_ceil(100).saturating_sub(1);
                    sizes[i.min(sizes.len() - 1)]
                });
                let over_p95 = p95.is_none_or(|p| bytes > p.saturating_mul(raw.llm_p95_factor));
                if bytes >= raw.llm_request_bytes && over_p95 {
                    out.push(Alert {
                        rule: rule("aibox-005"),
                        evidence: vec![e.seq],
                        evidence_total: 1,
                        observed: bytes,
                        threshold: raw.llm_request_bytes,
                        window: raw.llm_window.clone(),
                    });
                }
                self.llm.push(at, e.seq, bytes, th.llm_window);
            }
            EventType::FalcoAlert => {
                let id = e
                    .details
                    .get("rule_id")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if e.severity == Severity::Critical && !is_detection_rule(id) {
                    out.push(Alert {
                        rule: rule("aibox-006"),
                        evidence: vec![e.seq],
                        evidence_total: 1,
                        observed: 1,
                        threshold: 1,
                        window: String::new(),
                    });
                }
            }
            EventType::PolicyDeny => {
                self.denials
                    .push(at, e.seq, weight, th.policy_denials_window);
                if self.denials.sum >= raw.policy_denials {
                    let observed = self.denials.sum;
                    let (evidence, total) = self.denials.take();
                    out.push(Alert {
                        rule: rule("aibox-007"),
                        evidence,
                        evidence_total: total,
                        observed,
                        threshold: raw.policy_denials,
                        window: raw.policy_denials_window.clone(),
                    });
                }
            }
            EventType::SandboxStop => self.stopped_at = Some(at),
            EventType::SandboxCreate | EventType::SandboxStart => self.stopped_at = None,
            EventType::ToolDeny
                if e.details.get("rule").and_then(Value::as_str)
                    == Some("git-push-foreign-remote") =>
            {
                out.push(Alert {
                    rule: rule("aibox-010"),
                    evidence: vec![e.seq],
                    evidence_total: 1,
                    observed: 1,
                    threshold: 1,
                    window: String::new(),
                });
            }
            _ => {}
        }
        if matches!(
            e.event_type,
            EventType::CredentialUse | EventType::CredentialIssue
        ) && let Some(stop) = self.stopped_at
            && at
                .duration_since(stop)
                .is_ok_and(|d| d <= th.credential_after_stop_window)
        {
            out.push(Alert {
                rule: rule("aibox-008"),
                evidence: vec![e.seq],
                evidence_total: 1,
                observed: 1,
                threshold: 1,
                window: raw.credential_after_stop_window.clone(),
            });
        }
        if e.event_type != EventType::FalcoAlert {
            let run = longest_base64_run(&e.details);
            if run >= raw.base64_bytes {
                out.push(Alert {
                    rule: rule("aibox-009"),
                    evidence: vec![e.seq],
                    evidence_total: 1,
                    observed: run,
                    threshold: raw.base64_bytes,
                    window: String::new(),
                });
            }
        }
        out
    }
}

/// Whether `at` falls outside the configured business hours.
fn off_hours(at: SystemTime, th: &Parsed) -> bool {
    let secs = match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(_) => return false,
    };
    let local = secs + i64::from(th.utc_offset_minutes) * 60;
    let minute = (local.rem_euclid(86400) / 60) as u32;
    let (start, end) = th.hours;
    let inside = if start < end {
        minute >= start && minute < end
    } else {
        // A range across midnight, e.g. 22:00-06:00.
        minute >= start || minute < end
    };
    !inside
}

/// Detail fields that carry content by design (LLM bodies) or are file
/// paths (long directory names are not payloads): base64 there is not an
/// anomaly.
const CONTENT_FIELDS: &[&str] = &[
    "body",
    "request_body",
    "response_body",
    "prompt",
    "completion",
    "path",
];

/// The longest run of base64 characters in `s`.
pub fn base64_run(s: &str) -> u64 {
    let (mut run, mut best) = (0u64, 0u64);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_') {
            run += 1;
            best = best.max(run);
        } else if !matches!(b, b'\n' | b'\r') {
            // (Line breaks, as `base64` wraps at 76, go on.)
            run = 0;
        }
    }
    best
}

/// The detail where a writer that shortens arguments (the decision log)
/// keeps the longest base64 run they had before: cutting them must not
/// hide a payload from aibox-009.
pub const BASE64_RUN_FIELD: &str = "base64_run";

/// The longest run of base64 characters in any string of `details`
/// outside the content fields, or the [`BASE64_RUN_FIELD`] a writer
/// measured before shortening, whichever is longer.
pub fn longest_base64_run(details: &Map<String, Value>) -> u64 {
    fn walk(v: &Value, best: &mut u64) {
        match v {
            Value::String(s) => *best = (*best).max(base64_run(s)),
            Value::Array(items) => items.iter().for_each(|x| walk(x, best)),
            Value::Object(m) => m.values().for_each(|x| walk(x, best)),
            _ => {}
        }
    }
    let mut best = details
        .get(BASE64_RUN_FIELD)
        .and_then(Value::as_u64)
        .unwrap_or(0);
    for (k, v) in details {
        if !CONTENT_FIELDS.contains(&k.as_str()) {
            walk(v, &mut best);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Source;

    fn ev(seq: u64, t: EventType, secs: u64, d: Value) -> Event {
        ev_sev(seq, t, secs, d, Severity::Info)
    }

    fn ev_sev(seq: u64, t: EventType, secs: u64, d: Value, severity: Severity) -> Event {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs);
        Event {
            seq,
            timestamp: humantime::format_rfc3339_nanos(at).to_string(),
            event_type: t,
            sandbox_id: "s".into(),
            user_id: "u".into(),
            source: Source::AiboxSupervisor,
            severity,
            details: match d {
                Value::Object(m) => m,
                _ => Map::new(),
            },
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    fn det(th: Thresholds) -> Detector {
        Detector::new(th.parse().expect("valid thresholds"))
    }

    fn ids(a: &[Alert]) -> Vec<&'static str> {
        a.iter().map(|a| a.rule.id).collect()
    }

    #[test]
    fn count_rules_fire_at_the_threshold_and_not_before() {
        let cases = [
            (
                EventType::DnsQuery,
                "aibox-002",
                100u64,
                json!({"name": "a.example", "qtype": "A"}),
            ),
            (
                EventType::NetworkDeny,
                "aibox-004",
                20,
                json!({"host": "h", "port": 443, "reason": "r"}),
            ),
            (
                EventType::PolicyDeny,
                "aibox-007",
                15,
                json!({"action": "a", "rule": "r", "policy_version": "v", "reason": "x"}),
            ),
        ];
        for (t, id, n, d) in cases {
            let mut dt = det(Thresholds::default());
            for i in 0..n - 1 {
                assert!(
                    dt.observe(&ev(i, t, i / 10, d.clone())).is_empty(),
                    "{id} early at {i}"
                );
            }
            let a = dt.observe(&ev(n - 1, t, (n - 1) / 10, d.clone()));
            assert_eq!(ids(&a), vec![id]);
            assert_eq!(a[0].evidence_total, n);
            assert_eq!(a[0].evidence.last(), Some(&(n - 1)));
            // Counting starts afresh.
            assert!(dt.observe(&ev(n, t, n / 10, d.clone())).is_empty());
        }
    }

    #[test]
    fn events_outside_the_window_do_not_count() {
        let d = json!({"host": "h", "port": 443, "reason": "r"});
        let mut dt = det(Thresholds::default());
        // 19 denials, then 11 minutes later 19 more: never 20 within 10 min.
        for i in 0..19 {
            assert!(
                dt.observe(&ev(i, EventType::NetworkDeny, i, d.clone()))
                    .is_empty()
            );
        }
        for i in 0..19 {
            assert!(
                dt.observe(&ev(100 + i, EventType::NetworkDeny, 660 + i, d.clone()))
                    .is_empty()
            );
        }
    }

    #[test]
    fn outbound_volume_sums_bytes() {
        let th = Thresholds {
            outbound_bytes: 1000,
            ..Thresholds::default()
        };
        let mut dt = det(th);
        let up = |n: u64| json!({"host": "h", "port": 443, "bytes_up": n});
        assert!(
            dt.observe(&ev(0, EventType::NetworkAllow, 0, up(600)))
                .is_empty()
        );
        assert!(
            dt.observe(&ev(1, EventType::NetworkAllow, 1, up(399)))
                .is_empty()
        );
        let a = dt.observe(&ev(2, EventType::NetworkAllow, 2, up(1)));
        assert_eq!(ids(&a), vec!["aibox-001"]);
        assert_eq!(
            (a[0].observed, a[0].evidence.clone()),
            (1000, vec![0, 1, 2])
        );
    }

    #[test]
    fn llm_payload_needs_the_floor_and_the_p95() {
        let mut dt = det(Thresholds::default());
        let req = |n: u64| json!({"host": "api", "model": "m", "bytes": n});
        assert!(
            dt.observe(&ev(0, EventType::LlmRequest, 0, req((1 << 20) - 1)))
                .is_empty()
        );
        assert_eq!(
            ids(&dt.observe(&ev(1, EventType::LlmRequest, 1, req(1 << 20)))),
            vec!["aibox-005"]
        );
        // Twenty large requests make 3 MB normal here.
        let mut dt = det(Thresholds::default());
        for i in 0..20 {
            dt.observe(&ev(i, EventType::LlmRequest, i, req(1 << 20)));
        }
        assert!(
            dt.observe(&ev(20, EventType::LlmRequest, 20, req(3 << 20)))
                .is_empty()
        );
        assert_eq!(
            ids(&dt.observe(&ev(21, EventType::LlmRequest, 21, req((3 << 20) + 1)))),
            vec!["aibox-005"]
        );
    }

    #[test]
    fn off_hours_credentials() {
        // 1_800_000_000 is 08:00 UTC.
        let issue = json!({"credential_type": "git-token"});
        let inside = Thresholds {
            business_hours: "08:00-09:00".into(),
            ..Thresholds::default()
        };
        assert!(
            det(inside)
                .observe(&ev(0, EventType::CredentialIssue, 0, issue.clone()))
                .is_empty()
        );
        let before = Thresholds {
            business_hours: "08:01-09:00".into(),
            ..Thresholds::default()
        };
        assert_eq!(
            ids(&det(before).observe(&ev(0, EventType::CredentialIssue, 0, issue.clone()))),
            vec!["aibox-003"]
        );
        // 08:00 UTC is 09:00 at +01:00.
        let shifted = Thresholds {
            business_hours: "09:00-10:00".into(),
            business_hours_utc_offset: "+01:00".into(),
            ..Thresholds::default()
        };
        assert!(
            det(shifted)
                .observe(&ev(0, EventType::CredentialIssue, 0, issue.clone()))
                .is_empty()
        );
        let wrap = Thresholds {
            business_hours: "22:00-08:01".into(),
            ..Thresholds::default()
        };
        assert!(
            det(wrap)
                .observe(&ev(0, EventType::CredentialIssue, 0, issue))
                .is_empty()
        );
    }

    #[test]
    fn single_event_rules() {
        let mut dt = det(Thresholds::default());
        let crit = |id: &str| json!({"rule_id": id, "mitre": "T1611"});
        assert_eq!(
            ids(&dt.observe(&ev_sev(
                0,
                EventType::FalcoAlert,
                0,
                crit("aibox-ptrace"),
                Severity::Critical
            ))),
            vec!["aibox-006"]
        );
        // A high alert, or a detection rule's own critical alert, does not.
        assert!(
            dt.observe(&ev_sev(
                1,
                EventType::FalcoAlert,
                0,
                crit("x"),
                Severity::High
            ))
            .is_empty()
        );
        assert!(
            dt.observe(&ev_sev(
                2,
                EventType::FalcoAlert,
                0,
                crit("aibox-008"),
                Severity::Critical
            ))
            .is_empty()
        );
        let push = |rule: &str| json!({"argv": ["git", "push"], "rule": rule, "reason": "r"});
        assert_eq!(
            ids(&dt.observe(&ev(
                3,
                EventType::ToolDeny,
                0,
                push("git-push-foreign-remote")
            ))),
            vec!["aibox-010"]
        );
        assert!(
            dt.observe(&ev(4, EventType::ToolDeny, 0, push("git-push-review")))
                .is_empty()
        );
    }

    #[test]
    fn credentials_after_stop() {
        let mut dt = det(Thresholds::default());
        let used = json!({"credential_type": "git-token", "host": "h"});
        assert!(
            dt.observe(&ev(0, EventType::CredentialUse, 0, used.clone()))
                .is_empty()
        );
        dt.observe(&ev(
            1,
            EventType::SandboxStop,
            10,
            json!({"reason": "stop"}),
        ));
        assert_eq!(
            ids(&dt.observe(&ev(2, EventType::CredentialUse, 3610, used.clone()))),
            vec!["aibox-008"]
        );
        assert!(
            dt.observe(&ev(3, EventType::CredentialUse, 3611, used.clone()))
                .is_empty()
        );
        dt.observe(&ev(
            4,
            EventType::SandboxStart,
            3612,
            json!({"init_pid": 1, "duration_ms": 1}),
        ));
        assert!(
            dt.observe(&ev(5, EventType::CredentialUse, 3613, used))
                .is_empty()
        );
    }

    #[test]
    fn base64_in_non_content_fields() {
        let mut dt = det(Thresholds::default());
        let blob = "QUJD".repeat(2560); // 10240 bytes
        let argv = |s: &str| json!({"session_id": "1", "argv": ["echo", s], "tty": false});
        assert!(
            dt.observe(&ev(0, EventType::SessionStart, 0, argv(&blob[1..])))
                .is_empty()
        );
        let a = dt.observe(&ev(1, EventType::SessionStart, 0, argv(&blob)));
        assert_eq!((ids(&a), a[0].observed), (vec!["aibox-009"], 10240));
        // In an LLM body it is content, not an anomaly.
        let body = json!({"host": "api", "model": "m", "bytes": 10, "body": blob});
        assert!(
            dt.observe(&ev(2, EventType::LlmRequest, 0, body))
                .is_empty()
        );
        // Arguments a writer shortened: the run it measured before counts.
        let cut =
            json!({"action": "exec", "argv": ["sh", "QUJD…"], "rule": "r", "base64_run": 20480});
        let a = dt.observe(&ev(3, EventType::PolicyAllow, 0, cut));
        assert_eq!((ids(&a), a[0].observed), (vec!["aibox-009"], 20480));
    }

    #[test]
    fn summaries_count_as_the_events_they_stand_for() {
        let mut dt = det(Thresholds::default());
        let d = json!({"name": "x.test", "qtype": "summary", "summary": true, "held_back": 99});
        assert!(dt.observe(&ev(10, EventType::DnsQuery, 0, d)).is_empty());
        let one = json!({"name": "y.test", "qtype": "A"});
        let a = dt.observe(&ev(11, EventType::DnsQuery, 1, one));
        assert_eq!((ids(&a), a[0].observed), (vec!["aibox-002"], 100));
    }

    #[test]
    fn bad_thresholds_name_the_field() {
        let bad = [
            (
                Thresholds {
                    dns_window: "soon".into(),
                    ..Thresholds::default()
                },
                "dns_window",
            ),
            (
                Thresholds {
                    business_hours: "25:00-06:00".into(),
                    ..Thresholds::default()
                },
                "business_hours",
            ),
            (
                Thresholds {
                    business_hours_utc_offset: "0100".into(),
                    ..Thresholds::default()
                },
                "business_hours_utc_offset",
            ),
            (
                Thresholds {
                    policy_denials: 0,
                    ..Thresholds::default()
                },
                "policy_denials",
            ),
        ];
        for (th, field) in bad {
            assert_eq!(th.parse().map(drop).map_err(|e| e.field), Err(field));
        }
    }
}
