# Sourced by scripts/test.sh: starts a throwaway redis-server for the tests of the Redis
# backends and exports CHAT_TEST_REDIS_URL; the server is stopped and its directory removed when
# the calling shell exits.
#
# It listens on a Unix socket in a fresh temporary directory (no TCP port to collide with, no
# data it did not create) and keeps nothing on disk. Installs Debian's redis-server when it is
# missing, or fails saying what is missing.

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "test: redis-server is missing; installing Debian's redis-server package" >&2
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "test: cannot install redis-server here (needs root and apt-get): install Redis 7 (redis-server, redis-cli) and rerun" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

. "$(dirname "${BASH_SOURCE[0]}")/on-exit.sh"
CHAT_REDIS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/chat-test-redis.XXXXXX")
stop_test_redis() {
    redis-cli -s "$CHAT_REDIS_DIR/redis.sock" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$CHAT_REDIS_DIR"
}
chat_on_exit stop_test_redis

redis-server --port 0 --unixsocket "$CHAT_REDIS_DIR/redis.sock" --unixsocketperm 700 \
    --save '' --appendonly no --dir "$CHAT_REDIS_DIR" \
    --logfile "$CHAT_REDIS_DIR/redis.log" --daemonize yes
for _ in $(seq 50); do
    redis-cli -s "$CHAT_REDIS_DIR/redis.sock" ping >/dev/null 2>&1 && break
    sleep 0.1
done
if ! redis-cli -s "$CHAT_REDIS_DIR/redis.sock" ping >/dev/null 2>&1; then
    echo "test: the test redis-server did not start:" >&2
    cat "$CHAT_REDIS_DIR/redis.log" >&2
    exit 1
fi
export CHAT_TEST_REDIS_URL="redis+unix://$CHAT_REDIS_DIR/redis.sock"
echo "test: Redis $(redis-server --version | awk '{print $3}') for the tests at $CHAT_TEST_REDIS_URL" >&2
