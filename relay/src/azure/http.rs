//! The HTTP request/response mode of the Azure protocol, without I/O: a
//! sender's plain HTTPS request to `/{hc}[/suffix][?query]` (no `$hc`)
//! becomes a `request` message for a listener, and the listener's
//! `response` message becomes the HTTP response.
//!
//! | message | direction | members |
//! | --- | --- | --- |
//! | `request` (whole) | relay → listener | `address`, `id`, `requestTarget`, `method`, `remoteEndpoint`, `requestHeaders`, `body`; a binary message with the body follows when `body` is true |
//! | `request` (address only) | relay → listener, control channel | `address`, `id`: the listener opens a WebSocket to `address`, where the whole `request` follows |
//! | `response` | listener → relay | `requestId`, `statusCode` (number or string), `statusDescription`, `responseHeaders`, `body`; a binary message (fragments allowed) follows when `body` is true |
//!
//! A whole request goes on the control channel when its body fits in
//! [`MAX_CONTROL_BODY`] and its headers in [`MAX_CONTROL_HEADERS`];
//! otherwise the control channel gets only the address, and the request
//! travels over the rendezvous WebSocket. A listener answers on the channel
//! the request came on, or opens the request's address to answer a big
//! response there.
//!
//! Headers that concern one connection only (RFC 7230 §6.1: `Connection`,
//! `Keep-Alive`, `Proxy-Authenticate`, `Proxy-Authorization`, `TE`,
//! `Trailer`, `Transfer-Encoding`, `Upgrade` and those `Connection` names)
//! are dropped both ways, as are `Host` and `Content-Length` (each leg has
//! its own framing) and the token's header. `Via` is added both ways.

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::request::TOKEN_HEADER;

/// Largest request or response body sent inline on a control channel; a
/// bigger one goes over a rendezvous (the protocol's limit, 64 KB).
pub const MAX_CONTROL_BODY: usize = 64 << 10;
/// Largest `request` message, headers included, sent on a control channel
/// (the protocol's header limit, 32 KB); a bigger one goes over a
/// rendezvous.
pub const MAX_CONTROL_HEADERS: usize = 32 << 10;
/// Largest `response` message (its JSON, not its body) the relay reads.
pub const MAX_RESPONSE_HEAD: usize = 64 << 10;

/// The header that carries a token when neither the query nor
/// [`TOKEN_HEADER`] does (HTTP mode only).
pub const AUTHORIZATION: &str = "authorization";

/// Headers that belong to one connection (RFC 7230 §6.1), never passed on.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers each leg frames or addresses itself, never passed on either:
/// the body length (the relay frames the body anew), the host, and
/// `Expect` (the relay's HTTP server answers `100-continue` itself).
const FRAMING: &[&str] = &["content-length", "host", "expect"];

/// Whether header `name` (lower case) is passed on by the relay, given the
/// names the message's `Connection` header lists.
fn passes(name: &str, connection_names: &[String]) -> bool {
    !HOP_BY_HOP.contains(&name)
        && !FRAMING.contains(&name)
        && !connection_names.iter().any(|n| n == name)
}

/// The names a `Connection` header lists (lower case), which are hop-by-hop
/// too.
fn connection_names(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The sender's headers as a `request`'s `requestHeaders`: names in their
/// usual case, repeated headers joined with `, `, without hop-by-hop and
/// framing headers and without the token's header (`Authorization` too
/// when it carried the token), and with `via` appended to `Via`.
pub fn request_headers(
    headers: &HeaderMap,
    authorization_was_token: bool,
    via: &str,
) -> Map<String, Value> {
    let hop = connection_names(headers);
    let mut out = Map::new();
    for name in headers.keys() {
        let lower = name.as_str();
        if !passes(lower, &hop)
            || lower.eq_ignore_ascii_case(TOKEN_HEADER)
            || (authorization_was_token && lower == AUTHORIZATION)
        {
            continue;
        }
        let mut values: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if lower == "via" {
            values.push(via);
        }
        if values.is_empty() {
            continue;
        }
        out.insert(
            super::request::canonical_name(lower),
            Value::String(values.join(", ")),
        );
    }
    if !headers.contains_key(hyper::header::VIA) {
        out.insert("Via".into(), Value::String(via.into()));
    }
    out
}

/// The `Via` value the relay adds: protocol version and the name the
/// sender addressed it by.
pub fn via(host: &str) -> String {
    format!("1.1 {host}")
}

/// A listener's `response` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResponseHead {
    /// The `id` of the request answered.
    pub request_id: String,
    /// The status: a number (the Node and .NET clients) or a string (the
    /// protocol description's example).
    #[serde(deserialize_with = "number_or_string")]
    pub status_code: u16,
    /// The reason phrase.
    #[serde(default)]
    pub status_description: Option<String>,
    /// The response headers: strings, numbers or arrays of them.
    #[serde(default)]
    pub response_headers: Map<String, Value>,
    /// Whether a binary message with the body follows.
    #[serde(default)]
    pub body: bool,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| D::Error::custom(format!("statusCode {n} is not a status"))),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| D::Error::custom(format!("statusCode {s:?} is not a number"))),
        other => Err(D::Error::custom(format!(
            "statusCode must be a number, not {other}"
        ))),
    }
}

/// What a listener's message on a control channel or rendezvous is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerText {
    /// A `response` for request `id`: its head, or why it is unusable.
    Response {
        /// The request it answers.
        id: String,
        /// The head, or what is wrong with it.
        head: Result<ResponseHead, String>,
        /// Whether it says a body follows (also when the head is wrong,
        /// so that the body is skipped).
        body: bool,
    },
    /// A `renewToken` with this token.
    RenewToken(String),
    /// Something else: not JSON, or a message the relay does not know.
    Other,
}

/// Classifies a listener's text message. A `response` whose `requestId`
/// can be read but whose other members are wrong is still a response, so
/// that its request fails at once with the reason instead of timing out.
pub fn classify(text: &[u8]) -> ListenerText {
    let Ok(Value::Object(mut message)) = serde_json::from_slice::<Value>(text) else {
        return ListenerText::Other;
    };
    if let Some(response) = message.remove("response") {
        let Some(id) = response.get("requestId").and_then(Value::as_str) else {
            return ListenerText::Other;
        };
        let id = id.to_string();
        let body = response.get("body") == Some(&Value::Bool(true));
        let head = serde_json::from_value::<ResponseHead>(response)
            .map_err(|e| format!("the listener's response is not valid: {e}"))
            .and_then(|head| check_status(head.status_code).map(|()| head));
        return ListenerText::Response { id, head, body };
    }
    if let Some(token) = message
        .get("renewToken")
        .and_then(|r| r.get("token"))
        .and_then(Value::as_str)
    {
        return ListenerText::RenewToken(token.to_string());
    }
    ListenerText::Other
}

/// A listener may answer with a final status, 200 to 599 (no 1xx: the
/// relay does not relay interim responses).
fn check_status(status: u16) -> Result<(), String> {
    if (200..=599).contains(&status) {
        Ok(())
    } else {
        Err(format!(
            "the listener's statusCode {status} is not a final HTTP status (200 to 599)"
        ))
    }
}

/// The listener's `responseHeaders` as HTTP headers: hop-by-hop and
/// framing headers dropped, arrays as repeated headers, numbers as text,
/// and `via` appended. A header with a name or value that HTTP cannot
/// carry is an error, so that the sender never gets a half-translated
/// response.
pub fn response_headers(head: &ResponseHead, via: &str) -> Result<HeaderMap, String> {
    let mut out = HeaderMap::new();
    let mut connection = Vec::new();
    for (name, value) in &head.response_headers {
        if name.eq_ignore_ascii_case("connection") {
            for v in values(value) {
                connection.extend(v.split(',').map(|n| n.trim().to_ascii_lowercase()));
            }
        }
    }
    for (name, value) in &head.response_headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("the listener's response header name {name:?} is not valid"))?;
        if !passes(header.as_str(), &connection) {
            continue;
        }
        for v in values(value) {
            let v = HeaderValue::from_str(&v).map_err(|_| {
                format!("the listener's response header {name} has a value HTTP cannot carry")
            })?;
            out.append(header.clone(), v);
        }
    }
    let via = HeaderValue::from_str(via).map_err(|_| "the relay's Via is not valid".to_string())?;
    out.append(hyper::header::VIA, via);
    Ok(out)
}

/// A header value from JSON: a string, a number, or an array of those.
fn values(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Number(n) => vec![n.to_string()],
        Value::Bool(b) => vec![b.to_string()],
        Value::Array(items) => items.iter().flat_map(values).collect(),
        Value::Null | Value::Object(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn request_headers_drop_hop_by_hop_framing_and_token_and_add_via() {
        let h = headers(&[
            ("host", "relay.test:9443"),
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "h2c"),
            ("servicebusauthorization", "SharedAccessSignature s"),
            ("authorization", "Bearer app"),
            ("x-app", "a"),
            ("x-app", "b"),
            ("content-type", "text/plain"),
        ]);
        let map = request_headers(&h, false, "1.1 relay.test:9443");
        let names: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["Authorization", "Content-Type", "Via", "X-App"],
            "{map:?}"
        );
        assert_eq!(map["X-App"], "a, b");
        assert_eq!(map["Via"], "1.1 relay.test:9443");
        assert_eq!(map["Authorization"], "Bearer app");
        // When Authorization carried the token, it is the token's.
        let map = request_headers(&h, true, "1.1 r");
        assert!(!map.contains_key("Authorization"), "{map:?}");
        // A Via already there is extended.
        let map = request_headers(&headers(&[("via", "1.0 proxy")]), false, "1.1 r");
        assert_eq!(map["Via"], "1.0 proxy, 1.1 r");
    }

    #[test]
    fn a_response_with_a_number_or_a_string_status_and_any_header_values() {
        let text =
            br#"{"response":{"requestId":"r1","statusCode":201,"statusDescription":"Created",
            "responseHeaders":{"content-type":"text/plain","content-length":5,"x-list":["a","b"],
            "Connection":"close, X-Hop","x-hop":"1","transfer-encoding":"chunked"},"body":true}}"#;
        let ListenerText::Response { id, head, .. } = classify(text) else {
            panic!("not a response");
        };
        assert_eq!(id, "r1");
        let head = head.unwrap();
        assert_eq!((head.status_code, head.body), (201, true));
        let h = response_headers(&head, "1.1 relay").unwrap();
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h.get_all("x-list").iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(h["via"], "1.1 relay");
        for dropped in ["content-length", "connection", "x-hop", "transfer-encoding"] {
            assert!(!h.contains_key(dropped), "{dropped} passed: {h:?}");
        }
        let text = br#"{"response":{"requestId":"r2","statusCode":"404"}}"#;
        let ListenerText::Response { head, .. } = classify(text) else {
            panic!("not a response");
        };
        assert_eq!(head.unwrap().status_code, 404);
    }

    #[test]
    fn a_bad_response_fails_its_request_and_garbage_is_nothing() {
        for bad in [
            &br#"{"response":{"requestId":"r","statusCode":"abc"}}"#[..],
            br#"{"response":{"requestId":"r","statusCode":101}}"#,
            br#"{"response":{"requestId":"r","statusCode":70000}}"#,
            br#"{"response":{"requestId":"r","statusCode":200,"responseHeaders":[1]}}"#,
        ] {
            let ListenerText::Response { id, head, .. } = classify(bad) else {
                panic!("not a response: {}", String::from_utf8_lossy(bad));
            };
            assert_eq!(id, "r");
            assert!(head.is_err(), "{}", String::from_utf8_lossy(bad));
        }
        for other in [
            &b"not json"[..],
            b"[]",
            br#"{"response":{"statusCode":200}}"#,
            br#"{"hello":1}"#,
        ] {
            assert_eq!(classify(other), ListenerText::Other);
        }
        assert_eq!(
            classify(br#"{"renewToken":{"token":"t"}}"#),
            ListenerText::RenewToken("t".into())
        );
        let head = ResponseHead {
            request_id: "r".into(),
            status_code: 200,
            status_description: None,
            response_headers: serde_json::from_str(r#"{"x-bad":"a\nb"}"#).unwrap(),
            body: false,
        };
        assert!(response_headers(&head, "1.1 r").is_err());
    }
}
