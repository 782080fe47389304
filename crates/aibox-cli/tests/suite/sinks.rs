//! Built-in sinks, end to end: a real rsyslog on loopback receives every
//! event of a real run over UDP, TCP and TLS (RFC 5424, octet-counted on
//! streams), and an HTTP collector receives them as JSON batches, also
//! when it was down for a while (the log is the buffer). The HTTP
//! collector is a small server in this test: any HTTP endpoint taking a
//! JSON POST stands for a SIEM's ingest API, which cannot be had here.

use super::common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

/// rsyslogd in the foreground with its own config: UDP, TCP and TLS
/// inputs, every message written raw to `out`.
struct Rsyslog {
    child: std::process::Child,
    out: std::path::PathBuf,
    ports: (u16, u16, u16),
    ca: std::path::PathBuf,
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Rsyslog {
    fn start(dir: &std::path::Path) -> Rsyslog {
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let (ca, cert, key) = tls_files(&["localhost"]);
        for (n, t) in [("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)] {
            std::fs::write(dir.join(n), t).unwrap();
        }
        let ports = (free_port(), free_port(), free_port());
        let out = dir.join("out.log");
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{d}/work" maxMessageSize="256k"
  DefaultNetstreamDriverCAFile="{d}/ca.pem" DefaultNetstreamDriverCertFile="{d}/cert.pem"
  DefaultNetstreamDriverKeyFile="{d}/key.pem")
module(load="imudp")
module(load="imtcp" MaxSessions="50")
input(type="imudp" address="127.0.0.1" port="{u}" ruleset="all")
input(type="imtcp" address="127.0.0.1" port="{t}" ruleset="all")
input(type="imtcp" address="127.0.0.1" port="{s}" ruleset="tls" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
template(name="raw" type="string" string="%inputname%|%$!via%|%app-name%|%msgid%|%pri%|%timereported:::date-rfc3339%|%msg%\n")
ruleset(name="all") {{
  set $!via = $inputname;
  action(type="omfile" file="{out}" template="raw")
}}
ruleset(name="tls") {{
  set $!via = "tls";
  action(type="omfile" file="{out}" template="raw")
}}
"#,
                d = dir.display(),
                u = ports.0,
                t = ports.1,
                s = ports.2,
                out = out.display()
            ),
        )
        .unwrap();
        let check = std::process::Command::new("rsyslogd")
            .args(["-N1", "-f"])
            .arg(&conf)
            .output()
            .unwrap();
        assert!(check.status.success(), "{}", stderr(&check));
        let child = std::process::Command::new("rsyslogd")
            .args(["-n", "-i"])
            .arg(dir.join("rsyslog.pid"))
            .arg("-f")
            .arg(&conf)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Ready when the TCP port answers.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", ports.1)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Rsyslog {
            child,
            out,
            ports,
            ca: dir.join("ca.pem"),
        }
    }

    /// The received lines, split into (input, msgid, message).
    fn received(&self) -> Vec<(String, String, String)> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.splitn(7, '|');
                let _ = f.next();
                let input = f.next()?.to_string();
                let _app = f.next()?;
                let msgid = f.next()?.to_string();
                let _ = (f.next(), f.next());
                Some((input, msgid, f.next()?.trim_start().to_string()))
            })
            .collect()
    }
}

/// An HTTP collector: records each POSTed JSON array and its bearer
/// token; answers 503 while `down` is set.
/// (Authorization header, events) per accepted POST.
type Batches = Arc<Mutex<Vec<(String, Vec<Value>)>>>;

#[derive(Clone, Default)]
struct Collector {
    batches: Batches,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Collector {
    fn start(&self) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = self.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(&s);
                    let (mut len, mut auth) = (0usize, String::new());
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap_or(0);
                            } else if k.eq_ignore_ascii_case("authorization") {
                                auth = v.trim().to_string();
                            }
                        }
                    }
                    let mut body = vec![0u8; len];
                    let _ = r.read_exact(&mut body);
                    let down = me.down.load(std::sync::atomic::Ordering::SeqCst);
                    if !down && let Ok(Value::Array(events)) = serde_json::from_slice(&body) {
                        me.batches.lock().unwrap().push((auth, events));
                    }
                    let status = if down {
                        "503 Service Unavailable"
                    } else {
                        "200 OK"
                    };
                    let _ = (&s).write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                });
            }
        });
        port
    }

    fn seqs(&self) -> std::collections::BTreeSet<u64> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, b)| b.iter().map(|e| e["seq"].as_u64().unwrap()))
            .collect()
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

both_modes!(events_reach_rsyslog_and_an_http_collector, |mut c: Ctx| {
    let rs = Rsyslog::start(&c.dir.path().join("rsyslog"));
    let col = Collector::default();
    let hp = col.start();
    c.env("AIBOX_TEST_SINK_TOKEN", "sink-token-123");
    c.add_config(&format!(
        "audit:
  sinks:
    - {{name: udp, type: syslog, address: \"udp://127.0.0.1:{}\"}}
    - {{name: tcp, type: syslog, address: \"tcp://127.0.0.1:{}\", facility: auth}}
    - {{name: tls, type: syslog, address: \"tls://localhost:{}\", ca_file: {}}}
    - {{name: http, type: http, url: \"http://127.0.0.1:{hp}/ingest\", token_env: AIBOX_TEST_SINK_TOKEN, batch_max: 2}}
",
        rs.ports.0,
        rs.ports.1,
        rs.ports.2,
        rs.ca.display()
    ));
    let ws = c.ws.display().to_string();
    ok(&c.out(&["run", "-w", &ws, "--name", "shipped", "--", "echo", "hello"]));
    let events = audit_events(&c, "shipped");
    assert!(events.len() >= 6, "{events:?}");
    let hashes: Vec<String> = events
        .iter()
        .map(|e| e["hash"].as_str().unwrap().to_string())
        .collect();
    // Every event, on each input, as its own RFC 5424 message: msgid is
    // the event type, the message the event line itself.
    wait_until("rsyslog to receive every event", || {
        let got = rs.received();
        ["imudp", "imtcp", "tls"].iter().all(|i| {
            let on: Vec<&(String, String, String)> = got.iter().filter(|g| g.0 == *i).collect();
            hashes
                .iter()
                .all(|h| on.iter().any(|g| g.2.contains(h.as_str())))
        })
    });
    for (_, msgid, msg) in rs.received() {
        let v: Value = serde_json::from_str(&msg).unwrap_or_else(|e| panic!("{e}: {msg}"));
        assert_eq!(v["event_type"].as_str(), Some(msgid.as_str()), "{msg}");
    }
    // HTTP: JSON arrays of at most two, with the bearer token.
    let want: std::collections::BTreeSet<u64> = (0..events.len() as u64).collect();
    wait_until("the collector to receive every event", || {
        col.seqs() == want
    });
    for (auth, b) in col.batches.lock().unwrap().iter() {
        assert_eq!(auth, "Bearer sink-token-123");
        assert!(b.len() <= 2);
    }

    // The collector goes down: nothing is lost; what the stopped
    // supervisor could not send goes out with `aibox audit ship`.
    col.down.store(true, std::sync::atomic::Ordering::SeqCst);
    ok(&c.out(&["run", "-w", &ws, "--name", "shipped", "--", "true"]));
    let events = audit_events(&c, "shipped");
    let before = col.seqs().len();
    assert!(before < events.len());
    let o = c.out(&["audit", "ship", "--name", "shipped"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("503"), "{}", stderr(&o));
    col.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let o = ok(&c.out(&["audit", "ship", "--name", "shipped"]));
    assert!(o.contains("http: shipped:"), "{o}");
    let want: std::collections::BTreeSet<u64> = (0..events.len() as u64).collect();
    assert_eq!(col.seqs(), want);

    // A sink that cannot work stops the start, naming it.
    c.clear_env();
    let o = c.out(&["run", "-w", &ws, "--name", "shipped", "--", "true"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("audit.sinks http") && stderr(&o).contains("AIBOX_TEST_SINK_TOKEN"),
        "{}",
        stderr(&o)
    );
});

both_modes!(bad_sinks_are_refused_with_the_field, |c: Ctx| {
    c.add_config("audit:\n  sinks:\n    - {name: x, type: syslog, address: \"514\"}\n");
    let ws = c.ws.display().to_string();
    let o = c.out(&["run", "-w", &ws, "--", "true"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("audit.sinks[0].address") && stderr(&o).contains("udp://HOST:PORT"),
        "{}",
        stderr(&o)
    );
});
