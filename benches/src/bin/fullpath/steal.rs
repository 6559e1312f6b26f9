//! CPU time the hypervisor took from this (virtual) machine while a figure
//! was measured: the "steal" column of `/proc/stat`. On a shared host
//! another tenant's load shows up here, and a latency row measured while it
//! does is the host's figure rather than the path's: with two cores, a
//! hypervisor taking a fifth of the CPU time for a second turns a p99 of
//! 0.2 ms into 2.5 ms even for direct TCP.

use std::time::{Duration, Instant};

/// A figure measured while the hypervisor took more than this share of the
/// CPU (percent) is measured again, up to [`RETRIES`] times. Quiet rows on
/// the machines this was written on show 0–1 %; disturbed ones 10–40 %.
pub const LIMIT: f64 = 5.0;

/// How many times a disturbed latency row is measured again.
pub const RETRIES: usize = 2;

/// How long a disturbed row waits for a quiet second before it is
/// measured again. Episodes above [`LIMIT`], sampled every half second
/// through a run, lasted from half a second to four and a half, often a
/// few close together.
pub const CALM_WAIT: Duration = Duration::from_secs(30);

/// Waits until the hypervisor takes at most [`LIMIT`] of the CPU over a
/// second, or `most` has gone by; says whether it did. Steal is only
/// counted while a virtual CPU wants to run, so an idle second would
/// always look calm: each second of the test keeps every core busy.
pub fn wait_for_calm(most: Duration) -> bool {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    while started.elapsed() < most {
        let clock = Clock::start();
        std::thread::scope(|s| {
            for _ in 0..cores {
                s.spawn(|| {
                    let spin = Instant::now();
                    while spin.elapsed() < Duration::from_secs(1) {
                        std::hint::spin_loop();
                    }
                });
            }
        });
        if clock.percent() <= LIMIT {
            return true;
        }
    }
    false
}

/// The report lists every figure measured while the hypervisor took at
/// least this share (percent).
pub const NOTE: f64 = 2.0;

/// The CPU time counters at one moment, to measure the steal over a span.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    steal: u64,
    total: u64,
}

impl Clock {
    /// The counters now (zero where `/proc/stat` cannot be read).
    pub fn start() -> Clock {
        let (steal, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse(&s))
            .unwrap_or((0, 0));
        Clock { steal, total }
    }

    /// The share of the machine's CPU time since `self` that was stolen,
    /// in percent.
    pub fn percent(&self) -> f64 {
        let now = Clock::start();
        share(
            now.steal.saturating_sub(self.steal),
            now.total.saturating_sub(self.total),
        )
    }
}

/// Runs `work` and returns its result with the share of the CPU the
/// hypervisor took meanwhile, in percent.
pub fn during<T>(work: impl FnOnce() -> T) -> (T, f64) {
    let clock = Clock::start();
    let out = work();
    (out, clock.percent())
}

fn share(steal: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    100.0 * steal as f64 / total as f64
}

/// The steal and the total (user, nice, system, idle, iowait, irq,
/// softirq, steal) of `/proc/stat`'s first line, in clock ticks. `None`
/// when the line is not the all-CPU line or has no steal column (kernels
/// before 2.6.11).
fn parse(stat: &str) -> Option<(u64, u64)> {
    let mut fields = stat.lines().next()?.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let counters: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if counters.len() < 8 {
        return None;
    }
    Some((counters[7], counters.iter().sum()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steal_column_over_the_sum_of_the_first_eight() {
        // Guest time (the last two columns) is already counted in user.
        let stat = "cpu  5153490 1593585 1377298 3572965 31850 0 262607 124960 7 9\n\
                    cpu0 2544483 787985 671358 1855038 8665 0 128396 61796 0 0\n";
        let (steal, total) = parse(stat).unwrap();
        assert_eq!(steal, 124960);
        assert_eq!(
            total,
            5153490 + 1593585 + 1377298 + 3572965 + 31850 + 262607 + 124960
        );
        assert_eq!(
            parse("cpu0 1 2 3 4 5 6 7 8\n"),
            None,
            "not the all-CPU line"
        );
        assert_eq!(parse("cpu 1 2 3 4\n"), None, "no steal column");
        assert_eq!(parse(""), None);
    }

    #[test]
    fn a_share_in_percent_and_none_of_no_time() {
        assert_eq!(share(25, 100), 25.0);
        assert_eq!(share(0, 0), 0.0);
    }
}
