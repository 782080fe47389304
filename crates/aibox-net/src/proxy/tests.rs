//! The proxy against real sockets on loopback: an upstream server, the
//! proxy's listeners, and raw clients that speak (and mangle) the protocol.

use super::*;
use std::collections::BTreeMap;

#[derive(Default)]
struct Events(Mutex<Vec<NetEvent>>);

impl Sink for Events {
    fn record(&self, e: NetEvent) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }
}

impl Events {
    fn all(&self) -> Vec<NetEvent> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    async fn wait_for(&self, pred: impl Fn(&NetEvent) -> bool) -> NetEvent {
        for _ in 0..200 {
            if let Some(e) = self.all().into_iter().find(|e| pred(e)) {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("event not seen; have {:#?}", self.all());
    }
}

/// An upstream on 127.0.0.1 that answers HTTP requests with `ok <request
/// line>` and records each request head; a first line `ECHO` makes it echo.
async fn upstream() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut b).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&b[..n]);
                    if buf.starts_with(b"ECHO") || buf.first() == Some(&0x16) {
                        let _ = s.write_all(&buf).await;
                        buf.clear();
                        continue;
                    }
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        let line = head.lines().next().unwrap_or("").to_string();
                        seen.lock().unwrap_or_else(|e| e.into_inner()).push(head);
                        let body = format!("ok {line}");
                        let _ = s
                            .write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                    body.len()
                                )
                                .as_bytes(),
                            )
                            .await;
                        buf.drain(..end + 4);
                    }
                }
            });
        }
    });
    (port, seen)
}

struct Setup {
    proxy_port: u16,
    up_port: u16,
    seen: Arc<Mutex<Vec<String>>>,
    events: Arc<Events>,
    proxy: Arc<Proxy>,
}

async fn setup() -> Setup {
    let (up_port, seen) = upstream().await;
    let mut hosts = BTreeMap::new();
    hosts.insert("allowed.test".to_string(), "127.0.0.1".to_string());
    hosts.insert("rebind.test".to_string(), "127.0.0.1".to_string());
    let rules = [
        format!("127.0.0.1:{up_port}"),
        format!("allowed.test:{up_port}"),
        "rebind.test:9".to_string(),
    ];
    let allow = Allowlist::parse(&rules, &hosts).unwrap_or_else(|e| panic!("{e}"));
    let events = Arc::new(Events::default());
    let proxy = Proxy::new(allow, events.clone());
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let proxy_port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(proxy.clone().serve_proxy(l));
    Setup {
        proxy_port,
        up_port,
        seen,
        events,
        proxy,
    }
}

/// Sends `req` to the proxy and returns everything it answers before
/// closing (or until `until` appears).
async fn exchange(port: u16, req: &[u8], until: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = s.write_all(req).await;
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&b[..n]),
            }
            let text = String::from_utf8_lossy(&out).into_owned();
            if !until.is_empty() && text.contains(until) {
                break;
            }
            if complete(&text) {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole response with a Content-Length body has arrived.
fn complete(text: &str) -> bool {
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

#[tokio::test]
async fn connect_to_an_allowed_host_tunnels_and_is_recorded() {
    let s = setup().await;
    let mut c = TcpStream::connect(("127.0.0.1", s.proxy_port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let req = format!(
        "CONNECT allowed.test:{0} HTTP/1.1\r\nHost: allowed.test:{0}\r\n\r\n",
        s.up_port
    );
    c.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut b = [0u8; 256];
    let n = c.read(&mut b).await.unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&b[..n])
    );
    c.write_all(b"ECHO hello\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let n = c.read(&mut b).await.unwrap_or(0);
    assert_eq!(&b[..n], b"ECHO hello\r\n");
    drop(c);
    let e = s
        .events
        .wait_for(|e| matches!(e, NetEvent::Allow { .. }))
        .await;
    let NetEvent::Allow {
        host,
        port,
        method,
        address,
        bytes_up,
        bytes_down,
        ..
    } = e
    else {
        unreachable!()
    };
    assert_eq!(
        (host.as_str(), port, method.as_str()),
        ("allowed.test", s.up_port, "CONNECT")
    );
    assert_eq!(address, format!("127.0.0.1:{}", s.up_port));
    assert_eq!((bytes_up, bytes_down), (12, 12));
    assert_eq!(s.proxy.counters.allowed.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn denied_hosts_get_a_403_that_names_the_rule_to_add() {
    let s = setup().await;
    let r = exchange(
        s.proxy_port,
        b"CONNECT evil.test:443 HTTP/1.1\r\nHost: evil.test:443\r\n\r\n",
        "",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(
        r.contains("add `evil.test` to network.allowed_domains"),
        "{r}"
    );
    // A raw IP (even of an allowed host) needs a rule naming it.
    let r = exchange(s.proxy_port, b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n", "").await;
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("no rule names this address"),
        "{r}"
    );
    // An allowed name that resolves to loopback (rebinding) is refused.
    let r = exchange(s.proxy_port, b"CONNECT rebind.test:9 HTTP/1.1\r\n\r\n", "").await;
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("127.0.0.1, a loopback address"),
        "{r}"
    );
    let denies = s
        .events
        .all()
        .into_iter()
        .filter(|e| matches!(e, NetEvent::Deny { .. }))
        .count();
    assert_eq!(denies, 3);
}

#[tokio::test]
async fn plain_http_is_forwarded_to_the_checked_address_without_proxy_headers() {
    let s = setup().await;
    let req = format!(
        "GET http://allowed.test:{0}/x?y=1 HTTP/1.1\r\nHost: allowed.test:{0}\r\nProxy-Authorization: Basic c2VjcmV0\r\nConnection: close\r\n\r\n",
        s.up_port
    );
    let r = exchange(s.proxy_port, req.as_bytes(), "ok GET").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("ok GET /x?y=1 HTTP/1.1"),
        "{r}"
    );
    let seen = s.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0]
            .to_ascii_lowercase()
            .contains(&format!("host: allowed.test:{}", s.up_port)),
        "{seen:?}"
    );
    assert!(
        !seen[0].to_ascii_lowercase().contains("proxy-authorization"),
        "{seen:?}"
    );
    let e = s
        .events
        .wait_for(|e| matches!(e, NetEvent::Allow { .. }))
        .await;
    assert!(
        matches!(e, NetEvent::Allow { ref method, bytes_down, .. } if method == "GET" && bytes_down > 0),
        "{e:?}"
    );
}

#[tokio::test]
async fn fronting_and_parser_tricks_are_denied_and_the_proxy_survives() {
    let s = setup().await;
    let fronted = format!(
        "GET http://allowed.test:{}/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        s.up_port
    );
    let r = exchange(s.proxy_port, fronted.as_bytes(), "").await;
    assert!(
        r.starts_with("HTTP/1.1 403") && r.contains("Host header"),
        "{r}"
    );
    for bad in [
        &b"CONNECT evil.test\x00.allowed.test:443 HTTP/1.1\r\n\r\n"[..],
        b"CONNECT allowed.test%00:443 HTTP/1.1\r\n\r\n",
        b"CONNECT user@allowed.test:443 HTTP/1.1\r\n\r\n",
        b"CONNECT allowed.test HTTP/1.1\r\n\r\n",
        b"CONNECT 2130706433:443 HTTP/1.1\r\n\r\n",
        b"CONNECT 0177.0.0.1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT [::ffff:127.0.0.1]:9 HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        b"GET https://allowed.test/ HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\x05hello",
        b"GARBAGE\r\n\r\n",
    ] {
        let r = exchange(s.proxy_port, bad, "").await;
        assert!(
            !r.starts_with("HTTP/1.1 200"),
            "{:?} got {r}",
            String::from_utf8_lossy(bad)
        );
    }
    let long = format!("CONNECT {}.test:443 HTTP/1.1\r\n\r\n", "a".repeat(300));
    let r = exchange(s.proxy_port, long.as_bytes(), "").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    // Still serving.
    let ok = format!("CONNECT allowed.test:{0} HTTP/1.1\r\n\r\n", s.up_port);
    assert!(
        exchange(s.proxy_port, ok.as_bytes(), "\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn tls_naming_another_host_ends_the_tunnel() {
    let s = setup().await;
    let mut c = TcpStream::connect(("127.0.0.1", s.proxy_port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let req = format!("CONNECT allowed.test:{0} HTTP/1.1\r\n\r\n", s.up_port);
    c.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut b = [0u8; 256];
    let _ = c.read(&mut b).await;
    let hello = crate::tls::tests::hello(&[crate::tls::tests::sni_ext("evil.test")]);
    c.write_all(&hello).await.unwrap_or_else(|e| panic!("{e}"));
    // The upstream would echo the hello back; the proxy must not forward it.
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "tunnel stayed open: {n:?}"
    );
    let e = s
        .events
        .wait_for(|e| matches!(e, NetEvent::Deny { .. }))
        .await;
    assert!(
        matches!(e, NetEvent::Deny { ref reason, .. } if reason.contains("evil.test")),
        "{e:?}"
    );
    // The right name passes.
    let mut c = TcpStream::connect(("127.0.0.1", s.proxy_port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = c.read(&mut b).await;
    let hello = crate::tls::tests::hello(&[crate::tls::tests::sni_ext("ALLOWED.test.")]);
    c.write_all(&hello).await.unwrap_or_else(|e| panic!("{e}"));
    let mut got = vec![0u8; hello.len()];
    c.read_exact(&mut got)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, hello);
}

#[tokio::test]
async fn dns_and_transparent_connections() {
    let s = setup().await;
    let udp = UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dns_addr = udp.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(s.proxy.clone().serve_dns_udp(udp));
    let client = UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ask = |name: &str| {
        let mut m = hickory_proto::op::Message::new(
            7,
            hickory_proto::op::MessageType::Query,
            hickory_proto::op::OpCode::Query,
        );
        let n = <hickory_proto::rr::Name as std::str::FromStr>::from_str(name)
            .unwrap_or_else(|e| panic!("{e}"));
        m.add_query(hickory_proto::op::Query::query(
            n,
            hickory_proto::rr::RecordType::A,
        ));
        m.to_vec().unwrap_or_default()
    };
    client
        .send_to(&ask("allowed.test."), dns_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut b = [0u8; 512];
    let n = client.recv(&mut b).await.unwrap_or(0);
    let reply = hickory_proto::op::Message::from_vec(&b[..n]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(reply.answers.len(), 1);
    client
        .send_to(&ask("evil.test."), dns_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let n = client.recv(&mut b).await.unwrap_or(0);
    let reply = hickory_proto::op::Message::from_vec(&b[..n]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        reply.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
    assert!(s.events.all().iter().any(|e| matches!(e, NetEvent::DnsResponse { name, rcode, .. } if name == "evil.test" && rcode == "NXDomain")));

    // allowed.test got 127.100.0.1: a connection there on the rule's port
    // reaches the upstream.
    let l = TcpListener::bind(("127.100.0.1", s.up_port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(s.proxy.clone().serve_transparent(l));
    let mut c = TcpStream::connect(("127.100.0.1", s.up_port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c.write_all(b"ECHO via dns\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut got = [0u8; 14];
    c.read_exact(&mut got)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&got, b"ECHO via dns\r\n");
    // An address the DNS never handed out is refused.
    let l2 = TcpListener::bind(("127.100.0.9", s.up_port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(s.proxy.clone().serve_transparent(l2));
    let mut c = TcpStream::connect(("127.100.0.9", s.up_port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = c.write_all(b"ECHO x").await;
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut got)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
}

/// A keep-alive client's requests to one destination share one upstream
/// connection; a request for another host (even at the same address)
/// gets its own, and every request is its own audit event with its bytes.
#[tokio::test]
async fn upstream_connections_are_reused_only_for_the_same_destination() {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let up_port = l.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = l.accept().await {
            n += 1;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                while let Ok(k) = s.read(&mut b).await {
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&b[..k]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let body = format!("conn{n}");
                        let _ = s
                            .write_all(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                                    body.len()
                                )
                                .as_bytes(),
                            )
                            .await;
                        buf.drain(..end + 4);
                    }
                }
            });
        }
    });
    let mut hosts = BTreeMap::new();
    hosts.insert("a.test".to_string(), "127.0.0.1".to_string());
    hosts.insert("b.test".to_string(), "127.0.0.1".to_string());
    let rules = [
        format!("127.0.0.1:{up_port}"),
        format!("a.test:{up_port}"),
        format!("b.test:{up_port}"),
    ];
    let events = Arc::new(Events::default());
    let proxy = Proxy::new(
        Allowlist::parse(&rules, &hosts).unwrap_or_else(|e| panic!("{e}")),
        events.clone(),
    );
    let pl = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let proxy_port = pl.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(proxy.serve_proxy(pl));

    let mut c = TcpStream::connect(("127.0.0.1", proxy_port))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut answers = Vec::new();
    for host in ["a.test", "a.test", "b.test", "a.test"] {
        let req =
            format!("GET http://{host}:{up_port}/ HTTP/1.1\r\nHost: {host}:{up_port}\r\n\r\n");
        c.write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = Vec::new();
        let mut b = [0u8; 1024];
        while !complete(&String::from_utf8_lossy(&got)) {
            let n = c.read(&mut b).await.unwrap_or(0);
            assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&b[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        answers.push(text.rsplit("\r\n\r\n").next().unwrap_or("").to_string());
    }
    assert_eq!(answers, ["conn1", "conn1", "conn2", "conn3"]);
    for _ in 0..200 {
        if events.all().len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let allows: Vec<_> = events
        .all()
        .into_iter()
        .filter_map(|e| match e {
            NetEvent::Allow {
                host,
                bytes_up,
                bytes_down,
                error,
                ..
            } => Some((host, bytes_up > 0 && bytes_down > 0, error)),
            _ => None,
        })
        .collect();
    assert_eq!(allows.len(), 4, "{allows:?}");
    for (host, bytes, error) in &allows {
        assert!(bytes, "{host}: no bytes counted: {allows:?}");
        assert_eq!(error, &None, "{allows:?}");
    }
}

/// What counts as plain HTTP at the start of a tunnel: any method, after
/// empty lines, and the HTTP/2 preface; not other line protocols.
#[test]
fn plain_http_in_tunnels_is_recognised() {
    let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000));
    let many_crlf = format!("{}GET / HTTP/1.1\r\n", "\r\n".repeat(5000));
    for yes in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"\r\n\r\nGET / HTTP/1.1\r\n",
        b"PROPFIND /x HTTP/1.1\r\n",
        b"MKCOL /x http/1.0\n",
        b"G3T / HTTP/1.1\r\n",
        b"GET / HTTP/1.1 \r\n",
        b"GET / HTTP/1.2\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        // A NUL after the request line does not hide it.
        b"POST / HTTP/1.1\r\nHost: evil\r\nContent-Length: 4\r\n\r\n\0\0\0\0",
        // Past the limit, whatever could still be a request line is one.
        long_line.as_bytes(),
        &long_line.as_bytes()[..8200],
        many_crlf.as_bytes(),
        &many_crlf.as_bytes()[..8200],
    ] {
        assert_eq!(
            plain_http(yes),
            PlainHttp::Yes,
            "{}",
            String::from_utf8_lossy(yes)
        );
    }
    for no in [
        &b"EHLO mail.example\r\n"[..],
        b"OPTIONS rtsp://cam/x RTSP/1.0\r\n",
        b"*1\r\n$4\r\nPING\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"0032git-upload-pack /x\0host=y\0",
        b"\x00\x01binary",
    ] {
        assert_eq!(
            plain_http(no),
            PlainHttp::No,
            "{}",
            String::from_utf8_lossy(no)
        );
    }
    // A request line still arriving is waited for (and a tunnel that never
    // completes it is refused when the first-bytes timeout ends).
    for more in [&b"GET / HTT"[..], b"\r\n", b"PRI * HT", b"GET"] {
        assert_eq!(
            plain_http(more),
            PlainHttp::NeedMore,
            "{}",
            String::from_utf8_lossy(more)
        );
    }
}
