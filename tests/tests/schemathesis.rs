//! schemathesis (from PyPI) against the relay's own `/openapi.json`:
//! generated requests, valid and invalid, never get a server error or an
//! answer that contradicts the document, and stateful sequences (create,
//! then use what it returned) work. `scripts/test-all` installs it; without
//! it this test skips, unless HYBRIDLINK_REQUIRE_TOOLS is set (as in CI).

use std::process::Command;

use anyhow::{Result, ensure};
use hybridlink_tests::Relay;

#[test]
fn schemathesis_finds_nothing_wrong_with_the_management_api() -> Result<()> {
    // The module form works whether or not the `st` script is on PATH.
    let installed = Command::new("python3")
        .args(["-m", "schemathesis.cli", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        ensure!(
            std::env::var_os("HYBRIDLINK_REQUIRE_TOOLS").is_none(),
            "schemathesis is not installed (pip install schemathesis)"
        );
        eprintln!("SKIP: schemathesis is not installed (pip install schemathesis)");
        return Ok(());
    }
    let relay = Relay::start()?;
    let key = std::fs::read_to_string(relay.data_dir.join("manage.key"))?;
    let work = tempfile::tempdir()?;
    let out = Command::new("python3")
        .current_dir(work.path())
        .args([
            "-m",
            "schemathesis.cli",
            "run",
            &format!("http://{}/openapi.json", relay.api),
        ])
        .args(["-H", &format!("Authorization: Bearer {}", key.trim())])
        .args(["--max-examples", "50", "--seed", "1"])
        // Regenerating the manage key schemathesis signs in with would turn
        // every later request into a 401; relay/tests/api.rs covers it.
        .args(["--exclude-operation-id", "regenerateManageKey"])
        .env("NO_COLOR", "1")
        .output()?;
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}{}", String::from_utf8_lossy(&out.stderr));
    ensure!(
        out.status.success(),
        "schemathesis found problems:\n{report}"
    );
    ensure!(report.contains("passed"), "{report}");
    Ok(())
}
