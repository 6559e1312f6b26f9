//! The appliance: tun, DNS and netstack sidecar for unmodified apps (being built).
