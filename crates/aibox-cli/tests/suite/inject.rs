//! Secretless credential injection, end to end: a token stored with
//! `aibox auth add`, a sandbox that only ever holds a placeholder for it,
//! and two servers on the host's loopback: a "forge" speaking HTTPS with
//! its own CA (bound to the token) and another allowed host speaking plain
//! HTTP. Both record every request they get, so the test can say where
//! the real value went and where it did not. (A real forge cannot be
//! reached from this machine; the local server answers like one.)

use super::common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// The real token: only the host side may hold it.
const REAL: &str = "ghp_REALtoken0123456789abcdefXYZ";

/// What the forge says about a header: never the value itself.
fn verdict(v: &str) -> String {
    use base64::Engine as _;
    let basic = v
        .strip_prefix("Basic ")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .unwrap_or_default();
    if v.is_empty() {
        "none".into()
    } else if v == format!("Bearer {REAL}") {
        "real".into()
    } else if basic == format!("x-access-token:{REAL}") {
        "real-basic".into()
    } else if v.contains("aibox-cred-") || basic.contains("aibox-cred-") {
        "placeholder".into()
    } else {
        "other".into()
    }
}

type Seen = Arc<Mutex<Vec<String>>>;

/// Reads one request (head and a `content-length` body) from `r`.
fn read_request(r: &mut impl BufRead) -> Option<(Vec<String>, String)> {
    let mut head = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if h == "\r\n" {
            break;
        }
        head.push(h.trim_end().to_string());
    }
    let len: usize = header(&head, "content-length").parse().unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some((head, String::from_utf8_lossy(&body).into_owned()))
}

fn header(head: &[String], name: &str) -> String {
    head.iter()
        .find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// The forge: `/redirect` sends the client to the other host, `/echo`
/// answers with the Authorization header it got (a reflecting endpoint),
/// anything else with a verdict on the credentials it got.
fn forge(config: Arc<rustls::ServerConfig>, other_port: u16, seen: Seen) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (config, seen) = (config.clone(), seen.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, s);
                let Some((head, body)) = read_request(&mut BufReader::new(&mut tls)) else {
                    return;
                };
                seen.lock()
                    .unwrap()
                    .push(format!("{}\n\n{body}", head.join("\n")));
                let path = head
                    .first()
                    .and_then(|l| l.split(' ').nth(1))
                    .unwrap_or("/")
                    .to_string();
                let auth = header(&head, "authorization");
                let (status, extra, out) = if path == "/redirect" {
                    (
                        "302 Found",
                        format!("Location: http://other.test:{other_port}/landing\r\n"),
                        String::new(),
                    )
                } else if path == "/echo" {
                    ("200 OK", String::new(), format!("you sent: {auth}\n"))
                } else if path == "/echo-forms" {
                    (
                        "200 OK",
                        String::new(),
                        format!("{}\n", echo_forms(&auth).join("\n")),
                    )
                } else if path == "/gzip" {
                    (
                        "200 OK",
                        "Content-Encoding: gzip\r\n".into(),
                        format!("you sent: {auth}\n"),
                    )
                } else {
                    let v = serde_json::json!({
                        "auth": verdict(&auth),
                        "private_token": verdict(&header(&head, "private-token")),
                        "accept_encoding": header(&head, "accept-encoding"),
                        "path": path,
                    });
                    ("200 OK", String::new(), v.to_string())
                };
                let out = if path == "/gzip" {
                    gzip(out.as_bytes())
                } else {
                    out.into_bytes()
                };
                let _ = tls.write_all(
                    format!(
                        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                        out.len()
                    )
                    .as_bytes(),
                );
                let _ = tls.write_all(&out);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    port
}

/// What a careless endpoint might send back of a header: base64url,
/// hex, and a piece from the middle.
fn echo_forms(v: &str) -> Vec<String> {
    use base64::Engine as _;
    vec![
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v),
        v.bytes().map(|b| format!("{b:02x}")).collect(),
        v.get(12..28).unwrap_or("").to_string(),
    ]
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut c = std::process::Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(b).unwrap();
    c.wait_with_output().unwrap().stdout
}

/// Another allowed host, plain HTTP, recording what reaches it.
fn other(seen: Seen) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let Some((head, body)) = read_request(&mut BufReader::new(&mut s)) else {
                    return;
                };
                seen.lock()
                    .unwrap()
                    .push(format!("{}\n\n{body}", head.join("\n")));
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nlanded\n",
                );
            });
        }
    });
    port
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return hits;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            hits.extend(files_containing(&p, needle));
        } else if m.is_file()
            && let Ok(b) = std::fs::read(&p)
            && let Some(at) = b.windows(needle.len()).position(|w| w == needle)
        {
            let around = &b[at.saturating_sub(300)..(at + needle.len() + 100).min(b.len())];
            hits.push(format!(
                "{}: …{}…",
                p.display(),
                String::from_utf8_lossy(around)
            ));
        }
    }
    hits
}

all_backends!(
    only_a_placeholder_enters_and_only_the_bound_host_gets_the_token,
    |c: Ctx| {
        let (ca_pem, config) = tls_server(&["forge.test"]);
        let ca = c.dir.path().join("forge-ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let (forge_seen, other_seen): (Seen, Seen) = Default::default();
        let op = other(other_seen.clone());
        let fp = forge(config, op, forge_seen.clone());
        c.add_config(&format!(
        "network:
  allowed_domains: [\"forge.test:{fp}\", \"127.0.0.1:{fp}\", \"other.test:{op}\", \"127.0.0.1:{op}\"]
  resolve: {{forge.test: 127.0.0.1, other.test: 127.0.0.1}}
credentials:
  upstream_ca: {}
",
        ca.display()
    ));
        let bound = format!("forge.test:{fp}");
        ok(&c.out_with_input(
            &["auth", "add", "git-token", "--host", &bound],
            REAL.as_bytes(),
        ));
        let ws = c.ws.display().to_string();
        ok(&c.out(&["start", "-w", &ws, "--name", "inj"]));
        let sh = |script: &str| c.out(&["exec", "--name", "inj", "--", "sh", "-c", script]);

        // Inside: a placeholder, and the CA that lets the proxy read requests
        // to the forge (and only the forge).
        let ph = ok(&sh("printf %s \"$AIBOX_GIT_TOKEN\""));
        assert!(ph.starts_with("aibox-cred-git-token-"), "{ph}");
        let url = format!("https://forge.test:{fp}");
        let json = |out: &str| -> serde_json::Value {
            serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
        };

        // Through the proxy port (CONNECT): Bearer, Basic and a custom header
        // get the real value.
        let v = json(&ok(&sh(&format!(
            "curl -sS -H \"Authorization: Bearer $AIBOX_GIT_TOKEN\" -H \"Private-Token: $AIBOX_GIT_TOKEN\" {url}/api"
        ))));
        assert_eq!(
            (v["auth"].as_str(), v["private_token"].as_str()),
            (Some("real"), Some("other")),
            "{v}"
        );
        let v = json(&ok(&sh(&format!(
            "curl -sS -u \"x-access-token:$AIBOX_GIT_TOKEN\" {url}/api"
        ))));
        assert_eq!(v["auth"], "real-basic", "{v}");
        // Transparently (no proxy variables): the same.
        let v = json(&ok(&sh(&format!(
            "curl -sS --noproxy '*' -H \"Authorization: Bearer $AIBOX_GIT_TOKEN\" {url}/api"
        ))));
        assert_eq!(v["auth"], "real", "{v}");

        // Exfiltration attempts: each refused by the proxy (403), none
        // reaching a server with the real value.
        let code = |script: String| {
            let out = sh(&script);
            stdout(&out).trim().to_string()
        };
        for (what, script) in [
            (
                "in a URL",
                format!(
                    "curl -sS -o /dev/null -w '%{{http_code}}' \"{url}/api?token=$AIBOX_GIT_TOKEN\""
                ),
            ),
            (
                "in a body",
                format!(
                    "curl -sS -o /dev/null -w '%{{http_code}}' -d \"token=$AIBOX_GIT_TOKEN\" {url}/api"
                ),
            ),
            (
                "to another allowed host",
                format!(
                    "curl -sS -o /dev/null -w '%{{http_code}}' -H \"Authorization: Bearer $AIBOX_GIT_TOKEN\" http://other.test:{op}/"
                ),
            ),
            (
                "after a redirect from the bound host",
                format!(
                    "curl -sS -L --location-trusted -o /dev/null -w '%{{http_code}}' -H \"Authorization: Bearer $AIBOX_GIT_TOKEN\" {url}/redirect"
                ),
            ),
            (
                "in a header a service may keep",
                format!(
                    "curl -sS -o /dev/null -w '%{{http_code}}' -A \"agent $AIBOX_GIT_TOKEN\" {url}/api"
                ),
            ),
            (
                "a made-up placeholder",
                format!(
                    "curl -sS -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer aibox-cred-git-token-00000000000000000000000000000000' {url}/api"
                ),
            ),
        ] {
            assert_eq!(code(script), "403", "placeholder {what} was not refused");
        }
        // A reflecting endpoint cannot hand the value back.
        let echoed = ok(&sh(&format!(
            "curl -sS -H \"Authorization: Bearer $AIBOX_GIT_TOKEN\" {url}/echo"
        )));
        assert!(echoed.starts_with("you sent: Bearer ****"), "{echoed}");
        let echoed = ok(&sh(&format!(
            "curl -sS -u \"x-access-token:$AIBOX_GIT_TOKEN\" {url}/echo"
        )));
        assert!(!echoed.contains(REAL) && echoed.contains('*'), "{echoed}");
        // Nor encoded, nor in pieces.
        let echoed = ok(&sh(&format!(
            "curl -sS -H \"Authorization: Bearer $AIBOX_GIT_TOKEN\" {url}/echo-forms"
        )));
        for form in echo_forms(&format!("Bearer {REAL}")) {
            assert!(!echoed.contains(&form), "{form} came back: {echoed}");
        }
        for piece in REAL.as_bytes().windows(12) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(!echoed.contains(piece), "{piece} came back: {echoed}");
        }
        // Compression would hide an echo from the masking: identity is
        // asked for, and an encoded answer is not passed on.
        let v = json(&ok(&sh(&format!(
            "curl -sS --compressed -H \"Authorization: Bearer $AIBOX_GIT_TOKEN\" {url}/api"
        ))));
        assert_eq!(v["accept_encoding"], "identity", "{v}");
        let gz = stdout(&sh(&format!(
            "curl -sS --compressed -o /dev/null -w '%{{http_code}}' -H \"Authorization: Bearer $AIBOX_GIT_TOKEN\" {url}/gzip"
        )));
        assert_eq!(gz.trim(), "502");

        // Nowhere inside: environments and command lines of every process,
        // and the places a sandbox writes or reads its settings. (The needle
        // is split, and joined only by the shell's builtins and fed to grep on
        // stdin, so that no command line, nor the exec gate's record of one,
        // holds it.)
        let (a, b) = REAL.split_at(10);
        let found = stdout(&sh(&format!(
            "A='{a}'; B='{b}'; printf '%s%s\\n' \"$A\" \"$B\" | grep -lFf - /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; printf '%s%s\\n' \"$A\" \"$B\" | grep -rlFf - /etc /tmp /var/tmp /run /home /root {ws} 2>/dev/null; case \"$(env)\" in *\"$A$B\"*) echo in-env;; esac; true"
        )));
        assert_eq!(found.trim(), "", "the token is inside the sandbox");

        // The forge got the value in headers only; the other host never got
        // the value nor the placeholder.
        for r in forge_seen.lock().unwrap().iter() {
            for line in r.lines().filter(|l| l.contains(REAL)) {
                let l = line.to_ascii_lowercase();
                assert!(
                    l.starts_with("authorization: bearer ") || l.starts_with("private-token: "),
                    "{r}"
                );
            }
            assert!(!r.contains("token=aibox-cred") && !r.contains(&ph), "{r}");
        }
        for r in other_seen.lock().unwrap().iter() {
            assert!(!r.contains(REAL) && !r.contains("aibox-cred"), "{r}");
        }

        // The supervisor holds the value in memory only.
        let st: serde_json::Value =
            serde_json::from_str(&ok(&c.out(&["status", "--name", "inj", "--format", "json"])))
                .unwrap();
        let pid = &st["supervisor_pid"];
        for f in ["environ", "cmdline"] {
            let b = std::fs::read(format!("/proc/{pid}/{f}")).unwrap();
            assert!(
                !String::from_utf8_lossy(&b).contains(REAL),
                "supervisor {f}"
            );
        }
        let shown = serde_json::to_string(&st).unwrap();
        assert!(
            shown.contains("git-token (git-token)") && !shown.contains(REAL),
            "{shown}"
        );
        // Nor in any file aibox keeps while the sandbox runs.
        for dir in [&c.data, &c.runtime] {
            let hits = files_containing(dir, REAL.as_bytes());
            assert!(hits.is_empty(), "the token is in {hits:?}");
        }

        ok(&c.out(&["stop", "--name", "inj"]));
        let events = audit_events(&c, "inj");
        let of = |t: &str| -> Vec<&serde_json::Value> {
            events.iter().filter(|e| e["event_type"] == t).collect()
        };
        let issue = of("credential.issue");
        assert_eq!(issue.len(), 1, "{issue:?}");
        assert_eq!(issue[0]["details"]["mode"], "placeholder");
        let uses = of("credential.use");
        let allowed = uses
            .iter()
            .filter(|e| e["details"]["decision"] == "allow")
            .count();
        assert!(allowed >= 4, "{uses:?}");
        let denied: Vec<&&serde_json::Value> = uses
            .iter()
            .filter(|e| e["details"]["decision"] == "deny")
            .collect();
        assert!(denied.len() >= 6, "{denied:?}");
        assert!(denied.iter().all(|e| e["severity"] == "high"), "{denied:?}");
        for place in ["url", "body", "header"] {
            assert!(
                denied.iter().any(|e| e["details"]["where"] == place),
                "no refusal for a placeholder in a {place}: {denied:?}"
            );
        }
        assert!(
            of("falco.alert")
                .iter()
                .any(|e| e["details"]["rule_id"] == "aibox-credential-misuse")
        );
        assert_eq!(of("credential.revoke").len(), 1);
        // Not in any log or state aibox keeps (the store is encrypted).
        for dir in [&c.data, &c.runtime] {
            let hits = files_containing(dir, REAL.as_bytes());
            assert!(hits.is_empty(), "the token is in {hits:?}");
        }

        // A new sandbox gets a new placeholder; the old one is refused.
        ok(&c.out(&["start", "-w", &ws, "--name", "inj2"]));
        let ph2 = ok(&c.out(&[
            "exec",
            "--name",
            "inj2",
            "--",
            "sh",
            "-c",
            "printf %s \"$AIBOX_GIT_TOKEN\"",
        ]));
        assert!(ph2.starts_with("aibox-cred-git-token-") && ph2 != ph);
        let old = c.out(&[
            "exec",
            "--name",
            "inj2",
            "--",
            "sh",
            "-c",
            &format!("curl -sS -w '%{{http_code}}' -H 'Authorization: Bearer {ph}' {url}/api"),
        ]);
        let old = stdout(&old);
        assert!(
            old.ends_with("403") && old.contains("no credential of this sandbox"),
            "{old}"
        );
        ok(&c.out(&["stop", "--name", "inj2"]));
    }
);

both_modes!(policy_exposes_values_and_ttls_end_substitution, |c: Ctx| {
    // The org lets the mirror token in as itself and gives git tokens a
    // one-second life. (Nothing listens on the bound port: a refusal
    // happens before the proxy connects anywhere.)
    let org = c.dir.path().join("org-policy.yaml");
    std::fs::write(
        &org,
        "version: 1\ncredentials: {expose: [mirror-token], git_token_ttl: 1s}\n",
    )
    .unwrap();
    c.add_config(&format!(
        "policy:\n  org_baseline_path: {}\nnetwork:\n  allowed_domains: [\"forge.test:9\", \"127.0.0.1:9\"]\n  resolve: {{forge.test: 127.0.0.1}}\n",
        org.display()
    ));
    const MIRROR: &str = "mirror-secret-0123456789abcdef";
    ok(&c.out_with_input(&["auth", "add", "mirror-token"], MIRROR.as_bytes()));
    ok(&c.out_with_input(
        &["auth", "add", "git-token", "--host", "forge.test:9"],
        REAL.as_bytes(),
    ));
    // A custom credential needs a host, so one cannot be stored unbound;
    // a built-in one can, and then no sandbox gets it.
    ok(&c.out_with_input(&["auth", "add", "llm-api-key"], b"sk-unbound-1234567890"));
    let ws = c.ws.display().to_string();
    let started = c.out(&["start", "-w", &ws, "--name", "exp"]);
    ok(&started);
    assert!(
        stderr(&started).contains("`llm-api-key` is bound to no host"),
        "{}",
        stderr(&started)
    );
    let sh = |script: &str| c.out(&["exec", "--name", "exp", "--", "sh", "-c", script]);
    // The exposed value is there, and the search the injection test relies
    // on finds it (so its silence there means something).
    let (a, b) = MIRROR.split_at(8);
    let found = stdout(&sh(&format!(
        "A='{a}'; B='{b}'; printf '%s%s\\n' \"$A\" \"$B\" | grep -lFf - /proc/[0-9]*/environ 2>/dev/null | head -1; case \"$(env)\" in *\"$A$B\"*) echo in-env;; esac; printf %s \"${{ANTHROPIC_API_KEY:-unset}}\""
    )));
    assert!(
        found.contains("/environ") && found.contains("in-env"),
        "{found}"
    );
    assert!(found.ends_with("unset"), "{found}");
    // Past the git token's TTL the proxy refuses its placeholder.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = stdout(&sh(
        "curl -sS -w '%{http_code}' -H \"Authorization: Bearer $AIBOX_GIT_TOKEN\" https://forge.test:9/",
    ));
    assert!(out.ends_with("403") && out.contains("expired"), "{out}");
    ok(&c.out(&["stop", "--name", "exp"]));
    let events = audit_events(&c, "exp");
    let issued: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event_type"] == "credential.issue")
        .collect();
    assert_eq!(issued.len(), 2, "{issued:?}");
    let mirror = issued
        .iter()
        .find(|e| e["details"]["credential"] == "mirror-token")
        .unwrap();
    assert_eq!(mirror["details"]["mode"], "exposed");
    assert_eq!(mirror["severity"], "warning");
    let git = issued
        .iter()
        .find(|e| e["details"]["credential"] == "git-token")
        .unwrap();
    assert!(git["details"]["expires"].is_string(), "{git}");
    assert!(events.iter().any(|e| {
        e["event_type"] == "credential.use"
            && e["details"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("expired"))
    }));
    // A workspace holding the store's key is refused.
    c.add_config(&format!(
        "credentials:\n  key_path: {}/credentials.key\n",
        c.ws.display()
    ));
    let refused = c.out(&["start", "-w", &ws, "--name", "exp2"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("overlaps the aibox credential key file"),
        "{}",
        stderr(&refused)
    );
});

/// A real git server: git's own smart-HTTP backend (`git http-backend`)
/// behind nginx over TLS with HTTP basic authentication (user
/// `x-access-token`, password the real token), through fcgiwrap. Stops
/// when dropped.
pub struct GitServer {
    pub dir: std::path::PathBuf,
    pub port: u16,
    pub ca: std::path::PathBuf,
    children: Vec<std::process::Child>,
}

impl Drop for GitServer {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl GitServer {
    /// Serves `<dir>/repos/*.git` for `name` with `token`.
    pub fn start(dir: &std::path::Path, name: &str, token: &str) -> GitServer {
        let run = |cmd: &mut std::process::Command| {
            let o = cmd.output().unwrap();
            assert!(
                o.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        std::fs::create_dir_all(dir.join("repos")).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let (ca, cert, key) = tls_files(&[name]);
        for (f, body) in [("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)] {
            std::fs::write(dir.join(f), body).unwrap();
        }
        std::fs::write(
            dir.join("htpasswd"),
            format!("x-access-token:{{PLAIN}}{token}\n"),
        )
        .unwrap();
        // A repository with one commit.
        let bare = dir.join("repos/proj.git");
        run(std::process::Command::new("git")
            .args(["init", "-q", "--bare", "-b", "main"])
            .arg(&bare));
        let work = dir.join("seed");
        run(std::process::Command::new("git")
            .args(["init", "-q", "-b", "main"])
            .arg(&work));
        std::fs::write(work.join("README"), "first\n").unwrap();
        let git = |args: &[&str]| {
            let mut c = std::process::Command::new("git");
            c.arg("-C")
                .arg(&work)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args);
            c
        };
        run(&mut git(&["add", "README"]));
        run(&mut git(&["commit", "-q", "-m", "first"]));
        run(&mut git(&["push", "-q", bare.to_str().unwrap(), "main"]));
        let sock = dir.join("fcgi.sock");
        let fcgi = std::process::Command::new("/usr/sbin/fcgiwrap")
            .arg("-s")
            .arg(format!("unix:{}", sock.display()))
            .spawn()
            .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let d = dir.display();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{}}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    location / {{
      auth_basic git;
      auth_basic_user_file {d}/htpasswd;
      client_max_body_size 0;
      include /etc/nginx/fastcgi_params;
      fastcgi_pass unix:{d}/fcgi.sock;
      fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;
      fastcgi_param GIT_PROJECT_ROOT {d}/repos;
      fastcgi_param GIT_HTTP_EXPORT_ALL \"\";
      fastcgi_param PATH_INFO $uri;
      fastcgi_param REMOTE_USER $remote_user;
    }}
  }}
}}
"
            ),
        )
        .unwrap();
        let nginx = std::process::Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() || !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the git server did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        GitServer {
            dir: dir.to_path_buf(),
            port,
            ca: dir.join("ca.pem"),
            children: vec![fcgi, nginx],
        }
    }

    /// Adds a commit to `proj.git` (as another developer would push).
    pub fn commit(&self, file: &str, text: &str) {
        let work = self.dir.join("seed");
        std::fs::write(work.join(file), text).unwrap();
        for args in [
            vec!["add", file],
            vec!["commit", "-q", "-m", file],
            vec!["push", "-q", "../repos/proj.git", "main"],
        ] {
            let o = std::process::Command::new("git")
                .arg("-C")
                .arg(&work)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(&args)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }

    /// nginx's access log.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

all_backends!(git_clones_and_fetches_with_the_injected_token, |c: Ctx| {
    let srv = GitServer::start(&c.dir.path().join("git-server"), "git.test", REAL);
    let p = srv.port;
    c.add_config(&format!(
        "network:
  allowed_domains: [\"git.test:{p}\", \"127.0.0.1:{p}\"]
  resolve: {{git.test: 127.0.0.1}}
credentials:
  upstream_ca: {}
",
        srv.ca.display()
    ));
    let bound = format!("git.test:{p}");
    ok(&c.out_with_input(
        &["auth", "add", "git-token", "--host", &bound],
        REAL.as_bytes(),
    ));
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "git"]));
    let sh = |script: &str| c.out(&["exec", "--name", "git", "--", "sh", "-c", script]);
    // Clone (git asks the aibox credential helper after the server's 401,
    // gets the placeholder, and the proxy sends the real token).
    let out = ok(&sh(&format!(
        "cd /tmp && git clone -q https://git.test:{p}/proj.git && cat proj/README"
    )));
    assert_eq!(out.trim(), "first");
    srv.commit("NEWS", "second\n");
    let out = ok(&sh(
        "cd /tmp/proj && git pull -q --ff-only && cat NEWS && git log --format=%s | head -1",
    ));
    assert_eq!(out.trim(), "second\nNEWS");
    // Without the placeholder, the server says no: the token does not
    // come from anywhere else.
    let denied = sh(&format!(
        "cd /tmp && GIT_CONFIG_COUNT=1 GIT_TERMINAL_PROMPT=0 git clone -q https://git.test:{p}/proj.git other 2>&1"
    ));
    assert!(!denied.status.success());
    let log = srv.access_log();
    assert!(
        log.contains("x-access-token") && log.contains(" 200 "),
        "{log}"
    );
    assert!(log.contains(" 401 "), "{log}");
    // The clone holds no token (the remote URL has none, no credential
    // was stored).
    let (a, b) = REAL.split_at(10);
    let found = stdout(&sh(&format!(
        "A='{a}'; B='{b}'; printf '%s%s\\n' \"$A\" \"$B\" | grep -rlFf - /tmp/proj /root /home 2>/dev/null; true"
    )));
    assert_eq!(found.trim(), "");
    ok(&c.out(&["stop", "--name", "git"]));
    let events = audit_events(&c, "git");
    assert!(events.iter().any(|e| e["event_type"] == "credential.use"
        && e["details"]["decision"] == "allow"
        && e["details"]["host"] == "git.test"));
});

both_modes!(a_replaced_credential_reaches_running_sandboxes, |c: Ctx| {
    let srv = GitServer::start(&c.dir.path().join("git-server"), "git.test", REAL);
    let p = srv.port;
    c.add_config(&format!(
        "network:\n  allowed_domains: [\"git.test:{p}\", \"127.0.0.1:{p}\"]\n  resolve: {{git.test: 127.0.0.1}}\ncredentials:\n  upstream_ca: {}\n",
        srv.ca.display()
    ));
    let bound = format!("git.test:{p}");
    ok(&c.out_with_input(
        &["auth", "add", "git-token", "--host", &bound],
        REAL.as_bytes(),
    ));
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "rot"]));
    let sh = |script: &str| c.out(&["exec", "--name", "rot", "--", "sh", "-c", script]);
    ok(&sh(&format!(
        "cd /tmp && git clone -q https://git.test:{p}/proj.git"
    )));
    let before = ok(&sh("echo $AIBOX_GIT_TOKEN"));
    // The server now wants a new token, which the host stores.
    const NEW: &str = "ghp_NEWtoken9876543210zyxwvuABC";
    std::fs::write(
        srv.dir.join("htpasswd"),
        format!("x-access-token:{{PLAIN}}{NEW}\n"),
    )
    .unwrap();
    srv.commit("NEWS", "rotated\n");
    assert!(
        !sh("cd /tmp/proj && GIT_TERMINAL_PROMPT=0 git pull -q --ff-only")
            .status
            .success()
    );
    let out = ok(&c.out_with_input(
        &["auth", "add", "git-token", "--host", &bound, "--replace"],
        NEW.as_bytes(),
    ));
    assert!(out.contains("sandbox rot uses the new value"), "{out}");
    // Same placeholder inside; the proxy now sends the new value.
    assert_eq!(ok(&sh("echo $AIBOX_GIT_TOKEN")), before);
    let pulled = ok(&sh("cd /tmp/proj && git pull -q --ff-only && cat NEWS"));
    assert_eq!(pulled.trim(), "rotated");
    ok(&c.out(&["stop", "--name", "rot"]));
    let events = audit_events(&c, "rot");
    assert!(events.iter().any(
        |e| e["event_type"] == "credential.rotate" && e["details"]["credential"] == "git-token"
    ));
    let log = audit_text(&c, "rot");
    assert!(!log.contains(NEW) && !log.contains(REAL));
});
