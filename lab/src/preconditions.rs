//! What a test needs before it can run, checked in one place.
//!
//! Tests that build network namespaces or tun devices need root. Run
//! without it they skip, printing why, so that `cargo test` works for a
//! developer without root; with `HYBRIDLINK_REQUIRE_ROOT` set (CI sets it)
//! a test that cannot run fails instead, so a green run always means the
//! tests ran.

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The variable that turns a skip for want of root into a failure.
pub const REQUIRE_ROOT: &str = "HYBRIDLINK_REQUIRE_ROOT";

/// True when `test` can run as root. Otherwise prints a skip and returns
/// false, or, with [`REQUIRE_ROOT`] set, panics naming the test.
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os(REQUIRE_ROOT).is_none(),
        "{test} needs root (network namespaces, tun devices) and {REQUIRE_ROOT} is set: run the tests as root"
    );
    eprintln!("SKIP {test}: needs root (network namespaces, tun devices)");
    false
}
