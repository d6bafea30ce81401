//! Partners and certificates as last read, by version: a trace's partners are parsed (keys
//! decompressed) and their certificates' issuer signatures verified once per version, not on
//! every request. Every use checks the versions still current, so a change is seen at once.

use std::collections::HashMap;
use std::sync::Mutex;

use super::certs::{self, Certificate};
use super::partners::{self, Partner};
use crate::error::FhirError;
use crate::search::index::Engine;

/// How many partners and certificate holders are remembered.
const KEPT: usize = 10_000;

#[derive(Default)]
pub struct Directory {
    partners: Mutex<HashMap<String, (u64, Partner)>>,
    /// Holder → (its certificates' `(id, version)`, their issuers' `(id, version)`, the certificates).
    certs: Mutex<HashMap<String, CertEntry>>,
}

type Versions = Vec<(String, u64)>;
type CertEntry = (Versions, Versions, Vec<Certificate>);

fn version(engine: &Engine, rtype: &str, id: &str) -> Result<Option<u64>, FhirError> {
    Ok(engine.repo().view().current(rtype, id)?.filter(|c| !c.deleted).map(|c| c.version))
}

fn keep<V>(map: &mut HashMap<String, V>, key: String, value: V) {
    if map.len() >= KEPT {
        map.clear();
    }
    map.insert(key, value);
}

impl Directory {
    /// `Organization/{id}` as a partner, if it exists.
    pub fn partner(&self, engine: &Engine, id: &str) -> Result<Option<Partner>, FhirError> {
        let Some(v) = version(engine, "Organization", id)? else { return Ok(None) };
        if let Some((cached, p)) = self.partners.lock().ok().and_then(|m| m.get(id).cloned()) {
            if cached == v {
                return Ok(Some(p));
            }
        }
        let p = partners::partner(engine, id)?;
        if let (Some(p), Ok(mut m)) = (&p, self.partners.lock()) {
            keep(&mut m, id.to_string(), (v, p.clone()));
        }
        Ok(p)
    }

    /// The partner owning a location or party identifier (see [`partners::by_location`]).
    pub fn by_location(&self, engine: &Engine, id: &str) -> Result<Option<Partner>, FhirError> {
        let Some(gln) = partners::gln_of(id) else { return Ok(None) };
        for org in partners::ids_by_identifier(engine, super::GLN_SYSTEM, &gln)? {
            if let Some(p) = self.partner(engine, &org)? {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }

    /// The certificates `target` holds (see [`certs::of`]).
    pub fn certs(&self, engine: &Engine, target: &str) -> Result<Vec<Certificate>, FhirError> {
        let heads = certs::heads(engine, target)?;
        let held: Versions = heads.iter().map(|h| (h.id.clone(), h.version)).collect();
        if let Some((h, issuers, c)) = self.certs.lock().ok().and_then(|m| m.get(target).cloned()) {
            let mut fresh = h == held;
            for (id, v) in &issuers {
                fresh = fresh && version(engine, "Organization", id)? == Some(*v);
            }
            if fresh {
                return Ok(c);
            }
        }
        let found = certs::read(engine, &heads, target)?;
        let mut issuers: Versions = Vec::new();
        for id in found.iter().filter_map(|c| c.issuer.as_deref()) {
            if let Some(v) = version(engine, "Organization", id)? {
                issuers.push((id.to_string(), v));
            }
        }
        if let Ok(mut m) = self.certs.lock() {
            keep(&mut m, target.to_string(), (held, issuers, found.clone()));
        }
        Ok(found)
    }
}
