//! The relay's Prometheus metrics, `hybridlink_relay_*`: made by
//! [`RelayConfig::start`](crate::RelayConfig::start), held by the
//! [`Hub`](crate::hub::Hub) and counted by it and by the relay port
//! ([`crate::server`]); the gauges of what the registry and the hub hold are
//! set when they are scraped ([`Hub::render_metrics`](crate::hub::Hub::render_metrics)).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::name::HcName;
use transport::metrics::{ActiveGuard, HcLabel};

/// Why the relay turned a connection, session or attachment away (the
/// `reason` of `refused_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusedReason {
    /// A token that does not verify for a hybrid connection the registry
    /// holds.
    unauthorized,
    /// A token for a name the registry does not hold.
    unknown_hc,
    /// A token signed with a key `regenerate` replaced.
    key_regenerated,
    /// A quota: agents per hybrid connection, pipes, pending tickets.
    quota,
    /// A hybrid connection at its `--max-pipes-per-hc`.
    hc_quota,
    /// A session past its `--pipe-requests-per-second`.
    rate,
    /// A connection past `--max-unauthenticated`.
    unauthenticated_cap,
    /// A connection past `--max-unauthenticated-per-ip`.
    unauthenticated_per_ip_cap,
}

/// Which way bytes went through a pipe (the `reason` of `pipe_bytes_total`,
/// a name dashboards know).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PipeDirection {
    /// From the sender's end to the agent's.
    sender_to_agent,
    /// From the agent's end to the sender's.
    agent_to_sender,
}

/// The label of `refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabel {
    reason: RefusedReason,
}

/// The label of `pipe_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipeBytesLabel {
    reason: PipeDirection,
}

/// Every metric of a relay, and the registry that exports them.
#[derive(Debug)]
pub struct RelayMetrics {
    registry: Registry,
    hybrid_connections: Gauge,
    /// Agents attached per hybrid connection (exported as `listeners`, the
    /// name dashboards know).
    agents: Family<HcLabel, Gauge>,
    senders: Family<HcLabel, Gauge>,
    pipes: Counter,
    pipes_active: Gauge,
    pipe_bytes: Family<PipeBytesLabel, Counter>,
    refused: Family<RefusedLabel, Counter>,
    token_renewals: Counter,
    azure_listeners: Family<HcLabel, Gauge>,
    azure_connections: Counter,
    azure_connections_active: Gauge,
    azure_http_requests: Counter,
    registry_writable: Gauge,
}

impl Default for RelayMetrics {
    fn default() -> RelayMetrics {
        RelayMetrics::new()
    }
}

impl RelayMetrics {
    /// Every counter at zero, registered under `hybridlink_relay`.
    pub fn new() -> RelayMetrics {
        let hybrid_connections = Gauge::default();
        let agents = Family::<HcLabel, Gauge>::default();
        let senders = Family::<HcLabel, Gauge>::default();
        let pipes = Counter::default();
        let pipes_active = Gauge::default();
        let pipe_bytes = Family::<PipeBytesLabel, Counter>::default();
        let refused = Family::<RefusedLabel, Counter>::default();
        let token_renewals = Counter::default();
        let azure_listeners = Family::<HcLabel, Gauge>::default();
        let azure_connections = Counter::default();
        let azure_connections_active = Gauge::default();
        let azure_http_requests = Counter::default();
        let registry_writable = Gauge::default();
        let mut registry = Registry::with_prefix("hybridlink_relay");
        registry.register(
            "hybrid_connections",
            "Hybrid connections in the registry",
            hybrid_connections.clone(),
        );
        registry.register(
            "listeners",
            "Agents attached, per hybrid connection",
            agents.clone(),
        );
        registry.register(
            "senders",
            "Senders attached, per hybrid connection",
            senders.clone(),
        );
        registry.register("pipes", "Pipes spliced", pipes.clone());
        registry.register("pipes_active", "Pipes open now", pipes_active.clone());
        registry.register(
            "pipe_bytes",
            "Bytes through pipes (reason: sender_to_agent or agent_to_sender)",
            pipe_bytes.clone(),
        );
        registry.register(
            "refused",
            "Connections, sessions and attachments refused, by reason",
            refused.clone(),
        );
        registry.register(
            "token_renewals",
            "Tokens renewed by peers",
            token_renewals.clone(),
        );
        registry.register(
            "azure_listeners",
            "Azure-protocol listeners connected, per hybrid connection",
            azure_listeners.clone(),
        );
        registry.register(
            "azure_connections",
            "Azure-protocol senders relayed to a listener",
            azure_connections.clone(),
        );
        registry.register(
            "azure_connections_active",
            "Azure-protocol sender connections open now",
            azure_connections_active.clone(),
        );
        registry.register(
            "azure_http_requests",
            "Azure-protocol HTTP requests sent on to a listener",
            azure_http_requests.clone(),
        );
        registry.register(
            "registry_writable",
            "1 while the registry's store takes changes; 0 while a relay on etcd cannot reach it (it serves what it knows and refuses changes)",
            registry_writable.clone(),
        );
        RelayMetrics {
            registry,
            registry_writable,
            hybrid_connections,
            agents,
            senders,
            pipes,
            pipes_active,
            pipe_bytes,
            refused,
            token_renewals,
            azure_listeners,
            azure_connections,
            azure_connections_active,
            azure_http_requests,
        }
    }

    /// Counts a refusal.
    pub fn refused(&self, reason: RefusedReason) {
        self.refused.get_or_create(&RefusedLabel { reason }).inc();
    }

    /// Counts a token renewed by a peer.
    pub fn token_renewed(&self) {
        self.token_renewals.inc();
    }

    /// Counts a spliced pipe, open until the guard drops.
    pub fn pipe_spliced(&self) -> ActiveGuard {
        self.pipes.inc();
        ActiveGuard::new(self.pipes_active.clone())
    }

    /// The counter of bytes through pipes going `direction`.
    pub fn pipe_bytes(&self, direction: PipeDirection) -> Counter {
        self.pipe_bytes
            .get_or_create(&PipeBytesLabel { reason: direction })
            .clone()
    }

    /// Counts an Azure-protocol listener of `hc`, connected until the
    /// guard drops.
    pub fn azure_listener(&self, hc: &HcName) -> ActiveGuard {
        let label = HcLabel::new(hc.as_str());
        ActiveGuard::new(self.azure_listeners.get_or_create(&label).clone())
    }

    /// Counts an Azure-protocol sender relayed to a listener, open until
    /// the guard drops.
    pub fn azure_connection(&self) -> ActiveGuard {
        self.azure_connections.inc();
        ActiveGuard::new(self.azure_connections_active.clone())
    }

    /// Counts an Azure-protocol HTTP request sent on to a listener.
    pub fn azure_http_request(&self) {
        self.azure_http_requests.inc();
    }

    /// Sets what is read at scrape time: how many hybrid connections the
    /// registry holds, and (agents, senders) attached to each hybrid
    /// connection that has any; the others leave the output.
    pub fn set_attachments(&self, hybrid_connections: usize, counts: &[(HcName, usize, usize)]) {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.hybrid_connections.set(gauge(hybrid_connections));
        self.agents.clear();
        self.senders.clear();
        for (hc, agents, senders) in counts {
            let label = HcLabel::new(hc.as_str());
            self.agents.get_or_create(&label).set(gauge(*agents));
            self.senders.get_or_create(&label).set(gauge(*senders));
        }
    }

    /// Sets whether the registry's store takes changes now.
    pub fn set_registry_writable(&self, writable: bool) {
        self.registry_writable.set(i64::from(writable));
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        transport::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_counted_under_the_names_dashboards_know() {
        let m = RelayMetrics::new();
        m.refused(RefusedReason::unauthorized);
        m.refused(RefusedReason::unauthorized);
        m.refused(RefusedReason::unauthenticated_per_ip_cap);
        m.token_renewed();
        let open = m.pipe_spliced();
        let _second = m.pipe_spliced();
        drop(open);
        m.pipe_bytes(PipeDirection::sender_to_agent).inc_by(100);
        m.pipe_bytes(PipeDirection::agent_to_sender).inc_by(7);
        m.set_attachments(3, &[("payroll".parse().unwrap(), 2, 1)]);
        let text = m.render();
        for line in [
            "# HELP hybridlink_relay_hybrid_connections Hybrid connections in the registry.",
            "# TYPE hybridlink_relay_hybrid_connections gauge",
            "hybridlink_relay_hybrid_connections 3",
            "# TYPE hybridlink_relay_listeners gauge",
            "hybridlink_relay_listeners{hc=\"payroll\"} 2",
            "# TYPE hybridlink_relay_senders gauge",
            "hybridlink_relay_senders{hc=\"payroll\"} 1",
            "# TYPE hybridlink_relay_pipes counter",
            "hybridlink_relay_pipes_total 2",
            "# TYPE hybridlink_relay_pipes_active gauge",
            "hybridlink_relay_pipes_active 1",
            "# TYPE hybridlink_relay_pipe_bytes counter",
            "hybridlink_relay_pipe_bytes_total{reason=\"sender_to_agent\"} 100",
            "hybridlink_relay_pipe_bytes_total{reason=\"agent_to_sender\"} 7",
            "# TYPE hybridlink_relay_refused counter",
            "hybridlink_relay_refused_total{reason=\"unauthorized\"} 2",
            "hybridlink_relay_refused_total{reason=\"unauthenticated_per_ip_cap\"} 1",
            "# TYPE hybridlink_relay_token_renewals counter",
            "hybridlink_relay_token_renewals_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn azure_protocol_listeners_and_connections_are_counted_while_they_live() {
        let m = RelayMetrics::new();
        let hc: HcName = "payroll".parse().unwrap();
        let first = m.azure_listener(&hc);
        let _second = m.azure_listener(&hc);
        let connection = m.azure_connection();
        let _other = m.azure_connection();
        m.azure_http_request();
        drop((first, connection));
        let text = m.render();
        for line in [
            "hybridlink_relay_azure_listeners{hc=\"payroll\"} 1",
            "hybridlink_relay_azure_connections_total 2",
            "hybridlink_relay_azure_connections_active 1",
            "hybridlink_relay_azure_http_requests_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn a_hybrid_connection_nobody_is_attached_to_leaves_the_output() {
        let m = RelayMetrics::new();
        m.set_attachments(1, &[("payroll".parse().unwrap(), 1, 0)]);
        m.set_attachments(1, &[]);
        let text = m.render();
        assert!(!text.contains("payroll"), "{text}");
        assert!(
            text.lines()
                .any(|l| l == "hybridlink_relay_hybrid_connections 1")
        );
    }

    #[test]
    fn every_refusal_reason_is_exported_as_dashboards_know_it() {
        let m = RelayMetrics::new();
        for reason in [
            RefusedReason::unauthorized,
            RefusedReason::unknown_hc,
            RefusedReason::key_regenerated,
            RefusedReason::quota,
            RefusedReason::hc_quota,
            RefusedReason::rate,
            RefusedReason::unauthenticated_cap,
            RefusedReason::unauthenticated_per_ip_cap,
        ] {
            m.refused(reason);
        }
        let text = m.render();
        for reason in [
            "unauthorized",
            "unknown_hc",
            "key_regenerated",
            "quota",
            "hc_quota",
            "rate",
            "unauthenticated_cap",
            "unauthenticated_per_ip_cap",
        ] {
            let line = format!("hybridlink_relay_refused_total{{reason=\"{reason}\"}} 1");
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }
}
