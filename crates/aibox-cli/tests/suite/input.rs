//! Bad input: one clear message, a non-zero exit, nothing half-created.

use super::common::*;

fn refused(c: &Ctx, args: &[&str], needles: &[&str]) {
    let o = c.out(args);
    assert!(!o.status.success(), "{args:?} succeeded");
    let e = stderr(&o);
    for n in needles {
        assert!(e.contains(n), "{args:?}: missing {n:?} in:\n{e}");
    }
    assert!(e.contains("aibox: error:"), "{e}");
    assert!(
        c.runtime_entries().is_empty(),
        "left behind: {:?}",
        c.runtime_entries()
    );
    assert!(!c.data.join("homes").exists(), "created a home");
}

#[test]
fn bad_config_and_workspaces() {
    let Some(c) = Ctx::new(Mode::Rootless) else {
        return;
    };
    let ws = c.ws.display().to_string();
    std::fs::write(&c.config, "resources:\n  cpus: 2\n  memroy: 4g\n").unwrap();
    refused(
        &c,
        &["start", "-w", &ws],
        &[
            &c.config.display().to_string(),
            "line 3",
            "`resources.memroy`",
            "memory",
        ],
    );
    std::fs::write(&c.config, "runtime: lxc\n").unwrap();
    refused(
        &c,
        &["start", "-w", &ws],
        &["`runtime`", "lxc", "native", "podman", "docker"],
    );
    std::fs::write(&c.config, "resources: [\n").unwrap();
    refused(
        &c,
        &["start", "-w", &ws],
        &["malformed YAML", &c.config.display().to_string()],
    );
    std::fs::write(&c.config, "resources:\n  cpus: lots\n").unwrap();
    refused(&c, &["config", "validate"], &["`resources.cpus`", "lots"]);
    std::fs::write(&c.config, "").unwrap();

    let file = c.ws.join("a-file");
    std::fs::write(&file, "x").unwrap();
    refused(
        &c,
        &["start", "-w", "/no/such/dir"],
        &["does not exist", "fix:"],
    );
    refused(
        &c,
        &["start", "-w", &file.display().to_string()],
        &["is not a directory"],
    );
    refused(&c, &["start", "-w", "/"], &["refusing / as the workspace"]);
    refused(&c, &["start", "-w", "/etc"], &["system directory"]);
    refused(&c, &["start", "-w", "/tmp"], &["shared by other users"]);
    refused(&c, &["start", "-w", "/home"], &["home directory"]);
    refused(
        &c,
        &["start", "-w", "/var/lib"],
        &["refusing /var/lib as the workspace"],
    );
    refused(
        &c,
        &["start", "-w", &ws, "--name", "../evil"],
        &["invalid sandbox name"],
    );
    refused(
        &c,
        &["start", "-w", &ws, "--runtime", "docker"],
        &["the docker backend needs root", "fix:"],
    );
    // Workspaces containing aibox's own data are refused: the sandbox could rewrite its audit log.
    let mut inside = Ctx::new(Mode::Rootless).unwrap();
    inside.env(
        "AIBOX_PATHS_DATA_DIR",
        &inside.ws.join(".aibox-data").display().to_string(),
    );
    let iws = inside.ws.display().to_string();
    let o = inside.out(&["start", "-w", &iws]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("overlaps the aibox data_dir"),
        "{}",
        stderr(&o)
    );
    // Nor may the workspace contain the config of the next start.
    let mut cfg_inside = Ctx::new(Mode::Rootless).unwrap();
    let moved = cfg_inside.ws.join("aibox.yaml");
    std::fs::write(&moved, "").unwrap();
    cfg_inside.env("AIBOX_CONFIG", &moved.display().to_string());
    let cws = cfg_inside.ws.display().to_string();
    let o = cfg_inside.out(&["start", "-w", &cws]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("overlaps the aibox config file"),
        "{}",
        stderr(&o)
    );
    std::fs::write(&c.config, "").unwrap();
    // Environment overrides are checked too.
    let mut e = Ctx::new(Mode::Rootless).unwrap();
    e.env("AIBOX_RESOURCES_PIDZ", "5");
    let o = e.out(&["config", "validate"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("AIBOX_RESOURCES_PIDZ"));
}

#[test]
fn home_directory_is_refused() {
    let Some(c) = Ctx::new(Mode::Rootless) else {
        return;
    };
    let home = match c.as_user {
        Some(_) => format!("/home/{TEST_USER}"),
        None => std::env::var("HOME").unwrap(),
    };
    refused(&c, &["start", "-w", &home], &["home directory"]);
}

#[test]
fn unknown_names() {
    let Some(c) = Ctx::new(Mode::Rootless) else {
        return;
    };
    for args in [
        &["exec", "--name", "ghost", "--", "true"][..],
        &["stop", "--name", "ghost"][..],
        &["status", "--name", "ghost"][..],
        &["shell", "--name", "ghost"][..],
    ] {
        let o = c.out(args);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.starts_with("aibox: error: "), "{e}");
        assert!(
            e.contains("no sandbox named `ghost` is running") || e.contains("needs a terminal"),
            "{e}"
        );
        assert!(c.runtime_entries().is_empty(), "{:?}", c.runtime_entries());
        assert!(!c.data.join("homes").exists());
    }
    let o = c.out(&["exec", "--", "true"]);
    assert!(stderr(&o).contains("aibox start -w PATH"), "{}", stderr(&o));
}

#[test]
fn config_commands() {
    let Some(c) = Ctx::new(Mode::Rootless) else {
        return;
    };
    std::fs::remove_file(&c.config).unwrap();
    let o = c.out(&["config", "validate"]);
    assert!(
        stderr(&o).contains("does not exist"),
        "explicit config must exist: {}",
        stderr(&o)
    );
    ok(&c.out(&["config", "init", "--template", "dev"]));
    assert!(
        !c.out(&["config", "init"]).status.success(),
        "init overwrote without --force"
    );
    ok(&c.out(&["config", "init", "--template", "minimal", "--force"]));
    ok(&c.out(&["config", "set", "resources.cpus", "2"]));
    assert_eq!(ok(&c.out(&["config", "get", "resources.cpus"])).trim(), "2");
    assert!(!c.out(&["config", "set", "runtime", "lxc"]).status.success());
    assert_eq!(ok(&c.out(&["config", "get", "runtime"])).trim(), "native");
    let show = ok(&c.out(&["config", "show"]));
    assert!(show.lines().any(|l| l.starts_with("resources.cpus") && l.contains(&c.config.display().to_string())), "{show}");
    assert!(
        show.lines()
            .any(|l| l.starts_with("paths.data_dir") && l.contains("AIBOX_PATHS_DATA_DIR")),
        "{show}"
    );
    assert!(
        show.lines()
            .any(|l| l.starts_with("gvisor.enabled") && l.contains("(default)")),
        "{show}"
    );
    ok(&c.out(&["config", "validate"]));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&c.out(&["config", "show", "--format", "json"]))).unwrap();
    assert_eq!(json["resources.cpus"]["value"], 2);
    assert_eq!(
        json["resources.cpus"]["source"],
        c.config.display().to_string()
    );
    assert_eq!(json["gvisor.enabled"]["source"], "default");
}

#[test]
fn doctor_reports_every_check() {
    let Some(c) = Ctx::new(Mode::Rootless) else {
        return;
    };
    let o = c.out(&["doctor", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let checks: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["check"].as_str().unwrap())
        .collect();
    for must in [
        "config",
        "user_namespaces",
        "seccomp",
        "landlock",
        "cgroups",
        "disk_space",
        "sandbox",
        "podman",
        "gvisor",
        "apparmor",
    ] {
        assert!(checks.contains(&must), "{must} missing: {checks:?}");
    }
    let failed: Vec<&serde_json::Value> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["status"] == "fail")
        .collect();
    assert!(failed.is_empty() && o.status.success(), "{failed:?}");
    // Every problem comes with a fix.
    for x in v
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["status"] == "warn")
    {
        assert!(!x["fix"].as_str().unwrap().is_empty(), "{x}");
    }
    // Rootless on this host has at least the cgroup warning, so --strict fails.
    let warned = v.as_array().unwrap().iter().any(|x| x["status"] == "warn");
    let strict = c.out(&["doctor", "--strict"]);
    assert_eq!(strict.status.success(), !warned);
    // A broken config is a failure.
    std::fs::write(&c.config, "nope: 1\n").unwrap();
    let o = c.out(&["doctor"]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("[FAIL] config"), "{}", stdout(&o));
}

/// A container start whose image is missing fails with one message and
/// the fix, and leaves nothing behind (podman and docker).
fn missing_image_is_explained(mut c: Ctx) {
    c.env("AIBOX_IMAGE", "localhost/aibox/missing:1");
    let ws = c.ws.display().to_string();
    let o = c.out(&["start", "-w", &ws, "--name", "noimage"]);
    assert!(!o.status.success());
    let all = stderr(&o);
    // (docker may first warn about a host account with the guest's uid.)
    let e = &all[all.find("aibox: error:").unwrap_or(0)..];
    assert!(
        e.starts_with("aibox: error: could not start sandbox `noimage`"),
        "{all}"
    );
    assert!(
        e.contains("fix: the image is not present: build it with `aibox image build`"),
        "{e}"
    );
    assert!(e.lines().count() <= 3, "engine output dumped: {e}");
    assert!(c.runtime_entries().is_empty(), "{:?}", c.runtime_entries());
    assert!(!c.data.join("homes/noimage").exists(), "home left behind");
}

mod missing_image_is_explained {
    use super::*;
    backend_test!(
        podman_root,
        Backend::Podman,
        Mode::Root,
        missing_image_is_explained
    );
    backend_test!(
        docker_root,
        Backend::Docker,
        Mode::Root,
        missing_image_is_explained
    );
}
