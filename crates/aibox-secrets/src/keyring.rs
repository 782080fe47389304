//! The OS keyring backend: credentials as items of the Secret Service's
//! default collection (GNOME Keyring, KeePassXC, KWallet), talked to over
//! the session D-Bus with an encrypted (Diffie-Hellman) session. Each
//! item carries the credential's metadata as attributes
//! (`application=aibox`, `aibox-name`, …) and its value as the secret.

use std::collections::HashMap;

use secret_service::EncryptionType;
use secret_service::blocking::SecretService;

use crate::{Meta, Secret};

/// Errors of the keyring backend.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// No Secret Service answers on the session bus.
    #[error("no OS keyring answers (Secret Service on the session D-Bus): {0}")]
    Unavailable(String),
    /// The keyring is locked and could not be unlocked without a prompt.
    #[error(
        "the OS keyring is locked; unlock it (log in to the desktop, or `gnome-keyring-daemon --unlock`), or set credentials.store: file"
    )]
    Locked,
    /// The keyring refused or failed an operation.
    #[error("the OS keyring failed to {what}: {detail}")]
    Failed {
        /// What was being done.
        what: &'static str,
        /// The service's message.
        detail: String,
    },
}

const APP: &str = "aibox";

/// The keyring store.
pub struct KeyringStore {
    ss: SecretService<'static>,
}

impl std::fmt::Debug for KeyringStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyringStore")
    }
}

fn failed(what: &'static str) -> impl FnOnce(secret_service::Error) -> KeyringError {
    move |e| match e {
        secret_service::Error::Locked => KeyringError::Locked,
        e => KeyringError::Failed {
            what,
            detail: e.to_string(),
        },
    }
}

fn attr(m: &HashMap<String, String>, k: &str) -> Option<String> {
    m.get(k).filter(|v| !v.is_empty()).cloned()
}

impl KeyringStore {
    /// Connects to the Secret Service, if one answers on the session bus.
    pub fn connect() -> Result<KeyringStore, KeyringError> {
        if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none() {
            return Err(KeyringError::Unavailable(
                "no session bus (DBUS_SESSION_BUS_ADDRESS is not set)".into(),
            ));
        }
        let ss = SecretService::connect(EncryptionType::Dh)
            .map_err(|e| KeyringError::Unavailable(e.to_string()))?;
        // A service that answers but has no usable collection is as good
        // as none.
        ss.get_default_collection()
            .map_err(|e| KeyringError::Unavailable(e.to_string()))?;
        Ok(KeyringStore { ss })
    }

    fn items(&self) -> Result<Vec<secret_service::blocking::Item<'_>>, KeyringError> {
        let found = self
            .ss
            .search_items(HashMap::from([("application", APP)]))
            .map_err(failed("search its items"))?;
        let mut items = found.unlocked;
        for i in found.locked {
            i.unlock().map_err(|_| KeyringError::Locked)?;
            items.push(i);
        }
        Ok(items)
    }

    fn meta(i: &secret_service::blocking::Item<'_>) -> Result<Option<Meta>, KeyringError> {
        let a = i.get_attributes().map_err(failed("read an item"))?;
        let Some(name) = attr(&a, "aibox-name") else {
            return Ok(None);
        };
        Ok(Some(Meta {
            name,
            kind: attr(&a, "aibox-kind").unwrap_or_else(|| "custom".into()),
            host: attr(&a, "aibox-host"),
            created: attr(&a, "aibox-created").unwrap_or_default(),
            expires: attr(&a, "aibox-expires"),
            source: "keyring".into(),
        }))
    }

    /// What is stored, without values.
    pub fn list(&self) -> Result<Vec<Meta>, KeyringError> {
        let mut out = Vec::new();
        for i in self.items()? {
            if let Some(m) = Self::meta(&i)? {
                out.push(m);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every stored credential with its value.
    pub fn entries(&self) -> Result<Vec<(Meta, Secret)>, KeyringError> {
        let mut out = Vec::new();
        for i in self.items()? {
            let Some(m) = Self::meta(&i)? else { continue };
            let raw = zeroize::Zeroizing::new(i.get_secret().map_err(failed("read a value"))?);
            let v = String::from_utf8(raw.to_vec()).map_err(|_| KeyringError::Failed {
                what: "read a value",
                detail: format!("the value of `{}` is not text", m.name),
            })?;
            out.push((m, Secret::new(v)));
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// Stores `secret` as `meta.name`, replacing one of that name only
    /// when `replace`.
    pub fn put(&self, meta: Meta, secret: Secret, replace: bool) -> Result<(), KeyringError> {
        let existing: Vec<_> = self
            .items()?
            .into_iter()
            .filter(|i| {
                Self::meta(i)
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.name == meta.name)
            })
            .collect();
        if !existing.is_empty() && !replace {
            return Err(KeyringError::Failed {
                what: "store the credential",
                detail: format!("`{}` is stored already; pass --replace", meta.name),
            });
        }
        let collection = self
            .ss
            .get_default_collection()
            .map_err(failed("open the default collection"))?;
        if collection
            .is_locked()
            .map_err(failed("open the default collection"))?
        {
            collection.unlock().map_err(|_| KeyringError::Locked)?;
        }
        let created = meta.created.clone();
        let expires = meta.expires.clone().unwrap_or_default();
        let host = meta.host.clone().unwrap_or_default();
        let attrs = HashMap::from([
            ("application", APP),
            ("aibox-name", meta.name.as_str()),
            ("aibox-kind", meta.kind.as_str()),
            ("aibox-host", host.as_str()),
            ("aibox-created", created.as_str()),
            ("aibox-expires", expires.as_str()),
        ]);
        collection
            .create_item(
                &format!("aibox credential {}", meta.name),
                attrs,
                secret.expose().as_bytes(),
                true,
                "text/plain",
            )
            .map_err(failed("store the credential"))?;
        // Items of the same name with other attributes (another host,
        // expiry) are the old value: gone once the new one is in.
        for i in existing {
            if Self::meta(&i).ok().flatten().is_some_and(|m| {
                m.host.as_deref().unwrap_or("") != host
                    || m.expires.as_deref().unwrap_or("") != expires
                    || m.created != created
                    || m.kind != meta.kind
            }) {
                i.delete().map_err(failed("remove the old value"))?;
            }
        }
        Ok(())
    }

    /// Removes the credential `name`; whether there was one.
    pub fn remove(&self, name: &str) -> Result<bool, KeyringError> {
        let mut found = false;
        for i in self.items()? {
            if Self::meta(&i)?.is_some_and(|m| m.name == name) {
                i.delete().map_err(failed("remove the credential"))?;
                found = true;
            }
        }
        Ok(found)
    }
}
