#!/usr/bin/env bash
# Writes during snapshot builds, in one invocation: starts fhir-ledger (one node, or a 3-node
# cluster with --nodes 3), loads the 100 Synthea patients of verify.sh into it (about 223,000
# resources, so a build has a real state to stream), waits until it is quiet, then runs
# `fhir-ledger-bench snapshot`: 64 clients creating 1 KB Patients while every node builds its
# Raft snapshot again and again (`POST /admin/snapshot`, 2 s apart), the writes that overlapped
# a build reported apart from the others. Extra arguments go to `fhir-ledger-bench snapshot`
# (--clients, --seconds, --pause, --json-out). Run from the repository root after
# `cargo build --release`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
bench_bin="${FHIR_LEDGER_BENCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger-bench}"
cache="${SYNTHEA100:-$HOME/.cache/fhir-ledger/synthea100}"
. "$root/tests/bench/lib.sh"
built "$bin" "$bench_bin"

nodes=1
if [ "${1:-}" = "--nodes" ]; then nodes="$2"; shift 2; fi
[ "$nodes" = 1 ] || [ "$nodes" = 3 ] || { echo "--nodes: 1 or 3" >&2; exit 2; }

synthea100 "$cache"

work="$(mktemp -d)"
on_exit_kill_pids_and_remove "$work"

export FHIR_LEDGER_ADMIN_TOKEN="bench-$(date +%s%N)"
fhir=()
for i in $(seq 1 "$nodes"); do
  api=$(free_port)
  cluster_args=()
  [ "$nodes" = 1 ] || cluster_args=(--node-id "$i" --raft-listen "127.0.0.1:$(free_port)" --secrets-dir "$work/secrets")
  "$bin" serve --listen 127.0.0.1:$api --auth off --data-dir "$work/ledger$i" --profiles-dir "$root/fhir-profiles" \
    --max-body-bytes 134217728 "${cluster_args[@]}" 2>"$work/ledger$i.log" &
  pids+=($!)
  fhir+=("http://127.0.0.1:$api")
done
for u in "${fhir[@]}"; do
  for _ in $(seq 1 300); do curl -fs "$u/health" >/dev/null && break; sleep 0.1; done
done
if [ "$nodes" = 3 ]; then
  "$bin" cluster init --node "${fhir[0]}" --member "${fhir[1]}" --member "${fhir[2]}" >/dev/null
fi

machine
echo "fhir-ledger: $nodes node(s) ($("$bin" --version), $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?') checked out)"
start=$(date +%s.%N)
ls "$cache"/fhir/*.json | xargs -P4 -I{} sh -c \
  'code=$(curl -s -o /dev/null -w "%{http_code}" -X POST "$0/" -H "Expect:" -H "content-type: application/fhir+json" --data-binary @"$1"); [ "$code" = 200 ] || { echo "$1: HTTP $code" >&2; exit 255; }' "${fhir[0]}" {}
echo "loaded $(ls "$cache"/fhir/*.json | wc -l) Synthea patients in $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
for i in "${!fhir[@]}"; do
  wait_folded "${fhir[$i]}"
  wait_idle "${pids[$i]}"
done

cd "$root"
"$bench_bin" snapshot --fhir "$(IFS=,; echo "${fhir[*]}")" "$@"
for i in "${!fhir[@]}"; do
  echo "node $((i + 1)) data dir after: $(du -sm "$work/ledger$((i + 1))" | cut -f1) MB"
done
