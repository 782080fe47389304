//! What aibox hands a security team's monitoring: Prometheus metrics
//! computed from the audit stream ([`metrics`]), and the artefacts
//! `aibox siem export` writes — Prometheus alert rules, three Grafana
//! dashboards, Falco rules and a Vector pipeline — all generated from the
//! one set of detection thresholds the supervisor evaluates live
//! (`audit.detection`), so no two places disagree on a number.

#![warn(missing_docs)]

pub mod archive;
pub mod artefacts;
pub mod metrics;
pub mod sink;

/// Errors of the SIEM crate.
#[derive(Debug, thiserror::Error)]
pub enum SiemError {
    /// The thresholds cannot be used.
    #[error(transparent)]
    Thresholds(#[from] aibox_audit::detect::ThresholdError),
    /// An artefact could not be rendered.
    #[error("rendering {what}: {reason}")]
    Render {
        /// Which artefact.
        what: &'static str,
        /// Why.
        reason: String,
    },
}
