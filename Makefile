# Two commands on a fresh clone:  `make demo` (install + train on the bundled digits) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the release the team's machines carry; other versions download gigabytes.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install install-test browser postgres bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	touch $@

install: $(VENV)/.torch
	$(BIN)/pip install --quiet -e .

install-test: $(VENV)/.torch
	$(BIN)/pip install --quiet -e '.[test]'

demo: install
	$(BIN)/visionrecipe train --data digits --out runs/demo --overwrite

test: install-test
	$(BIN)/python -m pytest -q

# Debian's chromium for the browser tests (report page, web page); CI runs this.
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

# Debian's PostgreSQL server for the distributed-tune tests (they start their own throwaway
# cluster with initdb/pg_ctl, so no service is started here); CI runs this.
postgres:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q postgresql)

bench: install-test
	$(BIN)/python bench/speed.py --help

clean:
	rm -rf $(VENV) runs build src/*.egg-info
