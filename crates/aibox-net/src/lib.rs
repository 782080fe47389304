//! aibox's network layer: the only way out of a sandbox.
//!
//! A sandbox has no interface but loopback. Its egress goes to the
//! supervisor's [`proxy::Proxy`], which decides every connection with the
//! [`rules::Allowlist`], resolves names itself, refuses non-public
//! addresses unless a rule names them ([`addr`]), checks the TLS server
//! name ([`tls`]), and answers the sandbox's DNS ([`dns`]) without ever
//! forwarding a query.

#![warn(missing_docs)]

pub mod addr;
pub mod dns;
pub mod forward;
pub mod gateway;
pub mod host;
pub mod inject;
pub mod probe;
pub mod proxy;
pub mod rules;
pub mod tls;

pub use host::{Host, HostError, parse_host};
pub use proxy::{Counters, NetEvent, Proxy, Sink, Via};
pub use rules::{Access, Allowlist, Rule, RuleError};
