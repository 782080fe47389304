//! Small wrappers around the syscalls this crate needs that `nix` does not
//! cover (or covers with `unsafe` signatures). Every `unsafe` block in the
//! crate lives here, each with the reason it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::unistd::{ForkResult, Pid};

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `fork(2)`.
///
/// Callers must be single-threaded (the supervisor forks its sandbox before
/// it starts any thread; init never starts threads), so the child cannot
/// inherit a lock held by another thread.
pub fn fork() -> io::Result<ForkResult> {
    // SAFETY: see the function documentation: the process is single-threaded
    // at every call site, which is the condition nix documents for fork.
    unsafe { nix::unistd::fork() }.map_err(io::Error::from)
}

/// Ends the process at once, without running destructors or atexit
/// handlers that belong to the parent's copy of the address space.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no memory.
    unsafe { libc::_exit(code) }
}

/// `dup2(2)`.
pub fn dup2(old: RawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only manipulates the descriptor table; invalid numbers
    // give EBADF.
    check(unsafe { libc::dup2(old, new) } as libc::c_long).map(drop)
}

/// Marks every descriptor ≥ `from` close-on-exec.
pub fn cloexec_from(from: u32) -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on the
    // descriptor table.
    check(unsafe {
        libc::syscall(
            libc::SYS_close_range,
            from,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    })
    .map(drop)
}

/// Closes every descriptor except `keep` (used right after fork so the
/// sandbox inherits nothing of the supervisor: log files, sockets).
pub fn close_all_except(keep: &[RawFd]) -> io::Result<()> {
    let mut start: u32 = 0;
    let mut sorted: Vec<u32> = keep
        .iter()
        .filter(|f| **f >= 0)
        .map(|f| *f as u32)
        .collect();
    sorted.sort_unstable();
    for k in sorted {
        if k > start {
            // SAFETY: close_range only closes descriptors in the range; none of
            // them is referenced by a live Rust owner in the forked child
            // except those in `keep`, which are excluded.
            check(unsafe { libc::syscall(libc::SYS_close_range, start, k - 1, 0) })?;
        }
        start = k + 1;
    }
    // SAFETY: as above.
    check(unsafe { libc::syscall(libc::SYS_close_range, start, u32::MAX, 0) }).map(drop)
}

/// Wraps a descriptor number received from the kernel (SCM_RIGHTS) that
/// nothing else owns.
pub fn own_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller passes a descriptor just installed in our table by
    // recvmsg; no other owner exists.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `struct mount_attr` from `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `MOUNT_ATTR_RDONLY`.
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// `MOUNT_ATTR_NOSUID`.
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// `MOUNT_ATTR_NODEV`.
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
/// `MOUNT_ATTR_IDMAP`.
pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// `mount_setattr(2)` on a path (or on `dirfd` itself when `path` is empty).
pub fn mount_setattr(
    dirfd: Option<RawFd>,
    path: &Path,
    set: u64,
    clear: u64,
    recursive: bool,
    userns: Option<RawFd>,
) -> io::Result<()> {
    let p = cpath(path)?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation: 0,
        userns_fd: userns.map(|f| f as u64).unwrap_or(0),
    };
    let mut flags: libc::c_uint = if recursive { AT_RECURSIVE } else { 0 };
    if path.as_os_str().is_empty() {
        flags |= libc::AT_EMPTY_PATH as libc::c_uint;
    }
    // SAFETY: `p` is a valid NUL-terminated string and `attr` a properly
    // laid out struct that lives across the call; the kernel only reads them.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd.unwrap_or(libc::AT_FDCWD),
            p.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// `open_tree(path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)`: a detached copy
/// of the mount at `path`.
pub fn open_tree_clone(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    // SAFETY: valid C string; the returned descriptor is new and owned here.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            p.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    })?;
    Ok(own_fd(fd as RawFd))
}

/// `move_mount(fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)`.
pub fn move_mount_to(fd: &OwnedFd, target: &Path) -> io::Result<()> {
    let t = cpath(target)?;
    let empty = c"";
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
    // SAFETY: valid C strings and a live descriptor; nothing is written to
    // our memory.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation; the descriptor is wrapped at once.
    let raw = check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) }
            as libc::c_long,
    )?;
    let sock = own_fd(raw as RawFd);
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } as libc::c_long)?;
    // SAFETY: the flags member of the union was just filled by the kernel.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } as libc::c_long)
        .map(drop)
}

/// Sets a terminal's window size.
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } as libc::c_long).map(drop)
}

/// Reads a terminal's window size.
pub fn get_winsize(fd: RawFd) -> io::Result<(u16, u16)> {
    // SAFETY: winsize is plain old data.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes into the winsize we own.
    check(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } as libc::c_long)?;
    Ok((ws.ws_row, ws.ws_col))
}

/// Makes `fd` (a terminal) the controlling terminal of this session.
pub fn set_controlling_tty(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument; no memory is involved.
    check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) } as libc::c_long).map(drop)
}

extern "C" fn on_sigchld(_: libc::c_int) {}

/// Installs an empty SIGCHLD handler. PID 1 of a pid namespace drops
/// signals whose disposition is SIG_DFL, which would lose child exits; with
/// a handler installed (and the signal blocked) they queue for signalfd.
pub fn install_sigchld_handler() -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let act = SigAction::new(
        SigHandler::Handler(on_sigchld),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler is async-signal-safe (it does nothing).
    unsafe { sigaction(Signal::SIGCHLD, &act) }
        .map(drop)
        .map_err(io::Error::from)
}

/// Restores every signal's default disposition (in a child before exec).
pub fn reset_signal_handlers() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: SIG_DFL is always a valid disposition.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
}

/// `kill(2)` by raw pid, for process groups (`-pgid`) and `-1`.
pub fn kill_raw(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, sig) } as libc::c_long).map(drop)
}

/// Current pid as a nix `Pid`.
pub fn getpid() -> Pid {
    nix::unistd::getpid()
}

fn ofd_lock_struct(kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is valid (whole file from offset 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

/// Takes an exclusive open-file-description lock on the whole file without
/// waiting. `Ok(false)` when another open file description holds it. The
/// lock follows the description (inherited by children, released when the
/// last descriptor to it closes), like `flock`, but can be tested without
/// being taken (see [`ofd_locked_by_other`]).
pub fn ofd_lock(fd: RawFd) -> io::Result<bool> {
    let fl = ofd_lock_struct(libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_SETLK reads the flock struct we own.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// True when some other open file description holds a lock on the file.
pub fn ofd_locked_by_other(fd: RawFd) -> io::Result<bool> {
    let mut fl = ofd_lock_struct(libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we own.
    check(unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } as libc::c_long)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Borrows a descriptor number inherited from the parent process, which
/// stays open for the life of the process.
pub fn borrow_fd(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: callers only pass descriptors they keep open until exit (the
    // supervisor's inherited lock descriptor).
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// Landlock ABI version of the running kernel (0 when it has none).
pub fn landlock_abi() -> i32 {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with a null attribute and size
    // 0 only queries the ABI version; no memory is read or written.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    if v < 0 { 0 } else { v as i32 }
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain integers in; the returned descriptor is new and owned here.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    Ok(own_fd(fd as RawFd))
}

/// Makes the child of `cmd` a session leader whose controlling terminal is
/// its stdin (which must be a terminal).
pub fn new_session_with_tty_on_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid and ioctl are async-signal-safe; no memory is shared.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
