//! Ships the sandbox's audit log to the configured sinks (`audit.sinks`)
//! while it runs, and once more at stop so the last events go out too.

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
