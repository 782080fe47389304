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
