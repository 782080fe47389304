//! Load generator for the proxy benchmark (`bench/proxy.sh`): N workers,
//! each repeatedly opening a `CONNECT` tunnel through an HTTP proxy,
//! doing a TLS handshake with the target inside it, one `GET`, and
//! closing. Prints one JSON line: requests/s and latency percentiles of
//! the whole exchange.
//!
//! usage: connect_load PROXY TARGET_HOST:PORT CA_PEM CONNECTIONS SECONDS

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

fn one(
    proxy: &str,
    target: &str,
    name: &ServerName<'static>,
    config: &Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let mut s = TcpStream::connect(proxy).map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).map_err(|e| format!("read: {e}"))? == 0 {
            return Err("proxy closed".into());
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(format!("proxy said {}", String::from_utf8_lossy(&head)));
    }
    let conn =
        rustls::ClientConnection::new(config.clone(), name.clone()).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("tls write: {e}"))?;
    let mut body = Vec::new();
    match tls.read_to_end(&mut body) {
        Ok(_) => {}
        // A server that closes without close_notify still answered.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !body.is_empty() => {}
        Err(e) => return Err(format!("tls read: {e}")),
    }
    if body.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err("no 200 from the target".into())
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("connect_load: {e}");
        std::process::exit(2);
    }
}

type Outcome = (Vec<Duration>, u64, Option<String>);

fn run() -> Result<(), String> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        return Err("usage: connect_load PROXY TARGET_HOST:PORT CA_PEM CONNECTIONS SECONDS".into());
    }
    let (proxy, target) = (a[1].clone(), a[2].clone());
    let ca = CertificateDer::from_pem_file(&a[3]).map_err(|e| format!("reading the CA: {e}"))?;
    let conns: usize = a[4].parse().map_err(|_| "CONNECTIONS must be a number")?;
    let secs: u64 = a[5].parse().map_err(|_| "SECONDS must be a number")?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| format!("adding the CA: {e}"))?;
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h);
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let workers: Vec<std::thread::JoinHandle<Outcome>> = (0..conns)
        .map(|_| {
            let (proxy, target, name, config) =
                (proxy.clone(), target.clone(), name.clone(), config.clone());
            std::thread::spawn(move || {
                let (mut lat, mut errors, mut first_error) = (Vec::new(), 0u64, None);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match one(&proxy, &target, &name, &config) {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
                (lat, errors, first_error)
            })
        })
        .collect();
    let (mut lat, mut errors, mut first_error) = (Vec::new(), 0, None);
    for w in workers {
        let (l, e, f) = w.join().map_err(|_| "a worker panicked")?;
        lat.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{{\"connections\":{conns},\"requests\":{},\"errors\":{errors},\"rps\":{:.1},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"first_error\":{:?}}}",
        lat.len(),
        lat.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        first_error.unwrap_or_default()
    );
    Ok(())
}
