//! SMART scopes, v1 (`patient/Observation.read`) and v2 (`patient/Observation.rs`,
//! `user/*.cruds`, `patient/Observation.rs?category=laboratory`), parsed into what they
//! permit: a context (patient, user, system), a resource type or `*`, a set of permissions
//! and an optional query that narrows what they cover.

/// One permission of SMART v2: create, read, update, delete, search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    C,
    R,
    U,
    D,
    S,
}

impl Perm {
    fn bit(self) -> u8 {
        match self {
            Perm::C => 1,
            Perm::R => 2,
            Perm::U => 4,
            Perm::D => 8,
            Perm::S => 16,
        }
    }

    pub fn letter(self) -> char {
        match self {
            Perm::C => 'c',
            Perm::R => 'r',
            Perm::U => 'u',
            Perm::D => 'd',
            Perm::S => 's',
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Context {
    Patient,
    User,
    System,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceScope {
    pub context: Context,
    /// A resource type, or `*`.
    pub rtype: String,
    perms: u8,
    /// v2 query restriction: `(name, value)` pairs every covered resource must match.
    pub query: Vec<(String, String)>,
}

impl ResourceScope {
    pub fn allows(&self, p: Perm) -> bool {
        self.perms & p.bit() != 0
    }

    pub fn covers(&self, rtype: &str) -> bool {
        self.rtype == "*" || self.rtype == rtype
    }
}

/// A granted scope string, parsed. Identity and launch scopes are kept as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Resource(ResourceScope),
    Other(String),
}

/// The scopes that are not about resources: identity, launch context, refresh.
pub const IDENTITY_AND_LAUNCH: &[&str] = &[
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "launch/patient",
    "launch/encounter",
    "offline_access",
    "online_access",
];

/// Parses one scope; `Err` says why it is not one this server knows.
pub fn parse(s: &str) -> Result<Scope, String> {
    if IDENTITY_AND_LAUNCH.contains(&s) {
        return Ok(Scope::Other(s.to_string()));
    }
    let (ctx, rest) = s.split_once('/').ok_or_else(|| format!("scope {s:?} is not a SMART scope"))?;
    let context = match ctx {
        "patient" => Context::Patient,
        "user" => Context::User,
        "system" => Context::System,
        _ => return Err(format!("scope {s:?}: unknown context {ctx:?} (patient, user or system)")),
    };
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (rtype, action) = main.rsplit_once('.').ok_or_else(|| format!("scope {s:?} has no .permissions"))?;
    if rtype.is_empty() || !(rtype == "*" || rtype.chars().all(|c| c.is_ascii_alphanumeric())) {
        return Err(format!("scope {s:?}: {rtype:?} is not a resource type or *"));
    }
    let perms = match action {
        "read" => Perm::R.bit() | Perm::S.bit(),
        "write" => Perm::C.bit() | Perm::U.bit() | Perm::D.bit(),
        "*" => 31,
        v2 => {
            // v2: a non-empty subsequence of "cruds", in that order.
            let mut bits = 0;
            let mut last = None;
            for ch in v2.chars() {
                let (i, p) = match ch {
                    'c' => (0, Perm::C),
                    'r' => (1, Perm::R),
                    'u' => (2, Perm::U),
                    'd' => (3, Perm::D),
                    's' => (4, Perm::S),
                    _ => return Err(format!("scope {s:?}: {v2:?} is neither read/write/* nor a subset of cruds")),
                };
                if last.is_some_and(|l| l >= i) {
                    return Err(format!("scope {s:?}: permissions must be in the order c r u d s"));
                }
                last = Some(i);
                bits |= p.bit();
            }
            bits
        }
    };
    if query.is_some() && matches!(action, "read" | "write" | "*") {
        return Err(format!("scope {s:?}: query restrictions need v2 permissions"));
    }
    let query = query.map(crate::codec::parse_query).unwrap_or_default();
    Ok(Scope::Resource(ResourceScope { context, rtype: rtype.to_string(), perms, query }))
}

/// Every scope of a space-separated list; unknown ones are an error naming them.
pub fn parse_all(list: &str) -> Result<Vec<Scope>, String> {
    list.split_whitespace().map(parse).collect()
}

/// The resource scopes of a granted list (unknown strings were refused at grant time).
pub fn resource_scopes(list: &str) -> Vec<ResourceScope> {
    list.split_whitespace()
        .filter_map(|s| match parse(s) {
            Ok(Scope::Resource(r)) => Some(r),
            _ => None,
        })
        .collect()
}

/// Whether `requested` is within `ceiling` (a client's registered scopes): a resource scope
/// is within when one ceiling scope of the same context covers its type and every permission
/// (and is unrestricted, or restricted the same way).
pub fn within(requested: &Scope, ceiling: &[Scope]) -> bool {
    match requested {
        Scope::Other(s) => ceiling.iter().any(|c| matches!(c, Scope::Other(o) if o == s)),
        Scope::Resource(r) => ceiling.iter().any(|c| match c {
            Scope::Resource(c) => {
                c.context == r.context
                    && (c.rtype == "*" || c.rtype == r.rtype)
                    && (c.perms & r.perms) == r.perms
                    && (c.query.is_empty() || c.query == r.query)
            }
            Scope::Other(_) => false,
        }),
    }
}

/// What kind of user a signed-in person is (from their `fhirUser`), for the scopes they may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserKind {
    Patient,
    RelatedPerson,
    /// A Practitioner or PractitionerRole: a clinician.
    Practitioner,
    /// Any other fhirUser (none can be registered today): identity scopes only.
    Other,
}

impl UserKind {
    pub fn of(fhir_user: &str) -> Self {
        match fhir_user.split_once('/').map(|(t, _)| t) {
            Some("Patient") => UserKind::Patient,
            Some("RelatedPerson") => UserKind::RelatedPerson,
            Some("Practitioner" | "PractitionerRole") => UserKind::Practitioner,
            _ => UserKind::Other,
        }
    }
}

/// Who a grant is for, when deciding which scopes it may carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A signed-in user of this kind (the authorization-code flow).
    User(UserKind),
    /// Some user not yet known (the authorize request, before sign-in): anything but `system/`.
    AnyUser,
    /// A backend client (client_credentials): `system/` scopes only.
    Backend,
}

/// The identity, launch and refresh scopes a patient or related person may hold.
const PATIENT_SIDE: &[&str] =
    &["openid", "fhirUser", "profile", "launch", "launch/patient", "offline_access", "online_access"];

/// Whether `holder` may be granted `scope`: `patient/` scopes to every user (for a patient
/// context the flow checks: themself, a linked patient, or any patient for a clinician),
/// `user/` scopes to practitioners only, `system/` scopes to backend clients only.
pub fn may_hold(holder: Holder, scope: &Scope) -> bool {
    match (holder, scope) {
        (Holder::Backend, Scope::Resource(r)) => r.context == Context::System,
        (Holder::Backend, Scope::Other(_)) => false,
        (Holder::AnyUser, Scope::Resource(r)) => r.context != Context::System,
        (Holder::AnyUser, Scope::Other(_)) => true,
        (Holder::User(kind), Scope::Resource(r)) => match r.context {
            Context::Patient => kind != UserKind::Other,
            Context::User => kind == UserKind::Practitioner,
            Context::System => false,
        },
        (Holder::User(kind), Scope::Other(s)) => match kind {
            UserKind::Practitioner => true,
            UserKind::Patient | UserKind::RelatedPerson => PATIENT_SIDE.contains(&s.as_str()),
            UserKind::Other => matches!(s.as_str(), "openid" | "fhirUser" | "profile"),
        },
    }
}

/// The scopes of `requested` (in its order) that may be granted: known to this server,
/// within the client's registered ceiling (`None`: any scope; a ceiling scope that does not
/// parse admits nothing) and held by `holder` ([`may_hold`]). Others are simply not granted
/// (RFC 6749 3.3 lets the server narrow; the token response's `scope` says what was).
pub fn grantable<'a>(
    requested: impl IntoIterator<Item = &'a str>,
    ceiling: Option<&str>,
    holder: Holder,
) -> Vec<String> {
    let ceiling: Option<Vec<Scope>> = ceiling.map(|c| c.split_whitespace().filter_map(|s| parse(s).ok()).collect());
    requested
        .into_iter()
        .filter_map(|s| parse(s).ok().map(|p| (s, p)))
        .filter(|(_, p)| ceiling.as_deref().is_none_or(|c| within(p, c)) && may_hold(holder, p))
        .map(|(s, _)| s.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(s: &str) -> ResourceScope {
        match parse(s).unwrap() {
            Scope::Resource(r) => r,
            Scope::Other(o) => panic!("{o}"),
        }
    }

    #[test]
    fn v1_and_v2() {
        let r = res("patient/Observation.read");
        assert!(r.allows(Perm::R) && r.allows(Perm::S) && !r.allows(Perm::C));
        let w = res("user/*.write");
        assert!(w.allows(Perm::C) && w.allows(Perm::U) && w.allows(Perm::D) && !w.allows(Perm::R));
        assert!(w.covers("Patient"));
        let all = res("system/Patient.*");
        assert!([Perm::C, Perm::R, Perm::U, Perm::D, Perm::S].iter().all(|p| all.allows(*p)));
        let v2 = res("patient/Observation.rs");
        assert!(v2.allows(Perm::R) && v2.allows(Perm::S) && !v2.allows(Perm::U));
        assert!(res("user/*.cruds").allows(Perm::D));
        assert_eq!(res("system/Patient.r").context, Context::System);
    }

    #[test]
    fn query_restriction() {
        let r = res(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        );
        assert_eq!(
            r.query,
            vec![("category".into(), "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".into())]
        );
    }

    #[test]
    fn refusals() {
        for bad in [
            "patient/Observation",
            "nurse/Observation.read",
            "patient/Observation.rc",
            "patient/Obs-x.r",
            "patient/Observation.x",
            "patient/Observation.read?code=1",
            "banana",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("openid").is_ok());
    }

    #[test]
    fn ceilings() {
        let ceiling = parse_all("patient/*.rs launch/patient").unwrap();
        assert!(within(&parse("patient/Observation.r").unwrap(), &ceiling));
        assert!(!within(&parse("patient/Observation.c").unwrap(), &ceiling));
        assert!(!within(&parse("user/Observation.r").unwrap(), &ceiling));
        assert!(within(&parse("launch/patient").unwrap(), &ceiling));
        assert!(!within(&parse("openid").unwrap(), &ceiling));
    }
    #[test]
    fn who_may_hold_which_scopes() {
        use UserKind::*;
        let all = "launch/patient launch openid fhirUser offline_access online_access launch/encounter \
                   patient/*.rs user/*.cruds system/*.cruds";
        let ws = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let patient_side =
            ws(&["launch/patient", "launch", "openid", "fhirUser", "offline_access", "online_access", "patient/*.rs"]);
        assert_eq!(grantable(all.split_whitespace(), None, Holder::User(Patient)), patient_side);
        assert_eq!(grantable(all.split_whitespace(), None, Holder::User(RelatedPerson)), patient_side);
        let clinician = grantable(all.split_whitespace(), None, Holder::User(Practitioner));
        assert!(clinician.contains(&"user/*.cruds".to_string()) && clinician.contains(&"patient/*.rs".to_string()));
        assert!(!clinician.iter().any(|s| s.starts_with("system/")), "{clinician:?}");
        assert_eq!(UserKind::of("PractitionerRole/7"), Practitioner);
        assert_eq!(grantable(all.split_whitespace(), None, Holder::User(Other)), ws(&["openid", "fhirUser"]));
        assert_eq!(grantable(all.split_whitespace(), None, Holder::Backend), ws(&["system/*.cruds"]));
        let any = grantable(all.split_whitespace(), None, Holder::AnyUser);
        assert!(!any.iter().any(|s| s.starts_with("system/")) && any.len() == 9, "{any:?}");
        // The client's ceiling narrows further; an unparseable ceiling admits nothing of itself.
        let c = grantable(all.split_whitespace(), Some("patient/Observation.rs openid"), Holder::User(Patient));
        assert_eq!(c, ws(&["openid"]));
        let c = grantable(["patient/Observation.r"], Some("patient/*.rs"), Holder::User(Patient));
        assert_eq!(c, ws(&["patient/Observation.r"]));
        assert!(grantable(["patient/*.rs"], Some("nonsense"), Holder::User(Patient)).is_empty());
        assert!(grantable(["banana"], None, Holder::User(Practitioner)).is_empty());
    }
}
