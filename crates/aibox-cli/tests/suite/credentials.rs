//! `aibox auth`: the host's encrypted credential store, driven through
//! the real CLI as root and as an ordinary user. Values go in on standard
//! input only, never appear in either file or in any output, and every
//! kind of damage is a clear error that changes nothing.

use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use super::common::*;

const TOKEN: &str = "ghp_S3cr3tT0k3nValue0123456789";

/// `aibox ARGS` with `input` on standard input.
fn with_input(c: &Ctx, args: &[&str], input: &str) -> Output {
    c.out_with_input(args, input.as_bytes())
}

fn store(c: &Ctx) -> std::path::PathBuf {
    c.data.join("credentials/store.enc")
}

fn key(c: &Ctx) -> std::path::PathBuf {
    c.dir.path().join("credentials.key")
}

fn fails_with(o: &Output, text: &str) {
    assert!(!o.status.success(), "succeeded: {}", stdout(o));
    assert!(stderr(o).contains(text), "{text} not in: {}", stderr(o));
}

both_modes!(values_go_in_on_stdin_and_never_come_out, |c: Ctx| {
    let o = with_input(
        &c,
        &["auth", "add", "git-token", "--host", "github.com"],
        &format!("{TOKEN}\n"),
    );
    ok(&o);
    ok(&with_input(
        &c,
        &[
            "auth",
            "add",
            "registry",
            "--host",
            "registry.example.org:8443",
            "--expires-in",
            "30d",
        ],
        "registry-value-42",
    ));
    let text = ok(&c.out(&["auth", "list"]));
    assert!(
        text.contains("git-token") && text.contains("github.com"),
        "{text}"
    );
    assert!(
        text.contains("registry") && text.contains("custom"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&c.out(&["auth", "list", "--format", "json"]))).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(v[1]["expires"].is_string());
    // Private files of the invoker, values nowhere in them.
    for f in [store(&c), key(&c)] {
        let m = std::fs::metadata(&f).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f:?}");
        assert_eq!(owner(&f), c.invoker_uid(), "{f:?}");
        let body = std::fs::read_to_string(&f).unwrap();
        assert!(!body.contains(TOKEN) && !body.contains("registry-value-42"));
    }
    // Not on the command line: a value there is refused outright.
    let o = c.out(&["auth", "add", "mirror-token", "value-on-argv"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // Names, hosts, durations and values are checked; nothing is stored
    // from a refused command.
    for (args, input, text) in [
        (&["auth", "add", "git-token"][..], "x", "--replace"),
        (&["auth", "add", "mine"][..], "x", "--host"),
        (
            &["auth", "add", "Bad Name"][..],
            "x",
            "not a credential name",
        ),
        (
            &["auth", "add", "mine", "--host", "not a host"][..],
            "x",
            "not a host",
        ),
        (
            &["auth", "add", "mirror-token", "--expires-in", "soon"][..],
            "x",
            "not a duration",
        ),
        (&["auth", "add", "mirror-token"][..], "", "empty"),
        (&["auth", "add", "mirror-token"][..], "a\nb\n", "one line"),
    ] {
        fails_with(&with_input(&c, args, input), text);
    }
    let text = ok(&c.out(&["auth", "list"]));
    assert!(
        !text.contains("mirror-token") && !text.contains("mine"),
        "{text}"
    );
    let all = format!("{text}{}", stderr(&c.out(&["auth", "list"])));
    assert!(!all.contains(TOKEN));
    // Replace and remove.
    ok(&with_input(
        &c,
        &[
            "auth",
            "add",
            "git-token",
            "--host",
            "github.com",
            "--replace",
        ],
        "ghp_other",
    ));
    ok(&c.out(&["auth", "remove", "registry"]));
    fails_with(
        &c.out(&["auth", "remove", "registry"]),
        "no credential named",
    );
});

both_modes!(damage_is_reported_and_changes_nothing, |c: Ctx| {
    ok(&with_input(
        &c,
        &["auth", "add", "git-token", "--host", "github.com"],
        TOKEN,
    ));
    let good = std::fs::read(store(&c)).unwrap();
    // A flipped byte in the ciphertext.
    let mut bad = good.clone();
    let at = String::from_utf8_lossy(&good)
        .find("\"ciphertext\": \"")
        .unwrap()
        + 20;
    bad[at] = if bad[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(store(&c), &bad).unwrap();
    fails_with(&c.out(&["auth", "list"]), "damaged or was changed");
    fails_with(
        &with_input(&c, &["auth", "add", "mirror-token"], "v"),
        "damaged or was changed",
    );
    assert_eq!(std::fs::read(store(&c)).unwrap(), bad);
    std::fs::write(store(&c), &good).unwrap();
    ok(&c.out(&["auth", "list"]));
    // A missing key file: refused, and no new key is made over the store.
    let k = std::fs::read(key(&c)).unwrap();
    std::fs::remove_file(key(&c)).unwrap();
    fails_with(&c.out(&["auth", "list"]), "is missing");
    fails_with(
        &with_input(&c, &["auth", "add", "mirror-token"], "v"),
        "is missing",
    );
    assert!(!key(&c).exists());
    assert_eq!(std::fs::read(store(&c)).unwrap(), good);
    std::fs::write(key(&c), &k).unwrap();
    std::fs::set_permissions(key(&c), std::fs::Permissions::from_mode(0o600)).unwrap();
    if let Some((uid, gid)) = c.as_user {
        nix::unistd::chown(&key(&c), Some(uid.into()), Some(gid.into())).unwrap();
    }
    ok(&c.out(&["auth", "list"]));
    // Files others can read are refused until fixed, each by name.
    for f in [store(&c), key(&c)] {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let o = c.out(&["auth", "list"]);
        fails_with(&o, "chmod 600");
        fails_with(&o, &f.display().to_string());
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    ok(&c.out(&["auth", "list"]));
    // So is a store directory others can write (they could put an older
    // store back), and a store that is a symbolic link.
    let dir = c.data.join("credentials");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    fails_with(&c.out(&["auth", "list"]), "can be written by others");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let moved = c.dir.path().join("store-elsewhere");
    std::fs::rename(store(&c), &moved).unwrap();
    std::os::unix::fs::symlink(&moved, store(&c)).unwrap();
    fails_with(&c.out(&["auth", "list"]), "symbolic link");
    std::fs::remove_file(store(&c)).unwrap();
    std::fs::rename(&moved, store(&c)).unwrap();
    ok(&c.out(&["auth", "list"]));
});

both_modes!(a_passphrase_wraps_the_key, |mut c: Ctx| {
    c.add_config("credentials:\n  passphrase: env\n");
    c.env("AIBOX_PASSPHRASE", "correct horse battery");
    ok(&with_input(
        &c,
        &["auth", "add", "llm-api-key"],
        "sk-ant-value",
    ));
    let key_text = std::fs::read_to_string(key(&c)).unwrap();
    assert!(key_text.contains("argon2id"), "{key_text}");
    ok(&c.out(&["auth", "list"]));
    c.clear_env();
    c.env("AIBOX_PASSPHRASE", "wrong horse");
    fails_with(&c.out(&["auth", "list"]), "wrong passphrase");
    // Before the value is read, even when replacing.
    fails_with(
        &with_input(&c, &["auth", "add", "llm-api-key", "--replace"], "new"),
        "wrong passphrase",
    );
    c.clear_env();
    fails_with(&c.out(&["auth", "list"]), "AIBOX_PASSPHRASE");
    // Asked on a terminal when configured so; there is none here.
    let text = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(
        &c.config,
        text.replace("passphrase: env", "passphrase: prompt"),
    )
    .unwrap();
    fails_with(&c.out(&["auth", "list"]), "no terminal");
});

both_modes!(the_key_is_kept_apart_and_passphrases_match, |c: Ctx| {
    // A key file in the data directory, with the store, is refused.
    let inside = c.data.join("keys/credentials.key");
    c.add_config(&format!(
        "credentials:\n  key_path: {}/../data/./keys/credentials.key\n",
        c.data.display()
    ));
    fails_with(
        &with_input(
            &c,
            &["auth", "add", "git-token", "--host", "github.com"],
            "v",
        ),
        "data directory",
    );
    assert!(!inside.exists());
    // An unprotected key with a passphrase configured is an error, not a
    // silent downgrade.
    let text = std::fs::read_to_string(&c.config).unwrap();
    let cut = text.find("credentials:").unwrap();
    std::fs::write(&c.config, &text[..cut]).unwrap();
    ok(&with_input(
        &c,
        &["auth", "add", "git-token", "--host", "github.com"],
        "v",
    ));
    let mut c = c;
    c.add_config("credentials:\n  passphrase: env\n");
    c.env("AIBOX_PASSPHRASE", "anything");
    fails_with(&c.out(&["auth", "list"]), "not passphrase-protected");
});

both_modes!(concurrent_adds_lose_nothing, |c: Ctx| {
    // Eight writers at once: without the lock, the last rename wins and
    // entries vanish.
    let children: Vec<_> = (0..8)
        .map(|i| {
            c.spawn_with_input(
                &["auth", "add", &format!("c{i}"), "--host", "h.example.org"],
                format!("value-{i}").as_bytes(),
            )
        })
        .collect();
    for child in children {
        ok(&child.wait_with_output().unwrap());
    }
    let v: serde_json::Value =
        serde_json::from_str(&ok(&c.out(&["auth", "list", "--format", "json"]))).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 8, "{v:#}");
});

/// A session bus with GNOME Keyring's Secret Service on it, unlocked,
/// its files under `dir` (killed when dropped).
struct Keyring {
    children: Vec<std::process::Child>,
    address: String,
}

impl Drop for Keyring {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Keyring {
    fn start(dir: &std::path::Path) -> Keyring {
        std::fs::create_dir_all(dir).unwrap();
        let bus = dir.join("bus");
        let address = format!("unix:path={}", bus.display());
        let dbus = std::process::Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={address}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dbus-daemon (scripts/test.sh installs it)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !bus.exists() {
            assert!(std::time::Instant::now() < deadline, "no session bus");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut keyring = std::process::Command::new("gnome-keyring-daemon")
            .args(["--foreground", "--unlock", "--components=secrets"])
            .env("DBUS_SESSION_BUS_ADDRESS", &address)
            .env("HOME", dir)
            .env("XDG_RUNTIME_DIR", dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("gnome-keyring-daemon (scripts/test.sh installs it)");
        {
            use std::io::Write;
            let mut stdin = keyring.stdin.take().unwrap();
            stdin.write_all(b"test-keyring-password").unwrap();
        }
        Keyring {
            children: vec![dbus, keyring],
            address,
        }
    }
}

backend_test!(
    the_os_keyring_is_used_when_one_answers,
    Backend::Native,
    Mode::Root,
    |mut c: Ctx| {
        let kr = Keyring::start(&c.dir.path().join("keyring"));
        c.env("DBUS_SESSION_BUS_ADDRESS", &kr.address.clone());
        // The Secret Service takes a moment to claim its name.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let l = c.out(&["auth", "list"]);
            if stdout(&l).contains("OS keyring") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no keyring: {}",
                stdout(&l)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        // It answers before its login collection is unlocked (the daemon
        // does that from the password on its stdin, a moment later).
        let out = loop {
            let o = with_input(
                &c,
                &["auth", "add", "git-token", "--host", "git.example.com"],
                TOKEN,
            );
            if o.status.success() || !stderr(&o).contains("is locked") {
                break ok(&o);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the keyring stayed locked: {}",
                stderr(&o)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        assert!(out.contains("the OS keyring"), "{out}");
        assert!(!store(&c).exists(), "nothing written to the encrypted file");
        let list = ok(&c.out(&["auth", "list"]));
        assert!(
            list.contains("git-token")
                && list.contains("keyring")
                && list.contains("git.example.com"),
            "{list}"
        );
        assert!(!list.contains(TOKEN));
        // The value is in the keyring's own (encrypted) files, not in ours.
        for entry in walk(&c.data) {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(TOKEN),
                "{}",
                entry.display()
            );
        }
        // A sandbox gets a placeholder for it, like for a stored one.
        let ws = c.ws.display().to_string();
        ok(&c.out(&["start", "-w", &ws, "--name", "kr"]));
        let env = ok(&c.out(&[
            "exec",
            "--name",
            "kr",
            "--",
            "sh",
            "-c",
            "echo $AIBOX_GIT_TOKEN",
        ]));
        assert!(env.starts_with("aibox-cred-git-token-"), "{env}");
        ok(&c.out(&["stop", "--name", "kr"]));
        let dup = with_input(
            &c,
            &["auth", "add", "git-token", "--host", "git.example.com"],
            TOKEN,
        );
        assert!(!dup.status.success());
        ok(&with_input(
            &c,
            &[
                "auth",
                "add",
                "git-token",
                "--host",
                "other.example.com",
                "--replace",
            ],
            "ghp_other0123456789",
        ));
        let list = ok(&c.out(&["auth", "list"]));
        assert!(
            list.contains("other.example.com") && !list.contains("git.example.com"),
            "{list}"
        );
        ok(&c.out(&["auth", "remove", "git-token"]));
        assert!(ok(&c.out(&["auth", "list"])).contains("no credentials stored"));
        // `file` ignores the keyring; `keyring` without one is an error.
        c.add_config("credentials:\n  store: file\n");
        let f = ok(&c.out(&["auth", "list"]));
        assert!(f.contains("store.enc"), "{f}");
        drop(kr);
        let cfg = std::fs::read_to_string(&c.config)
            .unwrap()
            .replace("store: file", "store: keyring");
        std::fs::write(&c.config, cfg).unwrap();
        let none = c.out(&["auth", "list"]);
        assert!(!none.status.success());
        assert!(
            stderr(&none).contains("credentials.store is keyring"),
            "{}",
            stderr(&none)
        );
    }
);

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

both_modes!(a_prompted_passphrase_is_asked_once_per_command, |c: Ctx| {
    use std::io::Write;
    const ASK: &str = "passphrase for the aibox credential store";
    let port = free_port();
    c.add_config(&format!(
        "credentials:\n  passphrase: prompt\naudit:\n  storage: s3\n  s3: {{endpoint: \"http://127.0.0.1:{port}\", bucket: audit, retention: 2d, credential: audit-bucket}}\n"
    ));
    // Creating the store: the passphrase, once more to confirm, the value.
    let host = format!("127.0.0.1:{port}");
    let mut p = Pty::spawn(
        c.aibox(&["auth", "add", "audit-bucket", "--host", &host]),
        24,
        80,
    );
    for (prompt, answer) in [
        (ASK, "pass phrase\n"),
        ("the same passphrase again", "pass phrase\n"),
        ("value for `audit-bucket`", "AKID:secret\n"),
    ] {
        let seen = p.read_until(prompt);
        assert!(seen.contains(prompt), "{seen}");
        p.master.write_all(answer.as_bytes()).unwrap();
    }
    assert!(p.child.wait().unwrap().success(), "{}", p.read_until("\0"));
    // A start reads the store twice (the bucket's keys, then what the
    // sandbox is handed) and asks once. (The bucket is not there: the
    // start goes on with a warning.)
    let ws = c.ws.display().to_string();
    let mut p = Pty::spawn(
        c.aibox(&["run", "-w", &ws, "--name", "once", "--", "true"]),
        24,
        80,
    );
    let mut seen = p.read_until(ASK);
    p.master.write_all(b"pass phrase\n").unwrap();
    // To the end (the terminal closes with the command), or to a second
    // question, which nobody will answer.
    let rest = p.read_until(ASK);
    if rest.contains(ASK) {
        let _ = p.child.kill();
    }
    seen.push_str(&rest);
    let status = p.child.wait().unwrap();
    assert!(status.success(), "{seen}");
    assert_eq!(seen.matches(ASK).count(), 1, "{seen}");
    assert!(seen.contains("starting anyway"), "{seen}");
});
