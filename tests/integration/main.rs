//! One integration-test binary (faster builds, shared helpers): in-process HTTP tests of
//! every FHIR interaction, and real-process tests against the `fhir-ledger` binary.

mod attack;
mod auth;
mod auth_server;
mod cluster;
mod door;
mod http;
mod lincheck;
mod process;
mod search;
mod smart;
mod support;
mod tamper;
