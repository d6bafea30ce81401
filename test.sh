#!/usr/bin/env bash
# Runs every test: unit, in-process HTTP, real-process (kill -9) and conformance with
# third-party clients. Installs what it needs (Python venv, npm packages) on a fresh machine.
# Builds once, in release, and reuses the target directory (CARGO_TARGET_DIR if set).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TERM_COLOR=never
target="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== build (release, once) =="
cargo build --release --locked --workspace --all-targets

echo "== cargo test: unit, in-process HTTP, real processes =="
cargo test --release --locked --workspace

echo "== install: cargo install --path ., then README's smoke test from outside the checkout =="
bash tests/install_smoke.sh

echo "== conformance: fhirclient, fhirpy, FHIR.js, @medplum/core, HAPI, fhir-sdk and the HL7 validator against real servers =="
FHIR_LEDGER_BIN="$target/release/fhir-ledger" bash conformance/run.sh
