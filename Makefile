# Two entry points for a new machine: `make serve` and `make test`. Each builds .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?= models/tiny-llama
PORT ?= 8000
# pytest-xdist is not used: the suite starts its own processes and 2 cores are all CI has.
PYTEST_ARGS ?=

.PHONY: venv test lint fmt serve model redis clean

venv: $(STAMP)

# Without a GPU, pin torch to the CPU wheel on local disk (an unpinned torch pulls a multi-GB CUDA build).
# With one, reuse the machine's torch through system site-packages.
$(STAMP): pyproject.toml requirements-cpu.txt
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m venv --system-site-packages $(VENV) && \
		$(BIN)/pip install -q -e '.[test]'; \
	else \
		$(PY) -m venv $(VENV) && \
		$(BIN)/pip install -q -r requirements-cpu.txt && \
		$(BIN)/pip install -q -c requirements-cpu.txt -e '.[test]'; \
	fi
	@touch $(STAMP)

# Redis for the routing tests: Debian's package; the tests start their own server on a free loopback port.
redis:
	@command -v redis-server >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

# Lint first (ruff's rules and line length are in pyproject.toml): a style slip fails in seconds, not after pytest.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: $(STAMP) redis lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/pdserve make-model $(MODEL) --family llama --preset tiny

model: $(MODEL)/config.json

serve: $(STAMP) $(MODEL)/config.json
	$(BIN)/pdserve up --prefill 1 --decode 1 --model $(MODEL) --port $(PORT)

clean:
	rm -rf $(VENV) models
