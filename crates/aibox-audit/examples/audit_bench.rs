//! Audit log throughput: chained appends per second as the supervisor
//! makes them with the default config — checkpoints signed (and the log
//! fsynced) every 1000 events, the ten detection rules evaluated on every
//! event, the log sealed into a signed segment every 64 MB — and
//! verification of the chain, its segments and checkpoints per second.
//! Beside them, in the same run, the floor: the same events written as
//! plain JSON lines with no hash, no canonical form and no signatures.
//!
//! `cargo run --release -p aibox-audit --example audit_bench -- [EVENTS]`

use std::io::Write;
use std::time::{Duration, Instant};

use aibox_audit::checkpoint::{Signer, Trusted, public_key_path};
use aibox_audit::{AuditLog, EventType, Severity, Source, verify_with_checkpoints};

fn details(i: u64) -> serde_json::Map<String, serde_json::Value> {
    let mut d = serde_json::Map::new();
    d.insert("host".into(), "registry.npmjs.org".into());
    d.insert("port".into(), 443.into());
    d.insert("method".into(), "CONNECT".into());
    d.insert("rule".into(), "registry.npmjs.org".into());
    d.insert("bytes_up".into(), (i % 100).into());
    d.insert("bytes_down".into(), (i * 7).into());
    d
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500_000);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.jsonl");
    let key = dir.path().join("audit-signing.key");

    let mut log = AuditLog::open(&path, "bench", "user")?;
    log.set_signer(Signer::load_or_create(&key)?, 1000, Duration::from_secs(60));
    log.set_segment_max(64 << 20);
    log.set_detector(
        aibox_audit::detect::Detector::new(aibox_audit::detect::Thresholds::default().parse()?),
        Source::AiboxSupervisor,
    );
    let t = Instant::now();
    for i in 0..n {
        log.append(
            EventType::NetworkAllow,
            Source::AiboxSupervisor,
            Severity::Info,
            details(i),
        )?;
    }
    log.checkpoint()?;
    log.sync()?;
    let append = t.elapsed();
    drop(log);
    let size: u64 = aibox_audit::segments::files(&path)
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();

    let trusted = Trusted::load(&public_key_path(&key))?;
    let t = Instant::now();
    let (report, cps) = verify_with_checkpoints(&path, "bench", Some(&trusted), None)?;
    let verify = t.elapsed();
    // Where the time goes: the chain alone, and the segments' digests.
    let t = Instant::now();
    let chain = aibox_audit::verify_reader(aibox_audit::segments::ChainReader::new(&path))?;
    let chain_only = t.elapsed();
    let t = Instant::now();
    let segs = aibox_audit::segments::check(&path, "bench", Some(&trusted))?;
    let segs_only = t.elapsed();
    eprintln!(
        "  (chain alone {:.0} events/s; {} segment digests {:.2} s)",
        chain.verified as f64 / chain_only.as_secs_f64(),
        segs.sealed,
        segs_only.as_secs_f64()
    );
    if !report.is_intact()
        || !cps.problems.is_empty()
        || !cps.segments.problems.is_empty()
        || report.verified != n
    {
        return Err("the benchmark log did not verify".into());
    }

    // The floor: plain lines, buffered, one fsync at the end.
    let plain = dir.path().join("plain.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&plain)?);
    let t = Instant::now();
    for i in 0..n {
        let mut v = serde_json::Value::Object(details(i));
        v["seq"] = i.into();
        serde_json::to_writer(&mut f, &v)?;
        f.write_all(b"\n")?;
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    let floor = t.elapsed();

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "events:                 {n} ({:.1} MB chained)",
        size as f64 / 1e6
    );
    println!(
        "chained appends:        {:>10.0} events/s (checkpoint + fsync every 1000)",
        rate(append)
    );
    println!(
        "verify (chain + sigs):  {:>10.0} events/s ({} checkpoints)",
        rate(verify),
        cps.checked
    );
    println!(
        "floor, plain JSON lines:{:>10.0} events/s (no hash, no canonical form)",
        rate(floor)
    );
    Ok(())
}
