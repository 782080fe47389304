//! `git-remote-aibox`: the remote helper git runs inside the sandbox for
//! a push to `aibox::https://…` (see the crate docs). It speaks git's
//! remote-helper protocol on stdin/stdout: `capabilities`, `list
//! for-push` (answered from `git ls-remote`), and a batch of `push`
//! commands, which it bundles and sends to the broker. Everything it
//! sends is checked again on the host; it holds no secret.

use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};

use crate::{ASK_HEADER, AskedUpdate, BROKER_HOST, BROKER_PATH, PushAsk, Queued, is_oid};

/// The helper's program name (git runs `git-remote-<transport>`).
pub const PROGRAM: &str = "git-remote-aibox";
/// Variable naming the proxy (`127.0.0.1:port`) the broker is behind.
pub const BROKER_ENV: &str = "AIBOX_PUSH_BROKER";
/// Where the helper's program is inside the sandbox.
pub const PATH_DIR: &str = "/aibox/bin";

fn git(args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git {} failed: {}",
            args.first().copied().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn git_ok(args: &[&str]) -> bool {
    Command::new("git")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the helper: `args` are git's (remote name, URL). Returns the exit
/// code.
pub fn run(args: &[String]) -> i32 {
    let Some(url) = args.get(1).or(args.first()).cloned() else {
        eprintln!(
            "{PROGRAM}: git runs this program for `aibox::` remotes; it takes a remote name and URL"
        );
        return 2;
    };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut remote_oids: Vec<String> = Vec::new();
    let mut lines = stdin.lock().lines();
    while let Some(Ok(line)) = lines.next() {
        let reply = if line == "capabilities" {
            "push\n\n".to_string()
        } else if line == "list" || line == "list for-push" {
            match list(&url) {
                Ok((text, oids)) => {
                    remote_oids = oids;
                    text
                }
                Err(e) => {
                    eprintln!("{PROGRAM}: {e}");
                    return 1;
                }
            }
        } else if let Some(first) = line.strip_prefix("push ") {
            let mut specs = vec![first.to_string()];
            for l in lines.by_ref() {
                let Ok(l) = l else { break };
                match l.strip_prefix("push ") {
                    Some(s) => specs.push(s.to_string()),
                    None => break,
                }
            }
            push(&url, &specs, &remote_oids)
        } else if line.is_empty() {
            return 0;
        } else {
            eprintln!("{PROGRAM}: unsupported command {line:?}");
            return 1;
        };
        if out
            .write_all(reply.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return 1;
        }
    }
    0
}

/// `list for-push`: the remote's refs, as `git ls-remote` (through the
/// proxy, with the injected credential) reports them.
fn list(url: &str) -> Result<(String, Vec<String>), String> {
    let text = git(&["ls-remote", "--symref", url])?;
    let mut out = String::new();
    let mut oids = Vec::new();
    for l in text.lines() {
        let Some((left, name)) = l.split_once('\t') else {
            continue;
        };
        if let Some(target) = left.strip_prefix("ref: ") {
            out.push_str(&format!("@{target} {name}\n"));
        } else if is_oid(left) && !name.ends_with("^{}") && name != "HEAD" {
            out.push_str(&format!("{left} {name}\n"));
            oids.push(left.to_string());
        }
    }
    out.push('\n');
    Ok((out, oids))
}

/// A `push` batch: the answer lines for git.
fn push(url: &str, specs: &[String], remote_oids: &[String]) -> String {
    let dsts: Vec<String> = specs
        .iter()
        .map(|s| {
            s.rsplit_once(':')
                .map_or(s.as_str(), |(_, d)| d)
                .to_string()
        })
        .collect();
    let answer = |msg: &str| {
        let msg = msg.replace(['\n', '\r'], " ");
        let mut s: String = dsts.iter().map(|d| format!("error {d} {msg}\n")).collect();
        s.push('\n');
        s
    };
    match send(url, specs, remote_oids) {
        Ok(q) => {
            eprintln!("aibox: {}", q.message);
            answer(&format!("queued for review as {} (not pushed yet)", q.id))
        }
        Err(e) => {
            eprintln!("aibox: push refused: {e}");
            answer(&e)
        }
    }
}

fn send(url: &str, specs: &[String], remote_oids: &[String]) -> Result<Queued, String> {
    let git_dir = std::env::var("GIT_DIR").unwrap_or_else(|_| ".git".into());
    // Only excludes the remote's tips this repository has: anything else
    // cannot be named to `git bundle`.
    let have: Vec<String> = remote_oids
        .iter()
        .filter(|o| git_ok(&["cat-file", "-e", o.as_str()]))
        .map(|o| format!("^{o}"))
        .collect();
    for r in git(&["for-each-ref", "--format=%(refname)", "refs/aibox/push/"])?.lines() {
        let _ = git(&["update-ref", "-d", r]);
    }
    let mut updates = Vec::new();
    let mut bundle_refs = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let (force, spec) = match spec.strip_prefix('+') {
            Some(s) => (true, s),
            None => (false, spec.as_str()),
        };
        let (src, dst) = spec
            .rsplit_once(':')
            .ok_or_else(|| format!("git sent a push without a destination: {spec:?}"))?;
        let new = if src.is_empty() {
            None
        } else {
            let oid = git(&["rev-parse", "--verify", "--quiet", src])?
                .trim()
                .to_string();
            if !is_oid(&oid) {
                return Err(format!("{src} does not name an object"));
            }
            Some(oid)
        };
        let mut bundled = false;
        if let Some(n) = &new {
            let mut args = vec!["rev-list", "-n1", n.as_str()];
            args.extend(have.iter().map(String::as_str));
            let commit = git(&["cat-file", "-t", n])?.trim() == "commit";
            if !commit || !git(&args)?.trim().is_empty() {
                let r = format!("refs/aibox/push/{i}");
                git(&["update-ref", &r, n])?;
                bundle_refs.push(r);
                bundled = true;
            }
        }
        updates.push(AskedUpdate {
            dst: dst.to_string(),
            new,
            bundled,
            force,
        });
    }
    let bundle = std::path::Path::new(&git_dir).join("aibox-push.bundle");
    let mut body = Vec::new();
    if !bundle_refs.is_empty() {
        let mut args = vec!["bundle".to_string(), "create".into(), "--quiet".into()];
        args.push(bundle.display().to_string());
        args.extend(bundle_refs.iter().cloned());
        args.extend(have.iter().cloned());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let made = git(&argv);
        for r in &bundle_refs {
            let _ = git(&["update-ref", "-d", r]);
        }
        made?;
        body = std::fs::read(&bundle).map_err(|e| format!("reading the bundle: {e}"))?;
        let _ = std::fs::remove_file(&bundle);
    }
    let ask = PushAsk {
        url: url.to_string(),
        updates,
    };
    post(&ask, &body)
}

/// Sends the push to the broker through the proxy.
fn post(ask: &PushAsk, body: &[u8]) -> Result<Queued, String> {
    let proxy = std::env::var(BROKER_ENV).map_err(|_| {
        format!("{BROKER_ENV} is not set: pushes from this sandbox go through aibox's push review, which this session's environment lost")
    })?;
    let mut s = std::net::TcpStream::connect(&proxy)
        .map_err(|e| format!("cannot reach aibox's proxy at {proxy}: {e}"))?;
    let ask = serde_json::to_string(ask).map_err(|e| e.to_string())?;
    let head = format!(
        "POST http://{BROKER_HOST}{BROKER_PATH} HTTP/1.1\r\nHost: {BROKER_HOST}\r\n{ASK_HEADER}: {ask}\r\nContent-Type: application/x-git-bundle\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body))
        .map_err(|e| format!("sending the push to aibox: {e}"))?;
    let text = read_answer(&mut s)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(0);
    if status == 200 {
        serde_json::from_str(body.trim())
            .map_err(|e| format!("aibox's answer is not understood: {e}"))
    } else {
        Err(body.trim().trim_start_matches("aibox: ").to_string())
    }
}

/// Reads one HTTP answer: the head, then exactly the body its
/// `Content-Length` gives (not until the connection closes: a proxy or
/// network stack may keep it open). The broker may take minutes (it
/// fetches from the remote), so the wait is long but bounded.
fn read_answer(s: &mut std::net::TcpStream) -> Result<String, String> {
    s.set_read_timeout(Some(std::time::Duration::from_secs(900)))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err("aibox's answer has an oversized head".into());
        }
        let n = s
            .read(&mut chunk)
            .map_err(|e| format!("reading aibox's answer: {e}"))?;
        if n == 0 {
            return Err("aibox closed the connection without an answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0)
        .min(1 << 20);
    while buf.len() < head_end + len {
        let n = s
            .read(&mut chunk)
            .map_err(|e| format!("reading aibox's answer: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.truncate(head_end + len);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
