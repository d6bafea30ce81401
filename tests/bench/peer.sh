#!/usr/bin/env bash
# fhir-ledger beside a HAPI FHIR JPA server, in one invocation, with the same driver and data.
#
# HAPI: tests/bench/hapi-jpa (HAPI FHIR 8.8.0 JPA server on Spring Boot 3.5.7 from Maven
# Central, built here once with `mvn -q -B package`, rebuilt only when its sources change) on a
# throwaway PostgreSQL from Debian (fsync=on, synchronous_commit=on: the durability fhir-ledger
# gives), both on loopback. tests/bench/hapi-jpa/README.md lists every non-default setting and why.
# fhir-ledger: a fresh process, authorization off (as run.sh).
#
#  1. Search data: the first SEARCH_PATIENTS of the 100 Synthea patients of search.sh, rewritten
#     by synthea_put.py as PUT transactions with client-assigned ids, so that both servers hold
#     the same resources under the same ids; posted to each with SEARCH_LOAD_CLIENTS (timed, reported for
#     information), then VACUUM ANALYZE of HAPI's database (a production database would have been
#     autovacuumed by then).
#  2. Searches: tests/bench/search.py --peer, the classes of search.sh, alternating fhir-ledger,
#     the PostgreSQL baseline of search.sh (the referee for the answers) and HAPI query by query;
#     SEARCH_WARMUP unmeasured queries per class first.
#  3. Warm-up (discarded): fhir-ledger-bench load with WARMUP_PCT % of the work of step 4, against
#     both servers: the JVM's JIT compiles HAPI's write and read paths before anything is measured.
#  4. fhir-ledger-bench load against fhir-ledger, then against HAPI: Synthea transaction ingest
#     (INGEST_CLIENTS clients), single creates (CLIENTS clients), reads by id (open loop, READ_RATE/s).
#  5. The Markdown table: every figure, fhir-ledger beside HAPI JPA, and the ratio (> 1: fhir-ledger
#     better: throughput fhir-ledger / HAPI, latency HAPI / fhir-ledger).
#
# Knobs (environment), defaults for the full run first:
#   PATIENTS=all       ingest bundles of INGEST_SYNTHEA (default ../shared/data/synthea, run.sh's
#                      25 patients; the first 25 of the synthea100 cache when that is absent)
#   SEARCH_PATIENTS=100  search data (0: skip steps 1-2)
#   CREATES=20000 READS=20000 READ_RATE=2000 CLIENTS=32 INGEST_CLIENTS=4 INGEST_REPEAT=1
#   SEARCH_N=200 SEARCH_WARMUP=50 SEARCH_LOAD_CLIENTS=2 WARMUP_PCT=10
#   HAPI_XMX=4g        HAPI's heap (-Xms = -Xmx)
#   HAPI_SEARCH_CACHE_MS=60000  HAPI's search-result reuse window (its default; 0 turns it off)
#   HAPI_JAVA=java     the JVM that runs HAPI (Java 17+)
# A smoke run (about 8 min): PATIENTS=10 SEARCH_PATIENTS=10 CREATES=2000 READS=2000 SEARCH_N=40 SEARCH_WARMUP=10 tests/bench/peer.sh
# The full run took 11 min on a quiet 2-core machine (BENCHMARKS.md), most of it HAPI loading the search data.
# Extra arguments go to search.py (e.g. --only token,string).
# Run from the repository root after `cargo build --release`; needs java and mvn (Maven Central).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
bench_bin="${FHIR_LEDGER_BENCH_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger-bench}"
cache="${SYNTHEA100:-$HOME/.cache/fhir-ledger/synthea100}"
venv="${BENCH_VENV:-$HOME/.cache/fhir-ledger/bench-venv}"
ingest_src="${INGEST_SYNTHEA:-$root/../shared/data/synthea}"
hapi_dir="$root/tests/bench/hapi-jpa"
hapi_java="${HAPI_JAVA:-java}"
PATIENTS="${PATIENTS:-all}"
SEARCH_PATIENTS="${SEARCH_PATIENTS:-100}"
CREATES="${CREATES:-20000}"
READS="${READS:-20000}"
READ_RATE="${READ_RATE:-2000}"
CLIENTS="${CLIENTS:-32}"
INGEST_CLIENTS="${INGEST_CLIENTS:-4}"
INGEST_REPEAT="${INGEST_REPEAT:-1}"
SEARCH_N="${SEARCH_N:-200}"
SEARCH_WARMUP="${SEARCH_WARMUP:-50}"
SEARCH_LOAD_CLIENTS="${SEARCH_LOAD_CLIENTS:-2}"
WARMUP_PCT="${WARMUP_PCT:-10}"
HAPI_XMX="${HAPI_XMX:-4g}"
HAPI_SEARCH_CACHE_MS="${HAPI_SEARCH_CACHE_MS:-60000}"
. "$root/tests/bench/lib.sh"
built "$bin" "$bench_bin"
command -v "$hapi_java" >/dev/null && command -v mvn >/dev/null || { echo "peer.sh needs java (17+) and mvn for HAPI" >&2; exit 1; }

synthea100 "$cache"
bench_venv "$venv"
postgres_bin

# --- the HAPI jar, built when its sources changed --------------------------------------------
jar="$hapi_dir/target/hapi-jpa-peer.jar"
sources="$(cd "$hapi_dir" && find pom.xml src -type f | sort | xargs sha256sum | sha256sum | cut -c1-16)"
if [ -f "$jar" ] && [ "$(cat "$hapi_dir/target/sources.sha256" 2>/dev/null)" = "$sources" ]; then
  echo "HAPI jar: $jar (sources unchanged, reused)"
else
  echo "HAPI jar: building with mvn -q -B package (the first build downloads about 300 MB from Maven Central) ..."
  t0=$(date +%s.%N)
  (cd "$hapi_dir" && mvn -q -B package 2>&1 | sed 's/\x1b\[0m//g')
  echo "$sources" >"$hapi_dir/target/sources.sha256"
  echo "HAPI jar: built in $(python3 -c "print(round($(date +%s.%N) - $t0))") s"
fi

work="$(mktemp -d)"
chmod 755 "$work"
hapi_pid=""
cleanup() {
  if [ -n "${server:-}" ]; then kill -9 "$server" 2>/dev/null; wait "$server" 2>/dev/null; fi || true
  if [ -n "$hapi_pid" ]; then kill -9 "$hapi_pid" 2>/dev/null; wait "$hapi_pid" 2>/dev/null; fi || true
  stop_postgres "$work/pg"
  rm -rf "$work"
}
trap cleanup EXIT

secs() { python3 -c "print(round($(date +%s.%N) - $1, 1))"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
psql_() { runuser -u postgres -- "$pgbin/psql" -h 127.0.0.1 -p "$pgport" -U postgres -qAt "$@"; }

# --- PostgreSQL: one throwaway cluster, HAPI's database and search.py's baseline -------------
start_postgres "$work/pg"
# JIT off as in search.sh: PostgreSQL's JIT only adds compile time to queries of this size
# (it would fall on HAPI's searches); max_connections covers Hikari's 48 and the baseline.
psql_ -c "ALTER SYSTEM SET jit = off" -c "SELECT pg_reload_conf()" >/dev/null
psql_ -c "CREATE DATABASE hapi" -c "CREATE DATABASE baseline"

# --- servers ---------------------------------------------------------------------------------
start_server "$work/server.log" --data-dir "$work/ledger" --profiles-dir "$root/fhir-profiles" --max-body-bytes 134217728

hport=$(free_port)
jvm_flags="-Xms$HAPI_XMX -Xmx$HAPI_XMX -XX:+UseG1GC"
hapi_args=(--server.port="$hport" --spring.datasource.url="jdbc:postgresql://127.0.0.1:$pgport/hapi"
  --peer.reuse-cached-search-results-ms="$HAPI_SEARCH_CACHE_MS")
t0=$(date +%s.%N)
: >"$work/hapi.log"
# shellcheck disable=SC2086
"$hapi_java" $jvm_flags -jar "$jar" "${hapi_args[@]}" >"$work/hapi.log" 2>&1 &
hapi_pid=$!
for _ in $(seq 1 1800); do
  grep -q '^hapi-jpa-peer: started' "$work/hapi.log" && break
  kill -0 "$hapi_pid" 2>/dev/null || { tail -50 "$work/hapi.log"; echo "HAPI exited during startup" >&2; exit 1; }
  sleep 0.2
done
grep -q '^hapi-jpa-peer: started' "$work/hapi.log" || { tail -50 "$work/hapi.log"; echo "HAPI did not start in 6 min" >&2; exit 1; }
hapi_start=$(secs "$t0")
hbase="http://127.0.0.1:$hport/fhir"

# --- the setup, printed ----------------------------------------------------------------------
machine
echo "fhir-ledger: $bin ($(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?') checked out) at $base, auth off"
hapi_version="$(curl -s "$hbase/metadata?_elements=software" | python3 -c 'import json,sys; s=json.load(sys.stdin).get("software",{}); print(s.get("name","?"), s.get("version","?"))')"
libs="$(python3 -c 'import re, sys, zipfile; print(" ".join(m.group(1) for n in zipfile.ZipFile(sys.argv[1]).namelist() for m in [re.match(r"BOOT-INF/lib/((hapi-fhir-jpaserver-base|spring-boot|spring-core|hibernate-core|postgresql|HikariCP|tomcat-embed-core)-[0-9].*)\.jar$", n)] if m))' "$jar")"
echo "HAPI JPA: $hapi_version at $hbase, started in $hapi_start s (including schema creation in the empty database)"
echo "  jar: $libs"
echo "  JVM: $("$hapi_java" -version 2>&1 | head -1), flags: $jvm_flags"
echo "  settings (tests/bench/hapi-jpa/README.md): PostgreSQL dialect HapiFhirPostgresDialect, schema by Hibernate (hbm2ddl update),"
echo "    JDBC batch size 20, Hikari pool 48, no Lucene/Elasticsearch (plain JPA search), enforce reference target types off,"
echo "    search-result reuse ${HAPI_SEARCH_CACHE_MS} ms, JSON by default, no interceptors (no request logging, no validation); everything else HAPI's defaults"
echo "PostgreSQL: $("$pgbin/postgres" --version) on port $pgport: $(psql_ -c "SELECT string_agg(name || '=' || current_setting(name), ', ' ORDER BY name) FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'shared_buffers', 'jit', 'max_connections', 'wal_level')")"
echo "driver: $bench_bin (the same for both servers); ingest data: $ingest_src"
echo

# --- 1-2. search data and searches -----------------------------------------------------------
# load_bundles URL DIR: posts every bundle of DIR with SEARCH_LOAD_CLIENTS clients; fails on any non-200.
load_bundles() {
  ls "$2"/*.json | xargs -P"$SEARCH_LOAD_CLIENTS" -I{} sh -c \
    'code=$(curl -s -o "$1.resp" -w "%{http_code}" -X POST "$0/" -H "Expect:" -H "content-type: application/fhir+json" --data-binary @"$1"); [ "$code" = 200 ] || { echo "$1: HTTP $code: $(head -c 800 "$1.resp")" >&2; exit 255; }' "$1" {}
}
if [ "$SEARCH_PATIENTS" -gt 0 ]; then
  python3 "$root/tests/bench/synthea_put.py" "$cache/fhir" "$work/put" "$SEARCH_PATIENTS" >/dev/null
  n=$(python3 -c "import json,glob; print(sum(len(json.load(open(f))['entry']) for f in glob.glob('$work/put/*.json')))")
  echo "## 1. Search data: $SEARCH_PATIENTS Synthea patients, $n resources, as PUT transactions (same ids on both), $SEARCH_LOAD_CLIENTS clients"
  t0=$(date +%s.%N); load_bundles "$base" "$work/put"; put_l=$(secs "$t0")
  echo "  fhir-ledger: $put_l s"
  t0=$(date +%s.%N); load_bundles "$hbase" "$work/put"; put_h=$(secs "$t0")
  echo "  HAPI JPA: $put_h s"
  t0=$(date +%s.%N); psql_ -d hapi -c "VACUUM ANALYZE"; echo "  VACUUM ANALYZE of HAPI's database: $(secs "$t0") s"
  echo "$n $put_l $put_h" >"$work/put.txt"
  echo
  echo "## 2. Searches (search.py --peer)"
  (cd "$root" && "$venv/bin/python" "$root/tests/bench/search.py" --base "$base" \
    --pg "host=127.0.0.1 port=$pgport user=postgres dbname=baseline" --peer "HAPI JPA=$hbase" \
    -n "$SEARCH_N" --warmup "$SEARCH_WARMUP" --json "$work/search.json" "$@") 2>&1 | sed 's/^/  /' || echo "  (search.py failed)"
  echo
fi

# --- 3-4. the driver -------------------------------------------------------------------------
[ -d "$ingest_src" ] || ingest_src="$cache/fhir"
mkdir "$work/ingest" "$work/warmup"
all=$(ls "$ingest_src"/*.json | wc -l)
[ "$PATIENTS" = all ] && PATIENTS=$all
[ "$ingest_src" = "$cache/fhir" ] && [ "$PATIENTS" -gt 25 ] && [ -z "${INGEST_SYNTHEA:-}" ] && PATIENTS=25
ls "$ingest_src"/*.json | head -n "$PATIENTS" | xargs -I{} ln -s {} "$work/ingest/"
wn=$(( (PATIENTS * WARMUP_PCT + 99) / 100 ))
ls "$ingest_src"/*.json | tail -n "$wn" | xargs -I{} ln -s {} "$work/warmup/"
wc_=$(( CREATES * WARMUP_PCT / 100 )); wr=$(( READS * WARMUP_PCT / 100 ))
[ "$wc_" -ge 1 ] || wc_=1
[ "$wr" -ge 1 ] || wr=1
load() { # load BASE DIR CREATES READS [JSON]
  local cmd=("$bench_bin" load --base "$1" --synthea "$2" --ingest-clients "$INGEST_CLIENTS" --ingest-repeat "$INGEST_REPEAT"
    --clients "$CLIENTS" --creates "$3" --reads "$4" --read-rate "$READ_RATE" --timeout-secs 1800)
  if [ -n "${5:-}" ]; then cmd+=(--json-out "$5"); fi
  "${cmd[@]}"
}
echo "## 3. Warm-up, discarded: $wn bundles (the last of $ingest_src), $wc_ creates, $wr reads, against each server"
for who in ledger hapi; do
  if [ $who = ledger ]; then name=fhir-ledger url=$base; else name="HAPI JPA" url=$hbase; fi
  t0=$(date +%s.%N)
  if load "$url" "$work/warmup" "$wc_" "$wr" >"$work/warmup-$who.txt" 2>&1; then
    echo "  $name: $(secs "$t0") s ($(grep -m1 '^(a)' "$work/warmup-$who.txt" | sed 's/.*= //'))"
  else
    echo "  $name: FAILED ($(tail -1 "$work/warmup-$who.txt"))"
  fi
done
echo
echo "## 4. fhir-ledger-bench load: $PATIENTS bundles x$INGEST_REPEAT, $CREATES creates, $READS reads at $READ_RATE/s"
for who in ledger hapi; do
  if [ $who = ledger ]; then name=fhir-ledger url=$base; else name="HAPI JPA" url=$hbase; fi
  echo "### $name"
  load "$url" "$work/ingest" "$CREATES" "$READS" "$work/load-$who.json" 2>&1 | sed 's/^/  /' ||
    echo "  (failed; the driver gives every request 2 minutes, and a bundle that takes longer counts as failed)"
done
echo "fhir-ledger data dir after the run: $(du -sh "$work/ledger" | cut -f1); HAPI's database: $(psql_ -c "SELECT pg_size_pretty(pg_database_size('hapi'))"); HAPI's JVM: $(ps -o rss= -p "$hapi_pid" | awk '{printf "%.0f MB RSS", $1/1024}')"
echo

# --- 5. the table ----------------------------------------------------------------------------
echo "## fhir-ledger beside HAPI JPA"
python3 - "$work" "$INGEST_CLIENTS" "$CLIENTS" "$READ_RATE" "$SEARCH_LOAD_CLIENTS" <<'EOF'
import json, os, sys
work, ic, cl, rate, slc = sys.argv[1:6]

def js(name):
    p = os.path.join(work, name)
    return json.load(open(p)) if os.path.exists(p) else None

def g(d, *path):
    for k in path:
        if d is None:
            return None
        d = d.get(k)
    return d

def f(x, unit=""):
    if x is None:
        return "—"
    s = f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"
    return s + unit

rows = []
def row(name, a, b, higher_better):
    r = None
    if a and b:
        r = a / b if higher_better else b / a
    rows.append((name, a, b, r, higher_better))

L, H = js("load-ledger.json"), js("load-hapi.json")
row(f"Synthea transaction ingest, {ic} clients (resources/s)", g(L, "synthea_ingest", "resources_per_s"), g(H, "synthea_ingest", "resources_per_s"), True)
for q in ("p50", "p95", "p99"):
    row(f"  ingest latency per bundle {q} (ms)", g(L, "synthea_ingest", "latency_per_bundle", q + "_ms"), g(H, "synthea_ingest", "latency_per_bundle", q + "_ms"), False)
row(f"single creates, {cl} clients (requests/s)", g(L, "single_creates", "requests_per_s"), g(H, "single_creates", "requests_per_s"), True)
for q in ("p50", "p95", "p99"):
    row(f"  create latency {q} (ms)", g(L, "single_creates", "latency", q + "_ms"), g(H, "single_creates", "latency", q + "_ms"), False)
row(f"reads by id, open loop at {rate}/s: achieved (reads/s)", g(L, "reads_by_id", "achieved_rate"), g(H, "reads_by_id", "achieved_rate"), True)
for q in ("p50", "p95", "p99", "p999"):
    row(f"  read latency {q.replace('p999', 'p99.9')} (ms)", g(L, "reads_by_id", "latency", q + "_ms"), g(H, "reads_by_id", "latency", q + "_ms"), False)
put = os.path.join(work, "put.txt")
if os.path.exists(put):
    n, tl, th = open(put).read().split()
    row(f"search data load, {n} resources as PUT transactions, {slc} clients (resources/s)", int(n) / float(tl), int(n) / float(th), True)
S = js("search.json") or []
from statistics import mean
def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs); k = (len(xs) - 1) * p / 100; i = int(k); j = min(i + 1, len(xs) - 1)
    return xs[i] + (xs[j] - xs[i]) * (k - i)
for r in S:
    row(f"search {r['name']}: `{r['example']}` p95 (ms)", pct(r["ledger"], 95), pct(r.get("peer", []), 95), False)

print("| figure | fhir-ledger | HAPI JPA | ratio (> 1: fhir-ledger better) |")
print("| --- | --- | --- | --- |")
for name, a, b, r, hb in rows:
    print(f"| {name} | {f(a)} | {f(b)} | {f'{r:.2f}x' if r else '—'} |")
print()
ing = next((x for x in rows if x[0].startswith("Synthea")), None)
cre = next((x for x in rows if x[0].startswith("single")), None)
srch = [x for x in rows if x[0].startswith("search ") and "data load" not in x[0]]
def verdict(x, need):
    return "—" if not x or x[3] is None else ("met" if x[3] >= need else "not met") + f" ({x[3]:.2f}x)"
print(f"Goals: ingest >= 3x HAPI: {verdict(ing, 3)}; creates >= 3x HAPI: {verdict(cre, 3)}; "
      f"faster at p95 on every search class: "
      + ("—" if not srch else "met" if all(x[3] and x[3] > 1 for x in srch)
         else "not met (" + ", ".join(x[0].split(':')[0][7:] for x in srch if not (x[3] and x[3] > 1)) + ")"))
if S:
    errs = sum(sum(map(len, r["peer_errors"].values())) for r in S)
    lerrs = sum(sum(map(len, r["errors"].values())) for r in S)
    vs = sum(len(r["peer_vs_ledger"]) for r in S)
    dl = sum(len(r["count_bad"]) + len(r["page_bad"]) for r in S)
    dh = sum(len(r["peer_count_bad"]) + len(r["peer_page_bad"]) for r in S)
    print(f"Search answers: errors fhir-ledger {lerrs}, HAPI {errs}; disagreements with the PostgreSQL referee "
          f"fhir-ledger {dl}, HAPI {dh}; fhir-ledger vs HAPI {vs} (search.py's output above names them).")
EOF
