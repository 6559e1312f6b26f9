//! Keeping a running agent current: it rereads its policy file when the
//! file changes, and its policy and connection strings file on SIGHUP and
//! on `hybridlink agent reload` (a request on the control socket).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use proto::connection_string::ConnectionString;
use proto::name::{Endpoint, HcName};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::warn;

use crate::control_socket::ReloadRequest;
use crate::policy::PolicyError;
use crate::strings_file::{self, StringsFileError};
use crate::{Agent, AgentError, Policy, ReloadSummary};

/// How often the policy file's modification time is checked.
const POLICY_POLL: Duration = Duration::from_secs(2);

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The policy file is missing (when named explicitly) or not valid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The connection strings file could not be read.
    #[error(transparent)]
    Strings(#[from] StringsFileError),
    /// The agent refused the new strings.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// The files a running agent rereads.
#[derive(Clone, Debug)]
pub struct ReloadSources {
    /// Connection strings given on the command line, kept on every reload.
    pub fixed: Vec<ConnectionString>,
    /// Endpoints given on the command line (`--endpoint`), kept on every
    /// reload; the file's lines add theirs.
    pub fixed_endpoints: HashMap<HcName, Endpoint>,
    /// The connection strings file, reread on every reload; without one a
    /// reload rereads only the policy.
    pub strings_file: Option<PathBuf>,
    /// The policy file.
    pub policy: PathBuf,
    /// Whether the policy file was named explicitly: then a missing file is
    /// an error, otherwise it means the built-in policy.
    pub policy_explicit: bool,
}

impl ReloadSources {
    /// The policy to start with: the file's, or the built-in one when a
    /// policy file that was not named explicitly does not exist.
    pub fn initial_policy(&self) -> Result<Policy, PolicyError> {
        if self.policy.exists() {
            return Policy::load(&self.policy);
        }
        if self.policy_explicit {
            return Err(PolicyError::Missing {
                path: self.policy.clone(),
            });
        }
        warn!(
            path = %self.policy.display(),
            "no policy file: using the built-in policy (any host and port except loopback, link-local and unspecified addresses); `hybridlink agent allow` writes one"
        );
        Ok(Policy::built_in())
    }

    /// Rereads the policy file and gives `agent` the policy if it changed.
    /// A missing file that was not named explicitly changes nothing.
    pub fn reload_policy(&self, agent: &Agent) -> Result<(), PolicyError> {
        if !self.policy.exists() && !self.policy_explicit {
            return Ok(());
        }
        let fresh = Policy::load(&self.policy)?;
        if *agent.policy() != fresh {
            agent.set_policy(fresh);
        }
        Ok(())
    }

    /// Rereads the policy, then the connection strings file, and serves the
    /// strings it holds (with the fixed ones) from now on.
    pub async fn reload(&self, agent: &Agent) -> Result<ReloadSummary, ReloadError> {
        self.reload_policy(agent)?;
        let Some(path) = &self.strings_file else {
            return Ok(ReloadSummary::default());
        };
        let mut strings = self.fixed.clone();
        let file = strings_file::read_all(path)?;
        strings.extend(file.strings);
        let mut endpoints = file.endpoints;
        endpoints.extend(self.fixed_endpoints.clone());
        Ok(agent.reload(strings, endpoints).await?)
    }
}

/// Keeps `agent` current until `shutdown` resolves: applies a changed
/// policy file, and reloads on SIGHUP and on each of `requests` (answering
/// it). A failed reload is logged, and the agent goes on as it was.
/// Fails only if SIGHUP cannot be watched.
pub async fn serve_reloads(
    agent: &Agent,
    sources: &ReloadSources,
    mut requests: mpsc::Receiver<ReloadRequest>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::pin!(shutdown);
    let mut seen_policy = modified(&sources.policy);
    let mut poll = tokio::time::interval(POLICY_POLL);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = poll.tick() => {
                let stamp = modified(&sources.policy);
                if stamp != seen_policy {
                    seen_policy = stamp;
                    if let Err(e) = sources.reload_policy(agent) {
                        warn!(error = %e, "the changed policy file is not valid; still using the previous policy");
                    }
                }
            }
            _ = hangup.recv() => {
                if let Err(e) = sources.reload(agent).await {
                    warn!(error = %e, "reload on SIGHUP failed; still serving the old strings");
                }
            }
            Some(answer) = requests.recv() => {
                let result = sources.reload(agent).await;
                if let Err(e) = &result {
                    warn!(error = %e, "reload failed; still serving the old strings");
                }
                let _ = answer.send(result.map_err(|e| e.to_string()));
            }
        }
    }
}

/// The modification time of `path`, if it has one.
fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AgentOptions;

    const LISTEN: &str = "Endpoint=sb://127.0.0.1:1/;SharedAccessKeyName=listen;SharedAccessKey=Q2hhbmdlTWUtdGhpcy1pcy1hLXRlc3Qta2V5LTAwMDE=;EntityPath=payroll;CertificateSha256=86c1c84aa76199659d205375087f92c891470d3cc71eb8b9ef3f5af42a222551";

    fn sources(dir: &Path, explicit: bool) -> ReloadSources {
        ReloadSources {
            fixed: Vec::new(),
            fixed_endpoints: HashMap::new(),
            strings_file: None,
            policy: dir.join("policy.toml"),
            policy_explicit: explicit,
        }
    }

    #[test]
    fn a_missing_policy_is_the_built_in_one_unless_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            sources(dir.path(), false).initial_policy().unwrap(),
            Policy::built_in()
        );
        let err = sources(dir.path(), true).initial_policy().unwrap_err();
        assert!(
            err.to_string()
                .contains("write one with `hybridlink agent allow HOST:PORT --policy"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_reload_request_rereads_the_policy_and_is_answered() {
        let dir = tempfile::tempdir().unwrap();
        let sources = sources(dir.path(), false);
        let mut options = AgentOptions::new(vec![LISTEN.parse().unwrap()]);
        options.policy = sources.initial_policy().unwrap();
        let agent = Agent::start(options).unwrap();
        std::fs::write(&sources.policy, "[[allow]]\nhost = \"db.corp\"\n").unwrap();

        let (tx, rx) = mpsc::channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = {
            let agent = agent.clone();
            let sources = sources.clone();
            tokio::spawn(async move {
                serve_reloads(&agent, &sources, rx, async {
                    let _ = stop_rx.await;
                })
                .await
            })
        };
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        tx.send(answer_tx).await.unwrap();
        assert_eq!(answer_rx.await.unwrap(), Ok(ReloadSummary::default()));
        assert_eq!(*agent.policy(), Policy::load(&sources.policy).unwrap());

        std::fs::write(&sources.policy, "not a policy").unwrap();
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        tx.send(answer_tx).await.unwrap();
        let err = answer_rx.await.unwrap().unwrap_err();
        assert!(err.contains("is not valid"), "{err}");

        stop_tx.send(()).unwrap();
        served.await.unwrap().unwrap();
        assert_eq!(agent.drain(Duration::from_secs(5)).await, 0);
    }
}
