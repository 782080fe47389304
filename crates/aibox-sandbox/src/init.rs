//! PID 1 of the sandbox: starts commands on the supervisor's request,
//! reports their exit, reaps every orphan, and takes everything down when
//! asked or when the supervisor goes away.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

use crate::{FromInit, SpawnRequest, ToInit, ipc, sys};

/// Serves requests until shutdown; returns the exit code of init.
pub(crate) fn run(sock: &OwnedFd) -> i32 {
    if sys::install_sigchld_handler().is_err() {
        return 1;
    }
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    if sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).is_err() {
        return 1;
    }
    let Ok(sfd) = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
    else {
        return 1;
    };
    let mut sessions: HashMap<i32, u64> = HashMap::new();

    loop {
        let mut fds = [
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return shutdown(1),
        }
        let sock_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let sig_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        if sig_ready {
            while let Ok(Some(_)) = sfd.read_signal() {}
            reap(sock, &mut sessions);
        }
        if sock_ready {
            match ipc::recv::<ToInit>(sock) {
                Ok(Some((ToInit::Spawn(req), fds))) => {
                    let id = req.id;
                    match spawn(&req, fds) {
                        Ok((pid, master)) => {
                            sessions.insert(pid.as_raw(), id);
                            let attach: Vec<i32> = master.iter().map(|m| m.as_raw_fd()).collect();
                            let _ = ipc::send(
                                sock,
                                &FromInit::Spawned {
                                    id,
                                    pid: pid.as_raw(),
                                },
                                &attach,
                            );
                        }
                        Err((error, code)) => {
                            let _ =
                                ipc::send(sock, &FromInit::SpawnFailed { id, error, code }, &[]);
                        }
                    }
                }
                Ok(Some((ToInit::Signal { id, signal }, _))) => {
                    if let Some((pid, _)) = sessions.iter().find(|(_, s)| **s == id) {
                        let _ = sys::kill_raw(-*pid, signal);
                    }
                }
                Ok(Some((ToInit::Shutdown, _))) | Ok(None) | Err(_) => return shutdown(0),
            }
        }
    }
}

/// Kills every process of the namespace and exits.
fn shutdown(code: i32) -> i32 {
    // As PID 1, kill(-1) reaches every other process in the namespace.
    let _ = sys::kill_raw(-1, libc::SIGKILL);
    while let Ok(_) | Err(nix::errno::Errno::EINTR) = waitpid(None::<Pid>, None) {}
    code
}

fn reap(sock: &OwnedFd, sessions: &mut HashMap<i32, u64>) {
    loop {
        let (pid, code) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, c)) => (p, c),
            Ok(WaitStatus::Signaled(p, s, _)) => (p, 128 + s as i32),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        if let Some(id) = sessions.remove(&pid.as_raw()) {
            let _ = ipc::send(sock, &FromInit::Exited { id, code }, &[]);
        }
    }
}

/// Finds `prog` in the `PATH` of `env` (not init's own environment).
fn resolve(prog: &str, env: &[String]) -> Option<String> {
    if prog.contains('/') {
        return Some(prog.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(aibox_core::guest::PATH);
    path.split(':').filter(|d| !d.is_empty()).find_map(|d| {
        let cand = Path::new(d).join(prog);
        nix::unistd::access(&cand, nix::unistd::AccessFlags::X_OK)
            .ok()
            .filter(|_| cand.is_file())
            .map(|_| cand.to_string_lossy().into_owned())
    })
}

fn cstrings(items: &[String]) -> Result<Vec<CString>, (String, i32)> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_bytes()).map_err(|_| {
                (
                    "argument or environment contains a NUL byte".to_string(),
                    126,
                )
            })
        })
        .collect()
}

type Spawned = (Pid, Option<OwnedFd>);

fn spawn(req: &SpawnRequest, fds: Vec<OwnedFd>) -> Result<Spawned, (String, i32)> {
    let prog = req
        .argv
        .first()
        .ok_or_else(|| ("empty command".to_string(), 127))?;
    let path =
        resolve(prog, &req.env).ok_or_else(|| (format!("{prog}: command not found"), 127))?;
    let argv = cstrings(&req.argv)?;
    let envp = cstrings(&req.env)?;
    let cpath = CString::new(path.as_bytes()).map_err(|_| ("bad path".to_string(), 126))?;
    let cwd = req.cwd.clone();

    let (master, slave_name) = match req.tty {
        Some(ws) => {
            use nix::fcntl::OFlag;
            let m = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
                .map_err(|e| (format!("allocating a terminal: {e}"), 126))?;
            nix::pty::grantpt(&m).map_err(|e| (format!("grantpt: {e}"), 126))?;
            nix::pty::unlockpt(&m).map_err(|e| (format!("unlockpt: {e}"), 126))?;
            let name = nix::pty::ptsname_r(&m).map_err(|e| (format!("ptsname: {e}"), 126))?;
            let _ = sys::set_winsize(m.as_raw_fd(), ws.rows, ws.cols);
            (Some(m), Some(name))
        }
        None => {
            if fds.len() != 3 {
                return Err((
                    format!("expected 3 descriptors for stdio, got {}", fds.len()),
                    126,
                ));
            }
            (None, None)
        }
    };

    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| (format!("pipe: {e}"), 126))?;
    match sys::fork().map_err(|e| (format!("fork: {e}"), 126))? {
        ForkResult::Child => {
            drop(err_r);
            let fail = |msg: String| -> ! {
                let _ = nix::unistd::write(&err_w, msg.as_bytes());
                sys::exit_now(127)
            };
            sys::reset_signal_handlers();
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            if let Err(e) = nix::unistd::setsid() {
                fail(format!("setsid: {e}"));
            }
            match &slave_name {
                Some(name) => {
                    let slave = match std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(name)
                    {
                        Ok(f) => f,
                        Err(e) => fail(format!("opening {name}: {e}")),
                    };
                    let _ = sys::set_controlling_tty(slave.as_raw_fd());
                    for target in 0..3 {
                        if let Err(e) = sys::dup2(slave.as_raw_fd(), target) {
                            fail(format!("dup2: {e}"));
                        }
                    }
                }
                None => {
                    for (target, fd) in fds.iter().enumerate() {
                        if let Err(e) = sys::dup2(fd.as_raw_fd(), target as i32) {
                            fail(format!("dup2: {e}"));
                        }
                    }
                }
            }
            // Nothing of init's (control socket, terminal master) reaches
            // the command, not even while the exec gate holds its exec.
            if let Err(e) = sys::close_all_except(&[0, 1, 2, err_w.as_raw_fd()]) {
                fail(format!("closing descriptors: {e}"));
            }
            // Init is not dumpable (see `harden`) and we inherited that: a
            // rootless supervisor could not read this exec's arguments to
            // decide it. The exec resets the flag for the new program.
            let _ = nix::sys::prctl::set_dumpable(true);
            if let Err(e) = nix::unistd::chdir(cwd.as_str()) {
                fail(format!("cannot enter {cwd}: {e}"));
            }
            let e = nix::unistd::execve(&cpath, &argv, &envp).err();
            let code_msg = match e {
                Some(nix::errno::Errno::EACCES) => format!("{path}: permission denied"),
                Some(e) => format!("{path}: {e}"),
                None => String::new(),
            };
            fail(code_msg)
        }
        ForkResult::Parent { child } => {
            drop(err_w);
            drop(fds);
            let mut buf = [0u8; 512];
            let mut msg = Vec::new();
            while let Ok(n) = nix::unistd::read(&err_r, &mut buf) {
                if n == 0 {
                    break;
                }
                msg.extend_from_slice(&buf[..n]);
            }
            if msg.is_empty() {
                Ok((child, master.map(OwnedFd::from)))
            } else {
                let _ = waitpid(child, None);
                let text = String::from_utf8_lossy(&msg).into_owned();
                let code = if text.contains("permission denied") {
                    126
                } else {
                    127
                };
                Err((text, code))
            }
        }
    }
}
