#!/usr/bin/env bash
# Searches during a large load (issue 17), in one invocation: a fresh fhir-ledger is filled with
# --prefill resources and left to settle; then two copies of its data directory each take a
# load of --resources more (4 clients, `scale.py load`), the first without searches (the
# baseline load time), the second with one search repeated every 50 ms from 10 s before the
# load to 20 s after it (search_during_load.py). Reports per phase the searches' count, p50,
# p95 and max, and both load times.
#
# Usage: tests/bench/search_during_load.sh [--prefill N] [--resources N] [--dir BUNDLES] [--keep DIR]
#          [--before BIN]
#   --prefill N     resources in the store before the load (default 225000; 0 starts empty)
#   --resources N   resources of the measured load (default 225000)
#   --dir BUNDLES   transaction bundles to post (default ../shared/data/synthea, posted over
#                   and over: each pass creates new resources)
#   --keep DIR      the filled data directory: reused when it exists (skips the prefill),
#                   else made there and kept
#   --before BIN    also measure BIN (e.g. the build of the commit before a change), first,
#                   on copies of the same directory
# Run from the repository root after `cargo build --release` (or set FHIR_LEDGER_BIN).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
. "$root/tests/bench/lib.sh"
built "$bin"
prefill=225000 resources=225000 dir="$root/../shared/data/synthea" keep="" before=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefill) prefill="$2"; shift 2 ;;
    --resources) resources="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    --before) before="$2"; shift 2 ;;
    *) sed -n '/^# Usage:/,/^# Run from/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
export FHIR_LEDGER_ADMIN_TOKEN="${FHIR_LEDGER_ADMIN_TOKEN:-bench-admin-token}"
work="$(mktemp -d)"
server=""
on_exit_kill_server_and_remove "$work"
serve_on() { start_server "$work/server.log" --data-dir "$1" --profiles-dir "$root/fhir-profiles" --max-body-bytes 134217728; }
stop() { kill -TERM "$server"; wait "$server" 2>/dev/null || true; server=""; }

filled="${keep:-$work/filled}"
if [ ! -d "$filled" ]; then
  mkdir -p "$filled"
  serve_on "$filled"
  if [ "$prefill" -gt 0 ]; then
    python3 "$root/tests/bench/scale.py" load --base "$base" --dir "$dir" --resources "$prefill" >/dev/null
  fi
  wait_folded "$base"
  wait_idle "$server"
  stop
fi

machine
echo "bundles: $dir; store before the load: $filled ($(du -sh "$filled" | cut -f1))"
bins=("$bin")
if [ -n "$before" ]; then bins=("$before" "$bin"); fi
for b in "${bins[@]}"; do
  echo "binary: $b"
  for run in baseline searches; do
    rm -rf "$work/copy"
    cp -a "$filled" "$work/copy"
    bin="$b" serve_on "$work/copy"
    wait_folded "$base"
    wait_idle "$server"
    if [ "$run" = baseline ]; then
      t0=$(date +%s.%N)
      python3 "$root/tests/bench/scale.py" load --base "$base" --dir "$dir" --resources "$resources" >/dev/null
      t1=$(date +%s.%N)
      echo "baseline: load of $resources resources without searches: $(python3 -c "print(f'{$t1 - $t0:.1f}')") s"
    else
      python3 "$root/tests/bench/search_during_load.py" --base "$base" --dir "$dir" --resources "$resources" \
        --label "with searches"
    fi
    stop
  done
done
