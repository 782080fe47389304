//! Session recording: starting one for `aibox shell`, and `aibox
//! recording list | play | export`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aibox_config::RecordingMode;
use aibox_recording::{Recorder, RecordingKey};
use anyhow::{Context, Result, bail};

use crate::args::{Format, RecordingCmd};

/// The recording key: `audit.recording_key_path`, by default beside the
/// user config file; never in the data directory with the recordings.
fn key_path(loaded: &aibox_config::Loaded, sources: &aibox_config::Sources) -> Result<PathBuf> {
    let p = &loaded.config.audit.recording_key_path;
    let key = if p.is_empty() {
        sources
            .user_file
            .parent()
            .map(|d| d.join("recording.key"))
            .context("the user config file has no directory to keep the recording key in; set audit.recording_key_path")?
    } else {
        PathBuf::from(p)
    };
    if key.starts_with(loaded.data_dir()) {
        bail!(
            "audit.recording_key_path {} is in the data directory with the recordings it protects; keep it elsewhere",
            key.display()
        );
    }
    Ok(key)
}

fn recordings_dir(loaded: &aibox_config::Loaded) -> PathBuf {
    loaded.data_dir().join("recordings")
}

/// The recorder as the client's terminal relay sees it; `required`: a
/// recording that fails ends the session.
struct RecTap(Mutex<Option<Recorder>>, bool);

impl aibox_supervisor::client::Tap for RecTap {
    fn output(&self, data: &[u8]) {
        if let Ok(mut r) = self.0.lock()
            && let Some(r) = r.as_mut()
        {
            r.output(data);
        }
    }
    fn input(&self, data: &[u8]) {
        if let Ok(mut r) = self.0.lock()
            && let Some(r) = r.as_mut()
        {
            r.input(data);
        }
    }
    fn resize(&self, cols: u16, rows: u16) {
        if let Ok(mut r) = self.0.lock()
            && let Some(r) = r.as_mut()
        {
            r.resize(cols, rows);
        }
    }
    fn broken(&self) -> Option<String> {
        if !self.1 {
            return None;
        }
        let g = self.0.lock().ok()?;
        let r = g.as_ref()?;
        r.failed().map(|e| {
            format!(
                "the required recording {} can no longer be written ({e})",
                r.id()
            )
        })
    }
}

/// A recording in progress.
pub(crate) struct Active {
    tap: Arc<RecTap>,
    /// Its id (logged with `session.start`).
    pub(crate) id: String,
    required: bool,
}

impl Active {
    /// The tap to give the terminal relay.
    pub(crate) fn tap(&self) -> Arc<dyn aibox_supervisor::client::Tap> {
        self.tap.clone()
    }

    /// Ends the recording. A recording that could not be written fully
    /// is an error when recording is required.
    pub(crate) fn finish(self) -> Result<()> {
        let r = self.tap.0.lock().ok().and_then(|mut r| r.take());
        let Some(r) = r else { return Ok(()) };
        match r.finish() {
            Ok(p) => {
                eprintln!("aibox: session recorded as {} ({})", self.id, p.display());
                Ok(())
            }
            Err(e) if self.required => Err(anyhow::anyhow!(
                "the required recording {} is incomplete: {e}",
                self.id
            )),
            Err(e) => {
                eprintln!("aibox: warning: recording {} is incomplete: {e}", self.id);
                Ok(())
            }
        }
    }
}

/// Starts recording a terminal session of `sandbox`, when the mode and
/// the flags say so. A required recording that cannot start stops the
/// session before it begins.
pub(crate) fn start(
    loaded: &aibox_config::Loaded,
    sources: &aibox_config::Sources,
    sandbox: &str,
    argv: &[String],
    record: bool,
    no_record: bool,
) -> Result<Option<Active>> {
    let audit = &loaded.config.audit;
    let mode = audit.recording_mode();
    let on = match mode {
        RecordingMode::Off if record => bail!(
            "--record: session recording is off\n  fix: set audit.recording to optional or required"
        ),
        RecordingMode::Off => false,
        RecordingMode::Optional => record && !no_record,
        RecordingMode::Required if no_record => {
            bail!("--no-record: recording is required here (audit.recording: required)")
        }
        RecordingMode::Required => true,
    };
    if !on {
        return Ok(None);
    }
    let key = RecordingKey::load_or_create(&key_path(loaded, sources)?)?;
    let (rows, cols) = aibox_sandbox::sys::get_winsize(0).unwrap_or((24, 80));
    let env = ["TERM", "SHELL"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    let meta = aibox_recording::Meta {
        sandbox: sandbox.to_string(),
        user: aibox_core::current_user(),
        argv: argv.to_vec(),
        size: (cols, rows),
        input: audit.recording_input,
        env,
    };
    let r = Recorder::create(&recordings_dir(loaded).join(sandbox), &key, &meta)?;
    let id = r.id();
    if mode == RecordingMode::Required {
        eprintln!("aibox: {}", audit.recording_notice_text);
    }
    eprintln!(
        "aibox: recording this session as {id}{}",
        if audit.recording_input {
            " (including keystrokes)"
        } else {
            ""
        }
    );
    let tap = Arc::new(RecTap(Mutex::new(Some(r)), mode == RecordingMode::Required));
    // Output followed by silence reaches the disk within a moment.
    let weak = Arc::downgrade(&tap);
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let Some(t) = weak.upgrade() else { return };
            let Ok(mut g) = t.0.lock() else { return };
            match g.as_mut() {
                Some(r) => r.tick(),
                None => return,
            }
        }
    });
    Ok(Some(Active {
        tap,
        id,
        required: mode == RecordingMode::Required,
    }))
}

/// The file of recording `id`.
fn find(loaded: &aibox_config::Loaded, id: &str) -> Result<PathBuf> {
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || id.starts_with('.')
    {
        bail!("{id:?} is not a recording id (see `aibox recording list`)");
    }
    for (_, p) in all(loaded) {
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy() == format!("{id}{}", aibox_recording::SUFFIX))
        {
            return Ok(p);
        }
    }
    bail!("no recording {id} (see `aibox recording list`)")
}

/// Every recording: (sandbox, file), oldest first by name.
fn all(loaded: &aibox_config::Loaded) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(recordings_dir(loaded)) else {
        return out;
    };
    for d in dirs.flatten() {
        let sandbox = d.file_name().to_string_lossy().into_owned();
        if let Ok(files) = std::fs::read_dir(d.path()) {
            for f in files.flatten() {
                if f.file_name()
                    .to_string_lossy()
                    .ends_with(aibox_recording::SUFFIX)
                {
                    out.push((sandbox.clone(), f.path()));
                }
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

pub fn run(cli_config: Option<PathBuf>, cmd: RecordingCmd) -> Result<i32> {
    let (loaded, sources) = super::load_config(cli_config)?;
    match cmd {
        RecordingCmd::List { name, format } => list(&loaded, name.as_deref(), format),
        RecordingCmd::Play {
            id,
            speed,
            from,
            max_idle,
        } => {
            if !(speed > 0.0 && speed.is_finite()) {
                bail!("--speed must be a positive number (e.g. 2 for twice as fast)");
            }
            let key = RecordingKey::load(&key_path(&loaded, &sources)?)?;
            let o = aibox_recording::open(&find(&loaded, &id)?, &key)?;
            play(&o, speed, from, max_idle)
        }
        RecordingCmd::Export {
            id,
            decrypt,
            output,
        } => {
            if !decrypt {
                bail!(
                    "recordings are kept encrypted; pass --decrypt to write a plain .cast (it holds everything the session showed)"
                );
            }
            let key = RecordingKey::load(&key_path(&loaded, &sources)?)?;
            let o = aibox_recording::open(&find(&loaded, &id)?, &key)?;
            if !o.complete {
                eprintln!(
                    "aibox: warning: recording {id} was cut short (the session did not end normally); exporting what it holds"
                );
            }
            match output {
                Some(p) => write_private(&p, o.cast.as_bytes())?,
                None => std::io::stdout().write_all(o.cast.as_bytes())?,
            }
            Ok(0)
        }
    }
}

/// Writes a file only the user can read (a decrypted recording), never
/// through a link and never keeping an earlier file's looser mode.
fn write_private(p: &Path, data: &[u8]) -> Result<()> {
    aibox_core::replace_private_file(p, data).with_context(|| format!("writing {}", p.display()))
}

fn list(loaded: &aibox_config::Loaded, name: Option<&str>, format: Format) -> Result<i32> {
    let mut rows = Vec::new();
    for (sandbox, p) in all(loaded) {
        if name.is_some_and(|n| n != sandbox) {
            continue;
        }
        let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        match aibox_recording::read_header(&p) {
            Ok(h) => rows.push(serde_json::json!({
                "id": h.id, "sandbox": h.sandbox, "user": h.user, "started": h.started,
                "command": h.argv.join(" "), "input": h.input, "bytes": size,
                "key_id": h.key_id, "path": p,
            })),
            Err(e) => rows.push(serde_json::json!({
                "id": p.file_name().map(|n| n.to_string_lossy().into_owned()),
                "sandbox": sandbox, "error": e.to_string(), "path": p,
            })),
        }
    }
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no recordings");
        return Ok(0);
    }
    println!(
        "{:<44} {:<20} {:<21} {:>9}  COMMAND",
        "ID", "SANDBOX", "STARTED", "BYTES"
    );
    for r in rows {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        println!(
            "{:<44} {:<20} {:<21} {:>9}  {}",
            s("id"),
            s("sandbox"),
            s("started"),
            r["bytes"].as_u64().unwrap_or(0),
            r["error"]
                .as_str()
                .map_or_else(|| s("command"), |e| format!("UNREADABLE: {e}"))
        );
    }
    Ok(0)
}

/// Replays the output with its timing: `speed` times as fast, starting
/// at `from` seconds, pauses capped at `max_idle` seconds.
fn play(o: &aibox_recording::Opened, speed: f64, from: f64, max_idle: Option<f64>) -> Result<i32> {
    let mut out = std::io::stdout();
    let mut last = from;
    for e in aibox_recording::events(&o.cast) {
        if e.code != "o" {
            continue;
        }
        if e.time >= from {
            let mut wait = (e.time - last).max(0.0);
            if let Some(m) = max_idle {
                wait = wait.min(m);
            }
            let wait = wait / speed;
            if wait > 0.0 {
                std::thread::sleep(std::time::Duration::from_secs_f64(wait.min(3600.0)));
            }
            last = e.time;
        }
        // Before `from`, output is written at once so the screen is as it
        // was at that moment.
        out.write_all(e.data.as_bytes())?;
        out.flush()?;
    }
    if !o.complete {
        eprintln!("\naibox: the recording ends here: the session was cut short");
    }
    Ok(0)
}
