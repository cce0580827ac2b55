#!/usr/bin/env bash
# The whole test suite, as the README documents it and CI runs it.
#
# Everything a test needs is brought up from here, so a fresh clone on a fresh machine passes with
# no manual setup. Today that is only cargo; backends that need a server (Redis, a browser) add
# their start-up here, next to the tests that use them.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-features --all-targets
cargo test --workspace --all-features --doc
