# `make run` serves on 127.0.0.1:8000; `make test` runs the whole suite. Both set up .venv themselves;
# `make test` also installs the system tools its tests drive (scripts/system-deps).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test bench clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-deps: $(BIN)/python pyproject.toml clients/python/pyproject.toml
	$(BIN)/pip install -q -e . -e clients/python
	touch $@

$(VENV)/.test-deps: $(VENV)/.run-deps
	$(BIN)/pip install -q -e ".[test]"
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/optim-service serve --host 127.0.0.1 --port 8000

system-deps:
	@scripts/system-deps

test: system-deps $(VENV)/.test-deps
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache

$(VENV)/.bench-deps: $(VENV)/.test-deps
	$(BIN)/pip install -q -e ".[bench]"
	touch $@

bench: $(VENV)/.bench-deps
	cd bench && ../$(BIN)/python compute.py
	cd bench && ../$(BIN)/python wire.py
	cd bench && ../$(BIN)/python memory.py
	cd bench && ../$(BIN)/python stores.py
	cd bench && ../$(BIN)/python instructions.py
	cd bench && ../$(BIN)/python rounds.py
	cd bench && ../$(BIN)/python threads.py
	cd bench && ../$(BIN)/python shm.py
	cd bench && ../$(BIN)/python peers.py
	cd bench && ../$(BIN)/python parity.py
