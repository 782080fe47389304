//! The aibox audit trail: event schema, canonical JSON, and an append-only
//! JSONL log chained with SHA-256.
//!
//! Canonical form (see `docs/audit.md`): a JSON object whose keys are sorted
//! by byte value, with no insignificant whitespace, strings escaped as
//! `serde_json` does (only `"`, `\` and control characters), and integers
//! only — floating-point numbers are refused so that every implementation
//! produces the same bytes. An event's `hash` is
//! `hex(SHA-256("aibox-audit-v1\n" || canonical(event without "hash")))`;
//! `prev_hash` is the previous event's `hash` (64 zeros for the first).
//! Every line on disk is exactly `canonical(event) + "\n"`.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod detect;
mod event;
pub mod export;
mod log;
pub mod segments;
mod verify;

pub use event::{Event, EventType, Severity, Source};
pub use log::{Anchored, AuditLog, Recovered, canonical_json, event_hash};
pub use verify::{
    Break, CheckpointProblem, CheckpointReport, VerifyReport, verify_file, verify_reader,
    verify_reader_with, verify_with_checkpoints,
};

/// Errors of the audit crate.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be opened, read or written.
    #[error("audit log {path}: {source}")]
    Io {
        /// The log file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An event lacks a field its type requires, or carries a float.
    #[error("invalid audit event {event_type}: {reason}")]
    InvalidEvent {
        /// The event type.
        event_type: String,
        /// What is wrong.
        reason: String,
    },
    /// The existing log does not end in a complete line, so its chain head
    /// cannot be trusted; appending would hide the damage.
    #[error(
        "audit log {path} ends in a torn line (a write was interrupted); run `aibox audit verify` and move the file aside to start a new chain"
    )]
    TornTail {
        /// The log file.
        path: String,
    },
    /// The checkpoint signing key cannot be used.
    #[error("audit signing key {path}: {reason}")]
    Key {
        /// The key file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The log or its checkpoint file no longer holds what the last
    /// checkpoint (kept beside the signing key) signed.
    #[error(
        "audit log {path}: {reason}; run `aibox audit verify` to see what changed, and move the log and its .checkpoints, .manifest and .segments aside to start a new chain"
    )]
    Tampered {
        /// The log file.
        path: String,
        /// What does not match.
        reason: String,
    },
    /// The last line of the existing log is not a valid event.
    #[error(
        "audit log {path}: last line is not a valid event ({reason}); run `aibox audit verify`"
    )]
    BadTail {
        /// The log file.
        path: String,
        /// Why it was refused.
        reason: String,
    },
}
