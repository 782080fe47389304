//! One supervisor process per sandbox: it owns the sandbox, writes the
//! audit log, and answers the CLI over a unix control socket. This crate
//! holds both sides: [`supervisor::run`] (the detached process) and
//! [`client`] (what `aibox start/exec/shell/status/stop/list` call).

#![warn(missing_docs)]

pub mod client;
pub mod container;
pub mod decisions;
pub mod egress;
mod files;
pub mod gate;
pub mod paths;
pub mod proto;
mod push;
mod sinks;
pub mod supervisor;

pub use paths::SandboxPaths;

/// Errors seen by the CLI. Each says what happened and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No sandbox of that name is running.
    #[error("no sandbox named `{name}` is running{hint}")]
    NotRunning {
        /// Name asked for.
        name: String,
        /// What is running instead, or how to start one.
        hint: String,
    },
    /// A sandbox of that name already runs.
    #[error(
        "sandbox `{0}` is already running\n  fix: use it (`aibox exec --name {0} -- …`), stop it (`aibox stop --name {0}`), or pick another --name"
    )]
    AlreadyRunning(String),
    /// Starting failed; nothing was left behind.
    #[error("could not start sandbox `{name}`: {message}")]
    StartFailed {
        /// Sandbox name.
        name: String,
        /// The supervisor's explanation.
        message: String,
    },
    /// Talking to the supervisor failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The supervisor answered with an error.
    #[error("{0}")]
    Remote(String),
    /// Several sandboxes run and none was named.
    #[error("several sandboxes are running ({0}); pass --name")]
    Ambiguous(String),
    /// A directory aibox keeps state in is unsafe to use.
    #[error("{0}")]
    UnsafeDir(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Error::Io {
            what: what.into(),
            source: source.into(),
        }
    }
}
