#!/usr/bin/env bash
# Runs every workload of driftsync-bench against driftsync (native /v1/sync, /yjs/{doc} and
# /hocuspocus, the last spoken by the generator as @hocuspocus/provider does), the
# anchors (y-websocket server, Hocuspocus, y-sweet) and the bare relay (`driftsync-bench relay`,
# the floor of the machine; fan-out only) in one run, then writes the report.
#
#   bash bench/run-all.sh            # the full, publishable run (about 30 minutes)
#   QUICK=1 bash bench/run-all.sh    # a short run to check that everything works
#
# Environment: SYSTEMS (default: native ds-yjs ds-hocuspocus y-websocket hocuspocus y-sweet relay), WORKLOADS
# (default: fanout idle resync throughput writers cross; resync includes the cold load; writers = many
# writers: one room of 50 writers + 50 readers at 2 and at 10 updates/s each, and 1,000 rooms
# of 5 writers), ANCHORS (where
# the anchors are installed; default ~/.cache/driftsync-anchors; those a run needs and lacks are
# installed there first by bench/anchors/install.sh, at the versions its manifests pin),
# OUT (default bench/results), DRIFTSYNC_BIN, BENCH_BIN, FANOUT_READERS (quick runs; default 10,100).
# Workload `cross` (native and ds-yjs only, about 2.5 minutes per system; skipped for the others):
# cross-instance fan-out, one writer on the first of CROSS_INSTANCES (default 3) `driftsync serve`
# instances sharing one PostgreSQL database and Redis, readers round-robin over them, CROSS_RATE
# (default 20) updates/s for 30 s (quick 3 s) after a warm-up, CROSS_READERS readers in all
# (default 100,1500; quick 100,300); then the same workload on one instance of the same
# PostgreSQL and Redis. CROSS_PG (default postgres://postgres@127.0.0.1:5432; the database
# CROSS_DB, default bench, is created if missing), CROSS_REDIS_URL (default
# redis://127.0.0.1:6379); skipped with a message if either cannot be reached. Each start of
# instances gets its own --redis-prefix, each run its own document.
# Every server is started here, pinned to core 0 (taskset -c 0), with a fresh data directory,
# and stopped on exit; the generator runs on core 1 (the cross workload's instances all share
# core 0; PostgreSQL and Redis are the machine's services and are not pinned). Build first:
#   cargo build --release -p driftsync -p driftsync-bench
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHORS=${ANCHORS:-$HOME/.cache/driftsync-anchors}
DS_BIN=${DRIFTSYNC_BIN:-$ROOT/target/release/driftsync}
BENCH=${BENCH_BIN:-$ROOT/target/release/driftsync-bench}
OUT=${OUT:-$ROOT/bench/results}
SYSTEMS=${SYSTEMS:-"native ds-yjs ds-hocuspocus y-websocket hocuspocus y-sweet relay"}
WORKLOADS=${WORKLOADS:-"fanout idle resync throughput writers cross"}
QUICK=${QUICK:-0}
SERVER_CORE=${SERVER_CORE:-0}
GEN_CORE=${GEN_CORE:-1}
PORT=${PORT:-18787}
# Idle means idle: connections stay open this long before the RSS is read (driftsync evicts the
# live document of a room unused for a whole sweep interval, 10-20 s, and jemalloc returns the
# pages gradually over the next 10 s or so). 35 s proved too short on a second machine: a probe
# sampling the RSS every 5 s saw it fall 3 MB between 35 and 40 s after 1,000 connections opened,
# so two runs of the same build measured 9.9 and 12.7 MB.
IDLE_SETTLE=${IDLE_SETTLE:-50}
CROSS_PG=${CROSS_PG:-postgres://postgres@127.0.0.1:5432}
CROSS_DB=${CROSS_DB:-bench}
CROSS_REDIS_URL=${CROSS_REDIS_URL:-redis://127.0.0.1:6379}
CROSS_INSTANCES=${CROSS_INSTANCES:-3}
CROSS_RATE=${CROSS_RATE:-20}

if [[ $QUICK == 1 ]]; then
  FANOUT_ARGS=(--readers ${FANOUT_READERS:-10,100} --secs 2)
  IDLE_CONNS=(1000)
  TP_ARGS=(--rooms 20 --step-secs 2 --rates 500,2000,8000)
  RESYNC_ARGS=(--runs 1)
  # Many writers: one room of 50 writers (2 updates/s each) and 50 readers; many small rooms
  # of 5 writers (0.2 updates/s each), 200 rooms instead of 1,000.
  WRITERS_ROOM_ARGS=(--rooms 1 --writers 50 --readers 50 --rate 2 --secs 3)
  WRITERS_BUSY_ARGS=(--rooms 1 --writers 50 --readers 50 --rate 10 --secs 3)
  WRITERS_ROOMS_ARGS=(--rooms 200 --writers 5 --readers 0 --rate 0.2 --secs 5)
  CROSS_READERS=${CROSS_READERS:-100,300}
  CROSS_ARGS=(--readers "$CROSS_READERS" --rate "$CROSS_RATE" --secs 3)
else
  FANOUT_ARGS=(--readers 10,100,500 --secs 10)
  IDLE_CONNS=(1000 5000 10000)
  TP_ARGS=(--rooms 100 --step-secs 5)
  RESYNC_ARGS=(--runs 5)
  WRITERS_ROOM_ARGS=(--rooms 1 --writers 50 --readers 50 --rate 2 --secs 20)
  # The same room five times busier: 500 updates/s into one document, where every writer
  # waited behind the previous commit before commits were pipelined.
  WRITERS_BUSY_ARGS=(--rooms 1 --writers 50 --readers 50 --rate 10 --secs 20)
  WRITERS_ROOMS_ARGS=(--rooms 1000 --writers 5 --readers 0 --rate 0.2 --secs 30)
  CROSS_READERS=${CROSS_READERS:-100,1500}
  # 600 updates: a delivery p99 that a couple of slow updates do not decide.
  CROSS_ARGS=(--readers "$CROSS_READERS" --rate "$CROSS_RATE" --secs 30)
fi

for f in "$DS_BIN" "$BENCH"; do
  [[ -x $f ]] || { echo "missing $f: cargo build --release -p driftsync -p driftsync-bench" >&2; exit 1; }
done
# Only the anchors this run starts must be installed.
need() { [[ " $SYSTEMS " == *" $1 "* ]]; }
install_anchors() { bash "$ROOT/bench/anchors/install.sh" "$ANCHORS" "$@"; }
if need y-websocket; then
  [[ -d $ANCHORS/y-websocket/node_modules/@y/websocket-server ]] || install_anchors
fi
if need hocuspocus; then
  [[ -d $ANCHORS/hocuspocus/node_modules/@hocuspocus/server ]] || install_anchors
  cp "$ROOT/bench/anchors/hocuspocus-server.mjs" "$ANCHORS/hocuspocus/bench-server.mjs"
fi
if need y-sweet; then
  [[ -x $ANCHORS/y-sweet/bin/y-sweet ]] || install_anchors --with-y-sweet
fi

# 10k connections need as many descriptors in the server and in the generator.
ulimit -n "$(ulimit -Hn)" || true

mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$OUT/results-$STAMP.jsonl
LOGS=$(mktemp -d /tmp/driftsync-bench.XXXXXX)
SERVER_PID=
# The cross workload's instances.
INSTANCE_PIDS=()
TAG=$STAMP

cleanup() {
  stop_server
  stop_instances
  rm -rf "$LOGS/data"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_port [PORT]: waits until something listens on PORT (default $PORT).
wait_port() {
  local port=${1:-$PORT}
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "server on port $port did not start; see $LOGS" >&2
  return 1
}

# start_server SYSTEM DATA_DIR: starts the server for SYSTEM on $PORT, pinned to $SERVER_CORE.
start_server() {
  local system=$1 data=$2 log=$LOGS/$1.log
  mkdir -p "$data"
  case $system in
    native|ds-yjs|ds-hocuspocus)
      # One server, three endpoints: /v1/sync, /yjs/{doc}, /hocuspocus.
      RUST_LOG=warn taskset -c "$SERVER_CORE" "$DS_BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$data" >>"$log" 2>&1 &
      ;;
    y-websocket)
      (cd "$ANCHORS/y-websocket" && HOST=127.0.0.1 PORT=$PORT YPERSISTENCE=$data \
        exec taskset -c "$SERVER_CORE" node node_modules/@y/websocket-server/src/server.js) >>"$log" 2>&1 &
      ;;
    hocuspocus)
      (cd "$ANCHORS/hocuspocus" && PORT=$PORT DATA_DIR=$data exec taskset -c "$SERVER_CORE" node bench-server.mjs) >>"$log" 2>&1 &
      ;;
    y-sweet)
      taskset -c "$SERVER_CORE" "$ANCHORS/y-sweet/bin/y-sweet" serve "$data" --host 127.0.0.1 --port "$PORT" >>"$log" 2>&1 &
      ;;
    relay)
      # The floor: relays, applies nothing, stores nothing (the data directory stays empty).
      taskset -c "$SERVER_CORE" "$BENCH" relay --listen "127.0.0.1:$PORT" >>"$log" 2>&1 &
      ;;
  esac
  SERVER_PID=$!
  wait_port
  sleep 0.5
}

stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}

# cross_ready: whether PostgreSQL and Redis answer (creating the database CROSS_DB if missing);
# says why not. Sets CROSS_DATABASE_URL.
CROSS_DATABASE_URL=$CROSS_PG/$CROSS_DB
cross_ready() {
  local tool
  for tool in psql redis-cli; do
    if ! command -v "$tool" >/dev/null; then
      echo "cross: skipped ($tool is not installed; it needs PostgreSQL and Redis)" >&2
      return 1
    fi
  done
  if ! timeout 10 psql "$CROSS_PG/postgres" -Atqc 'select 1' >/dev/null 2>&1; then
    echo "cross: skipped (PostgreSQL does not answer at $CROSS_PG)" >&2
    return 1
  fi
  if [[ $(timeout 10 redis-cli -u "$CROSS_REDIS_URL" ping 2>/dev/null) != PONG ]]; then
    echo "cross: skipped (Redis does not answer at $CROSS_REDIS_URL)" >&2
    return 1
  fi
  if [[ $(psql "$CROSS_PG/postgres" -Atqc "select 1 from pg_database where datname = '$CROSS_DB'") != 1 ]] &&
    ! psql "$CROSS_PG/postgres" -qc "create database \"$CROSS_DB\"" >/dev/null; then
    echo "cross: skipped (cannot create the database $CROSS_DB at $CROSS_PG)" >&2
    return 1
  fi
}

# start_instances SYSTEM COUNT: COUNT driftsync instances on one PostgreSQL database and Redis
# (a Redis prefix of their own), on ports $PORT, $PORT+1, …, all pinned to $SERVER_CORE; their
# URLs and process ids, comma-separated, in INSTANCE_URLS and INSTANCE_PIDLIST.
start_instances() {
  local system=$1 count=$2 i port prefix
  prefix=dsbench-$STAMP-$system-$count
  INSTANCE_URLS=
  for ((i = 0; i < count; i++)); do
    port=$((PORT + i))
    # One after the other: the first creates the schema.
    RUST_LOG=warn taskset -c "$SERVER_CORE" "$DS_BIN" serve --listen "127.0.0.1:$port" \
      --database-url "$CROSS_DATABASE_URL" --redis-url "$CROSS_REDIS_URL" --redis-prefix "$prefix" \
      >>"$LOGS/$system-cross-$count-$i.log" 2>&1 &
    INSTANCE_PIDS+=($!)
    wait_port "$port"
    INSTANCE_URLS+=${INSTANCE_URLS:+,}ws://127.0.0.1:$port
  done
  INSTANCE_PIDLIST=$(IFS=,; echo "${INSTANCE_PIDS[*]}")
  sleep 0.5
}

stop_instances() {
  local pid
  for pid in "${INSTANCE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${INSTANCE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  INSTANCE_PIDS=()
}

# cross SYSTEM: the cross-instance fan-out over CROSS_INSTANCES instances, then on one.
cross() {
  local system=$1 k
  for k in "$CROSS_INSTANCES" 1; do
    start_instances "$system" "$k"
    taskset -c "$GEN_CORE" "$BENCH" cross --system "$system" --urls "$INSTANCE_URLS" --pids "$INSTANCE_PIDLIST" \
      "${CROSS_ARGS[@]}" --out "$RESULTS" --tag "$TAG"
    stop_instances
  done
}

bench() {
  taskset -c "$GEN_CORE" "$BENCH" "$@" --addr "127.0.0.1:$PORT" --pid "$SERVER_PID" --out "$RESULTS" --tag "$TAG"
}

run_for() {
  local system=$1 data=$LOGS/data/$1
  for w in $WORKLOADS; do
    rm -rf "$data"
    if [[ $w == cross ]]; then
      if [[ $system != native && $system != ds-yjs ]]; then
        echo "$system: cross skipped (instances sharing rooms: driftsync only)"
      elif [[ $CROSS_OK != 1 ]]; then
        echo "$system: cross skipped (PostgreSQL or Redis not reachable, see above)"
      else
        cross "$system"
      fi
      continue
    fi
    # The relay is the floor of fan-out only (it holds no document to resync, load or idle on).
    if [[ $system == relay && $w != fanout ]]; then
      echo "relay: $w skipped (the relay runs fan-out only)"
      continue
    fi
    case $w in
      fanout)
        start_server "$system" "$data"; bench fanout --system "$system" "${FANOUT_ARGS[@]}"; stop_server ;;
      idle)
        for c in "${IDLE_CONNS[@]}"; do
          for per in 1 10; do
            rm -rf "$data"
            start_server "$system" "$data"
            bench idle --system "$system" --conns "$c" --per-room "$per" --source-ips 16 --settle "$IDLE_SETTLE"
            stop_server
          done
        done ;;
      resync)
        start_server "$system" "$data"
        bench resync --system "$system" "${RESYNC_ARGS[@]}"
        # Let debounced and periodic persistence (Hocuspocus 2-10 s, y-sweet 10 s) write it.
        sleep 12
        stop_server
        start_server "$system" "$data"
        bench cold --system "$system"
        stop_server ;;
      throughput)
        start_server "$system" "$data"; bench throughput --system "$system" "${TP_ARGS[@]}"; stop_server ;;
      writers)
        # Each shape on a freshly started server, for its RSS.
        start_server "$system" "$data"; bench writers --system "$system" "${WRITERS_ROOM_ARGS[@]}"; stop_server
        rm -rf "$data"
        start_server "$system" "$data"; bench writers --system "$system" "${WRITERS_BUSY_ARGS[@]}"; stop_server
        rm -rf "$data"
        start_server "$system" "$data"
        bench writers --system "$system" "${WRITERS_ROOMS_ARGS[@]}" --source-ips 16
        stop_server ;;
      *)
        echo "unknown workload $w (fanout idle resync throughput writers cross)" >&2; exit 1 ;;
    esac
  done
}

CROSS_OK=0
if [[ " $WORKLOADS " == *" cross "* ]]; then
  if cross_ready; then
    CROSS_OK=1
    # 1,500 readers are as many descriptors in the generator (and a third of them in each instance).
    max_readers=$(tr ',' '\n' <<<"$CROSS_READERS" | sort -n | tail -1)
    if (( $(ulimit -n) < max_readers + 256 )); then
      echo "cross: the open-files limit ($(ulimit -n)) is too low for $max_readers readers; raise the hard limit (ulimit -Hn)" >&2
      exit 1
    fi
  fi
fi

# CPU time the hypervisor gave to other guests ("steal", /proc/stat) during the run: on a shared
# host it shows when the machine was not quiet, whatever this guest did.
cpu_ticks() { awk '/^cpu / {t=0; for (i=2; i<=NF; i++) t+=$i; print $9, t}' /proc/stat; }
read -r STEAL0 TOTAL0 < <(cpu_ticks)

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), nproc $(nproc)"
  echo "kernel: $(uname -sr)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "node: $(node --version)"
  echo "driftsync: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  if [[ $CROSS_OK == 1 ]]; then
    echo "postgresql (cross): $(psql "$CROSS_PG/postgres" -Atqc 'show server_version'), database $CROSS_DB, not pinned"
    echo "redis (cross): $(redis-cli -u "$CROSS_REDIS_URL" info server | tr -d '\r' | awk -F: '/^redis_version:/ {print $2}'), not pinned"
    echo "cross: $CROSS_INSTANCES instances on core $SERVER_CORE, generator on core $GEN_CORE; ${CROSS_ARGS[*]}"
  fi
  echo "command: $([[ $QUICK == 1 ]] && echo 'QUICK=1 ')bash bench/run-all.sh"
} > "$OUT/machine-$STAMP.txt"
cat "$OUT/machine-$STAMP.txt"

# The B4 replay is cached once, outside any measurement.
if [[ " $WORKLOADS " == *" resync "* ]]; then taskset -c "$GEN_CORE" "$BENCH" prepare-b4; fi

for s in $SYSTEMS; do
  echo "=== $s"
  run_for "$s"
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine-$STAMP.txt"
read -r STEAL1 TOTAL1 < <(cpu_ticks)
echo "steal during the run: $(( (STEAL1 - STEAL0) * 100 / (TOTAL1 - TOTAL0 + 1) )) % of CPU time (the hypervisor running other guests)" >> "$OUT/machine-$STAMP.txt"

if [[ ! -s $RESULTS ]]; then
  echo "no results: every workload was skipped (see above); logs: $LOGS"
  exit 0
fi
"$BENCH" report --results "$RESULTS" --md "$OUT/report-$STAMP.md" --chart "$OUT/fanout-$STAMP.png"
cp "$RESULTS" "$OUT/latest.jsonl"
cp "$OUT/report-$STAMP.md" "$OUT/latest.md"
echo "results: $RESULTS; report: $OUT/report-$STAMP.md; chart: $OUT/fanout-$STAMP.png; logs: $LOGS"
