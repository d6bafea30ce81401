"""Every Synthea bundle loads as a transaction, and every resource reads back as it was sent
(apart from id, server-managed meta, and urn:uuid references rewritten to the new ids), with
number literals compared as text so `170.10` must come back as `170.10`."""
import concurrent.futures
import json

import pytest

from conftest import DATA
from fidelity import loads_exact, map_references, without

BUNDLES = sorted((DATA / "synthea").glob("*.json"))


@pytest.fixture(scope="module")
def loaded(base, http):
    sent = []
    for path in BUNDLES:
        raw = path.read_bytes()
        resp = http.post(base + "/", data=raw)
        assert resp.status_code == 200, f"{path.name}: {resp.status_code} {resp.text[:500]}"
        out = resp.json()
        assert out["type"] == "transaction-response"
        bundle = loads_exact(raw)
        assert len(out["entry"]) == len(bundle["entry"])
        mapping = {}
        for entry, result in zip(bundle["entry"], out["entry"]):
            assert result["response"]["status"].startswith("201"), result
            location = result["response"]["location"]
            mapping[entry["fullUrl"]] = "/".join(location.split("/")[:2])
        for entry in bundle["entry"]:
            sent.append((mapping[entry["fullUrl"]], map_references(entry["resource"], mapping)))
    return sent


def test_all_bundles_load(loaded):
    assert len(loaded) > 50_000


def test_every_resource_reads_back_equal(base, http, loaded):
    def check(item):
        path, expected = item
        r = http.get(f"{base}/{path}")
        if r.status_code != 200:
            return f"{path}: HTTP {r.status_code}"
        got = loads_exact(r.text)
        if got["id"] != path.split("/")[1]:
            return f"{path}: id {got['id']}"
        if without(got) != without(expected):
            return f"{path}: differs: sent {json.dumps(without(expected))[:300]} got {json.dumps(without(got))[:300]}"
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(check, loaded, chunksize=256) if p]
    assert problems == [], f"{len(problems)} resources differ, first: {problems[:5]}"


def test_decimal_literals_survive(base, http, loaded):
    decimals = [(p, r) for p, r in loaded if r["resourceType"] == "Observation" and "valueQuantity" in r][:200]
    assert decimals
    for path, sent in decimals:
        literal = sent["valueQuantity"]["value"]
        text = http.get(f"{base}/{path}").text
        assert f'"value":{literal}' in text, f"{path}: {literal} not in {text[:300]}"


def test_search_by_patient_finds_the_bundle_resources(base, http, loaded):
    patients = [p for p, r in loaded if r["resourceType"] == "Patient"]
    assert len(patients) == len(BUNDLES)
    pid = patients[0].split("/")[1]
    expected = sum(1 for p, r in loaded if r["resourceType"] == "Encounter" and r.get("subject", {}).get("reference") == f"Patient/{pid}")
    got = http.get(f"{base}/Encounter", params={"patient": pid, "_summary": "count"}).json()["total"]
    assert got == expected
