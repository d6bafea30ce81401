//! The search parameter registry: every SearchParameter of R4 4.0.1 and US Core from
//! `fhir-profiles/`, compiled once, plus the SearchParameter resources clients store (custom
//! parameters), keyed by resource type and code.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::definitions::Definitions;
use crate::fhir::fhirpath::{self, Expr};
use crate::fhir::json::Json;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "number" => Kind::Number,
            "date" => Kind::Date,
            "string" => Kind::String,
            "token" => Kind::Token,
            "reference" => Kind::Reference,
            "composite" => Kind::Composite,
            "quantity" => Kind::Quantity,
            "uri" => Kind::Uri,
            "special" => Kind::Special,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Number => "number",
            Kind::Date => "date",
            Kind::String => "string",
            Kind::Token => "token",
            Kind::Reference => "reference",
            Kind::Composite => "composite",
            Kind::Quantity => "quantity",
            Kind::Uri => "uri",
            Kind::Special => "special",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Component {
    pub kind: Kind,
    /// Evaluated on each item the composite's own expression yields (or on the resource,
    /// for `%resource...`).
    pub expr: Expr,
    pub from_root: bool,
}

#[derive(Clone, Debug)]
pub struct Param {
    pub code: String,
    pub url: String,
    pub kind: Kind,
    pub expr: Option<Expr>,
    pub expression: String,
    /// Allowed reference target types.
    pub targets: Vec<String>,
    pub components: Vec<Component>,
    pub description: String,
    /// Defined by a SearchParameter resource stored on this server.
    pub custom: bool,
}

/// A reference parameter allowing at most this many target types posts each reference under
/// `Type/id` only, and a query by bare id reads one posting per target type; one allowing any
/// type, or more, posts the bare id too (issue 17: bare ids were a sixth of the index's
/// postings, each rewritten by every compaction it passed through).
pub const BARE_ID_TARGETS: usize = 16;

impl Param {
    /// Whether a reference to a `rtype` is posted under its bare id besides `Type/id`: when
    /// this parameter allows any type or many, or not `rtype` (a query by bare id, which
    /// reads the allowed types' postings, would not find it otherwise).
    pub fn posts_bare_id(&self, rtype: &str) -> bool {
        self.typed_targets().is_empty() || !self.targets.iter().any(|t| t == rtype)
    }

    /// The types whose `Type/id` postings a query by bare id reads besides the bare ones
    /// (none: every reference of this parameter is posted bare).
    pub fn typed_targets(&self) -> &[String] {
        if self.targets.len() <= BARE_ID_TARGETS {
            &self.targets
        } else {
            &[]
        }
    }
}

/// How a parameter whose postings other parameters' hold is searched: the index keeps its
/// values in each document (for checks, `:missing` and `_sort`) but posts none of them
/// (issue 17: every posting is a key each compaction rewrites; `combo-code` alone repeated
/// three of an Observation's twenty-odd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Derived {
    /// Its expression is the union of these parameters' (`Observation.code |
    /// Observation.component.code` of `code` and `component-code`): it holds a value exactly
    /// where one of them does.
    Union(Vec<String>),
    /// Its expression is that parameter's restricted to references to one type
    /// (`Observation.subject.where(resolve() is Patient)` of `Observation.subject`).
    Restricted { by: String, target: String },
}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    by_type: BTreeMap<String, BTreeMap<String, Arc<Param>>>,
    /// The [`Derived`] parameters of each type, found again whenever a parameter changes.
    derived: BTreeMap<String, BTreeMap<String, Derived>>,
    /// Custom parameters by the id of the SearchParameter resource that defines them, with
    /// the (type, code) slots they fill.
    custom: BTreeMap<String, Vec<(String, String)>>,
    /// Core parameters a custom one replaced, restored when it goes away.
    shadowed: BTreeMap<(String, String), Arc<Param>>,
}

/// The definitions the registry loads from `fhir-profiles/`: R4, US Core, and this server's own
/// (the EPCIS mapping's, `supply`), in that order of precedence.
pub const FILES: [&str; 3] =
    ["search-parameters.json", "search-parameters-uscore.json", "search-parameters-supply.json"];

/// Types a `DomainResource` parameter does not apply to.
const NOT_DOMAIN: &[&str] = &["Bundle", "Binary", "Parameters"];

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|x| x.as_str().map(String::from)).collect()
}

impl Registry {
    pub fn load(source: &Definitions, resource_types: &[String]) -> Result<Registry, String> {
        let mut defs: Vec<serde_json::Value> = Vec::new();
        for file in crate::search::params::FILES {
            let bundle = source.json(file)?;
            defs.extend(bundle["entry"].as_array().into_iter().flatten().map(|e| e["resource"].clone()));
        }
        let kinds: BTreeMap<String, Kind> = defs
            .iter()
            .filter_map(|d| Some((d["url"].as_str()?.to_string(), Kind::parse(d["type"].as_str()?)?)))
            .collect();
        let mut reg = Registry::default();
        for d in &defs {
            let Some(code) = d["code"].as_str() else { continue };
            let param = compile(d, &kinds, false).map_err(|e| format!("SearchParameter {code}: {e}"))?;
            for base in strings(&d["base"]) {
                for t in expand_base(&base, resource_types) {
                    // Core definitions win over US Core ones for the same code.
                    let slot = reg.by_type.entry(t.clone()).or_default().entry(code.to_string());
                    slot.or_insert_with(|| Arc::new(param.for_type(&t)));
                }
            }
        }
        reg.derive();
        Ok(reg)
    }

    /// How `code` is searched on `rtype` if its postings are other parameters'.
    pub fn derived(&self, rtype: &str, code: &str) -> Option<&Derived> {
        self.derived.get(rtype)?.get(code)
    }

    /// Finds the [`Derived`] parameters of every type. Each is defined by parameters that
    /// keep their own postings; a union only by parameters with fewer branches, so found
    /// after them.
    fn derive(&mut self) {
        self.derived.clear();
        for (rtype, params) in &self.by_type {
            let mut branches: Vec<(&Arc<Param>, Vec<String>)> =
                params.values().map(|p| (p, expression_branches(&p.expression, rtype))).collect();
            branches.retain(|(p, b)| !b.is_empty() && !matches!(p.kind, Kind::Composite | Kind::Special));
            branches.sort_by_key(|(_, b)| b.len());
            let mut found: BTreeMap<String, Derived> = BTreeMap::new();
            for (p, mine) in &branches {
                // The other parameters of its kind that keep their own postings.
                let others = || {
                    branches
                        .iter()
                        .filter(|(o, _)| o.code != p.code && o.kind == p.kind && !found.contains_key(&o.code))
                };
                if let Some((mut by, target)) = restricted(mine).filter(|_| p.kind == Kind::Reference) {
                    by.sort();
                    by.dedup();
                    if let Some((o, _)) = others().find(|(_, b)| *b == by) {
                        found.insert(p.code.clone(), Derived::Restricted { by: o.code.clone(), target });
                    }
                    continue;
                }
                let parts: Vec<_> =
                    others().filter(|(_, b)| b.len() < mine.len() && b.iter().all(|x| mine.contains(x))).collect();
                if mine.len() >= 2 && mine.iter().all(|x| parts.iter().any(|(_, b)| b.contains(x))) {
                    found.insert(p.code.clone(), Derived::Union(parts.iter().map(|(o, _)| o.code.clone()).collect()));
                }
            }
            if !found.is_empty() {
                self.derived.insert(rtype.clone(), found);
            }
        }
    }

    pub fn get(&self, rtype: &str, code: &str) -> Option<&Arc<Param>> {
        self.by_type.get(rtype)?.get(code)
    }

    pub fn for_type(&self, rtype: &str) -> impl Iterator<Item = &Arc<Param>> {
        self.by_type.get(rtype).into_iter().flat_map(|m| m.values())
    }

    /// Registers (or replaces) the parameter a stored SearchParameter `id` defines; returns the
    /// resource types whose index it changes. An unusable definition registers nothing.
    pub fn set_custom(&mut self, id: &str, res: Option<&Json>, resource_types: &[String]) -> Vec<String> {
        let mut affected: Vec<String> = Vec::new();
        for (t, code) in self.custom.remove(id).unwrap_or_default() {
            if let Some(m) = self.by_type.get_mut(&t) {
                match self.shadowed.remove(&(t.clone(), code.clone())) {
                    Some(core) => m.insert(code, core),
                    None => m.remove(&code),
                };
            }
            affected.push(t);
        }
        if let Some((param, bases)) = res.and_then(|r| custom_param(r, self).ok()) {
            let mut slots = Vec::new();
            for base in bases {
                for t in expand_base(&base, resource_types) {
                    let m = self.by_type.entry(t.clone()).or_default();
                    if let Some(old) = m.insert(param.code.clone(), Arc::new(param.for_type(&t))) {
                        if !old.custom {
                            self.shadowed.insert((t.clone(), param.code.clone()), old);
                        }
                    }
                    slots.push((t.clone(), param.code.clone()));
                    affected.push(t);
                }
            }
            self.custom.insert(id.to_string(), slots);
        }
        affected.sort();
        affected.dedup();
        self.derive();
        affected
    }
}

/// The branches of a union expression that apply to `rtype` (`A.x | (A.y as Quantity) | B.z`
/// for `A`: `A.x` and `A.y as Quantity`), each without its enclosing parentheses, sorted.
fn expression_branches(expression: &str, rtype: &str) -> Vec<String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    let bytes = expression.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        match c {
            b'(' => depth += 1,
            b')' => depth -= 1,
            b'|' if depth == 0 => {
                out.push(&expression[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&expression[start..]);
    let prefix = format!("{rtype}.");
    let mut branches: Vec<String> = out
        .into_iter()
        .map(|b| {
            let b = b.trim();
            let inner = b.strip_prefix('(').and_then(|x| x.strip_suffix(')')).map(str::trim);
            // `(a) | (b)` splits into `(a)` and `(b)`; `(a).b` keeps its parentheses.
            inner.filter(|x| balanced(x)).unwrap_or(b).to_string()
        })
        .filter(|b| b.starts_with(&prefix))
        .collect();
    branches.sort();
    branches.dedup();
    branches
}

/// Whether every `)` in `s` closes an earlier `(`.
fn balanced(s: &str) -> bool {
    let mut depth = 0i32;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

/// The unrestricted branches and the one type of a parameter every branch of which is
/// `X.where(resolve() is T)` for the same `T`.
fn restricted(branches: &[String]) -> Option<(Vec<String>, String)> {
    let mut target: Option<&str> = None;
    let mut by = Vec::new();
    for b in branches {
        let (x, t) = crate::fhir::searchparams::split_restriction(b)?;
        if target.is_some_and(|seen| seen != t) {
            return None;
        }
        target = Some(t);
        by.push(x.to_string());
    }
    Some((by, target?.to_string()))
}

impl Param {
    /// This parameter as it applies to `rtype`: its expression without the other types'
    /// branches.
    fn for_type(&self, rtype: &str) -> Param {
        Param { expr: self.expr.as_ref().and_then(|e| fhirpath::specialize(e, rtype)), ..self.clone() }
    }
}

fn expand_base(base: &str, resource_types: &[String]) -> Vec<String> {
    match base {
        "Resource" => resource_types.to_vec(),
        "DomainResource" => resource_types.iter().filter(|t| !NOT_DOMAIN.contains(&t.as_str())).cloned().collect(),
        t => vec![t.to_string()],
    }
}

fn compile(d: &serde_json::Value, kinds: &BTreeMap<String, Kind>, custom: bool) -> Result<Param, String> {
    let code = d["code"].as_str().ok_or("no code")?.to_string();
    let kind = d["type"].as_str().and_then(Kind::parse).ok_or("no or unknown type")?;
    let expression = d["expression"].as_str().unwrap_or_default().to_string();
    let expr = if expression.is_empty() { None } else { Some(fhirpath::parse(&expression)?) };
    if expr.is_none() && !(kind == Kind::Special || code == "_text" || code == "_content" || code == "_query") {
        return Err("no expression".into());
    }
    let mut components = Vec::new();
    for c in d["component"].as_array().into_iter().flatten() {
        let def = c["definition"].as_str().ok_or("component without definition")?;
        let kind = *kinds.get(def).ok_or_else(|| format!("component {def} is not a known SearchParameter"))?;
        let ce = c["expression"].as_str().ok_or("component without expression")?;
        let expr = fhirpath::parse(ce).map_err(|e| format!("component {ce}: {e}"))?;
        components.push(Component { kind, expr, from_root: ce.trim_start().starts_with("%resource") });
    }
    if kind == Kind::Composite && components.is_empty() {
        return Err("composite without components".into());
    }
    Ok(Param {
        code,
        url: d["url"].as_str().unwrap_or_default().to_string(),
        kind,
        expr,
        expression,
        targets: strings(&d["target"]),
        components,
        description: d["description"].as_str().unwrap_or_default().to_string(),
        custom,
    })
}

/// Checks a SearchParameter resource a client stores: it must be usable by this server's
/// FHIRPath subset, so that it is refused at write time rather than ignored later.
pub fn custom_param(res: &Json, reg: &Registry) -> Result<(Param, Vec<String>), String> {
    let d = res.to_serde();
    if d["status"].as_str() == Some("retired") {
        return Err("status is retired".into());
    }
    let kind = d["type"].as_str().and_then(Kind::parse).ok_or("type must be a search parameter type")?;
    if kind == Kind::Special {
        return Err("special parameters cannot be defined by a SearchParameter resource here".into());
    }
    if d["expression"].as_str().is_none_or(str::is_empty) {
        return Err("expression is required".into());
    }
    let code = d["code"].as_str().ok_or("code is required")?;
    if code.is_empty() || !code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("code {code:?} must be letters, digits, '-' or '_'"));
    }
    let bases = strings(&d["base"]);
    if bases.is_empty() {
        return Err("base is required".into());
    }
    // Components may name core or custom parameters.
    let mut kinds = BTreeMap::new();
    for def in d["component"].as_array().into_iter().flatten().filter_map(|c| c["definition"].as_str()) {
        let found = reg.by_type.values().flat_map(|m| m.values()).find(|p| p.url == def);
        if let Some(p) = found {
            kinds.insert(def.to_string(), p.kind);
        }
    }
    Ok((compile(&d, &kinds, true)?, bases))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        let p = crate::fhir::profiles::Profiles::load(&Definitions::Embedded).unwrap();
        Registry::load(&Definitions::Embedded, p.resource_types()).unwrap()
    }

    #[test]
    fn loads_core_us_core_and_base_parameters() {
        let r = reg();
        assert_eq!(r.get("Observation", "code").unwrap().kind, Kind::Token);
        assert_eq!(r.get("Observation", "code-value-quantity").unwrap().components.len(), 2);
        assert_eq!(r.get("Patient", "race").unwrap().kind, Kind::Token);
        assert!(r.get("Bundle", "_tag").is_some());
        assert!(r.get("Bundle", "_text").is_none(), "_text is a DomainResource parameter");
        assert!(r.get("Patient", "_lastUpdated").is_some());
    }

    #[test]
    fn custom_parameters_replace_and_restore() {
        let mut r = reg();
        let types = vec!["Patient".to_string()];
        let sp = crate::fhir::json::parse(
            br#"{"resourceType":"SearchParameter","status":"active","code":"gender","base":["Patient"],"type":"string","expression":"Patient.gender"}"#,
            16,
        )
        .unwrap();
        assert_eq!(r.set_custom("x", Some(&sp), &types), types);
        assert_eq!(r.get("Patient", "gender").unwrap().kind, Kind::String);
        r.set_custom("x", None, &types);
        assert_eq!(r.get("Patient", "gender").unwrap().kind, Kind::Token);
    }

    #[test]
    fn parameters_whose_postings_others_hold() {
        let mut r = reg();
        let union = |codes: &[&str]| Some(Derived::Union(codes.iter().map(|c| (*c).to_string()).collect()));
        assert_eq!(r.derived("Observation", "combo-code").cloned(), union(&["code", "component-code"]));
        assert_eq!(
            r.derived("Observation", "combo-value-quantity").cloned(),
            union(&["component-value-quantity", "value-quantity"])
        );
        assert_eq!(
            r.derived("Observation", "combo-value-concept").cloned(),
            union(&["component-value-concept", "value-concept"])
        );
        let by_subject = Some(Derived::Restricted { by: "subject".into(), target: "Patient".into() });
        for t in ["Observation", "Encounter", "Condition", "Procedure", "DiagnosticReport"] {
            assert_eq!(r.derived(t, "patient").cloned(), by_subject, "{t}");
        }
        // Parameters with postings of their own: single branches, composites (their
        // components pair values within one item), and `patient` where nothing else reads
        // the same element.
        for (t, code) in [
            ("Observation", "code"),
            ("Observation", "subject"),
            ("Observation", "value-quantity"),
            ("Observation", "combo-code-value-quantity"),
            ("Immunization", "patient"),
            ("Claim", "patient"),
        ] {
            assert_eq!(r.derived(t, code), None, "{t} {code}");
        }
        // A custom parameter that changes a part changes the union; removed, it comes back.
        let types = vec!["Observation".to_string()];
        let sp = crate::fhir::json::parse(
            br#"{"resourceType":"SearchParameter","status":"active","code":"component-code","base":["Observation"],"type":"token","expression":"Observation.method"}"#,
            16,
        )
        .unwrap();
        r.set_custom("y", Some(&sp), &types);
        assert_eq!(r.derived("Observation", "combo-code"), None);
        r.set_custom("y", None, &types);
        assert_eq!(r.derived("Observation", "combo-code").cloned(), union(&["code", "component-code"]));
    }

    #[test]
    fn union_branches_are_split_at_the_top_level() {
        assert_eq!(
            expression_branches(
                "(Observation.value as Quantity) | (Observation.value as SampledData) | Foo.x",
                "Observation"
            ),
            vec!["Observation.value as Quantity", "Observation.value as SampledData"]
        );
        assert_eq!(
            expression_branches("(Observation.a | Observation.b).c", "Observation"),
            Vec::<String>::new(),
            "one branch, not of the form Type.path"
        );
        assert_eq!(
            expression_branches("Observation.x.where(a | b)", "Observation"),
            vec!["Observation.x.where(a | b)"]
        );
    }
}
