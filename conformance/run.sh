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

# HAPI's client and the HL7 validator are Java (17) built with Maven; a first build downloads
# their artifacts from Maven Central into ~/.m2, later runs reuse them.
if ! command -v javac >/dev/null || ! command -v mvn >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq openjdk-17-jdk-headless maven >/dev/null
fi

data="$(mktemp -d)"
pid=""
smart_pid=""
cleanup() {
  for p in $pid $smart_pid ${base_proxy_pid:-} ${smart_proxy_pid:-}; do
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

# Every client reaches the servers through a recording proxy (record/proxy.py), so the HL7
# validator sees exactly what the clients received. A proxy starts first; its server learns the
# proxy's URL as its public URL and the proxy learns the server's address once it listens.
capture="$data/capture.ndjson"
# start_proxy NAME: starts a proxy recording into $capture; sets proxy_url and proxy_pid.
start_proxy() {
  local out="$data/$1-proxy.out"
  python3 -u "$here/record/proxy.py" --upstream-file "$data/$1.upstream" --out "$capture" >"$out" 2>&1 &
  proxy_pid=$!
  proxy_url=""
  for _ in $(seq 1 100); do
    proxy_url="$(sed -n 's/^proxy: listening on //p' "$out" | head -1)"
    [ -n "$proxy_url" ] && return 0
    sleep 0.05
  done
  echo "the recording proxy did not start" >&2; cat "$out" >&2; return 1
}

# One server without authorization (the client and validator tests) ...
start_proxy plain
base="$proxy_url" base_proxy_pid=$proxy_pid
log="$data/server.log"
# Both log a JSON line per request (FHIR_LEDGER_LOG=info): logs/no_phi.py checks at the end
# that no patient's name or id reached them.
env -u FHIR_LEDGER_PUBLIC_URL FHIR_LEDGER_LOG=info \
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$data/db" --auth off --log-format json 2>"$log" &
pid=$!
# ... and one with SMART authorization (test_smart*.py), its own data and admin token; its
# public URL is its proxy's (tokens name it as issuer and audience).
start_proxy smart
smart_base="$proxy_url" smart_proxy_pid=$proxy_pid
smart_log="$data/smart-server.log"
smart_admin_token="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
FHIR_LEDGER_ADMIN_TOKEN="$smart_admin_token" FHIR_LEDGER_PUBLIC_URL="$smart_base" FHIR_LEDGER_LOG=info \
  "$bin" serve --listen 127.0.0.1:0 --data-dir "$data/smart-db" --auth smart --log-format json 2>"$smart_log" &
smart_pid=$!

listening_base "$log" $pid >"$data/plain.upstream"
listening_base "$smart_log" $smart_pid >"$data/smart.upstream"
export FHIR_BASE="$base"
export SMART_BASE="$smart_base"
export SMART_ADMIN_TOKEN="$smart_admin_token"
echo "conformance: server at $FHIR_BASE, SMART server at $SMART_BASE (each through a recording proxy)"

(cd "$here" && "$venv/bin/pytest" -q -p no:cacheprovider tests)
(cd "$here" && node validate/validate.mjs --base "$FHIR_BASE")
# The search diff talks to the server directly: its 858 answers are big searchsets of the
# Synthea resources that the reads above already brought through the recording proxy, and
# validating each of them whole again took the validator most of an hour on 2 cores.
(cd "$here" && node search/diff.mjs --base "$(cat "$data/plain.upstream")")
(cd "$here" && node bulk/medplum-export.mjs --base "$FHIR_BASE")
bash "$here/hapi-client/run.sh"
bash "$here/fhir-sdk-client/run.sh"
python3 "$here/logs/no_phi.py" --base "$(cat "$data/plain.upstream")" "$log" "$smart_log"
# CONFORMANCE_CAPTURE_OUT=FILE keeps a copy of the capture, to re-run the validator on it alone.
if [ -n "${CONFORMANCE_CAPTURE_OUT:-}" ]; then cp "$capture" "$CONFORMANCE_CAPTURE_OUT"; fi
# Last: everything any client received, through the official HL7 validator (0 errors, or fail).
bash "$here/hl7-validator/run.sh" "$capture"
