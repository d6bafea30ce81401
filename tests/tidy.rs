//! The house rules that the compiler does not check, in the manner of rust-analyzer's `tidy`
//! tests: `src/` modules use only the layers below their own, as ARCHITECTURE.md's "Layers"
//! table lists them, and no two sibling modules use each other, directly or around a circle.
//! Only code counts: comments, strings and `#[cfg(test)]` modules are skipped.

// Tests fail loudly on purpose: an unwrap or expect is the assertion. (clippy.toml's
// allow-*-in-tests covers only #[test] functions, not the helpers integration tests share.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path inside the crate, e.g. `["search", "exec"]`.
type ModPath = Vec<String>;

/// The layers, top first: each a set of top-level modules.
fn layers_of(architecture: &str) -> Vec<BTreeSet<String>> {
    let section = architecture.split("\n## Layers").nth(1).expect("ARCHITECTURE.md has a `## Layers` section");
    let block = section.split("```text\n").nth(1).and_then(|b| b.split("```").next()).expect("a ```text block");
    block
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(|m| m.trim_matches('`').to_string()).collect())
        .collect()
}

/// The source with comments, string and char literals blanked and test modules cut.
fn code_of(src: &str) -> String {
    let cut = match src.find("#[cfg(test)]\nmod ") {
        Some(i) => &src[..i],
        None => src,
    };
    let b = cut.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'r' if matches!(b.get(i + 1), Some(b'#' | b'"')) && !ident_byte(b, i) => {
                // A raw string: r"..." or r#"..."#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
                let rest = &cut[j + 1..];
                i = j + 1 + rest.find(&close).map_or(rest.len(), |k| k + close.len());
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' if is_char_literal(b, i) => {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("' '");
            }
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    out
}

fn ident_byte(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// `'a'` or `'\n'`, not a lifetime `'a`.
fn is_char_literal(b: &[u8], i: usize) -> bool {
    match b.get(i + 1) {
        Some(b'\\') => true,
        Some(_) => {
            // One (possibly multi-byte) character, then a quote.
            let rest = std::str::from_utf8(&b[i + 1..]).unwrap_or("");
            let mut chars = rest.chars();
            chars.next();
            chars.next() == Some('\'')
        }
        None => false,
    }
}

/// Every `crate::`/`super::`/`self::` path in `code`, resolved to an absolute module path
/// (one segment per `::`, so `crate::search::index::Doc` gives `search`, `index`, `Doc`),
/// with `use` groups (`use crate::{a::b, c}`) expanded.
fn paths_in(code: &str, here: &ModPath) -> Vec<ModPath> {
    let mut out = Vec::new();
    let b = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(k) = code[from..].find(start) {
            let at = from + k;
            from = at + start.len();
            if ident_byte(b, at) || (at >= 2 && &code[at - 2..at] == "::") {
                continue; // part of a longer path (`a::super::`) or identifier (`my_crate::`)
            }
            let mut base: ModPath = match start {
                "crate::" => Vec::new(),
                "super::" => here[..here.len().saturating_sub(1)].to_vec(),
                _ => here.clone(),
            };
            let mut rest = &code[at + start.len()..];
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            expand(rest, base, &mut out);
        }
    }
    out
}

/// Expands the path at the start of `rest` under `base` into `out` (groups included).
fn expand(rest: &str, mut base: ModPath, out: &mut Vec<ModPath>) {
    let mut rest = rest;
    loop {
        let seg: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if !seg.is_empty() {
            base.push(seg.clone());
            rest = &rest[seg.len()..];
            match rest.strip_prefix("::") {
                Some(r) => {
                    rest = r;
                    continue;
                }
                None => break,
            }
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        expand(group[item_start..i].trim(), base.clone(), out);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(group[item_start..i].trim(), base.clone(), out);
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        break;
    }
    if !base.is_empty() && base != ["self"] {
        out.push(base);
    }
}

/// A violation of the layer table or a circle between siblings.
#[derive(Debug, PartialEq, Eq)]
enum Problem {
    Upward { from: String, to: String },
    Unlisted(String),
    Circle(Vec<String>),
}

/// Checks `files` (module path, source) against `layers`.
fn check(layers: &[BTreeSet<String>], files: &[(ModPath, String)]) -> Vec<Problem> {
    let rank = |m: &str| layers.iter().position(|l| l.contains(m));
    let mut problems = Vec::new();
    let tops: BTreeSet<&String> = files.iter().filter_map(|(p, _)| p.first()).collect();
    for t in tops {
        if rank(t).is_none() {
            problems.push(Problem::Unlisted(t.clone()));
        }
    }
    // Edges between siblings, per parent module.
    let mut siblings: BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let known: BTreeSet<&ModPath> = files.iter().map(|(p, _)| p).collect();
    for (here, src) in files {
        let code = code_of(src);
        for path in paths_in(&code, here) {
            let (Some(from), Some(to)) = (here.first(), path.first()) else { continue };
            if from != to {
                if let (Some(rf), Some(rt)) = (rank(from), rank(to)) {
                    // Top first: a lower layer has a larger index.
                    if rt <= rf {
                        problems.push(Problem::Upward { from: here.join("::"), to: path.join("::") });
                    }
                }
            }
            // The module this path enters beside `here` (same parent), if any.
            let parent = &here[..here.len() - 1];
            if path.len() > parent.len() && path.starts_with(parent) && known.contains(&path[..=parent.len()].to_vec())
            {
                let (a, b) = (&here[parent.len()], &path[parent.len()]);
                if a != b {
                    siblings.entry(parent.to_vec()).or_default().entry(a.clone()).or_default().insert(b.clone());
                }
            }
        }
    }
    for (parent, graph) in &siblings {
        if let Some(circle) = find_circle(graph) {
            let name = |m: &String| if parent.is_empty() { m.clone() } else { format!("{}::{m}", parent.join("::")) };
            problems.push(Problem::Circle(circle.iter().map(name).collect()));
        }
    }
    problems.sort_by_key(|p| format!("{p:?}"));
    problems.dedup();
    problems
}

/// One circle in `graph`, if there is any (depth-first search).
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &String,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.clone());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.clone());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// Every module file of the library under `src/` (not the binary's `main.rs`).
fn crate_files(src: &Path) -> Vec<(ModPath, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read src") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).expect("under src");
            let mut parts: ModPath =
                rel.iter().map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            if parts.last().is_some_and(|l| l == "mod") {
                parts.pop();
            }
            out.push((parts, std::fs::read_to_string(&p).expect("read source")));
        }
    }
    out.sort();
    out
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn modules_use_only_lower_layers_and_no_circles() {
    let arch = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let layers = layers_of(&arch);
    assert!(layers.len() > 3, "the layer table: {layers:?}");
    let problems = check(&layers, &crate_files(&root().join("src")));
    assert!(problems.is_empty(), "house rules broken (see ARCHITECTURE.md, Layers):\n{problems:#?}");
}

fn file(path: &str, src: &str) -> (ModPath, String) {
    (path.split("::").map(String::from).collect(), src.to_string())
}

fn example_layers() -> Vec<BTreeSet<String>> {
    layers_of("\n## Layers\n```text\napi\nauth\nsearch\nrepo\nfhir error  # side by side\n```\n")
}

#[test]
fn an_upward_import_is_found() {
    let files = [
        file("search::exec", "use std::fmt;\nuse crate::auth::access::Guard;\nfn f() {}"),
        file("auth::access", "use crate::search::index::Doc;"),
        file("repo", "use crate::{fhir::json::Json, search::Engine};\nfn g() { crate::error::x(); }"),
        file("fhir", "fn h() -> crate::error::FhirError { todo!() }"),
        file("error", ""),
        file("api", ""),
    ];
    let problems = check(&example_layers(), &files);
    assert_eq!(
        problems,
        vec![
            Problem::Upward { from: "fhir".into(), to: "error::FhirError".into() },
            Problem::Upward { from: "repo".into(), to: "search::Engine".into() },
            Problem::Upward { from: "search::exec".into(), to: "auth::access::Guard".into() },
        ]
    );
}

#[test]
fn a_circle_between_siblings_is_found() {
    let files = [
        file("fhir::profiles", "use super::validate::Issue;"),
        file("fhir::validate", "use super::profiles::{Element, Profiles};"),
        file("fhir::json", "use super::profiles::Profiles;"),
        file("fhir", "pub mod json;"),
    ];
    let problems = check(&example_layers(), &files);
    assert_eq!(
        problems,
        vec![Problem::Circle(vec!["fhir::profiles".into(), "fhir::validate".into(), "fhir::profiles".into()])]
    );
}

#[test]
fn comments_strings_and_tests_do_not_count() {
    let files = [file(
        "repo",
        "//! Searching is `crate::search`.\n/* crate::api */ fn f() { let s = \"crate::auth\"; let c = '\"'; }\n\
         fn g<'a>(x: &'a str) -> &'a str { x }\n#[cfg(test)]\nmod tests { use crate::api::X; }",
    )];
    assert_eq!(check(&example_layers(), &files), vec![]);
}

#[test]
fn a_module_missing_from_the_table_is_found() {
    let files = [file("bench", "")];
    assert_eq!(check(&example_layers(), &files), vec![Problem::Unlisted("bench".into())]);
}
