//! One integration-test binary (faster builds, shared helpers): in-process HTTP tests of
//! every FHIR interaction, and real-process tests against the `fhir-ledger` binary.

// Tests fail loudly on purpose: an unwrap or expect is the assertion. (clippy.toml's
// allow-*-in-tests covers only #[test] functions, not the helpers integration tests share.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod attack;
mod auth;
mod auth_server;
mod backup;
mod bulk;
mod cluster;
mod door;
mod everything;
mod http;
mod lincheck;
mod operators;
mod process;
mod research;
mod search;
mod smart;
mod supply;
mod support;
mod tamper;
mod transfer;
