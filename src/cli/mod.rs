//! Command-line clients of a running node's HTTP API: cluster administration and SMART
//! registration (apps, users, launch contexts), Bulk export downloads.

pub mod auth;
pub mod cluster;
pub mod export;
pub mod transfer;
