//! Helpers for tests of several relay nodes sharing one registry in etcd:
//! one certificate on every node, and what a node lists and says about its
//! registry through its API.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::Relay;

/// Gives `dir` the certificate and key of `from`: how an operator makes
/// every node present the one certificate connection strings pin.
pub fn copy_certificate(from: &Path, dir: &Path) -> Result<()> {
    for file in [relay::identity::CERT_FILE, relay::identity::KEY_FILE] {
        std::fs::copy(from.join(file), dir.join(file))
            .with_context(|| format!("copying {file}"))?;
    }
    Ok(())
}

/// `GET PATH` on `relay`'s API with its manage key: the status line and
/// the body as JSON.
pub fn api_get(relay: &Relay, path: &str) -> Result<(String, serde_json::Value)> {
    api_request(relay, "GET", path, None)
}

/// `METHOD PATH` on `relay`'s API with its manage key and a JSON `body`:
/// the status line and the answer as JSON.
pub fn api_request(
    relay: &Relay,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(String, serde_json::Value)> {
    let key = std::fs::read_to_string(relay.data_dir.join("manage.key"))?;
    let body = body.map(serde_json::Value::to_string).unwrap_or_default();
    let mut conn = TcpStream::connect(relay.api)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        relay.api,
        key.trim(),
        body.len()
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer")?;
    let status = head.lines().next().unwrap_or("").to_owned();
    let body = serde_json::from_str(body).with_context(|| answer.clone())?;
    Ok((status, body))
}

/// The nodes `relay` lists (`GET /api/v1/nodes`), sorted.
pub fn nodes_of(relay: &Relay) -> Result<Vec<String>> {
    let (status, body) = api_get(relay, "/api/v1/nodes")?;
    ensure!(status.starts_with("HTTP/1.1 200"), "{status} {body}");
    let nodes = body["nodes"].as_array().context("a node list")?;
    let mut nodes: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    nodes.sort();
    Ok(nodes)
}

/// What `relay` says of its registry (`GET /api/v1/registry`).
pub fn registry_health(relay: &Relay) -> Result<serde_json::Value> {
    let (status, body) = api_get(relay, "/api/v1/registry")?;
    ensure!(status.starts_with("HTTP/1.1 200"), "{status} {body}");
    Ok(body)
}
