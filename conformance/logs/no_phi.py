"""No PHI in the servers' logs: after the whole conformance run (every client, the 25 Synthea
patients loaded, searched by name, exported), no patient's name or id appears in a log line.

    python3 no_phi.py --base URL LOG...

The patients are read from the server at URL (their stored ids differ from the bundles'
urn:uuid ones) and from the Synthea bundles (names, identifiers). Exit 1 names each hit."""
import argparse
import json
import pathlib
import re
import sys
import urllib.request

DATA = pathlib.Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "synthea"


def server_patients(base):
    url, out = f"{base}/Patient?_count=500&_elements=id,name,identifier", []
    while url:
        req = urllib.request.Request(url, headers={"Accept": "application/fhir+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            b = json.load(r)
        out += [e["resource"] for e in b.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]
        url = next((l["url"] for l in b.get("link", []) if l["relation"] == "next"), None)
    return out


def bundle_patients():
    for f in sorted(DATA.glob("*.json")):
        for e in json.loads(f.read_text()).get("entry", []):
            if e.get("resource", {}).get("resourceType") == "Patient":
                yield e["resource"]


def needles(patients):
    """Strings that would name a patient: ids, names of 4+ characters, identifier values."""
    found = set()
    for p in patients:
        found.add(p.get("id", ""))
        for n in p.get("name", []):
            found.update(n.get("given", []))
            found.add(n.get("family", ""))
        found.update(i.get("value", "") for i in p.get("identifier", []))
    return {s for s in found if len(s) >= 4}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("logs", nargs="+")
    a = ap.parse_args()
    patients = server_patients(a.base)
    if len(patients) < 25:
        sys.exit(f"no-phi: expected the 25 Synthea patients on {a.base}, found {len(patients)}")
    words = needles(patients) | needles(bundle_patients())
    # Whole tokens only: an identifier like 12345 must not match inside a timestamp's digits.
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    pattern = re.compile(f"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")
    hits, lines = [], 0
    for log in a.logs:
        for no, line in enumerate(pathlib.Path(log).read_text(errors="replace").splitlines(), 1):
            lines += 1
            m = pattern.search(line)
            if m:
                hits.append(f"{log}:{no}: {m.group(0)!r} in {line[:300]}")
    print(f"no-phi: {lines} log lines of {len(a.logs)} server(s) searched for {len(words)} names, ids and "
          f"identifiers of {len(patients)} patients: {len(hits)} found")
    for h in hits[:20]:
        print("  " + h)
    sys.exit(1 if hits else 0)


if __name__ == "__main__":
    main()
