#!/usr/bin/env bash
# `make bench CPU=1`: where a message's cost goes. For each statement, one pgbench client runs it for
# a while; the server's CPU time (every server process: backend, WAL writer, checkpointer, bussig's
# worker) is divided by the transactions committed in that time, and the WAL one message writes is
# read off the WAL position. "bussig.message, plain INSERT" inserts into bussig's table by statement,
# as the extension owner may: the cost of the table's shape alone, without the function around it.
# Run by bench/run.sh against its cluster; BENCH_URL and the psql/pgbench paths come from there.
set -euo pipefail
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
seconds=${BENCH_SECONDS:-10}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck source=bench/common.sh
source "$(dirname "$0")/common.sh"

q -c "SELECT bussig.create_queue('cpu') WHERE NOT EXISTS (SELECT FROM bussig.queue WHERE name = 'cpu')" >/dev/null
queue_id=$(q -c "SELECT queue_id FROM bussig.queue WHERE name = 'cpu'")
ticks_per_second=$(getconf CLK_TCK)

server_ticks() {
    local total=0 pid
    for pid in $(pgrep -u postgres -x postgres); do
        # Fields 14 and 15 of /proc/PID/stat: user and system time; the name field has no spaces here.
        read -r -a stat <"/proc/$pid/stat" 2>/dev/null || continue
        total=$((total + stat[13] + stat[14]))
    done
    echo "$total"
}
commits() { q -c "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"; }
reset() { q -c "TRUNCATE bussig.message, hand.queue; CHECKPOINT" >/dev/null; }

# name, SQL of one transaction, messages per transaction
measure() {
    local name=$1 sql=$2 per=$3
    printf '%s\n' "$sql" >"$work/script.sql"
    reset
    "$PG_BIN/pgbench" -n -M prepared -c 1 -T $((seconds + 3)) -f "$work/script.sql" "$BENCH_URL" >"$work/out" 2>&1 &
    local bench=$!
    sleep 2
    local t0 c0 t1 c1
    t0=$(server_ticks); c0=$(commits)
    sleep "$seconds"
    t1=$(server_ticks); c1=$(commits)
    wait "$bench"
    local wal
    reset
    wal=$(q -c "SELECT pg_current_wal_insert_lsn()" -c "$sql" -c "$sql" -c "$sql" -c "SELECT pg_current_wal_insert_lsn()" |
        grep '/' | paste -sd' ' | awk '{print $1, $2}')
    wal=$(q -c "SELECT round(pg_wal_lsn_diff('${wal#* }', '${wal% *}') / (3.0 * $per))")
    awk -v name="$name" -v t="$((t1 - t0))" -v c="$((c1 - c0))" -v hz="$ticks_per_second" -v per="$per" -v wal="$wal" \
        -v s="$seconds" 'BEGIN { printf "| %s | %.0f | %.1f | %.0f | %s |\n", name, c / s * per, t / hz * 1e6 / c / per, c / s, wal }'
}

echo
echo "== Server CPU per message (1 client, durable commits, ${seconds} s each)"
echo
echo "| statement | msgs/s | server CPU µs per message | transactions/s | WAL bytes per message |"
echo "|---|---|---|---|---|"
measure "hand-written INSERT" "INSERT INTO hand.queue (payload) VALUES ('$payload');" 1
measure "bussig.message, plain INSERT" "INSERT INTO bussig.message (queue_id, payload, visible_at) VALUES ($queue_id, '$payload', clock_timestamp()) RETURNING message_id;" 1
measure "bussig.send" "SELECT bussig.send('cpu', '$payload');" 1
measure "hand-written INSERT of 100" "INSERT INTO hand.queue (payload) SELECT unnest($batch);" 100
measure "bussig.message, plain INSERT of 100" "INSERT INTO bussig.message (queue_id, payload, visible_at) SELECT $queue_id, unnest($batch), clock_timestamp();" 100
measure "bussig.send_batch of 100" "SELECT count(*) FROM bussig.send_batch('cpu', $batch);" 100
