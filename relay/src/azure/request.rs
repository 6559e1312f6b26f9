//! The upgrade requests of the Azure protocol's WebSocket mode, parsed
//! without I/O: which hybrid connection, which action, the token and what
//! is passed on to the listener.
//!
//! | request | target |
//! | --- | --- |
//! | listener control channel | `/$hc/{hc}?sb-hc-action=listen[&sb-hc-id=ID][&sb-hc-token=TOKEN]` |
//! | sender | `/$hc/{hc}[/suffix][?app-query&]sb-hc-action=connect[&sb-hc-id=ID][&sb-hc-token=TOKEN]` |
//! | accept (rendezvous) | the `address` of an `accept`: `...&sb-hc-action=accept&sb-hc-id=ID&sb-hc-ticket=T` |
//! | reject | the same, plus `&sb-hc-statusCode=N&sb-hc-statusDescription=TEXT` |
//! | HTTP request's rendezvous | the `address` of a `request`: `/$hc/{hc}?sb-hc-action=request&sb-hc-id=ID&sb-hc-ticket=T` |
//! | sender's plain HTTP request ([`parse_http`]) | `/{hc}[/suffix][?query]`, no `$hc`, not an upgrade |
//!
//! The token comes from the `sb-hc-token` query parameter (URL-decoded
//! once) or, without one, the `ServiceBusAuthorization` header; for a plain
//! HTTP request without either, from the `Authorization` header. The one
//! used is never passed on to the listener.

use std::fmt;

use hyper::HeaderMap;
use percent_encoding::percent_decode_str;
use proto::name::HcName;
use serde_json::{Map, Value};

/// The path prefix of every WebSocket-mode request.
pub const HC_PREFIX: &str = "/$hc/";
/// The header that carries a token when the query does not.
pub const TOKEN_HEADER: &str = "ServiceBusAuthorization";
/// Longest status description a listener may give when it rejects, in
/// characters; longer ones are cut.
pub const MAX_STATUS_DESCRIPTION: usize = 128;
/// Longest `sb-hc-id` kept, in characters (the clients send a GUID,
/// sometimes with a short suffix).
pub const MAX_TRACKING_ID: usize = 64;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a listener control channel.
    Listen,
    /// A sender's WebSocket, to be handed to a listener.
    Connect,
    /// A listener opens the rendezvous of an `accept`.
    Accept {
        /// The one-time ticket of the `accept`'s address.
        ticket: String,
    },
    /// A listener refuses the sender of an `accept`.
    Reject {
        /// The one-time ticket of the `accept`'s address.
        ticket: String,
        /// The status the sender gets (400 to 599).
        status: u16,
        /// Its reason phrase: printable ASCII, at most
        /// [`MAX_STATUS_DESCRIPTION`] characters.
        description: String,
    },
    /// A listener opens the rendezvous of an HTTP `request`.
    Request {
        /// The one-time ticket of the `request`'s address.
        ticket: String,
    },
    /// A sender's plain HTTP request (HTTP request/response mode).
    Http,
}

/// A parsed WebSocket-mode request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcRequest {
    /// The hybrid connection (the first path segment after `/$hc/`).
    pub hc: HcName,
    /// What is asked.
    pub action: Action,
    /// The path after the name (`/suffix`, possibly empty), as sent.
    pub suffix: String,
    /// The query parameters that are not the protocol's (`sb-hc-*`),
    /// as sent and in order, joined with `&`.
    pub app_query: String,
    /// The tracking id (`sb-hc-id`), if any.
    pub id: Option<String>,
    /// The SAS token from the query, else from the header.
    pub token: Option<String>,
    /// Whether the token came from the `Authorization` header (HTTP mode
    /// only), which is then not passed on.
    pub authorization_was_token: bool,
}

/// Why a request is not a WebSocket-mode request the relay can serve; each
/// is answered with [`RequestError::status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A plain HTTP request's path has no hybrid connection name.
    #[error(
        "the path names no hybrid connection (HTTP requests are /NAME[/path], WebSocket requests /$hc/NAME?sb-hc-action=...)"
    )]
    NoName,
    /// The path does not start with `/$hc/`.
    #[error(
        "the path does not start with /$hc/ (Hybrid Connections WebSocket requests are /$hc/NAME?sb-hc-action=...)"
    )]
    NotHybridConnection,
    /// The name is not a hybrid connection name.
    #[error("{0}")]
    BadName(String),
    /// No `sb-hc-action`, or one the relay does not know.
    #[error("sb-hc-action must be listen, connect, accept or request (got {0:?})")]
    BadAction(String),
    /// A protocol parameter appears twice or cannot be decoded.
    #[error("the query parameter {0} is repeated or not URL-encoded UTF-8")]
    BadParameter(&'static str),
    /// An accept without its ticket.
    #[error(
        "the accept address has no sb-hc-ticket; use the address of the accept message as it is"
    )]
    NoTicket,
    /// A reject whose status code is not a number from 400 to 599.
    #[error("sb-hc-statusCode must be a number from 400 to 599")]
    BadStatus,
}

impl RequestError {
    /// The HTTP status the request is answered with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::NotHybridConnection | RequestError::NoName | RequestError::BadName(_) => {
                404
            }
            _ => 400,
        }
    }
}

/// The protocol's own query parameters of one request.
#[derive(Debug, Default)]
struct Params {
    action: Option<String>,
    id: Option<String>,
    token: Option<String>,
    ticket: Option<String>,
    status: Option<String>,
    description: Option<String>,
}

fn decode(value: &str, name: &'static str) -> Result<String, RequestError> {
    percent_decode_str(value)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| RequestError::BadParameter(name))
}

/// The hybrid connection named by the first segment of `rest` (URL
/// decoded, lower case) and the path after it.
fn name_and_suffix(rest: &str) -> Result<(HcName, &str), RequestError> {
    let (name, suffix) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let name = decode(name, "path")
        .map_err(|_| {
            RequestError::BadName("the hybrid connection name is not URL-encoded UTF-8".into())
        })?
        .to_ascii_lowercase();
    let hc: HcName = name
        .parse()
        .map_err(|e: proto::name::NameError| RequestError::BadName(e.to_string()))?;
    Ok((hc, suffix))
}

/// Splits a query into the protocol's parameters and the application's
/// (as sent, in order).
fn split_query(query: Option<&str>) -> Result<(Params, Vec<&str>), RequestError> {
    let mut params = Params::default();
    let mut app = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (slot, label) = match name {
            "sb-hc-action" => (&mut params.action, "sb-hc-action"),
            "sb-hc-id" => (&mut params.id, "sb-hc-id"),
            "sb-hc-token" => (&mut params.token, "sb-hc-token"),
            "sb-hc-ticket" => (&mut params.ticket, "sb-hc-ticket"),
            "sb-hc-statusCode" => (&mut params.status, "sb-hc-statusCode"),
            "sb-hc-statusDescription" => (&mut params.description, "sb-hc-statusDescription"),
            // Other sb- parameters are the protocol's too, and the
            // listener's SDK strips them anyway.
            other if other.starts_with("sb-") => continue,
            _ => {
                app.push(pair);
                continue;
            }
        };
        if slot.replace(decode(value, label)?).is_some() {
            return Err(RequestError::BadParameter(label));
        }
    }
    Ok((params, app))
}

/// The `sb-hc-id` as kept: printable, at most [`MAX_TRACKING_ID`].
fn tracking_id(id: Option<String>) -> Option<String> {
    id.map(|id| {
        id.chars()
            .filter(|c| c.is_ascii_graphic())
            .take(MAX_TRACKING_ID)
            .collect()
    })
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Parses a sender's plain HTTP request (not an upgrade): `/{hc}[/suffix]`
/// and its query. The token comes from `sb-hc-token`, else the
/// `ServiceBusAuthorization` header, else the `Authorization` header.
pub fn parse_http(
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<HcRequest, RequestError> {
    let rest = path
        .strip_prefix('/')
        .filter(|rest| !rest.is_empty() && !rest.starts_with('/'))
        .ok_or(RequestError::NoName)?;
    let (hc, suffix) = name_and_suffix(rest)?;
    let (params, app) = split_query(query)?;
    let mut authorization_was_token = false;
    let token = params
        .token
        .or_else(|| header_text(headers, TOKEN_HEADER))
        .or_else(|| {
            let token = header_text(headers, super::http::AUTHORIZATION);
            authorization_was_token = token.is_some();
            token
        });
    Ok(HcRequest {
        hc,
        action: Action::Http,
        suffix: suffix.to_string(),
        app_query: app.join("&"),
        id: tracking_id(params.id),
        token,
        authorization_was_token,
    })
}

/// Parses a WebSocket-mode request's path, query and headers.
pub fn parse(
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<HcRequest, RequestError> {
    let rest = path
        .strip_prefix(HC_PREFIX)
        .ok_or(RequestError::NotHybridConnection)?;
    let (hc, suffix) = name_and_suffix(rest)?;
    let (params, app) = split_query(query)?;

    let action = match params.action.as_deref() {
        Some("listen") => Action::Listen,
        Some("connect") => Action::Connect,
        Some("request") => Action::Request {
            ticket: params.ticket.ok_or(RequestError::NoTicket)?,
        },
        Some("accept") => {
            let ticket = params.ticket.ok_or(RequestError::NoTicket)?;
            match params.status {
                None => Action::Accept { ticket },
                Some(status) => Action::Reject {
                    ticket,
                    status: status
                        .parse()
                        .ok()
                        .filter(|s| (400..=599).contains(s))
                        .ok_or(RequestError::BadStatus)?,
                    description: reason_phrase(params.description.as_deref().unwrap_or("")),
                },
            }
        }
        other => {
            return Err(RequestError::BadAction(
                other.unwrap_or("").chars().take(32).collect(),
            ));
        }
    };
    let token = params.token.or_else(|| header_text(headers, TOKEN_HEADER));
    Ok(HcRequest {
        hc,
        action,
        suffix: suffix.to_string(),
        app_query: app.join("&"),
        id: tracking_id(params.id),
        token,
        authorization_was_token: false,
    })
}

/// A listener's status description made fit for a status line: printable
/// ASCII and spaces, at most [`MAX_STATUS_DESCRIPTION`] characters, never
/// empty.
fn reason_phrase(text: &str) -> String {
    let phrase: String = text
        .chars()
        .filter(|c| *c == ' ' || c.is_ascii_graphic())
        .take(MAX_STATUS_DESCRIPTION)
        .collect();
    let phrase = phrase.trim();
    if phrase.is_empty() {
        "Rejected".to_string()
    } else {
        phrase.to_string()
    }
}

/// The sender's upgrade headers as the `connectHeaders` object of an
/// `accept`: every header but the token's, names in their usual case
/// (`Sec-WebSocket-Key`), repeated headers joined with `, `.
pub fn connect_headers(headers: &HeaderMap) -> Map<String, Value> {
    let mut out = Map::new();
    for name in headers.keys() {
        if name.as_str().eq_ignore_ascii_case(TOKEN_HEADER) {
            continue;
        }
        let values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if values.is_empty() {
            continue;
        }
        out.insert(
            canonical_name(name.as_str()),
            Value::String(values.join(", ")),
        );
    }
    out
}

/// `sec-websocket-key` → `Sec-WebSocket-Key`, `x-app` → `X-App`.
pub(crate) fn canonical_name(lower: &str) -> String {
    lower
        .split('-')
        .map(|word| match word {
            "websocket" => "WebSocket".to_string(),
            _ => {
                let mut chars = word.chars();
                chars
                    .next()
                    .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Whether `host` (a `Host` header) can be put in a URL as it is: a name,
/// an IPv4 or bracketed IPv6 address, and an optional port.
pub fn is_plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// The `address` of an `accept`: where the listener opens the rendezvous.
/// `host` is the host the listener dialled for its control channel, so the
/// name its TLS checks is the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptAddress<'a> {
    /// The listener's `Host`.
    pub host: &'a str,
    /// The sender's request.
    pub request: &'a HcRequest,
    /// The tracking id of this connection.
    pub id: &'a str,
    /// The one-time ticket.
    pub ticket: &'a str,
}

impl fmt::Display for AcceptAddress<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.request;
        write!(f, "wss://{}{HC_PREFIX}{}{}?", self.host, r.hc, r.suffix)?;
        if !r.app_query.is_empty() {
            write!(f, "{}&", r.app_query)?;
        }
        write!(
            f,
            "sb-hc-action=accept&sb-hc-id={}&sb-hc-ticket={}",
            proto::sas::url_encode(self.id),
            self.ticket
        )
    }
}

/// The `address` of an HTTP `request`: where the listener opens a
/// WebSocket to receive the request or to send a big response. Only the
/// hybrid connection, the id and the ticket: the request's own path and
/// query travel in the `request` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAddress<'a> {
    /// The listener's `Host`.
    pub host: &'a str,
    /// The hybrid connection.
    pub hc: &'a HcName,
    /// The request's id.
    pub id: &'a str,
    /// The one-time ticket.
    pub ticket: &'a str,
}

impl fmt::Display for RequestAddress<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wss://{}{HC_PREFIX}{}?sb-hc-action=request&sb-hc-id={}&sb-hc-ticket={}",
            self.host,
            self.hc,
            proto::sas::url_encode(self.id),
            self.ticket
        )
    }
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_listen_request_with_its_token_in_the_query() {
        let token =
            "SharedAccessSignature sr=http%3A%2F%2Fh%3A9%2Fpayroll&sig=a%2Bb%3D&se=1&skn=listen";
        let query = format!(
            "sb-hc-action=listen&sb-hc-id=abc&sb-hc-token={}",
            proto::sas::url_encode(token)
        );
        let r = parse(
            "/$hc/Payroll",
            Some(&query),
            &headers(&[(TOKEN_HEADER, "ignored")]),
        )
        .unwrap();
        assert_eq!(r.hc.as_str(), "payroll");
        assert_eq!(r.action, Action::Listen);
        assert_eq!(r.id.as_deref(), Some("abc"));
        // Decoded once: sr and sig stay percent-encoded, as signed.
        assert_eq!(r.token.as_deref(), Some(token));
        assert_eq!((r.suffix.as_str(), r.app_query.as_str()), ("", ""));
    }

    #[test]
    fn a_connect_keeps_the_suffix_and_the_application_query_and_takes_the_header_token() {
        let r = parse(
            "/$hc/payroll/a/b",
            Some("x=1&sb-hc-action=connect&y=%20&sb-other=z"),
            &headers(&[(TOKEN_HEADER, "SharedAccessSignature sr=x")]),
        )
        .unwrap();
        assert_eq!(r.action, Action::Connect);
        assert_eq!(r.suffix, "/a/b");
        assert_eq!(r.app_query, "x=1&y=%20");
        assert_eq!(r.token.as_deref(), Some("SharedAccessSignature sr=x"));
        let address = AcceptAddress {
            host: "relay.test:9443",
            request: &r,
            id: "id 1",
            ticket: "00ff",
        };
        assert_eq!(
            address.to_string(),
            "wss://relay.test:9443/$hc/payroll/a/b?x=1&y=%20&sb-hc-action=accept&sb-hc-id=id%201&sb-hc-ticket=00ff"
        );
    }

    #[test]
    fn accept_and_reject_carry_the_ticket_and_a_safe_reason() {
        let accept = parse(
            "/$hc/payroll",
            Some("sb-hc-action=accept&sb-hc-id=1&sb-hc-ticket=t1"),
            &HeaderMap::new(),
        )
        .unwrap();
        assert_eq!(
            accept.action,
            Action::Accept {
                ticket: "t1".into()
            }
        );
        let reject = parse(
            "/$hc/payroll",
            Some("sb-hc-action=accept&sb-hc-ticket=t1&sb-hc-statusCode=418&sb-hc-statusDescription=Not%20today%0D%0AX-Evil%3A%201"),
            &HeaderMap::new(),
        )
        .unwrap();
        assert_eq!(
            reject.action,
            Action::Reject {
                ticket: "t1".into(),
                status: 418,
                description: "Not todayX-Evil: 1".into()
            }
        );
        for bad in ["99", "600", "x", "101"] {
            let q = format!("sb-hc-action=accept&sb-hc-ticket=t&sb-hc-statusCode={bad}");
            assert_eq!(
                parse("/$hc/payroll", Some(&q), &HeaderMap::new()),
                Err(RequestError::BadStatus)
            );
        }
        assert_eq!(
            parse(
                "/$hc/payroll",
                Some("sb-hc-action=accept"),
                &HeaderMap::new()
            ),
            Err(RequestError::NoTicket)
        );
    }

    #[test]
    fn what_is_not_a_hybrid_connection_request_is_refused_with_its_status() {
        let none = HeaderMap::new();
        let cases = [
            ("/payroll", Some("sb-hc-action=listen"), 404),
            ("/$hc/", Some("sb-hc-action=listen"), 404),
            ("/$hc/Bad_Name", Some("sb-hc-action=listen"), 404),
            ("/$hc/payroll", None, 400),
            ("/$hc/payroll", Some("sb-hc-action=request"), 400),
            (
                "/$hc/payroll",
                Some("sb-hc-action=listen&sb-hc-action=connect"),
                400,
            ),
            (
                "/$hc/payroll",
                Some("sb-hc-action=listen&sb-hc-token=%FF"),
                400,
            ),
        ];
        for (path, query, status) in cases {
            let e = parse(path, query, &none).unwrap_err();
            assert_eq!(e.status(), status, "{path} {query:?}: {e}");
        }
    }

    #[test]
    fn connect_headers_drop_the_token_and_keep_the_key_in_its_usual_case() {
        let h = headers(&[
            ("host", "relay.test:9443"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
            ("servicebusauthorization", "SharedAccessSignature secret"),
            ("x-app", "a"),
            ("x-app", "b"),
        ]);
        let map = connect_headers(&h);
        assert_eq!(map["Sec-WebSocket-Key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(map["Sec-WebSocket-Version"], "13");
        assert_eq!(map["Host"], "relay.test:9443");
        assert_eq!(map["X-App"], "a, b");
        assert!(
            !map.keys().any(|k| k.eq_ignore_ascii_case(TOKEN_HEADER)),
            "{map:?}"
        );
    }

    #[test]
    fn a_plain_http_request_names_its_hybrid_connection_first_and_strips_the_protocol_query() {
        let r = parse_http(
            "/Payroll/a/b",
            Some("x=1&sb-hc-token=q%20t&sb-hc-id=7&y=2"),
            &headers(&[(TOKEN_HEADER, "header"), ("authorization", "Bearer app")]),
        )
        .unwrap();
        assert_eq!(r.hc.as_str(), "payroll");
        assert_eq!(r.action, Action::Http);
        assert_eq!(
            (r.suffix.as_str(), r.app_query.as_str()),
            ("/a/b", "x=1&y=2")
        );
        assert_eq!(r.token.as_deref(), Some("q t"));
        assert_eq!(r.id.as_deref(), Some("7"));
        assert!(!r.authorization_was_token);
        let r = parse_http(
            "/payroll",
            None,
            &headers(&[(TOKEN_HEADER, "header"), ("authorization", "Bearer app")]),
        )
        .unwrap();
        assert_eq!(r.token.as_deref(), Some("header"));
        assert!(!r.authorization_was_token);
        let r = parse_http("/payroll/", None, &headers(&[("authorization", "sas")])).unwrap();
        assert_eq!(
            (r.token.as_deref(), r.authorization_was_token),
            (Some("sas"), true)
        );
        assert_eq!(r.suffix, "/");
        for (path, status) in [("/", 404), ("//payroll", 404), ("/Bad_Name/x", 404)] {
            assert_eq!(
                parse_http(path, None, &HeaderMap::new())
                    .unwrap_err()
                    .status(),
                status,
                "{path}"
            );
        }
        let hc: HcName = "payroll".parse().unwrap();
        let address = RequestAddress {
            host: "relay.test:9443",
            hc: &hc,
            id: "i d",
            ticket: "00ff",
        };
        assert_eq!(
            address.to_string(),
            "wss://relay.test:9443/$hc/payroll?sb-hc-action=request&sb-hc-id=i%20d&sb-hc-ticket=00ff"
        );
        assert_eq!(
            parse(
                "/$hc/payroll",
                Some("sb-hc-action=request&sb-hc-ticket=00ff"),
                &HeaderMap::new()
            )
            .unwrap()
            .action,
            Action::Request {
                ticket: "00ff".into()
            }
        );
    }

    #[test]
    fn only_plain_hosts_go_into_addresses() {
        for good in ["relay.test", "127.0.0.1:9443", "[::1]:443", "localhost"] {
            assert!(is_plain_host(good), "{good}");
        }
        for bad in ["", "a/b", "a?b", "a b", "evil.test#", "a@b"] {
            assert!(!is_plain_host(bad), "{bad}");
        }
    }
}
