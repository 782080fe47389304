//! Manual smoke test: `cargo run -p aibox-sandbox --example smoke -- CMD...`
use std::os::fd::AsRawFd;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base = std::env::temp_dir().join(format!("aibox-smoke-{}", std::process::id()));
    let ws = base.join("ws");
    let home = base.join("home");
    let root = base.join("root");
    for d in [&ws, &home, &root] {
        std::fs::create_dir_all(d).unwrap();
    }
    let spec = aibox_sandbox::SandboxSpec {
        name: "smoke".into(),
        workspace: ws,
        home,
        root_dir: root,
        rootfs: None,
        tmp_size: "64m".into(),
        pids: 256,
        nofile: 1024,
        landlock_required: false,
    };
    let l = match aibox_sandbox::launch(&spec) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("launch failed: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("ready: init pid {} {:?}", l.init_pid, l.report.landlock);
    let req = aibox_sandbox::SpawnRequest {
        id: 1,
        argv: args,
        env: vec!["PATH=/usr/bin:/bin".into(), "HOME=/home/dev".into()],
        cwd: "/workspace".into(),
        tty: None,
    };
    let fds = [0, 1, 2];
    aibox_sandbox::ipc::send(&l.control, &aibox_sandbox::ToInit::Spawn(req), &fds).unwrap();
    loop {
        let (m, _) = aibox_sandbox::ipc::recv::<aibox_sandbox::FromInit>(&l.control).unwrap().unwrap();
        eprintln!("{m:?}");
        if let aibox_sandbox::FromInit::Exited { code, .. } | aibox_sandbox::FromInit::SpawnFailed { code, .. } = m {
            aibox_sandbox::ipc::send(&l.control, &aibox_sandbox::ToInit::Shutdown, &[]).unwrap();
            let _ = nix::sys::wait::waitpid(l.intermediate, None);
            let _ = l.control.as_raw_fd();
            std::process::exit(code);
        }
    }
}
