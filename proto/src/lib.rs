//! The sans-I/O core of hybridlink.
//!
//! Nothing in this crate opens a socket, spawns a task or reads a clock: the
//! callers feed bytes and the current time in and take bytes, events and
//! deadlines out. That keeps every decoder of untrusted input testable with
//! plain unit tests and fuzzable.

pub mod channel;
pub mod connection_string;
pub mod control;
pub mod e2e;
pub mod frame;
pub mod key;
pub mod label;
pub mod mux;
pub mod name;
pub mod sas;
