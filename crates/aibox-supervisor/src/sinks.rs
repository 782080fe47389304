//! Ships the sandbox's audit log to the configured sinks (`audit.sinks`)
//! while it runs, and once more at stop so the last events go out too;
//! and archives its sealed segments to the bucket of `audit.storage: s3`
//! as they are sealed (on rotation, and at stop).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aibox_siem::sink::{Deliver, Shipper, SinkConfig};

/// How often a healthy sink looks for new events.
const POLL: Duration = Duration::from_millis(250);

/// Longest wait between retries of a failing sink.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

type Worker = Arc<Mutex<(Shipper, Box<dyn Deliver>, String)>>;

/// The running sinks of one sandbox.
pub(crate) struct Sinks {
    workers: Vec<Worker>,
}

impl Sinks {
    /// Opens every sink (an error names the sink: the start fails rather
    /// than running with a sink silently missing) and starts its thread.
    pub(crate) fn start(
        log: &Path,
        state_dir: &Path,
        sinks: &[SinkConfig],
    ) -> Result<Sinks, String> {
        let mut workers = Vec::new();
        for c in sinks {
            let d = aibox_siem::sink::open(c).map_err(|e| format!("audit sink {}: {e}", c.name))?;
            let w: Worker = Arc::new(Mutex::new((
                Shipper::new(log, state_dir, c),
                d,
                c.name.clone(),
            )));
            let t = w.clone();
            std::thread::Builder::new()
                .name(format!("sink-{}", c.name))
                .spawn(move || run(&t))
                .map_err(|e| format!("audit sink {}: {e}", c.name))?;
            workers.push(w);
        }
        Ok(Sinks { workers })
    }

    /// One last delivery of everything written (at stop).
    pub(crate) fn flush(&self) {
        for w in &self.workers {
            if let Ok(mut g) = w.lock() {
                let (s, d, name) = &mut *g;
                if let Err(e) = s.ship(d.as_mut()) {
                    crate::supervisor::log(&format!(
                        "audit sink {name}: {e} (the rest is sent at the next start or by `aibox audit ship`)"
                    ));
                }
            }
        }
    }
}

/// How often the archiver looks for newly sealed segments.
const ARCHIVE_POLL: Duration = Duration::from_secs(2);

/// Uploads the log's sealed segments to the bucket.
pub(crate) struct Archiver {
    /// Opened on first use, and again after the bucket could not be
    /// reached at start.
    archive: Mutex<Option<aibox_siem::archive::Archive>>,
    config: aibox_siem::archive::S3Config,
    keys: Option<aibox_siem::archive::S3Keys>,
    log: std::path::PathBuf,
    sandbox: String,
    state: std::path::PathBuf,
    /// The last attempt failed: the stop does not wait on the bucket
    /// again (what is pending goes at the next start or with `aibox audit
    /// ship`).
    failing: std::sync::atomic::AtomicBool,
}

impl Archiver {
    /// Starts the thread that uploads segments as they are sealed.
    pub(crate) fn start(
        log: &Path,
        state_dir: &Path,
        sandbox: &str,
        c: &aibox_siem::archive::S3Config,
        keys: Option<&aibox_siem::archive::S3Keys>,
    ) -> Result<Arc<Archiver>, String> {
        let a = Arc::new(Archiver {
            archive: Mutex::new(None),
            config: c.clone(),
            keys: keys.cloned(),
            log: log.to_path_buf(),
            sandbox: sandbox.to_string(),
            state: state_dir.to_path_buf(),
            failing: std::sync::atomic::AtomicBool::new(false),
        });
        let t = a.clone();
        std::thread::Builder::new()
            .name("archive".into())
            .spawn(move || {
                use std::sync::atomic::Ordering;
                // (Refusals are logged when they change, not every poll.)
                let mut refused_before = 0;
                loop {
                    let failing = t.failing.load(Ordering::SeqCst);
                    match t.upload() {
                        Ok(r) => {
                            if failing {
                                crate::supervisor::log("audit storage: archiving again");
                                t.failing.store(false, Ordering::SeqCst);
                            }
                            if r.refused.len() != refused_before {
                                for e in &r.refused {
                                    crate::supervisor::log(&format!("audit storage: {e}"));
                                }
                                refused_before = r.refused.len();
                            }
                        }
                        Err(e) => {
                            if !failing {
                                crate::supervisor::log(&format!("audit storage: {e}; retrying"));
                            }
                            t.failing.store(true, Ordering::SeqCst);
                        }
                    }
                    let failing = t.failing.load(Ordering::SeqCst);
                    std::thread::sleep(if failing { MAX_BACKOFF } else { ARCHIVE_POLL });
                }
            })
            .map_err(|e| format!("audit storage: {e}"))?;
        Ok(a)
    }

    fn upload(&self) -> Result<aibox_siem::archive::UploadReport, String> {
        let mut g = self
            .archive
            .lock()
            .map_err(|_| "archiver poisoned".to_string())?;
        if g.is_none() {
            *g = Some(
                aibox_siem::archive::Archive::open_with(&self.config, self.keys.as_ref())
                    .map_err(|e| e.to_string())?,
            );
        }
        match g.as_ref() {
            Some(a) => a.upload_pending(&self.log, &self.sandbox, &self.state),
            None => Ok(aibox_siem::archive::UploadReport::default()),
        }
    }

    /// Uploads what was sealed at stop (unless the bucket was failing:
    /// the stop does not wait on it).
    pub(crate) fn flush(&self) {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            crate::supervisor::log(
                "audit storage: the bucket was failing; the segment sealed at stop is archived at the next start or by `aibox audit ship`",
            );
            return;
        }
        if let Err(e) = self.upload() {
            crate::supervisor::log(&format!(
                "audit storage: {e} (the rest is archived at the next start or by `aibox audit ship`)"
            ));
        }
    }
}

fn run(w: &Worker) {
    let mut backoff = POLL;
    let mut failing = false;
    loop {
        let r = match w.lock() {
            Ok(mut g) => {
                let (s, d, name) = &mut *g;
                s.ship(d.as_mut()).map_err(|e| (name.clone(), e))
            }
            Err(_) => return,
        };
        match r {
            Ok(_) => {
                if failing {
                    crate::supervisor::log("audit sink delivering again");
                }
                failing = false;
                backoff = POLL;
            }
            Err((name, e)) => {
                if !failing {
                    crate::supervisor::log(&format!("audit sink {name}: {e}; retrying"));
                }
                failing = true;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        std::thread::sleep(backoff);
    }
}
