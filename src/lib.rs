//! fhir-ledger: a FHIR R4 server whose store is a signed, encrypted, Raft-replicated,
//! tamper-evident ledger. This crate owns HTTP, FHIR JSON and SMART; the `consensus`
//! crate replicates opaque commands.
//!
//! ```no_run
//! # fn demo() -> anyhow::Result<()> {
//! let rt = tokio::runtime::Runtime::new()?;
//! let cfg = fhir_ledger::config::Config::resolve(&Default::default())?;
//! fhir_ledger::server::run(cfg, &rt)?; // serves until interrupted
//! # Ok(()) }
//! ```

pub mod api;
pub mod auth;
pub mod bulk;
pub mod cli;
pub mod codec;
pub mod config;
pub mod consent;
pub mod crypto;
pub mod definitions;
pub mod disclosure;
pub mod epcis;
pub mod error;
pub mod fhir;
pub mod identity;
pub mod jws;
pub mod parallel;
pub mod payer;
pub mod repo;
pub mod research;
pub mod search;
pub mod server;
pub mod supply;
pub mod telemetry;
pub mod transfer;
pub mod treehead;
pub mod verify;
