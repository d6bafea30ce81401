#!/usr/bin/env bash
# fhir-sdk (crates.io; Rust, R4B models + REST client) against a fhir-ledger server started
# with --auth off at $FHIR_BASE. Builds the client, runs it; exit status 1 if a check fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
: "${FHIR_BASE:?set FHIR_BASE to the base URL of a fhir-ledger server run with --auth off}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/target}"
# The repository's shared/ sits beside the checkout (as conformance/tests/conftest.py expects).
data="$here/../../../shared/data"
export SYNTHEA_BUNDLE="${SYNTHEA_BUNDLE:-$data/synthea/patient-01.json}"
export R4_EXAMPLES_DIR="${R4_EXAMPLES_DIR:-$data/hl7-r4-examples}"

# Dev profile: its cold build is the faster one on 2 cores (README), and the run is ~2 s.
cargo build --locked --quiet --manifest-path "$here/Cargo.toml"
exec "$CARGO_TARGET_DIR/debug/fhir-sdk-client"
