//! The local control socket of a running agent, used by `hybridlink agent
//! status` and `hybridlink agent reload`: a Unix socket where a client
//! writes one command line (`status` or `reload`), and the agent answers
//! with JSON and closes. `status` is answered with a list of
//! [`AgentHcStatus`], `reload` (and a command the agent does not know) with
//! a [`ReloadAnswer`]; [`status`] and [`reload`] ask for them.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use crate::{Agent, AgentHcStatus, ReloadSummary};

/// Where root's agent listens, and so where root's `agent status` asks: the
/// one the unit `agent install` writes uses, in a directory only the agent's
/// user (and root) may enter.
pub const SYSTEM_PATH: &str = "/run/hybridlink-agent/agent.sock";

/// The default socket path: [`SYSTEM_PATH`] for root, else in
/// `$XDG_RUNTIME_DIR` (or `/tmp`).
pub fn default_path() -> PathBuf {
    let is_root =
        std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if is_root.unwrap_or(false) {
        return PathBuf::from(SYSTEM_PATH);
    }
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    dir.join("hybridlink-agent.sock")
}

/// A reload request: the answer goes back on the sender.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<ReloadSummary, String>>;

/// The agent's answer to `reload`, and to a command it does not know. On
/// the socket: `{"reloaded": {...}}` or `{"error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadAnswer {
    /// The agent reread its files; what changed.
    Reloaded(ReloadSummary),
    /// Why nothing was reloaded.
    Error(String),
}

/// Serves `agent` on `path` until the returned task is dropped or aborted.
/// `reload` receives the reload requests (none: `reload` is refused). A
/// stale socket file from a dead agent is replaced; a missing directory is
/// made, mode 0700 (systemd makes the unit's, `RuntimeDirectory=`).
pub fn serve(
    path: &Path,
    agent: Agent,
    reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
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
        "status" | "" => serde_json::to_vec(&agent.status()),
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
            serde_json::to_vec(&match result {
                Ok(summary) => ReloadAnswer::Reloaded(summary),
                Err(error) => ReloadAnswer::Error(error),
            })
        }
        other => serde_json::to_vec(&ReloadAnswer::Error(format!(
            "unknown command {other:?}; use status or reload"
        ))),
    };
    let body = body.unwrap_or_default();
    let _ = conn.write_all(&body).await;
    let _ = conn.shutdown().await;
}

/// Asks the agent listening on `path` for the state of each hybrid
/// connection it serves.
pub async fn status(path: &Path) -> std::io::Result<Vec<AgentHcStatus>> {
    request(path, "status").await
}

/// Asks the agent listening on `path` to reread its files.
pub async fn reload(path: &Path) -> std::io::Result<ReloadAnswer> {
    request(path, "reload").await
}

/// Sends `command` to the agent listening on `path`; returns its answer.
async fn request<T: DeserializeOwned>(path: &Path, command: &str) -> std::io::Result<T> {
    let mut conn = UnixStream::connect(path).await?;
    conn.write_all(format!("{command}\n").as_bytes()).await?;
    conn.shutdown().await?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body).await?;
    serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AgentOptions;

    const LISTEN: &str = "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=listen;SharedAccessKey=Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE=;EntityPath=payroll;CertificateSha256=86c1c84aa76199659d205375087f92c891470d3cc71eb8b9ef3f5af42a222551";

    #[test]
    fn reload_answers_keep_their_wire_form() {
        let summary = ReloadSummary {
            added: vec!["a".into()],
            removed: vec![],
            changed: vec!["b".into()],
        };
        let ok = serde_json::to_value(ReloadAnswer::Reloaded(summary.clone())).unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"reloaded": {"added": ["a"], "removed": [], "changed": ["b"]}})
        );
        let err = serde_json::to_value(ReloadAnswer::Error("no".into())).unwrap();
        assert_eq!(err, serde_json::json!({"error": "no"}));
        assert_eq!(
            serde_json::from_value::<ReloadAnswer>(ok).unwrap(),
            ReloadAnswer::Reloaded(summary)
        );
    }

    #[tokio::test]
    async fn status_and_reload_are_typed_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let agent = Agent::start(AgentOptions::new(vec![LISTEN.parse().unwrap()])).unwrap();
        let server = serve(&path, agent.clone(), None).unwrap();

        let hcs = status(&path).await.unwrap();
        assert_eq!(hcs.len(), 1);
        assert_eq!(hcs[0].name.as_str(), "payroll");
        assert!(
            matches!(
                hcs[0].connection,
                crate::status::Connection::Reconnecting(_)
            ),
            "{:?}",
            hcs[0].connection
        );
        match reload(&path).await.unwrap() {
            ReloadAnswer::Error(e) => assert!(e.contains("--connection-strings-file"), "{e}"),
            other => panic!("an agent without a reload channel reloaded: {other:?}"),
        }
        let mode = std::fs::metadata(dir.path().join("run"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700,
            "the socket's directory is made private"
        );
        server.abort();
        agent.stop_accepting();
    }
}
