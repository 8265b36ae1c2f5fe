#!/usr/bin/env bash
# `make test`: every test bussig has, against throw-away clusters.
#   1. #[pg_test] unit tests, inside pgrx's own test cluster
#   2. pg_regress scripts in pg_test/ (SQL with expected output)
#   3. client-level tests in tests/, over a real client library, and the Rust client in clients/rust
#   4. the relay to NATS JetStream in relay/, against a real nats-server
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PGXS=$("$PG_BIN/pg_config" --pgxs)
PORT=${BUSSIG_TEST_PORT:-28816}
BOUNCER_PORT=$((PORT + 2))

.ci/setup.sh

work=$(mktemp -d /tmp/bussig-test.XXXXXX)
chmod 755 "$work"
log="$work/test.log"
trap '.ci/pgbouncer.sh stop "$work/pgbouncer"; .ci/cluster.sh stop "$work/pgdata"; rm -rf "$work"' EXIT

echo "== unit tests (#[pg_test])"
# pgrx copies bussig.so over the installed one in place, which would crash any running server that has it
# mapped; removed first, the copy gets a new inode and running servers keep the old file.
rm -f "$("$PG_BIN/pg_config" --pkglibdir)/bussig.so"
cargo pgrx test pg15 --runas postgres --pgdata /tmp/bussig-pgrx-test 2>&1 | tee -a "$log"

echo "== install into PostgreSQL 15"
.ci/install.sh --debug
.ci/cluster.sh start "$work/pgdata" "$PORT"
psql=("$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres)

echo "== pg_regress (pg_test/)"
tests=$(cd pg_test/sql && ls *.sql | sed 's/\.sql$//')
if ! "$(dirname "$PGXS")/../test/regress/pg_regress" --bindir="$PG_BIN" --host=127.0.0.1 --port="$PORT" \
    --user=postgres --dbname=bussig_regress --inputdir=pg_test --outputdir="$work/regress" $tests | tee -a "$log"; then
    cat "$work/regress/regression.diffs"
    exit 1
fi

echo "== client tests (tests/)"
"${psql[@]}" -d postgres -c "CREATE DATABASE bussig_test"
"${psql[@]}" -d bussig_test -c "CREATE EXTENSION bussig"
export BUSSIG_TEST_URL="host=127.0.0.1 port=$PORT user=postgres dbname=bussig_test"
export BUSSIG_TEST_PGDATA="$work/pgdata"
# Directly, the session URL is the plain one: a value from the calling shell would point elsewhere.
unset BUSSIG_TEST_SESSION_URL
# A hung statement fails its test instead of the run, behind the proxy too.
"${psql[@]}" -d postgres -c "ALTER DATABASE bussig_test SET statement_timeout = '30s'"
# These stop, crash or reload the whole server: they run alone, after the others.
server_level=(fan_out_survives_worker_kill workers_follow_a_reloaded a_failing_step_does_not_stop
              consumer_backend_killed immediate_stop_under_load terminated_waits_leave
              canceled_and_timed_out_waits fast_shutdown_is_not_held_up)
skip_server_level=$(printf -- '--skip %s ' "${server_level[@]}")
# shellcheck disable=SC2086
cargo test -p bussig-tests -- --test-threads=4 $skip_server_level 2>&1 | tee -a "$log"

echo "== the Rust client (clients/rust)"
cargo test -p bussig-client --features otel 2>&1 | tee -a "$log"

echo "== the Python client (clients/python)"
clients/python/run_tests.sh 2>&1 | tee -a "$log"

echo "== client tests through pgbouncer (transaction pooling)"
.ci/pgbouncer.sh start "$work/pgbouncer" "$BOUNCER_PORT" "$PORT"
# shellcheck disable=SC2086
BUSSIG_TEST_SESSION_URL="$BUSSIG_TEST_URL" \
BUSSIG_TEST_URL="host=127.0.0.1 port=$BOUNCER_PORT user=postgres dbname=bussig_test" \
BUSSIG_TORTURE_SECONDS=15 \
    cargo test -p bussig-tests -- --test-threads=4 $skip_server_level 2>&1 | tee -a "$log"
# The Rust client sends unnamed statements only, so it runs through the pooler unchanged; a test that
# ends a consumer's own server connection needs one of its own.
BUSSIG_TEST_SESSION_URL="$BUSSIG_TEST_URL" \
BUSSIG_TEST_URL="host=127.0.0.1 port=$BOUNCER_PORT user=postgres dbname=bussig_test" \
    cargo test -p bussig-client --features otel 2>&1 | tee -a "$log"
BUSSIG_TEST_URL="host=127.0.0.1 port=$BOUNCER_PORT user=postgres dbname=bussig_test" \
    clients/python/run_tests.sh 2>&1 | tee -a "$log"
.ci/pgbouncer.sh stop "$work/pgbouncer"

echo "== server-level client tests (alone)"
cargo test -p bussig-tests --test worker_reload -- --test-threads=1 2>&1 | tee -a "$log"
cargo test -p bussig-tests --test crash_recovery -- --test-threads=1 2>&1 | tee -a "$log"
cargo test -p bussig-tests --test worker_crash 2>&1 | tee -a "$log"

.ci/relay-test.sh 2>&1 | tee -a "$log"

# One closing line for all of it: cargo's "test result" lines plus pg_regress's "test … ok  N ms" lines.
passed=$(awk '/^test result:/ {n += $4} /^test .* \.\.\. ok +[0-9]+ ms$/ {n++} END {print n + 0}' "$log")
failed=$(awk '/^test result:/ {n += $6} END {print n + 0}' "$log")
echo "bussig: $passed passed, $failed failed"
