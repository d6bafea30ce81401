//! Raft log entries decoded in place: openraft's `Entry` and our batch with every byte
//! string borrowed from the entry's encoding. The offline verifier reads megabyte entries
//! this way without copying them, and apply learns from it where in its entry each body lies
//! (the state references bodies there instead of storing them again).

use crate::command::{Op, SignedBatch};

/// A Raft log entry decoded in place: openraft's `Entry` with the batch's bytes borrowed, so
/// that megabyte payloads are hashed and compared where they lie instead of copied. Field and
/// variant order mirror openraft's and ours (bincode numbers variants and writes fields in
/// order); tests pin each mirror to the type it reads.
#[derive(serde::Deserialize)]
pub(crate) struct EntryRef<'a> {
    #[allow(dead_code)] // decoded to get past it
    pub(crate) log_id: openraft::LogId<crate::NodeId>,
    #[serde(borrow)]
    pub(crate) payload: PayloadRef<'a>,
}

#[derive(serde::Deserialize)]
pub(crate) enum PayloadRef<'a> {
    Blank,
    Normal(#[serde(borrow)] SignedBatchRef<'a>),
    Membership(#[allow(dead_code)] openraft::Membership<crate::NodeId, crate::Node>),
}

#[derive(serde::Deserialize)]
pub(crate) struct SignedBatchRef<'a> {
    pub(crate) node_id: u64,
    pub(crate) payload: &'a [u8],
    pub(crate) signature: &'a [u8],
}

/// [`crate::command::Batch`], borrowed.
#[derive(serde::Deserialize)]
pub(crate) struct BatchRef<'a> {
    pub(crate) format: u16,
    pub(crate) node_id: u64,
    #[serde(borrow)]
    pub(crate) commands: Vec<CommandRef<'a>>,
}

/// [`crate::command::Command`], borrowed.
#[derive(serde::Deserialize)]
pub(crate) struct CommandRef<'a> {
    pub(crate) actor: &'a str,
    pub(crate) preconditions: Vec<crate::command::Precondition>,
    #[serde(borrow)]
    pub(crate) new_keys: Vec<(&'a str, &'a [u8])>,
    #[serde(borrow)]
    pub(crate) writes: Vec<WriteRef<'a>>,
}

/// [`crate::command::Write`], borrowed.
#[derive(serde::Deserialize)]
pub(crate) struct WriteRef<'a> {
    pub(crate) rtype: &'a str,
    pub(crate) id: &'a str,
    pub(crate) version: u64,
    pub(crate) op: Op,
    pub(crate) last_updated_ms: i64,
    pub(crate) compartment: &'a str,
    pub(crate) body: &'a [u8],
    #[serde(deserialize_with = "hash")]
    pub(crate) content_sha256: [u8; 32],
    #[serde(deserialize_with = "hashes")]
    pub(crate) index: Vec<[u8; 32]>,
}

impl<'a> CommandRef<'a> {
    /// The owned command apply works on, each write's body left where it lies (empty in the
    /// write) and handed back beside it: apply references a body in its log entry, and copies
    /// it only when it must store it inline.
    pub(crate) fn detach(self) -> (crate::command::Command, Vec<&'a [u8]>) {
        let mut bodies = Vec::with_capacity(self.writes.len());
        let writes = self
            .writes
            .into_iter()
            .map(|w| {
                bodies.push(w.body);
                crate::command::Write {
                    rtype: w.rtype.to_string(),
                    id: w.id.to_string(),
                    version: w.version,
                    op: w.op,
                    last_updated_ms: w.last_updated_ms,
                    compartment: w.compartment.to_string(),
                    body: Vec::new(),
                    content_sha256: w.content_sha256,
                    index: w.index,
                }
            })
            .collect();
        let command = crate::command::Command {
            actor: self.actor.to_string(),
            preconditions: self.preconditions,
            new_keys: self.new_keys.into_iter().map(|(c, k)| (c.to_string(), k.to_vec())).collect(),
            writes,
        };
        (command, bodies)
    }
}

/// A 32-byte hash read as four little-endian u64s: bincode writes `[u8; 32]` as a tuple of
/// 32 bytes, which serde reads one element at a time (a fifth of `verify`'s time went
/// there). The same bytes, four reads; only for these bincode mirrors (tests pin them to the
/// owned types).
pub(crate) fn hash<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
    struct Words;
    impl<'de> serde::de::Visitor<'de> for Words {
        type Value = [u8; 32];
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("32 bytes")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; 32], A::Error> {
            let mut out = [0; 32];
            for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
                let word: u64 = seq.next_element()?.ok_or_else(|| serde::de::Error::invalid_length(i * 8, &self))?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            Ok(out)
        }
    }
    d.deserialize_tuple(4, Words)
}

/// A sequence of hashes, each read as [`hash`] reads one.
pub(crate) fn hashes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
    #[derive(serde::Deserialize)]
    struct One(#[serde(deserialize_with = "hash")] [u8; 32]);
    let all: Vec<One> = serde::Deserialize::deserialize(d)?;
    Ok(all.into_iter().map(|One(h)| h).collect())
}

/// Where the payload of `signed` begins in the encoding of the Raft entry that carries it
/// (whose encoding is `entry_len` bytes): the batch's bytes end the entry but for the
/// signature (bincode writes fields in order, a byte string as its u64 length and its bytes);
/// a test pins this to the encoding.
pub(crate) fn payload_start(entry_len: u64, signed: &SignedBatch) -> Option<u64> {
    entry_len.checked_sub(8 + signed.signature.len() as u64 + signed.payload.len() as u64)
}

/// A Raft entry's encoding in three parts that lie back to back: what precedes the batch's
/// payload (with its length), the payload itself (shared with the entry, not copied), and
/// the signature after it. The log writes them where they lie instead of copying megabytes
/// into one buffer twice; a test pins their concatenation to `bincode::serialize`.
pub(crate) struct EntryParts {
    head: Vec<u8>,
    payload: bytes::Bytes,
    tail: Vec<u8>,
}

impl EntryParts {
    pub(crate) fn of(entry: &openraft::Entry<crate::TypeConfig>) -> bincode::Result<Self> {
        let openraft::EntryPayload::Normal(signed) = &entry.payload else {
            return Ok(Self { head: bincode::serialize(entry)?, payload: bytes::Bytes::new(), tail: Vec::new() });
        };
        // The same entry with an empty payload encodes as head-with-length-0, then the
        // signature (see `payload_start`); the payload's length goes where the 0 was.
        let hollow = openraft::Entry::<crate::TypeConfig> {
            log_id: entry.log_id,
            payload: openraft::EntryPayload::Normal(SignedBatch {
                node_id: signed.node_id,
                payload: bytes::Bytes::new(),
                signature: signed.signature.clone(),
            }),
        };
        let mut head = bincode::serialize(&hollow)?;
        let split = head.len().checked_sub(8 + 8 + signed.signature.len());
        let Some(split) = split.filter(|&at| head[at..at + 8] == [0; 8]) else {
            return Err(Box::new(bincode::ErrorKind::Custom("unexpected Raft entry layout".into())));
        };
        let tail = head.split_off(split + 8);
        head[split..].copy_from_slice(&(signed.payload.len() as u64).to_le_bytes());
        Ok(Self { head, payload: signed.payload.clone(), tail })
    }

    pub(crate) fn parts(&self) -> [&[u8]; 3] {
        [&self.head, &self.payload, &self.tail]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Batch, Command, Write, COMMAND_FORMAT};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use sha2::Digest;

    fn write(id: &str, body: Vec<u8>) -> Write {
        crate::command::test_write(id, body, 5)
    }

    /// Hashes read as words come back byte for byte as bincode wrote them, alone and in a
    /// sequence, and a truncated one is an error.
    #[test]
    fn hashes_read_as_words_are_the_bytes_written() {
        #[derive(serde::Deserialize)]
        struct Both(#[serde(deserialize_with = "hash")] [u8; 32], #[serde(deserialize_with = "hashes")] Vec<[u8; 32]>);
        let one: [u8; 32] = std::array::from_fn(|i| i as u8 * 7 + 1);
        let many: Vec<[u8; 32]> = (0..3u8).map(|k| std::array::from_fn(|i| (i as u8) ^ (k * 91))).collect();
        let bytes = bincode::serialize(&(one, many.clone())).unwrap();
        let Both(a, b) = bincode::deserialize(&bytes).unwrap();
        assert_eq!((a, b), (one, many));
        assert!(bincode::deserialize::<Both>(&bytes[..20]).is_err());
    }

    /// The parts the log writes are, back to back, the entry's encoding, for every payload.
    #[test]
    fn entry_parts_are_the_encoding() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let batch = |n: usize| Batch {
            format: COMMAND_FORMAT,
            node_id: 2,
            commands: vec![Command {
                actor: "a".into(),
                preconditions: vec![],
                new_keys: vec![],
                writes: (0..n).map(|i| write(&i.to_string(), vec![u8::try_from(i % 250).unwrap(); 700])).collect(),
            }],
        };
        let log_id = LogId::new(CommittedLeaderId::new(3, 1), 77);
        let mut entries: Vec<Entry<crate::TypeConfig>> = [0, 1, 300]
            .into_iter()
            .map(|n| Entry { log_id, payload: EntryPayload::Normal(SignedBatch::sign(&batch(n), &key).unwrap()) })
            .collect();
        entries.push(Entry { log_id, payload: EntryPayload::Blank });
        for e in &entries {
            assert_eq!(EntryParts::of(e).unwrap().parts().concat(), bincode::serialize(e).unwrap());
        }
    }

    /// The offsets apply stores must be where the log's bytes hold each body, and the digests
    /// the signature check hands apply must be the bodies'.
    #[test]
    fn body_offsets_point_into_the_entry_encoding() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let cmd = |ids: &[&str]| Command {
            actor: "a".into(),
            preconditions: vec![],
            new_keys: vec![("Patient/p".into(), vec![7; 48])],
            writes: ids.iter().map(|id| write(id, id.repeat(50).into_bytes())).collect(),
        };
        let batch =
            Batch { format: COMMAND_FORMAT, node_id: 1, commands: vec![cmd(&["x", "yy"]), cmd(&[]), cmd(&["zzz"])] };
        let signed = SignedBatch::sign(&batch, &key).unwrap();
        let entry: Entry<crate::TypeConfig> = Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), 77),
            payload: EntryPayload::Normal(signed.clone()),
        };
        let bytes = bincode::serialize(&entry).unwrap();
        let start = payload_start(bytes.len() as u64, &signed).unwrap() as usize;
        let (_, digests) = signed.open_digested(&key.verifying_key()).unwrap();
        let bodies: Vec<Vec<u8>> =
            batch.commands.iter().flat_map(|c| c.writes.iter().map(|w| w.body.clone())).collect();
        assert_eq!(digests.len(), 3);
        for (d, body) in digests.iter().zip(&bodies) {
            assert_eq!(&bytes[start + d.at..start + d.at + body.len()], &body[..]);
            assert_eq!(d.sha256, <[u8; 32]>::from(sha2::Sha256::digest(body)));
        }
    }
}
