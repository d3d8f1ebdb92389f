# Two entry points for a new machine: `make serve` and `make test`. Each builds .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= models/tiny-llama
PORT ?= 8000
# pytest-xdist is not used: the suite starts its own processes and 2 cores are all CI has.
PYTEST_ARGS ?=

LOCK := requirements-cpu.lock
# The lock's writer, pinned, in a venv of its own so that it never changes what the tests run with.
PIP_TOOLS := pip-tools==7.7.0
LOCK_VENV := .venv-lock

.PHONY: venv test lint fmt serve model redis prometheus clean lock

venv: $(STAMP)

# Without a GPU: exactly the lock (torch's CPU build among it, from the wheel on local disk; an unpinned torch
# pulls a multi-GB CUDA build), then pdserve itself, editable, adding nothing. With one: the machine's torch
# through system site-packages, and pyproject's ranges for the rest.
$(STAMP): pyproject.toml $(LOCK)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m venv --system-site-packages $(VENV) && \
		$(BIN)/pip install -q -e '.[test]'; \
	else \
		$(PY) -m venv $(VENV) && \
		$(BIN)/pip install -q -r $(LOCK) && \
		$(BIN)/pip install -q --no-deps -e . && \
		$(BIN)/pip check; \
	fi
	@touch $(STAMP)

# Rewrite the lock from pyproject.toml's ranges (and its test extra) and requirements-cpu.in, taking the newest
# versions they admit. Run `make test` on the new lock before committing it.
lock:
	@test -x $(LOCK_VENV)/bin/pip-compile || { $(PY) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q $(PIP_TOOLS); }
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --extra test --strip-extras --no-emit-find-links \
		--no-emit-index-url --no-emit-trusted-host --output-file $(LOCK) pyproject.toml requirements-cpu.in

# Redis for the routing tests: Debian's package; the tests start their own server on a free loopback port.
redis:
	@command -v redis-server >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# Prometheus for the dashboard test (every panel's PromQL against a real server scraping a CPU cluster): Debian's
# package; the test starts its own server on a free loopback port.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null; }

# Lint first (ruff's rules and line length are in pyproject.toml): a style slip fails in seconds, not after pytest.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) redis prometheus lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/pdserve make-model $(MODEL) --family llama --preset tiny

model: $(MODEL)/config.json

serve: $(STAMP) $(MODEL)/config.json
	$(BIN)/pdserve up --prefill 1 --decode 1 --model $(MODEL) --port $(PORT)

clean:
	rm -rf $(VENV) $(LOCK_VENV) models
