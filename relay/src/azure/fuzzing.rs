//! Entry points for the fuzz targets of the Azure protocol
//! (`fuzz/fuzz_targets/azure_*.rs`) and for replaying their corpora in
//! tests. Not for production use.
//!
//! | function | what it feeds |
//! | --- | --- |
//! | [`run_request`] | a request target and header lines through [`request::parse`], then the `accept` address made from it back through the parser |
//! | [`run_control`] | arbitrary bytes as a listener's side of its control channel through [`listener::serve`]: WebSocket frame decoding, `renewToken` messages, Pings, Closes |
//! | [`run_frames`] | arbitrary bytes from a sender and from a listener through [`pump::pump`], both legs at once |
//! | [`run_messages`] | by its first byte (mod 3): a listener's text message (classified, and a `response`'s headers translated), a WebSocket-mode request, or a plain HTTP request and its headers made `requestHeaders` |
//!
//! Each panics when an invariant breaks (a panic is what the fuzzer
//! reports), and returns once the input is spent.

use std::sync::{Arc, OnceLock};

use fastwebsockets::{Role, WebSocket};
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::request::{self, AcceptAddress, Action};
use super::{http, listener, pump};
use crate::hub::Hub;
use crate::metrics::RelayMetrics;
use crate::registry::Registry;

/// Room in each in-memory connection: more than any input, so writing a
/// whole input never waits for a reader.
const PIPE_ROOM: usize = 1 << 20;

/// Parses `data` as a request: the first line is the request target
/// (`/$hc/name?query`), each further line a header `Name: value`. When it
/// parses, checks what the relay relies on: tokens are never in what is
/// passed on, the tracking id and a rejection's description are fit for a
/// URL and a status line, and the `accept` address made from the request
/// parses back to a rendezvous for the same hybrid connection and ticket.
pub fn run_request(data: &[u8]) {
    let (target, headers) = request_parts(data);
    let Ok(uri) = hyper::Uri::try_from(target.trim_end()) else {
        return;
    };
    let Ok(parsed) = request::parse(uri.path(), uri.query(), &headers) else {
        return;
    };
    assert!(
        parsed
            .app_query
            .split('&')
            .all(|pair| !pair.starts_with("sb-")),
        "a protocol parameter is passed on: {:?}",
        parsed.app_query
    );
    let forwarded = request::connect_headers(&headers);
    assert!(
        !forwarded
            .keys()
            .any(|k| k.eq_ignore_ascii_case(request::TOKEN_HEADER)),
        "the token header is passed on"
    );
    if let Some(id) = &parsed.id {
        assert!(id.len() <= request::MAX_TRACKING_ID && id.bytes().all(|b| b.is_ascii_graphic()));
    }
    if let Action::Reject { description, .. } = &parsed.action {
        assert!(!description.is_empty() && description.len() <= request::MAX_STATUS_DESCRIPTION);
        assert!(
            description
                .bytes()
                .all(|b| b == b' ' || b.is_ascii_graphic())
        );
    }

    let ticket = "00112233445566778899aabbccddeeff";
    let address = AcceptAddress {
        host: "relay.example:9443",
        request: &parsed,
        id: parsed.id.as_deref().unwrap_or("id"),
        ticket,
    }
    .to_string();
    let target = address
        .strip_prefix("wss://relay.example:9443")
        .expect("the address starts with the listener's host");
    let uri = hyper::Uri::try_from(target)
        .unwrap_or_else(|e| panic!("accept address {address:?} is not a URI: {e}"));
    let again = request::parse(uri.path(), uri.query(), &HeaderMap::new())
        .unwrap_or_else(|e| panic!("accept address {address:?} does not parse: {e}"));
    assert_eq!(again.hc, parsed.hc, "{address}");
    assert_eq!(
        again.action,
        Action::Accept {
            ticket: ticket.into()
        },
        "{address}"
    );
    assert_eq!(again.token, None, "a token in the accept address {address}");
}

/// A hub over an empty registry in a directory of this process's, made
/// once.
fn hub() -> Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hybridlink-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the fuzzing registry");
        let registry = Registry::open(&dir).expect("a registry for fuzzing");
        Hub::new(registry, Arc::new(RelayMetrics::new()))
    })
    .clone()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Reads `io` to its end (or its first error); the bytes read.
async fn drain<S: AsyncRead + Unpin>(mut io: S) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = io.read_to_end(&mut out).await;
    out
}

/// Writes `bytes` to `io`, then ends its writing side.
async fn feed(io: &mut DuplexStream, bytes: &[u8]) {
    let _ = io.write_all(bytes).await;
    let _ = io.shutdown().await;
}

/// Feeds `data` as what a listener sends on its control channel (already
/// upgraded), then its end; the channel must end on its own.
pub fn run_control(data: &[u8]) {
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(PIPE_ROOM);
        let ws = WebSocket::after_handshake(server, Role::Server);
        let (accepts, rx) = tokio::sync::mpsc::channel(1);
        let hc: proto::name::HcName = "fuzz".parse().expect("a valid name");
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        // Responses are answered as if no request waited for them.
        let serve = listener::serve(ws, rx, hub(), hc, "not a token".into(), expires, |_, _| {
            false
        });
        feed(&mut client, data).await;
        let ((), _) = tokio::join!(serve, drain(client));
        drop(accepts);
    });
}

/// Splits `data` at the position its first two bytes give (big-endian,
/// modulo the rest's length): what a sender sends, and what its listener
/// sends. Both go through the relay's pump at once, then both ends close;
/// the pump must end on its own.
pub fn run_frames(data: &[u8]) {
    let (head, rest) = data.split_at(data.len().min(2));
    let at = match head {
        [a, b] if !rest.is_empty() => usize::from(u16::from_be_bytes([*a, *b])) % (rest.len() + 1),
        _ => 0,
    };
    let (from_sender, from_listener) = rest.split_at(at);
    runtime().block_on(async {
        let (mut sender, sender_leg) = tokio::io::duplex(PIPE_ROOM);
        let (mut listener, listener_leg) = tokio::io::duplex(PIPE_ROOM);
        let relayed = pump::pump(
            WebSocket::after_handshake(sender_leg, Role::Server),
            WebSocket::after_handshake(listener_leg, Role::Server),
        );
        feed(&mut sender, from_sender).await;
        feed(&mut listener, from_listener).await;
        let (relayed, _, _) = tokio::join!(relayed, drain(sender), drain(listener));
        let input = (from_sender.len() + from_listener.len()) as u64;
        assert!(
            relayed.to_listener + relayed.to_sender <= input,
            "relayed more payload than came in"
        );
    });
}

/// Runs one fuzz input through the decoder its first byte picks. Never
/// panics on any input (that is what is fuzzed).
pub fn run_messages(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            if let http::ListenerText::Response { head: Ok(head), .. } = http::classify(rest) {
                let _ = http::response_headers(&head, "1.1 relay.test");
            }
        }
        1 => {
            let (target, headers) = request_parts(rest);
            let (path, query) = split_target(&target);
            let _ = request::parse(path, query, &headers);
            let _ = request::connect_headers(&headers);
        }
        _ => {
            let (target, headers) = request_parts(rest);
            let (path, query) = split_target(&target);
            if let Ok(r) = request::parse_http(path, query, &headers) {
                let _ = http::request_headers(&headers, r.authorization_was_token, "1.1 r");
            }
        }
    }
}

/// The first line as the request target, the others as headers; lines
/// that are not valid headers are skipped, as hyper would refuse them.
fn request_parts(bytes: &[u8]) -> (String, HeaderMap) {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split('\n');
    let target = lines.next().unwrap_or_default().to_string();
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value.trim()),
        ) {
            headers.append(name, value);
        }
    }
    (target, headers)
}

fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// The seeds of `azure_messages`: a name and the bytes of each input.
fn message_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |kind: u8, text: &str| {
        let mut bytes = vec![kind];
        bytes.extend_from_slice(text.as_bytes());
        bytes
    };
    vec![
        (
            "response",
            with(
                0,
                r#"{"response":{"requestId":"r","statusCode":200,"statusDescription":"OK","responseHeaders":{"content-type":"text/plain","x-n":5,"x-a":["a","b"],"Connection":"x-hop","x-hop":"1"},"body":true}}"#,
            ),
        ),
        (
            "response_string_status",
            with(0, r#"{"response":{"requestId":"r","statusCode":"404"}}"#),
        ),
        (
            "response_bad",
            with(
                0,
                r#"{"response":{"requestId":"r","statusCode":1e99,"responseHeaders":{"x":"a\nb"}}}"#,
            ),
        ),
        (
            "renew",
            with(
                0,
                r#"{"renewToken":{"token":"SharedAccessSignature sr=x"}}"#,
            ),
        ),
        ("garbage", with(0, "\u{0}{not json")),
        (
            "listen",
            with(
                1,
                "/$hc/payroll?sb-hc-action=listen&sb-hc-id=1&sb-hc-token=SharedAccessSignature%20sr%3Dx\nHost: relay.test:9443",
            ),
        ),
        (
            "reject",
            with(
                1,
                "/$hc/payroll/a?x=1&sb-hc-action=accept&sb-hc-ticket=t&sb-hc-statusCode=418&sb-hc-statusDescription=%0D%0Ano\nSec-WebSocket-Key: k",
            ),
        ),
        (
            "request_rendezvous",
            with(
                1,
                "/$hc/payroll?sb-hc-action=request&sb-hc-id=i&sb-hc-ticket=t",
            ),
        ),
        (
            "http",
            with(
                2,
                "/Payroll/a/b?x=1&sb-hc-token=t&sb-hc-id=7\nHost: relay.test\nConnection: keep-alive, X-Hop\nX-Hop: 1\nVia: 1.0 p\nAuthorization: Bearer a\nServiceBusAuthorization: s",
            ),
        ),
        (
            "http_authorization_token",
            with(
                2,
                "/payroll\nAuthorization: SharedAccessSignature sr=x\nTE: trailers",
            ),
        ),
        ("http_no_name", with(2, "//%FF/x?sb-hc-token=%ZZ")),
    ]
}

/// Inputs that reach the interesting paths, for a fresh corpus and for
/// tests: (name, target, bytes).
pub fn seed_inputs() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        // A client's frame: FIN, masked with a zero key.
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(payload);
        out
    }
    let renew = frame(
        1,
        br#"{"renewToken":{"token":"SharedAccessSignature sr=x&sig=y&se=1&skn=listen"}}"#,
    );
    let ping = frame(9, b"are you there");
    let close = frame(8, &[0x03, 0xe8, b'b', b'y', b'e']);
    let binary = frame(2, &[7; 300]);
    let mut split = vec![0, 20];
    split.extend(frame(1, b"hello listener!"));
    split.extend(frame(2, b"and back"));
    split.extend(close.clone());
    let mut half = vec![0, 7];
    half.extend(close.clone());
    half.extend(binary.clone());
    vec![
        (
            "listen",
            "request",
            b"/$hc/payroll?sb-hc-action=listen&sb-hc-id=abc\nServiceBusAuthorization: SharedAccessSignature sr=a&sig=b&se=1&skn=listen\n".to_vec(),
        ),
        (
            "connect_with_app_query",
            "request",
            b"/$hc/payroll/some/path?a=1&sb-hc-action=connect&b=%20x&sb-hc-token=t%3D1\nSec-WebSocket-Key: x\nX-App: y\n".to_vec(),
        ),
        (
            "reject",
            "request",
            b"/$hc/payroll?sb-hc-action=accept&sb-hc-id=i&sb-hc-ticket=t&sb-hc-statusCode=409&sb-hc-statusDescription=Busy%20now\n".to_vec(),
        ),
        ("renew_then_close", "control", [renew.clone(), ping.clone(), close.clone()].concat()),
        ("garbage_text", "control", frame(1, b"{not json")),
        ("fragmented", "control", [vec![0x01, 0x82, 0, 0, 0, 0, b'{', b'"'], frame(0, b"}")].concat()),
        ("both_ways", "frames", split),
        ("half_close", "frames", half),
        ("ping_pong", "frames", [vec![0, 0], ping, binary].concat()),
    ]
    .into_iter()
    .chain(
        message_seeds()
            .into_iter()
            .map(|(name, bytes)| (name, "messages", bytes)),
    )
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_run() {
        for (name, target, bytes) in seed_inputs() {
            match target {
                "request" => {
                    // Each request seed reaches the round trip.
                    let text = String::from_utf8_lossy(&bytes);
                    let target = text.lines().next().unwrap_or_default();
                    let uri = hyper::Uri::try_from(target).unwrap();
                    let parsed = request::parse(uri.path(), uri.query(), &HeaderMap::new());
                    assert!(parsed.is_ok(), "seed {name}: {parsed:?}");
                    run_request(&bytes);
                }
                "control" => run_control(&bytes),
                "frames" => run_frames(&bytes),
                "messages" => {
                    for end in 0..=bytes.len() {
                        run_messages(&bytes[..end]);
                    }
                }
                other => panic!("seed {name}: unknown target {other}"),
            }
        }
    }
}
