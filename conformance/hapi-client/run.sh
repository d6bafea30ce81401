#!/usr/bin/env bash
# HAPI FHIR generic-client conformance checks (Java 17, Maven) against a running fhir-ledger.
#
# Needs FHIR_BASE (a server with --auth off), SMART_BASE and SMART_ADMIN_TOKEN (a server with
# --auth smart), as conformance/run.sh exports them. Builds on first use and whenever pom.xml or
# src/ changed (Maven's cache is ~/.m2, the build goes to target/ here). Prints one line per
# check and a summary; exits non-zero if any check fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export HAPI_SYNTHEA_BUNDLE="${HAPI_SYNTHEA_BUNDLE:-$repo/../shared/data/synthea/patient-01.json}"

stamp="$here/target/.built"
if [ ! -f "$stamp" ] || [ -n "$(find "$here/pom.xml" "$here/src" -newer "$stamp" -print -quit)" ]; then
  echo "hapi-client: building (mvn; the first build downloads HAPI FHIR into ~/.m2)"
  rm -rf "$here/target/classes" "$here/target/lib"
  mkdir -p "$here/target"
  touch "$stamp.new" # a source changed during the build is newer than this, so rebuilt next time
  # Maven's own output only matters when the build fails.
  if ! (cd "$here" && mvn -q -B process-classes) >"$here/target/build.log" 2>&1; then
    cat "$here/target/build.log" >&2
    echo "hapi-client: build failed" >&2
    exit 1
  fi
  mv "$stamp.new" "$stamp"
fi

exec java -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
  -cp "$here/target/classes:$here/target/lib/*" org.fhirledger.conformance.Main
