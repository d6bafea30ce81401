//! The R4 structure model compiled from the pinned StructureDefinitions and ValueSets in
//! `fhir-profiles/`: for every element path its children, cardinality, types and required
//! binding. Built once at start-up; `validate.rs` walks resources against it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use crate::definitions::Definitions;

/// One element definition, as a child of its parent path.
#[derive(Debug, Clone)]
pub struct Element {
    /// JSON name; choice elements keep their `[x]` suffix stripped (`value`) and set `choice`.
    pub name: String,
    pub choice: bool,
    pub path: String,
    pub min: u32,
    pub many: bool,
    /// Type codes (`string`, `HumanName`, `BackboneElement`, `Resource`, ...).
    pub types: Vec<String>,
    /// `#Questionnaire.item` style reuse of another element's children.
    pub content_ref: Option<String>,
    /// Codes allowed by a required binding, when the value set could be expanded offline.
    pub required_codes: Option<usize>,
    /// Part of the `_summary=true` view.
    pub summary: bool,
}

/// Codes of one expanded value set: `(system, code)` pairs.
#[derive(Debug, Default)]
pub struct CodeSet {
    pub codes: BTreeSet<(String, String)>,
    pub systems: BTreeSet<String>,
}

impl CodeSet {
    pub fn has_code(&self, code: &str) -> bool {
        self.codes.iter().any(|(_, c)| c == code)
    }
    pub fn has(&self, system: &str, code: &str) -> bool {
        self.codes.contains(&(system.to_string(), code.to_string()))
    }
}

#[derive(Debug, Default)]
pub struct Profiles {
    /// Children of each element path (`Patient`, `Patient.contact`, `HumanName`, ...).
    children: HashMap<String, Vec<Element>>,
    resource_types: Vec<String>,
    primitive_types: BTreeSet<String>,
    pub(crate) code_sets: Vec<CodeSet>,
    /// Every value set of `valuesets.json` that expands offline, by canonical url (for the
    /// `:in` and `:not-in` search modifiers).
    value_sets: BTreeMap<String, std::sync::Arc<CodeSet>>,
    /// Every `(system, code)` of those value sets: the systems a bare `code` element can
    /// be searched with (`status=http://hl7.org/fhir/observation-status|final`).
    known_codes: BTreeSet<(String, String)>,
}

fn resources(bundle: &Value) -> impl Iterator<Item = &Value> {
    bundle["entry"].as_array().into_iter().flatten().map(|e| &e["resource"])
}

impl Profiles {
    pub fn load(defs: &Definitions) -> Result<Profiles, String> {
        let types = defs.json("profiles-types.json")?;
        let res = defs.json("profiles-resources.json")?;
        let valuesets = defs.json("valuesets.json")?;
        let expander = Expander::new(&valuesets);
        let mut p = Profiles::default();
        let mut vs_index: BTreeMap<String, Option<usize>> = BTreeMap::new();
        for sd in resources(&types).chain(resources(&res)) {
            if sd["resourceType"] != "StructureDefinition" || sd["derivation"] == "constraint" {
                continue;
            }
            let kind = sd["kind"].as_str().unwrap_or_default();
            let name = sd["id"].as_str().unwrap_or_default().to_string();
            match kind {
                "resource" if sd["abstract"] == false => p.resource_types.push(name.clone()),
                "primitive-type" => {
                    p.primitive_types.insert(name.clone());
                    continue;
                }
                "resource" | "complex-type" => {}
                _ => continue,
            }
            for el in sd["snapshot"]["element"].as_array().into_iter().flatten() {
                let path = el["path"].as_str().unwrap_or_default();
                let Some((parent, last)) = path.rsplit_once('.') else { continue };
                let choice = last.ends_with("[x]");
                let types: Vec<String> = el["type"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["code"].as_str())
                    .map(|c| c.strip_prefix("http://hl7.org/fhirpath/System.").map_or(c.to_string(), str::to_lowercase))
                    .collect();
                let required_codes = match (el["binding"]["strength"].as_str(), el["binding"]["valueSet"].as_str()) {
                    (Some("required"), Some(url)) => {
                        let url = url.split('|').next().unwrap_or(url).to_string();
                        *vs_index.entry(url.clone()).or_insert_with(|| {
                            expander.expand(&url).map(|set| {
                                p.code_sets.push(set);
                                p.code_sets.len() - 1
                            })
                        })
                    }
                    _ => None,
                };
                p.children.entry(parent.to_string()).or_default().push(Element {
                    name: last.trim_end_matches("[x]").to_string(),
                    choice,
                    path: path.to_string(),
                    min: el["min"].as_u64().unwrap_or(0) as u32,
                    many: el["max"].as_str().is_some_and(|m| m != "0" && m != "1"),
                    types,
                    content_ref: el["contentReference"].as_str().map(|r| r.trim_start_matches('#').to_string()),
                    required_codes,
                    summary: el["isSummary"].as_bool().unwrap_or(false),
                });
            }
        }
        p.resource_types.sort();
        for url in expander.value_sets.keys() {
            if let Some(set) = expander.expand(url) {
                p.known_codes.extend(set.codes.iter().cloned());
                p.value_sets.insert(url.to_string(), std::sync::Arc::new(set));
            }
        }
        if p.resource_types.is_empty() {
            return Err(format!("{}: no resource StructureDefinitions found", defs.name("profiles-resources.json")));
        }
        Ok(p)
    }

    /// Every concrete R4 resource type, sorted.
    pub fn resource_types(&self) -> &[String] {
        &self.resource_types
    }

    pub fn is_resource_type(&self, name: &str) -> bool {
        self.resource_types.binary_search_by(|t| t.as_str().cmp(name)).is_ok()
    }

    pub fn is_primitive(&self, type_code: &str) -> bool {
        self.primitive_types.contains(type_code) || matches!(type_code, "string" | "boolean" | "integer" | "decimal")
    }

    /// Whether `code` is defined in the code system `system` (as far as the core value sets
    /// enumerate it).
    pub fn is_known_code(&self, system: &str, code: &str) -> bool {
        self.known_codes.contains(&(system.to_string(), code.to_string()))
    }

    /// The expansion of a core value set, if it expands offline.
    pub fn value_set(&self, url: &str) -> Option<std::sync::Arc<CodeSet>> {
        self.value_sets.get(url.split('|').next().unwrap_or(url)).cloned()
    }

    pub fn children(&self, path: &str) -> Option<&[Element]> {
        self.children.get(path).map(Vec::as_slice)
    }
}

/// Expands ValueSets from `valuesets.json` where that is possible offline.
struct Expander<'a> {
    value_sets: HashMap<&'a str, &'a Value>,
    code_systems: HashMap<&'a str, &'a Value>,
}

impl<'a> Expander<'a> {
    fn new(bundle: &'a Value) -> Self {
        let mut value_sets = HashMap::new();
        let mut code_systems = HashMap::new();
        for r in resources(bundle) {
            let Some(url) = r["url"].as_str() else { continue };
            match r["resourceType"].as_str() {
                Some("ValueSet") => {
                    value_sets.insert(url, r);
                }
                Some("CodeSystem") => {
                    code_systems.insert(url, r);
                }
                _ => {}
            }
        }
        Self { value_sets, code_systems }
    }

    /// `None` when any part needs a filter, an external code system or another value set.
    fn expand(&self, url: &str) -> Option<CodeSet> {
        let vs = self.value_sets.get(url)?;
        let mut set = CodeSet::default();
        for inc in vs["compose"]["include"].as_array()? {
            if inc.get("filter").is_some() || inc.get("valueSet").is_some() {
                return None;
            }
            let system = inc["system"].as_str()?;
            set.systems.insert(system.to_string());
            if let Some(concepts) = inc["concept"].as_array() {
                for c in concepts {
                    set.codes.insert((system.to_string(), c["code"].as_str()?.to_string()));
                }
            } else {
                let cs = self.code_systems.get(system)?;
                if cs["content"] != "complete" {
                    return None;
                }
                collect(system, &cs["concept"], &mut set);
            }
        }
        Some(set)
    }
}

fn collect(system: &str, concepts: &Value, set: &mut CodeSet) {
    for c in concepts.as_array().into_iter().flatten() {
        if let Some(code) = c["code"].as_str() {
            set.codes.insert((system.to_string(), code.to_string()));
        }
        collect(system, &c["concept"], set);
    }
}
