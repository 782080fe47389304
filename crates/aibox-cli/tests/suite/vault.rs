//! Vault mode against rusty_vault (a Rust implementation of Vault's REST
//! API, built by scripts/test.sh): token and AppRole login, KV v2 reads,
//! the sandbox's token revoked at stop and after a supervisor crash
//! (checked by asking the server). rusty_vault has no JWT auth method, so
//! the JWT login goes to a stand-in that checks the JWT itself and then
//! has rusty_vault issue the token (every other request is passed to
//! rusty_vault unchanged): the only double in this file.

use super::common::*;
use super::inject::GitServer;
use sha2::Digest;
use std::io::{Read, Write};

const SECRET: &str = "ghp_VAULTtoken0123456789abcdefXYZ";

/// A rusty_vault server on loopback, initialised and unsealed.
struct Vault {
    child: std::process::Child,
    addr: String,
    root: String,
    key: String,
    dir: std::path::PathBuf,
}

impl Drop for Vault {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vault {
    fn start(dir: &std::path::Path) -> Vault {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let port = free_port();
        let d = dir.display();
        std::fs::write(
            dir.join("vault.hcl"),
            format!(
                "storage \"file\" {{\n  path = \"{d}/data\"\n}}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:{port}\"\n  tls_disable = true\n}}\napi_addr = \"http://127.0.0.1:{port}\"\nlog_level = \"warn\"\npid_file = \"{d}/rvault.pid\"\n"
            ),
        )
        .unwrap();
        let mut v = Vault {
            child: Vault::spawn(dir, port),
            addr: format!("http://127.0.0.1:{port}"),
            root: String::new(),
            key: String::new(),
            dir: dir.to_path_buf(),
        };
        let (_, init) = v.call(
            "PUT",
            "sys/init",
            None,
            r#"{"secret_shares":1,"secret_threshold":1}"#,
        );
        v.root = init["root_token"].as_str().unwrap().to_string();
        v.key = init["keys"][0].as_str().unwrap().to_string();
        v.unseal();
        v
    }

    fn spawn(dir: &std::path::Path, port: u16) -> std::process::Child {
        let bin = std::env::var("AIBOX_TEST_RVAULT").unwrap_or_else(|_| "rvault".into());
        let child = std::process::Command::new(&bin)
            .args(["server", "--config"])
            .arg(dir.join("vault.hcl"))
            .stdout(std::fs::File::create(dir.join("log")).unwrap())
            .stderr(std::fs::File::create(dir.join("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e} (scripts/test.sh installs rusty_vault)"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "rusty_vault did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child
    }

    fn unseal(&self) {
        let body = format!(r#"{{"key":"{}"}}"#, self.key);
        let (s, _) = self.call("PUT", "sys/unseal", None, &body);
        assert_eq!(s, 200);
    }

    /// Stops the server (its data stays).
    fn down(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and data, unsealed.
    fn up(&mut self) {
        let port: u16 = self.addr.rsplit(':').next().unwrap().parse().unwrap();
        self.child = Vault::spawn(&self.dir.clone(), port);
        self.unseal();
    }

    /// `method /v1/path` with `token` (none: no header); status and JSON.
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "-w", "\n%{http_code}", "-X", method]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("X-Vault-Token: {t}")]);
        }
        if !body.is_empty() {
            cmd.args(["-d", body]);
        }
        let out = cmd
            .arg(format!("{}/v1/{path}", self.addr))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (json, code) = text.rsplit_once('\n').unwrap();
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
        )
    }

    fn root_call(&self, method: &str, path: &str, body: &str) -> serde_json::Value {
        let (s, v) = self.call(method, path, Some(&self.root.clone()), body);
        assert!(s < 300, "{method} {path}: {s} {v}");
        v
    }

    /// Whether `token` is still valid on the server.
    fn token_valid(&self, token: &str) -> bool {
        self.call("GET", "auth/token/lookup-self", Some(token), "")
            .0
            == 200
    }
}

/// A KV v2 secret at `kv/aibox/git` (rusty_vault 0.2.1 has no
/// `sys/policy`: the token policies below are names only).
fn seed(v: &Vault) {
    v.root_call(
        "POST",
        "sys/mounts/kv",
        r#"{"type":"kv","options":{"version":"2"}}"#,
    );
    v.root_call(
        "POST",
        "kv/data/aibox/git",
        &format!(r#"{{"data":{{"token":"{SECRET}"}}}}"#),
    );
}

/// Config for vault mode with `auth` (YAML lines under `vault:`), the git
/// server as the secret's host.
fn configure(c: &Ctx, addr: &str, auth: &str, srv: &GitServer) {
    let p = srv.port;
    c.add_config(&format!(
        "network:\n  allowed_domains: [\"git.test:{p}\", \"127.0.0.1:{p}\"]\n  resolve: {{git.test: 127.0.0.1}}\ncredentials:\n  mode: vault\n  vault_addr: {addr}\n  upstream_ca: {}\n  vault:\n{auth}    secrets:\n      - {{name: git-token, mount: kv, path: aibox/git, field: token, host: \"git.test:{p}\"}}\n",
        srv.ca.display()
    ));
}

/// The sandbox's Vault token, from the record kept while it runs.
fn sandbox_token(c: &Ctx, name: &str) -> String {
    let text = std::fs::read_to_string(c.runtime.join(format!("{name}.vault.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// Clones from the git server inside `name`: the token from Vault is put
/// in by the proxy; the sandbox holds only the placeholder.
fn clone_works(c: &Ctx, name: &str, p: u16, tokens: &[&str]) {
    let out = ok(&c.out(&[
        "exec",
        "--name",
        name,
        "--",
        "sh",
        "-c",
        &format!("cd /tmp && rm -rf proj && git clone -q https://git.test:{p}/proj.git && cat proj/README && env"),
    ]));
    assert!(out.starts_with("first"), "{out}");
    assert!(
        out.contains("AIBOX_GIT_TOKEN=aibox-cred-git-token-"),
        "{out}"
    );
    assert!(!out.contains(SECRET));
    for t in tokens {
        assert!(!out.contains(t), "a Vault token inside");
    }
}

both_modes!(
    token_login_reads_kv_and_revokes_at_stop_and_after_a_crash,
    |mut c: Ctx| {
        let mut v = Vault::start(&c.dir.path().join("vault"));
        seed(&v);
        let srv = GitServer::start(&c.dir.path().join("git-server"), "git.test", SECRET);
        configure(
            &c,
            &v.addr,
            "    auth: token\n    token_ttl: 10m\n    token_policies: [aibox]\n",
            &srv,
        );
        // No token: one clear message, nothing started.
        let none = c.out(&["start", "-w", &c.ws.display().to_string(), "--name", "vt"]);
        assert!(!none.status.success());
        assert!(
            stderr(&none).contains("VAULT_TOKEN is not set"),
            "{}",
            stderr(&none)
        );
        c.env("VAULT_TOKEN", &v.root.clone());
        let ws = c.ws.display().to_string();
        ok(&c.out(&["start", "-w", &ws, "--name", "vt"]));
        clone_works(&c, "vt", srv.port, &[&sandbox_token(&c, "vt"), &v.root]);
        let t = sandbox_token(&c, "vt");
        assert_ne!(t, v.root, "the sandbox has a token of its own");
        assert!(v.token_valid(&t));
        ok(&c.out(&["stop", "--name", "vt"]));
        assert!(!v.token_valid(&t), "revoked at stop");
        assert!(v.token_valid(&v.root), "the parent token is untouched");
        assert!(!c.runtime.join("vt.vault.json").exists());
        let events = audit_events(&c, "vt");
        assert!(events.iter().any(|e| e["event_type"] == "credential.revoke"
            && e["details"]["credential_type"] == "vault-token"
            && e["details"]["revoked"] == true));
        assert!(!audit_text(&c, "vt").contains(SECRET));

        // A crashed supervisor's token is revoked by the next command.
        ok(&c.out(&["start", "-w", &ws, "--name", "vt"]));
        let t2 = sandbox_token(&c, "vt");
        kill_supervisor(&c, "vt");
        assert!(v.token_valid(&t2), "still valid while nobody noticed");
        ok(&c.out(&["stop", "--name", "vt"]));
        assert!(!v.token_valid(&t2), "revoked by the CLI after the crash");
        assert!(!c.runtime.join("vt.vault.json").exists());

        // Vault down at stop: the stop completes, says nothing of the
        // token, and keeps the record; the next start revokes it.
        ok(&c.out(&["start", "-w", &ws, "--name", "vt"]));
        let t3 = sandbox_token(&c, "vt");
        v.down();
        let stop = c.out(&["stop", "--name", "vt"]);
        ok(&stop);
        assert!(!stderr(&stop).contains(&t3) && !stdout(&stop).contains(&t3));
        assert!(
            c.runtime.join("vt.vault.json").exists(),
            "kept for the next try"
        );
        let log = audit_text(&c, "vt");
        assert!(!log.contains(&t3) && !log.contains(&t2) && !log.contains(&t));
        assert!(log.contains("\"revoked\":false"));
        v.up();
        assert!(v.token_valid(&t3));
        ok(&c.out(&["start", "-w", &ws, "--name", "vt"]));
        assert!(!v.token_valid(&t3), "revoked at the next start");
        ok(&c.out(&["stop", "--name", "vt"]));
        let sup = std::fs::read_to_string(c.data.join("logs/vt.log")).unwrap_or_default();
        assert!(!sup.contains(&t3) && !sup.contains(&v.root));
    }
);

both_modes!(approle_login, |c: Ctx| {
    let v = Vault::start(&c.dir.path().join("vault"));
    seed(&v);
    v.root_call("POST", "sys/auth/approle", r#"{"type":"approle"}"#);
    v.root_call(
        "POST",
        "auth/approle/role/aibox",
        r#"{"token_ttl":"1h","token_policies":"aibox","secret_id_ttl":"1h"}"#,
    );
    let role_id = v.root_call("GET", "auth/approle/role/aibox/role-id", "")["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id =
        v.root_call("POST", "auth/approle/role/aibox/secret-id", "{}")["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_string();
    let sid = c.dir.path().join("secret-id");
    std::fs::write(&sid, &secret_id).unwrap();
    std::fs::set_permissions(&sid, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    if let Some((u, g)) = c.as_user {
        nix::unistd::chown(&sid, Some(u.into()), Some(g.into())).unwrap();
    }
    let srv = GitServer::start(&c.dir.path().join("git-server"), "git.test", SECRET);
    configure(
        &c,
        &v.addr,
        &format!(
            "    auth: approle\n    role_id: {role_id}\n    secret_id_file: {}\n",
            sid.display()
        ),
        &srv,
    );
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "ar"]));
    clone_works(&c, "ar", srv.port, &[&sandbox_token(&c, "ar")]);
    let t = sandbox_token(&c, "ar");
    assert!(v.token_valid(&t));
    ok(&c.out(&["stop", "--name", "ar"]));
    assert!(!v.token_valid(&t), "revoked at stop");
    // A secret id others can read is refused before Vault is asked.
    std::fs::set_permissions(&sid, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let loose = c.out(&["start", "-w", &ws, "--name", "ar"]);
    assert!(!loose.status.success());
    assert!(
        stderr(&loose).contains("readable by others"),
        "{}",
        stderr(&loose)
    );
});

/// HMAC-SHA256 (RFC 2104).
fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = sha2::Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    sha2::Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

const JWT_KEY: &[u8] = b"aibox-test-jwt-signing-key";

/// A JWT-SVID (HS256 here) for `sub`.
fn jwt(sub: &str, key: &[u8]) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let head = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64(format!(r#"{{"sub":"{sub}","aud":["vault"],"exp":{exp}}}"#).as_bytes());
    let sig = b64(&hmac(key, format!("{head}.{claims}").as_bytes()));
    format!("{head}.{claims}.{sig}")
}

/// The JWT stand-in: `POST /v1/auth/jwt/login` checks the JWT (HS256
/// signature, SPIFFE subject in aibox.test, audience `vault`, expiry,
/// role `aibox`) and answers with a token rusty_vault created; anything
/// else is passed to rusty_vault.
fn jwt_front(v: &Vault) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let upstream = v.addr.trim_start_matches("http://").to_string();
    let root = v.root.clone();
    let vault_addr = v.addr.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (upstream, root, vault_addr) = (upstream.clone(), root.clone(), vault_addr.clone());
            std::thread::spawn(move || serve_front(s, &upstream, &root, &vault_addr));
        }
    });
    addr
}

fn serve_front(mut s: std::net::TcpStream, upstream: &str, root: &str, vault_addr: &str) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut tmp).unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = &buf[head_end..];
    let reply = |s: &mut std::net::TcpStream, code: u16, text: &str| {
        let _ = write!(
            s,
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
    };
    if head.starts_with("POST /v1/auth/jwt/login ") {
        let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let token = req["jwt"].as_str().unwrap_or("");
        let parts: Vec<&str> = token.split('.').collect();
        let valid_sig = parts.len() == 3
            && b64(&hmac(
                JWT_KEY,
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
            )) == parts[2];
        let claims: serde_json::Value = parts
            .get(1)
            .and_then(|p| {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
            })
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let ok = valid_sig
            && req["role"] == "aibox"
            && claims["sub"]
                .as_str()
                .is_some_and(|s| s.starts_with("spiffe://aibox.test/"))
            && claims["aud"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "vault"))
            && claims["exp"].as_u64().is_some_and(|e| e > now);
        if !ok {
            return reply(&mut s, 400, r#"{"errors":["invalid JWT or role"]}"#);
        }
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-X",
                "POST",
                "-H",
                &format!("X-Vault-Token: {root}"),
                "-d",
            ])
            .arg(r#"{"ttl":"1h","policies":["aibox"],"display_name":"jwt"}"#)
            .arg(format!("{vault_addr}/v1/auth/token/create"))
            .output()
            .unwrap();
        return reply(&mut s, 200, &String::from_utf8_lossy(&out.stdout));
    }
    // Everything else: to rusty_vault as it came.
    let Ok(mut up) = std::net::TcpStream::connect(upstream) else {
        return reply(&mut s, 502, "{}");
    };
    // One request per connection, so that reading to the end ends.
    let mut head: String = head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    head.push_str("Connection: close\r\n\r\n");
    let _ = up.write_all(head.as_bytes());
    let _ = up.write_all(body);
    let mut answer = Vec::new();
    let _ = up.read_to_end(&mut answer);
    let _ = s.write_all(&answer);
}

both_modes!(jwt_login_with_a_spiffe_svid, |c: Ctx| {
    let v = Vault::start(&c.dir.path().join("vault"));
    seed(&v);
    let front = jwt_front(&v);
    let svid = c.dir.path().join("svid.jwt");
    let write_svid = |token: &str| {
        std::fs::write(&svid, token).unwrap();
        std::fs::set_permissions(&svid, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        if let Some((u, g)) = c.as_user {
            nix::unistd::chown(&svid, Some(u.into()), Some(g.into())).unwrap();
        }
    };
    write_svid(&jwt("spiffe://aibox.test/agent", JWT_KEY));
    let srv = GitServer::start(&c.dir.path().join("git-server"), "git.test", SECRET);
    configure(
        &c,
        &front,
        &format!(
            "    auth: jwt\n    role: aibox\n    jwt_file: {}\n",
            svid.display()
        ),
        &srv,
    );
    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "jw"]));
    clone_works(&c, "jw", srv.port, &[&sandbox_token(&c, "jw")]);
    let t = sandbox_token(&c, "jw");
    assert!(v.token_valid(&t));
    ok(&c.out(&["stop", "--name", "jw"]));
    assert!(!v.token_valid(&t), "revoked at stop");
    // A forged SVID: Vault's refusal, said once, and nothing started.
    write_svid(&jwt("spiffe://aibox.test/agent", b"not-the-key"));
    let forged = c.out(&["start", "-w", &ws, "--name", "jw"]);
    assert!(!forged.status.success());
    let e = stderr(&forged);
    assert!(
        e.contains("logging in to Vault") && e.contains("invalid JWT"),
        "{e}"
    );
    assert!(c.runtime_entries().is_empty(), "{:?}", c.runtime_entries());
});
