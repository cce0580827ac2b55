#!/usr/bin/env bash
# The soak test: SOAK_CLIENTS connections joining, sending, leaving and reconnecting for SOAK_SECS
# against one server, whose memory (VmRSS) and open files are sampled all along:
#
#   ./scripts/soak.sh                                                   # 1,000 clients, 10 min
#   SOAK_CLIENTS=200 SOAK_SECS=90 SOAK_WARMUP_SECS=20 ./scripts/soak.sh # a short check
#
# Builds loadgen and the server in release mode, starts the server on a free port with
# `--store memory --retention SOAK_RETENTION` (its rate limits at their defaults), runs
# `loadgen --mode soak` against it with `--server-pid` (examples/loadgen.rs says what the clients
# do), stops the server, and exits with loadgen's status: non-zero when the server's RSS at the
# end is more than 10% above its RSS after the warm-up, or on any close by the server other than
# 1000/1001, server error, failed connect, missing ack or id out of order, or a panic in the
# server's log.
#
# Environment:
#   SOAK_CLIENTS=1000  SOAK_SECS=600 (the whole run, warm-up included)  SOAK_WARMUP_SECS=120
#   SOAK_SAMPLE_SECS=30  SOAK_RATE=200 (messages per second, all clients together)
#   SOAK_RETENTION=1000 (messages the server keeps per room: the warm-up should last until every
#       room holds that many, about 10 rooms x SOAK_RETENTION / SOAK_RATE s; loadgen warns if not)
#   SOAK_SERVER=chat-server-tungstenite (or chat-server, on warp)
#   SOAK_SERVER_FLAGS= (more server flags)  SOAK_LOADGEN_FLAGS= (more loadgen flags)
#   SOAK_OUT=target/soak/<time> (loadgen's output and the server's log)
#   PIN=1 (the server on the first half of the cores, loadgen on the other; PIN=0: anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/on-exit.sh
. scripts/bench-lib.sh

command_line="$0${*:+ $*}"
overrides=
for name in SOAK_CLIENTS SOAK_SECS SOAK_WARMUP_SECS SOAK_SAMPLE_SECS SOAK_RATE SOAK_RETENTION SOAK_SERVER \
    SOAK_SERVER_FLAGS SOAK_LOADGEN_FLAGS SOAK_OUT PIN CARGO_TARGET_DIR; do
    if [ -n "${!name+x}" ]; then overrides+="$name=$(printf '%q' "${!name}") "; fi
done
CLIENTS=${SOAK_CLIENTS:-1000}
SECS=${SOAK_SECS:-600}
# Two minutes: the rooms' history fills to SOAK_RETENTION in about 50 s at the default rate, and
# the server's memory settles after that. In a 10-minute run with 1,000 clients the live heap
# (heaptrack) was flat from about 60 s, but RSS, which the allocator shapes, rose until 90-120 s
# before settling; measured from 60 s the run read +10.0% at the end, from 120 s -13%.
WARMUP_SECS=${SOAK_WARMUP_SECS:-120}
SAMPLE_SECS=${SOAK_SAMPLE_SECS:-30}
RATE=${SOAK_RATE:-200}
RETENTION=${SOAK_RETENTION:-1000}
SERVER=${SOAK_SERVER:-chat-server-tungstenite}
OUT=${SOAK_OUT:-target/soak/$(date +%Y%m%d-%H%M%S)}
case $SERVER in
chat-server | chat-server-tungstenite) ;;
*)
    echo "soak: SOAK_SERVER must be chat-server or chat-server-tungstenite, not $SERVER" >&2
    exit 2
    ;;
esac
mkdir -p "$OUT"
# Up to the hard limit: the server and loadgen each hold a descriptor per connection.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "# Soak: $CLIENTS clients against $SERVER for $SECS s"
echo
pin_cores
run_facts
echo

echo "soak: building (release)..." >&2
cargo build --release --quiet --example loadgen --example "$SERVER"
bin=${CARGO_TARGET_DIR:-target}/release/examples

server_pid=
# SIGTERM, and SIGKILL if the server has not exited 10 s later.
stop_server() {
    [ -n "$server_pid" ] || return 0
    kill "$server_pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "soak: $SERVER did not exit within 10 s of SIGTERM; killing it" >&2
        kill -9 "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}
chat_on_exit stop_server


port=$(free_port)
log=$OUT/server.log
# shellcheck disable=SC2086
RUST_LOG=${RUST_LOG:-warn} $server_cpus "$bin/$SERVER" --addr "127.0.0.1:$port" --store memory \
    --retention "$RETENTION" ${SOAK_SERVER_FLAGS:-} 2>"$log" &
server_pid=$!
wait_listening "$SERVER" "$server_pid" "$port" "$log" || exit 1
# The probes above were connections too: let the server forget them before the first sample.
sleep 1

args=(--mode soak --url "ws://127.0.0.1:$port" --clients "$CLIENTS" --duration-secs "$SECS"
    --warmup-secs "$WARMUP_SECS" --sample-secs "$SAMPLE_SECS" --soak-rate "$RATE"
    --settle-secs 5 --server-pid "$server_pid" --server-retention "$RETENTION")
# shellcheck disable=SC2206
args+=(${SOAK_LOADGEN_FLAGS:-})
echo "soak: loadgen ${args[*]}" >&2
status=0
# shellcheck disable=SC2086
$loadgen_cpus "$bin/loadgen" "${args[@]}" 2> >(tee "$OUT/loadgen.err" >&2) | tee "$OUT/loadgen.out" ||
    status=$?
stop_server
if grep -q 'panicked' "$log"; then
    echo "soak: the server panicked ($log):" >&2
    grep -A2 'panicked' "$log" | head -10 >&2
    [ "$status" != 0 ] || status=1
elif grep -qE '\bERROR\b' "$log"; then
    echo "soak: the server logged errors ($log):" >&2
    grep -E '\bERROR\b' "$log" | head -5 >&2
fi
exit "$status"
