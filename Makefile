# bussig: `make run` to try it, `make test` to test it. Everything runs as root on Debian.
PG_BIN    ?= /usr/lib/postgresql/15/bin
RUN_PORT  := 28815
# The demo cluster lives in an ignored folder when `postgres` can reach it, else under /var/tmp.
RUN_DATA  ?= $(shell runuser -u postgres -- test -x $(CURDIR) 2>/dev/null && echo $(CURDIR)/.run/pgdata \
                || echo /var/tmp/bussig-run-$(shell echo $(CURDIR) | md5sum | cut -c1-8)/pgdata)
PSQL      := $(PG_BIN)/psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $(RUN_PORT) -U postgres

.PHONY: run stop test setup install bench

setup:
	@.ci/setup.sh

install: setup
	@.ci/install.sh

run: install
	@mkdir -p $(dir $(RUN_DATA))
	@.ci/cluster.sh start $(RUN_DATA) $(RUN_PORT)
	@$(PSQL) -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'bussig'" | grep -q 1 \
		|| $(PSQL) -d postgres -c "CREATE DATABASE bussig"
	@$(PSQL) -d bussig -c "CREATE EXTENSION IF NOT EXISTS bussig" -c "ALTER EXTENSION bussig UPDATE"
	@$(PSQL) -d bussig -f docs/demo.sql
	@echo
	@echo "bussig is running (data in $(RUN_DATA)). Connect with:"
	@echo "    psql -h 127.0.0.1 -p $(RUN_PORT) -U postgres bussig"
	@echo "Stop it with: make stop"

stop:
	@.ci/cluster.sh stop $(RUN_DATA)

test:
	@.ci/test.sh

# Not part of `make test`: a throw-away cluster on its own port; QUICK=1 for a short run, CPU=1 for
# the cost of one message in server CPU and WAL, INSTRUCTIONS=1 for a batch's in CPU instructions,
# COMPACTION=1 for the stall the worker's table rewrite causes.
bench:
	@QUICK=$(QUICK) CPU=$(CPU) INSTRUCTIONS=$(INSTRUCTIONS) WAL=$(WAL) COMPACTION=$(COMPACTION) bench/run.sh
