//! GS1 EPCIS 2.0 in its JSON/JSON-LD binding: the five event types, the EPC and Digital Link
//! identifiers they name ([`epc`]), the CBV 2.0 Event Hash ID ([`hash`]) and validation against
//! the standard's JSON schema and the CBV vocabularies ([`schema`]). Nothing here knows FHIR or
//! the ledger: `supply` maps events onto both.

pub mod epc;
pub mod hash;
pub mod schema;

#[cfg(test)]
mod reference_tests;

use serde_json::Value;

pub const EVENT_TYPES: [&str; 5] =
    ["ObjectEvent", "AggregationEvent", "TransactionEvent", "TransformationEvent", "AssociationEvent"];

/// The JSON-LD context every EPCIS 2.0 document names.
pub const CONTEXT: &str = "https://ref.gs1.org/standards/epcis/2.0.0/epcis-context.jsonld";

/// A CBV vocabulary an event field draws from: its URN prefix and its Web vocabulary prefix.
#[derive(Clone, Copy, Debug)]
pub struct Vocabulary {
    urn: &'static str,
    web: &'static str,
}

pub const BIZ_STEP: Vocabulary =
    Vocabulary { urn: "urn:epcglobal:cbv:bizstep:", web: "https://ref.gs1.org/cbv/BizStep-" };
pub const DISPOSITION: Vocabulary = Vocabulary { urn: "urn:epcglobal:cbv:disp:", web: "https://ref.gs1.org/cbv/Disp-" };
pub const SOURCE_DEST: Vocabulary = Vocabulary { urn: "urn:epcglobal:cbv:sdt:", web: "https://ref.gs1.org/cbv/SDT-" };

impl Vocabulary {
    /// The bare CBV word of a value in any of its three spellings (`shipping`,
    /// `urn:epcglobal:cbv:bizstep:shipping`, `https://ref.gs1.org/cbv/BizStep-shipping`); a
    /// user-defined URI stays as it is.
    pub fn word(self, value: &str) -> String {
        value.strip_prefix(self.urn).or_else(|| value.strip_prefix(self.web)).unwrap_or(value).to_string()
    }
}

/// What the ledger and the custody trace read of one event, every identifier normalised to its
/// canonical GS1 Digital Link (so a URN and a Digital Link of one product meet).
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub event_type: String,
    pub action: Option<String>,
    /// Milliseconds since the epoch of `eventTime`.
    pub time_ms: i64,
    pub biz_step: Option<String>,
    pub disposition: Option<String>,
    pub read_point: Option<String>,
    pub biz_location: Option<String>,
    /// Instance identifiers the event is about (`epcList`, transformation inputs and outputs).
    pub epcs: Vec<String>,
    /// An aggregation's or association's parent.
    pub parent: Option<String>,
    /// An aggregation's or association's children.
    pub children: Vec<String>,
    /// Class-level identifiers (`quantityList` and the like: a GTIN's lot, `lgtin`).
    pub classes: Vec<String>,
    /// `(type word, normalised id)` of `sourceList` and `destinationList`.
    pub sources: Vec<(String, String)>,
    pub destinations: Vec<(String, String)>,
    /// `ilmd` lot and expiry (the instance/lot master data of a commissioning).
    pub lot: Option<String>,
    pub expiry: Option<String>,
    /// The event is an error declaration of an earlier event with the same `eventID`.
    pub error_declaration: bool,
}

fn strings<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a str> + 'a {
    v.get(key).and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
}

fn classes_of(v: &Value, key: &str, out: &mut Vec<String>) {
    for q in v.get(key).and_then(Value::as_array).into_iter().flatten() {
        if let Some(c) = q.get("epcClass").and_then(Value::as_str) {
            out.push(epc::normalise(c));
        }
    }
}

fn parties(v: &Value, key: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in v.get(key).and_then(Value::as_array).into_iter().flatten() {
        let kind = s.get("type").and_then(Value::as_str).map(|t| SOURCE_DEST.word(t)).unwrap_or_default();
        let id = s.get("source").or_else(|| s.get("destination")).and_then(Value::as_str);
        if let Some(id) = id {
            out.push((kind, epc::normalise(id)));
        }
    }
    out
}

/// An `ilmd` field by its CBV master-data name, in the compact (`cbvmda:lotNumber`) or the
/// expanded (`urn:epcglobal:cbv:mda:lotNumber`) spelling.
fn master_data(ilmd: &Value, name: &str) -> Option<String> {
    let obj = ilmd.as_object()?;
    let v = obj.get(&format!("cbvmda:{name}")).or_else(|| obj.get(&format!("urn:epcglobal:cbv:mda:{name}")))?;
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Milliseconds since the epoch of an EPCIS timestamp (RFC 3339 with a zone).
pub fn time_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

impl Facts {
    /// Reads a schema-valid event (see [`schema::Validator`]).
    pub fn of(event: &Value) -> Facts {
        let s = |k: &str| event.get(k).and_then(Value::as_str);
        let id_of = |k: &str| event.get(k).and_then(|v| v.get("id")).and_then(Value::as_str).map(epc::normalise);
        let mut epcs: Vec<String> = Vec::new();
        for key in ["epcList", "inputEPCList", "outputEPCList"] {
            epcs.extend(strings(event, key).map(epc::normalise));
        }
        let mut classes = Vec::new();
        for key in ["quantityList", "childQuantityList", "inputQuantityList", "outputQuantityList"] {
            classes_of(event, key, &mut classes);
        }
        let ilmd = event.get("ilmd").cloned().unwrap_or(Value::Null);
        let lot = master_data(&ilmd, "lotNumber");
        Facts {
            event_type: s("type").unwrap_or_default().to_string(),
            action: s("action").map(String::from),
            time_ms: s("eventTime").and_then(time_ms).unwrap_or_default(),
            biz_step: s("bizStep").map(|b| BIZ_STEP.word(b)),
            disposition: s("disposition").map(|d| DISPOSITION.word(d)),
            read_point: id_of("readPoint"),
            biz_location: id_of("bizLocation"),
            parent: s("parentID").map(epc::normalise),
            children: strings(event, "childEPCs").map(epc::normalise).collect(),
            sources: parties(event, "sourceList"),
            destinations: parties(event, "destinationList"),
            expiry: master_data(&ilmd, "itemExpirationDate"),
            // A commissioning with a lot names the lot's class too: a lot trace and a recall
            // find the instances through it.
            classes: {
                if let (Some(lot), true) = (&lot, s("bizStep").is_some()) {
                    for e in &epcs {
                        if let Some(gtin) = epc::parse(e).and_then(|k| k.gtin) {
                            let class = epc::lgtin_link(&gtin, lot);
                            if !classes.contains(&class) {
                                classes.push(class);
                            }
                        }
                    }
                }
                classes
            },
            lot,
            epcs,
            error_declaration: event.get("errorDeclaration").is_some(),
        }
    }

    /// Every identifier the event names: what `/epcis/epcs/{epc}/events` and the trace find it by.
    pub fn identifiers(&self) -> Vec<String> {
        let mut all: Vec<String> = self.epcs.clone();
        all.extend(self.parent.iter().cloned());
        all.extend(self.children.iter().cloned());
        all.extend(self.classes.iter().cloned());
        all.sort();
        all.dedup();
        all
    }
}
