//! Entry points for fuzzing the Azure protocol's decoders of untrusted
//! input (`fuzz/fuzz_targets/azure_messages.rs`) and the seeds of its
//! corpus, replayed on stable Rust by `relay/tests/fuzz_corpus.rs`.
//!
//! The first byte of an input picks what the rest is:
//!
//! | first byte (mod 3) | the rest |
//! | --- | --- |
//! | 0 | a listener's text message: classified, and a `response`'s headers translated |
//! | 1 | a WebSocket-mode request: `target` line, then `Name: value` header lines |
//! | 2 | a plain HTTP request, the same way, and its headers made `requestHeaders` |

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};

use super::{http, request};

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

/// The seed corpus: a name and the bytes of each input.
pub fn seed_inputs() -> Vec<(&'static str, Vec<u8>)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_and_every_prefix_of_it_runs() {
        for (name, seed) in seed_inputs() {
            for end in 0..=seed.len() {
                run_messages(&seed[..end]);
            }
            assert!(!seed.is_empty(), "{name}");
        }
    }
}
