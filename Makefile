# Every target is self-sufficient on a fresh machine: it builds .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: test demo lint bench test-docker fuzz clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,oracle,demo]'
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -n auto -q

fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -n auto -q -m fuzz

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PY) benchmarks/core_step.py

demo: $(VENV)/.installed
	$(VENV)/bin/shardgrad demo

clean:
	rm -rf $(VENV) build *.egg-info
