//! Relays sharing one registry in etcd (`relay serve --registry etcd://...`),
//! with the real binary on loopback and a real etcd: a hybrid connection
//! made through one relay is served by the other, a key regenerated through
//! one is refused by the other within a second, concurrent changes through
//! both lose nothing, `relay migrate` copies a single relay's registry, and
//! a relay that cannot reach etcd does not start; the quota and the manage
//! keys are shared, and a relay whose watch broke when etcd restarted
//! catches up.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hybridlink_tests::etcd::Etcd;
use hybridlink_tests::{
    Agent, OpenStream, Relay, binary, echo_server_thread, relay_serve, wait_for,
};
use proto::connection_string::ConnectionString;

/// A relay on loopback with a fresh data dir, its registry in `etcd`.
fn relay_on(etcd: &Etcd, dir: &tempfile::TempDir) -> Result<Relay> {
    let url = etcd.url();
    Relay::start_with(dir.path(), "127.0.0.1:0", &["--registry", &url])
}

fn string_of(keys: &serde_json::Value, rule: &str, slot: &str) -> Result<ConnectionString> {
    keys["connection_strings"][rule][slot]
        .as_str()
        .with_context(|| format!("no {rule}.{slot} in {keys}"))?
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `hybridlink connect --check` for `cs`.
fn check(cs: &ConnectionString) -> Result<std::process::Output> {
    Ok(Command::new(binary())
        .args(["connect", "--check", "--wait", "5", &cs.to_string()])
        .output()?)
}

#[test]
fn a_hybrid_connection_made_on_one_relay_is_served_by_the_other_and_a_key_regenerated_there_is_refused_here_within_a_second()
-> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let (dir1, dir2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let node1 = relay_on(&etcd, &dir1)?;
    let node2 = relay_on(&etcd, &dir2)?;
    // One set of manage keys for both: each relay's manage.key opens the
    // other's API.
    let key = |dir: &tempfile::TempDir| std::fs::read_to_string(dir.path().join("manage.key"));
    assert_eq!(key(&dir1)?, key(&dir2)?);

    let (send1, listen1) = node1.create_hc("payroll", echo_server_thread()?)?;
    // Node 2 learns it through its watch (about 10 ms on loopback); a
    // busy machine may take longer, a second is the promise.
    let deadline = Instant::now() + Duration::from_secs(1);
    let shown = loop {
        match node2.hc(&["show", "payroll"]) {
            Ok(shown) => break shown,
            Err(e) if Instant::now() < deadline && e.to_string().contains("does not exist") => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    };
    assert_eq!(shown["name"], "payroll", "{shown}");
    // Node 2's strings carry node 2's address and certificate, and the
    // same keys.
    let (send2, listen2) = node2.strings("payroll")?;
    assert_eq!(send2.key, send1.key);
    assert_eq!(listen2.key, listen1.key);
    assert_ne!(send2.relay_port, send1.relay_port);
    assert_ne!(send2.cert_sha256, send1.cert_sha256);

    // The listen key works on node 2: an agent attaches there and a sender
    // through node 2 reaches the target.
    let agent2 = Agent::start(&[&listen2], &[])?;
    agent2.wait_connected()?;
    let mut stream = OpenStream::open(&send2)?;
    assert_eq!(stream.echo("through node 2\n")?, "through node 2\n");
    stream.close();

    // An agent on node 1 with the listen primary; the key is regenerated
    // through node 2, and node 1 detaches the agent within a second.
    let agent1 = Agent::start(&[&listen1], &[])?;
    agent1.wait_connected()?;
    assert_eq!(node1.hc(&["status", "payroll"])?["listener_count"], 1);
    node2.hc(&[
        "regenerate",
        "payroll",
        "--rule",
        "listen",
        "--key",
        "primary",
    ])?;
    let regenerated = Instant::now();
    wait_for("node 1 detaching the agent with the old key", 1, || {
        Ok(node1.hc(&["status", "payroll"])?["listener_count"] == 0)
    })?;
    eprintln!(
        "node 1 detached the agent {} ms after the regeneration through node 2",
        regenerated.elapsed().as_millis()
    );
    wait_for("the agent on node 1 being denied", 5, || {
        let c = &agent1.status()?[0]["connection"];
        Ok(c["state"] == "denied"
            && c["reason"]
                .as_str()
                .unwrap_or("")
                .contains("the key of this connection string was regenerated"))
    })?;

    // The send primary, regenerated through node 2: node 1 refuses a new
    // session with the old one, saying why, and takes the new one.
    let keys = node2.hc(&[
        "regenerate",
        "payroll",
        "--rule",
        "send",
        "--key",
        "primary",
    ])?;
    let out = check(&send1)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "node 1 took the old send key");
    ensure!(
        err.contains("the key of this connection string was regenerated ("),
        "{err}"
    );
    let new_send1 = ConnectionString {
        key: string_of(&keys, "send", "primary")?.key,
        ..send1.clone()
    };
    // Node 1 has no agent of this key now: the check finds the key good and
    // says there is no agent, not that the key was refused.
    let out = check(&new_send1)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!err.contains("regenerated"), "{err}");
    ensure!(!err.contains("signature"), "{err}");
    drop(agent2);
    Ok(())
}

/// The port and the four keys of `payroll`, as `node` has them.
fn record(node: &Relay) -> Result<(serde_json::Value, Vec<String>)> {
    let port = node.hc(&["show", "payroll"])?["port"].clone();
    let keys = node.hc(&["keys", "payroll"])?;
    let mut all = Vec::new();
    for rule in ["send", "listen"] {
        for slot in ["primary", "secondary"] {
            all.push(string_of(&keys, rule, slot)?.key.as_str().to_owned());
        }
    }
    Ok((port, all))
}

#[test]
fn concurrent_changes_of_one_hybrid_connection_through_two_relays_are_all_kept() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let (dir1, dir2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let node1 = Arc::new(relay_on(&etcd, &dir1)?);
    let node2 = Arc::new(relay_on(&etcd, &dir2)?);
    node1.hc(&["create", "payroll", "--host", "198.18.7.1", "--port", "1"])?;
    wait_for("node 2 seeing the new HC", 2, || {
        Ok(node2.hc(&["show", "payroll"]).is_ok())
    })?;

    for round in 0..5u16 {
        // The same moment, through each relay: a new port and a new key of
        // a different rule.
        let barrier = Arc::new(Barrier::new(4));
        let run = |node: &Arc<Relay>, args: Vec<String>| {
            let node = Arc::clone(node);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || -> Result<serde_json::Value> {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                barrier.wait();
                node.hc(&args)
            })
        };
        let port1 = (1000 + round * 2).to_string();
        let port2 = (1001 + round * 2).to_string();
        let update = |port: &str| -> Vec<String> {
            ["update", "payroll", "--port", port]
                .map(String::from)
                .to_vec()
        };
        let regenerate = |rule: &str| -> Vec<String> {
            ["regenerate", "payroll", "--rule", rule, "--key", "primary"]
                .map(String::from)
                .to_vec()
        };
        let answers = [
            run(&node1, update(&port1)),
            run(&node2, update(&port2)),
            run(&node1, regenerate("send")),
            run(&node2, regenerate("listen")),
        ]
        .map(|t| t.join().expect("the thread ran"));
        let [_, _, send, listen] = answers.map(|a| a.expect("every change was answered"));
        let new_send = string_of(&send, "send", "primary")?.key;
        let new_listen = string_of(&listen, "listen", "primary")?.key;

        // Both relays end with the same record: one of the two ports, and
        // both new keys.
        wait_for("both relays agreeing", 2, || {
            Ok(record(&node1)? == record(&node2)?)
        })?;
        for node in [&node1, &node2] {
            let shown = node.hc(&["show", "payroll"])?;
            let port = shown["port"].to_string();
            ensure!(
                port == port1 || port == port2,
                "round {round}: port {port}, not {port1} or {port2}: {shown}"
            );
            let keys = node.hc(&["keys", "payroll"])?;
            ensure!(
                string_of(&keys, "send", "primary")?.key == new_send,
                "round {round}: the new send key was lost: {keys}"
            );
            ensure!(
                string_of(&keys, "listen", "primary")?.key == new_listen,
                "round {round}: the new listen key was lost: {keys}"
            );
        }
    }
    Ok(())
}

#[test]
fn migrate_copies_a_single_relays_registry_into_etcd_and_refuses_to_overwrite() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    // A single relay with its file registry: two HCs, one key regenerated.
    let mut single = Relay::start()?;
    let (send, listen) = single.create_hc("payroll", echo_server_thread()?)?;
    single.create_hc("billing", "198.18.7.2:5432".parse()?)?;
    single.hc(&[
        "regenerate",
        "billing",
        "--rule",
        "send",
        "--key",
        "secondary",
    ])?;
    let keys_before = [
        single.hc(&["keys", "payroll"])?,
        single.hc(&["keys", "billing"])?,
    ];
    let manage_key = std::fs::read_to_string(single.data_dir.join("manage.key"))?;
    single.proc.kill();

    let migrate = |extra: &[&str]| -> Result<std::process::Output> {
        let from = single.data_dir.to_str().context("utf-8")?;
        Ok(Command::new(binary())
            .args(["relay", "migrate", "--from", from, "--to", &etcd.url()])
            .args(extra)
            .stdin(Stdio::null())
            .output()?)
    };
    let out = migrate(&[])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["hcs"], 2, "{report}");

    // A relay on etcd serves the same HCs with the same keys, the same
    // manage key, and the old listen and send keys work through it.
    let dir = tempfile::tempdir()?;
    let node = relay_on(&etcd, &dir)?;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("manage.key"))?,
        manage_key
    );
    let list = node.hc(&["list"])?;
    let names: Vec<&str> = list
        .as_array()
        .context("a list")?
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, ["billing", "payroll"]);
    for (name, before) in ["payroll", "billing"].iter().zip(&keys_before) {
        let after = node.hc(&["keys", name])?;
        for rule in ["send", "listen"] {
            for slot in ["primary", "secondary"] {
                assert_eq!(
                    string_of(&after, rule, slot)?.key,
                    string_of(before, rule, slot)?.key,
                    "{name} {rule} {slot}"
                );
            }
        }
    }
    let (send_here, listen_here) = node.strings("payroll")?;
    assert_eq!((&send_here.key, &listen_here.key), (&send.key, &listen.key));
    let agent = Agent::start(&[&listen_here], &[])?;
    agent.wait_connected()?;
    let mut stream = OpenStream::open(&send_here)?;
    assert_eq!(stream.echo("migrated\n")?, "migrated\n");
    stream.close();

    // Once more: refused, since the prefix is no longer empty; with
    // --force, done again.
    let out = migrate(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already holds") && err.contains("--force"),
        "{err}"
    );
    let out = migrate(&["--force"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An etcd that does not answer: said so.
    let closed = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let out = Command::new(binary())
        .args([
            "relay",
            "migrate",
            "--to",
            &format!("etcd://{closed}"),
            "--from",
        ])
        .arg(&single.data_dir)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "cannot copy the registry into etcd at http://{closed}"
        )),
        "{err}"
    );
    // A data dir with no registry is refused, naming the file.
    let empty = tempfile::tempdir()?;
    let out = Command::new(binary())
        .args(["relay", "migrate", "--to", &etcd.url(), "--from"])
        .arg(empty.path())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("registry.json"), "{err}");
    Ok(())
}

#[test]
fn a_relay_refuses_to_start_without_etcd_or_with_a_bad_registry_url() -> Result<()> {
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let out = relay_serve(dir.path())
        .args(["--registry", &format!("etcd://{closed}")])
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "it said it was ready");
    assert!(
        err.contains("cannot read the registry from etcd at")
            && err.contains("never starts without its registry"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(!dir.path().join("registry.json").exists());

    for (bad, says) in [
        ("http://127.0.0.1:2379", "does not start with etcd://"),
        ("etcd://127.0.0.1", "has no :PORT"),
    ] {
        let out = Command::new(binary())
            .args(["relay", "serve", "--registry", bad])
            .arg("--data-dir")
            .arg(dir.path())
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{bad}: {err}");
    }
    if err.is_empty() {
        bail!("no error at all");
    }
    Ok(())
}

#[test]
fn the_quota_holds_across_relays_and_a_new_manage_key_reaches_every_relay() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    let (dir1, dir2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let url = etcd.url();
    let one_hc = ["--registry", url.as_str(), "--max-hcs", "1"];
    let node1 = Arc::new(Relay::start_with(dir1.path(), "127.0.0.1:0", &one_hc)?);
    let node2 = Arc::new(Relay::start_with(dir2.path(), "127.0.0.1:0", &one_hc)?);

    // Two creates at the same moment through the two relays, with room for
    // one: one is made, the other refused for the quota.
    let barrier = Arc::new(Barrier::new(2));
    let create = |node: &Arc<Relay>, name: &'static str| {
        let node = Arc::clone(node);
        let barrier = Arc::clone(&barrier);
        std::thread::spawn(move || {
            barrier.wait();
            node.hc(&["create", name, "--host", "198.18.7.3", "--port", "80"])
        })
    };
    let answers = [create(&node1, "alpha"), create(&node2, "bravo")]
        .map(|t| t.join().expect("the thread ran"));
    let made = answers.iter().filter(|a| a.is_ok()).count();
    ensure!(made == 1, "{answers:?}");
    let refused = answers
        .iter()
        .find_map(|a| a.as_ref().err())
        .context("one refused")?
        .to_string();
    ensure!(
        refused.contains("already holds 1 hybrid connections, its limit"),
        "{refused}"
    );
    for node in [&node1, &node2] {
        wait_for("one HC on each relay", 2, || {
            Ok(node.hc(&["list"])?.as_array().map(Vec::len) == Some(1))
        })?;
    }

    // The primary manage key, regenerated through node 2: node 1's
    // manage.key follows within a second and opens node 1's API.
    let keys = node2.hc(&["manage-keys", "regenerate", "--key", "primary"])?;
    let primary = keys["primary"].as_str().context("a primary")?.to_owned();
    wait_for("node 1's manage.key following", 1, || {
        Ok(std::fs::read_to_string(dir1.path().join("manage.key"))?.trim() == primary)
    })?;
    assert_eq!(node1.hc(&["list"])?.as_array().map(Vec::len), Some(1));
    Ok(())
}

/// `GET /api/v1/registry` on `node`.
fn registry_health(node: &Relay) -> Result<serde_json::Value> {
    let key = std::fs::read_to_string(node.data_dir.join("manage.key"))?;
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-H"])
        .arg(format!("Authorization: Bearer {}", key.trim()))
        .arg(format!("http://{}/api/v1/registry", node.api))
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The relay's `hybridlink_relay_registry_writable`, from its metrics.
fn writable_metric(addr: &str) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://{addr}/metrics"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("hybridlink_relay_registry_writable "))
        .map(|l| l.to_string())
        .with_context(|| format!("no registry_writable in {text}"))
}

#[test]
fn with_etcd_down_relays_serve_what_they_know_refuse_changes_and_catch_up_after() -> Result<()> {
    let Some(mut etcd) = Etcd::start()? else {
        return Ok(());
    };
    let (dir1, dir2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let url = etcd.url();
    let node1 = Relay::start_with(
        dir1.path(),
        "127.0.0.1:0",
        &["--registry", &url, "--metrics", "127.0.0.1:0"],
    )?;
    let node2 = relay_on(&etcd, &dir2)?;
    let metrics = node1.ready["metrics"]
        .as_str()
        .context("metrics address in the ready line")?
        .to_string();
    let (send, listen) = node1.create_hc("payroll", echo_server_thread()?)?;
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let health = registry_health(&node1)?;
    ensure!(
        health["store"] == "etcd" && health["writable"] == true,
        "{health}"
    );

    // etcd down: both relays say so (API, metrics) and refuse changes,
    // saying why, after giving etcd the 5 s an election may take (at once
    // after that); a stream opened before and new streams go on.
    let mut before = OpenStream::open(&send)?;
    etcd.stop();
    wait_for("node 1 noticing etcd is down", 10, || {
        Ok(registry_health(&node1)?["writable"] == false)
    })?;
    let health = registry_health(&node1)?;
    ensure!(
        health["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{health}"
    );
    ensure!(
        writable_metric(&metrics)? == "hybridlink_relay_registry_writable 0",
        "metrics while etcd is down"
    );
    wait_for("node 2 noticing etcd is down", 10, || {
        Ok(registry_health(&node2)?["writable"] == false)
    })?;
    let asked = Instant::now();
    let err = node2
        .hc(&["update", "payroll", "--port", "81"])
        .expect_err("a change without etcd");
    let err = format!("{err:#}");
    ensure!(
        err.contains("does not answer") && err.contains("refuses changes"),
        "{err}"
    );
    ensure!(
        asked.elapsed() < Duration::from_secs(7),
        "the refusal took {:?}",
        asked.elapsed()
    );
    assert_eq!(before.echo("still flowing\n")?, "still flowing\n");
    before.close();
    let mut during = OpenStream::open(&send)?;
    assert_eq!(
        during.echo("opened while etcd is down\n")?,
        "opened while etcd is down\n"
    );
    during.close();

    // etcd back: changes are taken again and reach the relay whose watch
    // broke.
    etcd.restart()?;
    wait_for("a change through node 2 after the restart", 15, || {
        Ok(node2.hc(&["update", "payroll", "--port", "82"]).is_ok())
    })?;
    wait_for("node 1 seeing it", 10, || {
        Ok(node1.hc(&["show", "payroll"])?["port"] == 82)
    })?;
    ensure!(registry_health(&node1)?["writable"] == true);
    ensure!(writable_metric(&metrics)? == "hybridlink_relay_registry_writable 1");
    drop(agent);
    Ok(())
}

#[test]
fn a_relay_signs_in_to_etcd_with_a_password_kept_off_its_command_line_and_outlives_its_token()
-> Result<()> {
    // Tokens that expire after a second idle.
    let Some(etcd) = Etcd::start_with(&["--auth-token-ttl", "1"])? else {
        return Ok(());
    };
    etcd.enable_auth("s3cret")?;
    let dir = tempfile::tempdir()?;
    let secrets = tempfile::tempdir()?;
    let url = etcd.url();
    let serve = |password: Option<&str>| -> Result<std::process::Output> {
        let mut cmd = relay_serve(dir.path());
        cmd.args(["--registry", &url, "--etcd-user", "root"])
            .env_remove("HYBRIDLINK_ETCD_PASSWORD")
            .stdin(Stdio::null());
        if let Some(password) = password {
            cmd.env("HYBRIDLINK_ETCD_PASSWORD", password);
        }
        Ok(cmd.output()?)
    };
    // The wrong password: no start, and etcd's reason.
    let out = serve(Some("wrong"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("authentication failed"), "{err}");
    assert!(out.stdout.is_empty());
    // None: where it may come from.
    let out = serve(None)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("needs a password: set HYBRIDLINK_ETCD_PASSWORD or give --etcd-password-file"),
        "{err}"
    );

    // The right one, from a file.
    let password_file = secrets.path().join("etcd.password");
    std::fs::write(&password_file, "s3cret\n")?;
    let password_file = password_file.to_str().context("utf-8")?;
    let node = Relay::start_with(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--registry",
            &url,
            "--etcd-user",
            "root",
            "--etcd-password-file",
            password_file,
        ],
    )?;
    node.hc(&["create", "payroll", "--host", "198.18.7.5", "--port", "80"])?;
    // Its token has expired by now: changes go on.
    std::thread::sleep(Duration::from_millis(2500));
    node.hc(&["update", "payroll", "--port", "81"])?;
    assert_eq!(node.hc(&["show", "payroll"])?["port"], 81);
    Ok(())
}

#[test]
fn relays_reach_an_etcd_that_speaks_tls_and_asks_for_client_certificates() -> Result<()> {
    let Some(etcd) = Etcd::start_tls()? else {
        return Ok(());
    };
    let files = etcd.tls_files().context("TLS files")?.clone();
    let path = |p: &std::path::Path| p.to_str().context("utf-8").map(str::to_owned);
    let (ca, cert, key) = (
        path(&files.ca)?,
        path(&files.client_cert)?,
        path(&files.client_key)?,
    );
    let url = etcd.url();
    let dir = tempfile::tempdir()?;
    let serve = |flags: &[&str]| -> Result<std::process::Output> {
        Ok(relay_serve(dir.path())
            .args(["--registry", &url])
            .args(flags)
            .stdin(Stdio::null())
            .output()?)
    };
    // Without the CA, or without a client certificate: no start.
    for flags in [&[][..], &["--etcd-ca-file", &ca][..]] {
        let out = serve(flags)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {err}");
        assert!(
            err.contains("cannot read the registry from etcd at"),
            "{flags:?}: {err}"
        );
    }
    // With both: two relays share the registry over TLS.
    let tls = [
        "--registry",
        &url,
        "--etcd-ca-file",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
    ];
    let (dir1, dir2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let node1 = Relay::start_with(dir1.path(), "127.0.0.1:0", &tls)?;
    let node2 = Relay::start_with(dir2.path(), "127.0.0.1:0", &tls)?;
    node1.hc(&["create", "payroll", "--host", "198.18.7.6", "--port", "80"])?;
    wait_for("node 2 seeing it", 2, || {
        Ok(node2.hc(&["show", "payroll"]).is_ok())
    })?;
    Ok(())
}

#[test]
fn hundreds_of_hybrid_connections_are_copied_and_read_back_whole() -> Result<()> {
    let Some(etcd) = Etcd::start()? else {
        return Ok(());
    };
    // A single relay's registry.json with 250 HCs: more than one copying
    // transaction and more than one page of the relay's read at start.
    let single = tempfile::tempdir()?;
    let key = || proto::key::Key::generate().map(|k| k.as_str().to_owned());
    let mut hcs = Vec::new();
    for i in 0..250 {
        hcs.push(serde_json::json!({
            "name": format!("hc-{i:03}"),
            "endpoint": format!("198.18.8.{}:{}", i % 250 + 1, 1000 + i),
            "created_unix": 1_800_000_000u64 + i,
            "send": { "primary": key()?, "secondary": key()? },
            "listen": { "primary": key()?, "secondary": key()? },
        }));
    }
    let registry = serde_json::json!({
        "version": 2,
        "manage_keys": { "primary": key()?, "secondary": key()? },
        "hcs": hcs,
    });
    std::fs::write(
        single.path().join("registry.json"),
        serde_json::to_vec_pretty(&registry)?,
    )?;
    let out = Command::new(binary())
        .args(["relay", "migrate", "--to", &etcd.url(), "--from"])
        .arg(single.path())
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout)?["hcs"],
        250
    );

    let dir = tempfile::tempdir()?;
    let node = relay_on(&etcd, &dir)?;
    let list = node.hc(&["list"])?;
    let list = list.as_array().context("a list")?;
    assert_eq!(list.len(), 250);
    for (i, hc) in list.iter().enumerate() {
        assert_eq!(hc["name"], format!("hc-{i:03}"));
        assert_eq!(hc["port"], 1000 + i);
    }
    let keys = node.hc(&["keys", "hc-249"])?;
    assert_eq!(
        string_of(&keys, "listen", "secondary")?.key.as_str(),
        registry["hcs"][249]["listen"]["secondary"]
    );
    Ok(())
}

/// A relay restarted while etcd is down starts only when told to serve
/// from its cache: without `--serve-from-cache` it refuses (saying the
/// flag), with it it serves the hybrid connections it last saw (an agent
/// attaches, a stream flows) and refuses changes until etcd answers, then
/// takes them again.
#[test]
fn a_relay_restarted_while_etcd_is_down_serves_from_its_cache_only_when_told() -> Result<()> {
    let Some(mut etcd) = Etcd::start()? else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let url = etcd.url();
    let listen_addr = format!("127.0.0.1:{}", free_port()?);
    let node = Relay::start_with(dir.path(), &listen_addr, &["--registry", &url])?;
    let (send, listen) = node.create_hc("payroll", echo_server_thread()?)?;
    let cache = dir.path().join("registry-cache.json");
    wait_for("the registry cache", 10, || {
        Ok(std::fs::read_to_string(&cache).is_ok_and(|t| t.contains("\"payroll\"")))
    })?;
    drop(node);
    etcd.stop();

    let out = Command::new(binary())
        .args(["relay", "serve", "--data-dir"])
        .arg(dir.path())
        .args([
            "--listen",
            &listen_addr,
            "--api",
            "127.0.0.1:0",
            "--registry",
            &url,
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("--serve-from-cache"),
        "a restart without etcd: {err}"
    );

    // The same address and certificate: the strings made before still work.
    let node = Relay::start_with(
        dir.path(),
        &listen_addr,
        &["--registry", &url, "--serve-from-cache"],
    )?;
    let health = registry_health(&node)?;
    ensure!(health["writable"] == false, "{health}");
    let agent = Agent::start(&[&listen], &[])?;
    agent.wait_connected()?;
    let mut stream = OpenStream::open(&send)?;
    assert_eq!(
        stream.echo("served from the cache\n")?,
        "served from the cache\n"
    );
    stream.close();
    let err = node
        .hc(&["update", "payroll", "--port", "81"])
        .expect_err("a change while etcd is down");
    ensure!(format!("{err:#}").contains("refuses changes"), "{err:#}");

    etcd.restart()?;
    wait_for("changes taken once etcd answers", 20, || {
        Ok(node.hc(&["update", "payroll", "--port", "82"]).is_ok())
    })?;
    ensure!(registry_health(&node)?["writable"] == true);
    drop(agent);
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
