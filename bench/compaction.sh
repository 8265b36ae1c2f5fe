#!/usr/bin/env bash
# `make bench COMPACTION=1`: the longest a sender and a reader wait while the worker's compaction
# rewrites the message table (CLUSTER, under an ACCESS EXCLUSIVE lock) with 200,000 live messages in it.
# The table is bloated first (three million messages sent and purged: the step rewrites a table at least
# nine tenths empty) so that the compaction
# step finds it worth a rewrite; then one pgbench client sends, one reads and acks, each logging every
# transaction's latency, while bussig.run_maintenance() runs the steps, compaction among them.
# Run by bench/run.sh against its cluster; BENCH_URL and the psql/pgbench paths come from there.
set -euo pipefail
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
live=${BENCH_COMPACTION_LIVE:-200000}
work=$(mktemp -d)
chmod 777 "$work"
trap 'rm -rf "$work"' EXIT
# shellcheck source=bench/common.sh
source "$(dirname "$0")/common.sh"

# The database's own worker would compact as soon as the table is bloated: keep it out, so that the
# rewrite happens during the measurement.
q -c "ALTER SYSTEM SET bussig.worker_databases = 'none'" -c "SELECT pg_reload_conf()" >/dev/null
trap 'q -c "ALTER SYSTEM RESET bussig.worker_databases" -c "SELECT pg_reload_conf()" >/dev/null; rm -rf "$work"' EXIT
q -c "SELECT bussig.create_queue('compaction') WHERE NOT EXISTS (SELECT FROM bussig.queue WHERE name = 'compaction')" >/dev/null
q -c "SELECT bussig.create_queue('bloat') WHERE NOT EXISTS (SELECT FROM bussig.queue WHERE name = 'bloat')" >/dev/null
echo "filling: $live live messages, 3,000,000 sent and purged beside them"
q -c "SELECT count(*) FROM (SELECT bussig.send_batch('bloat', $batch) FROM generate_series(1, 30000)) s" >/dev/null
q -c "SELECT count(*) FROM (SELECT bussig.send_batch('compaction', $batch) FROM generate_series(1, $((live / 100)))) s" >/dev/null
q -c "SELECT bussig.purge_queue('bloat')" >/dev/null
q -c "VACUUM bussig.message" >/dev/null
before=$(q -c "SELECT pg_size_pretty(pg_total_relation_size('bussig.message'))")

echo "SELECT bussig.send('compaction', '$payload');" >"$work/send.sql"
cat >"$work/read.sql" <<SQL
BEGIN;
SELECT bussig.ack_batch('compaction', array_agg(message_id), array_agg(lock_token)) FROM bussig.read('compaction', 10);
COMMIT;
SQL
seconds=30
for role in send read; do
    (cd "$work" && "$PG_BIN/pgbench" -n -M prepared -c 1 -T $seconds -f "$role.sql" -l --log-prefix="$role" \
        "$BENCH_URL" >"$role.out" 2>&1) &
done
sleep 3
# The step takes the table's lock only when it is free at that instant; between the clients'
# transactions it is, now and then: it runs until it finds it so.
attempts=0
compacted=0
while ((compacted == 0 && attempts < 40)); do
    attempts=$((attempts + 1))
    started=$(date +%s.%N)
    maintenance=$(q -c "SELECT bussig.run_maintenance()")
    ended=$(date +%s.%N)
    compacted=$(echo "$maintenance" | sed -n 's/.*"compacted_tables": \([0-9]*\).*/\1/p')
done
wait
after=$(q -c "SELECT pg_size_pretty(pg_total_relation_size('bussig.message'))")

# pgbench's log: client, transaction, latency in microseconds, script, epoch seconds, microseconds.
longest() { awk '{ if ($3 + 0 > max) max = $3 + 0 } END { printf "%.1f", max / 1000 }' "$work"/"$1".[0-9]*; }
typical() { sort -k3 -n "$work"/"$1".[0-9]* | awk '{ a[NR] = $3 } END { printf "%.2f", a[int(NR / 2) + 1] / 1000 }'; }
echo
echo "compaction rewrote $compacted table(s) at attempt $attempts: $before -> $after; that run_maintenance" \
    "took $(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.0f", (b - a) * 1000 }') ms"
printf '%-8s %12s %14s\n' "" "median (ms)" "longest (ms)"
printf '%-8s %12s %14s\n' "send" "$(typical send)" "$(longest send)"
printf '%-8s %12s %14s\n' "read+ack" "$(typical read)" "$(longest read)"
