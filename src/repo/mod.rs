//! The FHIR repository: FHIR interactions expressed as ledger commands, and reads that
//! decrypt what the state machine holds.
//!
//! A write is *planned* against the local applied state: the plan decides ids, versions,
//! timestamps and keys, encrypts bodies, computes index terms, and records as preconditions
//! every fact it relied on (current versions, conditional-match results, absent keys). The
//! state machine re-checks those facts when it applies the command; if another write got
//! there first, the command is refused whole and the plan is simply made again.

pub mod body_cache;
pub mod criteria;
pub mod index;
pub mod interactions;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use consensus::{Command, CurrentRecord, IndexKey, Ledger, Op, Outcome, Precondition, StateView, Write};
use sha2::{Digest, Sha256};

use crate::crypto::{self, DataKey, Keyring};
use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::{self, Json};
use crate::fhir::profiles::Profiles;
use crate::fhir::refs::{split_reference, values_at};
use crate::fhir::searchparams::SearchParams;

/// Compartment for resources that belong to no patient.
pub const SHARED_COMPARTMENT: &str = "_shared";
/// Attempts before a write that keeps losing races gives up with 409.
const MAX_ATTEMPTS: usize = 64;

/// The authorization a plan is made under. Every version a plan writes or removes and every
/// conditional match passes through it, whatever the route (single request, conditional,
/// batch or transaction entry, PATCH, `$erase`), so no handler can write around it:
/// [`Repo::commit`] takes one. Implemented for a request's caller by `api::authz` and by
/// [`System`] for the server's own records.
pub trait Policy: Sync {
    /// The ledger actor of the writes.
    fn actor(&self) -> String;
    /// Whether the caller may see the live `rtype/id`: conditional criteria match only what
    /// the caller sees, so hidden resources are neither found nor counted.
    fn sees(&self, rtype: &str, id: &str) -> Result<bool, FhirError>;
    /// Checks a write of `new` (`None`: a delete) over `current` (`None`: nothing live), i.e.
    /// may the caller change what is there, and may it leave `new` there. A 404 means the
    /// current version is hidden from the caller (it answers as if missing).
    fn may_write(
        &self,
        rtype: &str,
        id: &str,
        current: Option<&CurrentRecord>,
        new: Option<&Json>,
    ) -> Result<(), FhirError>;
    /// Checks crypto-shredding the compartment of `Patient/{patient}`.
    fn may_erase(&self, patient: &str) -> Result<(), FhirError>;
}

/// The server writing its own records (the authorization server's clients, users and grants,
/// the disclosure log): permitted everything, recorded under its own actor name.
pub struct System(pub String);

impl System {
    pub fn new(actor: impl Into<String>) -> Self {
        Self(actor.into())
    }
}

impl Policy for System {
    fn actor(&self) -> String {
        self.0.clone()
    }
    fn sees(&self, _: &str, _: &str) -> Result<bool, FhirError> {
        Ok(true)
    }
    fn may_write(&self, _: &str, _: &str, _: Option<&CurrentRecord>, _: Option<&Json>) -> Result<(), FhirError> {
        Ok(())
    }
    fn may_erase(&self, _: &str) -> Result<(), FhirError> {
        Ok(())
    }
}

pub struct Repo {
    ledger: Ledger,
    /// This node's identity; signs the tree heads it publishes.
    signer: ed25519_dalek::SigningKey,
    view: StateView,
    keys: Keyring,
    index_key: [u8; 32],
    pub profiles: Arc<Profiles>,
    /// The equality terms the state machine keeps (conditional interactions, compartments).
    pub params: Arc<SearchParams>,
    bodies: body_cache::BodyCache,
}

/// A resource version as read back (or as just written).
#[derive(Debug, Clone)]
pub struct Stored {
    pub rtype: String,
    pub id: String,
    pub version: u64,
    pub last_updated_ms: i64,
    pub deleted: bool,
    pub leaf: Option<u64>,
    /// The resource as stored (compact JSON with server `id`/`meta`); `None` for a deletion.
    pub body: Option<String>,
    pub created: bool,
}

impl Stored {
    /// The stored JSON, to splice into a response without re-parsing.
    pub fn raw(&self) -> Option<Json> {
        self.body.clone().map(Json::Raw)
    }

    /// The stored resource as a tree (for patching or pretty printing).
    pub fn parsed(&self) -> Result<Option<Json>, FhirError> {
        self.body.as_deref().map(|b| json::parse(b.as_bytes(), usize::MAX).map_err(FhirError::internal)).transpose()
    }
}

impl Repo {
    pub fn new(
        ledger: Ledger,
        signer: ed25519_dalek::SigningKey,
        kek: DataKey,
        index_key: [u8; 32],
        profiles: Arc<Profiles>,
        params: Arc<SearchParams>,
        body_cache_bytes: usize,
    ) -> Self {
        let view = ledger.view();
        let bodies = body_cache::BodyCache::new(body_cache_bytes);
        Self { ledger, signer, view, keys: Keyring::new(kek), index_key, profiles, params, bodies }
    }

    /// The data key of `compartment`; `None` once it was erased (or never had one).
    pub fn data_key(&self, compartment: &str) -> Result<Option<DataKey>, FhirError> {
        self.compartment_key(compartment, &mut BTreeMap::new())
    }

    /// The version `cur` names as current: its record and plaintext; `None` when deleted or
    /// erased.
    pub fn current_version(
        &self,
        cur: &CurrentRecord,
    ) -> Result<Option<(consensus::VersionRecord, String)>, FhirError> {
        if cur.deleted {
            return Ok(None);
        }
        let Some(&leaf) = cur.leaves.last() else { return Ok(None) };
        let Some(rec) = self.view.record(leaf)? else { return Ok(None) };
        let op = rec.header.op.as_str();
        if op == Op::Delete.as_str() || op == Op::Erase.as_str() {
            return Ok(None);
        }
        Ok(self.decrypt(&rec)?.map(|body| (rec, body)))
    }

    pub fn view(&self) -> &StateView {
        &self.view
    }

    pub fn node_id(&self) -> u64 {
        self.ledger.node_id()
    }

    pub fn signer(&self) -> &ed25519_dalek::SigningKey {
        &self.signer
    }

    pub fn index_key(&self) -> &[u8; 32] {
        &self.index_key
    }

    pub async fn linearize(&self) -> Result<consensus::ReadPoint, FhirError> {
        self.ledger.linearize().await.map_err(FhirError::unavailable)
    }

    /// See [`consensus::Ledger::read_barrier`].
    pub async fn read_barrier(
        &self,
        max_stale: Option<std::time::Duration>,
    ) -> Result<consensus::ReadPoint, FhirError> {
        self.ledger.read_barrier(max_stale).await.map_err(FhirError::unavailable)
    }

    pub fn ledger(&self) -> &consensus::Ledger {
        &self.ledger
    }

    /// The current version; 404 if never written, 410 if deleted.
    pub fn read(&self, rtype: &str, id: &str) -> Result<Stored, FhirError> {
        let what = format!("{rtype}/{id}");
        let cur = self.view.current(rtype, id)?.ok_or_else(|| FhirError::not_found(&what))?;
        if cur.deleted {
            return Err(FhirError::gone(&what));
        }
        self.vread(rtype, id, cur.version)
    }

    /// The versions committed as Merkle leaves `leaves` (what a search matched), read without
    /// looking up current records; each compartment's key is fetched once. Large pages are
    /// read and decrypted on two threads.
    pub fn read_leaves(&self, leaves: &[u64]) -> Vec<Result<Stored, FhirError>> {
        const PARALLEL_FROM: usize = 128;
        let read = |part: &[u64]| -> Vec<Result<Stored, FhirError>> {
            let mut keys: BTreeMap<String, Option<DataKey>> = BTreeMap::new();
            part.iter().map(|&leaf| self.read_leaf(leaf, &mut keys)).collect()
        };
        if leaves.len() < PARALLEL_FROM {
            return read(leaves);
        }
        let (a, b) = leaves.split_at(leaves.len() / 2);
        std::thread::scope(|s| {
            let second = s.spawn(|| read(b));
            let mut out = read(a);
            match second.join() {
                Ok(rest) => out.extend(rest),
                Err(_) => out.extend(b.iter().map(|_| Err(FhirError::internal("reader thread panicked")))),
            }
            out
        })
    }

    /// The plaintext of each version among `leaves` (ascending) whose body can still be read
    /// (not a deletion, its compartment not erased), in leaf order, decrypted in one reused
    /// buffer and never cached: `f(leaf, plaintext)`. A Bulk export's files are
    /// made through this.
    pub fn for_each_plaintext(
        &self,
        leaves: &[u64],
        mut f: impl FnMut(u64, &[u8]) -> Result<(), FhirError>,
    ) -> Result<(), FhirError> {
        let mut keys: BTreeMap<String, Option<DataKey>> = BTreeMap::new();
        let mut failed = None;
        let mut aad = String::new();
        let walked = self.view.for_each_record(leaves, &mut |leaf, h, sealed| {
            if h.op == Op::Delete.as_str() || h.op == Op::Erase.as_str() {
                return Ok(());
            }
            let mut step = || -> Result<(), FhirError> {
                let Some(dek) = self.compartment_key(&h.compartment, &mut keys)? else { return Ok(()) };
                aad_into(&mut aad, &h.rtype, &h.id, h.version);
                let plain = crypto::open_in_place(&dek, sealed, aad.as_bytes()).map_err(FhirError::internal)?;
                f(leaf, plain)
            };
            step().map_err(|e| {
                failed = Some(e);
                std::io::Error::other("stopped by its reader")
            })
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(walked?),
        }
    }

    fn read_leaf(&self, leaf: u64, keys: &mut BTreeMap<String, Option<DataKey>>) -> Result<Stored, FhirError> {
        if let Some(hit) = self.bodies.get(leaf) {
            let (h, body) = (&hit.0, &hit.1);
            if self.compartment_key(&h.compartment, keys)?.is_some() {
                return Ok(Stored {
                    rtype: h.rtype.clone(),
                    id: h.id.clone(),
                    version: h.version,
                    last_updated_ms: h.last_updated_ms,
                    deleted: false,
                    leaf: Some(leaf),
                    body: Some(body.to_string()),
                    created: h.op == Op::Create.as_str(),
                });
            }
        }
        let rec = self.view.record(leaf)?.ok_or_else(|| FhirError::not_found(&format!("leaf {leaf}")))?;
        let h = &rec.header;
        let body = if h.op == Op::Delete.as_str() || h.op == Op::Erase.as_str() {
            None
        } else {
            match self.compartment_key(&h.compartment, keys)? {
                None => None,
                Some(dek) => {
                    let aad = aad(&h.rtype, &h.id, h.version);
                    let plain = crypto::open(&dek, &rec.body, aad.as_bytes()).map_err(FhirError::internal)?;
                    let text = String::from_utf8(plain).map_err(FhirError::internal)?;
                    self.bodies.put(leaf, Arc::new((h.clone(), Arc::from(text.as_str()))));
                    Some(text)
                }
            }
        };
        Ok(Stored {
            rtype: h.rtype.clone(),
            id: h.id.clone(),
            version: h.version,
            last_updated_ms: h.last_updated_ms,
            deleted: body.is_none(),
            leaf: Some(leaf),
            body,
            created: h.op == Op::Create.as_str(),
        })
    }

    /// The data key of a compartment, `None` once it was erased; looked up once per page
    /// (`keys` remembers the answers).
    pub(crate) fn compartment_key(
        &self,
        compartment: &str,
        keys: &mut BTreeMap<String, Option<DataKey>>,
    ) -> Result<Option<DataKey>, FhirError> {
        if let Some(k) = keys.get(compartment) {
            return Ok(*k);
        }
        let wrapped = self.view.data_key(compartment)?.unwrap_or_default();
        let k = if wrapped.is_empty() {
            None
        } else {
            Some(self.keys.unwrap(compartment, &wrapped).map_err(FhirError::internal)?)
        };
        keys.insert(compartment.to_string(), k);
        Ok(k)
    }

    pub fn vread(&self, rtype: &str, id: &str, version: u64) -> Result<Stored, FhirError> {
        let rec = self
            .view
            .version(rtype, id, version)?
            .ok_or_else(|| FhirError::not_found(&format!("{rtype}/{id}/_history/{version}")))?;
        // An erased version reads like a deleted one: its ciphertext stays (and its proof
        // verifies), but no key can open it any more.
        let op = rec.header.op.as_str();
        let body = if op == Op::Delete.as_str() || op == Op::Erase.as_str() { None } else { self.decrypt(&rec)? };
        let deleted = body.is_none();
        Ok(Stored {
            rtype: rtype.to_string(),
            id: id.to_string(),
            version,
            last_updated_ms: rec.header.last_updated_ms,
            deleted,
            leaf: Some(rec.leaf),
            body,
            created: rec.header.op == Op::Create.as_str(),
        })
    }

    /// The plaintext of a version; `None` once its compartment was erased.
    fn decrypt(&self, rec: &consensus::VersionRecord) -> Result<Option<String>, FhirError> {
        let h = &rec.header;
        let wrapped = self.view.data_key(&h.compartment)?.unwrap_or_default();
        if wrapped.is_empty() {
            return Ok(None);
        }
        let dek = self.keys.unwrap(&h.compartment, &wrapped).map_err(FhirError::internal)?;
        let plain =
            crypto::open(&dek, &rec.body, aad(&h.rtype, &h.id, h.version).as_bytes()).map_err(FhirError::internal)?;
        String::from_utf8(plain).map(Some).map_err(FhirError::internal)
    }

    /// The salt of a version's content commitment (what binds its plaintext to its leaf);
    /// `None` once its compartment was erased.
    pub fn content_salt(&self, h: &consensus::LeafHeader) -> Result<Option<[u8; 32]>, FhirError> {
        let Some(dek) = self.compartment_key(&h.compartment, &mut BTreeMap::new())? else { return Ok(None) };
        Ok(Some(crypto::content_salt(&dek, aad(&h.rtype, &h.id, h.version).as_bytes())))
    }

    /// [`Repo::content_salt`], each compartment's key looked up and its salter keyed once in
    /// `salts`.
    pub fn content_salt_in(
        &self,
        h: &consensus::LeafHeader,
        salts: &mut Salters,
    ) -> Result<Option<[u8; 32]>, FhirError> {
        if salts.last.as_ref().is_none_or(|(c, _)| **c != *h.compartment) {
            let salter = if let Some(s) = salts.by_compartment.get(h.compartment.as_str()) {
                s.clone()
            } else {
                let dek = self.compartment_key(&h.compartment, &mut BTreeMap::new())?;
                let s = dek.map(|k| crypto::Salter::new(&k));
                salts.by_compartment.insert(h.compartment.clone(), s.clone());
                s
            };
            salts.last = Some((h.compartment.clone(), salter));
        }
        let Some((_, Some(salter))) = &salts.last else { return Ok(None) };
        aad_into(&mut salts.aad, &h.rtype, &h.id, h.version);
        Ok(Some(salter.salt(salts.aad.as_bytes())))
    }

    /// Lookups of the decrypted-body cache, for `/metrics`.
    pub fn body_cache_lookups(&self) -> &crate::telemetry::HitRate {
        &self.bodies.lookups
    }

    /// Drops every decrypted body kept for search pages.
    pub fn clear_body_cache(&self) {
        self.bodies.clear();
    }

    /// Drops the cached key of an erased compartment from this process's memory.
    pub fn forget_key(&self, compartment: &str) {
        self.keys.forget(compartment);
        self.bodies.clear();
    }

    /// Plans with `build` and commits, re-planning when a precondition lost a race.
    pub async fn commit<T>(
        &self,
        policy: &dyn Policy,
        mut build: impl FnMut(&mut Plan<'_>) -> Result<T, FhirError>,
    ) -> Result<(T, Vec<Stored>), FhirError> {
        let actor = policy.actor();
        for attempt in 0..MAX_ATTEMPTS {
            let mut plan = Plan::new(self, policy);
            let value = build(&mut plan)?;
            if plan.writes.is_empty() {
                return Ok((value, plan.results));
            }
            let (cmd, mut results) = plan.finish(&actor);
            match self.ledger.submit(cmd).await.map_err(FhirError::unavailable)? {
                Outcome::Applied { leaves } => {
                    for (r, leaf) in results.iter_mut().zip(leaves) {
                        r.leaf = Some(leaf);
                    }
                    return Ok((value, results));
                }
                Outcome::Conflict { .. } => {
                    if attempt > 4 {
                        tokio::time::sleep(std::time::Duration::from_millis(attempt as u64)).await;
                    }
                }
                Outcome::Refused { reason } => return Err(FhirError::internal(reason)),
            }
        }
        Err(FhirError::new(ErrorCode::Conflict, "the resource is being changed by many clients at once; retry"))
    }

    /// The compartment whose data key encrypts this resource: the patient it belongs to.
    pub fn compartment_of(&self, rtype: &str, id: &str, res: &Json) -> String {
        if rtype == "Patient" {
            return format!("Patient/{id}");
        }
        if let Some(sp) = self.params.get(rtype, "patient") {
            for path in &sp.paths {
                for v in values_at(res, &path.elements) {
                    if let Some((t, pid)) = v.get("reference").and_then(Json::as_str).and_then(split_reference) {
                        if t == "Patient" {
                            return format!("Patient/{pid}");
                        }
                    }
                }
            }
        }
        SHARED_COMPARTMENT.to_string()
    }
}

fn aad(rtype: &str, id: &str, version: u64) -> String {
    let mut s = String::new();
    aad_into(&mut s, rtype, id, version);
    s
}

/// [`aad`] into a buffer a caller reuses (an export's files open every body).
fn aad_into(buf: &mut String, rtype: &str, id: &str, version: u64) {
    use std::fmt::Write as _;
    buf.clear();
    buf.extend([rtype, "/", id, "/"]);
    let _ = write!(buf, "{version}");
}

/// The content salters of the compartments a caller of [`Repo::content_salt_in`] met (`None`:
/// erased), the last one apart (versions come in runs of one patient's), and a buffer for
/// AADs.
#[derive(Default)]
pub struct Salters {
    by_compartment: BTreeMap<String, Option<crypto::Salter>>,
    last: Option<(String, Option<crypto::Salter>)>,
    aad: String,
}

/// Creates of a transaction planned on every core from this many on.
const CREATES_ON_EVERY_CORE: usize = 64;

/// A resource's new version made ready to write: its stored text, and the write that
/// carries it sealed, committed to and indexed.
struct Version {
    write: Write,
    text: String,
}

impl Version {
    #[allow(clippy::too_many_arguments)]
    fn seal(
        repo: &Repo,
        rtype: &str,
        id: &str,
        version: u64,
        now: i64,
        res: &Json,
        dek: &DataKey,
        compartment: &str,
    ) -> Self {
        let text = stored_json(res, id, version, now);
        let aad = aad(rtype, id, version);
        let body = crypto::seal(dek, text.as_bytes(), aad.as_bytes());
        let content_sha256 = consensus::content_commitment(&crypto::content_salt(dek, aad.as_bytes()), text.as_bytes());
        let index = index::resource_terms(&repo.index_key, &repo.params, rtype, res);
        let write = Write {
            rtype: rtype.into(),
            id: id.into(),
            version,
            op: Op::Create,
            last_updated_ms: now,
            compartment: compartment.into(),
            body,
            content_sha256,
            index,
        };
        Self { write, text }
    }
}

/// One command under construction. See the module docs.
pub struct Plan<'a> {
    repo: &'a Repo,
    policy: &'a dyn Policy,
    now: i64,
    preconditions: Vec<Precondition>,
    new_keys: BTreeMap<String, (DataKey, Vec<u8>)>,
    writes: Vec<Write>,
    touched: BTreeSet<(String, String)>,
    /// Compartments whose existing key this plan encrypts under (each pinned once).
    keys_used: BTreeSet<String>,
    results: Vec<Stored>,
}

impl<'a> Plan<'a> {
    fn new(repo: &'a Repo, policy: &'a dyn Policy) -> Self {
        Self {
            repo,
            policy,
            now: crate::fhir::now_ms(),
            preconditions: Vec::new(),
            new_keys: BTreeMap::new(),
            writes: Vec::new(),
            touched: BTreeSet::new(),
            keys_used: BTreeSet::new(),
            results: Vec::new(),
        }
    }

    pub fn repo(&self) -> &Repo {
        self.repo
    }

    /// How many versions this plan writes so far (the index the next write will get).
    pub fn results_len(&self) -> usize {
        self.results.len()
    }

    pub fn current(&self, rtype: &str, id: &str) -> Result<Option<CurrentRecord>, FhirError> {
        Ok(self.repo.view.current(rtype, id)?)
    }

    /// Live ids of `rtype` matching the criteria; the command will only apply if the match is
    /// still the same then (`_id` criteria are pinned by the candidates' current versions).
    pub fn matching(
        &mut self,
        rtype: &str,
        ids: &[Vec<String>],
        all_of: Vec<Vec<IndexKey>>,
    ) -> Result<Vec<String>, FhirError> {
        // The preconditions pin every match, hidden ones included (so `apply` re-checks the
        // same fact on every node); the caller is answered with what it may see.
        if ids.is_empty() {
            let found = criteria::match_terms(&self.repo.view, rtype, &all_of)?;
            self.preconditions.push(Precondition::Matches { rtype: rtype.to_string(), all_of, ids: found.clone() });
            return self.seen(rtype, found);
        }
        let mut named: Vec<&String> = ids.iter().flatten().collect();
        named.sort();
        named.dedup();
        for id in named {
            let current = self.repo.view.current(rtype, id)?.map_or(0, |c| c.version);
            self.preconditions.push(Precondition::Version { rtype: rtype.to_string(), id: id.clone(), current });
        }
        let found = criteria::match_ids(&self.repo.view, rtype, ids, &all_of)?;
        self.seen(rtype, found)
    }

    fn seen(&self, rtype: &str, ids: Vec<String>) -> Result<Vec<String>, FhirError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if self.policy.sees(rtype, &id)? {
                out.push(id);
            }
        }
        Ok(out)
    }

    fn touch(&mut self, rtype: &str, id: &str) -> Result<(), FhirError> {
        if !self.touched.insert((rtype.to_string(), id.to_string())) {
            return Err(FhirError::invalid(format!("{rtype}/{id} is changed twice in one transaction")));
        }
        Ok(())
    }

    fn data_key(&mut self, compartment: &str) -> Result<DataKey, FhirError> {
        if let Some((k, _)) = self.new_keys.get(compartment) {
            return Ok(*k);
        }
        if let Some(wrapped) = self.repo.view.data_key(compartment)? {
            if wrapped.is_empty() {
                return Err(FhirError::new(
                    ErrorCode::Gone,
                    format!("{compartment} was erased; its compartment accepts no new data"),
                ));
            }
            if self.keys_used.insert(compartment.to_string()) {
                let sha256 = Sha256::digest(&wrapped).into();
                self.preconditions.push(Precondition::KeyIs { compartment: compartment.to_string(), sha256 });
            }
            return self.repo.keys.unwrap(compartment, &wrapped).map_err(FhirError::internal);
        }
        let (k, wrapped) = self.repo.keys.new_data_key(compartment);
        self.preconditions.push(Precondition::KeyAbsent { compartment: compartment.to_string() });
        self.new_keys.insert(compartment.to_string(), (k, wrapped));
        Ok(k)
    }

    /// Stores a new version of `rtype/id` (creating it if absent or deleted). `if_match`, when
    /// given, must equal the current version (412 otherwise).
    pub fn put(&mut self, rtype: &str, id: &str, res: &Json, if_match: Option<u64>) -> Result<Stored, FhirError> {
        let cur = self.current(rtype, id)?;
        self.put_over(rtype, id, res, if_match, cur.as_ref())
    }

    /// Creates `rtype/id` under an id this server just generated (a random UUID), skipping the
    /// lookup; the `Version { current: 0 }` precondition still guards it in `apply`.
    pub fn put_new(&mut self, rtype: &str, id: &str, res: &Json) -> Result<Stored, FhirError> {
        self.put_over(rtype, id, res, None, None)
    }

    /// Creates many resources under ids this server just generated (a transaction's POSTs),
    /// planned as [`Plan::put_new`] one after another would plan them: what decides whether
    /// each may be written (its place in the transaction, the policy, its compartment's key)
    /// in order, then the bodies made, sealed, committed to and indexed on every core (most
    /// of an import's planning, on one core before). An error names the position in `items`
    /// of the first resource refused.
    pub fn put_new_all(&mut self, items: &[(&str, &str, &Json)]) -> Result<(), (usize, FhirError)> {
        let mut keys = Vec::with_capacity(items.len());
        for (at, &(rtype, id, res)) in items.iter().enumerate() {
            keys.push(self.admit(rtype, id, res, None, None).map_err(|e| (at, e))?);
        }
        let (repo, now) = (self.repo, self.now);
        let seal = |at: &usize| {
            let (rtype, id, res) = items[*at];
            let (compartment, dek) = &keys[*at];
            Version::seal(repo, rtype, id, 1, now, res, dek, compartment)
        };
        let places: Vec<usize> = (0..items.len()).collect();
        let sealed: Vec<Version> = if items.len() < CREATES_ON_EVERY_CORE {
            places.iter().map(seal).collect()
        } else {
            crate::parallel::on_every_core(&places, seal)
                .into_iter()
                .map(|v| v.ok_or_else(|| (0, FhirError::internal("a thread sealing new versions failed"))))
                .collect::<Result<_, _>>()?
        };
        for version in sealed {
            self.record(version, false);
        }
        Ok(())
    }

    fn put_over(
        &mut self,
        rtype: &str,
        id: &str,
        res: &Json,
        if_match: Option<u64>,
        cur: Option<&CurrentRecord>,
    ) -> Result<Stored, FhirError> {
        let (compartment, dek) = self.admit(rtype, id, res, if_match, cur)?;
        let live = cur.is_some_and(|c| !c.deleted);
        let version = cur.map_or(0, |c| c.version) + 1;
        let sealed = Version::seal(self.repo, rtype, id, version, self.now, res, &dek, &compartment);
        Ok(self.record(sealed, live).clone())
    }

    /// Whether `rtype/id` may take a new version over `cur`: once in this plan, by the
    /// policy, and under `if_match`; the compartment it goes in and that compartment's key.
    fn admit(
        &mut self,
        rtype: &str,
        id: &str,
        res: &Json,
        if_match: Option<u64>,
        cur: Option<&CurrentRecord>,
    ) -> Result<(String, DataKey), FhirError> {
        self.touch(rtype, id)?;
        let current = cur.map_or(0, |c| c.version);
        let live = cur.is_some_and(|c| !c.deleted);
        self.policy.may_write(rtype, id, cur.filter(|c| !c.deleted), Some(res))?;
        if let Some(expected) = if_match {
            if !live || expected != current {
                return Err(FhirError::precondition(format!(
                    "If-Match expected version {expected} of {rtype}/{id}, but the current version is {}",
                    if live { current.to_string() } else { "absent".into() }
                )));
            }
        }
        let compartment = self.repo.compartment_of(rtype, id, res);
        let dek = self.data_key(&compartment)?;
        Ok((compartment, dek))
    }

    /// Adds a sealed version (over a live one: an update) to the plan; its result.
    fn record(&mut self, v: Version, over_live: bool) -> &Stored {
        let Version { write, text } = v;
        self.preconditions.push(Precondition::Version {
            rtype: write.rtype.clone(),
            id: write.id.clone(),
            current: write.version - 1,
        });
        self.results.push(Stored {
            rtype: write.rtype.clone(),
            id: write.id.clone(),
            version: write.version,
            last_updated_ms: write.last_updated_ms,
            deleted: false,
            leaf: None,
            body: Some(text),
            created: !over_live,
        });
        self.writes.push(Write { op: if over_live { Op::Update } else { Op::Create }, ..write });
        let last = self.results.len() - 1;
        &self.results[last]
    }

    /// Logically deletes `rtype/id`; `Ok(None)` if there was nothing live to delete.
    pub fn delete(&mut self, rtype: &str, id: &str, if_match: Option<u64>) -> Result<Option<Stored>, FhirError> {
        self.touch(rtype, id)?;
        let cur = self.current(rtype, id)?;
        // A resource hidden from the caller is deleted exactly like a missing one: not at all.
        let hidden = |c: &CurrentRecord| match self.policy.may_write(rtype, id, Some(c), None) {
            Err(e) if e.status() == 404 => Ok(true),
            other => other.map(|()| false),
        };
        let cur = match cur.filter(|c| !c.deleted) {
            Some(c) if !hidden(&c)? => Some(c),
            _ => None,
        };
        let Some(cur) = cur else {
            if if_match.is_some() {
                return Err(FhirError::precondition(format!("{rtype}/{id} does not exist")));
            }
            return Ok(None);
        };
        if if_match.is_some_and(|v| v != cur.version) {
            return Err(FhirError::precondition(format!(
                "If-Match does not match the current version {} of {rtype}/{id}",
                cur.version
            )));
        }
        Ok(Some(self.remove(rtype, id, cur.version, Op::Delete, String::new())))
    }

    /// Plans a version that removes `rtype/id` (a delete or an erase) over version `current`.
    fn remove(&mut self, rtype: &str, id: &str, current: u64, op: Op, compartment: String) -> Stored {
        let version = current + 1;
        self.preconditions.push(Precondition::Version { rtype: rtype.into(), id: id.into(), current });
        let last_updated_ms = self.now;
        self.writes.push(Write {
            rtype: rtype.into(),
            id: id.into(),
            version,
            op,
            last_updated_ms,
            compartment,
            body: Vec::new(),
            content_sha256: [0; 32],
            index: Vec::new(),
        });
        let stored = Stored {
            rtype: rtype.into(),
            id: id.into(),
            version,
            last_updated_ms,
            deleted: true,
            leaf: None,
            body: None,
            created: false,
        };
        self.results.push(stored.clone());
        stored
    }

    /// Erases the compartment of `Patient/id` (crypto-shredding): every resource whose newest
    /// version lies in it is deleted and the compartment's data key destroyed, in one command.
    /// Every version stays in the ledger as ciphertext that no key opens, with valid proofs.
    pub fn erase(&mut self, id: &str) -> Result<Vec<Stored>, FhirError> {
        self.policy.may_erase(id)?;
        let compartment = format!("Patient/{id}");
        match self.repo.view.data_key(&compartment)? {
            None => return Err(FhirError::not_found(&compartment)),
            Some(w) if w.is_empty() => return Ok(Vec::new()),
            Some(_) => {}
        }
        let mut members = self.repo.view.compartment_members(&compartment)?;
        if !members.iter().any(|(t, i)| t == "Patient" && i == id) {
            // The Patient itself always gets an erase version (deleted, or never written and
            // only referenced): it records the erasure under the patient's own id.
            members.push(("Patient".to_string(), id.to_string()));
        }
        let mut erased = Vec::new();
        for (rtype, rid) in members {
            self.touch(&rtype, &rid)?;
            let cur = self.current(&rtype, &rid)?;
            if rtype != "Patient" && cur.as_ref().is_none_or(|c| c.deleted) {
                continue;
            }
            let current = cur.map_or(0, |c| c.version);
            erased.push(self.remove(&rtype, &rid, current, Op::Erase, compartment.clone()));
        }
        Ok(erased)
    }

    fn finish(self, actor: &str) -> (Command, Vec<Stored>) {
        let cmd = Command {
            actor: actor.to_string(),
            preconditions: self.preconditions,
            new_keys: self.new_keys.into_iter().map(|(c, (_, w))| (c, w)).collect(),
            writes: self.writes,
        };
        (cmd, self.results)
    }
}

/// The stored form of `res`: `resourceType`, `id` and `meta` first with the server-managed
/// fields set, every other element (and other `meta` members such as `profile` or `tag`)
/// exactly as sent. Written straight from the borrowed tree, without copying it.
pub fn stored_json(res: &Json, id: &str, version: u64, now_ms: i64) -> String {
    let members: &[(String, Json)] = res.as_object().map_or(&[], Vec::as_slice);
    let mut meta: Vec<(String, Json)> = vec![
        ("versionId".to_string(), Json::String(version.to_string())),
        ("lastUpdated".to_string(), Json::String(crate::fhir::instant(now_ms))),
    ];
    if let Some(Json::Object(m)) = res.get("meta") {
        meta.extend(m.iter().filter(|(k, _)| k != "versionId" && k != "lastUpdated").cloned());
    }
    let mut out = String::with_capacity(256);
    out.push('{');
    if let Some(t) = res.get("resourceType") {
        out.push_str("\"resourceType\":");
        t.write_compact(&mut out);
        out.push(',');
    }
    out.push_str("\"id\":");
    Json::String(id.to_string()).write_compact(&mut out);
    out.push_str(",\"meta\":");
    Json::Object(meta).write_compact(&mut out);
    for (k, v) in members.iter().filter(|(k, _)| !matches!(k.as_str(), "resourceType" | "id" | "meta")) {
        out.push(',');
        Json::String(k.clone()).write_compact(&mut out);
        out.push(':');
        v.write_compact(&mut out);
    }
    out.push('}');
    out
}
