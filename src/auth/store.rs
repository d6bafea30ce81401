//! Clients, user accounts and grants, kept as records on the ledger under internal types
//! (`_auth.Client`, `_auth.User`, `_auth.Grant`): encrypted, Merkle-covered and replicated like
//! resources, so a client registered, a grant revoked or a refresh token rotated on one node
//! holds on every node. They are not FHIR resources: no FHIR interaction reaches them, and
//! system history leaves internal types out.

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::{self, Json};
use crate::repo::Repo;

pub const CLIENT: &str = "_auth.Client";
pub const USER: &str = "_auth.User";
pub const GRANT: &str = "_auth.Grant";
/// Client-assertion `jti`s seen (not in [`INTERNAL_TYPES`]: looked up by id only, never listed).
pub const JTI: &str = "_auth.Jti";
/// Every internal record type (the search index folds them too: lookups go through it).
pub const INTERNAL_TYPES: &[&str] = &[CLIENT, USER, GRANT];
/// The actor the ledger records for the authorization server's own writes.
pub const ACTOR: &str = "fhir-ledger/auth";

pub fn is_internal(rtype: &str) -> bool {
    rtype.starts_with('_')
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Client {
    pub client_id: String,
    pub client_name: String,
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// `none`, `client_secret_basic` or `private_key_jwt`.
    pub token_endpoint_auth_method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The most this client may be granted; `None`: any scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Who the client acts for in consent decisions (`Organization/1`), if anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// A client that sees a patient's data only where one of the patient's Consents permits
    /// its actor, never by the server's default (another payer in a payer-to-payer transfer:
    /// confined to the members whose `$member-match` Consent names it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub consent_required: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct User {
    pub username: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// `Patient/1`, `Practitioner/2` or `RelatedPerson/3`.
    #[serde(rename = "fhirUser")]
    pub fhir_user: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Grant {
    pub client_id: String,
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "fhirUser")]
    pub fhir_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encounter: Option<String>,
    pub scope: String,
    /// `Consent/<id>` the patient's approval wrote, if the user was the patient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<String>,
    /// SHA-256 of the one live refresh token; rotated on every refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_sha256: Option<String>,
    /// Refresh tokens this grant issued before (reuse of one revokes the grant).
    #[serde(default)]
    pub rotated: u64,
    pub revoked: bool,
    pub created_s: i64,
}

/// A client assertion's `jti`, remembered on the ledger: the record's id is a digest of the
/// client and the `jti`, created with a create-only precondition, so a replay fails on every
/// node and after a restart. (User record ids: [`super::Auth::user_id`].)
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Jti {
    pub client_id: String,
    /// When the assertion expired (after which its `exp` refuses it anyway).
    pub exp_s: i64,
}

/// The id of the [`Jti`] record of `jti` of `client_id`.
pub fn jti_id(client_id: &str, jti: &str) -> String {
    super::sha256_hex(&format!("fhir-ledger jti\0{client_id}\0{jti}"))
}

/// A record as the JSON tree the repository stores.
pub fn to_json<T: Serialize>(v: &T) -> Result<Json, FhirError> {
    let text = serde_json::to_vec(v).map_err(FhirError::internal)?;
    json::parse(&text, usize::MAX).map_err(FhirError::internal)
}

/// A record and its version; `None` when absent or deleted.
pub fn get<T: for<'de> Deserialize<'de>>(repo: &Repo, rtype: &str, id: &str) -> Result<Option<(T, u64)>, FhirError> {
    if !crate::fhir::is_valid_id(id) {
        return Ok(None);
    }
    match repo.read(rtype, id) {
        Ok(s) => {
            let body = s.body.as_deref().unwrap_or("{}");
            let v = serde_json::from_str(body).map_err(FhirError::internal)?;
            Ok(Some((v, s.version)))
        }
        Err(e) if e.is_absent() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a record: created when `if_match` is `Some(0)` (and refused if it exists), else
/// replacing that version.
pub async fn put<T: Serialize>(
    repo: &Repo,
    rtype: &str,
    id: &str,
    value: &T,
    if_match: Option<u64>,
) -> Result<(), FhirError> {
    let body = to_json(value)?;
    repo.commit(&crate::repo::System::new(ACTOR), |plan| {
        if if_match == Some(0) {
            if plan.current(rtype, id)?.is_some_and(|c| !c.deleted) {
                return Err(FhirError::new(ErrorCode::Duplicate, format!("{id} exists already")));
            }
            plan.put(rtype, id, &body, None)?;
        } else {
            plan.put(rtype, id, &body, if_match)?;
        }
        Ok(())
    })
    .await?;
    Ok(())
}

pub async fn delete(repo: &Repo, rtype: &str, id: &str) -> Result<bool, FhirError> {
    let (deleted, _) =
        repo.commit(&crate::repo::System::new(ACTOR), |plan| Ok(plan.delete(rtype, id, None)?.is_some())).await?;
    Ok(deleted)
}

/// Every live record of an internal type (admin listings; there are few).
pub fn all<T: for<'de> Deserialize<'de>>(
    search: &crate::search::Engine,
    rtype: &str,
) -> Result<Vec<(String, T)>, FhirError> {
    let repo = search.repo();
    let idx = search.current()?;
    let ids = idx.of(rtype).ids()?;
    drop(idx);
    let mut out = Vec::new();
    for id in ids {
        if let Some((v, _)) = get(repo, rtype, &id)? {
            out.push((id, v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub fn hash_password(password: &str) -> Result<String, FhirError> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(FhirError::internal)
}

pub fn check_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}
