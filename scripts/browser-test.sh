#!/usr/bin/env bash
# The browser test: two (three) users chat through the real web page in headless Chromium.
#
# Installs what it needs when it is missing, so a fresh machine passes: Debian's chromium (the
# test drives /usr/bin/chromium; no browser is downloaded) and playwright-core from npm (pinned in
# tests-browser/package-lock.json). Fails loudly when it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
    echo "browser-test: chromium is missing; installing Debian's chromium package" >&2
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "browser-test: cannot install chromium here (needs root and apt-get): install it and rerun" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "browser-test: node and npm are required (Debian packages nodejs and npm)" >&2
    exit 1
fi

cargo build --example chat-server
(cd tests-browser && npm ci --no-audit --no-fund --silent)
mkdir -p artifacts
(cd tests-browser && node --test --test-concurrency=1 chat.test.mjs)
