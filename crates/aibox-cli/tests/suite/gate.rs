//! The exec gate on the native backend: a blocked program is refused
//! however it is spelled, allowed programs behave exactly as without the
//! gate, review-required runs are logged, decisions are logged and
//! explained, and the Landlock layer holds on its own.

use super::common::*;

/// Blocks curl outright, puts `sort` under review.
const POLICY: &str = "version: 1
tools:
  rules:
    - match: [curl]
      risk: blocked-by-default
      reason: fetch through the proxy-aware tool instead
    - match: [sort]
      risk: review-required
";

fn with_policy(c: &Ctx) {
    let p = c.dir.path().join("org-policy.yaml");
    std::fs::write(&p, POLICY).unwrap();
    c.add_config(&format!("policy:\n  org_baseline_path: {}\n", p.display()));
}

/// A copy of curl in the workspace, as a repository could bring one (the
/// sandbox itself cannot read curl's file to copy it).
fn copy_of_curl(c: &Ctx) {
    let dst = c.ws.join("fetch");
    std::fs::copy("/usr/bin/curl", &dst).unwrap();
    if let Some((uid, gid)) = c.as_user {
        nix::unistd::chown(&dst, Some(uid.into()), Some(gid.into())).unwrap();
    }
}

fn decisions(c: &Ctx, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(c.data.join(format!("decisions/{name}.jsonl")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Each spelling runs curl with its output in /workspace/out.NAME and
/// prints `NAME rc`; curl's `--version` output names libcurl, so a file
/// containing it means curl ran.
const SPELLINGS: &str = r#"
set -u
cd /workspace
t() { n=$1; shift; "$@" > "out.$n" 2>&1; echo "$n $?"; }
cp /usr/bin/curl /workspace/mine 2>/dev/null; echo "copy_inside $?"
ln -s /usr/bin/curl /workspace/lnk
printf '#!/bin/sh\ncurl --version\n' > script.sh; chmod +x script.sh
t absolute /usr/bin/curl --version
t relative ../usr/bin/curl --version
t path curl --version
t copy ./fetch --version
t symlink ./lnk --version
t proc_root /proc/self/root/usr/bin/curl --version
t loader /lib64/ld-linux-x86-64.so.2 /usr/bin/curl --version
t sh_c sh -c 'curl --version'
t bash_var bash -c 'x=curl; $x --version'
t env env curl --version
t find find /usr/bin/curl -exec {} --version ';'
t xargs sh -c 'echo --version | xargs curl'
t shebang ./script.sh
t python python3 -c 'import subprocess, sys; sys.exit(subprocess.call(["curl", "--version"]))'
t node node -e 'const r = require("child_process").spawnSync("curl", ["--version"], {stdio: "inherit"}); process.exit(r.error ? 126 : r.status)'
t memfd ./aibox-attack fexecve_memfd_curl
for f in out.*; do grep -q libcurl "$f" && echo "RAN ${f#out.}"; done
cat out.memfd out.absolute
# Allowed programs: output and exit codes as without the gate.
printf 'b\na\n' | sort; echo "sort $?"
sh -c 'exit 7'; echo "exit7 $?"
false; echo "false $?"
ls /workspace/script.sh; echo "ls $?"
rm -rf /workspace/ ; echo "rm_root $?"
ls -d /workspace && echo "workspace kept"
"#;

gated_backends!(
    a_blocked_program_is_denied_however_it_is_spelled,
    |c: Ctx| {
        with_policy(&c);
        c.install_attack();
        let ws = c.ws.display().to_string();
        copy_of_curl(&c);
        let o = c.out(&[
            "run", "-w", &ws, "--name", "gate", "--", "sh", "-c", SPELLINGS,
        ]);
        let out = stdout(&o);
        let err = stderr(&o);
        assert!(!out.contains("RAN "), "curl ran:\n{out}\n{err}");
        let node = std::path::Path::new("/usr/bin/node").exists();
        for spelling in [
            "absolute",
            "relative",
            "path",
            "copy",
            "symlink",
            "proc_root",
            "loader",
            "sh_c",
            "bash_var",
            "env",
            "find",
            "xargs",
            "shebang",
            "python",
            "node",
            "memfd",
        ] {
            if spelling == "node" && !node {
                continue;
            }
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{spelling} ")))
                .unwrap_or_else(|| panic!("{spelling} missing:\n{out}\n{err}"));
            // find exits 0 whatever -exec returns, and the attack helper
            // reports the errno instead of failing; their denials are in
            // the log.
            if spelling != "find" && spelling != "memfd" {
                assert_ne!(line, format!("{spelling} 0"), "{out}\n{err}");
            }
        }
        assert!(out.contains("fexecve_memfd_curl EPERM"), "{out}");
        // Landlock does not even let curl's file be read (so no loader
        // or copy made inside can run it).
        assert!(out.contains("copy_inside 1"), "{out}");
        // Allowed commands are untouched.
        assert!(out.contains("a\nb\nsort 0\n"), "{out}");
        for l in ["exit7 7", "false 1", "ls 0", "workspace kept"] {
            assert!(out.lines().any(|x| x == l), "{l}: {out}\n{err}");
        }
        assert!(!out.contains("rm_root 0"), "{out}");
        // The caller heard why (on its stderr), with the way to an explanation.
        assert!(
        out.contains("`/usr/bin/curl` blocked by policy rule tools.rules[0] (org tier): fetch through the proxy-aware tool instead"),
        "{out}"
    );
        assert!(out.contains("aibox policy explain --log-entry "), "{out}");

        // Every spelling left a denial on curl's file (or its copy) in the
        // decision log, mirrored in the audit log.
        let log = decisions(&c, "gate");
        let denied: Vec<&serde_json::Value> =
            log.iter().filter(|e| e["decision"] == "deny").collect();
        let curl_denials = denied
            .iter()
            .filter(|e| e["rule"] == "tools.rules[0]")
            .count();
        assert!(curl_denials >= 15, "{curl_denials} denials: {log:#?}");
        let copy = denied
            .iter()
            .find(|e| e["target"] == "/workspace/fetch")
            .expect("the copy was not denied");
        assert_eq!(
            copy["inputs"][0]["exe_aliases"],
            serde_json::json!(["curl"])
        );
        let loader = denied
            .iter()
            .find(|e| {
                e["command"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("/lib64/ld-linux")
            })
            .expect("the loader spelling was not denied");
        assert_eq!(loader["target"], "/usr/bin/curl");
        let rm = denied
            .iter()
            .find(|e| e["rule"] == "org.rego/rm-root")
            .expect("rm -rf /workspace/ was not denied by the Rego baseline");
        assert_eq!(rm["tier"], "org baseline");
        // Review: ran, logged as awaiting review.
        let sort = log
            .iter()
            .find(|e| e["target"] == "/usr/bin/sort")
            .expect("sort not logged");
        assert_eq!(sort["decision"], "review");
        let events = audit_events(&c, "gate");
        let of = |t: &str| {
            events
                .iter()
                .filter(|e| e["event_type"] == t)
                .collect::<Vec<_>>()
        };
        assert!(
            of("tool.invoke")
                .iter()
                .any(|e| e["details"]["argv"][0] == "sort"
                    && e["details"]["awaiting_review"] == true),
            "{events:#?}"
        );
        assert_eq!(of("policy.deny").len(), denied.len());
        assert_eq!(of("tool.deny").len(), denied.len());
        assert!(of("policy.allow").len() >= log.len() - denied.len());

        // explain reproduces a denial and an allow.
        let n = copy["entry"].to_string();
        let o = c.out(&["policy", "explain", "--name", "gate", "--log-entry", &n]);
        let text = ok(&o);
        assert!(text.contains("reproduced: yes"), "{text}");
        assert!(text.contains("also known as: curl"), "{text}");
        assert!(
            text.contains("exception:") && text.contains("org tier"),
            "{text}"
        );
        let allowed = log
            .iter()
            .find(|e| e["decision"] == "allow")
            .expect("no allow logged");
        let n = allowed["entry"].to_string();
        let o = c.out(&[
            "policy",
            "explain",
            "--name",
            "gate",
            "--log-entry",
            &n,
            "--format",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        assert_eq!(v["reproduced"], true, "{v:#}");
        assert_eq!(v["decided_again"]["action"], "allow");
        // An entry that does not exist is a clear error.
        let o = c.out(&[
            "policy",
            "explain",
            "--name",
            "gate",
            "--log-entry",
            "100000",
        ]);
        assert_ne!(o.status.code(), Some(0));
        assert!(stderr(&o).contains("is not one of them"), "{}", stderr(&o));
    }
);

gated_backends!(
    an_exec_flood_is_bounded_on_disk_and_in_the_audit_log,
    |c: Ctx| {
        let p = c.dir.path().join("org-policy.yaml");
        std::fs::write(&p, POLICY).unwrap();
        c.add_config(&format!(
        "policy:\n  org_baseline_path: {}\n  decision_log_max_size: 64k\n  decision_log_keep: 2\n  audit_decisions_per_sec: 5\n",
        p.display()
    ));
        let ws = c.ws.display().to_string();
        let o = c.out(&[
        "run",
        "-w",
        &ws,
        "--name",
        "flood",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 600 ]; do /bin/true; i=$((i+1)); done; curl --version; echo done $i",
    ]);
        let (out, err) = (stdout(&o), stderr(&o));
        assert!(out.contains("done 600"), "{out}\n{err}");
        assert!(
            err.contains("blocked by policy rule tools.rules[0]"),
            "{err}"
        );
        // Rotated at the size, two old files kept, numbering unbroken.
        let dir = c.data.join("decisions");
        let cur = dir.join("flood.jsonl");
        for f in [&cur, &dir.join("flood.jsonl.1"), &dir.join("flood.jsonl.2")] {
            let len = std::fs::metadata(f).unwrap().len();
            assert!(len <= 64 << 10, "{f:?}: {len}");
        }
        assert!(!dir.join("flood.jsonl.3").exists());
        let log = decisions(&c, "flood");
        let last = log.last().unwrap()["entry"].as_u64().unwrap();
        assert!(last > 600, "{last}");
        let denial = log
            .iter()
            .find(|e| e["decision"] == "deny")
            .expect("curl's denial is not in the current file");
        // The audit log got the first burst one by one and the rest as
        // summaries; every decision is accounted for.
        let events = audit_events(&c, "flood");
        let decisions_in = |e: &serde_json::Value| {
            if e["details"]["summary"] == true {
                e["details"]["held_back"].as_u64().unwrap()
            } else {
                1
            }
        };
        let mirrored: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e["event_type"] == "policy.allow" || e["event_type"] == "policy.deny")
            .collect();
        let singles = mirrored
            .iter()
            .filter(|e| e["details"]["summary"] != true)
            .count();
        // (A burst of 50 allows and 50 denials, then 5 a second of each,
        // over the seconds the mirrored events span: not the run's wall
        // time, which includes a slow container start under load.)
        let at = |e: &serde_json::Value| {
            humantime::parse_rfc3339(e["timestamp"].as_str().unwrap_or_default()).unwrap()
        };
        let secs = at(mirrored[mirrored.len() - 1])
            .duration_since(at(mirrored[0]))
            .unwrap_or_default()
            .as_secs()
            + 1;
        let bound = 2 * (50 + 5 * secs);
        assert!(
            singles as u64 <= bound,
            "{singles} decisions mirrored one by one in {secs} s"
        );
        assert!(bound < 600, "too slow to tell: {secs} s");
        assert!(
            mirrored.iter().any(|e| e["details"]["summary"] == true),
            "no summary: {mirrored:#?}"
        );
        assert_eq!(mirrored.iter().map(|e| decisions_in(e)).sum::<u64>(), last);
        // The recent denial is explained; the oldest entries are gone, and
        // explain says so.
        let n = denial["entry"].to_string();
        let o = c.out(&["policy", "explain", "--name", "flood", "--log-entry", &n]);
        assert!(ok(&o).contains("reproduced: yes"));
        let o = c.out(&["policy", "explain", "--name", "flood", "--log-entry", "1"]);
        assert_ne!(o.status.code(), Some(0));
        assert!(stderr(&o).contains("rotated away"), "{}", stderr(&o));
    }
);

gated_backends!(the_gate_cannot_be_replaced_from_inside, |c: Ctx| {
    with_policy(&c);
    c.install_attack();
    // A second listener to answer our own execs is refused; so is a
    // symlink that leads through /proc/self (the gate cannot follow it
    // and does not guess).
    let o = c.sh(
        "cd /workspace; ./aibox-attack seccomp_listener; ln -s /proc/self/root/usr/bin/curl via; ./via --version > out 2>&1; echo via $?; grep -q libcurl out && echo RAN",
    );
    let out = stdout(&o);
    assert!(
        out.contains("seccomp_listener EBUSY"),
        "{out}\n{}",
        stderr(&o)
    );
    assert!(!out.contains("RAN") && !out.contains("via 0"), "{out}");
});

gated_backends!(landlock_blocks_by_path_without_the_gate, |mut c: Ctx| {
    with_policy(&c);
    // Test builds only: the gate logs its denials but lets them run, so
    // what stops curl here is Landlock alone. A copy of curl (a path
    // Landlock does not know) then runs: only the gate catches copies.
    c.env("AIBOX_DEBUG_SKIP_LAYER", "exec-gate");
    copy_of_curl(&c);
    let o = c.sh(
        "cd /workspace; curl --version > a 2>&1; echo curl $?; cat a; /lib64/ld-linux-x86-64.so.2 /usr/bin/curl --version > b 2>&1; echo loader $?; ./fetch --version | head -1",
    );
    let out = stdout(&o);
    assert!(out.contains("curl 126"), "{out}\n{}", stderr(&o));
    assert!(!out.contains("loader 0"), "{out}");
    assert!(out.contains("Permission denied"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("curl 7.") || l.starts_with("curl 8.")),
        "{out}"
    );
});

gated_backends!(a_tiers_rego_adds_denials_and_stays_read_only, |c: Ctx| {
    let dir = c.ws.join("aibox");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("policy.yaml"), "version: 1\nrego: [extra.rego]\n").unwrap();
    std::fs::write(
        dir.join("extra.rego"),
        "package aibox.tools\nimport rego.v1\nimport data.aibox.exec\nfindings contains {\"risk\": \"blocked-by-default\", \"rule\": \"project.rego/no-sort\", \"reason\": \"sort is off limits here\"} if \"sort\" in exec.names\n",
    )
    .unwrap();
    if let Some((uid, gid)) = c.as_user {
        for p in [&dir, &dir.join("policy.yaml"), &dir.join("extra.rego")] {
            nix::unistd::chown(p, Some(uid.into()), Some(gid.into())).unwrap();
        }
    }
    let o = c.sh(
        "echo b | sort; echo sort $?; echo 'package x' > /workspace/aibox/extra.rego; echo write $?; ls /workspace >/dev/null; echo ls $?",
    );
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(
        out.contains("sort 126") && !out.contains("write 0") && out.contains("ls 0"),
        "{out}\n{err}"
    );
    assert!(
        err.contains(
            "blocked by policy rule project.rego/no-sort (project tier): sort is off limits here"
        ),
        "{err}"
    );
    assert!(
        std::fs::read_to_string(dir.join("extra.rego"))
            .unwrap()
            .contains("no-sort")
    );
});

// The sessions of a running sandbox (`start`, then `exec`), each under
// the gate; the agents' managed settings in place and read-only; the
// hook client answering with the policy's decision; and, in containers,
// a forged registration on the gate's socket refused.
gated_backends!(every_session_of_a_running_sandbox_is_gated, |c: Ctx| {
    with_policy(&c);
    c.install_attack();
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "held"]));
    // A command in a new session of the running sandbox.
    let exec = |argv: &[&str]| {
        let mut args = vec!["exec", "--name", "held", "--"];
        args.extend_from_slice(argv);
        c.out(&args)
    };
    for _ in 0..2 {
        let o = exec(&["sh", "-c", "curl --version > /dev/null; echo rc $?"]);
        let (out, err) = (stdout(&o), stderr(&o));
        assert!(out.contains("rc 126"), "{out}\n{err}");
        assert!(
            err.contains("`/usr/bin/curl` blocked by policy rule tools.rules[0]"),
            "{out}\n{err}"
        );
    }
    // A session whose own program is blocked never starts: a copy of
    // curl (which Landlock does not know) as the session's program is
    // the session's first exec, and the gate decides it.
    copy_of_curl(&c);
    let o = exec(&["/workspace/fetch", "--version"]);
    assert_ne!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(!stdout(&o).contains("libcurl"), "{}", stdout(&o));
    assert!(
        decisions(&c, "held")
            .iter()
            .any(|e| e["target"] == "/workspace/fetch" && e["decision"] == "deny"),
        "{:#?}",
        decisions(&c, "held")
    );
    let st = ok(&c.out(&["status", "--name", "held"]));
    assert!(st.contains("exec gate:  on"), "{st}");

    let o = exec(&[
        "sh",
        "-c",
        "cat /etc/claude-code/managed-settings.json; echo x >> /etc/claude-code/managed-settings.json; echo write $?",
    ]);
    let out = stdout(&o);
    assert!(out.contains("__hook claude-code"), "{out}\n{}", stderr(&o));
    assert!(!out.contains("write 0"), "{out}");

    let hook = |command: &str| {
        let input = serde_json::json!({
            "tool_name": "Bash",
            "tool_input": {"command": command},
            "cwd": "/workspace",
        })
        .to_string();
        let o = exec(&[
            "sh",
            "-c",
            &format!("echo '{input}' | /aibox/aibox __hook claude-code"),
        ]);
        ok(&o)
    };
    let denied = hook("ls && curl https://example.com");
    assert!(
        denied.contains("\"permissionDecision\":\"deny\"") && denied.contains("tools.rules[0]"),
        "{denied}"
    );
    let allowed = hook("ls /workspace");
    assert!(!allowed.contains("deny"), "{allowed}");

    if c.backend != Backend::Native {
        let o = exec(&["/workspace/aibox-attack", "gate_join_pipe"]);
        assert!(
            stdout(&o).contains("gate_join_pipe refused"),
            "{}\n{}",
            stdout(&o),
            stderr(&o)
        );
    }
    // The decision log holds the sessions' denials and the hook's.
    let log = decisions(&c, "held");
    assert!(
        log.iter()
            .filter(|e| e["decision"] == "deny" && e["action"] == "exec")
            .count()
            >= 3,
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|e| e["action"] == "hook:claude-code:Bash" && e["decision"] == "deny"),
        "{log:#?}"
    );
    ok(&c.out(&["stop", "--name", "held"]));
});

/// gVisor delivers no seccomp notifications, so it cannot host the gate:
/// a start whose policy has command rules is refused, never run ungated.
mod gvisor_refuses_command_rules {
    use super::*;
    backend_test!(podman_runsc, Backend::Runsc, Mode::Root, |c: Ctx| {
        with_policy(&c);
        let ws = c.ws.display().to_string();
        let o = c.out(&["run", "-w", &ws, "--", "true"]);
        assert_ne!(o.status.code(), Some(0));
        let err = stderr(&o);
        assert!(
            err.contains("gVisor cannot host the gate") && err.contains("gvisor.enabled: false"),
            "{err}"
        );
        assert!(c.runtime_entries().is_empty(), "{:?}", c.runtime_entries());
        // Without command rules it starts, and says the gate is off.
        std::fs::write(c.dir.path().join("org-policy.yaml"), "version: 1\n").unwrap();
        ok(&c.out(&["start", "-w", &ws, "--name", "nogate"]));
        let st = ok(&c.out(&["status", "--name", "nogate"]));
        assert!(
            st.contains("exec gate:  off: gVisor cannot host it"),
            "{st}"
        );
        ok(&c.out(&["stop", "--name", "nogate"]));
    });
}
