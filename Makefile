# Two commands that work on a fresh machine with Python 3.11, pip and make:
#   make demo   set up .venv, then run the embedded default job
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
# Our CPU machines carry this wheel on disk; users with their own torch
# (NVIDIA containers) can pass TORCH_SPEC= to keep it.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# the suite in two pytest-xdist workers, one module per worker at a time, in the order tests/conftest.py gives
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

.PHONY: setup demo test test-fast test-slow clean

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install --quiet "$(TORCH_SPEC)"; fi
	# DeepSpeed (optimizer.cpu_offload=deepspeed) builds against the torch above; an isolated
	# build would fetch a CUDA torch of several GB
	$(PY) -m pip install --quiet --no-build-isolation "deepspeed>=0.16"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/senseflow demo --out demo_out

test: setup
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest tests -m slow $(XDIST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
