# Sourced by the scripts that run servers under the load generator (compare.sh, soak.sh): what
# they share, so that their runs are set up and described alike.

# `free_port` prints a loopback port that nothing listens on, below the ephemeral range (so no
# client socket holds it), or fails saying so.
free_port() {
    local port
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    echo "$(basename "$0"): no free port found" >&2
    exit 1
}

# `wait_listening NAME PID PORT LOG` waits up to 10 s for server NAME (process PID, its stderr in
# LOG) to accept connections on 127.0.0.1:PORT; if it exits first or never listens, says so with
# the end of its log and fails.
wait_listening() {
    local name=$1 pid=$2 port=$3 log=$4 me
    me=$(basename "$0" .sh)
    for _ in $(seq 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$me: $name did not start (it exited); its log ($log):" >&2
            tail -20 "$log" >&2
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "$me: $name did not start listening on 127.0.0.1:$port within 10 s; its log ($log):" >&2
    tail -20 "$log" >&2
    return 1
}

# `pin_cores` sets `server_cpus` and `loadgen_cpus` to taskset prefixes that put the server on the
# first half of the cores and the load generator on the other (PIN=0, one core or no taskset:
# empty, anywhere). Sharing cores, each run's figures moved with how the scheduler split them.
pin_cores() {
    server_cpus=
    loadgen_cpus=
    local cores half
    cores=$(nproc)
    if [ "${PIN:-1}" != 0 ] && [ "$cores" -ge 2 ] && command -v taskset >/dev/null; then
        half=$((cores / 2))
        server_cpus="taskset -c 0-$((half - 1))"
        loadgen_cpus="taskset -c $half-$((cores - 1))"
    fi
}

# `run_facts` prints, as a Markdown list, what a reader needs to weigh the figures that follow:
# date, machine, commit, the command as given (`overrides`, `command_line`), cores, open-file
# limit, load average, and where the raw output is (`OUT`). Call `pin_cores` first.
run_facts() {
    local commit
    echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), Linux $(uname -r)"
    if commit=$(git rev-parse --short HEAD 2>/dev/null); then
        git diff --quiet HEAD 2>/dev/null || commit+=" with uncommitted changes"
        echo "- commit: $commit"
    fi
    echo "- command: \`${overrides}${command_line}\`"
    if [ -n "$server_cpus" ]; then
        echo "- cores: the server on ${server_cpus#taskset -c }, the load generator on ${loadgen_cpus#taskset -c }"
    else
        echo "- cores: shared by the server and the load generator"
    fi
    echo "- open-file limit: $(ulimit -n); load average at the start: $(cut -d' ' -f1-3 /proc/loadavg); raw output: $OUT"
}
