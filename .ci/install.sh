#!/usr/bin/env bash
# Builds bussig and installs it into the system PostgreSQL 15.
#   install.sh [--debug]
# Installed files are replaced by rename, never overwritten in place: a running server
# that has the old bussig.so mapped keeps it until it restarts instead of crashing.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
out=target/bussig-package
rm -rf "$out"
if ! build_log=$(cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$out" "$@" 2>&1); then
    echo "$build_log" >&2
    exit 1
fi
# The full scripts of earlier releases too (pgrx packages only the upgrade scripts): tests install
# the first release and update it.
cp sql/bussig--*.sql "$out$("$PG_CONFIG" --sharedir)/extension/"
(cd "$out" && find . -type f) | while read -r file; do
    target="/${file#./}"
    install -D -m 644 "$out/$file" "$target.new"
    mv -f "$target.new" "$target"
done
echo "installed bussig into $("$PG_CONFIG" --pkglibdir) and $("$PG_CONFIG" --sharedir)/extension"
