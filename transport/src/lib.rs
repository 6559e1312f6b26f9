//! The tokio side of hybridlink: everything that moves bytes between sockets
//! and the sans-I/O machines of `proto`.
//!
//! - [`azure`]: the peers as clients of Azure Relay's own protocol.
//! - [`atomic_file`]: files written so that a crash leaves the old or the
//!   new content.
//! - [`control`]: a peer's control channel to the relay (keep-alives,
//!   reconnects, token renewal).
//! - [`pipe`]: pipes through the relay with TLS end to end.
//! - [`mux`]: streams multiplexed over a pipe.
//! - [`pump`]: one stream's bytes moved both ways between the multiplexer
//!   and the app's flow or the target's socket.
//! - [`sender`]: the sending side's API, used by the appliance, `connect` and
//!   `forward`.
//! - [`tls`]: pinned-key TLS configurations and the data identity.
//! - [`backoff`]: jittered exponential backoff for reconnects.
//! - [`metrics`]: what every role's Prometheus metrics are made of, and
//!   their HTTP server.
//! - [`fd_limit`]: the open-files limit every role raises at start.

pub mod atomic_file;
pub mod azure;
pub mod backoff;
pub mod control;
pub mod fd_limit;
pub mod metrics;
pub mod mux;
pub mod pipe;
pub mod pump;
pub mod sender;
pub mod tls;
