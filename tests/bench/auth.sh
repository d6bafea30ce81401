#!/usr/bin/env bash
# What authorization costs, in one invocation: two fresh servers on loopback with the same
# 25 Synthea patients, one with `--auth off` and one with SMART on, then `fhir-ledger-bench
# auth` alternating between them. The SMART side reads as a clinician (user/*.rs
# token through the real login and consent pages), every patient has a Consent the engine
# must evaluate (permit, with a nested deny for another practitioner), and every read and
# search appends to the disclosure log. Run from the repository root after
# `cargo build --release`; extra arguments go to `fhir-ledger-bench auth`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
bench_bin="${FHIR_LEDGER_BENCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger-bench}"
. "$root/tests/bench/lib.sh"
built "$bin" "$bench_bin"
data="$root/../shared/data/synthea"

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FHIR_LEDGER_ADMIN_TOKEN=bench-admin-token

start_server "$work/plain.log" --data-dir "$work/plain"; plain=$base; pids+=("$server")
AUTH=smart start_server "$work/smart.log" --data-dir "$work/smart"; smart=$base; pids+=("$server")

"$bin" auth --node "$smart" add-client --name Loader --auth-method client_secret_basic --scope 'system/*.cruds' >"$work/loader.json"
loader=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["client_id"]+":"+d["client_secret"])' "$work/loader.json")
sys_token() {
  curl -s -u "$loader" -d grant_type=client_credentials -d 'scope=system/*.cruds' "$smart/auth/token" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}
SYS=$(sys_token)
for f in "$data"/*.json; do
  curl -sf -o /dev/null -X POST "$plain/" -H 'content-type: application/fhir+json' --data-binary @"$f"
  curl -sf -o /dev/null -X POST "$smart/" -H "authorization: Bearer $SYS" -H 'content-type: application/fhir+json' --data-binary @"$f"
done

# A clinician, and another one every patient's Consent denies (so the engine evaluates a
# nested provision on every resource, and permits ours).
prac() {
  curl -sf -X POST "$smart/Practitioner" -H "authorization: Bearer $SYS" -H 'content-type: application/fhir+json' \
    -d "{\"resourceType\":\"Practitioner\",\"name\":[{\"family\":\"$1\"}]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
DOC=$(prac Reader)
OTHER=$(prac Denied)
"$bin" auth --node "$smart" add-user --username doc --password 'bench-password' --fhir-user "Practitioner/$DOC" >/dev/null

python3 - "$plain" "$smart" "$SYS" "$OTHER" "$work" <<'PY'
import json, sys, urllib.request
plain, smart, sys_token, other, work = sys.argv[1:]
def get(base, path, token=None):
    req = urllib.request.Request(f"{base}/{path}", headers={"authorization": f"Bearer {token}"} if token else {})
    return json.load(urllib.request.urlopen(req))
def ids(base, rtype, token=None, limit=4000):
    out, url = [], f"{rtype}?_count=1000&_elements=id"
    while url and len(out) < limit:
        b = get(base, url, token)
        out += [e["resource"]["id"] for e in b.get("entry", []) if e.get("search", {}).get("mode") == "match"]
        url = next((l["url"].split(base + "/", 1)[1] for l in b.get("link", []) if l["relation"] == "next"), None)
    return out[:limit]
for name, base, token in (("plain", plain, None), ("smart", smart, sys_token)):
    patients = ids(base, "Patient", token)
    reads = [f"Patient/{p}" for p in patients] + [f"Observation/{o}" for o in ids(base, "Observation", token)]
    searches = [f"Observation?subject=Patient/{p}&_count=20" for p in patients] + \
               [f"Condition?patient={p}&_count=20" for p in patients]
    open(f"{work}/{name}-reads", "w").write("\n".join(reads) + "\n")
    open(f"{work}/{name}-searches", "w").write("\n".join(searches) + "\n")
    if name == "smart":
        for p in patients:
            consent = {"resourceType": "Consent", "status": "active",
                "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
                "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                "patient": {"reference": f"Patient/{p}"},
                "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
                "provision": {"type": "permit", "provision": [{"type": "deny",
                    "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                               "reference": {"reference": f"Practitioner/{other}"}}]}]}}
            req = urllib.request.Request(f"{smart}/Consent", data=json.dumps(consent).encode(), method="POST",
                headers={"authorization": f"Bearer {sys_token}", "content-type": "application/fhir+json"})
            urllib.request.urlopen(req).read()
    print(f"{name}: {len(reads)} read paths, {len(searches)} search paths")
PY

# The clinician signs in to an app with user/*.rs through the login and consent pages.
"$bin" auth --node "$smart" add-client --name 'Clinic App' --redirect-uri http://127.0.0.1:9/cb --scope 'user/*.rs' >"$work/app.json"
app=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["client_id"])' "$work/app.json")
verifier=$(openssl rand -hex 32)
challenge=$(printf %s "$verifier" | openssl dgst -sha256 -binary | openssl base64 | tr '+/' '-_' | tr -d '=')
req=$(curl -s "$smart/auth/authorize?response_type=code&client_id=$app&redirect_uri=http://127.0.0.1:9/cb&scope=user/*.rs&state=s&aud=$smart&code_challenge=$challenge&code_challenge_method=S256" |
  sed -n 's/.*name="request" value="\([^"]*\)".*/\1/p')
csrf=$(curl -s -c "$work/jar" -d username=doc -d password=bench-password --data-urlencode "request=$req" "$smart/auth/login" |
  sed -n 's/.*name="csrf" value="\([^"]*\)".*/\1/p')
code=$(curl -s -b "$work/jar" -o /dev/null -w '%{redirect_url}' --data-urlencode "request=$req" -d "csrf=$csrf" -d decision=approve \
  --data-urlencode 'scope=user/*.rs' "$smart/auth/consent" | sed 's/.*code=\([^&]*\).*/\1/')
token=$(curl -s -d grant_type=authorization_code -d "code=$code" -d client_id="$app" -d code_verifier="$verifier" \
  -d redirect_uri=http://127.0.0.1:9/cb "$smart/auth/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

machine
cd "$root"
BENCH_TOKEN="$token" "$bench_bin" auth --plain "$plain" --smart "$smart" \
  --plain-reads "$work/plain-reads" --smart-reads "$work/smart-reads" \
  --plain-searches "$work/plain-searches" --smart-searches "$work/smart-searches" "$@"
echo "disclosure log: $(curl -s -H "authorization: Bearer $(sys_token)" "$smart/AuditEvent?_summary=count" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])') AuditEvents"
