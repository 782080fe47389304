//! aibox's credential store: the secrets `aibox auth add` takes (git
//! tokens, LLM API keys, mirror tokens, custom host-bound ones), kept on
//! the host and never handed to a sandbox as such.
//!
//! [`file::FileStore`] is the encrypted-file backend: AES-256-GCM over the
//! whole set, under a random 256-bit data key kept in a separate key file
//! (never derived from public data such as the machine id), optionally
//! wrapped with a key derived from a passphrase by Argon2id. Both files
//! are 0600 and checked on every load. Secrets are zeroised when dropped.

pub mod file;
pub mod keyring;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The built-in credential types.
pub const BUILTIN: [&str; 3] = ["git-token", "llm-api-key", "mirror-token"];

/// What is known of a stored credential, without its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Unique name: a built-in type, or a custom name.
    pub name: String,
    /// `git-token`, `llm-api-key`, `mirror-token` or `custom`.
    pub kind: String,
    /// The host the credential is bound to (required for custom ones).
    pub host: Option<String>,
    /// When it was stored (RFC 3339).
    pub created: String,
    /// When it stops being handed out (RFC 3339), if ever.
    pub expires: Option<String>,
    /// Which backend holds it (`file`).
    pub source: String,
}

impl Meta {
    /// Whether it has expired at `now`.
    pub fn expired(&self, now: std::time::SystemTime) -> bool {
        self.expires
            .as_deref()
            .and_then(|e| humantime::parse_rfc3339(e).ok())
            .is_some_and(|e| e <= now)
    }
}

/// A secret value: zeroised on drop, never printed.
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps `s` (taking it, so no copy is left behind).
    pub fn new(s: String) -> Secret {
        Secret(Zeroizing::new(s))
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// A fresh placeholder for credential `name`: what a sandbox holds
/// instead of the value, `aibox-cred-<name>-<128 random bits in hex>`
/// (unguessable, so one sandbox cannot name another's).
pub fn placeholder(name: &str) -> Result<String, String> {
    let mut r = [0u8; 16];
    getrandom::getrandom(&mut r).map_err(|e| format!("drawing a random placeholder: {e}"))?;
    Ok(format!("aibox-cred-{name}-{}", hex::encode(r)))
}

/// Checks a credential name: a built-in type, or 1–64 of `a-z 0-9 -`
/// starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a credential name: use one of {} or 1-64 lowercase letters, digits and dashes",
            BUILTIN.join(", ")
        ))
    }
}

/// Checks a host a credential is bound to: a DNS name (lowercase, with at
/// least one dot, or `localhost`), optionally with `:port`.
pub fn validate_host(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let name_ok = name.len() <= 253
        && (name == "localhost" || (name.contains('.') && name.split('.').all(label_ok)));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if name_ok && port_ok {
        Ok(())
    } else {
        Err(format!(
            "`{host}` is not a host: give a lowercase DNS name such as github.com, optionally with :port"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hosts() {
        for ok in ["git-token", "my-mirror", "a", "x1"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-x", "Git", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        for ok in [
            "github.com",
            "git.example.org:8443",
            "localhost",
            "localhost:3000",
        ] {
            validate_host(ok).unwrap();
        }
        for bad in [
            "",
            "github",
            "GitHub.com",
            "a..b",
            "x.com:0",
            "x.com:99999",
            "-a.com",
            "*.x.com",
        ] {
            assert!(validate_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}

/// A credential store: the OS keyring, or the encrypted file.
#[derive(Debug)]
pub enum Store {
    /// The encrypted file.
    File(file::FileStore),
    /// The OS keyring.
    Keyring(keyring::KeyringStore),
}

/// Errors of either store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The encrypted file's.
    #[error(transparent)]
    File(#[from] file::Error),
    /// The keyring's.
    #[error(transparent)]
    Keyring(#[from] keyring::KeyringError),
}

impl Store {
    /// What is stored, without values.
    pub fn list(&self) -> Result<Vec<Meta>, StoreError> {
        Ok(match self {
            Store::File(f) => f.list()?,
            Store::Keyring(k) => k.list()?,
        })
    }

    /// Every stored credential with its value.
    pub fn entries(&self) -> Result<Vec<(Meta, Secret)>, StoreError> {
        Ok(match self {
            Store::File(f) => f.entries()?,
            Store::Keyring(k) => k.entries()?,
        })
    }

    /// Stores `secret` as `meta.name` (replacing only when `replace`).
    pub fn put(&self, mut meta: Meta, secret: Secret, replace: bool) -> Result<(), StoreError> {
        meta.source = self.source().into();
        match self {
            Store::File(f) => f.put(meta, secret, replace)?,
            Store::Keyring(k) => k.put(meta, secret, replace)?,
        }
        Ok(())
    }

    /// Removes `name`; whether it was stored.
    pub fn remove(&self, name: &str) -> Result<bool, StoreError> {
        Ok(match self {
            Store::File(f) => f.remove(name)?,
            Store::Keyring(k) => k.remove(name)?,
        })
    }

    /// `file` or `keyring` (the SOURCE `auth list` shows).
    pub fn source(&self) -> &'static str {
        match self {
            Store::File(_) => "file",
            Store::Keyring(_) => "keyring",
        }
    }

    /// Where the credentials are, for messages.
    pub fn describe(&self) -> String {
        match self {
            Store::File(f) => format!(
                "{} (key: {})",
                f.store_path().display(),
                f.key_path().display()
            ),
            Store::Keyring(_) => "the OS keyring (Secret Service)".into(),
        }
    }
}
