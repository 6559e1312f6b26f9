//! The management API over real HTTP: the router is served on 127.0.0.1:0
//! and driven with hand-written HTTP/1.1 requests.

use std::net::SocketAddr;

use proto::connection_string::ConnectionString;
use proto::key::{KeySlot, Right};
use proto::name::HcName;
use proto::sas;
use relay::api::{ApiState, router};
use relay::registry::Registry;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Api {
    addr: SocketAddr,
    key: String,
    registry: Registry,
    _dir: tempfile::TempDir,
}

async fn start() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(dir.path()).unwrap();
    let state = ApiState {
        hub: relay::hub::Hub::new(registry.clone(), Default::default()),
        registry: registry.clone(),
        public_host: "relay.example".into(),
        public_port: 9443,
        cert_sha256: [0xab; 32],
        azure: None,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    Api {
        addr,
        key: registry.manage_key().as_str().to_owned(),
        registry,
        _dir: dir,
    }
}

/// One request on a fresh connection; returns the status and the body
/// (parsed as JSON).
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let (status, _, body) = exchange(addr, method, path, auth, body).await;
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
    };
    (status, json)
}

/// One request on a fresh connection; returns the status, the header lines
/// (`name: value`, name in lower case) and the body as text.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&str>,
) -> (u16, Vec<String>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(auth) = auth {
        request.push_str(&format!("Authorization: {auth}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<String> = head
        .lines()
        .skip(1)
        .map(|line| match line.split_once(':') {
            Some((name, value)) => format!("{}: {}", name.to_ascii_lowercase(), value.trim()),
            None => line.to_owned(),
        })
        .collect();
    let body = if headers.iter().any(|h| h == "transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, headers, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let auth = format!("Bearer {}", self.key);
        let body = body.map(|b| b.to_string());
        raw(self.addr, method, path, Some(&auth), body.as_deref()).await
    }
}

fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"))
}

fn cs(body: &Value, rule: &str, slot: &str) -> ConnectionString {
    body["connection_strings"][rule][slot]
        .as_str()
        .unwrap_or_else(|| panic!("no {rule}/{slot} in {body}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn requests_without_the_manage_key_are_refused() {
    let api = start().await;
    let cases = [
        (None, "missing Authorization header"),
        (Some("Bearer nope".to_owned()), "wrong manage key"),
        (
            Some(format!("Basic {}", api.key)),
            "not `Bearer <manage key>`",
        ),
    ];
    for (auth, reason) in cases {
        for (method, path) in [
            ("GET", "/api/v1/hcs"),
            ("POST", "/api/v1/hcs"),
            ("GET", "/elsewhere"),
        ] {
            let (status, body) = raw(api.addr, method, path, auth.as_deref(), None).await;
            assert_eq!(status, 401, "{method} {path} {auth:?}");
            assert!(error_of(&body).contains(reason), "{body}");
        }
    }
    let (status, _) = raw(
        api.addr,
        "GET",
        "/api/v1/hcs",
        Some(&format!("bearer {}", api.key)),
        None,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn create_list_show_keys_delete() {
    let api = start().await;
    let (status, body) = api.call("GET", "/api/v1/hcs", None).await;
    assert_eq!((status, body), (200, json!([])));

    let (status, created) = api
        .call(
            "POST",
            "/api/v1/hcs",
            Some(json!({"name": "Payroll", "host": "SQL.corp", "port": 1433})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["name"], "payroll");
    assert_eq!(created["host"], "sql.corp");
    assert_eq!(created["port"], 1433);
    assert_eq!(created["endpoint"], "sql.corp:1433");
    assert!(created["created_unix"].as_u64().unwrap() > 1_700_000_000);
    let hc = api.registry.get(&"payroll".parse().unwrap()).unwrap();
    for (rule, right) in [("send", Right::Send), ("listen", Right::Listen)] {
        for slot in [KeySlot::Primary, KeySlot::Secondary] {
            let cs = cs(&created, rule, slot.as_str());
            assert_eq!(cs.relay_host, "relay.example");
            assert_eq!(cs.relay_port, 9443);
            assert_eq!(cs.key_name, rule);
            assert_eq!(cs.hc.as_str(), "payroll");
            assert_eq!(cs.cert_sha256, Some([0xab; 32]));
            assert_eq!(&cs.key, hc.keys(right).unwrap().get(slot));
            // The string is good for what it is meant for.
            let token = cs.token(4_000_000_000);
            let ok = sas::verify(&token, &hc.name, right, &hc.rules(), 1_900_000_000).unwrap();
            assert_eq!(ok.slot, slot);
        }
    }

    api.call(
        "POST",
        "/api/v1/hcs",
        Some(json!({"name": "billing", "host": "198.18.0.9", "port": 5432})),
    )
    .await;
    let (status, list) = api.call("GET", "/api/v1/hcs", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["billing", "payroll"]);
    assert!(list[0].get("connection_strings").is_none());
    assert_eq!(list[0]["host"], "198.18.0.9");
    assert_eq!(list[0]["port"], 5432);

    let (status, shown) = api.call("GET", "/api/v1/hcs/payroll", None).await;
    assert_eq!(status, 200);
    assert_eq!(shown["endpoint"], "sql.corp:1433");
    assert_eq!(shown["created_unix"], created["created_unix"]);

    let (status, keys) = api.call("GET", "/api/v1/hcs/payroll/keys", None).await;
    assert_eq!(status, 200);
    assert_eq!(keys["name"], "payroll");
    assert_eq!(keys["connection_strings"], created["connection_strings"]);

    let (status, deleted) = api.call("DELETE", "/api/v1/hcs/payroll", None).await;
    assert_eq!(status, 200);
    assert_eq!(deleted["name"], "payroll");
    assert!(api.registry.get(&"payroll".parse().unwrap()).is_none());
    let (status, body) = api.call("GET", "/api/v1/hcs/payroll", None).await;
    assert_eq!(status, 404);
    assert_eq!(
        error_of(&body),
        "hybrid connection payroll does not exist; see `hybridlink hc list`"
    );
}

#[tokio::test]
async fn create_rejects_bad_input_with_reasons() {
    let api = start().await;
    let auth = format!("Bearer {}", api.key);
    let cases: [(&str, &str); 10] = [
        ("{\"name\":", "request body is not valid JSON"),
        ("", "request body is not valid JSON"),
        ("[1,2]", "request body is not valid JSON"),
        ("{\"name\":\"a\",\"host\":\"h\"}", "missing field `port`"),
        (
            "{\"name\":\"a\",\"host\":\"h\",\"port\":1,\"x\":1}",
            "unknown field `x`",
        ),
        (
            "{\"name\":\"bad_name\",\"host\":\"h\",\"port\":1}",
            "contains '_'",
        ),
        (
            "{\"name\":\"a\",\"host\":\"bad host\",\"port\":1}",
            "not a valid DNS name",
        ),
        ("{\"name\":\"a\",\"host\":\"::1\",\"port\":1}", "IPv6"),
        (
            "{\"name\":\"a\",\"host\":\"h\",\"port\":0}",
            "port 0 is not a number from 1 to 65535",
        ),
        (
            "{\"name\":\"a\",\"host\":\"h\",\"port\":70000}",
            "port 70000 is not a number from 1 to 65535",
        ),
    ];
    for (body, reason) in cases {
        let (status, answer) = raw(api.addr, "POST", "/api/v1/hcs", Some(&auth), Some(body)).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(error_of(&answer).contains(reason), "{body}: {answer}");
    }
    assert!(api.registry.list().is_empty());

    let good = json!({"name": "payroll", "host": "sql", "port": 1433});
    assert_eq!(
        api.call("POST", "/api/v1/hcs", Some(good.clone())).await.0,
        201
    );
    let (status, body) = api.call("POST", "/api/v1/hcs", Some(good)).await;
    assert_eq!(status, 409);
    assert_eq!(
        error_of(&body),
        "hybrid connection payroll already exists; pick another name or delete it first"
    );
}

#[tokio::test]
async fn unknown_and_invalid_names() {
    let api = start().await;
    for (method, path) in [
        ("GET", "/api/v1/hcs/ghost"),
        ("DELETE", "/api/v1/hcs/ghost"),
        ("GET", "/api/v1/hcs/ghost/keys"),
    ] {
        let (status, body) = api.call(method, path, None).await;
        assert_eq!(status, 404, "{method} {path}");
        assert!(error_of(&body).contains("ghost does not exist"), "{body}");
    }
    let (status, body) = api
        .call(
            "POST",
            "/api/v1/hcs/ghost/keys/regenerate",
            Some(json!({"rule": "send", "key": "primary"})),
        )
        .await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("ghost does not exist"));
    let (status, body) = api.call("GET", "/api/v1/hcs/-bad-", None).await;
    assert_eq!(status, 400);
    assert!(
        error_of(&body).contains("starts or ends with '-'"),
        "{body}"
    );
    let (status, body) = api.call("GET", "/api/v2/things", None).await;
    assert_eq!(status, 404);
    assert!(error_of(&body).contains("no such API endpoint"));
    let (status, body) = api.call("PUT", "/api/v1/hcs", None).await;
    assert_eq!(status, 405);
    assert!(error_of(&body).contains("method not allowed"));
}

#[tokio::test]
async fn regenerate_replaces_exactly_one_key() {
    let api = start().await;
    let (_, created) = api
        .call(
            "POST",
            "/api/v1/hcs",
            Some(json!({"name": "payroll", "host": "sql", "port": 1433})),
        )
        .await;
    let mut events = api.registry.subscribe();
    let (status, keys) = api
        .call(
            "POST",
            "/api/v1/hcs/payroll/keys/regenerate",
            Some(json!({"rule": "listen", "key": "secondary"})),
        )
        .await;
    assert_eq!(status, 200, "{keys}");
    assert_eq!(keys["name"], "payroll");
    assert_ne!(
        cs(&keys, "listen", "secondary"),
        cs(&created, "listen", "secondary")
    );
    assert_eq!(
        cs(&keys, "listen", "primary"),
        cs(&created, "listen", "primary")
    );
    assert_eq!(
        cs(&keys, "send", "primary"),
        cs(&created, "send", "primary")
    );
    assert_eq!(
        cs(&keys, "send", "secondary"),
        cs(&created, "send", "secondary")
    );
    let (_, fetched) = api.call("GET", "/api/v1/hcs/payroll/keys", None).await;
    assert_eq!(fetched, keys);
    let name: HcName = "payroll".parse().unwrap();
    assert_eq!(
        events.try_recv().unwrap(),
        relay::registry::RegistryEvent::KeysChanged {
            name: name.clone(),
            right: Right::Listen,
            slot: KeySlot::Secondary
        }
    );
    // The old key no longer verifies.
    let hc = api.registry.get(&name).unwrap();
    let old = cs(&created, "listen", "secondary").token(4_000_000_000);
    assert!(matches!(
        sas::verify(&old, &name, Right::Listen, &hc.rules(), 1_900_000_000),
        Err(sas::SasError::BadSignature { .. })
    ));

    let bad: [(Value, &str); 5] = [
        (
            json!({"rule": "manage", "key": "primary"}),
            "unknown rule \"manage\"; use send or listen",
        ),
        (
            json!({"rule": "admin", "key": "primary"}),
            "unknown rule \"admin\"; use send or listen",
        ),
        (
            json!({"rule": "send", "key": "third"}),
            "unknown key \"third\"; use primary or secondary",
        ),
        (json!({"rule": "send"}), "missing field `key`"),
        (json!("send"), "request body is not valid JSON"),
    ];
    for (body, reason) in bad {
        let (status, answer) = api
            .call(
                "POST",
                "/api/v1/hcs/payroll/keys/regenerate",
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(error_of(&answer).contains(reason), "{body}: {answer}");
    }
    assert_eq!(api.registry.get(&name).unwrap(), hc);
}

#[tokio::test]
async fn update_changes_the_endpoint_in_place() {
    let api = start().await;
    let body = json!({"name": "payroll", "host": "sql.corp", "port": 1433});
    let (status, created) = api.call("POST", "/api/v1/hcs", Some(body)).await;
    assert_eq!(status, 201);
    let (status, hc) = api
        .call("PATCH", "/api/v1/hcs/payroll", Some(json!({"port": 1434})))
        .await;
    assert_eq!(status, 200, "{hc}");
    assert_eq!(hc["endpoint"], "sql.corp:1434");
    let (status, hc) = api
        .call(
            "PATCH",
            "/api/v1/hcs/payroll",
            Some(json!({"host": "10.1.2.3"})),
        )
        .await;
    assert_eq!(
        (status, hc["endpoint"].as_str()),
        (200, Some("10.1.2.3:1434"))
    );
    // The keys did not change, and the registry has the new endpoint.
    let (_, keys) = api.call("GET", "/api/v1/hcs/payroll/keys", None).await;
    assert_eq!(keys["connection_strings"], created["connection_strings"]);
    let stored = api.registry.get(&"payroll".parse().unwrap()).unwrap();
    assert_eq!(stored.endpoint.to_string(), "10.1.2.3:1434");

    let cases = [
        (json!({}), "nothing to change"),
        (json!({"port": 0}), "port 0 is not a number from 1 to 65535"),
        (json!({"port": "x"}), "is not a number from 1 to 65535"),
        (json!({"port": "80"}), "is not a number from 1 to 65535"),
        (json!({"port": null}), "null is not a value"),
        (json!({"host": "bad host!"}), "host"),
        (json!({"colour": "red"}), "unknown field `colour`"),
        (json!([1]), "not valid JSON for this endpoint"),
    ];
    for (body, reason) in cases {
        let (status, answer) = api
            .call("PATCH", "/api/v1/hcs/payroll", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(error_of(&answer).contains(reason), "{body}: {answer}");
    }
    let (status, answer) = api
        .call("PATCH", "/api/v1/hcs/nobody", Some(json!({"port": 1})))
        .await;
    assert_eq!(status, 404, "{answer}");
}

#[tokio::test]
async fn status_says_not_connected_without_agents() {
    let api = start().await;
    for name in ["a", "b"] {
        let body = json!({"name": name, "host": "h.corp", "port": 80});
        assert_eq!(api.call("POST", "/api/v1/hcs", Some(body)).await.0, 201);
    }
    let (status, one) = api.call("GET", "/api/v1/hcs/a/status", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        one,
        json!({
            "name": "a", "endpoint": "h.corp:80", "status": "Not connected", "listener_count": 0, "listeners": [],
            "streams": {"open": 0, "opened": 0, "refused": 0, "bytes_to_target": 0, "bytes_from_target": 0},
            "azure_listeners": []
        })
    );
    let (status, all) = api.call("GET", "/api/v1/status", None).await;
    assert_eq!(status, 200);
    assert_eq!(all.as_array().map(Vec::len), Some(2));
    assert_eq!(api.call("GET", "/api/v1/hcs/zz/status", None).await.0, 404);
    assert_eq!(
        api.call("GET", "/api/v1/hcs/Bad_Name/status", None).await.0,
        400
    );
}

#[tokio::test]
async fn creating_beyond_the_quota_is_refused_with_the_limit() {
    let api = start().await;
    api.registry.set_max_hcs(2);
    for name in ["a", "b"] {
        let body = json!({"name": name, "host": "h.corp", "port": 80});
        assert_eq!(api.call("POST", "/api/v1/hcs", Some(body)).await.0, 201);
    }
    let body = json!({"name": "c", "host": "h.corp", "port": 80});
    let (status, answer) = api.call("POST", "/api/v1/hcs", Some(body.clone())).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        error_of(&answer).contains("already holds 2 hybrid connections, its limit"),
        "{answer}"
    );
    // Room again after a delete.
    assert_eq!(api.call("DELETE", "/api/v1/hcs/a", None).await.0, 200);
    assert_eq!(api.call("POST", "/api/v1/hcs", Some(body)).await.0, 201);
}

#[tokio::test]
async fn the_openapi_document_is_public_and_describes_every_route() {
    let api = start().await;
    let (status, doc) = raw(api.addr, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/api/v1/hcs", &["get", "post"][..]),
        ("/api/v1/hcs/{name}", &["get", "patch", "delete"][..]),
        ("/api/v1/hcs/{name}/keys", &["get"][..]),
        ("/api/v1/hcs/{name}/keys/regenerate", &["post"][..]),
        ("/api/v1/hcs/{name}/status", &["get"][..]),
        ("/api/v1/status", &["get"][..]),
        ("/api/v1/manage-keys", &["get"][..]),
        ("/api/v1/manage-keys/regenerate", &["post"][..]),
    ] {
        for m in methods {
            assert!(paths[path][m].is_object(), "{m} {path} is not described");
        }
    }
    // Everything it describes still needs the key.
    assert_eq!(
        raw(api.addr, "GET", "/api/v1/status", None, None).await.0,
        401
    );
}

#[tokio::test]
async fn the_portal_is_served_without_a_key_under_a_strict_csp() {
    let api = start().await;
    let files = [
        ("/", "text/html; charset=utf-8"),
        ("/portal/app.js", "text/javascript; charset=utf-8"),
        ("/portal/style.css", "text/css; charset=utf-8"),
        ("/portal/icon.svg", "image/svg+xml"),
    ];
    let mut page = String::new();
    for (path, content_type) in files {
        let (status, headers, body) = exchange(api.addr, "GET", path, None, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        let has =
            |line: String| assert!(headers.contains(&line), "{path}: no {line} in {headers:?}");
        has(format!("content-type: {content_type}"));
        has(format!(
            "content-security-policy: {}",
            relay::portal::CONTENT_SECURITY_POLICY
        ));
        has("x-content-type-options: nosniff".into());
        // Nothing is fetched from elsewhere (the SVG namespace is a name, not a fetch).
        assert!(
            !body
                .replace("http://www.w3.org/2000/svg", "")
                .contains("://"),
            "{path} refers to another origin"
        );
        if path == "/" {
            page = body;
        }
    }
    assert!(relay::portal::CONTENT_SECURITY_POLICY.starts_with("default-src 'self';"));
    // Every file the page refers to is one of those served above, and the
    // page has no inline script or style, which the policy would block.
    for reference in page
        .split(['"', '\''])
        .filter(|s| s.starts_with("/portal/"))
    {
        assert!(
            files.iter().any(|(path, _)| *path == reference),
            "the page refers to {reference}, which is not served"
        );
    }
    assert!(!page.contains("<script>") && !page.contains("style="));
    // The API behind the page still wants the key, and so do unknown paths.
    for path in ["/api/v1/hcs", "/api/v1/status", "/portal/missing.js"] {
        assert_eq!(
            raw(api.addr, "GET", path, None, None).await.0,
            401,
            "{path}"
        );
    }
    let (status, _) = raw(
        api.addr,
        "POST",
        "/api/v1/hcs",
        None,
        Some(r#"{"name":"a","host":"h","port":1}"#),
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_sas_token_signed_with_the_manage_key_is_accepted() {
    let api = start().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = api.registry.manage_key();
    let good = proto::sas::sign("https://relay.example/manage", "manage", &key, now + 60);
    let (status, body) = raw(api.addr, "GET", "/api/v1/hcs", Some(&good), None).await;
    assert_eq!(status, 200, "{body}");

    let other: proto::key::Key = "b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktMDE="
        .parse()
        .unwrap();
    let cases = [
        (
            proto::sas::sign("https://relay.example/manage", "manage", &other, now + 60),
            "neither of the relay's manage keys",
        ),
        (
            proto::sas::sign("https://relay.example/manage", "manage", &key, now - 10),
            "expired",
        ),
        (
            proto::sas::sign("https://relay.example/payroll", "manage", &key, now + 60),
            "management token refused",
        ),
        (
            proto::sas::sign("https://relay.example/manage", "send", &key, now + 60),
            "management token refused",
        ),
        (
            "SharedAccessSignature sr=x".to_owned(),
            "management token refused",
        ),
        // The right key, valid until the year 5138: too long to accept.
        (
            proto::sas::sign(
                "https://relay.example/manage",
                "manage",
                &key,
                99_999_999_999,
            ),
            "--max-token-lifetime",
        ),
    ];
    for (token, reason) in cases {
        let (status, body) = raw(api.addr, "GET", "/api/v1/hcs", Some(&token), None).await;
        assert_eq!(status, 401, "{token}: {body}");
        assert!(error_of(&body).contains(reason), "{token}: {body}");
    }
}

#[tokio::test]
async fn either_manage_key_opens_the_api_and_regenerating_one_refuses_only_it() {
    let api = start().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |key: &proto::key::Key| {
        proto::sas::sign("https://relay.example/manage", "manage", key, now + 300)
    };
    let get = |auth: String| async move {
        raw(api.addr, "GET", "/api/v1/manage-keys", Some(&auth), None).await
    };

    let (status, keys) = api.call("GET", "/api/v1/manage-keys", None).await;
    assert_eq!(status, 200, "{keys}");
    let primary: proto::key::Key = keys["primary"].as_str().unwrap().parse().unwrap();
    let secondary: proto::key::Key = keys["secondary"].as_str().unwrap().parse().unwrap();
    assert_eq!(primary, api.registry.manage_key());
    assert_ne!(primary, secondary);
    for key in [&primary, &secondary] {
        assert_eq!(get(format!("Bearer {}", key.as_str())).await.0, 200);
        assert_eq!(get(token(key)).await.0, 200);
    }

    // Regenerate the secondary, signed in with it: the answer still comes,
    // then the old secondary is refused and the primary is untouched.
    let (status, after) = raw(
        api.addr,
        "POST",
        "/api/v1/manage-keys/regenerate",
        Some(&format!("Bearer {}", secondary.as_str())),
        Some(r#"{"key":"secondary"}"#),
    )
    .await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["primary"], primary.as_str());
    let new_secondary: proto::key::Key = after["secondary"].as_str().unwrap().parse().unwrap();
    assert_ne!(new_secondary, secondary);
    for auth in [format!("Bearer {}", secondary.as_str()), token(&secondary)] {
        let (status, body) = get(auth).await;
        assert_eq!(status, 401, "{body}");
    }
    assert_eq!(get(format!("Bearer {}", primary.as_str())).await.0, 200);
    assert_eq!(get(token(&new_secondary)).await.0, 200);

    // The same for the primary, which manage.key follows.
    let (status, after) = raw(
        api.addr,
        "POST",
        "/api/v1/manage-keys/regenerate",
        Some(&token(&new_secondary)),
        Some(r#"{"key":"primary"}"#),
    )
    .await;
    assert_eq!(status, 200, "{after}");
    let new_primary = api.registry.manage_key();
    assert_eq!(after["primary"], new_primary.as_str());
    assert_eq!(after["secondary"], new_secondary.as_str());
    let (status, body) = get(format!("Bearer {}", primary.as_str())).await;
    assert_eq!(status, 401);
    assert!(error_of(&body).contains("wrong manage key"), "{body}");
    let (status, body) = get(token(&primary)).await;
    assert_eq!(status, 401);
    assert!(error_of(&body).contains("manage-keys show"), "{body}");
    assert_eq!(get(format!("Bearer {}", new_primary.as_str())).await.0, 200);
    let on_disk = std::fs::read_to_string(api.registry.dir().join("manage.key")).unwrap();
    assert_eq!(on_disk.trim(), new_primary.as_str());
}

#[tokio::test]
async fn regenerating_a_manage_key_needs_a_slot_it_knows() {
    let api = start().await;
    let before = api.registry.manage_keys();
    for (body, reason) in [
        (json!({"key": "tertiary"}), "unknown key"),
        (
            json!({"rule": "manage", "key": "primary"}),
            "not valid JSON",
        ),
        (json!({}), "not valid JSON"),
    ] {
        let (status, answer) = api
            .call("POST", "/api/v1/manage-keys/regenerate", Some(body))
            .await;
        assert_eq!(status, 400, "{answer}");
        assert!(error_of(&answer).contains(reason), "{answer}");
    }
    assert_eq!(api.registry.manage_keys(), before);
    let (status, _) = api.call("DELETE", "/api/v1/manage-keys", None).await;
    assert_eq!(status, 405);
    let (status, _) = raw(api.addr, "GET", "/api/v1/manage-keys", None, None).await;
    assert_eq!(status, 401);
}
