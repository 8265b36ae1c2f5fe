#!/usr/bin/env bash
# `make bench`: one throw-away PostgreSQL 15 cluster with fixed settings, bussig, PgQ, pgmq and a
# hand-written SKIP LOCKED queue installed side by side, then the load generator (bench/src) runs every
# workload. pgmq is plain SQL, installed by the load generator from the scripts the `pgmq` crate embeds.
# Workloads: 1 send, 2 send_batch, 3 consume, 4 producers and consumers, 5 head of line, 6 routing,
# 7 long-poll wake, 8 soak (and 9 memory), 10 consume of a queue filled after the last ANALYZE,
# 11 job queue of 4 to 128 long-polling consumers working 1 ms per message, 12 pressure: 800 msgs/s
# to 32 consumers while an xid is held, then while REPEATABLE READ sessions scan the message table,
# 13 faults: consumer backends terminated, the server restarted, a consumer process killed, with a
# ledger of acks checked for messages lost or acked twice, 14 the Rust client's consumer, 15 the Python
# client's worker against procrastinate and pgqueuer (installed from PyPI into a virtual environment),
# 16 ordered message groups against pgmq's read_grouped, 17 streams: appends against the hand-written
# INSERT, a consumer group against the hand-written consume and PgQ.
#   QUICK=1               a short run (a few minutes) for use while developing
#   CPU=1                 instead: server CPU and WAL per message of send, send_batch and plain INSERTs
#   INSTRUCTIONS=1        instead: CPU instructions per message of batches of 100 (sends and a read), counted by callgrind
#                         (BENCH_CALLGRIND_OUT=DIR keeps the profiles; BENCH_INSTRUCTIONS_ONLY=read measures only that)
#                         (read positions never expire under callgrind; BENCH_INSTRUCTIONS_CLOCK=expired: always)
#   WAL=1                 instead: WAL bytes per message by kind of record, sending and consuming
#   COMPACTION=1          instead: the longest wait of a sender and a reader while the worker's
#                         compaction rewrites a table holding 200,000 live messages
#                         (BENCH_COMPACTION_LIVE=50000: another number of them)
#   BENCH_SKIP_INSTALL=1  use the bussig already installed instead of building and installing it
#   BENCH_ONLY=1,3        only those workloads (numbers above; 8: the soak); prints, writes nothing to docs/
#   BENCH_SKIP=12,13      every workload but those, written to docs/ under that command
#   BENCH_SECONDS=5       length of each measurement (default 20, QUICK 1)
#   BENCH_JOB_CONSUMERS=64,128  workload 11's consumer counts (default 4,16,64,128)
#   BENCH_PRESSURE_BASELINE=60, BENCH_PRESSURE_SECONDS=240  workload 12's baseline and each pressure
#   BENCH_PORT, BENCH_DATA  where the cluster listens and lives (defaults: 28850, /var/tmp/bussig-bench)
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
port=${BENCH_PORT:-28850}
base=${BENCH_DATA:-/var/tmp/bussig-bench}
datadir=$base/pgdata
as_postgres() { runuser -u postgres -- env -u RUST_BACKTRACE "$@"; }

# Durable commits as in production; the rest sized so that no workload waits on a checkpoint or on
# eviction, and identical for the four systems since they share the cluster. Connections for the 128
# consumers of workload 11, its producer and the rest.
settings=$(cat <<CONF
shared_buffers = 1GB
work_mem = 16MB
maintenance_work_mem = 256MB
max_connections = 300
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = replica
max_wal_size = 8GB
checkpoint_timeout = 15min
autovacuum = on
autovacuum_naptime = 10s
jit = off
shared_preload_libraries = 'bussig'
CONF
)

if [[ -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    .ci/setup.sh
    .ci/install.sh
fi
if [[ ! -f "$("$PG_BIN/pg_config" --sharedir)/extension/pgq.control" ]]; then
    apt-get install -y postgresql-15-pgq3 >/dev/null
fi

stop_cluster() {
    if [[ -d "$datadir" ]] && as_postgres "$PG_BIN/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        as_postgres "$PG_BIN/pg_ctl" -D "$datadir" -m fast -w stop >/dev/null
    fi
}
stop_cluster
trap stop_cluster EXIT
rm -rf "$base"
mkdir -p "$datadir"
chown -R postgres: "$base"
chmod 700 "$datadir"
as_postgres "$PG_BIN/initdb" -D "$datadir" -U postgres --auth=trust >/dev/null
{
    echo "port = $port"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$datadir'"
    echo "$settings"
} >>"$datadir/postgresql.conf"
as_postgres "$PG_BIN/pg_ctl" -D "$datadir" -l "$base/server.log" -w -t 60 start >/dev/null

echo "PostgreSQL 15 cluster on port $port (data in $datadir) with:"
echo "$settings" | sed 's/^/    /'

psql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
psql -d postgres -c "CREATE DATABASE bench"
psql -d bench -c "CREATE EXTENSION bussig" -c "CREATE EXTENSION pgq" 2>&1 | grep -v NOTICE || true
psql -d bench -f bench/sql/hand_written.sql

# Figures from an unoptimised build say nothing about bussig: say so, in the output and in the report.
library=$("$PG_BIN/pg_config" --pkglibdir)/bussig.so
if readelf -S "$library" 2>/dev/null | grep -q debug_info; then
    export BENCH_WARNING="The bussig library measured here is a debug build ($library has debug information): its figures understate a release build."
    echo "WARNING: $BENCH_WARNING" >&2
fi

export BENCH_URL="host=127.0.0.1 port=$port user=postgres dbname=bench"
export BENCH_PYTHON_VENV="$base/python"
export BENCH_SETTINGS="$settings"
# Workload 13 restarts the server under load, as its user, with the data directory only we know.
BENCH_RESTART=$(printf '%q ' runuser -u postgres -- env -u RUST_BACKTRACE "$PG_BIN/pg_ctl" -D "$datadir" \
    -l "$base/server.log" -m fast -w -t 60 restart)
export BENCH_RESTART
if [[ -n "${CPU:-}" && "${CPU}" != 0 ]]; then
    bench/cpu.sh
    exit
fi
if [[ -n "${INSTRUCTIONS:-}" && "${INSTRUCTIONS}" != 0 ]]; then
    BENCH_DATA_DIR="$datadir" bench/instructions.sh
    exit
fi
if [[ -n "${COMPACTION:-}" && "${COMPACTION}" != 0 ]]; then
    bench/compaction.sh
    exit
fi
if [[ -n "${WAL:-}" && "${WAL}" != 0 ]]; then
    BENCH_DATA_DIR="$datadir" bench/wal.sh
    exit
fi
mode=()
[[ -n "${QUICK:-}" && "${QUICK}" != 0 ]] && mode=(--quick)
# CARGO_TARGET_DIR, when set, puts the load generator's build elsewhere.
cargo run --quiet --release -p bussig-bench -- "${mode[@]}"
