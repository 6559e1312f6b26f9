//! The local control socket of a running agent, used by `hybridlink agent
//! status` and `hybridlink agent reload`: a Unix socket where a client
//! writes one command line (`status` or `reload`), and the agent answers
//! with JSON and closes.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::Agent;

/// The default socket path: `/run/hybridlink-agent.sock` for root, else in
/// `$XDG_RUNTIME_DIR` (or `/tmp`).
pub fn default_path() -> PathBuf {
    let is_root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if is_root.unwrap_or(false) {
        return PathBuf::from("/run/hybridlink-agent.sock");
    }
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    dir.join("hybridlink-agent.sock")
}

/// A reload request: the answer goes back on the sender.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<crate::ReloadSummary, String>>;

/// Serves `agent` on `path` until the returned task is dropped or aborted.
/// `reload` receives the reload requests (none: `reload` is refused). A
/// stale socket file from a dead agent is replaced.
pub fn serve(
    path: &Path,
    agent: Agent,
    reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    Ok(tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(answer(conn, agent.clone(), reload.clone()));
        }
    }))
}

async fn answer(
    mut conn: UnixStream,
    agent: Agent,
    reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
) {
    let mut command = Vec::new();
    let read = async {
        let mut buf = [0u8; 64];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    command.extend_from_slice(&buf[..n]);
                    if command.contains(&b'\n') || command.len() > 64 {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
    let command = String::from_utf8_lossy(&command).trim().to_string();
    let body = match command.as_str() {
        "status" | "" => serde_json::to_value(agent.status()),
        "reload" => {
            let result = match reload {
                None => Err("this agent has no connection strings file to reload (start it with --connection-strings-file)".to_string()),
                Some(tx) => {
                    let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
                    if tx.send(answer_tx).await.is_err() {
                        Err("the agent is stopping".to_string())
                    } else {
                        answer_rx.await.unwrap_or_else(|_| Err("the reload was dropped".to_string()))
                    }
                }
            };
            Ok(match result {
                Ok(summary) => serde_json::json!({ "reloaded": summary }),
                Err(error) => serde_json::json!({ "error": error }),
            })
        }
        other => Ok(
            serde_json::json!({ "error": format!("unknown command {other:?}; use status or reload") }),
        ),
    };
    let body = body
        .map(|b| serde_json::to_vec(&b).unwrap_or_default())
        .unwrap_or_default();
    let _ = conn.write_all(&body).await;
    let _ = conn.shutdown().await;
}

/// Asks the agent listening on `path` for its status.
pub async fn query(path: &Path) -> std::io::Result<serde_json::Value> {
    request(path, "status").await
}

/// Sends `command` to the agent listening on `path`; returns its answer.
pub async fn request(path: &Path, command: &str) -> std::io::Result<serde_json::Value> {
    let mut conn = UnixStream::connect(path).await?;
    conn.write_all(format!("{command}\n").as_bytes()).await?;
    conn.shutdown().await?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body).await?;
    serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
