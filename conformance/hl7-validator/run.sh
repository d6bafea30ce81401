#!/usr/bin/env bash
# The official HL7 FHIR validator (HAPI FHIR's FhirInstanceValidator), run offline as a library
# over every resource a recording proxy captured from fhir-ledger.
#
#   bash conformance/hl7-validator/run.sh CAPTURE.ndjson [--report report.json] [--threads N]
#        [--us-core FILE] [--fresh-validator-per-resource]
#
# CAPTURE.ndjson: one {"request": "GET /Patient/1", "status": 200, "resource": {...}} a line.
# Exit 0: no error; 1: the validator found errors; 2: bad input, usage, or a network attempt.
# Builds on first use (and after a change to pom.xml or src/) with Maven into target/; needs Java 17.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
classpath="$here/target/classpath.txt"

if [ ! -s "$classpath" ] || [ -n "$(find "$here/pom.xml" "$here/src" -newer "$classpath" -print -quit)" ]; then
  echo "hl7-validator: building (Maven; the first build downloads HAPI FHIR into ~/.m2)" >&2
  rm -f "$classpath"
  # Maven's output only when it fails (quiet mode still prints terminal resets).
  log="$(mktemp)"
  if ! (cd "$here" && mvn -B -q compile dependency:build-classpath -Dmdep.outputFile="$classpath") >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log" "$classpath"
    echo "hl7-validator: the build failed" >&2
    exit 2
  fi
  rm -f "$log"
fi

# Serial GC with a 1 GB young generation: the least CPU and GC pause measured here (2 cores; a
# parallel collector's threads compete with the 2 validator threads; a small young generation
# collects ~4 times as often).
# LenientErrorHandler: HAPI warns 3 times at startup about its own bundled definitions.
# The US Core definitions default to the shared data beside the repository; --us-core overrides.
exec java -XX:+UseSerialGC -Xmn1g -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
  -Dorg.slf4j.simpleLogger.log.ca.uhn.fhir.parser.LenientErrorHandler=error \
  -cp "$here/target/classes:$(cat "$classpath")" org.fhirledger.hl7validator.Main \
  --us-core "$repo/../shared/data/fhir-r4/uscore-v5.0.1-structuredefinitions.json" \
  --known-data-errors "$here/known-data-errors.json" "$@"
