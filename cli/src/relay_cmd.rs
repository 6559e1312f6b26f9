//! `hybridlink relay ...`

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use proto::control::hex_encode;
use relay::registry::etcd::{self, EtcdConfig, EtcdEndpoints};

use crate::install::{RunAs, SOCKETS_ONLY, SystemUser, Unit};

/// Relay subcommands.
#[derive(Subcommand, Debug)]
pub enum RelayCommand {
    /// Serve: one port for agents and senders (control channels and pipes),
    /// and the management API. On first start the data dir gets a
    /// self-signed certificate (its SHA-256 goes into every connection
    /// string), an empty registry and a manage key (`DATA_DIR/manage.key`).
    ///
    /// Prints one JSON line on stdout when ready: the bound addresses, the
    /// management API's URL and the certificate fingerprint.
    Serve {
        #[command(flatten)]
        threads: crate::threads::ThreadsArg,
        /// Directory for the certificate, registry and manage key.
        #[arg(long, env = "HYBRIDLINK_DATA_DIR")]
        data_dir: PathBuf,
        /// Address of the relay port that agents and senders dial.
        #[arg(long, default_value = "0.0.0.0:9443")]
        listen: SocketAddr,
        /// One more address serving exactly what --listen serves (hybridlink
        /// peers and Azure Relay clients), e.g. 0.0.0.0:443 for clients that
        /// can only reach port 443; repeat for more. Connection strings keep
        /// naming --listen's port unless --public-port says otherwise.
        #[arg(long, value_name = "ADDR")]
        also_listen: Vec<SocketAddr>,
        /// A CA-issued certificate chain (PEM, the relay's certificate
        /// first, e.g. certbot's fullchain.pem) for Azure Relay clients
        /// (hyco-ws, .NET, Java), which check the certificate against their
        /// trust store. hybridlink peers offer the ALPN id `hybridlink/1`
        /// and keep getting the self-signed certificate their connection
        /// strings pin; peers older than that ALPN id get this one and fail
        /// their pin. Both files are read every 2 s: a renewal is served to
        /// new connections without a restart, and changed files that do not
        /// load are logged and the previous certificate kept.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert's certificate (e.g. certbot's
        /// privkey.pem).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Address of the management API (plain HTTP unless --api-tls: keep
        /// it on loopback, or put a TLS proxy in front).
        #[arg(long, default_value = "127.0.0.1:9444")]
        api: SocketAddr,
        /// Serve the management API (and the portal) over HTTPS with the
        /// relay's self-signed certificate, the one connection strings pin
        /// (never --tls-cert's): manage
        /// it from elsewhere with `hybridlink hc --api https://HOST:PORT
        /// --api-cert-sha256 HEX` (HEX: `cert_sha256` of the ready line, or
        /// any connection string's CertificateSha256).
        #[arg(long)]
        api_tls: bool,
        /// Host name or address written into connection strings (what the
        /// agents and senders should dial). Defaults to the listen address.
        #[arg(long, env = "HYBRIDLINK_PUBLIC_HOST")]
        public_host: Option<String>,
        /// Port written into connection strings. Defaults to the listen port.
        #[arg(long)]
        public_port: Option<u16>,
        /// The most hybrid connections this relay holds (creating more is
        /// refused with a clear error).
        #[arg(long, default_value_t = relay::Limits::default().max_hcs)]
        max_hcs: usize,
        /// The most agents one hybrid connection may have attached (25, as in
        /// the original product); one more is refused with a clear error.
        #[arg(
            long = "max-listeners",
            value_name = "MAX_LISTENERS",
            default_value_t = relay::Limits::default().max_agents_per_hc
        )]
        max_agents: usize,
        /// The most pipes spliced at once (a pipe joins one sender to one
        /// agent and carries all their streams); a sender asking for one
        /// more gets a clear error.
        #[arg(long, default_value_t = relay::Limits::default().max_pipes)]
        max_pipes: usize,
        /// The most pipes spliced or waiting at once for one hybrid
        /// connection, so that one tenant's key cannot take the whole
        /// relay's quota (default: a quarter of --max-pipes).
        #[arg(long, value_name = "N")]
        max_pipes_per_hc: Option<usize>,
        /// The most pipe requests one sender session may have waiting for
        /// their two ends; it is also the burst of requests a session may
        /// make at once before --pipe-requests-per-second applies.
        #[arg(long, value_name = "N", default_value_t = relay::Limits::default().max_pending_pipes_per_session)]
        max_pending_pipes_per_session: usize,
        /// Pipe requests a second one sender session may make once it has
        /// used its burst; past it, each request gets a clear error. A
        /// sender keeps one pipe per agent, so it needs a few over its life.
        #[arg(long, value_name = "N", default_value_t = relay::Limits::default().pipe_requests_per_second)]
        pipe_requests_per_second: u32,
        /// The most connections that have not yet authenticated (a control
        /// channel before its first successful attach, which must come
        /// within 10 s of its hello; a pipe before its ticket is found).
        /// Past it, new connections are closed at once.
        #[arg(long, default_value_t = relay::Limits::default().max_unauthenticated)]
        max_unauthenticated: usize,
        /// The same, from one source address (a NAT's many users share one).
        #[arg(long, default_value_t = relay::Limits::default().max_unauthenticated_per_ip)]
        max_unauthenticated_per_ip: usize,
        /// The longest a SAS token may live, in seconds from now, for control
        /// channels and the management API alike; a token valid for longer
        /// is refused with a clear error. Agents and senders sign tokens for
        /// an hour and renew them.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = relay::Limits::default().max_token_lifetime
        )]
        max_token_lifetime: u64,
        /// How long an Azure-protocol listener (hyco-ws, .NET, Java) may go
        /// on after its token expired, in seconds, to renew it: those
        /// clients renew at expiry, or once an hour whatever the token
        /// says. Past it the listener is closed with 1008.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = relay::Limits::default().renew_grace
        )]
        renew_grace: u64,
        /// How long a sender's Azure-protocol HTTP request (hyco-https'
        /// request/response mode) waits for the listener's response, in
        /// seconds; past it the sender gets 504 Gateway Timeout. Azure
        /// Relay waits 60 s.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = relay::Limits::default().http_response_timeout,
            value_parser = clap::value_parser!(u64).range(1..)
        )]
        http_response_timeout: u64,
        /// Azure-protocol HTTP requests one hybrid connection may have open
        /// at once (waiting for or receiving their listener's response);
        /// past it a sender gets 503, so one tenant's slow listener cannot
        /// hold the relay's connections.
        #[arg(
            long,
            value_name = "N",
            default_value_t = relay::Limits::default().max_http_requests_per_hc,
            value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
        )]
        max_http_requests_per_hc: usize,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
        /// 127.0.0.1:9445): agents and senders per hybrid connection, pipes,
        /// bytes, refusals by reason, token renewals.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<SocketAddr>,
        /// Keep the registry (hybrid connections, keys, manage keys) in etcd,
        /// shared with every relay started with the same etcd and
        /// --etcd-prefix, instead of DATA_DIR/registry.json. The relay
        /// refuses to start when etcd does not answer. The data dir still
        /// holds this relay's certificate and manage.key.
        #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
        registry: Option<EtcdEndpoints>,
        /// With --registry: when etcd does not answer at start, serve the
        /// registry this relay last saw (DATA_DIR/registry-cache.json,
        /// written while it runs with etcd) and refuse changes until etcd
        /// answers, instead of refusing to start.
        #[arg(long, requires = "registry")]
        serve_from_cache: bool,
        /// With --registry: the HOST:PORT agents and senders dial to reach
        /// this node, listed in etcd for as long as the node lives (every
        /// node of a cluster is told the list, and so are its peers).
        /// Defaults to --public-host and the public port.
        #[arg(long, value_name = "HOST:PORT", requires = "registry")]
        advertise: Option<String>,
        #[command(flatten)]
        etcd: Box<EtcdArgs>,
    },
    /// Copy a single relay's registry (hybrid connections with their keys
    /// and replaced keys, and the manage keys) into etcd, for relays started
    /// with `serve --registry`. Stop the single relay first. Refuses when
    /// etcd holds anything under the prefix, unless --force. Prints the
    /// number of hybrid connections copied as JSON.
    Migrate {
        /// The single relay's data dir; its registry.json is read, never
        /// changed.
        #[arg(long, value_name = "DATA_DIR")]
        from: PathBuf,
        /// The etcd to copy into.
        #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
        to: EtcdEndpoints,
        /// Delete every key under the prefix first.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        etcd: Box<EtcdArgs>,
    },
    /// Set the relay up as a systemd service: writes
    /// /etc/systemd/system/hybridlink-relay.service, enables and (re)starts
    /// it. Manage it afterwards on this host with `hybridlink hc ... --data-dir
    /// DATA_DIR`.
    Install {
        /// Directory for the certificate, registry and manage key.
        #[arg(long, default_value = "/var/lib/hybridlink-relay")]
        data_dir: PathBuf,
        /// Address of the relay port that agents and senders dial.
        #[arg(long, default_value = "0.0.0.0:9443")]
        listen: SocketAddr,
        /// One more address serving what --listen serves (e.g.
        /// 0.0.0.0:443); repeat for more. A port below 1024 keeps the
        /// service the one capability to bind it.
        #[arg(long, value_name = "ADDR")]
        also_listen: Vec<SocketAddr>,
        /// A CA-issued certificate chain (PEM) for Azure Relay clients, as
        /// for `relay serve --tls-cert`. The service's user
        /// (hybridlink-relay) must be able to read it, and not under /home,
        /// /root or /tmp, which the service's sandbox hides (certbot's
        /// /etc/letsencrypt is root's alone: have a deploy hook copy the
        /// files, e.g. to /etc/hybridlink-relay/).
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Its private key (PEM), readable by the service's user in the
        /// same way.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Address of the management API.
        #[arg(long, default_value = "127.0.0.1:9444")]
        api: SocketAddr,
        /// Host name or address both sides dial (written into connection
        /// strings).
        #[arg(long)]
        public_host: String,
        /// Keep the registry in etcd, as for `relay serve --registry`: this
        /// node joins every relay started with the same etcd and
        /// --etcd-prefix. Files given to the --etcd-* flags must be readable
        /// by the service's user (hybridlink-relay) and not under /home,
        /// /root or /tmp, which the service's sandbox hides.
        #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
        registry: Option<EtcdEndpoints>,
        /// As for `relay serve --serve-from-cache`.
        #[arg(long, requires = "registry")]
        serve_from_cache: bool,
        /// As for `relay serve --advertise`.
        #[arg(long, value_name = "HOST:PORT", requires = "registry")]
        advertise: Option<String>,
        #[command(flatten)]
        etcd: Box<EtcdArgs>,
        #[command(flatten)]
        install: crate::install::InstallArgs,
    },
}

impl RelayCommand {
    /// The threads `relay serve` was asked for.
    pub fn threads(&self) -> Option<u16> {
        match self {
            RelayCommand::Serve { threads, .. } => threads.threads,
            _ => None,
        }
    }
}

/// How to reach etcd, for `serve --registry`, `install --registry` and
/// `migrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// Every key of the registry in etcd starts with this; relays share a
    /// registry when they use the same etcd and prefix.
    #[arg(long, value_name = "PREFIX", default_value = etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// The CA certificate (PEM) etcd's certificate is checked against;
    /// etcd is then spoken to over TLS.
    #[arg(long, value_name = "FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for an etcd that asks for one
    /// (--client-cert-auth); implies TLS.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// An etcd user, for an etcd with authentication on; the password is
    /// read from HYBRIDLINK_ETCD_PASSWORD or --etcd-password-file, never
    /// from the command line.
    #[arg(long, value_name = "NAME")]
    etcd_user: Option<String>,
    /// A file whose first line is the password of --etcd-user.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
}

/// The variable that may hold the password of `--etcd-user`.
const ETCD_PASSWORD_VAR: &str = "HYBRIDLINK_ETCD_PASSWORD";

impl EtcdArgs {
    /// The settings for `endpoints`, with the password read.
    fn config(&self, endpoints: EtcdEndpoints) -> anyhow::Result<EtcdConfig> {
        let user = match &self.etcd_user {
            None => None,
            Some(name) => {
                let password = match &self.etcd_password_file {
                    Some(path) => std::fs::read_to_string(path)
                        .with_context(|| format!("reading the etcd password from {}", path.display()))?
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                    None => std::env::var(ETCD_PASSWORD_VAR).map_err(|_| {
                        anyhow::anyhow!(
                            "--etcd-user {name} needs a password: set {ETCD_PASSWORD_VAR} or give --etcd-password-file"
                        )
                    })?,
                };
                Some((name.clone(), password))
            }
        };
        Ok(EtcdConfig {
            endpoints,
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_ca_file.clone(),
            client_cert: self.etcd_cert.clone().zip(self.etcd_key.clone()),
            user,
            serve_from_cache: false,
        })
    }
}

impl EtcdArgs {
    /// These flags as `relay serve` takes them, for the unit `install`
    /// writes. The password is never among them: the unit names the file
    /// that holds it.
    fn serve_args(&self) -> anyhow::Result<Vec<String>> {
        if let (Some(name), None) = (&self.etcd_user, &self.etcd_password_file) {
            bail!(
                "--etcd-user {name} needs --etcd-password-file FILE with `relay install` (a file the service's user can read): the password is never written into the unit"
            );
        }
        let mut args = Vec::new();
        if self.etcd_prefix != etcd::DEFAULT_PREFIX {
            args.extend(["--etcd-prefix".into(), self.etcd_prefix.clone()]);
        }
        let files = [
            ("--etcd-ca-file", &self.etcd_ca_file),
            ("--etcd-cert", &self.etcd_cert),
            ("--etcd-key", &self.etcd_key),
        ];
        for (flag, path) in files {
            if let Some(path) = path {
                args.extend([flag.into(), path.display().to_string()]);
            }
        }
        if let Some(name) = &self.etcd_user {
            args.extend(["--etcd-user".into(), name.clone()]);
        }
        if let Some(path) = &self.etcd_password_file {
            args.extend(["--etcd-password-file".into(), path.display().to_string()]);
        }
        Ok(args)
    }

    /// Whether any flag differs from its default.
    fn any(&self) -> bool {
        self.etcd_prefix != etcd::DEFAULT_PREFIX
            || self.etcd_ca_file.is_some()
            || self.etcd_cert.is_some()
            || self.etcd_user.is_some()
    }
}

/// The user the relay's service runs as.
pub const USER: SystemUser = SystemUser {
    name: "hybridlink-relay",
    gecos: "hybridlink relay",
};

/// What `relay install` puts on the service's command line.
#[derive(Debug, Clone)]
struct Serve {
    data_dir: PathBuf,
    listen: SocketAddr,
    also_listen: Vec<SocketAddr>,
    tls: Option<(PathBuf, PathBuf)>,
    api: SocketAddr,
    public_host: String,
    /// `--registry` and the flags that go with it, as `relay serve` takes
    /// them.
    registry: Vec<String>,
}

/// The relay's unit: its own user, which may write only the data dir and
/// keeps `CAP_NET_BIND_SERVICE` only to listen on a port below 1024.
fn unit(binary: &Path, serve: Serve) -> Unit {
    let low_port = std::iter::once(serve.listen)
        .chain(serve.also_listen.iter().copied())
        .chain(std::iter::once(serve.api))
        .any(|a| a.port() < 1024);
    let mut service: Vec<String> = SOCKETS_ONLY.iter().map(|l| l.to_string()).collect();
    service.push(format!("ReadWritePaths={}", serve.data_dir.display()));
    let mut exec_start = vec![
        binary.display().to_string(),
        "relay".into(),
        "serve".into(),
        "--data-dir".into(),
        serve.data_dir.display().to_string(),
        "--listen".into(),
        serve.listen.to_string(),
    ];
    for addr in &serve.also_listen {
        exec_start.extend(["--also-listen".into(), addr.to_string()]);
    }
    if let Some((cert, key)) = &serve.tls {
        exec_start.extend([
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]);
    }
    exec_start.extend([
        "--api".into(),
        serve.api.to_string(),
        "--public-host".into(),
        serve.public_host,
    ]);
    exec_start.extend(serve.registry);
    Unit {
        name: "hybridlink-relay",
        description: "hybridlink relay: the rendezvous of hybrid connections",
        exec_start,
        reload_on_hup: false,
        notify: true,
        run_as: RunAs::User(USER),
        capabilities: if low_port {
            vec!["CAP_NET_BIND_SERVICE"]
        } else {
            vec![]
        },
        service,
        written_by: "hybridlink relay install",
    }
}

/// Runs a relay subcommand.
pub async fn run(cmd: RelayCommand) -> anyhow::Result<()> {
    match cmd {
        RelayCommand::Migrate {
            from,
            to,
            force,
            etcd,
        } => {
            let config = etcd.config(to.clone())?;
            let copied = etcd::copy_to_etcd(&from, &config, force)
                .await
                .with_context(|| format!("copying the registry in {} to {to}", from.display()))?;
            let report = serde_json::json!({
                "from": from.display().to_string(),
                "to": to.to_string(),
                "prefix": config.prefix,
                "hcs": copied.hcs,
            });
            println!("{report}");
            Ok(())
        }
        RelayCommand::Install {
            data_dir,
            listen,
            also_listen,
            tls_cert,
            tls_key,
            api,
            public_host,
            registry,
            serve_from_cache,
            advertise,
            etcd,
            install,
        } => {
            let registry = match registry {
                None if etcd.any() => bail!("the --etcd-* flags need --registry"),
                None => Vec::new(),
                Some(endpoints) => {
                    let mut args = vec!["--registry".to_string(), endpoints.to_string()];
                    if serve_from_cache {
                        args.push("--serve-from-cache".into());
                    }
                    if let Some(advertise) = advertise {
                        args.extend(["--advertise".into(), advertise]);
                    }
                    args.extend(etcd.serve_args()?);
                    args
                }
            };
            let serve = Serve {
                data_dir: data_dir.clone(),
                listen,
                also_listen,
                tls: tls_cert.zip(tls_key),
                api,
                public_host,
                registry,
            };
            let unit = unit(&install.binary()?, serve);
            crate::install::make_system_user(&install, &unit)?;
            // The sandbox needs the data directory to exist; it is the
            // service's alone (root's `hc --data-dir` reads it all the same).
            let dir = install.under_root(&data_dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("making {} private", dir.display()))?;
            let owner = format!("{}:{}", USER.name, USER.name);
            crate::install::chown(&install, &owner, &dir, true)?;
            crate::install::install_unit(&install, &unit)
        }
        RelayCommand::Serve {
            threads: _,
            data_dir,
            listen,
            also_listen,
            tls_cert,
            tls_key,
            api,
            api_tls,
            public_host,
            public_port,
            max_hcs,
            max_agents,
            max_pipes,
            max_pipes_per_hc,
            max_pending_pipes_per_session,
            pipe_requests_per_second,
            max_unauthenticated,
            max_unauthenticated_per_ip,
            max_token_lifetime,
            renew_grace,
            http_response_timeout,
            max_http_requests_per_hc,
            metrics,
            registry,
            serve_from_cache,
            advertise,
            etcd,
        } => {
            let etcd = registry
                .map(|endpoints| {
                    etcd.config(endpoints).map(|mut c| {
                        c.serve_from_cache = serve_from_cache;
                        c
                    })
                })
                .transpose()?;
            let config = relay::RelayConfig {
                data_dir: data_dir.clone(),
                etcd,
                listen,
                also_listen,
                ca_cert: tls_cert
                    .zip(tls_key)
                    .map(|(cert, key)| relay::ca_cert::CaCertFiles { cert, key }),
                api,
                api_tls,
                public_host,
                public_port,
                advertise,
                limits: relay::Limits {
                    max_hcs,
                    max_agents_per_hc: max_agents,
                    max_pipes,
                    max_pipes_per_hc,
                    max_pending_pipes_per_session,
                    pipe_requests_per_second,
                    max_unauthenticated,
                    max_unauthenticated_per_ip,
                    max_token_lifetime,
                    renew_grace,
                    http_response_timeout,
                    max_http_requests_per_hc,
                },
            };
            let relay = config.start().await.with_context(|| {
                format!("starting the relay with data dir {}", data_dir.display())
            })?;
            let mut ready = serde_json::json!({
                "listen": relay.listen.to_string(),
                "also_listen": relay.also_listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "api": relay.api.to_string(),
                "api_url": format!("{}://{}", if relay.api_tls { "https" } else { "http" }, relay.api),
                "cert_sha256": hex_encode(&relay.cert_sha256),
                "max_pipes": relay.limits.max_pipes,
                "max_pipes_per_hc": relay.limits.pipes_per_hc(),
                "max_unauthenticated": relay.limits.max_unauthenticated,
            });
            if let Some(sha256) = relay.ca_cert_sha256 {
                ready["tls_cert_sha256"] = hex_encode(&sha256).into();
            }
            if let Some(addr) = metrics {
                let hub = relay.hub.clone();
                let bound = transport::metrics::serve(addr, move || hub.render_metrics())
                    .await
                    .with_context(|| format!("serving metrics on {addr}"))?;
                ready["metrics"] = bound.to_string().into();
            }
            println!("{ready}");
            // Under systemd (Type=notify), `systemctl start` returns now.
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            crate::shutdown_signal().await;
            tracing::info!("relay stopping");
            relay.leave().await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::expected::{SANDBOX, SOCKETS_ONLY};

    fn serve(listen: &str) -> Serve {
        Serve {
            data_dir: "/var/lib/hybridlink-relay".into(),
            listen: listen.parse().unwrap(),
            also_listen: Vec::new(),
            tls: None,
            api: "127.0.0.1:9444".parse().unwrap(),
            public_host: "relay.example.com".into(),
            registry: Vec::new(),
        }
    }

    fn rendered(listen: &str) -> String {
        unit(Path::new("/usr/local/bin/hybridlink"), serve(listen)).render()
    }

    #[test]
    fn the_relay_runs_as_its_own_user_with_no_capability() {
        let expected = format!(
            "\
# Written by `hybridlink relay install`; run it again to change it.
[Unit]
Description=hybridlink relay: the rendezvous of hybrid connections
Wants=network-online.target
After=network-online.target

[Service]
Type=notify
ExecStart=/usr/local/bin/hybridlink relay serve --data-dir /var/lib/hybridlink-relay --listen 0.0.0.0:9443 --api 127.0.0.1:9444 --public-host relay.example.com
Restart=always
RestartSec=2
LimitNOFILE=1048576
User=hybridlink-relay
Group=hybridlink-relay
RemoveIPC=yes
CapabilityBoundingSet=
{SANDBOX}{SOCKETS_ONLY}\
ReadWritePaths=/var/lib/hybridlink-relay

[Install]
WantedBy=multi-user.target
"
        );
        assert_eq!(rendered("0.0.0.0:9443"), expected);
    }

    #[test]
    fn a_relay_on_a_low_port_keeps_only_the_capability_to_bind_it() {
        let text = rendered("0.0.0.0:443");
        assert!(
            text.contains(
                "\nUser=hybridlink-relay\nGroup=hybridlink-relay\nRemoveIPC=yes\n\
                 CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n\
                 AmbientCapabilities=CAP_NET_BIND_SERVICE\n\
                 NoNewPrivileges=yes\n"
            ),
            "{text}"
        );
        assert_eq!(text.matches("CAP_").count(), 2, "{text}");
    }

    #[test]
    fn extra_listeners_and_the_ca_certificate_pass_through_and_a_low_extra_port_keeps_the_capability()
     {
        let mut with = serve("0.0.0.0:9443");
        with.also_listen = vec!["0.0.0.0:443".parse().unwrap(), "[::]:8443".parse().unwrap()];
        with.tls = Some((
            "/etc/hybridlink-relay/fullchain.pem".into(),
            "/etc/hybridlink-relay/privkey.pem".into(),
        ));
        let text = unit(Path::new("/usr/local/bin/hybridlink"), with).render();
        assert!(
            text.contains(
                "\nExecStart=/usr/local/bin/hybridlink relay serve --data-dir /var/lib/hybridlink-relay --listen 0.0.0.0:9443 \
                 --also-listen 0.0.0.0:443 --also-listen [::]:8443 \
                 --tls-cert /etc/hybridlink-relay/fullchain.pem --tls-key /etc/hybridlink-relay/privkey.pem \
                 --api 127.0.0.1:9444 --public-host relay.example.com\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"
            ),
            "{text}"
        );
        // Only high ports: no capability at all.
        let mut high = serve("0.0.0.0:9443");
        high.also_listen = vec!["0.0.0.0:8443".parse().unwrap()];
        let text = unit(Path::new("/usr/local/bin/hybridlink"), high).render();
        assert!(!text.contains("CAP_"), "{text}");
    }
}
