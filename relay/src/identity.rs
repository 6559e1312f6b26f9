//! The relay's TLS identity: a self-signed certificate and its key, kept in
//! the data directory.
//!
//! On first start the relay makes a certificate (subject alternative names
//! `localhost`, `127.0.0.1` and any names given) and an ECDSA P-256 key and
//! stores them as `cert.pem` and `key.pem` (both mode 0600). Later starts
//! load them. Clients pin the certificate by the SHA-256 of its DER encoding
//! (`CertificateSha256` in connection strings), so a file that cannot be read
//! is an error, never a reason to make a new identity: that would silently
//! break every connection string handed out.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::digest;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use thiserror::Error;

use transport::atomic_file::AtomicFile;

/// File name of the certificate inside the data directory.
pub const CERT_FILE: &str = "cert.pem";

/// File name of the private key inside the data directory.
pub const KEY_FILE: &str = "key.pem";

/// Why the relay's identity could not be loaded or made.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file exists but cannot be read.
    #[error("cannot read {path}: {source}; check its permissions")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Only one of `cert.pem` and `key.pem` exists.
    #[error(
        "{present} exists but {missing} does not; restore {missing} from a backup, or delete {present} to make a new identity (every connection string must then be fetched again)"
    )]
    HalfPresent {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A file does not hold what it should.
    #[error(
        "{path} is corrupt: {reason}; restore it from a backup, or delete cert.pem and key.pem to make a new identity (every connection string must then be fetched again)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate and key do not go together, or rustls rejects them.
    #[error(
        "cert.pem and key.pem in {dir} do not form a usable TLS identity: {source}; restore them from a backup, or delete both to make a new identity"
    )]
    Mismatch {
        /// The data directory.
        dir: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// A name given for the certificate is not valid.
    #[error("cannot make a certificate: {0}; check the names given for the relay")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The relay's certificate and key, ready to serve TLS.
#[derive(Debug, Clone)]
pub struct RelayIdentity {
    cert: CertificateDer<'static>,
    cert_sha256: [u8; 32],
    certified_key: Arc<CertifiedKey>,
    server_config: Arc<ServerConfig>,
}

impl RelayIdentity {
    /// Loads the identity from `data_dir`, or makes and stores one (valid
    /// for `localhost` and `127.0.0.1`) if neither file exists.
    pub fn load_or_create(data_dir: &Path) -> Result<RelayIdentity, IdentityError> {
        Self::load_or_create_with_names(data_dir, &[])
    }

    /// Like [`RelayIdentity::load_or_create`], adding `names` (DNS names or
    /// IP addresses) to the certificate's subject alternative names when one
    /// is made. An existing certificate is loaded as it is: pinning clients
    /// check its hash, not its names.
    pub fn load_or_create_with_names(
        data_dir: &Path,
        names: &[String],
    ) -> Result<RelayIdentity, IdentityError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|source| IdentityError::CreateDir {
                path: data_dir.to_owned(),
                source,
            })?;
        let cert_path = data_dir.join(CERT_FILE);
        let key_path = data_dir.join(KEY_FILE);
        let cert_pem = read_if_present(&cert_path)?;
        let key_pem = read_if_present(&key_path)?;
        let (cert_pem, key_pem) = match (cert_pem, key_pem) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => create(data_dir, names)?,
            (Some(_), None) => {
                return Err(IdentityError::HalfPresent {
                    present: cert_path,
                    missing: key_path,
                });
            }
            (None, Some(_)) => {
                return Err(IdentityError::HalfPresent {
                    present: key_path,
                    missing: cert_path,
                });
            }
        };
        let cert =
            CertificateDer::from_pem_slice(&cert_pem).map_err(|e| IdentityError::Corrupt {
                path: cert_path,
                reason: format!("no PEM certificate in it ({e})"),
            })?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| IdentityError::Corrupt {
            path: key_path,
            reason: format!("no PEM private key in it ({e})"),
        })?;
        let mismatch = |source| IdentityError::Mismatch {
            dir: data_dir.to_owned(),
            source,
        };
        let provider = transport::tls::provider();
        let certified_key =
            Arc::new(CertifiedKey::from_der(vec![cert.clone()], key, &provider).map_err(mismatch)?);
        let server_config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(mismatch)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(PinnedOnly(certified_key.clone())));
        let mut cert_sha256 = [0u8; 32];
        cert_sha256.copy_from_slice(digest::digest(&digest::SHA256, &cert).as_ref());
        Ok(RelayIdentity {
            cert,
            cert_sha256,
            certified_key,
            server_config: Arc::new(server_config),
        })
    }

    /// SHA-256 of the DER certificate: the `CertificateSha256` of connection
    /// strings.
    pub fn cert_sha256(&self) -> [u8; 32] {
        self.cert_sha256
    }

    /// The DER certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// A rustls server configuration (ring provider, no client
    /// authentication) serving this certificate to every client; the
    /// management API's with `--api-tls`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }

    /// The certificate and its signing key, for a resolver that serves it
    /// beside others ([`crate::ca_cert::RelayCertResolver`]).
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified_key.clone()
    }
}

/// Serves the relay's own certificate to every client.
#[derive(Debug)]
struct PinnedOnly(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for PinnedOnly {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>, IdentityError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Makes a certificate and key, writes them (key first, so that a crash in
/// between leaves a key without a certificate, reported at next start), and
/// returns their PEM text.
fn create(data_dir: &Path, names: &[String]) -> Result<(Vec<u8>, Vec<u8>), IdentityError> {
    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for name in names {
        if !sans.contains(name) {
            sans.push(name.clone());
        }
    }
    let certified = rcgen::generate_simple_self_signed(sans)?;
    let cert_pem = certified.cert.pem().into_bytes();
    let key_pem = certified.signing_key.serialize_pem().into_bytes();
    for (file, bytes) in [(KEY_FILE, &key_pem), (CERT_FILE, &cert_pem)] {
        let path = data_dir.join(file);
        AtomicFile::new(&path)
            .mode(0o600)
            .write(bytes)
            .map_err(|source| IdentityError::Write { path, source })?;
    }
    Ok((cert_pem, key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn creates_once_then_loads_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let first = RelayIdentity::load_or_create_with_names(dir.path(), &["relay.example".into()])
            .unwrap();
        for file in [CERT_FILE, KEY_FILE] {
            let mode = fs::metadata(dir.path().join(file)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        let second = RelayIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_sha256(), second.cert_sha256());
        assert_eq!(first.cert_der(), second.cert_der());
        let expected = digest::digest(&digest::SHA256, second.cert_der());
        assert_eq!(&second.cert_sha256()[..], expected.as_ref());
        // The requested name made it into the certificate.
        let der: &[u8] = first.cert_der();
        assert!(der.windows(13).any(|w| w == b"relay.example"));
        let other = tempfile::tempdir().unwrap();
        let third = RelayIdentity::load_or_create(other.path()).unwrap();
        assert_ne!(first.cert_sha256(), third.cert_sha256());
    }

    #[test]
    fn corrupt_files_are_errors_not_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        RelayIdentity::load_or_create(dir.path()).unwrap();
        let cert_path = dir.path().join(CERT_FILE);
        let good_cert = fs::read(&cert_path).unwrap();

        fs::write(&cert_path, b"garbage").unwrap();
        let err = RelayIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().starts_with(&format!(
                "{} is corrupt: no PEM certificate",
                cert_path.display()
            )),
            "{err}"
        );
        assert_eq!(fs::read(&cert_path).unwrap(), b"garbage");

        fs::write(&cert_path, &good_cert).unwrap();
        let key_path = dir.path().join(KEY_FILE);
        fs::write(
            &key_path,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = RelayIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn key_of_another_identity_is_rejected() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        RelayIdentity::load_or_create(a.path()).unwrap();
        RelayIdentity::load_or_create(b.path()).unwrap();
        fs::copy(b.path().join(KEY_FILE), a.path().join(KEY_FILE)).unwrap();
        let err = RelayIdentity::load_or_create(a.path()).unwrap_err();
        assert!(matches!(err, IdentityError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn half_present_identity_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        RelayIdentity::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let err = RelayIdentity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, IdentityError::HalfPresent { .. }));
        assert!(err.to_string().contains("cert.pem does not"), "{err}");
        assert!(!dir.path().join(CERT_FILE).exists());
    }

    #[test]
    fn server_config_completes_a_handshake_pinned_by_hash() {
        use rustls::{ClientConnection, ServerConnection};

        let dir = tempfile::tempdir().unwrap();
        let identity = RelayIdentity::load_or_create(dir.path()).unwrap();
        // The client side exactly as agents and senders build it.
        let client_config = transport::tls::relay_client_config(proto::control::Fingerprint(
            identity.cert_sha256(),
        ))
        .unwrap();
        let mut client =
            ClientConnection::new(client_config, "localhost".try_into().unwrap()).unwrap();
        let mut server = ServerConnection::new(identity.server_config()).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
        }
        panic!("handshake did not complete");
    }
}
