//! The exec gate's kernel side: a seccomp filter that hands every
//! `execve`/`execveat` of the sandbox to a listener (seccomp user
//! notification), and the calls the listener needs to decide it: receive,
//! answer, check that a request is still live, read the caller's memory,
//! and resolve a path inside the sandbox's root.
//!
//! The decision itself is the supervisor's (`aibox-supervisor::gate`).
//! Every `unsafe` block here wraps one system call on plain integers or on
//! buffers this module owns, with the reason it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `execve` on x86_64.
pub const NR_EXECVE: i32 = 59;
/// `execveat` on x86_64.
pub const NR_EXECVEAT: i32 = 322;
/// `AT_FDCWD` as the kernel passes it in a 64-bit argument register.
pub const AT_FDCWD: i32 = libc::AT_FDCWD;
/// `AT_EMPTY_PATH` (execveat flag).
pub const AT_EMPTY_PATH: u64 = libc::AT_EMPTY_PATH as u64;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const X32_BIT: u32 = 0x4000_0000;

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The gate's BPF program: execve/execveat → user notification; x32
/// calls → ENOSYS (they would name other syscall numbers); another
/// architecture → kill; everything else → allow (the sandbox's other
/// filters decide those).
fn program() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    vec![
        /* 0 */ stmt(LD_W_ABS, 4), // seccomp_data.arch
        /* 1 */ jump(JEQ, AUDIT_ARCH_X86_64, 1, 0),
        /* 2 */ stmt(RET, libc::SECCOMP_RET_KILL_PROCESS),
        /* 3 */ stmt(LD_W_ABS, 0), // seccomp_data.nr
        /* 4 */ jump(JGE, X32_BIT, 4, 0), // → 9
        /* 5 */ jump(JEQ, NR_EXECVE as u32, 2, 0), // → 8
        /* 6 */ jump(JEQ, NR_EXECVEAT as u32, 1, 0), // → 8
        /* 7 */ stmt(RET, libc::SECCOMP_RET_ALLOW),
        /* 8 */ stmt(RET, libc::SECCOMP_RET_USER_NOTIF),
        /* 9 */ stmt(RET, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ]
}

/// Installs the gate's filter on the calling thread (which must be
/// single-threaded and have `no_new_privs` set) and returns the listener.
/// From now on every exec of this process and its descendants waits for
/// an answer on the listener; without one it fails with ENOSYS.
pub fn install_exec_filter() -> io::Result<OwnedFd> {
    let mut filter = program();
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    let install = |flags: libc::c_ulong| {
        // SAFETY: `prog` points at `filter`, which outlives the call; the
        // kernel copies the program.
        check(unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const libc::sock_fprog,
            )
        })
    };
    // WAIT_KILLABLE_RECV (5.19+): once the listener has received a request
    // only SIGKILL interrupts the exec, so a signal during the decision
    // does not restart the exec and repeat the question.
    let fd = match install(
        libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
    ) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            install(libc::SECCOMP_FILTER_FLAG_NEW_LISTENER)?
        }
        Err(e) => return Err(e),
    };
    // SAFETY: the kernel just created this descriptor for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Checks that the kernel's notification structures are the size this
/// build expects (a larger kernel struct would be written past ours).
pub fn check_sizes() -> io::Result<()> {
    let mut sizes = libc::seccomp_notif_sizes {
        seccomp_notif: 0,
        seccomp_notif_resp: 0,
        seccomp_data: 0,
    };
    // SAFETY: the kernel fills the three u16 fields of `sizes`.
    check(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_NOTIF_SIZES,
            0,
            &mut sizes as *mut libc::seccomp_notif_sizes,
        )
    })?;
    if usize::from(sizes.seccomp_notif) > std::mem::size_of::<libc::seccomp_notif>()
        || usize::from(sizes.seccomp_notif_resp) > std::mem::size_of::<libc::seccomp_notif_resp>()
    {
        return Err(io::Error::other(format!(
            "this kernel's seccomp notification structures ({} and {} bytes) are larger than this build knows",
            sizes.seccomp_notif, sizes.seccomp_notif_resp
        )));
    }
    Ok(())
}

/// One held exec.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    /// Cookie to answer with.
    pub id: u64,
    /// Thread id of the caller, in the listener's pid namespace.
    pub pid: u32,
    /// Syscall number.
    pub nr: i32,
    /// Syscall arguments.
    pub args: [u64; 6],
}

/// Waits for the next held exec. `EINTR` and `ENOENT` (the caller died
/// before we read it) are returned as errors for the caller to retry.
pub fn receive(listener: BorrowedFd<'_>) -> io::Result<Notification> {
    // SAFETY: seccomp_notif is plain data; all-zero is a valid value and
    // the kernel requires it zeroed.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes one seccomp_notif (size checked by
    // `check_sizes`) into `n`.
    check(unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            &mut n as *mut libc::seccomp_notif,
        )
    } as libc::c_long)?;
    Ok(Notification {
        id: n.id,
        pid: n.pid,
        nr: n.data.nr,
        args: n.data.args,
    })
}

/// Whether request `id` is still waiting (its caller has not died and been
/// replaced by another thread with the same id). Data read from the
/// caller is only trusted after this returns true.
pub fn still_valid(listener: BorrowedFd<'_>, id: u64) -> bool {
    // SAFETY: the kernel reads one u64.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
            &id as *const u64,
        )
    };
    rc == 0
}

/// How to answer a held exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the kernel run the exec.
    Continue,
    /// Fail the exec with this errno.
    Fail(i32),
}

/// Answers request `id`. `ENOENT` means the caller is gone.
pub fn answer(listener: BorrowedFd<'_>, id: u64, verdict: Verdict) -> io::Result<()> {
    let (error, flags) = match verdict {
        Verdict::Continue => (0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32),
        Verdict::Fail(errno) => (-errno, 0),
    };
    let mut resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error,
        flags,
    };
    // SAFETY: the kernel reads one seccomp_notif_resp.
    check(unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &mut resp as *mut libc::seccomp_notif_resp,
        )
    } as libc::c_long)
    .map(drop)
}

/// Reads up to `buf.len()` bytes at `addr` in process `pid`; stops early
/// at an unmapped page. Returns the bytes read.
pub fn read_memory(pid: u32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`; the
    // remote address is only read, in the other process, with its checks.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Reads a NUL-terminated string at `addr` in process `pid`, at most `max`
/// bytes (without the NUL). Reads page by page, so a string that ends
/// just before an unmapped page is still read.
pub fn read_cstring(pid: u32, addr: u64, max: usize) -> io::Result<Vec<u8>> {
    const PAGE: u64 = 4096;
    let mut out = Vec::new();
    let mut at = addr;
    loop {
        let room = (PAGE - (at % PAGE)) as usize;
        let want = room.min(max + 1 - out.len());
        let mut chunk = vec![0u8; want];
        let n = read_memory(pid, at, &mut chunk)?;
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        if let Some(end) = chunk[..n].iter().position(|b| *b == 0) {
            out.extend_from_slice(&chunk[..end]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk[..n]);
        if out.len() > max {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        at += n as u64;
    }
}

/// Reads a NULL-terminated array of string pointers (argv, envp) at `addr`
/// in process `pid`: at most `max_items` strings and `max_bytes` in all.
/// A NULL array (allowed by Linux for argv/envp) is empty.
pub fn read_string_array(
    pid: u32,
    addr: u64,
    max_items: usize,
    max_bytes: usize,
) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    if addr == 0 {
        return Ok(out);
    }
    let mut total = 0usize;
    let mut at = addr;
    loop {
        let mut ptr = [0u8; 8];
        if read_memory(pid, at, &mut ptr)? != 8 {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let p = u64::from_ne_bytes(ptr);
        if p == 0 {
            return Ok(out);
        }
        if out.len() >= max_items {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        let s = read_cstring(pid, p, max_bytes.saturating_sub(total))?;
        total += s.len() + 1;
        out.push(s);
        at += 8;
    }
}

/// `openat2(2)` of `path` beneath `dir` with `RESOLVE_IN_ROOT`: absolute
/// paths and `..` stay inside `dir`, and symbolic links are followed as if
/// `dir` were `/` (magic links of /proc are refused). `O_PATH`,
/// close-on-exec.
pub fn open_in_root(dir: BorrowedFd<'_>, path: &[u8]) -> io::Result<OwnedFd> {
    openat2(
        dir,
        path,
        libc::O_PATH | libc::O_CLOEXEC,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// Opens `path` below `dir` (`O_PATH`, close-on-exec) without following
/// any symbolic link on the way or at the end, and without leaving `dir`.
pub fn open_no_symlinks(dir: BorrowedFd<'_>, path: &[u8]) -> io::Result<OwnedFd> {
    openat2(
        dir,
        path,
        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// `openat2(2)` with `flags` and `resolve`.
fn openat2(dir: BorrowedFd<'_>, path: &[u8], flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data (three u64); zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    // SAFETY: `c` and `how` outlive the call; the kernel returns a new
    // descriptor we own.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    })?;
    // SAFETY: new descriptor from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd(2)`: a duplicate of descriptor `target` of the process
/// behind `pidfd` (same open file description, so the same access mode).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain integers in; new descriptor out.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) })?;
    // SAFETY: new descriptor from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_the_intended_returns() {
        let p = program();
        let target = |i: usize, off: u8| i + 1 + usize::from(off);
        assert_eq!(p[target(1, p[1].jt)].k, 0, "arch ok → load nr");
        assert_eq!(
            p[target(4, p[4].jt)].k,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(p[target(5, p[5].jt)].k, libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(p[target(6, p[6].jt)].k, libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(p[7].k, libc::SECCOMP_RET_ALLOW);
    }
}
