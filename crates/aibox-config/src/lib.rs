//! aibox configuration: schema, layered loading with provenance, strict
//! validation, and the edits behind `aibox config get|set|show|init`.
//!
//! Layers, lowest first: built-in defaults, `/etc/aibox/config.yaml`, the
//! user file (`~/.config/aibox/config.yaml`, or `--config`/`AIBOX_CONFIG`),
//! then `AIBOX_<SECTION>_<KEY>` environment variables (lists
//! comma-separated). Every leaf value remembers which layer set it.

#![warn(missing_docs)]

mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub use schema::*;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Built-in default.
    Default,
    /// A config file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => write!(f, "default"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

/// Errors of config loading and editing. Each names where, what, and how
/// to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid YAML.
    #[error(
        "{file}: malformed YAML: {message}\n  fix: correct the YAML syntax (indentation, quoting, `key: value` pairs)"
    )]
    Yaml {
        /// The file.
        file: String,
        /// Parser message, with position.
        message: String,
    },
    /// A key that the schema does not have.
    #[error(
        "{file}{line}: unknown key `{key}`\n  allowed keys{scope}: {allowed}\n  fix: remove the key or correct its spelling"
    )]
    UnknownKey {
        /// The file.
        file: String,
        /// ` line N` when known.
        line: String,
        /// Dotted key path.
        key: String,
        /// ` in `section`` or empty.
        scope: String,
        /// Keys that would be accepted there.
        allowed: String,
    },
    /// A value of the wrong type, outside its range, or not one of the allowed values.
    #[error("{origin}: `{key}` = {value}: {message}\n  fix: {fix}")]
    BadValue {
        /// Which layer set it.
        origin: String,
        /// Dotted key path.
        key: String,
        /// The offending value.
        value: String,
        /// What is wrong.
        message: String,
        /// How to fix it.
        fix: String,
    },
    /// `config get/set` on a key that does not exist.
    #[error("unknown config key `{key}`\n  fix: use one of: {allowed}")]
    NoSuchKey {
        /// The key asked for.
        key: String,
        /// Every key.
        allowed: String,
    },
    /// An `AIBOX_<SECTION>_…` variable that matches no key.
    #[error(
        "environment variable {var} is not a config override\n  fix: unset it, or use one of: {allowed}"
    )]
    UnknownEnv {
        /// The variable.
        var: String,
        /// Variables accepted for that section.
        allowed: String,
    },
    /// An explicitly named config file does not exist.
    #[error(
        "config file {file} does not exist\n  fix: create it with `aibox config init`, or point --config/AIBOX_CONFIG at an existing file"
    )]
    Missing {
        /// The file.
        file: String,
    },
    /// `config init` would overwrite an existing file.
    #[error("{file} already exists\n  fix: pass --force to overwrite it")]
    Exists {
        /// The file.
        file: String,
    },
}

/// Where to look for config files and which environment to read.
#[derive(Debug, Clone)]
pub struct Sources {
    /// System-wide file (missing is fine).
    pub system_file: PathBuf,
    /// User file.
    pub user_file: PathBuf,
    /// True when the user file was named explicitly (then it must exist).
    pub user_file_explicit: bool,
    /// Environment variables to consider (normally `std::env::vars()`).
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// The standard locations, honouring `--config` and `AIBOX_CONFIG`.
    pub fn standard(explicit: Option<PathBuf>) -> Self {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let from_env = env
            .iter()
            .find(|(k, _)| k == aibox_core::env::CONFIG)
            .map(|(_, v)| PathBuf::from(v))
            .filter(|p| !p.as_os_str().is_empty());
        let explicit = explicit.or(from_env);
        Self {
            system_file: PathBuf::from(aibox_core::SYSTEM_CONFIG),
            user_file_explicit: explicit.is_some(),
            user_file: explicit.unwrap_or_else(aibox_core::default_user_config),
            env,
        }
    }
}

/// A loaded, validated configuration with the origin of every value.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The effective config.
    pub config: Config,
    /// Origin of each leaf key.
    pub origins: BTreeMap<String, Origin>,
    /// Effective leaf values, flattened.
    pub values: BTreeMap<String, Value>,
    /// Files that were read.
    pub files: Vec<PathBuf>,
}

impl Loaded {
    /// Data directory (configured or default).
    pub fn data_dir(&self) -> PathBuf {
        non_empty_path(&self.config.paths.data_dir).unwrap_or_else(aibox_core::default_data_dir)
    }

    /// Runtime directory (configured or default).
    pub fn runtime_dir(&self) -> PathBuf {
        non_empty_path(&self.config.paths.runtime_dir)
            .unwrap_or_else(aibox_core::default_runtime_dir)
    }
}

fn non_empty_path(s: &str) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// Flattened defaults: every leaf key and its default value.
pub fn default_leaves() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let value = serde_json::to_value(Config::default()).unwrap_or(Value::Null);
    flatten("", &value, &mut out);
    out
}

fn flatten(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        // An empty mapping in the defaults is a map-valued key
        // (`network.resolve`), not a section: its entries are data.
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

fn sections(leaves: &BTreeMap<String, Value>) -> BTreeSet<String> {
    leaves
        .keys()
        .filter_map(|k| k.rsplit_once('.').map(|(s, _)| s.to_string()))
        .collect()
}

/// Environment variable that overrides `key` (`resources.tmp_size` →
/// `AIBOX_RESOURCES_TMP_SIZE`).
pub fn env_name(key: &str) -> String {
    format!(
        "{}{}",
        aibox_core::env::PREFIX,
        key.replace('.', "_").to_uppercase()
    )
}

/// Loads and validates the configuration from `sources`.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let system = read_optional(&sources.system_file)?;
    let user = read_optional(&sources.user_file)?;
    if user.is_none() && sources.user_file_explicit {
        return Err(ConfigError::Missing {
            file: sources.user_file.display().to_string(),
        });
    }
    load_texts(
        system
            .as_deref()
            .map(|t| (sources.system_file.as_path(), t)),
        user.as_deref().map(|t| (sources.user_file.as_path(), t)),
        &sources.env,
    )
}

fn read_optional(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Io {
            file: path.display().to_string(),
            source,
        }),
    }
}

/// Loads from file contents already in memory (used by `load` and to check
/// an edit before it is written).
pub fn load_texts(
    system: Option<(&Path, &str)>,
    user: Option<(&Path, &str)>,
    env: &[(String, String)],
) -> Result<Loaded, ConfigError> {
    let defaults = default_leaves();
    let secs = sections(&defaults);
    let mut values = defaults.clone();
    let mut origins: BTreeMap<String, Origin> = defaults
        .keys()
        .map(|k| (k.clone(), Origin::Default))
        .collect();
    let mut files = Vec::new();

    for (path, text) in [system, user].into_iter().flatten() {
        let layer = parse_file(path, text, &defaults, &secs)?;
        for (k, v) in layer {
            values.insert(k.clone(), v);
            origins.insert(k, Origin::File(path.to_path_buf()));
        }
        files.push(path.to_path_buf());
    }

    for (k, v) in env_layer(env, &defaults, &secs)? {
        origins.insert(k.clone(), Origin::Env(env_name(&k)));
        values.insert(k, v);
    }

    // Point value errors at the line that set the value, when a file did.
    let with_line = |mut e: ConfigError| {
        if let ConfigError::BadValue { origin, key, .. } = &mut e
            && let Some((_, text)) = [system, user]
                .into_iter()
                .flatten()
                .find(|(p, _)| p.display().to_string() == *origin)
            && let Some(n) = find_line(text, key.rsplit('.').next().unwrap_or(key))
        {
            *origin = format!("{origin} line {n}");
        }
        e
    };
    let config = build(&values, &origins).map_err(with_line)?;
    validate(&config, &values, &origins).map_err(with_line)?;
    Ok(Loaded {
        config,
        origins,
        values,
        files,
    })
}

fn parse_yaml(path: &Path, text: &str) -> Result<Value, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_saphyr::from_str::<Value>(text).map_err(|e| ConfigError::Yaml {
        file: path.display().to_string(),
        message: e.to_string().lines().next().unwrap_or_default().to_string(),
    })
}

fn parse_file(
    path: &Path,
    text: &str,
    defaults: &BTreeMap<String, Value>,
    secs: &BTreeSet<String>,
) -> Result<BTreeMap<String, Value>, ConfigError> {
    let root = parse_yaml(path, text)?;
    let mut out = BTreeMap::new();
    match root {
        Value::Null => {}
        Value::Object(map) => walk(path, text, "", &map, defaults, secs, &mut out)?,
        other => {
            return Err(ConfigError::Yaml {
                file: path.display().to_string(),
                message: format!(
                    "the top level must be a mapping of keys, found {}",
                    kind(&other)
                ),
            });
        }
    }
    Ok(out)
}

fn walk(
    path: &Path,
    text: &str,
    prefix: &str,
    map: &Map<String, Value>,
    defaults: &BTreeMap<String, Value>,
    secs: &BTreeSet<String>,
    out: &mut BTreeMap<String, Value>,
) -> Result<(), ConfigError> {
    for (k, v) in map {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if defaults.contains_key(&key) {
            if !v.is_null() {
                out.insert(key, v.clone());
            }
        } else if secs.contains(&key) {
            match v {
                Value::Object(inner) => walk(path, text, &key, inner, defaults, secs, out)?,
                Value::Null => {}
                other => {
                    return Err(ConfigError::BadValue {
                        origin: path.display().to_string(),
                        key: key.clone(),
                        value: short(other),
                        message: format!("`{key}` is a section and needs a mapping of keys"),
                        fix: format!(
                            "write it as `{k}:` followed by indented keys: {}",
                            allowed_in(defaults, &key)
                        ),
                    });
                }
            }
        } else {
            let scope = if prefix.is_empty() {
                String::new()
            } else {
                format!(" in `{prefix}`")
            };
            return Err(ConfigError::UnknownKey {
                file: path.display().to_string(),
                line: find_line(text, k)
                    .map(|n| format!(" line {n}"))
                    .unwrap_or_default(),
                key,
                scope,
                allowed: allowed_in(defaults, prefix),
            });
        }
    }
    Ok(())
}

/// Keys (leaf or section names) directly under `prefix`.
fn allowed_in(defaults: &BTreeMap<String, Value>, prefix: &str) -> String {
    let mut names = BTreeSet::new();
    for k in defaults.keys() {
        let rest = if prefix.is_empty() {
            Some(k.as_str())
        } else {
            k.strip_prefix(prefix).and_then(|r| r.strip_prefix('.'))
        };
        if let Some(rest) = rest {
            names.insert(rest.split('.').next().unwrap_or(rest).to_string());
        }
    }
    names.into_iter().collect::<Vec<_>>().join(", ")
}

fn find_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim_start().trim_start_matches("- ");
            t.strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
                || t.strip_prefix(&format!("\"{key}\""))
                    .is_some_and(|r| r.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", &s[..s.floor_char_boundary(80)])
    } else {
        s
    }
}

/// Parses a text value (from the environment or `config set`) into the
/// JSON type of `key`'s default.
pub fn parse_scalar(default: &Value, raw: &str) -> Value {
    match default {
        Value::Bool(_) => match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Value::Bool(true),
            "false" | "0" | "no" | "off" => Value::Bool(false),
            _ => Value::String(raw.to_string()),
        },
        Value::Number(_) => raw
            .trim()
            .parse::<u64>()
            .map(Value::from)
            .or_else(|_| raw.trim().parse::<i64>().map(Value::from))
            .unwrap_or_else(|_| Value::String(raw.to_string())),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_string()))
                .collect(),
        ),
        _ => Value::String(raw.to_string()),
    }
}

fn env_layer(
    env: &[(String, String)],
    defaults: &BTreeMap<String, Value>,
    secs: &BTreeSet<String>,
) -> Result<BTreeMap<String, Value>, ConfigError> {
    let by_env: BTreeMap<String, &String> = defaults.keys().map(|k| (env_name(k), k)).collect();
    let mut out = BTreeMap::new();
    for (var, raw) in env {
        if let Some(key) = by_env.get(var) {
            out.insert((*key).clone(), parse_scalar(&defaults[*key], raw));
            continue;
        }
        // A variable shaped like an override for a known section but naming
        // no key is a typo; ignoring it would silently run with a default.
        for sec in secs {
            let prefix = format!("{}_", env_name(sec));
            if var.starts_with(&prefix) {
                let allowed: Vec<String> = defaults
                    .keys()
                    .filter(|k| k.starts_with(&format!("{sec}.")))
                    .map(|k| env_name(k))
                    .collect();
                return Err(ConfigError::UnknownEnv {
                    var: var.clone(),
                    allowed: allowed.join(", "),
                });
            }
        }
    }
    Ok(out)
}

fn unflatten(values: &BTreeMap<String, Value>) -> Value {
    let mut root = Map::new();
    for (k, v) in values {
        let mut cur = &mut root;
        let mut parts = k.split('.').peekable();
        while let Some(p) = parts.next() {
            if parts.peek().is_none() {
                cur.insert(p.to_string(), v.clone());
            } else {
                let entry = cur
                    .entry(p.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                match entry {
                    Value::Object(m) => cur = m,
                    _ => break,
                }
            }
        }
    }
    Value::Object(root)
}

fn build(
    values: &BTreeMap<String, Value>,
    origins: &BTreeMap<String, Origin>,
) -> Result<Config, ConfigError> {
    let tree = unflatten(values);
    serde_path_to_error::deserialize::<_, Config>(tree).map_err(|e| {
        let key = e.path().to_string();
        let value = values.get(&key).map(short).unwrap_or_default();
        let origin = origins
            .get(&key)
            .map(ToString::to_string)
            .unwrap_or_else(|| "config".into());
        let message = e.into_inner().to_string();
        let fix = if message.contains("expected one of") {
            "use one of the listed values".to_string()
        } else {
            let default = default_leaves().get(&key).map(short).unwrap_or_default();
            format!("give a value of the same type as the default ({default})")
        };
        ConfigError::BadValue {
            origin,
            key,
            value,
            message,
            fix,
        }
    })
}

/// Checks a size such as `8g`, `512m`, `2Gi`, `1024`.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let unit = t[digits.len()..]
        .trim_end_matches('b')
        .trim_end_matches('i');
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn validate(
    c: &Config,
    values: &BTreeMap<String, Value>,
    origins: &BTreeMap<String, Origin>,
) -> Result<(), ConfigError> {
    let bad = |key: &str, message: &str, fix: &str| ConfigError::BadValue {
        origin: origins
            .get(key)
            .map(ToString::to_string)
            .unwrap_or_default(),
        key: key.to_string(),
        value: values.get(key).map(short).unwrap_or_default(),
        message: message.to_string(),
        fix: fix.to_string(),
    };
    if c.config_version != 1 {
        return Err(bad(
            "config_version",
            "unsupported config version",
            "set config_version: 1",
        ));
    }
    if c.resources.cpus == 0 {
        return Err(bad(
            "resources.cpus",
            "must be at least 1",
            "give a whole number of CPUs, e.g. 4",
        ));
    }
    for key in ["resources.memory", "resources.tmp_size"] {
        let v = if key.ends_with("memory") {
            &c.resources.memory
        } else {
            &c.resources.tmp_size
        };
        if parse_size(v).is_none_or(|n| n < (1 << 20)) {
            return Err(bad(
                key,
                "not a size of at least 1m",
                "write digits with an optional k/m/g/t suffix, e.g. 2g or 512m",
            ));
        }
    }
    if c.resources.pids < 16 {
        return Err(bad(
            "resources.pids",
            "below the minimum of 16",
            "give at least 16 (default 4096)",
        ));
    }
    if c.resources.nofile < 64 {
        return Err(bad(
            "resources.nofile",
            "below the minimum of 64",
            "give at least 64 (default 4096)",
        ));
    }
    for (key, port) in [
        ("network.proxy_port", c.network.proxy_port),
        ("network.dns_port", c.network.dns_port),
        ("ide.ssh_port", c.ide.ssh_port),
    ] {
        if port == 0 {
            return Err(bad(
                key,
                "port must be between 1 and 65535",
                "give a port between 1 and 65535",
            ));
        }
    }
    network_rules(&c.network).map_err(|(key, e)| {
        bad(
            key,
            &e,
            "fix or remove that entry (see docs/network.md for the syntax)",
        )
    })?;
    if c.network.proxy_addr != "127.0.0.1" {
        return Err(bad(
            "network.proxy_addr",
            "the in-sandbox proxy listens on 127.0.0.1 only",
            "remove the setting or set it to 127.0.0.1",
        ));
    }
    if !c
        .network
        .dns_addr
        .parse::<std::net::Ipv4Addr>()
        .is_ok_and(|a| a.is_loopback() && a.octets()[1] != 100)
    {
        return Err(bad(
            "network.dns_addr",
            "must be a loopback IPv4 address outside 127.100.0.0/16 (the synthetic range)",
            "remove the setting (default 127.0.0.53)",
        ));
    }
    if c.network.dns_port != 53 {
        return Err(bad(
            "network.dns_port",
            "resolv.conf cannot name another port",
            "remove the setting (53)",
        ));
    }
    for key in [
        "paths.data_dir",
        "paths.runtime_dir",
        "sandbox.rootfs",
        "credentials.key_path",
        "credentials.upstream_ca",
        "credentials.vault.secret_id_file",
        "credentials.vault.jwt_file",
        "credentials.vault.ca_file",
        "audit.signing_key_path",
        "audit.recording_key_path",
    ] {
        let v = values.get(key).and_then(Value::as_str).unwrap_or_default();
        if !v.is_empty() && !v.starts_with('/') {
            return Err(bad(
                key,
                "must be an absolute path",
                "write a path starting with /, or leave it empty for the default",
            ));
        }
    }
    if c.policy.decision_log_path != Policy::default().decision_log_path {
        return Err(bad(
            "policy.decision_log_path",
            "aibox keeps one decision log per sandbox, at <data_dir>/decisions/<name>.jsonl",
            "remove the setting (set paths.data_dir to move the logs)",
        ));
    }
    if c.policy.hot_reload_secs != 0 {
        return Err(bad(
            "policy.hot_reload_secs",
            "policy is not reloaded while a sandbox runs; changes apply at its next start",
            "remove the setting or set it to 0, and restart the sandbox after a policy change",
        ));
    }
    if parse_size(&c.policy.decision_log_max_size).is_none_or(|n| n < (64 << 10)) {
        return Err(bad(
            "policy.decision_log_max_size",
            "not a size of at least 64k (the longest decision line)",
            "write digits with an optional k/m/g/t suffix, e.g. 64m",
        ));
    }
    if !(1..=1000).contains(&c.policy.decision_log_keep) {
        return Err(bad(
            "policy.decision_log_keep",
            "between 1 and 1000 rotated files are kept",
            "give a number of files from 1 to 1000 (default 8)",
        ));
    }
    if let Some(u) = c.credentials.push_remotes.iter().find(|u| {
        let l = u.to_ascii_lowercase();
        !(l.starts_with("https://") || l.starts_with("http://")) || u.contains(char::is_whitespace)
    }) {
        return Err(bad(
            "credentials.push_remotes",
            &format!("{u:?} is not an http(s) URL"),
            "list remote URLs such as https://github.com/org/repo.git",
        ));
    }
    if humantime::parse_duration(&c.audit.checkpoint_interval).is_err() {
        return Err(bad(
            "audit.checkpoint_interval",
            "not a duration",
            "write e.g. 60s or 5m",
        ));
    }
    if let Err(e) = c.audit.detection.parse() {
        return Err(bad(
            &format!("audit.detection.{}", e.field),
            &e.reason,
            "fix the value or remove it for the default (see docs/audit.md)",
        ));
    }
    if parse_size(&c.audit.segment_max).is_none_or(|n| n < (1 << 20)) {
        return Err(bad(
            "audit.segment_max",
            "not a size of at least 1m",
            "write digits with a k/m/g suffix, e.g. 64m",
        ));
    }
    if let Err(e) = aibox_siem::sink::check(&c.audit.sinks) {
        return Err(bad(
            "audit.sinks",
            &e.to_string(),
            "see docs/audit.md (Sinks) for the fields each type takes",
        ));
    }
    if let Some(a) = c.audit.archive() {
        if let Err(e) = aibox_siem::archive::check(&a) {
            // Named after the key the value came from (the original's
            // keys fill what audit.s3 leaves empty).
            let s3 = &c.audit.s3;
            let (key, reason) = match e.field {
                "endpoint" if a.endpoint.is_empty() => (
                    "audit.s3.endpoint".to_string(),
                    "minio has no default address".to_string(),
                ),
                "endpoint" if s3.endpoint.is_empty() => {
                    ("audit.storage_endpoint".to_string(), e.reason)
                }
                "bucket" if s3.bucket.is_empty() => ("audit.storage_bucket".to_string(), e.reason),
                "retention" if s3.retention.is_empty() => {
                    ("audit.retention_tier1".to_string(), e.reason)
                }
                f => (format!("audit.s3.{f}"), e.reason),
            };
            let fix = if e.field == "endpoint" {
                "set it, e.g. audit.s3.endpoint: http://minio.internal:9000 (docs/audit.md, S3 storage); `audit.storage: local` turns archiving off"
            } else {
                "see docs/audit.md (S3 storage); `audit.storage: local` turns archiving off"
            };
            return Err(bad(&key, &reason, fix));
        }
        if parse_size(&c.audit.segment_max).is_some_and(|n| n > (5 << 30)) {
            return Err(bad(
                "audit.segment_max",
                "larger than 5g, the most one S3 upload takes",
                "use at most 5g with audit.storage: s3 (the default is 64m)",
            ));
        }
    }
    if c.audit.checkpoint_every == 0 {
        return Err(bad(
            "audit.checkpoint_every",
            "must be at least 1",
            "give a number of events (default 1000)",
        ));
    }
    let v = &c.credentials.vault;
    if !v.token_ttl.is_empty() && humantime::parse_duration(&v.token_ttl).is_err() {
        return Err(bad(
            "credentials.vault.token_ttl",
            "not a duration",
            "write e.g. 8h or 30m",
        ));
    }
    for (i, s) in v.secrets.iter().enumerate() {
        let name_ok = !s.name.is_empty()
            && s.name.len() <= 64
            && s.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok || s.path.is_empty() || s.host.is_empty() || s.field.is_empty() {
            return Err(bad(
                "credentials.vault.secrets",
                &format!(
                    "entry {i} needs a name (lowercase letters, digits, -), a path, a field and a host"
                ),
                "write e.g. {name: git-token, mount: secret, path: aibox/github, field: token, host: github.com}",
            ));
        }
    }
    if c.credentials.mode == CredentialMode::Vault && c.credentials.vault_addr.is_empty() {
        return Err(bad(
            "credentials.vault_addr",
            "vault mode needs a Vault address",
            "set credentials.vault_addr, e.g. https://vault.example:8200",
        ));
    }
    Ok(())
}

/// Parses `network.allowed_domains` and `network.resolve` into the
/// proxy's allowlist; on error, the key and the message.
pub fn network_rules(n: &Network) -> Result<aibox_net::Allowlist, (&'static str, String)> {
    aibox_net::Allowlist::parse::<String>(&[], &n.resolve)
        .map_err(|e| ("network.resolve", e.to_string()))?;
    check_gateway(&n.llm_gateway)?;
    let allow = aibox_net::Allowlist::parse(&all_rules(n), &n.resolve)
        .map_err(|e| ("network.allowed_domains", e.to_string()))?;
    let ports = allow.transparent_ports();
    if let Some(p) = ports.iter().find(|p| **p == 53 || **p == n.proxy_port) {
        return Err((
            "network.allowed_domains",
            format!(
                "port {p} is taken inside the sandbox by the aibox DNS answerer or proxy, so names cannot be reached on it without the proxy; remove that port or change network.proxy_port"
            ),
        ));
    }
    if matches!(n.proxy_port, 53 | 80 | 443) {
        return Err((
            "network.proxy_port",
            "53, 80 and 443 are taken inside the sandbox by DNS and the transparent listeners"
                .into(),
        ));
    }
    if allow.transparent_ports().len() > 24 {
        return Err((
            "network.allowed_domains",
            "more than 22 distinct ports besides 80 and 443".into(),
        ));
    }
    Ok(allow)
}

/// `network.allowed_domains` plus the LLM gateway's hosts (port 443),
/// which the sandbox must be able to resolve and reach.
pub fn all_rules(n: &Network) -> Vec<String> {
    let mut rules = n.allowed_domains.clone();
    rules.extend(
        n.llm_gateway
            .providers
            .iter()
            .map(|p| format!("{}:443", p.host)),
    );
    rules
}

/// Checks `network.llm_gateway` (everything but reading the keys, which
/// `aibox start` does).
fn check_gateway(g: &LlmGateway) -> Result<(), (&'static str, String)> {
    const KEY: &str = "network.llm_gateway";
    let mut names = BTreeSet::new();
    let mut hosts = BTreeSet::new();
    for p in &g.providers {
        let who = format!("provider `{}`", p.name);
        if p.name.is_empty() || !names.insert(p.name.as_str()) {
            return Err((KEY, format!("{who}: names must be non-empty and unique")));
        }
        match aibox_net::parse_host(&p.host) {
            Ok(aibox_net::Host::Name(h)) if !h.starts_with('*') => {
                if !hosts.insert(h) {
                    return Err((KEY, format!("{who}: another provider has host {}", p.host)));
                }
            }
            _ => {
                return Err((
                    KEY,
                    format!("{who}: host `{}` must be a plain DNS name", p.host),
                ));
            }
        }
        match (&p.api_key_env, &p.api_key_file) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err((
                    KEY,
                    format!("{who}: set exactly one of api_key_env and api_key_file"),
                ));
            }
        }
        if let Some(u) = &p.upstream
            && !u.starts_with("https://")
        {
            return Err((
                KEY,
                format!("{who}: upstream `{u}` must start with https://"),
            ));
        }
        for v in p.placeholder_env.iter().flatten() {
            let ok = !v.is_empty()
                && v.bytes().enumerate().all(|(i, b)| {
                    b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit())
                });
            if !ok {
                return Err((KEY, format!("{who}: `{v}` is not a variable name")));
            }
        }
    }
    for r in &g.routes {
        if !names.contains(r.provider.as_str()) {
            return Err((
                KEY,
                format!(
                    "route for model `{}` names provider `{}`, which is not configured",
                    r.model, r.provider
                ),
            ));
        }
    }
    if parse_size(&g.max_body).is_none_or(|n| n == 0) {
        return Err((
            "network.llm_gateway.max_body",
            format!("`{}` is not a size such as 10m", g.max_body),
        ));
    }
    Ok(())
}

/// Effective value of `key`, formatted as `config set` accepts it.
pub fn get(loaded: &Loaded, key: &str) -> Result<String, ConfigError> {
    let v = loaded.values.get(key).ok_or_else(|| no_such_key(key))?;
    Ok(format_value(v))
}

/// Formats a leaf value for display (lists comma-separated).
pub fn format_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| i.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

fn no_such_key(key: &str) -> ConfigError {
    ConfigError::NoSuchKey {
        key: key.to_string(),
        allowed: default_leaves()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Sets `key` to `raw` in the user file of `sources`, after checking that
/// the whole configuration is still valid with the change. The file is
/// replaced atomically; on any error it is left untouched.
pub fn set(sources: &Sources, key: &str, raw: &str) -> Result<(), ConfigError> {
    let defaults = default_leaves();
    let default = defaults.get(key).ok_or_else(|| no_such_key(key))?;
    let path = &sources.user_file;
    let existing = read_optional(path)?.unwrap_or_default();
    let mut tree = parse_yaml(path, &existing)?;
    if tree.is_null() {
        tree = Value::Object(Map::new());
    }
    let mut cur = &mut tree;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let Value::Object(map) = cur else {
            return Err(ConfigError::Yaml {
                file: path.display().to_string(),
                message: format!("`{}` is not a mapping", parts[..i].join(".")),
            });
        };
        if i + 1 == parts.len() {
            map.insert((*p).to_string(), parse_scalar(default, raw));
            break;
        }
        cur = map
            .entry((*p).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if cur.is_null() {
            *cur = Value::Object(Map::new());
        }
    }
    let text = serde_saphyr::to_string(&tree).map_err(|e| ConfigError::Yaml {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    let system = read_optional(&sources.system_file)?;
    load_texts(
        system
            .as_deref()
            .map(|t| (sources.system_file.as_path(), t)),
        Some((path.as_path(), &text)),
        &sources.env,
    )?;
    write_atomic(path, &text)
}

fn write_atomic(path: &Path, text: &str) -> Result<(), ConfigError> {
    let io = |source| ConfigError::Io {
        file: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Built-in templates for `config init`.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("minimal", include_str!("../templates/minimal.yaml")),
    ("dev", include_str!("../templates/dev.yaml")),
    ("enterprise", include_str!("../templates/enterprise.yaml")),
];

/// Writes template `name` to the user file.
pub fn init(sources: &Sources, name: &str, force: bool) -> Result<PathBuf, ConfigError> {
    let text = TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| ConfigError::BadValue {
            origin: "--template".into(),
            key: "template".into(),
            value: name.into(),
            message: "unknown template".into(),
            fix: "use one of: minimal, dev, enterprise".into(),
        })?;
    let path = &sources.user_file;
    if path.exists() && !force {
        return Err(ConfigError::Exists {
            file: path.display().to_string(),
        });
    }
    write_atomic(path, text)?;
    Ok(path.clone())
}

#[cfg(test)]
mod tests;
