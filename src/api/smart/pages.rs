//! The HTML the authorization server shows people: login, consent ("this app asks for…"),
//! errors, and the patient portal. Plain server-rendered forms, no scripts, written as `maud`
//! templates: checked at compile time, and every value inserted is escaped unless wrapped in
//! `PreEscaped` (only the constant style sheet is).

use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::auth::scopes::{self, Context, Perm, Scope};

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b;background:#f7f9fb}\
h1{font-size:1.4rem}form{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:1.2rem}\
label{display:block;margin:.5rem 0}input[type=text],input[type=password]{width:100%;padding:.5rem;font-size:1rem}\
button{font-size:1rem;padding:.5rem 1.2rem;margin:.8rem .5rem 0 0;border-radius:6px;border:1px solid #1f6feb;background:#1f6feb;color:#fff}\
button.secondary{background:#fff;color:#1f6feb}.error{color:#b42318;font-weight:600}table{border-collapse:collapse;width:100%;background:#fff}\
td,th{border:1px solid #d0d7de;padding:.4rem;text-align:left}.scope{font-family:monospace;color:#555}";

/// A whole page: `title` as the heading, `body` under it.
pub fn page(title: &str, body: &Markup) -> String {
    page_styled(title, STYLE, body)
}

/// [`page`] with a style sheet of its own (a constant: it is inserted unescaped).
pub fn page_styled(title: &str, style: &'static str, body: &Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · fhir-ledger" }
                meta name="viewport" content="width=device-width, initial-scale=1";
                style { (PreEscaped(style)) }
            }
            body {
                h1 { (title) }
                (body)
            }
        }
    }
    .into_string()
}

pub fn error(title: &str, message: &str) -> String {
    page(title, &html! { p class="error" { (message) } })
}

pub fn login(app: &str, request: &str, error: Option<&str>, action: &str) -> String {
    let body = html! {
        p { strong { (app) } " wants to reach your health records. Sign in to continue." }
        @if let Some(e) = error {
            p class="error" { (e) }
        }
        form id="login" method="post" action=(action) {
            input type="hidden" name="request" value=(request);
            label for="username" { "User name" }
            input type="text" id="username" name="username" autocomplete="username" required;
            label for="password" { "Password" }
            input type="password" id="password" name="password" autocomplete="current-password" required;
            button type="submit" id="login-submit" { "Sign in" }
        }
    };
    page("Sign in", &body)
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
    let body = html! {
        p { "Signed in as " strong { (user) } "." }
        p { strong id="app-name" { (app) } " asks for:" }
        form id="consent" method="post" action="/auth/consent" {
            input type="hidden" name="request" value=(request);
            input type="hidden" name="csrf" value=(csrf);
            @for (i, s) in scopes.iter().enumerate() {
                label for={ "scope-" (i) } {
                    input type="checkbox" name="scope" value=(s) id={ "scope-" (i) } checked;
                    " " (explain(s)) " "
                    span class="scope" { (s) }
                }
            }
            @if ask_patient {
                label for="patient" { "Patient id" }
                input type="text" id="patient" name="patient" required;
            }
            p {
                "Untick anything you do not want to share. You can withdraw this at any time under "
                a href="/portal" { "your connected apps" }
                "."
            }
            button type="submit" name="decision" value="approve" id="approve" { "Allow" }
            button type="submit" name="decision" value="deny" id="deny" class="secondary" { "Deny" }
        }
    };
    page("Allow access?", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped() {
        let evil = r#""><script>alert(1)</script>"#;
        let login = login(evil, evil, Some(evil), evil);
        let consent = consent(evil, evil, evil, &[evil.to_string()], true, evil);
        for p in [&login, &consent, &error(evil, evil)] {
            assert!(!p.contains("<script>"), "{p}");
            assert!(p.contains("&quot;&gt;&lt;script&gt;"), "{p}");
        }
    }

    #[test]
    fn the_forms_the_tests_and_browsers_drive() {
        let l = login("App", "sealed", Some("Wrong."), "/auth/login");
        for needle in [
            r#"<form id="login" method="post" action="/auth/login">"#,
            r#"<input type="hidden" name="request" value="sealed">"#,
            r#"<input type="text" id="username" name="username" autocomplete="username" required>"#,
            r#"<input type="password" id="password" name="password" autocomplete="current-password" required>"#,
            r#"<button type="submit" id="login-submit">Sign in</button>"#,
            r#"<p class="error">Wrong.</p>"#,
        ] {
            assert!(l.contains(needle), "{needle} in {l}");
        }
        let c = consent(
            "App",
            "alice (Patient/a)",
            "sealed",
            &["launch/patient".into(), "patient/*.rs".into()],
            true,
            "tok",
        );
        for needle in [
            r#"<form id="consent" method="post" action="/auth/consent">"#,
            r#"<label for="scope-0"><input type="checkbox" name="scope" value="launch/patient" id="scope-0" checked> "#,
            r#"<label for="scope-1"><input type="checkbox" name="scope" value="patient/*.rs" id="scope-1" checked> "#,
            r#"<span class="scope">patient/*.rs</span></label>"#,
            r#"<input type="text" id="patient" name="patient" required>"#,
            r#"<input type="hidden" name="csrf" value="tok">"#,
            r#"<strong id="app-name">App</strong>"#,
            r#"<button type="submit" name="decision" value="approve" id="approve">Allow</button>"#,
            r#"<button type="submit" name="decision" value="deny" id="deny" class="secondary">Deny</button>"#,
        ] {
            assert!(c.contains(needle), "{needle} in {c}");
        }
        assert!(!consent("App", "u", "r", &[], false, "t").contains(r#"name="patient""#));
    }
}
