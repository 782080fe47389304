//! Policy tiers through the CLI: `policy validate/show/check`, and starts
//! the merged policy refuses or shapes.

use super::common::*;

const ORG: &str = "version: 1
network:
  allow:
    - id: svc
      hosts: [svc.test, 127.0.0.1]
      ports: [PORT]
tools:
  rules:
    - match: [curl]
      risk: blocked-by-default
      reason: fetch through the reviewed tool instead
resources: {cpus: 4, pids: 256}
runtime: {engines: [native, podman, docker]}
";

/// Writes the org tier and points the config at it.
fn org(c: &Ctx, text: &str) -> String {
    let path = c.dir.path().join("org-policy.yaml");
    std::fs::write(&path, text).unwrap();
    c.add_config(&format!(
        "policy:\n  org_baseline_path: {}\n",
        path.display()
    ));
    path.display().to_string()
}

both_modes!(policy_commands_validate_show_and_check, |c: Ctx| {
    let org_path = org(&c, &ORG.replace("PORT", "443"));
    let team = c.dir.path().join("team.yaml");
    std::fs::write(
        &team,
        "version: 1\nresources: {cpus: 8}\ntools:\n  rules:\n    - {match: [curl], risk: safe}\n",
    )
    .unwrap();
    let team = team.display().to_string();
    let ws = c.ws.display().to_string();
    // Valid alone.
    let o = c.out(&["policy", "validate", "-w", &ws]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("valid: org ") && stdout(&o).contains("sha256:"));
    // A team tier that loosens: exit 1, every loosening named.
    let o = c.out(&["policy", "validate", "-w", &ws, "--team", &team]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("`resources.cpus` would loosen"), "{err}");
    assert!(err.contains("`tools.rules[0].risk` would loosen"), "{err}");
    // A schema error: exit 1 with file, line and key path.
    std::fs::write(
        c.dir.path().join("team.yaml"),
        "version: 1\ntools:\n  rules:\n    - {match: [x], risk: maybe}\n",
    )
    .unwrap();
    let o = c.out(&["policy", "validate", "-w", &ws, "--team", &team]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("team.yaml:4 (team tier): `tools.rules[0].risk`"),
        "{}",
        stderr(&o)
    );
    // A file that cannot be read: exit 2.
    let o = c.out(&[
        "policy",
        "validate",
        "-w",
        &ws,
        "--team",
        "/nonexistent/team.yaml",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // Show, as YAML and JSON.
    let out = ok(&c.out(&["policy", "show", "--merged", "-w", &ws]));
    assert!(
        out.contains(&format!("# org tier: {org_path}"))
            && out.contains("risk: blocked-by-default"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(&ok(
        &c.out(&["policy", "show", "--merged", "-w", &ws, "--format", "json"])
    ))
    .unwrap();
    assert_eq!(v["policy"]["resources"]["cpus"], 4);
    assert!(v["version"].as_str().unwrap().starts_with("sha256:"));
    // Check: a dry run names the rule and the reason.
    let out = ok(&c.out(&[
        "policy",
        "check",
        "-w",
        &ws,
        "--",
        "/usr/bin/curl",
        "-s",
        "x",
    ]));
    assert!(
        out.contains("decision:   deny")
            && out.contains("rule:       tools.rules[0]")
            && out.contains("reviewed tool"),
        "{out}"
    );
    // Rego findings count too, on the file executed.
    let out = ok(&c.out(&["policy", "check", "-w", &ws, "--", "rm", "-rf", "/"]));
    assert!(
        out.contains("decision:   deny") && out.contains("org.rego/rm-root"),
        "{out}"
    );
    // The baseline's Rego unit tests.
    let out = ok(&c.out(&["policy", "test"]));
    assert!(
        out.contains("PASS  aibox.tools.test_rm_root_is_blocked")
            && out.contains(" passed, 0 failed"),
        "{out}"
    );
    let out = ok(&c.out(&["policy", "check", "-w", &ws, "--", "ls"]));
    assert!(
        out.contains("decision:   allow") && out.contains("tools.default"),
        "{out}"
    );
});

both_modes!(a_start_the_policy_refuses_never_begins, |c: Ctx| {
    org(
        &c,
        "version: 1\nnetwork:\n  allow: [{id: a, hosts: [allowed.test], ports: [443]}]\nresources: {cpus: 1}\nruntime: {engines: [podman]}\nfilesystem: {deny: [/tmp/scratch]}\n",
    );
    let base = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(
        &c.config,
        base.replace("resources:\n", "resources:\n  cpus: 2\n"),
    )
    .unwrap();
    c.add_config("network:\n  allowed_domains: [other.test, allowed.test]\n");
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    let err = stderr(&o);
    for want in [
        "the policy refuses this start",
        "runtime.engines",
        "resources.cpus",
        "`other.test` (port 443) is outside the policy's network.allow",
        // allowed.test without a port also means plain HTTP on 80.
        "`allowed.test` (port 80) is outside",
        "filesystem.deny[0] `/tmp/scratch`: /tmp starts empty in every sandbox",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    // Nothing was created.
    assert!(c.runtime_entries().is_empty(), "{:?}", c.runtime_entries());
});

both_modes!(the_policy_allowlist_reaches_the_proxy, |c: Ctx| {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut s in l.incoming().flatten() {
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nfrom-host",
            );
        }
    });
    // (curl is what this test fetches with, so the org's curl rule goes.)
    org(
        &c,
        &ORG.replace("PORT", &port.to_string())
            .replace("match: [curl]", "match: [wget]"),
    );
    // The config names no destination: the policy's own do.
    c.add_config("network:\n  resolve: {svc.test: 127.0.0.1}\n");
    let out = ok(&c.sh(&format!(
        "curl -sS http://svc.test:{port}/; echo; curl -sS http://other.test/ | head -c 60"
    )));
    assert!(out.starts_with("from-host\n"), "{out}");
    assert!(out.contains("blocked"), "{out}");
    // The start recorded which policy it ran under.
    let text = only_audit_text(&c);
    let config = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event_type"] == "sandbox.config")
        .unwrap();
    assert!(
        config["details"]["policy_version"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{config}"
    );
});

all_backends!(the_project_tier_is_read_only_inside, |c: Ctx| {
    let dir = c.ws.join("aibox");
    std::fs::create_dir(&dir).unwrap();
    // (No command rules: container backends refuse those until they
    // have the exec gate.)
    let text = "version: 1\nresources: {cpus: 64}\n";
    std::fs::write(dir.join("policy.yaml"), text).unwrap();
    if let Some((uid, gid)) = c.as_user {
        for p in [dir.clone(), dir.join("policy.yaml")] {
            nix::unistd::chown(&p, Some(uid.into()), Some(gid.into())).unwrap();
        }
    }
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "proj"]));
    // Every way of changing it for the next start fails; the rest of the
    // workspace stays writable.
    let out = ok(&c.out(&[
        "exec", "--name", "proj", "--", "sh", "-c",
        "cd /workspace; echo 'version: 1' > aibox/policy.yaml && echo WROTE; rm -f aibox/policy.yaml && echo REMOVED; mv aibox gone 2>/dev/null && echo MOVED; touch aibox/other 2>/dev/null && echo ADDED; echo ok > free.txt && echo FREE",
    ]));
    assert_eq!(out.trim(), "FREE", "{out}");
    ok(&c.out(&["stop", "--name", "proj"]));
    assert_eq!(
        std::fs::read_to_string(dir.join("policy.yaml")).unwrap(),
        text
    );
    // A symlink in its place refuses the start.
    std::fs::remove_file(dir.join("policy.yaml")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("policy.yaml")).unwrap();
    let o = c.out(&["start", "-w", &ws, "--name", "proj2"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("is a symbolic link"), "{}", stderr(&o));
});

both_modes!(policy_holes_found_in_review_stay_closed, |c: Ctx| {
    // A broken org tier alone is not "no policy".
    org(
        &c,
        "version: 1\ntools: {rules: [{match: [curl], risk: nope}]}\n",
    );
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("the policy refuses this start")
            && stderr(&o).contains("tools.rules[0].risk"),
        "{}",
        stderr(&o)
    );

    // With a valid org tier that sets no allowlist, a project tier in the
    // workspace may bound destinations but never add them.
    let base = std::fs::read_to_string(&c.config).unwrap();
    let org_path = c.dir.path().join("org-policy.yaml");
    std::fs::write(&org_path, "version: 1\n").unwrap();
    std::fs::create_dir_all(c.ws.join("aibox")).unwrap();
    std::fs::write(
        c.ws.join("aibox/policy.yaml"),
        "version: 1\nnetwork:\n  allow: [{id: x, hosts: [evil.test], ports: [80, 443]}]\n",
    )
    .unwrap();
    if let Some((uid, gid)) = c.as_user {
        for p in [c.ws.join("aibox"), c.ws.join("aibox/policy.yaml")] {
            nix::unistd::chown(&p, Some(uid.into()), Some(gid.into())).unwrap();
        }
    }
    let out = stdout(&c.sh("curl -sS http://evil.test/ 2>&1 | head -c 200"));
    assert!(
        out.contains("blocked"),
        "the project tier added a destination: {out}"
    );

    // network.resolve may not send an allowed name to an address the
    // policy does not name; a gateway upstream must be inside the policy.
    std::fs::write(
        &org_path,
        "version: 1\nnetwork:\n  allow: [{id: a, hosts: [allowed.test], ports: [443]}]\n",
    )
    .unwrap();
    std::fs::remove_file(c.ws.join("aibox/policy.yaml")).unwrap();
    std::fs::write(
        &c.config,
        format!("{base}network:\n  allowed_domains: [\"allowed.test:443\"]\n  resolve: {{allowed.test: 203.0.113.9}}\n"),
    )
    .unwrap();
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("network.resolve: `allowed.test`"),
        "{}",
        stderr(&o)
    );

    // A hard link to the project policy is refused (it would stay writable).
    std::fs::write(&c.config, &base).unwrap();
    std::fs::write(c.ws.join("aibox/policy.yaml"), "version: 1\n").unwrap();
    std::fs::hard_link(c.ws.join("aibox/policy.yaml"), c.ws.join("other-name.yaml")).unwrap();
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("no other hard links"), "{}", stderr(&o));
});

/// `filesystem.deny`: each denied path reads as nothing and cannot be
/// written, replaced or linked, in the workspace and in the system's
/// files, on the native backend and podman+runc; the host's files are
/// untouched. A denied path that is missing where the sandbox could
/// create it, or that has a symbolic link on its way, refuses the start.
fn denied_paths_are_masked(c: Ctx) {
    let secret = c.ws.join("secret.txt");
    let keys = c.ws.join("keys");
    std::fs::write(&secret, "TOPSECRET\n").unwrap();
    std::fs::create_dir(&keys).unwrap();
    std::fs::write(keys.join("id"), "KEYDATA\n").unwrap();
    if let Some((uid, gid)) = c.as_user {
        for p in [&secret, &keys, &keys.join("id")] {
            nix::unistd::chown(p, Some(uid.into()), Some(gid.into())).unwrap();
        }
    }
    let policy = c.dir.path().join("org-policy.yaml");
    let write_policy = |extra: &str| {
        std::fs::write(
            &policy,
            format!("version: 1\nfilesystem:\n  deny: [/workspace/secret.txt, /workspace/keys, /etc/debian_version, /usr/share/common-licenses{extra}]\n"),
        )
        .unwrap();
    };
    write_policy("");
    c.add_config(&format!(
        "policy:\n  org_baseline_path: {}\n",
        policy.display()
    ));
    let o = c.sh("cd /workspace
cat secret.txt; echo read $?
echo x > secret.txt; echo write $?
ls keys; echo ls $?
cat keys/id; echo keyread $?
touch keys/new; echo create $?
rm -f secret.txt; echo rm $?
mv keys k2; echo mv $?
ln secret.txt hl; echo ln $?
cat /etc/debian_version; echo sys $?
ls /usr/share/common-licenses | wc -l");
    let (out, err) = (stdout(&o), stderr(&o));
    for leaked in ["TOPSECRET", "KEYDATA", "12."] {
        assert!(!out.contains(leaked), "{leaked} leaked:\n{out}\n{err}");
    }
    for refused in ["create 0", "rm 0", "mv 0", "ln 0"] {
        assert!(
            !out.lines().any(|l| l == refused),
            "{refused}:\n{out}\n{err}"
        );
    }
    assert!(out.lines().any(|l| l.trim() == "0"), "{out}\n{err}");
    // The host's files are as they were.
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "TOPSECRET\n");
    assert_eq!(
        std::fs::read_to_string(keys.join("id")).unwrap(),
        "KEYDATA\n"
    );
    assert!(!keys.join("new").exists() && !c.ws.join("k2").exists());

    // Missing where it could be created: refused, nothing started.
    write_policy(", /workspace/not-there");
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("/workspace/not-there: does not exist"),
        "{}",
        stderr(&o)
    );
    // A symbolic link on the way: refused.
    std::os::unix::fs::symlink("keys", c.ws.join("via")).unwrap();
    write_policy(", /workspace/via/id");
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("a symbolic link is on its path"),
        "{}",
        stderr(&o)
    );
    assert!(c.runtime_entries().is_empty(), "{:?}", c.runtime_entries());
}

mod denied_paths {
    use super::*;
    backend_test!(
        native_root,
        Backend::Native,
        Mode::Root,
        denied_paths_are_masked
    );
    backend_test!(
        native_rootless,
        Backend::Native,
        Mode::Rootless,
        denied_paths_are_masked
    );
    backend_test!(
        podman_root,
        Backend::Podman,
        Mode::Root,
        denied_paths_are_masked
    );
    backend_test!(
        podman_rootless,
        Backend::Podman,
        Mode::Rootless,
        denied_paths_are_masked
    );
}

/// docker and gVisor cannot mask paths: a policy that denies some refuses
/// the start there.
fn denied_paths_refuse_unmasking_backends(c: Ctx) {
    let policy = c.dir.path().join("org-policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\nfilesystem:\n  deny: [/etc/debian_version]\n",
    )
    .unwrap();
    c.add_config(&format!(
        "policy:\n  org_baseline_path: {}\n",
        policy.display()
    ));
    let o = c.sh("true");
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("cannot mask paths"), "{}", stderr(&o));
}

mod denied_paths_elsewhere {
    use super::*;
    backend_test!(
        docker_root,
        Backend::Docker,
        Mode::Root,
        denied_paths_refuse_unmasking_backends
    );
    backend_test!(
        podman_runsc,
        Backend::Runsc,
        Mode::Root,
        denied_paths_refuse_unmasking_backends
    );
}
