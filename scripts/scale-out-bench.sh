#!/usr/bin/env bash
# One node against two on Redis, measured end to end with the load generator over real sockets:
# the same load (1,000 clients in one room by default) on
#   1. one chat-server-tungstenite with the in-memory layer (the one-process reference),
#   2. one chat-server-tungstenite on Redis,
#   3. two chat-server-tungstenite on one Redis, the clients split between them.
# Starts its own redis-server (scripts/redis-for-tests.sh) and builds everything in release mode.
#
#   ./scripts/scale-out-bench.sh                     # 100 senders x 10 messages at 200 msg/s
#   LOAD="--senders 100 --messages 20 --rate 500" ./scripts/scale-out-bench.sh
#
# Prints one table row per setup (the JSON lines go to stderr).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/redis-for-tests.sh

CLIENTS=${CLIENTS:-1000}
LOAD=${LOAD:---senders 100 --messages 10 --rate 200}
cargo build --release --quiet --example chat-server-tungstenite --example loadgen
bin=target/release/examples
servers=()
stop_servers() {
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
    servers=()
}
chat_on_exit stop_servers

start() { # port layer prefix
    RUST_LOG=error "$bin/chat-server-tungstenite" --addr "127.0.0.1:$1" --layer "$2" \
        --redis-url "$CHAT_TEST_REDIS_URL" --redis-prefix "$3" \
        --rate-per-second 10000 --rate-burst 10000 $( [ "$2" = memory ] && echo --store memory ) &
    servers+=($!)
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
        sleep 0.1
    done
    echo "scale-out-bench: the server on port $1 did not start" >&2
    exit 1
}

header_shown=
run() { # label urls
    # shellcheck disable=SC2086
    out=$("$bin/loadgen" --url "$2" --clients "$CLIENTS" $LOAD) || true
    if [ -z "$header_shown" ]; then
        echo "$out" | grep '^loadgen:'
        echo "| setup $(echo "$out" | grep '^| connect')"
        echo "|---$(echo "$out" | grep '^|---')"
        header_shown=1
    fi
    echo "| $1 $(echo "$out" | grep '^| [0-9]')"
    echo "$out" | grep '^{' >&2
}

base=$((20000 + RANDOM % 20000))
start $base memory one-memory
run "one node, in-memory layer" "ws://127.0.0.1:$base"
stop_servers
start $((base + 1)) redis one-redis
run "one node, Redis layer and store" "ws://127.0.0.1:$((base + 1))"
stop_servers
start $((base + 2)) redis two-redis
start $((base + 3)) redis two-redis
run "two nodes, one Redis" "ws://127.0.0.1:$((base + 2)),ws://127.0.0.1:$((base + 3))"
