# The two commands of a fresh machine: `make quickstart` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-fast quickstart

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build these machines keep on disk; on a GPU machine install your CUDA torch first
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[embedded,data,test,fp8]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# the inner loop: everything but the slow, end-to-end and GPU tests
test-fast: install
	$(PY) -m pytest -q -m "not slow and not e2e and not gpu"

quickstart: install
	$(VENV)/bin/zhtune-quickstart
