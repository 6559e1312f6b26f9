//! The hybridlink relay: the rendezvous both sides dial out to.
//!
//! It holds the registry of hybrid connections and their keys, verifies the
//! tokens of control channels, tells senders which agents serve each hybrid
//! connection, hands out one-time pipe tickets and splices pipes byte for
//! byte. It never terminates the TLS inside a pipe, so it never sees payload.

pub mod api;
pub mod api_tls;
pub mod azure;
pub mod ca_cert;
pub mod cluster;
pub mod hub;
pub mod identity;
pub mod membership;
pub mod metrics;
pub mod portal;
pub mod preauth;
pub mod registry;
pub mod run;
pub mod server;
mod splice;

pub use run::{Limits, RelayConfig, RelayError, RunningRelay};
