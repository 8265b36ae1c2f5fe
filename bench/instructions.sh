#!/usr/bin/env bash
# `make bench INSTRUCTIONS=1`: CPU instructions per message, counted by valgrind's callgrind in a
# single-user backend. Unlike time, the count is the same from run to run and does not move with
# whatever else the machine is doing, so it compares two builds, or two statements, to the percent.
# It leaves out the kernel (WAL writes and fsync, relation extension) and waits of every kind.
#
# Both tables are first filled with a million messages, so that their B-trees are as deep as under
# a backlog (PostgreSQL's rightmost-leaf fast path needs two levels). Each statement then runs in a
# fresh copy of that cluster, prepared once and executed 300 times, each in its own transaction (as
# the load generator and pgbench -M prepared run them); a run of `SELECT 1` as often is subtracted. Run by bench/run.sh against its cluster, which this script stops.
set -euo pipefail
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
: "${BENCH_URL:?run by bench/run.sh}" "${BENCH_DATA_DIR:?run by bench/run.sh}"
repeats=300
payload='{"id": 1, "kind": "order.created", "customer": "c-000042", "amount": 99.95, "currency": "EUR", "items": [1, 2, 3]}'
batch="array_fill('$payload'::jsonb, ARRAY[100])"

if ! command -v valgrind >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
work=$(mktemp -d /var/tmp/bussig-instructions.XXXXXX)
chown postgres: "$work"
trap 'rm -rf "$work"' EXIT
as_postgres() { runuser -u postgres -- "$@"; }
q() { "$PG_BIN/psql" -X -q -tA -v ON_ERROR_STOP=1 "$BENCH_URL" "$@"; }

q -c "SELECT bussig.create_queue('instructions')" >/dev/null
queue_id=$(q -c "SELECT queue_id FROM bussig.queue WHERE name = 'instructions'")
q -c "SELECT sum((SELECT count(*) FROM bussig.send_batch('instructions', array_fill(jsonb_build_object('n', g), ARRAY[1000]))))
      FROM generate_series(1, 1000) g" \
  -c "INSERT INTO hand.queue (payload) SELECT jsonb_build_object('n', g) FROM generate_series(1, 1000000) g" \
  -c "VACUUM ANALYZE bussig.message, hand.queue" -c "CHECKPOINT" >/dev/null
as_postgres "$PG_BIN/pg_ctl" -D "$BENCH_DATA_DIR" -m fast -w stop >/dev/null
as_postgres cp -a "$BENCH_DATA_DIR" "$work/template"

# Instructions of running one prepared statement $repeats times, each in its own transaction.
count() {
    local sql=$1 script="$work/script.sql" data="$work/pgdata"
    {
        printf 'SET synchronous_commit = off;\n\n'
        printf 'PREPARE measured AS %s;\n\n' "$sql"
        for _ in $(seq "$repeats"); do printf 'EXECUTE measured;\n\n'; done
    } >"$script"
    rm -rf "$data"
    as_postgres cp -a "$work/template" "$data"
    as_postgres valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$PG_BIN/postgres" --single -D "$data" -j bench <"$script" >"$work/out" 2>"$work/err"
    if grep -q ERROR "$work/out"; then
        grep -m1 ERROR "$work/out" >&2
        exit 1
    fi
    grep -o 'Collected : [0-9]*' "$work/err" | grep -o '[0-9]*$'
}

base=$(count "SELECT 1")
measure() {
    local name=$1 sql=$2 per=$3 total
    total=$(count "$sql")
    awk -v name="$name" -v total="$total" -v base="$base" -v n="$((repeats * per))" \
        'BEGIN { printf "| %s | %.0f |\n", name, (total - base) / n }'
}

echo
echo "== Instructions per message (callgrind, single-user backend, tables of a million messages)"
echo
echo "| statement | instructions per message |"
echo "|---|---|"
measure "hand-written INSERT" "INSERT INTO hand.queue (payload) VALUES ('$payload')" 1
measure "bussig.message, plain INSERT" "INSERT INTO bussig.message (queue_id, payload, visible_at) VALUES ($queue_id, '$payload', clock_timestamp())" 1
measure "bussig.send" "SELECT bussig.send('instructions', '$payload')" 1
measure "hand-written INSERT of 100" "INSERT INTO hand.queue (payload) SELECT unnest($batch)" 100
measure "bussig.message, plain INSERT of 100" "INSERT INTO bussig.message (queue_id, payload, visible_at) SELECT $queue_id, unnest($batch), clock_timestamp()" 100
measure "bussig.send_batch of 100" "SELECT count(*) FROM bussig.send_batch('instructions', $batch)" 100
