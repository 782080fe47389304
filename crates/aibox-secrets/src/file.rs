//! The encrypted-file credential store.
//!
//! Two files, kept apart (the CLI puts the key beside the user's config
//! and the store in the data directory, and refuses one directory for
//! both):
//! - the key file (`credentials.key`, JSON, 0600): a random 256-bit data
//!   key, either as is (`"protection": "none"`) or encrypted with
//!   AES-256-GCM under a key derived from a passphrase with Argon2id
//!   (`"protection": "argon2id"`, with the salt and cost parameters);
//! - the store (`store.enc`, JSON envelope, 0600): `key_id` (names the
//!   data key without revealing it), a random nonce, and the credentials
//!   as JSON encrypted with AES-256-GCM under the data key, the format,
//!   version and key id as associated data.
//!
//! Loading checks both files are regular, owned by the caller and 0600
//! (or stricter). A wrong passphrase, a key file of another store, a
//! missing key file, and any change to the store are distinct errors;
//! none of them overwrites anything. Writes go to a temporary file that
//! is synced and renamed over the store.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::{Meta, Secret};

const STORE_FORMAT: &str = "aibox-credentials";
const KEY_FORMAT: &str = "aibox-credentials-key";
const VERSION: u32 = 1;
/// Argon2id cost (OWASP's first recommendation: 19 MiB, 2 passes).
const ARGON_M_KIB: u32 = 19 * 1024;
const ARGON_T: u32 = 2;
const ARGON_P: u32 = 1;
/// Largest file read (a store of thousands of credentials is far less).
const MAX_FILE: u64 = 16 << 20;

/// What went wrong, with the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// Reading, writing, ….
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file others could read or write.
    #[error(
        "{path} has mode {mode:04o}; credentials files must be private: run `chmod 600 {path}` (and check who else could have read it)"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A file of another user, a symlink, or not a regular file.
    #[error("{path} {why}; refusing to use it as a credentials file")]
    NotPrivate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The store exists, its key does not.
    #[error(
        "the credential store {store} exists but its key file {key} is missing; restore the key file from where you keep it (without it the store cannot be read; nothing was changed)"
    )]
    KeyMissing {
        /// The store.
        store: PathBuf,
        /// The key file expected.
        key: PathBuf,
    },
    /// The key file belongs to another store.
    #[error(
        "the key file {key} does not open {store} (key ids differ: a key file of another store, or the store's key id was changed); point credentials.key_path at the right key file, or restore the store from a backup (nothing was changed)"
    )]
    WrongKey {
        /// The store.
        store: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The passphrase does not unwrap the key.
    #[error("wrong passphrase for the key file {key} (nothing was changed)")]
    WrongPassphrase {
        /// The key file.
        key: PathBuf,
    },
    /// The key file is passphrase-protected and none was given, or the
    /// other way round.
    #[error("{0}")]
    Passphrase(String),
    /// The store or key file is damaged or was changed.
    #[error(
        "{path} is damaged or was changed ({detail}); restore it from a backup or remove it and add the credentials again (nothing was changed)"
    )]
    Tampered {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// A name is stored already.
    #[error("a credential named `{0}` is stored already; pass --replace to replace it")]
    Exists(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The key file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: String,
    version: u32,
    /// `none` or `argon2id`.
    protection: String,
    /// The data key (hex), when not protected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    /// Argon2id memory (KiB), passes, lanes, salt (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kdf: Option<Kdf>,
    /// Nonce and wrapped data key (hex), when protected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nonce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wrapped: Option<String>,
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        self.key.zeroize();
        self.wrapped.zeroize();
    }
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Kdf {
    m_kib: u32,
    t: u32,
    p: u32,
    salt: String,
}

/// The store file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    version: u32,
    key_id: String,
    nonce: String,
    ciphertext: String,
}

/// One credential as stored (its value zeroised on drop).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    meta: Meta,
    secret: String,
}

impl Drop for Stored {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Contents {
    entries: Vec<Stored>,
}

type DataKey = Zeroizing<[u8; 32]>;

/// The encrypted-file store at `store`, keyed by the key file at `key`.
#[derive(Debug)]
pub struct FileStore {
    store: PathBuf,
    key: PathBuf,
    passphrase: Option<Secret>,
}

impl FileStore {
    /// A store at `store` with its key at `key`; `passphrase` protects
    /// the key (it is needed to read a protected key, and makes a new key
    /// protected).
    pub fn new(store: PathBuf, key: PathBuf, passphrase: Option<Secret>) -> FileStore {
        FileStore {
            store,
            key,
            passphrase,
        }
    }

    /// The store file.
    pub fn store_path(&self) -> &Path {
        &self.store
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.key
    }

    /// Whether an existing key file is passphrase-protected (None: no key
    /// file yet).
    pub fn key_protected(&self) -> Result<Option<bool>, Error> {
        Ok(read_private(&self.key)?
            .map(|b| parse_key(&self.key, &b))
            .transpose()?
            .map(|k| k.protection == "argon2id"))
    }

    /// What is stored, without values.
    pub fn list(&self) -> Result<Vec<Meta>, Error> {
        Ok(self
            .load()?
            .map(|(_, c)| c.entries.iter().map(|e| e.meta.clone()).collect())
            .unwrap_or_default())
    }

    /// The credential named `name`, if stored.
    pub fn get(&self, name: &str) -> Result<Option<(Meta, Secret)>, Error> {
        let Some((_, mut c)) = self.load()? else {
            return Ok(None);
        };
        Ok(c.entries
            .iter_mut()
            .find(|e| e.meta.name == name)
            .map(|e| (e.meta.clone(), Secret::new(std::mem::take(&mut e.secret)))))
    }

    /// Every stored credential with its value (one decryption).
    pub fn entries(&self) -> Result<Vec<(Meta, Secret)>, Error> {
        let Some((_, mut c)) = self.load()? else {
            return Ok(Vec::new());
        };
        Ok(c.entries
            .iter_mut()
            .map(|e| (e.meta.clone(), Secret::new(std::mem::take(&mut e.secret))))
            .collect())
    }

    /// Stores `secret` as `meta.name` (replacing one of that name only
    /// when `replace`). Creates the key file on first use.
    pub fn put(&self, meta: Meta, secret: Secret, replace: bool) -> Result<(), Error> {
        let _lock = self.lock()?;
        let (dek, mut c) = match self.load()? {
            Some(x) => x,
            None => (self.new_key()?, Contents::default()),
        };
        let at = c.entries.iter().position(|e| e.meta.name == meta.name);
        if at.is_some() && !replace {
            return Err(Error::Exists(meta.name));
        }
        let entry = Stored {
            meta,
            secret: secret.expose().to_string(),
        };
        match at {
            Some(i) => c.entries[i] = entry,
            None => c.entries.push(entry),
        }
        self.save(&dek, &c)
    }

    /// Removes `name`; whether it was there.
    pub fn remove(&self, name: &str) -> Result<bool, Error> {
        let _lock = self.lock()?;
        let Some((dek, mut c)) = self.load()? else {
            return Ok(false);
        };
        let before = c.entries.len();
        c.entries.retain(|e| e.meta.name != name);
        if c.entries.len() == before {
            return Ok(false);
        }
        self.save(&dek, &c)?;
        Ok(true)
    }

    /// Holds `store.lock` beside the store until dropped, so that two
    /// writers (two `aibox auth add` at once) cannot each save a set
    /// without the other's change.
    fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, Error> {
        let mut p = self.store.as_os_str().to_owned();
        p.push(".lock");
        let p = PathBuf::from(p);
        private_dir(&p)?;
        check_dir(&p)?;
        aibox_core::lock_private_file(&p).map_err(io("locking", &p))
    }

    /// The data key and contents; None when neither file exists yet.
    fn load(&self) -> Result<Option<(DataKey, Contents)>, Error> {
        let key = read_private(&self.key)?;
        let store = read_private(&self.store)?;
        let (store, key) = match (store, key) {
            (None, None) => return Ok(None),
            (Some(_), None) => {
                return Err(Error::KeyMissing {
                    store: self.store.clone(),
                    key: self.key.clone(),
                });
            }
            (None, Some(k)) => return Ok(Some((self.unwrap_key(&k)?, Contents::default()))),
            (Some(s), Some(k)) => (s, k),
        };
        let dek = self.unwrap_key(&key)?;
        let env: Envelope = serde_json::from_slice(&store).map_err(|e| Error::Tampered {
            path: self.store.clone(),
            detail: format!("not a store file: {e}"),
        })?;
        if env.format != STORE_FORMAT || env.version != VERSION {
            return Err(Error::Tampered {
                path: self.store.clone(),
                detail: format!(
                    "format `{}` version {}; this aibox reads `{STORE_FORMAT}` version {VERSION}",
                    env.format, env.version
                ),
            });
        }
        if env.key_id != key_id(&dek) {
            return Err(Error::WrongKey {
                store: self.store.clone(),
                key: self.key.clone(),
            });
        }
        let tampered = |detail: &str| Error::Tampered {
            path: self.store.clone(),
            detail: detail.to_string(),
        };
        let nonce = hex::decode(&env.nonce)
            .ok()
            .filter(|n| n.len() == 12)
            .ok_or_else(|| tampered("bad nonce"))?;
        let ct = hex::decode(&env.ciphertext).map_err(|_| tampered("bad ciphertext"))?;
        let aad = store_aad(&env.key_id);
        let plain = Zeroizing::new(
            cipher(&dek)
                .decrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &ct,
                        aad: &aad,
                    },
                )
                .map_err(|_| tampered("authentication failed"))?,
        );
        let c: Contents = serde_json::from_slice(&plain)
            .map_err(|e| tampered(&format!("contents do not parse: {e}")))?;
        Ok(Some((dek, c)))
    }

    fn unwrap_key(&self, bytes: &[u8]) -> Result<DataKey, Error> {
        let k = parse_key(&self.key, bytes)?;
        let bad = |detail: &str| Error::Tampered {
            path: self.key.clone(),
            detail: detail.to_string(),
        };
        let mut dek = Zeroizing::new([0u8; 32]);
        match (k.protection.as_str(), &self.passphrase) {
            ("none", None) => {
                let raw = Zeroizing::new(
                    hex::decode(k.key.as_deref().unwrap_or_default())
                        .map_err(|_| bad("bad key"))?,
                );
                if raw.len() != 32 {
                    return Err(bad("the key is not 256 bits"));
                }
                dek.copy_from_slice(&raw);
            }
            ("none", Some(_)) => {
                return Err(Error::Passphrase(format!(
                    "the key file {} is not passphrase-protected, but a passphrase was configured (credentials.passphrase); set it to none, or move the key file away and add the credentials again with a passphrase",
                    self.key.display()
                )));
            }
            ("argon2id", None) => {
                return Err(Error::Passphrase(format!(
                    "the key file {} is passphrase-protected; set credentials.passphrase to prompt or env (AIBOX_PASSPHRASE)",
                    self.key.display()
                )));
            }
            ("argon2id", Some(pass)) => {
                let kdf = k.kdf.as_ref().ok_or_else(|| bad("no kdf parameters"))?;
                let kek = derive(pass, kdf).map_err(|e| bad(&e))?;
                let nonce = hex::decode(k.nonce.as_deref().unwrap_or_default())
                    .ok()
                    .filter(|n| n.len() == 12)
                    .ok_or_else(|| bad("bad nonce"))?;
                let wrapped = hex::decode(k.wrapped.as_deref().unwrap_or_default())
                    .map_err(|_| bad("bad wrapped key"))?;
                let raw = Zeroizing::new(
                    cipher(&kek)
                        .decrypt(
                            Nonce::from_slice(&nonce),
                            Payload {
                                msg: &wrapped,
                                aad: KEY_FORMAT.as_bytes(),
                            },
                        )
                        .map_err(|_| Error::WrongPassphrase {
                            key: self.key.clone(),
                        })?,
                );
                if raw.len() != 32 {
                    return Err(bad("the key is not 256 bits"));
                }
                dek.copy_from_slice(&raw);
            }
            (other, _) => return Err(bad(&format!("unknown protection `{other}`"))),
        }
        Ok(dek)
    }

    /// Makes and writes a new data key (the key file must not exist).
    fn new_key(&self) -> Result<DataKey, Error> {
        let mut dek = Zeroizing::new([0u8; 32]);
        random(&mut dek[..])?;
        let file = match &self.passphrase {
            None => KeyFile {
                format: KEY_FORMAT.into(),
                version: VERSION,
                protection: "none".into(),
                key: Some(hex::encode(&dek[..])),
                kdf: None,
                nonce: None,
                wrapped: None,
            },
            Some(pass) => {
                let mut salt = [0u8; 16];
                random(&mut salt)?;
                let kdf = Kdf {
                    m_kib: ARGON_M_KIB,
                    t: ARGON_T,
                    p: ARGON_P,
                    salt: hex::encode(salt),
                };
                let kek = derive(pass, &kdf).map_err(Error::Passphrase)?;
                let mut nonce = [0u8; 12];
                random(&mut nonce)?;
                let wrapped = cipher(&kek)
                    .encrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: &dek[..],
                            aad: KEY_FORMAT.as_bytes(),
                        },
                    )
                    .map_err(|_| Error::Passphrase("wrapping the key failed".into()))?;
                KeyFile {
                    format: KEY_FORMAT.into(),
                    version: VERSION,
                    protection: "argon2id".into(),
                    key: None,
                    kdf: Some(kdf),
                    nonce: Some(hex::encode(nonce)),
                    wrapped: Some(hex::encode(wrapped)),
                }
            }
        };
        let body = Zeroizing::new(serde_json::to_vec_pretty(&file).map_err(|e| Error::Io {
            what: "encoding",
            path: self.key.clone(),
            source: std::io::Error::other(e),
        })?);
        write_new(&self.key, &body)?;
        Ok(dek)
    }

    fn save(&self, dek: &DataKey, c: &Contents) -> Result<(), Error> {
        // (Sized generously up front: a growing buffer would leave copies
        // of the values behind.)
        let size: usize = c
            .entries
            .iter()
            .map(|e| 2 * e.secret.len() + 1024)
            .sum::<usize>()
            + 64;
        let mut plain = Zeroizing::new(Vec::with_capacity(size));
        serde_json::to_writer(&mut *plain, c).map_err(|e| Error::Io {
            what: "encoding",
            path: self.store.clone(),
            source: std::io::Error::other(e),
        })?;
        let mut nonce = [0u8; 12];
        random(&mut nonce)?;
        let id = key_id(dek);
        let ct = cipher(dek)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &store_aad(&id),
                },
            )
            .map_err(|_| Error::Io {
                what: "encrypting",
                path: self.store.clone(),
                source: std::io::Error::other("AES-GCM failed"),
            })?;
        let env = Envelope {
            format: STORE_FORMAT.into(),
            version: VERSION,
            key_id: id,
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ct),
        };
        let body = serde_json::to_vec_pretty(&env).map_err(|e| Error::Io {
            what: "encoding",
            path: self.store.clone(),
            source: std::io::Error::other(e),
        })?;
        replace_file(&self.store, &body)
    }
}

fn cipher(key: &[u8; 32]) -> Aes256Gcm {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key))
}

/// Names a data key without revealing it.
fn key_id(dek: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"aibox credentials key id\0");
    h.update(dek);
    hex::encode(&h.finalize()[..8])
}

fn store_aad(key_id: &str) -> Vec<u8> {
    format!("{STORE_FORMAT}\0{VERSION}\0{key_id}").into_bytes()
}

fn derive(pass: &Secret, kdf: &Kdf) -> Result<DataKey, String> {
    // (A crafted key file must not make us spend gigabytes or hours.)
    if kdf.m_kib > (1 << 20) || kdf.t > 64 || kdf.p > 16 {
        return Err("Argon2id parameters out of range".into());
    }
    let salt = hex::decode(&kdf.salt).map_err(|_| "bad salt".to_string())?;
    let params =
        argon2::Params::new(kdf.m_kib, kdf.t, kdf.p, Some(32)).map_err(|e| e.to_string())?;
    let mut out = Zeroizing::new([0u8; 32]);
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(pass.expose().as_bytes(), &salt, &mut out[..])
        .map_err(|e| e.to_string())?;
    Ok(out)
}

fn random(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::getrandom(buf).map_err(|e| Error::Io {
        what: "drawing random bytes for",
        path: PathBuf::from("the credential store"),
        source: std::io::Error::other(e.to_string()),
    })
}

fn parse_key(path: &Path, bytes: &[u8]) -> Result<KeyFile, Error> {
    let k: KeyFile = serde_json::from_slice(bytes).map_err(|e| Error::Tampered {
        path: path.to_path_buf(),
        detail: format!("not a key file: {e}"),
    })?;
    if k.format != KEY_FORMAT || k.version != VERSION {
        return Err(Error::Tampered {
            path: path.to_path_buf(),
            detail: format!(
                "format `{}` version {}; this aibox reads `{KEY_FORMAT}` version {VERSION}",
                k.format, k.version
            ),
        });
    }
    Ok(k)
}

/// The contents of `path` if it exists, after checking it is a regular
/// file of ours that nobody else can read or write.
fn read_private(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, Error> {
    use std::io::Read;
    check_dir(path)?;
    // (Non-blocking: a FIFO planted in its place must not hang us; it is
    // refused below as not a regular file.)
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::NotPrivate {
                path: path.to_path_buf(),
                why: "is a symbolic link".into(),
            });
        }
        Err(e) => return Err(io("reading", path)(e)),
    };
    let m = f.metadata().map_err(io("reading", path))?;
    check_private(path, &m)?;
    if m.len() > MAX_FILE {
        return Err(Error::Tampered {
            path: path.to_path_buf(),
            detail: format!("{} bytes is too large", m.len()),
        });
    }
    // (Sized up front: a growing buffer would leave copies behind.)
    let mut buf = Zeroizing::new(Vec::with_capacity(m.len() as usize + 1));
    f.take(MAX_FILE)
        .read_to_end(&mut buf)
        .map_err(io("reading", path))?;
    Ok(Some(buf))
}

/// The directory holding `path` must be ours and writable by nobody
/// else: someone who can rename files in it could roll the store back to
/// an older copy (the same key still opens it) or delete it.
fn check_dir(path: &Path) -> Result<(), Error> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let m = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("checking the directory of", path)(e)),
    };
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me && m.uid() != 0 {
        return Err(Error::NotPrivate {
            path: dir.to_path_buf(),
            why: format!("belongs to uid {}, not to you", m.uid()),
        });
    }
    if m.permissions().mode() & 0o022 != 0 {
        return Err(Error::NotPrivate {
            path: dir.to_path_buf(),
            why: format!(
                "can be written by others (mode {:04o}; run `chmod go-w {}`)",
                m.permissions().mode() & 0o7777,
                dir.display()
            ),
        });
    }
    Ok(())
}

fn check_private(path: &Path, m: &std::fs::Metadata) -> Result<(), Error> {
    if !m.is_file() {
        return Err(Error::NotPrivate {
            path: path.to_path_buf(),
            why: "is not a regular file".into(),
        });
    }
    if m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(Error::NotPrivate {
            path: path.to_path_buf(),
            why: format!("belongs to uid {}, not to you", m.uid()),
        });
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn private_dir(path: &Path) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("creating the directory of", path))?;
    }
    Ok(())
}

/// Writes a file that must not exist yet (0600).
fn write_new(path: &Path, body: &[u8]) -> Result<(), Error> {
    private_dir(path)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io("creating", path))?;
    f.write_all(body).map_err(io("writing", path))?;
    f.sync_all().map_err(io("syncing", path))?;
    sync_dir(path)
}

/// Replaces `path` with `body` atomically (a synced temporary file
/// renamed over it).
fn replace_file(path: &Path, body: &[u8]) -> Result<(), Error> {
    private_dir(path)?;
    let mut suffix = [0u8; 8];
    random(&mut suffix)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", hex::encode(suffix)));
    let tmp = PathBuf::from(tmp);
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        f.write_all(body).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("replacing", path))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), Error> {
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing the directory of", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> Meta {
        Meta {
            name: name.into(),
            kind: if crate::BUILTIN.contains(&name) {
                name.into()
            } else {
                "custom".into()
            },
            host: Some("git.example.org".into()),
            created: "2026-11-29T00:00:00Z".into(),
            expires: None,
            source: "file".into(),
        }
    }

    fn store(dir: &Path, pass: Option<&str>) -> FileStore {
        FileStore::new(
            dir.join("data/store.enc"),
            dir.join("config/credentials.key"),
            pass.map(|p| Secret::new(p.into())),
        )
    }

    #[test]
    fn round_trip_without_and_with_passphrase() {
        for pass in [None, Some("correct horse")] {
            let dir = tempfile::tempdir().unwrap();
            let s = store(dir.path(), pass);
            assert!(s.list().unwrap().is_empty());
            s.put(meta("git-token"), Secret::new("ghp_secret1".into()), false)
                .unwrap();
            s.put(meta("mirror"), Secret::new("m-secret".into()), false)
                .unwrap();
            assert!(matches!(
                s.put(meta("mirror"), Secret::new("x".into()), false),
                Err(Error::Exists(_))
            ));
            s.put(meta("mirror"), Secret::new("m-secret-2".into()), true)
                .unwrap();
            let again = store(dir.path(), pass);
            let names: Vec<String> = again.list().unwrap().into_iter().map(|m| m.name).collect();
            assert_eq!(names, ["git-token", "mirror"]);
            assert_eq!(
                again.get("git-token").unwrap().unwrap().1.expose(),
                "ghp_secret1"
            );
            assert_eq!(
                again.get("mirror").unwrap().unwrap().1.expose(),
                "m-secret-2"
            );
            assert!(again.remove("mirror").unwrap());
            assert!(!again.remove("mirror").unwrap());
            assert!(again.get("mirror").unwrap().is_none());
            // Neither file holds a value in the clear; both are 0600.
            for f in [s.store_path(), s.key_path()] {
                let text = std::fs::read_to_string(f).unwrap();
                assert!(!text.contains("ghp_secret1") && !text.contains("m-secret"));
                let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{f:?}");
            }
            assert_eq!(again.key_protected().unwrap(), Some(pass.is_some()));
        }
    }

    #[test]
    fn every_flipped_byte_of_the_store_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), None);
        s.put(meta("git-token"), Secret::new("ghp_secret1".into()), false)
            .unwrap();
        let good = std::fs::read(s.store_path()).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            std::fs::write(s.store_path(), &bad).unwrap();
            match s.list() {
                Err(Error::Tampered { .. } | Error::WrongKey { .. }) => {}
                other => panic!("byte {i}: {other:?}"),
            }
            // A failed load changes nothing.
            assert_eq!(std::fs::read(s.store_path()).unwrap(), bad);
        }
    }

    #[test]
    fn wrong_passphrase_missing_key_and_foreign_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Some("right"));
        s.put(meta("git-token"), Secret::new("v".into()), false)
            .unwrap();
        let before = std::fs::read(s.store_path()).unwrap();
        assert!(matches!(
            store(dir.path(), Some("wrong")).list(),
            Err(Error::WrongPassphrase { .. })
        ));
        assert!(matches!(
            store(dir.path(), None).list(),
            Err(Error::Passphrase(_))
        ));
        // A key of another store.
        let other = tempfile::tempdir().unwrap();
        let o = store(other.path(), Some("right"));
        o.put(meta("x"), Secret::new("v".into()), false).unwrap();
        std::fs::copy(o.key_path(), s.key_path()).unwrap();
        assert!(matches!(s.list(), Err(Error::WrongKey { .. })));
        // No key: refused, and nothing overwritten by a put either.
        std::fs::remove_file(s.key_path()).unwrap();
        assert!(matches!(s.list(), Err(Error::KeyMissing { .. })));
        assert!(matches!(
            s.put(meta("y"), Secret::new("v".into()), false),
            Err(Error::KeyMissing { .. })
        ));
        assert!(!s.key_path().exists());
        assert_eq!(std::fs::read(s.store_path()).unwrap(), before);
    }

    #[test]
    fn loose_permissions_and_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), None);
        s.put(meta("git-token"), Secret::new("v".into()), false)
            .unwrap();
        for f in [s.store_path().to_path_buf(), s.key_path().to_path_buf()] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
            let e = s.list().unwrap_err();
            assert!(matches!(e, Error::Permissions { mode: 0o640, .. }), "{e}");
            assert!(e.to_string().contains("chmod 600"));
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let real = dir.path().join("elsewhere");
        std::fs::rename(s.key_path(), &real).unwrap();
        std::os::unix::fs::symlink(&real, s.key_path()).unwrap();
        assert!(matches!(s.list(), Err(Error::NotPrivate { .. })));
    }
}
