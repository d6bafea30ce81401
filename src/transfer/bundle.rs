//! The transaction that imports a verified export, written as text in parts: each resource
//! POSTed exactly as exported under its `fullUrl` at the peer, and last a PDex transmitter
//! Provenance naming every source version, its leaf, and one multiproof of them all to the
//! signed head. The receiving server resolves the references as FHIR resolves them in a
//! Bundle: a relative `Type/id` is read against the peer's base, so it finds the entry of
//! that `fullUrl` (and gets the id the server assigns it), or, when the export does not hold
//! it, is stored absolute at the peer. The client copies bytes and parses nothing.
//!
//! The export's lines are cut into pieces written on every core; the pieces go out in the
//! export's order as soon as each and all before it are written, so an upload starts while
//! the rest is still being written, and the multiproof is built meanwhile on a thread of
//! its own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{bail, Context};
use consensus::merkle::Hash;

use super::{
    head_parameters, push_source_leaf, HEAD_EXTENSION, LEAVES_EXTENSION, MULTIPROOF_EXTENSION, PDEX_AGENT_TYPE,
};
use crate::bulk::check::{Kept, Source, Verified};
use crate::fhir::json::Json;

const OPENING: &str = r#"{"resourceType":"Bundle","type":"transaction","entry":["#;
/// Lines are rewritten in pieces of about this many bytes of the export.
const PIECE_BYTES: usize = 256 * 1024;

/// The whole transaction as one text (the server's `$import` parses it in place).
pub fn import_bundle(v: &Verified, peer_base: &str, peer_name: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    write_import(v, peer_base, peer_name, |part| {
        out.push_str(&part);
        Ok(())
    })?;
    Ok(out)
}

/// The transaction's text handed to `sink` part after part, in order. An error (a line
/// that is not JSON, or the sink's own) stops the writing: what was handed out is then no
/// whole Bundle, and a server reading it stores nothing.
pub fn write_import(
    v: &Verified,
    peer_base: &str,
    peer_name: &str,
    mut sink: impl FnMut(String) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if imported(&v.kept).next().is_none() {
        // A Provenance needs a target, and a transaction of nothing is no transfer.
        bail!("the export holds no resource to import");
    }
    let pieces = pieces(&v.kept)?;
    let entries = Entries { peer_base };
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let workers = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(pieces.len());
    std::thread::scope(|scope| {
        let multiproof = scope.spawn(|| multiproof(v));
        let (done, rendered) = std::sync::mpsc::channel();
        for _ in 0..workers {
            let done = done.clone();
            let (pieces, next, stop, entries) = (&pieces, &next, &stop, &entries);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(piece) = pieces.get(k) else { break };
                    if done.send((k, entries.piece(piece))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done);
        let written = emit_in_order(pieces.len(), &rendered, &mut sink);
        stop.store(true, Ordering::Relaxed);
        let (sources, opened) = written?;
        let multiproof = multiproof.join().map_err(|_| anyhow::anyhow!("the multiproof's thread failed"))??;
        let last = provenance_entry(v, peer_base, peer_name, &sources, &multiproof);
        sink(if opened { format!(",{last}]}}") } else { format!("{OPENING}{last}]}}") })
    })
}

/// The sources imported: the old payer's disclosure log about the member is its own record,
/// not the member's data; it stays there (and a server would refuse it anyway).
fn imported(kept: &[Kept]) -> impl Iterator<Item = &Source> {
    kept.iter().flat_map(|k| &k.sources).filter(|s| is_imported(s))
}

fn is_imported(source: &Source) -> bool {
    source.rtype() != "AuditEvent"
}

/// One RFC 9162 multiproof of every imported source leaf, from the subtrees the export's
/// multiproofs gave.
fn multiproof(v: &Verified) -> anyhow::Result<Vec<Hash>> {
    let mut leaves: Vec<u64> = imported(&v.kept).map(|s| s.leaf).collect();
    leaves.sort_unstable();
    v.multi_proof(&leaves).context("the export's multiproofs do not combine into one of the imported leaves")
}

/// Lines of one file, with their sources.
struct Piece<'a> {
    name: &'a str,
    text: &'a str,
    sources: &'a [Source],
}

/// Every file's lines cut into pieces of about [`PIECE_BYTES`], in the export's order.
fn pieces(kept: &[Kept]) -> anyhow::Result<Vec<Piece<'_>>> {
    let mut pieces = Vec::new();
    for k in kept {
        let (mut start, mut first_line, mut lines) = (0, 0, 0);
        let unaligned = || anyhow::anyhow!("{}: more lines than sources", k.name);
        for (at, _) in k.text.match_indices('\n') {
            lines += 1;
            if at + 1 - start >= PIECE_BYTES {
                let sources = k.sources.get(first_line..lines).ok_or_else(unaligned)?;
                pieces.push(Piece { name: &k.name, text: &k.text[start..at], sources });
                (start, first_line) = (at + 1, lines);
            }
        }
        if first_line < k.sources.len() {
            let sources = k.sources.get(first_line..).ok_or_else(unaligned)?;
            pieces.push(Piece { name: &k.name, text: &k.text[start..], sources });
        }
    }
    Ok(pieces)
}

/// A piece written: its Bundle entries and its Provenance targets, each written after a
/// comma (`,{..}`), and the targets' source leaves.
struct Rendered {
    entries: String,
    targets: String,
    leaves: Vec<u8>,
}

/// Writes pieces as Bundle entries POSTed under their `fullUrl` at the peer.
struct Entries<'a> {
    peer_base: &'a str,
}

impl Entries<'_> {
    fn piece(&self, piece: &Piece<'_>) -> anyhow::Result<Rendered> {
        let mut entries = String::with_capacity(piece.text.len() + piece.text.len() / 8);
        let mut targets = String::new();
        let mut leaves = Vec::new();
        for (line, source) in piece.text.lines().zip(piece.sources) {
            if !is_imported(source) {
                continue;
            }
            let (rtype, id) = (source.rtype(), source.id());
            // The line goes into the Bundle as it is: it must be one JSON object, so that no
            // line (even one a trusted peer signed) can close its entry and add others.
            let object = line.starts_with('{') && serde_json::from_str::<serde::de::IgnoredAny>(line).is_ok();
            if !object {
                bail!("{}: a line that is not one JSON object (the resource {rtype}/{id})", piece.name);
            }
            let full_url = Json::str(format!("{}/{rtype}/{id}", self.peer_base));
            entries.push_str(r#",{"fullUrl":"#);
            full_url.write_compact(&mut entries);
            entries.push_str(r#","resource":"#);
            entries.push_str(line);
            entries.push_str(r#","request":{"method":"POST","url":"#);
            Json::str(rtype).write_compact(&mut entries);
            entries.push_str("}}");
            targets.push_str(r#",{"reference":"#);
            full_url.write_compact(&mut targets);
            targets.push('}');
            push_source_leaf(&mut leaves, source.leaf, &source.leaf_data);
        }
        Ok(Rendered { entries, targets, leaves })
    }
}

/// The Provenance's targets (as its `target` array) and their source leaves.
struct Sources {
    targets: String,
    leaves: Vec<u8>,
}

/// Hands the pieces' entries to `sink` in order as they come in (the opening first);
/// returns every target with its source leaf, and whether anything was handed.
fn emit_in_order(
    count: usize,
    rendered: &std::sync::mpsc::Receiver<(usize, anyhow::Result<Rendered>)>,
    sink: &mut impl FnMut(String) -> anyhow::Result<()>,
) -> anyhow::Result<(Sources, bool)> {
    let mut early: BTreeMap<usize, Rendered> = BTreeMap::new();
    let mut sources = Sources { targets: String::from("["), leaves: Vec::new() };
    let mut opened = false;
    for k in 0..count {
        let piece = loop {
            if let Some(p) = early.remove(&k) {
                break p;
            }
            let (at, r) = rendered.recv().map_err(|_| anyhow::anyhow!("a writing thread failed"))?;
            early.insert(at, r?);
        };
        // Each entry and target was written after a comma; an array's first takes none.
        let targets = &mut sources.targets;
        targets.push_str(if targets.len() == 1 { piece.targets.trim_start_matches(',') } else { &piece.targets });
        sources.leaves.extend_from_slice(&piece.leaves);
        if piece.entries.is_empty() {
            continue;
        }
        let part = if opened {
            piece.entries
        } else {
            opened = true;
            format!("{OPENING}{}", &piece.entries[1..])
        };
        sink(part)?;
    }
    sources.targets.push(']');
    Ok((sources, opened))
}

/// The Bundle's last entry, the transmitter Provenance.
fn provenance_entry(v: &Verified, peer_base: &str, peer_name: &str, sources: &Sources, multiproof: &[Hash]) -> String {
    let source = || {
        Json::obj(vec![
            (
                "identifier",
                Json::obj(vec![("system", Json::str("urn:ietf:rfc:3986")), ("value", Json::str(peer_base))]),
            ),
            ("display", Json::str(peer_name)),
        ])
    };
    let mut what = source();
    what.set("display", Json::str(format!("{peer_name}'s ledger at tree size {}", v.head.size)));
    let provenance = Json::obj(vec![
        ("resourceType", Json::str("Provenance")),
        (
            "extension",
            Json::Array(vec![
                Json::obj(vec![
                    ("url", Json::str(HEAD_EXTENSION)),
                    ("valueString", Json::str(head_parameters(&v.head).to_string())),
                ]),
                Json::obj(vec![
                    ("url", Json::str(MULTIPROOF_EXTENSION)),
                    ("valueBase64Binary", Json::base64(&multiproof.concat())),
                ]),
                Json::obj(vec![
                    ("url", Json::str(LEAVES_EXTENSION)),
                    ("valueBase64Binary", Json::base64(&sources.leaves)),
                ]),
            ]),
        ),
        ("target", Json::Raw(sources.targets.clone())),
        ("recorded", Json::str(crate::fhir::instant(crate::fhir::now_ms()))),
        (
            "agent",
            Json::Array(vec![Json::obj(vec![
                (
                    "type",
                    Json::obj(vec![(
                        "coding",
                        Json::Array(vec![Json::obj(vec![
                            ("system", Json::str(PDEX_AGENT_TYPE)),
                            ("code", Json::str("transmitter")),
                        ])]),
                    )]),
                ),
                ("who", source()),
            ])]),
        ),
        ("entity", Json::Array(vec![Json::obj(vec![("role", Json::str("source")), ("what", what)])])),
    ]);
    let mut out = String::with_capacity(sources.targets.len() + sources.leaves.len() * 4 / 3 + 4096);
    out.push_str(r#"{"fullUrl":"#);
    Json::str(format!("urn:uuid:{}", uuid::Uuid::new_v4())).write_compact(&mut out);
    out.push_str(r#","resource":"#);
    provenance.write_compact(&mut out);
    out.push_str(r#","request":{"method":"POST","url":"Provenance"}}"#);
    out
}
