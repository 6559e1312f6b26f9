//! `hybridlink connect` and `hybridlink forward`: the sending side without
//! root, for scripts, troubleshooting and apps that can be pointed at a
//! local port.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use proto::connection_string::ConnectionString;
use proto::name::HcName;
use tokio::io::{AsyncWriteExt, copy};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, info, info_span, warn};
use transport::azure::AzureSender;
use transport::sender::{Sender, SenderOptions};

/// Options shared by `connect` and `forward`.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// How many seconds to wait for the relay and a live agent.
    #[arg(long, default_value_t = 10)]
    pub wait: u64,
    /// For a connection string without CertificateSha256 (Azure Relay's
    /// protocol: an Azure Relay namespace, or a hybridlink relay with a
    /// CA-issued certificate): the CA certificates (PEM) that may issue the
    /// relay's certificate. Default: the system's.
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Over Azure Relay's protocol: how each stream begins. `azbridge`
    /// sends azbridge's stream preamble, which hybridlink agents and
    /// `azbridge -T` listeners expect; `raw` sends data from the first
    /// byte, for a listener app that reads plain WebSocket messages.
    #[arg(long, value_enum, default_value_t = Framing::Azbridge)]
    pub framing: Framing,
    /// Over Azure Relay's protocol with azbridge framing: the port name
    /// the preamble asks for (an `azbridge -T` listener with several
    /// forwarders picks one by it; with one, any number will do).
    #[arg(long, default_value = "0", value_name = "NAME")]
    pub port_name: String,
}

/// `--framing`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// azbridge's stream preamble first.
    Azbridge,
    /// Data from the first byte.
    Raw,
}

/// The Azure-protocol sender `args` describe for `cs`.
fn azure_sender(cs: &ConnectionString, args: &SendArgs) -> anyhow::Result<AzureSender> {
    let framing = match args.framing {
        Framing::Azbridge => transport::azure::Framing::Azbridge(args.port_name.clone()),
        Framing::Raw => transport::azure::Framing::Raw,
    };
    Ok(AzureSender::new(cs, args.ca_file.as_deref(), framing)?)
}

/// Where `connect` and `forward` take their send connection string from.
#[derive(Args, Debug)]
pub struct StringArgs {
    /// A send connection string (`hybridlink hc keys NAME`). Other users of
    /// this machine can read a command line: prefer
    /// --connection-string-file or HYBRIDLINK_CONNECTION_STRING.
    #[arg(value_name = "CONNECTION_STRING")]
    pub connection_string: Option<ConnectionString>,
    /// Read the send connection string from FILE, or from standard input
    /// with `-` (one line; `#` starts a comment). Without this or the
    /// argument, HYBRIDLINK_CONNECTION_STRING holds it.
    #[arg(long, value_name = "FILE")]
    pub connection_string_file: Option<std::path::PathBuf>,
}

impl StringArgs {
    /// The one connection string, wherever it was given.
    fn resolve(self) -> anyhow::Result<ConnectionString> {
        crate::connection_strings::gather_one(
            self.connection_string,
            self.connection_string_file.as_deref(),
            crate::connection_strings::from_env(),
        )
    }
}

/// `hybridlink connect`.
#[derive(Args, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub strings: StringArgs,
    /// Only check reachability, like a tcpping: open one stream (the agent
    /// dials the target), print how long that took, close it. Exit 1 with
    /// the reason when the relay, the agent or the target refuses.
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub send: SendArgs,
}

/// `hybridlink forward`.
#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Local address to listen on, e.g. 127.0.0.1:5432.
    #[arg(long)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub strings: StringArgs,
    #[command(flatten)]
    pub send: SendArgs,
}

fn sender(cs: &ConnectionString, args: &SendArgs, label: &str) -> anyhow::Result<Sender> {
    let options = SenderOptions {
        ready_timeout: Duration::from_secs(args.wait),
        label: label.to_string(),
        ..SenderOptions::default()
    };
    Ok(Sender::start(vec![cs.clone()], options)?)
}

/// Joins one stream to stdin/stdout. stdin's end is passed on as a
/// half-close; the command ends when the remote side closes.
pub async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    if !args.check
        && args.strings.connection_string_file.as_deref() == Some(std::path::Path::new("-"))
    {
        return Err(crate::connection_strings::UsageError(
            "connect joins standard input to the stream, so it cannot also read the connection string there; give it in a file or in HYBRIDLINK_CONNECTION_STRING (`connect --check` may read it from standard input)".into(),
        )
        .into());
    }
    let cs = args.strings.resolve()?;
    if cs.cert_sha256.is_none() {
        return connect_azure(&cs, args.check, &args.send).await;
    }
    let sender = sender(&cs, &args.send, "connect")?;
    let started = std::time::Instant::now();
    let stream = sender.open(&cs.hc).await?;
    if args.check {
        let took = started.elapsed();
        let endpoint = sender
            .endpoints()
            .into_iter()
            .find_map(|(name, ep)| ep.filter(|_| name == cs.hc))
            .map(|ep| ep.to_string())
            .unwrap_or_else(|| "its endpoint".into());
        println!(
            "{}: {endpoint} reachable through the relay and an agent ({} ms)",
            cs.hc,
            took.as_millis()
        );
        drop(stream);
        return Ok(());
    }
    let (mut rx, mut tx) = tokio::io::split(stream);
    let upload = async move {
        let mut stdin = tokio::io::stdin();
        let r = copy(&mut stdin, &mut tx).await;
        let _ = tx.shutdown().await;
        r
    };
    let download = async move {
        let mut stdout = tokio::io::stdout();
        let r = copy(&mut rx, &mut stdout).await;
        let _ = stdout.flush().await;
        r
    };
    tokio::pin!(upload);
    let mut upload_done = false;
    tokio::pin!(download);
    loop {
        tokio::select! {
            r = &mut upload, if !upload_done => {
                upload_done = true;
                r.context("sending stdin")?;
            }
            r = &mut download => {
                r.context("receiving from the hybrid connection")?;
                return Ok(());
            }
        }
    }
}

/// `connect` over Azure Relay's protocol: one WebSocket joined to
/// stdin/stdout, half-close included.
async fn connect_azure(cs: &ConnectionString, check: bool, send: &SendArgs) -> anyhow::Result<()> {
    let sender = azure_sender(cs, send)?;
    let started = std::time::Instant::now();
    let stream = sender.open().await.map_err(anyhow::Error::msg)?;
    if check {
        println!(
            "{}: reachable through the relay and a listener, over Azure Relay's protocol, {} ({} ms)",
            cs.hc,
            if stream.is_inner() {
                "TLS inside the WebSocket to a hybridlink agent"
            } else {
                "the relay sees the bytes"
            },
            started.elapsed().as_millis()
        );
        return Ok(());
    }
    let stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    stream.join(stdio).await;
    Ok(())
}

/// How `forward` reaches the hybrid connection.
#[derive(Debug, Clone)]
enum Route {
    /// Through a hybridlink relay's pipes.
    Native(Sender),
    /// One Azure-protocol WebSocket per connection.
    Azure(Box<AzureSender>),
}

impl Route {
    /// Forwards `conn` through a new stream; a refused stream resets it.
    async fn serve(self, hc: HcName, mut conn: TcpStream) {
        let _ = conn.set_nodelay(true);
        let refused = match self {
            Route::Native(sender) => match sender.open(&hc).await {
                Ok(mut stream) => {
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut conn,
                        &mut stream,
                        256 * 1024,
                        256 * 1024,
                    )
                    .await;
                    return;
                }
                Err(e) => anyhow::Error::from(e),
            },
            Route::Azure(sender) => match sender.open().await {
                Ok(stream) => {
                    stream.join(conn).await;
                    return;
                }
                Err(e) => anyhow::Error::msg(e),
            },
        };
        warn!(error = %refused, "stream refused; resetting the local connection");
        // Closing with linger 0 sends RST: the client sees a refused
        // connection, not an empty answer.
        let _ = conn.set_zero_linger();
    }
}

/// Accepts local connections and forwards each through its own stream.
pub async fn forward(args: ForwardArgs) -> anyhow::Result<()> {
    let cs = args.strings.resolve()?;
    let route = if cs.cert_sha256.is_none() {
        Route::Azure(Box::new(azure_sender(&cs, &args.send)?))
    } else {
        Route::Native(sender(&cs, &args.send, "forward")?)
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    info!(listen = %local, hc = %cs.hc, azure = matches!(route, Route::Azure(_)), "forwarding");
    println!(
        "{}",
        serde_json::json!({ "listen": local.to_string(), "hc": cs.hc.to_string() })
    );
    let mut flow = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (conn, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                flow += 1;
                let span = info_span!("flow", hc = %cs.hc, flow, %peer);
                tokio::spawn(route.clone().serve(cs.hc.clone(), conn).instrument(span));
            }
            _ = crate::shutdown_signal() => return Ok(()),
        }
    }
}
