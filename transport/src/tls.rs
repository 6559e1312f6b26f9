//! TLS with pinned keys.
//!
//! Two uses, one idea: trust exactly the certificate whose SHA-256 we were
//! told, and check the handshake signatures made with its key.
//!
//! - The control channel to the relay pins the relay certificate named by the
//!   connection string's `CertificateSha256`.
//! - Inside a pipe, sender and agent each present a *data identity* (a
//!   self-signed certificate made at process start, never written to disk)
//!   and pin the other's, as announced by the relay over the authenticated
//!   control channel. The relay splices the pipe but never holds these keys,
//!   so it cannot read or alter the streams.
//!
//! Every hybridlink client of the relay port offers the ALPN protocol id
//! [`RELAY_ALPN`]: a relay that also serves a CA-issued certificate (for
//! Azure Relay's own clients) gives the pinned one to ClientHellos that
//! offer it.

use std::sync::Arc;

use proto::control::Fingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The one crypto provider of the workspace (ring). Having two enabled makes
/// rustls refuse to pick one at run time, so every config is built from this.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The provider for pipes, the data path: the same suites, AES-128-GCM
/// first. Pinned keys leave no reason for AES-256 here, and with AES
/// instructions AES-128-GCM is the cheapest suite per byte (ring: about a
/// fifth less work than AES-256-GCM); every byte of every stream is
/// encrypted once and decrypted once with it.
fn pipe_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The server name a pipe's TLS client presents. Certificates are pinned by
/// fingerprint, so the name only has to be syntactically valid.
const PIPE_SERVER_NAME: &str = "hybridlink-peer";

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen could not make the data certificate.
    #[error("could not generate the data certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A process's data identity: a fresh self-signed certificate and its key.
#[derive(Clone)]
pub struct DataIdentity {
    cert: CertificateDer<'static>,
    key: Arc<PrivatePkcs8KeyDer<'static>>,
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for DataIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataIdentity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl DataIdentity {
    /// Makes a new identity (ECDSA P-256: the cheapest handshake signatures).
    pub fn generate() -> Result<Self, TlsError> {
        let certified = rcgen::generate_simple_self_signed(vec![PIPE_SERVER_NAME.to_string()])?;
        let cert = certified.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
        let fingerprint = Fingerprint::of_der(&cert);
        Ok(DataIdentity {
            cert,
            key: Arc::new(key),
            fingerprint,
        })
    }

    /// What the relay announces to the other end of a pipe.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.as_ref().clone_key())
    }

    /// Client config for the sender's end of a pipe to the agent `peer`.
    pub fn pipe_client_config(
        &self,
        peer: Fingerprint,
    ) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = pipe_provider();
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert::new(peer, &provider)))
            .with_client_auth_cert(vec![self.cert.clone()], self.key_der())?;
        Ok(Arc::new(config))
    }

    /// Server config for a session whose client is authenticated by other
    /// means than a certificate: the end-to-end proofs inside it
    /// (`azure::inner`).
    pub fn unpinned_server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(pipe_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key_der())?;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(config))
    }

    /// Server config for the agent's end of a pipe from the sender `peer`.
    pub fn pipe_server_config(
        &self,
        peer: Fingerprint,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = pipe_provider();
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(PinnedCert::new(peer, &provider)))
            .with_single_cert(vec![self.cert.clone()], self.key_der())?;
        // A pipe is long-lived and opened once; no resumption to manage.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(config))
    }
}

/// The server name to pass to a pipe's TLS client.
pub fn pipe_server_name() -> ServerName<'static> {
    // A constant, valid DNS name.
    #[allow(clippy::expect_used)]
    ServerName::try_from(PIPE_SERVER_NAME).expect("constant is a valid DNS name")
}

/// The ALPN protocol id hybridlink peers offer to the relay. It tells the
/// relay to present its self-signed certificate, the one connection strings
/// pin (`CertificateSha256`), even when it also has a CA-issued one for
/// Azure Relay's clients, which offer no ALPN. The relay only reads the
/// offer and selects no protocol, so peers must not require one back.
pub const RELAY_ALPN: &[u8] = b"hybridlink/1";

/// Client config for a control channel to a relay whose certificate has the
/// SHA-256 `relay_cert` (from the connection string); it offers
/// [`RELAY_ALPN`]. The management API client uses it too for `--api-tls`,
/// whose listener ignores the offer.
pub fn relay_client_config(relay_cert: Fingerprint) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert::new(relay_cert, &provider)))
        .with_no_client_auth();
    // The second id asks for the relay node list; a relay selects it or
    // nothing, and an older one ignores it.
    config.alpn_protocols = vec![RELAY_ALPN.to_vec(), proto::control::NODES_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The certificates in the PEM file `path` (CA certificates to trust, for
/// `--ca-file` and `--api-ca`); an error says why none could be read.
pub fn pem_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// Client config for a TLS session whose server is authenticated by other
/// means than its certificate, which nobody introduced: the end-to-end
/// proofs bound to the session (`azure::inner`). Any certificate is taken,
/// but the handshake must still be signed with its key.
pub fn unpinned_client_config() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = pipe_provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert::any(&provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts exactly one certificate, named by its SHA-256 (or, made with
/// [`PinnedCert::any`], whichever the peer shows), and checks that the
/// handshake was signed with its key.
/// A certificate other than the pinned one.
#[derive(Debug, thiserror::Error)]
#[error("its SHA-256 is {got}, not the pinned {expected}")]
pub struct PinMismatch {
    /// The pin.
    pub expected: Fingerprint,
    /// What the peer presented.
    pub got: Fingerprint,
}

/// The pin mismatch behind a failed handshake, if that is what failed.
pub fn pin_mismatch(e: &std::io::Error) -> Option<&PinMismatch> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = tls else {
        return None;
    };
    other.0.downcast_ref::<PinMismatch>()
}

#[derive(Debug)]
struct PinnedCert {
    expected: Option<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedCert {
    fn new(expected: Fingerprint, provider: &CryptoProvider) -> Self {
        PinnedCert {
            expected: Some(expected),
            algorithms: provider.signature_verification_algorithms,
        }
    }

    fn any(provider: &CryptoProvider) -> Self {
        PinnedCert {
            expected: None,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let Some(expected) = self.expected else {
            return Ok(());
        };
        let got = Fingerprint::of_der(end_entity);
        if got == expected {
            Ok(())
        } else {
            tracing::warn!(%expected, got = %got, "peer certificate does not match the pinned fingerprint");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    expected,
                    got,
                }))),
            ))
        }
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a pipe handshake in memory and returns the negotiated suite.
    fn pipe_suite() -> rustls::SupportedCipherSuite {
        let (sender, agent) = (
            DataIdentity::generate().unwrap(),
            DataIdentity::generate().unwrap(),
        );
        let client_config = sender.pipe_client_config(agent.fingerprint()).unwrap();
        let server_config = agent.pipe_server_config(sender.fingerprint()).unwrap();
        let mut client = rustls::ClientConnection::new(client_config, pipe_server_name()).unwrap();
        let mut server = rustls::ServerConnection::new(server_config).unwrap();
        let mut wire = Vec::new();
        while client.is_handshaking() || server.is_handshaking() {
            wire.clear();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        client.negotiated_cipher_suite().unwrap()
    }

    #[test]
    fn relay_clients_offer_the_hybridlink_alpn_id() {
        let config = relay_client_config(Fingerprint([7; 32])).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"hybridlink/1".to_vec(), b"hybridlink/1+nodes".to_vec()]
        );
    }

    #[test]
    fn pipes_use_aes_128_gcm() {
        assert_eq!(
            pipe_suite().suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
