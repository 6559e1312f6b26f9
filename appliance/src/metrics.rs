//! The appliance's Prometheus metrics, `hybridlink_appliance_*`: made by
//! whoever runs the appliance and handed to [`crate::service::run`], which
//! passes them on to the flows, the DNS server and each relay client.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use transport::metrics::{ActiveGuard, ControlCounters, Counted, Direction, HcDirection, HcLabel};

/// Why the appliance refused an app's connection (the `reason` of
/// `flows_refused_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FlowRefusedReason {
    /// No hybrid connection serves the address and port (counted with an
    /// empty `hc`).
    no_hybrid_connection,
    /// The relay or the agent refused the stream.
    refused,
    /// The agent did not answer in time.
    timeout,
}

/// What a DNS query got (the `answer` of `dns_queries_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DnsAnswer {
    /// Answered from the configured names.
    local,
    /// Forwarded upstream and answered from there.
    forwarded,
    /// SERVFAIL: no upstream answered in time, or too many forwards.
    failed,
    /// Refused or rejected before it was looked at.
    rejected,
}

/// The labels of `flows_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabel {
    hc: String,
    reason: FlowRefusedReason,
}

/// The label of `dns_queries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabel {
    answer: DnsAnswer,
}

/// What a DNS server's queries got. Clones count into the same counters.
#[derive(Clone, Debug, Default)]
pub struct DnsCounters(Family<AnswerLabel, Counter>);

impl DnsCounters {
    /// Counts a query that got `answer`.
    pub fn count(&self, answer: DnsAnswer) {
        self.0.get_or_create(&AnswerLabel { answer }).inc();
    }

    /// How many queries got `answer`.
    pub fn get(&self, answer: DnsAnswer) -> u64 {
        self.0
            .get(&AnswerLabel { answer })
            .map_or(0, |counter| counter.get())
    }
}

/// Every metric of an appliance, and the registry that exports them.
#[derive(Debug)]
pub struct ApplianceMetrics {
    registry: Registry,
    flows_opened: Family<HcLabel, Counter>,
    flows_refused: Family<RefusedLabel, Counter>,
    flows_active: Family<HcLabel, Gauge>,
    bytes: Family<HcDirection, Counter>,
    dns: DnsCounters,
    control: ControlCounters,
}

impl Default for ApplianceMetrics {
    fn default() -> ApplianceMetrics {
        ApplianceMetrics::new()
    }
}

impl ApplianceMetrics {
    /// Every counter at zero, registered under `hybridlink_appliance`.
    pub fn new() -> ApplianceMetrics {
        let flows_opened = Family::<HcLabel, Counter>::default();
        let flows_refused = Family::<RefusedLabel, Counter>::default();
        let flows_active = Family::<HcLabel, Gauge>::default();
        let bytes = Family::<HcDirection, Counter>::default();
        let dns = DnsCounters::default();
        let control = ControlCounters::default();
        let mut registry = Registry::with_prefix("hybridlink_appliance");
        registry.register(
            "flows_opened",
            "App connections carried to their target",
            flows_opened.clone(),
        );
        registry.register(
            "flows_refused",
            "App connections refused, by reason",
            flows_refused.clone(),
        );
        registry.register(
            "flows_active",
            "App connections open now",
            flows_active.clone(),
        );
        registry.register("bytes", "Bytes of app connections, each way", bytes.clone());
        registry.register("dns_queries", "DNS queries, by answer", dns.0.clone());
        registry.register(
            "reconnects",
            "Control channel reconnects",
            control.reconnects.clone(),
        );
        registry.register(
            "token_renewals",
            "Send tokens renewed",
            control.token_renewals.clone(),
        );
        ApplianceMetrics {
            registry,
            flows_opened,
            flows_refused,
            flows_active,
            bytes,
            dns,
            control,
        }
    }

    /// What the relay clients' control channels count.
    pub fn control(&self) -> &ControlCounters {
        &self.control
    }

    /// What the DNS server counts.
    pub fn dns(&self) -> &DnsCounters {
        &self.dns
    }

    /// Counts an app connection carried to `hc`'s target, active until the
    /// guard drops.
    pub fn flow_opened(&self, hc: &str) -> ActiveGuard {
        let label = HcLabel::new(hc);
        self.flows_opened.get_or_create(&label).inc();
        ActiveGuard::new(self.flows_active.get_or_create(&label).clone())
    }

    /// Counts an app connection refused (`hc` empty when none serves it).
    pub fn refused(&self, hc: &str, reason: FlowRefusedReason) {
        let label = RefusedLabel {
            hc: hc.to_string(),
            reason,
        };
        self.flows_refused.get_or_create(&label).inc();
    }

    /// `inner`, its reads counted as bytes of `hc` going `direction`.
    pub fn counted<T>(&self, inner: T, hc: &str, direction: Direction) -> Counted<T> {
        let label = HcDirection {
            hc: hc.to_string(),
            direction,
        };
        Counted::new(inner, self.bytes.get_or_create(&label).clone())
    }

    /// Counts `bytes` of `hc` gone `direction` (for a stream counted only
    /// when it ends).
    pub fn add_bytes(&self, hc: &str, direction: Direction, bytes: u64) {
        let label = HcDirection {
            hc: hc.to_string(),
            direction,
        };
        self.bytes.get_or_create(&label).inc_by(bytes);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        transport::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn renders_what_was_counted_under_the_names_dashboards_know() {
        let m = ApplianceMetrics::new();
        let _open = m.flow_opened("payroll");
        m.refused("stopped", FlowRefusedReason::refused);
        m.refused("", FlowRefusedReason::no_hybrid_connection);
        m.refused("payroll", FlowRefusedReason::timeout);
        let mut read = m.counted(
            &b"GET / HTTP/1.0\r\n\r\n"[..],
            "payroll",
            Direction::to_target,
        );
        let mut sink = Vec::new();
        read.read_to_end(&mut sink).await.unwrap();
        for answer in [
            DnsAnswer::local,
            DnsAnswer::local,
            DnsAnswer::forwarded,
            DnsAnswer::failed,
            DnsAnswer::rejected,
        ] {
            m.dns().count(answer);
        }
        m.control().reconnects.inc();
        m.control().token_renewals.inc();
        m.control().token_renewals.inc();
        let text = m.render();
        for line in [
            "# HELP hybridlink_appliance_flows_opened App connections carried to their target.",
            "# TYPE hybridlink_appliance_flows_opened counter",
            "hybridlink_appliance_flows_opened_total{hc=\"payroll\"} 1",
            "# TYPE hybridlink_appliance_flows_refused counter",
            "hybridlink_appliance_flows_refused_total{hc=\"stopped\",reason=\"refused\"} 1",
            "hybridlink_appliance_flows_refused_total{hc=\"\",reason=\"no_hybrid_connection\"} 1",
            "hybridlink_appliance_flows_refused_total{hc=\"payroll\",reason=\"timeout\"} 1",
            "# TYPE hybridlink_appliance_flows_active gauge",
            "hybridlink_appliance_flows_active{hc=\"payroll\"} 1",
            "# TYPE hybridlink_appliance_bytes counter",
            "hybridlink_appliance_bytes_total{hc=\"payroll\",direction=\"to_target\"} 18",
            "# TYPE hybridlink_appliance_dns_queries counter",
            "hybridlink_appliance_dns_queries_total{answer=\"local\"} 2",
            "hybridlink_appliance_dns_queries_total{answer=\"forwarded\"} 1",
            "hybridlink_appliance_dns_queries_total{answer=\"failed\"} 1",
            "hybridlink_appliance_dns_queries_total{answer=\"rejected\"} 1",
            "# TYPE hybridlink_appliance_reconnects counter",
            "hybridlink_appliance_reconnects_total 1",
            "# TYPE hybridlink_appliance_token_renewals counter",
            "hybridlink_appliance_token_renewals_total 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn the_dns_counters_read_back_what_they_counted() {
        let dns = DnsCounters::default();
        let shared = dns.clone();
        shared.count(DnsAnswer::forwarded);
        shared.count(DnsAnswer::forwarded);
        assert_eq!(dns.get(DnsAnswer::forwarded), 2);
        assert_eq!(dns.get(DnsAnswer::local), 0);
    }
}
