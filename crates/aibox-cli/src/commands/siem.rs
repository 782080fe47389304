//! `aibox metrics …` and `aibox siem export`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::args::{MetricsCmd, SiemCmd};

/// Metrics state: what was read of the logs so far.
struct Scraper {
    loaded: aibox_config::Loaded,
    state: Mutex<(aibox_siem::metrics::Follower, aibox_siem::metrics::Metrics)>,
}

impl Scraper {
    /// Reads what the logs gained and renders the exposition. Which
    /// sandboxes run is asked of their supervisors, not guessed from logs.
    fn scrape(&self) -> String {
        let running: BTreeSet<String> =
            aibox_supervisor::client::list(&self.loaded.runtime_dir(), &self.loaded.data_dir())
                .into_iter()
                .filter(|l| l.alive)
                .map(|l| l.paths.name)
                .collect();
        let Ok(mut st) = self.state.lock() else {
            return String::new();
        };
        let (follower, metrics) = &mut *st;
        follower.poll(&self.loaded.data_dir().join("audit"), metrics);
        metrics.render(Some(&running))
    }
}

pub fn metrics(cli_config: Option<PathBuf>, cmd: MetricsCmd) -> Result<i32> {
    let (loaded, _) = super::load_config(cli_config)?;
    let s = Scraper {
        loaded,
        state: Mutex::new(Default::default()),
    };
    match cmd {
        MetricsCmd::Show => {
            print!("{}", s.scrape());
            Ok(0)
        }
        MetricsCmd::Serve { listen } => {
            let l = std::net::TcpListener::bind(&listen).with_context(|| {
                format!("listening on {listen} (give another address with --listen HOST:PORT)")
            })?;
            eprintln!(
                "aibox: serving metrics on http://{}/metrics",
                l.local_addr().map(|a| a.to_string()).unwrap_or(listen)
            );
            let s = std::sync::Arc::new(s);
            // A few scrapers at a time; more are turned away at once.
            let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for conn in l.incoming().flatten() {
                use std::sync::atomic::Ordering;
                if busy.fetch_add(1, Ordering::SeqCst) >= 16 {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                let (s, busy) = (s.clone(), busy.clone());
                std::thread::spawn(move || {
                    serve_one(&s, conn);
                    busy.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Ok(0)
        }
    }
}

/// Answers one HTTP/1.x request: `GET /metrics`, else 404/405.
fn serve_one(s: &Scraper, conn: std::net::TcpStream) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(std::time::Duration::from_secs(10)));
    // A request is a few short lines: 16 KiB at most is read.
    let mut r = BufReader::new(std::io::Read::take(&conn, 16 << 10));
    let mut first = String::new();
    if r.read_line(&mut first).is_err() {
        return;
    }
    // Headers are read and ignored (bounded: a request is a few lines).
    for _ in 0..100 {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" || h == "\n" => break,
            Ok(_) => {}
        }
    }
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            s.scrape(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "aibox serves /metrics only\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
        ),
    };
    let mut w = &conn;
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        let _ = w.write_all(body.as_bytes());
    }
}

pub fn siem(cli_config: Option<PathBuf>, cmd: SiemCmd) -> Result<i32> {
    let (loaded, _) = super::load_config(cli_config)?;
    let SiemCmd::Export { target } = cmd;
    let c = &loaded.config;
    let thresholds = c
        .audit
        .detection
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mode = serde_json::to_value(c.audit.llm_logging_mode)?
        .as_str()
        .unwrap_or("hash")
        .to_string();
    let ctx = aibox_siem::artefacts::Context {
        thresholds,
        audit_dir: loaded.data_dir().join("audit").display().to_string(),
        decisions_dir: loaded.data_dir().join("decisions").display().to_string(),
        llm_logging_mode: mode,
        proxy: (c.network.proxy_addr.clone(), c.network.proxy_port),
        dns: (c.network.dns_addr.clone(), c.network.dns_port),
    };
    let files = aibox_siem::artefacts::all(&ctx)?;
    if target.exists() && !target.is_dir() {
        bail!(
            "{} exists and is not a directory; give a directory with --target",
            target.display()
        );
    }
    // Everything is rendered before anything is written: a failure leaves
    // no half-written set behind.
    for f in &files {
        let p = target.join(f.name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::write(&p, &f.content).with_context(|| format!("writing {}", p.display()))?;
        println!("{}", p.display());
    }
    Ok(0)
}
