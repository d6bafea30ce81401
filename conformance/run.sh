#!/usr/bin/env bash
# Conformance: third-party FHIR clients and validators against a real fhir-ledger process.
# Installs what it needs (a Python venv, npm packages) on a fresh machine; needs no stdin.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${FHIR_LEDGER_BIN:-$here/../target/release/fhir-ledger}"
venv="${CONFORMANCE_VENV:-$HOME/.cache/fhir-ledger/conformance-venv}"

# Every pinned line must be in the venv (not just one of them), else (re)install.
missing_requirements() {
  grep -v '^#' "$here/requirements.txt" | grep -v '^[[:space:]]*$' \
    | grep -vxF -f <("$venv/bin/pip" freeze 2>/dev/null || true)
}
if [ ! -x "$venv/bin/pytest" ] || missing_requirements >/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r "$here/requirements.txt"
fi
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)

# The SMART browser tests drive Debian's Chromium through Debian's chromedriver (Selenium).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
export SE_OFFLINE=true # Selenium Manager must never download a driver or a browser

data="$(mktemp -d)"
pid=""
smart_pid=""
cleanup() {
  for p in $pid $smart_pid; do
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$data"
}
trap cleanup EXIT

# listening_base LOG PID: the base URL the server at PID printed into LOG once it listens.
listening_base() {
  local log="$1" p="$2" url=""
  for _ in $(seq 1 600); do
    url="$(sed -n 's/^fhir-ledger: listening on //p' "$log" | head -1)"
    [ -n "$url" ] && break
    kill -0 "$p" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.1
  done
  [ -n "$url" ] || { echo "server did not start" >&2; cat "$log" >&2; return 1; }
  echo "$url"
}

# One server without authorization (the client and validator tests) ...
log="$data/server.log"
env -u FHIR_LEDGER_PUBLIC_URL "$bin" serve --listen 127.0.0.1:0 --data-dir "$data/db" --auth off 2>"$log" &
pid=$!
# ... and one with SMART authorization (test_smart*.py), its own data and admin token; its
# public URL is the address it binds (no FHIR_LEDGER_PUBLIC_URL from the caller's environment).
smart_log="$data/smart-server.log"
smart_admin_token="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
FHIR_LEDGER_ADMIN_TOKEN="$smart_admin_token" env -u FHIR_LEDGER_PUBLIC_URL \
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$data/smart-db" --auth smart 2>"$smart_log" &
smart_pid=$!

base="$(listening_base "$log" $pid)"
smart_base="$(listening_base "$smart_log" $smart_pid)"
export FHIR_BASE="$base"
export SMART_BASE="$smart_base"
export SMART_ADMIN_TOKEN="$smart_admin_token"
echo "conformance: server at $FHIR_BASE, SMART server at $SMART_BASE"

(cd "$here" && "$venv/bin/pytest" -q -p no:cacheprovider tests)
(cd "$here" && node validate/validate.mjs --base "$FHIR_BASE")
(cd "$here" && node search/diff.mjs --base "$FHIR_BASE")
(cd "$here" && node bulk/medplum-export.mjs --base "$FHIR_BASE")
