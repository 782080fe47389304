//! Sealed audit segments copied to an S3-compatible bucket
//! (`audit.storage: s3`), under object lock where the bucket has it.
//!
//! A sealed segment is already read-only and listed, with its SHA-256, in
//! the log's signed manifest; but all of that lives on the one host an
//! intruder may own. The copy in the bucket is what survives it: each
//! segment goes up as `<prefix><sandbox>/<first>-<last>-<hash16>.jsonl`
//! beside its signed manifest entry (`….entry.json`), and when the bucket
//! has object lock both are written with a retention (compliance mode by
//! default) that nobody, root included, can shorten or delete before it
//! ends. [`Archive::check`] reads the copies back and compares them with
//! the local manifest: a copy altered, overwritten, unlocked or missing,
//! or an entry in the bucket the local manifest no longer lists, is named.
//!
//! Requests are signed with AWS Signature Version 4 (`rusty-s3`, as
//! presigned URLs whose signature covers the headers that matter:
//! `content-md5`, the lock headers and the recorded SHA-256), and sent
//! with `ureq`. Uploads are idempotent: an object already in the bucket
//! with the same SHA-256 is not sent again, so a crash between an upload
//! and the note of it costs nothing.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aibox_audit::segments::Segment;
use rusty_s3::{Bucket, Credentials, Method, UrlStyle};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// How long a request may take (connecting, and each read or write).
const TIMEOUT: Duration = Duration::from_secs(20);

/// How long a signed request stays valid.
const SIGNED_FOR: u64 = 900;

/// `audit.s3`: where and how sealed segments are archived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// The service's URL, e.g. `https://s3.eu-west-1.amazonaws.com` or
    /// `http://minio.internal:9000` (default for `s3`: the region's AWS
    /// endpoint; falls back to `audit.storage_endpoint`).
    pub endpoint: String,
    /// The bucket (falls back to `audit.storage_bucket`).
    pub bucket: String,
    /// The region requests are signed for.
    pub region: String,
    /// Key prefix of every object (ends in `/`).
    pub prefix: String,
    /// Address the bucket in the path (`endpoint/bucket/key`, what MinIO
    /// and most S3-compatible servers want) rather than as a host name.
    pub path_style: bool,
    /// Environment variable holding the access key id.
    pub access_key_env: String,
    /// Environment variable holding the secret access key.
    pub secret_key_env: String,
    /// Environment variable holding a session token (used when set).
    pub session_token_env: String,
    /// `auto` (lock when the bucket has object lock), `required` (refuse a
    /// bucket without it) or `off`.
    pub object_lock: LockPolicy,
    /// `compliance` (nobody can shorten or remove the retention) or
    /// `governance` (principals with a bypass permission can).
    pub lock_mode: LockMode,
    /// How long each object is retained, e.g. `730d` (falls back to
    /// `audit.retention_tier1`).
    pub retention: String,
    /// Extra CA certificates (PEM) for an HTTPS endpoint.
    pub ca_file: String,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            bucket: String::new(),
            region: "us-east-1".into(),
            prefix: "aibox-audit/".into(),
            path_style: true,
            access_key_env: "AWS_ACCESS_KEY_ID".into(),
            secret_key_env: "AWS_SECRET_ACCESS_KEY".into(),
            session_token_env: "AWS_SESSION_TOKEN".into(),
            object_lock: LockPolicy::Auto,
            lock_mode: LockMode::Compliance,
            retention: String::new(),
            ca_file: String::new(),
        }
    }
}

/// Whether objects are written under object lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockPolicy {
    /// When the bucket has object lock enabled.
    Auto,
    /// Always; a bucket without object lock is refused.
    Required,
    /// Never.
    Off,
}

/// S3 object lock retention modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Nobody can shorten the retention or delete the object before it ends.
    Compliance,
    /// Principals with `s3:BypassGovernanceRetention` can.
    Governance,
}

impl LockMode {
    fn header(self) -> &'static str {
        match self {
            LockMode::Compliance => "COMPLIANCE",
            LockMode::Governance => "GOVERNANCE",
        }
    }
}

/// An `audit.s3` setting that cannot work: which field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit.s3.{field}: {reason}")]
pub struct S3ConfigError {
    /// The field.
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> S3ConfigError {
    S3ConfigError {
        field,
        reason: reason.into(),
    }
}

/// The retention as a duration (checked by [`check`]).
fn retention(c: &S3Config) -> Option<Duration> {
    humantime::parse_duration(&c.retention).ok()
}

/// Checks an effective `audit.s3` (fallbacks already applied).
pub fn check(c: &S3Config) -> Result<(), S3ConfigError> {
    let url = url::Url::parse(&c.endpoint).map_err(|e| {
        bad(
            "endpoint",
            format!(
                "`{}` is not a URL ({e}); give the service's address, e.g. https://s3.eu-west-1.amazonaws.com or http://minio.internal:9000",
                c.endpoint
            ),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(bad(
            "endpoint",
            format!(
                "`{}` must be an http:// or https:// URL with a host",
                c.endpoint
            ),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad(
            "endpoint",
            format!(
                "`{}` may not carry a query, a fragment or credentials (the keys come from audit.s3.access_key_env and secret_key_env)",
                c.endpoint
            ),
        ));
    }
    let b = c.bucket.as_bytes();
    let bucket_ok = (3..=63).contains(&b.len())
        && b.iter()
            .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || *x == b'-' || *x == b'.')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && !c.bucket.contains("..");
    if !bucket_ok {
        return Err(bad(
            "bucket",
            format!(
                "`{}` is not a bucket name: 3 to 63 lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit",
                c.bucket
            ),
        ));
    }
    if c.region.is_empty()
        || !c
            .region
            .bytes()
            .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == b'-')
    {
        return Err(bad(
            "region",
            format!("`{}` is not a region name (e.g. us-east-1)", c.region),
        ));
    }
    let prefix_ok = c
        .prefix
        .bytes()
        .all(|x| x.is_ascii_alphanumeric() || matches!(x, b'/' | b'-' | b'_' | b'.'))
        && !c.prefix.starts_with('/')
        && !c.prefix.split('/').any(|p| p == "." || p == "..")
        && !c.prefix.contains("//");
    if !prefix_ok {
        return Err(bad(
            "prefix",
            format!(
                "`{}` may hold letters, digits, `-`, `_`, `.` and `/` (no leading `/`, no `.`/`..` parts), e.g. aibox-audit/",
                c.prefix
            ),
        ));
    }
    for (field, v) in [
        ("access_key_env", &c.access_key_env),
        ("secret_key_env", &c.secret_key_env),
        ("session_token_env", &c.session_token_env),
    ] {
        if v.is_empty() || !v.bytes().all(|x| x.is_ascii_alphanumeric() || x == b'_') {
            return Err(bad(
                field,
                format!("`{v}` is not an environment variable name"),
            ));
        }
    }
    match retention(c) {
        Some(d)
            if d >= Duration::from_secs(86_400) && d <= Duration::from_secs(100 * 365 * 86_400) => {
        }
        _ => {
            return Err(bad(
                "retention",
                format!(
                    "`{}` is not a retention between 1d and 100 years (e.g. 730d)",
                    c.retention
                ),
            ));
        }
    }
    if !c.ca_file.is_empty() && !Path::new(&c.ca_file).is_file() {
        return Err(bad(
            "ca_file",
            format!("{} is not a readable file", c.ca_file),
        ));
    }
    Ok(())
}

/// Why a bucket could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    /// It did not answer (connection, name resolution, TLS, timeout):
    /// worth trying again later.
    #[error("{0}")]
    Unreachable(String),
    /// It answered no, or the settings cannot work (keys unset, no such
    /// bucket, access denied, object lock required and missing).
    #[error("{0}")]
    Refused(String),
}

/// What the archive has of one log (`<state>/<log file>.archive.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    uploaded: Vec<Uploaded>,
}

/// One segment in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uploaded {
    /// The segment's file name.
    pub segment: String,
    /// Its SHA-256, as the manifest has it.
    pub sha256: String,
    /// The object key.
    pub key: String,
    /// The version the upload made (when the bucket keeps versions).
    pub version_id: Option<String>,
    /// Until when it is locked (RFC 3339), if it is.
    pub retain_until: Option<String>,
}

/// An S3 error answer, shortened to what helps: status, code, message.
fn s3_error(what: &str, e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => describe(what, code, &r.into_string().unwrap_or_default()),
        other => format!("{what}: {}", other.kind()),
    }
}

/// [`s3_error`] of an answer whose body was read.
fn describe(what: &str, code: u16, body: &str) -> String {
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let close = format!("</{t}>");
        body.find(&open).and_then(|a| {
            let rest = &body[a + open.len()..];
            rest.find(&close).map(|b| rest[..b].to_string())
        })
    };
    let hint = match code {
        403 => {
            " (check the keys in audit.s3.access_key_env / secret_key_env and the bucket's policy)"
        }
        _ => "",
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{what}: {code} {c}: {m}{hint}"),
        (Some(c), None) => format!("{what}: {code} {c}{hint}"),
        _ => format!("{what}: the server answered {code}{hint}"),
    }
}

/// A bucket sealed segments are archived to.
pub struct Archive {
    bucket: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
    prefix: String,
    /// The lock each object gets, when the bucket has object lock and
    /// policy wants it.
    lock: Option<(LockMode, Duration)>,
    /// Whether the bucket has object lock at all.
    bucket_locks: bool,
    label: String,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Archive({})", self.label)
    }
}

impl Archive {
    /// Opens the bucket `c` names (checked by [`check`]): reads the keys
    /// from the environment and asks the bucket whether it has object
    /// lock. A bucket that is not there or refuses the keys, or has no
    /// object lock when `object_lock: required`, is an error that says so.
    pub fn open(c: &S3Config) -> Result<Archive, ArchiveError> {
        check(c).map_err(|e| ArchiveError::Refused(e.to_string()))?;
        let env = |name: &str, field: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    format!(
                        "${name} (audit.s3.{field}) is not set; export it before starting aibox"
                    )
                })
        };
        let key = env(&c.access_key_env, "access_key_env").map_err(ArchiveError::Refused)?;
        let secret = env(&c.secret_key_env, "secret_key_env").map_err(ArchiveError::Refused)?;
        let creds = match std::env::var(&c.session_token_env)
            .ok()
            .filter(|v| !v.is_empty())
        {
            Some(t) => Credentials::new_with_token(key, secret, t),
            None => Credentials::new(key, secret),
        };
        let endpoint =
            url::Url::parse(&c.endpoint).map_err(|e| ArchiveError::Refused(e.to_string()))?;
        let style = if c.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, c.bucket.clone(), c.region.clone())
            .map_err(|e| ArchiveError::Refused(format!("audit.s3.bucket {}: {e}", c.bucket)))?;
        let mut prefix = c.prefix.clone();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let mut a = Archive {
            bucket,
            creds,
            agent: ureq::AgentBuilder::new()
                .tls_config(crate::sink::tls_config(&c.ca_file).map_err(ArchiveError::Refused)?)
                .timeout_connect(TIMEOUT)
                .timeout_read(TIMEOUT)
                .timeout_write(TIMEOUT)
                .redirects(0)
                .build(),
            prefix,
            lock: None,
            bucket_locks: false,
            label: format!("s3 bucket {} at {}", c.bucket, c.endpoint),
        };
        a.bucket_locks = a.probe_lock()?;
        let keep = retention(c).unwrap_or(Duration::from_secs(730 * 86_400));
        a.lock = match (c.object_lock, a.bucket_locks) {
            (LockPolicy::Off, _) | (LockPolicy::Auto, false) => None,
            (_, true) => Some((c.lock_mode, keep)),
            (LockPolicy::Required, false) => {
                return Err(ArchiveError::Refused(format!(
                    "{} has no object lock (audit.s3.object_lock is `required`): create the bucket with object lock enabled, or set audit.s3.object_lock: auto",
                    a.label
                )));
            }
        };
        Ok(a)
    }

    /// Whether objects are written under object lock.
    pub fn locks(&self) -> bool {
        self.lock.is_some()
    }

    /// What this archive is, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A signed request. `query` and `headers` are sorted here (the
    /// signature wants them in order); header names are lowercase.
    fn request(
        &self,
        method: Method,
        url: url::Url,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> ureq::Request {
        let signed = presign(
            &self.creds,
            self.bucket.region(),
            method,
            url,
            query,
            headers,
            &jiff::Timestamp::now(),
        );
        let mut r = self.agent.request_url(method.to_str(), &signed);
        for (k, v) in headers {
            r = r.set(k, v);
        }
        r
    }

    /// Whether the bucket has object lock enabled (GET `?object-lock`).
    fn probe_lock(&self) -> Result<bool, ArchiveError> {
        let r = self
            .request(
                Method::Get,
                self.bucket.base_url().clone(),
                &[("object-lock", "")],
                &[],
            )
            .call();
        match r {
            Ok(r) => {
                let body = r.into_string().unwrap_or_default();
                Ok(body.contains("<ObjectLockEnabled>Enabled</ObjectLockEnabled>"))
            }
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                if body.contains("ObjectLockConfigurationNotFound") {
                    Ok(false)
                } else if body.contains("NoSuchBucket") {
                    Err(ArchiveError::Refused(format!(
                        "{}: the bucket does not exist; create it (with object lock enabled, to keep segments immutable)",
                        self.label
                    )))
                } else if code == 501 || body.contains("NotImplemented") {
                    // A server without object lock at all.
                    Ok(false)
                } else if code >= 500 {
                    Err(ArchiveError::Unreachable(describe(
                        &self.label,
                        code,
                        &body,
                    )))
                } else {
                    Err(ArchiveError::Refused(describe(&self.label, code, &body)))
                }
            }
            Err(e) => Err(ArchiveError::Unreachable(s3_error(&self.label, e))),
        }
    }

    /// The object key of a segment of `sandbox`.
    pub fn key(&self, sandbox: &str, s: &Segment) -> String {
        let stem = s.segment.trim_end_matches(".jsonl");
        let h = s.last_hash.get(..16).unwrap_or(&s.last_hash);
        format!("{}{sandbox}/{stem}-{h}.jsonl", self.prefix)
    }

    /// HEAD of `key` (the latest version, or `version`): its headers, or
    /// `None` when there is no such object.
    fn head(&self, key: &str, version: Option<&str>) -> Result<Option<ureq::Response>, String> {
        let q: Vec<(&str, &str)> = version.map(|v| ("versionId", v)).into_iter().collect();
        match self
            .request(Method::Head, self.bucket.object_url(key), &q, &[])
            .call()
        {
            Ok(r) => Ok(Some(r)),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(s3_error(&format!("{}: {key}", self.label), e)),
        }
    }

    /// Puts `len` bytes from `body` at `key`, under lock when the bucket
    /// has it; returns (version id, retain until).
    fn put(
        &self,
        key: &str,
        body: impl Read,
        len: u64,
        md5: &[u8],
        sha256: &str,
        content_type: &str,
    ) -> Result<(Option<String>, Option<String>), String> {
        use base64::Engine;
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5);
        let until = self.lock.map(|(mode, keep)| {
            (
                mode.header(),
                humantime::format_rfc3339_seconds(SystemTime::now() + keep).to_string(),
            )
        });
        let mut headers = vec![("content-md5", md5.as_str()), ("x-amz-meta-sha256", sha256)];
        if let Some((mode, until)) = &until {
            headers.push(("x-amz-object-lock-mode", mode));
            headers.push(("x-amz-object-lock-retain-until-date", until.as_str()));
        }
        let len_s = len.to_string();
        let r = self
            .request(Method::Put, self.bucket.object_url(key), &[], &headers)
            .set("Content-Length", &len_s)
            .set("Content-Type", content_type)
            .send(body)
            .map_err(|e| s3_error(&format!("uploading {key} to {}", self.label), e))?;
        Ok((
            r.header("x-amz-version-id").map(str::to_string),
            until.map(|(_, u)| u),
        ))
    }

    /// Uploads one sealed segment of `sandbox` (the file at `path`, which
    /// must still have the bytes `entry` records) and its manifest entry.
    pub fn upload(&self, sandbox: &str, path: &Path, entry: &Segment) -> Result<Uploaded, String> {
        let key = self.key(sandbox, entry);
        // Already there (an upload whose note was lost)?
        if let Some(r) = self.head(&key, None)?
            && r.header("x-amz-meta-sha256") == Some(entry.sha256.as_str())
        {
            return Ok(Uploaded {
                segment: entry.segment.clone(),
                sha256: entry.sha256.clone(),
                key,
                version_id: r.header("x-amz-version-id").map(str::to_string),
                retain_until: r
                    .header("x-amz-object-lock-retain-until-date")
                    .map(str::to_string),
            });
        }
        // One open file, hashed then sent: what is sent is what was hashed.
        let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut sha = sha2::Sha256::new();
        let mut md5 = <md5::Md5 as md5::Digest>::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
            md5::Digest::update(&mut md5, &buf[..n]);
            len += n as u64;
        }
        if hex::encode(sha.finalize()) != entry.sha256 || len != entry.bytes {
            return Err(format!(
                "{} changed since it was sealed (its bytes no longer match the manifest): not archived; run `aibox audit verify`",
                path.display()
            ));
        }
        f.seek(SeekFrom::Start(0))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let md5 = md5::Digest::finalize(md5);
        let (version_id, retain_until) = self.put(
            &key,
            f.take(len),
            len,
            &md5,
            &entry.sha256,
            "application/x-ndjson",
        )?;
        // The signed entry beside it: the bucket alone then says what the
        // segment must hash to, and who signed that.
        let line = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
        let line_sha = hex::encode(sha2::Sha256::digest(&line));
        let line_md5 = md5::Digest::finalize(md5::Digest::chain_update(
            <md5::Md5 as md5::Digest>::new(),
            &line,
        ));
        self.put(
            &format!("{key}.entry.json"),
            line.as_slice(),
            line.len() as u64,
            &line_md5,
            &line_sha,
            "application/json",
        )?;
        Ok(Uploaded {
            segment: entry.segment.clone(),
            sha256: entry.sha256.clone(),
            key,
            version_id,
            retain_until,
        })
    }

    /// GET of `key` (at `version`): the response, or `None` when missing.
    fn get(&self, key: &str, version: Option<&str>) -> Result<Option<ureq::Response>, String> {
        let q: Vec<(&str, &str)> = version.map(|v| ("versionId", v)).into_iter().collect();
        match self
            .request(Method::Get, self.bucket.object_url(key), &q, &[])
            .call()
        {
            Ok(r) => Ok(Some(r)),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(s3_error(&format!("{}: {key}", self.label), e)),
        }
    }

    /// Every key under `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<String>, String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = vec![("list-type", "2"), ("prefix", prefix)];
            if let Some(t) = &token {
                q.push(("continuation-token", t.as_str()));
            }
            let r = self
                .request(Method::Get, self.bucket.base_url().clone(), &q, &[])
                .call()
                .map_err(|e| s3_error(&format!("listing {}", self.label), e))?;
            let body = r.into_string().map_err(|e| e.to_string())?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&body)
                .map_err(|e| format!("listing {}: {e}", self.label))?;
            keys.extend(page.contents.into_iter().map(|c| c.key));
            match page.next_continuation_token {
                Some(t) if Some(&t) != token.as_ref() => token = Some(t),
                _ => break,
            }
        }
        Ok(keys)
    }

    /// Uploads every sealed segment of the log at `log` (sandbox
    /// `sandbox`) not yet archived, in manifest order, noting each in
    /// `state_dir`. Stops at the first failure (the rest go next time).
    /// Returns how many were uploaded now.
    pub fn upload_pending(
        &self,
        log: &Path,
        sandbox: &str,
        state_dir: &Path,
    ) -> Result<usize, String> {
        let cursor_file = cursor_path(log, state_dir);
        let mut cur = load(&cursor_file);
        let manifest = aibox_audit::segments::read_manifest(log).map_err(|e| e.to_string())?;
        let dir = aibox_audit::segments::segments_dir(log);
        let mut n = 0;
        for entry in manifest.into_iter().flatten() {
            if !aibox_audit::segments::valid_segment_name(&entry.segment)
                || cur
                    .uploaded
                    .iter()
                    .any(|u| u.segment == entry.segment && u.sha256 == entry.sha256)
            {
                continue;
            }
            let up = self.upload(sandbox, &dir.join(&entry.segment), &entry)?;
            cur.uploaded.push(up);
            save(&cursor_file, &cur)?;
            n += 1;
        }
        Ok(n)
    }

    /// Compares the bucket's copies of the log at `log` with its local
    /// manifest.
    pub fn check(
        &self,
        log: &Path,
        sandbox: &str,
        state_dir: &Path,
    ) -> Result<RemoteReport, String> {
        let cur = load(&cursor_path(log, state_dir));
        let manifest = aibox_audit::segments::read_manifest(log).map_err(|e| e.to_string())?;
        let mut rep = RemoteReport {
            bucket: self.label.clone(),
            object_lock: self.bucket_locks,
            ..RemoteReport::default()
        };
        let mut expected = std::collections::BTreeSet::new();
        for entry in manifest.into_iter().flatten() {
            if !aibox_audit::segments::valid_segment_name(&entry.segment) {
                continue;
            }
            let key = self.key(sandbox, &entry);
            expected.insert(format!("{key}.entry.json"));
            expected.insert(key.clone());
            let noted = cur
                .uploaded
                .iter()
                .find(|u| u.segment == entry.segment && u.sha256 == entry.sha256);
            let version = noted.and_then(|u| u.version_id.clone());
            let latest = self.head(&key, None)?;
            if latest.is_none() {
                match (noted, &version) {
                    (None, _) => {
                        rep.pending.push(entry.segment.clone());
                        continue;
                    }
                    (Some(_), None) => {
                        rep.problems.push(format!(
                            "{}: deleted from the bucket ({key})",
                            entry.segment
                        ));
                        continue;
                    }
                    // (Versioned: the archived version may still be there,
                    // hidden by a delete marker; read on.)
                    (Some(_), Some(_)) => rep.problems.push(format!(
                        "{}: deleted in the bucket ({key} now answers 404: a delete marker hides it)",
                        entry.segment
                    )),
                }
            }
            let latest_version = latest
                .as_ref()
                .and_then(|l| l.header("x-amz-version-id"))
                .map(str::to_string);
            // The version the upload made (else the latest) must hold the
            // segment's bytes.
            let Some(body) = self.get(&key, version.as_deref())? else {
                rep.problems.push(format!(
                    "{}: the version archived ({}) is gone from the bucket",
                    entry.segment,
                    version.as_deref().unwrap_or("-")
                ));
                continue;
            };
            let mode = body.header("x-amz-object-lock-mode").map(str::to_string);
            let until = body
                .header("x-amz-object-lock-retain-until-date")
                .map(str::to_string);
            let mut sha = sha2::Sha256::new();
            let mut len = 0u64;
            let mut reader = body.into_reader();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = reader
                    .read(&mut buf)
                    .map_err(|e| format!("reading {key} from {}: {e}", self.label))?;
                if k == 0 {
                    break;
                }
                sha.update(&buf[..k]);
                len += k as u64;
            }
            rep.checked += 1;
            if hex::encode(sha.finalize()) != entry.sha256 || len != entry.bytes {
                rep.problems.push(format!(
                    "{}: the copy in the bucket ({key}) does not have the sealed bytes (modified in the bucket)",
                    entry.segment
                ));
                continue;
            }
            if version.is_some() && latest.is_some() && latest_version != version {
                rep.problems.push(format!(
                    "{}: overwritten in the bucket: a newer version ({}) of {key} replaced the one archived ({}), which is intact",
                    entry.segment,
                    latest_version.as_deref().unwrap_or("-"),
                    version.as_deref().unwrap_or("-")
                ));
            }
            match (&mode, noted.and_then(|u| u.retain_until.as_ref())) {
                (Some(_), _) => rep.locked += 1,
                (None, Some(u)) => rep.problems.push(format!(
                    "{}: archived under object lock until {u}, but the copy is no longer locked",
                    entry.segment
                )),
                (None, None) => {}
            }
            if let Some(u) = until.filter(|_| mode.is_some()) {
                rep.retained_until = rep.retained_until.max(Some(u));
            }
            // The signed entry beside it must be the local one.
            let ek = format!("{key}.entry.json");
            match self.get(&ek, None)? {
                None => rep.problems.push(format!(
                    "{}: its manifest entry is missing from the bucket ({ek})",
                    entry.segment
                )),
                Some(r) => {
                    let text = r.into_string().unwrap_or_default();
                    if serde_json::from_str::<Segment>(&text).ok().as_ref() != Some(&entry) {
                        rep.problems.push(format!(
                            "{}: its manifest entry in the bucket ({ek}) differs from the local one",
                            entry.segment
                        ));
                    }
                }
            }
        }
        // Entries in the bucket the local manifest no longer lists: the
        // local manifest (and segments) lost them.
        for k in self.list(&format!("{}{sandbox}/", self.prefix))? {
            if k.ends_with(".entry.json") && !expected.contains(&k) {
                rep.problems.push(format!(
                    "{k}: in the bucket, but the local manifest does not list it (local segments or manifest lines deleted; the bucket holds the copy)"
                ));
            }
        }
        Ok(rep)
    }
}

/// `url` signed (AWS Signature Version 4, query form) for `method` at
/// `at`, over `query` and the `headers` sent with it (sorted here, as the
/// signature wants them; names lowercase).
fn presign(
    creds: &Credentials,
    region: &str,
    method: Method,
    url: url::Url,
    query: &[(&str, &str)],
    headers: &[(&str, &str)],
    at: &jiff::Timestamp,
) -> url::Url {
    let mut q = query.to_vec();
    q.sort();
    let mut h = headers.to_vec();
    h.sort();
    rusty_s3::signing::sign(
        at,
        method,
        url,
        creds.key(),
        creds.secret(),
        creds.token(),
        region,
        SIGNED_FOR,
        q.iter().copied(),
        h.iter().copied(),
    )
}

/// What [`Archive::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RemoteReport {
    /// The bucket, for messages.
    pub bucket: String,
    /// Whether the bucket has object lock.
    pub object_lock: bool,
    /// Segments whose copy was read back and compared.
    pub checked: usize,
    /// Of those, how many are under object lock.
    pub locked: usize,
    /// The latest retention end among them.
    pub retained_until: Option<String>,
    /// Sealed segments not in the bucket yet (`aibox audit ship` sends
    /// them).
    pub pending: Vec<String>,
    /// What does not hold.
    pub problems: Vec<String>,
}

fn cursor_path(log: &Path, state_dir: &Path) -> PathBuf {
    let file = log
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    state_dir.join(format!("{file}.archive.json"))
}

fn load(p: &Path) -> Cursor {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn save(p: &Path, c: &Cursor) -> Result<(), String> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let text = serde_json::to_string(c).map_err(|e| e.to_string())?;
    aibox_core::replace_private_file(p, text.as_bytes())
        .map_err(|e| format!("{}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_put_matches_an_independent_implementation() {
        // Expected URL computed by botocore 1.44.8 (S3SigV4QueryAuth) for
        // the same request, keys and time: an independent check that the
        // lock headers, Content-MD5 and the recorded hash are signed as
        // S3 verifies them.
        let creds = Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
        let bucket = Bucket::new(
            url::Url::parse("http://127.0.0.1:9000").unwrap(),
            UrlStyle::Path,
            "audit",
            "us-east-1",
        )
        .unwrap();
        let url = presign(
            &creds,
            "us-east-1",
            Method::Put,
            bucket.object_url("aibox-audit/sb/000000000000-000000000009-0123456789abcdef.jsonl"),
            &[],
            &[
                (
                    "x-amz-object-lock-retain-until-date",
                    "2026-12-01T00:00:00Z",
                ),
                ("x-amz-object-lock-mode", "COMPLIANCE"),
                ("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg=="),
                (
                    "x-amz-meta-sha256",
                    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                ),
            ],
            // 2025-11-29T00:00:00Z
            &jiff::Timestamp::from_second(1_764_374_400).unwrap(),
        );
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9000/audit/aibox-audit/sb/000000000000-000000000009-0123456789abcdef.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20251129%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20251129T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=content-md5%3Bhost%3Bx-amz-meta-sha256%3Bx-amz-object-lock-mode%3Bx-amz-object-lock-retain-until-date&X-Amz-Signature=0d12ded52234a5e427dbe74236846740a2999f2c6baedb95815cc9b2fa8c5dfd"
        );
    }

    fn valid() -> S3Config {
        S3Config {
            endpoint: "https://s3.eu-west-1.amazonaws.com".into(),
            bucket: "aibox-audit".into(),
            retention: "730d".into(),
            ..S3Config::default()
        }
    }

    #[test]
    fn settings_that_cannot_work_name_their_field() {
        assert_eq!(check(&valid()), Ok(()));
        type Case = (fn(&mut S3Config), &'static str);
        let cases: Vec<Case> = vec![
            (|c| c.endpoint = "s3.amazonaws.com".into(), "endpoint"),
            (|c| c.endpoint = "ftp://h".into(), "endpoint"),
            (|c| c.endpoint = "https://k:s@h".into(), "endpoint"),
            (|c| c.endpoint = "https://h/?x=1".into(), "endpoint"),
            (|c| c.bucket = "ab".into(), "bucket"),
            (|c| c.bucket = "Audit".into(), "bucket"),
            (|c| c.bucket = "-audit".into(), "bucket"),
            (|c| c.bucket = "a..b".into(), "bucket"),
            (|c| c.region = "US East".into(), "region"),
            (|c| c.prefix = "/abs/".into(), "prefix"),
            (|c| c.prefix = "a/../b/".into(), "prefix"),
            (|c| c.prefix = "a b/".into(), "prefix"),
            (|c| c.access_key_env = String::new(), "access_key_env"),
            (|c| c.secret_key_env = "A-B".into(), "secret_key_env"),
            (|c| c.retention = "12h".into(), "retention"),
            (|c| c.retention = "forever".into(), "retention"),
            (|c| c.retention = "200years".into(), "retention"),
            (|c| c.ca_file = "/nonexistent/ca.pem".into(), "ca_file"),
        ];
        for (f, field) in cases {
            let mut c = valid();
            f(&mut c);
            let e = check(&c).unwrap_err();
            assert_eq!(e.field, field, "{c:?}: {e}");
            assert!(e.to_string().starts_with(&format!("audit.s3.{field}: ")));
        }
    }

    #[test]
    fn keys_name_the_sandbox_segment_and_chain_end() {
        let a = Archive {
            bucket: Bucket::new(
                url::Url::parse("http://127.0.0.1:9000").unwrap(),
                UrlStyle::Path,
                "audit",
                "us-east-1",
            )
            .unwrap(),
            creds: Credentials::new("k", "s"),
            agent: ureq::AgentBuilder::new().build(),
            prefix: "p/".into(),
            lock: None,
            bucket_locks: false,
            label: String::new(),
        };
        let s = Segment {
            segment: "000000000000-000000000009.jsonl".into(),
            first_seq: 0,
            last_seq: 9,
            first_prev_hash: "0".repeat(64),
            last_hash: "ab".repeat(32),
            bytes: 1,
            sha256: "cd".repeat(32),
            sealed_at: "2026-11-29T00:00:00Z".into(),
            reason: "stop".into(),
            key_id: None,
            signature: None,
        };
        // A chain restarted under the same name (same sequence numbers)
        // does not reuse a key: the chain hash at the end differs.
        assert_eq!(
            a.key("sb", &s),
            "p/sb/000000000000-000000000009-abababababababab.jsonl"
        );
    }
}
