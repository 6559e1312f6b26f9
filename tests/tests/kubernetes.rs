//! The Kubernetes sidecar manifest (`deploy/kubernetes/appliance-sidecar.yaml`)
//! agrees with the product: the appliance runs in the app's pod (so in its
//! network namespace) with what it needs (NET_ADMIN, /dev/net/tun, its
//! config where `--config` points), and its command line parses. There is
//! no cluster here to apply it to; this catches the manifest drifting from
//! the binary. YAML is read with PyYAML (installed with schemathesis).

use std::process::Command;

use anyhow::{Context, Result, ensure};
use hybridlink_tests::binary;
use serde_json::Value;

#[test]
fn the_sidecar_manifest_matches_the_appliance() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/appliance-sidecar.yaml"
    );
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            path,
        ])
        .output()?;
    if !out.status.success() {
        ensure!(
            std::env::var_os("HYBRIDLINK_REQUIRE_TOOLS").is_none(),
            "reading the manifest failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("SKIP: PyYAML is not installed");
        return Ok(());
    }
    let pod: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(pod["kind"] == "Pod", "{pod}");
    let spec = &pod["spec"];
    let sidecar = spec["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "hybridlink-appliance"))
        .context("no hybridlink-appliance sidecar")?;
    // A native sidecar: it keeps running next to the app containers.
    ensure!(sidecar["restartPolicy"] == "Always");
    ensure!(
        !spec["containers"]
            .as_array()
            .context("containers")?
            .is_empty()
    );
    ensure!(
        spec["hostNetwork"].is_null(),
        "the pod must have its own network namespace"
    );
    let caps: Vec<&str> = sidecar["securityContext"]["capabilities"]["add"]
        .as_array()
        .context("capabilities")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(caps.contains(&"NET_ADMIN"), "{caps:?}");
    let mounts = sidecar["volumeMounts"].as_array().context("mounts")?;
    let mount_of = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .map(|m| m["name"].clone())
    };
    ensure!(mount_of("/dev/net/tun").is_some(), "no /dev/net/tun");

    // The args are a real appliance command line, and its config file is
    // in the mounted secret.
    let args: Vec<String> = sidecar["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    ensure!(args[..2] == ["appliance", "run"], "{args:?}");
    let config = args
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .context("--config")?;
    let dir = std::path::Path::new(config)
        .parent()
        .context("config dir")?;
    let volume = mount_of(dir.to_str().context("utf-8")?)
        .context("the config's directory is not mounted")?;
    let secret = spec["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == volume))
        .context("volume")?;
    ensure!(secret["secret"]["secretName"].is_string(), "{secret}");
    // clap accepts the command line (an unknown flag would fail here).
    let out = Command::new(binary()).args(&args).arg("--help").output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
