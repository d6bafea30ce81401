#!/usr/bin/env bash
# Conformance: third-party FHIR clients and validators against a real fhir-ledger process.
# Installs what it needs (a Python venv, npm packages) on a fresh machine; needs no stdin.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${FHIR_LEDGER_BIN:-$here/../target/release/fhir-ledger}"
venv="${CONFORMANCE_VENV:-$HOME/.cache/fhir-ledger/conformance-venv}"

if [ ! -x "$venv/bin/pytest" ] || ! "$venv/bin/pip" freeze 2>/dev/null | grep -qxF -f <(grep -v '^#' "$here/requirements.txt"); then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r "$here/requirements.txt"
fi
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)

data="$(mktemp -d)"
log="$data/server.log"
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data/db" --auth off 2>"$log" &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 600); do
  base="$(sed -n 's/^fhir-ledger: listening on //p' "$log" | head -1)"
  [ -n "$base" ] && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$base" ] || { echo "server did not start"; cat "$log"; exit 1; }
export FHIR_BASE="$base"
echo "conformance: server at $FHIR_BASE"

(cd "$here" && "$venv/bin/pytest" -q -p no:cacheprovider tests)
(cd "$here" && node validate/validate.mjs --base "$FHIR_BASE")
(cd "$here" && node search/diff.mjs --base "$FHIR_BASE")
