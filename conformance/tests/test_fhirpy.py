"""fhirpy (PyPI): CRUD, history, conditional update, transactions and paging.

fhirpy's `count()` adds `_totalMethod` and its `get_or_create()` POSTs search parameters as a
query string: both are Aidbox extensions, not FHIR R4 (conditional create is the If-None-Exist
header), so this server answers them with a 400 naming the parameter, which is asserted below.
"""
import uuid

import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome


@pytest.fixture
def fhir(base):
    return SyncFHIRClient(base, extra_headers={"Content-Type": "application/fhir+json"})


def total(fhir, rtype, **params):
    return len(fhir.resources(rtype).search(**params).fetch_all())


def test_crud_history_and_conditional_update(fhir):
    tag = str(uuid.uuid4())
    p = fhir.resource("Patient", identifier=[{"system": "urn:fhirpy", "value": tag}], name=[{"family": "Py"}])
    p.save()
    assert p.id and p["meta"]["versionId"] == "1"
    p["birthDate"] = "1980-02-29"
    p.save()
    assert p["meta"]["versionId"] == "2"
    hist = fhir.execute(f"Patient/{p.id}/_history", method="get")
    assert hist["type"] == "history" and hist["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in hist["entry"]] == ["2", "1"]

    # Conditional update (PUT Patient?identifier=...) updates the one match.
    updated, created = fhir.resources("Patient").search(identifier=f"urn:fhirpy|{tag}").update(
        fhir.resource("Patient", identifier=[{"system": "urn:fhirpy", "value": tag}], gender="other")
    )
    assert not created and updated.id == p.id and updated["gender"] == "other"
    assert total(fhir, "Patient", identifier=f"urn:fhirpy|{tag}") == 1

    p.delete()
    assert total(fhir, "Patient", identifier=f"urn:fhirpy|{tag}") == 0


def test_aidbox_extensions_are_refused_not_ignored(fhir):
    with pytest.raises(OperationOutcome, match="_totalMethod"):
        fhir.resources("Patient").search(_id="x").count()
    with pytest.raises(OperationOutcome, match="If-None-Exist"):
        fhir.resources("Patient").search(identifier="urn:x|1").get_or_create(fhir.resource("Patient"))


def test_transaction_rewrites_urn_uuid_references(fhir):
    tag = str(uuid.uuid4())
    pfull, ofull = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": pfull, "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:tx", "value": tag}]}, "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": ofull, "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "identifier": [{"system": "urn:tx", "value": tag}], "subject": {"reference": pfull}}, "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    resp = fhir.execute("", method="post", data=bundle)
    assert resp["type"] == "transaction-response"
    pid = resp["entry"][0]["response"]["location"].split("/")[1]
    obs = fhir.resources("Observation").search(identifier=f"urn:tx|{tag}").first()
    assert obs["subject"]["reference"] == f"Patient/{pid}"
    assert total(fhir, "Observation", subject=f"Patient/{pid}") == 1


def test_failed_transaction_leaves_nothing(fhir):
    tag = str(uuid.uuid4())
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:tx", "value": tag}]}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:tx", "value": tag}], "gender": "robot"}, "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    with pytest.raises(OperationOutcome, match="gender"):
        fhir.execute("", method="post", data=bundle)
    assert total(fhir, "Patient", identifier=f"urn:tx|{tag}") == 0


def test_search_by_patient_and_paging(fhir):
    p = fhir.resource("Patient", name=[{"family": "Paging"}])
    p.save()
    for i in range(7):
        fhir.resource("Observation", status="final", code={"text": str(i)}, subject={"reference": f"Patient/{p.id}"}).save()
    ids = [o.id for o in fhir.resources("Observation").search(patient=p.id).limit(3).fetch_all()]
    assert len(ids) == 7 and len(set(ids)) == 7
