//! The appliance: the sidecar that lets unmodified apps reach on-prem
//! services by host name. It creates a tun device and routes a virtual range
//! (and every IPv4-literal endpoint) into it, answers DNS for the hybrid
//! connections' host names with addresses from that range, terminates the
//! app's TCP flows with the userspace netstack, and sends each flow as a
//! stream through the relay.

pub mod allow;
pub mod config;
pub mod dns;
pub mod flows;
pub mod gate;
pub mod metrics;
pub mod names;
pub mod never_route;
pub mod resolv;
pub mod routing;
pub mod service;
pub mod status;
pub mod table;
pub mod upstream;
pub mod virtual_range;
