//! `aibox image`: a real base image built from Debian packages and run
//! under podman (root only: it imports into root's podman storage).

use std::process::{Command, Stdio};

use super::common::*;

#[test]
fn base_image_is_built_listed_and_runs_as_dev() {
    let Some(c) = Ctx::new(Mode::Root) else {
        return;
    };
    let name = format!("localhost/aibox-it/base:{}", token());
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::process::Command::new("podman")
                .args(["rmi", "-f", &self.0])
                .output();
        }
    }
    let _cleanup = Remove(name.clone());
    let o = c.out(&["image", "build", "--name", &name, "--engine", "podman"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), name);
    // Progress is shown while it runs.
    assert!(
        stderr(&o).contains("importing into podman"),
        "{}",
        stderr(&o)
    );

    let list: serde_json::Value = serde_json::from_str(&ok(
        &c.out(&["image", "list", "--engine", "podman", "--format", "json"])
    ))
    .unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| {
            i["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == &serde_json::json!(name))
        })
        .unwrap_or_else(|| panic!("{name} not listed: {list}"));
    assert_eq!(entry["aibox"], "base");

    let run = std::process::Command::new("podman")
        .args([
            "run",
            "--rm",
            "--read-only",
            "--network=none",
            &name,
            "sh",
            "-c",
            "id; pwd; git --version; test -d /opt/toolpacks && echo toolpacks",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.starts_with("uid=1000(dev) gid=1000(dev)"), "{out}");
    assert!(
        out.contains("/workspace\n") && out.contains("git version") && out.contains("toolpacks"),
        "{out}"
    );

    // `aibox update` rebuilds a local image and reports old and new ids.
    let before = entry["id"].as_str().unwrap()[..12].to_string();
    let mut cfg = std::fs::read_to_string(&c.config).unwrap();
    cfg.push_str(&format!("image: {name}\n"));
    std::fs::write(&c.config, cfg).unwrap();
    let o = c.out(&["update", "--engine", "podman"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with(&format!("old: {before}\nnew: ")), "{text}");
    assert!(
        !text.contains(&format!("new: {before}")),
        "the image was not rebuilt: {text}"
    );
}

#[test]
fn update_refuses_unverifiable_registry_images() {
    let Some(c) = Ctx::new(Mode::Rootless) else {
        return;
    };
    if std::process::Command::new("cosign")
        .arg("version")
        .output()
        .is_ok()
    {
        return; // cosign present: verification can happen
    }
    let mut cfg = std::fs::read_to_string(&c.config).unwrap();
    cfg.push_str(
        "image: registry.example.invalid/aibox/base:1\nregistry:\n  verify_signatures: true\n",
    );
    std::fs::write(&c.config, cfg).unwrap();
    let o = c.out(&["update", "--engine", "podman"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("cosign is not installed") && e.contains("fix:"),
        "{e}"
    );
}

#[test]
fn engine_failures_are_one_message_with_a_fix() {
    let Some(c) = Ctx::new(Mode::Rootless) else {
        return;
    };
    // docker is either not installed or its daemon is not running here;
    // either way the user gets one line of cause and a fix.
    let o = c.out(&["image", "list", "--engine", "docker"]);
    if o.status.success() {
        return; // a running docker engine: nothing to explain
    }
    let e = stderr(&o);
    assert!(e.starts_with("aibox: error: docker "), "{e}");
    assert!(e.contains("\n  fix: "), "{e}");
    assert!(e.lines().count() <= 3, "engine output dumped: {e}");
}

/// `aibox repair cache` refuses while a sandbox runs, then replaces the
/// cache volumes with empty ones and keeps the home. Runs against a
/// private podman store (CONTAINERS_STORAGE_CONF), so the volumes and
/// containers of tests running in parallel are not touched.
#[test]
fn repair_cache_recreates_the_volumes() {
    let Some(mut c) = Ctx::on(Backend::Podman, Mode::Root) else {
        return;
    };
    let store = c.dir.path().join("store");
    let conf = c.dir.path().join("storage.conf");
    std::fs::write(
        &conf,
        format!(
            // vfs: no mounts are left behind in the test's temporary directory.
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
            store.display()
        ),
    )
    .unwrap();
    let conf_s = conf.display().to_string();
    let mut save = Command::new("podman")
        .args(["save", IMAGE])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let load = Command::new("podman")
        .env("CONTAINERS_STORAGE_CONF", &conf_s)
        .args(["load", "-q"])
        .stdin(save.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(load.status.success(), "{}", stderr(&load));
    assert!(save.wait().unwrap().success());
    c.env("CONTAINERS_STORAGE_CONF", &conf_s);
    let podman = |args: &[&str]| {
        Command::new("podman")
            .env("CONTAINERS_STORAGE_CONF", &conf_s)
            .args(args)
            .output()
            .unwrap()
    };

    let ws = c.ws.display().to_string();
    ok(&c.out(&["start", "-w", &ws, "--name", "cache"]));
    ok(&c.out(&[
        "exec",
        "--name",
        "cache",
        "--",
        "sh",
        "-c",
        "echo jar > /home/dev/.m2/repository/a.jar && echo keep > /home/dev/keep",
    ]));
    let o = c.out(&["repair", "cache"]);
    assert!(!o.status.success(), "repair ran under a live sandbox");
    let e = stderr(&o);
    assert!(
        e.contains("running and use the caches") && e.contains("fix:"),
        "{e}"
    );
    ok(&c.out(&["stop", "--name", "cache"]));

    let o = c.out(&["repair", "cache"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("removed 6 cache volume(s)"),
        "{}",
        stderr(&o)
    );
    let vols = stdout(&podman(&[
        "volume",
        "ls",
        "--filter",
        "label=aibox.cache=true",
        "--format",
        "{{.Name}}",
    ]));
    assert_eq!(vols.lines().count(), 6, "{vols}");
    let out = ok(&c.out(&[
        "run", "-w", &ws, "--name", "cache", "--", "sh", "-c",
        "ls -A /home/dev/.m2/repository; cat /home/dev/keep; touch /home/dev/.m2/repository/w && echo writable",
    ]));
    assert_eq!(out, "keep\nwritable\n");
}
