//! How many worker threads a serving process runs its tasks on.
//!
//! The appliance and the agent default to half the machine's cores: the
//! appliance is a sidecar that shares its host with the app, and the agent
//! usually shares its host with the services it reaches. With two cores and
//! a thread per core, tokio's idle worker was woken to steal nearly every
//! task another worker woke (a futex or eventfd write, a context switch,
//! often on the same core), on every hop of a new connection; with one
//! worker each task runs where it was woken. The relay, which usually has
//! its host to itself, keeps a thread per core. ARCHITECTURE.md ("Threads")
//! has the measurements.

use anyhow::Context;

/// `--threads` of `relay serve`, `agent run` and `appliance run`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ThreadsArg {
    /// Worker threads for this process's tasks, 1 to 1024. Default: half
    /// the cores, at least one, for the appliance and the agent (they share
    /// their host with the app or the targets); every core for the relay.
    #[arg(
        long,
        env = "HYBRIDLINK_THREADS",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub threads: Option<u16>,
}

/// Whose runtime is being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The appliance or the agent: a guest on its host.
    Guest,
    /// The relay, and the short-lived commands: every core.
    Owner,
}

/// The worker threads for `role` on a machine of `cores` cores, unless the
/// user said how many.
pub fn worker_threads(asked: Option<u16>, role: Role, cores: usize) -> usize {
    match (asked, role) {
        (Some(n), _) => usize::from(n),
        (None, Role::Guest) => (cores / 2).max(1),
        (None, Role::Owner) => cores.max(1),
    }
}

/// A multi-threaded runtime with [`worker_threads`] workers.
pub fn runtime(asked: Option<u16>, role: Role) -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = worker_threads(asked, role, cores);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .with_context(|| format!("starting a runtime of {workers} threads"))?;
    tracing::info!(
        threads = rt.metrics().num_workers(),
        cores,
        "worker threads (--threads)"
    );
    Ok(rt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_take_half_the_cores_and_at_least_one() {
        assert_eq!(worker_threads(None, Role::Guest, 1), 1);
        assert_eq!(worker_threads(None, Role::Guest, 2), 1);
        assert_eq!(worker_threads(None, Role::Guest, 3), 1);
        assert_eq!(worker_threads(None, Role::Guest, 8), 4);
    }

    #[test]
    fn the_relay_takes_every_core() {
        assert_eq!(worker_threads(None, Role::Owner, 2), 2);
        assert_eq!(worker_threads(None, Role::Owner, 16), 16);
    }

    #[test]
    fn what_the_user_asks_for_wins() {
        assert_eq!(worker_threads(Some(3), Role::Guest, 2), 3);
        assert_eq!(worker_threads(Some(1), Role::Owner, 16), 1);
    }
}
