"""SMART on FHIR's Python client (PyPI fhirclient, R4 models) doing CRUD and search."""
import uuid

from fhirclient import client
from fhirclient.models.humanname import HumanName
from fhirclient.models.identifier import Identifier
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.models.codeableconcept import CodeableConcept
from fhirclient.models.fhirreference import FHIRReference
from fhirclient.models.quantity import Quantity


def smart(base):
    return client.FHIRClient(settings={"app_id": "fhir-ledger-conformance", "api_base": base + "/"})


def test_patient_crud_and_search(base):
    server = smart(base).server
    mrn = str(uuid.uuid4())
    p = Patient()
    p.identifier = [Identifier({"system": "urn:conformance", "value": mrn})]
    p.name = [HumanName({"family": "Chalmers", "given": ["Peter"]})]
    p.gender = "male"
    p.birthDate = None
    created = p.create(server)
    assert created["resourceType"] == "Patient"
    pid = created["id"]

    read = Patient.read(pid, server)
    assert read.name[0].family == "Chalmers"
    assert read.meta.versionId == "1"

    read.gender = "female"
    read.update(server)
    again = Patient.read(pid, server)
    assert again.gender == "female"
    assert again.meta.versionId == "2"

    found = Patient.where(struct={"identifier": f"urn:conformance|{mrn}"}).perform_resources(server)
    assert [r.id for r in found] == [pid]

    again.delete(server)
    found = Patient.where(struct={"identifier": f"urn:conformance|{mrn}"}).perform_resources(server)
    assert found == []


def test_observation_with_subject_and_quantity(base):
    server = smart(base).server
    p = Patient()
    p.name = [HumanName({"family": "Obs"})]
    pid = p.create(server)["id"]
    o = Observation()
    o.status = "final"
    o.code = CodeableConcept({"coding": [{"system": "http://loinc.org", "code": "8302-2"}]})
    o.subject = FHIRReference({"reference": f"Patient/{pid}"})
    o.valueQuantity = Quantity({"value": 170.1, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"})
    oid = o.create(server)["id"]
    back = Observation.read(oid, server)
    assert back.valueQuantity.value == 170.1
    found = Observation.where(struct={"patient": pid}).perform_resources(server)
    assert [r.id for r in found] == [oid]
