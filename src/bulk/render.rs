//! An export file's bytes, made from its part: output lines are the stored versions at the
//! part's leaves (reduced by `_elements`), deletion lines DELETE transaction Bundles, error
//! lines OperationOutcomes. The same part always gives the same bytes, which is what lets a
//! file be made again on every download and still match its digest in the trust label.

use std::fmt::Write as _;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::{FileInfo, Job, Kind, Part};
use crate::codec;
use crate::error::FhirError;
use crate::fhir::json::{self, Json};
use crate::search::query::Summary;
use crate::search::Engine;

/// Leaves read and written per step.
const STEP: usize = 1_024;
/// Bytes of streamed lines handed to the sink at once.
const SINK_BYTES: usize = 1 << 20;

pub struct Digest {
    pub count: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// Leaves (ascending) as base64 of LEB128 deltas: about two bytes a leaf.
pub fn encode_leaves(leaves: &[u64]) -> String {
    let mut out = Vec::with_capacity(leaves.len() * 3);
    let mut prev = 0u64;
    for &l in leaves {
        let mut d = l.wrapping_sub(prev);
        prev = l;
        loop {
            let b = (d & 0x7f) as u8;
            d >>= 7;
            if d == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }
    codec::b64(&out)
}

pub fn decode_leaves(s: &str) -> Result<Vec<u64>, FhirError> {
    let bytes = codec::unb64(s).map_err(|_| FhirError::internal("an export part's leaves are not base64"))?;
    let mut out = Vec::new();
    let (mut prev, mut d, mut shift) = (0u64, 0u64, 0u32);
    for b in bytes {
        if shift > 63 {
            return Err(FhirError::internal("an export part's leaves are malformed"));
        }
        d |= u64::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            prev = prev.wrapping_add(d);
            out.push(prev);
            (d, shift) = (0, 0);
        }
    }
    Ok(out)
}

/// Writes the file `info` of `job` to `sink`, a step of lines at a time.
pub fn write(
    engine: &Engine,
    job: &Job,
    info: &FileInfo,
    part: &Part,
    deid: Option<&super::Deid>,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), FhirError>,
) -> Result<(), FhirError> {
    let mut buf = String::new();
    match info.kind {
        Kind::Error => {
            for line in &part.lines {
                let oo = Json::obj(vec![
                    ("resourceType", Json::str("OperationOutcome")),
                    (
                        "issue",
                        Json::Array(vec![Json::obj(vec![
                            ("severity", Json::str("warning")),
                            ("code", Json::str("processing")),
                            ("diagnostics", Json::str(line.clone())),
                        ])]),
                    ),
                ]);
                oo.write_compact(&mut buf);
                buf.push('\n');
            }
            sink(buf.as_bytes())
        }
        Kind::Deleted => {
            let view = engine.repo().view();
            for chunk in decode_leaves(&part.leaves)?.chunks(STEP) {
                buf.clear();
                for &leaf in chunk {
                    let Some(rec) = view.record(leaf)? else { continue };
                    let id = match deid {
                        Some(d) => crate::fhir::deid::pseudonym(&d.key, &rec.header.id),
                        None => rec.header.id.clone(),
                    };
                    let url = format!("{}/{id}", rec.header.rtype);
                    let request = Json::obj(vec![("method", Json::str("DELETE")), ("url", Json::str(url))]);
                    // As the IG's example line: an id (the leaf, so every rendering is the
                    // same bytes) and when the deletion happened.
                    let when = crate::fhir::instant(rec.header.last_updated_ms);
                    Json::obj(vec![
                        ("resourceType", Json::str("Bundle")),
                        ("id", Json::str(format!("deletion-{leaf}"))),
                        ("meta", Json::obj(vec![("lastUpdated", Json::str(when))])),
                        ("type", Json::str("transaction")),
                        ("entry", Json::Array(vec![Json::obj(vec![("request", request)])])),
                    ])
                    .write_compact(&mut buf);
                    buf.push('\n');
                }
                sink(buf.as_bytes())?;
            }
            Ok(())
        }
        Kind::Output => {
            let profiles = engine.profiles();
            let elements = job.params.elements_of(&info.rtype);
            if elements.is_none() && deid.is_none() {
                // The lines are the stored bytes: streamed, never parsed.
                let mut out: Vec<u8> = Vec::with_capacity(2 * SINK_BYTES);
                engine.repo().for_each_plaintext(&decode_leaves(&part.leaves)?, |_, plain| {
                    out.extend_from_slice(plain);
                    out.push(b'\n');
                    if out.len() >= SINK_BYTES {
                        sink(&out)?;
                        out.clear();
                    }
                    Ok(())
                })?;
                return if out.is_empty() { Ok(()) } else { sink(&out) };
            }
            for chunk in decode_leaves(&part.leaves)?.chunks(STEP) {
                buf.clear();
                for stored in engine.repo().read_leaves(chunk) {
                    // A version erased since the export ran has no plaintext any more.
                    let Some(body) = stored?.body else { continue };
                    // Lines that are not the stored bytes: reduced by `_elements`, de-identified.
                    let mut res = json::parse(body.as_bytes(), usize::MAX).map_err(FhirError::internal)?;
                    if let Some(els) = &elements {
                        res = crate::search::summary::subset(profiles, &info.rtype, &res, Summary::False, Some(els))
                            .unwrap_or(res);
                    }
                    if let Some(d) = deid {
                        d.deidentify(profiles, &mut res);
                    }
                    res.write_compact(&mut buf);
                    buf.push('\n');
                }
                sink(buf.as_bytes())?;
            }
            Ok(())
        }
    }
}

/// The proof file of an output or deletion file: line for line, the version's leaf, its leaf
/// data (the header the Merkle leaf hashes) and the salt of its content commitment (outputs);
/// then one last line, `{"multiproof":"…"}`: the base64 of the RFC 9162 multiproof of all the
/// file's leaves to the export's tree head (the hashes of the maximal subtrees that hold none
/// of them, 32 bytes each, in the order a left-to-right walk meets them). Lines whose
/// plaintext is gone (erased since) are left out of both files alike.
pub fn write_proofs(engine: &Engine, job: &Job, part: &Part, sink: &mut Sink<'_>) -> Result<(), FhirError> {
    write_proofs_together(engine, job, &[part], &mut [sink])
}

/// Where a file's bytes go, a piece at a time.
pub type Sink<'a> = dyn FnMut(&[u8]) -> Result<(), FhirError> + 'a;

/// Every proof file of a job in one pass over all their leaves in ascending order, `sinks[i]`
/// taking the lines of `parts[i]`: each 16-leaf block is read and hashed once for all files,
/// where file by file the blocks a small type's versions lie in were read again for each
/// (ten times over, for a system export of Synthea patients). The multiproofs come last,
/// from the subtree hashes that pass kept.
pub fn write_proofs_together(
    engine: &Engine,
    job: &Job,
    parts: &[&Part],
    sinks: &mut [&mut Sink<'_>],
) -> Result<(), FhirError> {
    let mut all = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        all.extend(decode_leaves(&part.leaves)?.into_iter().map(|leaf| (leaf, i)));
    }
    all.sort_unstable();
    let mut proofs = Proofs::new(engine, job);
    let mut bufs = vec![String::new(); parts.len()];
    let mut written: Vec<Vec<u64>> = vec![Vec::new(); parts.len()];
    for (leaf, i) in all {
        if proofs.line(leaf, &mut bufs[i])? {
            written[i].push(leaf);
        }
        if bufs[i].len() >= 1 << 16 {
            sinks[i](bufs[i].as_bytes())?;
            bufs[i].clear();
        }
    }
    for ((buf, sink), leaves) in bufs.iter_mut().zip(sinks.iter_mut()).zip(&written) {
        let multiproof = if leaves.is_empty() {
            Vec::new()
        } else {
            proofs.paths.multi_proof(leaves).map_err(FhirError::internal)?.ok_or_else(|| {
                FhirError::internal(format!("no multiproof of {} leaves at {}", leaves.len(), proofs.size))
            })?
        };
        buf.push_str("{\"multiproof\":\"");
        base64::engine::general_purpose::STANDARD.encode_string(multiproof.concat(), buf);
        buf.push_str("\"}\n");
        sink(buf.as_bytes())?;
    }
    Ok(())
}

/// Proof lines at a job's tree size, asked in ascending leaf order.
struct Proofs<'e> {
    repo: &'e crate::repo::Repo,
    paths: consensus::PathsAt<'e>,
    size: u64,
    salts: crate::repo::Salters,
}

impl<'e> Proofs<'e> {
    fn new(engine: &'e Engine, job: &Job) -> Self {
        let repo = engine.repo();
        Self {
            repo,
            paths: consensus::PathsAt::new(repo.view(), job.size),
            size: job.size,
            salts: crate::repo::Salters::default(),
        }
    }

    /// Appends the proof line of `leaf` to `buf`; false when its plaintext is gone.
    fn line(&mut self, leaf: u64, buf: &mut String) -> Result<bool, FhirError> {
        let (repo, salts) = (self.repo, &mut self.salts);
        let written = self.paths.leaf_with(leaf, |h, data| -> Result<bool, FhirError> {
            let salt = if h.op == consensus::Op::Delete.as_str() {
                None
            } else {
                match repo.content_salt_in(h, salts)? {
                    Some(s) => Some(s),
                    None => return Ok(false),
                }
            };
            // Written by hand (base64 needs no escaping): `{"leaf":N,"leafData":"…","salt":"…"}`.
            let b64 = base64::engine::general_purpose::STANDARD;
            let _ = write!(buf, "{{\"leaf\":{leaf},\"leafData\":\"");
            b64.encode_string(data, buf);
            if let Some(s) = salt {
                buf.push_str("\",\"salt\":\"");
                b64.encode_string(s, buf);
            }
            buf.push_str("\"}\n");
            Ok(true)
        });
        let written = written.map_err(FhirError::internal)?;
        written.ok_or_else(|| FhirError::internal(format!("no leaf {leaf} at {}", self.size)))?
    }
}

/// The name of the proof file of data file `name` (`Observation-1.ndjson` →
/// `Observation-1.proofs.ndjson`).
pub fn proofs_name(name: &str) -> String {
    format!("{}.proofs.ndjson", name.trim_end_matches(".ndjson"))
}

/// The line count, size and SHA-256 of a file, its bytes also written to `spool` if given
/// (dropped unfinished, and so never read, if anything fails).
pub fn digest(
    engine: &Engine,
    job: &Job,
    info: &FileInfo,
    part: &Part,
    deid: Option<&super::Deid>,
    mut spool: Option<super::spool::SpoolWriter>,
) -> Result<Digest, FhirError> {
    let mut h = Sha256::new();
    let (mut count, mut bytes) = (0u64, 0u64);
    write(engine, job, info, part, deid, &mut |b| {
        h.update(b);
        bytes += b.len() as u64;
        count += newlines(b);
        if let Some(w) = spool.as_mut() {
            if let Err(e) = w.write(b) {
                tracing::warn!("spool: {e}");
                spool = None;
            }
        }
        Ok(())
    })?;
    if let Some(Err(e)) = spool.map(super::spool::SpoolWriter::finish) {
        tracing::warn!("spool: {e}");
    }
    Ok(Digest { count, bytes, sha256: hex::encode(h.finalize()) })
}

/// The newlines in `b`, counted in blocks of 128 bytes into a byte each: that loop compiles
/// to 16 bytes a compare, where one count across the whole slice widens every byte to 64 bits.
fn newlines(b: &[u8]) -> u64 {
    b.chunks(128).map(|c| u64::from(c.iter().fold(0u8, |n, &x| n + u8::from(x == b'\n')))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_round_trip_through_their_encoding() {
        for leaves in [vec![], vec![0], vec![0, 1, 2, 300, 301, 70_000, 1 << 40, u64::MAX]] {
            assert_eq!(decode_leaves(&encode_leaves(&leaves)).expect("decodes"), leaves);
        }
        assert!(encode_leaves(&[10, 11, 12, 13]).len() <= 8, "small deltas take a byte each");
    }

    #[test]
    fn newlines_are_counted_across_blocks() {
        let text: Vec<u8> = (0..1000u32).map(|i| if i % 3 == 0 { b'\n' } else { b'x' }).collect();
        for end in [0, 1, 127, 128, 129, 300, 1000] {
            let want = text[..end].split(|&c| c == b'\n').count() as u64 - 1;
            assert_eq!(newlines(&text[..end]), want, "{end} bytes");
        }
        assert_eq!(newlines(&[b'\n'; 128]), 128, "a block of newlines fits its byte");
    }
}
