//! `audit.storage: s3`: sealed segments archived to an S3 bucket under
//! object lock, checked by `aibox audit verify`, and attacked in the
//! bucket and on the host.
//!
//! The S3 server is moto's (installed by scripts/test.sh into a
//! virtualenv): a stand-in, since neither S3 nor MinIO installs from the
//! package registries here. It speaks the S3 REST API, keeps versions and
//! enforces object lock retention as S3 does (a locked version cannot be
//! deleted); it does not check request signatures, which the signing
//! crate's own tests cover against AWS's published examples.

use super::common::*;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const MOTO: &str = "/usr/local/lib/aibox-test/moto";

/// A moto S3 server on loopback.
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    fn start() -> Moto {
        let bin = format!("{MOTO}/bin/moto_server");
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} is missing: scripts/test.sh installs moto (python3 -m venv {MOTO} && {MOTO}/bin/pip install 'moto[server]==5.2.5')"
        );
        let port = free_port();
        let child = std::process::Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let m = Moto { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return m;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("moto did not listen on {port}");
    }

    /// Runs Python with `s3` (a boto3 client of this server) defined;
    /// returns its stdout.
    fn py(&self, code: &str) -> String {
        let script = format!(
            "import boto3, datetime, hashlib, json\n\
             from botocore.config import Config\n\
             s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1', config=Config(retries={{'max_attempts': 1}}))\n\
             {code}\n",
            self.port
        );
        let o = std::process::Command::new(format!("{MOTO}/bin/python"))
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}\n{}", script, stderr(&o));
        stdout(&o)
    }
}

/// A TCP relay to `to` that can be taken down: the bucket's outage. It
/// keeps the request lines it relays (`lines`). With
/// `drop_entries` it cuts uploads of manifest entries only: a failure
/// between a segment's upload and its entry's. With `one_per_page` it asks
/// for listings of one key a page (`max-keys=1`, which moto honours and
/// does not sign-check), so that following a listing across pages is
/// tested without a thousand objects; `paged` counts those requests.
struct Relay {
    port: u16,
    down: Arc<AtomicBool>,
    drop_entries: Arc<AtomicBool>,
    one_per_page: Arc<AtomicBool>,
    paged: Arc<AtomicUsize>,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let drop_entries = Arc::new(AtomicBool::new(false));
        let one_per_page = Arc::new(AtomicBool::new(false));
        let paged = Arc::new(AtomicUsize::new(0));
        let (d, de) = (down.clone(), drop_entries.clone());
        let (opp, pc) = (one_per_page.clone(), paged.clone());
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                if d.load(Ordering::SeqCst) {
                    // Refused: closed before a byte is read.
                    drop(c);
                    continue;
                }
                // The request line decides. (moto answers every request
                // with `Connection: close`, so each one comes through here.)
                let mut first = vec![0u8; 65536];
                let n = c.read(&mut first).unwrap_or(0);
                let head = String::from_utf8_lossy(&first[..n]);
                if de.load(Ordering::SeqCst)
                    && head
                        .lines()
                        .next()
                        .is_some_and(|l| l.starts_with("PUT ") && l.contains(".entry.json"))
                {
                    drop(c);
                    continue;
                }
                let mut first = first[..n].to_vec();
                let line_end = first.iter().position(|b| *b == b'\r').unwrap_or(0);
                let line = String::from_utf8_lossy(&first[..line_end]).to_string();
                seen.lock().unwrap().push(line.clone());
                if opp.load(Ordering::SeqCst)
                    && line.starts_with("GET ")
                    && line.contains("versions")
                    && let Some(at) = line.rfind(" HTTP/")
                {
                    let paged_line = format!("{}&max-keys=1{}", &line[..at], &line[at..]);
                    first.splice(..line_end, paged_line.into_bytes());
                    pc.fetch_add(1, Ordering::SeqCst);
                }
                let Ok(mut up) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                if up.write_all(&first).is_err() {
                    continue;
                }
                let pipe = |mut a: std::net::TcpStream, mut b: std::net::TcpStream| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while let Ok(n) = a.read(&mut buf) {
                            if n == 0 || b.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = b.shutdown(std::net::Shutdown::Write);
                    });
                };
                pipe(c.try_clone().unwrap(), up.try_clone().unwrap());
                pipe(up, c);
            }
        });
        Relay {
            port,
            down,
            drop_entries,
            one_per_page,
            paged,
            lines,
        }
    }
}

fn s3_config(c: &Ctx, port: u16, bucket: &str, extra: &str) {
    c.add_config(&format!(
        "audit:
  storage: s3
  s3: {{endpoint: \"http://127.0.0.1:{port}\", bucket: {bucket}, retention: 2d{extra}}}
"
    ));
}

fn keys(c: &mut Ctx) {
    c.env("AWS_ACCESS_KEY_ID", "test");
    c.env("AWS_SECRET_ACCESS_KEY", "test");
}

/// `aibox doctor`'s finding on the audit bucket: (status, detail).
fn doctor_storage(c: &Ctx) -> (String, String) {
    let o = c.out(&["doctor", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let f = v
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "audit_storage")
        .unwrap_or_else(|| panic!("no audit_storage check: {v}"))
        .clone();
    (
        f["status"].as_str().unwrap().to_string(),
        f["detail"].as_str().unwrap().to_string(),
    )
}

fn verify(c: &Ctx, name: &str) -> (bool, String) {
    let o = c.out(&["audit", "verify", "--name", name]);
    (o.status.success(), stdout(&o) + &stderr(&o))
}

both_modes!(segments_are_archived_under_object_lock, |mut c: Ctx| {
    let m = Moto::start();
    m.py("s3.create_bucket(Bucket='audit', ObjectLockEnabledForBucket=True)");
    keys(&mut c);
    s3_config(&c, m.port, "audit", "");
    let ws = c.ws.display().to_string();
    // Each stop seals the run's events into a segment; the supervisor
    // uploads it before it reports the stop.
    for _ in 0..2 {
        ok(&c.out(&["run", "-w", &ws, "--name", "archived", "--", "true"]));
    }
    let log = c.data.join("audit/archived.jsonl");
    let manifest: Vec<serde_json::Value> =
        std::fs::read_to_string(aibox_audit::segments::manifest_path(&log))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(manifest.len(), 2);
    let (status, detail) = doctor_storage(&c);
    assert_eq!(status, "ok", "{detail}");
    assert!(
        detail.contains("objects locked (compliance mode, 2d)"),
        "{detail}"
    );
    let (good, out) = verify(&c, "archived");
    assert!(good, "{out}");
    assert!(
        out.contains("archive: 2 of 2 segments in s3 bucket audit")
            && out.contains("2 under object lock until"),
        "{out}"
    );

    // In the bucket: each segment with the sealed bytes, under a
    // compliance-mode lock two days long, and its signed manifest entry.
    let listing = m.py(
        "r = s3.list_objects_v2(Bucket='audit', Prefix='aibox-audit/')\n\
         now = datetime.datetime.now(datetime.timezone.utc)\n\
         for o in r['Contents']:\n    \
             h = s3.head_object(Bucket='audit', Key=o['Key'])\n    \
             body = s3.get_object(Bucket='audit', Key=o['Key'])['Body'].read()\n    \
             days = (h['ObjectLockRetainUntilDate'] - now).total_seconds() / 86400\n    \
             print(json.dumps({'key': o['Key'], 'mode': h.get('ObjectLockMode'), 'days': days, \
             'sha256': hashlib.sha256(body).hexdigest(), 'version': h['VersionId']}))",
    );
    let objects: Vec<serde_json::Value> = listing
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), 4, "{listing}");
    for e in &manifest {
        let stem = e["segment"].as_str().unwrap().trim_end_matches(".jsonl");
        // Under the signing key's id: hosts sharing a bucket keep apart.
        let key = format!(
            "aibox-audit/{}/archived/{stem}-{}.jsonl",
            e["key_id"].as_str().unwrap(),
            &e["last_hash"].as_str().unwrap()[..16]
        );
        let seg = objects.iter().find(|o| o["key"] == key.as_str()).unwrap();
        assert_eq!(seg["sha256"], e["sha256"], "{listing}");
        assert_eq!(seg["mode"], "COMPLIANCE", "{listing}");
        let days = seg["days"].as_f64().unwrap();
        assert!(days > 1.9 && days <= 2.0, "{listing}");
        let entry = objects
            .iter()
            .find(|o| o["key"] == format!("{key}.entry.json").as_str())
            .unwrap();
        assert_eq!(entry["mode"], "COMPLIANCE", "{listing}");
    }
    let first = objects
        .iter()
        .find(|o| o["key"].as_str().unwrap().ends_with(".jsonl"))
        .unwrap()
        .clone();
    let (key, version) = (
        first["key"].as_str().unwrap().to_string(),
        first["version"].as_str().unwrap().to_string(),
    );

    // Attack: delete the archived version. The lock refuses it.
    let r = m.py(&format!(
        "try:\n    s3.delete_object(Bucket='audit', Key='{key}', VersionId='{version}')\n    print('deleted')\n\
         except Exception as e:\n    print('refused', e)"
    ));
    assert!(
        r.starts_with("refused") && r.contains("AccessDenied"),
        "{r}"
    );

    // Attack: overwrite it. S3 keeps the locked version; verify names the
    // overwrite and finds the archived bytes intact.
    m.py(&format!(
        "s3.put_object(Bucket='audit', Key='{key}', Body=b'{{\"forged\": true}}\\n')"
    ));
    let (good, out) = verify(&c, "archived");
    assert!(!good, "{out}");
    assert!(
        out.contains("overwritten in the bucket") && out.contains(&version),
        "{out}"
    );

    // Attack: hide it behind a delete marker.
    m.py(&format!("s3.delete_object(Bucket='audit', Key='{key}')"));
    let (good, out) = verify(&c, "archived");
    assert!(!good, "{out}");
    assert!(
        out.contains("deleted in the bucket") && out.contains("1 delete marker, one hides it"),
        "{out}"
    );

    // Attack on the host: the last segment and its manifest line removed,
    // the note of what was uploaded deleted, and the segment's entry in
    // the bucket hidden behind a delete marker. The bucket's versions
    // still show both objects, and verify says so.
    let segdir = aibox_audit::segments::segments_dir(&log);
    let last = manifest[1]["segment"].as_str().unwrap();
    let mpath = aibox_audit::segments::manifest_path(&log);
    let text = std::fs::read_to_string(&mpath).unwrap();
    let kept: String = text.lines().take(1).map(|l| format!("{l}\n")).collect();
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&segdir, std::fs::Permissions::from_mode(0o700));
    std::fs::remove_file(segdir.join(last)).unwrap();
    std::fs::write(&mpath, kept).unwrap();
    std::fs::remove_file(c.data.join("archive/archived.jsonl.archive.json")).unwrap();
    let stem = last.trim_end_matches(".jsonl");
    m.py(&format!(
        "k = next(o['Key'] for o in s3.list_objects_v2(Bucket='audit', Prefix='aibox-audit/')['Contents'] \
         if '{stem}-' in o['Key'] and o['Key'].endswith('.entry.json'))\n\
         s3.delete_object(Bucket='audit', Key=k)"
    ));
    let (good, out) = verify(&c, "archived");
    assert!(!good, "{out}");
    // Both objects are named, the hidden entry too.
    for suffix in [".jsonl: in the bucket", ".jsonl.entry.json: in the bucket"] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("{stem}-")) && l.contains(suffix)),
            "{suffix}: {out}"
        );
    }
    // `--local` leaves the bucket out (the local damage is still found).
    let o = c.out(&["audit", "verify", "--name", "archived", "--local"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        !stdout(&o).contains("ARCHIVE") && stdout(&o).contains("CHECKPOINT"),
        "{}",
        stdout(&o)
    );

    // Every local trace of the sandbox gone, its last checkpoint beside
    // the key too: the bucket still names it.
    for f in aibox_audit::segments::files(&log) {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_dir_all(&segdir);
    let _ = std::fs::remove_file(&mpath);
    let _ = std::fs::remove_file(aibox_audit::checkpoint::checkpoints_path(&log));
    for e in std::fs::read_dir(c.config.parent().unwrap())
        .unwrap()
        .flatten()
    {
        if e.file_name().to_string_lossy().ends_with(".anchors") {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
    let o = c.out(&["audit", "verify", "--all"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("archived: DELETED: deleted here: s3 bucket audit"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
});

both_modes!(an_outage_loses_nothing, |mut c: Ctx| {
    let m = Moto::start();
    m.py("s3.create_bucket(Bucket='audit', ObjectLockEnabledForBucket=True)");
    let relay = Relay::start(m.port);
    keys(&mut c);
    s3_config(&c, relay.port, "audit", "");
    let ws = c.ws.display().to_string();
    ok(&c.out(&["run", "-w", &ws, "--name", "outage", "--", "true"]));
    // The bucket goes away: the sandbox still starts (with a warning), and
    // its segment is kept here, pending.
    relay.down.store(true, Ordering::SeqCst);
    let o = c.out(&["run", "-w", &ws, "--name", "outage", "--", "true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("audit storage") && stderr(&o).contains("starting anyway"),
        "{}",
        stderr(&o)
    );
    // Neither doctor nor verify passes the bucket over in silence.
    let (status, detail) = doctor_storage(&c);
    assert_eq!(status, "fail", "{detail}");
    let (good, out) = verify(&c, "outage");
    assert!(!good, "{out}");
    assert!(out.contains("--local"), "{out}");
    relay.down.store(false, Ordering::SeqCst);
    // A segment not in the bucket yet: the archive is not complete.
    let (good, out) = verify(&c, "outage");
    assert!(!good, "{out}");
    assert!(
        out.contains("archive: 1 of 2 segments")
            && out.contains("NOT ARCHIVED: 1 sealed segments not in the bucket yet"),
        "{out}"
    );
    let o = ok(&c.out(&["audit", "ship", "--name", "outage"]));
    assert!(o.contains("archive: outage: 1 segments uploaded"), "{o}");
    let (good, out) = verify(&c, "outage");
    assert!(good, "{out}");
    assert!(
        out.contains("archive: 2 of 2 segments") && out.contains("2 under object lock"),
        "{out}"
    );
    // Nothing is sent twice.
    let o = ok(&c.out(&["audit", "ship", "--name", "outage"]));
    assert!(o.contains("archive: outage: 0 segments uploaded"), "{o}");
    let versions = || {
        m.py("print(len([v for v in s3.list_object_versions(Bucket='audit', Prefix='aibox-audit/').get('Versions', []) if '/outage/' in v['Key']]))")
            .trim()
            .parse::<usize>()
            .unwrap()
    };
    assert_eq!(versions(), 4);
    // The note of what went up lost: nothing is sent again either (the
    // bucket is asked first), and verify still passes.
    std::fs::remove_file(c.data.join("archive/outage.jsonl.archive.json")).unwrap();
    let o = ok(&c.out(&["audit", "ship", "--name", "outage"]));
    assert!(o.contains("archive: outage: 0 segments uploaded"), "{o}");
    assert_eq!(versions(), 4);
    let (good, out) = verify(&c, "outage");
    assert!(good, "{out}");

    // The segment goes up, its manifest entry does not: verify names the
    // gap (not archived yet, not tampering: nothing says the entry was
    // ever there), and the next upload completes it without sending the
    // segment again.
    relay.drop_entries.store(true, Ordering::SeqCst);
    ok(&c.out(&["run", "-w", &ws, "--name", "outage", "--", "true"]));
    let (good, out) = verify(&c, "outage");
    assert!(!good, "{out}");
    assert!(
        out.contains("NOT ARCHIVED") && out.contains("(its manifest entry)"),
        "{out}"
    );
    relay.drop_entries.store(false, Ordering::SeqCst);
    ok(&c.out(&["audit", "ship", "--name", "outage"]));
    assert_eq!(versions(), 6);
    let (good, out) = verify(&c, "outage");
    assert!(good, "{out}");

    // Another outage; the next sandbox's supervisor archives what is
    // pending while it runs.
    relay.down.store(true, Ordering::SeqCst);
    ok(&c.out(&["run", "-w", &ws, "--name", "outage", "--", "true"]));
    relay.down.store(false, Ordering::SeqCst);
    ok(&c.out(&["start", "-w", &ws, "--name", "outage"]));
    let mut n = 0;
    for _ in 0..100 {
        n = versions();
        if n == 8 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        n, 8,
        "the running supervisor did not archive the pending segment"
    );
    let o = ok(&c.out(&["audit", "ship", "--name", "outage"]));
    assert!(o.contains("running, its supervisor archives it"), "{o}");
    ok(&c.out(&["stop", "--name", "outage"]));
    let (good, out) = verify(&c, "outage");
    assert!(good, "{out}");
    assert!(out.contains("archive: 5 of 5 segments"), "{out}");

    // Listings a page at a time (as S3 gives them past 1000 keys): the
    // same findings, for every sandbox and every object.
    ok(&c.out(&["run", "-w", &ws, "--name", "outage-b", "--", "true"]));
    relay.one_per_page.store(true, Ordering::SeqCst);
    let o = c.out(&["audit", "verify", "--all"]);
    let all = stdout(&o) + &stderr(&o);
    assert!(o.status.success(), "{all}");
    assert!(
        all.contains("archive: 5 of 5 segments") && all.contains("archive: 1 of 1 segments"),
        "{all}"
    );
    assert!(
        relay.paged.load(Ordering::SeqCst) >= 12,
        "the listings were not paged: {}",
        relay.paged.load(Ordering::SeqCst)
    );
    // A delete marker on the last page is still seen.
    let last = m.py(
        "print(sorted(v['Key'] for v in s3.list_object_versions(Bucket='audit', Prefix='aibox-audit/')['Versions']          if '/outage/' in v['Key'])[-1])",
    );
    m.py(&format!(
        "s3.delete_object(Bucket='audit', Key='{}')",
        last.trim()
    ));
    let (good, out) = verify(&c, "outage");
    assert!(!good, "{out}");
    assert!(out.contains("deleted in the bucket"), "{out}");
});

backend_test!(
    archive_keys_come_from_the_credential_store,
    Backend::Native,
    Mode::Root,
    |mut c: Ctx| {
        let m = Moto::start();
        m.py("s3.create_bucket(Bucket='stored', ObjectLockEnabledForBucket=True)");
        let relay = Relay::start(m.port);
        // Keys in the environment too: they must not be the ones used.
        c.env("AWS_ACCESS_KEY_ID", "ENVKEY");
        c.env("AWS_SECRET_ACCESS_KEY", "envsecret");
        let base = std::fs::read_to_string(&c.config).unwrap();
        s3_config(&c, relay.port, "stored", ", credential: audit-bucket");
        c.add_config("network:\n  allowed_domains: [\"other.example.org\"]\n");
        let ws = c.ws.display().to_string();
        let host = format!("127.0.0.1:{}", relay.port);
        let run = |c: &Ctx| c.out(&["run", "-w", &ws, "--name", "stored", "--", "true"]);

        // Not stored yet: refused, with the command that fixes it.
        let o = run(&c);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("audit.s3.credential `audit-bucket`")
                && stderr(&o).contains(&format!("aibox auth add audit-bucket --host {host}")),
            "{}",
            stderr(&o)
        );
        // Stored for another host (keys go only where they were stored
        // for), or not a key pair: refused.
        for (bound, value, want) in [
            (
                "s3.example.org",
                &b"STOREDKEY:storedsecret\n"[..],
                "is bound to s3.example.org, not to the bucket's endpoint",
            ),
            (
                host.as_str(),
                b"just-one-part\n",
                "ACCESS_KEY_ID:SECRET_ACCESS_KEY",
            ),
        ] {
            ok(&c.out_with_input(
                &["auth", "add", "audit-bucket", "--host", bound, "--replace"],
                value,
            ));
            let o = run(&c);
            assert!(!o.status.success());
            assert!(stderr(&o).contains(want), "{}", stderr(&o));
        }

        // Stored right: the sandbox runs, its segment is archived by the
        // supervisor, and every request to the bucket was signed with the
        // stored key, none with the environment's.
        ok(&c.out_with_input(
            &["auth", "add", "audit-bucket", "--host", &host, "--replace"],
            b"STOREDKEY:storedsecret\n",
        ));
        ok(&c.out_with_input(
            &["auth", "add", "other", "--host", "other.example.org"],
            b"other-value\n",
        ));
        ok(&run(&c));
        let (good, out) = verify(&c, "stored");
        assert!(good, "{out}");
        assert!(out.contains("archive: 1 of 1 segments"), "{out}");
        let (status, detail) = doctor_storage(&c);
        assert_eq!(status, "ok", "{detail}");
        let lines = relay.lines.lock().unwrap().clone();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("PUT ") && l.contains("X-Amz-Credential=STOREDKEY%2F")),
            "{lines:?}"
        );
        assert!(!lines.iter().any(|l| l.contains("ENVKEY")), "{lines:?}");
        // The sandbox was handed the other credential, never the bucket's.
        let issued = |name: &str| -> Vec<String> {
            audit_events(&c, name)
                .iter()
                .filter(|e| e["event_type"] == "credential.issue")
                .map(|e| {
                    e["details"]["credential"]
                        .as_str()
                        .unwrap_or("")
                        .to_string()
                })
                .collect()
        };
        assert_eq!(issued("stored"), ["other"]);
        // Reserved as soon as it is named, local storage or not.
        std::fs::write(&c.config, &base).unwrap();
        c.add_config(
            "audit:\n  s3: {credential: audit-bucket}\nnetwork:\n  allowed_domains: [\"other.example.org\"]\n",
        );
        ok(&c.out(&["run", "-w", &ws, "--name", "local", "--", "true"]));
        assert_eq!(issued("local"), ["other"]);
    }
);

backend_test!(
    buckets_and_settings_that_cannot_work_are_refused,
    Backend::Native,
    Mode::Root,
    |mut c: Ctx| {
        let m = Moto::start();
        m.py("s3.create_bucket(Bucket='plain')");
        let ws = c.ws.display().to_string();
        let base = std::fs::read_to_string(&c.config).unwrap();
        let run = |c: &Ctx| c.out(&["run", "-w", &ws, "--name", "refused", "--", "true"]);
        let fails = |c: &Ctx, want: &[&str]| {
            let o = run(c);
            assert!(!o.status.success(), "{}", stdout(&o));
            for w in want {
                assert!(stderr(&o).contains(w), "{w}: {}", stderr(&o));
            }
        };

        // Keys unset: named.
        s3_config(&c, m.port, "plain", "");
        fails(&c, &["AWS_ACCESS_KEY_ID", "audit.s3.access_key_env"]);
        keys(&mut c);
        // A bucket that is not there.
        std::fs::write(&c.config, &base).unwrap();
        s3_config(&c, m.port, "nosuch", "");
        fails(&c, &["nosuch", "does not exist"]);
        // Object lock required of a bucket without it.
        std::fs::write(&c.config, &base).unwrap();
        s3_config(&c, m.port, "plain", ", object_lock: required");
        fails(&c, &["has no object lock", "audit.s3.object_lock"]);
        // Settings checked with the config.
        for (extra, field) in [
            (", endpoint: \"ftp://x\"", "audit.s3.endpoint"),
            (", retention: 1h", "audit.s3.retention"),
            (", prefix: \"../up\"", "audit.s3.prefix"),
            (", object_lock: sometimes", "object_lock"),
        ] {
            std::fs::write(&c.config, &base).unwrap();
            c.add_config(&format!(
                "audit:\n  storage: s3\n  s3: {{bucket: plain{extra}}}\n"
            ));
            fails(&c, &[field]);
        }
        std::fs::write(&c.config, &base).unwrap();
        c.add_config("audit:\n  storage: minio\n");
        fails(&c, &["audit.s3.endpoint"]);
        std::fs::write(&c.config, &base).unwrap();
        c.add_config("audit:\n  storage: s3\n  s3: {bucket: \"Bad_Name\"}\n");
        fails(&c, &["audit.s3.bucket"]);

        // Without object lock (`auto`): archived, and verify says there is
        // no lock.
        std::fs::write(&c.config, &base).unwrap();
        s3_config(&c, m.port, "plain", "");
        ok(&run(&c));
        let (good, out) = verify(&c, "refused");
        assert!(good, "{out}");
        assert!(out.contains("no object lock on the bucket"), "{out}");
        let (status, detail) = doctor_storage(&c);
        assert_eq!(status, "warn", "{detail}");
        assert!(detail.contains("not locked"), "{detail}");
        // A copy altered in a bucket without lock: named.
        let key = m
            .py("print(next(o['Key'] for o in s3.list_objects_v2(Bucket='plain')['Contents'] if o['Key'].endswith('.jsonl')))")
            .trim()
            .to_string();
        m.py(&format!(
            "s3.put_object(Bucket='plain', Key='{key}', Body=b'forged\\n')"
        ));
        let (good, out) = verify(&c, "refused");
        assert!(!good, "{out}");
        assert!(out.contains("does not have the sealed bytes"), "{out}");

        // Governance mode: archived under lock, and verify says which
        // mode (governance retention can be lifted by privileged users).
        m.py("s3.create_bucket(Bucket='gov', ObjectLockEnabledForBucket=True)");
        std::fs::write(&c.config, &base).unwrap();
        s3_config(&c, m.port, "gov", ", lock_mode: governance");
        ok(&c.out(&["run", "-w", &ws, "--name", "gov", "--", "true"]));
        let (good, out) = verify(&c, "gov");
        assert!(good, "{out}");
        assert!(
            out.contains("1 under object lock until") && out.contains("(1 in governance mode"),
            "{out}"
        );
        let mode = m.py(
            "k = next(o['Key'] for o in s3.list_objects_v2(Bucket='gov')['Contents'] if o['Key'].endswith('.jsonl'))\n\
             print(s3.head_object(Bucket='gov', Key=k)['ObjectLockMode'])",
        );
        assert_eq!(mode.trim(), "GOVERNANCE");
    }
);
