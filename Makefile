# attnres-train developer entry points. `make setup && make train`, `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test test-fast lint bench clean

$(STAMP): pyproject.toml launch/setup_env.sh launch/constraints-cpu.txt
	bash launch/setup_env.sh
	@touch $(STAMP)

setup: $(STAMP)

# Trains the embedded default (tiny-ish model on a corpus built from the Python stdlib, byte tokenizer).
train: $(STAMP)
	$(PYTHON) -m attnres_train $(ARGS)

# Whole suite (CI runs exactly this).
test: $(STAMP)
	$(PYTHON) -m pytest -q -ra

# Quick subset for iteration: skips tests marked slow.
test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow" -x

lint: $(STAMP)
	$(VENV)/bin/ruff check attnres_train kernels tests bench

bench: $(STAMP)
	$(PYTHON) bench/attnres_overhead.py

clean:
	rm -rf runs outputs multirun .pytest_cache
