//! The agent's Prometheus metrics, `hybridlink_agent_*`: made by
//! [`Agent::start`](crate::Agent::start), shared by every generation of
//! control channels and every stream, and read back for the stream counters
//! the agent reports to the relay.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::control::{RefusalCode, StreamStats};
use proto::name::HcName;
use transport::metrics::{ActiveGuard, ControlCounters, Counted, Direction, HcDirection, HcLabel};

/// Why the agent refused a stream or a pipe (the `reason` of
/// `streams_refused_total`): the code it answered with, or `pipe_setups` or
/// `dials` for a share at its cap.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StreamRefusedReason {
    /// The target answered with RST.
    refused,
    /// The target could not be reached.
    unreachable,
    /// The on-prem policy forbids the endpoint or its address.
    denied_by_policy,
    /// The relay has not granted the sender this hybrid connection.
    not_allowed,
    /// The agent does not serve the hybrid connection.
    unknown_hc,
    /// The stream request could not be read.
    bad_request,
    /// The sender did not prove it holds the end-to-end key.
    end_to_end,
    /// A pipe offer ignored: its sender or hybrid connection was at its cap
    /// of pipe set-ups in progress.
    pipe_setups,
    /// A stream refused: its sender or hybrid connection was at its cap of
    /// dials in progress (the sender is told `refused`).
    dials,
}

impl From<RefusalCode> for StreamRefusedReason {
    fn from(code: RefusalCode) -> StreamRefusedReason {
        match code {
            RefusalCode::Refused => StreamRefusedReason::refused,
            RefusalCode::Unreachable => StreamRefusedReason::unreachable,
            RefusalCode::DeniedByPolicy => StreamRefusedReason::denied_by_policy,
            RefusalCode::NotAllowed => StreamRefusedReason::not_allowed,
            RefusalCode::UnknownHc => StreamRefusedReason::unknown_hc,
            RefusalCode::BadRequest => StreamRefusedReason::bad_request,
            RefusalCode::EndToEnd => StreamRefusedReason::end_to_end,
        }
    }
}

/// The labels of `streams_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabel {
    hc: String,
    reason: StreamRefusedReason,
}

/// Every metric of an agent, and the registry that exports them.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    streams_opened: Family<HcLabel, Counter>,
    streams_refused: Family<RefusedLabel, Counter>,
    streams_active: Family<HcLabel, Gauge>,
    bytes: Family<HcDirection, Counter>,
    control: ControlCounters,
}

impl Default for AgentMetrics {
    fn default() -> AgentMetrics {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    /// Every counter at zero, registered under `hybridlink_agent`.
    pub fn new() -> AgentMetrics {
        let streams_opened = Family::<HcLabel, Counter>::default();
        let streams_refused = Family::<RefusedLabel, Counter>::default();
        let streams_active = Family::<HcLabel, Gauge>::default();
        let bytes = Family::<HcDirection, Counter>::default();
        let control = ControlCounters::default();
        let mut registry = Registry::with_prefix("hybridlink_agent");
        registry.register(
            "streams_opened",
            "Streams dialed to their target",
            streams_opened.clone(),
        );
        registry.register(
            "streams_refused",
            "Streams refused, by reason (dial failures included)",
            streams_refused.clone(),
        );
        registry.register("streams_active", "Streams open now", streams_active.clone());
        registry.register("bytes", "Bytes of streams, each way", bytes.clone());
        registry.register(
            "reconnects",
            "Control channel reconnects",
            control.reconnects.clone(),
        );
        registry.register(
            "token_renewals",
            "Listen tokens renewed",
            control.token_renewals.clone(),
        );
        AgentMetrics {
            registry,
            streams_opened,
            streams_refused,
            streams_active,
            bytes,
            control,
        }
    }

    /// What the control channels count.
    pub fn control(&self) -> &ControlCounters {
        &self.control
    }

    /// Counts a stream of `hc` dialed to its target, active until the
    /// guard drops.
    pub fn stream_opened(&self, hc: &str) -> ActiveGuard {
        let label = HcLabel::new(hc);
        self.streams_opened.get_or_create(&label).inc();
        ActiveGuard::new(self.streams_active.get_or_create(&label).clone())
    }

    /// Counts a stream refused for `hc` (`-` when a sender, not a hybrid
    /// connection, was at its cap).
    pub fn refused(&self, hc: &str, reason: StreamRefusedReason) {
        let label = RefusedLabel {
            hc: hc.to_string(),
            reason,
        };
        self.streams_refused.get_or_create(&label).inc();
    }

    /// `inner`, its reads counted as bytes of `hc` going `direction`.
    pub fn counted<T>(&self, inner: T, hc: &str, direction: Direction) -> Counted<T> {
        Counted::new(inner, self.bytes_counter(hc, direction))
    }

    /// Adds `n` bytes of `hc` going `direction`.
    pub fn add_bytes(&self, hc: &str, direction: Direction, n: u64) {
        self.bytes_counter(hc, direction).inc_by(n);
    }

    fn bytes_counter(&self, hc: &str, direction: Direction) -> Counter {
        let label = HcDirection {
            hc: hc.to_string(),
            direction,
        };
        self.bytes.get_or_create(&label).clone()
    }

    /// The stream counters of `hc` the agent reports to the relay: open
    /// now, opened and bytes each way since the agent started; `refused` is
    /// the agent's own count of the hybrid connection's failed dials.
    pub fn stream_stats(&self, hc: &HcName, refused: u64) -> StreamStats {
        let label = HcLabel::new(hc.as_str());
        let open = self.streams_active.get_or_create(&label).get();
        StreamStats {
            open: u64::try_from(open).unwrap_or(0),
            opened: self.streams_opened.get_or_create(&label).get(),
            refused,
            bytes_to_target: self.bytes_counter(hc.as_str(), Direction::to_target).get(),
            bytes_from_target: self
                .bytes_counter(hc.as_str(), Direction::from_target)
                .get(),
        }
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
        let m = AgentMetrics::new();
        let first = m.stream_opened("payroll");
        let _second = m.stream_opened("payroll");
        drop(first);
        m.refused("stopped", RefusalCode::Refused.into());
        m.refused("stopped", RefusalCode::Refused.into());
        m.refused("-", StreamRefusedReason::pipe_setups);
        m.refused("payroll", StreamRefusedReason::dials);
        let mut read = m.counted(&b"hello"[..], "payroll", Direction::to_target);
        let mut sink = Vec::new();
        read.read_to_end(&mut sink).await.unwrap();
        m.control().reconnects.inc();
        m.control().token_renewals.inc();
        let text = m.render();
        for line in [
            "# HELP hybridlink_agent_streams_opened Streams dialed to their target.",
            "# TYPE hybridlink_agent_streams_opened counter",
            "hybridlink_agent_streams_opened_total{hc=\"payroll\"} 2",
            "# TYPE hybridlink_agent_streams_refused counter",
            "hybridlink_agent_streams_refused_total{hc=\"stopped\",reason=\"refused\"} 2",
            "hybridlink_agent_streams_refused_total{hc=\"-\",reason=\"pipe_setups\"} 1",
            "hybridlink_agent_streams_refused_total{hc=\"payroll\",reason=\"dials\"} 1",
            "# TYPE hybridlink_agent_streams_active gauge",
            "hybridlink_agent_streams_active{hc=\"payroll\"} 1",
            "# TYPE hybridlink_agent_bytes counter",
            "hybridlink_agent_bytes_total{hc=\"payroll\",direction=\"to_target\"} 5",
            "# TYPE hybridlink_agent_reconnects counter",
            "hybridlink_agent_reconnects_total 1",
            "# TYPE hybridlink_agent_token_renewals counter",
            "hybridlink_agent_token_renewals_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn every_refusal_code_keeps_the_name_it_has_on_the_wire() {
        let m = AgentMetrics::new();
        for code in [
            RefusalCode::Refused,
            RefusalCode::Unreachable,
            RefusalCode::DeniedByPolicy,
            RefusalCode::NotAllowed,
            RefusalCode::UnknownHc,
            RefusalCode::BadRequest,
            RefusalCode::EndToEnd,
        ] {
            m.refused("payroll", code.into());
            let wire = serde_json::to_value(code).unwrap();
            let line =
                format!("hybridlink_agent_streams_refused_total{{hc=\"payroll\",reason={wire}}} 1");
            let text = m.render();
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn the_stats_reported_to_the_relay_come_from_the_same_counters() {
        let m = AgentMetrics::new();
        let hc: HcName = "payroll".parse().unwrap();
        let _open = m.stream_opened("payroll");
        drop(m.stream_opened("payroll"));
        let mut sink = Vec::new();
        let mut up = m.counted(&b"request"[..], "payroll", Direction::to_target);
        up.read_to_end(&mut sink).await.unwrap();
        let mut down = m.counted(&b"ok"[..], "payroll", Direction::from_target);
        down.read_to_end(&mut sink).await.unwrap();
        assert_eq!(
            m.stream_stats(&hc, 4),
            StreamStats {
                open: 1,
                opened: 2,
                refused: 4,
                bytes_to_target: 7,
                bytes_from_target: 2,
            }
        );
    }
}
