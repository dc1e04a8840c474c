# Every target bootstraps its own virtual environment; nothing installed by hand is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/demo_synthetic.py
WORKDIR ?= workdirs/demo

.PHONY: demo test lint bench clean

$(VENV)/.base: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m prefjax.demo --workdir=$(WORKDIR)

test: $(VENV)/.test
	$(PY) -m pytest -q

lint: $(VENV)/.test
	$(VENV)/bin/ruff check prefjax tests benchmarks experiments configs

bench: $(VENV)/.test
	$(PY) benchmarks/logps_memory.py

clean:
	rm -rf $(VENV) workdirs
