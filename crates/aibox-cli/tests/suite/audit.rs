//! The audit trail of a real run, and tampering with it.

use super::common::*;

/// The lines of the whole log at `p` (sealed segments, then active).
fn lines(p: &std::path::Path) -> Vec<String> {
    log_text(p).lines().map(String::from).collect()
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
    // The log is the host's, mode 0600; each run's events were sealed at
    // its stop into a read-only segment the signed manifest lists.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let segs: Vec<std::path::PathBuf> = aibox_audit::segments::files(&log)
        .into_iter()
        .filter(|p| *p != log)
        .collect();
    assert_eq!(segs.len(), 2, "{segs:?}");
    for s in &segs {
        assert_eq!(
            std::fs::metadata(s).unwrap().permissions().mode() & 0o777,
            0o400
        );
    }
    assert!(out.contains("segments: 2 sealed"), "{out}");
    // A sealed segment deleted, altered, or slipped in: each is named.
    let first = segs[0].clone();
    let saved = std::fs::read(&first).unwrap();
    std::fs::remove_file(&first).unwrap();
    let o = c.out(&["audit", "verify", "--name", "audited"]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("missing (deleted"), "{}", stdout(&o));
    let mut altered = saved.clone();
    altered[10] ^= 1;
    std::fs::write(&first, &altered).unwrap();
    let o = c.out(&["audit", "verify", "--name", "audited"]);
    assert!(
        stdout(&o).contains("bytes changed since it was sealed"),
        "{}",
        stdout(&o)
    );
    std::fs::write(&first, &saved).unwrap();
    let extra = first.with_file_name("999999999999-999999999999.jsonl");
    std::fs::write(&extra, &saved).unwrap();
    let o = c.out(&["audit", "verify", "--name", "audited"]);
    assert!(stdout(&o).contains("not in the manifest"), "{}", stdout(&o));
    std::fs::remove_file(&extra).unwrap();
    // The manifest's entries are signed.
    let manifest = aibox_audit::segments::manifest_path(&log);
    let m = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        m.replacen("\"reason\":\"stop\"", "\"reason\":\"rotation\"", 1),
    )
    .unwrap();
    let o = c.out(&["audit", "verify", "--name", "audited"]);
    assert!(stdout(&o).contains("bad signature"), "{}", stdout(&o));
    std::fs::write(&manifest, m).unwrap();
    ok(&c.out(&["audit", "verify", "--name", "audited"]));

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
    let _disk = Tmpfs::mount(&c.data, "size=256k");
    // An allowed HTTP service, to show the network stops too.
    let svc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sp = svc.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in svc.incoming().flatten() {
            let mut b = [0u8; 4096];
            let _ = s.read(&mut b);
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    c.add_config(&format!(
        "network:\n  allowed_domains: [\"svc.test:{sp}\", \"127.0.0.1:{sp}\"]\n  resolve: {{svc.test: 127.0.0.1}}\naudit:\n  file_events: false\n"
    ));
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "full"]));
    // A command already running when the disk fills: its requests are
    // answered until the log fails, then refused.
    let mut probe = c
        .aibox(&[
            "exec",
            "--name",
            "full",
            "--",
            "bash",
            "-c",
            // Builtins only once the disk is full: the exec gate refuses
            // every program it cannot record (its own test), so the
            // requests are bash's /dev/tcp, through the transparent proxy.
            &format!(
                "ip=$(getent hosts svc.test | cut -d' ' -f1); : > /workspace/started; while [ ! -e /workspace/go ]; do :; done; for i in {{1..40}}; do if exec 3<>/dev/tcp/$ip/{sp}; then printf 'GET / HTTP/1.0\\r\\nHost: svc.test:{sp}\\r\\n\\r\\n' >&3; read -r _ code _ <&3; echo \"$code\"; exec 3<&- 3>&-; else echo refused; fi; done"
            ),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if c.ws.join("started").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(c.ws.join("started").exists(), "the probe did not start");
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
    std::fs::write(c.ws.join("go"), "").unwrap();
    let mut codes = String::new();
    {
        use std::io::Read;
        probe
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut codes)
            .unwrap();
    }
    let mut err = String::new();
    {
        use std::io::Read;
        probe
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
    }
    let _ = probe.wait();
    let codes: Vec<&str> = codes.lines().collect();
    assert!(err.is_empty(), "{err}");
    // (A refusal small enough to fit the log's last page is recorded and
    // lets the next request try again; once nothing fits, all are refused.)
    assert_eq!(codes.len(), 40, "{codes:?}");
    assert!(
        codes[30..].iter().all(|c| *c == "503"),
        "traffic went on with the audit log full: {codes:?}"
    );
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
    assert!(!log_text(&log).lines().any(|l| l == "forged"));
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

/// Rewrites `lines` (a log) with event `at`'s details changed and every
/// hash after it recomputed: a chain that verifies, as an attacker with
/// write access to the log would make it.
fn rewritten(lines: &[String], at: u64) -> Vec<String> {
    let mut prev = "0".repeat(64);
    let mut out = Vec::new();
    for l in lines {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["seq"] == at {
            v["details"]["forged"] = true.into();
        }
        v["prev_hash"] = prev.clone().into();
        v.as_object_mut().unwrap().remove("hash");
        let hash = aibox_audit::event_hash(&v);
        v["hash"] = hash.clone().into();
        out.push(aibox_audit::canonical_json(&v));
        prev = hash;
    }
    out
}

both_modes!(checkpoints_catch_what_the_chain_cannot, |c: Ctx| {
    c.add_config("audit:\n  checkpoint_every: 4\n");
    let ws = c.ws.display().to_string();
    for _ in 0..3 {
        ok(&c.out(&["run", "-w", &ws, "--name", "signed", "--", "true"]));
    }
    let log = c.data.join("audit/signed.jsonl");
    let l = lines(&log);
    let out = ok(&c.out(&["audit", "verify", "--name", "signed"]));
    assert!(
        out.contains(&format!("signed up to event {}", l.len() - 1)),
        "{out}"
    );
    let cps = std::fs::read_to_string(c.data.join("audit/signed.jsonl.checkpoints")).unwrap();
    assert!(cps.lines().count() >= 3, "{cps}");
    // The key is outside the data directory, 0600; its public half beside it.
    use std::os::unix::fs::PermissionsExt;
    let key = c.dir.path().join("audit-signing.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Each tampering on a copy (with the checkpoints beside it).
    let check = |log_lines: &[String], cps: &str| {
        let d = tempfile::tempdir_in(c.dir.path()).unwrap();
        let p = d.path().join("signed.jsonl");
        std::fs::write(&p, log_lines.join("\n") + "\n").unwrap();
        std::fs::write(d.path().join("signed.jsonl.checkpoints"), cps).unwrap();
        let o = c.out(&["audit", "verify", "--file", &p.display().to_string()]);
        (o.status.success(), stdout(&o))
    };
    let (good, out) = check(&l, &cps);
    assert!(good, "{out}");
    // A history rewritten with a recomputed chain: only checkpoints see it.
    let (good, out) = check(&rewritten(&l, 2), &cps);
    assert!(
        !good && !out.contains("BROKEN") && out.contains("history rewritten"),
        "{out}"
    );
    // Events cut off after a checkpoint.
    let (good, out) = check(&l[..l.len() - 3], &cps);
    assert!(!good && out.contains("truncated"), "{out}");
    // A forged checkpoint.
    let last = cps.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    let forged = cps.replace(
        last,
        &last.replace(v["head"].as_str().unwrap(), &"ab".repeat(32)),
    );
    let (good, out) = check(&l, &forged);
    assert!(!good && out.contains("bad signature"), "{out}");
    // A line inserted.
    let mut t = l.clone();
    t.insert(3, l[2].clone());
    let (good, out) = check(&t, &cps);
    assert!(!good && out.contains("BROKEN at index 3"), "{out}");
    // A public key swapped for another: refused, by verify and by a start.
    let public = c.dir.path().join("audit-signing.key.pub");
    let genuine = std::fs::read_to_string(&public).unwrap();
    std::fs::write(&public, "11".repeat(32)).unwrap();
    let o = c.out(&["audit", "verify", "--name", "signed"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not the public half"),
        "{}",
        stderr(&o)
    );
    let o = c.out(&["run", "-w", &ws, "--name", "signed", "--", "true"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("belongs to another key"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&public, genuine).unwrap();
    ok(&c.out(&["audit", "verify", "--name", "signed"]));

    // The last checkpoint is also kept beside the key: deleting the
    // checkpoint file, or rolling back the last run with its checkpoints,
    // is seen by verify, and no sandbox extends that chain.
    let cpf = c.data.join("audit/signed.jsonl.checkpoints");
    let manifest = aibox_audit::segments::manifest_path(&log);
    let segdir = aibox_audit::segments::segments_dir(&log);
    let saved_cps = std::fs::read_to_string(&cpf).unwrap();
    let saved_manifest = std::fs::read_to_string(&manifest).unwrap();
    let refused = |what: &str| {
        let o = c.out(&["audit", "verify", "--name", "signed"]);
        assert!(!o.status.success(), "{what}: {}", stdout(&o));
        assert!(stdout(&o).contains(what), "{}", stdout(&o));
        let o = c.out(&["run", "-w", &ws, "--name", "signed", "--", "true"]);
        assert!(!o.status.success());
        assert!(stderr(&o).contains("aibox audit verify"), "{}", stderr(&o));
    };
    std::fs::remove_file(&cpf).unwrap();
    refused("checkpoints were deleted");
    // The last run rolled back: its segment, manifest entry and
    // checkpoints gone, as if it never happened.
    let entries: Vec<&str> = saved_manifest.lines().collect();
    let last: serde_json::Value = serde_json::from_str(entries[entries.len() - 1]).unwrap();
    let last_seg = segdir.join(last["segment"].as_str().unwrap());
    let last_bytes = std::fs::read(&last_seg).unwrap();
    let first_of_last = last["first_seq"].as_u64().unwrap();
    let kept: Vec<&str> = saved_cps
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
                < first_of_last
        })
        .collect();
    assert!(!kept.is_empty());
    std::fs::write(&cpf, kept.join("\n") + "\n").unwrap();
    std::fs::write(&manifest, entries[..entries.len() - 1].join("\n") + "\n").unwrap();
    std::fs::remove_file(&last_seg).unwrap();
    refused("checkpoints were deleted");
    // The log alone cut back (its last segment deleted).
    std::fs::write(&cpf, &saved_cps).unwrap();
    std::fs::write(&manifest, &saved_manifest).unwrap();
    refused("missing (deleted");
    std::fs::write(&last_seg, &last_bytes).unwrap();
    ok(&c.out(&["audit", "verify", "--name", "signed"]));
    // Moved aside: a new chain starts and its first event says so.
    let old = c.dir.path().join("old-audit");
    std::fs::create_dir_all(&old).unwrap();
    for p in [&log, &cpf, &manifest, &segdir] {
        std::fs::rename(p, old.join(p.file_name().unwrap())).unwrap();
    }
    // Until a new chain is signed, the missing log is reported.
    let o = c.out(&["audit", "verify", "--all"]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("signed: DELETED"), "{}", stdout(&o));
    ok(&c.out(&["run", "-w", &ws, "--name", "signed", "--", "true"]));
    let first: serde_json::Value = serde_json::from_str(&lines(&log)[0]).unwrap();
    assert_eq!(
        first["details"]["audit_chain_reset"]["previous_seq"],
        (l.len() - 1) as u64,
        "{first}"
    );
    ok(&c.out(&["audit", "verify", "--name", "signed"]));
});

both_modes!(
    a_crash_leaves_a_torn_tail_and_the_chain_goes_on,
    |c: Ctx| {
        let ws = c.ws.display().to_string();
        ok(&c.out(&["start", "-w", &ws, "--name", "burst"]));
        let mut burst = c
            .aibox(&[
                "exec",
                "--name",
                "burst",
                "--",
                "sh",
                "-c",
                "for i in $(seq 3000); do /bin/true; done",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(700));
        kill_supervisor(&c, "burst");
        let _ = burst.wait();
        let log = c.data.join("audit/burst.jsonl");
        // Killed mid-burst: never reported as tampering.
        let o = c.out(&["audit", "verify", "--name", "burst"]);
        assert!(
            !stdout(&o).contains("BROKEN") && !stdout(&o).contains("CHECKPOINT"),
            "{}",
            stdout(&o)
        );
        // A write the crash cut short (made certain here: the kill may have
        // fallen between writes).
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"details\":{\"argv\":[\"/bin/tr").unwrap();
        drop(f);
        let o = c.out(&["audit", "verify", "--name", "burst"]);
        assert!(!o.status.success());
        assert!(
            stdout(&o).contains("TORN TAIL") && !stdout(&o).contains("BROKEN"),
            "{}",
            stdout(&o)
        );
        // The next run of that name repairs the tail (kept aside) and the
        // chain goes on.
        ok(&c.out(&["stop", "--name", "burst"]));
        ok(&c.out(&["run", "-w", &ws, "--name", "burst", "--", "true"]));
        let out = ok(&c.out(&["audit", "verify", "--name", "burst"]));
        assert!(out.contains("intact"), "{out}");
        let kept: Vec<_> = std::fs::read_dir(c.data.join("audit"))
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("burst.jsonl.torn.")
            })
            .collect();
        assert_eq!(kept.len(), 1);
        assert!(
            std::fs::read_to_string(kept[0].path())
                .unwrap()
                .starts_with("{\"details\"")
        );
        assert!(log_text(&log).contains("audit_torn_tail"));
    }
);

both_modes!(tail_and_siem_exports, |c: Ctx| {
    let ws = c.ws.display().to_string();
    ok(&c.out(&["run", "-w", &ws, "--name", "ex", "--", "true"]));
    let two = c.out(&["run", "-w", &ws, "--name", "ex", "--", "sh", "-c", "exit 2"]);
    assert_eq!(two.status.code(), Some(2));
    let log = lines(&c.data.join("audit/ex.jsonl"));
    let t = ok(&c.out(&[
        "audit",
        "tail",
        "--name",
        "ex",
        "--type",
        "session.end",
        "--lines",
        "1",
    ]));
    let v: serde_json::Value = serde_json::from_str(t.trim()).unwrap();
    assert_eq!(v["details"]["exit_code"], 2);
    let bad = c.out(&["audit", "tail", "--name", "ex", "--type", "nope"]);
    assert!(!bad.status.success() && stderr(&bad).contains("not an event type"));
    // Follow: a new session's events arrive as they are written. The
    // follower prints the last one already there first: once that is
    // read, it is following (what comes after is new).
    let follow = || {
        let mut f = c
            .aibox(&[
                "audit",
                "tail",
                "-f",
                "--name",
                "ex",
                "--type",
                "session.start",
                "--lines",
                "1",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = f.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let next = move |within: u64| rx.recv_timeout(std::time::Duration::from_secs(within));
        assert!(next(30).is_ok(), "the follower printed nothing");
        (f, next)
    };
    let (mut f, next) = follow();
    ok(&c.out(&["run", "-w", &ws, "--name", "ex", "--", "echo", "followed"]));
    let first = next(30).unwrap_or_default();
    let _ = f.kill();
    let _ = f.wait();
    assert!(
        first.contains("session.start") && first.contains("followed"),
        "{first}"
    );
    // Two seals while the follower is not looking (stopped): the
    // segment sealed in between is printed too, whole.
    let (mut f, next) = follow();
    let pid = nix::unistd::Pid::from_raw(f.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    ok(&c.out(&["run", "-w", &ws, "--name", "ex", "--", "echo", "one"]));
    ok(&c.out(&["run", "-w", &ws, "--name", "ex", "--", "echo", "two"]));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Both, and nothing more (it polls every 200 ms).
    let mut got: Vec<String> = [next(30), next(30)].into_iter().flatten().collect();
    got.extend(next(2));
    let _ = f.kill();
    let _ = f.wait();
    assert!(
        got.len() == 2 && got[0].contains("\"one\"") && got[1].contains("\"two\""),
        "{got:?}"
    );

    let jsonl = ok(&c.out(&["audit", "export", "--name", "ex", "--format", "jsonl"]));
    assert!(
        jsonl
            .lines()
            .take(log.len())
            .eq(log.iter().map(String::as_str))
    );
    let ecs = ok(&c.out(&["audit", "export", "--name", "ex", "--format", "ecs"]));
    for l in ecs.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(
            v["@timestamp"].is_string() && v["event"]["action"].is_string(),
            "{l}"
        );
        assert!(v["event"]["hash"].as_str().is_some_and(|h| h.len() == 64));
    }
    let out = c.dir.path().join("ocsf.jsonl");
    ok(&c.out(&[
        "audit",
        "export",
        "--name",
        "ex",
        "--format",
        "ocsf",
        "-o",
        &out.display().to_string(),
    ]));
    let ocsf = std::fs::read_to_string(&out).unwrap();
    assert_eq!(ocsf.lines().count(), jsonl.lines().count());
    for l in ocsf.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(
            v["class_uid"].is_u64() && v["time"].as_u64().is_some_and(|t| t > 0),
            "{l}"
        );
        assert_eq!(v["metadata"]["product"]["name"], "aibox");
    }
});
