#!/bin/bash
# Runs every cell: workloads send_one, send_batch, consume; 1, 2, 4 clients; variants a and b
# (alternating, order swapped each repetition); REPS repetitions of SECONDS s each. Every run starts
# from a rebuilt table of 1M ready messages (reset.sql). One CSV line per run to stdout.
# Server CPU is read from /proc: run it on the database host, as root or the postgres user.
# Needs PGHOST/PGPORT/PGUSER/PGDATABASE of a throw-away database.
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}; REPS=${REPS:-3}; PREFILL=${PREFILL:-1000000}
WORKLOADS=${WORKLOADS:-"send_one send_batch consume"}; CLIENTS=${CLIENTS:-"1 2 4"}
q() { psql -XAtq -v ON_ERROR_STOP=1 "$@"; }
# Server CPU in clock ticks: the postmaster's own and reaped children's, plus its live children's.
PM=$(awk '{print $4}' /proc/"$(q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'")"/stat)
cpu_ticks() { python3 -c '
import os, sys
pm = sys.argv[1]
def stat(p):
    s = open(f"/proc/{p}/stat").read(); return s[s.rfind(")") + 2:].split()
tot = sum(int(x) for x in stat(pm)[11:15])
for p in filter(str.isdigit, os.listdir("/proc")):
    try: r = stat(p)
    except OSError: continue
    if r[1] == pm: tot += int(r[11]) + int(r[12])
print(tot)' "$PM"; }
HZ=$(getconf CLK_TCK)
echo "workload,variant,clients,rep,tps,msgs_per_tx,msgs_per_s,messages,wal_bytes,wal_per_msg,id_index_bytes,delivery_order_bytes,all_index_bytes,heap_bytes,server_cpu_us_per_msg"
for w in $WORKLOADS; do
  case $w in send_one) per=1; col=n_tup_ins;; send_batch) per=100; col=n_tup_ins;; consume) per=10; col=n_tup_del;; esac
  for rep in $(seq "$REPS"); do
    for c in $CLIENTS; do
      if (( rep % 2 )); then order="a b"; else order="b a"; fi
      for v in $order; do
        q -v v=$v -v prefill="$PREFILL" -f reset.sql >/dev/null 2>&1
        read -r lsn0 n0 < <(q -F ' ' -c "SELECT pg_current_wal_lsn(), coalesce((SELECT $col FROM pg_stat_user_tables WHERE relid = '$v.message'::regclass), 0)")
        t0=$(cpu_ticks)
        out=$(PGOPTIONS="-c search_path=$v" pgbench -n -M prepared -c "$c" -j "$(( c < 2 ? c : 2 ))" -T "$SECONDS_PER_RUN" -f "$w.sql" 2>&1)
        tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' <<<"$out")
        sleep 1
        t1=$(cpu_ticks)
        read -r wal n1 idx dord alli heap < <(q -F ' ' -c "SELECT pg_current_wal_lsn() - '$lsn0'::pg_lsn, (SELECT $col FROM pg_stat_user_tables WHERE relid = '$v.message'::regclass),
             pg_relation_size(CASE WHEN '$v' = 'a' THEN '$v.message_pkey' ELSE '$v.message_locked_id' END::regclass),
             pg_relation_size('$v.message_delivery_order'), pg_indexes_size('$v.message'), pg_relation_size('$v.message')")
        msgs=$(( n1 - n0 ))
        echo "$w,$v,$c,$rep,$tps,$per,$(python3 -c "print(round($tps*$per))"),$msgs,$wal,$(python3 -c "print(round($wal/max($msgs,1)))"),$idx,$dord,$alli,$heap,$(python3 -c "print(round(($t1-$t0)*1e6/$HZ/max($msgs,1), 1))")"
      done
    done
  done
done
