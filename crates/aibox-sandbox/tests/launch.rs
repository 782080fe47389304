//! Direct launches of the native sandbox (the CLI suite covers the rest).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

fn spec(dir: &Path) -> aibox_sandbox::SandboxSpec {
    let (ws, home, root) = (dir.join("ws"), dir.join("home"), dir.join("root"));
    for d in [&ws, &home, &root] {
        std::fs::create_dir(d).unwrap();
    }
    aibox_sandbox::SandboxSpec {
        name: format!("launch-test-{}", std::process::id()),
        workspace: ws,
        workspace_id: None,
        home,
        root_dir: root,
        rootfs: None,
        tmp_size: "16m".into(),
        pids: 64,
        nofile: 256,
        landlock_required: false,
        cgroup: None,
        net: None,
        aibox_binary: None,
        extra_ca_pem: None,
        read_only_in_workspace: Vec::new(),
        masked: Vec::new(),
        exec_gate: false,
        exec_blocked: Vec::new(),
        etc_extra: Vec::new(),
        gate_socket: None,
    }
}

#[test]
fn a_workspace_swapped_after_validation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path());
    // What was validated is not what gets mounted (as after a symlink swap).
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&other).unwrap();
    s.workspace_id = Some((m.dev(), m.ino()));
    let err = aibox_sandbox::launch(&s).expect_err("started with a swapped workspace");
    assert!(
        err.to_string()
            .contains("changed between validation and mounting"),
        "{err}"
    );

    // With the right identity it starts.
    let mut good = spec(&dir.path().join("good").tap_mkdir());
    let m = std::fs::metadata(&good.workspace).unwrap();
    good.workspace_id = Some((m.dev(), m.ino()));
    let l = aibox_sandbox::launch(&good).unwrap();
    aibox_sandbox::ipc::send(&l.control, &aibox_sandbox::ToInit::Shutdown, &[]).unwrap();
    nix::sys::wait::waitpid(l.intermediate, None).unwrap();
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
