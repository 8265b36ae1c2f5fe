#!/usr/bin/env bash
# Workload 15's driver: installs the Python client (clients/python) with procrastinate and pgqueuer from
# PyPI into one virtual environment, then runs clients/python/bench/drain.py with the arguments given.
# The load generator (bench/src/python.rs) runs it and reads the JSON lines it prints.
#   BENCH_PYTHON_VENV=DIR  the environment to create (bench/run.sh puts it in the cluster's directory);
#                          without it a temporary one, removed at the end
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${BENCH_PYTHON_VENV:-}
if [[ -z "$venv" ]]; then
    venv=$(mktemp -d)
    trap 'rm -rf "$venv"' EXIT
fi
if [[ ! -x "$venv/bin/python" ]]; then
    "${PYTHON:-python3}" -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check ./clients/python -r bench/python-requirements.txt >&2
fi
"$venv/bin/python" clients/python/bench/drain.py "$@"
