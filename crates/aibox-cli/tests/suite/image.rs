//! `aibox image`: a real base image built from Debian packages and run
//! under podman (root only: it imports into root's podman storage).

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
