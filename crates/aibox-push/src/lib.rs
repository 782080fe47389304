//! aibox's git push broker.
//!
//! Inside the sandbox, `git push` to an HTTPS remote is rewritten (by
//! `url.aibox::https://.pushInsteadOf`) to the remote helper in
//! [`helper`], which bundles the commits and hands them to the
//! supervisor over the proxy. The supervisor checks the remote against
//! the workspace's own remotes and queues the push ([`queue`]): the
//! bundle's objects go into a host-side repository ([`host`]) next to
//! the remote's current refs, so that what a reviewer sees (commits,
//! diffstat) is computed on the host from the very objects that will be
//! pushed, never taken from the sandbox's word. `aibox push approve`
//! then pushes from that repository with the real credential, leased on
//! the remote refs the review saw.

pub mod helper;
pub mod host;
pub mod queue;
mod url;

pub use url::{normalize, receive_pack_repo, upload_pack_repo};

/// Host name of aibox's own service behind the proxy: the remote helper
/// sends its pushes to `http://aibox.internal/v1/push`.
pub const BROKER_HOST: &str = "aibox.internal";
/// Path of the push endpoint.
pub const BROKER_PATH: &str = "/v1/push";
/// Request header carrying the push's description (JSON [`PushAsk`]).
pub const ASK_HEADER: &str = "x-aibox-push";
/// The largest bundle the broker takes.
pub const MAX_BUNDLE: u64 = 256 * 1024 * 1024;
/// The most refs one push may update.
pub const MAX_UPDATES: usize = 64;

/// Errors of the broker.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The request (from the sandbox or the command line) is not acceptable.
    #[error("{0}")]
    Refused(String),
    /// A git command on the host failed.
    #[error("git {what} failed: {detail}")]
    Git {
        /// What was being done.
        what: String,
        /// git's own message.
        detail: String,
    },
    /// A file of the queue could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// No queued push has this id.
    #[error("no queued push has the id {0:?}; `aibox push status --all` lists them")]
    NotFound(String),
}

/// One ref update as the helper asks for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AskedUpdate {
    /// The remote ref to update (`refs/heads/main`).
    pub dst: String,
    /// The object it should point to; `None` deletes the ref.
    pub new: Option<String>,
    /// Whether the objects are in the bundle (as `refs/aibox/push/<index>`)
    /// rather than already on the remote.
    pub bundled: bool,
    /// A forced update (`+src:dst`).
    pub force: bool,
}

/// What the helper sends with the bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PushAsk {
    /// The remote URL git was pushing to.
    pub url: String,
    /// The updates, in git's order.
    pub updates: Vec<AskedUpdate>,
}

/// The broker's answer to a queued push.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Queued {
    /// Queue id.
    pub id: String,
    /// One line for git to show.
    pub message: String,
}

/// Whether `s` is a full object id (SHA-1 or SHA-256, lowercase hex).
pub fn is_oid(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a ref name the way `git check-ref-format` does for the names a
/// push may carry (under `refs/`, no `..`, control characters, `~^:?*[\`,
/// `@{`, no component starting with `.` or ending with `.lock`).
pub fn check_ref(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{name:?} is not a ref a push may update: {why}"));
    if !name.starts_with("refs/") {
        return bad("it must start with refs/");
    }
    if name.len() > 1024 {
        return bad("too long");
    }
    if name.contains("..") || name.contains("@{") || name.ends_with('/') || name.ends_with('.') {
        return bad("it contains `..` or `@{` or ends with `/` or `.`");
    }
    if name
        .bytes()
        .any(|b| !(0x20..0x7f).contains(&b) || b" ~^:?*[\\".contains(&b))
    {
        return bad("it contains a space, a control or non-ASCII character, or one of ~^:?*[\\");
    }
    for c in name.split('/') {
        if c.is_empty() || c.starts_with('.') || c.ends_with(".lock") {
            return bad("a component is empty, starts with `.` or ends with `.lock`");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names() {
        assert!(check_ref("refs/heads/main").is_ok());
        assert!(check_ref("refs/tags/v1.0").is_ok());
        for bad in [
            "main",
            "refs/heads/../x",
            "refs/heads/a b",
            "refs/heads/.x",
            "refs/heads/x.lock",
            "refs/heads/x@{1}",
            "refs//x",
            "refs/heads/x\n",
            "refs/heads/x:y",
            "refs/heads/\u{202e}x",
        ] {
            assert!(check_ref(bad).is_err(), "{bad}");
        }
        assert!(is_oid(&"a".repeat(40)));
        assert!(!is_oid(&"A".repeat(40)));
        assert!(!is_oid("abc"));
    }
}
