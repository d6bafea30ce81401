//! What a trial sponsor, an ethics board and a monitor use on top of research access
//! (`consent::research`): data locks ([`lock`]) and the refusal of unexplained changes to
//! locked data.

pub mod lock;

use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::Json;
use crate::search::index::Engine;

/// The data locks (`List/{id}`) that hold `rtype/id`.
pub fn locks_of(engine: &Engine, rtype: &str, id: &str) -> Result<Vec<String>, FhirError> {
    let idx = engine.current()?;
    let lists = idx.of("List");
    let holding = lists.posting("item", &format!("{rtype}/{id}"))?;
    if holding.is_empty() {
        return Ok(Vec::new());
    }
    let locks = lists.posting("code", &format!("{}|{}", lock::CODE_SYSTEM, lock::DATA_LOCK))?;
    let mut out = Vec::new();
    for k in holding.into_iter().filter(|k| locks.contains(k)) {
        out.extend(lists.get(k)?.map(|d| format!("List/{}", d.id)));
    }
    Ok(out)
}

/// The amendment reason a new version states (`meta.extension`), if any.
pub fn amendment_reason(body: &Json) -> Option<&str> {
    body.items(&["meta", "extension"])
        .find(|x| x.str_at(&["url"]) == Some(lock::AMENDMENT_REASON))
        .and_then(|x| x.str_at(&["valueString"]))
        .filter(|r| !r.trim().is_empty())
}

/// A change of locked data must say why (21 CFR 11.10(e): changes do not obscure what was
/// recorded; the locked version stays, the new one carries its reason); a delete cannot.
pub fn may_change(engine: &Engine, rtype: &str, id: &str, new: Option<&Json>) -> Result<(), FhirError> {
    let locks = locks_of(engine, rtype, id)?;
    let Some(lock) = locks.first() else { return Ok(()) };
    match new {
        None => Err(FhirError::new(
            ErrorCode::Unprocessable,
            format!("{rtype}/{id} is held by the trial data lock {lock}: locked data cannot be deleted"),
        )),
        Some(body) if amendment_reason(body).is_none() => Err(FhirError::new(
            ErrorCode::Unprocessable,
            format!(
                "{rtype}/{id} is held by the trial data lock {lock}: a change is an amendment and must state its \
                 reason in meta.extension ({})",
                lock::AMENDMENT_REASON
            ),
        )
        .at(format!("{rtype}.meta.extension"))),
        Some(_) => Ok(()),
    }
}
