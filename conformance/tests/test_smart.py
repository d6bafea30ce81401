"""SMART App Launch and Backend Services against the `--auth smart` server (SMART_BASE).

Written against the HTTP contract in src/auth/CONTRACT.md. The standalone launch is driven by
PyPI fhirclient (its own authorize URL with PKCE S256, its own code exchange and refresh); the
login and consent pages are filled in with plain form posts, as a browser would. Every test
registers its own client, and makes its own Patient and user.
"""
import json
import secrets
import time
import urllib.parse

import pytest
import requests
from fhirclient import client
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRNotFoundException

from smart_support import (
    FHIR_JSON,
    JWT_BEARER,
    Es384Key,
    Page,
    authorize_url,
    b64u,
    client_assertion,
    exchange_code,
    fhir_get,
    jwt_parts,
    login_and_consent,
    pkce_pair,
    query_of,
    unique,
    verify_rs256,
    wait_for_status,
)

OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
ORIGIN = "http://app.example.test"


def without_query(url):
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(query="", fragment=""))


def public_client(admin, redirect_uri, scope, name=None):
    name = name or unique("Conformance app")
    return admin.register_client(name, "none", [redirect_uri], scope=scope)["client_id"], name


def patient_tokens(smart_base, smart_admin, smart_config, callback_server, user, scope):
    """A public client and a full authorization-code flow for `user`: (client_id, token JSON)."""
    cid, _ = public_client(smart_admin, callback_server.url, scope)
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(16)
    url = authorize_url(smart_config, cid, callback_server.url, scope, smart_base, challenge, state)
    _, location, _ = login_and_consent(url, user.username, user.password)
    q = query_of(location)
    assert without_query(location) == callback_server.url and q.get("state") == state and q.get("code"), location
    r = exchange_code(smart_config, q["code"], callback_server.url, verifier, cid)
    assert r.status_code == 200, r.text
    return cid, q["code"], verifier, r.json()


def refresh(smart_config, cid, refresh_token):
    return requests.post(smart_config["token_endpoint"], data={
        "grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": cid})


def assert_oauth_error(r, status, error):
    assert r.status_code == status, f"want {status} {error}, got {r.status_code}: {r.text}"
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    assert r.json().get("error") == error, r.text


def assert_invalid_token(r):
    assert r.status_code == 401, f"{r.status_code}: {r.text}"
    challenge = r.headers.get("WWW-Authenticate", "")
    assert challenge.startswith("Bearer ") and 'realm="fhir-ledger"' in challenge, challenge
    assert 'error="invalid_token"' in challenge, challenge
    assert r.json()["resourceType"] == "OperationOutcome", r.text


# ---------------------------------------------------------------------------------------------
# Discovery


def test_smart_configuration(smart_base):
    url = smart_base + "/.well-known/smart-configuration"
    # Whatever the Accept, the answer is JSON (browsers and curl ask for text/html or */*).
    r = requests.get(url, headers={"Accept": "text/html", "Origin": ORIGIN})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].split(";")[0].strip() == "application/json", r.headers
    assert r.headers.get("Access-Control-Allow-Origin") in ("*", ORIGIN), r.headers
    c = r.json()

    # Required (and, with sso-openid-connect / asymmetric clients, conditionally required) by
    # the SMART App Launch IG, plus what CONTRACT.md promises.
    for field in ("issuer", "jwks_uri", "authorization_endpoint", "token_endpoint", "revocation_endpoint",
                  "introspection_endpoint", "management_endpoint", "grant_types_supported",
                  "token_endpoint_auth_methods_supported", "token_endpoint_auth_signing_alg_values_supported",
                  "scopes_supported", "response_types_supported", "code_challenge_methods_supported",
                  "capabilities"):
        assert field in c, f"smart-configuration lacks {field}: {c}"
    assert c["issuer"].rstrip("/") == smart_base
    assert c["authorization_endpoint"] == smart_base + "/auth/authorize"
    assert c["token_endpoint"] == smart_base + "/auth/token"
    assert c["revocation_endpoint"] == smart_base + "/auth/revoke"
    assert c["introspection_endpoint"] == smart_base + "/auth/introspect"
    assert c["jwks_uri"] == smart_base + "/auth/jwks"
    assert c["management_endpoint"] == smart_base + "/portal"
    assert {"authorization_code", "client_credentials", "refresh_token"} <= set(c["grant_types_supported"])
    assert {"none", "client_secret_basic", "client_secret_post", "private_key_jwt"} <= set(
        c["token_endpoint_auth_methods_supported"])
    assert {"RS384", "ES384", "EdDSA"} <= set(c["token_endpoint_auth_signing_alg_values_supported"])
    assert "code" in c["response_types_supported"]
    assert c["code_challenge_methods_supported"] == ["S256"]  # never "plain"
    assert c["scopes_supported"] and all(isinstance(s, str) for s in c["scopes_supported"])
    assert {"launch-ehr", "launch-standalone", "client-public", "client-confidential-symmetric",
            "client-confidential-asymmetric", "context-ehr-patient", "context-ehr-encounter",
            "context-standalone-patient", "permission-offline", "permission-patient", "permission-user",
            "permission-v1", "permission-v2", "sso-openid-connect", "authorize-post"} <= set(c["capabilities"])

    jwks = requests.get(c["jwks_uri"])
    assert jwks.status_code == 200 and jwks.json()["keys"], jwks.text

    # A browser app's CORS preflight.
    pre = requests.options(url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert pre.status_code in (200, 204), f"{pre.status_code} {pre.text}"
    assert pre.headers.get("Access-Control-Allow-Origin") in ("*", ORIGIN), pre.headers

    # The CapabilityStatement names the same endpoints (what fhirclient reads).
    m = requests.get(smart_base + "/metadata", headers={"Accept": FHIR_JSON})
    assert m.status_code == 200, m.text
    security = m.json()["rest"][0]["security"]
    assert security.get("cors") is True, security
    codes = [(cd.get("system"), cd.get("code")) for s in security.get("service", []) for cd in s.get("coding", [])]
    assert ("http://terminology.hl7.org/CodeSystem/restful-security-service", "SMART-on-FHIR") in codes, security
    ext = [e for e in security.get("extension", []) if e.get("url") == OAUTH_URIS]
    assert len(ext) == 1, security
    uris = {e["url"]: e.get("valueUri") for e in ext[0].get("extension", [])}
    assert uris.get("authorize") == c["authorization_endpoint"], uris
    assert uris.get("token") == c["token_endpoint"], uris
    assert uris.get("manage") == c["management_endpoint"], uris
    # R4's oauth-uris extension defines authorize, token, register and manage only (the HL7
    # validator refuses other sub-extensions); revocation and introspection are in the
    # smart-configuration above.
    assert set(uris) <= {"authorize", "token", "register", "manage"}, uris


def test_fhir_api_cors_preflight(smart_base):
    """`cors: true` in /metadata: a browser app's preflight of an authorized FHIR read (which
    carries no token, so it must not be a 401) allows the Authorization header."""
    pre = requests.options(smart_base + "/Patient", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code in (200, 204), f"preflight of /Patient: {pre.status_code} {pre.text}"
    assert pre.headers.get("Access-Control-Allow-Origin") in ("*", ORIGIN), pre.headers
    allowed = [h.strip().lower() for h in pre.headers.get("Access-Control-Allow-Headers", "").split(",")]
    assert "authorization" in allowed, pre.headers  # `*` does not cover Authorization (Fetch standard)


def test_fhir_api_requires_a_bearer_token(smart_base, smart_config):
    r = requests.get(smart_base + "/Patient", headers={"Accept": FHIR_JSON})
    assert r.status_code == 401, r.text
    challenge = r.headers.get("WWW-Authenticate", "")
    assert challenge.startswith("Bearer ") and 'realm="fhir-ledger"' in challenge, r.headers

    assert_invalid_token(fhir_get(smart_base, "Patient", "not-a-jwt"))
    # alg none, and a well-formed ES384 token signed by a key the server never saw.
    now = int(time.time())
    claims = {"iss": smart_base, "aud": smart_base, "sub": "x", "client_id": "x", "scope": "system/*.cruds",
              "iat": now, "nbf": now, "exp": now + 300, "jti": unique("jti")}
    none_alg = (b64u(json.dumps({"alg": "none", "typ": "at+jwt"}).encode()) + "."
                + b64u(json.dumps(claims).encode()) + ".")
    assert_invalid_token(fhir_get(smart_base, "Patient", none_alg))
    assert_invalid_token(fhir_get(smart_base, "Patient", Es384Key().sign_jws(claims, typ="at+jwt")))

    for open_path in ("/metadata", "/.well-known/smart-configuration", "/health"):
        assert requests.get(smart_base + open_path).status_code == 200, open_path
    admin = requests.post(smart_base + "/admin/auth/clients", json={
        "client_name": "nope", "redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "none"})
    assert admin.status_code in (401, 403), admin.text


# ---------------------------------------------------------------------------------------------
# Standalone launch with PyPI fhirclient


def test_fhirclient_smart_standalone_launch(smart_base, smart_admin, smart_config, smart_backend, callback_server,
                                            patient_user):
    requested = "launch/patient openid fhirUser offline_access patient/*.rs"
    cid, app_name = public_client(smart_admin, callback_server.url, requested)
    # fhirclient puts `launch/patient` in front of the scope itself when it has no patient yet
    # (FHIRClient.desired_scope), so the settings leave it out to not ask for it twice.
    smart = client.FHIRClient(settings={
        "app_id": cid,
        "api_base": smart_base,  # also the `aud` fhirclient sends: exactly the server's public URL
        "redirect_uri": callback_server.url,
        "scope": "openid fhirUser offline_access patient/*.rs",
    })
    assert smart.ready is False

    url = smart.authorize_url  # reads /metadata's oauth-uris extension
    q = query_of(url)
    assert without_query(url) == smart_config["authorization_endpoint"]
    assert q["response_type"] == "code" and q["client_id"] == cid and q["redirect_uri"] == callback_server.url
    assert q["scope"] == requested
    assert q["aud"] == smart_base
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43, q
    assert q["state"]

    page, location, offered = login_and_consent(url, patient_user.username, patient_user.password)
    assert app_name.casefold() in page.text.casefold()
    assert offered == requested.split()
    assert without_query(location) == callback_server.url, location
    cb = query_of(location)
    assert cb.get("state") == q["state"] and cb.get("code"), location
    # The redirect really lands at the app.
    assert requests.get(location).status_code == 200
    assert callback_server.wait() == cb

    smart.handle_callback(location)  # fhirclient exchanges the code with its PKCE verifier
    assert smart.ready is True
    assert smart.patient_id == patient_user.id
    ctx = smart.launch_context
    assert ctx["token_type"].lower() == "bearer", ctx
    granted = set(ctx["scope"].split())
    assert {"openid", "fhirUser", "offline_access", "patient/*.rs"} <= granted <= set(requested.split()), ctx
    assert "need_patient_banner" in ctx and "smart_style_url" in ctx, ctx
    assert smart.server.auth.refresh_token, "offline_access was granted but no refresh_token came"

    # openid + fhirUser: an RS256 id_token signed with a key from jwks_uri.
    id_claims = verify_rs256(ctx["id_token"], requests.get(smart_config["jwks_uri"]).json())
    assert id_claims["iss"] == smart_config["issuer"], id_claims
    assert id_claims["aud"] == cid or cid in id_claims["aud"], id_claims
    assert id_claims["fhirUser"].endswith(f"Patient/{patient_user.id}"), id_claims
    assert id_claims["sub"] and id_claims["exp"] > time.time(), id_claims

    me = Patient.read(patient_user.id, smart.server)
    assert me.id == patient_user.id and me.name[0].family == patient_user.family
    assert smart.patient.id == patient_user.id

    # patient/ scopes confine the token to its compartment: another patient is simply missing.
    other = smart_backend.create({"resourceType": "Patient", "name": [{"family": unique("Other")}]})
    with pytest.raises(FHIRNotFoundException):
        Patient.read(other["id"], smart.server)

    # Refresh: a new access token and a new (rotated) refresh token, same patient.
    auth = smart.server.auth
    old_access, old_refresh = auth.access_token, auth.refresh_token
    assert smart.reauthorize() is True
    assert auth.access_token and auth.access_token != old_access
    assert auth.refresh_token and auth.refresh_token != old_refresh
    assert smart.patient_id == patient_user.id
    assert Patient.read(patient_user.id, smart.server).id == patient_user.id


# ---------------------------------------------------------------------------------------------
# Authorization endpoint errors, login and consent refusals


def test_authorize_errors_wrong_password_and_deny(smart_base, smart_admin, smart_config, callback_server,
                                                  patient_user):
    scope = "launch/patient patient/Patient.rs"
    cid, _ = public_client(smart_admin, callback_server.url, scope)
    verifier, challenge = pkce_pair()

    def authorize(**over):
        params = dict(client_id=cid, redirect_uri=callback_server.url, scope=scope, aud=smart_base,
                      challenge=challenge, state=unique("state"))
        extra = {k: over.pop(k) for k in list(over) if k not in params}
        params.update(over)
        url = authorize_url(smart_config, params["client_id"], params["redirect_uri"], params["scope"],
                            params["aud"], params["challenge"], params["state"], **extra)
        return requests.get(url, allow_redirects=False), params["state"]

    def assert_redirected_error(r, state, error="invalid_request"):
        assert r.status_code in (302, 303), f"{r.status_code} {r.text[:300]}"
        loc = r.headers["Location"]
        assert without_query(loc) == callback_server.url, loc
        q = query_of(loc)
        assert q.get("error") == error and q.get("state") == state and "code" not in q, loc

    # PKCE is required, and only S256.
    assert_redirected_error(*authorize(challenge=None, code_challenge_method=None))
    assert_redirected_error(*authorize(challenge=verifier, code_challenge_method="plain"))
    # The token would be for another server.
    assert_redirected_error(*authorize(aud="http://127.0.0.1:9/not-this-server"))

    # Never a redirect to a URI the client did not register, nor for an unknown client.
    for r, _ in (authorize(redirect_uri=callback_server.url + "/elsewhere"),
                 authorize(redirect_uri="http://127.0.0.1:9/cb"),
                 authorize(client_id=unique("no-such-client"))):
        assert r.status_code == 400, f"{r.status_code} {r.headers.get('Location')}"
        assert "Location" not in r.headers
        assert r.headers.get("Content-Type", "").startswith("text/html"), r.headers

    # A wrong password: the login page again, 401, an error paragraph, no session.
    r, _ = authorize()
    assert r.status_code == 200, r.text
    login = Page(r.text).form("login")
    ua = requests.Session()
    bad = ua.post(urllib.parse.urljoin(r.url, login["action"]), allow_redirects=False, data={
        "username": patient_user.username, "password": patient_user.password + "x",
        "request": Page.hidden(login, "request")})
    assert bad.status_code == 401, bad.text
    again = Page(bad.text)
    again.form("login")
    assert again.error_paragraphs, bad.text
    assert "fl_session" not in ua.cookies

    # The user says no.
    state = unique("state")
    url = authorize_url(smart_config, cid, callback_server.url, scope, smart_base, challenge, state)
    _, location, _ = login_and_consent(url, patient_user.username, patient_user.password,
                                       decision="deny")
    q = query_of(location)
    assert without_query(location) == callback_server.url
    assert q.get("error") == "access_denied" and q.get("state") == state and "code" not in q, location


# ---------------------------------------------------------------------------------------------
# Token endpoint: codes, refresh rotation, revocation, introspection


def test_codes_are_single_use_and_refresh_tokens_rotate(smart_base, smart_admin, smart_config, callback_server,
                                                        patient_user):
    scope = "launch/patient offline_access patient/Patient.rs"
    cid, code, verifier, t1 = patient_tokens(smart_base, smart_admin, smart_config, callback_server, patient_user,
                                              scope)
    assert t1["token_type"].lower() == "bearer" and int(t1["expires_in"]) > 0, t1
    assert t1["patient"] == patient_user.id and t1["refresh_token"], t1
    assert "patient/Patient.rs" in t1["scope"].split(), t1

    header, claims, _ = jwt_parts(t1["access_token"])
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt" and header.get("kid"), header
    assert claims["iss"] == smart_base and claims["aud"] == smart_base, claims
    assert claims["client_id"] == cid and claims["patient"] == patient_user.id, claims
    assert claims["exp"] > time.time() >= claims["nbf"] - 5, claims

    # A code is single use.
    assert_oauth_error(exchange_code(smart_config, code, callback_server.url, verifier, cid), 400, "invalid_grant")

    assert fhir_get(smart_base, f"Patient/{patient_user.id}", t1["access_token"]).status_code == 200

    r = refresh(smart_config, cid, t1["refresh_token"])
    assert r.status_code == 200, r.text
    t2 = r.json()
    assert t2["access_token"] != t1["access_token"]
    assert t2["refresh_token"] and t2["refresh_token"] != t1["refresh_token"], t2
    assert fhir_get(smart_base, f"Patient/{patient_user.id}", t2["access_token"]).status_code == 200

    # The rotated-out refresh token is dead, and showing it again revokes the whole grant.
    assert_oauth_error(refresh(smart_config, cid, t1["refresh_token"]), 400, "invalid_grant")
    for access in (t2["access_token"], t1["access_token"]):
        r = wait_for_status(lambda: fhir_get(smart_base, f"Patient/{patient_user.id}", access), 401)
        assert_invalid_token(r)


def test_revoke_and_introspect(smart_base, smart_admin, smart_config, smart_backend, callback_server, patient_user):
    scope = "launch/patient patient/Patient.rs"
    cid, _, _, t = patient_tokens(smart_base, smart_admin, smart_config, callback_server, patient_user, scope)
    system = {"Authorization": f"Bearer {smart_backend.token()}"}

    r = requests.post(smart_config["introspection_endpoint"], data={"token": t["access_token"]}, headers=system)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["active"] is True, info
    assert info["client_id"] == cid and info["patient"] == patient_user.id, info
    assert info["token_type"].lower() == "bearer" and "patient/Patient.rs" in info["scope"].split(), info
    assert info["iss"] == smart_base and info["exp"] > time.time(), info

    r = requests.post(smart_config["revocation_endpoint"], data={"token": t["access_token"], "client_id": cid})
    assert r.status_code == 200, r.text
    assert_invalid_token(wait_for_status(
        lambda: fhir_get(smart_base, f"Patient/{patient_user.id}", t["access_token"]), 401))
    r = requests.post(smart_config["introspection_endpoint"], data={"token": t["access_token"]}, headers=system)
    assert r.status_code == 200 and r.json() == {"active": False}, r.text

    # RFC 7009: unknown tokens are 200 as well.
    r = requests.post(smart_config["revocation_endpoint"], data={"token": "never-issued", "client_id": cid})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------------------------------
# Backend services: the client assertion's rules


def test_backend_services_client_assertion(smart_base, smart_backend):
    b = smart_backend

    def token_request(assertion, scope="system/Patient.rs"):
        return requests.post(b.token_endpoint, data={
            "grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": JWT_BEARER, "client_assertion": assertion})

    assertion = client_assertion(b.key, b.client_id, b.token_endpoint)
    r = token_request(assertion)
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["token_type"].lower() == "bearer" and t["expires_in"] == 300, t
    assert t["scope"].split() == ["system/Patient.rs"], t

    found = fhir_get(smart_base, "Patient?_count=1", t["access_token"])
    assert found.status_code == 200 and found.json()["resourceType"] == "Bundle", found.text
    # system/Patient.rs does not cover creating an Observation.
    denied = requests.post(smart_base + "/Observation", headers={
        "Authorization": f"Bearer {t['access_token']}", "Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
        data=json.dumps({"resourceType": "Observation", "status": "final",
                         "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]}}))
    assert denied.status_code == 403, denied.text
    assert denied.json()["issue"][0]["code"] == "forbidden", denied.text

    # Replayed jti, wrong aud, unknown kid, signature by another key under the right kid.
    assert_oauth_error(token_request(assertion), 401, "invalid_client")
    assert_oauth_error(token_request(client_assertion(b.key, b.client_id, smart_base + "/auth/other")),
                       401, "invalid_client")
    stranger = Es384Key()
    assert_oauth_error(token_request(client_assertion(stranger, b.client_id, b.token_endpoint)), 401, "invalid_client")
    stranger.kid = b.key.kid
    assert_oauth_error(token_request(client_assertion(stranger, b.client_id, b.token_endpoint)), 401, "invalid_client")
