//! The HTML the authorization server shows people: login, consent ("this app asks for…"),
//! errors, and the patient portal. Plain server-rendered forms: no scripts, every value
//! escaped.

use super::scopes::{self, Context, Perm, Scope};

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · fhir-ledger</title>\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b;background:#f7f9fb}}\
h1{{font-size:1.4rem}}form{{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:1.2rem}}\
label{{display:block;margin:.5rem 0}}input[type=text],input[type=password]{{width:100%;padding:.5rem;font-size:1rem}}\
button{{font-size:1rem;padding:.5rem 1.2rem;margin:.8rem .5rem 0 0;border-radius:6px;border:1px solid #1f6feb;background:#1f6feb;color:#fff}}\
button.secondary{{background:#fff;color:#1f6feb}}.error{{color:#b42318;font-weight:600}}table{{border-collapse:collapse;width:100%;background:#fff}}\
td,th{{border:1px solid #d0d7de;padding:.4rem;text-align:left}}.scope{{font-family:monospace;color:#555}}</style></head>\
<body><h1>{t}</h1>{body}</body></html>",
        t = esc(title)
    )
}

pub fn error(title: &str, message: &str) -> String {
    page(title, &format!("<p class=\"error\">{}</p>", esc(message)))
}

pub fn login(app: &str, request: &str, error: Option<&str>, action: &str) -> String {
    let err = error.map(|e| format!("<p class=\"error\">{}</p>", esc(e))).unwrap_or_default();
    page(
        "Sign in",
        &format!(
            "<p><strong>{app}</strong> wants to reach your health records. Sign in to continue.</p>{err}\
<form id=\"login\" method=\"post\" action=\"{action}\">\
<input type=\"hidden\" name=\"request\" value=\"{req}\">\
<label for=\"username\">User name</label><input type=\"text\" id=\"username\" name=\"username\" autocomplete=\"username\" required>\
<label for=\"password\">Password</label><input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
<button type=\"submit\" id=\"login-submit\">Sign in</button></form>",
            app = esc(app),
            req = esc(request),
            action = esc(action),
        ),
    )
}

/// What a scope means, in words a patient understands.
pub fn explain(scope: &str) -> String {
    match scopes::parse(scope) {
        Ok(Scope::Resource(r)) => {
            let what =
                if r.rtype == "*" { "all your health records".to_string() } else { format!("{} records", r.rtype) };
            let mut verbs = Vec::new();
            for (p, v) in
                [(Perm::R, "read"), (Perm::S, "search"), (Perm::C, "create"), (Perm::U, "change"), (Perm::D, "delete")]
            {
                if r.allows(p) {
                    verbs.push(v);
                }
            }
            let whose = match r.context {
                Context::Patient => "of the selected patient",
                Context::User => "you can see",
                Context::System => "on the whole server",
            };
            let only = if r.query.is_empty() {
                String::new()
            } else {
                format!(
                    " (only where {})",
                    r.query.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ")
                )
            };
            format!("{} {what} {whose}{only}", capitalize(&verbs.join(", ")))
        }
        _ => match scope {
            "openid" | "fhirUser" | "profile" => "Know who you are".into(),
            "launch/patient" => "Know which patient's record is open".into(),
            "launch/encounter" => "Know which visit is open".into(),
            "launch" => "Start from your health record system".into(),
            "offline_access" => "Keep access when you are not using the app (until you withdraw it)".into(),
            "online_access" => "Keep access while you are signed in".into(),
            other => other.to_string(),
        },
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

pub fn consent(app: &str, user: &str, request: &str, scopes: &[String], ask_patient: bool, csrf: &str) -> String {
    let mut items = String::new();
    for (i, s) in scopes.iter().enumerate() {
        items.push_str(&format!(
            "<label for=\"scope-{i}\"><input type=\"checkbox\" name=\"scope\" value=\"{v}\" id=\"scope-{i}\" checked> \
{text} <span class=\"scope\">{v}</span></label>",
            v = esc(s),
            text = esc(&explain(s)),
        ));
    }
    let patient = if ask_patient {
        "<label for=\"patient\">Patient id</label><input type=\"text\" id=\"patient\" name=\"patient\" required>"
            .to_string()
    } else {
        String::new()
    };
    page(
        "Allow access?",
        &format!(
            "<p>Signed in as <strong>{user}</strong>.</p><p><strong id=\"app-name\">{app}</strong> asks for:</p>\
<form id=\"consent\" method=\"post\" action=\"/auth/consent\"><input type=\"hidden\" name=\"request\" value=\"{req}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
{items}{patient}<p>Untick anything you do not want to share. You can withdraw this at any time under \
<a href=\"/portal\">your connected apps</a>.</p>\
<button type=\"submit\" name=\"decision\" value=\"approve\" id=\"approve\">Allow</button>\
<button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\" class=\"secondary\">Deny</button></form>",
            user = esc(user),
            app = esc(app),
            req = esc(request),
            csrf = esc(csrf),
        ),
    )
}
