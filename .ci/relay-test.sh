#!/usr/bin/env bash
# The relay's tests: unit tests, then integration tests against the database BUSSIG_TEST_URL names
# (it must have `CREATE EXTENSION bussig`) and a nats-server with JetStream that each test starts on
# a free port. Every test runs its own relay processes and nats-server, so two may run at once.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${BUSSIG_TEST_URL:?set BUSSIG_TEST_URL to a database with the bussig extension}"
# Debian's package installs it in /usr/sbin, which not every PATH has.
if [[ -z "${NATS_SERVER:-}" ]] && ! command -v nats-server >/dev/null && [[ -x /usr/sbin/nats-server ]]; then
    export NATS_SERVER=/usr/sbin/nats-server
fi
if ! command -v "${NATS_SERVER:-nats-server}" >/dev/null; then
    echo "relay-test: nats-server not found (apt-get install nats-server, or set NATS_SERVER)" >&2
    exit 1
fi

echo "== relay tests (relay/)"
cargo test -p bussig-relay -- --test-threads=2
