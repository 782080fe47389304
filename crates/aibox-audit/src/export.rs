//! Events in the shapes SIEMs ingest: Elastic Common Schema and OCSF.
//! Each output line keeps the event's sequence number and hash, so a
//! record in the SIEM can be traced back to the signed chain.

use serde_json::{Value, json};

use crate::{Event, Severity};

fn severity_number(s: Severity) -> u8 {
    match s {
        Severity::Info => 1,
        Severity::Warning => 3,
        Severity::High => 4,
        Severity::Critical => 5,
    }
}

fn as_str<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The event in Elastic Common Schema (8.x) field names.
pub fn ecs(e: &Event) -> Value {
    let t = e.event_type.as_str();
    let (category, kind) = match t.split('.').next().unwrap_or("") {
        "network" | "dns" => ("network", "event"),
        "tool" | "session" => ("process", "event"),
        "file" => ("file", "event"),
        "credential" => ("iam", "event"),
        "falco" => ("intrusion_detection", "alert"),
        "policy" => ("configuration", "event"),
        _ => ("host", "event"),
    };
    let outcome = match t {
        "network.deny" | "tool.deny" | "policy.deny" => "failure",
        "network.allow" | "tool.approve" | "policy.allow" => "success",
        _ => "unknown",
    };
    json!({
        "@timestamp": e.timestamp,
        "ecs": {"version": "8.11.0"},
        "event": {
            "kind": kind, "category": [category], "action": t, "outcome": outcome,
            "severity": severity_number(e.severity), "sequence": e.seq,
            "hash": e.hash, "provider": as_str(&e.source), "module": "aibox",
        },
        "user": {"name": e.user_id},
        "labels": {"sandbox": e.sandbox_id, "prev_hash": e.prev_hash},
        "aibox": {"details": e.details, "severity": as_str(&e.severity)},
    })
}

/// The event as an OCSF 1.1 record: the class that fits its type, the
/// aibox fields under `unmapped`.
pub fn ocsf(e: &Event) -> Value {
    let t = e.event_type.as_str();
    // (class_uid, category_uid, class_name)
    let (class, category, name) = match t.split('.').next().unwrap_or("") {
        "network" => (4001, 4, "Network Activity"),
        "dns" => (4003, 4, "DNS Activity"),
        "tool" | "session" => (1007, 1, "Process Activity"),
        "file" => (1001, 1, "File System Activity"),
        "credential" => (3002, 3, "Authentication"),
        "falco" => (2004, 2, "Detection Finding"),
        "llm" => (6003, 6, "API Activity"),
        _ => (6002, 6, "Application Lifecycle"),
    };
    let millis = humantime::parse_rfc3339(&e.timestamp)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    json!({
        "class_uid": class, "class_name": name, "category_uid": category,
        "activity_id": 99, "activity_name": t,
        "type_uid": class * 100 + 99,
        "time": millis,
        "severity_id": severity_number(e.severity), "severity": as_str(&e.severity),
        "status": match t {
            "network.deny" | "tool.deny" | "policy.deny" => "Failure",
            _ => "Success",
        },
        "actor": {"user": {"name": e.user_id}},
        "metadata": {
            "version": "1.1.0",
            "product": {"name": "aibox", "vendor_name": "aibox"},
            "uid": e.hash, "sequence": e.seq, "log_name": e.sandbox_id,
            "original_time": e.timestamp,
        },
        "unmapped": {"details": e.details, "source": as_str(&e.source), "prev_hash": e.prev_hash},
    })
}
