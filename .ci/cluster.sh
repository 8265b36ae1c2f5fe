#!/usr/bin/env bash
# Starts or stops a throw-away PostgreSQL cluster owned by `postgres` (initdb refuses root).
#   cluster.sh start DATADIR PORT   initdb if needed, preload bussig, start, wait until ready
#   cluster.sh stop DATADIR         fast shutdown, if running
#   cluster.sh running DATADIR      exit status 0 when it runs
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
action=$1
datadir=$2
# A Rust backtrace in the environment would end up in every error's DETAIL.
as_postgres() { runuser -u postgres -- env -u RUST_BACKTRACE "$@"; }

case "$action" in
start)
    port=$3
    if [[ ! -s "$datadir/PG_VERSION" ]]; then
        mkdir -p "$datadir"
        chown postgres: "$datadir"
        chmod 700 "$datadir"
        as_postgres "$PG_BIN/initdb" -D "$datadir" -U postgres --auth=trust --no-sync >/dev/null
        cat >>"$datadir/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$datadir'
shared_preload_libraries = 'bussig'
max_connections = 200
# A worker per database with bussig, and the tests create many databases.
max_worker_processes = 32
# Tests of appends and sends in prepared transactions.
max_prepared_transactions = 8
fsync = on
CONF
    fi
    if ! as_postgres "$PG_BIN/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        as_postgres "$PG_BIN/pg_ctl" -D "$datadir" -l "$datadir/server.log" -w -t 60 start >/dev/null
    fi
    ;;
stop)
    if [[ -d "$datadir" ]] && as_postgres "$PG_BIN/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        as_postgres "$PG_BIN/pg_ctl" -D "$datadir" -m fast -w stop >/dev/null
    fi
    ;;
running)
    [[ -d "$datadir" ]] && as_postgres "$PG_BIN/pg_ctl" -D "$datadir" status >/dev/null 2>&1
    ;;
*)
    echo "usage: $0 start DATADIR PORT | stop DATADIR | running DATADIR" >&2
    exit 2
    ;;
esac
