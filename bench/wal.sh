#!/usr/bin/env bash
# `make bench WAL=1`: the WAL one message writes, by kind of record (pg_waldump --stats), for a batch of
# 100 sent and for a message consumed: bussig's send_batch against the hand-written multi-row INSERT,
# and bussig's ack_and_read loop against the hand-written read-then-ack in two transactions. Where
# durable commits wait on WAL flushes (several clients), these bytes bound the rate more than CPU does.
# One client, run by psql one statement after another; the count does not depend on timing, except
# that a page's first change after a checkpoint carries its image (the "full-page images" column).
# Run by bench/run.sh against its cluster; BENCH_URL and BENCH_DATA_DIR come from there.
set -euo pipefail
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
: "${BENCH_URL:?run by bench/run.sh}" "${BENCH_DATA_DIR:?run by bench/run.sh}"
# shellcheck source=bench/common.sh
source "$(dirname "$0")/common.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
messages=20000

q -c "SELECT bussig.create_queue('wal')" -c "SELECT bussig.create_queue('wal_consume')" >/dev/null
repeat() { for _ in $(seq "$1"); do printf '%s\n' "$2"; done; }

# Runs the psql script $2 and prints, for label $1, each record kind's bytes per message (tab-separated).
record_kinds() {
    local label=$1 script=$2 start end
    q -c "CHECKPOINT" >/dev/null
    start=$(q -c "SELECT pg_current_wal_insert_lsn()")
    q -f "$script" >/dev/null
    end=$(q -c "SELECT pg_current_wal_insert_lsn()")
    runuser -u postgres -- "$PG_BIN/pg_waldump" -p "$BENCH_DATA_DIR/pg_wal" -s "$start" -e "$end" --stats=record |
        awk -v label="$label" -v n="$messages" '
            # Type, N, record size, full-page image size, combined size, each count followed by its share
            {
                line = $0
                gsub(/\([ 0-9.]+\)/, "", line)
                split(line, field, " ")
                if (field[2] ~ /^[0-9]+$/ && field[1] != "Total")
                    printf "%s\t%s\t%.1f\t%.1f\n", label, field[1], field[3] / n, field[4] / n
            }'
}

# Prints the two systems' record kinds side by side, largest first, with a total row.
side_by_side() {
    local title=$1 ours=$2 theirs=$3
    echo
    echo "== $title: WAL bytes per message by kind of record ($messages messages, 1 client)"
    echo
    echo "| record | hand-written | bussig | of which full-page images (hand-written, bussig) |"
    echo "|---|---|---|---|"
    awk -F'\t' '
        { kind[$2] = 1; bytes[$1, $2] = $3; images[$1, $2] = $4; records[$1] += $3; total[$1] += $3 + $4 }
        END {
            for (k in kind) {
                h = bytes["hand", k] + images["hand", k]; b = bytes["bussig", k] + images["bussig", k]
                if (h + b >= 0.5) printf "%s\t%.0f\t%.0f\t%.0f, %.0f\n", k, h, b, images["hand", k], images["bussig", k]
            }
            printf "~total\t%.0f\t%.0f\t%.0f, %.0f\n", total["hand"], total["bussig"],
                total["hand"] - records["hand"], total["bussig"] - records["bussig"]
        }' "$ours" "$theirs" |
        sort -t$'\t' -k3,3nr | sed 's/^~//' | awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }'
}

# Sending: batches of 100, after enough of them that both tables' B-trees have their working depth.
hand_batch="INSERT INTO hand.queue (payload) SELECT unnest($batch);"
bussig_batch() { printf "SELECT count(*) FROM bussig.send_batch('%s', %s);" "$1" "$batch"; }
repeat 300 "$hand_batch" >"$work/warm.sql"
repeat 300 "$(bussig_batch wal)" >>"$work/warm.sql"
q -f "$work/warm.sql" >/dev/null
repeat $((messages / 100)) "$hand_batch" >"$work/hand.sql"
repeat $((messages / 100)) "$(bussig_batch wal)" >"$work/bussig.sql"
record_kinds hand "$work/hand.sql" >"$work/send.hand"
record_kinds bussig "$work/bussig.sql" >"$work/send.bussig"
side_by_side "send_batch(100) vs multi-row INSERT" "$work/send.hand" "$work/send.bussig"

# Consuming 10 at a time from a backlog, as workload 3 does.
q -c "TRUNCATE hand.queue" >/dev/null
repeat $((2 * messages / 100)) "$hand_batch" >"$work/fill.sql"
repeat $((2 * messages / 100)) "$(bussig_batch wal_consume)" >>"$work/fill.sql"
q -f "$work/fill.sql" -c "VACUUM ANALYZE hand.queue, bussig.message" >/dev/null
repeat $((messages / 10)) "WITH locked AS (UPDATE hand.queue SET visible_at = now() + interval '30 seconds'
    WHERE id IN (SELECT id FROM hand.queue WHERE visible_at <= now() ORDER BY id LIMIT 10 FOR UPDATE SKIP LOCKED)
    RETURNING id) SELECT coalesce(array_agg(id), '{}') AS ids FROM locked \\gset
DELETE FROM hand.queue WHERE id = ANY(:'ids'::bigint[]);" >"$work/hand.sql"
{
    echo "\\set ids '{}'"
    echo "\\set tokens '{}'"
    repeat $((messages / 10 + 1)) "SELECT coalesce(array_agg(message_id), '{}') AS ids, coalesce(array_agg(lock_token), '{}') AS tokens
    FROM bussig.ack_and_read('wal_consume', :'ids'::bigint[], :'tokens'::uuid[], 10) \\gset"
} >"$work/bussig.sql"
record_kinds hand "$work/hand.sql" >"$work/consume.hand"
record_kinds bussig "$work/bussig.sql" >"$work/consume.bussig"
side_by_side "consume: ack_and_read(10) loop vs read 10 + ack in a 2nd transaction" "$work/consume.hand" "$work/consume.bussig"
