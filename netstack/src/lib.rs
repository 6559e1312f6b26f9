//! netstack: terminates TCP flows that arrive as IP packets on a tun device
//! and hands each one to the caller as a tokio stream.
//!
//! smoltcp runs behind an in-memory device; one task owns the interface,
//! the sockets and the tun. Every TCP SYN to an address of the configured
//! virtual ranges becomes an [`IncomingFlow`]. The caller decides: after
//! [`IncomingFlow::accept`] the client sees its SYN-ACK and the caller gets
//! a [`TcpFlow`] (`AsyncRead + AsyncWrite`, half-close both ways); after
//! [`IncomingFlow::refuse`] (or no decision in time) the client gets a RST
//! and sees `ECONNREFUSED` at once. Datagrams to hooked UDP ports (DNS) come
//! out as [`UdpDatagram`]s that can be answered.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use netstack::{Netstack, StackConfig, create_tun};
//! let tun = create_tun("hl0", 65535)?;
//! let mut config = StackConfig::new(vec!["127.77.0.0/16".parse()?]);
//! config.udp_ports = vec![53];
//! let mut stack = Netstack::spawn(tun, config)?;
//! while let Some(flow) = stack.next_flow().await {
//!     tokio::spawn(async move {
//!         // Dial the far side first; accept only if that worked.
//!         if let Ok(mut stream) = flow.accept().await {
//!             let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
//!         }
//!     });
//! }
//! # Ok(()) }
//! ```
//!
//! The stack knows nothing of relays or names; routing the virtual ranges
//! into the tun is the caller's job.

mod config;
mod device;
mod engine;
mod error;
mod flow;
pub mod fuzzing;
mod packet;
mod stack;
mod udp;

pub use config::{Ipv4Range, StackConfig};
pub use error::{AcceptError, ConfigError, StackError, UdpSendError};
pub use flow::{IncomingFlow, TcpFlow};
pub use stack::{Datagrams, IncomingFlows, Netstack, StackHandle, Stats, create_tun};
pub use udp::{UdpDatagram, UdpSender};
