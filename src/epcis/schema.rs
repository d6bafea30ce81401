//! Validation of EPCIS 2.0 documents and events in the JSON / JSON-LD binding.
//!
//! Two layers:
//! 1. the official EPCIS 2.0 JSON schema (`fhir-profiles/epcis/EPCIS-JSON-Schema.json`, vendored
//!    unchanged from gs1/EPCIS commit 2b888befbc071e1c2d388e027b30149b3f51dcef, draft-07, one file with
//!    only internal `$ref`s), compiled once with the `jsonschema` crate;
//! 2. checks in Rust for what the schema cannot say well: the CBV 2.0 vocabularies and one rule of the
//!    standard that the schema leaves out (AggregationEvent `parentID`).
//!
//! The schema is adjusted in memory at load time (the file on disk stays byte-identical to GS1's):
//! - the CBV vocabulary definitions (bizStep, disposition, bizTransaction type, source/destination type,
//!   error reason, sensor component) become plain strings, because the official schema rejects the
//!   `urn:epcglobal:cbv:…` forms that EPCIS 2.0 still allows and its `anyOf` errors are unreadable;
//!   [`check_vocab`] enforces the lists instead;
//! - `eventList` items are left unchecked by the envelope schema and each event is validated on its own against the
//!   sub-schema of its type: the schema's `if`/`then` dispatch would otherwise evaluate every event
//!   under every branch, and per-event validation gives each problem an event-relative path.
//!
//! Sensor measurement types, sensor alert types, action, time formats etc. stay with the schema.

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::{Location, LocationSegment};
use jsonschema::ValidationError;
use serde_json::{json, Map, Value};
use std::fmt;

const SCHEMA: &str = include_str!("../../fhir-profiles/epcis/EPCIS-JSON-Schema.json");

/// One thing wrong with a document or event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// FHIRPath-like location from the document (or event) root, e.g. `epcisBody.eventList[3].bizStep`;
    /// `(root)` for the value itself.
    pub location: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// The CBV 2.0 vocabularies that EPCIS event fields draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vocab {
    BizStep,
    Disposition,
    BizTransactionType,
    SourceDestType,
    ErrorReason,
    /// Sensor report `component` (CBV 2.0 §8.12); the schema enumerates it like the others.
    Component,
}

// The lists equal the enums of the vendored schema and Ontology/CBV.ttl of the same commit; the test
// `cbv_lists_match_schema` keeps them in step with the schema file.
const BIZ_STEPS: &[&str] = &[
    "accepting",
    "arriving",
    "assembling",
    "collecting",
    "commissioning",
    "consigning",
    "creating_class_instance",
    "cycle_counting",
    "decommissioning",
    "departing",
    "destroying",
    "disassembling",
    "dispensing",
    "encoding",
    "entering_exiting",
    "holding",
    "inspecting",
    "installing",
    "killing",
    "loading",
    "other",
    "packing",
    "picking",
    "receiving",
    "removing",
    "repackaging",
    "repairing",
    "replacing",
    "reserving",
    "retail_selling",
    "shipping",
    "staging_outbound",
    "stock_taking",
    "stocking",
    "storing",
    "transporting",
    "unloading",
    "unpacking",
    "void_shipping",
    "sensor_reporting",
    "sampling",
];
const DISPOSITIONS: &[&str] = &[
    "active",
    "container_closed",
    "damaged",
    "destroyed",
    "dispensed",
    "disposed",
    "encoded",
    "expired",
    "in_progress",
    "in_transit",
    "inactive",
    "no_pedigree_match",
    "non_sellable_other",
    "partially_dispensed",
    "recalled",
    "reserved",
    "retail_sold",
    "returned",
    "sellable_accessible",
    "sellable_not_accessible",
    "stolen",
    "unknown",
    "available",
    "completeness_verified",
    "completeness_inferred",
    "conformant",
    "container_open",
    "mismatch_instance",
    "mismatch_class",
    "mismatch_quantity",
    "needs_replacement",
    "non_conformant",
    "unavailable",
];
const BIZ_TRANSACTION_TYPES: &[&str] = &[
    "bol",
    "cert",
    "desadv",
    "inv",
    "pedigree",
    "po",
    "poc",
    "prodorder",
    "recadv",
    "rma",
    "testprd",
    "testres",
    "upevt",
];
const SOURCE_DEST_TYPES: &[&str] = &["owning_party", "possessing_party", "location"];
const ERROR_REASONS: &[&str] = &["did_not_occur", "incorrect_data"];
const COMPONENTS: &[&str] = &[
    "x",
    "y",
    "z",
    "axial_distance",
    "azimuth",
    "height",
    "spherical_radius",
    "polar_angle",
    "elevation_angle",
    "easting",
    "northing",
    "latitude",
    "longitude",
    "altitude",
];

const ALL_VOCABS: [Vocab; 6] = [
    Vocab::BizStep,
    Vocab::Disposition,
    Vocab::BizTransactionType,
    Vocab::SourceDestType,
    Vocab::ErrorReason,
    Vocab::Component,
];

/// Bases of the GS1 web vocabulary for CBV terms (`https://ref.gs1.org/cbv/BizStep-shipping`), and the
/// compact form `cbv:BizStep-shipping` (the protected `cbv` prefix of the EPCIS 2.0 JSON-LD context).
const CBV_WEB_BASES: &[&str] = &["https://ref.gs1.org/cbv/", "http://ref.gs1.org/cbv/", "cbv:"];
/// Namespaces owned by CBV: a value there must be a real CBV term, not a user-defined one. The schema
/// itself reserves `urn:epcglobal:cbv` and `ns.gs1.org/cbv/`.
const CBV_RESERVED: &[&str] = &[
    "urn:epcglobal:cbv:",
    "https://ref.gs1.org/cbv/",
    "http://ref.gs1.org/cbv/",
    "cbv:",
    "https://ns.gs1.org/cbv/",
    "http://ns.gs1.org/cbv/",
];

impl Vocab {
    /// The CBV 2.0 terms, in their bare JSON-LD form.
    pub fn words(self) -> &'static [&'static str] {
        match self {
            Vocab::BizStep => BIZ_STEPS,
            Vocab::Disposition => DISPOSITIONS,
            Vocab::BizTransactionType => BIZ_TRANSACTION_TYPES,
            Vocab::SourceDestType => SOURCE_DEST_TYPES,
            Vocab::ErrorReason => ERROR_REASONS,
            Vocab::Component => COMPONENTS,
        }
    }

    fn urn_prefix(self) -> &'static str {
        match self {
            Vocab::BizStep => "urn:epcglobal:cbv:bizstep:",
            Vocab::Disposition => "urn:epcglobal:cbv:disp:",
            Vocab::BizTransactionType => "urn:epcglobal:cbv:btt:",
            Vocab::SourceDestType => "urn:epcglobal:cbv:sdt:",
            Vocab::ErrorReason => "urn:epcglobal:cbv:er:",
            Vocab::Component => "urn:epcglobal:cbv:comp:",
        }
    }

    fn web_prefix(self) -> &'static str {
        match self {
            Vocab::BizStep => "BizStep-",
            Vocab::Disposition => "Disp-",
            Vocab::BizTransactionType => "BTT-",
            Vocab::SourceDestType => "SDT-",
            Vocab::ErrorReason => "ER-",
            Vocab::Component => "Comp-",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Vocab::BizStep => "business step",
            Vocab::Disposition => "disposition",
            Vocab::BizTransactionType => "business transaction type",
            Vocab::SourceDestType => "source/destination type",
            Vocab::ErrorReason => "error reason",
            Vocab::Component => "sensor component",
        }
    }

    fn example(self) -> &'static str {
        match self {
            Vocab::BizStep => "shipping",
            Vocab::Disposition => "in_transit",
            Vocab::BizTransactionType => "po",
            Vocab::SourceDestType => "owning_party",
            Vocab::ErrorReason => "did_not_occur",
            Vocab::Component => "latitude",
        }
    }

    /// The term part of a CBV URN or web URI of this vocabulary, or the value itself.
    fn term(self, value: &str) -> &str {
        if let Some(t) = value.strip_prefix(self.urn_prefix()) {
            return t;
        }
        CBV_WEB_BASES
            .iter()
            .find_map(|b| value.strip_prefix(b))
            .and_then(|rest| rest.strip_prefix(self.web_prefix()))
            .unwrap_or(value)
    }
}

/// Canonical CBV short name of a vocabulary value if it is a CBV value: the bare word (`shipping`), the
/// URN (`urn:epcglobal:cbv:bizstep:shipping`) and the GS1 web URI (`https://ref.gs1.org/cbv/BizStep-shipping`)
/// all give `Some("shipping")`; user-defined URIs and unknown words give `None`.
pub fn cbv_short(kind: Vocab, value: &str) -> Option<&'static str> {
    let term = kind.term(value);
    kind.words().iter().copied().find(|w| *w == term)
}

/// `None` if `value` is acceptable for `kind`, else a message for the user.
fn check_vocab(kind: Vocab, value: &str) -> Option<String> {
    if cbv_short(kind, value).is_some() {
        return None;
    }
    let label = kind.label();
    let hint = suggestion(kind, kind.term(value));
    let shown = show_str(value);
    if CBV_RESERVED.iter().any(|p| value.starts_with(p)) {
        // A term of another CBV vocabulary in the wrong field is a common slip: say which it is.
        let other = ALL_VOCABS
            .iter()
            .find(|k| cbv_short(**k, value).is_some())
            .map(|k| format!("; it is a CBV {}", k.label()))
            .unwrap_or_default();
        return Some(format!(
            "'{shown}' is not a CBV 2.0 {label}: the CBV namespace is reserved for its own terms{hint}{other}"
        ));
    }
    if is_absolute_uri(value) {
        return None; // a user-defined value
    }
    if !hint.is_empty() {
        return Some(format!("'{shown}' is not a CBV 2.0 {label}{hint}"));
    }
    let example = kind.example();
    Some(format!(
        "'{shown}' is not a CBV 2.0 {label}; use a CBV term (e.g. '{example}', \
         '{}{example}' or '{}{}{example}') or an absolute URI for a user-defined {label}",
        kind.urn_prefix(),
        CBV_WEB_BASES[0],
        kind.web_prefix()
    ))
}

/// " — did you mean 'shipping'?" for near misses (edit distance <= 2).
fn suggestion(kind: Vocab, term: &str) -> String {
    if term.len() > 64 {
        return String::new(); // no CBV term is that long; skip the quadratic distance
    }
    kind.words()
        .iter()
        .map(|w| (edit_distance(term, w), *w))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, w)| format!(" (did you mean '{w}'?)"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// RFC 3986 absolute URI, checked loosely (scheme, non-empty rest, no characters a URI cannot hold):
/// enough to tell a user-defined vocabulary URI from a misspelt bare CBV word.
fn is_absolute_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && !s.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"' | '{' | '}' | '|' | '\\' | '^' | '`')
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Object,
    Aggregation,
    Transaction,
    Transformation,
    Association,
    /// Any other `type`: a user extension event (schema definition `Extended-Event`).
    Extension,
}

impl EventType {
    fn from_type(t: &str) -> Self {
        match t {
            "ObjectEvent" => EventType::Object,
            "AggregationEvent" => EventType::Aggregation,
            "TransactionEvent" => EventType::Transaction,
            "TransformationEvent" => EventType::Transformation,
            "AssociationEvent" => EventType::Association,
            _ => EventType::Extension,
        }
    }

    fn definition(self) -> &'static str {
        match self {
            EventType::Object => "ObjectEvent",
            EventType::Aggregation => "AggregationEvent",
            EventType::Transaction => "TransactionEvent",
            EventType::Transformation => "TransformationEvent",
            EventType::Association => "AssociationEvent",
            EventType::Extension => "Extended-Event",
        }
    }
}

/// Validator for EPCIS 2.0 JSON / JSON-LD; build once (compiling the schema takes milliseconds) and share.
pub struct Validator {
    document: jsonschema::Validator,
    query_document: jsonschema::Validator,
    object: jsonschema::Validator,
    aggregation: jsonschema::Validator,
    transaction: jsonschema::Validator,
    transformation: jsonschema::Validator,
    association: jsonschema::Validator,
    extension: jsonschema::Validator,
}

impl fmt::Debug for Validator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validator").finish_non_exhaustive()
    }
}

impl Validator {
    /// Compiles the embedded schema (about 6 ms in release); build once and share, it is Send + Sync.
    pub fn new() -> Result<Self, String> {
        let mut root: Value = serde_json::from_str(SCHEMA).map_err(|e| format!("EPCIS JSON schema: {e}"))?;
        let defs =
            root.get_mut("definitions").and_then(Value::as_object_mut).ok_or("EPCIS JSON schema has no definitions")?;
        // See the module comment; a definition missing here means the vendored file changed shape.
        for name in ["bizStep", "disposition", "bizTransaction-type", "source-dest-type", "error-reason", "component"] {
            *definition(defs, name)? = json!({"type": "string"});
        }
        *definition(defs, "eventList")? = json!({"type": "array"}); // items: check_event
        let defs = Value::Object(std::mem::take(defs));

        let build = |target: &str| -> Result<jsonschema::Validator, String> {
            let schema = json!({
                "$schema": "http://json-schema.org/draft-07/schema#",
                "allOf": [{"$ref": format!("#/definitions/{target}")}],
                "definitions": defs.clone(),
            });
            // No retriever is configured and the crate is built without resolve-http/resolve-file, so
            // nothing is fetched; every $ref in the file is internal.
            jsonschema::draft7::options()
                .should_validate_formats(true)
                .build(&schema)
                .map_err(|e| format!("EPCIS JSON schema ({target}): {e}"))
        };
        Ok(Validator {
            document: build("epcisDocument")?,
            query_document: build("epcisQueryDocument")?,
            object: build(EventType::Object.definition())?,
            aggregation: build(EventType::Aggregation.definition())?,
            transaction: build(EventType::Transaction.definition())?,
            transformation: build(EventType::Transformation.definition())?,
            association: build(EventType::Association.definition())?,
            extension: build(EventType::Extension.definition())?,
        })
    }

    /// Validate a whole EPCISDocument (or EPCISQueryDocument): the envelope, then each event of
    /// `epcisBody.eventList`. Empty = valid.
    pub fn validate_document(&self, doc: &Value) -> Vec<Problem> {
        let mut out = Vec::new();
        let Some(obj) = doc.as_object() else {
            push(&mut out, "", "an EPCIS document must be a JSON object".into());
            return out;
        };
        let (envelope, events) = match obj.get("type") {
            Some(Value::String(t)) if t == "EPCISDocument" => {
                (&self.document, doc.pointer("/epcisBody/eventList").map(|e| (e, "epcisBody.eventList")))
            }
            Some(Value::String(t)) if t == "EPCISQueryDocument" => (
                &self.query_document,
                doc.pointer("/epcisBody/queryResults/resultsBody/eventList")
                    .map(|e| (e, "epcisBody.queryResults.resultsBody.eventList")),
            ),
            Some(t) => {
                push(
                    &mut out,
                    "type",
                    format!("{} is not an EPCIS document type; expected \"EPCISDocument\"", show(t)),
                );
                return out;
            }
            None => {
                push(&mut out, "type", "required field 'type' is missing (expected \"EPCISDocument\")".into());
                return out;
            }
        };
        if !envelope.is_valid(doc) {
            let mut deferred = Vec::new();
            for err in envelope.iter_errors(doc) {
                convert(&err, "", doc, &mut out, &mut deferred);
            }
            if out.is_empty() {
                out.append(&mut deferred);
            }
        }
        if let Some((Value::Array(list), base)) = events {
            for (i, event) in list.iter().enumerate() {
                self.check_event(event, || format!("{base}[{i}]"), &mut out);
            }
        }
        out
    }

    /// Validate one event as it appears in `epcisBody.eventList` (so `@context` is not required).
    /// Locations are relative to the event (`bizStep`, `epcList[0]`).
    pub fn validate_event(&self, event: &Value) -> Vec<Problem> {
        let mut out = Vec::new();
        self.check_event(event, String::new, &mut out);
        out
    }

    /// `base` builds the event's location lazily: valid events then allocate nothing.
    fn check_event(&self, event: &Value, base: impl Fn() -> String, out: &mut Vec<Problem>) {
        let Some(obj) = event.as_object() else {
            push(out, &base(), "an event must be a JSON object".into());
            return;
        };
        let ty = match obj.get("type") {
            Some(Value::String(t)) => EventType::from_type(t),
            Some(other) => {
                push(
                    out,
                    &join_prop(&base(), "type"),
                    format!("event type must be a string such as \"ObjectEvent\", found {}", show(other)),
                );
                return;
            }
            None => {
                push(
                    out,
                    &join_prop(&base(), "type"),
                    "required field 'type' is missing (ObjectEvent, AggregationEvent, TransactionEvent, \
                     TransformationEvent, AssociationEvent or an extension event URI)"
                        .into(),
                );
                return;
            }
        };
        let validator = match ty {
            EventType::Object => &self.object,
            EventType::Aggregation => &self.aggregation,
            EventType::Transaction => &self.transaction,
            EventType::Transformation => &self.transformation,
            EventType::Association => &self.association,
            EventType::Extension => &self.extension,
        };
        // is_valid stops at the first failure and builds no errors: the cheap path for valid events.
        if !validator.is_valid(event) {
            let base = base();
            let start = out.len();
            let mut deferred = Vec::new();
            for err in validator.iter_errors(event) {
                convert(&err, &base, event, out, &mut deferred);
            }
            if out.len() == start {
                out.append(&mut deferred);
            }
        }
        if ty != EventType::Extension {
            check_vocabularies(obj, &base, out);
        }
        if ty == EventType::Aggregation {
            check_aggregation_parent(obj, &base, out);
        }
    }
}

fn definition<'a>(defs: &'a mut Map<String, Value>, name: &str) -> Result<&'a mut Value, String> {
    defs.get_mut(name).ok_or_else(|| format!("EPCIS JSON schema lacks definitions/{name}"))
}

fn push(out: &mut Vec<Problem>, location: &str, message: String) {
    let location = if location.is_empty() { "(root)".to_owned() } else { location.to_owned() };
    out.push(Problem { location, message });
}

/// `base` + `.name`, or `["name"]` when the name would be ambiguous in a dotted path.
fn join_prop(base: &str, name: &str) -> String {
    let plain = !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '@' | ':' | '-'));
    match (base.is_empty(), plain) {
        (true, true) => name.to_owned(),
        (false, true) => format!("{base}.{name}"),
        (_, false) => format!("{base}[{}]", Value::from(name)),
    }
}

fn join_location(base: &str, loc: &Location) -> String {
    let mut s = base.to_owned();
    for seg in loc {
        match seg {
            LocationSegment::Property(p) => s = join_prop(&s, &p),
            LocationSegment::Index(i) => s = format!("{s}[{i}]"),
        }
    }
    s
}

/// A JSON value for a message, shortened so a huge object does not flood the response.
fn show(v: &Value) -> String {
    show_str(&v.to_string())
}

fn show_str(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(77).collect::<String>())
    } else {
        s.to_owned()
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Schema error -> Problem(s). `root` is the value validated (event or document); `deferred` collects
/// generic messages used only if nothing more precise was reported for the same value.
fn convert(err: &ValidationError<'_>, base: &str, root: &Value, out: &mut Vec<Problem>, deferred: &mut Vec<Problem>) {
    let here = join_location(base, err.instance_path());
    let instance = err.instance();
    let schema_path = err.schema_path().as_str();
    match err.kind() {
        ValidationErrorKind::Required { property } => {
            let p = property.as_str().unwrap_or_default();
            push(out, &join_prop(&here, p), format!("required field '{p}' is missing"));
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            for u in unexpected {
                push(out, &join_prop(&here, u), format!("field '{u}' is not allowed here"));
            }
        }
        ValidationErrorKind::PropertyNames { error } => {
            let name = error.instance().as_str().unwrap_or_default();
            let owner = definition_name(schema_path).unwrap_or("this object");
            let message = if STANDARD_EVENT_FIELDS.contains(&name) {
                format!("field '{name}' is not allowed in {owner}")
            } else if owner == "ilmd" {
                format!(
                    "ilmd field '{name}' must be a namespaced name (e.g. 'example:{name}' with 'example' declared in @context) or a URI"
                )
            } else {
                format!(
                    "field '{name}' is not defined for {owner}; extension fields must be namespaced (e.g. 'example:{name}' with 'example' declared in @context) or URIs"
                )
            };
            push(out, &join_prop(&here, name), message);
        }
        ValidationErrorKind::AnyOf { context } => {
            if err.instance_path().as_str().is_empty()
                && definition_name(schema_path).is_some_and(|def| explain_event_rule(def, root, base, out))
            {
                return;
            }
            let generic = describe_any_of(instance, context);
            if err.instance_path().as_str().is_empty() {
                push(deferred, &here, generic);
            } else {
                push(out, &here, generic);
            }
        }
        kind => push(out, &here, describe(kind, instance, schema_path)),
    }
}

/// Fields the standard defines for some event type: when one turns up in an event type that does not
/// have it, advising to namespace it would mislead.
const STANDARD_EVENT_FIELDS: &[&str] = &[
    "action",
    "epcList",
    "quantityList",
    "parentID",
    "childEPCs",
    "childQuantityList",
    "inputEPCList",
    "inputQuantityList",
    "outputEPCList",
    "outputQuantityList",
    "transformationID",
    "bizStep",
    "disposition",
    "persistentDisposition",
    "readPoint",
    "bizLocation",
    "bizTransactionList",
    "sourceList",
    "destinationList",
    "sensorElementList",
    "ilmd",
];

/// `ObjectEvent` from `/definitions/ObjectEvent/allOf/2/anyOf`.
fn definition_name(schema_path: &str) -> Option<&str> {
    schema_path.strip_prefix("/definitions/")?.split('/').next()
}

/// Message for a single-keyword failure.
fn describe(kind: &ValidationErrorKind, instance: &Value, schema_path: &str) -> String {
    let v = show(instance);
    match kind {
        ValidationErrorKind::Enum { options } => {
            let options = options.as_array().map(Vec::as_slice).unwrap_or_default();
            if options.len() <= 12 {
                let allowed = options.iter().map(show).collect::<Vec<_>>().join(", ");
                return format!("{v} is not one of {allowed}");
            }
            // Long lists (sensor measurement types): name the near miss rather than every value.
            let near = instance.as_str().and_then(|s| {
                options
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|o| (edit_distance(s, o), o))
                    .filter(|(d, _)| *d <= 2)
                    .min_by_key(|(d, _)| *d)
            });
            match near {
                Some((_, o)) => {
                    format!("{v} is not one of the {} allowed values (did you mean \"{o}\"?)", options.len())
                }
                None => format!("{v} is not one of the {} allowed values", options.len()),
            }
        }
        ValidationErrorKind::Format { format } => match format.as_str() {
            "date-time" => format!(
                "{v} is not a valid date-time; expected RFC 3339 with a time zone, e.g. \"2005-04-03T20:33:31.116-06:00\""
            ),
            "uri" => format!(
                "{v} is not an absolute URI (e.g. \"urn:epc:id:sgtin:0614141.107346.2017\" or \"https://id.gs1.org/01/…\")"
            ),
            other => format!("{v} is not a valid {other}"),
        },
        ValidationErrorKind::Pattern { pattern } => {
            if schema_path.ends_with("/eventTimeZoneOffset/pattern") {
                format!(
                    "{v} is not a valid time zone offset; expected +hh:mm or -hh:mm between -14:00 and +14:00, e.g. \"-06:00\""
                )
            } else if schema_path.starts_with("/definitions/uom/") {
                format!(
                    "{v} is not a UN/ECE Recommendation 20 unit code (2-3 upper-case letters or digits, e.g. \"KGM\")"
                )
            } else if schema_path.starts_with("/definitions/hexBinary/") {
                format!("{v} is not hexadecimal")
            } else if schema_path.starts_with("/definitions/version/") {
                format!("{v} is not a version number such as \"2.0\"")
            } else {
                format!("{v} does not match the pattern {pattern}")
            }
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => set.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" or "),
            };
            format!("expected {expected}, found {} {v}", json_type(instance))
        }
        ValidationErrorKind::MinItems { limit } => {
            format!("must contain at least {limit} item(s)")
        }
        ValidationErrorKind::UniqueItems => "contains duplicate entries".to_owned(),
        ValidationErrorKind::FalseSchema | ValidationErrorKind::Not { .. } => {
            "this field is not allowed here".to_owned()
        }
        ValidationErrorKind::AnyOf { context } => describe_any_of(instance, context),
        other => format!("{v} is invalid ({})", other.keyword()),
    }
}

fn describe_any_of(instance: &Value, context: &[Vec<ValidationError<'static>>]) -> String {
    let branches: Vec<String> = context
        .iter()
        .filter_map(|branch| {
            let msgs: Vec<String> =
                branch.iter().map(|e| describe(e.kind(), e.instance(), e.schema_path().as_str())).collect();
            (!msgs.is_empty()).then(|| msgs.join(" and "))
        })
        .collect();
    format!("{} matches none of the allowed forms: {}", show(instance), branches.join("; or "))
}

fn non_empty_array(obj: &Map<String, Value>, key: &str) -> bool {
    obj.get(key).and_then(Value::as_array).is_some_and(|a| !a.is_empty())
}

fn action(obj: &Map<String, Value>) -> Option<&str> {
    obj.get("action").and_then(Value::as_str)
}

/// Precise messages for the event-level `anyOf` rules of the schema. Mirrors them exactly; returns
/// false when it finds nothing (e.g. the anyOf failed because of a bad list item already reported),
/// so the caller falls back to the generic message.
fn explain_event_rule(def: &str, event: &Value, base: &str, out: &mut Vec<Problem>) -> bool {
    let Some(obj) = event.as_object() else {
        return false;
    };
    let start = out.len();
    let deleting = action(obj) == Some("DELETE");
    match def {
        "ObjectEvent" => {
            let has_what = obj.get("epcList").is_some_and(Value::is_array)
                || non_empty_array(obj, "quantityList")
                || (non_empty_array(obj, "sensorElementList") && obj.contains_key("readPoint"));
            if !has_what {
                push(
                    out,
                    &join_prop(base, "epcList"),
                    "an ObjectEvent must say what it is about: epcList, a non-empty quantityList, or a \
                     non-empty sensorElementList together with readPoint"
                        .into(),
                );
            }
            if let Some(a) = action(obj).filter(|a| obj.contains_key("ilmd") && *a != "ADD") {
                push(
                    out,
                    &join_prop(base, "ilmd"),
                    format!("ilmd is only allowed when action is ADD (action is \"{a}\")"),
                );
            }
        }
        "AggregationEvent" | "AssociationEvent"
            if !deleting && !non_empty_array(obj, "childEPCs") && !non_empty_array(obj, "childQuantityList") =>
        {
            push(
                out,
                &join_prop(base, "childEPCs"),
                format!(
                    "an {def} with action ADD or OBSERVE must list its children in a non-empty childEPCs or \
                     childQuantityList"
                ),
            );
        }
        "TransactionEvent"
            if !deleting
                && !obj.get("epcList").is_some_and(Value::is_array)
                && !non_empty_array(obj, "quantityList") =>
        {
            push(
                out,
                &join_prop(base, "epcList"),
                "a TransactionEvent with action ADD or OBSERVE must have epcList or a non-empty quantityList".into(),
            );
        }
        "TransformationEvent" => {
            let inputs = non_empty_array(obj, "inputEPCList") || non_empty_array(obj, "inputQuantityList");
            let outputs = non_empty_array(obj, "outputEPCList") || non_empty_array(obj, "outputQuantityList");
            if !(inputs && outputs || (inputs || outputs) && obj.contains_key("transformationID")) {
                let field = if inputs { "outputEPCList" } else { "inputEPCList" };
                push(
                    out,
                    &join_prop(base, field),
                    "a TransformationEvent needs non-empty inputs (inputEPCList or inputQuantityList) and \
                     outputs (outputEPCList or outputQuantityList), or one of them plus transformationID"
                        .into(),
                );
            }
        }
        _ => {}
    }
    out.len() > start
}

/// CBV vocabulary fields of an event (the schema's own vocabulary checks are replaced, see module doc).
fn check_vocabularies(obj: &Map<String, Value>, base: &impl Fn() -> String, out: &mut Vec<Problem>) {
    let mut check = |kind: Vocab, value: Option<&Value>, loc: &dyn Fn() -> String| {
        if let Some(message) = value.and_then(Value::as_str).and_then(|s| check_vocab(kind, s)) {
            push(out, &loc(), message);
        }
    };
    check(Vocab::BizStep, obj.get("bizStep"), &|| join_prop(&base(), "bizStep"));
    check(Vocab::Disposition, obj.get("disposition"), &|| join_prop(&base(), "disposition"));
    if let Some(pd) = obj.get("persistentDisposition").and_then(Value::as_object) {
        for key in ["set", "unset"] {
            for (i, v) in items(pd.get(key)) {
                check(Vocab::Disposition, Some(v), &|| {
                    format!("{}[{i}]", join_prop(&join_prop(&base(), "persistentDisposition"), key))
                });
            }
        }
    }
    for (list, kind) in [
        ("bizTransactionList", Vocab::BizTransactionType),
        ("sourceList", Vocab::SourceDestType),
        ("destinationList", Vocab::SourceDestType),
    ] {
        for (i, entry) in items(obj.get(list)) {
            check(kind, entry.get("type"), &|| format!("{}[{i}].type", join_prop(&base(), list)));
        }
    }
    if let Some(decl) = obj.get("errorDeclaration") {
        check(Vocab::ErrorReason, decl.get("reason"), &|| join_prop(&join_prop(&base(), "errorDeclaration"), "reason"));
    }
    for (i, element) in items(obj.get("sensorElementList")) {
        for (j, report) in items(element.get("sensorReport")) {
            check(Vocab::Component, report.get("component"), &|| {
                format!("{}[{i}].sensorReport[{j}].component", join_prop(&base(), "sensorElementList"))
            });
        }
    }
}

fn items(v: Option<&Value>) -> impl Iterator<Item = (usize, &Value)> {
    v.and_then(Value::as_array).into_iter().flatten().enumerate()
}

/// EPCIS 2.0 (AggregationEvent field table): parentID is optional only for OBSERVE. The JSON schema
/// does not encode this, so it is checked here.
fn check_aggregation_parent(obj: &Map<String, Value>, base: &impl Fn() -> String, out: &mut Vec<Problem>) {
    if let Some(a @ ("ADD" | "DELETE")) = action(obj).filter(|_| !obj.contains_key("parentID")) {
        push(
            out,
            &join_prop(&base(), "parentID"),
            format!("required field 'parentID' is missing: an AggregationEvent with action {a} must name its parent"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    fn validator() -> &'static Validator {
        static V: OnceLock<Validator> = OnceLock::new();
        V.get_or_init(|| Validator::new().expect("embedded schema compiles"))
    }

    /// The ObjectEvent the benchmark uses: a few EPCs and most optional fields.
    fn typical_event() -> Value {
        json!({
            "type": "ObjectEvent",
            "eventID": "ni:///sha-256;df7bb3c352fef055578554f09f5e2aa41782150ced7bd0b8af24dd3ccb30ba69?ver=CBV2.0",
            "eventTime": "2024-04-03T20:33:31.116-06:00",
            "eventTimeZoneOffset": "-06:00",
            "action": "ADD",
            "epcList": [
                "urn:epc:id:sgtin:0614141.107346.2017",
                "urn:epc:id:sgtin:0614141.107346.2018",
                "https://id.gs1.org/01/00614141073467/21/2019",
                "urn:epc:id:sgtin:0614141.107346.2020"
            ],
            "bizStep": "shipping",
            "disposition": "in_transit",
            "readPoint": {"id": "urn:epc:id:sgln:0614141.07346.1234"},
            "bizLocation": {"id": "urn:epc:id:sgln:0614141.07346.0"},
            "bizTransactionList": [
                {"type": "po", "bizTransaction": "http://transaction.acme.com/po/12345678"},
                {"type": "urn:epcglobal:cbv:btt:desadv", "bizTransaction": "urn:epcglobal:cbv:bt:0614141073467:1152"}
            ],
            "sourceList": [{"type": "owning_party", "source": "urn:epc:id:pgln:0614141.00000"}],
            "destinationList": [{"type": "https://ref.gs1.org/cbv/SDT-location", "destination": "urn:epc:id:sgln:0012345.11111.0"}],
            "ilmd": {"example:bestBeforeDate": "2025-01-01", "example:lot": "LOT-1"}
        })
    }

    fn document(events: &[Value]) -> Value {
        json!({
            "@context": ["https://ref.gs1.org/standards/epcis/2.0.0/epcis-context.jsonld", {"example": "http://ns.example.com/epcis/"}],
            "type": "EPCISDocument",
            "schemaVersion": "2.0",
            "creationDate": "2024-04-03T20:33:31.116Z",
            "epcisBody": {"eventList": events}
        })
    }

    /// The problems of `event` validated inside a document, as the capture interface sees it.
    fn problems_with(change: impl FnOnce(&mut Map<String, Value>)) -> Vec<Problem> {
        let mut event = typical_event();
        if let Some(obj) = event.as_object_mut() {
            change(obj);
        }
        validator().validate_document(&document(&[typical_event(), event]))
    }

    #[track_caller]
    fn assert_problem_at(problems: &[Problem], location: &str, needle: &str) {
        assert!(
            problems.iter().any(|p| p.location == location && p.message.contains(needle)),
            "expected a problem at {location} mentioning {needle:?}, got {problems:#?}"
        );
    }

    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "jsonld" || e == "json") {
                out.push(path);
            }
        }
    }

    #[test]
    fn official_examples_are_valid() {
        let mut paths = Vec::new();
        files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/epcis-examples"), &mut paths);
        paths.sort();
        assert!(paths.len() >= 52, "examples missing: found {}", paths.len());
        let mut failures = Vec::new();
        for path in &paths {
            let text = std::fs::read_to_string(path).expect("readable example");
            let value: Value = serde_json::from_str(&text).expect("example is JSON");
            let is_doc =
                matches!(value.get("type").and_then(Value::as_str), Some("EPCISDocument" | "EPCISQueryDocument"));
            let problems =
                if is_doc { validator().validate_document(&value) } else { validator().validate_event(&value) };
            if !problems.is_empty() {
                failures.push(format!("{}: {problems:#?}", path.display()));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn typical_event_is_valid() {
        assert_eq!(validator().validate_event(&typical_event()), vec![]);
        assert_eq!(validator().validate_document(&document(&[typical_event()])), vec![]);
    }

    #[test]
    fn validator_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Validator>();
    }

    #[test]
    fn cbv_lists_match_schema() {
        let schema: Value = serde_json::from_str(SCHEMA).expect("schema is JSON");
        for (def, kind) in [
            ("bizStep", Vocab::BizStep),
            ("disposition", Vocab::Disposition),
            ("bizTransaction-type", Vocab::BizTransactionType),
            ("source-dest-type", Vocab::SourceDestType),
            ("error-reason", Vocab::ErrorReason),
            ("component", Vocab::Component),
        ] {
            let enumerated: Vec<&str> = schema["definitions"][def]["anyOf"][1]["enum"]
                .as_array()
                .expect("enum in schema")
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(enumerated, kind.words(), "{def}");
        }
    }

    #[test]
    fn cbv_short_forms() {
        for v in [
            "shipping",
            "urn:epcglobal:cbv:bizstep:shipping",
            "https://ref.gs1.org/cbv/BizStep-shipping",
            "cbv:BizStep-shipping",
        ] {
            assert_eq!(cbv_short(Vocab::BizStep, v), Some("shipping"), "{v}");
        }
        assert_eq!(cbv_short(Vocab::Disposition, "urn:epcglobal:cbv:disp:in_transit"), Some("in_transit"));
        assert_eq!(cbv_short(Vocab::BizTransactionType, "https://ref.gs1.org/cbv/BTT-po"), Some("po"));
        assert_eq!(cbv_short(Vocab::SourceDestType, "urn:epcglobal:cbv:sdt:owning_party"), Some("owning_party"));
        assert_eq!(cbv_short(Vocab::ErrorReason, "did_not_occur"), Some("did_not_occur"));
        assert_eq!(cbv_short(Vocab::BizStep, "urn:epcglobal:cbv:disp:in_transit"), None);
        assert_eq!(cbv_short(Vocab::BizStep, "https://example.com/steps/polishing"), None);
        assert_eq!(cbv_short(Vocab::BizStep, "shiping"), None);
    }

    #[test]
    fn vocabulary_forms_accepted() {
        for step in [
            "urn:epcglobal:cbv:bizstep:receiving",
            "https://ref.gs1.org/cbv/BizStep-receiving",
            "https://example.com/steps/polishing",
            "urn:example:step:polishing",
        ] {
            assert_eq!(
                problems_with(|e| {
                    e.insert("bizStep".into(), json!(step));
                }),
                vec![],
                "{step}"
            );
        }
    }

    #[test]
    fn missing_event_time() {
        let p = problems_with(|e| {
            e.remove("eventTime");
        });
        assert_problem_at(&p, "epcisBody.eventList[1].eventTime", "required");
    }

    #[test]
    fn bad_event_time() {
        let p = problems_with(|e| {
            e.insert("eventTime".into(), json!("2005-04-03"));
        });
        assert_problem_at(&p, "epcisBody.eventList[1].eventTime", "date-time");
    }

    #[test]
    fn bad_action() {
        let p = problems_with(|e| {
            e.insert("action".into(), json!("OBSERV"));
        });
        assert_problem_at(
            &p,
            "epcisBody.eventList[1].action",
            "\"OBSERV\" is not one of \"OBSERVE\", \"ADD\", \"DELETE\"",
        );
    }

    #[test]
    fn unknown_bare_biz_step() {
        let p = problems_with(|e| {
            e.insert("bizStep".into(), json!("shiping"));
        });
        assert_problem_at(&p, "epcisBody.eventList[1].bizStep", "'shiping' is not a CBV 2.0 business step");
        assert_problem_at(&p, "epcisBody.eventList[1].bizStep", "did you mean 'shipping'");
        assert_eq!(p.len(), 1, "{p:#?}");
    }

    #[test]
    fn unknown_cbv_urn_and_wrong_vocabulary() {
        let p = problems_with(|e| {
            e.insert("bizStep".into(), json!("urn:epcglobal:cbv:bizstep:shiping"));
            e.insert("disposition".into(), json!("urn:epcglobal:cbv:bizstep:shipping"));
        });
        assert_problem_at(&p, "epcisBody.eventList[1].bizStep", "namespace is reserved");
        assert_problem_at(&p, "epcisBody.eventList[1].disposition", "it is a CBV business step");
    }

    #[test]
    fn unknown_vocabulary_words_in_lists() {
        let p = problems_with(|e| {
            e.insert("bizTransactionList".into(), json!([{"type": "p0", "bizTransaction": "urn:x:1"}]));
            e.insert("sourceList".into(), json!([{"type": "owner", "source": "urn:x:2"}]));
            e.insert("errorDeclaration".into(), json!({"declarationTime": "2024-01-01T00:00:00Z", "reason": "wrong"}));
        });
        assert_problem_at(&p, "epcisBody.eventList[1].bizTransactionList[0].type", "business transaction type");
        assert_problem_at(&p, "epcisBody.eventList[1].sourceList[0].type", "source/destination type");
        assert_problem_at(&p, "epcisBody.eventList[1].errorDeclaration.reason", "error reason");
    }

    #[test]
    fn wrong_time_zone_offset() {
        for offset in ["+25:00", "-0600", "06:00", "Z"] {
            let p = problems_with(|e| {
                e.insert("eventTimeZoneOffset".into(), json!(offset));
            });
            assert_problem_at(&p, "epcisBody.eventList[1].eventTimeZoneOffset", "time zone offset");
        }
    }

    #[test]
    fn aggregation_add_without_parent() {
        let event = json!({
            "type": "AggregationEvent",
            "eventTime": "2013-06-08T14:58:56.591Z",
            "eventTimeZoneOffset": "+02:00",
            "action": "ADD",
            "childEPCs": ["urn:epc:id:sgtin:0614141.107346.2017"]
        });
        assert_problem_at(&validator().validate_event(&event), "parentID", "parentID");
        let mut observe = event.clone();
        observe["action"] = json!("OBSERVE");
        assert_eq!(validator().validate_event(&observe), vec![]);
    }

    #[test]
    fn aggregation_add_without_children() {
        let event = json!({
            "type": "AggregationEvent",
            "eventTime": "2013-06-08T14:58:56.591Z",
            "eventTimeZoneOffset": "+02:00",
            "action": "ADD",
            "parentID": "urn:epc:id:sscc:0614141.1234567890",
            "childEPCs": []
        });
        let p = validator().validate_event(&event);
        assert_problem_at(&p, "childEPCs", "non-empty childEPCs");
        assert_eq!(p.len(), 1, "{p:#?}");
    }

    #[test]
    fn non_uri_epc() {
        let p = problems_with(|e| {
            e.insert("epcList".into(), json!(["urn:epc:id:sgtin:0614141.107346.2017", "0614141.107346.2018"]));
        });
        assert_problem_at(&p, "epcisBody.eventList[1].epcList[1]", "not an absolute URI");
        assert_eq!(p.len(), 1, "{p:#?}");
    }

    #[test]
    fn object_event_without_what() {
        let p = problems_with(|e| {
            e.remove("epcList");
        });
        assert_problem_at(&p, "epcisBody.eventList[1].epcList", "must say what it is about");
        assert_eq!(p.len(), 1, "{p:#?}");
    }

    #[test]
    fn ilmd_only_with_add() {
        let p = problems_with(|e| {
            e.insert("action".into(), json!("OBSERVE"));
        });
        assert_problem_at(&p, "epcisBody.eventList[1].ilmd", "only allowed when action is ADD");
    }

    #[test]
    fn transformation_needs_inputs_and_outputs() {
        let event = json!({
            "type": "TransformationEvent",
            "eventTime": "2013-06-08T14:58:56.591Z",
            "eventTimeZoneOffset": "+02:00",
            "inputEPCList": ["urn:epc:id:sgtin:4012345.011122.25"]
        });
        assert_problem_at(&validator().validate_event(&event), "outputEPCList", "TransformationEvent needs");
    }

    #[test]
    fn unnamespaced_extension_field() {
        let p = problems_with(|e| {
            e.insert("myField".into(), json!("x"));
        });
        assert_problem_at(&p, "epcisBody.eventList[1].myField", "not defined for ObjectEvent");
    }

    #[test]
    fn document_envelope_problems() {
        let mut doc = document(&[typical_event()]);
        if let Some(o) = doc.as_object_mut() {
            o.remove("schemaVersion");
            o.insert("creationDate".into(), json!("yesterday"));
        }
        let p = validator().validate_document(&doc);
        assert_problem_at(&p, "schemaVersion", "required");
        assert_problem_at(&p, "creationDate", "date-time");

        assert_problem_at(&validator().validate_document(&json!({"type": "ObjectEvent"})), "type", "EPCISDocument");
        assert_problem_at(&validator().validate_document(&json!([])), "(root)", "JSON object");
        let p = validator().validate_document(&document(&[json!(1), json!({"eventTime": "x"})]));
        assert_problem_at(&p, "epcisBody.eventList[0]", "JSON object");
        assert_problem_at(&p, "epcisBody.eventList[1].type", "required");
    }

    #[test]
    fn sensor_measurement_type_and_component() {
        let p = problems_with(|e| {
            e.insert(
                "sensorElementList".into(),
                json!([{"sensorReport": [{"type": "Temprature", "value": 4.5, "uom": "CEL", "component": "lattitude"}]}]),
            );
        });
        assert_problem_at(&p, "epcisBody.eventList[1].sensorElementList[0].sensorReport[0].type", "\"Temperature\"");
        assert_problem_at(&p, "epcisBody.eventList[1].sensorElementList[0].sensorReport[0].component", "'latitude'");
    }

    #[test]
    fn extension_event_type_must_be_uri() {
        let event =
            json!({"type": "CustomEvent", "eventTime": "2013-06-08T14:58:56.591Z", "eventTimeZoneOffset": "+02:00"});
        assert_problem_at(&validator().validate_event(&event), "type", "absolute URI");
    }
}
