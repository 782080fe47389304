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
use instant_xml::FromXml;
use rusty_s3::{Bucket, Credentials, Method, UrlStyle};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// How long a request may take (connecting, and each read or write).
const TIMEOUT: Duration = Duration::from_secs(20);

/// How long a signed request stays valid.
const SIGNED_FOR: u64 = 900;

/// The most a small request (probe, HEAD, listing page) may take overall.
const SMALL: Duration = Duration::from_secs(60);

/// The most reading a segment back may take overall.
const BIG: Duration = Duration::from_secs(1800);

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
    /// A credential stored with `aibox auth add NAME --host <endpoint
    /// host>` whose value is `ACCESS_KEY_ID:SECRET_ACCESS_KEY` (or
    /// `…:SESSION_TOKEN`): the keys then come from the credential store,
    /// not the environment.
    pub credential: String,
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
            credential: String::new(),
            object_lock: LockPolicy::Auto,
            lock_mode: LockMode::Compliance,
            retention: String::new(),
            ca_file: String::new(),
        }
    }
}

/// An S3 key pair taken from the credential store (`audit.s3.credential`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Keys {
    /// The access key id.
    pub access_key: String,
    /// The secret access key.
    pub secret_key: String,
    /// A session token, for temporary keys.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Keys")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

impl S3Keys {
    /// Reads a stored value `ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]`.
    pub fn parse(value: &str) -> Result<S3Keys, String> {
        const FORM: &str = "the value must be ACCESS_KEY_ID:SECRET_ACCESS_KEY (or …:SESSION_TOKEN), no part empty and none holding `:`";
        let parts: Vec<&str> = value.trim().split(':').collect();
        match parts.as_slice() {
            [id, secret] if !id.is_empty() && !secret.is_empty() => Ok(S3Keys {
                access_key: (*id).to_string(),
                secret_key: (*secret).to_string(),
                session_token: None,
            }),
            [id, secret, token] if !id.is_empty() && !secret.is_empty() && !token.is_empty() => {
                Ok(S3Keys {
                    access_key: (*id).to_string(),
                    secret_key: (*secret).to_string(),
                    session_token: Some((*token).to_string()),
                })
            }
            _ => Err(FORM.into()),
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
    // (The rule of `aibox auth` names.)
    let name_ok = |n: &str| {
        n.len() <= 64
            && !n.starts_with('-')
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !c.credential.is_empty() && !name_ok(&c.credential) {
        return Err(bad(
            "credential",
            format!(
                "`{}` is not a credential name (lowercase letters, digits and `-`; see `aibox auth list`)",
                c.credential
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
    /// The endpoint, bucket and prefix these uploads went to: a cursor of
    /// another target says nothing about this one.
    #[serde(default)]
    target: String,
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
    /// Whether this upload sent it (not: it was in the bucket already).
    #[serde(skip)]
    pub sent: bool,
}

/// An S3 error answer, shortened to what helps: status, code, message.
/// (Never the request's URL: it carries the signature.)
fn s3_error(what: &str, e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, r) => {
            let region = r.header("x-amz-bucket-region").map(str::to_string);
            describe(
                what,
                code,
                &r.into_string().unwrap_or_default(),
                region.as_deref(),
            )
        }
        ureq::Error::Transport(t) => {
            let mut m = format!("{what}: {}", t.kind());
            if let Some(x) = t.message() {
                m.push_str(&format!(": {x}"));
            }
            let mut src = std::error::Error::source(&t);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            m
        }
    }
}

/// [`s3_error`] of an answer whose body was read.
fn describe(what: &str, code: u16, body: &str, region: Option<&str>) -> String {
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let close = format!("</{t}>");
        body.find(&open).and_then(|a| {
            let rest = &body[a + open.len()..];
            rest.find(&close).map(|b| rest[..b].to_string())
        })
    };
    let hint = match (code, region) {
        (300..=399, Some(r)) => format!(
            " (the bucket is in region {r}: set audit.s3.region, or audit.s3.endpoint to that region's address)"
        ),
        (300..=399, None) => {
            " (a redirect: audit.s3.endpoint is not the bucket's address, or wants https)".into()
        }
        (403, _) => " (check the keys in audit.s3.access_key_env / secret_key_env, the clock, and that the bucket's policy allows the request; docs/audit.md lists the permissions)".into(),
        _ => String::new(),
    };
    match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{what}: {code} {c}: {m}{hint}"),
        (Some(c), None) => format!("{what}: {code} {c}{hint}"),
        _ => format!("{what}: the server answered {code}{hint}"),
    }
}

/// A successful (2xx) answer, `None` for 404, or what went wrong. ureq
/// hands back redirects (we follow none) as answers: they are errors.
fn answer(
    what: &str,
    r: Result<ureq::Response, ureq::Error>,
) -> Result<Option<ureq::Response>, String> {
    match r {
        Ok(r) if (200..300).contains(&r.status()) => Ok(Some(r)),
        Ok(r) => {
            let code = r.status();
            let region = r.header("x-amz-bucket-region").map(str::to_string);
            Err(describe(
                what,
                code,
                &r.into_string().unwrap_or_default(),
                region.as_deref(),
            ))
        }
        Err(ureq::Error::Status(404, _)) => Ok(None),
        Err(e) => Err(s3_error(what, e)),
    }
}

/// One version (or delete marker) of an object, from a version listing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    key: String,
    version_id: String,
    latest: bool,
    delete_marker: bool,
}

#[derive(FromXml)]
#[xml(
    rename = "ListVersionsResult",
    ns("http://s3.amazonaws.com/doc/2006-03-01/")
)]
struct ListVersions {
    #[xml(rename = "IsTruncated")]
    is_truncated: Option<bool>,
    #[xml(rename = "NextKeyMarker")]
    next_key_marker: Option<String>,
    #[xml(rename = "NextVersionIdMarker")]
    next_version_id_marker: Option<String>,
    versions: Vec<XmlVersion>,
    delete_markers: Vec<XmlDeleteMarker>,
    common_prefixes: Vec<XmlCommonPrefix>,
}

#[derive(FromXml)]
#[xml(
    rename = "CommonPrefixes",
    ns("http://s3.amazonaws.com/doc/2006-03-01/")
)]
struct XmlCommonPrefix {
    #[xml(rename = "Prefix")]
    prefix: String,
}

#[derive(FromXml)]
#[xml(rename = "Version", ns("http://s3.amazonaws.com/doc/2006-03-01/"))]
struct XmlVersion {
    #[xml(rename = "Key")]
    key: String,
    #[xml(rename = "VersionId")]
    version_id: String,
    #[xml(rename = "IsLatest")]
    is_latest: bool,
}

#[derive(FromXml)]
#[xml(rename = "DeleteMarker", ns("http://s3.amazonaws.com/doc/2006-03-01/"))]
struct XmlDeleteMarker {
    #[xml(rename = "Key")]
    key: String,
    #[xml(rename = "VersionId")]
    version_id: String,
    #[xml(rename = "IsLatest")]
    is_latest: bool,
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
    /// Endpoint, bucket and prefix (for the cursor).
    target: String,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Archive({})", self.label)
    }
}

/// Whether `s` is lowercase hex of `n` characters.
fn is_hex(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The folder of the key that signed `s` (its key id), under which its
/// objects go: hosts sharing a bucket, each with its own signing key,
/// do not see one another's objects as strays.
fn owner(s: &Segment) -> Result<&str, String> {
    match s.key_id.as_deref() {
        None => Ok("unsigned"),
        Some(k) if is_hex(k, 16) => Ok(k),
        Some(k) => Err(format!(
            "segment {}: key id `{k}` is not 16 hex digits",
            s.segment
        )),
    }
}

impl Archive {
    /// Opens the bucket `c` names (checked by [`check`]): reads the keys
    /// from the environment and asks the bucket whether it has object
    /// lock. A bucket that is not there or refuses the keys, or has no
    /// object lock when `object_lock: required`, is an error that says so.
    pub fn open(c: &S3Config) -> Result<Archive, ArchiveError> {
        Self::open_with(c, None)
    }

    /// [`Archive::open`] with `keys` from the credential store (required
    /// when `audit.s3.credential` is set; the environment is not read).
    pub fn open_with(c: &S3Config, keys: Option<&S3Keys>) -> Result<Archive, ArchiveError> {
        check(c).map_err(|e| ArchiveError::Refused(e.to_string()))?;
        if !c.credential.is_empty() && keys.is_none() {
            return Err(ArchiveError::Refused(format!(
                "audit.s3.credential is `{}`, but its keys were not read from the credential store",
                c.credential
            )));
        }
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
        let creds = match keys {
            Some(k) => match &k.session_token {
                Some(t) => Credentials::new_with_token(
                    k.access_key.clone(),
                    k.secret_key.clone(),
                    t.clone(),
                ),
                None => Credentials::new(k.access_key.clone(), k.secret_key.clone()),
            },
            None => {
                let key =
                    env(&c.access_key_env, "access_key_env").map_err(ArchiveError::Refused)?;
                let secret =
                    env(&c.secret_key_env, "secret_key_env").map_err(ArchiveError::Refused)?;
                match std::env::var(&c.session_token_env)
                    .ok()
                    .filter(|v| !v.is_empty())
                {
                    Some(t) => Credentials::new_with_token(key, secret, t),
                    None => Credentials::new(key, secret),
                }
            }
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
                .resolver(|n: &str| aibox_core::resolve_within(n, TIMEOUT))
                .redirects(0)
                .build(),
            target: format!("{} {} {prefix}", c.endpoint, c.bucket),
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

    /// What a stored credential for `c`'s bucket must be bound to: the
    /// endpoint's host, with its port unless that is 443 (a credential's
    /// bare host means port 443, so `http://host` needs `host:80`).
    pub fn endpoint_host(c: &S3Config) -> Option<String> {
        let u = url::Url::parse(&c.endpoint).ok()?;
        let host = u.host_str()?;
        Some(match u.port_or_known_default()? {
            443 => host.to_string(),
            p => format!("{host}:{p}"),
        })
    }

    /// Whether a credential bound to `bound` (`host`, meaning port 443, or
    /// `host:port`) may go to `c`'s endpoint: the same host and port once
    /// defaults are filled in. (A bare `host` does not match
    /// `http://host`, which would carry the key id and presigned URLs in
    /// clear.)
    pub fn bound_to(c: &S3Config, bound: Option<&str>) -> bool {
        let Some(bound) = bound else { return false };
        let Ok(u) = url::Url::parse(&c.endpoint) else {
            return false;
        };
        let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else {
            return false;
        };
        let (bhost, bport) = match bound.rsplit_once(':') {
            Some((h, p)) => match p.parse::<u16>() {
                Ok(p) => (h, p),
                Err(_) => return false,
            },
            None => (bound, 443),
        };
        bhost.eq_ignore_ascii_case(host) && bport == port
    }

    /// What this archive is, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A signed request with an overall deadline of `within`. `query` and
    /// `headers` are sorted here (the signature wants them in order);
    /// header names are lowercase.
    fn request(
        &self,
        method: Method,
        url: url::Url,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        within: Duration,
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
        let mut r = self
            .agent
            .request_url(method.to_str(), &signed)
            .timeout(within);
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
                SMALL,
            )
            .call();
        match r {
            Ok(r) if (200..300).contains(&r.status()) => {
                let body = r.into_string().unwrap_or_default();
                Ok(body.contains("<ObjectLockEnabled>Enabled</ObjectLockEnabled>"))
            }
            // A redirect (another region, http to https): the settings
            // are wrong, and a lock must not be assumed absent.
            Ok(r) => Err(ArchiveError::Refused(
                answer(&self.label, Ok(r)).err().unwrap_or_default(),
            )),
            Err(ureq::Error::Status(code, r)) => {
                let region = r.header("x-amz-bucket-region").map(str::to_string);
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
                        region.as_deref(),
                    )))
                } else {
                    Err(ArchiveError::Refused(describe(
                        &self.label,
                        code,
                        &body,
                        region.as_deref(),
                    )))
                }
            }
            Err(e) => Err(ArchiveError::Unreachable(s3_error(&self.label, e))),
        }
    }

    /// The folder of `sandbox`'s objects signed by key `owner`.
    fn folder(&self, owner: &str, sandbox: &str) -> String {
        format!("{}{owner}/{sandbox}/", self.prefix)
    }

    /// The object key of a segment of `sandbox`:
    /// `<prefix><key id>/<sandbox>/<first>-<last>-<hash16>.jsonl`.
    pub fn key(&self, sandbox: &str, s: &Segment) -> Result<String, String> {
        if !aibox_audit::segments::valid_segment_name(&s.segment) || !is_hex(&s.last_hash, 64) {
            return Err(format!(
                "manifest entry {}: not a segment name and chain hash aibox writes",
                s.segment
            ));
        }
        let stem = s.segment.trim_end_matches(".jsonl");
        Ok(format!(
            "{}{stem}-{}.jsonl",
            self.folder(owner(s)?, sandbox),
            &s.last_hash[..16]
        ))
    }

    /// HEAD of `key` (the latest version, or `version`): its headers, or
    /// `None` when there is no such object.
    fn head(&self, key: &str, version: Option<&str>) -> Result<Option<ureq::Response>, String> {
        let q: Vec<(&str, &str)> = version.map(|v| ("versionId", v)).into_iter().collect();
        answer(
            &format!("{}: {key}", self.label),
            self.request(Method::Head, self.bucket.object_url(key), &q, &[], SMALL)
                .call(),
        )
    }

    /// Puts `len` bytes from `body` at `key` unless an object is there
    /// (`If-None-Match: *`), under lock when the bucket has it; returns
    /// what it made, or `None` when the key was taken.
    fn put(
        &self,
        key: &str,
        body: impl Read,
        len: u64,
        md5: &[u8],
        sha256: &str,
        content_type: &str,
    ) -> Result<Option<Put>, String> {
        use base64::Engine;
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5);
        let until = self.lock.map(|(mode, keep)| {
            (
                mode.header(),
                humantime::format_rfc3339_seconds(SystemTime::now() + keep).to_string(),
            )
        });
        let mut headers = vec![
            ("content-md5", md5.as_str()),
            ("if-none-match", "*"),
            ("x-amz-meta-sha256", sha256),
        ];
        if let Some((mode, until)) = &until {
            headers.push(("x-amz-object-lock-mode", mode));
            headers.push(("x-amz-object-lock-retain-until-date", until.as_str()));
        }
        let len_s = len.to_string();
        // A minute, and a minute more per 16 MiB.
        let within = SMALL + Duration::from_secs(60 * (len >> 24));
        let r = self
            .request(
                Method::Put,
                self.bucket.object_url(key),
                &[],
                &headers,
                within,
            )
            .set("Content-Length", &len_s)
            .set("Content-Type", content_type)
            .send(body);
        if let Err(ureq::Error::Status(412, _)) = r {
            return Ok(None);
        }
        let what = format!("uploading {key} to {}", self.label);
        let r = answer(&what, r)?.ok_or_else(|| format!("{what}: the server answered 404"))?;
        Ok(Some(Put {
            version_id: r.header("x-amz-version-id").map(str::to_string),
            retain_until: until.map(|(_, u)| u),
            sent: true,
        }))
    }

    /// Puts one object unless it is already there with `sha256` (an
    /// upload whose note was lost, or a race with another uploader):
    /// what is there.
    fn put_once<R: Read>(
        &self,
        key: &str,
        body: impl FnOnce() -> Result<(R, u64, Vec<u8>), String>,
        sha256: &str,
        content_type: &str,
    ) -> Result<Put, String> {
        let existing = |r: ureq::Response| -> Result<Put, String> {
            if r.header("x-amz-meta-sha256") != Some(sha256) {
                return Err(format!(
                    "{}: {key} is already there with other content; it was not overwritten (run `aibox audit verify`)",
                    self.label
                ));
            }
            Ok(Put {
                version_id: r.header("x-amz-version-id").map(str::to_string),
                retain_until: r
                    .header("x-amz-object-lock-retain-until-date")
                    .map(str::to_string),
                sent: false,
            })
        };
        if let Some(r) = self.head(key, None)? {
            return existing(r);
        }
        let (reader, len, md5) = body()?;
        match self.put(key, reader, len, &md5, sha256, content_type)? {
            Some(p) => Ok(p),
            None => match self.head(key, None)? {
                Some(r) => existing(r),
                None => Err(format!(
                    "{}: {key} was refused as taken, yet is not there",
                    self.label
                )),
            },
        }
    }

    /// Uploads one sealed segment of `sandbox` (the file at `path`, which
    /// must still have the bytes `entry` records) and its manifest entry.
    pub fn upload(&self, sandbox: &str, path: &Path, entry: &Segment) -> Result<Uploaded, String> {
        let key = self.key(sandbox, entry)?;
        let Put {
            version_id,
            retain_until,
            sent,
        } = self.put_once(
            &key,
            || {
                // One open file, hashed then sent: what is sent is what
                // was hashed.
                let mut f =
                    std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
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
                Ok((
                    f.take(len),
                    len,
                    md5::Digest::finalize(md5).to_vec(),
                ))
            },
            &entry.sha256,
            "application/x-ndjson",
        )?;
        // The signed entry beside it: the bucket alone then says what the
        // segment must hash to, and who signed that.
        let line = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
        let line_sha = hex::encode(sha2::Sha256::digest(&line));
        self.put_once(
            &format!("{key}.entry.json"),
            || {
                let md5 = md5::Digest::finalize(md5::Digest::chain_update(
                    <md5::Md5 as md5::Digest>::new(),
                    &line,
                ));
                Ok((line.as_slice(), line.len() as u64, md5.to_vec()))
            },
            &line_sha,
            "application/json",
        )?;
        Ok(Uploaded {
            segment: entry.segment.clone(),
            sha256: entry.sha256.clone(),
            key,
            version_id,
            retain_until,
            sent,
        })
    }

    /// GET of `key` (at `version`): the response, or `None` when missing.
    fn get(&self, key: &str, version: Option<&str>) -> Result<Option<ureq::Response>, String> {
        let q: Vec<(&str, &str)> = version.map(|v| ("versionId", v)).into_iter().collect();
        // (Reading a segment back: as long as an upload may take.)
        answer(
            &format!("{}: {key}", self.label),
            self.request(Method::Get, self.bucket.object_url(key), &q, &[], BIG)
                .call(),
        )
    }

    /// Every version and delete marker under `prefix`.
    fn versions(&self, prefix: &str) -> Result<Vec<Version>, String> {
        self.list_versions(prefix, false).map(|(v, _)| v)
    }

    /// Every version and delete marker under `prefix`, and with
    /// `folders` the sub-folders instead of what is in them (hidden
    /// objects count: the listing is of versions).
    fn list_versions(
        &self,
        prefix: &str,
        folders: bool,
    ) -> Result<(Vec<Version>, Vec<String>), String> {
        let mut out = Vec::new();
        let mut subs = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut q = vec![("prefix", prefix), ("versions", "")];
            if folders {
                q.push(("delimiter", "/"));
            }
            if let Some((k, v)) = &marker {
                q.push(("key-marker", k.as_str()));
                // S3 refuses an empty version marker (a page that ended
                // on a folder has none).
                if !v.is_empty() {
                    q.push(("version-id-marker", v.as_str()));
                }
            }
            let what = format!("listing versions in {}", self.label);
            let r = answer(
                &what,
                self.request(Method::Get, self.bucket.base_url().clone(), &q, &[], SMALL)
                    .call(),
            )?
            .ok_or_else(|| format!("{what}: the server answered 404"))?;
            let body = r.into_string().map_err(|e| format!("{what}: {e}"))?;
            let page: ListVersions =
                instant_xml::from_str(&body).map_err(|e| format!("{what}: {e}"))?;
            out.extend(page.versions.into_iter().map(|v| Version {
                key: v.key,
                version_id: v.version_id,
                latest: v.is_latest,
                delete_marker: false,
            }));
            out.extend(page.delete_markers.into_iter().map(|d| Version {
                key: d.key,
                version_id: d.version_id,
                latest: d.is_latest,
                delete_marker: true,
            }));
            subs.extend(page.common_prefixes.into_iter().map(|c| c.prefix));
            // (With a delimiter, a page may end on a folder: the version
            // marker is then empty.)
            match (
                page.is_truncated,
                page.next_key_marker,
                page.next_version_id_marker,
            ) {
                (Some(true), Some(k), v)
                    if marker.as_ref() != Some(&(k.clone(), v.clone().unwrap_or_default())) =>
                {
                    marker = Some((k, v.unwrap_or_default()));
                }
                (Some(true), _, _) => {
                    return Err(format!(
                        "{what}: a truncated listing without a marker to go on from"
                    ));
                }
                _ => break,
            }
        }
        Ok((out, subs))
    }

    /// The sandboxes with objects signed by key `owner` in the bucket,
    /// hidden ones (only delete markers on top) included.
    pub fn sandboxes(&self, owner: &str) -> Result<Vec<String>, String> {
        let folder = format!("{}{owner}/", self.prefix);
        let (_, subs) = self.list_versions(&folder, true)?;
        let mut names: Vec<String> = subs
            .into_iter()
            .filter_map(|p| {
                p.strip_prefix(&folder)
                    .map(|s| s.trim_end_matches('/').to_string())
            })
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Uploads every sealed segment of the log at `log` (sandbox
    /// `sandbox`) not yet archived, in manifest order, noting each in
    /// `state_dir` (under a lock: the supervisor and `aibox audit ship`
    /// may both try). A segment that cannot be archived (changed on the
    /// host) does not hold up the ones after it; a bucket that fails does.
    /// The error is the bucket's (try again later).
    pub fn upload_pending(
        &self,
        log: &Path,
        sandbox: &str,
        state_dir: &Path,
    ) -> Result<UploadReport, String> {
        let cursor_file = cursor_path(log, state_dir);
        let _lock = lock_cursor(&cursor_file)?;
        let mut cur = self.load(&cursor_file);
        let manifest = aibox_audit::segments::read_manifest(log).map_err(|e| e.to_string())?;
        let dir = aibox_audit::segments::segments_dir(log);
        let mut n = 0;
        let mut refused = Vec::new();
        for entry in manifest.into_iter().flatten() {
            let key = match self.key(sandbox, &entry) {
                Ok(k) => k,
                Err(e) => {
                    refused.push(e);
                    continue;
                }
            };
            if cur
                .uploaded
                .iter()
                .any(|u| u.key == key && u.sha256 == entry.sha256)
            {
                continue;
            }
            let path = dir.join(&entry.segment);
            match path.metadata() {
                Ok(m) if m.len() == entry.bytes => {}
                _ => {
                    refused.push(format!(
                        "{}: missing or not its sealed size: not archived; run `aibox audit verify`",
                        path.display()
                    ));
                    continue;
                }
            }
            match self.upload(sandbox, &path, &entry) {
                Ok(up) => {
                    n += usize::from(up.sent);
                    cur.uploaded.push(up);
                    self.save(&cursor_file, &mut cur)?;
                }
                // (Changed here, or its key taken in the bucket by other
                // bytes: this one cannot go up, the ones after it can.)
                Err(e)
                    if e.contains("changed since it was sealed")
                        || e.contains("already there with other content") =>
                {
                    refused.push(e)
                }
                Err(e) => return Err(e),
            }
        }
        Ok(UploadReport {
            uploaded: n,
            refused,
        })
    }

    /// Compares the bucket's copies of the log at `log` with its local
    /// manifest. `signer` is the id of the key that signs now (its folder
    /// is searched for strays too).
    pub fn check(
        &self,
        log: &Path,
        sandbox: &str,
        state_dir: &Path,
        signer: Option<&str>,
    ) -> Result<RemoteReport, String> {
        let cur = self.load(&cursor_path(log, state_dir));
        let manifest = aibox_audit::segments::read_manifest(log).map_err(|e| e.to_string())?;
        let mut rep = RemoteReport {
            bucket: self.label.clone(),
            object_lock: self.bucket_locks,
            ..RemoteReport::default()
        };
        let entries: Vec<Segment> = manifest.into_iter().flatten().collect();
        // Every version and delete marker in each folder the log's
        // segments (and the current key) would be in.
        let mut owners: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        if let Some(s) = signer.filter(|s| is_hex(s, 16)) {
            owners.insert(s.to_string());
        }
        for e in &entries {
            if let Ok(o) = owner(e) {
                owners.insert(o.to_string());
            }
        }
        let mut listed: Vec<Version> = Vec::new();
        for o in &owners {
            listed.extend(self.versions(&self.folder(o, sandbox))?);
        }
        let mut by_key: std::collections::HashMap<&str, Vec<&Version>> =
            std::collections::HashMap::new();
        for v in &listed {
            by_key.entry(v.key.as_str()).or_default().push(v);
        }
        let mut expected = std::collections::BTreeSet::new();
        let now = jiff::Timestamp::now();
        for entry in &entries {
            let key = match self.key(sandbox, entry) {
                Ok(k) => k,
                Err(e) => {
                    rep.problems.push(e);
                    continue;
                }
            };
            let ek = format!("{key}.entry.json");
            expected.insert(key.clone());
            expected.insert(ek.clone());
            let noted = cur
                .uploaded
                .iter()
                .find(|u| u.key == key && u.sha256 == entry.sha256);
            let seg_versions = by_key.get(key.as_str()).cloned().unwrap_or_default();
            let entry_versions = by_key.get(ek.as_str()).cloned().unwrap_or_default();
            // A lock is expected when the upload noted one, or (no note)
            // when this archive locks.
            let expect_lock = match noted {
                Some(u) => u.retain_until.is_some(),
                None => self.lock.is_some(),
            };
            if seg_versions.is_empty() {
                // The entry goes up after its segment: an entry without
                // the segment, or a note of it, means it was there.
                if noted.is_some() || !entry_versions.is_empty() {
                    rep.problems.push(format!(
                        "{}: deleted from the bucket ({key}: no version left)",
                        entry.segment
                    ));
                } else {
                    rep.pending.push(entry.segment.clone());
                }
                continue;
            }
            let Some(archived) =
                Self::archived_version(entry, &key, &seg_versions, noted, &mut rep)
            else {
                continue;
            };
            // The archived bytes, read back.
            let Some(body) = self.get(&key, archived.as_deref())? else {
                rep.problems.push(format!(
                    "{}: the archived version of {key} cannot be read",
                    entry.segment
                ));
                continue;
            };
            let lock = lock_of(&body);
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
            let floor = noted.and_then(|u| u.retain_until.as_deref());
            match self.lock_state(entry, &key, &lock, expect_lock, floor, now, &mut rep) {
                LockState::Held => {
                    rep.locked += 1;
                    if lock
                        .0
                        .as_deref()
                        .is_some_and(|m| m.eq_ignore_ascii_case("GOVERNANCE"))
                    {
                        rep.governance += 1;
                    }
                    if let Some(u) = lock.1 {
                        rep.retained_until = rep.retained_until.max(Some(u));
                    }
                }
                LockState::Ended => rep.expired += 1,
                LockState::None => {}
            }
            // The signed entry beside it must be the local one, and as
            // locked.
            if entry_versions.is_empty() {
                if noted.is_some() {
                    rep.problems.push(format!(
                        "{}: its manifest entry is missing from the bucket ({ek})",
                        entry.segment
                    ));
                } else {
                    // (Between the segment's upload and its entry's, or
                    // an upload cut there: `ship` completes it.)
                    rep.pending
                        .push(format!("{} (its manifest entry)", entry.segment));
                }
                continue;
            }
            let Some(ev) = Self::archived_version(entry, &ek, &entry_versions, None, &mut rep)
            else {
                continue;
            };
            match self.get(&ek, ev.as_deref())? {
                None => rep.problems.push(format!(
                    "{}: its manifest entry cannot be read from the bucket ({ek})",
                    entry.segment
                )),
                Some(r) => {
                    let elock = lock_of(&r);
                    let text = r.into_string().unwrap_or_default();
                    if serde_json::from_str::<Segment>(&text).ok().as_ref() != Some(entry) {
                        rep.problems.push(format!(
                            "{}: its manifest entry in the bucket ({ek}) differs from the local one",
                            entry.segment
                        ));
                    }
                    self.lock_state(entry, &ek, &elock, expect_lock, None, now, &mut rep);
                }
            }
        }
        // Objects in the bucket the local manifest does not list: its
        // segments or lines were deleted here (the bucket holds the copy),
        // or they were slipped into the bucket.
        let strays: std::collections::BTreeSet<&str> = listed
            .iter()
            .map(|v| v.key.as_str())
            .filter(|k| !expected.contains(*k))
            .collect();
        for k in strays {
            rep.problems.push(format!(
                "{k}: in the bucket, but the local manifest does not list it (local segments or manifest lines deleted, or an object slipped into the bucket)"
            ));
        }
        Ok(rep)
    }

    /// Which version of `key` was archived (`None`: the bucket keeps no
    /// versions, read the object), noting delete markers and other
    /// versions (aibox writes each key once). `None` overall when it is
    /// gone.
    #[allow(clippy::option_option)]
    fn archived_version(
        entry: &Segment,
        key: &str,
        versions: &[&Version],
        noted: Option<&Uploaded>,
        rep: &mut RemoteReport,
    ) -> Option<Option<String>> {
        let real: Vec<&Version> = versions
            .iter()
            .copied()
            .filter(|v| !v.delete_marker)
            .collect();
        let markers = versions.iter().filter(|v| v.delete_marker).count();
        if markers > 0 {
            let hidden = versions.iter().any(|v| v.latest && v.delete_marker);
            rep.problems.push(format!(
                "{}: deleted in the bucket ({key}: {markers} delete marker{}{})",
                entry.segment,
                if markers == 1 { "" } else { "s" },
                if hidden {
                    ", one hides it"
                } else {
                    ", since covered by a new upload"
                }
            ));
        }
        let found = match noted.and_then(|u| u.version_id.as_deref()) {
            Some(id) => real.iter().find(|v| v.version_id == id).ok_or_else(|| {
                format!(
                    "{}: the version archived ({id}) is gone from the bucket",
                    entry.segment
                )
            }),
            // Not noted here (the note was lost): the oldest version is
            // the first upload. (Listings give each key's newest first.)
            None => real.last().ok_or_else(|| {
                format!(
                    "{}: deleted from the bucket ({key}: only delete markers left)",
                    entry.segment
                )
            }),
        };
        let archived = match found {
            Ok(v) => *v,
            Err(e) => {
                rep.problems.push(e);
                return None;
            }
        };
        let others: Vec<&str> = real
            .iter()
            .filter(|v| v.version_id != archived.version_id)
            .map(|v| v.version_id.as_str())
            .collect();
        if !others.is_empty() {
            rep.problems.push(format!(
                "{}: overwritten in the bucket: other versions of {key} ({}) besides the one archived ({}), which is read back",
                entry.segment,
                others.join(", "),
                archived.version_id
            ));
        }
        // (An unversioned bucket lists one version, "null".)
        Some((archived.version_id != "null").then(|| archived.version_id.clone()))
    }

    /// Where an object's lock stands. The retention may not end before
    /// the entry's sealing plus this archive's retention, nor before what
    /// the upload noted (`floor`); a lock that ran its course is no
    /// problem. Notes what does not hold.
    #[allow(clippy::too_many_arguments)]
    fn lock_state(
        &self,
        entry: &Segment,
        key: &str,
        lock: &(Option<String>, Option<String>),
        expect: bool,
        floor: Option<&str>,
        now: jiff::Timestamp,
        rep: &mut RemoteReport,
    ) -> LockState {
        let parse = |s: &str| s.parse::<jiff::Timestamp>().ok();
        let due = self.lock.and_then(|(_, keep)| {
            let sealed = parse(&entry.sealed_at)?;
            let secs = i64::try_from(keep.as_secs()).ok()?;
            jiff::Timestamp::from_second(sealed.as_second().checked_add(secs)?).ok()
        });
        let floor = [due, floor.and_then(parse)].into_iter().flatten().max();
        let until = lock.1.as_deref().and_then(parse);
        let segment = &entry.segment;
        match (&lock.0, until) {
            (Some(_), Some(u)) => {
                // (Dates are kept to the second.)
                if let Some(f) = floor
                    && u.as_second() + 2 < f.as_second()
                {
                    rep.problems.push(format!(
                        "{segment}: the retention of {key} was shortened (until {}, due until at least {f})",
                        lock.1.as_deref().unwrap_or("-")
                    ));
                    return LockState::None;
                }
                if u > now {
                    LockState::Held
                } else {
                    LockState::Ended
                }
            }
            (Some(_), None) if expect => {
                rep.problems.push(format!(
                    "{segment}: the object lock on {key} has no retention date"
                ));
                LockState::None
            }
            // A lock that ran its course may no longer be reported.
            (None, _) if expect && floor.is_some_and(|f| f <= now) => LockState::Ended,
            (None, _) if expect => {
                rep.problems.push(format!(
                    "{segment}: {key} is not under object lock, though it was archived under one"
                ));
                LockState::None
            }
            _ => LockState::None,
        }
    }

    fn load(&self, p: &Path) -> Cursor {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| serde_json::from_str::<Cursor>(&t).ok())
            .filter(|c| c.target == self.target)
            .unwrap_or_default()
    }

    fn save(&self, p: &Path, c: &mut Cursor) -> Result<(), String> {
        c.target = self.target.clone();
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let text = serde_json::to_string(c).map_err(|e| e.to_string())?;
        aibox_core::replace_private_file(p, text.as_bytes())
            .map_err(|e| format!("{}: {e}", p.display()))
    }
}

/// One object in the bucket, as an upload found or made it.
struct Put {
    version_id: Option<String>,
    retain_until: Option<String>,
    /// Sent now (not: it was there already).
    sent: bool,
}

/// What [`Archive::upload_pending`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// Segments uploaded now.
    pub uploaded: usize,
    /// Segments that cannot be archived, and why (changed or missing on
    /// the host, or a manifest line aibox did not write).
    pub refused: Vec<String>,
}

/// Holds an exclusive lock on `<cursor>.lock` while it lives.
fn lock_cursor(cursor: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    let mut name = cursor.as_os_str().to_owned();
    name.push(".lock");
    let p = PathBuf::from(name);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    aibox_core::lock_private_file(&p).map_err(|e| format!("locking {}: {e}", p.display()))
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

/// Where an object's lock stands.
enum LockState {
    /// Locked until a time still to come.
    Held,
    /// Its retention ran its course.
    Ended,
    /// Not locked (or a problem was noted).
    None,
}

/// An object's lock headers: (mode, retain-until).
fn lock_of(r: &ureq::Response) -> (Option<String>, Option<String>) {
    (
        r.header("x-amz-object-lock-mode").map(str::to_string),
        r.header("x-amz-object-lock-retain-until-date")
            .map(str::to_string),
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
    /// Of those under lock, how many in governance mode, which users
    /// allowed to bypass governance retention can lift (compliance mode
    /// cannot be lifted by anyone).
    pub governance: usize,
    /// Of those, how many were locked for a retention that has ended.
    pub expired: usize,
    /// Why the bucket could not be compared (then nothing else here
    /// counts).
    pub error: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The bucket and keys the signatures below were computed for (AWS's
    /// documented example keys).
    fn test_bucket() -> Bucket {
        Bucket::new(
            url::Url::parse("http://127.0.0.1:9000").unwrap(),
            UrlStyle::Path,
            "audit",
            "us-east-1",
        )
        .unwrap()
    }

    fn test_creds() -> Credentials {
        Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    }

    #[test]
    fn signed_put_matches_an_independent_implementation() {
        // Expected URL computed by botocore 1.44.8 (S3SigV4QueryAuth) for
        // the same request, keys and time: an independent check that the
        // lock headers, Content-MD5 and the recorded hash are signed as
        // S3 verifies them.
        let creds = test_creds();
        let bucket = test_bucket();
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
            (|c| c.credential = "Audit Keys".into(), "credential"),
            (|c| c.credential = "-x".into(), "credential"),
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
    fn stored_keys_parse_and_do_not_print() {
        let k = S3Keys::parse("AKID:se/cr+et:tok\n").unwrap();
        assert_eq!(
            (k.access_key.as_str(), k.secret_key.as_str()),
            ("AKID", "se/cr+et")
        );
        assert_eq!(k.session_token.as_deref(), Some("tok"));
        let k = S3Keys::parse("AKID:secret").unwrap();
        assert_eq!(k.session_token, None);
        assert!(!format!("{k:?}").contains("secret"));
        // (A `:` in a secret would be misread as a token: refused.)
        for bad in [
            "",
            "AKID",
            "AKID:",
            ":secret",
            "AKID:se:cret:tok",
            "AKID:secret:",
        ] {
            assert!(S3Keys::parse(bad).is_err(), "{bad:?}");
        }
        // Named in the config but not read: refused, not opened with the
        // environment's keys.
        let mut c = valid();
        c.credential = "audit-bucket".into();
        let e = Archive::open(&c).err().unwrap().to_string();
        assert!(e.contains("audit.s3.credential"), "{e}");
        c.endpoint = "http://127.0.0.1:9000".into();
        assert_eq!(
            Archive::endpoint_host(&c).as_deref(),
            Some("127.0.0.1:9000")
        );
        assert!(Archive::bound_to(&c, Some("127.0.0.1:9000")));
        assert!(!Archive::bound_to(&c, Some("127.0.0.1")));
        c.endpoint = "https://S3.eu-west-1.amazonaws.com:443".into();
        assert_eq!(
            Archive::endpoint_host(&c).as_deref(),
            Some("s3.eu-west-1.amazonaws.com")
        );
        for ok in [
            "s3.eu-west-1.amazonaws.com",
            "s3.eu-west-1.amazonaws.com:443",
        ] {
            assert!(Archive::bound_to(&c, Some(ok)), "{ok}");
        }
        for bad in [
            None,
            Some("s3.amazonaws.com"),
            Some("s3.eu-west-1.amazonaws.com:80"),
            Some("x:y"),
        ] {
            assert!(!Archive::bound_to(&c, bad), "{bad:?}");
        }
        // Plain http needs the port said: a bare host means 443.
        c.endpoint = "http://minio.internal".into();
        assert_eq!(
            Archive::endpoint_host(&c).as_deref(),
            Some("minio.internal:80")
        );
        assert!(!Archive::bound_to(&c, Some("minio.internal")));
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
            target: String::new(),
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
            key_id: Some("0123456789abcdef".into()),
            signature: None,
        };
        assert_eq!(
            a.key("sb", &s).unwrap(),
            "p/0123456789abcdef/sb/000000000000-000000000009-abababababababab.jsonl"
        );
        // A chain restarted under the same name (same sequence numbers)
        // does not reuse a key: the chain hash at its end differs.
        let restarted = Segment {
            last_hash: "cd".repeat(32),
            ..s.clone()
        };
        assert_ne!(a.key("sb", &restarted).unwrap(), a.key("sb", &s).unwrap());
        // Whatever a manifest line says, a key stays in its folder.
        for bad in [
            Segment {
                last_hash: "../../other-bucket/x".into(),
                ..s.clone()
            },
            Segment {
                segment: "../x.jsonl".into(),
                ..s.clone()
            },
            Segment {
                key_id: Some("../..".into()),
                ..s.clone()
            },
        ] {
            assert!(a.key("sb", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn signed_reads_and_listings_match_an_independent_implementation() {
        // Signatures computed by botocore 1.44.8 (S3SigV4QueryAuth) for
        // the same requests: a version read (a `+` in its id), a version
        // listing from a marker (`/` in values), the object lock probe.
        let creds = test_creds();
        let bucket = test_bucket();
        let at = jiff::Timestamp::from_second(1_764_374_400).unwrap();
        let sig = |u: url::Url| {
            u.query_pairs()
                .find(|(k, _)| k == "X-Amz-Signature")
                .map(|(_, v)| v.into_owned())
                .unwrap()
        };
        let key =
            "aibox-audit/0123456789abcdef/sb/000000000000-000000000009-0123456789abcdef.jsonl";
        let cases = [
            (
                presign(
                    &creds,
                    "us-east-1",
                    Method::Get,
                    bucket.object_url(key),
                    &[("versionId", "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY")],
                    &[],
                    &at,
                ),
                "f71c51b02c28cb416f67670e67e09758248ef7b523b0faa7b393db50c6bdf210",
            ),
            (
                presign(
                    &creds,
                    "us-east-1",
                    Method::Get,
                    bucket.base_url().clone(),
                    &[
                        ("versions", ""),
                        ("prefix", "aibox-audit/0123456789abcdef/sb/"),
                        ("key-marker", "aibox-audit/0123456789abcdef/sb/x.jsonl"),
                        ("version-id-marker", "v1"),
                    ],
                    &[],
                    &at,
                ),
                "44706658d7c20e41a27f24461b8cfbf2576c34585b36164bea3913d3cb51aab4",
            ),
            (
                presign(
                    &creds,
                    "us-east-1",
                    Method::Get,
                    bucket.base_url().clone(),
                    &[("object-lock", "")],
                    &[],
                    &at,
                ),
                "4f74702e140383a203c057e3ca93d8c808da4145d48dc402528b40e1c26f88da",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(sig(url), want);
        }
    }
}
