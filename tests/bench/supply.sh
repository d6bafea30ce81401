#!/usr/bin/env bash
# Supply-chain benchmark (issue 20) in one invocation, against a fresh fhir-ledger process
# (auth off: every event is vouched for by its partner's Ed25519 signature) and a throwaway
# PostgreSQL holding the same events as JSONB under a GIN index (jsonb_path_ops), both with
# fsync and synchronous commits (`fhir-ledger-bench supply`):
#   1. EPCIS capture of the first $MEASURED_CHAINS custody chains (10 events each; documents
#      of 100 events of one partner, 4 clients): each event's schema, CBV vocabularies, Event
#      Hash ID and partner signature checked; the same documents into PostgreSQL, one
#      transaction each;
#   2. the rest of $CHAINS chains into both (10^6 events by default);
#   3. once the server has settled (folded its index, compacted: under 5% of a core for 2 s,
#      as tests/bench/scale.sh waits), $SAMPLES sequential `$verify-product` and 10-step
#      `$trace` requests at random chains, beside the GIN lookups a JSONB repository answers
#      them with.
# Run from the repository root after `cargo build --release`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="${FHIR_LEDGER_BIN:-$target/release/fhir-ledger}"
bench="${FHIR_LEDGER_BENCH_BIN:-$target/release/fhir-ledger-bench}"
. "$root/tests/bench/lib.sh"
built "$bin" "$bench"
postgres_bin

work="$(mktemp -d -p "${BENCH_DIR:-/tmp}")"
chmod 755 "$work"
servers=""
cleanup() {
  for p in $servers; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  stop_postgres "$work/pg"
  rm -rf "$work"
}
trap cleanup EXIT
machine

start_server "$work/server.log" --data-dir "$work/data" --profiles-dir "$root/fhir-profiles"
servers="$server"
start_postgres "$work/pg"

"$bench" supply --base "$base" --postgres "host=127.0.0.1 port=$pgport user=postgres" \
  --chains "${CHAINS:-100000}" --measured-chains "${MEASURED_CHAINS:-10000}" --samples "${SAMPLES:-2000}" \
  --server-pid "$server" ${JSON_OUT:+--json-out "$JSON_OUT"}
echo "server RSS at the end: $(ps -o rss= -p "$server" | awk '{printf "%.0f MB", $1/1024}'); data dir $(du -sh "$work/data" | cut -f1)"
