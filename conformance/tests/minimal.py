"""A minimal valid instance of any R4 resource type, built from the official definitions.

The CapabilityStatement test (test_capability.py) exercises every interaction the server claims
on every type it lists, so it needs something to create of each. Each instance has just the
elements the base StructureDefinition requires (min >= 1, recursively), filled with values that
also satisfy the datatypes' invariants (ref-1, cpt-2, qty-3, age-1, rat-1, att-1, ...), since
the HL7 validator later checks what the server echoes back.
"""
import functools
import json

from conftest import REPO

# The server's own pinned definitions: official R4 4.0.1 (fhir-profiles/tools/OfficialR4.java).
R4 = REPO / "fhir-profiles"

# Values for datatypes whose own invariants a naive filler would break. CodeableConcept, Coding
# and code come from the element's binding instead when it has one.
DATATYPES = {
    "boolean": True,
    "integer": 1,
    "unsignedInt": 1,
    "positiveInt": 1,
    "decimal": 1,
    "string": "x",
    "markdown": "x",
    "code": "x",
    "id": "x1",
    "uri": "http://example.org/x",
    "url": "http://example.org/x",
    "canonical": "http://example.org/x",
    "oid": "urn:oid:1.2.3",
    "uuid": "urn:uuid:2b9d4ea4-9f6e-4b5c-8f3a-3c6d7e8f9a0b",
    "date": "2020-01-01",
    "dateTime": "2020-01-01",
    "instant": "2020-01-01T00:00:00Z",
    "time": "10:00:00",
    "base64Binary": "eA==",
    "xhtml": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>',
    "CodeableConcept": {"text": "x"},
    "Coding": {"system": "http://example.org/codes", "code": "x"},
    "Reference": {"display": "x"},
    "Identifier": {"system": "http://example.org/ids", "value": "x"},
    "Period": {"start": "2020-01-01"},
    "Quantity": {"value": 1},
    "SimpleQuantity": {"value": 1},
    "MoneyQuantity": {"value": 1, "currency": "USD"},
    "Age": {"value": 1, "system": "http://unitsofmeasure.org", "code": "a"},
    "Duration": {"value": 1, "system": "http://unitsofmeasure.org", "code": "d"},
    "Distance": {"value": 1, "system": "http://unitsofmeasure.org", "code": "m"},
    "Count": {"value": 1, "system": "http://unitsofmeasure.org", "code": "1"},
    "Money": {"value": 1, "currency": "USD"},
    "Range": {"low": {"value": 1}},
    "Ratio": {"numerator": {"value": 1}, "denominator": {"value": 1}},
    "Attachment": {"contentType": "text/plain", "data": "eA=="},
    "HumanName": {"text": "x"},
    "Address": {"text": "x"},
    "ContactPoint": {"system": "phone", "value": "1"},
    "Annotation": {"text": "x"},
    "Timing": {"event": ["2020-01-01"]},
    "SampledData": {"origin": {"value": 1}, "period": 1, "dimensions": 1},
    "Signature": {
        "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}],
        "when": "2020-01-01T00:00:00Z",
        "who": {"display": "x"},
    },
    "Expression": {"language": "text/fhirpath", "expression": "true"},
    "ContactDetail": {"name": "x"},
    "Contributor": {"type": "author", "name": "x"},
    "RelatedArtifact": {"type": "documentation", "display": "x"},
    "UsageContext": {
        "code": {"system": "http://terminology.hl7.org/CodeSystem/usage-context-type", "code": "focus"},
        "valueCodeableConcept": {"text": "x"},
    },
    "DataRequirement": {"type": "Patient"},
    "TriggerDefinition": {"type": "named-event", "name": "x"},
    "ParameterDefinition": {"use": "in", "min": 0, "max": "1", "type": "string"},
    "Dosage": {"text": "x"},
    "Narrative": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'},
    "MarketingStatus": {"country": {"text": "x"}, "status": {"text": "x"}, "dateRange": {"start": "2020-01-01"}},
}

# Code systems that a value set names without listing codes, and a code of each.
UNENUMERATED = {
    "urn:ietf:bcp:13": "text/plain",
    "urn:ietf:bcp:47": "en",
    "http://unitsofmeasure.org": "mg",
    "urn:iso:std:iso:4217": "USD",
    "http://hl7.org/fhir/fhir-types": "Patient",
    "http://hl7.org/fhir/resource-types": "Patient",
}


# Types whose minimal instance must say more than the base definition requires: a
# SearchParameter this server can index (it refuses one it cannot use), a Bundle type without
# the document or message invariants (bdl-9, bdl-11, ...), and the resources whose own
# invariants ask for an element their cardinalities leave optional (named beside each).
OVERRIDES = {
    "SearchParameter": {
        "code": "capability-test",
        "base": ["Basic"],
        "type": "token",
        "expression": "Basic.code",
        "description": "x",
    },
    "Bundle": {"type": "collection"},
    # ait-1: clinicalStatus unless the verification status is entered-in-error.
    "AllergyIntolerance": {
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]
        }
    },
    # app-1 / apr-1: a participant has a type or an actor.
    "Appointment": {"participant": [{"type": [{"text": "x"}], "status": "accepted"}]},
    "AppointmentResponse": {"participantType": [{"text": "x"}]},
    # cpb-1, cpb-2, cpb-14 (tcp-2, tcp-3 alike): a statement of requirements, which needs no
    # implementation or software, says something and has a REST part.
    "CapabilityStatement": {"kind": "requirements", "description": "x", "rest": [{"mode": "server"}]},
    "TerminologyCapabilities": {"kind": "requirements", "description": "x"},
    # imr-1: a recommendation names a vaccine or a disease.
    "ImmunizationRecommendation": {
        "recommendation": [{"vaccineCode": [{"text": "x"}], "forecastStatus": {"text": "x"}}]
    },
    # ipn-1, org-1: a name or an identifier.
    "InsurancePlan": {"name": "x"},
    "Organization": {"name": "x"},
    # lnk-1: at least two items are linked.
    "Linkage": {"item": [{"type": "source", "resource": {"display": "x"}}, {"type": "alternate", "resource": {"display": "y"}}]},
    # ppc-1: a policy or a policy rule.
    "Consent": {"policyRule": {"text": "x"}},
    # A logical model: the minimal StructureDefinition (no type to constrain, no elements) makes
    # the validator itself fail with a NullPointerException.
    "StructureDefinition": {
        "kind": "logical",
        "abstract": False,
        "type": "http://example.org/StructureDefinition/x",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Element",
        "derivation": "specialization",
        "differential": {"element": [{"id": "x", "path": "x", "min": 0, "max": "1"}]},
    },
}


@functools.lru_cache(maxsize=1)
def definitions():
    sds = {}
    for e in json.loads((R4 / "profiles-resources.json").read_text())["entry"]:
        r = e["resource"]
        if r["resourceType"] == "StructureDefinition" and r.get("kind") == "resource":
            sds[r["type"]] = r
    systems, valuesets = {}, {}
    for e in json.loads((R4 / "valuesets.json").read_text())["entry"]:
        r = e["resource"]
        (systems if r["resourceType"] == "CodeSystem" else valuesets)[r["url"]] = r
    return sds, systems, valuesets


def first_code(valueset_url):
    """(system, code) of the first concrete code a value set includes, or None."""
    _, systems, valuesets = definitions()
    vs = valuesets.get(valueset_url.split("|")[0])
    if not vs:
        return None
    for inc in vs.get("compose", {}).get("include", []):
        system = inc.get("system")
        if inc.get("concept"):
            return system, inc["concept"][0]["code"]
        if system in UNENUMERATED:
            return system, UNENUMERATED[system]
        cs = systems.get(system)
        concepts = list(cs.get("concept", [])) if cs else []
        while concepts:
            c = concepts.pop(0)
            if not any(p.get("code") == "abstract" and p.get("valueBoolean") for p in c.get("property", [])):
                return system, c["code"]
        for nested in inc.get("valueSet", []):
            found = first_code(nested)
            if found:
                return found
    return None


def value_for(element, type_code, children):
    binding = element.get("binding", {})
    bound = first_code(binding["valueSet"]) if binding.get("strength") == "required" and binding.get("valueSet") else None
    if type_code == "code" and bound:
        return bound[1]
    if type_code == "CodeableConcept" and bound:
        return {"coding": [{"system": bound[0], "code": bound[1]}]}
    if type_code == "Coding" and bound:
        return {"system": bound[0], "code": bound[1]}
    if type_code in ("BackboneElement", "Element"):
        return children()
    return DATATYPES.get(type_code, {})


def instance(rtype):
    """A minimal instance of `rtype` (no id)."""
    sds, _, _ = definitions()
    elements = sds[rtype]["snapshot"]["element"]

    def fill(path):
        out = {}
        for el in elements:
            p = el["path"]
            if not p.startswith(path + ".") or "." in p[len(path) + 1 :] or el.get("min", 0) < 1:
                continue
            name = p[len(path) + 1 :]
            t = el["type"][0]["code"] if el.get("type") else "BackboneElement"
            if el.get("contentReference"):
                t = "BackboneElement"
            if name.endswith("[x]"):
                name = name[:-3] + t[0].upper() + t[1:]
            v = value_for(el, t, lambda: fill(p))
            out[name] = [v] if el.get("max") != "1" else v
        return out

    return {"resourceType": rtype, **fill(rtype), **OVERRIDES.get(rtype, {})}
