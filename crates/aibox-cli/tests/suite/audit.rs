//! The audit trail of a real run, and tampering with it.

use super::common::*;

fn lines(p: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn verify_at(c: &Ctx, content: &[String]) -> (bool, String) {
    let p = c.dir.path().join("tampered.jsonl");
    std::fs::write(&p, content.join("\n") + "\n").unwrap();
    let o = c.out(&["audit", "verify", "--file", &p.display().to_string()]);
    (o.status.success(), stdout(&o))
}

both_modes!(real_run_log_verifies_and_tampering_is_located, |c: Ctx| {
    let ws = c.ws.display().to_string();
    ok(&c.out(&["run", "-w", &ws, "--name", "audited", "--", "true"]));
    let o = c.out(&[
        "run", "-w", &ws, "--name", "audited", "--", "sh", "-c", "exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3));
    let log = c.data.join("audit/audited.jsonl");
    let l = lines(&log);
    let types: Vec<String> = l
        .iter()
        .map(|x| {
            serde_json::from_str::<serde_json::Value>(x).unwrap()["event_type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for t in [
        "sandbox.create",
        "sandbox.config",
        "sandbox.start",
        "session.start",
        "session.end",
        "sandbox.stop",
        "sandbox.destroy",
    ] {
        assert!(types.iter().any(|x| x == t), "{t} missing: {types:?}");
    }
    let ends: Vec<i64> = l
        .iter()
        .map(|x| serde_json::from_str::<serde_json::Value>(x).unwrap())
        .filter(|v| v["event_type"] == "session.end")
        .map(|v| v["details"]["exit_code"].as_i64().unwrap())
        .collect();
    assert_eq!(ends, [0, 3]);
    let out = ok(&c.out(&["audit", "verify", "--name", "audited"]));
    assert!(
        out.contains(&format!("intact ({} events", l.len())),
        "{out}"
    );
    // The log is the host's, mode 0600.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let n = l.len();
    assert!(n >= 12);
    // One byte changed.
    let mut t = l.clone();
    t[5] = t[5].replacen("\"info\"", "\"infO\"", 1);
    assert_ne!(t[5], l[5]);
    let (good, out) = verify_at(&c, &t);
    assert!(!good && out.contains("BROKEN at index 5"), "{out}");
    // A line deleted.
    let mut t = l.clone();
    t.remove(4);
    let (good, out) = verify_at(&c, &t);
    assert!(!good && out.contains("BROKEN at index 4"), "{out}");
    // Two lines swapped.
    let mut t = l.clone();
    t.swap(7, 8);
    let (good, out) = verify_at(&c, &t);
    assert!(!good && out.contains("BROKEN at index 7"), "{out}");
    // The untouched copy still verifies.
    let (good, out) = verify_at(&c, &l);
    assert!(good, "{out}");
});
