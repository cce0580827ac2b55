#!/usr/bin/env bash
# The whole test suite, as the README documents it and CI runs it.
#
# Everything a test needs is brought up from here, so a fresh clone on a fresh machine passes with
# no manual setup: cargo for the Rust suites, a throwaway redis-server for the Redis backends
# (scripts/redis-for-tests.sh installs it when missing), a PostgreSQL database of the tests' own
# (scripts/postgres-for-tests.sh: on DATABASE_URL's server when set, else a throwaway cluster,
# installed when missing), and scripts/browser-test.sh installs Chromium and playwright-core for
# the browser test when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Never skipped: with CHAT_TEST_REDIS_URL or CHAT_TEST_DATABASE_URL unset, the Redis and
# PostgreSQL tests fail and say why.
. scripts/redis-for-tests.sh
. scripts/postgres-for-tests.sh

# The socket tests (tests/cluster.rs, tests/durability.rs) run the example servers as processes.
# `cargo test --all-targets` builds examples as test harnesses only, so build the binaries first.
cargo build --workspace --all-features --examples
cargo test --workspace --all-features --all-targets
cargo test --workspace --all-features --doc

# Two browsers chatting through the real page (installs chromium and playwright-core if missing).
./scripts/browser-test.sh

# The container setup, checked without a container engine (docs/deploy.md): the compose file
# validates, nginx accepts its config, the Dockerfile's stages and paths hold (installs Debian's
# docker-compose, nginx and python3-yaml if missing).
./scripts/check-deploy.sh
