//! The patient portal: after signing in, a patient sees the apps they connected (each a
//! grant Consent on the ledger) and withdraws any of them, and reads who accessed their data
//! (the access report over the disclosure log).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use maud::html;

use super::smart::authorize::CLIENT_SYSTEM;
use super::smart::pages;
use super::smart::session::{forged_post, html, portal_cookie, session_csrf, session_user, sign_in, throttled, SignIn};
use crate::api::AppState;
use crate::error::FhirError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/portal", web::get().to(home))
        .route("/portal/login", web::post().to(login))
        .route("/portal/apps/{id}/withdraw", web::post().to(withdraw));
}

fn patient_of(state: &AppState, req: &HttpRequest) -> Option<(String, String)> {
    let (username, fhir_user) = session_user(&state.auth, req)?;
    fhir_user.strip_prefix("Patient/").map(|p| (username, p.to_string()))
}

async fn home(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if !state.auth.enabled {
        return html(404, pages::error("Not available", "authorization is off on this server"));
    }
    let Some((username, patient)) = patient_of(&state, &req) else {
        return html(200, pages::login("your patient portal", "", None, "/portal/login"));
    };
    let csrf = session_csrf(&state.auth, &req).unwrap_or_default();
    match render(&state, &username, &patient, &csrf).await {
        Ok(body) => html(200, body),
        Err(e) => html(503, pages::error("Unavailable", &e.issues[0].diagnostics)),
    }
}

/// The patient's active app grants: (Consent id, app name, scopes, since).
fn connected_apps(state: &AppState, patient: &str) -> Result<Vec<(String, String, String, String)>, FhirError> {
    let repo = &state.repo;
    let idx = state.search.current()?;
    let consents = idx.of("Consent");
    let mut ids = Vec::new();
    for k in consents.posting("patient", &format!("Patient/{patient}"))? {
        ids.extend(consents.get(k)?.map(|doc| doc.id.clone()));
    }
    drop(idx);
    let mut out = Vec::new();
    for id in ids {
        let Ok(s) = repo.read("Consent", &id) else { continue };
        let Some(body) = s.body else { continue };
        let v = crate::fhir::json::parse(body.as_bytes(), usize::MAX).map_err(FhirError::internal)?;
        if v.str_at(&["status"]) != Some("active") {
            continue;
        }
        let Some(actor) = v
            .items(&["provision", "actor"])
            .find(|x| x.str_at(&["reference", "identifier", "system"]) == Some(CLIENT_SYSTEM))
            .and_then(|x| x.get("reference"))
        else {
            continue;
        };
        let name = actor.str_at(&["display"]).or(actor.str_at(&["identifier", "value"])).unwrap_or("").to_string();
        let scopes = v
            .items(&["extension"])
            .find(|x| x.str_at(&["url"]) == Some(crate::consent::SCOPES_EXTENSION))
            .and_then(|x| x.str_at(&["valueString"]))
            .unwrap_or("")
            .to_string();
        out.push((id, name, scopes, v.str_at(&["dateTime"]).unwrap_or("").to_string()));
    }
    Ok(out)
}

async fn render(state: &AppState, username: &str, patient: &str, csrf: &str) -> Result<String, FhirError> {
    let apps = connected_apps(state, patient)?;
    state.auth.disclosures.flush().await;
    let (total, accessors) = crate::disclosure::access_report(&state.search, patient)?;
    let body = html! {
        p { "Signed in as " strong { (username) } " (Patient/" (patient) ")." }
        h2 { "Connected apps" }
        @if apps.is_empty() {
            p id="no-apps" { "No app has access." }
        }
        @for (id, name, scopes, since) in &apps {
            form method="post" action={ "/portal/apps/" (id) "/withdraw" } class="app" {
                input type="hidden" name="csrf" value=(csrf);
                strong { (name) } " since " (since)
                br;
                span class="scope" { (scopes) }
                br;
                button type="submit" id={ "withdraw-" (id) } { "Withdraw access" }
            }
        }
        h2 { "Who accessed your records" }
        p { (total) " recorded accesses." }
        (super::timeline::timeline(&accessors))
        table id="access-report" {
            tr {
                th { "Who" } th { "App" } th { "Requests" } th { "Records shown" } th { "Refused" }
                th { "Emergency access" } th { "Last" }
            }
            @for (who, a) in &accessors {
                tr {
                    td { (who) }
                    td { (if a.client_name.is_empty() { &a.client } else { &a.client_name }) }
                    td { (a.count) }
                    td { (a.resources) }
                    td { (a.denied) }
                    td { (a.broke_glass) }
                    td { (a.last) }
                }
            }
        }
    };
    Ok(pages::page("Your health data", &body))
}

async fn login(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let p = crate::codec::parse_query(&String::from_utf8_lossy(&body));
    if let Some(refused) = forged_post(&state.auth, &req, &p, None) {
        return refused;
    }
    let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    let (username, password) = (get("username"), get("password"));
    match sign_in(&state, &req, &username, &password).await {
        Ok(SignIn::User(id, user)) => {
            let cookie = portal_cookie(&state.auth, id, &user);
            HttpResponse::SeeOther().cookie(cookie).insert_header((header::LOCATION, "/portal")).finish()
        }
        Ok(SignIn::Wrong) => {
            html(401, pages::login("your patient portal", "", Some("Wrong user name or password."), "/portal/login"))
        }
        Ok(SignIn::Throttled(wait)) => throttled(wait, "", "/portal/login"),
        Err(why) => html(503, pages::error("Unavailable", &why)),
    }
}

async fn withdraw(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> HttpResponse {
    let id = path.into_inner();
    let form = crate::codec::parse_query(&String::from_utf8_lossy(&body));
    if let Some(refused) = forged_post(&state.auth, &req, &form, None) {
        return refused;
    }
    let Some((_, patient)) = patient_of(&state, &req) else {
        return html(401, pages::login("your patient portal", "", Some("Please sign in first."), "/portal/login"));
    };
    let csrf = session_csrf(&state.auth, &req).unwrap_or_default();
    if let Some(refused) = forged_post(&state.auth, &req, &form, Some(&csrf)) {
        return refused;
    }
    let result = async {
        let repo = &state.repo;
        let actor = format!("Patient/{patient} via portal");
        repo.commit(&crate::repo::System::new(actor), |plan| {
            let s = repo.read("Consent", &id).map_err(|_| FhirError::not_found(&format!("Consent/{id}")))?;
            let mut doc = s.parsed()?.ok_or_else(|| FhirError::not_found(&format!("Consent/{id}")))?;
            let belongs = doc.get("patient").and_then(|p| p.get("reference")).and_then(crate::fhir::json::Json::as_str)
                == Some(format!("Patient/{patient}").as_str());
            if !belongs {
                return Err(FhirError::not_found(&format!("Consent/{id}")));
            }
            doc.set("status", crate::fhir::json::Json::str("inactive"));
            plan.put("Consent", &id, &doc, Some(s.version)).map(|_| ())
        })
        .await
    }
    .await;
    match result {
        Ok(_) => HttpResponse::SeeOther().insert_header((header::LOCATION, "/portal")).finish(),
        Err(e) => html(e.status(), pages::error("Could not withdraw", &e.issues[0].diagnostics)),
    }
}
