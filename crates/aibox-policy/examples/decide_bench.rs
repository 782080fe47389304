//! Decision latency of the exec gate's decider: cold (an input never seen,
//! so the YAML rules and the Rego baseline run) and cached (the same input
//! again). Prints JSON with medians and p99 in microseconds.
//!
//! cargo run --release -p aibox-policy --example decide_bench [N]

#![allow(clippy::expect_used)] // a benchmark: a broken fixture should stop it loudly

use std::time::Instant;

use aibox_policy::{Decider, ExecInput};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let text = "version: 1
tools:
  rules:
    - {match: [curl], risk: blocked-by-default, reason: no downloads}
    - {match: [wget], risk: blocked-by-default}
    - {match: [git, push], risk: review-required}
    - {match: [npm, publish], risk: blocked-by-default}
    - {match: [sort], risk: review-required}
";
    let tier = aibox_policy::Tier {
        name: "org".into(),
        path: "org.yaml".into(),
        policy: aibox_policy::parse("org", "org.yaml", text).expect("policy"),
        rego: Vec::new(),
    };
    let (merged, _) = aibox_policy::merge(&[tier]);
    let mut d = Decider::new(&merged).expect("decider");
    let input = |i: usize| ExecInput {
        argv: vec!["ls".into(), "-la".into(), format!("/workspace/dir{i}")],
        exe: "/usr/bin/ls".into(),
        exe_sha256: "cb30d69b24245bf2ecdc9e7f53bbad19159999970b6d82c0c00c7d32d9e37aa4".into(),
        cwd: "/workspace".into(),
        uid: 1000,
        env_names: ["PATH", "HOME", "TERM", "LANG", "HTTPS_PROXY"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        sandbox: "bench".into(),
        exe_aliases: Vec::new(),
        parent: "bash".into(),
    };
    // Warm the engine once (first evaluation compiles the policy).
    d.decide(&input(usize::MAX));
    let mut cold = Vec::with_capacity(n);
    for i in 0..n {
        let x = input(i);
        let t = Instant::now();
        std::hint::black_box(d.decide(&x));
        cold.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let x = input(0);
    let mut cached = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(d.decide(&x));
        cached.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!(
        "{}",
        serde_json::json!({
            "n": n,
            "cold_median_us": pct(&mut cold, 0.5), "cold_p99_us": pct(&mut cold, 0.99),
            "cached_median_us": pct(&mut cached, 0.5), "cached_p99_us": pct(&mut cached, 0.99),
        })
    );
}
