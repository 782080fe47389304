//! The in-sandbox half of container egress.
//!
//! A container's engine builds its network namespace, so the supervisor
//! cannot open listeners in it the way the native backend does. Instead
//! the container's init opens them (as the unprivileged guest) and this
//! forwarder relays every connection, unchanged, over a unix socket the
//! supervisor bind-mounted into the container, where
//! [`Proxy::serve_relay`](crate::Proxy::serve_relay) decides it. The
//! forwarder grants nothing: it holds no policy, and a process that skips
//! it and speaks to the socket directly is decided the same way.

use std::io;
use std::net::{SocketAddr, TcpListener as StdTcp, UdpSocket as StdUdp};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket, UnixStream};
use tokio::sync::Semaphore;

/// Connections relayed at once (the supervisor has its own, lower limit).
const MAX_RELAYED: usize = 1024;
/// How long a DNS exchange over the socket may take.
const DNS_TIMEOUT: Duration = Duration::from_secs(10);

/// The listeners init opened, in `aibox_sandbox::NetListen` order: proxy,
/// DNS/UDP, DNS/TCP, then the transparent ports.
#[derive(Debug)]
pub struct Listeners {
    proxy: StdTcp,
    dns_udp: StdUdp,
    dns_tcp: StdTcp,
    transparent: Vec<StdTcp>,
}

impl Listeners {
    /// Takes the descriptors in the order above.
    pub fn from_fds(fds: Vec<OwnedFd>) -> io::Result<Listeners> {
        let mut it = fds.into_iter();
        let (Some(p), Some(u), Some(d)) = (it.next(), it.next(), it.next()) else {
            return Err(io::Error::other(
                "the egress listeners are incomplete (need proxy, DNS/UDP, DNS/TCP)",
            ));
        };
        Ok(Listeners {
            proxy: StdTcp::from(p),
            dns_udp: StdUdp::from(u),
            dns_tcp: StdTcp::from(d),
            transparent: it.map(StdTcp::from).collect(),
        })
    }
}

/// Relays `l` to the supervisor's socket at `socket` until an error,
/// on the calling thread alone: the runtime starts no threads, because
/// under some engines' seccomp profiles a container's first process cannot
/// create any (they answer clone3 with EPERM, and glibc only falls back
/// to clone on ENOSYS).
pub fn run(l: Listeners, socket: PathBuf) -> io::Result<()> {
    for t in [&l.proxy, &l.dns_tcp].into_iter().chain(&l.transparent) {
        t.set_nonblocking(true)?;
    }
    l.dns_udp.set_nonblocking(true)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(l, socket))
}

async fn serve(l: Listeners, socket: PathBuf) -> io::Result<()> {
    let socket: Arc<Path> = socket.into();
    let slots = Arc::new(Semaphore::new(MAX_RELAYED));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(accept_loop(
        TcpListener::from_std(l.proxy)?,
        socket.clone(),
        slots.clone(),
        |_| "PROXY".to_string(),
    ));
    tasks.spawn(accept_loop(
        TcpListener::from_std(l.dns_tcp)?,
        socket.clone(),
        slots.clone(),
        |_| "DNS".to_string(),
    ));
    for t in l.transparent {
        // The address the client dialled is the synthetic one the aibox DNS
        // handed out: the supervisor maps it back to the name.
        tasks.spawn(accept_loop(
            TcpListener::from_std(t)?,
            socket.clone(),
            slots.clone(),
            |local| format!("TRANSPARENT {local}"),
        ));
    }
    tasks.spawn(dns_udp(
        UdpSocket::from_std(l.dns_udp)?,
        socket.clone(),
        slots.clone(),
    ));
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    socket: Arc<Path>,
    slots: Arc<Semaphore>,
    preamble: fn(SocketAddr) -> String,
) {
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (s, local) = match listener.accept().await {
            Ok((s, _)) => match s.local_addr().inspect(|_| drop(s.set_nodelay(true))) {
                Ok(local) => (s, local),
                Err(_) => continue,
            },
            Err(_) => {
                // Out of descriptors, say: pause instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let socket = socket.clone();
        tokio::spawn(async move {
            relay(s, &socket, &preamble(local)).await;
            drop(slot);
        });
    }
}

/// Copies one connection both ways through the supervisor's socket.
async fn relay(mut s: TcpStream, socket: &Path, preamble: &str) {
    let Ok(mut up) = UnixStream::connect(socket).await else {
        // The supervisor is gone: the client sees the connection close.
        return;
    };
    if up
        .write_all(format!("{preamble}\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
}

async fn dns_udp(sock: UdpSocket, socket: Arc<Path>, slots: Arc<Semaphore>) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        // A flood of queries waits here rather than opening sockets
        // without bound; a client retries what it does not get.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, socket) = (sock.clone(), socket.clone());
        tokio::spawn(async move {
            if let Ok(Ok(Some(reply))) =
                tokio::time::timeout(DNS_TIMEOUT, dns_exchange(&socket, &query)).await
            {
                let _ = sock.send_to(&reply, from).await;
            }
            drop(slot);
        });
    }
}

/// One query over the socket, framed as DNS over TCP.
async fn dns_exchange(socket: &Path, query: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let Ok(len) = u16::try_from(query.len()) else {
        return Ok(None);
    };
    let mut up = UnixStream::connect(socket).await?;
    up.write_all(b"DNS\n").await?;
    up.write_u16(len).await?;
    up.write_all(query).await?;
    let n = up.read_u16().await?;
    let mut reply = vec![0u8; n as usize];
    up.read_exact(&mut reply).await?;
    Ok(Some(reply))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// The forwarder carries bytes both ways and says what each
    /// connection is, and relays UDP DNS as framed TCP DNS.
    #[test]
    fn relays_with_preambles() {
        let dir = std::env::temp_dir().join(format!("aibox-fwd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("egress.sock");
        let server = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let tcp = || StdTcp::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let (proxy, dns_tcp, transparent) = (tcp(), tcp(), tcp());
        let udp = StdUdp::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let (pa, ua, ta) = (
            proxy.local_addr().unwrap(),
            udp.local_addr().unwrap(),
            transparent.local_addr().unwrap(),
        );
        let l = Listeners {
            proxy,
            dns_udp: udp,
            dns_tcp,
            transparent: vec![transparent],
        };
        std::thread::spawn(move || run(l, sock));
        // The "supervisor": echoes the preamble, then the first payload.
        std::thread::spawn(move || {
            use std::io::{BufRead, BufReader, Read, Write};
            for s in server.incoming().flatten() {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut s = s;
                if line == "DNS\n" {
                    let mut len = [0u8; 2];
                    r.read_exact(&mut len).unwrap();
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    r.read_exact(&mut q).unwrap();
                    q.reverse();
                    s.write_all(&len).unwrap();
                    s.write_all(&q).unwrap();
                } else {
                    let mut b = [0u8; 5];
                    r.read_exact(&mut b).unwrap();
                    s.write_all(line.as_bytes()).unwrap();
                    s.write_all(&b).unwrap();
                }
            }
        });
        use std::io::{Read, Write};
        for (addr, want) in [
            (pa, "PROXY\nhello".to_string()),
            (ta, format!("TRANSPARENT {ta}\nhello")),
        ] {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.write_all(b"hello").unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            assert_eq!(got, want);
        }
        let u = StdUdp::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        u.send_to(b"abc", ua).unwrap();
        let mut b = [0u8; 16];
        let n = u.recv(&mut b).unwrap();
        assert_eq!(&b[..n], b"cba");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
