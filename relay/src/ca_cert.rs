//! A CA-issued certificate for Azure Relay's own clients (`relay serve
//! --tls-cert FILE --tls-key FILE`), served beside the relay's self-signed
//! one and reloaded when its files change.
//!
//! Two kinds of client share the relay port and want different
//! certificates. hybridlink peers pin the self-signed certificate by its
//! SHA-256 (`CertificateSha256` in every connection string); a CA-issued
//! certificate changes at every renewal, so serving it to them would break
//! every connection string each time. Azure Relay's clients (hyco-ws, .NET,
//! Java) check the certificate against their platform's trust store and
//! need a CA-issued one. The TLS handshake has to pick before either side
//! has said anything else, so [`RelayCertResolver`] picks by the
//! ClientHello: hybridlink peers offer the ALPN id
//! [`transport::tls::RELAY_ALPN`] and get the pinned certificate; everyone
//! else (Azure's clients offer no ALPN) gets the CA-issued one. Without
//! `--tls-cert` everyone gets the pinned one, as peers from before the ALPN
//! id expect. With it, such older peers get the CA certificate, fail their
//! pin and must be upgraded. The server name cannot tell the two apart:
//! both kinds dial the same public host.
//!
//! The relay never selects an ALPN protocol; it only reads the offer. A
//! rustls server that lists protocols refuses every client offering none of
//! them, and Azure's clients must not be refused for offering `http/1.1`.
//!
//! Reloading polls: every [`POLL_INTERVAL`] the relay reads both files and
//! compares their bytes with the last read. That follows renewals however
//! they land (rewritten in place, renamed over, a symlink swapped as
//! certbot's `live/` and Kubernetes' secret volumes do), on any file system,
//! where an inotify watch on the files themselves loses track after a
//! rename; and reading two small files every few seconds costs nothing. A
//! change is acted on once two reads in a row find the same bytes, so a
//! renewal caught between writing the key and writing the certificate is
//! not taken for a broken one. A change that does not load (no
//! certificate, no key, a key of another certificate, a file gone) is
//! logged once and the previous certificate stays in use.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use proto::control::hex_encode;
use ring::digest;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use tracing::{error, info};

/// How often the certificate and key files are read to see whether they
/// changed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The files `--tls-cert` and `--tls-key` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertFiles {
    /// PEM certificate chain, the relay's certificate first (certbot's
    /// `fullchain.pem`).
    pub cert: PathBuf,
    /// PEM private key of the first certificate (certbot's `privkey.pem`).
    pub key: PathBuf,
}

/// Why the certificate files could not be used.
#[derive(Debug, Error)]
pub enum CaCertError {
    /// A file cannot be read.
    #[error(
        "cannot read {path}: {source}; check that it exists and that the relay's user may read it"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The certificate file holds no certificate.
    #[error(
        "{path} holds no PEM certificate ({reason}); give the certificate chain, the relay's certificate first (certbot's fullchain.pem)"
    )]
    NoCertificate {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// The key file holds no private key.
    #[error(
        "{path} holds no PEM private key ({reason}); give the key of the certificate (certbot's privkey.pem)"
    )]
    NoKey {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// The key is not the certificate's, or rustls cannot sign with it.
    #[error(
        "{key} and the first certificate of {cert} do not form a usable TLS identity: {source}; give the key that belongs to that certificate"
    )]
    Unusable {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// What the two files held at one read.
pub type Snapshot = Result<(Vec<u8>, Vec<u8>), CaCertError>;

/// Reads both files (off the async worker threads).
pub async fn read(files: &CaCertFiles) -> Snapshot {
    let read = |path: PathBuf| async move {
        tokio::fs::read(&path)
            .await
            .map_err(|source| CaCertError::Read { path, source })
    };
    Ok((
        read(files.cert.clone()).await?,
        read(files.key.clone()).await?,
    ))
}

/// A certificate chain and key that load.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// What the resolver serves.
    pub key: Arc<CertifiedKey>,
    /// SHA-256 of the relay's (first) certificate, for the logs.
    pub sha256: [u8; 32],
}

/// Parses a snapshot's bytes into a servable certificate.
fn parse(files: &CaCertFiles, cert_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, CaCertError> {
    let no_cert = |reason: String| CaCertError::NoCertificate {
        path: files.cert.clone(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| no_cert(e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| no_cert("no CERTIFICATE block".to_string()))?;
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest::digest(&digest::SHA256, leaf).as_ref());
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CaCertError::NoKey {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let key =
        CertifiedKey::from_der(chain, key, &transport::tls::provider()).map_err(|source| {
            CaCertError::Unusable {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            }
        })?;
    Ok(Loaded {
        key: Arc::new(key),
        sha256,
    })
}

/// What one read of the files means.
#[derive(Debug)]
pub enum Reload {
    /// The files read as they did when last acted on.
    Unchanged,
    /// They changed since; acted on when the next read finds the same.
    Settling,
    /// They changed and load: serve this from now on.
    Loaded(Loaded),
    /// They changed and do not load: keep serving the previous certificate.
    Failed(CaCertError),
}

/// What a read found, as compared between reads: the bytes, or the
/// error's text.
type Seen = Result<(Vec<u8>, Vec<u8>), String>;

/// Follows the files from one read to the next (no I/O: give it what
/// [`read`] returned).
#[derive(Debug)]
pub struct CaCertWatch {
    files: CaCertFiles,
    /// The read last acted on.
    last: Seen,
    /// A different read, waiting for the next to confirm it.
    pending: Option<Seen>,
}

impl CaCertWatch {
    /// Starts following `files` from `first`, which must load: a relay
    /// does not start without the certificate it was told to serve.
    pub fn start(
        files: CaCertFiles,
        first: Snapshot,
    ) -> Result<(CaCertWatch, Loaded), CaCertError> {
        let (cert, key) = first?;
        let loaded = parse(&files, &cert, &key)?;
        Ok((
            CaCertWatch {
                files,
                last: Ok((cert, key)),
                pending: None,
            },
            loaded,
        ))
    }

    /// The files being followed.
    pub fn files(&self) -> &CaCertFiles {
        &self.files
    }

    /// Compares `snapshot` with the previous reads. A change is acted on
    /// when two reads in a row find it, and reported once: the same bad
    /// files read again are [`Reload::Unchanged`].
    pub fn observe(&mut self, snapshot: Snapshot) -> Reload {
        let seen: Seen = snapshot
            .as_ref()
            .map(Clone::clone)
            .map_err(ToString::to_string);
        if seen == self.last {
            self.pending = None;
            return Reload::Unchanged;
        }
        if self.pending.as_ref() != Some(&seen) {
            self.pending = Some(seen);
            return Reload::Settling;
        }
        self.pending = None;
        self.last = seen;
        match snapshot.and_then(|(cert, key)| parse(&self.files, &cert, &key)) {
            Ok(loaded) => Reload::Loaded(loaded),
            Err(e) => Reload::Failed(e),
        }
    }
}

/// The CA-issued certificate in use, shared by the resolver and the task
/// that reloads it.
#[derive(Debug, Clone)]
pub struct ServedCaCert(Arc<RwLock<Loaded>>);

impl ServedCaCert {
    /// Serves `loaded` until [`ServedCaCert::set`].
    pub fn new(loaded: Loaded) -> ServedCaCert {
        ServedCaCert(Arc::new(RwLock::new(loaded)))
    }

    /// The certificate in use.
    pub fn get(&self) -> Loaded {
        // A panic while holding the lock cannot leave a half-written
        // `Loaded`: writers only replace it whole.
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serves `loaded` to new TLS connections from now on.
    pub fn set(&self, loaded: Loaded) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = loaded;
    }
}

/// Reads the files every [`POLL_INTERVAL`] and serves what changed, for
/// as long as the relay runs.
pub async fn keep_reloading(mut watch: CaCertWatch, served: ServedCaCert) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = read(watch.files()).await;
        match watch.observe(snapshot) {
            Reload::Unchanged | Reload::Settling => {}
            Reload::Loaded(loaded) => {
                info!(
                    cert = %watch.files().cert.display(),
                    sha256 = %hex_encode(&loaded.sha256),
                    "TLS certificate reloaded; new connections from Azure Relay clients get it"
                );
                served.set(loaded);
            }
            Reload::Failed(e) => {
                error!(
                    error = %e,
                    still_serving_sha256 = %hex_encode(&served.get().sha256),
                    "the changed TLS certificate files cannot be used; still serving the previous certificate"
                );
            }
        }
    }
}

/// Whether a ClientHello offers [`transport::tls::RELAY_ALPN`].
fn offers_relay_alpn(hello: &ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut offered| offered.any(|p| p == transport::tls::RELAY_ALPN))
}

/// Picks the relay port's certificate per ClientHello: the pinned
/// self-signed one for hybridlink peers (they offer
/// [`transport::tls::RELAY_ALPN`]) and for everyone when there is no
/// CA-issued one; the CA-issued one for everyone else.
#[derive(Debug)]
pub struct RelayCertResolver {
    pinned: Arc<CertifiedKey>,
    ca: Option<ServedCaCert>,
}

impl RelayCertResolver {
    /// Serves `pinned` to hybridlink peers and `ca`, if any, to the rest.
    pub fn new(pinned: Arc<CertifiedKey>, ca: Option<ServedCaCert>) -> RelayCertResolver {
        RelayCertResolver { pinned, ca }
    }

    /// The relay port's server configuration (ring, no client
    /// authentication) choosing with this resolver.
    pub fn server_config(self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let config = rustls::ServerConfig::builder_with_provider(transport::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self));
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for RelayCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match &self.ca {
            Some(ca) if !offers_relay_alpn(&hello) => Some(ca.get().key),
            _ => Some(self.pinned.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::control::Fingerprint;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    use rustls::{ClientConfig, ClientConnection, ServerConnection};

    /// A private CA that issues leaves for `localhost`.
    struct TestCa {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    impl TestCa {
        fn new() -> TestCa {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, "hybridlink test CA");
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            TestCa {
                issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
            }
        }

        /// A leaf's chain (leaf then CA) and key, in PEM.
        fn leaf(&self) -> (Vec<u8>, Vec<u8>) {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let chain = format!("{}{}", cert.pem(), self.issuer.pem());
            (chain.into_bytes(), key.serialize_pem().into_bytes())
        }

        /// A client that trusts this CA and offers no ALPN, as Azure
        /// Relay's clients do.
        fn client(&self) -> Arc<ClientConfig> {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.issuer.der().clone()).unwrap();
            Arc::new(
                ClientConfig::builder_with_provider(transport::tls::provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
    }

    fn files(dir: &std::path::Path) -> CaCertFiles {
        CaCertFiles {
            cert: dir.join("fullchain.pem"),
            key: dir.join("privkey.pem"),
        }
    }

    fn sha256_of_pem(pem: &[u8]) -> [u8; 32] {
        Fingerprint::of_der(&CertificateDer::from_pem_slice(pem).unwrap()).0
    }

    /// Runs a handshake in memory; the certificate the client got, or why
    /// it failed.
    fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<CertificateDer<'static>, rustls::Error> {
        let mut client = ClientConnection::new(client, "localhost".try_into().unwrap())?;
        let mut server = ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(client.peer_certificates().unwrap()[0].clone());
            }
        }
        panic!("handshake did not complete");
    }

    #[test]
    fn hybridlink_peers_get_the_pinned_certificate_and_the_rest_the_ca_one() {
        let data = tempfile::tempdir().unwrap();
        let identity = crate::identity::RelayIdentity::load_or_create(data.path()).unwrap();
        let pinned =
            transport::tls::relay_client_config(Fingerprint(identity.cert_sha256())).unwrap();
        let mut old_peer = (*pinned).clone();
        old_peer.alpn_protocols.clear();
        // Its own session cache: a resumed session presents no certificate.
        old_peer.resumption = rustls::client::Resumption::disabled();
        let old_peer = Arc::new(old_peer);
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let (chain, key) = ca.leaf();
        let (_watch, loaded) = CaCertWatch::start(files, Ok((chain.clone(), key))).unwrap();
        let with_ca =
            RelayCertResolver::new(identity.certified_key(), Some(ServedCaCert::new(loaded)))
                .server_config()
                .unwrap();

        // A hybridlink peer: the pinned certificate.
        let got = handshake(pinned.clone(), with_ca.clone()).unwrap();
        assert_eq!(&got, identity.cert_der());
        // An Azure client: the CA's, which it verifies with the CA alone.
        let got = handshake(ca.client(), with_ca.clone()).unwrap();
        assert_eq!(sha256_of_pem(&chain), Fingerprint::of_der(&got).0);
        // One offering http/1.1 is not refused for it.
        let mut http = (*ca.client()).clone();
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        handshake(Arc::new(http), with_ca.clone()).unwrap();
        // A peer from before the ALPN id gets the CA's and fails its pin.
        let err = handshake(old_peer.clone(), with_ca).unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );

        // Without a CA certificate, everyone gets the pinned one, old peers
        // included.
        let without = RelayCertResolver::new(identity.certified_key(), None)
            .server_config()
            .unwrap();
        for client in [pinned, old_peer] {
            assert_eq!(
                &handshake(client, without.clone()).unwrap(),
                identity.cert_der()
            );
        }
        assert!(handshake(ca.client(), without).is_err());
    }

    /// Observes the same read twice: the first settles, the second acts.
    fn twice(watch: &mut CaCertWatch, read: impl Fn() -> Snapshot) -> Reload {
        let first = watch.observe(read());
        assert!(matches!(first, Reload::Settling), "{first:?}");
        watch.observe(read())
    }

    #[test]
    fn changes_load_once_and_bad_ones_are_reported_once() {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let first = ca.leaf();
        let (mut watch, loaded) = CaCertWatch::start(files.clone(), Ok(first.clone())).unwrap();
        assert_eq!(loaded.sha256, sha256_of_pem(&first.0));
        assert!(matches!(
            watch.observe(Ok(first.clone())),
            Reload::Unchanged
        ));

        // A renewal.
        let second = ca.leaf();
        match twice(&mut watch, || Ok(second.clone())) {
            Reload::Loaded(l) => assert_eq!(l.sha256, sha256_of_pem(&second.0)),
            other => panic!("{other:?}"),
        }

        // A corrupt certificate: reported, then quiet while it stays so.
        let corrupt = (b"garbage".to_vec(), second.1.clone());
        match twice(&mut watch, || Ok(corrupt.clone())) {
            Reload::Failed(e) => assert!(
                e.to_string().starts_with(&format!(
                    "{} holds no PEM certificate",
                    files.cert.display()
                )),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(watch.observe(Ok(corrupt)), Reload::Unchanged));

        // A key of another certificate.
        let other = ca.leaf();
        match twice(&mut watch, || Ok((second.0.clone(), other.1.clone()))) {
            Reload::Failed(e) => {
                assert!(matches!(e, CaCertError::Unusable { .. }), "{e}");
                assert!(e.to_string().contains("give the key that belongs"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        // No key at all.
        match twice(&mut watch, || Ok((second.0.clone(), b"".to_vec()))) {
            Reload::Failed(e) => assert!(matches!(e, CaCertError::NoKey { .. }), "{e}"),
            other => panic!("{other:?}"),
        }
        // A file gone.
        let missing = || {
            Err(CaCertError::Read {
                path: files.key.clone(),
                source: io::Error::from(io::ErrorKind::NotFound),
            })
        };
        assert!(matches!(twice(&mut watch, missing), Reload::Failed(_)));
        // Fixed again.
        assert!(matches!(
            twice(&mut watch, || Ok(second.clone())),
            Reload::Loaded(_)
        ));
    }

    #[test]
    fn a_renewal_caught_half_written_is_not_reported() {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let old = ca.leaf();
        let (mut watch, _) = CaCertWatch::start(files(dir.path()), Ok(old.clone())).unwrap();
        let new = ca.leaf();
        // The new key beside the old certificate, for one read.
        let half = watch.observe(Ok((old.0.clone(), new.1.clone())));
        assert!(matches!(half, Reload::Settling), "{half:?}");
        match twice(&mut watch, || Ok(new.clone())) {
            Reload::Loaded(l) => assert_eq!(l.sha256, sha256_of_pem(&new.0)),
            other => panic!("{other:?}"),
        }
        // Going back and forth before settling acts on nothing.
        assert!(matches!(watch.observe(Ok(old.clone())), Reload::Settling));
        assert!(matches!(watch.observe(Ok(new)), Reload::Unchanged));
        assert!(matches!(watch.observe(Ok(old)), Reload::Settling));
    }

    #[tokio::test]
    async fn a_relay_does_not_start_with_files_that_do_not_load() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let err = CaCertWatch::start(files.clone(), read(&files).await).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}", files.cert.display())),
            "{err}"
        );
        std::fs::write(&files.cert, b"-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        std::fs::write(&files.key, b"").unwrap();
        let err = CaCertWatch::start(files.clone(), read(&files).await).unwrap_err();
        assert!(matches!(err, CaCertError::NoCertificate { .. }), "{err}");
    }
}
