//! RFC 6902 JSON Patch over the lossless [`Json`] tree (so patched resources keep their
//! decimal text).

use super::json::Json;

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn tokens(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer.strip_prefix('/').ok_or_else(|| format!("path {pointer:?} must start with '/'"))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn index_of(token: &str, len: usize, allow_end: bool) -> Result<usize, String> {
    if token == "-" && allow_end {
        return Ok(len);
    }
    let i: usize = token.parse().map_err(|_| format!("{token:?} is not an array index"))?;
    if i > len || (i == len && !allow_end) {
        return Err(format!("index {i} is out of bounds"));
    }
    Ok(i)
}

fn get_mut<'a>(root: &'a mut Json, path: &[String]) -> Result<&'a mut Json, String> {
    let mut cur = root;
    for t in path {
        cur = match cur {
            Json::Object(m) => {
                m.iter_mut().find(|(k, _)| k == t).map(|(_, v)| v).ok_or_else(|| format!("no member {t:?}"))?
            }
            Json::Array(a) => {
                let len = a.len();
                a.get_mut(index_of(t, len, false)?).ok_or_else(|| format!("no element {t}"))?
            }
            _ => return Err(format!("cannot descend into a primitive at {t:?}")),
        };
    }
    Ok(cur)
}

fn remove(root: &mut Json, path: &[String]) -> Result<Json, String> {
    let (last, parent) = path.split_last().ok_or("cannot remove the whole document")?;
    match get_mut(root, parent)? {
        Json::Object(m) => {
            let i = m.iter().position(|(k, _)| k == last).ok_or_else(|| format!("no member {last:?}"))?;
            Ok(m.remove(i).1)
        }
        Json::Array(a) => {
            let len = a.len();
            Ok(a.remove(index_of(last, len, false)?))
        }
        _ => Err("cannot remove from a primitive".into()),
    }
}

fn add(root: &mut Json, path: &[String], value: Json) -> Result<(), String> {
    let Some((last, parent)) = path.split_last() else {
        *root = value;
        return Ok(());
    };
    match get_mut(root, parent)? {
        Json::Object(m) => {
            match m.iter_mut().find(|(k, _)| k == last) {
                Some((_, v)) => *v = value,
                None => m.push((last.clone(), value)),
            }
            Ok(())
        }
        Json::Array(a) => {
            let len = a.len();
            a.insert(index_of(last, len, true)?, value);
            Ok(())
        }
        _ => Err("cannot add to a primitive".into()),
    }
}

/// Applies `patch` (a JSON array of operations) to `doc`; on error names the operation.
pub fn apply(doc: &mut Json, patch: &Json) -> Result<(), String> {
    let ops = patch.as_array().ok_or("a JSON Patch document must be an array")?;
    for (i, op) in ops.iter().enumerate() {
        let field = |name: &str| op.get(name).and_then(Json::as_str).ok_or(format!("operation {i}: missing {name:?}"));
        let pointer = tokens(field("path")?).map_err(|e| format!("operation {i}: {e}"))?;
        let value = || op.get("value").cloned().ok_or(format!("operation {i}: missing \"value\""));
        let res = match field("op")? {
            "add" => add(doc, &pointer, value()?),
            "remove" => remove(doc, &pointer).map(|_| ()),
            "replace" => get_mut(doc, &pointer).map(|t| *t = value().unwrap_or(Json::Null)).and_then(|()| {
                if op.get("value").is_none() {
                    Err("missing \"value\"".into())
                } else {
                    Ok(())
                }
            }),
            "move" => {
                let from = tokens(field("from")?)?;
                let v = remove(doc, &from)?;
                add(doc, &pointer, v)
            }
            "copy" => {
                let from = tokens(field("from")?)?;
                let v = get_mut(doc, &from)?.clone();
                add(doc, &pointer, v)
            }
            "test" => {
                let expected = value()?;
                let actual = get_mut(doc, &pointer)?;
                if actual.to_compact() == expected.to_compact() {
                    Ok(())
                } else {
                    Err("test failed: values differ".into())
                }
            }
            other => Err(format!("unknown op {other:?}")),
        };
        res.map_err(|e| format!("operation {i}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::json::parse;

    fn check(doc: &str, patch: &str, expected: &str) {
        let mut d = parse(doc.as_bytes(), 64).unwrap();
        apply(&mut d, &parse(patch.as_bytes(), 64).unwrap()).unwrap();
        assert_eq!(d.to_compact(), expected);
    }

    #[test]
    fn operations() {
        check(r#"{"a":1.50}"#, r#"[{"op":"add","path":"/b","value":[1]}]"#, r#"{"a":1.50,"b":[1]}"#);
        check(r#"{"a":[1,2]}"#, r#"[{"op":"add","path":"/a/-","value":3}]"#, r#"{"a":[1,2,3]}"#);
        check(r#"{"a":[1,2]}"#, r#"[{"op":"remove","path":"/a/0"}]"#, r#"{"a":[2]}"#);
        check(r#"{"a":"x"}"#, r#"[{"op":"replace","path":"/a","value":"y"}]"#, r#"{"a":"y"}"#);
        check(r#"{"a":"x"}"#, r#"[{"op":"move","from":"/a","path":"/b"}]"#, r#"{"b":"x"}"#);
        check(
            r#"{"a":"x"}"#,
            r#"[{"op":"test","path":"/a","value":"x"},{"op":"copy","from":"/a","path":"/b"}]"#,
            r#"{"a":"x","b":"x"}"#,
        );
    }

    #[test]
    fn failures_name_the_operation() {
        let mut d = parse(br#"{"a":1}"#, 64).unwrap();
        let err = apply(&mut d, &parse(br#"[{"op":"test","path":"/a","value":2}]"#, 64).unwrap()).unwrap_err();
        assert!(err.starts_with("operation 0"), "{err}");
        assert!(apply(&mut d, &parse(br#"[{"op":"remove","path":"/zz"}]"#, 64).unwrap()).is_err());
    }
}
