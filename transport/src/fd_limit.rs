//! The open-files limit. Every socket is a file descriptor: the relay spends
//! six on each spliced pipe (two sockets, two kernel pipes of two ends), the
//! agent one per stream and one per pipe. The soft limit is often 1024 while
//! the hard limit allows far more, so each role raises the soft limit to the
//! hard one at start, and the relay sizes its quotas to what it gets.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft limit on open files now (`None`: unlimited).
pub fn soft() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Raises the soft limit on open files to the hard limit. Returns the soft
/// limit before and after (`None`: unlimited).
pub fn raise() -> std::io::Result<(Option<u64>, Option<u64>)> {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current != limit.maximum {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )?;
    }
    Ok((before, soft()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit() {
        let (_, after) = raise().unwrap();
        assert_eq!(after, getrlimit(Resource::Nofile).maximum);
    }
}
