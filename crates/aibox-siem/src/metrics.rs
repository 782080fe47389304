//! Prometheus metrics computed from the audit events: the same stream
//! that is chained, signed and exported, so a dashboard never shows
//! numbers the audit trail cannot back.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// What kind of Prometheus metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, a sum and a count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A metric family aibox serves.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// The metric name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Its help text.
    pub help: &'static str,
}

const fn family(name: &'static str, kind: Kind, help: &'static str) -> Family {
    Family { name, kind, help }
}

/// Every family `aibox metrics serve` exposes (each appears in every
/// scrape, with no samples if nothing happened yet).
pub const FAMILIES: &[Family] = &[
    family(
        "aibox_sandboxes_running",
        Kind::Gauge,
        "Sandboxes whose supervisor is running.",
    ),
    family(
        "aibox_sandbox_up",
        Kind::Gauge,
        "1 while the sandbox runs, 0 after it stopped.",
    ),
    family(
        "aibox_sandbox_starts_total",
        Kind::Counter,
        "Sandbox starts (sandbox.start).",
    ),
    family(
        "aibox_sandbox_start_seconds",
        Kind::Histogram,
        "Time from the start request to a running sandbox.",
    ),
    family(
        "aibox_sessions_total",
        Kind::Counter,
        "Commands and shells run in sandboxes (session.start).",
    ),
    family(
        "aibox_audit_events_total",
        Kind::Counter,
        "Audit events written, by type.",
    ),
    family(
        "aibox_policy_decisions_total",
        Kind::Counter,
        "Exec policy decisions (policy.allow / policy.deny).",
    ),
    family(
        "aibox_tool_decisions_total",
        Kind::Counter,
        "Tool decisions: review (tool.invoke), approve, deny.",
    ),
    family(
        "aibox_network_requests_total",
        Kind::Counter,
        "Egress connections and requests, allowed or denied.",
    ),
    family(
        "aibox_network_bytes_sent_total",
        Kind::Counter,
        "Bytes sent out through the egress proxy.",
    ),
    family(
        "aibox_network_bytes_received_total",
        Kind::Counter,
        "Bytes received through the egress proxy.",
    ),
    family(
        "aibox_dns_queries_total",
        Kind::Counter,
        "DNS queries from sandboxes.",
    ),
    family(
        "aibox_dns_responses_total",
        Kind::Counter,
        "DNS answers given to sandboxes, by response code.",
    ),
    family(
        "aibox_credential_events_total",
        Kind::Counter,
        "Credential issue, use, rotate and revoke events.",
    ),
    family(
        "aibox_llm_requests_total",
        Kind::Counter,
        "Requests through the LLM gateway, by provider.",
    ),
    family(
        "aibox_llm_request_bytes_total",
        Kind::Counter,
        "Request bytes sent through the LLM gateway.",
    ),
    family(
        "aibox_llm_request_size_bytes",
        Kind::Histogram,
        "Size of requests through the LLM gateway.",
    ),
    family(
        "aibox_llm_tokens_total",
        Kind::Counter,
        "LLM tokens reported by the provider, input and output.",
    ),
    family(
        "aibox_alerts_total",
        Kind::Counter,
        "Alerts (falco.alert): detection rules and runtime alerts.",
    ),
    family(
        "aibox_file_events_total",
        Kind::Counter,
        "Workspace file reads and writes observed.",
    ),
];

const START_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const SIZE_BUCKETS: &[f64] = &[1e3, 1e4, 1e5, 1e6, 1e7];

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Metrics accumulated from audit events.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: BTreeMap<(&'static str, Labels), u64>,
    histograms: BTreeMap<(&'static str, Labels), Histogram>,
    up: BTreeMap<String, bool>,
    seen: std::collections::BTreeSet<String>,
}

impl Metrics {
    fn add(&mut self, name: &'static str, labels: Labels, n: u64) {
        *self.counters.entry((name, labels)).or_default() += n;
    }

    fn observe_hist(&mut self, name: &'static str, bounds: &[f64], labels: Labels, v: f64) {
        let h = self
            .histograms
            .entry((name, labels))
            .or_insert_with(|| Histogram {
                buckets: vec![0; bounds.len()],
                ..Histogram::default()
            });
        for (i, b) in bounds.iter().enumerate() {
            if v <= *b {
                h.buckets[i] += 1;
            }
        }
        h.sum += v;
        h.count += 1;
    }

    fn alert(&mut self, sb: &str, rule: &str, sev: &str, n: u64) {
        let labels = vec![
            ("sandbox", sb.to_string()),
            ("rule_id", rule.to_string()),
            ("severity", sev.to_string()),
        ];
        self.add("aibox_alerts_total", labels, n);
    }

    /// Zero-valued series for a sandbox's first scrape: Prometheus'
    /// `increase()` cannot see a series' first sample, so an alert rule
    /// over a series that appears at 1 would miss the first occurrence.
    fn zeros(&mut self, sb: &str) {
        let s = || vec![("sandbox", sb.to_string())];
        let with = |k: &'static str, v: &str| vec![("sandbox", sb.to_string()), (k, v.to_string())];
        for (rule, sev) in aibox_audit::detect::RULES
            .iter()
            .map(|r| (r.id, severity_name(r.audit_severity())))
            .chain([
                ("aibox-cloud-metadata", "critical"),
                ("aibox-credential-misuse", "high"),
            ])
        {
            self.alert(sb, rule, sev, 0);
        }
        for d in ["allow", "deny"] {
            self.add("aibox_network_requests_total", with("decision", d), 0);
            self.add("aibox_policy_decisions_total", with("decision", d), 0);
        }
        self.add("aibox_dns_queries_total", s(), 0);
        self.add("aibox_network_bytes_sent_total", s(), 0);
        self.add("aibox_sessions_total", s(), 0);
    }

    /// Counts one audit event (a parsed log line).
    pub fn observe(&mut self, e: &Value) {
        let (Some(t), Some(sb)) = (e["event_type"].as_str(), e["sandbox_id"].as_str()) else {
            return;
        };
        let d = &e["details"];
        let s = || vec![("sandbox", sb.to_string())];
        let with = |k: &'static str, v: &str| vec![("sandbox", sb.to_string()), (k, v.to_string())];
        let num = |k: &str| d[k].as_u64().unwrap_or(0);
        // A summary of events held back over a rate counts as the events
        // it stands for.
        let n = if d["summary"] == serde_json::Value::Bool(true) {
            num("held_back").max(1)
        } else {
            1
        };
        if self.seen.insert(sb.to_string()) {
            self.zeros(sb);
        }
        self.add("aibox_audit_events_total", with("event_type", t), 1);
        match t {
            "sandbox.start" => {
                self.add("aibox_sandbox_starts_total", s(), 1);
                self.observe_hist(
                    "aibox_sandbox_start_seconds",
                    START_BUCKETS,
                    s(),
                    num("duration_ms") as f64 / 1000.0,
                );
                self.up.insert(sb.to_string(), true);
            }
            "sandbox.create" => {
                self.up.entry(sb.to_string()).or_insert(false);
            }
            "sandbox.stop" | "sandbox.destroy" => {
                self.up.insert(sb.to_string(), false);
            }
            "session.start" => self.add("aibox_sessions_total", s(), 1),
            "policy.allow" => {
                self.add("aibox_policy_decisions_total", with("decision", "allow"), n)
            }
            "policy.deny" => self.add("aibox_policy_decisions_total", with("decision", "deny"), n),
            "tool.invoke" => self.add("aibox_tool_decisions_total", with("decision", "review"), n),
            "tool.approve" => {
                self.add("aibox_tool_decisions_total", with("decision", "approve"), 1)
            }
            "tool.deny" => self.add("aibox_tool_decisions_total", with("decision", "deny"), n),
            "network.allow" => {
                self.add("aibox_network_requests_total", with("decision", "allow"), n);
                self.add("aibox_network_bytes_sent_total", s(), num("bytes_up"));
                self.add("aibox_network_bytes_received_total", s(), num("bytes_down"));
            }
            "network.deny" => self.add("aibox_network_requests_total", with("decision", "deny"), n),
            "dns.query" => self.add("aibox_dns_queries_total", s(), n),
            "dns.response" => self.add(
                "aibox_dns_responses_total",
                with("rcode", d["rcode"].as_str().unwrap_or("unknown")),
                n,
            ),
            "credential.issue" | "credential.use" | "credential.rotate" | "credential.revoke" => {
                self.add(
                    "aibox_credential_events_total",
                    with("action", t.trim_start_matches("credential.")),
                    1,
                )
            }
            "llm.request" => {
                let provider = d["provider"].as_str().unwrap_or("");
                self.add("aibox_llm_requests_total", with("provider", provider), 1);
                self.add("aibox_llm_request_bytes_total", s(), num("bytes"));
                self.observe_hist(
                    "aibox_llm_request_size_bytes",
                    SIZE_BUCKETS,
                    s(),
                    num("bytes") as f64,
                );
            }
            "llm.response" => {
                self.add(
                    "aibox_llm_tokens_total",
                    with("direction", "input"),
                    num("input_tokens"),
                );
                self.add(
                    "aibox_llm_tokens_total",
                    with("direction", "output"),
                    num("output_tokens"),
                );
            }
            "falco.alert" => {
                let rule = d["rule_id"].as_str().unwrap_or("");
                let sev = e["severity"].as_str().unwrap_or("");
                self.alert(sb, rule, sev, 1);
            }
            "file.read" | "file.write" => {
                let op = d["op"].as_str().unwrap_or(t.trim_start_matches("file."));
                // A summary stands for the events it held back.
                let n = if op == "summary" {
                    num("suppressed")
                } else {
                    1
                };
                let op = if op == "summary" {
                    t.trim_start_matches("file.")
                } else {
                    op
                };
                self.add("aibox_file_events_total", with("op", op), n);
            }
            _ => {}
        }
    }

    /// The Prometheus text exposition. `running`, when given, is the set
    /// of sandboxes whose supervisor answers right now (the log alone
    /// cannot tell a killed supervisor from a running one).
    pub fn render(&self, running: Option<&BTreeSet<String>>) -> String {
        let mut out = String::new();
        for f in FAMILIES {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind.as_str());
            match f.name {
                "aibox_sandboxes_running" => {
                    let n = match running {
                        Some(r) => r.len(),
                        None => self.up.values().filter(|u| **u).count(),
                    };
                    let _ = writeln!(out, "{} {n}", f.name);
                }
                "aibox_sandbox_up" => {
                    let mut names: BTreeSet<&String> = self.up.keys().collect();
                    if let Some(r) = running {
                        names.extend(r.iter());
                    }
                    for n in names {
                        let up = match running {
                            Some(r) => r.contains(n),
                            None => self.up.get(n).copied().unwrap_or(false),
                        };
                        let _ = writeln!(
                            out,
                            "{}{{sandbox=\"{}\"}} {}",
                            f.name,
                            escape(n),
                            u8::from(up)
                        );
                    }
                }
                _ if f.kind == Kind::Histogram => {
                    let bounds = if f.name == "aibox_sandbox_start_seconds" {
                        START_BUCKETS
                    } else {
                        SIZE_BUCKETS
                    };
                    for ((_, labels), h) in
                        self.histograms.iter().filter(|((n, _), _)| *n == f.name)
                    {
                        let base = render_labels(labels);
                        for (b, c) in bounds.iter().zip(&h.buckets) {
                            let _ = writeln!(
                                out,
                                "{}_bucket{{{}le=\"{}\"}} {c}",
                                f.name,
                                with_comma(&base),
                                b
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{}_bucket{{{}le=\"+Inf\"}} {}",
                            f.name,
                            with_comma(&base),
                            h.count
                        );
                        let _ = writeln!(out, "{}_sum{{{base}}} {}", f.name, h.sum);
                        let _ = writeln!(out, "{}_count{{{base}}} {}", f.name, h.count);
                    }
                }
                _ => {
                    for ((_, labels), v) in self.counters.iter().filter(|((n, _), _)| *n == f.name)
                    {
                        let _ = writeln!(out, "{}{{{}}} {v}", f.name, render_labels(labels));
                    }
                }
            }
        }
        out
    }
}

fn severity_name(s: aibox_audit::Severity) -> &'static str {
    match s {
        aibox_audit::Severity::Critical => "critical",
        aibox_audit::Severity::High => "high",
        aibox_audit::Severity::Warning => "warning",
        aibox_audit::Severity::Info => "info",
    }
}

fn with_comma(base: &str) -> String {
    if base.is_empty() {
        String::new()
    } else {
        format!("{base},")
    }
}

fn render_labels(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Label value escaping of the text format: backslash, quote, newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Follows the audit logs of a directory, reading only what was appended
/// since the last call (a line still being written waits for the next).
/// Files are known by inode, so a log sealed into a segment (moved) is
/// finished where it was left, and its fresh successor read from the start.
#[derive(Debug, Default)]
pub struct Follower {
    offsets: BTreeMap<(u64, u64), u64>,
}

impl Follower {
    /// Feeds every complete new line of the logs in `dir` (`*.jsonl` and
    /// their sealed `*.segments/*.jsonl`) to `metrics`.
    pub fn poll(&mut self, dir: &Path, metrics: &mut Metrics) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut logs: Vec<PathBuf> = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".jsonl") && !name.ends_with(".decisions.jsonl") {
                logs.push(p);
            } else if name.ends_with(".segments")
                && let Ok(segs) = std::fs::read_dir(&p)
            {
                logs.extend(segs.flatten().map(|s| s.path()));
            }
        }
        // Segments before the active files they were sealed from.
        logs.sort_by_key(|p| p.parent().is_none_or(|d| d == dir));
        for p in logs {
            let Ok(mut f) = std::fs::File::open(&p) else {
                continue;
            };
            let Ok(meta) = f.metadata() else { continue };
            let key = (meta.dev(), meta.ino());
            let len = meta.len();
            let mut at = self.offsets.get(&key).copied().unwrap_or(0);
            if len < at {
                at = 0;
            }
            if f.seek(SeekFrom::Start(at)).is_err() {
                continue;
            }
            let mut buf = Vec::new();
            if f.take(len - at).read_to_end(&mut buf).is_err() {
                continue;
            }
            let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
                self.offsets.insert(key, at);
                continue;
            };
            for line in buf[..end].split(|b| *b == b'\n') {
                if let Ok(v) = serde_json::from_slice::<Value>(line) {
                    metrics.observe(&v);
                }
            }
            self.offsets.insert(key, at + end as u64 + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(t: &str, d: Value) -> Value {
        json!({"event_type": t, "sandbox_id": "sb", "severity": "info", "details": d})
    }

    #[test]
    fn counts_and_renders() {
        let mut m = Metrics::default();
        m.observe(&ev("sandbox.start", json!({"duration_ms": 300})));
        m.observe(&ev(
            "network.allow",
            json!({"bytes_up": 10, "bytes_down": 20}),
        ));
        m.observe(&ev("network.deny", json!({})));
        m.observe(&ev("file.write", json!({"op": "summary", "suppressed": 7})));
        let text = m.render(None);
        assert!(text.contains("aibox_sandboxes_running 1\n"), "{text}");
        assert!(text.contains("aibox_network_bytes_sent_total{sandbox=\"sb\"} 10\n"));
        assert!(
            text.contains("aibox_network_requests_total{sandbox=\"sb\",decision=\"deny\"} 1\n")
        );
        assert!(
            text.contains("aibox_sandbox_start_seconds_bucket{sandbox=\"sb\",le=\"0.25\"} 0\n")
        );
        assert!(text.contains("aibox_sandbox_start_seconds_bucket{sandbox=\"sb\",le=\"0.5\"} 1\n"));
        assert!(text.contains("aibox_file_events_total{sandbox=\"sb\",op=\"write\"} 7\n"));
        m.observe(&ev("sandbox.stop", json!({})));
        assert!(m.render(None).contains("aibox_sandboxes_running 0\n"));
        for f in FAMILIES {
            assert!(text.contains(&format!("# TYPE {} ", f.name)));
        }
    }

    #[test]
    fn the_follower_reads_only_whole_new_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.jsonl");
        let line = ev("dns.query", json!({})).to_string();
        std::fs::write(&p, format!("{line}\n{}", &line[..10])).unwrap();
        let (mut f, mut m) = (Follower::default(), Metrics::default());
        f.poll(d.path(), &mut m);
        assert!(
            m.render(None)
                .contains("aibox_dns_queries_total{sandbox=\"sb\"} 1\n")
        );
        std::fs::write(&p, format!("{line}\n{line}\n")).unwrap();
        f.poll(d.path(), &mut m);
        assert!(
            m.render(None)
                .contains("aibox_dns_queries_total{sandbox=\"sb\"} 2\n")
        );
    }
}
