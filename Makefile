# Every target bootstraps its own virtual environment; nothing installed by hand is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo

.PHONY: demo test lint bench bench-trl-env trl-parity clean

$(VENV)/.base: setup.cfg pyproject.toml
	test -x $(VENV)/bin/pip || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m prefjax.demo --workdir=$(WORKDIR)

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2

lint: $(VENV)/.test
	$(VENV)/bin/ruff check prefjax tests benchmarks experiments configs

TRL_VENV ?= benchmarks/.venv-trl

bench: $(VENV)/.test $(TRL_VENV)/.trl
	$(PY) benchmarks/logps_memory.py
	$(PY) benchmarks/dpo_step.py
	$(PY) benchmarks/dpo_step.py --hidden 512 --heads 8 --kv-heads 4 --intermediate 1376 \
		--out benchmarks/results/dpo_step_d512.json

# HF TRL for the side-by-side DPO benchmark, in its own environment (torch pinned: CPU build)
bench-trl-env: $(TRL_VENV)/.trl

# prefjax's CLI against HF TRL's DPOTrainer step by step (also part of `make test`)
trl-parity: $(VENV)/.test $(TRL_VENV)/.trl
	$(PY) -m pytest -q -p no:xdist tests/test_trl_parity.py

$(TRL_VENV)/.trl:
	test -x $(TRL_VENV)/bin/pip || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q torch==2.13.0 trl==1.16.0 transformers datasets accelerate \
		mistral-common sentencepiece protobuf peft
	touch $@

clean:
	rm -rf $(VENV) workdirs
