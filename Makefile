# Quick start:  make run   (set up .venv, run the default FEMNIST job)
#               make test  (set up .venv, run the test suite without the slow and end-to-end runs)
#               make test-all (everything, the end-to-end runs of real Flower processes included)
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
ARGS    ?=

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: setup run test test-all lint centralized clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/fedapp-run $(ARGS)

centralized: setup
	$(VENV)/bin/fedapp-centralized $(ARGS)

test: setup
	$(PY) -m pytest -m "not e2e and not slow" --durations=25 $(ARGS)

test-all: setup
	$(PY) -m pytest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check fedapp strategies tasks tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
