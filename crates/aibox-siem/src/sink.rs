//! Built-in sinks: syslog (RFC 5424 over UDP, TCP or TLS, octet-counted
//! framing on streams as RFC 6587/5425 describe) and HTTP (JSON arrays of
//! events, retried). Small teams need no Vector for either.
//!
//! The audit log itself is the disk buffer: a [`Shipper`] keeps, per sink
//! and log, the byte offset delivered so far (with the log's inode) in a
//! small cursor file, and reads on from there. Nothing is lost while a
//! collector is down or aibox is not running; what was sent before a crash
//! and not yet recorded is sent again (at-least-once; every event carries
//! its `seq` and `hash` to deduplicate on).

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How long a connection or a request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Largest UDP datagram sent; longer messages are cut (streams are not).
const UDP_MAX: usize = 65_000;

/// One configured sink (`audit.sinks[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// A name for messages and the cursor file (`[a-z0-9_-]`).
    pub name: String,
    /// `syslog` or `http`.
    #[serde(rename = "type")]
    pub kind: SinkKind,
    /// syslog: `udp://host:port`, `tcp://host:port` or `tls://host:port`.
    #[serde(default)]
    pub address: String,
    /// http: the URL events are POSTed to.
    #[serde(default)]
    pub url: String,
    /// Extra CA certificates (PEM) for TLS and HTTPS.
    #[serde(default)]
    pub ca_file: String,
    /// http: an environment variable holding a bearer token.
    #[serde(default)]
    pub token_env: String,
    /// syslog facility name (default `local0`).
    #[serde(default)]
    pub facility: String,
    /// Most events per delivery (default 500).
    #[serde(default)]
    pub batch_max: usize,
}

/// Sink types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// RFC 5424 syslog.
    Syslog,
    /// JSON over HTTP(S).
    Http,
}

/// A sink setting that cannot work: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit.sinks[{index}].{field}: {reason}")]
pub struct SinkError {
    /// Position in `audit.sinks`.
    pub index: usize,
    /// The field.
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub reason: String,
}

fn facility_code(name: &str) -> Option<u8> {
    Some(match name {
        "" | "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        "auth" => 4,
        "authpriv" => 10,
        "daemon" => 3,
        "user" => 1,
        _ => return None,
    })
}

/// Checks every sink; names must be unique.
pub fn check(sinks: &[SinkConfig]) -> Result<(), SinkError> {
    for (index, s) in sinks.iter().enumerate() {
        let bad = |field, reason: String| SinkError {
            index,
            field,
            reason,
        };
        if s.name.is_empty()
            || s.name.len() > 64
            || !s
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(bad(
                "name",
                "give a name of lowercase letters, digits, - and _".into(),
            ));
        }
        if sinks[..index].iter().any(|o| o.name == s.name) {
            return Err(bad("name", format!("{:?} is used by another sink", s.name)));
        }
        match s.kind {
            SinkKind::Syslog => {
                parse_address(&s.address).map_err(|r| bad("address", r))?;
                if facility_code(&s.facility).is_none() {
                    return Err(bad(
                        "facility",
                        format!(
                            "{:?} is not a facility (local0…local7, auth, authpriv, daemon, user)",
                            s.facility
                        ),
                    ));
                }
            }
            SinkKind::Http => {
                let l = s.url.to_ascii_lowercase();
                let local = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
                    .iter()
                    .any(|p| l.starts_with(p));
                if !(l.starts_with("https://") || local) {
                    return Err(bad(
                        "url",
                        format!(
                            "{:?}: events go out over https:// (plain http only to this machine)",
                            s.url
                        ),
                    ));
                }
            }
        }
        if !s.ca_file.is_empty() && !s.ca_file.starts_with('/') {
            return Err(bad("ca_file", "must be an absolute path".into()));
        }
    }
    Ok(())
}

/// Syslog transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
    Tls,
}

fn parse_address(a: &str) -> Result<(Transport, String, u16), String> {
    let (t, rest) = if let Some(r) = a.strip_prefix("udp://") {
        (Transport::Udp, r)
    } else if let Some(r) = a.strip_prefix("tcp://") {
        (Transport::Tcp, r)
    } else if let Some(r) = a.strip_prefix("tls://") {
        (Transport::Tls, r)
    } else {
        return Err(format!(
            "{a:?} is not udp://HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT"
        ));
    };
    let (host, port) = rest
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .filter(|(h, p)| !h.is_empty() && *p != 0)
        .ok_or_else(|| format!("{a:?} needs a host and a port"))?;
    Ok((
        t,
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    ))
}

/// The RFC 5424 message of one event line:
/// `<PRI>1 TIMESTAMP HOST aibox - EVENT_TYPE [origin …] JSON`. The
/// timestamp keeps microseconds (the most RFC 5424 allows).
pub fn rfc5424(line: &str, facility: u8, hostname: &str) -> String {
    let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
    let sev = match v["severity"].as_str() {
        Some("critical") => 2,
        Some("high") => 3,
        Some("warning") => 4,
        _ => 6,
    };
    let ts = v["timestamp"]
        .as_str()
        .map(|t| match (t.find('.'), t.strip_suffix('Z')) {
            (Some(dot), Some(body)) => {
                let frac: String = body[dot + 1..].chars().take(6).collect();
                format!("{}.{frac}Z", &body[..dot])
            }
            _ => t.to_string(),
        })
        .unwrap_or_else(|| "-".into());
    let msgid: String = v["event_type"]
        .as_str()
        .unwrap_or("-")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    let host: String = hostname
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    format!(
        "<{}>1 {ts} {} aibox - {} [origin software=\"aibox\" swVersion=\"{}\"] {line}",
        u16::from(facility) * 8 + sev,
        if host.is_empty() { "-" } else { &host },
        if msgid.is_empty() { "-" } else { &msgid },
        env!("CARGO_PKG_VERSION"),
    )
}

pub(crate) fn tls_config(ca_file: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if !ca_file.is_empty() {
        let pem = std::fs::read(ca_file).map_err(|e| format!("reading {ca_file}: {e}"))?;
        for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let c: rustls::pki_types::CertificateDer<'static> =
                c.map_err(|e| format!("{ca_file}: {e}"))?;
            roots.add(c).map_err(|e| format!("{ca_file}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A sink ready to deliver batches of event lines.
pub trait Deliver: Send {
    /// Delivers `lines` (complete event lines without newlines) in order;
    /// an error means none of them may be counted as delivered.
    fn deliver(&mut self, lines: &[&str]) -> Result<(), String>;
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(b),
            Stream::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// RFC 5424 syslog over UDP, TCP or TLS.
pub struct Syslog {
    transport: Transport,
    host: String,
    port: u16,
    facility: u8,
    hostname: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    stream: Option<Stream>,
}

impl std::fmt::Debug for Syslog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Syslog({}:{})", self.host, self.port)
    }
}

impl Syslog {
    /// A syslog sink for `c` (checked by [`check`]).
    pub fn new(c: &SinkConfig) -> Result<Syslog, String> {
        let (transport, host, port) = parse_address(&c.address)?;
        let tls = (transport == Transport::Tls)
            .then(|| tls_config(&c.ca_file))
            .transpose()?;
        Ok(Syslog {
            transport,
            host,
            port,
            facility: facility_code(&c.facility).unwrap_or(16),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            tls,
            stream: None,
        })
    }

    /// The collector's addresses: a name looked up with a deadline, IPv4
    /// first (a name such as `localhost` often lists `::1` first, and
    /// collectors often listen on IPv4 only); an IPv6 literal (zone ids
    /// included) as it is, with no lookup.
    fn addresses(&self) -> Result<Vec<std::net::SocketAddr>, String> {
        let mut addrs: Vec<std::net::SocketAddr> = if self.host.contains(':') {
            // Numeric only, so the system's resolver has nothing to look up.
            let bare = self.host.split('%').next().unwrap_or_default();
            if bare.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{} is not an IPv6 address", self.host));
            }
            std::net::ToSocketAddrs::to_socket_addrs(&(self.host.as_str(), self.port))
                .map_err(|e| format!("{}: {e}", self.host))?
                .collect()
        } else {
            aibox_core::resolve_within(&format!("{}:{}", self.host, self.port), TIMEOUT)
                .map_err(|e| format!("resolving {}: {e}", self.host))?
        };
        addrs.sort_by_key(std::net::SocketAddr::is_ipv6);
        if addrs.is_empty() {
            return Err(format!("{} has no address", self.host));
        }
        Ok(addrs)
    }

    /// A TCP connection to the first of the collector's addresses that
    /// takes one.
    fn connect(&self) -> Result<Stream, String> {
        let mut last = String::new();
        let mut connected = None;
        for addr in self.addresses()? {
            match TcpStream::connect_timeout(&addr, TIMEOUT) {
                Ok(s) => {
                    connected = Some(s);
                    break;
                }
                Err(e) => last = format!("connecting to {addr}: {e}"),
            }
        }
        let s = connected.ok_or(last)?;
        let _ = s.set_write_timeout(Some(TIMEOUT));
        match &self.tls {
            None => Ok(Stream::Plain(s)),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{}: {e}", self.host))?;
                let conn =
                    rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())?;
                let mut tls = rustls::StreamOwned::new(conn, s);
                // Handshake now, so a bad certificate is this error.
                while tls.conn.is_handshaking() {
                    tls.conn
                        .complete_io(&mut tls.sock)
                        .map_err(|e| format!("TLS with {}: {e}", self.host))?;
                }
                Ok(Stream::Tls(Box::new(tls)))
            }
        }
    }
}

impl Deliver for Syslog {
    fn deliver(&mut self, lines: &[&str]) -> Result<(), String> {
        if self.transport == Transport::Udp {
            // The first address a socket of its family can be connected to.
            let mut last = String::new();
            let mut connected = None;
            for addr in self.addresses()? {
                let bound = UdpSocket::bind(if addr.is_ipv6() {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                });
                match bound.and_then(|s| s.connect(addr).map(|()| s)) {
                    Ok(s) => {
                        connected = Some(s);
                        break;
                    }
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
            let sock = connected.ok_or(last)?;
            for l in lines {
                let m = rfc5424(l, self.facility, &self.hostname);
                let b = &m.as_bytes()[..m.len().min(UDP_MAX)];
                sock.send(b).map_err(|e| format!("sending: {e}"))?;
            }
            return Ok(());
        }
        let mut buf = Vec::new();
        for l in lines {
            let m = rfc5424(l, self.facility, &self.hostname);
            // Octet counting: "LEN SP MSG".
            let _ = write!(buf, "{} {m}", m.len());
        }
        if self.stream.is_none() {
            self.stream = Some(self.connect()?);
        }
        let r = match self.stream.as_mut() {
            Some(s) => s.write_all(&buf).and_then(|()| s.flush()),
            None => Ok(()),
        };
        if let Err(e) = r {
            // The next try reconnects; this batch counts as not sent.
            self.stream = None;
            return Err(format!("sending to {}:{}: {e}", self.host, self.port));
        }
        Ok(())
    }
}

/// JSON arrays of events POSTed over HTTP(S).
pub struct Http {
    url: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Http({})", self.url)
    }
}

impl Http {
    /// An HTTP sink for `c` (checked by [`check`]).
    pub fn new(c: &SinkConfig) -> Result<Http, String> {
        let token = if c.token_env.is_empty() {
            None
        } else {
            Some(std::env::var(&c.token_env).map_err(|_| {
                format!(
                    "sink {}: ${} (token_env) is not set; export it before starting aibox",
                    c.name, c.token_env
                )
            })?)
        };
        Ok(Http {
            url: c.url.clone(),
            token,
            agent: ureq::AgentBuilder::new()
                .tls_config(tls_config(&c.ca_file)?)
                .timeout(TIMEOUT)
                .resolver(|n: &str| aibox_core::resolve_within(n, TIMEOUT))
                .redirects(0)
                .build(),
        })
    }
}

impl Deliver for Http {
    fn deliver(&mut self, lines: &[&str]) -> Result<(), String> {
        let mut body = String::from("[");
        // A line that is not a JSON object is not an event (only someone
        // writing into the data directory makes one): it would spoil the
        // batch, and every batch after it, so it is left out.
        let events = lines
            .iter()
            .filter(|l| serde_json::from_str::<serde_json::Map<String, Value>>(l).is_ok());
        for (i, l) in events.enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(l);
        }
        body.push(']');
        if body == "[]" {
            return Ok(());
        }
        let mut req = self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/json");
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.send_string(&body) {
            Ok(r) if (200..300).contains(&r.status()) => Ok(()),
            Ok(r) => Err(format!("{} answered {}", self.url, r.status())),
            Err(ureq::Error::Status(code, _)) => Err(format!("{} answered {code}", self.url)),
            Err(e) => Err(format!("posting to {}: {}", self.url, e.kind())),
        }
    }
}

/// Opens the sink `c` describes.
pub fn open(c: &SinkConfig) -> Result<Box<dyn Deliver>, String> {
    Ok(match c.kind {
        SinkKind::Syslog => Box::new(Syslog::new(c)?),
        SinkKind::Http => Box::new(Http::new(c)?),
    })
}

/// Where a sink has got to in one log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    inode: u64,
    /// SHA-256 of the file's first line (empty while it had none): a new
    /// chain in a reused inode is another file.
    #[serde(default)]
    first: String,
    offset: u64,
    /// `hash` of the last event delivered: where to go on when the file
    /// cannot be found by inode.
    #[serde(default)]
    last_hash: String,
}

/// SHA-256 (hex) of the first line of `f`, if it has a whole one.
fn first_line_hash(f: &mut std::fs::File) -> Option<String> {
    use sha2::Digest;
    f.seek(SeekFrom::Start(0)).ok()?;
    // Read only as far as the first newline (an event is a few KiB).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while buf.len() < (1 << 20) {
        let n = f.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            return Some(hex::encode(sha2::Sha256::digest(&buf[..end])));
        }
    }
    None
}

/// Delivers one log to one sink from where it last got to.
#[derive(Debug)]
pub struct Shipper {
    log: PathBuf,
    cursor_file: PathBuf,
    batch_max: usize,
}

impl Shipper {
    /// A shipper of `log`, keeping its cursor in `state_dir`
    /// (`<state_dir>/<sink>/<log file name>.cursor`).
    pub fn new(log: &Path, state_dir: &Path, sink: &SinkConfig) -> Shipper {
        let file = log
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Shipper {
            log: log.to_path_buf(),
            cursor_file: state_dir.join(&sink.name).join(format!("{file}.cursor")),
            batch_max: if sink.batch_max == 0 {
                500
            } else {
                sink.batch_max
            },
        }
    }

    fn load(&self) -> Cursor {
        std::fs::read_to_string(&self.cursor_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn save(&self, c: &Cursor) -> Result<(), String> {
        if let Some(d) = self.cursor_file.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let text = serde_json::to_string(c).map_err(|e| e.to_string())?;
        // Never through a link planted in the data directory.
        aibox_core::replace_private_file(&self.cursor_file, text.as_bytes())
            .map_err(|e| format!("{}: {e}", self.cursor_file.display()))
    }

    /// Where the cursor's file is in `files`: (index, offset).
    fn find(&self, files: &[PathBuf], cur: &Cursor) -> Option<(usize, u64)> {
        for (i, p) in files.iter().enumerate() {
            let Ok(mut f) = std::fs::File::open(p) else {
                continue;
            };
            let Ok(meta) = f.metadata() else { continue };
            if meta.ino() != cur.inode {
                continue;
            }
            let first = first_line_hash(&mut f).unwrap_or_default();
            // A file that had no whole line yet when the cursor was saved.
            if first == cur.first || (cur.first.is_empty() && meta.len() >= cur.offset) {
                return Some((i, cur.offset));
            }
        }
        None
    }

    /// Where the line with hash `hash` ends in `files`, if it is there.
    fn find_hash(files: &[PathBuf], hash: &str) -> Option<(usize, u64)> {
        let needle = format!("\"hash\":\"{hash}\"");
        for (i, p) in files.iter().enumerate() {
            let data = std::fs::read(p).ok()?;
            let mut at = 0usize;
            for line in data.split(|b| *b == b'\n') {
                let next = at + line.len() + 1;
                if line.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    return Some((i, next.min(data.len()) as u64));
                }
                at = next;
            }
        }
        None
    }

    /// Sends what the log gained since the cursor, in batches; returns how
    /// many events went out. Stops at the first failed delivery (the
    /// cursor stays before it). The log's sealed segments count: a file
    /// sealed (moved) since the last call is finished first, then the
    /// files after it.
    pub fn ship(&self, sink: &mut dyn Deliver) -> Result<u64, String> {
        let cur = self.load();
        let mut files = aibox_audit::segments::files(&self.log);
        let mut at = self.find(&files, &cur);
        if at.is_none() && cur != Cursor::default() {
            // Sealed between listing and looking: list again.
            files = aibox_audit::segments::files(&self.log);
            at = self.find(&files, &cur);
            if at.is_none() && !cur.last_hash.is_empty() {
                at = Self::find_hash(&files, &cur.last_hash);
            }
        }
        // Never delivered before, or the chain is another one: from the
        // start (at-least-once).
        let (start, offset) = at.unwrap_or((0, 0));
        let mut sent = 0;
        for (i, p) in files.iter().enumerate().skip(start) {
            sent += self.ship_file(p, if i == start { offset } else { 0 }, &cur.last_hash, sink)?;
        }
        Ok(sent)
    }

    /// Sends the whole lines of `path` from `offset` on.
    fn ship_file(
        &self,
        path: &Path,
        offset: u64,
        last_hash: &str,
        sink: &mut dyn Deliver,
    ) -> Result<u64, String> {
        /// Longest line read; an event is far smaller.
        const WINDOW: u64 = 64 << 20;
        let Ok(mut f) = std::fs::File::open(path) else {
            return Ok(0);
        };
        let meta = f.metadata().map_err(|e| e.to_string())?;
        let mut cur = Cursor {
            inode: meta.ino(),
            first: first_line_hash(&mut f).unwrap_or_default(),
            offset: offset.min(meta.len()),
            last_hash: last_hash.to_string(),
        };
        // Recorded even when nothing is sent: the cursor moves to this file.
        self.save(&cur)?;
        let mut sent = 0;
        while cur.offset < meta.len() {
            f.seek(SeekFrom::Start(cur.offset))
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            (&mut f)
                .take((meta.len() - cur.offset).min(WINDOW))
                .read_to_end(&mut buf)
                .map_err(|e| e.to_string())?;
            let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
                if meta.len() - cur.offset > WINDOW {
                    return Err(format!(
                        "{}: a line longer than 64 MiB at byte {} (not an event; run `aibox audit verify`)",
                        path.display(),
                        cur.offset
                    ));
                }
                // A line still being written.
                break;
            };
            // Offsets count raw bytes; what is sent is the text.
            let raw: Vec<&[u8]> = buf[..end].split(|b| *b == b'\n').collect();
            for batch in raw.chunks(self.batch_max) {
                let texts: Vec<String> = batch
                    .iter()
                    .map(|l| String::from_utf8_lossy(l).into_owned())
                    .collect();
                let lines: Vec<&str> = texts.iter().map(String::as_str).collect();
                sink.deliver(&lines)?;
                cur.offset += batch.iter().map(|l| l.len() as u64 + 1).sum::<u64>();
                if let Some(h) = texts.iter().rev().find_map(|t| hash_of(t)) {
                    cur.last_hash = h;
                }
                sent += batch.len() as u64;
                self.save(&cur)?;
            }
        }
        Ok(sent)
    }
}

/// The `hash` field of an event line.
fn hash_of(line: &str) -> Option<String> {
    let at = line.find("\"hash\":\"")? + 8;
    let h = line.get(at..at + 64)?;
    h.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syslog_lines_follow_rfc5424() {
        let line = r#"{"event_type":"network.deny","severity":"warning","timestamp":"2026-11-29T13:40:47.123456789Z"}"#;
        let m = rfc5424(line, 16, "host1");
        assert_eq!(
            m,
            format!(
                "<132>1 2026-11-29T13:40:47.123456Z host1 aibox - network.deny [origin software=\"aibox\" swVersion=\"{}\"] {line}",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn bad_sinks_are_named() {
        let s = |kind, address: &str, url: &str| SinkConfig {
            name: "a".into(),
            kind,
            address: address.into(),
            url: url.into(),
            ca_file: String::new(),
            token_env: String::new(),
            facility: String::new(),
            batch_max: 0,
        };
        assert_eq!(check(&[s(SinkKind::Syslog, "udp://h:514", "")]), Ok(()));
        let e = check(&[s(SinkKind::Syslog, "h:514", "")]).unwrap_err();
        assert_eq!((e.index, e.field), (0, "address"));
        let e = check(&[s(SinkKind::Http, "", "http://collector.example/x")]).unwrap_err();
        assert_eq!(e.field, "url");
        let e = check(&[
            s(SinkKind::Http, "", "https://c/x"),
            s(SinkKind::Http, "", "https://c/y"),
        ])
        .unwrap_err();
        assert_eq!((e.index, e.field), (1, "name"));
    }

    struct Flaky {
        got: Vec<String>,
        fail_after: usize,
    }

    impl Deliver for Flaky {
        fn deliver(&mut self, lines: &[&str]) -> Result<(), String> {
            if self.got.len() + lines.len() > self.fail_after {
                return Err("down".into());
            }
            self.got.extend(lines.iter().map(|l| l.to_string()));
            Ok(())
        }
    }

    #[test]
    fn the_cursor_survives_failures_and_new_chains() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("s.jsonl");
        let text: String = (0..10).map(|i| format!("{{\"seq\":{i}}}\n")).collect();
        std::fs::write(&log, &text).unwrap();
        let cfg = SinkConfig {
            name: "t".into(),
            kind: SinkKind::Http,
            address: String::new(),
            url: String::new(),
            ca_file: String::new(),
            token_env: String::new(),
            facility: String::new(),
            batch_max: 3,
        };
        let sh = Shipper::new(&log, d.path(), &cfg);
        let mut sink = Flaky {
            got: Vec::new(),
            fail_after: 7,
        };
        assert!(sh.ship(&mut sink).is_err());
        assert_eq!(sink.got.len(), 6);
        sink.fail_after = 100;
        assert_eq!(sh.ship(&mut sink), Ok(4));
        assert_eq!(sink.got.len(), 10);
        assert_eq!(sink.got[6], "{\"seq\":6}");
        // A torn last line waits; a new file starts over.
        std::fs::write(&log, format!("{text}{{\"seq\":10}}\n{{\"se")).unwrap();
        assert_eq!(sh.ship(&mut sink), Ok(1));
        std::fs::remove_file(&log).unwrap();
        std::fs::write(&log, "{\"seq\":0,\"chain\":2}\n").unwrap();
        assert_eq!(sh.ship(&mut sink), Ok(1));
        // Sealed (moved into a segment) and continued in a new file: the
        // rest of the old file, then the new one.
        std::fs::write(&log, "{\"seq\":0,\"chain\":2}\n{\"seq\":1}\n").unwrap();
        let seg = aibox_audit::segments::segments_dir(&log);
        std::fs::create_dir_all(&seg).unwrap();
        let (sha, bytes) = aibox_audit::segments::digest(&log).unwrap();
        std::fs::rename(&log, seg.join("000000000000-000000000001.jsonl")).unwrap();
        let entry = serde_json::json!({
            "segment": "000000000000-000000000001.jsonl", "first_seq": 0, "last_seq": 1,
            "first_prev_hash": "0", "last_hash": "1", "bytes": bytes, "sha256": sha,
            "sealed_at": "t", "reason": "stop",
        });
        std::fs::write(
            aibox_audit::segments::manifest_path(&log),
            format!("{entry}\n"),
        )
        .unwrap();
        std::fs::write(&log, "{\"seq\":2}\n").unwrap();
        assert_eq!(sh.ship(&mut sink), Ok(2));
        assert_eq!(
            sink.got[sink.got.len() - 2..],
            ["{\"seq\":1}", "{\"seq\":2}"]
        );
    }
}
