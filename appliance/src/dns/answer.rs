//! The authoritative part of the DNS server: answers for the configured
//! names (see the [module docs](super#what-it-answers) for what matches and
//! what each query type gets).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

use hickory_proto::op::{LowerQuery, Metadata};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use proto::name::canonical_dns_name;

use super::{DnsError, response_edns, send};

/// The configured names with their addresses, replaceable while queries
/// are answered.
#[derive(Debug)]
pub(super) struct LocalNames {
    /// The search domains, normalised.
    search: Vec<String>,
    /// The TTL of the `A` records.
    pub(super) ttl: u32,
    table: RwLock<Arc<NameTable>>,
}

impl LocalNames {
    /// The table for `names` (host name, virtual address), expanded with
    /// the `search` domains.
    pub(super) fn new(
        names: &[(String, Ipv4Addr)],
        search: &[String],
        ttl: u32,
    ) -> Result<LocalNames, DnsError> {
        let search = search
            .iter()
            .map(|s| canonical_dns_name(s))
            .collect::<Result<Vec<_>, _>>()?;
        let table = NameTable::build(names, &search)?;
        Ok(LocalNames {
            search,
            ttl,
            table: RwLock::new(Arc::new(table)),
        })
    }

    /// The local answer to `query`, or `None` when it must be forwarded.
    pub(super) fn answer(&self, query: &LowerQuery) -> Option<LocalAnswer> {
        local_answer(&self.table(), query)
    }

    /// Replaces the names; on error the old ones stay in force.
    pub(super) fn update(&self, names: &[(String, Ipv4Addr)]) -> Result<(), DnsError> {
        let table = Arc::new(NameTable::build(names, &self.search)?);
        match self.table.write() {
            Ok(mut guard) => *guard = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
        Ok(())
    }

    fn table(&self) -> Arc<NameTable> {
        // A poisoned lock still holds a complete table: swaps are atomic.
        match self.table.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

/// The query names that have a local answer, with search expansions.
#[derive(Debug, Default)]
struct NameTable {
    entries: HashMap<LowerName, Ipv4Addr>,
}

impl NameTable {
    /// Builds the table for `names` and the (already normalised) `search`
    /// domains.
    fn build(names: &[(String, Ipv4Addr)], search: &[String]) -> Result<NameTable, DnsError> {
        let mut exact = Vec::with_capacity(names.len());
        for (name, addr) in names {
            exact.push((canonical_dns_name(name)?, *addr));
        }
        let mut entries = HashMap::with_capacity(exact.len() * (1 + search.len()));
        for (name, addr) in &exact {
            for domain in search {
                // A name too long once expanded simply has no expansion.
                if let Some(key) = lower_name(&format!("{name}.{domain}")) {
                    entries.insert(key, *addr);
                }
            }
        }
        for (name, addr) in &exact {
            let key = lower_name(name).ok_or_else(|| DnsError::Unencodable(name.clone()))?;
            entries.insert(key, *addr);
        }
        Ok(NameTable { entries })
    }
}

/// `name` (valid, without a trailing dot) as a fully qualified lower-case
/// DNS name.
fn lower_name(name: &str) -> Option<LowerName> {
    Name::from_ascii(format!("{name}."))
        .ok()
        .map(LowerName::from)
}

/// The answer for a query about a configured name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LocalAnswer {
    /// One `A` record with this address.
    Address(Ipv4Addr),
    /// NOERROR with an empty answer section.
    NoData,
}

/// The local answer to `query`, or `None` when it must be forwarded.
fn local_answer(table: &NameTable, query: &LowerQuery) -> Option<LocalAnswer> {
    let addr = *table.entries.get(query.name())?;
    if query.query_class() != DNSClass::IN {
        return Some(LocalAnswer::NoData);
    }
    Some(match query.query_type() {
        RecordType::A | RecordType::ANY => LocalAnswer::Address(addr),
        _ => LocalAnswer::NoData,
    })
}

/// Sends the authoritative answer for a configured name.
pub(super) async fn send_local<R: ResponseHandler>(
    request: &Request,
    query: &LowerQuery,
    answer: LocalAnswer,
    ttl: u32,
    response: R,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.recursion_available = true;
    let records: Vec<Record> = match answer {
        LocalAnswer::Address(addr) => vec![Record::from_rdata(
            // The name as asked, so that 0x20 case randomisation checks pass.
            query.original().name().clone(),
            ttl,
            RData::A(A(addr)),
        )],
        LocalAnswer::NoData => Vec::new(),
    };
    let edns = response_edns(request);
    let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
    let message = builder.build(
        metadata,
        records.iter(),
        std::iter::empty(),
        std::iter::empty(),
        std::iter::empty(),
    );
    send(request, message, response).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::tests::query;
    use hickory_proto::op::Query;

    fn table() -> NameTable {
        let names = vec![
            ("sql".to_string(), Ipv4Addr::new(127, 77, 0, 2)),
            ("Payroll.Corp.".to_string(), Ipv4Addr::new(127, 77, 0, 3)),
            ("db.corp".to_string(), Ipv4Addr::new(127, 77, 0, 4)),
            ("db".to_string(), Ipv4Addr::new(127, 77, 0, 5)),
        ];
        NameTable::build(&names, &["corp".to_string(), "eu.corp".to_string()]).unwrap()
    }

    #[test]
    fn matches_fqdn_short_and_case_variants() {
        let t = table();
        let a = |n| local_answer(&t, &query(n, RecordType::A));
        let addr = |d| Some(LocalAnswer::Address(Ipv4Addr::new(127, 77, 0, d)));
        assert_eq!(a("sql."), addr(2));
        assert_eq!(a("SQL"), addr(2));
        assert_eq!(a("sql.corp."), addr(2));
        assert_eq!(a("Sql.EU.corp"), addr(2));
        assert_eq!(a("payroll.corp"), addr(3));
        assert_eq!(a("PAYROLL.CORP."), addr(3));
        assert_eq!(
            a("payroll"),
            None,
            "an FQDN host does not match its first label"
        );
        assert_eq!(a("sql.other"), None);
        assert_eq!(a("xsql.corp"), None);
        // db.corp is configured itself: it wins over db + search corp.
        assert_eq!(a("db.corp"), addr(4));
        assert_eq!(a("db.eu.corp"), addr(5));
    }

    #[test]
    fn other_types_get_no_data_and_any_gets_a() {
        let t = table();
        let addr = Some(LocalAnswer::Address(Ipv4Addr::new(127, 77, 0, 2)));
        assert_eq!(local_answer(&t, &query("sql", RecordType::ANY)), addr);
        for qtype in [
            RecordType::AAAA,
            RecordType::MX,
            RecordType::TXT,
            RecordType::SRV,
        ] {
            assert_eq!(
                local_answer(&t, &query("sql", qtype)),
                Some(LocalAnswer::NoData)
            );
        }
        let mut chaos = Query::query(Name::from_ascii("sql.").unwrap(), RecordType::A);
        chaos.set_query_class(DNSClass::CH);
        assert_eq!(
            local_answer(&t, &LowerQuery::from(chaos)),
            Some(LocalAnswer::NoData)
        );
        assert_eq!(
            local_answer(&t, &query("example.test", RecordType::AAAA)),
            None
        );
    }

    #[test]
    fn invalid_names_are_errors() {
        let bad = vec![("a b".to_string(), Ipv4Addr::LOCALHOST)];
        assert!(matches!(
            NameTable::build(&bad, &[]),
            Err(DnsError::InvalidName(_))
        ));
    }
}
