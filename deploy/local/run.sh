#!/usr/bin/env bash
# Runs the whole suite on this machine: backing services (started or installed
# as needed), a build, migrations, the three services, demo data; prints where
# everything is, then keeps the services running until Ctrl-C.
#   --detach   leave the services running in the background and return
set -euo pipefail
cd "$(dirname "$0")/../.."

DETACH=0
[ "${1:-}" = "--detach" ] && DETACH=1

deploy/local/backing-services.sh

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (Rust >= 1.88, e.g. from rustup)" >&2
  exit 1
fi
echo "[run] building (cargo build --workspace)" >&2
cargo build --workspace --quiet

BIN=target/debug
LOGS=target/run
mkdir -p "$LOGS"

PG=${PG_SERVER_URL:-postgres://postgres@127.0.0.1:5432}
export RUST_LOG=${RUST_LOG:-info}
WALLET_DB="$PG/wallet"
INVENTORY_DB="$PG/inventory"
# A development signing secret, made once per checkout and kept out of git.
if [ -z "${JWT_SECRET:-}" ]; then
  [ -s "$LOGS/jwt-secret" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$LOGS/jwt-secret"
  JWT_SECRET=$(cat "$LOGS/jwt-secret")
fi
export JWT_SECRET

# Stop what an earlier run left behind.
if [ -f "$LOGS/pids" ]; then
  xargs -r kill 2>/dev/null <"$LOGS/pids" || true
  rm -f "$LOGS/pids"
  sleep 1
fi

# Queue arguments are fixed when a queue is created: queues left by a version
# without dead-letter queues cannot be declared with them. Drop such queues
# while they are empty (a non-empty one is left for its consumers to drain).
if command -v rabbitmqctl >/dev/null 2>&1; then
  for queue in flashsale.orders flashsale.order-events.admission; do
    if rabbitmqctl -q list_queues name arguments 2>/dev/null | grep -E "^$queue[[:space:]]" | grep -qv x-dead-letter-exchange; then
      rabbitmqctl -q delete_queue --if-empty "$queue" >/dev/null 2>&1 \
        && echo "[run] removed the empty queue $queue (declared again with its dead-letter queue)" >&2 || true
    fi
  done
fi

DATABASE_URL="$WALLET_DB" "$BIN/flashsale-wallet" migrate >>"$LOGS/wallet.log"
DATABASE_URL="$INVENTORY_DB" "$BIN/flashsale-inventory" migrate >>"$LOGS/inventory.log"

start() { # name, then env assignments
  local name=$1; shift
  env "$@" "$BIN/flashsale-$name" >>"$LOGS/$name.log" 2>&1 &
  echo $! >>"$LOGS/pids"
}
start wallet DATABASE_URL="$WALLET_DB" WALLET_LISTEN_ADDR=127.0.0.1:50053
start inventory DATABASE_URL="$INVENTORY_DB" INVENTORY_LISTEN_ADDR=127.0.0.1:50052 \
  WALLET_URL=http://127.0.0.1:50053
# DEV_TOKENS: the storefront's sign-in signs a token for any name. Development only.
# CLIENT_RATE_PER_SECOND: every local client (the load tool too) is 127.0.0.1, so no per-address limit.
start gateway GATEWAY_LISTEN_ADDR=127.0.0.1:50051 GATEWAY_HTTP_ADDR=127.0.0.1:8080 DEV_TOKENS=true \
  CLIENT_RATE_PER_SECOND="${CLIENT_RATE_PER_SECOND:-0}" \
  INVENTORY_URL=http://127.0.0.1:50052 WALLET_URL=http://127.0.0.1:50053

stop_all() {
  echo "[run] stopping services" >&2
  xargs -r kill -TERM 2>/dev/null <"$LOGS/pids" || true
  wait || true
  rm -f "$LOGS/pids"
}

for port in 50053 50052 50051 8080; do
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.2
  done
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "[run] nothing listens on :$port; see $LOGS/*.log" >&2
    stop_all
    exit 1
  fi
done

"$BIN/flashsale-demo" seed --gateway-url http://127.0.0.1:50051

cat <<INFO

Flash-sale suite is running (logs: $LOGS/*.log, JSON lines):
  storefront http://127.0.0.1:8080/          open in a browser; sign in as alice (or "ops" + admin)
  REST API   http://127.0.0.1:8080/v1/...    OpenAPI: /openapi.json, Swagger UI: /docs
  gateway    grpc://127.0.0.1:50051   flashsale.gateway.v1.FlashSaleGateway, flashsale.gateway.v1.AdminService
  inventory  grpc://127.0.0.1:50052   flashsale.inventory.v1.InventoryService (internal)
  wallet     grpc://127.0.0.1:50053   flashsale.wallet.v1.WalletService (internal)
  metrics    http://127.0.0.1:9091/metrics (gateway), :9092 (inventory), :9093 (wallet); dashboards: deploy/observability/
Demo sale "demo-drop" (100 units, 25.00 USD, limit 1); buyers alice, bob, carol have balances.
Buy from the command line, over REST:
  export JWT_SECRET=\$(cat $LOGS/jwt-secret)
  TOKEN=\$($BIN/flashsale-gateway token --sub alice)
  curl -si -H "authorization: Bearer \$TOKEN" -H 'content-type: application/json' \\
    -d '{"item_id":"demo-drop","quantity":1}' http://127.0.0.1:8080/v1/purchases
  curl -sN -H "authorization: Bearer \$TOKEN" http://127.0.0.1:8080/v1/orders/<order_id>/events
or over gRPC (buf reads the API through reflection):
  buf curl --protocol grpc --http2-prior-knowledge -H "authorization: Bearer \$TOKEN" \\
    -d '{"item_id":"demo-drop","quantity":1}' \\
    http://127.0.0.1:50051/flashsale.gateway.v1.FlashSaleGateway/Purchase
  buf curl --protocol grpc --http2-prior-knowledge -H "authorization: Bearer \$TOKEN" \\
    -d '{"order_id":"<order_id from above>"}' \\
    http://127.0.0.1:50051/flashsale.gateway.v1.FlashSaleGateway/WatchOrder
INFO

if [ "$DETACH" -eq 1 ]; then
  echo "[run] detached; stop with: xargs kill < $LOGS/pids" >&2
  exit 0
fi
trap 'stop_all; exit 0' INT TERM
echo "[run] Ctrl-C stops the services" >&2
wait
