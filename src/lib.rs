//! metald: the per-host daemon that runs multi-tenant microVMs.
//!
//! Module map (dependencies point down only; the exact table of allowed
//! directions is in `docs/ARCHITECTURE.md`, checked by `tests/layering.rs`):
//! - [`daemon`] wires everything; [`server`] serves HTTP; [`api`] converts
//!   wire ⇄ domain and authenticates;
//! - [`billing`] meters running VMs (a core observer) and streams usage to
//!   the billing service; [`telemetry`] exports traces and metrics;
//! - [`core`] owns VM state changes ([`core::Manager`]); [`error`] maps every
//!   error to its code;
//! - [`backend`] drives hypervisors; [`store`] persists records;
//! - [`model`] (the shared vocabulary), [`config`], [`util`] are leaves;
//!   [`pb`] is generated.

pub mod api;
pub mod backend;
pub mod billing;
pub mod cli;
pub mod client;
pub mod config;
pub mod core;
pub mod daemon;
pub mod error;
pub mod image;
pub mod model;
pub mod network;
pub mod procfs;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod util;

/// Generated protobuf messages, ConnectRPC service traits and clients.
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod pb {
    connectrpc::include_generated!();
}
