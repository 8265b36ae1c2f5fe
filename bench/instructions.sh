#!/usr/bin/env bash
# `make bench INSTRUCTIONS=1`: CPU instructions per message of a batch of 100, counted by valgrind's
# callgrind in a single-user backend. Unlike time, the count is the same from run to run and does not
# move with whatever else the machine is doing, so it compares two builds, or two statements, closely.
# It leaves out the kernel (WAL writes and fsync, relation extension) and waits of every kind.
#
# Both tables are first filled with a million messages, so that their B-trees are as deep as under
# a backlog (PostgreSQL's rightmost-leaf fast path needs two levels). Each statement then runs in a
# fresh copy of that cluster, prepared once and executed in a transaction of its own each time (as the
# load generator and pgbench -M prepared run them), 200 times and then 400 times: the difference is
# the cost of 200 executions, without the backend's start or the caches its first executions fill.
# BENCH_CALLGRIND_OUT=DIR keeps each run's profile there (NAME-200.cg, NAME-400.cg) for
# callgrind_annotate; BENCH_INSTRUCTIONS_ONLY=read (a pattern of NAMEs) measures only those.
#
# A read position (src/message/read_position.rs) lives 1 s (shared) or 200 ms of the monotonic clock, and callgrind
# runs a backend about 50x slower than native: how many reads found their position, and how many
# started from the head of the index, depended on timing, and the read's count moved between runs of
# one build by up to 4%. So the backend runs with bench/instructions_clock.c preloaded, which slows
# the monotonic clocks (not the wall clock) 100,000 times: no position expires during a run, as
# between the reads of a consumer reading on at native speed, and the count is the same every run.
# BENCH_INSTRUCTIONS_CLOCK=expired instead makes every position expire before the next read (each
# read starts from the head); =real leaves the clock alone, as before.
# Run by bench/run.sh against its cluster, which this script stops.
set -euo pipefail
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
: "${BENCH_URL:?run by bench/run.sh}" "${BENCH_DATA_DIR:?run by bench/run.sh}"
repeats=200
# shellcheck source=bench/common.sh
source "$(dirname "$0")/common.sh"

if ! command -v valgrind >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
if ! command -v cc >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null
fi
clock=${BENCH_INSTRUCTIONS_CLOCK:-kept}
case "$clock" in kept | expired | real) ;; *) echo "BENCH_INSTRUCTIONS_CLOCK: kept, expired or real" >&2; exit 2 ;; esac
work=$(mktemp -d /var/tmp/bussig-instructions.XXXXXX)
chown postgres: "$work"
trap 'rm -rf "$work"' EXIT
cc -O2 -shared -fPIC -o "$work/clock.so" "$(dirname "$0")/instructions_clock.c" -ldl
as_postgres() { runuser -u postgres -- "$@"; }

q -c "SELECT bussig.create_queue('instructions')" >/dev/null
queue_id=$(q -c "SELECT queue_id FROM bussig.queue WHERE name = 'instructions'")
q -c "SELECT sum((SELECT count(*) FROM bussig.send_batch('instructions', array_fill(jsonb_build_object('n', g), ARRAY[1000]))))
      FROM generate_series(1, 1000) g" \
  -c "INSERT INTO hand.queue (payload) SELECT jsonb_build_object('n', g) FROM generate_series(1, 1000000) g" \
  -c "VACUUM ANALYZE bussig.message, hand.queue" -c "CHECKPOINT" >/dev/null
as_postgres "$PG_BIN/pg_ctl" -D "$BENCH_DATA_DIR" -m fast -w stop >/dev/null
as_postgres cp -a "$BENCH_DATA_DIR" "$work/template"

# Instructions of a backend that runs one prepared statement $2 times, each in its own transaction.
count() {
    local sql=$1 times=$2 profile=$3 script="$work/script.sql" data="$work/pgdata"
    {
        printf 'SET synchronous_commit = off;\n\n'
        printf 'PREPARE measured AS %s;\n\n' "$sql"
        for _ in $(seq "$times"); do printf 'EXECUTE measured;\n\n'; done
    } >"$script"
    rm -rf "$data"
    as_postgres cp -a "$work/template" "$data"
    as_postgres env LD_PRELOAD="$work/clock.so" BENCH_INSTRUCTIONS_CLOCK="$clock" valgrind --tool=callgrind --callgrind-out-file="$work/profile.cg" \
        "$PG_BIN/postgres" --single -D "$data" -j bench <"$script" >"$work/out" 2>"$work/err"
    if grep -q ERROR "$work/out"; then
        grep -m1 ERROR "$work/out" >&2
        exit 1
    fi
    if [[ -n "${BENCH_CALLGRIND_OUT:-}" ]]; then
        mkdir -p "$BENCH_CALLGRIND_OUT"
        cp "$work/profile.cg" "$BENCH_CALLGRIND_OUT/$profile-$times.cg"
    fi
    grep -o 'Collected : [0-9]*' "$work/err" | grep -o '[0-9]*$'
}

# name, file name of its profiles, SQL, messages per execution
measure() {
    local name=$1 profile=$2 sql=$3 per=$4 once twice
    if [[ -n "${BENCH_INSTRUCTIONS_ONLY:-}" && "$profile" != ${BENCH_INSTRUCTIONS_ONLY} ]]; then
        return
    fi
    once=$(count "$sql" "$repeats" "$profile")
    twice=$(count "$sql" "$((2 * repeats))" "$profile")
    awk -v name="$name" -v once="$once" -v twice="$twice" -v n="$((repeats * per))" \
        'BEGIN { printf "| %s | %.0f |\n", name, (twice - once) / n }'
}

echo
# Single statements are left out: in a single-user backend the count per transaction still grew with
# the number of transactions run, so the difference did not isolate one statement's cost.
echo "== Instructions per message in batches of 100 (callgrind, single-user backend, tables of a million messages, read positions $clock)"
echo
echo "| statement | instructions per message |"
echo "|---|---|"
measure "hand-written INSERT of 100" hand_written_batch "INSERT INTO hand.queue (payload) SELECT unnest($batch)" 100
measure "bussig.message, plain INSERT of 100" plain_insert_batch "INSERT INTO bussig.message (queue_id, payload, visible_at) SELECT $queue_id, unnest($batch), clock_timestamp()" 100
measure "bussig.send_batch of 100" send_batch "SELECT count(*) FROM bussig.send_batch('instructions', $batch)" 100
# Each read locks the next 100 of the million and commits, leaving them locked: bussig's delivery order
# puts them behind the ready ones. (A hand-written queue ordered by id would walk every one of them.)
measure "bussig.read of 100" read "SELECT count(*) FROM bussig.read('instructions', 100)" 100
