#!/usr/bin/env bash
# The benchmark in one invocation: a fresh fhir-ledger process and a throwaway PostgreSQL
# (fsync=on, synchronous_commit=on) on loopback, then `fhir-ledger-bench load` against
# both. Extra arguments go to `fhir-ledger-bench load`. Run from the repository root after
# `cargo build --release`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
bench_bin="${FHIR_LEDGER_BENCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger-bench}"
. "$root/tests/bench/lib.sh"
built "$bin" "$bench_bin"

postgres_bin

work="$(mktemp -d)"
chmod 755 "$work"
cleanup() {
  if [ -n "${server:-}" ]; then kill -9 "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi || true
  stop_postgres "$work/pg"
  rm -rf "$work"
}
trap cleanup EXIT

start_postgres "$work/pg"

start_server "$work/server.log" --data-dir "$work/ledger"

machine
echo "postgres: $("$pgbin/postgres" --version) on port $pgport"
cd "$root"
"$bench_bin" load --base "$base" --postgres "host=127.0.0.1 port=$pgport user=postgres dbname=postgres" "$@"
echo "ledger data dir after the run: $(du -sh "$work/ledger" | cut -f1)"
