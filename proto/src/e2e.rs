//! End-to-end verification between a sender and an agent, anchored in a
//! secret the relay never sees.
//!
//! Inside a pipe, sender and agent run TLS pinning the data certificates the
//! relay announced. An honest relay cannot read that TLS; a relay that lies
//! about the certificates can stand in the middle and run one TLS session
//! with each end. The end-to-end key closes that gap: it is made on the
//! on-prem side (`hybridlink agent install`), carried to the app side by the
//! people who run both (the `EndToEndKey` field of the connection strings),
//! and never sent to the relay.
//!
//! Each end proves it holds the key *for this TLS session*: it sends
//! `HMAC-SHA256(key, context)` where the context names the proof's direction,
//! the hybrid connection and a TLS exporter value (RFC 8446 §7.5) of the
//! pipe's session. Both ends of one TLS session compute the same exporter
//! value; a relay in the middle has two sessions with two different values,
//! so a proof it relays from one leg does not verify on the other, and it
//! cannot compute one itself without the key.
//!
//! - The sender puts its proof in the stream request ([`crate::control::StreamRequest`]);
//!   the agent checks it before it dials anything.
//! - The agent puts its proof in the stream's accept payload
//!   ([`crate::control::StreamAccept`]); the sender checks it before a single
//!   byte of the application's data goes out (the appliance answers the
//!   application's SYN only after that).

use ring::hmac;

use crate::control::{hex_decode, hex_encode};
use crate::key::Key;
use crate::name::HcName;

/// The label of the TLS exporter value the proofs are bound to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-hybridlink-end-to-end-v1";

/// Length of the TLS exporter value.
pub const BINDING_LEN: usize = 32;

/// The pipe's TLS session, as both of its ends see it: a value exported from
/// the session's secrets. Two TLS sessions never share one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChannelBinding(pub [u8; BINDING_LEN]);

impl std::fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelBinding(..)")
    }
}

/// Which end makes a proof. The two directions never verify for each other,
/// so a proof cannot be reflected back to the end that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProofRole {
    /// The sender, when it opens a stream.
    Sender,
    /// The agent, when it accepts one.
    Agent,
}

impl ProofRole {
    fn tag(self) -> &'static [u8] {
        match self {
            ProofRole::Sender => b"sender-opens",
            ProofRole::Agent => b"agent-accepts",
        }
    }
}

/// Why a proof did not verify, in words that say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndToEndError {
    /// The other end sent no proof although this end holds the key.
    #[error(
        "end-to-end check failed: the {0} sent no end-to-end proof; it runs without this hybrid connection's EndToEndKey (add the key `hybridlink agent install` printed to its connection string), or the relay is intercepting the pipe"
    )]
    Missing(&'static str),
    /// A proof was sent but is not valid for this session and key.
    #[error(
        "end-to-end check failed: the {0}'s proof does not match this hybrid connection's EndToEndKey and this pipe; the two ends hold different keys, or the relay is intercepting the pipe"
    )]
    Mismatch(&'static str),
}

fn context(role: ProofRole, hc: &HcName, binding: &ChannelBinding) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64 + hc.as_str().len() + BINDING_LEN);
    msg.extend_from_slice(b"hybridlink end-to-end v1\0");
    msg.extend_from_slice(role.tag());
    msg.push(0);
    msg.extend_from_slice(hc.as_str().as_bytes());
    msg.push(0);
    msg.extend_from_slice(&binding.0);
    msg
}

/// The proof `role` sends for a stream of `hc` on the pipe whose TLS session
/// exported `binding`, as hex.
pub fn prove(key: &Key, role: ProofRole, hc: &HcName, binding: &ChannelBinding) -> String {
    let tag = hmac::sign(&key.hmac_key(), &context(role, hc, binding));
    hex_encode(tag.as_ref())
}

/// Checks the proof the other end (`role`) sent, in constant time.
pub fn verify(
    key: &Key,
    role: ProofRole,
    hc: &HcName,
    binding: &ChannelBinding,
    proof: Option<&str>,
) -> Result<(), EndToEndError> {
    let who = match role {
        ProofRole::Sender => "sender",
        ProofRole::Agent => "agent",
    };
    let proof = proof.ok_or(EndToEndError::Missing(who))?;
    let tag = hex_decode::<32>(proof).ok_or(EndToEndError::Mismatch(who))?;
    hmac::verify(&key.hmac_key(), &context(role, hc, binding), &tag)
        .map_err(|_| EndToEndError::Mismatch(who))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(s: &str) -> HcName {
        s.parse().unwrap()
    }

    #[test]
    fn a_proof_verifies_only_for_its_key_role_hc_and_session() {
        let key = Key::generate().unwrap();
        let other_key = Key::generate().unwrap();
        let b = ChannelBinding([1; 32]);
        let p = prove(&key, ProofRole::Sender, &hc("payroll"), &b);
        assert_eq!(
            verify(&key, ProofRole::Sender, &hc("payroll"), &b, Some(&p)),
            Ok(())
        );
        // Another TLS session (a relay in the middle has two).
        let err = verify(
            &key,
            ProofRole::Sender,
            &hc("payroll"),
            &ChannelBinding([2; 32]),
            Some(&p),
        );
        assert_eq!(err, Err(EndToEndError::Mismatch("sender")));
        // Reflected back as the other direction.
        assert!(verify(&key, ProofRole::Agent, &hc("payroll"), &b, Some(&p)).is_err());
        // Another hybrid connection, another key.
        assert!(verify(&key, ProofRole::Sender, &hc("sql"), &b, Some(&p)).is_err());
        assert!(verify(&other_key, ProofRole::Sender, &hc("payroll"), &b, Some(&p)).is_err());
        // Nothing, or garbage.
        let missing = verify(&key, ProofRole::Agent, &hc("payroll"), &b, None).unwrap_err();
        assert!(missing.to_string().contains("end-to-end"), "{missing}");
        assert!(verify(&key, ProofRole::Sender, &hc("payroll"), &b, Some("zz")).is_err());
    }
}
