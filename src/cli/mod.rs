//! Command-line clients of a running node's HTTP API: cluster administration and SMART
//! registration (apps, users, launch contexts), Bulk export downloads; and the offline tools of
//! a supply-chain partner (`epcis`).

pub mod auth;
pub mod backup;
pub mod cluster;
pub mod epcis;
pub mod export;
pub mod load;
pub mod transfer;
