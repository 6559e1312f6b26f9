//! The local status socket of a running agent, read by `hybridlink agent
//! status`: a Unix socket that answers every connection with the agent's
//! state as JSON and closes.

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

/// Serves the status of `agent` on `path` until the returned task is dropped
/// or aborted. A stale socket file from a dead agent is replaced.
pub fn serve(path: &Path, agent: Agent) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    Ok(tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = serde_json::to_vec(&agent.status()).unwrap_or_default();
            tokio::spawn(async move {
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            });
        }
    }))
}

/// Asks the agent listening on `path` for its status.
pub async fn query(path: &Path) -> std::io::Result<serde_json::Value> {
    let mut conn = UnixStream::connect(path).await?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body).await?;
    serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
