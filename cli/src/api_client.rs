//! A blocking client of the relay's management API, for `hybridlink hc`.
//!
//! Three rules, each for a reason:
//!
//! - **Tokens, not keys.** Every request carries a SAS token for
//!   `BASE/manage`, signed with the manage key and valid for
//!   [`TOKEN_LIFETIME`]; the key itself never leaves this process. A token
//!   that ends up in a proxy's log or a capture opens the API for minutes,
//!   not until someone regenerates the key.
//! - **Clear text only to loopback.** `http://` is accepted for `localhost`
//!   and loopback addresses (the relay's own host, the near end of an SSH
//!   tunnel); to any other host only with `--insecure`, because until it
//!   expires a token read off the wire is as good as the key
//!   ([`ApiUrl::parse`]).
//! - **TLS trust named on the command line.** `https://` pins the
//!   certificate whose SHA-256 `--api-cert-sha256` gives (the relay's own,
//!   with `relay serve --api-tls`: the same pin connection strings carry,
//!   checked by the same code as agents use,
//!   [`transport::tls::relay_client_config`]); or verifies the server
//!   against the certificates in `--api-ca` (the CA of a TLS proxy in front
//!   of the relay, or the relay's `cert.pem`); or, on the relay's host with
//!   `--data-dir`, pins `DATA_DIR/cert.pem`. The system's CA roots are never
//!   used: they are not there on every machine, and a management API is
//!   better trusted by name than by whichever CA signed it.
//!
//! ureq does the HTTP; TLS is ours, through a connector from ureq's
//! `unversioned` API (pinned by `Cargo.lock`), because ureq's own rustls
//! support offers no custom certificate verifier.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use proto::control::Fingerprint;
use proto::key::Key;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, StreamOwned};
use serde_json::Value;
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, TcpConnector,
    Transport, TransportAdapter,
};

/// How long the token sent with each request is valid, in seconds.
pub const TOKEN_LIFETIME: u64 = 300;

/// Where the management API is, checked against the rule on clear text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    /// The URL without a trailing `/`: requests go to `base + path`.
    pub base: String,
    /// Whether it is `https://`.
    pub tls: bool,
    /// The host as written (an IPv6 address without its brackets).
    pub host: String,
}

impl ApiUrl {
    /// Parses `--api URL`: `http://` or `https://`, a host, an optional port
    /// and path. Plain `http://` to a host other than `localhost` or a
    /// loopback address is refused unless `insecure`.
    pub fn parse(url: &str, insecure: bool) -> anyhow::Result<ApiUrl> {
        let (scheme, rest) = url.trim().split_once("://").ok_or_else(|| {
            anyhow!("--api {url} is not a URL; write http://HOST:PORT or https://HOST:PORT")
        })?;
        let rest = rest.trim_end_matches('/');
        let base = format!("{scheme}://{rest}");
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => bail!("--api {url} must be an http:// or https:// URL"),
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            bail!(
                "--api {url} carries a user name or password; the manage key goes in HYBRIDLINK_MANAGE_KEY or --data-dir, never in the URL"
            );
        }
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split_once(']').map(|(h, _)| h).unwrap_or_default(),
            None => authority.split(':').next().unwrap_or_default(),
        };
        if host.is_empty() {
            bail!("--api {url} has no host");
        }
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !tls && !loopback && !insecure {
            bail!(
                "--api {url} is plain HTTP to a host that is not this one: the requests' tokens would cross the network readable by anyone on the path. Use https:// (the relay needs `relay serve --api-tls`) with --api-cert-sha256 or --api-ca, or an SSH tunnel to the relay's loopback (`ssh -L 9444:127.0.0.1:9444 RELAY`, then --api http://127.0.0.1:9444); --insecure sends them anyway"
            );
        }
        Ok(ApiUrl {
            base,
            tls,
            host: host.to_owned(),
        })
    }
}

/// Which certificate an `https://` API must present.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Exactly the certificate with this SHA-256.
    Pinned(Fingerprint),
    /// One that these certificates vouch for (CA certificates, or the
    /// server's own self-signed one), for the name in the URL.
    Roots(Vec<CertificateDer<'static>>),
}

impl Trust {
    /// The certificates in the PEM file `path` (`--api-ca`).
    pub fn from_ca_file(path: &Path) -> anyhow::Result<Trust> {
        let certs = transport::tls::pem_certificates(path).map_err(|e| anyhow!("--api-ca: {e}"))?;
        Ok(Trust::Roots(certs))
    }

    /// The relay's own certificate, `DATA_DIR/cert.pem`, pinned.
    pub fn from_data_dir(dir: &Path) -> anyhow::Result<Trust> {
        let path = dir.join(relay::identity::CERT_FILE);
        let cert = CertificateDer::from_pem_file(&path).map_err(|e| {
            anyhow!(
                "https:// needs to know the relay's certificate: give --api-cert-sha256 HEX or --api-ca FILE (cannot read {}: {e})",
                path.display()
            )
        })?;
        Ok(Trust::Pinned(Fingerprint::of_der(&cert)))
    }

    /// A rustls client configuration that accepts what this trust names.
    fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        match self {
            Trust::Pinned(fingerprint) => Ok(transport::tls::relay_client_config(*fingerprint)?),
            Trust::Roots(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs {
                    roots
                        .add(cert.clone())
                        .context("a certificate in --api-ca cannot be a trust anchor")?;
                }
                let config =
                    rustls::ClientConfig::builder_with_provider(transport::tls::provider())
                        .with_safe_default_protocol_versions()?
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                Ok(Arc::new(config))
            }
        }
    }
}

/// How to reach the API and prove the right to use it.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Where it is.
    pub url: ApiUrl,
    /// What its certificate must be (needed for `https://`).
    pub trust: Option<Trust>,
    /// A manage key, primary or secondary.
    pub key: Key,
}

/// A blocking client of the management API.
#[derive(Debug)]
pub struct Client {
    url: ApiUrl,
    key: Key,
    agent: ureq::Agent,
}

impl Client {
    /// A client for `options`; fails for `https://` without a trust.
    pub fn new(options: ClientOptions) -> anyhow::Result<Client> {
        let tls = match (&options.trust, options.url.tls) {
            (Some(trust), true) => Some(trust.client_config()?),
            (None, true) => bail!(
                "--api {} is https://: say which certificate it must present with --api-cert-sha256 HEX (the relay's, as in its connection strings' CertificateSha256) or --api-ca FILE",
                options.url.base
            ),
            (_, false) => None,
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        let connector = ().chain(TcpConnector::default()).chain(TlsConnector { tls });
        Ok(Client {
            url: options.url,
            key: options.key,
            agent: ureq::Agent::with_parts(config, connector, DefaultResolver::default()),
        })
    }

    /// The `Authorization` value for a request made now: a SAS token that
    /// expires in [`TOKEN_LIFETIME`] seconds.
    pub fn authorization(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let resource = format!("{}/manage", self.url.base);
        proto::sas::sign(
            &resource,
            proto::key::Right::Manage.rule_name(),
            &self.key,
            now + TOKEN_LIFETIME,
        )
    }

    /// Calls `method path` with an optional JSON body; the JSON answer, or
    /// the API's one-line reason as the error.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.url.base);
        let auth = self.authorization();
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            ("PATCH", Some(body)) => self
                .agent
                .patch(&url)
                .header("Authorization", &auth)
                .send_json(body),
            (_, Some(body)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(body),
            (_, None) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
        };
        let mut response = result.map_err(|e| {
            anyhow!(
                "cannot reach the management API at {}: {e}; is `hybridlink relay serve` running, and is --api right?",
                self.url.base
            )
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| anyhow!("reading the management API's answer failed: {e}"))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if !status.is_success() {
            let reason = json
                .as_ref()
                .and_then(|j| j.get("error"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("management API answered {status}: {}", text.trim()));
            bail!("{reason}");
        }
        json.ok_or_else(|| anyhow!("management API answered {status} with a body that is not JSON"))
    }
}

/// Reads a manage key: `HYBRIDLINK_MANAGE_KEY` if set, else
/// `DIR/manage.key`.
pub fn manage_key(data_dir: Option<&Path>) -> anyhow::Result<Key> {
    if let Ok(key) = std::env::var("HYBRIDLINK_MANAGE_KEY") {
        let key = key.trim();
        if !key.is_empty() {
            return key
                .parse()
                .map_err(|e| anyhow!("HYBRIDLINK_MANAGE_KEY is not a manage key: {e}"));
        }
    }
    let Some(dir) = data_dir else {
        bail!(
            "no manage key: pass --data-dir DIR (the relay's data directory, which holds manage.key) or set HYBRIDLINK_MANAGE_KEY"
        );
    };
    let path: PathBuf = dir.join(relay::registry::MANAGE_KEY_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the manage key from {}; is --data-dir the relay's data directory, and may this user read it?",
            path.display()
        )
    })?;
    let key = text.trim();
    if key.is_empty() {
        bail!(
            "{} is empty; restart the relay to rewrite it",
            path.display()
        );
    }
    key.parse()
        .map_err(|e| anyhow!("{} does not hold a manage key: {e}", path.display()))
}

/// Wraps `https://` connections in TLS with our own configuration and
/// passes `http://` ones through.
#[derive(Debug)]
struct TlsConnector {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl<In: Transport> Connector<In> for TlsConnector {
    type Out = Either<In, TlsTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails<'_>,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else {
            return Ok(None);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        // `Client::new` refuses https:// without a configuration.
        let Some(config) = &self.tls else {
            return Err(ureq::Error::TlsRequired);
        };
        let host = details.uri.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{host:?} is not a host name for TLS: {e}"),
            )
        })?;
        let mut conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        conn.complete_io(&mut sock).map_err(handshake_error)?;
        let buffers = LazyBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(Either::B(TlsTransport {
            buffers,
            stream: StreamOwned::new(conn, sock),
        })))
    }
}

/// Says what a refused certificate means here.
fn handshake_error(e: io::Error) -> io::Error {
    let refused = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|tls| matches!(tls, rustls::Error::InvalidCertificate(_)));
    if refused {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "TLS: the server's certificate is not the one --api-cert-sha256 or --api-ca names ({e}); nothing was sent"
            ),
        )
    } else {
        io::Error::new(e.kind(), format!("TLS handshake failed: {e}"))
    }
}

/// A TLS connection as a ureq transport.
struct TlsTransport {
    buffers: LazyBuffers,
    stream: StreamOwned<ClientConnection, TransportAdapter>,
}

impl std::fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTransport").finish_non_exhaustive()
    }
}

impl Transport for TlsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        use std::io::Write as _;
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output)?;
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        use std::io::Read as _;
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self.stream.read(input)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn clear_text_only_to_loopback_unless_insecure() {
        for ok in [
            "http://127.0.0.1:9444",
            "http://127.3.4.5:9444/",
            "http://localhost:9444",
            "HTTP://LOCALHOST",
            "http://[::1]:9444",
            "https://relay.example.com:9444",
            "https://198.18.0.1:9444/prefix",
            "https://[2001:db8::1]:9444",
        ] {
            ApiUrl::parse(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for refused in [
            "http://relay.example.com:9444",
            "http://198.18.0.1:9444",
            "http://[2001:db8::1]:9444",
            "http://0.0.0.0:9444",
            "http://localhost.example.com",
        ] {
            let err = ApiUrl::parse(refused, false).unwrap_err().to_string();
            assert!(
                err.contains("plain HTTP to a host that is not this one"),
                "{refused}: {err}"
            );
            assert!(err.contains("--insecure"), "{err}");
            assert!(ApiUrl::parse(refused, true).is_ok(), "{refused}");
        }
        for (bad, reason) in [
            ("relay.example.com:9444", "is not a URL"),
            ("ftp://relay", "must be an http:// or https:// URL"),
            ("https://", "has no host"),
            ("https://user:pw@relay", "user name or password"),
        ] {
            let err = ApiUrl::parse(bad, true).unwrap_err().to_string();
            assert!(err.contains(reason), "{bad}: {err}");
        }
        let url = ApiUrl::parse("https://[::1]:9444/", false).unwrap();
        assert_eq!(
            url,
            ApiUrl {
                base: "https://[::1]:9444".into(),
                tls: true,
                host: "::1".into()
            }
        );
    }

    /// Serves one HTTPS request with the relay identity in `dir`; returns the
    /// port and the request it read.
    fn serve_tls_once(dir: &Path) -> (u16, std::thread::JoinHandle<Option<String>>) {
        let identity = relay::identity::RelayIdentity::load_or_create(dir).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(identity.server_config()).unwrap();
            let mut tls = StreamOwned::new(conn, tcp);
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                // A client that refused our certificate reads nothing more.
                if tls.read(&mut byte).ok()? == 0 {
                    return None;
                }
                request.push(byte[0]);
            }
            let body = "[]";
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            tls.write_all(answer.as_bytes()).unwrap();
            tls.conn.send_close_notify();
            let _ = tls.flush();
            Some(String::from_utf8(request).unwrap())
        });
        (port, handle)
    }

    fn https_client(port: u16, trust: Trust) -> Client {
        Client::new(ClientOptions {
            url: ApiUrl::parse(&format!("https://127.0.0.1:{port}"), false).unwrap(),
            trust: Some(trust),
            key: Key::generate().unwrap(),
        })
        .unwrap()
    }

    #[test]
    fn https_trusts_the_pinned_certificate_a_ca_file_or_the_data_dir_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let cert_pem = dir.path().join(relay::identity::CERT_FILE);

        // Pinned by fingerprint, as connection strings pin the relay.
        let (port, server) = serve_tls_once(dir.path());
        let pin = match Trust::from_data_dir(dir.path()).unwrap() {
            Trust::Pinned(pin) => pin,
            other => panic!("{other:?}"),
        };
        let answer = https_client(port, Trust::Pinned(pin))
            .call("GET", "/api/v1/hcs", None)
            .unwrap();
        assert_eq!(answer, serde_json::json!([]));
        let request = server.join().unwrap().unwrap();
        assert!(
            request.starts_with("GET /api/v1/hcs HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("SharedAccessSignature sr=https%3A%2F%2F127.0.0.1"));

        // The relay's cert.pem as the CA file: it certifies 127.0.0.1.
        let (port, server) = serve_tls_once(dir.path());
        https_client(port, Trust::from_ca_file(&cert_pem).unwrap())
            .call("GET", "/api/v1/hcs", None)
            .unwrap();
        server.join().unwrap().unwrap();

        // Another certificate: refused before any request is sent.
        let other = tempfile::tempdir().unwrap();
        relay::identity::RelayIdentity::load_or_create(other.path()).unwrap();
        for trust in [
            Trust::Pinned(Fingerprint([7; 32])),
            Trust::from_ca_file(&other.path().join(relay::identity::CERT_FILE)).unwrap(),
        ] {
            let (port, server) = serve_tls_once(dir.path());
            let err = https_client(port, trust)
                .call("GET", "/api/v1/hcs", None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("is not the one --api-cert-sha256 or --api-ca names"),
                "{err}"
            );
            assert_eq!(server.join().unwrap(), None);
        }

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = Trust::from_ca_file(&empty).unwrap_err().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        let err = Trust::from_data_dir(other.path().join("nope").as_path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--api-cert-sha256 HEX or --api-ca FILE"),
            "{err}"
        );
    }
}
