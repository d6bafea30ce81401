//! Ledger commands: the opaque, signed, versioned unit that Raft replicates.
//!
//! This crate does not know FHIR: a command names resource *types* and *ids* as strings,
//! carries already-encrypted bodies and already-hashed index keys, and states the
//! preconditions under which it may apply. The node that received the request decides every
//! non-deterministic value (ids, versions, timestamps, keys) before proposing.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the serialized [`Batch`] layout and of what its signature covers; a node refuses
/// batches of a version it does not know. Format 1 signs the payload's SHA-256; format 2 signs
/// the payload with each write's body replaced by the body's SHA-256, so every node hashes a
/// body once, for the signature and for the digest its leaf commits to alike.
pub const COMMAND_FORMAT: u16 = 2;

/// The formats a node still applies and verifies (a log written before format 2 stays valid).
pub const READ_FORMATS: [u16; 2] = [1, COMMAND_FORMAT];

/// A 32-byte keyed digest of one search-index term (computed outside this crate).
pub type IndexKey = [u8; 32];

/// What a [`Write`] does to its resource (recorded in the leaf header as [`Op::as_str`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Op {
    /// The first version of a resource.
    Create,
    /// A later version.
    Update,
    /// A deletion marker: a new version with an empty body; history stays.
    Delete,
    /// Crypto-shredding: deletes the resource and destroys its compartment's data key, so no
    /// version of the compartment can be decrypted again; digests and proofs stay valid.
    /// (Appended last: bincode numbers variants, and older logs must still decode.)
    Erase,
}

impl Op {
    /// The name leaf headers and history carry: `create`, `update`, `delete`, `erase`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Erase => "erase",
        }
    }
}

/// One new version of one resource.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Write {
    /// The resource type.
    pub rtype: String,
    /// The resource id.
    pub id: String,
    /// The version this write creates; must be the current version + 1.
    pub version: u64,
    /// What the version does.
    pub op: Op,
    /// The version's `meta.lastUpdated` in ms since the epoch, decided by the proposing node.
    pub last_updated_ms: i64,
    /// Whose data key encrypted `body` (e.g. `Patient/123`, or a shared compartment).
    pub compartment: String,
    /// Nonce-prefixed ciphertext; empty for deletes.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The writer's commitment to the plaintext (a salted SHA-256, see
    /// [`crate::state_machine::LeafHeader::content_sha256`]); zero for deletes.
    pub content_sha256: [u8; 32],
    /// Search-index terms of this version (replaces the previous version's terms).
    pub index: Vec<IndexKey>,
}

/// What must still hold when the command applies; otherwise it is refused as a whole.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Precondition {
    /// The resource's current version (0 = never existed; deleted versions count).
    Version {
        /// The resource type.
        rtype: String,
        /// The resource id.
        id: String,
        /// The version it must be at.
        current: u64,
    },
    /// The live resources of `rtype` matching every group (a group matches if any of its terms
    /// does) are exactly `ids` (sorted).
    Matches {
        /// The resource type searched.
        rtype: String,
        /// Groups of index terms, all of which must match (any term of a group).
        all_of: Vec<Vec<IndexKey>>,
        /// The ids the search found when the command was planned, sorted.
        ids: Vec<String>,
    },
    /// No data key is registered for the compartment yet.
    KeyAbsent {
        /// The compartment (e.g. `Patient/123`).
        compartment: String,
    },
    /// The compartment's wrapped data key is still the one with this SHA-256 (a body
    /// encrypted under it must not land after the key was erased or replaced).
    KeyIs {
        /// The compartment (e.g. `Patient/123`).
        compartment: String,
        /// SHA-256 of the wrapped data key the bodies were encrypted under.
        sha256: [u8; 32],
    },
}

/// One client request: a single interaction or a whole transaction bundle. All or nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Command {
    /// Who asked (recorded in every leaf header the command writes).
    pub actor: String,
    /// Checked in order before anything is written; the first to fail is reported.
    pub preconditions: Vec<Precondition>,
    /// Wrapped data keys for compartments first seen by this command.
    pub new_keys: Vec<(String, Vec<u8>)>,
    /// The new versions, appended as Merkle leaves in this order.
    pub writes: Vec<Write>,
}

/// Commands proposed together as one Raft entry (group commit).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Batch {
    pub format: u16,
    pub node_id: u64,
    pub commands: Vec<Command>,
}

/// A [`Batch`] serialized and signed by the proposing node's ed25519 key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignedBatch {
    pub node_id: u64,
    /// Shared, not copied, between the log's recent entries and apply (megabytes for a large
    /// transaction); encoded as a byte string, as a `Vec<u8>` through `serde_bytes` was.
    pub payload: bytes::Bytes,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Display for SignedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedBatch(node {}, {} bytes)", self.node_id, self.payload.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch signature does not verify against node {0}'s key")]
    BadSignature(u64),
    #[error("batch is not decodable: {0}")]
    Undecodable(String),
    #[error("batch format {0} is not supported (expected one of {READ_FORMATS:?})")]
    Format(u16),
}

/// A write's body as its batch's signature covers it: where it lies in the payload and its
/// SHA-256 (the digest its leaf commits to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyDigest {
    /// Offset of the body's first byte in the batch's payload.
    pub at: usize,
    /// SHA-256 of the body's bytes.
    pub sha256: [u8; 32],
}

/// What a payload's signature must cover, its batch decoded in place, and its writes' bodies
/// in apply order.
struct Digested<'a> {
    message: Vec<u8>,
    batch: crate::entry_ref::BatchRef<'a>,
    bodies: Vec<BodyDigest>,
}

impl<'a> Digested<'a> {
    /// Hashes each body once. Format 2's message is the SHA-256 of the payload with every body
    /// replaced by its digest: a decoder of that stream knows where each body was (bincode
    /// writes its length first) and reads 32 bytes instead, so the stream determines the
    /// payload up to a SHA-256 collision, as the payload's own digest would.
    fn of(payload: &'a [u8]) -> Result<Self, BatchError> {
        let undecodable = |why: &str| BatchError::Undecodable(why.to_string());
        let batch: crate::entry_ref::BatchRef<'_> =
            bincode::deserialize(payload).map_err(|e| BatchError::Undecodable(e.to_string()))?;
        let base = payload.as_ptr() as usize;
        let mut skeleton = Sha256::new();
        let mut from = 0;
        let mut bodies = Vec::new();
        for w in batch.commands.iter().flat_map(|c| &c.writes) {
            let at = (w.body.as_ptr() as usize)
                .checked_sub(base)
                .ok_or_else(|| undecodable("a body outside the payload"))?;
            let end = at + w.body.len();
            if at < from || end > payload.len() {
                return Err(undecodable("bodies out of order"));
            }
            let sha256: [u8; 32] = Sha256::digest(w.body).into();
            skeleton.update(&payload[from..at]);
            skeleton.update(sha256);
            from = end;
            bodies.push(BodyDigest { at, sha256 });
        }
        let message = match batch.format {
            1 => [&b"fhir-ledger batch v1\0"[..], &Sha256::digest(payload)].concat(),
            2 => {
                skeleton.update(&payload[from..]);
                [&b"fhir-ledger batch v2\0"[..], &skeleton.finalize()].concat()
            }
            other => return Err(BatchError::Format(other)),
        };
        Ok(Self { message, batch, bodies })
    }
}

impl SignedBatch {
    /// Signs the batch: ed25519 over a domain tag and a SHA-256 ([`COMMAND_FORMAT`] says of
    /// what), which spares ed25519's two SHA-512 passes over megabyte batches.
    pub fn sign(batch: &Batch, key: &SigningKey) -> Result<Self, BatchError> {
        let size = bincode::serialized_size(batch).map_err(|e| BatchError::Undecodable(e.to_string()))?;
        let mut payload = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        bincode::serialize_into(&mut payload, batch).map_err(|e| BatchError::Undecodable(e.to_string()))?;
        let signature = key.sign(&Digested::of(&payload)?.message).to_bytes().to_vec();
        Ok(Self { node_id: batch.node_id, payload: payload.into(), signature })
    }

    /// Checks the signature, then decodes (both deterministic, so every node agrees), with each
    /// write's body digest in apply order computed on the way. Apply decodes in place
    /// ([`SignedBatch::verify_ref`]); this owned decoding is what tests compare.
    #[cfg(test)]
    pub fn open_digested(&self, key: &VerifyingKey) -> Result<(Batch, Vec<BodyDigest>), BatchError> {
        let (_, bodies) = Self::verify_ref(self.node_id, &self.payload, &self.signature, key)?;
        let batch: Batch = bincode::deserialize(&self.payload).map_err(|e| BatchError::Undecodable(e.to_string()))?;
        Ok((batch, bodies))
    }

    /// Whether `key` vouches for `payload`: if so, the batch decoded in place (the offline
    /// verifier's one decoding of it) and its writes' body digests.
    pub(crate) fn verify_ref<'a>(
        node_id: u64,
        payload: &'a [u8],
        signature: &[u8],
        key: &VerifyingKey,
    ) -> Result<(crate::entry_ref::BatchRef<'a>, Vec<BodyDigest>), BatchError> {
        let sig = Signature::from_slice(signature).map_err(|_| BatchError::BadSignature(node_id))?;
        let digested = Digested::of(payload)?;
        key.verify(&digested.message, &sig).map_err(|_| BatchError::BadSignature(node_id))?;
        if digested.batch.node_id != node_id {
            return Err(BatchError::BadSignature(node_id));
        }
        Ok((digested.batch, digested.bodies))
    }
}

/// The result of applying one [`Command`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the Merkle leaf index of each write, in order.
    Applied {
        /// Leaf index per write.
        leaves: Vec<u64>,
    },
    /// Precondition number `index` no longer held; nothing was written.
    Conflict {
        /// The failed precondition; `preconditions.len() + i` means write `i` did not extend
        /// its resource's current version by one, or wrote an id a previous write wrote.
        index: usize,
    },
    /// The whole batch was refused (bad signature, unknown format or proposer).
    Refused {
        /// Why, for the log and the client.
        reason: String,
    },
}

/// One [`Outcome`] per command of the batch, in order.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BatchOutcome {
    pub outcomes: Vec<Outcome>,
}

/// A create of `Observation/{id}` in `Patient/p`'s compartment with `terms` index terms.
#[cfg(test)]
pub(crate) fn test_write(id: &str, body: Vec<u8>, terms: usize) -> Write {
    Write {
        rtype: "Observation".into(),
        id: id.into(),
        version: 1,
        op: Op::Create,
        last_updated_ms: 1,
        compartment: "Patient/p".into(),
        body,
        content_sha256: [0; 32],
        index: vec![[3; 32]; terms],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(format: u16) -> Batch {
        let write = |id: &str, body: Vec<u8>| test_write(id, body, 1);
        let command = Command {
            actor: "a".into(),
            preconditions: vec![],
            new_keys: vec![],
            writes: vec![write("a", vec![1; 300]), write("b", Vec::new()), write("c", vec![2; 70])],
        };
        Batch { format, node_id: 4, commands: vec![command.clone(), command] }
    }

    /// Format 2 signs each body through its digest: the digests handed to apply are the
    /// bodies', and a changed byte anywhere (a body, its length, the rest) breaks the signature.
    #[test]
    fn a_format_2_signature_covers_every_byte_through_the_body_digests() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let b = batch(COMMAND_FORMAT);
        let signed = SignedBatch::sign(&b, &key).unwrap();
        let (opened, digests) = signed.open_digested(&key.verifying_key()).unwrap();
        let bodies: Vec<&Vec<u8>> = b.commands.iter().flat_map(|c| c.writes.iter().map(|w| &w.body)).collect();
        assert_eq!((opened.commands.len(), digests.len()), (2, 6));
        for (d, body) in digests.iter().zip(bodies) {
            assert_eq!((&signed.payload[d.at..d.at + body.len()], d.sha256), (&body[..], Sha256::digest(body).into()));
        }
        for i in 0..signed.payload.len() {
            let mut bad = signed.clone();
            let mut flipped = signed.payload.to_vec();
            flipped[i] ^= 1;
            bad.payload = flipped.into();
            assert!(bad.open_digested(&key.verifying_key()).is_err(), "byte {i} changed and still opened");
        }
    }

    /// A log written before format 2 still applies and verifies: format 1 signed the payload's
    /// SHA-256 under its own tag.
    #[test]
    fn a_format_1_batch_still_verifies() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let payload = bincode::serialize(&batch(1)).unwrap();
        let message = [&b"fhir-ledger batch v1\0"[..], &Sha256::digest(&payload)].concat();
        let signed =
            SignedBatch { node_id: 4, signature: key.sign(&message).to_bytes().to_vec(), payload: payload.into() };
        let (opened, digests) = signed.open_digested(&key.verifying_key()).unwrap();
        assert_eq!((opened.format, digests.len()), (1, 6));
        assert_eq!(digests[0].sha256, <[u8; 32]>::from(Sha256::digest([1u8; 300])));
        // The same payload signed as format 2 would sign is not a format 1 signature.
        let v2 = [&b"fhir-ledger batch v2\0"[..], &Sha256::digest(&signed.payload)].concat();
        let forged = SignedBatch { signature: key.sign(&v2).to_bytes().to_vec(), ..signed };
        assert!(matches!(forged.open_digested(&key.verifying_key()), Err(BatchError::BadSignature(4))));
        let unknown = SignedBatch::sign(&batch(3), &key);
        assert!(matches!(unknown, Err(BatchError::Format(3))));
    }
}
