//! Test helper, copied into a sandbox's workspace by the integration tests:
//! attempts one forbidden operation per argument and prints
//! `<name> <result>` where result is `ok` or the errno name. It uses raw
//! `syscall(2)` or libc's thin one-to-one wrappers, never a library call
//! that could fall back to another system call and hide a failure.
#![allow(unsafe_code)]

use std::ffi::CString;

fn errno_name() -> String {
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ENOSYS) => "ENOSYS".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::EROFS) => "EROFS".into(),
        Some(libc::EAFNOSUPPORT) => "EAFNOSUPPORT".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(n) => format!("errno{n}"),
        None => "unknown".into(),
    }
}

fn result(rc: i64) -> String {
    if rc < 0 { errno_name() } else { "ok".into() }
}

fn attempt(name: &str) -> String {
    // SAFETY: each call passes integers or pointers to live, correctly
    // sized local buffers; a failing call only sets errno.
    unsafe {
        match name {
            "ptrace" => result(libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0)),
            "ptrace_traceme" => result(libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0)),
            "process_vm_readv" => {
                let mut buf = [0u8; 8];
                let local = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 8,
                };
                let remote = libc::iovec {
                    iov_base: 0x400000 as *mut libc::c_void,
                    iov_len: 8,
                };
                result(libc::process_vm_readv(1, &local, 1, &remote, 1, 0) as i64)
            }
            "mount" => {
                let src = CString::new("tmpfs").unwrap_or_default();
                let dst = CString::new("/tmp").unwrap_or_default();
                result(libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    src.as_ptr(),
                    0,
                    std::ptr::null(),
                ) as i64)
            }
            "umount" => {
                let dst = CString::new("/workspace").unwrap_or_default();
                result(libc::umount2(dst.as_ptr(), libc::MNT_DETACH) as i64)
            }
            "chroot" => {
                let dst = CString::new("/tmp").unwrap_or_default();
                result(libc::chroot(dst.as_ptr()) as i64)
            }
            "pivot_root" => result(libc::syscall(
                libc::SYS_pivot_root,
                c"/tmp".as_ptr(),
                c"/tmp".as_ptr(),
            )),
            "unshare_user" => result(libc::unshare(libc::CLONE_NEWUSER) as i64),
            "unshare_net" => result(libc::unshare(libc::CLONE_NEWNET) as i64),
            "unshare_ns" => result(libc::unshare(libc::CLONE_NEWNS) as i64),
            "setns" => result(libc::setns(0, 0) as i64),
            "clone_newuser" => result(libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWUSER | libc::SIGCHLD,
                0,
                0,
                0,
                0,
            )),
            "clone_newns" => result(libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWNS | libc::SIGCHLD,
                0,
                0,
                0,
                0,
            )),
            // An ordinary thread (glibc tries clone3 first and falls back
            // to clone only when clone3 answers ENOSYS).
            "thread" => match std::thread::Builder::new().spawn(|| ()) {
                Ok(h) => h.join().map_or("panicked".into(), |()| "ok".into()),
                Err(e) => format!("errno{}", e.raw_os_error().unwrap_or(0)),
            },
            "clone3" => {
                let mut args = [0u64; 11];
                args[0] = libc::CLONE_NEWUSER as u64;
                result(libc::syscall(
                    libc::SYS_clone3,
                    args.as_mut_ptr(),
                    std::mem::size_of_val(&args),
                ))
            }
            "bpf" => {
                let mut attr = [0u32; 32];
                attr[0] = 2; // BPF_MAP_TYPE_ARRAY
                attr[1] = 4;
                attr[2] = 4;
                attr[3] = 1;
                result(libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), 128))
            }
            "perf_event_open" => {
                let attr = [0u8; 128];
                result(libc::syscall(
                    libc::SYS_perf_event_open,
                    attr.as_ptr(),
                    0,
                    -1,
                    -1,
                    0,
                ))
            }
            "keyctl" => result(libc::syscall(libc::SYS_keyctl, 0, -3, 0)),
            "add_key" => result(libc::syscall(
                libc::SYS_add_key,
                c"user".as_ptr(),
                c"k".as_ptr(),
                c"v".as_ptr(),
                1,
                -3,
            )),
            "request_key" => result(libc::syscall(
                libc::SYS_request_key,
                c"user".as_ptr(),
                c"k".as_ptr(),
                0,
                0,
            )),
            "userfaultfd" => result(libc::syscall(libc::SYS_userfaultfd, 0)),
            "io_uring_setup" => {
                let params = [0u8; 120];
                result(libc::syscall(libc::SYS_io_uring_setup, 8, params.as_ptr()))
            }
            "kexec_load" => result(libc::syscall(libc::SYS_kexec_load, 0, 0, 0, 0)),
            "init_module" => result(libc::syscall(libc::SYS_init_module, 0, 0, c"".as_ptr())),
            "delete_module" => result(libc::syscall(libc::SYS_delete_module, c"x".as_ptr(), 0)),
            "reboot" => result(libc::syscall(libc::SYS_reboot, 0, 0, 0, 0)),
            "swapon" => result(libc::syscall(libc::SYS_swapon, c"/tmp/x".as_ptr(), 0)),
            "acct" => result(libc::syscall(libc::SYS_acct, 0)),
            "personality" => result(libc::personality(0x0040000) as i64),
            "personality_query" => result(libc::personality(0xffffffff) as i64),
            // Prints "no_new_privs 1" when set (asked of the kernel: gVisor's
            // /proc/self/status has no NoNewPrivs line).
            "no_new_privs" => {
                let r = libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
                if r < 0 { result(-1) } else { format!("{r}") }
            }
            "socket_packet" => result(libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) as i64),
            "socket_raw" => {
                result(libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) as i64)
            }
            "socket_raw6" => {
                result(libc::socket(libc::AF_INET6, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 58) as i64)
            }
            "socket_tcp" => result(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64),
            "socket_unix" => result(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as i64),
            "tiocsti" => {
                let c: u8 = b'x';
                result(libc::ioctl(0, libc::TIOCSTI, &c) as i64)
            }
            "open_by_handle_at" => result(libc::syscall(libc::SYS_open_by_handle_at, 0, 0, 0)),
            "fork_bomb" => {
                // Fork until the kernel refuses; children just wait to be killed.
                let mut n = 0u32;
                loop {
                    let pid = libc::fork();
                    if pid == 0 {
                        loop {
                            libc::pause();
                        }
                    }
                    if pid < 0 {
                        let e = errno_name();
                        return format!(
                            "{} n={n}",
                            if e == "errno11" {
                                "EAGAIN".to_string()
                            } else {
                                e
                            }
                        );
                    }
                    n += 1;
                    if n >= 100_000 {
                        return format!("unlimited n={n}");
                    }
                }
            }
            // A second seccomp listener on execve, to answer our own execs
            // "continue": the kernel allows one listener per filter chain,
            // and the exec gate holds it (EBUSY).
            "seccomp_listener" => {
                let mut filter = [
                    libc::sock_filter {
                        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                        jt: 0,
                        jf: 0,
                        k: 0,
                    },
                    libc::sock_filter {
                        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                        jt: 0,
                        jf: 1,
                        k: 59,
                    },
                    libc::sock_filter {
                        code: (libc::BPF_RET | libc::BPF_K) as u16,
                        jt: 0,
                        jf: 0,
                        k: libc::SECCOMP_RET_USER_NOTIF,
                    },
                    libc::sock_filter {
                        code: (libc::BPF_RET | libc::BPF_K) as u16,
                        jt: 0,
                        jf: 0,
                        k: libc::SECCOMP_RET_ALLOW,
                    },
                ];
                let prog = libc::sock_fprog {
                    len: filter.len() as u16,
                    filter: filter.as_mut_ptr(),
                };
                let rc = libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                    &prog as *const libc::sock_fprog,
                );
                if rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
                    "EBUSY".into()
                } else {
                    result(rc)
                }
            }
            // A copy of curl (placed at /workspace/fetch by the test)
            // loaded into an anonymous memory file and run from its
            // descriptor (execveat AT_EMPTY_PATH): no path at all.
            // A forged registration on the exec gate's socket (containers):
            // a pipe offered as a session's seccomp listener. Prints the
            // supervisor's answer: `refused` or `accepted`.
            "gate_join_pipe" => {
                use std::os::fd::{AsRawFd, FromRawFd};
                let mut fds = [0i32; 2];
                if libc::pipe(fds.as_mut_ptr()) < 0 {
                    return errno_name();
                }
                let raw = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
                if raw < 0 {
                    return errno_name();
                }
                let sock = std::os::fd::OwnedFd::from_raw_fd(raw);
                let mut addr: libc::sockaddr_un = std::mem::zeroed();
                addr.sun_family = libc::AF_UNIX as u16;
                for (d, s) in addr.sun_path.iter_mut().zip(b"/aibox/exec-gate.sock") {
                    *d = *s as libc::c_char;
                }
                if libc::connect(
                    sock.as_raw_fd(),
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as u32,
                ) < 0
                {
                    return errno_name();
                }
                let join = aibox_sandbox::container::GateJoin {
                    session: "1".into(),
                };
                if aibox_sandbox::ipc::send(&sock, &join, &[fds[0]]).is_err() {
                    return errno_name();
                }
                match aibox_sandbox::ipc::recv::<aibox_sandbox::container::GateJoined>(&sock) {
                    Ok(Some((r, _))) if r.error.is_some() => "refused".into(),
                    Ok(Some(_)) => "accepted".into(),
                    _ => "no-answer".into(),
                }
            }
            "fexecve_memfd_curl" => {
                let Ok(bytes) = std::fs::read("/workspace/fetch") else {
                    return "no-curl".into();
                };
                let fd = libc::memfd_create(c"x".as_ptr(), 0);
                if fd < 0 {
                    return errno_name();
                }
                if libc::write(fd, bytes.as_ptr().cast(), bytes.len()) != bytes.len() as isize {
                    return errno_name();
                }
                let argv = [c"fetch".as_ptr(), c"--version".as_ptr(), std::ptr::null()];
                let envp: [*const libc::c_char; 1] = [std::ptr::null()];
                result(libc::syscall(
                    libc::SYS_execveat,
                    fd,
                    c"".as_ptr(),
                    argv.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                ))
            }
            "alloc_256m" => {
                // Touch every page of 256 MiB so it is really charged.
                let size = 256usize << 20;
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    return errno_name();
                }
                let bytes = p.cast::<u8>();
                let mut off = 0;
                while off < size {
                    *bytes.add(off) = 1;
                    off += 4096;
                }
                "ok".into()
            }
            "chmod_suid" => {
                let f = c"/tmp/aibox-attack-suid";
                libc::close(libc::open(
                    f.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY,
                    0o755,
                ));
                result(libc::syscall(libc::SYS_chmod, f.as_ptr(), 0o4755))
            }
            "chmod_sgid" => {
                let f = c"/tmp/aibox-attack-sgid";
                libc::close(libc::open(
                    f.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY,
                    0o755,
                ));
                result(libc::syscall(
                    libc::SYS_fchmodat,
                    libc::AT_FDCWD,
                    f.as_ptr(),
                    0o2755,
                    0,
                ))
            }
            "fchmod_suid" => {
                let fd = libc::open(
                    c"/tmp/aibox-attack-f".as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY,
                    0o755,
                );
                result(libc::syscall(libc::SYS_fchmod, fd, 0o4755))
            }
            "create_suid" => result(libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/workspace/aibox-attack-created".as_ptr(),
                libc::O_CREAT | libc::O_WRONLY,
                0o4755,
            )),
            "mkdir_sgid" => result(libc::syscall(
                libc::SYS_mkdir,
                c"/tmp/aibox-attack-d".as_ptr(),
                0o2775,
            )),
            "openat2" => {
                let how = [0u64; 3];
                result(libc::syscall(
                    libc::SYS_openat2,
                    libc::AT_FDCWD,
                    c"/tmp".as_ptr(),
                    how.as_ptr(),
                    24,
                ))
            }
            "socket_vsock" => result(libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0) as i64),
            "socket_alg" => result(libc::socket(libc::AF_ALG, libc::SOCK_SEQPACKET, 0) as i64),
            "socketpair_inet" => {
                let mut sv = [0i32; 2];
                result(
                    libc::socketpair(libc::AF_INET, libc::SOCK_STREAM, 0, sv.as_mut_ptr()) as i64,
                )
            }
            "socket_uevent" => result(libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM, 15) as i64),
            "socket_sock_packet" => result(libc::socket(libc::AF_INET, 10, 0x0300) as i64),
            "socket_netlink" => result(libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) as i64),
            "chmod_plain" => {
                let f = c"/tmp/aibox-attack-plain";
                libc::close(libc::open(
                    f.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY,
                    0o644,
                ));
                result(libc::syscall(libc::SYS_chmod, f.as_ptr(), 0o755))
            }
            "tioclinux" => {
                let c: u8 = 0;
                result(libc::ioctl(0, libc::TIOCLINUX, &c) as i64)
            }
            "process_vm_writev" => {
                let mut buf = [0u8; 8];
                let local = libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: 8,
                };
                let remote = libc::iovec {
                    iov_base: 0x400000 as *mut libc::c_void,
                    iov_len: 8,
                };
                result(libc::process_vm_writev(1, &local, 1, &remote, 1, 0) as i64)
            }
            "swapoff" => result(libc::syscall(libc::SYS_swapoff, c"/tmp/x".as_ptr())),
            "setuid0" => result(libc::setuid(0) as i64),
            other if other.starts_with("udp:") => {
                match other[4..].parse::<std::net::SocketAddr>() {
                    // udp:A.B.C.D:PORT — one datagram (DNS to a public
                    // resolver, QUIC).
                    Ok(to) => io_result(
                        std::net::UdpSocket::bind("0.0.0.0:0").and_then(|u| u.send_to(b"\0\0", to)),
                    ),
                    Err(_) => "bad-address".into(),
                }
            }
            other if other.starts_with("icmp:") => match other[5..].parse::<std::net::Ipv4Addr>() {
                // icmp:A.B.C.D — an echo request on an ICMP datagram socket.
                Ok(ip) => {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP);
                    if fd < 0 {
                        return errno_name();
                    }
                    let sa = sockaddr(ip, 0);
                    let echo: [u8; 8] = [8, 0, 0, 0, 0, 1, 0, 1];
                    let rc = libc::sendto(
                        fd,
                        echo.as_ptr().cast(),
                        echo.len(),
                        0,
                        (&sa as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                    result(rc as i64)
                }
                Err(_) => "bad-address".into(),
            },
            other if other.starts_with("proxy_connect:") => {
                // proxy_connect:HOST:PORT — a raw CONNECT to the aibox proxy
                // (`\0` stands for a NUL byte); prints the status code.
                let target = other["proxy_connect:".len()..].replace("\\0", "\0");
                proxy_status(&format!(
                    "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
                ))
            }
            other if other.starts_with("relay:") => {
                match other[6..].parse::<std::net::SocketAddr>() {
                    // relay:A.B.C.D:PORT — a proxy of our own inside the sandbox:
                    // takes a connection on loopback and dials the target.
                    Ok(to) => {
                        let l = match std::net::TcpListener::bind("127.0.0.1:0") {
                            Ok(l) => l,
                            Err(e) => return format!("errno{}", e.raw_os_error().unwrap_or(0)),
                        };
                        let at = l.local_addr().map_err(|e| e.to_string());
                        let relay = std::thread::spawn(move || {
                            let (_client, _) = l.accept()?;
                            std::net::TcpStream::connect_timeout(
                                &to,
                                std::time::Duration::from_secs(3),
                            )
                        });
                        let _client = at.map(std::net::TcpStream::connect);
                        match relay.join() {
                            Ok(r) => io_result(r),
                            Err(_) => "panicked".into(),
                        }
                    }
                    Err(_) => "bad-address".into(),
                }
            }
            other => match other.strip_prefix("connect:") {
                // connect:A.B.C.D:PORT — a TCP connection attempt.
                Some(target) => {
                    let Ok(addr) = target.parse::<std::net::SocketAddrV4>() else {
                        return "bad-address".into();
                    };
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    if fd < 0 {
                        return errno_name();
                    }
                    let sa = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: addr.port().to_be(),
                        sin_addr: libc::in_addr {
                            s_addr: u32::from(*addr.ip()).to_be(),
                        },
                        sin_zero: [0; 8],
                    };
                    let rc = libc::connect(
                        fd,
                        (&sa as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                    result(rc as i64)
                }
                None => "unknown-probe".into(),
            },
        }
    }
}

fn io_result<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
            Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
            Some(libc::EPERM) => "EPERM".into(),
            Some(libc::EACCES) => "EACCES".into(),
            Some(n) => format!("errno{n}"),
            None => e.to_string(),
        },
    }
}

fn sockaddr(ip: std::net::Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Sends `request` to the aibox proxy on 127.0.0.1:3128 and returns
/// `statusNNN` from its answer.
fn proxy_status(request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = match std::net::TcpStream::connect("127.0.0.1:3128") {
        Ok(s) => s,
        Err(e) => return io_result::<()>(Err(e)),
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    if let Err(e) = s.write_all(request.as_bytes()) {
        return io_result::<()>(Err(e));
    }
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    match head.split_whitespace().nth(1) {
        Some(code) => format!("status{code}"),
        None => "no-answer".into(),
    }
}

fn main() {
    // `tag=…` arguments only make a test's processes identifiable on the host.
    for name in std::env::args().skip(1).filter(|a| !a.starts_with("tag=")) {
        println!("{name} {}", attempt(&name));
    }
}
