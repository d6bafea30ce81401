#!/usr/bin/env python3
"""A search repeated while a large load runs (issue 17): how long a search waits for the index
to catch up with what was just written, and what the searches cost the load.

One connection repeats one search (default `Observation?code=http://loinc.org|8302-2&_count=20`,
a body-height code every Synthea patient has) every --every-ms: --idle-s seconds before the load,
during a `scale.py load` of --resources resources (4 clients), and --after-s seconds after it. It
prints one line per phase (queries, p50, p95, max ms) and the load's wall time, and a
`search-during-load {json}` line. Standard library only.
"""
import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse


def percentile(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--dir", required=True, help="directory of transaction bundles for scale.py load")
    ap.add_argument("--resources", type=int, default=225000)
    ap.add_argument("--query", default="Observation?code=http://loinc.org|8302-2&_count=20")
    ap.add_argument("--every-ms", type=int, default=50)
    ap.add_argument("--idle-s", type=float, default=10)
    ap.add_argument("--after-s", type=float, default=20)
    ap.add_argument("--label", default="")
    a = ap.parse_args()

    url = urllib.parse.urlsplit(a.base)
    path = url.path.rstrip("/") + "/" + a.query
    phase = ["idle"]
    samples = []  # (phase, ms)
    stop = threading.Event()
    errors = []

    # Each query counts in the phase it began in.
    def probe_loop():
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
        while not stop.is_set():
            began = phase[0]
            t0 = time.monotonic()
            try:
                conn.request("GET", path, headers={"accept": "application/fhir+json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors.append(resp.status)
            except OSError as e:
                errors.append(str(e))
                conn.close()
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
            samples.append((began, (time.monotonic() - t0) * 1000))
            stop.wait(max(0.0, a.every_ms / 1000 - (time.monotonic() - t0)))

    t = threading.Thread(target=probe_loop, daemon=True)
    t.start()
    time.sleep(a.idle_s)
    phase[0] = "load"
    here = os.path.dirname(os.path.abspath(__file__))
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, os.path.join(here, "scale.py"), "load", "--base", a.base, "--dir", a.dir,
         "--resources", str(a.resources)],
        check=True, stdout=subprocess.DEVNULL)
    load_s = time.monotonic() - t0
    phase[0] = "after"
    time.sleep(a.after_s)
    stop.set()
    t.join(timeout=600)

    result = {"label": a.label, "query": a.query, "resources": a.resources, "load_s": round(load_s, 2),
              "errors": len(errors)}
    for ph in ("idle", "load", "after"):
        xs = [ms for p, ms in samples if p == ph]
        stats = {"n": len(xs), "p50": percentile(xs, 50), "p95": percentile(xs, 95),
                 "max": max(xs) if xs else None}
        result[ph] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in stats.items()}
        print(f"{a.label} {ph:5}: {stats['n']:4} queries, p50 {fmt(stats['p50'])}, p95 {fmt(stats['p95'])}, "
              f"max {fmt(stats['max'])} ms")
    print(f"{a.label} load of {a.resources} resources: {load_s:.1f} s; errors {len(errors)}")
    print("search-during-load " + json.dumps(result))
    if errors:
        print("errors: " + ", ".join(map(str, errors[:5])), file=sys.stderr)
        sys.exit(1)


def fmt(x):
    return "-" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    main()
