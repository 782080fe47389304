//! Integration tests: the real `aibox` binary, real namespaces, real
//! attacks. One test binary (faster links); modules under `suite/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod suite;
