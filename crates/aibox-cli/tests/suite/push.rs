//! git push review against a real git server (git-http-backend behind
//! nginx, TLS and basic auth, see `inject::GitServer`): a
//! `review-required` push waits in the host's queue, invisible on the
//! server until approved; cancel drops it; pushes to foreign remotes and
//! pushes that go around the queue are refused by the proxy.

use super::common::*;
use super::inject::GitServer;

pub(crate) const TOKEN: &str = "ghp_PUSHtoken0123456789abcdefXYZ";

/// Starts a git server whose `proj.git` and `other.git` accept pushes,
/// points the workspace's `origin` at `proj.git`, stores the token, and
/// sets the org policy's class of `git push`.
fn setup(c: &Ctx, risk: &str) -> GitServer {
    let srv = git_workspace(c);
    let p = srv.port;
    let policy = c.dir.path().join("org-policy.yaml");
    std::fs::write(
        &policy,
        format!("version: 1\ntools:\n  rules:\n    - match: [git, push]\n      risk: {risk}\n      reason: pushes are reviewed\n"),
    )
    .unwrap();
    c.add_config(&format!(
        "policy:\n  org_baseline_path: {}\nnetwork:\n  allowed_domains: [\"git.test:{p}\", \"127.0.0.1:{p}\"]\n  resolve: {{git.test: 127.0.0.1}}\ncredentials:\n  upstream_ca: {}\n",
        policy.display(),
        srv.ca.display()
    ));
    add_git_token(c, p, false);
    srv
}

/// Stores (or with `replace`, replaces) the git server's token.
pub(crate) fn add_git_token(c: &Ctx, port: u16, replace: bool) {
    let host = format!("git.test:{port}");
    let mut args = vec!["auth", "add", "git-token", "--host", &host];
    if replace {
        args.push("--replace");
    }
    ok(&c.out_with_input(&args, TOKEN.as_bytes()));
}

/// Starts a git server whose `proj.git` and `other.git` accept pushes and
/// makes the workspace a repository whose `origin` is `proj.git`.
pub(crate) fn git_workspace(c: &Ctx) -> GitServer {
    let srv = GitServer::start(&c.dir.path().join("git-server"), "git.test", TOKEN);
    let p = srv.port;
    let git = |args: &[&str]| {
        let o = std::process::Command::new("git")
            .args(["-c", "safe.directory=*"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let repos = srv.dir.join("repos");
    git(&[
        "init",
        "-q",
        "--bare",
        "-b",
        "main",
        repos.join("other.git").to_str().unwrap(),
    ]);
    for r in ["proj.git", "other.git"] {
        git(&[
            "-C",
            repos.join(r).to_str().unwrap(),
            "config",
            "http.receivepack",
            "true",
        ]);
    }
    let ws = c.ws.to_str().unwrap();
    git(&["init", "-q", "-b", "main", ws]);
    git(&[
        "-C",
        ws,
        "remote",
        "add",
        "origin",
        &format!("https://git.test:{p}/proj.git"),
    ]);
    if let Some((uid, gid)) = c.as_user {
        let o = std::process::Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(&c.ws)
            .output()
            .unwrap();
        assert!(o.status.success());
    }
    srv
}

/// `main` of a repository on the server.
pub(crate) fn server_head(srv: &GitServer, repo: &str) -> String {
    let o = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(srv.dir.join("repos").join(repo))
        .args(["log", "-1", "--format=%s", "main"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The push id in git's output.
pub(crate) fn queued_id(out: &str) -> String {
    let at = out
        .find("queued for review as ")
        .unwrap_or_else(|| panic!("not queued: {out}"));
    out[at + 21..at + 29].to_string()
}

/// Runs git in the sandbox with the `url.*` entries (the push review's
/// rewrite) dropped from its configuration: the push goes straight to
/// the server, with the placeholder credential and the proxy.
const AROUND: &str = "n=0; i=0; while [ $i -lt $GIT_CONFIG_COUNT ]; do eval k=\\$GIT_CONFIG_KEY_$i; eval v=\\$GIT_CONFIG_VALUE_$i; case $k in url.*) ;; *) export GIT_CONFIG_KEY_$n=\"$k\" GIT_CONFIG_VALUE_$n=\"$v\"; n=$((n+1));; esac; i=$((i+1)); done; export GIT_CONFIG_COUNT=$n;";

all_backends!(reviewed_pushes_wait_for_approval, |c: Ctx| {
    let srv = setup(&c, "review-required");
    let p = srv.port;
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "push"]));
    let sh = |script: &str| c.out(&["exec", "--name", "push", "--", "sh", "-c", script]);
    ok(&sh(
        "cd /workspace && git fetch -q origin && git reset -q --hard origin/main && git config user.name agent && git config user.email agent@sandbox",
    ));
    let out = sh(
        "cd /workspace && echo change > feature.txt && git add feature.txt && git commit -qm 'agent change' && git push origin main 2>&1",
    );
    let text = stdout(&out);
    assert!(
        !out.status.success(),
        "a queued push is not reported as pushed: {text}"
    );
    let id = queued_id(&text);
    assert!(text.contains("not pushed yet"), "{text}");
    assert_eq!(
        server_head(&srv, "proj.git"),
        "first",
        "queued, not on the server"
    );

    let status = ok(&c.out(&["push", "status"]));
    assert!(
        status.contains(&id)
            && status.contains("pending")
            && status.contains("push")
            && status.contains("refs/heads/main"),
        "{status}"
    );
    let show = ok(&c.out(&["push", "show", &id]));
    assert!(
        show.contains("agent change")
            && show.contains("feature.txt")
            && show.contains("1 file changed"),
        "{show}"
    );

    // Around the queue: the same push without aibox's remote helper, and
    // a push to another repository, are refused by the proxy.
    let around = sh(&format!(
        "cd /workspace && {AROUND} git push origin main 2>&1"
    ));
    assert!(!around.status.success());
    assert!(stdout(&around).contains("403"), "{}", stdout(&around));
    let foreign = sh(&format!(
        "cd /workspace && git push https://git.test:{p}/other.git main 2>&1"
    ));
    assert!(!foreign.status.success());
    assert!(
        stdout(&foreign).contains("not one of the workspace's remotes"),
        "{}",
        stdout(&foreign)
    );
    let foreign_direct = sh(&format!(
        "cd /workspace && {AROUND} git push https://git.test:{p}/other.git main 2>&1"
    ));
    assert!(!foreign_direct.status.success());
    // A remote the sandbox adds itself is foreign too.
    let added = sh(&format!(
        "cd /workspace && git remote add mine https://git.test:{p}/other.git && git push mine main 2>&1"
    ));
    assert!(!added.status.success(), "{}", stdout(&added));
    // A hosting API on the git host would commit without git: while
    // pushes are reviewed, the token only reads there.
    let api = sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' -H \"Private-Token: $AIBOX_GIT_TOKEN\" -X POST --data '{{}}' https://git.test:{p}/api/v4/projects/1/repository/commits"
    ));
    assert_eq!(stdout(&api).trim(), "403");
    let params = sh(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' -u \"x-access-token:$AIBOX_GIT_TOKEN\" -X POST --data-binary @/dev/null 'https://git.test:{p}/proj.git/git-receive-pack;x=1'"
    ));
    assert_eq!(stdout(&params).trim(), "403");
    assert_eq!(server_head(&srv, "other.git"), "");
    assert_eq!(server_head(&srv, "proj.git"), "first");

    // Approval pushes from the host, with the stored token.
    let approved = ok(&c.out(&["push", "approve", &id]));
    assert!(approved.contains("pushed"), "{approved}");
    assert_eq!(server_head(&srv, "proj.git"), "agent change");
    let again = c.out(&["push", "approve", &id]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already"), "{}", stderr(&again));

    // A second push, cancelled: never reaches the server.
    let out = sh(
        "cd /workspace && git fetch -q origin && echo more >> feature.txt && git commit -qam \"$(printf 'second change \\033[2J\\033[8mhidden')\" && git push origin main 2>&1",
    );
    let id2 = queued_id(&stdout(&out));
    // What the sandbox wrote cannot drive the reviewer's terminal.
    let shown = ok(&c.out(&["push", "show", &id2]));
    assert!(
        shown.contains("second change") && !shown.contains('\u{1b}'),
        "{shown:?}"
    );
    ok(&c.out(&["push", "cancel", &id2]));
    assert_eq!(server_head(&srv, "proj.git"), "agent change");
    let cancelled = c.out(&["push", "approve", &id2]);
    assert!(!cancelled.status.success());
    let all = ok(&c.out(&["push", "status", "--all"]));
    assert!(all.contains("pushed") && all.contains("cancelled"), "{all}");
    assert!(!ok(&c.out(&["push", "status"])).contains(&id2));
    let bad = c.out(&["push", "show", "../../etc"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("not a push id"), "{}", stderr(&bad));

    ok(&c.out(&["stop", "--name", "push"]));
    let events = audit_events(&c, "push");
    let has = |t: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
        events
            .iter()
            .any(|e| e["event_type"] == t && f(&e["details"]))
    };
    assert!(has("tool.invoke", &|d| d["push_id"] == id.as_str()
        && d["status"] == "queued"));
    assert!(has("tool.approve", &|d| d["push_id"] == id.as_str()
        && d["approver"].is_string()));
    assert!(has("tool.deny", &|d| d["push_id"] == id2.as_str()));
    assert!(has("tool.deny", &|d| d["rule"] == "git-push-review"
        && d["via"].is_string()));
    assert!(has("falco.alert", &|d| d["rule_id"] == "aibox-010"));
    let log = audit_text(&c, "push");
    assert!(!log.contains(TOKEN));
});

both_modes!(safe_pushes_go_out_and_blocked_ones_never_do, |c: Ctx| {
    let srv = setup(&c, "safe");
    let p = srv.port;
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "safe"]));
    let sh = |name: &str, script: &str| c.out(&["exec", "--name", name, "--", "sh", "-c", script]);
    ok(&sh(
        "safe",
        "cd /workspace && git fetch -q origin && git reset -q --hard origin/main && git config user.name agent && git config user.email agent@sandbox && echo x > x && git add x && git commit -qm direct && git push -q origin main",
    ));
    assert_eq!(server_head(&srv, "proj.git"), "direct");
    let foreign = sh(
        "safe",
        &format!("cd /workspace && git push https://git.test:{p}/other.git main 2>&1"),
    );
    assert!(!foreign.status.success());
    assert_eq!(server_head(&srv, "other.git"), "");
    // A remote the sandbox adds is not trusted at the next start either.
    ok(&sh(
        "safe",
        &format!("cd /workspace && git remote add mine https://git.test:{p}/other.git"),
    ));
    ok(&c.out(&["stop", "--name", "safe"]));
    let again = c.out(&["start", "-w", &ws, "--name", "safe"]);
    ok(&again);
    assert!(
        stderr(&again).contains("added after aibox first saw"),
        "{}",
        stderr(&again)
    );
    let mine = sh("safe", "cd /workspace && git push mine main 2>&1");
    assert!(!mine.status.success(), "{}", stdout(&mine));
    assert_eq!(server_head(&srv, "other.git"), "");
    ok(&c.out(&["stop", "--name", "safe"]));

    // Blocked: the policy refuses `git push` itself, and the proxy the
    // push request however it is made.
    let policy = c.dir.path().join("org-policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\ntools:\n  rules:\n    - match: [git, push]\n      risk: blocked-by-default\n      reason: no pushes\n",
    )
    .unwrap();
    // The real token inside would push around the proxy: refused.
    std::fs::write(
        &policy,
        "version: 1\ncredentials:\n  expose: [git-token]\ntools:\n  rules:\n    - match: [git, push]\n      risk: blocked-by-default\n      reason: no pushes\n",
    )
    .unwrap();
    let exposed = c.out(&["start", "-w", &ws, "--name", "blocked"]);
    assert!(!exposed.status.success());
    assert!(
        stderr(&exposed).contains("exposes credential `git-token`"),
        "{}",
        stderr(&exposed)
    );
    std::fs::write(
        &policy,
        "version: 1\ntools:\n  rules:\n    - match: [git, push]\n      risk: blocked-by-default\n      reason: no pushes\n",
    )
    .unwrap();
    ok(&c.out(&["start", "-w", &ws, "--name", "blocked"]));
    let git = sh(
        "blocked",
        "cd /workspace && echo y > y && git add y && git commit -qm blocked && git push origin main 2>&1",
    );
    assert!(!git.status.success());
    let curl = sh(
        "blocked",
        &format!(
            "curl -s -o /dev/null -w '%{{http_code}}' -u \"x-access-token:$AIBOX_GIT_TOKEN\" -X POST -H 'Content-Type: application/x-git-receive-pack-request' --data-binary @/dev/null https://git.test:{p}/proj.git/git-receive-pack"
        ),
    );
    assert_eq!(stdout(&curl).trim(), "403");
    assert_eq!(server_head(&srv, "proj.git"), "direct");
    ok(&c.out(&["stop", "--name", "blocked"]));
    let events = audit_events(&c, "blocked");
    assert!(
        events
            .iter()
            .any(|e| e["event_type"] == "tool.deny" && e["details"]["rule"] == "git-push-review")
    );
});
