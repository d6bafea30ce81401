#!/usr/bin/env python3
"""Rewrites Synthea transaction bundles so that two FHIR servers loading them hold the same ids.

Synthea's bundles create every resource with POST under a urn:uuid fullUrl, so each server
assigns its own ids. tests/bench/peer.sh compares the same searches on fhir-ledger and HAPI,
which needs the same ids (and so the same references) on both: this script turns every entry
into `PUT Type/ID` (update as create, a client-assigned id) and every urn:uuid reference
into `Type/ID`. ID is a UUID derived from the bundle's file name and the entry's fullUrl:
Synthea repeats some Organizations, Locations and Practitioners across patients' bundles,
and POST would create each repeat afresh, so the ids are per bundle to keep the same
resources as a POST load (no two bundles write the same id). Everything else is unchanged.

Usage: synthea_put.py IN_DIR OUT_DIR [N]  (the first N bundles in name order; default all)
"""

import json
import os
import sys
import uuid

NS = uuid.UUID("6f1e8a52-3c1b-4d59-9a0e-2b7c4f1d8e31")


def convert(name, bundle):
    ids = {}
    for e in bundle["entry"]:
        r = e["resource"]
        ids[e["fullUrl"]] = f"{r['resourceType']}/{uuid.uuid5(NS, name + '/' + e['fullUrl'])}"

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "reference" and isinstance(v, str) and v in ids:
                    x[k] = ids[v]
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for e in bundle["entry"]:
        ref = ids[e["fullUrl"]]
        walk(e["resource"])
        e["resource"]["id"] = ref.split("/", 1)[1]
        e["fullUrl"] = ref  # relative fullUrl: the entry's own Type/id
        e["request"] = {"method": "PUT", "url": ref}
    return bundle


def main():
    src, dst = sys.argv[1], sys.argv[2]
    names = sorted(n for n in os.listdir(src) if n.endswith(".json"))
    if len(sys.argv) > 3:
        names = names[: int(sys.argv[3])]
    os.makedirs(dst, exist_ok=True)
    for n in names:
        with open(os.path.join(src, n)) as f:
            b = convert(n, json.load(f))
        with open(os.path.join(dst, n), "w") as f:
            json.dump(b, f, separators=(",", ":"))
    print(f"{len(names)} bundles rewritten to PUT with shared ids in {dst}")


if __name__ == "__main__":
    main()
