#!/usr/bin/env bash
# Tracing overhead: the admission rate (S1) and the crowd rate after sell-out (S2)
# through a gateway with tracing off and through one exporting OTLP at 1%
# sampling, alternated in rounds within one run (the machine drifts by a third
# within minutes, so only interleaved ratios mean anything). BENCHMARKS.md explains.
#   integration-tests/bench-tracing.sh            3 rounds of 10 s per figure
#   ROUNDS=1 DUR=5s integration-tests/bench-tracing.sh   a smoke run
# Everything runs on 127.0.0.1, on databases, keys and queues named for this run.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DUR=${DUR:-10s}
VUS=${VUS:-256}
RATIO=${RATIO:-0.01}

deploy/local/backing-services.sh
echo "[tracing-bench] cargo build --release" >&2
# The services by package, as operators build them: a --workspace build would
# compile in the test-only crash points the integration tests turn on.
cargo build --release --quiet -p flashsale-gateway -p flashsale-inventory -p flashsale-wallet
cargo build --release --quiet -p flashsale-integration-tests --bins
BIN=target/release
TAG=tbench$(date +%s)
OUT=target/bench/$TAG
mkdir -p "$OUT"
PG=${PG_SERVER_URL:-postgres://postgres@127.0.0.1:5432}
JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export JWT_SECRET RUST_LOG=warn AMQP_PREFIX=$TAG REDIS_KEY_PREFIX=$TAG
WALLET_DB=$PG/${TAG}_wallet INVENTORY_DB=$PG/${TAG}_inventory
PIDS=()
INVENTORY_PID=

cleanup() {
  [ -n "$INVENTORY_PID" ] && kill -CONT "$INVENTORY_PID" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for db in ${TAG}_wallet ${TAG}_inventory; do
    psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  done
  redis-cli --scan --pattern "$TAG:*" | xargs -r redis-cli del >/dev/null || true
  for q in orders order-events.admission; do rabbitmqctl -q delete_queue "$TAG.$q" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

# A stand-in collector on the same machine (it costs CPU here, as a sidecar would).
"$BIN/flashsale-load" otlp-sink --port 14317 >"$OUT/sink.count" 2>"$OUT/sink.log" &
SINK_PID=$!
PIDS+=("$SINK_PID")
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/14317) 2>/dev/null && break; sleep 0.2; done
(exec 3<>/dev/tcp/127.0.0.1/14317) 2>/dev/null || { echo "[tracing-bench] the OTLP sink did not start: $(cat "$OUT/sink.log")" >&2; exit 1; }
TRACING=(OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:14317 OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=$RATIO)

DATABASE_URL=$WALLET_DB "$BIN/flashsale-wallet" migrate >"$OUT/wallet.log" 2>&1
DATABASE_URL=$INVENTORY_DB "$BIN/flashsale-inventory" migrate >"$OUT/inventory.log" 2>&1
env "${TRACING[@]}" DATABASE_URL="$WALLET_DB" WALLET_LISTEN_ADDR=127.0.0.1:18253 METRICS_ADDR=127.0.0.1:19253 \
  "$BIN/flashsale-wallet" >>"$OUT/wallet.log" 2>&1 &
PIDS+=($!)
env "${TRACING[@]}" DATABASE_URL="$INVENTORY_DB" INVENTORY_LISTEN_ADDR=127.0.0.1:18252 METRICS_ADDR=127.0.0.1:19252 \
  WALLET_URL=http://127.0.0.1:18253 "$BIN/flashsale-inventory" >>"$OUT/inventory.log" 2>&1 &
PIDS+=($!); INVENTORY_PID=$!
sleep 1
gateway() { # name grpc-port metrics-port http-port [env…]
  local name=$1 grpc=$2 metrics=$3 http=$4; shift 4
  env "$@" GATEWAY_LISTEN_ADDR=127.0.0.1:$grpc METRICS_ADDR=127.0.0.1:$metrics GATEWAY_HTTP_ADDR=127.0.0.1:$http \
    PURCHASE_RATE_PER_SECOND=0 CLIENT_RATE_PER_SECOND=0 INVENTORY_URL=http://127.0.0.1:18252 WALLET_URL=http://127.0.0.1:18253 \
    "$BIN/flashsale-gateway" >"$OUT/gateway-$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$grpc") 2>/dev/null && break; sleep 0.2; done
}
gateway off 18251 19251 18280 OTEL_SDK_DISABLED=true
gateway on 18261 19261 18281 "${TRACING[@]}"
declare -A URL=([off]=http://127.0.0.1:18251 [on]=http://127.0.0.1:18261)

load() { "$BIN/flashsale-load" "$@"; }
rps() { python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['mean_rps']))" "$1"; }

for mode in off on; do
  load seed --gateway-url "${URL[$mode]}" --users 5000 --stock 1000000000 --limit 1000 --unfunded >"$OUT/s1-$mode.json"
  load seed --gateway-url "${URL[$mode]}" --users 5000 --stock 0 --unfunded >"$OUT/s2-$mode.json"
  # Warm-up: Redis state built, sold-out flags set, connections open.
  for s in s1 s2; do
    load run --gateway-url "${URL[$mode]}" --sale "$OUT/$s-$mode.json" --users "$VUS" --duration 2s --quiet >/dev/null 2>&1
  done
done
# Settlement is not what this measures: inventory is paused so that orders wait in
# the queue instead of competing for the CPU with the admissions being measured.
kill -STOP "$INVENTORY_PID"

declare -A RUNS
for round in $(seq "$ROUNDS"); do
  for s in s1 s2; do
    for mode in off on; do
      echo "[tracing-bench] round $round: $s, tracing $mode, $VUS users, $DUR" >&2
      load run --gateway-url "${URL[$mode]}" --sale "$OUT/$s-$mode.json" --users "$VUS" --duration "$DUR" --quiet \
        --report "$OUT/$s-$mode-$round.json" 2>/dev/null >/dev/null
      RUNS[$s-$mode]+="$(rps "$OUT/$s-$mode-$round.json") "
    done
  done
done
kill -CONT "$INVENTORY_PID"
kill -TERM "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true
SPANS=$(cat "$OUT/sink.count" 2>/dev/null || echo "?")

median() { python3 -c "import statistics,sys; print(round(statistics.median(map(int, sys.argv[1:]))))" $1; }
ratio() { python3 -c "print(f'{$1 / max($2, 1):.2f}')"; }
{
  echo "| figure | tracing off | tracing on, ${RATIO} sampled | on/off |"
  echo "|---|---|---|---|"
  for s in s1 s2; do
    off=$(median "${RUNS[$s-off]}"); on=$(median "${RUNS[$s-on]}")
    name=$([ "$s" = s1 ] && echo "S1 admission attempts/s" || echo "S2 crowd after sell-out, attempts/s")
    echo "| $name (median of $ROUNDS; runs: ${RUNS[$s-off]}/ ${RUNS[$s-on]}) | $off | $on | $(ratio "$on" "$off") |"
  done
  echo "| spans received by the OTLP sink | | $SPANS | |"
} | tee "$OUT/summary.md"
echo "[tracing-bench] reports in $OUT" >&2
