//! `_summary` and `_elements`: the subset of a resource a search returns, tagged SUBSETTED.

use super::query::Summary;
use crate::fhir::json::Json;
use crate::fhir::profiles::Profiles;

const SUBSETTED: &str = "SUBSETTED";
const V3_OBSERVATION_VALUE: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// `res` (a `rtype`) reduced as asked; `None` when nothing is to be removed.
pub fn subset(
    profiles: &Profiles,
    rtype: &str,
    res: &Json,
    summary: Summary,
    elements: Option<&[String]>,
) -> Option<Json> {
    let members = res.as_object()?;
    let defs = profiles.children(rtype).unwrap_or(&[]);
    // The definition of a top-level JSON member (`valueQuantity` is `value[x]`).
    let def = |k: &str| {
        let k = k.strip_prefix('_').unwrap_or(k);
        defs.iter().find(|e| e.name == k || (e.choice && k.starts_with(e.name.as_str())))
    };
    let keep = |k: &str| -> bool {
        if matches!(k, "resourceType" | "id" | "meta") {
            return true;
        }
        if let Some(els) = elements {
            let k = k.strip_prefix('_').unwrap_or(k);
            // "Servers SHOULD always return mandatory elements whether they are requested or
            // not" (R4 search, _elements): an Observation keeps its status.
            return def(k).is_some_and(|d| d.min > 0)
                || els
                    .iter()
                    .any(|e| e.split('.').next() == Some(k) || def(k).is_some_and(|d| d.choice && e == &d.name));
        }
        match summary {
            Summary::True => def(k).is_some_and(|d| d.summary),
            Summary::Text => k == "text" || def(k).is_some_and(|d| d.min > 0),
            Summary::Data => k != "text",
            Summary::False | Summary::Count => true,
        }
    };
    if elements.is_none() && matches!(summary, Summary::False | Summary::Count) {
        return None;
    }
    let mut out: Vec<(String, Json)> = members.iter().filter(|(k, _)| keep(k)).cloned().collect();
    // A subset without more than its narrative no longer conforms to the profiles the resource
    // claims (a vital sign without its value), so it stops claiming them.
    let lost_data = members.iter().any(|(k, _)| !keep(k) && !matches!(k.as_str(), "text" | "_text"));
    let tag = Json::obj(vec![("system", Json::str(V3_OBSERVATION_VALUE)), ("code", Json::str(SUBSETTED))]);
    match out.iter_mut().find(|(k, _)| k == "meta") {
        Some((_, meta)) => {
            let mut tags = meta.get("tag").and_then(Json::as_array).cloned().unwrap_or_default();
            tags.push(tag);
            meta.set("tag", Json::Array(tags));
            if lost_data {
                meta.remove("profile");
            }
        }
        None => out.push(("meta".into(), Json::obj(vec![("tag", Json::Array(vec![tag]))]))),
    }
    Some(Json::Object(out))
}
