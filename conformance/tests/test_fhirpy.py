"""fhirpy (PyPI): CRUD, history, conditional create, transactions and paging."""
import uuid

import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome


@pytest.fixture
def fhir(base):
    return SyncFHIRClient(base, extra_headers={"Content-Type": "application/fhir+json"})


def test_crud_history_and_conditional_create(fhir):
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

    # Conditional create: the second call finds the first resource instead of creating one.
    again = fhir.resources("Patient").search(identifier=f"urn:fhirpy|{tag}").get_or_create(
        fhir.resource("Patient", identifier=[{"system": "urn:fhirpy", "value": tag}])
    )
    resource = again[0] if isinstance(again, tuple) else again
    assert resource.id == p.id
    assert fhir.resources("Patient").search(identifier=f"urn:fhirpy|{tag}").count() == 1

    p.delete()
    assert fhir.resources("Patient").search(identifier=f"urn:fhirpy|{tag}").count() == 0


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
    assert fhir.resources("Observation").search(subject=f"Patient/{pid}").count() == 1


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
    with pytest.raises(OperationOutcome):
        fhir.execute("", method="post", data=bundle)
    assert fhir.resources("Patient").search(identifier=f"urn:tx|{tag}").count() == 0


def test_search_by_patient_and_paging(fhir):
    p = fhir.resource("Patient", name=[{"family": "Paging"}])
    p.save()
    for i in range(7):
        fhir.resource("Observation", status="final", code={"text": str(i)}, subject={"reference": f"Patient/{p.id}"}).save()
    ids = [o.id for o in fhir.resources("Observation").search(patient=p.id).limit(3).fetch_all()]
    assert len(ids) == 7 and len(set(ids)) == 7
