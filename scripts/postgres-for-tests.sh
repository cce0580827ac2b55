# Sourced by scripts/test.sh: a PostgreSQL for the tests of the PostgreSQL store, exported as
# CHAT_TEST_DATABASE_URL, and never a database the tests did not create:
#
# - with DATABASE_URL set, a fresh database is created on that server and dropped at exit;
# - else a throwaway cluster is made (initdb) in a temporary directory, listening only on a Unix
#   socket there, fsync on, and removed at exit. Debian's postgresql is installed when missing;
#   where that cannot be done, it fails saying what is missing.

. "$(dirname "${BASH_SOURCE[0]}")/on-exit.sh"

have_postgres() {
    command -v psql >/dev/null 2>&1 || return 1
    # A server of our own needs the server binaries too.
    [ -n "${DATABASE_URL:-}" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
if ! have_postgres; then
    echo "test: PostgreSQL is missing; installing Debian's postgresql package" >&2
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "test: cannot install PostgreSQL here (needs root and apt-get): install it, or set DATABASE_URL to a server the tests may create a database on, and rerun" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

chat_test_database="chat_test_$$_${RANDOM}"
if [ -n "${DATABASE_URL:-}" ]; then
    psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -q -c "CREATE DATABASE $chat_test_database" >/dev/null
    drop_test_database() {
        psql "$DATABASE_URL" -q -c "DROP DATABASE IF EXISTS $chat_test_database WITH (FORCE)" >/dev/null 2>&1 || true
    }
    chat_on_exit drop_test_database
    # The same server, our database: replace the URL's database name.
    CHAT_TEST_DATABASE_URL=$(printf '%s' "$DATABASE_URL" | sed -E "s#^([a-z]+://[^/]*)(/[^?]*)?#\\1/$chat_test_database#")
else
    bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    CHAT_PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/chat-test-postgres.XXXXXX")
    # PostgreSQL refuses to run as root; run it as the postgres user the package made.
    run_pg=()
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres "$CHAT_PG_DIR"
        run_pg=(runuser -u postgres --)
    fi
    "${run_pg[@]}" "$bindir/initdb" -D "$CHAT_PG_DIR/data" -A trust -U postgres --no-sync >/dev/null
    "${run_pg[@]}" "$bindir/pg_ctl" -D "$CHAT_PG_DIR/data" -l "$CHAT_PG_DIR/log" -w \
        -o "-c listen_addresses='' -k $CHAT_PG_DIR -c max_connections=300" start >/dev/null
    stop_test_postgres() {
        "${run_pg[@]}" "$bindir/pg_ctl" -D "$CHAT_PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$CHAT_PG_DIR"
    }
    chat_on_exit stop_test_postgres
    psql -h "$CHAT_PG_DIR" -U postgres -v ON_ERROR_STOP=1 -q -c "CREATE DATABASE $chat_test_database" >/dev/null
    CHAT_TEST_DATABASE_URL="postgresql:///$chat_test_database?host=$CHAT_PG_DIR&user=postgres"
fi
export CHAT_TEST_DATABASE_URL
echo "test: PostgreSQL for the tests at $CHAT_TEST_DATABASE_URL" >&2
