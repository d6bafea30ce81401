#!/usr/bin/env bash
# The cluster benchmark in one invocation: a 3-node fhir-ledger cluster and a 3-member etcd
# cluster (Debian `etcd-server`, default fsync durability), all on loopback, then
# `fhir-ledger-bench cluster` against both at 1, 16 and 64 clients. Extra arguments go to
# `fhir-ledger-bench cluster`. Run from the repository root after `cargo build --release`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
bench_bin="${FHIR_LEDGER_BENCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger-bench}"
. "$root/tests/bench/lib.sh"
built "$bin" "$bench_bin"

if ! command -v etcd >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi

work="$(mktemp -d)"
on_exit_kill_pids_and_remove "$work"

export FHIR_LEDGER_ADMIN_TOKEN="bench-$(date +%s%N)"
fhir=()
for i in 1 2 3; do
  api=$(free_port); raft=$(free_port)
  "$bin" serve --node-id $i --listen 127.0.0.1:$api --raft-listen 127.0.0.1:$raft --auth off \
    --data-dir "$work/ledger$i" --secrets-dir "$work/secrets" 2>"$work/ledger$i.log" &
  pids+=($!)
  fhir+=("http://127.0.0.1:$api")
done
for u in "${fhir[@]}"; do
  for _ in $(seq 1 300); do curl -fs "$u/health" >/dev/null && break; sleep 0.1; done
done
"$bin" cluster init --node "${fhir[0]}" --member "${fhir[1]}" --member "${fhir[2]}" >/dev/null

cluster=""; etcd=()
declare -A peer client
for i in 1 2 3; do peer[$i]=$(free_port); client[$i]=$(free_port); cluster+="e$i=http://127.0.0.1:${peer[$i]},"; done
for i in 1 2 3; do
  etcd --name e$i --data-dir "$work/etcd$i" \
    --listen-peer-urls http://127.0.0.1:${peer[$i]} --initial-advertise-peer-urls http://127.0.0.1:${peer[$i]} \
    --listen-client-urls http://127.0.0.1:${client[$i]} --advertise-client-urls http://127.0.0.1:${client[$i]} \
    --initial-cluster "${cluster%,}" --initial-cluster-state new --log-level error 2>"$work/etcd$i.log" &
  pids+=($!)
  etcd+=("http://127.0.0.1:${client[$i]}")
done
for u in "${etcd[@]}"; do
  for _ in $(seq 1 300); do curl -fs "$u/health" | grep -q true && break; sleep 0.1; done
done

machine
echo "fhir-ledger: 3 nodes ($("$bin" --version)); etcd: 3 members ($(etcd --version | head -1))"
cd "$root"
"$bench_bin" cluster --fhir "$(IFS=,; echo "${fhir[*]}")" --etcd "$(IFS=,; echo "${etcd[*]}")" "$@"
