"""The CapabilityStatement is true: every claim in /metadata is exercised against the server.

For each resource type listed: every interaction, conditional interaction, versioning and history
flag, every search parameter (with `Prefer: handling=strict`, so an unsupported one would be a
400), every `searchInclude` and `searchRevInclude` pair, and every operation. Then the system
interactions and operations, the formats and patch formats, and controls: what is not claimed
(XML, FHIRPath Patch, an unknown parameter or operation) is refused. Matching semantics of the
search parameters are checked elsewhere (search/diff.mjs against Medplum's engine); here a
claim passes when the server accepts it and answers in kind.
"""
import json
import uuid

import pytest

from conftest import DATA
from minimal import definitions, instance

JSON_PATCH = "application/json-patch+json"
STRICT = {"Prefer": "handling=strict"}


class Failures(list):
    def check(self, ok, what, resp=None):
        if not ok:
            detail = f" -> {resp.status_code} {resp.text[:300]}" if resp is not None else ""
            self.append(what + detail)
        return ok

    def done(self):
        assert not self, f"{len(self)} claims do not hold:\n" + "\n".join(self[:80])


@pytest.fixture(scope="module")
def cs(base, http):
    r = http.get(base + "/metadata")
    assert r.status_code == 200
    return r.json()


@pytest.fixture(scope="module")
def resources(cs):
    return {r["type"]: r for r in cs["rest"][0]["resource"]}


def etag(resp):
    return resp.headers.get("ETag", "")


def created_id(resp):
    return resp.headers["Location"].split("/_history")[0].rsplit("/", 1)[1]


def test_the_statement_describes_this_server(cs, base):
    assert cs["kind"] == "instance" and cs["fhirVersion"] == "4.0.1"
    assert cs["implementation"]["url"] == base
    assert cs["rest"][0]["mode"] == "server"
    assert "searchRevInclude" in cs["rest"][0]["resource"][0]


def exercise_type(rtype, claim, base, http, f):
    """Every interaction and flag `claim` makes for `rtype`, on a fresh minimal instance."""
    url = f"{base}/{rtype}"
    ints = {i["code"] for i in claim.get("interaction", [])}
    body = instance(rtype)
    if "create" in ints:
        r = http.post(url, data=json.dumps(body))
        if not f.check(r.status_code == 201 and "Location" in r.headers, f"{rtype}: create", r):
            return
        rid, first = created_id(r), etag(r)
    else:
        rid = "cap-" + uuid.uuid4().hex[:12]
        r = http.put(f"{url}/{rid}", data=json.dumps({**body, "id": rid}))
        if not f.check(r.status_code == 201, f"{rtype}: update as create (no create claimed)", r):
            return
        first = etag(r)
    res = f"{url}/{rid}"
    if "read" in ints:
        r = http.get(res)
        f.check(r.status_code == 200 and r.json().get("id") == rid, f"{rtype}: read", r)
    if "vread" in ints:
        r = http.get(f"{res}/_history/1")
        f.check(r.status_code == 200 and r.json()["meta"]["versionId"] == "1", f"{rtype}: vread", r)
    for op in claim.get("operation", []):
        if op["name"] == "proof":
            r = http.get(f"{res}/_history/1/$proof")
            f.check(r.status_code == 200, f"{rtype}: $proof", r)
    cr = claim.get("conditionalRead")
    if cr in ("modified-since", "full-support"):
        r = http.get(res, headers={"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})
        f.check(r.status_code == 304, f"{rtype}: conditionalRead If-Modified-Since", r)
    if cr in ("not-match", "full-support"):
        r = http.get(res, headers={"If-None-Match": first})
        f.check(r.status_code == 304, f"{rtype}: conditionalRead If-None-Match", r)
    if "update" in ints:
        r = http.put(res, data=json.dumps({**body, "id": rid}), headers={"If-Match": first})
        f.check(r.status_code == 200 and etag(r) == 'W/"2"', f"{rtype}: update with If-Match", r)
        if claim.get("versioning") == "versioned-update":
            r = http.put(res, data=json.dumps({**body, "id": rid}), headers={"If-Match": first})
            f.check(r.status_code == 412, f"{rtype}: versioned-update refuses a stale If-Match", r)
    if "patch" in ints:
        ops = [{"op": "add", "path": "/language", "value": "en"}]
        r = http.patch(res, data=json.dumps(ops), headers={"Content-Type": JSON_PATCH})
        f.check(r.status_code == 200 and r.json().get("language") == "en", f"{rtype}: patch (JSON Patch)", r)
    if claim.get("readHistory"):
        r = http.get(f"{res}/_history/1")
        f.check(r.status_code == 200, f"{rtype}: readHistory (vread of a past version)", r)
    if "history-instance" in ints:
        r = http.get(f"{res}/_history")
        f.check(r.status_code == 200 and r.json().get("type") == "history", f"{rtype}: history-instance", r)
    if "history-type" in ints:
        r = http.get(f"{url}/_history", params={"_count": 1})
        f.check(r.status_code == 200 and r.json().get("type") == "history", f"{rtype}: history-type", r)
    if "search-type" in ints:
        r = http.get(url, params={"_id": rid})
        f.check(r.status_code == 200 and r.json().get("total") == 1, f"{rtype}: search-type", r)
    if claim.get("conditionalCreate"):
        r = http.post(url, data=json.dumps(body), headers={"If-None-Exist": f"_id={rid}"})
        f.check(r.status_code == 200, f"{rtype}: conditionalCreate finds the match and creates nothing", r)
    if claim.get("conditionalUpdate"):
        r = http.put(url, params={"_id": rid}, data=json.dumps({**body, "id": rid}))
        f.check(r.status_code == 200, f"{rtype}: conditionalUpdate", r)
    if claim.get("updateCreate"):
        other = "cap-" + uuid.uuid4().hex[:12]
        r = http.put(f"{url}/{other}", data=json.dumps({**body, "id": other}))
        f.check(r.status_code == 201, f"{rtype}: updateCreate", r)
        if claim.get("conditionalDelete") in ("single", "multiple"):
            r = http.delete(url, params={"_id": other})
            gone = http.get(f"{url}/{other}")
            f.check(r.status_code in (200, 204) and gone.status_code == 410, f"{rtype}: conditionalDelete", r)
    if "delete" in ints:
        r = http.delete(res)
        gone = http.get(res)
        f.check(r.status_code in (200, 204) and gone.status_code == 410, f"{rtype}: delete", r)


def test_every_interaction_on_every_type(resources, base, http):
    f = Failures()
    for rtype, claim in resources.items():
        exercise_type(rtype, claim, base, http, f)
    f.done()


def search_definitions():
    doc = json.loads((DATA / "fhir-r4" / "search-parameters.json").read_text())
    return {e["resource"]["url"]: e["resource"] for e in doc["entry"]}


# A value of each search parameter type that any server must parse.
SAMPLE = {
    "string": "x",
    "token": "x",
    "date": "2020-01-01",
    "reference": "Patient/x",
    "quantity": "1",
    "uri": "http://example.org/x",
    "number": "1",
}


def is_boolean(expression):
    """Whether every path of a search expression ends at a boolean element: such a token
    parameter takes true or false."""
    sds = definitions()[0]
    paths = [p.strip() for p in expression.split("|")]
    for path in paths:
        rtype, _, rest = path.partition(".")
        if rtype not in sds or not rest or not all(part.isalnum() for part in rest.split(".")):
            return False
        el = next((e for e in sds[rtype]["snapshot"]["element"] if e["path"] == path), None)
        if not el or [t["code"] for t in el.get("type", [])] != ["boolean"]:
            return False
    return bool(paths)


def sample(param, defs):
    if param["type"] == "token" and is_boolean(param.get("documentation", "")):
        return "true"
    if param["type"] == "composite":
        d = defs.get(param.get("definition"), {})
        kinds = [defs.get(c["definition"], {}).get("type", "token") for c in d.get("component", [])]
        return "$".join(SAMPLE.get(k, "x") for k in kinds) or "x$x"
    if param["type"] == "special":
        return "1|1|1|km" if param["name"] == "near" else "x"
    return SAMPLE[param["type"]]


def test_every_search_parameter_is_supported(resources, base, http):
    defs = search_definitions()
    f = Failures()
    for rtype, claim in resources.items():
        params = [(p["name"], sample(p, defs)) for p in claim.get("searchParam", [])]
        r = http.get(f"{base}/{rtype}", params=params + [("_count", "1")], headers=STRICT)
        if r.status_code == 200 and r.json().get("type") == "searchset":
            continue
        for name, value in params:  # name the culprits
            one = http.get(f"{base}/{rtype}", params={name: value, "_count": 1}, headers=STRICT)
            f.check(one.status_code == 200, f"{rtype}?{name}={value}", one)
    f.done()


def test_every_include_and_revinclude_is_supported(resources, base, http):
    f = Failures()
    for rtype, claim in resources.items():
        for kind, pairs in (("_include", claim.get("searchInclude", [])), ("_revinclude", claim.get("searchRevInclude", []))):
            if not pairs:
                continue
            params = [(kind, p) for p in pairs] + [("_count", "1")]
            r = http.get(f"{base}/{rtype}", params=params, headers=STRICT)
            if r.status_code == 200:
                continue
            for p in pairs:
                one = http.get(f"{base}/{rtype}", params={kind: p}, headers=STRICT)
                f.check(one.status_code == 200, f"{rtype}?{kind}={p}", one)
    f.done()


def test_include_and_revinclude_bring_what_they_claim(resources, base, http):
    assert "Observation:subject" in resources["Observation"]["searchInclude"]
    assert "Observation:subject" in resources["Patient"]["searchRevInclude"]
    p = http.post(f"{base}/Patient", data=json.dumps({"resourceType": "Patient", "name": [{"family": "Capability"}]}))
    pid = created_id(p)
    o = http.post(
        f"{base}/Observation",
        data=json.dumps({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": f"Patient/{pid}"}}),
    )
    oid = created_id(o)
    inc = http.get(f"{base}/Observation", params={"_id": oid, "_include": "Observation:subject"}).json()
    assert [(e["resource"]["id"], e["search"]["mode"]) for e in inc["entry"]] == [(oid, "match"), (pid, "include")]
    rev = http.get(f"{base}/Patient", params={"_id": pid, "_revinclude": "Observation:subject"}).json()
    assert [(e["resource"]["id"], e["search"]["mode"]) for e in rev["entry"]] == [(pid, "match"), (oid, "include")]


def answered(r):
    """An operation is there when it answers 2xx, or a 4xx OperationOutcome about the call
    itself (a missing parameter, nothing recorded yet to trace or verify), never one saying
    the operation or route is unknown (`not-supported`) and never 405."""
    if 200 <= r.status_code < 300:
        return True
    if r.status_code == 405 or not 400 <= r.status_code < 500:
        return False
    try:
        outcome = r.json()
    except ValueError:
        return False
    codes = {i.get("code") for i in outcome.get("issue", [])}
    return outcome.get("resourceType") == "OperationOutcome" and "not-supported" not in codes


def test_every_operation_is_answered(cs, resources, base, http):
    f = Failures()
    async_ = {"Prefer": "respond-async"}
    empty = json.dumps({"resourceType": "Parameters"})
    ids = {}
    for rtype in ("Patient", "ResearchStudy", "Device", "Medication", "Group"):
        r = http.post(f"{base}/{rtype}", data=json.dumps(instance(rtype)))
        ids[rtype] = created_id(r)
    erased = created_id(http.post(f"{base}/Patient", data=json.dumps(instance("Patient"))))
    calls = {
        ("Patient", "access-report"): ("GET", f"/Patient/{ids['Patient']}/$access-report", None, {}),
        ("Patient", "export"): ("GET", "/Patient/$export", None, async_),
        ("Patient", "member-match"): ("POST", "/Patient/$member-match", empty, {}),
        ("Patient", "everything"): ("GET", f"/Patient/{ids['Patient']}/$everything", None, {}),
        ("Patient", "erase"): ("POST", f"/Patient/{erased}/$erase", empty, {}),
        ("ResearchStudy", "lock"): ("POST", f"/ResearchStudy/{ids['ResearchStudy']}/$lock", empty, {}),
        ("ResearchStudy", "access-report"): ("GET", f"/ResearchStudy/{ids['ResearchStudy']}/$access-report", None, {}),
        ("ResearchStudy", "verify-lock"): ("GET", f"/ResearchStudy/{ids['ResearchStudy']}/$verify-lock", None, {}),
        ("Device", "trace"): ("GET", f"/Device/{ids['Device']}/$trace", None, {}),
        ("Medication", "trace"): ("GET", f"/Medication/{ids['Medication']}/$trace", None, {}),
        ("Group", "export"): ("GET", f"/Group/{ids['Group']}/$export", None, async_),
        ("Group", "bulk-member-match"): ("POST", "/Group/$bulk-member-match", empty, async_),
        ("Group", "davinci-data-export"): ("GET", f"/Group/{ids['Group']}/$davinci-data-export", None, async_),
        (None, "export"): ("GET", "/$export", None, async_),
        (None, "trace"): ("GET", "/$trace?gtin=00614141000012&serial=1", None, {}),
        (None, "verify-product"): ("GET", "/$verify-product?gtin=00614141000012&serial=1&lot=L1&expiry=2030-01-01", None, {}),
        (None, "import"): ("POST", "/$import", empty, async_),
    }
    claimed = {(None, o["name"]) for o in cs["rest"][0].get("operation", [])}
    for rtype, claim in resources.items():
        claimed |= {(rtype, o["name"]) for o in claim.get("operation", []) if o["name"] != "proof"}  # proof: per type above
    for key in sorted(claimed, key=str):
        if not f.check(key in calls, f"operation {key} is claimed but this test does not know how to call it"):
            continue
        method, path, body, headers = calls[key]
        r = http.request(method, base + path, data=body, headers=headers)
        f.check(answered(r), f"operation {key[1]} on {key[0] or 'the system'}: {method} {path}", r)
        if r.status_code == 202 and "Content-Location" in r.headers:
            http.delete(r.headers["Content-Location"])  # cancel the async job
    f.check(set(calls) <= claimed, f"operations called here but not claimed: {sorted(set(calls) - claimed, key=str)}")
    for path in ("/Observation/$everything", f"/Patient/{ids['Patient']}/$no-such-op", "/$no-such-op"):
        r = http.get(base + path)
        f.check(not answered(r) and "not supported" in r.text, f"an operation not claimed ({path}) is refused", r)
    f.done()


def test_system_interactions(cs, base, http):
    ints = {i["code"] for i in cs["rest"][0]["interaction"]}
    assert ints == {"transaction", "batch", "history-system", "search-system"}
    entry = {"resource": {"resourceType": "Basic", "code": {"text": "cap"}}, "request": {"method": "POST", "url": "Basic"}}
    for kind in ("transaction", "batch"):
        r = http.post(base, data=json.dumps({"resourceType": "Bundle", "type": kind, "entry": [entry]}))
        assert r.status_code == 200 and r.json()["type"] == f"{kind}-response", r.text
    r = http.get(base + "/_history", params={"_count": 1})
    assert r.status_code == 200 and r.json()["type"] == "history"
    r = http.get(base, params={"_type": "Basic", "_count": 1})
    assert r.status_code == 200 and r.json()["type"] == "searchset"


def test_formats_claimed_and_not(cs, base, http):
    for fmt in cs["format"]:
        r = http.get(base + "/metadata", params={"_format": fmt})
        assert r.status_code == 200 and r.json()["resourceType"] == "CapabilityStatement", fmt
    for accept in ("application/fhir+json", "application/json"):
        assert http.get(base + "/metadata", headers={"Accept": accept}).status_code == 200
    assert not any("xml" in f for f in cs["format"])
    r = http.get(base + "/metadata", headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 406
    assert cs["patchFormat"] == [JSON_PATCH]
    p = http.post(f"{base}/Basic", data=json.dumps({"resourceType": "Basic", "code": {"text": "x"}}))
    fhirpath_patch = {"resourceType": "Parameters", "parameter": []}
    r = http.patch(p.headers["Location"].split("/_history")[0], data=json.dumps(fhirpath_patch))
    assert r.status_code == 415, f"FHIRPath Patch is not claimed, so it is refused: {r.status_code}"


def test_an_unknown_parameter_is_refused_when_strict(base, http):
    r = http.get(f"{base}/Patient", params={"no-such-param": "x"}, headers=STRICT)
    assert r.status_code == 400 and "no-such-param" in r.text
