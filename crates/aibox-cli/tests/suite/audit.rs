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

/// With the audit log's filesystem full, commands are refused rather than
/// run unrecorded (root only: it mounts a tiny tmpfs as the data dir).
#[test]
fn commands_are_refused_when_the_audit_log_cannot_be_written() {
    let Some(c) = Ctx::new(Mode::Root) else {
        return;
    };
    std::fs::create_dir_all(&c.data).unwrap();
    let st = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=256k",
            "tmpfs",
            &c.data.display().to_string(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(c.data.clone());
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "full"]));
    assert_eq!(
        ok(&c.out(&["exec", "--name", "full", "--", "echo", "recorded"])),
        "recorded\n"
    );
    // Fill the filesystem.
    let _ = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", c.data.join("fill").display()),
            "bs=4k",
        ])
        .stderr(std::process::Stdio::null())
        .status();
    // The log's last page may still have room for a few events; once it
    // has none, the command must be refused and must not run.
    let marker = c.ws.join("ran");
    let mut refused = false;
    for _ in 0..60 {
        let o = c.out(&["exec", "--name", "full", "--", "touch", "/workspace/ran"]);
        if o.status.success() {
            std::fs::remove_file(&marker).unwrap();
            continue;
        }
        assert!(
            stderr(&o).contains("refusing to run the command unrecorded"),
            "{}",
            stderr(&o)
        );
        assert!(
            !marker.exists(),
            "the command ran although its record could not be written"
        );
        refused = true;
        break;
    }
    assert!(
        refused,
        "commands kept running with a full audit filesystem"
    );
    std::fs::remove_file(c.data.join("fill")).unwrap();
    ok(&c.out(&["stop", "--name", "full"]));
    // The failed write left no partial line behind: the chain verifies.
    ok(&c.out(&["audit", "verify", "--name", "full"]));
}

/// The log lives where it does by default (outside /tmp, whose tmpfs would
/// hide anything), and still cannot be seen or written from inside.
fn audit_log_is_out_of_reach(mut c: Ctx) {
    let base = match c.as_user {
        None if c.mode == Mode::Root => std::path::PathBuf::from("/var/lib"),
        Some(_) => std::path::PathBuf::from(format!("/home/{TEST_USER}/.local/share")),
        None => std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".local/share"),
    };
    let data = base.join(format!("aibox-it-{}", token()));
    std::fs::create_dir_all(&data).unwrap();
    if let Some((u, g)) = c.as_user {
        for p in [base.parent().unwrap(), base.as_path(), data.as_path()] {
            nix::unistd::chown(p, Some(u.into()), Some(g.into())).unwrap();
        }
    }
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Remove(data.clone());
    c.env("AIBOX_PATHS_DATA_DIR", &data.display().to_string());
    let log = data.join("audit/reach.jsonl");
    let ws = c.ws.display().to_string();
    let script = format!(
        "test -e {d} && echo VISIBLE-DIR; test -e {l} && echo VISIBLE-LOG; echo forged >> {l} && echo WROTE; true",
        d = data.display(),
        l = log.display()
    );
    let out = ok(&c.out(&[
        "run", "-w", &ws, "--name", "reach", "--", "sh", "-c", &script,
    ]));
    assert_eq!(out, "", "the sandbox reached the audit log: {out}");
    assert!(log.exists());
    // (The script's text is in the log as the session's argv; a successful
    // append would be a line of its own.)
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .any(|l| l == "forged")
    );
    ok(&c.out(&["audit", "verify", "--name", "reach"]));
}

#[test]
fn audit_log_is_out_of_reach_root() {
    if let Some(c) = Ctx::new(Mode::Root) {
        audit_log_is_out_of_reach(c);
    }
}

#[test]
fn audit_log_is_out_of_reach_rootless() {
    if let Some(c) = Ctx::new(Mode::Rootless) {
        audit_log_is_out_of_reach(c);
    }
}
