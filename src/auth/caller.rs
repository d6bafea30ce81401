//! From a bearer token to a [`Caller`]: signature, issuer, audience and times checked (once
//! per token, then cached), and on every request the grant, the patient's Consent and the
//! client still live on the ledger, so a revocation stops the token on the next request.

use std::sync::{Arc, PoisonError};

use serde_json::Value;

use super::jose::{self, Alg};
use super::scopes::{self, Context, Perm, ResourceScope};
use super::store::{self, Client, Grant};
use super::Auth;
use crate::consent::research::Standing;
use crate::error::{ErrorCode, FhirError};
use crate::repo::Repo;

/// The caller recorded in the ledger when authorization is off.
pub const ANONYMOUS: &str = "anonymous";

/// What a verified access token says.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    pub sub: String,
    pub client_id: String,
    pub scope: String,
    pub exp: i64,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub fhir_user: Option<String>,
    pub grant: Option<String>,
    pub consent: Option<String>,
    /// Set for tokens of an external issuer (their grants live elsewhere).
    pub external: bool,
    pub scopes: Arc<Vec<ResourceScope>>,
}

/// Who is calling, with what rights. Built for every FHIR request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub claims: Arc<Claims>,
    /// The token's resource scopes, parsed once per token.
    pub scopes: Arc<Vec<ResourceScope>>,
    /// `Practitioner/1` etc., parsed from `fhirUser`.
    pub user: Option<(String, String)>,
    /// The registered client's actor (`Organization/1`), for consent decisions.
    pub client_actor: Option<String>,
    /// The client reads a patient's data only where a Consent of the patient permits it.
    pub consent_required: bool,
    pub client_name: String,
    /// `X-Purpose-Of-Use` (v3 ActReason code), when the caller states one.
    pub purpose: Option<String>,
    /// Whether the caller reads for a study (see `consent::research`).
    pub research: Standing,
    /// The study's de-identification, when it receives de-identified data only.
    pub deidentify: Option<Arc<crate::fhir::deid::Rules>>,
    /// Authorization off: everything is permitted and nothing is logged.
    pub unrestricted: bool,
}

const LEEWAY_S: i64 = 30;

/// The ledger actor of writes made with the node's admin token.
pub const ADMINISTRATOR: &str = "administrator";

pub fn unauthorized(why: impl Into<String>) -> FhirError {
    FhirError::new(ErrorCode::InvalidToken, why.into())
}

pub fn forbidden(why: impl Into<String>) -> FhirError {
    FhirError::forbidden(why.into())
}

impl Caller {
    pub fn unrestricted() -> Self {
        Self {
            claims: Arc::new(Claims { sub: "anonymous".into(), client_id: "anonymous".into(), ..Default::default() }),
            scopes: Arc::new(Vec::new()),
            user: None,
            client_actor: None,
            consent_required: false,
            client_name: String::new(),
            purpose: None,
            research: Standing::Clinical,
            deidentify: None,
            unrestricted: true,
        }
    }

    /// The holder of the node's admin token, on the paths where it counts (ledger audit,
    /// `$erase`).
    pub fn administrator() -> Self {
        Self {
            claims: Arc::new(Claims {
                sub: ADMINISTRATOR.into(),
                client_id: ADMINISTRATOR.into(),
                ..Default::default()
            }),
            ..Self::unrestricted()
        }
    }

    /// A study's team reading for it (`HRESCH`, `user/*.rs`): what the server acts as when it
    /// works for a study with authorization off (a data lock holds what the study may see).
    pub fn for_study(study: &str) -> Self {
        Self {
            claims: Arc::new(Claims { sub: "study".into(), client_id: format!("study:{study}"), ..Default::default() }),
            scopes: Arc::new(scopes::resource_scopes("user/*.rs")),
            purpose: Some(crate::consent::research::RESEARCH.to_string()),
            research: Standing::Study(study.to_string()),
            unrestricted: false,
            ..Self::unrestricted()
        }
    }

    /// A caller with no rights: what a handler sees where no authentication ran.
    pub fn nobody() -> Self {
        Self {
            claims: Arc::new(Claims { sub: "nobody".into(), client_id: "nobody".into(), ..Default::default() }),
            unrestricted: false,
            ..Self::unrestricted()
        }
    }

    /// The ledger actor of this caller's writes.
    pub fn actor(&self) -> String {
        if self.unrestricted {
            if self.claims.client_id == ADMINISTRATOR {
                return ADMINISTRATOR.to_string();
            }
            return ANONYMOUS.to_string();
        }
        match &self.claims.fhir_user {
            Some(u) => format!("{u} via {}", self.claims.client_id),
            None => format!("client:{}", self.claims.client_id),
        }
    }

    /// The launch patient of `patient/` scopes.
    pub fn patient(&self) -> Option<&str> {
        self.claims.patient.as_deref()
    }

    /// Whether the user is this patient (a patient reading their own record).
    pub fn is_patient(&self, id: &str) -> bool {
        self.user.as_ref().is_some_and(|(t, u)| t == "Patient" && u == id)
    }

    /// The scopes that grant `perm` on `rtype`.
    pub fn covering<'a>(&'a self, rtype: &'a str, perm: Perm) -> impl Iterator<Item = &'a ResourceScope> + 'a {
        self.scopes.iter().filter(move |s| s.covers(rtype) && s.allows(perm))
    }

    /// 403 unless some scope grants `perm` on `rtype`.
    pub fn require(&self, rtype: &str, perm: Perm) -> Result<(), FhirError> {
        if self.unrestricted || self.covering(rtype, perm).next().is_some() {
            return Ok(());
        }
        Err(forbidden(format!(
            "the access token's scopes do not permit '{}' on {rtype} (granted: {})",
            perm.letter(),
            if self.claims.scope.is_empty() { "none" } else { &self.claims.scope }
        )))
    }

    /// Whether the caller may read the ledger's leaf headers (which name every resource,
    /// compartment and actor): an administrator, or a backend service whose scopes read every
    /// type without restriction.
    pub fn may_audit(&self) -> bool {
        self.unrestricted
            || self
                .scopes
                .iter()
                .any(|s| s.context == Context::System && s.rtype == "*" && s.query.is_empty() && s.allows(Perm::R))
    }
}

fn str_claim(c: &serde_json::Map<String, Value>, k: &str) -> Option<String> {
    c.get(k).and_then(Value::as_str).map(str::to_string)
}

fn int_claim(c: &serde_json::Map<String, Value>, k: &str) -> Option<i64> {
    c.get(k).and_then(Value::as_i64)
}

/// Checks `exp`, `nbf`, `iss` and `aud` of verified claims.
fn check_times_and_parties(c: &serde_json::Map<String, Value>, iss: &str, aud: &str) -> Result<(), String> {
    let now = super::now_s();
    let exp = int_claim(c, "exp").ok_or("the token has no exp")?;
    if exp + LEEWAY_S < now {
        return Err("the token has expired".into());
    }
    if int_claim(c, "nbf").or(int_claim(c, "iat")).is_some_and(|nbf| nbf - LEEWAY_S > now) {
        return Err("the token is not valid yet".into());
    }
    if str_claim(c, "iss").as_deref() != Some(iss) {
        return Err(format!("the token's issuer is not {iss}"));
    }
    let aud_ok = match c.get("aud") {
        Some(Value::String(a)) => a.trim_end_matches('/') == aud,
        Some(Value::Array(a)) => a.iter().any(|x| x.as_str().is_some_and(|x| x.trim_end_matches('/') == aud)),
        _ => false,
    };
    if !aud_ok {
        return Err(format!("the token's audience is not {aud}"));
    }
    Ok(())
}

impl Auth {
    /// Verifies an access token (ours or an external issuer's) into claims.
    pub async fn verify_token(&self, token: &str) -> Result<Arc<Claims>, String> {
        let (hit, digest) = self.cached(token);
        if let Some(c) = hit {
            if c.exp + LEEWAY_S < super::now_s() {
                return Err("the token has expired".into());
            }
            return Ok(c);
        }
        // The unverified issuer only picks the key; every claim used below is a verified one.
        let peeked = jose::peek(token)?;
        let iss = peeked.str_claim("iss").unwrap_or("").to_string();
        let claims = if iss == self.public_url {
            if peeked.kid().is_some_and(|k| k != self.access_kid) {
                return Err("the token was signed with a key this server does not have".into());
            }
            let c = &jose::verify(token, &jose::PublicKey::ed25519(&self.access_public()), &[Alg::EdDSA])?;
            check_times_and_parties(c, &self.public_url, &self.public_url)?;
            Claims {
                sub: str_claim(c, "sub").unwrap_or_default(),
                client_id: str_claim(c, "client_id").ok_or("the token has no client_id")?,
                scope: str_claim(c, "scope").unwrap_or_default(),
                exp: int_claim(c, "exp").unwrap_or(0),
                patient: str_claim(c, "patient"),
                encounter: str_claim(c, "encounter"),
                fhir_user: str_claim(c, "fhirUser"),
                grant: str_claim(c, "grant"),
                consent: str_claim(c, "consent"),
                external: false,
                scopes: Arc::default(),
            }
        } else if let Some(ext) = self.external.iter().find(|e| e.issuer == iss) {
            let jwks = self.external_jwks(ext).await?;
            let key = jose::key_in_jwks(&jwks, peeked.kid())?;
            let c = &jose::verify(token, &key, &[Alg::RS256, Alg::RS384, Alg::ES384, Alg::EdDSA])?;
            check_times_and_parties(c, &ext.issuer, ext.audience.as_deref().unwrap_or(&self.public_url))?;
            Claims {
                sub: str_claim(c, "sub").unwrap_or_default(),
                client_id: str_claim(c, &ext.client_claim).unwrap_or_else(|| format!("external:{}", ext.issuer)),
                scope: str_claim(c, &ext.scope_claim).unwrap_or_default(),
                exp: int_claim(c, "exp").unwrap_or(0),
                patient: str_claim(c, &ext.patient_claim),
                encounter: None,
                fhir_user: str_claim(c, &ext.fhir_user_claim),
                grant: None,
                consent: None,
                external: true,
                scopes: Arc::default(),
            }
        } else {
            return Err(format!("the token's issuer {iss:?} is not trusted here"));
        };
        let claims = Arc::new(Claims { scopes: Arc::new(scopes::resource_scopes(&claims.scope)), ..claims });
        self.remember(digest, claims.clone());
        Ok(claims)
    }

    async fn external_jwks(&self, ext: &crate::config::ExternalIssuer) -> Result<Value, String> {
        if let Some(k) = self.external_keys.lock().unwrap_or_else(PoisonError::into_inner).get(&ext.issuer) {
            return Ok(k.clone());
        }
        let jwks: Value = reqwest::Client::new()
            .get(&ext.jwks_url)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("fetching {}: {e}", ext.jwks_url))?
            .json()
            .await
            .map_err(|e| format!("reading {}: {e}", ext.jwks_url))?;
        self.external_keys.lock().unwrap_or_else(PoisonError::into_inner).insert(ext.issuer.clone(), jwks.clone());
        Ok(jwks)
    }

    /// The caller behind `Authorization: Bearer …`: 401 for a missing, bad or revoked token.
    pub async fn caller(
        &self,
        search: &Arc<crate::search::Engine>,
        authorization: Option<&str>,
        purpose: Option<&str>,
        study: Option<&str>,
    ) -> Result<Caller, FhirError> {
        if !self.enabled {
            return Ok(Caller::unrestricted());
        }
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or_else(|| {
                FhirError::new(
                    ErrorCode::Unauthenticated,
                    "this server needs an access token: Authorization: Bearer <token>",
                )
            })?;
        let claims = self.verify_token(token).await.map_err(unauthorized)?;
        let mut client_actor = None;
        let mut consent_required = false;
        let mut client_name = claims.client_id.clone();
        if !claims.external {
            // The index is folded up to everything applied (the middleware passed the read
            // barrier), so a revocation anywhere in the cluster is seen here.
            let repo = search.repo();
            crate::search::index::catch_up(search).await?;
            let idx = search.current()?;
            let client: Arc<Client> = self
                .records
                .get(repo, &idx, store::CLIENT, &claims.client_id)?
                .ok_or_else(|| unauthorized("the token's client is no longer registered"))?;
            client_actor.clone_from(&client.actor);
            consent_required = client.consent_required;
            client_name.clone_from(&client.client_name);
            if let Some(g) = &claims.grant {
                let grant: Option<Arc<Grant>> = self.grants.get(repo, &idx, store::GRANT, g)?;
                if grant.is_none_or(|g| g.revoked) {
                    return Err(unauthorized("the token's grant has been revoked"));
                }
            }
            if let Some(c) = &claims.consent {
                let id = c.strip_prefix("Consent/").unwrap_or(c);
                if !consent_active(&idx, id) {
                    return Err(unauthorized(format!(
                        "the patient's {c} that this token rests on is no longer active"
                    )));
                }
            }
        }
        let user = claims.fhir_user.as_deref().and_then(|u| {
            let (t, id) = u.rsplit_once('/')?;
            let t = t.rsplit('/').next()?;
            Some((t.to_string(), id.to_string()))
        });
        let purpose = purpose.map(|p| p.trim().to_string()).filter(|p| !p.is_empty());
        let mut actors: Vec<String> = user.iter().map(|(t, id)| format!("{t}/{id}")).collect();
        actors.extend(client_actor.iter().cloned());
        actors.push(format!("client:{}", claims.client_id));
        let book = {
            let idx = search.current()?;
            self.books.get(search.repo(), &idx)?
        };
        let research = book
            .research
            .standing(&actors, purpose.as_deref(), study.map(str::trim))
            .map_err(|why| FhirError::new(ErrorCode::Invalid, why))?;
        let deidentify = match &research {
            Standing::Study(s) => book.research.deidentify(s),
            _ => None,
        };
        Ok(Caller {
            scopes: claims.scopes.clone(),
            claims,
            user,
            client_actor,
            consent_required,
            client_name,
            purpose,
            research,
            deidentify,
            unrestricted: false,
        })
    }
}

/// A grant Consent holds while it is active and within its period (read from its search
/// index document: `status` and `period`, the provision's period).
pub(crate) fn consent_active(idx: &crate::search::index::Index, id: &str) -> bool {
    use crate::search::values::Value as V;
    // A lookup that fails denies, as an inactive grant does.
    let Ok(Some((_, doc))) = idx.of("Consent").doc(id) else { return false };
    let active = doc.get("status").iter().any(|v| matches!(v, V::Token { code: Some(c), .. } if c == "active"));
    let now = crate::fhir::now_ms();
    let in_period = doc.get("period").iter().all(|v| match v {
        V::Date { lo, hi } => lo <= &now && &now < hi,
        _ => true,
    });
    active && in_period
}

/// Ledger records by id, parsed once per version: the index says which version is current.
pub struct Records<T> {
    cache: std::sync::Mutex<std::collections::HashMap<String, (u64, Arc<T>)>>,
}

impl<T> Default for Records<T> {
    fn default() -> Self {
        Self { cache: std::sync::Mutex::new(std::collections::HashMap::new()) }
    }
}

impl<T: serde::de::DeserializeOwned> Records<T> {
    pub fn get(
        &self,
        repo: &Repo,
        idx: &crate::search::index::Index,
        rtype: &str,
        id: &str,
    ) -> Result<Option<Arc<T>>, FhirError> {
        let Some((_, doc)) = idx.of(rtype).doc(id)? else { return Ok(None) };
        if let Some((v, t)) = self.cache.lock().unwrap_or_else(PoisonError::into_inner).get(id) {
            if *v == doc.version {
                return Ok(Some(t.clone()));
            }
        }
        let s = repo.vread(rtype, id, doc.version)?;
        let Some(body) = s.body.as_deref() else { return Ok(None) };
        let t: Arc<T> = Arc::new(serde_json::from_str(body).map_err(FhirError::internal)?);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() > 100_000 {
            cache.clear();
        }
        cache.insert(id.to_string(), (doc.version, t.clone()));
        Ok(Some(t))
    }
}
