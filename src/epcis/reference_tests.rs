//! Runs every JSON-LD example of the reference implementation (github.com/RalphTro/epcis-event-hash-generator,
//! tests/examples, MIT licence) through the port and compares pre-hash strings and hashes.
//! `*.hashes` are the repository's expected hashes; `*.refprehashes` were generated with the reference
//! (repository HEAD 5d2f1c3, `python -m epcis_event_hash_generator -b -p`) because several committed
//! `*.prehashes` files are stale (they no longer hash to the committed `*.hashes`).

use std::fs;
use std::path::Path;

use super::hash::{document_pre_hash_strings, event_hash_id, hash_of_pre_hash, pre_hash_string};
use serde_json::Value;

fn lines(path: &Path) -> Option<Vec<String>> {
    let text = fs::read_to_string(path).ok()?;
    Some(text.lines().map(str::to_string).filter(|l| !l.is_empty()).collect())
}

fn events(doc: &Value) -> Vec<Value> {
    let body = &doc["epcisBody"];
    if let Some(list) = body.get("eventList").and_then(Value::as_array) {
        return list.clone();
    }
    if let Some(list) = body.pointer("/queryResults/resultsBody/eventList").and_then(Value::as_array) {
        return list.clone();
    }
    body.get("event").map(|e| vec![e.clone()]).unwrap_or_default()
}

#[test]
fn reference_examples() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/epcis-hash");
    let mut names: Vec<_> = fs::read_dir(&dir)
        .expect("examples dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonld"))
        .collect();
    names.sort();
    let (mut docs_ok, mut events_total, mut events_ok, mut failures) = (0, 0, 0, Vec::new());
    for path in &names {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let doc: Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
        let hashes = lines(&path.with_extension("hashes")).expect("hashes file");
        let pre = lines(&path.with_extension("refprehashes")).expect("refprehashes file");
        let ours = document_pre_hash_strings(&doc).expect("document");
        let mut all_events_ok = ours.len() == hashes.len();
        for (i, got) in ours.iter().enumerate() {
            events_total += 1;
            let got = got.clone().map_err(|e| e.to_string());
            let ok =
                got.as_ref().ok() == pre.get(i) && got.as_deref().map(hash_of_pre_hash).ok().as_ref() == hashes.get(i);
            if ok {
                events_ok += 1;
            } else {
                all_events_ok = false;
                failures.push(format!("{name}[{i}]\n  ours: {got:?}\n  ref:  {:?}", pre.get(i)));
            }
        }
        if all_events_ok {
            docs_ok += 1;
        }
    }
    eprintln!("documents: {docs_ok}/{} ok, events: {events_ok}/{events_total} ok", names.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The per-event API (no whole-document vocabulary, no ignoreFields) on documents without those features.
#[test]
fn per_event_api() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/epcis-hash");
    let mut checked = 0;
    let mut failures = Vec::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|x| x != "jsonld") || path.to_string_lossy().contains("IgnoreFields") {
            continue;
        }
        let doc: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let hashes = lines(&path.with_extension("hashes")).unwrap();
        let ctx = doc.get("@context").cloned().unwrap_or(Value::Null);
        for (i, ev) in events(&doc).iter().enumerate() {
            checked += 1;
            let ours = event_hash_id(ev, &[&ctx]);
            if ours.as_ref().ok() != hashes.get(i) {
                failures.push(format!("{}[{i}]: {:?}", path.display(), pre_hash_string(ev, &[&ctx])));
            }
        }
    }
    eprintln!("per-event API: {}/{checked} ok", checked - failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
