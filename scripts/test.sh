#!/usr/bin/env bash
# The whole test suite, as the README documents it and CI runs it.
#
# Everything a test needs is brought up from here, so a fresh clone on a fresh machine passes with
# no manual setup: cargo for the Rust suites, and scripts/browser-test.sh installs Chromium and
# playwright-core for the browser test when they are missing. Backends that need a server (Redis)
# add their start-up here, next to the tests that use them.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-features --all-targets
cargo test --workspace --all-features --doc

# Two browsers chatting through the real page (installs chromium and playwright-core if missing).
./scripts/browser-test.sh
