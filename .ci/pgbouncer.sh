#!/usr/bin/env bash
# A throw-away pgbouncer in transaction pooling mode in front of a test cluster, run as `postgres`
# (pgbouncer refuses root).
#   pgbouncer.sh start DIR PORT SERVER_PORT   every database of the server, trust auth, on 127.0.0.1:PORT
#   pgbouncer.sh stop DIR                     if running
set -euo pipefail

action=$1
dir=$2
case "$action" in
start)
    port=$3
    server_port=$4
    mkdir -p "$dir"
    cat >"$dir/pgbouncer.ini" <<CONF
[databases]
* = host=127.0.0.1 port=$server_port

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
max_client_conn = 400
default_pool_size = 30
max_db_connections = 30
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
CONF
    echo '"postgres" ""' >"$dir/userlist.txt"
    chown -R postgres: "$dir"
    runuser -u postgres -- pgbouncer -d -q "$dir/pgbouncer.ini"
    for _ in $(seq 100); do
        /usr/lib/postgresql/15/bin/pg_isready -q -h 127.0.0.1 -p "$port" && exit 0
        sleep 0.1
    done
    echo "pgbouncer did not start; its log:" >&2
    cat "$dir/pgbouncer.log" >&2
    exit 1
    ;;
stop)
    if [[ -s "$dir/pgbouncer.pid" ]]; then
        kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true
        rm -f "$dir/pgbouncer.pid"
    fi
    ;;
*)
    echo "usage: $0 start DIR PORT SERVER_PORT | stop DIR" >&2
    exit 2
    ;;
esac
