#!/usr/bin/env python3
"""Helpers of tests/bench/scale.sh (standard library only).

  count    prints how many resources (entries) the transaction bundles of a directory hold.
  load     posts Synthea transaction bundles from one or more directories (each in name order,
           the directories in the order given; cycling only if they run out) from a given
           bundle, with N concurrent clients (one keep-alive connection each), until at least a
           given number of resources has been sent; prints "RESOURCES SECONDS NEXT_BUNDLE".
           Every entry is a POST with urn:uuid references, so every resource is new.
  step     folds one step's measurements and search.py's --json output into one JSON object,
           appends it to a file and prints it as the step's machine-readable line.
  report   prints the table of every step and the targets, PASS or FAIL each, and the
           machine-readable result line; exits 1 when a target fails.
"""

import argparse
import hashlib
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from search import pct  # noqa: E402  (the same percentile search.py reports)


# ---------------------------------------------------------------------------------------------
# load


def bundle_entries(directory):
    """[(path, entries)] in name order; the counts are cached outside DIR (which may be shared
    data another tool reads), in ~/.cache/fhir-ledger/entries/<hash of DIR's path>.tsv."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
    cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "fhir-ledger", "entries")
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha256(os.path.abspath(directory).encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, key + ".tsv")
    counts = {}
    if os.path.exists(cache):
        with open(cache) as f:
            counts = {n: int(c) for n, c in (line.rstrip("\n").split("\t") for line in f if line.strip())}
    if set(counts) != set(names):
        counts = {}
        for n in names:
            with open(os.path.join(directory, n), "rb") as f:
                counts[n] = len(json.load(f).get("entry", []))
        with open(cache + ".tmp", "w") as f:
            f.writelines(f"{n}\t{counts[n]}\n" for n in names)
        os.replace(cache + ".tmp", cache)
    return [(os.path.join(directory, n), counts[n]) for n in names]


def load(a):
    bundles = [b for d in a.dir for b in bundle_entries(d)]
    if not bundles:
        sys.exit(f"no bundles in {', '.join(a.dir)}")
    jobs, n, i = [], 0, a.start
    while n < a.resources:
        jobs.append(bundles[i % len(bundles)])
        n += bundles[i % len(bundles)][1]
        i += 1
    u = urllib.parse.urlparse(a.base)
    lock = threading.Lock()
    state = {"next": 0, "errors": []}

    def client():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        while True:
            with lock:
                if state["next"] >= len(jobs) or state["errors"]:
                    break
                path, _ = jobs[state["next"]]
                state["next"] += 1
            with open(path, "rb") as f:
                body = f.read()
            try:
                conn.request("POST", u.path.rstrip("/") + "/", body=body,
                             headers={"content-type": "application/fhir+json", "accept": "application/fhir+json"})
                r = conn.getresponse()
                answer = r.read()
                ok = r.status == 200
            except (http.client.HTTPException, OSError) as e:
                ok, answer = False, str(e).encode()
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
            if not ok:
                with lock:
                    state["errors"].append(f"{os.path.basename(path)}: {answer[:300]!r}")
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - start
    if state["errors"]:
        sys.exit(f"{len(state['errors'])} transaction bundle(s) failed, e.g. {state['errors'][0]}")
    print(n, f"{secs:.3f}", i % len(bundles))


# ---------------------------------------------------------------------------------------------
# step and report


def class_labels(results):
    """search.py's class names, with the resource type added where a name repeats (_include)."""
    names = [r["name"] for r in results]
    return [r["name"] if names.count(r["name"]) == 1 else f"{r['name']} {r['example'].split('?')[0]}" for r in results]


def step(a):
    with open(a.search_json) as f:
        results = json.load(f)
    rec = {
        "step": a.step, "unit": a.unit, "resources": a.resources,
        "ingest_resources": a.ingest_resources, "ingest_s": a.ingest_s,
        "ingest_rps": round(a.ingest_resources / a.ingest_s, 1),
        "rss_kb": a.rss_kb, "rss_peak_kb": a.rss_peak_kb, "data_dir_bytes": a.data_dir_bytes,
        "shutdown_s": a.shutdown_s, "restart_s": a.restart_s, "rss_after_restart_kb": a.rss_after_restart_kb,
        "step_s": a.step_s, "settle_s": a.settle_s,
        "search_n": {}, "search_p50_ms": {}, "search_p95_ms": {}, "search_errors": {},
    }
    for label, r in zip(class_labels(results), results):
        p95 = pct(r["ledger"], 95)
        p50 = pct(r["ledger"], 50)
        rec["search_n"][label] = len(r["ledger"])
        rec["search_p50_ms"][label] = round(p50, 3) if p50 is not None else None
        rec["search_p95_ms"][label] = round(p95, 3) if p95 is not None else None
        rec["search_errors"][label] = sum(len(v) for v in r["errors"].values())
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print("scale-step " + json.dumps(rec, separators=(",", ":")))


def mb(kb=None, b=None):
    return (kb * 1024 if kb is not None else b) / 1e6


def report(a):
    with open(a.file) as f:
        steps = [json.loads(line) for line in f if line.strip()]
    first, last = steps[0], steps[-1]
    fx, lx = f"{first['step']}x", f"{last['step']}x"
    labels = list(first["search_p95_ms"])
    checks = []  # (what, result text, passed)

    def check(what, passed, detail):
        checks.append((what, passed, detail))

    rss_ratio = last["rss_kb"] / first["rss_kb"]
    check(f"RSS at {lx} <= 1.5 GB", mb(last["rss_kb"]) <= 1500, f"{mb(last['rss_kb']):.0f} MB")
    check(f"RSS at {lx} <= 1.2x RSS at {fx}", rss_ratio <= 1.2, f"{rss_ratio:.2f}x")
    worst = max(steps, key=lambda s: s["restart_s"])
    check("restart to first answer < 3 s at every step", all(s["restart_s"] < 3 for s in steps),
          f"max {worst['restart_s']:.2f} s (at {worst['step']}x)")
    ing = last["ingest_rps"] / first["ingest_rps"]
    check(f"ingest at {lx} >= 0.9x ingest at {fx}", ing >= 0.9, f"{ing:.2f}x")
    for label in labels:
        p1, pn = first["search_p95_ms"][label], last["search_p95_ms"].get(label)
        errs = sum(s["search_errors"].get(label, 0) for s in steps)
        if errs or p1 is None or pn is None:
            check(f"search {label}: p95 at {lx} <= 1.5x p95 at {fx}", False, f"{errs} errors")
        else:
            check(f"search {label}: p95 at {lx} <= 1.5x p95 at {fx}", pn <= 1.5 * p1, f"{pn / p1:.2f}x")
    sorts = [s["search_p95_ms"].get("_sort") for s in steps]
    check("search _sort: p95 < 20 ms at every step", all(x is not None and x < 20 for x in sorts),
          f"max {max((x for x in sorts if x is not None), default=float('nan')):.1f} ms")

    cols = [f"{s['step']}x" for s in steps]
    rows = [
        ("resources", [f"{s['resources']:,}" for s in steps]),
        ("data dir, MB", [f"{mb(b=s['data_dir_bytes']):,.0f}" for s in steps]),
        ("server RSS after load (quiet), MB", [f"{mb(s['rss_kb']):,.0f}" for s in steps]),
        ("server peak RSS so far (VmHWM), MB", [f"{mb(s['rss_peak_kb']):,.0f}" for s in steps]),
        ("SIGTERM to exit, s", [f"{s['shutdown_s']:.2f}" for s in steps]),
        ("restart to first answer, s", [f"{s['restart_s']:.2f}" for s in steps]),
        ("server RSS after restart (quiet), MB", [f"{mb(s['rss_after_restart_kb']):,.0f}" for s in steps]),
        ("ingest of the step, resources/s (4 clients)",
         [f"{s['ingest_rps']:,.0f} ({s['ingest_resources']:,} in {s['ingest_s']:.1f} s)" for s in steps]),
    ]
    rows.append(("settle after the load (index folded and compacted), s",
                 [f"{s['settle_s']:.0f}" if "settle_s" in s else "—" for s in steps]))
    rows.append(("wall time of the step (load, quiet, settle, searches, restart), s",
                 [f"{s['step_s']:.0f}" for s in steps]))
    for label in labels:
        rows.append((f"search p95 ms: {label}", [
            ("—" if s["search_p95_ms"].get(label) is None else f"{s['search_p95_ms'][label]:.2f}")
            + (f" ({s['search_errors'][label]} errors)" if s["search_errors"].get(label) else "") for s in steps]))
    print(f"| scale (1x = {first['unit']:,} resources) | " + " | ".join(cols) + " |")
    print("| --- | " + " | ".join("---" for _ in cols) + " |")
    for name, vals in rows:
        print(f"| {name} | " + " | ".join(vals) + " |")
    print()
    print("| target | measured | result |")
    print("| --- | --- | --- |")
    for what, passed, detail in checks:
        print(f"| {what} | {detail} | {'PASS' if passed else 'FAIL'} |")
    failed = sum(not p for _, p, _ in checks)
    print()
    print(f"{len(checks) - failed} of {len(checks)} targets met" + (f", {failed} FAILED" if failed else ""))
    print("scale-result " + json.dumps({
        "pass": not failed, "first_step": first["step"], "last_step": last["step"], "unit": first["unit"],
        "targets": {what: {"measured": detail, "pass": passed} for what, passed, detail in checks}},
        separators=(",", ":")))
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description="helpers of tests/bench/scale.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("load", help="post transaction bundles until N resources are sent")
    lp.add_argument("--base", required=True)
    lp.add_argument("--dir", required=True, action="append",
                    help="a directory of transaction bundles (*.json); repeat for more, posted in that order")
    lp.add_argument("--resources", type=int, required=True, help="send bundles until at least this many entries")
    lp.add_argument("--start", type=int, default=0, help="index of the first bundle to send, counting across the directories in order")
    lp.add_argument("--clients", type=int, default=4)
    cp = sub.add_parser("count", help="resources in a directory's transaction bundles")
    cp.add_argument("--dir", required=True)
    sp = sub.add_parser("step", help="record one step")
    sp.add_argument("--out", required=True, help="JSON-lines file to append to")
    sp.add_argument("--search-json", required=True, help="search.py --json output of the step")
    for name, typ in [("step", int), ("unit", int), ("resources", int), ("ingest-resources", int),
                      ("ingest-s", float), ("rss-kb", int), ("rss-peak-kb", int), ("data-dir-bytes", int),
                      ("shutdown-s", float), ("restart-s", float), ("rss-after-restart-kb", int),
                      ("step-s", float), ("settle-s", float)]:
        sp.add_argument(f"--{name}", type=typ, required=True)
    rp = sub.add_parser("report", help="table and targets of every step")
    rp.add_argument("file", help="the JSON-lines file of the steps")
    a = ap.parse_args()
    if a.cmd == "count":
        print(sum(n for _, n in bundle_entries(a.dir)))
    elif a.cmd == "load":
        load(a)
    elif a.cmd == "step":
        step(a)
    else:
        sys.exit(report(a))


if __name__ == "__main__":
    main()
