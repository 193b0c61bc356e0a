# Every target is self-sufficient on a fresh machine: it builds .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1

.PHONY: test demo lint bench bench-scale test-docker test-swarm test-browser fuzz clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,oracle,demo]'
	touch $@

# Then the fault, determinism, gradient and security tests again with the hierarchical path
# on (two aggregators between the coordinator and the workers; issue 13).
HIERARCHICAL_TESTS := tests/faults tests/security tests/service/test_end_to_end.py \
                      tests/service/test_gradients.py

test: $(VENV)/.installed
	$(PY) -m pytest -n auto -q
	SHARDGRAD_TEST_AGGREGATORS=2 $(PY) -m pytest -n auto -q $(HIERARCHICAL_TESTS) -k "not aggregator"

fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -n auto -q -m fuzz

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PY) benchmarks/core_step.py

# Coordinator bytes and round time for N = 1..32 workers (docs/scaling.md); a few minutes.
bench-scale: $(VENV)/.installed
	$(PY) benchmarks/scale.py

demo: $(VENV)/.installed
	$(VENV)/bin/shardgrad demo

clean:
	rm -rf $(VENV) build *.egg-info

# Docker end to end (tests/e2e/test_compose.py, README "Run a cluster with docker-compose").
# First the engine script brings up dockerd and a local base image (this workplace has no
# registry; the script lives in ../shared/tools beside the clone, else /work/shared/tools;
# override with DOCKER_ENGINE_SCRIPT=...). If it cannot,
# that is said loudly and the tests run anyway: they skip when no engine answers, and fail
# for real once one does.
DOCKER_ENGINE_SCRIPT ?= $(firstword $(wildcard $(abspath $(CURDIR)/../shared/tools/docker-engine) \
                          /work/shared/tools/docker-engine) \
                          $(abspath $(CURDIR)/../shared/tools/docker-engine))

# $(call docker_e2e,TARGET,TEST FILE): bring up the engine, then run that file's docker tests.
define docker_e2e
	@start=$$(date +%s); base=""; \
	if [ ! -f "$(DOCKER_ENGINE_SCRIPT)" ]; then \
	  echo "!!!!!!!! $(1): NO DOCKER ENGINE SCRIPT at $(DOCKER_ENGINE_SCRIPT) (set DOCKER_ENGINE_SCRIPT);"; \
	  echo "!!!!!!!! the docker tests will SKIP unless an engine is already running"; \
	elif ! base=$$(bash "$(DOCKER_ENGINE_SCRIPT)"); then \
	  base=""; \
	  echo "!!!!!!!! $(1): THE DOCKER ENGINE SCRIPT FAILED ($(DOCKER_ENGINE_SCRIPT)); see its messages above;"; \
	  echo "!!!!!!!! the docker tests will SKIP unless an engine is already running"; \
	else \
	  echo "$(1): engine up, base image $$base, in $$(( $$(date +%s) - start )) s"; \
	fi; \
	if [ -n "$$base" ]; then export SHARDGRAD_BASE_IMAGE="$${SHARDGRAD_BASE_IMAGE:-$$base}"; fi; \
	$(PY) -m pytest -m docker -v -rs --durations=5 $(2); rc=$$?; \
	echo "$(1): $$(( $$(date +%s) - start )) s in all (engine + image + tests), exit $$rc"; \
	exit $$rc
endef

test-docker: $(VENV)/.installed
	$(call docker_e2e,test-docker,tests/e2e/test_compose.py)

# Docker Swarm end to end (tests/e2e/test_swarm.py, README "Across machines"): the same
# engine bring-up, then a one-node swarm (`docker swarm init`), `docker stack deploy` of
# docker-compose.yml, workers scaled 1 -> 4 -> 2 mid-job, `stack rm` + `swarm leave`.
test-swarm: $(VENV)/.installed
	$(call docker_e2e,test-swarm,tests/e2e/test_swarm.py)

# The dashboard in a real browser and /metrics scraped by a real Prometheus
# (tests/dashboard/test_browser.py, test_prometheus.py). Installs what is missing: Chromium
# and Prometheus from the distribution (apt-get; sudo when not root), Playwright from the
# `browser` extra. Playwright drives the system Chromium: its own browser download is never
# used. If a program cannot be installed this says so loudly and its test skips, naming it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test-browser: $(VENV)/.installed
	@start=$$(date +%s); missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "test-browser: installing$$missing (apt-get)"; \
	  if ! { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	         $(SUDO) apt-get install -y -qq$$missing >/dev/null; }; then \
	    echo "!!!!!!!! test-browser: COULD NOT INSTALL$$missing; the tests needing it will SKIP"; \
	  fi; \
	fi; \
	$(PY) -m pip install -q -e '.[browser]' || exit 1; \
	$(PY) -m pytest -m browser -v -rs --durations=5 tests/dashboard; rc=$$?; \
	echo "test-browser: $$(( $$(date +%s) - start )) s in all (installs + tests), exit $$rc"; \
	exit $$rc
