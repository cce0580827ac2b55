# Sourced by the scripts that start servers: `free_port` prints a loopback port that nothing
# listens on, below the ephemeral range (so no client socket holds it), or fails saying so.
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
