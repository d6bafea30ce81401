//! `fhir-ledger auth …`: register apps and user accounts, and mint EHR launch contexts,
//! through a node's admin API.

use anyhow::Context;
use serde_json::{json, Value};

use super::cluster::Admin;

#[derive(clap::Args, Debug)]
pub struct AuthArgs {
    /// Admin bearer token of the node (its <data dir>/admin.token, or the value it was started with).
    #[arg(long, env = "FHIR_LEDGER_ADMIN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// The node's API URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    node: String,
    #[command(subcommand)]
    command: AuthCmd,
}

#[derive(clap::Subcommand, Debug)]
enum AuthCmd {
    /// Register an app (prints its client_id, and its client_secret when it has one).
    AddClient {
        #[arg(long)]
        name: String,
        /// Where the app receives the authorization code (repeat for several).
        #[arg(long = "redirect-uri")]
        redirect_uri: Vec<String>,
        /// none (public app), client_secret_basic, or private_key_jwt (backend services).
        #[arg(long, default_value = "none")]
        auth_method: String,
        /// The most the app may be granted, e.g. "launch/patient openid fhirUser patient/*.rs".
        #[arg(long)]
        scope: Option<String>,
        /// A JWKS file with the app's public keys (private_key_jwt).
        #[arg(long)]
        jwks_file: Option<std::path::PathBuf>,
        /// Or a URL the server fetches the app's JWKS from.
        #[arg(long)]
        jwks_url: Option<String>,
        /// Who the app acts for in consent decisions, e.g. Organization/1.
        #[arg(long)]
        actor: Option<String>,
        /// The app sees a patient's data only where a Consent of the patient permits its actor
        /// (another payer: the members whose `$member-match` Consent names it).
        #[arg(long)]
        consent_required: bool,
    },
    /// List registered apps.
    Clients,
    /// Remove an app: its tokens stop working on their next request.
    RemoveClient {
        #[arg(long)]
        client_id: String,
    },
    /// Create a sign-in account linked to a Patient, Practitioner or RelatedPerson.
    AddUser {
        #[arg(long)]
        username: String,
        #[arg(long, env = "FHIR_LEDGER_USER_PASSWORD", hide_env_values = true)]
        password: String,
        /// e.g. Patient/123
        #[arg(long)]
        fhir_user: String,
    },
    /// Mint an EHR launch context (the opaque `launch` parameter, valid 10 minutes).
    Launch {
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        encounter: Option<String>,
    },
}

pub async fn run(args: AuthArgs) -> anyhow::Result<()> {
    let token = args.token.context("the admin token is needed: --token or FHIR_LEDGER_ADMIN_TOKEN")?;
    let http = reqwest::Client::builder().timeout(std::time::Duration::from_mins(1)).build()?;
    let admin = Admin { http, token };
    let node = args.node.as_str();
    let post = reqwest::Method::POST;
    let out: Value = match args.command {
        AuthCmd::AddClient { name, redirect_uri, auth_method, scope, jwks_file, jwks_url, actor, consent_required } => {
            let mut body =
                json!({"client_name": name, "redirect_uris": redirect_uri, "token_endpoint_auth_method": auth_method});
            if let Some(s) = scope {
                body["scope"] = json!(s);
            }
            if let Some(f) = jwks_file {
                let text = std::fs::read_to_string(&f).with_context(|| f.display().to_string())?;
                body["jwks"] = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", f.display()))?;
            }
            if let Some(u) = jwks_url {
                body["jwks_uri"] = json!(u);
            }
            if let Some(a) = actor {
                body["actor"] = json!(a);
            }
            if consent_required {
                body["consent_required"] = json!(true);
            }
            admin.call(post, node, "/admin/auth/clients", Some(body)).await?
        }
        AuthCmd::Clients => admin.call(reqwest::Method::GET, node, "/admin/auth/clients", None).await?,
        AuthCmd::RemoveClient { client_id } => {
            admin.call(reqwest::Method::DELETE, node, &format!("/admin/auth/clients/{client_id}"), None).await?;
            json!({"removed": client_id})
        }
        AuthCmd::AddUser { username, password, fhir_user } => {
            let body = json!({"username": username, "password": password, "fhirUser": fhir_user});
            admin.call(post, node, "/admin/auth/users", Some(body)).await?
        }
        AuthCmd::Launch { patient, encounter } => {
            admin
                .call(post, node, "/admin/auth/launch", Some(json!({"patient": patient, "encounter": encounter})))
                .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
