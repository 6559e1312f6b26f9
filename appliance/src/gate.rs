//! The decision, for each endpoint the relay announces, whether this
//! appliance serves it: answers its name in DNS, routes its IPv4 literal into
//! the tun and carries its flows. No I/O: the service feeds it the relay's
//! endpoints each time they change and acts on what comes out.
//!
//! An endpoint is served when it is not in the [`NeverRoute`] set and an
//! entry of the allow list matches it. The allow list is the config's
//! `allow`, or, when the config has none, the hosts of each hybrid
//! connection's *first* announcement in this process (see
//! [`AllowSource::FirstAnnouncement`] for why).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use proto::name::{Endpoint, HcName};

use crate::allow::{AllowEntry, AllowList};
use crate::never_route::{NeverReason, NeverRoute};

/// Where the allow list in force came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllowSource {
    /// The config's `allow` (what `appliance install` writes, or a person).
    Config,
    /// No `allow` in the config: each hybrid connection's first announced
    /// host in this process is allowed, later moves to other hosts are not.
    ///
    /// The list guards against the relay, so its default must not extend
    /// trust to whatever the relay says later; what it announced when the
    /// appliance started is what the person who started it saw working.
    /// The alternative, "everything but the never-route set", would leave an
    /// app host without a config (`appliance run --connection-string`)
    /// answering any name the relay picks, `github.com` included.
    FirstAnnouncement,
}

impl fmt::Display for AllowSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AllowSource::Config => "config",
            AllowSource::FirstAnnouncement => "first announcement",
        })
    }
}

/// What the appliance does with one hybrid connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GateState {
    /// The relay announces no endpoint: not yet, or no longer (the hybrid
    /// connection was deleted, or the relay refused the key).
    Waiting,
    /// Served.
    Ok,
    /// Refused: no allow-list entry matches the endpoint's host.
    OutsideAllowList {
        /// The host that matched nothing.
        host: String,
        /// Where the list came from.
        source: AllowSource,
    },
    /// Refused: the host is one the appliance never routes.
    NeverRoute(NeverReason),
}

impl GateState {
    /// Whether the hybrid connection is served.
    pub fn is_ok(&self) -> bool {
        *self == GateState::Ok
    }

    /// Whether the endpoint was refused.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            GateState::OutsideAllowList { .. } | GateState::NeverRoute(_)
        )
    }
}

impl fmt::Display for GateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GateState::Waiting => f.write_str("not announced by the relay"),
            GateState::Ok => f.write_str("ok"),
            GateState::OutsideAllowList {
                host,
                source: AllowSource::Config,
            } => write!(
                f,
                "refused: outside the allow list (no entry matches {host})"
            ),
            GateState::OutsideAllowList {
                host,
                source: AllowSource::FirstAnnouncement,
            } => write!(
                f,
                "refused: outside the allow list ({host} was not announced at start; \
                 add it to `allow` in the config)"
            ),
            GateState::NeverRoute(reason) => write!(f, "refused: {reason}"),
        }
    }
}

/// The decision for one hybrid connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The hybrid connection.
    pub hc: HcName,
    /// Its endpoint as announced, if any.
    pub endpoint: Option<Endpoint>,
    /// What the appliance does with it.
    pub state: GateState,
    /// The allow-list entry that let it in (for `Ok`).
    pub rule: Option<AllowEntry>,
}

/// What [`Gate::decide`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    /// One verdict per hybrid connection, in name order.
    pub verdicts: Vec<Verdict>,
    /// The verdicts whose endpoint or state differ from the previous call:
    /// log these (each refusal is then logged once).
    pub changed: Vec<Verdict>,
}

impl Decisions {
    /// The endpoints to serve.
    pub fn allowed(&self) -> impl Iterator<Item = (&HcName, &Endpoint)> {
        self.verdicts
            .iter()
            .filter(|v| v.state.is_ok())
            .filter_map(|v| Some((&v.hc, v.endpoint.as_ref()?)))
    }
}

/// Decides which announced endpoints are served; see the module docs.
#[derive(Clone, Debug)]
pub struct Gate {
    allow: AllowList,
    source: AllowSource,
    never: NeverRoute,
    /// Under [`AllowSource::FirstAnnouncement`]: the hybrid connections
    /// whose first endpoint has been taken into the list.
    pinned: BTreeSet<HcName>,
    last: BTreeMap<HcName, (Option<Endpoint>, GateState)>,
}

impl Gate {
    /// A gate with the config's allow list (`None`: first announcements).
    pub fn new(allow: Option<AllowList>, never: NeverRoute) -> Gate {
        let source = match allow {
            Some(_) => AllowSource::Config,
            None => AllowSource::FirstAnnouncement,
        };
        Gate {
            allow: allow.unwrap_or_default(),
            source,
            never,
            pinned: BTreeSet::new(),
            last: BTreeMap::new(),
        }
    }

    /// Replaces the allow list after a reload. `None` goes back to first
    /// announcements, keeping the hosts allowed so far.
    pub fn set_allow(&mut self, allow: Option<AllowList>) {
        match allow {
            Some(list) => {
                self.allow = list;
                self.source = AllowSource::Config;
            }
            None if self.source == AllowSource::Config => {
                self.source = AllowSource::FirstAnnouncement;
                let served: Vec<(HcName, AllowEntry)> = self
                    .last
                    .iter()
                    .filter(|(_, (_, s))| s.is_ok())
                    .filter_map(|(hc, (e, _))| {
                        Some((hc.clone(), AllowEntry::exactly(e.as_ref()?.host())))
                    })
                    .collect();
                self.allow = AllowList::default();
                for (hc, entry) in served {
                    self.allow.insert(entry);
                    self.pinned.insert(hc);
                }
            }
            None => {}
        }
    }

    /// The allow list in force.
    pub fn allow(&self) -> &AllowList {
        &self.allow
    }

    /// Where the allow list came from.
    pub fn source(&self) -> AllowSource {
        self.source
    }

    /// The never-route set, to refresh the host's addresses.
    pub fn never_route_mut(&mut self) -> &mut NeverRoute {
        &mut self.never
    }

    /// Decides on every hybrid connection's current endpoint.
    pub fn decide(&mut self, endpoints: &[(HcName, Option<Endpoint>)]) -> Decisions {
        let mut sorted: Vec<&(HcName, Option<Endpoint>)> = endpoints.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut decisions = Decisions::default();
        let mut last = BTreeMap::new();
        for (hc, endpoint) in sorted {
            let (state, rule) = match endpoint {
                None => (GateState::Waiting, None),
                Some(e) => self.judge(hc, e),
            };
            let verdict = Verdict {
                hc: hc.clone(),
                endpoint: endpoint.clone(),
                state,
                rule,
            };
            let now = (verdict.endpoint.clone(), verdict.state.clone());
            if self.last.get(hc) != Some(&now) {
                decisions.changed.push(verdict.clone());
            }
            last.insert(hc.clone(), now);
            decisions.verdicts.push(verdict);
        }
        self.last = last;
        decisions
    }

    fn judge(&mut self, hc: &HcName, endpoint: &Endpoint) -> (GateState, Option<AllowEntry>) {
        let host = endpoint.host();
        let never = self.never.check(host);
        // Only the first announcement counts, even when it is refused:
        // otherwise a relay could announce something refused first and
        // anything it likes second.
        if self.source == AllowSource::FirstAnnouncement
            && self.pinned.insert(hc.clone())
            && never.is_none()
        {
            self.allow.insert(AllowEntry::exactly(host));
        }
        if let Some(reason) = never {
            return (GateState::NeverRoute(reason), None);
        }
        match self.allow.matching(host) {
            Some(rule) => (GateState::Ok, Some(rule.clone())),
            None => (
                GateState::OutsideAllowList {
                    host: host.to_string(),
                    source: self.source,
                },
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::never_route::parse_ip_addr_show;

    fn hc(s: &str) -> HcName {
        s.parse().unwrap()
    }

    fn ep(s: &str) -> Option<Endpoint> {
        Some(s.parse().unwrap())
    }

    fn never() -> NeverRoute {
        NeverRoute::new(
            &["198.18.0.1".into()],
            &[],
            &[Ipv4Addr::new(198, 18, 1, 1)],
            parse_ip_addr_show("2: eth0    inet 198.18.1.2/24 scope global eth0"),
        )
    }

    fn states(d: &Decisions) -> Vec<(String, String)> {
        d.verdicts
            .iter()
            .map(|v| (v.hc.to_string(), v.state.to_string()))
            .collect()
    }

    #[test]
    fn the_configured_list_and_the_never_route_set_decide() {
        let allow = AllowList::parse(&[".corp", "198.18.2.2", "198.18.0.1"]).unwrap();
        let mut gate = Gate::new(Some(allow), never());
        let d = gate.decide(&[
            (hc("web"), ep("payroll.corp:80")),
            (hc("lit"), ep("198.18.2.2:8080")),
            (hc("evil"), ep("github.com:443")),
            (hc("moved"), ep("198.18.9.9:8080")),
            (hc("relay"), ep("198.18.0.1:9443")),
            (hc("dns"), ep("198.18.1.1:53")),
            (hc("later"), None),
        ]);
        assert_eq!(
            states(&d),
            [
                ("dns", "refused: a DNS server of this host (198.18.1.1)"),
                (
                    "evil",
                    "refused: outside the allow list (no entry matches github.com)"
                ),
                ("later", "not announced by the relay"),
                ("lit", "ok"),
                (
                    "moved",
                    "refused: outside the allow list (no entry matches 198.18.9.9)"
                ),
                ("relay", "refused: the relay's own address (198.18.0.1)"),
                ("web", "ok"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let allowed: Vec<String> = d.allowed().map(|(h, _)| h.to_string()).collect();
        assert_eq!(allowed, ["lit", "web"]);
        assert_eq!(d.changed.len(), 7, "everything is new the first time");
        let web = d.verdicts.iter().find(|v| v.hc == hc("web")).unwrap();
        assert_eq!(
            web.rule.as_ref().map(ToString::to_string).as_deref(),
            Some(".corp")
        );
    }

    #[test]
    fn only_changes_are_reported_so_each_refusal_is_logged_once() {
        let allow = AllowList::parse(&["payroll.corp"]).unwrap();
        let mut gate = Gate::new(Some(allow), never());
        let first = [(hc("web"), ep("payroll.corp:80"))];
        assert_eq!(gate.decide(&first).changed.len(), 1);
        assert!(gate.decide(&first).changed.is_empty());
        let moved = [(hc("web"), ep("evil.example:80"))];
        let d = gate.decide(&moved);
        assert_eq!(d.changed.len(), 1);
        assert!(d.changed[0].state.is_refused());
        assert!(gate.decide(&moved).changed.is_empty());
        assert_eq!(d.allowed().count(), 0);
        // Back inside: served again, and reported.
        let d = gate.decide(&first);
        assert_eq!(d.changed.len(), 1);
        assert!(d.changed[0].state.is_ok());
    }

    #[test]
    fn without_a_configured_list_the_first_announcement_is_pinned() {
        let mut gate = Gate::new(None, never());
        let d = gate.decide(&[
            (hc("web"), ep("payroll.corp:80")),
            (hc("lit"), ep("198.18.2.2:8080")),
            (hc("relay"), ep("198.18.0.1:9443")),
            (hc("late"), None),
        ]);
        assert_eq!(d.allowed().count(), 2);
        assert_eq!(gate.source(), AllowSource::FirstAnnouncement);
        let listed: Vec<String> = gate
            .allow()
            .entries()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(listed, ["198.18.2.2", "payroll.corp"]);
        // Later moves are refused; a connection announced late is pinned
        // when it comes; another connection may use a host already allowed.
        let d = gate.decide(&[
            (hc("web"), ep("github.com:443")),
            (hc("lit"), ep("198.18.2.3:8080")),
            (hc("relay"), ep("198.18.2.4:1")),
            (hc("late"), ep("late.corp:80")),
            (hc("other"), ep("payroll.corp:8080")),
        ]);
        assert_eq!(
            states(&d),
            [
                ("late", "ok"),
                (
                    "lit",
                    "refused: outside the allow list (198.18.2.3 was not announced at start; \
                     add it to `allow` in the config)"
                ),
                ("other", "ok"),
                ("relay", "refused: outside the allow list (198.18.2.4 was not announced at start; add it to `allow` in the config)"),
                (
                    "web",
                    "refused: outside the allow list (github.com was not announced at start; \
                     add it to `allow` in the config)"
                ),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn a_reload_replaces_the_list() {
        let mut gate = Gate::new(None, never());
        let eps = [
            (hc("web"), ep("payroll.corp:80")),
            (hc("sql"), ep("sql.corp:5432")),
        ];
        assert_eq!(gate.decide(&eps).allowed().count(), 2);
        gate.set_allow(Some(AllowList::parse(&["sql.corp"]).unwrap()));
        let d = gate.decide(&eps);
        let allowed: Vec<String> = d.allowed().map(|(h, _)| h.to_string()).collect();
        assert_eq!(allowed, ["sql"]);
        gate.set_allow(None);
        assert_eq!(gate.source(), AllowSource::FirstAnnouncement);
        let d = gate.decide(&[
            (hc("web"), ep("payroll.corp:80")),
            (hc("sql"), ep("sql.corp:5432")),
        ]);
        let allowed: Vec<String> = d.allowed().map(|(h, _)| h.to_string()).collect();
        assert_eq!(
            allowed,
            ["sql"],
            "what was served stays; web was already seen"
        );
    }
}
