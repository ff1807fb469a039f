# attnres-train developer entry points. `make setup && make train`, `make test`.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test test-fast lint bench clean upgrade-check lock

$(STAMP): pyproject.toml launch/setup_env.sh launch/constraints-cpu.txt launch/constraints.txt launch/transformers-tested.txt
	bash launch/setup_env.sh
	@touch $(STAMP)

setup: $(STAMP)

# Trains the embedded default (tiny-ish model on a corpus built from the Python stdlib, byte tokenizer).
train: $(STAMP)
	$(PYTHON) -m attnres_train $(ARGS)

LINT_PATHS := attnres_train kernels tests bench

# Lint, format check, then the whole suite (CI runs exactly this).
test: lint
	$(PYTHON) -m pytest -q -ra

# Quick subset for iteration: skips tests marked slow.
test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow" -x

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

bench: $(STAMP)
	$(PYTHON) bench/attnres_overhead.py
	$(PYTHON) bench/vs_deepspeed.py  # SKIP line without the bench-deepspeed extra

# Moving the pinned versions forward (docs/hf_interop.md "Pinned versions"): install the newest versions that
# pyproject.toml allows into a scratch venv and run the interop and model tests there; `make lock` then writes
# that venv's versions to launch/constraints.txt (commit it after `make setup && make test` is green).
UPGRADE_VENV ?= .venv-upgrade
upgrade-check:
	rm -rf $(UPGRADE_VENV)
	VENV=$(UPGRADE_VENV) LOCK=none bash launch/setup_env.sh
	$(UPGRADE_VENV)/bin/python -m pytest -q -ra tests/interop tests/model
	@diff <(grep -v '^#' launch/constraints.txt) <($(UPGRADE_VENV)/bin/pip freeze --exclude-editable --all \
	  | grep -viE '^(torch|triton|pip|setuptools|wheel)(==| @)') && echo "lock is current" || true

lock:
	bash launch/write_lock.sh $(UPGRADE_VENV)

clean:
	rm -rf runs outputs multirun .pytest_cache
