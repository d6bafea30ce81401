//! Ledger commands: the opaque, signed, versioned unit that Raft replicates.
//!
//! This crate does not know FHIR: a command names resource *types* and *ids* as strings,
//! carries already-encrypted bodies and already-hashed index keys, and states the
//! preconditions under which it may apply. The node that received the request decides every
//! non-deterministic value (ids, versions, timestamps, keys) before proposing.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the serialized [`Batch`] layout; a node refuses batches of a version it does not know.
pub const COMMAND_FORMAT: u16 = 1;

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
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
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
    #[error("batch format {0} is not supported (expected {COMMAND_FORMAT})")]
    Format(u16),
}

impl SignedBatch {
    /// The signed message: a domain tag and the SHA-256 of the payload. Signing the digest
    /// rather than the payload spares ed25519's two SHA-512 passes over megabyte batches.
    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = b"fhir-ledger batch v1\0".to_vec();
        m.extend_from_slice(&Sha256::digest(payload));
        m
    }

    pub fn sign(batch: &Batch, key: &SigningKey) -> Result<Self, BatchError> {
        let size = bincode::serialized_size(batch).map_err(|e| BatchError::Undecodable(e.to_string()))?;
        let mut payload = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        bincode::serialize_into(&mut payload, batch).map_err(|e| BatchError::Undecodable(e.to_string()))?;
        let signature = key.sign(&Self::message(&payload)).to_bytes().to_vec();
        Ok(Self { node_id: batch.node_id, payload, signature })
    }

    /// Checks the signature, then decodes. Both are deterministic, so every node agrees.
    pub fn open(&self, key: &VerifyingKey) -> Result<Batch, BatchError> {
        Self::open_parts(self.node_id, &self.payload, &self.signature, key)
    }

    /// Only the signature of a batch's parts: does `key` vouch for `payload`?
    pub fn verify_parts(node_id: u64, payload: &[u8], signature: &[u8], key: &VerifyingKey) -> Result<(), BatchError> {
        let sig = Signature::from_slice(signature).map_err(|_| BatchError::BadSignature(node_id))?;
        key.verify(&Self::message(payload), &sig).map_err(|_| BatchError::BadSignature(node_id))
    }

    /// [`SignedBatch::open`] over borrowed parts (the offline verifier reads them in place).
    pub fn open_parts(node_id: u64, payload: &[u8], signature: &[u8], key: &VerifyingKey) -> Result<Batch, BatchError> {
        Self::verify_parts(node_id, payload, signature, key)?;
        let batch: Batch = bincode::deserialize(payload).map_err(|e| BatchError::Undecodable(e.to_string()))?;
        if batch.format != COMMAND_FORMAT {
            return Err(BatchError::Format(batch.format));
        }
        if batch.node_id != node_id {
            return Err(BatchError::BadSignature(node_id));
        }
        Ok(batch)
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
