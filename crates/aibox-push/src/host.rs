//! git on the host: the review repository of each remote, filled with the
//! remote's refs and the sandbox's bundle, and the approved push.
//!
//! Every git run here is cut off from the user's and the system's git
//! configuration, hooks and prompts: what it does is what these
//! functions ask, whatever the machine's setup.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::queue::{Commit, MAX_LISTED, PushRequest, Queue, RefUpdate, Status};
use crate::{AskedUpdate, PushAsk, PushError, check_ref, is_oid};

/// The empty tree (SHA-1), the base of a diffstat for a new history.
const EMPTY_TREE: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";

/// How git on the host reaches the remote.
#[derive(Clone, Default)]
pub struct Remote {
    /// `host:port:address` entries for `http.curloptResolve`.
    pub resolve: Vec<String>,
    /// CA bundle for the remote's certificate.
    pub ca_file: Option<PathBuf>,
    /// The token git authenticates with (`x-access-token`), if any.
    pub token: Option<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("resolve", &self.resolve)
            .field("ca_file", &self.ca_file)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .finish()
    }
}

/// Variable the credential helper reads the token from (never argv).
const TOKEN_ENV: &str = "AIBOX_PUSH_TOKEN";
/// How long one host git command may take.
const GIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Pushes one sandbox may have waiting at once.
pub const MAX_PENDING: usize = 20;
/// The system's CA bundle (Debian's path), which `upstream_ca` adds to.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Remote {
    fn git(&self, repo: &Path) -> Command {
        let mut c = Command::new("git");
        c.env_clear();
        c.env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        );
        c.env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env("HOME", repo)
            .env("LC_ALL", "C");
        c.arg(format!("--git-dir={}", repo.display()));
        let mut cfg = vec![
            "core.hooksPath=/dev/null".to_string(),
            "protocol.allow=never".into(),
            "protocol.https.allow=always".into(),
            "protocol.http.allow=always".into(),
            "protocol.file.allow=always".into(),
            "credential.helper=".into(),
            "gc.auto=0".into(),
            // The remote is reached as named, never where it redirects.
            "http.followRedirects=false".into(),
            // Objects from a sandbox are checked, and land in a pack
            // rather than as loose objects.
            "transfer.fsckObjects=true".into(),
            "fetch.unpackLimit=1".into(),
        ];
        if let Some(t) = &self.token {
            c.env(TOKEN_ENV, t.as_str());
            cfg.push(format!(
                "credential.helper=!f() {{ test \"$1\" = get && printf 'username=x-access-token\\npassword=%s\\n' \"${TOKEN_ENV}\"; }}; f"
            ));
        }
        for r in &self.resolve {
            cfg.push(format!("http.curloptResolve={r}"));
        }
        if let Some(ca) = self.ca_bundle(repo) {
            cfg.push(format!("http.sslCAInfo={}", ca.display()));
        }
        for kv in cfg {
            c.arg("-c").arg(kv);
        }
        c.stdin(Stdio::null());
        c
    }

    /// The system CAs plus `ca_file` (which adds to them, as it does for
    /// the proxy), written beside the review repositories.
    fn ca_bundle(&self, repo: &Path) -> Option<PathBuf> {
        let extra = std::fs::read(self.ca_file.as_ref()?).ok()?;
        let mut all = std::fs::read(SYSTEM_CA).unwrap_or_default();
        if !all.is_empty() && !all.ends_with(b"\n") {
            all.push(b'\n');
        }
        all.extend_from_slice(&extra);
        let path = repo.parent()?.join(".ca-bundle.pem");
        if std::fs::read(&path).ok().as_deref() != Some(all.as_slice()) {
            std::fs::write(&path, &all).ok()?;
        }
        Some(path)
    }

    /// Runs git in `repo`; its stdout, or its stderr as the error.
    fn run(&self, repo: &Path, what: &str, args: &[&str]) -> Result<String, PushError> {
        let out = output(self.git(repo).args(args)).map_err(|e| PushError::Git {
            what: what.into(),
            detail: e,
        })?;
        if !out.status.success() {
            let mut detail = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .trim()
            .to_string();
            if let Some(t) = &self.token {
                detail = detail.replace(t.as_str(), "***");
            }
            return Err(PushError::Git {
                what: what.into(),
                detail,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn ok(&self, repo: &Path, args: &[&str]) -> bool {
        self.git(repo)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn rev(&self, repo: &Path, name: &str) -> Option<String> {
        self.run(
            repo,
            "rev-parse",
            &["rev-parse", "--verify", "--quiet", name],
        )
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| is_oid(s))
    }
}

/// Runs `cmd` to the end or until [`GIT_TIMEOUT`] (then kills it).
fn output(cmd: &mut Command) -> Result<std::process::Output, String> {
    use std::io::Read;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git: {e} (install git on the host)"))?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut b);
        }
        b
    });
    let mut stderr = Vec::new();
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut b);
        }
        b
    });
    let deadline = std::time::Instant::now() + GIT_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "git took longer than {}s and was stopped",
                    GIT_TIMEOUT.as_secs()
                ));
            }
        }
    };
    let stdout = reader.join().unwrap_or_default();
    if let Ok(e) = err_reader.join() {
        stderr = e;
    }
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// The ref under which the review repository keeps the remote's `dst`.
fn remote_ref(dst: &str) -> Option<String> {
    dst.strip_prefix("refs/heads/")
        .map(|b| format!("refs/remote/heads/{b}"))
        .or_else(|| {
            dst.strip_prefix("refs/tags/")
                .map(|t| format!("refs/remote/tags/{t}"))
        })
}

/// Where push `id`'s update `i` is kept in the review repository.
fn held_ref(id: &str, i: usize) -> String {
    format!("refs/aibox/pushes/{id}/{i}")
}

/// Queues a push: refreshes the remote's refs in its review repository,
/// takes the bundle's objects in, checks every update against what the
/// remote has, and records commits and diffstat computed here. The bundle
/// file is removed either way.
pub fn import(
    q: &Queue,
    id: &str,
    sandbox: &str,
    key: &str,
    ask: &PushAsk,
    bundle: &Path,
    remote: &Remote,
) -> Result<PushRequest, PushError> {
    let repo = q.repo_for(key);
    // One import per remote at a time: fetches into one repository would
    // fight over its ref locks.
    let lock_path = repo.with_extension("lock");
    let locked = match lock_path.parent() {
        Some(d) => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
        }
        None => Ok(()),
    }
    .and_then(|()| aibox_core::lock_private_file(&lock_path));
    let lock = match locked {
        Ok(l) => l,
        Err(source) => {
            let _ = std::fs::remove_file(bundle);
            return Err(PushError::Io {
                path: lock_path.display().to_string(),
                source,
            });
        }
    };
    let r = import_inner(q, id, sandbox, key, ask, bundle, remote);
    drop(lock);
    let _ = std::fs::remove_file(bundle);
    if r.is_err() {
        drop_refs(&repo, id, remote);
    }
    r
}

fn import_inner(
    q: &Queue,
    id: &str,
    sandbox: &str,
    key: &str,
    ask: &PushAsk,
    bundle: &Path,
    remote: &Remote,
) -> Result<PushRequest, PushError> {
    if ask.updates.is_empty() || ask.updates.len() > crate::MAX_UPDATES {
        return Err(PushError::Refused(format!(
            "a push must update between 1 and {} refs",
            crate::MAX_UPDATES
        )));
    }
    let waiting = q
        .list()?
        .iter()
        .filter(|r| r.sandbox == sandbox && r.status == Status::Pending)
        .count();
    if waiting >= MAX_PENDING {
        return Err(PushError::Refused(format!(
            "{waiting} pushes from this sandbox already wait for review; ask a reviewer to approve or cancel some (aibox push status)"
        )));
    }
    for u in &ask.updates {
        check_ref(&u.dst).map_err(PushError::Refused)?;
        if let Some(n) = &u.new
            && !is_oid(n)
        {
            return Err(PushError::Refused(format!("{n:?} is not an object id")));
        }
    }
    let repo = q.repo_for(key);
    if !repo.join("HEAD").exists() {
        let parent = repo.parent().unwrap_or(q.dir());
        let tmp = parent.join(format!(".{id}.init"));
        remote.run(&tmp, "init", &["init", "--quiet", "--bare", "--template="])?;
        std::fs::rename(&tmp, &repo).map_err(|source| PushError::Io {
            path: repo.display().to_string(),
            source,
        })?;
    }
    remote.run(
        &repo,
        &format!("fetch from {}", ask.url),
        &[
            "fetch",
            "--quiet",
            "--no-tags",
            "--prune",
            "--no-write-fetch-head",
            &ask.url,
            "+refs/heads/*:refs/remote/heads/*",
            "+refs/tags/*:refs/remote/tags/*",
        ],
    )?;
    let bundled = ask.updates.iter().any(|u| u.bundled);
    if bundled {
        let b = bundle.display().to_string();
        remote
            .run(&repo, "bundle verify", &["bundle", "verify", "--quiet", &b])
            .map_err(|e| {
                PushError::Refused(format!(
                    "the pushed commits do not build on what the remote has (fetch and rebase, then push again): {e}"
                ))
            })?;
        // Only the refs the updates name: a bundle may carry any others.
        let specs: Vec<String> = ask
            .updates
            .iter()
            .enumerate()
            .filter(|(_, u)| u.bundled && u.new.is_some())
            .map(|(i, _)| format!("+refs/aibox/push/{i}:{}", held_ref(id, i)))
            .collect();
        let mut args = vec!["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", &b];
        args.extend(specs.iter().map(String::as_str));
        remote.run(&repo, "fetch from the bundle", &args)?;
    }
    let mut updates = Vec::new();
    let mut news = Vec::new();
    for (i, u) in ask.updates.iter().enumerate() {
        let held = held_ref(id, i);
        let new = match (&u.new, u.bundled) {
            (None, _) => None,
            (Some(n), true) => {
                let got = remote.rev(&repo, &held);
                if got.as_deref() != Some(n.as_str()) {
                    return Err(PushError::Refused(format!(
                        "the bundle does not hold {n} for {}",
                        u.dst
                    )));
                }
                Some(n.clone())
            }
            (Some(n), false) => {
                // Already on the remote: keep it reachable here too.
                if !remote.ok(&repo, &["cat-file", "-e", &format!("{n}^{{commit}}")]) {
                    return Err(PushError::Refused(format!(
                        "{n} (for {}) is neither in the bundle nor on the remote",
                        u.dst
                    )));
                }
                remote.run(&repo, "update-ref", &["update-ref", &held, n])?;
                Some(n.clone())
            }
        };
        let old = remote_ref(&u.dst).and_then(|r| remote.rev(&repo, &r));
        if let (Some(o), Some(n), false) = (&old, &new, u.force)
            && o != n
            && !remote.ok(&repo, &["merge-base", "--is-ancestor", o, n])
        {
            return Err(PushError::Refused(format!(
                "{} on the remote ({}) is not an ancestor of the pushed {}: fetch and rebase, or force the push",
                u.dst,
                &o[..12],
                &n[..12]
            )));
        }
        if let (Some(_), Some(_), false, true) =
            (&old, &new, u.force, u.dst.starts_with("refs/tags/"))
        {
            return Err(PushError::Refused(format!(
                "{} exists on the remote; moving a tag needs a forced push",
                u.dst
            )));
        }
        if old.is_none() && new.is_none() {
            return Err(PushError::Refused(format!(
                "{} does not exist on the remote; there is nothing to delete",
                u.dst
            )));
        }
        if let Some(n) = &new {
            news.push(n.clone());
        }
        updates.push(RefUpdate {
            dst: u.dst.clone(),
            old,
            new,
            force: u.force,
        });
    }
    let (commits, total) = commits(&repo, &news, remote)?;
    let mut diffstat = String::new();
    for u in &updates {
        diffstat.push_str(&format!("{}:\n", u.dst));
        let Some(n) = &u.new else {
            diffstat.push_str("  (deleted)\n");
            continue;
        };
        let base = match &u.old {
            Some(o) => o.clone(),
            None => boundary(&repo, n, remote).unwrap_or_else(|| EMPTY_TREE.to_string()),
        };
        let stat = remote.run(
            &repo,
            "diff --stat",
            &[
                "diff",
                "--no-ext-diff",
                "--no-textconv",
                "--stat=100",
                "--summary",
                &base,
                n,
            ],
        )?;
        diffstat.push_str(if stat.trim().is_empty() {
            " (no changes)\n"
        } else {
            &stat
        });
    }
    let req = PushRequest {
        id: id.into(),
        sandbox: sandbox.into(),
        url: ask.url.clone(),
        updates,
        commits,
        commits_total: total,
        diffstat,
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        status: Status::Pending,
        decided_by: None,
        decided_at: None,
        outcome: None,
        repo,
        resolve: remote.resolve.clone(),
        ca_file: remote.ca_file.clone(),
    };
    q.save(&req)?;
    Ok(req)
}

/// The commits in `news` that the remote does not have.
fn commits(repo: &Path, news: &[String], remote: &Remote) -> Result<(Vec<Commit>, u64), PushError> {
    if news.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut args: Vec<&str> = vec!["rev-list", "--count"];
    args.extend(news.iter().map(String::as_str));
    args.extend(["--not", "--glob=refs/remote/*"]);
    let total = remote
        .run(repo, "rev-list", &args)?
        .trim()
        .parse::<u64>()
        .unwrap_or(0);
    let max = format!("--max-count={MAX_LISTED}");
    let mut args: Vec<&str> = vec!["log", &max, "--format=%H%x09%an <%ae>%x09%s"];
    args.extend(news.iter().map(String::as_str));
    args.extend(["--not", "--glob=refs/remote/*", "--"]);
    let log = remote.run(repo, "log", &args)?;
    let commits = log
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            Some(Commit {
                oid: f.next()?.to_string(),
                author: f.next()?.to_string(),
                subject: f.next().unwrap_or("").to_string(),
            })
        })
        .collect();
    Ok((commits, total))
}

/// A commit the remote has that the new history grows from.
fn boundary(repo: &Path, new: &str, remote: &Remote) -> Option<String> {
    let out = remote
        .run(
            repo,
            "rev-list",
            &[
                "rev-list",
                "--boundary",
                new,
                "--not",
                "--glob=refs/remote/*",
            ],
        )
        .ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix('-'))
        .map(str::to_string)
        .filter(|s| is_oid(s))
}

/// Removes what push `id` keeps in `repo` (its objects go at the next gc).
pub fn drop_refs(repo: &Path, id: &str, remote: &Remote) {
    let Ok(list) = remote.run(
        repo,
        "for-each-ref",
        &[
            "for-each-ref",
            "--format=%(refname)",
            &format!("refs/aibox/pushes/{id}/"),
        ],
    ) else {
        return;
    };
    for r in list.lines() {
        let _ = remote.run(repo, "update-ref", &["update-ref", "-d", r]);
    }
}

/// Pushes an approved request from its review repository: each update
/// leased on the remote value the review saw, so that a remote that
/// moved since makes the push fail rather than overwrite. Returns git's
/// report.
pub fn push(req: &PushRequest, remote: &Remote) -> Result<String, PushError> {
    let mut args: Vec<String> = vec![
        "push".into(),
        "--porcelain".into(),
        "--no-verify".into(),
        "--atomic".into(),
    ];
    for u in &req.updates {
        args.push(format!(
            "--force-with-lease={}:{}",
            u.dst,
            u.old.as_deref().unwrap_or("")
        ));
    }
    args.push(req.url.clone());
    for u in &req.updates {
        // The reviewed object itself (the held ref only keeps it here).
        args.push(match &u.new {
            Some(n) => format!("{}{n}:{}", if u.force { "+" } else { "" }, u.dst),
            None => format!(":{}", u.dst),
        });
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    remote.run(&req.repo, &format!("push to {}", req.url), &argv)
}

/// The updates as the helper sent them, for messages.
pub fn describe(updates: &[AskedUpdate]) -> String {
    updates
        .iter()
        .map(|u| match &u.new {
            Some(n) => format!(
                "{}{}→{}",
                if u.force { "+" } else { "" },
                &n[..n.len().min(12)],
                u.dst
            ),
            None => format!("delete {}", u.dst),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, script: &str) -> String {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .env("GIT_AUTHOR_NAME", "A")
            .env("GIT_AUTHOR_EMAIL", "a@x")
            .env("GIT_COMMITTER_NAME", "A")
            .env("GIT_COMMITTER_EMAIL", "a@x")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn queued_pushes_are_reviewed_from_host_objects_and_pushed_leased() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        sh(
            d,
            "git init -q --bare -b main srv.git && git init -q -b main c && cd c && echo a > f && git add f && git commit -qm one && git push -q ../srv.git main",
        );
        let srv = d.join("srv.git").display().to_string();
        let old = sh(d, "git -C srv.git rev-parse main");
        let new = sh(
            d,
            "cd c && printf 'a\\nb\\n' > f && echo n > g && git add f g && git commit -qm 'two: more' && git update-ref refs/aibox/push/0 HEAD && git bundle create -q ../b.bundle refs/aibox/push/0 ^main~1 && git rev-parse HEAD",
        );
        let q = Queue::new(&d.join("q"));
        q.create().unwrap();
        let ask = PushAsk {
            url: srv.clone(),
            updates: vec![AskedUpdate {
                dst: "refs/heads/main".into(),
                new: Some(new.clone()),
                bundled: true,
                force: false,
            }],
        };
        let remote = Remote::default();
        let id = q.new_id().unwrap();
        let r = import(&q, &id, "sb", "k", &ask, &d.join("b.bundle"), &remote).unwrap();
        assert_eq!(r.updates[0].old.as_deref(), Some(old.as_str()));
        assert_eq!(r.commits_total, 1);
        assert_eq!(r.commits[0].subject, "two: more");
        assert!(r.diffstat.contains("2 files changed"), "{}", r.diffstat);
        assert!(!d.join("b.bundle").exists());
        // Queued, not on the server.
        assert_eq!(sh(d, "git -C srv.git rev-parse main"), old);
        push(&r, &remote).unwrap();
        assert_eq!(sh(d, "git -C srv.git rev-parse main"), new);

        // The remote moves after review: the lease refuses the push.
        let third = sh(
            d,
            "cd c && echo c >> f && git commit -qam three && git rev-parse HEAD",
        );
        sh(
            d,
            "cd c && git update-ref refs/aibox/push/0 HEAD && git bundle create -q ../b.bundle refs/aibox/push/0 ^HEAD~1",
        );
        let ask = PushAsk {
            url: srv.clone(),
            updates: vec![AskedUpdate {
                dst: "refs/heads/main".into(),
                new: Some(third),
                bundled: true,
                force: false,
            }],
        };
        let id2 = q.new_id().unwrap();
        let r2 = import(&q, &id2, "sb", "k", &ask, &d.join("b.bundle"), &remote).unwrap();
        sh(
            d,
            "git init -q -b main o && cd o && git fetch -q ../srv.git main && git reset -q --hard FETCH_HEAD && echo x > h && git add h && git commit -qm other && git push -q ../srv.git main",
        );
        let e = push(&r2, &remote).unwrap_err().to_string();
        assert!(e.contains("stale info") || e.contains("rejected"), "{e}");

        // A bundle that lies about its tip, and a non-fast-forward.
        sh(
            d,
            "cd c && git update-ref refs/aibox/push/0 HEAD && git bundle create -q ../b.bundle refs/aibox/push/0 ^HEAD~1",
        );
        let mut lie = ask.clone();
        lie.updates[0].new = Some("0".repeat(40));
        let e = import(
            &q,
            &q.new_id().unwrap(),
            "sb",
            "k",
            &lie,
            &d.join("b.bundle"),
            &remote,
        );
        assert!(matches!(e, Err(PushError::Refused(_))), "{e:?}");
        sh(
            d,
            "cd c && git update-ref refs/aibox/push/0 HEAD && git bundle create -q ../b.bundle refs/aibox/push/0 ^HEAD~1",
        );
        let e = import(
            &q,
            &q.new_id().unwrap(),
            "sb",
            "k",
            &ask,
            &d.join("b.bundle"),
            &remote,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("not an ancestor") || e.contains("do not build"),
            "{e}"
        );
        let mut bad = ask.clone();
        bad.updates[0].dst = "refs/heads/../x".into();
        assert!(
            import(
                &q,
                &q.new_id().unwrap(),
                "sb",
                "k",
                &bad,
                &d.join("none"),
                &remote
            )
            .is_err()
        );
    }
}
