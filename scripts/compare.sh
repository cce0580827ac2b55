#!/usr/bin/env bash
# The floor against our two servers, measured in one run with one load generator:
#
#   ./scripts/compare.sh                   # full size: 1,000 clients, 10,000 idle connections (~10 min)
#   COMPARE_QUICK=1 ./scripts/compare.sh   # a smaller, faster pass (~3 min)
#
# Builds floor, chat-server (warp), chat-server-tungstenite and loadgen in release mode, then for
# each scenario starts each server fresh on a free port, runs examples/loadgen.rs against it, and
# kills it. Prints the date, the machine and the command, then one markdown table: each server's
# value and its ratio to the floor's (the floor is examples/floor.rs: a broadcast server with no
# rooms, store or limits, the least a WebSocket server can do; see its header).
#
# Scenarios (all clients in one room):
#   (a) sustained: 100 senders paced at RATES msg/s in turn, 1,000 clients; the highest rate that a
#       server delivers with nothing lost, duplicated, out of order or cut, and a p99 latency of
#       at most SUSTAIN_P99_MS (the stepping stops at the first rate that fails);
#   (b) burst: 1,000 clients, 100 senders x 25 messages unpaced (window 1): lost, deliveries/s, and
#       the server's CPU time per delivery (which the load generator sharing the CPU skews less);
#   (c) latency: p99 at 1,000 clients x 1,000 msg/s (the median of LATENCY_ROUNDS rounds, the
#       servers taking turns), and at 100 clients x 20 msg/s;
#   (d) idle: KiB of server memory (VmRSS) per joined connection with 10,000 connections in one
#       room held HOLD_SECS, and how many joined and how many were cut;
#   (e) churn (not on the floor, which keeps no history): every client drops its socket about every
#       CHURN_MS and resumes with `since` while 100 senders send: lost/duplicated/out of order.
#
# Environment overrides (defaults: full size; COMPARE_QUICK=1 gives the smaller values in brackets):
#   CLIENTS=1000 [200]  SENDERS=100 [20]
#   RATES="100 200 300 400 500 750 1000 1250 1500 1750 2000 2250 2500 2750 3000 3500 4000" [250 500 1000 2000 4000] (on 2
#       cores the load generator shares the CPU with the server: near 1.5M deliveries/s, i.e.
#       1,500 msg/s to 1,000 clients, the pair of them saturates the machine)
#   STEP_SECS=5 [2] (sending time of each sustained step and of the latency runs)
#   SUSTAIN_P99_MS=500
#   DRAIN_SECS=30 [10] (how long loadgen waits for late deliveries after the last ack: what has
#       not arrived by then counts as lost; a run ends as soon as everything has arrived)
#   STOP_SECS=10 (a server still running this long after SIGTERM is killed, and noted)
#   BURST_MESSAGES=25  LATENCY_RATE=1000 [400]  LATENCY_ROUNDS=5 [1] (rounds of the 1,000-client latency
#       run, each server in turn; the table shows the median and every round)  SMALL_CLIENTS=100  SMALL_SENDERS=10  SMALL_RATE=20
#   SMALL_SECS=10 [4]  IDLE_CONNECTIONS=10000 [2000]  HOLD_SECS=10 [3]
#   IDLE_BATCH=100 (connections opened at once; above the servers' listen backlog, 128 with
#       tokio's TcpListener::bind, the kernel drops SYNs and connects stall for a 1 s retransmit)
#   CHURN_MS=1000  CHURN_RATE=500 [200]  CHURN_SECS=5 [3]
#   SERVERS="floor chat-server chat-server-tungstenite"  SCENARIOS="a b c d e"
#   PIN=1 (the server on the first half of the cores, the load generator on the other half, with
#       taskset; PIN=0 lets them share every core)
#   SERVER_FLAGS="" (more flags for both chat servers; CHAT_* variables work too, see --help)
#   COMPARE_OUT=target/compare/<time> (every loadgen output and server log)
#
# The chat servers run with --store memory --rate-per-second 100000 --rate-burst 100000 and their
# other limits at their defaults. Raw JSON lines of every run go to $COMPARE_OUT/runs.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/on-exit.sh
. scripts/bench-lib.sh

command_line="$0${*:+ $*}"
overrides=
for name in COMPARE_QUICK CLIENTS SENDERS RATES STEP_SECS SUSTAIN_P99_MS DRAIN_SECS BURST_MESSAGES \
    LATENCY_RATE LATENCY_ROUNDS SMALL_CLIENTS SMALL_SENDERS SMALL_RATE SMALL_SECS IDLE_CONNECTIONS HOLD_SECS \
    IDLE_BATCH CHURN_MS CHURN_RATE CHURN_SECS SERVERS SCENARIOS SERVER_FLAGS COMPARE_OUT STOP_SECS PIN \
    CARGO_TARGET_DIR; do
    if [ -n "${!name+x}" ]; then overrides+="$name=$(printf '%q' "${!name}") "; fi
done

if [ "${COMPARE_QUICK:-0}" != 0 ]; then
    CLIENTS=${CLIENTS:-200} SENDERS=${SENDERS:-20} RATES=${RATES:-250 500 1000 2000 4000}
    STEP_SECS=${STEP_SECS:-2} LATENCY_RATE=${LATENCY_RATE:-400} LATENCY_ROUNDS=${LATENCY_ROUNDS:-1}
    SMALL_SECS=${SMALL_SECS:-4}
    IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-2000} HOLD_SECS=${HOLD_SECS:-3}
    CHURN_RATE=${CHURN_RATE:-200} CHURN_SECS=${CHURN_SECS:-3} DRAIN_SECS=${DRAIN_SECS:-10}
fi
CLIENTS=${CLIENTS:-1000}
SENDERS=${SENDERS:-100}
RATES=${RATES:-100 200 300 400 500 750 1000 1250 1500 1750 2000 2250 2500 2750 3000 3500 4000}
STEP_SECS=${STEP_SECS:-5}
SUSTAIN_P99_MS=${SUSTAIN_P99_MS:-500}
DRAIN_SECS=${DRAIN_SECS:-30}
STOP_SECS=${STOP_SECS:-10}
BURST_MESSAGES=${BURST_MESSAGES:-25}
LATENCY_RATE=${LATENCY_RATE:-1000}
LATENCY_ROUNDS=${LATENCY_ROUNDS:-5}
SMALL_CLIENTS=${SMALL_CLIENTS:-100}
SMALL_SENDERS=${SMALL_SENDERS:-10}
SMALL_RATE=${SMALL_RATE:-20}
SMALL_SECS=${SMALL_SECS:-10}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
HOLD_SECS=${HOLD_SECS:-10}
IDLE_BATCH=${IDLE_BATCH:-100}
CHURN_MS=${CHURN_MS:-1000}
CHURN_RATE=${CHURN_RATE:-500}
CHURN_SECS=${CHURN_SECS:-5}
SERVERS=${SERVERS:-floor chat-server chat-server-tungstenite}
SCENARIOS=${SCENARIOS:-a b c d e}
SERVER_FLAGS=${SERVER_FLAGS:-}
OUT=${COMPARE_OUT:-target/compare/$(date +%Y%m%d-%H%M%S)}

for tool in cargo jq awk; do
    command -v "$tool" >/dev/null || { echo "compare: needs $tool" >&2; exit 1; }
done
mkdir -p "$OUT"
# Up to the hard limit: 10,000 connections need 10,000 descriptors on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "# Floor vs chat-server vs chat-server-tungstenite"
echo
pin_cores
run_facts
echo

echo "compare: building (release)..." >&2
cargo build --release --quiet --example floor --example loadgen --example chat-server \
    --example chat-server-tungstenite
bin=${CARGO_TARGET_DIR:-target}/release/examples

server_pid=
server_name=
server_url=
server_stem=
stuck=()
# SIGTERM, and SIGKILL if the server has not exited STOP_SECS later (noted under the table, with
# its sockets saved next to its log: a server that does not stop is a finding too).
stop_server() {
    [ -n "$server_pid" ] || return 0
    kill "$server_pid" 2>/dev/null || true
    for _ in $(seq $((STOP_SECS * 10))); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "compare: $server_name did not exit within $STOP_SECS s of SIGTERM; killing it" >&2
        stuck+=("$server_name (${server_stem##*/})")
        { ss -tanpi 2>/dev/null | grep -A1 "pid=$server_pid," || true; } >"$server_stem.stuck-sockets"
        kill -9 "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" 2>/dev/null || true
    server_pid=
}
chat_on_exit stop_server


start_server() { # name log
    local name=$1 log=$2 port
    server_name=$name
    server_stem=${log%.server.log}
    port=$(free_port)
    case $name in
    floor) $server_cpus "$bin/floor" --addr "127.0.0.1:$port" 2>"$log" & ;;
    chat-server | chat-server-tungstenite)
        # shellcheck disable=SC2086
        RUST_LOG=${RUST_LOG:-warn} $server_cpus "$bin/$name" --addr "127.0.0.1:$port" --store memory \
            --rate-per-second 100000 --rate-burst 100000 $SERVER_FLAGS 2>"$log" &
        ;;
    *)
        echo "compare: unknown server $name" >&2
        exit 1
        ;;
    esac
    server_pid=$!
    wait_listening "$name" "$server_pid" "$port" "$log" || exit 1
    server_url="ws://127.0.0.1:$port"
}

declare -A result
run_number=0
json=
# Starts SERVER fresh, runs loadgen with ARGS against it, stops it; the JSON line lands in $json
# ("{}" if loadgen printed none).
measure() { # server label loadgen-args...
    local server=$1 label=$2
    shift 2
    run_number=$((run_number + 1))
    local stem
    stem="$OUT/$(printf '%03d' "$run_number")-$server-$label"
    start_server "$server" "$stem.server.log"
    local args=(--url "$server_url" "$@" --server-pid "$server_pid")
    echo "compare: $server $label: loadgen ${args[*]}" >&2
    $loadgen_cpus "$bin/loadgen" "${args[@]}" >"$stem.out" 2>"$stem.err" || true
    stop_server
    json=$(grep '^{' "$stem.out" | tail -1 || true)
    if [ -z "$json" ]; then
        echo "compare: $server $label: loadgen reported nothing; its errors:" >&2
        tail -5 "$stem.err" >&2
        json='{}'
    else
        grep '^| [0-9]' "$stem.out" | sed 's/^/compare:   /' >&2 || true
        grep -m3 'loadgen: ' "$stem.err" | sed 's/^/compare:   /' >&2 || true
    fi
    jq -c --arg server "$server" --arg run "$label" '{server: $server, run: $run} + .' \
        <<<"$json" >>"$OUT/runs.jsonl"
}

field() { jq -r "$1 // \"-\"" <<<"$json"; }
clean() { jq -r '(.lost // 1) == 0 and (.duplicated // 1) == 0 and (.out_of_order // 1) == 0 and (.closed_early // 0) == 0' <<<"$json"; }
# Messages per sender for RATE msg/s over SECS with SENDERS senders (at least 1).
per_sender() { awk -v r="$1" -v s="$2" -v n="$3" 'BEGIN { m = int(r * s / n + 0.5); print (m < 1 ? 1 : m) }'; }
# A latency cell: p99, with what went wrong beside it.
latency_cell() {
    if [ "$json" = '{}' ]; then echo "failed"; return; fi
    jq -r '(.p99_ms * 10 | round / 10 | tostring)
        + (if .lost > 0 then " (lost \(.lost))" else "" end)
        + (if .closed_early > 0 then " (\(.closed_early) cut)" else "" end)' <<<"$json"
}

for scenario in $SCENARIOS; do
    for server in $SERVERS; do
        case $scenario in
        a)
            best=0
            top=
            for rate in $RATES; do
                top=$rate
                measure "$server" "sustained-$rate" --clients "$CLIENTS" --senders "$SENDERS" \
                    --messages "$(per_sender "$rate" "$STEP_SECS" "$SENDERS")" --rate "$rate" \
                    --drain-secs "$DRAIN_SECS"
                if [ "$(clean)" = true ] &&
                    awk -v p="$(field .p99_ms)" -v m="$SUSTAIN_P99_MS" 'BEGIN { exit !(p <= m) }'; then
                    best=$rate
                else
                    top=
                    break
                fi
            done
            result[$server.a]=$best
            # Every rate passed: the server may do more than was asked.
            [ -n "$top" ] && result[$server.a.note]="≥ "
            ;;
        b)
            measure "$server" burst --clients "$CLIENTS" --senders "$SENDERS" \
                --messages "$BURST_MESSAGES" --window 1 --drain-secs "$DRAIN_SECS"
            result[$server.b.lost]=$(field .lost)
            result[$server.b.rate]=$(jq -r '.deliveries_per_s // "-" | if type == "number" then round else . end' <<<"$json")
            result[$server.b.cpu]=$(jq -r '.server_cpu_us_per_delivery // "-" | if type == "number" then (. * 100 | round / 100) else . end' <<<"$json")
            ;;
        c)
            # At the machine's limit p99 swings from run to run, the floor's as much as ours:
            # LATENCY_ROUNDS rounds, each server once per round in turn, and the median of each
            # server's rounds is its value (all of them are shown below it).
            if [ "$server" = "${SERVERS%% *}" ]; then
                for round in $(seq "$LATENCY_ROUNDS"); do
                    for each in $SERVERS; do
                        measure "$each" "latency-$CLIENTS-round$round" --clients "$CLIENTS" \
                            --senders "$SENDERS" \
                            --messages "$(per_sender "$LATENCY_RATE" "$STEP_SECS" "$SENDERS")" \
                            --rate "$LATENCY_RATE" --drain-secs "$DRAIN_SECS"
                        result[$each.c1.rounds]+="${result[$each.c1.rounds]:+, }$(latency_cell)"
                        if [ "$(clean)" = true ]; then
                            result[$each.c1.p99s]+=" $(field .p99_ms)"
                        else
                            result[$each.c1.failed]=1
                        fi
                    done
                done
                for each in $SERVERS; do
                    if [ -n "${result[$each.c1.failed]:-}" ]; then
                        result[$each.c1]="not clean: see below"
                    else
                        result[$each.c1]=$(tr ' ' '\n' <<<"${result[$each.c1.p99s]}" | grep . |
                            sort -g | awk '{ v[NR] = $1 } END {
                                m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
                                printf "%.1f", m }')
                    fi
                done
            fi
            measure "$server" "latency-$SMALL_CLIENTS" --clients "$SMALL_CLIENTS" \
                --senders "$SMALL_SENDERS" \
                --messages "$(per_sender "$SMALL_RATE" "$SMALL_SECS" "$SMALL_SENDERS")" \
                --rate "$SMALL_RATE" --drain-secs "$DRAIN_SECS"
            result[$server.c2]=$(latency_cell)
            ;;
        d)
            measure "$server" idle --mode idle --clients "$IDLE_CONNECTIONS" \
                --hold-secs "$HOLD_SECS" --batch "$IDLE_BATCH" --max-connect-secs 120
            result[$server.d.connect]=$(jq -r '.connect_s // "-" | if type == "number" then (. * 100 | round / 100) else . end' <<<"$json")
            result[$server.d]=$(jq -r '.kib_per_connection // "-" | if type == "number" then (. * 10 | round / 10) else . end' <<<"$json")
            result[$server.d.cut]=$(jq -r 'if .joined == null then "failed" else
                "\(.joined) joined, \(.cut) cut" + (if .failed > 0 then ", \(.failed) failed" else "" end)
                + (if .connecting_stopped then " (stopped connecting at 120 s)" else "" end) end' <<<"$json")
            ;;
        e)
            if [ "$server" = floor ]; then
                result[$server.e]="n/a (no history)"
                continue
            fi
            measure "$server" churn --mode churn --clients "$CLIENTS" --senders "$SENDERS" \
                --messages "$(per_sender "$CHURN_RATE" "$CHURN_SECS" "$SENDERS")" \
                --rate "$CHURN_RATE" --churn-ms "$CHURN_MS" --drain-secs "$DRAIN_SECS"
            result[$server.e]=$(jq -r 'if .lost == null then "failed" else
                "\(.lost) / \(.duplicated) / \(.out_of_order), \(.reconnects) reconnects"
                + (if .server_closes > 0 then ", \(.server_closes) closed by the server" else "" end)
                + (if .gave_up > 0 then ", \(.gave_up) gave up" else "" end) end' <<<"$json")
            ;;
        *)
            echo "compare: unknown scenario $scenario (a b c d e)" >&2
            exit 1
            ;;
        esac
    done
done

# VALUE / FLOOR, when both are numbers and the floor's is not 0.
ratio() {
    awk -v v="$1" -v f="$2" 'BEGIN {
        if (v ~ /^[0-9.]+$/ && f ~ /^[0-9.]+$/ && f + 0 > 0) printf "%.2f×", v / f; else printf "–"
    }'
}
label_of() {
    case $1 in
    floor) echo "floor" ;;
    chat-server) echo "chat-server (warp)" ;;
    *) echo "$1" ;;
    esac
}
others=()
for server in $SERVERS; do [ "$server" != floor ] && others+=("$server"); done
row() { # title key [ratio]
    local line="| $1 | ${result[floor.$2.note]:-}${result[floor.$2]:--}"
    for server in "${others[@]}"; do
        line+=" | ${result[$server.$2.note]:-}${result[$server.$2]:--} |"
        if [ "${3:-}" = ratio ]; then
            line+=" $(ratio "${result[$server.$2]:-}" "${result[floor.$2]:-}")"
        fi
    done
    echo "$line |"
}

header="| scenario | floor"
rule="|---|---"
for server in "${others[@]}"; do
    header+=" | $(label_of "$server") | vs floor"
    rule+="|---|---"
done
echo "$header |"
echo "$rule|"
for scenario in $SCENARIOS; do
    case $scenario in
    a) row "(a) sustained: highest paced rate, msg/s, with nothing lost and p99 ≤ ${SUSTAIN_P99_MS} ms ($CLIENTS clients, $SENDERS senders; tried: ${RATES// /, })" a ratio ;;
    b)
        row "(b) burst: lost deliveries ($CLIENTS clients, $SENDERS senders x $BURST_MESSAGES unpaced)" b.lost
        row "(b) burst: deliveries/s" b.rate ratio
        row "(b) burst: server CPU µs per delivery (user + system)" b.cpu ratio
        ;;
    c)
        row "(c) latency: p99 ms, $CLIENTS clients x $LATENCY_RATE msg/s (median of $LATENCY_ROUNDS rounds)" c1 ratio
        row "(c) … each round's p99 ms, in order" c1.rounds
        row "(c) latency: p99 ms, $SMALL_CLIENTS clients x $SMALL_RATE msg/s" c2 ratio
        ;;
    d)
        row "(d) idle: server KiB per joined connection ($IDLE_CONNECTIONS in one room, held ${HOLD_SECS} s)" d ratio
        row "(d) idle: connections joined / cut" d.cut
        row "(d) idle: seconds to connect and join them all (batches of $IDLE_BATCH)" d.connect ratio
        ;;
    e) row "(e) churn: lost / duplicated / out of order ($CLIENTS clients reconnecting every ~${CHURN_MS} ms, $SENDERS senders at $CHURN_RATE msg/s)" e ;;
    esac
done
echo
echo "Ratios are the server's value over the floor's: above 1 is better for rates, below 1 is better for"
echo "latency, CPU, memory and time. Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (anything else"
echo "running on the machine skews every number; the floor is measured in the same run to show how much)."
if [ ${#stuck[@]} -gt 0 ]; then
    echo
    echo "Did not exit within $STOP_SECS s of SIGTERM (killed; sockets in $OUT/*.stuck-sockets): ${stuck[*]}"
fi
