"""Bad input gets a 4xx OperationOutcome and writes nothing."""
import json

import pytest


def count(base, http):
    return http.get(f"{base}/Patient", params={"_summary": "count"}).json()["total"]


CASES = [
    ("malformed JSON", "POST", "/Patient", b'{"resourceType": "Patient",', {}),
    ("wrong resourceType", "POST", "/Patient", b'{"resourceType": "Observation"}', {}),
    ("id mismatch", "PUT", "/Patient/a", b'{"resourceType": "Patient", "id": "b"}', {}),
    ("unknown element", "POST", "/Patient", b'{"resourceType": "Patient", "robot": true}', {}),
    ("invalid code", "POST", "/Patient", b'{"resourceType": "Patient", "gender": "robot"}', {}),
    ("invalid UTF-8", "POST", "/Patient", b'{"resourceType": "Patient", "id": "\xff\xfe"}', {}),
    ("deep nesting", "POST", "/Patient", b'{"resourceType": "Patient", "x": ' + b"[" * 10000 + b"]" * 10000 + b"}", {}),
    ("body over the 16 MiB limit", "POST", "/Patient", b'{"resourceType": "Patient", "text": {"div": "' + b"a" * (20 * 1024 * 1024) + b'"}}', {}),
    ("XML wanted", "GET", "/metadata", None, {"Accept": "application/fhir+xml"}),
]


@pytest.mark.parametrize("what,method,path,body,headers", CASES, ids=[c[0] for c in CASES])
def test_bad_input(base, http, what, method, path, body, headers):
    before = count(base, http)
    resp = http.request(method, base + path, data=body, headers=headers)
    assert 400 <= resp.status_code < 500, f"{what}: {resp.status_code}"
    outcome = resp.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    assert outcome["issue"][0]["diagnostics"]
    assert count(base, http) == before, f"{what} wrote something"


def test_round_trip_of_decimal_and_offset(base, http):
    body = b'{"resourceType":"Observation","status":"final","code":{"text":"h"},"effectiveDateTime":"2020-01-01T10:00:00+00:00","valueQuantity":{"value":170.10,"unit":"cm"}}'
    resp = http.post(f"{base}/Observation", data=body)
    assert resp.status_code == 201
    text = http.get(f"{base}/Observation/{resp.json()['id']}").text
    assert '"value":170.10' in text and "2020-01-01T10:00:00+00:00" in text
