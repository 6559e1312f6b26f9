//! `hybridlink hc ...`: manage hybrid connections and the relay's manage
//! keys through the relay's management API (plain HTTP on the relay host's
//! loopback, or HTTPS from anywhere; see [`crate::api_client`]).
//!
//! Every command prints the API's JSON answer on stdout, pretty-printed; an
//! error becomes a one-line reason (the API's own where it gave one).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use proto::name::{HcName, Host};
use serde_json::{Value, json};

use crate::api_client::{ApiUrl, Client, ClientOptions, Trust};

/// Where the management API is and how to authenticate to it.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Base URL of the relay's management API: http:// on the relay's host
    /// (or through an SSH tunnel), https:// from elsewhere (`relay serve
    /// --api-tls`). Plain http:// to another host needs --insecure.
    #[arg(
        long = "api",
        value_name = "URL",
        env = "HYBRIDLINK_API",
        default_value = "http://127.0.0.1:9444",
        global = true
    )]
    pub api: String,

    /// For an https:// API: the SHA-256 of the certificate it must present,
    /// 64 hex digits (the relay's own: `cert_sha256` in `relay serve`'s
    /// ready line, or CertificateSha256 in any of its connection strings).
    #[arg(
        long,
        value_name = "HEX",
        env = "HYBRIDLINK_API_CERT_SHA256",
        conflicts_with = "api_ca",
        global = true
    )]
    pub api_cert_sha256: Option<proto::control::Fingerprint>,

    /// For an https:// API: a PEM file of the certificates to trust for it
    /// (the CA of a TLS proxy in front of the relay, or the relay's
    /// DATA_DIR/cert.pem); the URL's host must be a name they certify. The
    /// system's CA roots are never used.
    #[arg(long, value_name = "FILE", env = "HYBRIDLINK_API_CA", global = true)]
    pub api_ca: Option<PathBuf>,

    /// Allow a plain http:// API on a host that is not this one. Requests
    /// carry a token that expires in 5 minutes, never the key, but until
    /// then anyone who reads it off the network can use it.
    #[arg(long, global = true)]
    pub insecure: bool,

    /// The relay's data directory, to read the manage key from DIR/manage.key
    /// (works on the relay host; for an https:// API without
    /// --api-cert-sha256 or --api-ca, DIR/cert.pem is pinned too). The
    /// environment variable HYBRIDLINK_MANAGE_KEY, if set, gives a manage key
    /// (primary or secondary) directly and takes precedence.
    #[arg(long, value_name = "DIR", env = "HYBRIDLINK_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,

    /// Print the API's JSON answer instead of a table (create, keys and
    /// regenerate always print JSON).
    #[arg(long, global = true)]
    pub json: bool,
}

/// A rule of a hybrid connection, for `hc regenerate --rule`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleArg {
    /// The send rule: the application side (appliance, connect, forward).
    Send,
    /// The listen rule: the on-premises agent.
    Listen,
}

impl RuleArg {
    /// The rule's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleArg::Send => "send",
            RuleArg::Listen => "listen",
        }
    }
}

/// One of a rule's two keys, for `hc regenerate --key`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotArg {
    /// The primary key.
    Primary,
    /// The secondary key.
    Secondary,
}

impl SlotArg {
    /// The key's name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotArg::Primary => "primary",
            SlotArg::Secondary => "secondary",
        }
    }
}

/// The relay's manage keys, for `hc manage-keys`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ManageKeysCommand {
    /// Print the relay's two manage keys as JSON (`primary`, `secondary`);
    /// with `--key`, just that one (for scripts:
    /// `HYBRIDLINK_MANAGE_KEY=$(hybridlink hc manage-keys show --key secondary)`).
    Show {
        /// Print only this key.
        #[arg(long, value_enum)]
        key: Option<SlotArg>,
    },
    /// Replace one manage key with a new random key and print both as JSON.
    /// Requests made with the old key are refused at once (the portal signs
    /// out, scripts get 401); the other key keeps working, so move the tools
    /// to it first. A new primary is also written to DATA_DIR/manage.key.
    Regenerate {
        /// Which of the two keys to replace.
        #[arg(long, value_enum)]
        key: SlotArg,
    },
}

/// Hybrid-connection management commands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum HcCommand {
    /// Create a hybrid connection for HOST:PORT and print it with its four
    /// connection strings (send and listen, primary and secondary), as JSON.
    ///
    /// Give a listen string to `hybridlink agent run` next to the service and
    /// a send string to the application side.
    Create {
        /// Name of the hybrid connection: 1-64 characters of a-z, 0-9 and
        /// '-', not starting or ending with '-' (upper case is folded).
        name: HcName,
        /// Host the agent dials: a DNS name (FQDN or short) or an IPv4
        /// address, as the application knows it.
        #[arg(long)]
        host: Host,
        /// TCP port the agent dials (1-65535).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
    },
    /// List the hybrid connections: name, endpoint, whether an agent serves
    /// it.
    List,
    /// Show one hybrid connection and the agents serving it (on a relay
    /// cluster: per node, with each node's agents, senders and pipes).
    Show {
        /// Name of the hybrid connection.
        name: HcName,
    },
    /// Whether each hybrid connection (or just NAME) is served: `Connected`
    /// with its agents (address, connected since), or `Not connected`. On a
    /// relay cluster, asked of any node: the agents of every node, each
    /// with its node, and the nodes with their state (up, stale,
    /// certificate_mismatch, registry_not_writable).
    Status {
        /// Only this hybrid connection.
        name: Option<HcName>,
    },
    /// Change the endpoint of a hybrid connection in place. Agents use the
    /// new host:port for new streams at once; open streams are not touched.
    Update {
        /// Name of the hybrid connection.
        name: HcName,
        /// The new host.
        #[arg(long, required_unless_present = "port")]
        host: Option<Host>,
        /// The new port.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
    },
    /// Delete a hybrid connection and its keys; its agents and senders are
    /// detached at once.
    Delete {
        /// Name of the hybrid connection.
        name: HcName,
    },
    /// Print the four connection strings of a hybrid connection as JSON:
    /// send and listen, each with its primary and secondary key. With
    /// `--rule` and `--key`, print just that one string (for scripts:
    /// `CS=$(hybridlink hc keys NAME --rule listen --key primary)`).
    Keys {
        /// Name of the hybrid connection.
        name: HcName,
        /// Print only a string of this rule (needs `--key`).
        #[arg(long, value_enum, requires = "key")]
        rule: Option<RuleArg>,
        /// Print only a string with this key (needs `--rule`).
        #[arg(long, value_enum, requires = "rule")]
        key: Option<SlotArg>,
        /// Print the strings as Azure Relay's own clients (.NET, Java)
        /// parse them: without `CertificateSha256`, which their parsers
        /// reject. Those clients check the relay's certificate against the
        /// system's trust store instead; hybridlink's peers need the part.
        #[arg(long)]
        azure: bool,
    },
    /// Replace one key of one rule with a new random key and print the
    /// connection strings as JSON. New sessions signed with the old key are
    /// refused at once; move clients to the other key first.
    Regenerate {
        /// Name of the hybrid connection.
        name: HcName,
        /// The rule whose key to replace.
        #[arg(long, value_enum)]
        rule: RuleArg,
        /// Which of the rule's two keys to replace.
        #[arg(long, value_enum)]
        key: SlotArg,
    },
    /// Show or regenerate the relay's own two manage keys, which guard this
    /// API and the portal (either one opens them).
    #[command(subcommand)]
    ManageKeys(ManageKeysCommand),
}

/// Runs one `hc` command against the management API and prints its JSON
/// answer on stdout.
pub fn run(cmd: HcCommand, api: &ApiArgs) -> anyhow::Result<()> {
    let client = client(api)?;
    let answer = match cmd {
        HcCommand::Create { name, host, port } => client.call(
            "POST",
            "/api/v1/hcs",
            Some(json!({ "name": name, "host": host, "port": port })),
        )?,
        HcCommand::List if api.json => client.call("GET", "/api/v1/hcs", None)?,
        HcCommand::List => {
            let all = client.call("GET", "/api/v1/status", None)?;
            return print_line(&with_nodes(&client, status_table(&all)));
        }
        HcCommand::Show { name } => {
            let hc = client.call("GET", &format!("/api/v1/hcs/{name}"), None)?;
            if api.json {
                hc
            } else {
                let status = client.call("GET", &format!("/api/v1/hcs/{name}/status"), None)?;
                return print_line(&show_text(&hc, &status));
            }
        }
        HcCommand::Status { name } => {
            let answer = match &name {
                Some(name) => {
                    let one = client.call("GET", &format!("/api/v1/hcs/{name}/status"), None)?;
                    if api.json {
                        one
                    } else {
                        Value::Array(vec![one])
                    }
                }
                None => client.call("GET", "/api/v1/status", None)?,
            };
            if api.json {
                answer
            } else {
                return print_line(&with_nodes(&client, status_table(&answer)));
            }
        }
        HcCommand::Update { name, host, port } => {
            let mut body = serde_json::Map::new();
            if let Some(host) = host {
                body.insert("host".into(), json!(host));
            }
            if let Some(port) = port {
                body.insert("port".into(), json!(port));
            }
            let hc = client.call(
                "PATCH",
                &format!("/api/v1/hcs/{name}"),
                Some(Value::Object(body)),
            )?;
            if api.json {
                hc
            } else {
                return print_line(&format!(
                    "{} now reaches {}; agents use it for new streams",
                    hc["name"].as_str().unwrap_or("?"),
                    hc["endpoint"].as_str().unwrap_or("?")
                ));
            }
        }
        HcCommand::Delete { name } => {
            let hc = client.call("DELETE", &format!("/api/v1/hcs/{name}"), None)?;
            if api.json {
                hc
            } else {
                return print_line(&format!(
                    "deleted {} ({}) and its keys",
                    hc["name"].as_str().unwrap_or("?"),
                    hc["endpoint"].as_str().unwrap_or("?")
                ));
            }
        }
        HcCommand::Keys {
            name,
            rule,
            key,
            azure,
        } => {
            let mut all = client.call("GET", &format!("/api/v1/hcs/{name}/keys"), None)?;
            if azure {
                for_azure_clients(&mut all["connection_strings"]);
            }
            match (rule, key) {
                (Some(rule), Some(key)) => {
                    let one = &all["connection_strings"][rule.as_str()][key.as_str()];
                    let one = one
                        .as_str()
                        .context("the API's answer has no such connection string")?;
                    return print_line(one);
                }
                _ => all,
            }
        }
        HcCommand::Regenerate { name, rule, key } => client.call(
            "POST",
            &format!("/api/v1/hcs/{name}/keys/regenerate"),
            Some(json!({ "rule": rule.as_str(), "key": key.as_str() })),
        )?,
        HcCommand::ManageKeys(ManageKeysCommand::Show { key }) => {
            let keys = client.call("GET", "/api/v1/manage-keys", None)?;
            match key {
                Some(key) => {
                    let one = keys[key.as_str()]
                        .as_str()
                        .context("the API's answer has no such manage key")?;
                    return print_line(one);
                }
                None => keys,
            }
        }
        HcCommand::ManageKeys(ManageKeysCommand::Regenerate { key }) => client.call(
            "POST",
            "/api/v1/manage-keys/regenerate",
            Some(json!({ "key": key.as_str() })),
        )?,
    };
    print_line(&serde_json::to_string_pretty(&answer)?)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// "3m ago" for a Unix time.
fn ago(unix: u64) -> String {
    let secs = unix_now().saturating_sub(unix);
    match secs {
        0..120 => format!("{secs}s ago"),
        120..7200 => format!("{}m ago", secs / 60),
        7200..172_800 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// A table of HC statuses (the answer of `/api/v1/status`).
fn status_table(all: &Value) -> String {
    let mut out = format!(
        "{:<24} {:<32} {:<14} {}",
        "NAME", "ENDPOINT", "STATUS", "AGENTS"
    );
    let list = all.as_array().map(Vec::as_slice).unwrap_or_default();
    for hc in list {
        let agents: Vec<String> = per_node_listeners(hc)
            .into_iter()
            .map(|(l, node)| {
                let mut line = format!(
                    "{} {} (since {}, end-to-end: {})",
                    printable(l["label"].as_str().unwrap_or("?")),
                    printable(l["address"].as_str().unwrap_or("?")),
                    ago(l["connected_since"].as_u64().unwrap_or(0)),
                    printable(l["end_to_end"].as_str().unwrap_or("?")),
                );
                if let Some(node) = node {
                    line.push_str(&format!(" on {}", printable(node)));
                }
                if let Some(refusal) = l["policy_refusal"].as_str() {
                    line.push_str(&format!(" [{}]", printable(refusal)));
                }
                line
            })
            .chain(azure_listener_lines(hc))
            .collect();
        out.push_str(&format!(
            "\n{:<24} {:<32} {:<14} {}",
            hc["name"].as_str().unwrap_or("?"),
            hc["endpoint"].as_str().unwrap_or("?"),
            hc["status"].as_str().unwrap_or("?"),
            if agents.is_empty() {
                "-".to_string()
            } else {
                agents.join(", ")
            }
        ));
    }
    if list.is_empty() {
        out.push_str("\n(no hybrid connections; create one with `hybridlink hc create`)");
    }
    out
}

/// The agents of one HC's status, each with the relay node it is attached
/// on when the relay is a cluster (`cluster` in the answer), else this
/// relay's own.
fn per_node_listeners(status: &Value) -> Vec<(&Value, Option<&str>)> {
    match status["cluster"].as_array() {
        Some(nodes) if !nodes.is_empty() => nodes
            .iter()
            .flat_map(|n| {
                let node = n["node"].as_str();
                n["listeners"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |l| (l, node))
            })
            .collect(),
        _ => status["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| (l, None))
            .collect(),
    }
}

/// `table` with the relay nodes and their state under it, when the relay
/// is a cluster (a relay that cannot say is shown without them).
fn with_nodes(client: &Client, table: String) -> String {
    match client.call("GET", "/api/v1/nodes", None) {
        Ok(nodes) => match nodes_footer(&nodes) {
            Some(footer) => format!("{table}\n\n{footer}"),
            None => table,
        },
        Err(_) => table,
    }
}

/// The relay nodes of `GET /api/v1/nodes` with their state, one line;
/// `None` for a relay on its own.
fn nodes_footer(nodes: &Value) -> Option<String> {
    let states = nodes["states"].as_array().filter(|s| !s.is_empty())?;
    let each: Vec<String> = states
        .iter()
        .map(|n| {
            let mut text = format!(
                "{} {}",
                printable(n["address"].as_str().unwrap_or("?")),
                n["state"].as_str().unwrap_or("?")
            );
            if n["this_node"].as_bool() == Some(true) {
                text.push_str(" (this node)");
            }
            text
        })
        .collect();
    let mut out = format!("relay nodes: {}", each.join(", "));
    for n in states {
        for problem in n["problems"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "\n  {}: {}",
                printable(n["address"].as_str().unwrap_or("?")),
                printable(problem.as_str().unwrap_or("?"))
            ));
        }
    }
    Some(out)
}

/// One HC as `key: value` lines.
fn show_text(hc: &Value, status: &Value) -> String {
    let mut out = format!(
        "name:      {}\nendpoint:  {}\ncreated:   {}\nstatus:    {}",
        hc["name"].as_str().unwrap_or("?"),
        hc["endpoint"].as_str().unwrap_or("?"),
        ago(hc["created_unix"].as_u64().unwrap_or(0)),
        status["status"].as_str().unwrap_or("?"),
    );
    let st = &status["streams"];
    let n = |k: &str| st[k].as_u64().unwrap_or(0);
    out.push_str(&format!(
        "\nstreams:   {} open, {} opened, {} refused (as the agents report them)\nbytes:     {} to the target, {} from it",
        n("open"),
        n("opened"),
        n("refused"),
        n("bytes_to_target"),
        n("bytes_from_target")
    ));
    for n in status["cluster"].as_array().into_iter().flatten() {
        let st = &n["streams"];
        let n_of = |k: &str| st[k].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "\nnode:      {} ({}): {} agents, {} senders, {} pipes, {} streams open, {} opened",
            printable(n["node"].as_str().unwrap_or("?")),
            printable(n["node_state"].as_str().unwrap_or("?")),
            n["listener_count"].as_u64().unwrap_or(0),
            n["senders"].as_u64().unwrap_or(0),
            n["pipes"].as_u64().unwrap_or(0),
            n_of("open"),
            n_of("opened"),
        ));
    }
    for (l, node) in per_node_listeners(status) {
        out.push_str(&format!(
            "\nagent:     {} at {}, connected {}, end-to-end: {}",
            printable(l["label"].as_str().unwrap_or("?")),
            printable(l["address"].as_str().unwrap_or("?")),
            ago(l["connected_since"].as_u64().unwrap_or(0)),
            printable(l["end_to_end"].as_str().unwrap_or("?")),
        ));
        if let Some(node) = node {
            out.push_str(&format!(", on {}", printable(node)));
        }
        if let Some(refusal) = l["policy_refusal"].as_str() {
            out.push_str(&format!("\n           {}", printable(refusal)));
        }
    }
    for line in azure_listener_lines(status) {
        out.push_str(&format!("\nlistener:  {line}"));
    }
    out
}

/// The Azure-protocol listeners of one HC's status, one line each, saying
/// what kind they are: the relay sees their traffic.
fn azure_listener_lines(status: &Value) -> impl Iterator<Item = String> + '_ {
    status["azure_listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            format!(
                "{} at {} (since {}; relay sees payload)",
                printable(l["kind"].as_str().unwrap_or("?")),
                printable(l["address"].as_str().unwrap_or("?")),
                ago(l["connected_since"].as_u64().unwrap_or(0)),
            )
        })
}

/// `text` with control characters (newlines, terminal escapes) shown as
/// escapes, so that what a peer reported cannot rewrite the admin's
/// terminal or forge lines.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Prints `text` and a newline on stdout.
fn print_line(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        // A reader that stops early (`| head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("writing to stdout"),
    }
}

/// The API client `api` describes: URL, trust and manage key.
fn client(api: &ApiArgs) -> anyhow::Result<Client> {
    let url = ApiUrl::parse(&api.api, api.insecure)?;
    let trust = match (&api.api_cert_sha256, &api.api_ca, &api.data_dir) {
        (Some(pin), _, _) => Some(Trust::Pinned(*pin)),
        (None, Some(file), _) => Some(Trust::from_ca_file(file)?),
        (None, None, Some(dir)) if url.tls => Some(Trust::from_data_dir(dir)?),
        (None, None, _) => None,
    };
    let key = crate::api_client::manage_key(api.data_dir.as_deref())?;
    Client::new(ClientOptions { url, trust, key })
}

/// Drops the `CertificateSha256` part of every connection string under
/// `strings` (rule → slot → string): the form Azure Relay's .NET and Java
/// parsers accept.
fn for_azure_clients(strings: &mut serde_json::Value) {
    let Some(rules) = strings.as_object_mut() else {
        return;
    };
    for slots in rules.values_mut() {
        let Some(slots) = slots.as_object_mut() else {
            continue;
        };
        for cs in slots.values_mut() {
            if let Some(text) = cs.as_str() {
                let kept: Vec<&str> = text
                    .split(';')
                    .filter(|part| !part.starts_with("CertificateSha256="))
                    .collect();
                *cs = serde_json::Value::String(kept.join(";"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    #[test]
    fn the_azure_form_drops_only_the_certificate_hash() {
        let key = proto::key::Key::generate().unwrap();
        let pinned = format!(
            "Endpoint=sb://relay.example:9443/;SharedAccessKeyName=send;SharedAccessKey={};EntityPath=payroll;CertificateSha256={}",
            key.as_str(),
            "0f".repeat(32)
        );
        let mut strings = json!({ "send": { "primary": pinned }, "listen": {} });
        for_azure_clients(&mut strings);
        let azure = strings["send"]["primary"].as_str().unwrap();
        assert_eq!(
            azure,
            format!(
                "Endpoint=sb://relay.example:9443/;SharedAccessKeyName=send;SharedAccessKey={};EntityPath=payroll",
                key.as_str()
            )
        );
        let parsed: proto::connection_string::ConnectionString = azure.parse().unwrap();
        assert_eq!(parsed.cert_sha256, None);
        assert_eq!(parsed.hc.as_str(), "payroll");
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("hybridlink-hc-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(subcommand)]
        cmd: HcCommand,
        #[command(flatten)]
        api: ApiArgs,
    }

    #[test]
    fn parses_every_command() {
        let cli = TestCli::try_parse_from([
            "t",
            "create",
            "Payroll",
            "--host",
            "sql.corp",
            "--port",
            "1433",
            "--api",
            "http://x:1",
        ])
        .unwrap();
        match cli.cmd {
            HcCommand::Create { name, host, port } => {
                assert_eq!(name.as_str(), "payroll");
                assert_eq!(host.to_string(), "sql.corp");
                assert_eq!(port, 1433);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(cli.api.api, "http://x:1");
        let cli = TestCli::try_parse_from([
            "t",
            "regenerate",
            "payroll",
            "--rule",
            "listen",
            "--key",
            "secondary",
        ])
        .unwrap();
        assert!(matches!(
            cli.cmd,
            HcCommand::Regenerate {
                rule: RuleArg::Listen,
                key: SlotArg::Secondary,
                ..
            }
        ));
        let cli = TestCli::try_parse_from(["t", "manage-keys", "regenerate", "--key", "primary"])
            .unwrap();
        assert!(matches!(
            cli.cmd,
            HcCommand::ManageKeys(ManageKeysCommand::Regenerate {
                key: SlotArg::Primary
            })
        ));
        let cli = TestCli::try_parse_from([
            "t",
            "manage-keys",
            "show",
            "--api",
            "https://relay:9444",
            "--api-cert-sha256",
            &"ab".repeat(32),
        ])
        .unwrap();
        assert!(matches!(
            cli.cmd,
            HcCommand::ManageKeys(ManageKeysCommand::Show { key: None })
        ));
        assert_eq!(cli.api.api_cert_sha256.unwrap().0, [0xab; 32]);
        for args in [
            &["t", "create", "bad_name", "--host", "h", "--port", "1"][..],
            &["t", "manage-keys", "regenerate"],
            &["t", "manage-keys", "regenerate", "--key", "tertiary"],
            &["t", "list", "--api-cert-sha256", "abc"],
            &[
                "t",
                "list",
                "--api-cert-sha256",
                &"ab".repeat(32),
                "--api-ca",
                "ca.pem",
            ],
            &["t", "create", "a", "--host", "h", "--port", "0"],
            &["t", "create", "a", "--host", "bad host", "--port", "1"],
            &[
                "t",
                "regenerate",
                "a",
                "--rule",
                "manage",
                "--key",
                "primary",
            ],
            &["t", "show"],
        ] {
            assert!(TestCli::try_parse_from(args).is_err(), "{args:?}");
        }
    }

    /// Serves one canned HTTP answer and returns the request it got.
    fn serve_once(status: &str, body: &str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            reader.get_mut().write_all(answer.as_bytes()).unwrap();
            head + &String::from_utf8(body).unwrap()
        });
        (url, handle)
    }

    fn args(url: String, dir: &std::path::Path) -> ApiArgs {
        ApiArgs {
            api: url,
            api_cert_sha256: None,
            api_ca: None,
            insecure: false,
            data_dir: Some(dir.to_owned()),
            json: false,
        }
    }

    const KEY: &str = "c2VjcmV0LWtleS1zZWNyZXQta2V5LXNlY3JldC1rZXk=";

    #[test]
    fn sends_a_short_lived_token_never_the_key_and_returns_json() {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("manage.key"), format!("{KEY}\n")).unwrap();
        let (url, server) = serve_once("201 Created", "{\"name\":\"payroll\"}");
        let client = client(&args(url.clone(), dir.path())).unwrap();
        let answer = client
            .call("POST", "/api/v1/hcs", Some(json!({"name": "payroll"})))
            .unwrap();
        assert_eq!(answer, json!({"name": "payroll"}));
        let request = server.join().unwrap();
        assert!(
            request.starts_with("POST /api/v1/hcs HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(!request.contains(KEY), "{request}");
        let auth = request
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(name, _)| name.eq_ignore_ascii_case("authorization"))
            })
            .map(|(_, value)| value.trim().to_owned())
            .expect("an Authorization header");
        // The token the relay would check: for `.../manage`, rule manage,
        // signed with the key, expiring in five minutes.
        let key: proto::key::Key = KEY.parse().unwrap();
        let rule = proto::sas::RuleKeys {
            name: "manage",
            right: proto::key::Right::Manage,
            primary: &key,
            secondary: &key,
        };
        let now = unix_now();
        let verified = proto::sas::verify(
            &auth,
            &"manage".parse().unwrap(),
            proto::key::Right::Manage,
            &[rule],
            now,
        )
        .unwrap();
        let lifetime = verified.expires_unix - now;
        assert!((295..=300).contains(&lifetime), "{lifetime}");
        assert!(auth.contains(&proto::sas::url_encode(&format!("{url}/manage"))));
        let (_, body) = request.split_once("\r\n\r\n").unwrap();
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body, json!({"name": "payroll"}));
    }

    #[test]
    fn api_errors_become_their_one_line_reason() {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("manage.key"), KEY).unwrap();
        let (url, server) = serve_once(
            "409 Conflict",
            "{\"error\":\"hybrid connection payroll already exists\"}",
        );
        let client = client(&args(url, dir.path())).unwrap();
        let err = client.call("GET", "/api/v1/hcs/payroll", None).unwrap_err();
        assert_eq!(err.to_string(), "hybrid connection payroll already exists");
        server.join().unwrap();

        let (url, server) = serve_once("502 Bad Gateway", "upstream down");
        let client = super::client(&args(url, dir.path())).unwrap();
        let err = client.call("GET", "/api/v1/hcs", None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "management API answered 502 Bad Gateway: upstream down"
        );
        server.join().unwrap();
    }

    #[test]
    fn unreachable_api_missing_key_and_untrusted_https_are_clear() {
        let dir = TempDir::new();
        // Take a free port, then close it so nothing listens there.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(dir.path().join("manage.key"), KEY).unwrap();
        let reachable = client(&args(format!("http://127.0.0.1:{port}"), dir.path())).unwrap();
        let err = reachable.call("GET", "/api/v1/hcs", None).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "cannot reach the management API at http://127.0.0.1:{port}: "
            )),
            "{err}"
        );

        // https:// with neither a pin, a CA file nor the relay's cert.pem.
        let err = client(&args("https://relay:9444".into(), dir.path())).unwrap_err();
        assert!(
            err.to_string()
                .contains("give --api-cert-sha256 HEX or --api-ca FILE"),
            "{err}"
        );
        let err = client(&args("http://relay.example:9444".into(), dir.path())).unwrap_err();
        assert!(err.to_string().contains("--insecure"), "{err}");

        // The tests never set HYBRIDLINK_MANAGE_KEY, so the file is needed.
        if std::env::var_os("HYBRIDLINK_MANAGE_KEY").is_none() {
            let empty = TempDir::new();
            let err = client(&args("http://127.0.0.1:1".into(), empty.path())).unwrap_err();
            assert!(
                format!("{err:#}").starts_with("cannot read the manage key from "),
                "{err:#}"
            );
            std::fs::write(empty.path().join("manage.key"), "not a key!").unwrap();
            let err = client(&args("http://127.0.0.1:1".into(), empty.path())).unwrap_err();
            assert!(
                err.to_string().contains("does not hold a manage key"),
                "{err}"
            );
            let mut no_dir = args("http://127.0.0.1:1".into(), empty.path());
            no_dir.data_dir = None;
            let err = client(&no_dir).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("no manage key: pass --data-dir DIR")
            );
        }
    }
}
