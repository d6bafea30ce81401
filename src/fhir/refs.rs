//! References inside a resource: finding them, rewriting them (transaction `urn:uuid:`
//! fullUrls, conditional references), and reading element values along a simple path.

use super::json::Json;

/// Calls `f` on the `reference` string of every Reference-shaped object in `v`
/// (any object with a string `reference`), skipping contained resources' own ids.
pub fn for_each_reference_mut(v: &mut Json, f: &mut dyn FnMut(&mut String)) {
    match v {
        Json::Object(members) => {
            for (k, child) in members.iter_mut() {
                if k == "reference" {
                    if let Json::String(s) = child {
                        f(s);
                        continue;
                    }
                }
                for_each_reference_mut(child, f);
            }
        }
        Json::Array(items) => {
            for item in items {
                for_each_reference_mut(item, f);
            }
        }
        _ => {}
    }
}

/// The values reached by following `elements` from the resource root, flattening arrays.
pub fn values_at<'a>(root: &'a Json, elements: &[String]) -> Vec<&'a Json> {
    let mut current = vec![root];
    for name in elements {
        let mut next = Vec::new();
        for v in current {
            match v.get(name) {
                Some(Json::Array(items)) => next.extend(items.iter()),
                Some(x) => next.push(x),
                None => {}
            }
        }
        current = next;
    }
    current
}

/// Splits a relative literal reference `Type/id` (optionally `/_history/n`) into its parts.
pub fn split_reference(reference: &str) -> Option<(&str, &str)> {
    let mut parts = reference.split('/');
    let rtype = parts.next()?;
    let id = parts.next()?;
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) | (Some("_history"), Some(_), None) => {}
        _ => return None,
    }
    if rtype.chars().next().is_some_and(|c| c.is_ascii_uppercase()) && super::is_valid_id(id) {
        Some((rtype, id))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::json::parse;

    #[test]
    fn rewrites_every_reference() {
        let mut r = parse(br#"{"resourceType":"Observation","subject":{"reference":"urn:uuid:1"},"performer":[{"reference":"urn:uuid:2"},{"display":"x"}]}"#, 64).unwrap();
        for_each_reference_mut(&mut r, &mut |s| *s = s.replace("urn:uuid:", "Patient/"));
        assert_eq!(
            r.to_compact(),
            r#"{"resourceType":"Observation","subject":{"reference":"Patient/1"},"performer":[{"reference":"Patient/2"},{"display":"x"}]}"#
        );
    }

    #[test]
    fn splits_relative_references() {
        assert_eq!(split_reference("Patient/123"), Some(("Patient", "123")));
        assert_eq!(split_reference("Patient/123/_history/2"), Some(("Patient", "123")));
        assert_eq!(split_reference("urn:uuid:abc"), None);
        assert_eq!(split_reference("http://x/Patient/1"), None);
    }
}
