#!/usr/bin/env bash
# README's install, as a new user does it: `cargo install --path .` (into a temporary root),
# then, from a directory outside the checkout, `fhir-ledger serve` and README's smoke test:
# metadata, create, read, search. With CARGO_TARGET_DIR set (test.sh, .ci/run) the install
# reuses the release build.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

cargo install --locked --quiet --path "$repo" --root "$work/root" --bin fhir-ledger
bin="$work/root/bin/fhir-ledger"
mkdir "$work/elsewhere" && cd "$work/elsewhere"
case "$PWD" in "$repo"*) echo "install smoke: $PWD is inside the checkout" >&2; exit 1 ;; esac
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$bin" serve --auth off --listen "127.0.0.1:$port" > serve.log 2>&1 &
pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 300); do
  curl -sf -o /dev/null "$base/metadata" && break
  kill -0 "$pid" 2>/dev/null || { cat serve.log >&2; echo "install smoke: the server exited" >&2; exit 1; }
  sleep 0.1
done
fail() { echo "install smoke: $1" >&2; cat serve.log >&2; exit 1; }
curl -sf "$base/metadata" | grep -q '"resourceType":"CapabilityStatement"' || fail "no CapabilityStatement at /metadata"
created="$(curl -sf -X POST "$base/Patient" -H 'content-type: application/fhir+json' \
  -d '{"resourceType":"Patient","identifier":[{"system":"urn:mrn","value":"42"}],"name":[{"family":"Chalmers"}]}')" \
  || fail "create refused"
id="$(printf '%s' "$created" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
curl -sf "$base/Patient/$id" | grep -q '"family":"Chalmers"' || fail "read of Patient/$id"
curl -sf "$base/Patient?identifier=urn:mrn%7C42" | grep -q '"total":1' || fail "search by identifier"
[ -d data/ledger ] || fail "no ./data/ledger in the working directory"
echo "install smoke: $(basename "$bin") installed by cargo install serves README's smoke test from $PWD"
