# Sourced by bench/cpu.sh and bench/instructions.sh, so that both measure the same message the same way.
# The load generator's payload (PAYLOAD in bench/src/systems.rs) is this one too.
payload='{"id": 1, "kind": "order.created", "customer": "c-000042", "amount": 99.95, "currency": "EUR", "items": [1, 2, 3]}'
batch="array_fill('$payload'::jsonb, ARRAY[100])"
q() { "$PG_BIN/psql" -X -q -tA -v ON_ERROR_STOP=1 "$BENCH_URL" "$@"; }
